"""Task data: deterministic splits, response-only labels, user files, the response window batch."""
import json

import pytest
import torch

from emloc.data import (IGNORE_INDEX, TASKS, encode_example, load_user_data, make_task_data, pad_batch,
                        response_window_batch)
from emloc.errors import EmlocError


def test_builtin_task_is_seeded_and_splits_are_disjoint():
    a = make_task_data("arithmetic", n_train=200, n_calibration=16, n_test=50, seed=3)
    b = make_task_data("arithmetic", n_train=200, n_calibration=16, n_test=50, seed=3)
    c = make_task_data("arithmetic", n_train=200, n_calibration=16, n_test=50, seed=4)
    assert a.train == b.train and a.test == b.test and a.calibration == b.calibration
    assert a.test != c.test
    assert not {e.prompt for e in a.test} & {e.prompt for e in a.train}
    assert set(a.calibration) <= set(a.train) and len(a.calibration) == 16
    assert all(e.response.isdigit() for e in a.train)
    assert a.is_correct("The answer is 0" + a.test[0].response, a.test[0])


def test_labels_cover_the_response_only(tokenizer):
    data = make_task_data(n_train=5, n_test=1)
    example = data.train[0]
    encoded = encode_example(tokenizer, data.task, example, max_length=128)
    labelled = [t for t, l in zip(encoded["input_ids"], encoded["labels"]) if l != IGNORE_INDEX]
    assert tokenizer.decode(labelled).startswith(example.response)
    assert encoded["labels"][0] == IGNORE_INDEX
    assert "assistant" in tokenizer.decode(encoded["input_ids"][: encoded["labels"].index(labelled[0])])


def test_response_window_gives_the_same_loss_as_the_full_batch(tiny_model, tokenizer):
    data = make_task_data(n_train=8, n_test=1)
    features = [encode_example(tokenizer, data.task, e, 96) for e in data.train]
    with torch.no_grad():
        full = tiny_model(**pad_batch(features, tokenizer.pad_token_id)).loss
        window = tiny_model(**response_window_batch(features, tokenizer.pad_token_id)).loss
    assert torch.allclose(full, window, atol=1e-5)


def test_user_jsonl_and_csv(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\n" + "\n".join(f"{r['prompt']},{r['response']}" for r in rows), encoding="utf-8")
    for path in (jsonl, csv):
        data = load_user_data(path, n_calibration=4, n_test=3, seed=0)
        assert len(data.test) == 3 and len(data.train) == 17 and len(data.calibration) == 4
        assert data.is_correct("A5.\nmore", type(data.test[0])("q", "a5"))


def test_bad_user_data_gives_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n', encoding="utf-8")
    with pytest.raises(EmlocError, match="lacks 'prompt' and 'response'"):
        load_user_data(bad)
    with pytest.raises(EmlocError, match="unknown task"):
        make_task_data("nope")
    assert "arithmetic" in TASKS


# ---- what common tools write (accepted) and what is really broken (refused, naming the line) ----------------

ROWS = [("what is 1+1", "2"), ("what is 2+2", "4"), ("name a colour", "red")]


def _examples(path):
    from emloc.data import read_examples
    return [(e.prompt, e.response) for e in read_examples(path)]


@pytest.mark.parametrize("name,raw", [
    ("bom.jsonl", b"\xef\xbb\xbf" + b"".join(json.dumps({"prompt": p, "response": r}).encode() + b"\n" for p, r in ROWS)),
    ("crlf_blank.jsonl", b"\r\n".join([b""] + [json.dumps({"prompt": p, "response": r}).encode() + b"\r\n" for p, r in ROWS])),
    ("bom_crlf.csv", b"\xef\xbb\xbfprompt,response\r\n" + b"".join(f"{p},{r}\r\n".encode() for p, r in ROWS)),
    ("semicolon.csv", b"prompt;response\n" + b"".join(f"{p};{r}\n".encode() for p, r in ROWS)),
    ("tabs.csv", b"prompt\tresponse\n" + b"".join(f"{p}\t{r}\n".encode() for p, r in ROWS)),
    ("blank_rows.csv", b"\nprompt,response\n\n" + b"".join(f"{p},{r}\n,\n".encode() for p, r in ROWS)),
])
def test_loader_accepts_what_common_tools_write(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    assert _examples(path) == ROWS


def test_csv_quoted_fields_keep_separators_and_line_breaks(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_bytes(b'prompt;response\r\n"Add 2; then 3.\r\nWhat is it?";5\r\n"say ""hi""";hi\r\nplain;row\r\n')
    assert _examples(path) == [("Add 2; then 3.\nWhat is it?", "5"), ('say "hi"', "hi"), ("plain", "row")]


@pytest.mark.parametrize("name,raw,message", [
    ("bad.jsonl", b'{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "a",\r\n', r"bad.jsonl line 3 is not valid JSON"),
    ("keys.jsonl", b'\n{"question": "a", "answer": "b"}\n', r"keys.jsonl line 2: record 1 lacks 'prompt' and 'response'"),
    ("short.csv", b'prompt,response\n"two\nlines",2\nno answer\n', r"short.csv line 4: record 2 has an empty"),
    ("latin1.csv", "prompt,response\ncafé,1\n".encode("latin-1"), r"latin1.csv is not UTF-8 text \(line 2, byte 0xe9\)"),
    ("utf16.jsonl", '{"prompt": "a", "response": "b"}\n'.encode("utf-16"), r"utf16.jsonl is UTF-16 text, not UTF-8"),
    ("binary.jsonl", b'{"prompt": "a", "response": "b"}\n\x00\x01\x02', r"binary.jsonl is binary, not text \(a NUL byte on line 2\)"),
])
def test_loader_refuses_broken_files_naming_the_line(tmp_path, name, raw, message):
    from emloc.data import read_examples
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(EmlocError, match=message) as error:
        read_examples(path)
    assert "\n" not in str(error.value)
