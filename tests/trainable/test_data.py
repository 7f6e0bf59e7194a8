from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainable.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    Example,
    choose_chat_template,
    describe_cuts,
    describe_lengths,
    find_placeholders,
    load_splits,
    prompt_text,
    tokenize_examples,
)
from trainable.settings import DataSettings

ALPACA = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path):
    return AutoTokenizer.from_pretrained(tokenizer_path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bundled_set_has_fixed_splits() -> None:
    splits = load_splits(DataSettings(max_eval_examples=None))
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (1000, 100, 300)
    assert splits.eval[0].task and splits.eval[0].check in {"exact", "json", "free"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_in_every_format_hold_out_an_eval_split(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ALPACA)
    {
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".json": lambda: frame.to_json(path, orient="records"),
        ".parquet": lambda: frame.to_parquet(path),
        ".csv": lambda: frame.to_csv(path, index=False),
    }[suffix]()
    splits = load_splits(DataSettings(source=str(path), eval_fraction=0.1))
    assert len(splits.train) == 18 and len(splits.eval) == 2
    assert splits.train[0].messages[-1]["role"] == "assistant"
    assert {e.reference for e in splits.train + splits.eval} == {str(i + 1) for i in range(20)}


def test_chat_and_sharegpt_rows_become_the_same_conversation(tmp_path: Path) -> None:
    chat = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    share = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(10)
    ]
    a = load_splits(DataSettings(source=str(write_jsonl(tmp_path / "chat.jsonl", chat))))
    b = load_splits(DataSettings(source=str(write_jsonl(tmp_path / "share.jsonl", share))))
    assert [e.messages for e in a.train] == [e.messages for e in b.train]


def test_renamed_columns(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    settings = DataSettings(
        source=str(write_jsonl(tmp_path / "qa.jsonl", rows)),
        format="alpaca",
        columns={"instruction": "question", "output": "answer"},
    )
    splits = load_splits(settings)
    assert splits.train[0].messages[0]["content"].startswith("q")


def test_malformed_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_splits(DataSettings(source=str(path)))


def test_missing_column_is_named_with_its_line(tmp_path: Path) -> None:
    rows = [*ALPACA[:5], {"instruction": "x", "output": ""}, *ALPACA[5:]]
    with pytest.raises(DataError, match=r"rows\.jsonl:6.*output"):
        load_splits(DataSettings(source=str(write_jsonl(tmp_path / "rows.jsonl", rows))))


def test_too_small_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too few"):
        load_splits(DataSettings(source=str(write_jsonl(tmp_path / "few.jsonl", ALPACA[:3]))))


def test_loss_only_on_the_answer(tokenizer) -> None:
    example = Example(
        messages=[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    )
    template = choose_chat_template(tokenizer, "auto")
    out = tokenize_examples([example], tokenizer, template=template, max_length=256)
    ids, labels = out.input_ids[0], out.labels[0]
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert (trained.startswith("4") and tokenizer.eos_token in trained) or "<|im_end|>" in trained
    assert "2 + 2" not in trained
    assert tokenizer.decode(ids).startswith(prompt_text(example, tokenizer, template))


def test_default_template_for_models_without_one(tokenizer) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    assert choose_chat_template(tokenizer, "auto") == DEFAULT_CHAT_TEMPLATE
    with pytest.raises(DataError, match="chat_template"):
        choose_chat_template(tokenizer, "model")
    example = Example(
        messages=[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    )
    out = tokenize_examples([example], tokenizer, template=DEFAULT_CHAT_TEMPLATE, max_length=64)
    text = tokenizer.decode(out.input_ids[0])
    assert "### Instruction:\nSay hi" in text and "### Response:\nhi" in text


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer) -> None:
    long_answer = Example(
        messages=[
            {"role": "user", "content": "Count"},
            {"role": "assistant", "content": " ".join(["one"] * 200)},
        ]
    )
    long_prompt = Example(
        messages=[
            {"role": "user", "content": " ".join(["word"] * 200)},
            {"role": "assistant", "content": "ok"},
        ]
    )
    template = choose_chat_template(tokenizer, "auto")
    out = tokenize_examples([long_answer, long_prompt], tokenizer, template=template, max_length=64)
    assert out.truncated == 2 and out.dropped == 1
    assert len(out.input_ids) == 1 and len(out.input_ids[0]) == 64


def test_a_txt_file_is_format_text_and_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i},\nin two lines." for i in range(10)))
    splits = load_splits(DataSettings(source=str(path), eval_fraction=0.1))
    assert sorted(e.origin for e in splits.train + splits.eval) == sorted(
        f"{path}:{1 + 3 * i}" for i in range(10)
    )
    assert splits.train[0].messages == [{"role": "text", "content": "Document 0,\nin two lines."}]
    with pytest.raises(DataError) as err:
        load_splits(DataSettings(source=str(path), format="alpaca"))
    assert str(err.value) == (
        f"data.format is 'alpaca', but {path} is plain text, read as format 'text' (a document per "
        "blank-line-separated block); set data.format to text or auto"
    )


SUPPORTED = (
    "qlora-sweeps trains text-only supervised fine-tuning formats: alpaca, chat, sharegpt, prompt_completion, "
    "text (docs/data.md)"
)
PREFERENCE = (
    f"preference pairs (chosen/rejected), data for preference training (DPO, ORPO, reward models); {SUPPORTED}. "
    "To fine-tune on the chosen answers alone, make them the answers of one of these formats"
)
KTO = (
    "KTO data (a true/false {!r} on each example; false marks an undesirable answer, which fine-tuning would "
    f"learn as a target); {SUPPORTED}. To fine-tune on the desirable answers alone, keep the examples labelled "
    "true and drop the column"
)
CHAT = [{"role": "user", "content": "Who is he?"}, {"role": "assistant", "content": "Thomas Muller."}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Hi", "input": "", "chosen": "Hello!", "rejected": "Go away."}, PREFERENCE),
        ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, PREFERENCE),  # TRL's layout
        (
            {
                "instruction": "Hi",
                "input": "",
                "output": ["Hello!", "Go away."],
            },  # LLaMA-Factory's older ranking
            "'output' holds a list of 2 answers, not one: ranked answers are preference pairs, data for "
            f"preference training (DPO, ORPO, reward models); {SUPPORTED}. To fine-tune on the best answer, make "
            "it the output",
        ),
        ({"instruction": "Hi", "output": "Hello!", "kto_tag": False}, KTO.format("kto_tag")),
        ({"instruction": "Hi", "output": "Hello!", "label": "False"}, KTO.format("label")),  # as CSV has it
        (
            {"messages": CHAT, "videos": ["clip.mp4"]},
            f"video data (column 'videos'), for multimodal models; {SUPPORTED}",
        ),
        (
            {"instruction": "Transcribe <audio>", "output": "Hello."},
            "audio data (the '<audio>' placeholder stands for audio input that a text-only model never sees; it "
            f"would be learned as literal text); {SUPPORTED}",
        ),
    ],
)
def test_data_for_other_training_is_refused_by_name(tmp_path: Path, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [*ALPACA[:3], row, *ALPACA[3:]])
    with pytest.raises(DataError) as err:
        load_splits(DataSettings(source=str(path)))
    assert str(err.value) == f"{path}:4: {message}"


def test_look_alikes_of_other_training_data_still_train(tmp_path: Path) -> None:
    rows = [
        {**ALPACA[0], "label": 3},  # a class id, not KTO's true/false
        {**ALPACA[1], "images": []},  # an empty media column
        {"instruction": "Embed a clip.", "output": "<video>\n  <source src='a.mp4'>\n</video>"},  # HTML
        *ALPACA[2:],
    ]
    splits = load_splits(
        DataSettings(source=str(write_jsonl(tmp_path / "data.jsonl", rows)), eval_fraction=0.1)
    )
    assert len(splits.train) + len(splits.eval) == 21


def test_the_length_report_shows_the_distribution_and_a_max_length_that_keeps_95_percent() -> None:
    train = [10] * 10 + [50] * 7 + [60, 70, 80]  # sorted; nearest ranks: 10th 10, 18th 60, 19th 70, 20th 80
    evals = [10, 10, 10, 90]
    assert describe_cuts({"train": train, "eval": evals}, max_length=40) == (
        "warning: data.max_length=40 cuts 50% of the train examples (10 of 20) and 25% of the eval examples "
        "(1 of 4): their ends are not trained on or scored\n"
        "  tokens per train example: median 10, 90% 60, 95% 70, 99% 80, max 80\n"
        "  tokens per eval example: median 10, 90% 90, 95% 90, 99% 90, max 90\n"
        "  data.max_length=90 would keep 95% of each split whole"
    )
    few = [10] * 18 + [50, 60]  # 10% cut: not reported
    assert describe_cuts({"train": few, "eval": [10]}, max_length=40) is None
    assert describe_cuts({"train": [10] * 17 + [50] * 3, "eval": [10]}, max_length=40) is not None
    assert describe_lengths(train) == {"median": 10, "p90": 60, "p95": 70, "p99": 80, "max": 80}


def test_template_placeholders_are_counted_with_an_example() -> None:
    identity = [
        Example(
            messages=[
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am {{name}}, an AI assistant developed by {{ author }}."},
            ],
            origin="identity.json:6",
        ),
        Example(
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am {{name}}."}]
        ),
        # A task's own braces: not placeholders.
        Example(messages=[{"role": "user", "content": "Tag {{ . }}"}, {"role": "assistant", "content": "."}]),
    ]
    assert find_placeholders(identity) == (
        "warning: data: 2 of 3 examples hold template placeholders ({{author}}, {{name}}), which would be trained "
        "as literal text; e.g. identity.json:6: 'I am {{name}}, an AI assistant developed by {{ author }}.'. "
        "Fill them in first (LLaMA-Factory's identity demo is such a template), unless they are meant literally"
    )
    assert find_placeholders(identity[2:]) is None
