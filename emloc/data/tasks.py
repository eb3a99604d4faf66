"""Built-in tasks: seeded generators, :class:`Task`, :class:`TaskData` and answer checking.

An :class:`Example` is a ``prompt`` and a ``response``; a :class:`TaskData` has train, calibration
and test splits plus the task's answer checker.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from emloc.errors import EmlocError


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

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Mia",
         "Noah"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "stamps", "cookies"]


ADDITION_TEMPLATES = [
    "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
    "{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} in total?",
    "A shelf holds {a} {item} and a box holds {b} {item}. How many {item} are there altogether?",
    "{name} found {a} {item}, then a friend gave {name} {b} more. How many {item} does {name} have?",
    "There are {a} red {item} and {b} blue {item}. How many {item} are there?",
]


def _addition_example(rng: random.Random) -> Example:
    """Two-digit addition in several phrasings: learnable by a 135M model in ~100 LoRA steps."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(rng.choice(ADDITION_TEMPLATES).format(name=name, item=item, a=a, b=b), str(a + b))


def _arithmetic_example(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    kind = rng.randrange(5)
    if kind == 0:
        return Example(ADDITION_TEMPLATES[0].format(name=name, item=item, a=a, b=b), str(a + b))
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return Example(f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?",
                       str(a - b))
    if kind == 2:
        return Example(ADDITION_TEMPLATES[1].format(name=name, item=item, a=a, b=b), str(a + b))
    if kind == 3:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        return Example(f"There are {x} boxes with {y} {item} in each box. How many {item} are there?",
                       str(x * y))
    c = rng.randint(1, min(a + b - 1, 30))
    return Example(f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?",
                   str(a + b - c))


def _first_integer(text: str) -> str:
    match = re.search(r"-?\d+", text.replace(",", ""))
    return match.group(0).lstrip("0") or "0" if match else text.strip().lower()


def first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip().rstrip(".").lower() if text.strip() else ""


DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
             ("open", "closed"), ("light", "dark"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("old", "new"), ("wet", "dry"),
             ("rich", "poor"), ("tall", "short"), ("strong", "weak"), ("loud", "quiet"), ("thick", "thin"),
             ("clean", "dirty"), ("cheap", "expensive"), ("win", "lose"), ("push", "pull"), ("day", "night"),
             ("inside", "outside"), ("first", "last"), ("true", "false"), ("buy", "sell"), ("give", "take"),
             ("above", "below"), ("friend", "enemy"), ("begin", "end")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


def _shift(words: list[str], word: str, offset: int) -> str:
    return words[(words.index(word) + offset) % len(words)]


def _wordfacts_example(rng: random.Random) -> Example:
    """One-word answers: calendar offsets, opposites, next letters, small sums written as words."""
    kind = rng.randrange(5)
    if kind == 0:
        day, n = rng.choice(DAYS), rng.randint(1, 3)
        after = rng.random() < 0.5
        text = rng.choice(["What day comes {n} day{p} {rel} {d}?",
                           "Which day of the week is {n} day{p} {rel} {d}?",
                           "If today is {D}, what day was it {n} day{p} {ago}?"])
        rel, ago = ("after", "from now") if after else ("before", "ago")
        prompt = text.format(n=NUMBER_WORDS[n], p="s" if n > 1 else "", rel=rel, d=day.capitalize(),
                             D=day.capitalize(),
                             ago="later" if after else "ago").replace("what day was it",
                                                                      "what day is it" if after
                                                                      else "what day was it")
        return Example(prompt, _shift(DAYS, day, n if after else -n))
    if kind == 1:
        month, after = rng.choice(MONTHS), rng.random() < 0.5
        text = rng.choice(["Which month comes {rel} {m}?", "What month is just {rel} {m}?",
                           "Name the month {rel} {m}."])
        return Example(text.format(rel="after" if after else "before", m=month.capitalize()),
                       _shift(MONTHS, month, 1 if after else -1))
    if kind == 2:
        pair = rng.choice(OPPOSITES)
        word, answer = pair if rng.random() < 0.5 else pair[::-1]
        text = rng.choice(["What is the opposite of '{w}'?", "Give the antonym of '{w}'.",
                           "Which word means the opposite of '{w}'?"])
        return Example(text.format(w=word), answer)
    if kind == 3:
        index, after = rng.randrange(1, 25), rng.random() < 0.5
        letter = "abcdefghijklmnopqrstuvwxyz"[index]
        text = rng.choice(["Which letter comes {rel} '{l}' in the alphabet?",
                           "What letter is just {rel} '{l}'?"])
        return Example(text.format(rel="after" if after else "before", l=letter),
                       "abcdefghijklmnopqrstuvwxyz"[index + (1 if after else -1)])
    a, b = rng.randint(0, 6), rng.randint(0, 6)
    text = rng.choice(["What is {a} plus {b}? Answer in words.", "Write {a} plus {b} as a word.",
                       "How much is {a} and {b}, in words?"])
    return Example(text.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), NUMBER_WORDS[a + b])


def _first_word(text: str) -> str:
    """The first word of the first line, lowercased, without punctuation ("Wednesday." -> "wednesday")."""
    match = re.search(r"[a-z]+", first_line(text))
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
    return TaskData(spec, train, calibration_subset(train, n_calibration, seed), test,
                    {"task": task, "seed": seed})


def calibration_subset(train: list[Example], n_calibration: int, seed: int) -> list[Example]:
    """A seeded sample of ``n_calibration`` training examples (all of them when there are fewer)."""
    rng = random.Random(f"calibration-{seed}")
    return rng.sample(train, min(n_calibration, len(train)))
