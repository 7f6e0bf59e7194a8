"""The data formats people bring: each becomes a conversation whose tokens carry loss exactly on the answers.

Table driven: every format has a good file whose first record's trained and untrained text is asserted,
rendered with the default model's chat template (which knows no tools: the fallback layout) and with a
template that renders tools itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from transformers import AutoTokenizer

from trainable.data import (
    FALLBACK_RESULT_HEADER,
    FALLBACK_TOOLS_HEADER,
    IGNORE_INDEX,
    DataError,
    Example,
    choose_chat_template,
    load_splits,
    prompt_text,
    template_takes_tools,
    tokenize_examples,
)
from trainable.settings import DataSettings

FIXTURES = Path(__file__).parent / "fixtures"
GLAIVE = FIXTURES / "glaive_toolcall.json"  # LLaMA-Factory's glaive_toolcall demo layout
TRL_PLAIN = FIXTURES / "trl_prompt_completion.jsonl"
END = "<|im_end|>\n"  # the default model's end of turn, trained with each answer

CONVERT = {
    "name": "convert_currency",
    "description": "Convert an amount between currencies",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]},
}
FIRST_CALL = (
    '{"name": "convert_currency", "arguments": {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}}'
)

# A Hermes/Qwen2.5-style template that renders tools, tool calls and tool results itself.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '<tools>\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + message['content'] }}"
    "{% for call in message.get('tool_calls', []) %}"
    "{{ '<tool_call>\\n' }}{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{ '\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def openai_row(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You convert currencies."},
            {"role": "user", "content": f"Convert {i} USD to EUR."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": "convert_currency", "arguments": json.dumps({"amount": i})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"eur": i * 0.92})},
            {"role": "assistant", "content": f"{i} USD is {i * 0.92} EUR."},
        ],
        "tools": [{"type": "function", "function": CONVERT}],
    }


def parallel_row(i: int) -> dict[str, Any]:
    calls = [
        {"type": "function", "function": {"name": "convert_currency", "arguments": {"amount": a}}}
        for a in (i, i + 1)
    ]
    return {
        "messages": [
            {"role": "user", "content": f"Convert {i} and {i + 1} USD."},
            {"role": "assistant", "content": "Converting both.", "tool_calls": calls},
            {"role": "tool", "content": f"r{i}"},
            {"role": "tool", "content": f"r{i + 1}"},
            {"role": "assistant", "content": "Done."},
        ],
        "tools": [CONVERT],
    }


def trl_conversational_row(i: int) -> dict[str, Any]:
    return {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": f"And of country {i}?"},
        ],
        "completion": [{"role": "assistant", "content": f"City{i}."}],
    }


def sharegpt_system_row(i: int) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
        "system": "Be terse.",
    }


# format -> (rows or a shipped file, the first record's trained pieces, text that must stay untrained)
FORMATS: dict[str, tuple[list[dict[str, Any]] | Path, list[str], list[str]]] = {
    "sharegpt tool calls (LLaMA-Factory)": (
        GLAIVE,
        [FIRST_CALL + END, "Sure, 100 USD is approximately 92.0 EUR." + END],
        [FALLBACK_TOOLS_HEADER, '"name": "convert_currency", "description"', f"{FALLBACK_RESULT_HEADER}\n{{"],
    ),
    "openai tool calls": (
        [openai_row(i) for i in range(10)],
        ['{"name": "convert_currency", "arguments": {"amount": 0}}' + END, "0 USD is 0.0 EUR." + END],
        ["You convert currencies.\n\n" + FALLBACK_TOOLS_HEADER, f'{FALLBACK_RESULT_HEADER}\n{{"eur": 0.0}}'],
    ),
    "openai parallel calls": (
        [parallel_row(i) for i in range(10)],
        [
            'Converting both.\n{"name": "convert_currency", "arguments": {"amount": 0}}\n'
            '{"name": "convert_currency", "arguments": {"amount": 1}}' + END,
            "Done." + END,
        ],
        [f"<|im_start|>user\n{FALLBACK_RESULT_HEADER}\nr0\nr1{END}"],
    ),
    "trl prompt/completion": (TRL_PLAIN, [" Paris.<|im_end|>"], ["<|im_start|>The capital of France is"]),
    "trl conversational prompt/completion": (
        [trl_conversational_row(i) for i in range(10)],
        ["City0." + END],
        ["Paris.", "And of country 0?"],
    ),
    "sharegpt with a system column": (
        [sharegpt_system_row(i) for i in range(10)],
        ["a0" + END],
        ["<|im_start|>system\nBe terse.", "q0"],
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_path)


def source(data: list[dict[str, Any]] | Path, tmp_path: Path) -> Path:
    if isinstance(data, Path):
        return data
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def first_record(path: Path) -> Example:
    """The file's first record (on its lowest line: a JSON list's first record starts on line 2), in
    whichever split the hold-out put it."""
    splits = load_splits(DataSettings(source=str(path), max_eval_examples=None))
    return min(splits.train + splits.eval, key=lambda e: int(e.origin.rsplit(":", 1)[1]))


def pieces(example: Example, tokenizer: Any, template: str) -> tuple[list[str], str, str]:
    """The example's trained token runs, decoded, its untrained text and its whole text."""
    out = tokenize_examples([example], tokenizer, template=template, max_length=4096)
    ids, labels = out.input_ids[0], out.labels[0]
    runs: list[list[int]] = []
    untrained: list[int] = []
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE_INDEX:
            untrained.append(token)
        elif i == 0 or labels[i - 1] == IGNORE_INDEX:
            runs.append([token])
        else:
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs], tokenizer.decode(untrained), tokenizer.decode(ids)


@pytest.mark.parametrize("name", list(FORMATS))
def test_loss_falls_on_the_answers_only(name: str, tokenizer: Any, tmp_path: Path) -> None:
    data, trained, untrained = FORMATS[name]
    example = first_record(source(data, tmp_path))
    template = choose_chat_template(tokenizer, "auto")
    got_trained, got_untrained, whole = pieces(example, tokenizer, template)
    assert got_trained == trained
    for text in untrained:
        assert text in got_untrained, got_untrained
    # A generation starts from the same rendering, up to the last answer.
    assert whole == prompt_text(example, tokenizer, template) + trained[-1]


def test_a_template_that_renders_tools_gets_them(tokenizer: Any) -> None:
    assert template_takes_tools(TOOL_TEMPLATE)
    assert not template_takes_tools(choose_chat_template(tokenizer, "auto"))  # SmolLM2's: fallback layout
    example = first_record(GLAIVE)
    trained, untrained, _ = pieces(example, tokenizer, TOOL_TEMPLATE)
    assert trained == [
        f"<tool_call>\n{FIRST_CALL}\n</tool_call>{END}",
        "Sure, 100 USD is approximately 92.0 EUR." + END,
    ]
    assert '<tools>\n{"type": "function", "function": {"name": "convert_currency"' in untrained
    assert "<tool_response>\n{" in untrained
    assert FALLBACK_TOOLS_HEADER not in untrained and FALLBACK_RESULT_HEADER not in untrained


def test_a_folder_in_the_hub_layout_loads_like_a_hub_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    rows = json.loads(GLAIVE.read_text())
    for split, part in {"train": rows[:12], "eval": rows[12:14], "test": rows[14:]}.items():
        pd.DataFrame(part).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text("# my dataset\n")
    splits = load_splits(DataSettings(source=str(folder)))
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (12, 2, 2)
    assert splits.eval[0].origin == f"{folder}[eval]:1"
    assert splits.train[0].tools and splits.train[0].messages[1]["tool_calls"]
    # A bad record in a shard is named by split and row.
    bad = [*rows[:2], {**rows[2], "conversations": [{"from": "critic", "value": "meh"}]}, *rows[3:12]]
    pd.DataFrame(bad).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"\[train\]:3: turn 1: role 'critic'"):
        load_splits(DataSettings(source=str(folder)))


@pytest.mark.slow
def test_a_sweep_learns_tool_calls_from_a_sharegpt_file(tmp_path: Path, tiny_llama: Path) -> None:
    """Through the real entry point: the tiny model's eval loss on glaive-style tool calls falls."""
    config = {
        "name": "tools",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "tools-test",
        # float32 compute: bf16 matmuls crawl on CPUs without bf16 instructions.
        "model": {
            "name_or_path": str(tiny_llama),
            "gradient_checkpointing": False,
            "compute_dtype": "float32",
        },
        "data": {"source": str(GLAIVE), "max_length": 256, "eval_fraction": 0.2},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "warmup_ratio": 0.0},
        "search": {
            "num_samples": 1,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "initial_points": [{"r": 8, "lora_alpha": 16, "learning_rate": 5e-3}],
            "space": {
                "r": {"choice": [8]},
                "lora_alpha": {"choice": [16]},
                "learning_rate": {"choice": [5e-3]},
            },
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    table = pd.read_parquet(tmp_path / "experiments" / "tools-test" / "results.parquet")
    assert (table["best_eval_loss"] < table["base_eval_loss"]).all(), table[
        ["best_eval_loss", "base_eval_loss"]
    ]
