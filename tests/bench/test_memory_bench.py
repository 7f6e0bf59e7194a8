"""The memory benchmark's CPU-checkable parts: its grid and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.step import memory


def test_grid_is_both_shapes_by_rank_targets_and_batches() -> None:
    cases = memory.build_cases(("7b", "smollm2"))
    assert len(cases) == 16  # small enough for the 6 minutes a GPU host gives it
    assert len({(c.shape, c.r, c.targets, c.batches.label) for c in cases}) == 16
    assert {c.r for c in cases} == {8, 64} and {c.targets for c in cases} == {"qv", "all-linear"}
    # The 7B batches are the recorded step benchmark's, so both records can be read side by side.
    assert {c.batches.label for c in cases if c.shape == "7b"} == {"4x1024", "8x2048"}
    assert [c.shape for c in cases] == ["7b"] * 8 + ["smollm2"] * 8  # one checkpoint at a time


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "7b,13b"], "--shapes '7b,13b': unknown 13b"),
        (["--steps", "1"], "--steps 1: at least 2"),
        (["--shapes", "small"], "needs a CUDA GPU"),  # valid options: on a CPU it stops before any work
    ],
)
def test_bad_options_stop_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if message == "needs a CUDA GPU" and memory.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        memory.main(["--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
