"""User data: ``prompt``/``response`` records from JSONL or CSV files, and the splits a run uses."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from emloc.data.tasks import Example, Task, TaskData, calibration_subset, first_line, make_task_data
from emloc.errors import EmlocError

USER_TASK = Task(name="user", system_prompt="", generate=None, normalize=first_line)


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
    return TaskData(USER_TASK, train, calibration_subset(train, n_calibration, seed), test, {"path": str(path), "seed": seed})


def load_task_data(data_config, seed: int) -> TaskData:
    """The splits a run uses: the user's file when ``data_config.path`` is set, else a built-in task."""
    if data_config.path:
        return load_user_data(data_config.path, data_config.n_calibration, data_config.n_test, seed, data_config.n_train)
    return make_task_data(data_config.task, data_config.n_train, data_config.n_calibration, data_config.n_test, seed)
