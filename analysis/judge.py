"""An optional judge: a second model compares two candidates' answers to the same prompt, pairwise, and a
Bradley-Terry fit turns the verdicts into one strength per candidate, with a standard error.

The judge is a local model or hub id (its next-token logits for "A" and "B" are the verdict: one forward
pass per comparison, deterministic) or an OpenAI-compatible endpoint URL (its reply's first A or B).
Every pair is asked in both orders, so a judge that prefers a position does not favour a candidate.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

# Verdicts: a list of prompts in, one raw reply per prompt out ("A", "B", or text holding one).
Judge = Callable[[list[str]], list[str]]

JUDGE_TEMPLATE = """You are comparing two answers to the same request. Pick the better one: correct, \
complete, and to the point.

Request:
{question}
{reference_block}
Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is better? Reply with one letter: A or B."""


def build_judge_prompt(question: str, reference: str | None, answer_a: str, answer_b: str) -> str:
    block = f"\nA correct answer, for reference:\n{reference}\n" if reference else ""
    return JUDGE_TEMPLATE.format(
        question=question, reference_block=block, answer_a=answer_a, answer_b=answer_b
    )


def build_comparisons(generations: pd.DataFrame) -> pd.DataFrame:
    """Every pair of candidates on every prompt, in both orders: prompt_id, candidate_a, candidate_b and the
    judge prompt."""
    rows = []
    for prompt_id, group in generations.groupby("prompt_id", sort=False):
        answers = dict(zip(group["candidate"], group["answer"], strict=True))
        first = group.iloc[0]
        reference = first["reference"] if isinstance(first["reference"], str) else None
        for a, b in itertools.permutations(answers, 2):
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "candidate_a": a,
                    "candidate_b": b,
                    "judge_prompt": build_judge_prompt(first["question"], reference, answers[a], answers[b]),
                }
            )
    return pd.DataFrame(rows, columns=["prompt_id", "candidate_a", "candidate_b", "judge_prompt"])


def parse_verdict(reply: str) -> str:
    """ "A", "B" or "tie" (no letter found, or both as the first standalone letter)."""
    match = re.search(r"\b([AB])\b", reply.strip())
    return match.group(1) if match else "tie"


def run_judge(comparisons: pd.DataFrame, judge: Judge) -> pd.DataFrame:
    """The comparisons with the judge's raw reply, the verdict and the winner (None for a tie)."""
    replies = judge(list(comparisons["judge_prompt"])) if len(comparisons) else []
    verdicts = [parse_verdict(r) for r in replies]
    winners = [
        a if v == "A" else b if v == "B" else None
        for a, b, v in zip(comparisons["candidate_a"], comparisons["candidate_b"], verdicts, strict=True)
    ]
    return comparisons.assign(reply=replies, verdict=verdicts, winner=winners)


def fit_bradley_terry(
    judgments: pd.DataFrame, candidates: Sequence[str], *, prior: float = 0.1, z: float = 1.96
) -> pd.DataFrame:
    """Bradley-Terry strengths: P(i beats j) = sigmoid(s_i - s_j).

    Maximum a posteriori with a N(0, 1/prior) prior on each strength (keeps strengths finite when a
    candidate wins every comparison, and pins the scale's zero to their mean); a tie counts half a win each
    way. Strengths are centered (0: an average candidate); standard errors come from the inverse Hessian at
    the optimum (Laplace approximation), with the z-interval. `judgments` needs candidate_a, candidate_b and winner (None for a tie).
    """
    names = list(candidates)
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    pairs = []  # (i, j, score of i): 1 win, 0 loss, 0.5 tie
    for row in judgments.itertuples():
        if row.candidate_a not in index or row.candidate_b not in index:
            continue
        i, j = index[row.candidate_a], index[row.candidate_b]
        score = (
            0.5
            if row.winner is None or (isinstance(row.winner, float) and math.isnan(row.winner))
            else float(row.winner == row.candidate_a)
        )
        pairs.append((i, j, score))
    strengths = np.zeros(n)
    hessian = prior * np.eye(n)
    for _ in range(100):  # Newton's method: the log-posterior is concave, a few steps converge
        gradient = -prior * strengths
        hessian = prior * np.eye(n)
        for i, j, score in pairs:
            p = 1.0 / (1.0 + math.exp(-(strengths[i] - strengths[j])))
            gradient[i] += score - p
            gradient[j] -= score - p
            w = p * (1 - p)
            hessian[i, i] += w
            hessian[j, j] += w
            hessian[i, j] -= w
            hessian[j, i] -= w
        step = np.linalg.solve(hessian, gradient)
        strengths += step
        if np.max(np.abs(step)) < 1e-10:
            break
    # Strengths only mean something relative to each other: center them and take the covariance of the
    # centered values (the prior alone decides the common shift, whose variance is no information).
    center = np.eye(n) - np.ones((n, n)) / n
    strengths = center @ strengths
    stderr = np.sqrt(np.clip(np.diag(center @ np.linalg.inv(hessian) @ center), 0, None))
    wins = dict.fromkeys(names, 0.0)
    losses = dict.fromkeys(names, 0.0)
    ties = dict.fromkeys(names, 0.0)
    for i, j, score in pairs:
        if score == 0.5:
            ties[names[i]] += 1
            ties[names[j]] += 1
        else:
            winner, loser = (names[i], names[j]) if score == 1.0 else (names[j], names[i])
            wins[winner] += 1
            losses[loser] += 1
    return pd.DataFrame(
        {
            "judge_strength": strengths,
            "judge_stderr": stderr,
            "judge_low": strengths - z * stderr,
            "judge_high": strengths + z * stderr,
            "judge_wins": [wins[c] for c in names],
            "judge_losses": [losses[c] for c in names],
            "judge_ties": [ties[c] for c in names],
        },
        index=pd.Index(names, name="candidate"),
    )


def load_judge(
    spec: str, *, endpoint_model: str = "default", device: str = "cpu", batch_size: int = 8
) -> Judge:
    """A judge from a hub id or local folder (a causal LM), or an OpenAI-compatible endpoint URL."""
    if spec.startswith(("http://", "https://")):
        return endpoint_judge(spec, model=endpoint_model)
    return model_judge(spec, device=device, batch_size=batch_size)


def endpoint_judge(url: str, *, model: str, timeout_s: float = 120.0) -> Judge:
    """Asks `url` + /chat/completions (OpenAI's schema), greedy, a few tokens per reply."""
    endpoint = url.rstrip("/") + (
        "" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions"
    )
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"

    def ask(prompts: list[str]) -> list[str]:
        replies = []
        for prompt in prompts:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": 4,
            }
            request = urllib.request.Request(
                endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
            )
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                replies.append(json.load(response)["choices"][0]["message"]["content"] or "")
        return replies

    return ask


def model_judge(path: str, *, device: str = "cpu", batch_size: int = 8) -> Judge:
    """A local causal LM as judge: for each prompt, "A" if its next-token logit for A beats B's, else "B"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last position is every prompt's next token
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    )
    model = model.to(torch.device(device)).eval()
    letters = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in ("A", "B")]

    def render(prompt: str) -> str:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return prompt + "\nAnswer:"

    def ask(prompts: list[str]) -> list[str]:
        replies = []
        for start in range(0, len(prompts), batch_size):
            texts = [render(p) for p in prompts[start : start + batch_size]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                logits = model(**encoded).logits[:, -1, letters]
            replies += ["A" if a > b else "B" if b > a else "tie" for a, b in logits.tolist()]
        return replies

    return ask
