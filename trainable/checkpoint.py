"""A trial's checkpoint folder: what transformers' trainer saves in it (adapter, optimizer, LR schedule, RNG
states, trainer_state.json), the trial_state.json this module writes beside it, and the folders a trial
finds of its own in storage when it is restarted.

trial_state.json (TrialState) holds the trial's restarts so far, the report sent to Tune with the
checkpoint, and the size of every other file in the folder. Tune copies a reported folder into the
trial's folder in storage (`checkpoint_000003`) file by file, so a driver or node killed during the copy
leaves one with files missing or cut short: a folder is complete when its trial_state.json reads and
every file it lists is there with that size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.tune import Checkpoint

TRIAL_STATE = "trial_state.json"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: global_step and the log
STORED_FOLDER = re.compile(r"checkpoint_(\d+)")  # Tune's name for a trial's checkpoints in storage


@dataclasses.dataclass(frozen=True)
class TrialState:
    """What a restarted trial carries on with, kept in each checkpoint beside the trainer's own state."""

    retries: int  # restarts so far
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # sent to Tune with the checkpoint
    files: dict[str, int] = dataclasses.field(default_factory=dict)  # the folder's other files: bytes


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint folder in the trial's folder in storage."""

    index: int  # Tune's number for it: checkpoint_000003 is 3
    path: str  # in the storage's filesystem
    state: TrialState

    @property
    def step(self) -> int:
        return int(self.state.report["step"])


def save_trial_state(folder: Path, *, retries: int, report: dict[str, Any]) -> None:
    """Write trial_state.json into a checkpoint folder the trainer has saved, listing its files."""
    files = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != TRIAL_STATE
    }
    state = TrialState(retries=retries, report=report, files=files)
    (folder / TRIAL_STATE).write_text(json.dumps(dataclasses.asdict(state)))


def load_trial_state(folder: Path) -> TrialState:
    return TrialState(**json.loads((folder / TRIAL_STATE).read_text()))


def checkpoint_step(folder: Path) -> int:
    """The optimizer steps a checkpoint folder's trainer state had taken."""
    return int(json.loads((folder / TRAINER_STATE).read_text())["global_step"])


def stored_index(path: str) -> int:
    """Tune's number of a checkpoint folder in storage from its path; -1 for another name."""
    match = STORED_FOLDER.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else -1


def find_stored_checkpoints(
    filesystem: Any, trial_path: str, *, after: int
) -> tuple[int, list[StoredCheckpoint]]:
    """The highest checkpoint number in the trial's folder `trial_path` of the pyarrow `filesystem`, whole
    or not (-1 for none), and its complete checkpoints numbered above `after`, in Tune's order. A folder
    written before trial_state.json listed the files (older versions of this code) does not count."""
    from pyarrow import fs

    root = trial_path.rstrip("/")
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    sizes: dict[str, dict[str, int]] = {}
    for info in infos:
        parts = info.path[len(root) :].strip("/").split("/")
        if not STORED_FOLDER.fullmatch(parts[0]):
            continue
        files = sizes.setdefault(parts[0], {})
        if len(parts) == 2 and info.type == fs.FileType.File:
            files[parts[1]] = info.size
    complete = []
    for name in sorted(sizes, key=stored_index):
        if stored_index(name) <= after or TRIAL_STATE not in sizes[name]:
            continue
        path = f"{root}/{name}"
        try:
            with filesystem.open_input_stream(f"{path}/{TRIAL_STATE}") as stream:
                state = TrialState(**json.loads(stream.readall()))
        except (ValueError, TypeError):  # cut short, or not a TrialState
            continue
        whole = all(sizes[name].get(file) == size for file, size in state.files.items())
        if whole and state.files and "step" in state.report:
            complete.append(StoredCheckpoint(index=stored_index(name), path=path, state=state))
    return max(map(stored_index, sizes), default=-1), complete


def catch_up_with_storage(trial_id: str) -> Checkpoint | None:
    """In a trial Tune runs: the checkpoint to resume from (None for a new trial): the one Tune restores, or a newer complete one the trial saved in storage, which Tune never
    recorded (the driver was killed first, or this trial's process between the copy and the report). Those
    are reported to Tune again first, each as it was sent, with a copy of its folder, so that Tune's history,
    its best checkpoint and the searcher see the trial as if nothing had stopped; the trial then continues
    from the newest, training no step twice."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    storage = tune.get_context().get_storage()  # the trial's folder in storage, and Tune's next number in it
    # Checkpoints the trial saved after the one Tune restores it from: Tune never recorded them (the driver
    # was killed first, or this trial's process between the copy and the report).
    known = stored_index(checkpoint.path) if checkpoint is not None else -1
    highest, unrecorded = find_stored_checkpoints(
        storage.storage_filesystem, storage.trial_fs_path, after=known
    )
    # Tune numbers a trial's checkpoint folders on from its saved state: number on from the highest folder
    # the trial has, so that no folder is written into twice (one cut short by the kill included).
    storage.current_checkpoint_index = max(storage.current_checkpoint_index, highest)
    if unrecorded:
        steps = ", ".join(str(c.step) for c in unrecorded)
        print(
            f"trial {trial_id}: continues from its step-{unrecorded[-1].step} checkpoint, which Tune had not "
            f"recorded; the reports of steps {steps} are sent again",
            flush=True,
        )
    for missed in unrecorded:
        checkpoint = tune.Checkpoint(missed.path, filesystem=storage.storage_filesystem)
        tune.report(missed.state.report, checkpoint=checkpoint)
    return checkpoint


def keep_adapter_dtypes_on_resume(model: Any) -> None:
    """Have the trainer load a checkpoint's adapter into the dtypes it trains in, as it saved them.

    trl casts the LoRA weights on a quantized base to bf16 (QLoRA's recipe); transformers resumes by
    calling peft's load_adapter, which upcasts a bf16 or fp16 adapter to float32 unless told not to. A
    resumed trial then trained in float32 where an uninterrupted one trains in bf16, and from the first
    step after the resume its losses drifted away from the uninterrupted run's. With the weights in bf16
    the optimizer's state loads as it was saved too: torch's AdamW casts it to the weights' dtype, the one
    it was saved in; bitsandbytes' 32-bit optimizers keep theirs in float32 whatever the weights'.
    """
    model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)
