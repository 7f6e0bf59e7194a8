"""The judge: Bradley-Terry on comparisons with a known answer, a model judge and an endpoint judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.judge import (
    build_comparisons,
    endpoint_judge,
    fit_bradley_terry,
    model_judge,
    parse_verdict,
    run_judge,
)


def simulated_judgments(strengths: dict[str, float], *, per_pair: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    names = list(strengths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = 1 / (1 + np.exp(-(strengths[a] - strengths[b])))
            for _ in range(per_pair):
                rows.append({"candidate_a": a, "candidate_b": b, "winner": a if rng.random() < p else b})
    return pd.DataFrame(rows)


def test_bradley_terry_recovers_known_strengths_with_calibrated_errors(seed: int) -> None:
    truth = {"base": -1.0, "t1": 0.0, "t2": 1.0}  # centered, as the fit reports them
    fits = [
        fit_bradley_terry(simulated_judgments(truth, per_pair=300, seed=seed + i), list(truth), prior=1e-3)
        for i in range(12)
    ]
    for fit in fits:
        assert list(fit.sort_values("judge_strength").index) == ["base", "t1", "t2"]
    strengths = np.array([fit["judge_strength"].to_numpy() for fit in fits])
    stderrs = np.array([fit["judge_stderr"].to_numpy() for fit in fits])
    assert np.allclose(strengths.mean(axis=0), list(truth.values()), atol=0.08)
    # The reported standard error matches the spread of the estimates over repeated experiments.
    assert np.allclose(strengths.std(axis=0), stderrs.mean(axis=0), rtol=0.5)


def test_bradley_terry_stays_finite_when_one_always_wins() -> None:
    judgments = pd.DataFrame(
        {"candidate_a": ["a", "b"] * 5, "candidate_b": ["b", "a"] * 5, "winner": ["a"] * 10}
    )
    fit = fit_bradley_terry(judgments, ["a", "b"])
    assert np.isfinite(fit["judge_strength"]).all()
    assert fit.loc["a", "judge_strength"] > fit.loc["b", "judge_strength"]
    assert fit.loc["a", "judge_wins"] == 10 and fit.loc["b", "judge_losses"] == 10


def test_ties_count_half_each_way() -> None:
    judgments = pd.DataFrame({"candidate_a": ["a"] * 4, "candidate_b": ["b"] * 4, "winner": [None] * 4})
    fit = fit_bradley_terry(judgments, ["a", "b"])
    assert fit.loc["a", "judge_strength"] == pytest.approx(fit.loc["b", "judge_strength"])
    assert fit.loc["a", "judge_ties"] == 4


@pytest.mark.parametrize(
    ("reply", "verdict"), [("A", "A"), (" B.", "B"), ("Answer B is better", "B"), ("neither", "tie")]
)
def test_parse_verdict(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


GENERATIONS = pd.DataFrame(
    {
        "prompt_id": ["p1"] * 3 + ["p2"] * 3,
        "candidate": ["base", "t1", "t2"] * 2,
        "question": ["2 + 2?"] * 3 + ["Capital of France?"] * 3,
        "reference": ["4"] * 3 + [None] * 3,
        "answer": ["5", "4 right", "four right", "Lyon", "Paris right", "paris right"],
    }
)


def test_comparisons_cover_every_ordered_pair_and_keep_the_prompt() -> None:
    comparisons = build_comparisons(GENERATIONS)
    assert len(comparisons) == 2 * 3 * 2  # prompts x ordered pairs
    first = comparisons.iloc[0]
    assert "2 + 2?" in first["judge_prompt"] and "reference" in first["judge_prompt"]
    assert "reference" not in comparisons.iloc[-1]["judge_prompt"]


def test_tiny_model_as_judge_runs_the_pipeline(tiny_llama: Path) -> None:
    judgments = run_judge(build_comparisons(GENERATIONS), model_judge(str(tiny_llama)))
    assert set(judgments["verdict"]) <= {"A", "B", "tie"}
    assert judgments["judge_prompt"].str.contains("Answer A:").all()
    fit = fit_bradley_terry(judgments, ["base", "t1", "t2"])
    assert fit[["judge_wins", "judge_losses", "judge_ties"]].to_numpy().sum() == 2 * len(judgments)


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that prefers the answer saying "right" (a judge with a known answer)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        answer_a = prompt.split("Answer A:")[1].split("Answer B:")[0]
        reply = json.dumps(
            {"choices": [{"message": {"content": "A" if "right" in answer_a else "B"}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def test_endpoint_judge_ranks_the_preferred_answers_first() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = endpoint_judge(f"http://127.0.0.1:{server.server_port}/v1", model="test")
        judgments = run_judge(build_comparisons(GENERATIONS), judge)
    finally:
        server.shutdown()
        server.server_close()
    fit = fit_bradley_terry(judgments, ["base", "t1", "t2"])
    assert fit["judge_strength"].idxmin() == "base"
    assert fit.loc["base", "judge_losses"] == 8  # lost every comparison it was in, both orders
