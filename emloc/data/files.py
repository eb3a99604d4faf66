"""User data: ``prompt``/``response`` records from JSONL or CSV files, and the splits a run uses."""
from __future__ import annotations

import codecs
import csv
import io
import json
import random
from pathlib import Path

from emloc.data.tasks import Example, Task, TaskData, calibration_subset, first_line, make_task_data
from emloc.errors import EmlocError

USER_TASK = Task(name="user", system_prompt="", generate=None, normalize=first_line)


def read_examples(path: str | Path) -> list[Example]:
    """Read ``prompt``/``response`` records from a .jsonl or .csv file.

    Accepts what common tools write: UTF-8 with or without a byte order mark, LF or CRLF line ends, blank
    lines, and CSV separated by ``,``, ``;`` or tabs (sniffed from the header) with quoted, also multi-line,
    fields. Refuses, in one line naming the file and the line, what is really broken: invalid JSON, a record
    without both fields, a binary file, text that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"data file {path} does not exist: check the path given to --data")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise EmlocError(f"data file {path} has suffix {suffix!r}: use .jsonl or .csv")
    text = _read_text(path)
    if not text.strip():
        raise EmlocError(f"data file {path} is empty: it needs one prompt/response record per line")
    records = _jsonl_records(text, path) if suffix == ".jsonl" else _csv_records(text, path)
    return [_to_example(record, path, number, line) for number, (line, record) in enumerate(records, start=1)]


def _read_text(path: Path) -> str:
    """The file's text as UTF-8 (a byte order mark dropped), with ``\n`` line ends."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise EmlocError(f"data file {path} is UTF-16 text, not UTF-8: re-save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise EmlocError(f"data file {path} is not UTF-8 text (line {line}, byte 0x{raw[exc.start]:02x}): "
                         f"re-save it as UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise EmlocError(f"data file {path} is binary, not text (a NUL byte on line {line}): "
                         f"give a JSONL or CSV text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_records(text: str, path: Path) -> list[tuple[int, object]]:
    """``(line number, parsed JSON)`` per non-blank line."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise EmlocError(f"{path} line {number} is not valid JSON ({exc.msg}): "
                             f"fix or remove that line") from None
    return records


def _csv_records(text: str, path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` per non-blank row; the separator is sniffed from the header line."""
    lines = text.split("\n")
    skipped = next(i for i, line in enumerate(lines) if line.strip())  # blank lines above the header
    try:
        delimiter = csv.Sniffer().sniff(lines[skipped], delimiters=",;\t").delimiter
    except csv.Error:
        delimiter = ","  # one column: the field check below names what is missing
    reader = csv.DictReader(io.StringIO("\n".join(lines[skipped:]), newline=""), delimiter=delimiter)
    records = []
    try:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            if all(value is None or (isinstance(value, str) and not value.strip()) for value in row.values()):
                continue  # a blank row, e.g. ",," at the end of a spreadsheet export
            records.append((skipped + reader.line_num, row))
    except csv.Error as exc:
        raise EmlocError(f"{path} line {skipped + reader.line_num} is not valid CSV ({exc}): "
                         f"fix that line") from None
    return records


def _to_example(record, path: Path, number: int, line: int) -> Example:
    if not isinstance(record, dict) or "prompt" not in record or "response" not in record:
        keys = (sorted(k for k in record if isinstance(k, str)) if isinstance(record, dict)
                else type(record).__name__)
        raise EmlocError(f"{path} line {line}: record {number} lacks 'prompt' and 'response' fields "
                         f"(has {keys}): rename its fields")
    prompt, response = record["prompt"], record["response"]
    if (not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip()
            or not response.strip()):
        raise EmlocError(f"{path} line {line}: record {number} has an empty or non-text prompt/response: "
                         f"fix that record")
    return Example(prompt, response)


def load_user_data(path: str | Path, n_calibration: int = 64, n_test: int = 100, seed: int = 0,
                   n_train: int | None = None, keep_duplicates: bool = False) -> TaskData:
    """Shuffle the file's records with ``seed``; hold out ``n_test`` (at most a fifth) for testing.

    Exact duplicate records, and test records whose prompt also occurs in the training split (and so in the
    calibration subset), are removed unless ``keep_duplicates``; ``source`` records how many there were.
    """
    examples = read_examples(path)
    duplicates = len(examples) - len(set(examples))
    if not keep_duplicates:
        examples = list(dict.fromkeys(examples))
    if len(examples) < 2:
        distinct = f" ({duplicates} exact duplicate(s) removed)" if duplicates and not keep_duplicates else ""
        raise EmlocError(f"data file {path} has {len(examples)} record(s){distinct}: "
                         f"it needs at least 2 distinct ones (train and test)")
    rng = random.Random(f"user-{seed}")
    shuffled = rng.sample(examples, len(examples))
    n_test = max(1, min(n_test, len(shuffled) // 5))
    test, train = shuffled[:n_test], shuffled[n_test:]
    train = train[:n_train] if n_train else train
    trained_prompts = {example.prompt for example in train}
    overlap = sum(example.prompt in trained_prompts for example in test)
    if not keep_duplicates:
        test = [example for example in test if example.prompt not in trained_prompts]
    if not test:
        raise EmlocError(f"data file {path}: every test record's prompt also occurs in training: "
                         f"give more distinct prompts (or set data.keep_duplicates to test on them anyway)")
    hygiene = {"duplicates": duplicates, "test_overlap": overlap, "removed": not keep_duplicates}
    return TaskData(USER_TASK, train, calibration_subset(train, n_calibration, seed), test,
                    {"path": str(path), "seed": seed, "hygiene": hygiene})


def load_task_data(data_config, seed: int) -> TaskData:
    """The splits a run uses: the user's file when ``data_config.path`` is set, else a built-in task."""
    if data_config.path:
        return load_user_data(data_config.path, data_config.n_calibration, data_config.n_test, seed,
                              data_config.n_train, data_config.keep_duplicates)
    return make_task_data(data_config.task, data_config.n_train, data_config.n_calibration,
                          data_config.n_test, seed)
