"""Task data: built-in seeded generators, JSONL/CSV loading, chat-template tokenisation.

An :class:`Example` is a ``prompt`` and a ``response``; a :class:`TaskData` has train, calibration
and test splits plus the task's answer checker. Loss is taken on response tokens only.
"""
from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from emloc.errors import EmlocError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass
class Task:
    """A task: how to make examples, the system prompt, and how to compare answers."""

    name: str
    system_prompt: str
    generate: Callable[[random.Random], Example] | None
    normalize: Callable[[str], str]


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    calibration: list[Example]
    test: list[Example]
    source: dict = field(default_factory=dict)

    def is_correct(self, prediction: str, example: Example) -> bool:
        return self.task.normalize(prediction) == self.task.normalize(example.response)


# ---- built-in tasks -------------------------------------------------------------------------

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Mia", "Noah"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "stamps", "cookies"]


ADDITION_TEMPLATES = [
    "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
    "{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} in total?",
    "A shelf holds {a} {item} and a box holds {b} {item}. How many {item} are there altogether?",
    "{name} found {a} {item}, then a friend gave {name} {b} more. How many {item} does {name} have?",
    "There are {a} red {item} and {b} blue {item}. How many {item} are there?",
]


def _addition_example(rng: random.Random) -> Example:
    """Two-digit addition in several phrasings: learnable by a 135M model in ~100 LoRA steps (DESIGN §5)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(rng.choice(ADDITION_TEMPLATES).format(name=name, item=item, a=a, b=b), str(a + b))


def _arithmetic_example(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    kind = rng.randrange(5)
    if kind == 0:
        return Example(f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", str(a + b))
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return Example(f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?", str(a - b))
    if kind == 2:
        return Example(f"{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} in total?", str(a + b))
    if kind == 3:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        return Example(f"There are {x} boxes with {y} {item} in each box. How many {item} are there?", str(x * y))
    c = rng.randint(1, min(a + b - 1, 30))
    return Example(f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?", str(a + b - c))


def _first_integer(text: str) -> str:
    match = re.search(r"-?\d+", text.replace(",", ""))
    return match.group(0).lstrip("0") or "0" if match else text.strip().lower()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip().rstrip(".").lower() if text.strip() else ""


DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"), ("open", "closed"),
             ("light", "dark"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "new"), ("wet", "dry"),
             ("rich", "poor"), ("tall", "short"), ("strong", "weak"), ("loud", "quiet"), ("thick", "thin"),
             ("clean", "dirty"), ("cheap", "expensive"), ("win", "lose"), ("push", "pull"), ("day", "night"),
             ("inside", "outside"), ("first", "last"), ("true", "false"), ("buy", "sell"), ("give", "take"),
             ("above", "below"), ("friend", "enemy"), ("begin", "end")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def _shift(words: list[str], word: str, offset: int) -> str:
    return words[(words.index(word) + offset) % len(words)]


def _wordfacts_example(rng: random.Random) -> Example:
    """One-word answers: calendar offsets, opposites, next letters, small sums written as words."""
    kind = rng.randrange(5)
    if kind == 0:
        day, n = rng.choice(DAYS), rng.randint(1, 3)
        after = rng.random() < 0.5
        text = rng.choice(["What day comes {n} day{p} {rel} {d}?", "Which day of the week is {n} day{p} {rel} {d}?",
                           "If today is {D}, what day was it {n} day{p} {ago}?"])
        rel, ago = ("after", "from now") if after else ("before", "ago")
        prompt = text.format(n=NUMBER_WORDS[n], p="s" if n > 1 else "", rel=rel, d=day.capitalize(), D=day.capitalize(),
                             ago="later" if after else "ago").replace("what day was it", "what day is it" if after else "what day was it")
        return Example(prompt, _shift(DAYS, day, n if after else -n))
    if kind == 1:
        month, after = rng.choice(MONTHS), rng.random() < 0.5
        text = rng.choice(["Which month comes {rel} {m}?", "What month is just {rel} {m}?", "Name the month {rel} {m}."])
        return Example(text.format(rel="after" if after else "before", m=month.capitalize()),
                       _shift(MONTHS, month, 1 if after else -1))
    if kind == 2:
        pair = rng.choice(OPPOSITES)
        word, answer = pair if rng.random() < 0.5 else pair[::-1]
        text = rng.choice(["What is the opposite of '{w}'?", "Give the antonym of '{w}'.", "Which word means the opposite of '{w}'?"])
        return Example(text.format(w=word), answer)
    if kind == 3:
        index, after = rng.randrange(1, 25), rng.random() < 0.5
        letter = "abcdefghijklmnopqrstuvwxyz"[index]
        text = rng.choice(["Which letter comes {rel} '{l}' in the alphabet?", "What letter is just {rel} '{l}'?"])
        return Example(text.format(rel="after" if after else "before", l=letter),
                       "abcdefghijklmnopqrstuvwxyz"[index + (1 if after else -1)])
    a, b = rng.randint(0, 6), rng.randint(0, 6)
    text = rng.choice(["What is {a} plus {b}? Answer in words.", "Write {a} plus {b} as a word.", "How much is {a} and {b}, in words?"])
    return Example(text.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), NUMBER_WORDS[a + b])


def _first_word(text: str) -> str:
    """The first word of the first line, lowercased, without punctuation ("Wednesday." -> "wednesday")."""
    match = re.search(r"[a-z]+", _first_line(text))
    return match.group(0) if match else ""


TASKS: dict[str, Task] = {
    "addition": Task(
        name="addition",
        system_prompt="Solve the word problem. Reply with the number only.",
        generate=_addition_example,
        normalize=_first_integer,
    ),
    "arithmetic": Task(
        name="arithmetic",
        system_prompt="Solve the word problem. Reply with the number only.",
        generate=_arithmetic_example,
        normalize=_first_integer,
    ),
    "wordfacts": Task(
        name="wordfacts",
        system_prompt="Answer with a single lowercase word only.",
        generate=_wordfacts_example,
        normalize=_first_word,
    ),
}


def make_task_data(task: str = "addition", n_train: int = 1000, n_calibration: int = 64, n_test: int = 100,
                   seed: int = 0) -> TaskData:
    """Seeded, disjoint train / test splits of a built-in task; calibration is a subset of train."""
    if task not in TASKS:
        raise EmlocError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} or pass --data FILE.jsonl")
    spec = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    for _ in range(50 * (n_train + n_test)):
        example = spec.generate(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
        if len(examples) == n_train + n_test:
            break
    test, train = examples[:n_test], examples[n_test:]
    return TaskData(spec, train, _calibration_subset(train, n_calibration, seed), test, {"task": task, "seed": seed})


def _calibration_subset(train: list[Example], n_calibration: int, seed: int) -> list[Example]:
    rng = random.Random(f"calibration-{seed}")
    return rng.sample(train, min(n_calibration, len(train)))


# ---- user data --------------------------------------------------------------------------------

USER_TASK = Task(name="user", system_prompt="", generate=None, normalize=_first_line)


def read_examples(path: str | Path) -> list[Example]:
    """Read ``prompt``/``response`` records from a .jsonl or .csv file (UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"data file {path} does not exist: check the path given to --data")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EmlocError(f"data file {path} is not UTF-8 text: re-save it as UTF-8") from None
    if not text.strip():
        raise EmlocError(f"data file {path} is empty: it needs one prompt/response record per line")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(text, path)
    elif suffix == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        raise EmlocError(f"data file {path} has suffix {suffix!r}: use .jsonl or .csv")
    return [_to_example(record, path, number) for number, record in enumerate(records, start=1)]


def _jsonl_records(text: str, path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EmlocError(f"{path} line {number} is not valid JSON ({exc.msg}): fix or remove that line") from None
    return records


def _to_example(record, path: Path, number: int) -> Example:
    if not isinstance(record, dict) or "prompt" not in record or "response" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise EmlocError(f"{path} record {number} lacks 'prompt' and 'response' fields (has {keys}): rename its fields")
    prompt, response = record["prompt"], record["response"]
    if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
        raise EmlocError(f"{path} record {number} has an empty or non-text prompt/response: fix that record")
    return Example(prompt, response)


def load_user_data(path: str | Path, n_calibration: int = 64, n_test: int = 100, seed: int = 0,
                   n_train: int | None = None) -> TaskData:
    """Shuffle the file's records with ``seed``; hold out ``n_test`` (at most a fifth) for testing."""
    examples = read_examples(path)
    if len(examples) < 2:
        raise EmlocError(f"data file {path} has {len(examples)} record(s): it needs at least 2 (train and test)")
    rng = random.Random(f"user-{seed}")
    shuffled = rng.sample(examples, len(examples))
    n_test = max(1, min(n_test, len(shuffled) // 5))
    test, train = shuffled[:n_test], shuffled[n_test:]
    train = train[:n_train] if n_train else train
    return TaskData(USER_TASK, train, _calibration_subset(train, n_calibration, seed), test, {"path": str(path), "seed": seed})


# ---- tokenisation -----------------------------------------------------------------------------

def prompt_text(tokenizer, task: Task, prompt: str) -> str:
    """The generation prompt, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{task.system_prompt}\n\n" if task.system_prompt else ""
    return f"{prefix}Question: {prompt}\nAnswer: "


def response_text(tokenizer, task: Task, example: Example) -> str:
    """What follows the prompt in a finished conversation (the response and its end-of-turn tokens)."""
    prompt = prompt_text(tokenizer, task, example.prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt else [])
        messages += [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    return example.response + (tokenizer.eos_token or "")


def encode_example(tokenizer, task: Task, example: Example, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` with the prompt masked (``-100``); the prompt is cut from the left."""
    prompt_ids = tokenizer(prompt_text(tokenizer, task, example.prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response_text(tokenizer, task, example), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[:max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_examples(tokenizer, task: Task, examples: list[Example], max_length: int) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, task, example, max_length) for example in examples]


def pad_batch(features: list[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``labels`` when present) to one length; returns tensors with ``attention_mask``."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        n_pad = width - len(feature["input_ids"])
        ids, mask = feature["input_ids"], [1] * len(feature["input_ids"])
        labels = feature.get("labels", [IGNORE_INDEX] * len(ids))
        pad = lambda seq, value: ([value] * n_pad + seq) if padding_side == "left" else (seq + [value] * n_pad)
        batch["input_ids"].append(pad(ids, pad_token_id))
        batch["attention_mask"].append(pad(mask, 0))
        batch["labels"].append(pad(labels, IGNORE_INDEX))
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if not any("labels" in f for f in features):
        tensors.pop("labels")
    return tensors


def response_window_batch(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch whose logits are computed only where the loss is taken.

    With left padding every response ends at the right edge, so the last ``k`` positions (``k`` = longest
    response + 1) hold every labelled token: the model gets ``logits_to_keep=k`` and ``labels`` cut to
    the same window, and skips the LM head (a large share of a small model's compute) on the prompt.
    """
    batch = pad_batch(features, pad_token_id, padding_side="left")
    labelled = (batch["labels"] != IGNORE_INDEX).int()
    first_labelled = torch.where(labelled.any(1), labelled.argmax(1), torch.full_like(labelled[:, 0], batch["labels"].shape[1]))
    window = int(batch["labels"].shape[1] - first_labelled.min()) + 1
    window = min(window, batch["labels"].shape[1])
    batch["labels"] = batch["labels"][:, -window:]
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    batch["logits_to_keep"] = window
    return batch


class PaddingCollator:
    """A picklable collator for ``transformers.Trainer`` (see :func:`response_window_batch`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return response_window_batch(features, self.pad_token_id)


def load_task_data(data_config, seed: int) -> TaskData:
    """The splits a run uses: the user's file when ``data_config.path`` is set, else a built-in task."""
    if data_config.path:
        return load_user_data(data_config.path, data_config.n_calibration, data_config.n_test, seed, data_config.n_train)
    return make_task_data(data_config.task, data_config.n_train, data_config.n_calibration, data_config.n_test, seed)
