"""The bundled instruction dataset: small tasks with short answers that a program can check.

    python -m trainable.tasks                      # rewrites trainable/bundled/tasks.jsonl
    python -m trainable.tasks --out /tmp/t.jsonl --seed 1

Each line is an alpaca record plus metadata:
{"id", "task", "check", "instruction", "input", "output", "split"}. The answers are a few tokens long on
purpose: a sweep trains SmolLM2-135M-Instruct for a few hundred LoRA steps, and the score must move within
that budget. `check` says how a prediction is judged: "exact" (normalized string equality), "json"
(parsed objects equal) or "free" (a reference sentence, scored by text similarity); analysis.score checks.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Check = Literal["exact", "json", "free"]
Split = Literal["train", "eval", "test"]

# Package data; the folder is not named "data" so that it does not sit beside data.py under the same name.
BUNDLED_PATH: Path = Path(__file__).resolve().parent / "bundled" / "tasks.jsonl"
DEFAULT_SEED = 0
# 1,000 train examples are 125 steps of batch 8: one pass fits the 100-300 step budget of a trial.
# 300 test examples: a 6-point accuracy difference between two adapters is then significant (McNemar
# p < 0.05) while fewer than 70 prompts (23%) are answered right by only one of them; with 100 test
# examples, only while 6 or fewer are.
SPLIT_SIZES: dict[Split, int] = {"train": 1000, "eval": 100, "test": 300}
FIELDS = ("id", "task", "check", "instruction", "input", "output", "split")

# Short, common, lowercase words: single or few BPE tokens, so reversing and spelling stay learnable.
WORDS = (
    "apple",
    "bread",
    "chair",
    "cloud",
    "dance",
    "eagle",
    "field",
    "grape",
    "horse",
    "house",
    "juice",
    "knife",
    "lemon",
    "money",
    "night",
    "ocean",
    "paper",
    "queen",
    "river",
    "stone",
    "table",
    "tiger",
    "train",
    "water",
    "zebra",
    "actor",
    "angle",
    "basin",
    "beach",
    "berry",
    "blade",
    "board",
    "brick",
    "brush",
    "cabin",
    "candy",
    "cargo",
    "chalk",
    "chess",
    "cider",
    "clock",
    "coast",
    "coral",
    "crane",
    "crown",
    "daisy",
    "delta",
    "diary",
    "drum",
    "fable",
    "feast",
    "flame",
    "flute",
    "frost",
    "ghost",
    "giant",
    "glass",
    "globe",
    "honey",
    "hotel",
    "igloo",
    "ivory",
    "jelly",
    "jewel",
    "karma",
    "kayak",
    "koala",
    "ladder",
    "laser",
    "llama",
    "lunch",
    "magic",
    "mango",
    "maple",
    "medal",
    "melon",
    "mouse",
    "music",
    "novel",
    "nurse",
    "olive",
    "onion",
    "opera",
    "otter",
    "panda",
    "pearl",
    "piano",
    "pilot",
    "pizza",
    "plant",
    "radio",
    "robin",
    "robot",
    "salad",
    "sheep",
    "shirt",
    "snake",
    "spoon",
    "storm",
    "sugar",
    "sword",
    "tulip",
    "uncle",
    "video",
    "violin",
    "wagon",
    "whale",
    "wheel",
    "woman",
    "yacht",
    "cat",
    "dog",
    "sun",
    "map",
    "cup",
    "pen",
    "box",
    "hat",
    "bus",
    "egg",
    "fish",
    "bird",
    "tree",
    "book",
    "door",
    "lamp",
    "moon",
    "star",
    "rain",
    "snow",
    "garden",
    "window",
    "pencil",
    "basket",
    "button",
    "candle",
    "carrot",
    "castle",
    "circle",
    "doctor",
    "dragon",
    "forest",
    "island",
    "jacket",
    "kitten",
    "market",
    "mirror",
    "monkey",
    "orange",
    "parrot",
    "pepper",
    "pocket",
    "rabbit",
    "rocket",
    "saddle",
    "silver",
    "spider",
    "summer",
    "ticket",
    "turtle",
)

# Things to count: kept distinct within a list so "how many items" has one answer.
ITEMS = (
    "apple",
    "pear",
    "plum",
    "cherry",
    "banana",
    "grape",
    "lemon",
    "mango",
    "peach",
    "kiwi",
    "melon",
    "fig",
    "lime",
    "date",
    "olive",
    "carrot",
    "onion",
    "potato",
    "tomato",
    "bean",
    "pen",
    "cup",
    "book",
    "chair",
    "lamp",
    "clock",
    "spoon",
    "plate",
    "shoe",
    "sock",
)

NAMES = (
    "Maria",
    "John",
    "Aiko",
    "Carlos",
    "Fatima",
    "Liam",
    "Olga",
    "Ravi",
    "Sofia",
    "Ahmed",
    "Emma",
    "Noah",
    "Chen",
    "Lucia",
    "Tomas",
    "Amara",
    "Ivan",
    "Nina",
    "Pedro",
    "Hana",
    "Omar",
    "Grace",
    "Yusuf",
    "Elena",
    "Marco",
    "Zara",
    "David",
    "Ingrid",
    "Kofi",
    "Mei",
    "Lars",
    "Priya",
    "Diego",
    "Anna",
    "Felix",
    "Leila",
    "Sam",
    "Rosa",
    "Hugo",
    "Ines",
)

CITIES = (
    "Oslo",
    "Lisbon",
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Dublin",
    "Athens",
    "Cairo",
    "Lagos",
    "Nairobi",
    "Tokyo",
    "Seoul",
    "Delhi",
    "Lima",
    "Quito",
    "Toronto",
    "Boston",
    "Denver",
    "Sydney",
    "Perth",
    "Warsaw",
    "Zurich",
    "Milan",
    "Porto",
    "Helsinki",
    "Riga",
    "Tunis",
)

# Weather words that read naturally in "It is <weather> in <city>".
WEATHER = ("rainy", "sunny", "cloudy", "windy", "snowy", "foggy", "stormy", "clear")

# (source unit, target unit, factor): every conversion multiplies by an integer, so answers are integers.
CONVERSIONS = (
    ("km", "meters", 1000),
    ("kg", "grams", 1000),
    ("m", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
)


@dataclass(frozen=True)
class Example:
    """One generated example before it gets an id and a split."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class TaskSpec:
    """A task family: how to draw one example, how to check it, and its share of every split."""

    name: str
    check: Check
    make: Callable[[random.Random], Example]
    # Relative share of each split; the free-text task is weighted to make about 10% of the data.
    weight: float = 1.0


def _numbers_text(numbers: Iterable[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _make_add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    instruction = rng.choice(
        ("Add the two numbers.", "What is the sum? Answer with the number only.", "Compute the sum.")
    )
    return Example(instruction, f"{a} + {b}", str(a + b))


def _make_subtract(rng: random.Random) -> Example:
    # The larger number comes first so answers are never negative: one less thing for a tiny model.
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    instruction = rng.choice(
        (
            "Subtract the second number from the first.",
            "What is the difference? Answer with the number only.",
            "Compute the difference.",
        )
    )
    return Example(instruction, f"{a} - {b}", str(a - b))


def _make_multiply(rng: random.Random) -> Example:
    # Times tables up to 12 rather than digits only: 1-9 x 1-9 has too few distinct inputs for ~100 examples.
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    instruction = rng.choice(
        (
            "Multiply the two numbers.",
            "What is the product? Answer with the number only.",
            "Compute the product.",
        )
    )
    return Example(instruction, f"{a} x {b}", str(a * b))


def _make_even_odd(rng: random.Random) -> Example:
    n = rng.randint(1, 999)
    instruction = rng.choice(
        ("Is this number even or odd?", "Answer with even or odd: is the number even or odd?")
    )
    return Example(instruction, str(n), "even" if n % 2 == 0 else "odd")


def _make_reverse_word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    instruction = rng.choice(
        ("Reverse the letters of the word.", "Write the word backwards.", "Spell this word in reverse.")
    )
    return Example(instruction, word, word[::-1])


def _make_first_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    instruction = rng.choice(("What is the first letter of the word?", "Give the first letter of this word."))
    return Example(instruction, word, word[0])


def _make_sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    instruction = rng.choice(
        ("Sort the numbers from smallest to largest.", "Put these numbers in ascending order.")
    )
    return Example(instruction, _numbers_text(numbers), _numbers_text(sorted(numbers)))


def _make_max_number(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    instruction = rng.choice(
        ("Which number is the largest?", "Give the largest number in the list.", "What is the maximum?")
    )
    return Example(instruction, _numbers_text(numbers), str(max(numbers)))


def _make_count_items(rng: random.Random) -> Example:
    items = rng.sample(ITEMS, rng.randint(2, 8))
    instruction = rng.choice(
        ("How many items are in the list?", "Count the items in the list.", "How many things are listed?")
    )
    return Example(instruction, ", ".join(items), str(len(items)))


def _make_unit_convert(rng: random.Random) -> Example:
    source, target, factor = rng.choice(CONVERSIONS)
    # Small values keep x60 and x24 products to three digits; x1000 stays easy (append zeros).
    value = rng.randint(2, 30) if factor in (24, 60) else rng.randint(2, 99)
    instruction = rng.choice(
        (
            f"Convert to {target}. Answer with the number only.",
            f"How many {target} is this? Answer with the number only.",
        )
    )
    return Example(instruction, f"{value} {source}", str(value * factor))


def _make_extract_json(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
    sentence = rng.choice(
        (
            f"{name} is {age} years old and lives in {city}.",
            f"{name}, aged {age}, lives in {city}.",
            f"Living in {city}, {name} is {age} years old.",
        )
    )
    instruction = rng.choice(
        (
            "Extract the name, age and city as JSON.",
            'Return a JSON object with the keys "name", "age" and "city".',
        )
    )
    # One canonical serialization (key order name, age, city; json.dumps defaults) so the reference is unique.
    return Example(instruction, sentence, json.dumps({"name": name, "age": age, "city": city}))


def _make_describe_weather(rng: random.Random) -> Example:
    city, weather, temp = rng.choice(CITIES), rng.choice(WEATHER), rng.randint(-10, 35)
    instruction = rng.choice(
        ("Describe the weather in one sentence.", "Write one sentence about the weather report.")
    )
    return Example(
        instruction,
        f"city: {city}; weather: {weather}; temp: {temp}",
        f"It is {weather} in {city} at {temp} degrees.",
    )


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("add", "exact", _make_add),
    TaskSpec("subtract", "exact", _make_subtract),
    TaskSpec("multiply", "exact", _make_multiply),
    TaskSpec("even_odd", "exact", _make_even_odd),
    TaskSpec("reverse_word", "exact", _make_reverse_word),
    TaskSpec("first_letter", "exact", _make_first_letter),
    TaskSpec("sort_numbers", "exact", _make_sort_numbers),
    TaskSpec("max_number", "exact", _make_max_number),
    TaskSpec("count_items", "exact", _make_count_items),
    TaskSpec("unit_convert", "exact", _make_unit_convert),
    TaskSpec("extract_json", "json", _make_extract_json),
    TaskSpec("describe_weather", "free", _make_describe_weather, weight=1.2),
)


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integer shares proportional to `weights` (largest remainder, ties to earlier)."""
    quotas = [total * w / sum(weights) for w in weights]
    shares = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _draw_unique(spec: TaskSpec, rng: random.Random, count: int) -> list[Example]:
    # Inputs are unique within a task (whatever the phrasing), so no test question was seen in training.
    seen_inputs: set[str] = set()
    drawn: list[Example] = []
    for _ in range(count * 200):
        example = spec.make(rng)
        if example.input not in seen_inputs:
            seen_inputs.add(example.input)
            drawn.append(example)
            if len(drawn) == count:
                return drawn
    raise RuntimeError(
        f"task {spec.name!r} produced only {len(drawn)} distinct inputs, {count} are needed; "
        "widen its value ranges or lower its weight"
    )


def generate_examples(*, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Draw the whole dataset: every task in every split, stratified, train first, shuffled within a split."""
    rng = random.Random(seed)
    weights = [spec.weight for spec in TASKS]
    per_split = {split: _apportion(size, weights) for split, size in SPLIT_SIZES.items()}
    rows_by_split: dict[Split, list[dict[str, str]]] = {split: [] for split in SPLIT_SIZES}
    for task_index, spec in enumerate(TASKS):
        counts = {split: per_split[split][task_index] for split in SPLIT_SIZES}
        examples = _draw_unique(spec, rng, sum(counts.values()))
        start = 0
        for split, count in counts.items():
            for number, example in enumerate(examples[start : start + count], start=start + 1):
                rows_by_split[split].append(
                    {
                        "id": f"{spec.name.replace('_', '-')}-{number:04d}",
                        "task": spec.name,
                        "check": spec.check,
                        "instruction": example.instruction,
                        "input": example.input,
                        "output": example.output,
                        "split": split,
                    }
                )
            start += count
    # Shuffled so a trainer that reads in file order does not see one task at a time.
    rows: list[dict[str, str]] = []
    for split_rows in rows_by_split.values():
        rng.shuffle(split_rows)
        rows.extend(split_rows)
    return rows


def write_examples(path: Path, examples: Iterable[dict[str, str]]) -> None:
    """Write examples as JSONL with a fixed field order and "\\n" line ends, so the file is reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps({key: example[key] for key in FIELDS}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the bundled instruction dataset as JSONL.")
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_PATH, help=f"output file (default: {BUNDLED_PATH})"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    examples = generate_examples(seed=args.seed)
    write_examples(args.out.resolve(), examples)
    print(f"wrote {len(examples)} examples to {args.out.resolve()}")


if __name__ == "__main__":
    main()
