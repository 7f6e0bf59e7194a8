"""A trial worker ended by the raylet's SIGTERM at the end of a sweep prints no SystemExit traceback."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from trainable.worker import end_quietly_on_sigterm


def test_a_trial_worker_ended_while_it_runs_a_finalizer_prints_no_systemexit(ray_cpus: None) -> None:
    """As at the end of a sweep: Tune frees the placement group of a live trial worker, the raylet sends it
    SIGTERM, and Ray's handler raises SystemExit in the finalizer running then, which Python prints with a
    traceback. A worker that asked for SIGTERM's default action (from a thread, as a trial runs) ends
    silently."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1)
    class Worker:
        def start(self, *, quiet: bool) -> int:
            import os

            if quiet:  # from a thread of its own, as Tune runs a trial
                thread = threading.Thread(target=end_quietly_on_sigterm)
                thread.start()
                thread.join()
            return os.getpid()

        def free_slowly(self) -> None:
            class SlowToFree:
                def __del__(self) -> None:
                    end = time.monotonic() + 5
                    while time.monotonic() < end:
                        sum(range(1000))

            SlowToFree()  # freed at once: its finalizer runs in this, the main, thread

    def sigterm_handler(_actor: object) -> object:  # defined here: sent to the worker by value
        return signal.getsignal(signal.SIGTERM)

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    printed = {}
    for quiet in (False, True):
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready())
        strategy = PlacementGroupSchedulingStrategy(placement_group=group)
        worker = Worker.options(scheduling_strategy=strategy).remote()
        pid = ray.get(worker.start.remote(quiet=quiet))
        # The worker's call to itself is queued behind nothing of ours: it may run after this test's first
        # look, so look again for a while.
        deadline = time.monotonic() + 10
        while (handler := ray.get(worker.__ray_call__.remote(sigterm_handler))) != signal.SIG_DFL and quiet:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (handler == signal.SIG_DFL) == quiet, handler  # Ray's own handler unless asked
        worker.free_slowly.remote()
        time.sleep(2)  # inside the finalizer
        remove_placement_group(group)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists()
        time.sleep(2)  # the worker's last lines reach its log
        printed[quiet] = "".join(p.read_text() for p in logs.glob(f"worker-*-{pid}.err"))
    assert "SystemExit: 1" in printed[False], printed[False]  # what reached the driver's console
    assert "SystemExit" not in printed[True] and "Traceback" not in printed[True], printed[True]


def test_outside_a_ray_actor_nothing_changes() -> None:
    before = signal.getsignal(signal.SIGTERM)
    end_quietly_on_sigterm()  # train_by_hand: no Ray actor here
    assert signal.getsignal(signal.SIGTERM) is before
