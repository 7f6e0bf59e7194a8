"""Data as new users bring it, through `python -m sweeps.run`: data made for other training (preference
pairs, KTO labels, images), files from the real world (spreadsheet encodings, cut-short or binary files) and
positions stop the driver before Ray starts with one line naming the file, the place and the fix; a plain
text corpus trains; what max_length cuts and template placeholders left in the text are said in the plan.

The fixture files are written here, shaped like LLaMA-Factory's public demo sets (dpo_en_demo.json,
kto_en_demo.json, mllm_demo.json, identity.json, wiki_demo.txt), not copied from them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeps.run import main
from tests.conftest import bad_config

SUPPORTED = (
    "qlora-sweeps trains text-only supervised fine-tuning formats: alpaca, chat, sharegpt, prompt_completion, "
    "text (docs/data.md)"
)


def chat(i: int) -> list[dict[str, str]]:
    return [
        {"content": f"Which number follows {i}?", "role": "user"},
        {"content": f"{i + 1} follows {i}.", "role": "assistant"},
    ]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False))  # as the demo sets are written
    return path


def preference_pairs(tmp: Path) -> tuple[Path, str]:
    """dpo_en_demo.json's shape: ShareGPT conversations, the answers in `chosen` and `rejected`."""
    records = [
        {
            "conversations": [{"from": "human", "value": f"Which number follows {i}?"}],
            "chosen": {"from": "gpt", "value": f"{i + 1}."},
            "rejected": {"from": "gpt", "value": "I don't know."},
        }
        for i in range(20)
    ]
    return write_json(tmp / "dpo_demo.json", records), (
        ":2: preference pairs (chosen/rejected), data for preference training (DPO, ORPO, reward models); "
        f"{SUPPORTED}. To fine-tune on the chosen answers alone, make them the answers of one of these formats"
    )


def kto_labels(tmp: Path) -> tuple[Path, str]:
    """kto_en_demo.json's shape: OpenAI messages and a true/false `label` (false: an undesirable answer)."""
    records = [{"messages": chat(i), "label": i % 3 != 0} for i in range(20)]
    return write_json(tmp / "kto_demo.json", records), (
        ":2: KTO data (a true/false 'label' on each example; false marks an undesirable answer, which "
        f"fine-tuning would learn as a target); {SUPPORTED}. To fine-tune on the desirable answers alone, keep "
        "the examples labelled true and drop the column"
    )


def images(tmp: Path) -> tuple[Path, str]:
    """mllm_demo.json's shape: `<image>` in the user's turn and the image files in an `images` column."""
    records = [
        {
            "messages": [
                {"content": "<image>Who are they?", "role": "user"},
                {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
            ],
            "images": [f"mllm_demo_data/{i}.jpg"],
        }
        for i in range(20)
    ]
    return write_json(tmp / "mllm_demo.json", records), (
        f":2: image data (column 'images'), for multimodal models; {SUPPORTED}"
    )


def image_placeholders(tmp: Path) -> tuple[Path, str]:
    """Multimodal text whose images column was dropped: the placeholder alone, in the 7th line's record."""
    lines = [{"messages": chat(i)} for i in range(20)]
    lines[6] = {"messages": [{"role": "user", "content": "<image>Describe it."}, chat(6)[1]]}
    path = tmp / "placeholders.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, (
        ":7: image data (the '<image>' placeholder stands for image input that a text-only model never sees; "
        f"it would be learned as literal text); {SUPPORTED}"
    )


def latin1_csv(tmp: Path) -> tuple[Path, str]:
    """A spreadsheet's CSV export in Latin-1: 'é' is the single byte 0xe9 on line 4."""
    path = tmp / "export.csv"
    words = ["one", "two", "café", *(f"word {i}" for i in range(17))]
    text = "instruction,output\n" + "".join(f"Say {w}.,{w}\n" for w in words)
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    assert offset == 52  # 19 bytes of header, 12 + 12 of rows, then "Say caf"
    return path, (
        ":4: not utf-8 text: byte 0xe9 at byte offset 52 (after 'Say caf') cannot be decoded; set "
        "data.encoding to the file's encoding (a spreadsheet's CSV export is often cp1252, Windows' Western "
        "encoding: data.encoding=cp1252), or save the file as UTF-8"
    )


def binary_jsonl(tmp: Path) -> tuple[Path, str]:
    """A .jsonl that is something else: a NUL byte on its third line."""
    path = tmp / "records.jsonl"
    good = json.dumps({"instruction": "Say one.", "output": "one"}) + "\n"  # 45 bytes
    path.write_bytes((good * 2).encode() + b"\x00\x10\xff\xfe binary\n")
    return path, (
        ":3: binary data, not text: a NUL byte at byte offset 90; a .jsonl file must be text (is it another "
        "format renamed, or compressed?)"
    )


def truncated_parquet(tmp: Path) -> tuple[Path, str]:
    buffer = io.BytesIO()
    pd.DataFrame(
        {"instruction": [f"Say {i}." for i in range(20)], "output": [str(i) for i in range(20)]}
    ).to_parquet(buffer)
    kept = len(buffer.getvalue()) - 100  # a copy that stopped 100 bytes short
    path = tmp / "train.parquet"
    path.write_bytes(buffer.getvalue()[:kept])
    return path, (
        f": a Parquet file cut short ({kept} bytes): it does not end with Parquet's 'PAR1' marker, so its schema "
        "is lost; copy or export it again"
    )


def csv_position(tmp: Path) -> tuple[Path, str]:
    """A CSV whose 5th row has no output: line 7, after the header and a row spanning two lines."""
    path = tmp / "rows.csv"
    rows = [
        ("Say one.", "one"),
        ("Say\ntwo.", "two"),
        ("Say three.", "three"),
        ("Say four.", "four"),
        ("Say five.", ""),
    ]
    rows += [(f"Say {i}.", str(i)) for i in range(6, 20)]
    pd.DataFrame(rows, columns=["instruction", "output"]).to_csv(path, index=False)
    assert path.read_text().splitlines()[6] == "Say five.,"  # line 7 in an editor
    return path, ":7: missing or empty column(s) output for format 'alpaca'"


def json_position(tmp: Path) -> tuple[Path, str]:
    """A JSON list whose 4th record has a role no one renders: its `{` is on line 38 (12 lines a record)."""
    records = [{"messages": chat(i)} for i in range(20)]
    records[3] = {"messages": [{"role": "critic", "content": "meh"}, chat(3)[1]]}
    path = write_json(tmp / "chat.json", records)
    assert path.read_text().splitlines()[37:41] == [
        "  {",
        '    "messages": [',
        "      {",
        '        "role": "critic",',
    ]
    return path, (
        ":38: turn 1: role 'critic' cannot be rendered (neither by a chat template nor by the fallback layout); "
        "'role' must be one of system, developer, user, assistant, tool, function"
    )


CASES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "preference pairs": preference_pairs,
    "KTO labels": kto_labels,
    "an images column": images,
    "image placeholders": image_placeholders,
    "a Latin-1 CSV": latin1_csv,
    "binary bytes in a .jsonl": binary_jsonl,
    "a truncated parquet": truncated_parquet,
    "a CSV row's line counts the header": csv_position,
    "a JSON record's line is where it starts": json_position,
}


@pytest.mark.parametrize("case", list(CASES))
def test_data_the_sweep_would_misread_is_one_line_before_ray_starts(
    case: str, tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    data, message = CASES[case](tmp_path)
    assert main(["--config", str(bad_config(tmp_path, tiny_llama)), f"data.source={data}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data}{message}"]
    assert not ray.is_initialized()
    assert not (tmp_path / "experiments").exists()


def test_data_encoding_reads_the_spreadsheets_export_and_an_unknown_one_is_refused(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweeps.config import load_config
    from trainable.data import load_splits

    config = bad_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "data.encoding=latin-9000"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "  - data.encoding: Value error, unknown encoding; use a Python codec name such as utf-8, cp1252, "
        "latin-1 or utf-16 (got 'latin-9000')"
    )
    data, _ = latin1_csv(tmp_path)
    loaded = load_config(
        str(config), [f"data.source={data}", "data.encoding=cp1252", "data.eval_fraction=0.2"]
    )
    splits = load_splits(loaded.data)
    assert "Say café." in [e.messages[0]["content"] for e in splits.train + splits.eval]


# The sweeps below run: one trial of two steps on the tiny model, after the plan is printed.
def run_config(tmp_path: Path, tiny_llama: Path, data: dict) -> Path:
    config = {
        "name": "edges",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "edges-test",
        "model": {
            "name_or_path": str(tiny_llama),
            "gradient_checkpointing": False,
            "compute_dtype": "float32",
        },
        "data": data,
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "search": {
            "num_samples": 1,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "initial_points": [{"r": 4, "lora_alpha": 8, "learning_rate": 1e-3}],
            "space": {
                "r": {"choice": [4]},
                "lora_alpha": {"choice": [8]},
                "learning_rate": {"choice": [1e-3]},
            },
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "edges.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_driver(config: Path, cwd: Path) -> list[str]:
    """The driver's output, lines up to `resources:` (the first one after Ray starts) only."""
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(config), "--quiet"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    return lines[: next(i for i, line in enumerate(lines) if line.startswith("resources:"))]


IDENTITY = "I am {{name}}, an AI assistant developed by {{author}}."


@pytest.fixture(scope="module")
def identity_with_long_answers(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> tuple[list[str], list[int], list[int], Path]:
    """identity.json's shape ({{name}}/{{author}} left to fill in) plus answers too long for max_length
    (as a tool-call demo's at 256): the plan's lines, train and eval token counts, the data file."""
    from transformers import AutoTokenizer

    from trainable.data import choose_chat_template, load_splits, tokenize_examples
    from trainable.settings import DataSettings

    tmp = tmp_path_factory.mktemp("identity")
    short = [{"instruction": "Who are you?", "input": "", "output": IDENTITY}] * 12
    long = [
        {"instruction": "Count.", "input": "", "output": " ".join(["one"] * n)} for n in (90, 100, 110, 120)
    ]
    records = [{**r, "split": "train"} for r in short + long + long] + [
        {**r, "split": "eval"} for r in short[:2] + long[:2]
    ]
    data = write_json(tmp / "identity.json", records)
    settings = {"source": str(data), "max_length": 64, "max_eval_examples": 8}
    lines = run_driver(run_config(tmp, tiny_llama, settings), tmp)
    # Every example's tokens, as the driver counts them before the cut.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = choose_chat_template(tokenizer, "auto")
    splits = load_splits(DataSettings(**settings))
    lengths = [
        tokenize_examples(split, tokenizer, template=template, max_length=10**6).lengths
        for split in (splits.train, splits.eval)
    ]
    return lines, lengths[0], lengths[1], data


def test_many_cut_examples_get_the_length_report(
    identity_with_long_answers: tuple[list[str], list[int], list[int], Path],
) -> None:
    lines, train, evals, _ = identity_with_long_answers
    assert len(train) == 20 and len(evals) == 4
    short, (l90, l100, l110, l120) = train[0], sorted(set(train) - {train[0]})
    assert short < 64 < l90 < l100 < l110 < l120  # 12 whole, 8 cut at max_length 64
    assert sorted(train) == [short] * 12 + [l90, l90, l100, l100, l110, l110, l120, l120]
    # Nearest ranks of 20: the median is the 10th (short), 90% the 18th (l110), 95% the 19th, 99% the 20th.
    # Of the eval split's 4 (2 short, 90 and 100 words): the 2nd, then the 4th.
    plan = lines.index(next(line for line in lines if line.startswith("data: ")))
    assert lines[plan : plan + 5] == [
        "data: 20 train / 4 eval examples, 8 train and 2 eval cut at data.max_length=64, 0 dropped (nothing left "
        "to learn after the cut)",
        "warning: data.max_length=64 cuts 40% of the train examples (8 of 20) and 50% of the eval examples "
        "(2 of 4): their ends are not trained on or scored",
        f"  tokens per train example: median {short}, 90% {l110}, 95% {l120}, 99% {l120}, max {l120}",
        f"  tokens per eval example: median {short}, 90% {l100}, 95% {l100}, 99% {l100}, max {l100}",
        f"  data.max_length={l120} would keep 95% of each split whole",
    ]


def test_template_placeholders_are_a_warning_in_the_plan(
    identity_with_long_answers: tuple[list[str], list[int], list[int], Path],
) -> None:
    lines, _, _, data = identity_with_long_answers
    warnings = [line for line in lines if line.startswith("warning: data: ")]
    assert warnings == [
        "warning: data: 14 of 24 examples hold template placeholders ({{author}}, {{name}}), which would be "
        f"trained as literal text; e.g. {data}:2: '{IDENTITY}'. Fill them in first (LLaMA-Factory's identity "
        "demo is such a template), unless they are meant literally"
    ]


def test_a_plain_text_corpus_trains_a_document_per_block(tmp_path: Path, tiny_llama: Path) -> None:
    """wiki_demo.txt was refused as "couldn't find any data file": now each blank-line-separated block is a
    document of format text."""
    corpus = tmp_path / "wiki_demo.txt"
    corpus.write_text(
        "\n\n".join(
            f"Article {i} is about the number {i}.\nIts second line follows {i - 1}." for i in range(20)
        )
    )
    settings = {"source": str(corpus), "max_length": 64, "eval_fraction": 0.1}
    lines = run_driver(run_config(tmp_path, tiny_llama, settings), tmp_path)
    assert [line for line in lines if line.startswith("data: ")] == [
        "data: 18 train / 2 eval examples, 0 train and 0 eval cut at data.max_length=64, 0 dropped (nothing left "
        "to learn after the cut)"
    ]
    assert not [line for line in lines if line.startswith("warning:")]
    table = pd.read_parquet(tmp_path / "experiments" / "edges-test" / "results.parquet")
    assert list(table["status"]) == ["completed"]


def test_data_cut_to_nothing_names_the_max_length_that_keeps_it(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prompts longer than data.max_length leave no answer to learn: the error says which max_length would."""
    from transformers import AutoTokenizer

    from trainable.data import choose_chat_template, load_splits, tokenize_examples
    from trainable.settings import DataSettings

    records = [
        {"instruction": f"Repeat {i}: " + " ".join(["word"] * 60), "output": "yes"} for i in range(10, 30)
    ]
    data = write_json(tmp_path / "long_prompts.json", records)
    assert (
        main(["--config", str(bad_config(tmp_path, tiny_llama)), f"data.source={data}", "data.max_length=32"])
        == 2
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    splits = load_splits(DataSettings(source=str(data)))
    template = choose_chat_template(tokenizer, "auto")
    lengths = {
        len(ids)
        for ids in tokenize_examples(
            splits.train + splits.eval, tokenizer, template=template, max_length=10**6
        ).input_ids
    }
    (length,) = lengths  # every example as long as the others: 95% of either split needs just that
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: data: after cutting to data.max_length=32, 0 training and 0 eval examples keep a trained token; "
        f"raise data.max_length ({length} would keep 95% of each split whole)"
    ]
