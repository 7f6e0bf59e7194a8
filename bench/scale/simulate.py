"""The driver at scale, simulated: sweeps of 100, 300 and 1,000 trials through the real driver
(sweeps.run.run_sweep: Tune, Optuna's TPE, ASHA, the Optuna study mirror, collect_results, write_table) on a
ray.cluster_utils.Cluster of several nodes with fake GPUs, with trials that only report.

    python -m bench.scale.simulate --trials 100,300,1000 --repeats 3 \
        --out bench/scale/results/scale-DATE.jsonl

Each sweep runs in a fresh Python process, so that its peak RSS is its own: a head node without GPUs (the
driver's, as on a cluster) and --nodes worker nodes with --gpus-per-node fake GPUs and as many CPUs, one
trial per GPU, all of them at once. A trial (`report_only`) imports no torch: it reports --evaluations
made-up eval losses, each with a checkpoint of one small file, as a real trial's evaluations come. Per sweep
it records the wall time, the driver's CPU time and peak RSS, and the time spent in each of the driver's
steps (Tuner.fit, the searcher's suggestions and results, the study mirror, collect_results, write_table),
by wrapping those functions while the sweep runs. One JSON line per sweep is added to --out; <out>-summary.jsonl gets one per size (median and
range over the repeats, and the growth per trial against the smallest size) over every sweep --out holds
of the same cluster shape, so that sizes run by separate commands are summarized together.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainable.outcome import RANKABLE_STATUSES, TrialReport

if TYPE_CHECKING:
    from sweeps.plan import SweepPlan
    from sweeps.resources import TrialResources

REPO = Path(__file__).resolve().parents[2]  # the sweeps run from here, as `python -m bench.scale.simulate`
MIB = 2**20
# A Cluster node's object store: the trials pass only small reports and checkpoints through it; Ray's test
# clusters default to 150 MiB, enough here, and a 2-core, 24 GiB machine holds five of them.
OBJECT_STORE_BYTES = 150 * MIB
# The learning rate the made-up loss is lowest at: QLoRA's 2e-4 for 7B-13B models, a value inside the
# search space's range, so that TPE has a minimum to find.
BEST_LEARNING_RATE = 2e-4
BASE_EVAL_LOSS = 2.0  # the made-up base model's loss; every simulated trial ends below it


def simulated_loss(hparams: dict[str, Any], progress: float) -> float:
    """A made-up eval loss: a bowl around BEST_LEARNING_RATE (in log space), a little better for a larger r,
    falling as the trial trains (`progress` from 0 to 1), so that ASHA and TPE have a signal to act on."""
    distance = math.log10(hparams.get("learning_rate", BEST_LEARNING_RATE) / BEST_LEARNING_RATE) ** 2
    return 1.0 + 0.5 * distance + 0.5 * (1 - progress) + 0.1 / math.log2(2 * hparams.get("r", 8))


def report_only(hparams: dict[str, Any], *, evaluations: int, eval_every: int, gpu_share: float) -> None:
    """Tune's trainable for the benchmark: trains nothing and imports no torch; `evaluations` reports of
    simulated_loss, each with a checkpoint holding one small file, as trainable.train.train_trial reports
    each evaluation with its adapter."""
    import ray
    from ray import tune

    started_at, node = time.time(), ray.get_runtime_context().get_node_id()
    trial_id = tune.get_context().get_trial_id()
    for i in range(1, evaluations + 1):
        report = TrialReport(
            eval_loss=simulated_loss(hparams, i / evaluations),
            train_loss=simulated_loss(hparams, i / evaluations),
            step=i * eval_every,
            base_eval_loss=BASE_EVAL_LOSS,
            node_id=node,
            started_at=started_at,
            gpu_share=gpu_share,
        )
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "adapter_config.json").write_text(json.dumps(hparams))
            tune.report(report.to_tune(), checkpoint=tune.Checkpoint.from_directory(folder))
        # A line per evaluation, as a real trial prints, for the driver to forward to its console.
        print(f"trial {trial_id}: step {report.step}, eval_loss {report.eval_loss:.4f}", flush=True)


def report_only_trainable(*, evaluations: int) -> Callable[[SweepPlan, TrialResources], Any]:
    """What run_sweep builds its trainable with (its `build_trainable`): report_only with a real trial's
    resources (search.cpus_per_trial, resources.gpu_share)."""

    def build(plan: SweepPlan, resources: TrialResources) -> Any:
        from ray import tune

        trial = tune.with_parameters(
            report_only,
            evaluations=evaluations,
            eval_every=plan.config.train.eval_every,
            gpu_share=resources.gpu_share,
        )
        return tune.with_resources(
            trial, {"cpu": plan.config.search.cpus_per_trial, "gpu": resources.gpu_share}
        )

    return build


def build_plan(trials: int, storage: Path, *, evaluations: int) -> SweepPlan:
    """A SweepPlan as plan_sweep would make it for a config of `trials` trials, without a model or data
    (the trials load neither): the default search space, ASHA, one GPU per trial, no report (it would
    load the model), and the base model's eval loss already known, so that the driver does not measure it."""
    from sweeps.config import validate_config
    from sweeps.plan import SweepPlan, with_base_eval_loss
    from trainable.prepare import TrialSettings
    from trainable.schema import SweepSummary

    eval_every = 2  # any value: the trials make their losses up; steps = evaluations x eval_every
    config = validate_config(
        {
            "name": "scale",
            "storage_path": str(storage),
            "experiment": f"scale-{trials}",
            "train": {"max_steps": evaluations * eval_every, "eval_every": eval_every},
            # grace_period 1: ASHA may stop a trial after its first report, so it acts even at 2 evaluations.
            "search": {
                "num_samples": trials,
                "cpus_per_trial": 1,
                "gpus_per_trial": 1,
                "trials_per_gpu": 1,
                "grace_period": 1,
            },
            "report": {"enabled": False},
        },
        origin="bench.scale.simulate",
        calibrated_lr=BEST_LEARNING_RATE,  # the default space centred on the made-up loss's minimum
    )
    settings = TrialSettings(
        model_path="",
        model=config.model,
        train=config.train,
        default_hparams=config.lora,
        train_data={},
        eval_data={},
    )
    # sweep.json's summary of what plan_sweep resolves: nothing here but the config (no model, no data).
    summary = SweepSummary(
        config=dataclasses.asdict(config),
        fingerprint={},
        model_path="",
        chat_template="",
        linear_modules=[],
        data={},
        environment={},
    )
    points = config.starting_points(BEST_LEARNING_RATE)  # the baselines, as the driver runs them first
    plan = SweepPlan(config, config.experiment_name(), config.storage_uri(), settings, summary, points)
    return with_base_eval_loss(plan, BASE_EVAL_LOSS)


@contextlib.contextmanager
def timed(owner: Any, name: str, seconds: list[float]) -> Iterator[None]:
    """While open, `owner.name` appends its duration to `seconds` on each call. The function runs as it
    is, called where the driver calls it: the benchmark times it, it does not replace it."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def start_cluster(*, nodes: int, gpus_per_node: int) -> Any:  # ray.cluster_utils.Cluster
    """A head node with no trial resources (the driver's, as on a real cluster) and `nodes` worker nodes,
    each with `gpus_per_node` fake GPUs and as many CPUs (one per trial)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES},
    )
    for _ in range(nodes):
        cluster.add_node(
            num_cpus=gpus_per_node, num_gpus=gpus_per_node, object_store_memory=OBJECT_STORE_BYTES
        )
    cluster.wait_for_nodes()
    return cluster


def rss_mib(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MIB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def early_and_late(name: str, seconds: list[float], calls: int = 50) -> dict[str, float]:
    return {
        f"{name}_first_ms": round(1000 * statistics.mean(seconds[:calls]), 1),
        f"{name}_last_ms": round(1000 * statistics.mean(seconds[-calls:]), 1),
    }


def measure_sweep(*, trials: int, nodes: int, gpus_per_node: int, evaluations: int) -> dict[str, Any]:
    """One sweep of `trials` trials through sweeps.run.run_sweep on a fresh Cluster, timed step by step."""
    import pandas as pd
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from sweeps import run
    from sweeps.study import StudyMirror

    cluster = start_cluster(nodes=nodes, gpus_per_node=gpus_per_node)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="scale-") as storage:
            plan = build_plan(trials, Path(storage), evaluations=evaluations)
            names = ("resources", "fit", "suggest", "tell", "mirror", "collect", "write")
            steps: dict[str, list[float]] = {name: [] for name in names}
            rss_start, cpu_start, start = rss_mib(), cpu_seconds(), time.perf_counter()
            with (
                timed(run, "plan_resources", steps["resources"]),
                timed(tune.Tuner, "fit", steps["fit"]),
                timed(OptunaSearch, "suggest", steps["suggest"]),  # TPE, once per trial
                timed(OptunaSearch, "on_trial_complete", steps["tell"]),
                timed(StudyMirror, "record", steps["mirror"]),
                timed(run, "collect_results", steps["collect"]),
                timed(run, "write_table", steps["write"]),
            ):
                path = run.run_sweep(
                    plan, verbosity=0, build_trainable=report_only_trainable(evaluations=evaluations)
                )
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            untimed = [name for name, seconds in steps.items() if not seconds]
            if untimed:  # the driver no longer takes the path this benchmark times
                raise RuntimeError(f"bench.scale.simulate: the driver never called {', '.join(untimed)}")
            table = pd.read_parquet(path)
            gcs = cluster.head_node.all_processes["gcs_server"][0].process.pid
            return {
                "trials": trials,
                "nodes": nodes,
                "gpus_per_node": gpus_per_node,
                "evaluations": evaluations,
                "trials_in_table": len(table),
                "reports": int(table["eval_history"].map(len).sum()),  # results the driver handled
                "statuses": table["status"].value_counts().to_dict(),
                "all_ended": len(table) == trials and bool(table["status"].isin(RANKABLE_STATUSES).all()),
                "wall_s": round(wall, 2),
                "setup_s": round(sum(steps["resources"]), 2),  # once per sweep: the cluster's resources
                "fit_s": round(sum(steps["fit"]), 2),
                "searcher_s": round(sum(steps["suggest"]) + sum(steps["tell"]), 2),
                "mirror_s": round(sum(steps["mirror"]), 2),
                # The cost per trial of TPE's suggestion and of the mirror early and late in the sweep (their
                # first and last 50 calls): the same if it does not grow with the trials before.
                **early_and_late("suggest", steps["suggest"]),
                **early_and_late("mirror", steps["mirror"]),
                "collect_s": round(sum(steps["collect"]), 4),  # milliseconds for a small sweep
                "write_s": round(sum(steps["write"]), 4),
                "wall_per_trial_s": round(wall / trials, 4),
                "driver_cpu_s": round(cpu, 2),
                "driver_cpu_per_trial_ms": round(1000 * cpu / trials, 1),
                "driver_rss_start_mib": round(rss_start),
                # ru_maxrss is in KiB on Linux; this process ran one sweep, so its peak is the sweep's.
                "driver_rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "gcs_rss_end_mib": round(rss_mib(gcs)),
                # The machine's 1-minute load average at the end: other jobs share its cores with the cluster.
                "load_average": round(os.getloadavg()[0], 1),
                "ray": ray.__version__,
            }
    finally:
        ray.shutdown()
        cluster.shutdown()


# The figures summarize() gives per size; gcs_rss_end_mib is the head node's GCS server, which keeps a
# record of every actor (one per trial) for the cluster's life.
FIGURES = (
    "wall_s",
    "fit_s",
    "searcher_s",
    "mirror_s",
    "collect_s",
    "write_s",
    "driver_cpu_s",
    "driver_rss_peak_mib",
    "gcs_rss_end_mib",
)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: the median and range (min, max) of each figure over the repeats. For each size after the
    smallest: each figure's median per trial over the smallest size's (1 is linear growth, below 1 less
    than linear), and the driver's peak RSS added per extra trial (memory has a fixed part: Python, torch,
    Ray)."""
    rows = []
    for size in sorted({r["trials"] for r in records}):
        runs = [r for r in records if r["trials"] == size]
        row: dict[str, Any] = {
            "trials": size,
            "repeats": len(runs),
            "all_ended": all(r["all_ended"] for r in runs),
        }
        for name in FIGURES:
            values = [r[name] for r in runs]
            row[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append(row)
    smallest = rows[0]
    for row in rows[1:]:
        row["per_trial_vs_smallest"] = {
            name: round(
                (row[name]["median"] / row["trials"]) / (smallest[name]["median"] / smallest["trials"]), 3
            )
            for name in FIGURES
            if smallest[name]["median"] > 0
        }
        added = row["driver_rss_peak_mib"]["median"] - smallest["driver_rss_peak_mib"]["median"]
        row["rss_mib_per_extra_trial"] = round(added / (row["trials"] - smallest["trials"]), 3)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale.simulate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trials", default="100,300,1000", help="comma-separated sweep sizes")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per size, each in a fresh process")
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes of the simulated cluster")
    parser.add_argument("--gpus-per-node", type=int, default=4, help="fake GPUs (and CPUs) per worker node")
    parser.add_argument(
        "--evaluations",
        type=int,
        default=2,  # few: on a 2-core machine each report costs the simulated cluster more than the driver
        help="reports per trial (ASHA may stop a trial after its first), each with a checkpoint",
    )
    parser.add_argument("--out", type=Path, required=True, help="a .jsonl file; one line per sweep is added")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one sweep in this process
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(n) for n in args.trials.split(",")]
    except ValueError:
        parser.error(f"--trials {args.trials!r}: comma-separated whole numbers, e.g. 100,300,1000")
    if min([*args.sizes, args.repeats, args.nodes, args.gpus_per_node, args.evaluations]) < 1:
        parser.error("--trials, --repeats, --nodes, --gpus-per-node and --evaluations must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = [
        "--nodes",
        str(args.nodes),
        "--gpus-per-node",
        str(args.gpus_per_node),
        "--evaluations",
        str(args.evaluations),
        "--out",
        str(args.out),
    ]
    if args.one is not None:
        record = measure_sweep(
            trials=args.one, nodes=args.nodes, gpus_per_node=args.gpus_per_node, evaluations=args.evaluations
        )
        print(json.dumps(record), flush=True)  # the last line of its output: the parent reads it
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The benchmark starts a cluster of its own; RAY_ADDRESS would point the driver elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for repeat in range(args.repeats):  # each size once per round, so that the machine's load spreads
        for size in args.sizes:
            print(f"bench.scale.simulate: {size} trials, repeat {repeat + 1} of {args.repeats}", flush=True)
            done = subprocess.run(
                [sys.executable, "-m", "bench.scale.simulate", "--one", str(size), *shape],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode:
                print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
                return done.returncode
            record = {**json.loads(done.stdout.strip().splitlines()[-1]), "repeat": repeat}
            with args.out.open("a") as out:
                out.write(json.dumps(record) + "\n")
    # Every sweep --out holds of this cluster's shape, this run's and earlier ones'.
    lines = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    same = (args.nodes, args.gpus_per_node, args.evaluations)
    summary = summarize([r for r in lines if (r["nodes"], r["gpus_per_node"], r["evaluations"]) == same])
    summary_path = args.out.with_name(f"{args.out.stem}-summary.jsonl")
    summary_path.write_text("".join(json.dumps(row) + "\n" for row in summary))
    print("\n".join(json.dumps(row) for row in summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
