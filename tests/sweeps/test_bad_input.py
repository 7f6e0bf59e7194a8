"""Bad input stops the driver before Ray starts, with a message naming the field, file or line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.run import main
from tests.conftest import bad_config

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def rows(n: int, **extra: str) -> list[dict]:
    return [{"instruction": f"Add {i} and 1.", "output": str(i + 1), **extra} for i in range(n)]


def write_jsonl(path: Path, lines: list[dict | str]) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def conversations(n: int, bad_line: int, bad_turn: dict) -> list[dict]:
    """ShareGPT rows in LLaMA-Factory's tool-call layout, with `bad_turn` as the second turn of `bad_line`."""
    call = {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})}
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Add {i} and 1."},
                bad_turn if line == bad_line else call,
                {"from": "observation", "value": str(i + 1)},
                {"from": "gpt", "value": str(i + 1)},
            ],
            "tools": json.dumps([{"name": "add", "parameters": {"type": "object"}}]),
        }
        for line, i in enumerate(range(n), start=1)
    ]
    return rows


def model_with_template(tiny_llama: Path, target: Path, template: str | None) -> str:
    shutil.copytree(tiny_llama, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return str(target)


CASES = {
    "malformed row": (
        lambda t, m: [f"data.source={write_jsonl(t / 'bad.jsonl', [*rows(5), '{oops'])}"],
        "bad.jsonl:6",
    ),
    "too small": (lambda t, m: [f"data.source={write_jsonl(t / 'few.jsonl', rows(3))}"], "too few"),
    "missing column": (
        lambda t, m: [f"data.source={write_jsonl(t / 'cols.jsonl', [{'instruction': 'x'}] * 20)}"],
        "cols.jsonl:1",
    ),
    "unknown target": (lambda t, m: ["lora.target_modules=qkv_proj"], "lora.target_modules"),
    "unknown target in space": (
        lambda t, m: ["search.space.target_modules.choice=[wq]"],
        "search.space.target_modules",
    ),
    "r out of range": (lambda t, m: ["lora.r=0"], "lora.r"),
    "alpha out of range": (
        lambda t, m: ["search.space.lora_alpha.choice=[0, 16]"],
        "search.space.lora_alpha",
    ),
    "no chat template": (
        lambda t, m: [
            f"model.name_or_path={model_with_template(m, t / 'plain', None)}",
            "data.chat_template=model",
        ],
        "data.chat_template",
    ),
    "template cannot render": (
        lambda t, m: [
            f"model.name_or_path={model_with_template(m, t / 'strict', RAISING_TEMPLATE)}",
            "data.system_prompt=Be brief.",
        ],
        "System role not supported",
    ),
    "too short for any answer": (lambda t, m: ["data.max_length=16"], "data.max_length"),
    "unknown key": (lambda t, m: ["train.epochs=3"], "train.epochs"),
    "sharegpt role no one renders": (
        lambda t, m: [
            f"data.source={write_jsonl(t / 'roles.jsonl', conversations(20, 4, {'from': 'critic', 'value': 'no'}))}"
        ],
        "roles.jsonl:4: turn 2: role 'critic' cannot be rendered",
    ),
    "openai role no one renders": (
        lambda t, m: [
            "data.source="
            + write_jsonl(
                t / "chat.jsonl",
                [{"messages": [{"role": "ipython", "content": "x"}, {"role": "assistant", "content": "y"}]}]
                * 20,
            )
        ],
        "chat.jsonl:1: turn 1: role 'ipython' cannot be rendered",
    ),
    "tool call that is not JSON": (
        lambda t, m: [
            f"data.source={write_jsonl(t / 'calls.jsonl', conversations(20, 3, {'from': 'function_call', 'value': 'add(1, 2)'}))}"
        ],
        "calls.jsonl:3: turn 2: a tool call must be JSON",
    ),
    "turn without text": (
        lambda t, m: [f"data.source={write_jsonl(t / 'empty.jsonl', conversations(20, 2, {'from': 'gpt'}))}"],
        "empty.jsonl:2: turn 2 (from 'gpt'): 'value' must be text, got nothing",
    ),
    "prompt/completion of mixed kinds": (
        lambda t, m: [
            "data.source="
            + write_jsonl(
                t / "pc.jsonl",
                [{"prompt": "2+2=", "completion": [{"role": "assistant", "content": "4"}]}] * 20,
            )
        ],
        "pc.jsonl:1: 'prompt' and 'completion' must both be text (plain) or both lists of messages",
    ),
    "model path not found": (
        lambda t, m: ["model.name_or_path=/nonexistent"],
        "model.name_or_path='/nonexistent'",
    ),
    "folder that is not a model": (
        lambda t, m: [f"model.name_or_path={t}"],
        "is a folder without config.json, so not a model",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_before_ray_starts(
    case: str, tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    make_overrides, named = CASES[case]
    path = bad_config(tmp_path, tiny_llama)
    assert main(["--config", str(path), *make_overrides(tmp_path, tiny_llama)]) == 2
    error = capsys.readouterr().err
    assert named in error, error
    assert not ray.is_initialized()
    assert not (tmp_path / "experiments").exists()


def test_a_bad_fault_spec_stops_the_driver_before_ray(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    monkeypatch.setenv("QLORA_SWEEPS_FAULTS", "oom@2:r=4; explode@3")
    assert main(["--config", "local", f"storage_path={tmp_path / 'experiments'}"]) == 2
    assert "QLORA_SWEEPS_FAULTS: bad entry 'explode@3'" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize(
    ("name_or_path", "named"),
    [
        ("/nonexistent", "no such folder, and not a hub id"),
        ("nobody/no-such-model", "the hub cannot be reached (HF_HUB_OFFLINE is set) and has not cached it"),
    ],
)
def test_a_model_that_cannot_be_found_is_one_line_from_the_cli(
    name_or_path: str, named: str, tmp_path: Path
) -> None:
    """Offline (no network here; HF_HUB_OFFLINE as on an air-gapped cluster) the hub client's OSError and
    traceback become one line naming the key and what to do."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeps.run",
            f"model.name_or_path={name_or_path}",
            f"storage_path={tmp_path / 'experiments'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"model.name_or_path={name_or_path!r}" in lines[0] and named in lines[0], (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "experiments").exists()
