"""report.html in a real browser: headless Chromium loads it without console errors and shows the
leaderboard and every figure."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

FIGURES = ("fig-quality", "fig-curves", "fig-hyperparameters", "fig-parallel", "fig-importance")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str:
    """Debian's chromium (installed by .ci/run); installed here when missing and apt-get can, else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            timeout=600,
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.skip(
            "chromium is not installed and could not be installed with apt-get (needs root and Debian's archive)"
        )
    return found


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    command = [
        find_chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Page(HTMLParser):
    """What the rendered DOM shows: images by id, leaderboard rows, text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.leaderboard_rows = 0
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images[attributes.get("id") or ""] = attributes.get("src") or ""
        if tag == "table":
            self._table = attributes.get("id")
        if tag == "tr" and self._table == "leaderboard-table":
            self.leaderboard_rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


def test_report_loads_in_chromium_without_errors_and_shows_everything(
    tiny_sweep: Path, tmp_path: Path
) -> None:
    url = (tiny_sweep / "report.html").as_uri()
    shown = run_chromium(tmp_path, "--dump-dom", url)
    assert shown.returncode == 0, shown.stderr[-2000:]
    console = [
        line
        for line in shown.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Failed to load" in line
    ]
    assert console == [], console
    page = Page()
    page.feed(shown.stdout)
    board = pd.read_parquet(tiny_sweep / "leaderboard.parquet")
    assert page.leaderboard_rows == len(board) + 1  # the header row
    assert set(FIGURES) <= set(page.images)
    from matplotlib.image import imread

    for figure in FIGURES:
        src = page.images[figure]
        assert src.startswith("data:image/png;base64,"), figure  # embedded, nothing fetched
        pixels = imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 200 and pixels.std() > 0, figure
    assert "generations-table" in shown.stdout and "Write me a poem about Singapore" in shown.stdout

    screenshot = tmp_path / "report.png"
    taken = run_chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000", url)
    assert taken.returncode == 0 and screenshot.stat().st_size > 20_000, taken.stderr[-2000:]
