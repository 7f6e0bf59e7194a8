"""Instruction data: load records in common formats (local files through trainable.records), refuse data
made for other training, split them, render chat prompts, tokenize, and say what data.max_length cuts.

Every record becomes a conversation in OpenAI's shape: {"role", "content"} messages with roles system, user,
assistant and tool, an assistant turn may carry "tool_calls", and the example may carry the tools it can call.
Tokenization renders it with the chat template and trains only on the assistant's tokens (tool calls
included): everything else gets label -100. A template that does not know tools gets the conversation in
FALLBACK_LAYOUT instead (see `to_fallback_messages`).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainable.records import SUFFIXES, DataError, Numbered, read_records
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

# ShareGPT's "from" values (LLaMA-Factory's layout included) as roles: a function_call turn is the assistant
# calling a tool (its value the call as JSON), an observation turn is the tool's result.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# OpenAI's roles: "developer" is its newer name for system, "function" its older one for a tool's result.
_CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
_FORMAT_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_COLUMN_NAMES = (
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "tools",
    "system",
)

# How a conversation with tools is rendered for a chat template that does not take tools (SmolLM2's, the
# Alpaca default): the tools' JSON schemas appended to the system message under this header, each tool call
# as a JSON line {"name": ..., "arguments": {...}} in the assistant's turn (after its text, if any), and the
# tools' results as a user turn of their own under FALLBACK_RESULT_HEADER. Only plain system, user and
# assistant turns remain, which every template renders, so any model can learn to call tools.
FALLBACK_TOOLS_HEADER = (
    'You can call these tools; to call one, answer with a JSON line {"name": ..., "arguments": {...}}:'
)
FALLBACK_RESULT_HEADER = "Tool result:"


Message = dict[str, Any]  # {"role", "content"} and, on an assistant turn, maybe "tool_calls"


@dataclass(frozen=True)
class Example:
    messages: list[Message]
    task: str | None = None  # the bundled set's task name, for per-task scores
    check: str | None = None  # how an answer is checked: "exact", "json" or "free"
    origin: str = ""  # file:line (or source[split]:row) for error messages
    tools: list[dict[str, Any]] | None = None  # the JSON schemas of the tools the conversation may call
    # Assistant turns before this message are context, not trained: TRL's conversational prompt/completion
    # trains on the completion only.
    train_from: int = 0
    # Rendered as raw text, prompt then completion, without a chat template: TRL's plain prompt/completion.
    plain: bool = False

    @property
    def reference(self) -> str:
        """The last assistant turn: the answer a generation is compared with."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return "" if last is None else render_fallback_turn(last)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    test: list[Example] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- loading


def _dataset_rows(settings: DataSettings, split: str) -> Numbered | None:
    """A split of a hub dataset, or of a local folder in the hub's layout (data/train-00000-of-00001.parquet,
    data/test-...): `datasets` resolves both the same way. None when the dataset has no such split."""
    import datasets

    try:
        names = datasets.get_dataset_split_names(settings.source, settings.hub_config)
    except Exception as err:
        raise DataError(
            f"data.source: cannot open dataset {settings.source!r} (a hub dataset, or a folder in the hub's "
            f"layout): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if split not in names:
        return None
    rows = datasets.load_dataset(settings.source, settings.hub_config, split=split)
    return [(f"{settings.source}[{split}]:{i}", row) for i, row in enumerate(rows, start=1)]


# What the product trains: supervised fine-tuning on text. Data made for other training is refused by name,
# since each kind would train "fine" as chat data while teaching the wrong thing.
SUPPORTED = (
    "qlora-sweeps trains text-only supervised fine-tuning formats: alpaca, chat, sharegpt, "
    "prompt_completion, text (docs/data.md)"
)
# Columns of multimodal data, singular and plural (LLaMA-Factory's images/videos/audios, the hub's image).
_MEDIA_COLUMNS = {name: kind for kind in ("image", "video", "audio") for name in (kind, f"{kind}s")}
# The placeholders multimodal data puts in its text where the image, video or audio goes. A bare tag: HTML in
# code data writes <video ...> with attributes, or closes it with </video>, and is left alone.
_MEDIA_PLACEHOLDER = re.compile(r"<(image|video|audio)>")


def refuse_untrainable(rows: Numbered) -> None:
    """Refuse, by name, data made for something other than supervised fine-tuning on text: preference pairs
    (chosen/rejected), KTO's desirable/undesirable labels, images, video or audio. Trained as chat data, a
    rejected or undesirable answer would become a target and `<image>` a literal token."""
    for where, row in rows:
        if "chosen" in row and "rejected" in row:
            raise DataError(
                f"{where}: preference pairs (chosen/rejected), data for preference training (DPO, ORPO, "
                f"reward models); {SUPPORTED}. To fine-tune on the chosen answers alone, make them the "
                "answers of one of these formats"
            )
        tag = next((c for c in ("kto_tag", "label") if c in row and _is_boolean(row[c])), None)
        if tag is not None:
            raise DataError(
                f"{where}: KTO data (a true/false {tag!r} on each example; false marks an undesirable "
                f"answer, which fine-tuning would learn as a target); {SUPPORTED}. To fine-tune on the "
                "desirable answers alone, keep the examples labelled true and drop the column"
            )
        media = next((c for c in row if c in _MEDIA_COLUMNS and row[c] not in (None, "", [], {})), None)
        if media is not None:
            raise DataError(
                f"{where}: {_MEDIA_COLUMNS[media]} data (column {media!r}), for multimodal models; "
                + SUPPORTED
            )
        for text in _strings(row):
            found = _MEDIA_PLACEHOLDER.search(text)
            if found and f"</{found[1]}>" not in text:
                raise DataError(
                    f"{where}: {found[1]} data (the {found[0]!r} placeholder stands for {found[1]} input "
                    f"that a text-only model never sees; it would be learned as literal text); {SUPPORTED}"
                )


def _is_boolean(value: Any) -> bool:
    """True or False, also as CSV writes them ("True", "false")."""
    return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false"))


def _strings(value: Any) -> Iterable[str]:
    """Every string in a cell, however deep in lists and objects (chat turns, tool calls)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def detect_format(row: dict[str, Any], columns: dict[str, str], where: str) -> str:
    for fmt, needed in _FORMAT_COLUMNS.items():
        if all(columns.get(c, c) in row for c in needed):
            return fmt
    raise DataError(
        f"{where}: data.format: cannot tell the format from columns {sorted(row)}; expected alpaca "
        "(instruction/output), chat (messages), sharegpt (conversations), prompt_completion "
        "(prompt/completion) or text; set data.format and data.columns"
    )


def to_example(row: dict[str, Any], fmt: str, settings: DataSettings, where: str) -> Example:
    """One record as a conversation; `where` names the file and line for error messages."""
    col = {k: settings.columns.get(k, k) for k in _COLUMN_NAMES}
    missing = [col[c] for c in _FORMAT_COLUMNS[fmt] if row.get(col[c]) in (None, "", [])]
    if missing:
        raise DataError(f"{where}: missing or empty column(s) {', '.join(missing)} for format {fmt!r}")
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    if fmt == "sharegpt" and isinstance(row.get(col["system"]), str) and row[col["system"]]:
        system = [{"role": "system", "content": row[col["system"]]}]  # LLaMA-Factory's system column
    tools = _tools(row.get(col["tools"]), where)
    base = Example(messages=[], task=row.get("task"), check=row.get("check"), origin=where, tools=tools)
    if fmt == "alpaca":
        answers = row[col["output"]]
        if isinstance(answers, list):  # LLaMA-Factory's older ranking layout: [better, worse]
            raise DataError(
                f"{where}: {col['output']!r} holds a list of {len(answers)} answers, not one: ranked answers "
                "are preference pairs, data for preference training (DPO, ORPO, reward models); "
                f"{SUPPORTED}. To fine-tune on the best answer, make it the output"
            )
        prompt = str(row[col["instruction"]])
        if row.get(col["input"]):
            prompt += "\n\n" + str(row[col["input"]])
        messages = [
            *system,
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(row[col["output"]])},
        ]
        return replace(base, messages=messages)
    if fmt == "text":
        return replace(base, messages=[{"role": "text", "content": str(row[col["text"]])}])
    if fmt == "prompt_completion":
        prompt, completion = (_list_cell(row[col[c]]) for c in ("prompt", "completion"))
        if isinstance(prompt, str) and isinstance(completion, str):
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return replace(base, messages=turns, plain=True)
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(
                f"{where}: {col['prompt']!r} and {col['completion']!r} must both be text (plain) or both lists "
                f"of messages (conversational); got {type(prompt).__name__} and {type(completion).__name__}"
            )
        context = system + _chat_turns(prompt, "chat", where, first=1)
        answer = _chat_turns(completion, "chat", where, first=len(prompt) + 1)
        if not any(m["role"] == "assistant" for m in answer):
            raise DataError(f"{where}: the completion has no assistant turn to learn from")
        return replace(base, messages=context + answer, train_from=len(context))
    turns = _list_cell(row[col["messages" if fmt == "chat" else "conversations"]])
    if not isinstance(turns, list):
        raise DataError(f"{where}: expected a list of turns, got {type(turns).__name__}")
    messages = system + _chat_turns(turns, fmt, where, first=1)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return replace(base, messages=messages)


def _json_cell(value: Any) -> Any:
    """A cell that may hold JSON text (CSV cells, LLaMA-Factory's tools column) as its value."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _list_cell(value: Any) -> Any:
    """A list of turns, from a cell holding it as JSON text (CSV) or as it is; plain text stays text."""
    parsed = _json_cell(value)
    return parsed if isinstance(parsed, list) else value


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """The tools column as OpenAI's list of {"type": "function", "function": schema}; LLaMA-Factory's bare
    schemas (a JSON string) are wrapped."""
    if value in (None, "", []):
        return None
    tools = _json_cell(value)
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(
            f"{where}: the tools column must be a JSON list of tool schemas, got {str(value)[:80]!r}"
        )
    wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    unnamed = [t for t in wrapped if not isinstance(t["function"], dict) or "name" not in t["function"]]
    if unnamed:
        raise DataError(f"{where}: a tool schema has no 'name': {str(unnamed[0])[:120]}")
    return wrapped


def _chat_turns(turns: list[Any], fmt: str, where: str, *, first: int) -> list[Message]:
    """ShareGPT or OpenAI-style turns as messages; `first` numbers the turns in error messages."""
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    roles = _SHAREGPT_ROLES if fmt == "sharegpt" else _CHAT_ROLES
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=first):
        at = f"{where}: turn {number}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with {role_key!r} and {content_key!r}, got {turn!r}")
        if role_key not in turn:
            raise DataError(f"{at}: no {role_key!r} key (keys: {', '.join(sorted(turn))})")
        given = turn[role_key]
        role = roles.get(str(given))
        if role is None:
            raise DataError(
                f"{at}: role {given!r} cannot be rendered (neither by a chat template nor by the fallback "
                f"layout); {role_key!r} must be one of {', '.join(roles)}"
            )
        content = turn.get(content_key)
        if fmt == "sharegpt" and given == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls(content, at)})
            continue
        calls = turn.get("tool_calls") if fmt == "chat" and role == "assistant" else None
        if content is None and calls:
            content = ""  # OpenAI: an assistant turn that only calls tools has content null
        if not isinstance(content, str):
            raise DataError(
                f"{at} ({role_key} {given!r}): {content_key!r} must be text, got "
                f"{'nothing' if content is None else type(content).__name__}"
            )
        message: Message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = _calls(calls, at)
        if role == "tool" and isinstance(turn.get("name"), str):
            message["name"] = turn["name"]
        messages.append(message)
    return messages


def _calls(value: Any, at: str) -> list[dict[str, Any]]:
    """Tool calls as OpenAI's [{"type": "function", "function": {"name", "arguments": {...}}}]: from
    LLaMA-Factory's function_call value (JSON text of one call or a list) or OpenAI's tool_calls."""
    calls = _json_cell(value)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(
            f'{at}: a tool call must be JSON {{"name": ..., "arguments": {{...}}}}, got {str(value)[:80]!r}'
        )
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{at}: a tool call has no function name: {str(call)[:120]!r}")
        arguments = _json_cell(function.get("arguments", {}))
        if isinstance(arguments, str):  # OpenAI sends arguments as JSON text; templates want the object
            raise DataError(
                f"{at}: the arguments of tool call {function['name']!r} are not JSON: {arguments[:80]!r}"
            )
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def to_examples(rows: Numbered, settings: DataSettings) -> list[Example]:
    """Rows as examples, in the configured format or the one the first row's columns show."""
    if not rows:
        return []
    where, first = rows[0]
    fmt = detect_format(first, settings.columns, where) if settings.format == "auto" else settings.format
    return [to_example(row, fmt, settings, where) for where, row in rows]


def load_splits(settings: DataSettings) -> Splits:
    """Train/eval/test examples from the configured source: the bundled set, a local file, a local folder in
    the hub's layout or a hub dataset."""
    local = Path(settings.source).expanduser()
    # A file that exists is read as one, whatever its suffix: read_records names the suffixes it reads.
    if settings.source == "bundled" or local.suffix.lower() in SUFFIXES or local.is_file():
        path = BUNDLED_PATH if settings.source == "bundled" else local.resolve()
        # Rows carry their line numbers (for error messages) through the split.
        numbered = read_records(path, encoding="utf-8" if settings.source == "bundled" else settings.encoding)
        if path.suffix.lower() == ".txt" and settings.format not in ("auto", "text"):
            raise DataError(
                f"data.format is {settings.format!r}, but {path} is plain text, read as format 'text' (a "
                "document per blank-line-separated block); set data.format to text or auto"
            )
        refuse_untrainable(numbered)
        if any("split" in r for _, r in numbered):
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
    else:
        found = _dataset_rows(settings, settings.train_split)
        if found is None:
            raise DataError(
                f"data.train_split: dataset {settings.source!r} has no split {settings.train_split!r}"
            )
        train, test = found, _dataset_rows(settings, settings.test_split) or []
        maybe_held = _dataset_rows(settings, settings.eval_split)
        if maybe_held is None:
            train, held = _hold_out(train, settings)
        else:
            held = maybe_held
        refuse_untrainable(train + held + test)
    splits = Splits(to_examples(train, settings), to_examples(held, settings), to_examples(test, settings))
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


def _hold_out(rows: Numbered, settings: DataSettings) -> tuple[Numbered, Numbered]:
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


def template_takes_tools(template: str) -> bool:
    """Whether a chat template renders tools: it reads the `tools` variable and assistant turns' `tool_calls`
    (as Qwen2.5's, Llama 3.1's, Mistral's and Hermes' do). transformers passes `tools=` to every template and
    one that does not read it drops the tools without a word, so this is read from the template's source."""
    import jinja2
    import jinja2.meta

    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        reads_tools = "tools" in jinja2.meta.find_undeclared_variables(parsed)
    except jinja2.TemplateSyntaxError:  # a transformers-only tag such as {% generation %}
        reads_tools = re.search(r"\btools\b", template) is not None
    return reads_tools and "tool_calls" in template


def render_fallback_turn(message: Message) -> str:
    """An assistant turn's text in FALLBACK_LAYOUT: its content, then each tool call as a JSON line."""
    calls = [
        json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
        )
        for c in message.get("tool_calls", [])
    ]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def to_fallback_messages(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """A conversation with tools in FALLBACK_LAYOUT: only system, user and assistant turns with text."""
    out: list[Message] = []
    if tools:
        schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        listing = f"{FALLBACK_TOOLS_HEADER}\n{schemas}"
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{listing}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for message in messages:
        if message["role"] == "assistant":
            out.append({"role": "assistant", "content": render_fallback_turn(message)})
        elif message["role"] == "tool":
            # Results of parallel calls share one turn: templates that insist on alternating roles accept it.
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith(FALLBACK_RESULT_HEADER):
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{message['content']}"}
            else:
                out.append({"role": "user", "content": f"{FALLBACK_RESULT_HEADER}\n{message['content']}"})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


def _renderer(example: Example, tokenizer: Any, template: str) -> tuple[list[Message], Any]:
    """The example's messages as the template will see them, and a function rendering a prefix of them."""
    native = template_takes_tools(template)
    uses_tools = example.tools or any(m["role"] == "tool" or "tool_calls" in m for m in example.messages)
    messages = (
        example.messages
        if native or not uses_tools
        else to_fallback_messages(example.messages, example.tools)
    )
    tools = example.tools if native else None

    def render(count: int, generation_prompt: bool) -> str:
        if (
            example.plain
        ):  # TRL's plain prompt/completion: raw text, BOS before the prompt, EOS after the answer
            bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
            return bos + "".join(
                m["content"] + (eos if m["role"] == "assistant" else "") for m in messages[:count]
            )
        return tokenizer.apply_chat_template(
            messages[:count],
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    return messages, render


def render_segments(example: Example, tokenizer: Any, template: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: assistant turns (from `train_from` on) are
    trained, the rest not.

    Each assistant turn is found by rendering the conversation up to it with and without that turn; the
    template must render a conversation's prefix as a prefix of the whole, as chat templates do.
    """
    if example.messages and example.messages[0]["role"] == "text":
        text = example.messages[0]["content"]
        return [((tokenizer.bos_token or "") + text + (tokenizer.eos_token or ""), True)]
    messages, render = _renderer(example, tokenizer, template)
    # The fallback layout may add a system turn in front: count trained turns from the end instead.
    first_trained = len(messages) - (len(example.messages) - example.train_from)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        prompt, full = render(i, True), render(i + 1, False)
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
    lengths: list[int] = field(default_factory=list)  # each example's tokens before the cut, dropped ones too

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
    lengths: list[int] = []
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        try:
            segments = render_segments(example, tokenizer, template)
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
        lengths.append(len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    return Tokenized(all_ids, all_labels, truncated, dropped, lengths)


# A split with more of its examples cut than this gets the length report: a few long outliers are normal, a
# tenth of the data losing its ends is a max_length chosen without looking.
CUT_SHARE_REPORTED = 0.10
KEPT_WHOLE = 0.95  # the share of each split that the suggested max_length keeps whole


def percentile(lengths: Sequence[int], share: float) -> int:
    """The smallest length that at least `share` of `lengths` do not exceed (the nearest-rank percentile)."""
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def describe_lengths(lengths: Sequence[int]) -> dict[str, int]:
    """Tokens per example: the median, 90th, 95th and 99th percentiles and the longest."""
    if not lengths:
        return {}
    shares = {"median": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
    return {**{name: percentile(lengths, share) for name, share in shares.items()}, "max": max(lengths)}


def describe_cuts(lengths: dict[str, list[int]], *, max_length: int) -> str | None:
    """A `warning:` when data.max_length cuts more than CUT_SHARE_REPORTED of any split: how many are cut,
    the token-length distribution of each split, and the max_length that keeps KEPT_WHOLE of each whole.
    None when the cuts are few."""
    cut = {split: sum(n > max_length for n in counts) for split, counts in lengths.items() if counts}
    if not any(cut[split] > CUT_SHARE_REPORTED * len(lengths[split]) for split in cut):
        return None
    shares = " and ".join(
        f"{n / len(lengths[split]):.0%} of the {split} examples ({n} of {len(lengths[split])})"
        for split, n in cut.items()
    )
    lines = [f"warning: data.max_length={max_length} cuts {shares}: their ends are not trained on or scored"]
    for split in cut:
        stats = describe_lengths(lengths[split])
        lines.append(
            f"  tokens per {split} example: median {stats['median']}, 90% {stats['p90']}, "
            f"95% {stats['p95']}, 99% {stats['p99']}, max {stats['max']}"
        )
    whole = max(percentile(lengths[split], KEPT_WHOLE) for split in cut)
    lines.append(f"  data.max_length={whole} would keep {KEPT_WHOLE:.0%} of each split whole")
    return "\n".join(lines)


# A template's placeholder, {{name}} or {{ author }}, as LLaMA-Factory's identity demo leaves them for the
# user to fill in. An identifier inside: "{{ . }}" or "{{...}}" in a task's text are not placeholders.
_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][A-Za-z0-9_.]*\s*\}\}")


def find_placeholders(examples: Sequence[Example]) -> str | None:
    """A `warning:` naming the template placeholders ({{name}}) left in the examples' text, which would be
    trained as literal text: how many examples hold them, which ones, and the first one's place and text.
    A warning, not an error: in template code ({{ user.name }} in a Vue answer) they are meant."""
    first: tuple[str, str, re.Match[str]] | None = None  # where, the text, the placeholder in it
    holding, names = 0, set()
    for example in examples:
        found = [(m["content"], p) for m in example.messages for p in _PLACEHOLDER.finditer(m["content"])]
        if not found:
            continue
        holding += 1
        names |= {re.sub(r"\s", "", p[0]) for _, p in found}
        if first is None:
            first = (example.origin, *found[0])
    if first is None:
        return None
    origin, text, at = first
    start, end = max(0, at.start() - 30), at.end() + 50
    excerpt = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
    shown = sorted(names)
    return (
        f"warning: data: {holding} of {len(examples)} examples hold template placeholders "
        f"({', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}), which would be trained as literal "
        f"text; e.g. {origin}: {excerpt!r}. Fill them in first (LLaMA-Factory's identity demo is such a "
        "template), unless they are meant literally"
    )


def prompt_text(example: Example, tokenizer: Any, template: str) -> str:
    """The rendered prompt of an example's last assistant turn, ready for generation."""
    messages, render = _renderer(example, tokenizer, template)
    return render(max(i for i, m in enumerate(messages) if m["role"] == "assistant"), True)
