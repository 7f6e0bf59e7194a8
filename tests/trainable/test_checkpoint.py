"""A restarted trial's look into its folder in storage: which checkpoint folders are complete, and the
highest number Tune must number on from, on a local disk and on S3 (a local S3-compatible server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainable.checkpoint import TRIAL_STATE, find_stored_checkpoints, save_trial_state, stored_index


def write_checkpoint(folder: Path, *, step: int) -> None:
    """A checkpoint folder as a trial saves it: the trainer's files, then trial_state.json listing them."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (100 + step))
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    save_trial_state(folder, retries=0, report={"step": step, "eval_loss": 1.0 / step})


def write_trial(trial: Path) -> None:
    """Checkpoint folders as a killed driver leaves them: two whole, one whose copy was cut short, one
    Tune had only made, and one written before trial_state.json listed the files."""
    for index, step in enumerate((2, 4, 6)):
        write_checkpoint(trial / f"checkpoint_{index:06d}", step=step)
    adapter = trial / "checkpoint_000002" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:50])
    (trial / "checkpoint_000003").mkdir()
    old = trial / "checkpoint_000004"
    old.mkdir()
    (old / TRIAL_STATE).write_text('{"retries": 0}')
    (trial / "progress.csv").write_text("step\n2\n")  # the trial's other files are no checkpoints


def test_only_complete_folders_count_and_the_highest_counts_them_all(tmp_path: Path) -> None:
    from pyarrow import fs

    write_trial(tmp_path / "trial")
    highest, complete = find_stored_checkpoints(fs.LocalFileSystem(), str(tmp_path / "trial"), after=-1)
    assert highest == 4
    assert [(c.index, c.step) for c in complete] == [(0, 2), (1, 4)]
    assert complete[1].state.report == {"step": 4, "eval_loss": 0.25}
    _, newer = find_stored_checkpoints(fs.LocalFileSystem(), str(tmp_path / "trial"), after=0)
    assert [c.index for c in newer] == [1]


def test_a_trial_without_checkpoints_finds_none(tmp_path: Path) -> None:
    from pyarrow import fs

    assert find_stored_checkpoints(fs.LocalFileSystem(), str(tmp_path / "absent"), after=-1) == (-1, [])


def test_checkpoints_are_found_in_remote_storage(tmp_path: Path, s3_server: dict[str, str]) -> None:
    from pyarrow import fs

    write_trial(tmp_path / "trial")
    s3 = fs.S3FileSystem(
        endpoint_override=s3_server["AWS_ENDPOINT_URL"],
        access_key=s3_server["AWS_ACCESS_KEY_ID"],
        secret_key=s3_server["AWS_SECRET_ACCESS_KEY"],
        region=s3_server["AWS_DEFAULT_REGION"],
    )
    fs.copy_files(str(tmp_path / "trial"), "sweeps/checkpoints/trial", destination_filesystem=s3)
    highest, complete = find_stored_checkpoints(s3, "sweeps/checkpoints/trial", after=-1)
    assert highest == 4
    assert [(c.index, c.path) for c in complete] == [
        (0, "sweeps/checkpoints/trial/checkpoint_000000"),
        (1, "sweeps/checkpoints/trial/checkpoint_000001"),
    ]


@pytest.mark.parametrize(
    ("path", "index"),
    [("/x/checkpoint_000012", 12), ("bucket/t/checkpoint_000003/", 3), ("/x/checkpoint-12", -1)],
)
def test_stored_index_reads_tunes_folder_number(path: str, index: int) -> None:
    assert stored_index(path) == index
