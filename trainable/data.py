"""Instruction data: load records in common formats, split them, render chat prompts, tokenize.

Every record becomes a conversation (a list of {"role", "content"} messages). Tokenization renders it with
the chat template and trains only on the assistant's tokens: prompt tokens get label -100.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainable.settings import DataSettings
from trainable.tasks import BUNDLED_PATH

IGNORE_INDEX = -100  # the label that torch's cross-entropy skips

# For base models whose tokenizer has no chat template (Llama-2 base has none): the Alpaca prompt layout,
# with BOS/EOS around each example so the model learns where an answer ends.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n### Response:\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
)

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
_FORMAT_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Bad data, named by file and line (or row) where there is one."""


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    task: str | None = None  # the bundled set's task name, for per-task scores
    check: str | None = None  # how an answer is checked: "exact", "json" or "free"
    origin: str = ""  # file:line (or hub:name:row) for error messages

    @property
    def reference(self) -> str:
        """The last assistant turn: the answer a generation is compared with."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    test: list[Example] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- loading


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet/.csv file; a malformed row is reported by file and line."""
    if not path.exists():
        raise DataError(f"data.source: file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise DataError(f"data.source: {path} has suffix {suffix!r}; expected one of {', '.join(_SUFFIXES)}")


def _hub_records(settings: DataSettings, split: str) -> list[dict[str, Any]] | None:
    import datasets

    try:
        names = datasets.get_dataset_split_names(settings.source, settings.hub_config)
    except Exception as err:
        raise DataError(f"data.source: cannot open hub dataset {settings.source!r}: {err}") from err
    if split not in names:
        return None
    return list(datasets.load_dataset(settings.source, settings.hub_config, split=split))


def detect_format(row: dict[str, Any], columns: dict[str, str], where: str) -> str:
    for fmt, needed in _FORMAT_COLUMNS.items():
        if all(columns.get(c, c) in row for c in needed):
            return fmt
    raise DataError(
        f"{where}: data.format: cannot tell the format from columns {sorted(row)}; expected alpaca "
        "(instruction/output), chat (messages), sharegpt (conversations) or text; set data.format and "
        "data.columns"
    )


def to_example(row: dict[str, Any], fmt: str, settings: DataSettings, where: str) -> Example:
    """One record as a conversation; `where` names the file and line for error messages."""
    col = {
        k: settings.columns.get(k, k)
        for k in ("instruction", "input", "output", "messages", "conversations", "text")
    }
    missing = [col[c] for c in _FORMAT_COLUMNS[fmt] if row.get(col[c]) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing or empty column(s) {', '.join(missing)} for format {fmt!r}")
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    if fmt == "alpaca":
        prompt = str(row[col["instruction"]])
        if row.get(col["input"]):
            prompt += "\n\n" + str(row[col["input"]])
        messages = [
            *system,
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(row[col["output"]])},
        ]
    elif fmt == "text":
        messages = [{"role": "text", "content": str(row[col["text"]])}]
    else:
        key, role_key, content_key = (
            ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
        )
        turns = row[col[key]]
        if isinstance(turns, str):
            turns = json.loads(turns)  # CSV cells hold JSON text
        messages = list(system)
        for turn in turns:
            role = turn.get(role_key) if isinstance(turn, dict) else None
            role = _SHAREGPT_ROLES.get(str(role)) if fmt == "sharegpt" else role
            if role not in ("system", "user", "assistant") or not isinstance(turn.get(content_key), str):
                raise DataError(f"{where}: bad turn {turn!r}: needs {role_key!r} and {content_key!r}")
            messages.append({"role": role, "content": turn[content_key]})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return Example(messages=messages, task=row.get("task"), check=row.get("check"), origin=where)


def to_examples(rows: Sequence[dict[str, Any]], settings: DataSettings, origin: str) -> list[Example]:
    if not rows:
        return []
    fmt = (
        detect_format(rows[0], settings.columns, f"{origin}:1")
        if settings.format == "auto"
        else settings.format
    )
    return [to_example(row, fmt, settings, f"{origin}:{i}") for i, row in enumerate(rows, start=1)]


def load_splits(settings: DataSettings) -> Splits:
    """Train/eval/test examples from the configured source (bundled set, local file or hub dataset)."""
    if settings.source == "bundled" or Path(settings.source).suffix.lower() in _SUFFIXES:
        path = BUNDLED_PATH if settings.source == "bundled" else Path(settings.source).expanduser().resolve()
        rows = read_records(path)
        # Rows carry their line numbers (for error messages) through the split.
        numbered = list(enumerate(rows, start=1))
        if any("split" in r for r in rows):
            parts = {
                name: [(n, r) for n, r in numbered if r.get("split") == name]
                for name in (settings.train_split, settings.eval_split, settings.test_split)
            }
            train, held, test = (
                parts[settings.train_split],
                parts[settings.eval_split],
                parts[settings.test_split],
            )
        else:
            train, held, test = numbered, [], []
        if not held:
            train, held = _hold_out(train, settings)

        def convert(part: list[tuple[int, dict[str, Any]]]) -> list[Example]:
            if not part:
                return []
            fmt = (
                detect_format(part[0][1], settings.columns, f"{path}:{part[0][0]}")
                if settings.format == "auto"
                else settings.format
            )
            return [to_example(r, fmt, settings, f"{path}:{n}") for n, r in part]

        splits = Splits(convert(train), convert(held), convert(test))
    else:
        train_rows = _hub_records(settings, settings.train_split)
        if train_rows is None:
            raise DataError(
                f"data.train_split: hub dataset {settings.source!r} has no split {settings.train_split!r}"
            )
        eval_rows = _hub_records(settings, settings.eval_split)
        test_rows = _hub_records(settings, settings.test_split) or []
        if eval_rows is None:
            kept, held = _hold_out(list(enumerate(train_rows, start=1)), settings)
            train_rows, eval_rows = [r for _, r in kept], [r for _, r in held]
        origin = f"hub:{settings.source}"
        splits = Splits(
            to_examples(train_rows, settings, origin),
            to_examples(eval_rows, settings, origin),
            to_examples(test_rows, settings, origin),
        )
    rng = random.Random(settings.seed)
    train_examples = splits.train
    if settings.max_train_examples is not None and len(train_examples) > settings.max_train_examples:
        train_examples = rng.sample(train_examples, settings.max_train_examples)
    evals = splits.eval[: settings.max_eval_examples] if settings.max_eval_examples else splits.eval
    if len(train_examples) < 8 or len(evals) < 1:
        raise DataError(
            f"data.source {settings.source!r}: too few examples (train {len(train_examples)}, eval {len(evals)}); "
            "a sweep needs at least 8 training and 1 evaluation example"
        )
    return Splits(train_examples, evals, splits.test)


def _hold_out(
    rows: list[tuple[int, dict[str, Any]]], settings: DataSettings
) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]]]:
    """A fixed, seeded eval_fraction of the training rows (at least one), for sources without an eval split."""
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    n_eval = max(1, round(len(rows) * settings.eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ----------------------------------------------------------------------------------------- tokenizing


def choose_chat_template(tokenizer: Any, setting: str) -> str:
    """The template to render with: the tokenizer's own, or DEFAULT_CHAT_TEMPLATE when it has none."""
    own = getattr(tokenizer, "chat_template", None)
    if setting == "model":
        if not own:
            raise DataError(
                "data.chat_template is 'model' but the tokenizer has no chat template; use 'auto'"
            )
        return own
    if setting == "default" or not own:
        return DEFAULT_CHAT_TEMPLATE
    return own


def render_segments(messages: list[dict[str, str]], tokenizer: Any, template: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: assistant turns are trained, the rest not.

    Each assistant turn is found by rendering the conversation up to it with and without that turn; the
    template must render a conversation's prefix as a prefix of the whole, as chat templates do.
    """
    if messages and messages[0]["role"] == "text":
        return [((tokenizer.bos_token or "") + messages[0]["content"] + (tokenizer.eos_token or ""), True)]

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template does not render a conversation's beginning as a prefix of the whole, so "
                "the assistant's tokens cannot be found; set data.chat_template to 'default'"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return segments


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int  # examples cut at max_length (their tail is lost)
    dropped: int  # examples with no trained token left after the cut

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def as_columns(self) -> dict[str, list[list[int]]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def tokenize_examples(
    examples: Iterable[Example], tokenizer: Any, *, template: str, max_length: int
) -> Tokenized:
    """Token ids and labels (-100 outside assistant turns), cut to max_length from the end."""
    all_ids, all_labels, truncated, dropped = [], [], 0, 0
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        try:
            segments = render_segments(example.messages, tokenizer, template)
        except DataError as err:
            raise DataError(f"{example.origin}: {err}") from None
        except Exception as err:  # the template's own error (jinja raise_exception, a missing variable)
            raise DataError(
                f"{example.origin}: the chat template cannot render this conversation ({err}); check the "
                "roles it allows, or set data.chat_template to 'default'"
            ) from None
        for text, trained in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    return Tokenized(all_ids, all_labels, truncated, dropped)


def prompt_text(example: Example, tokenizer: Any, template: str) -> str:
    """The rendered prompt of an example's last assistant turn, ready for generation."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(
        example.messages[:last], chat_template=template, tokenize=False, add_generation_prompt=True
    )
