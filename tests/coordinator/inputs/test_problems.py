import json

from cord.common.config import InputSpec
from cord.coordinator.inputs.problems import Checked, check_line, default_id, parse_line
from cord.coordinator.inputs.sources import read_problems


def write(tmp_path, data: bytes):
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    return path


def test_valid_file_with_alias_default_id_and_extra_fields(tmp_path):
    rows = [
        {"id": "p1", "question": "What is 1 + 2?", "answer": "3", "source": "lab"},
        {"problem": "What is 2 + 2?", "answer": "4"},
    ]
    problems, errors = read_problems(write(tmp_path, "\n".join(map(json.dumps, rows)).encode()))
    assert errors == []
    assert [p.id for p in problems] == ["p1", default_id("What is 2 + 2?")]
    assert problems[0].meta == {"source": "lab"}
    assert problems[1].question == "What is 2 + 2?" and problems[1].answer == "4"


def test_every_bad_line_is_named(tmp_path):
    lines = [
        b'{"question": "q1", "answer": "1"}',
        b"not json",
        b"[1, 2]",
        b'{"answer": "2"}',
        b'{"question": "  ", "answer": "3"}',
        b'{"question": "q5", "answer": null}',
        b'{"question": "q6", "answer": "6", "id": "dup"}',
        b'{"question": "q7", "answer": "7", "id": "dup"}',
        b'{"question": "caf\xe9", "answer": "8"}',
        b'{"question": 12, "answer": "12"}',
        b'{"question": "q12", "answer": 4}',
        b'{"question": "q13", "answer": "13", "id": true}',
        b'{"question": "q10", "answer": "1',
    ]
    problems, errors = read_problems(write(tmp_path, b"\n".join(lines)))
    assert [p.id for p in problems] == [default_id("q1"), "dup"]
    found = {(e.line, e.field) for e in errors}
    assert found == {
        (2, None),
        (3, None),
        (4, "question"),
        (5, "question"),
        (6, "answer"),
        (8, "id"),
        (9, None),
        (10, "question"),
        (11, "answer"),
        (12, "id"),
        (13, None),
    }
    by_line = {e.line: str(e) for e in errors}
    assert "not valid JSON" in by_line[2]
    assert "not an object" in by_line[3]
    assert "missing" in by_line[4] and "add a `question` (or `problem`) string" in by_line[4]
    assert "with --question-field" in by_line[4]
    assert "empty" in by_line[5]
    assert "must be text, got null" in by_line[6]
    # Question and answer must be text: a number is refused, with the string to write.
    assert "must be text, got int" in by_line[10] and '`"12"`, not `12`' in by_line[10]
    assert "must be text, got int" in by_line[11] and '`"4"`, not `4`' in by_line[11]
    assert "must be a non-empty string or integer" in by_line[12]
    assert "duplicate id 'dup' (first on line 7)" in by_line[8]
    assert "invalid UTF-8" in by_line[9]
    assert "truncated last line" in by_line[13]


def test_empty_file(tmp_path):
    problems, errors = read_problems(write(tmp_path, b"\n\n"))
    assert problems == [] and len(errors) == 1 and "empty" in str(errors[0])


def test_stored_form_is_the_models_json():
    """`Checked.stored` is built without the model; it must be what the model writes."""
    rows = [
        {"id": 7, "question": "12", "answer": "3.5"},
        {"question": "é ✓ \u2028 <b>&", "answer": " 4 ", "source": "lab", "n": 10**30},
        {
            "question": "q",
            "answer": "a",
            "x": [1, None, True, {"f": 1.5e-7, "g": -0.0, "h": 1e16}],
            "nan": float("nan"),
            "inf": float("-inf"),
            "emoji": "\U0001f600",
        },
    ]
    for i, data in enumerate(rows, start=1):
        checked = check_line(json.dumps(data), i)
        assert isinstance(checked, Checked)
        problem, err = parse_line(json.dumps(data), i)
        assert err is None and problem == checked.problem()
        assert checked.stored == problem.model_dump_json().encode()


def test_unpaired_surrogate_is_a_bad_line(tmp_path):
    # Valid JSON, but no UTF-8 holds the text: once it passed, then failed to enqueue.
    lines = [b'{"question": "q1", "answer": "1"}', b'{"question": "q\\ud800", "answer": "2"}']
    problems, errors = read_problems(write(tmp_path, b"\n".join(lines)))
    assert len(problems) == 1
    assert [(e.line, e.field) for e in errors] == [(2, "question")]
    assert "without its pair" in errors[0].problem


def test_only_a_last_line_without_newline_is_truncated(tmp_path):
    _, errors = read_problems(write(tmp_path, b'{"question": "q1", "answer": "1"}\n{"q\n'))
    assert [e.line for e in errors] == [2] and "not valid JSON" in errors[0].problem
    _, errors = read_problems(write(tmp_path, b'{"question": "q1", "answer": "1"}\n{"q'))
    assert "truncated last line" in errors[0].problem


def test_numbers_as_answers_are_text_only_when_asked(tmp_path):
    lines = [
        b'{"id": "a", "question": "q1", "answer": 72}',
        b'{"id": "b", "question": "q2", "answer": 72.0}',
        b'{"id": "c", "question": "q3", "answer": 0.5}',
        b'{"id": "d", "question": "q4", "answer": NaN}',
        b'{"id": "e", "question": 5, "answer": "5"}',
    ]
    path = write(tmp_path, b"\n".join(lines))
    problems, errors = read_problems(path)
    assert problems == [] and [e.line for e in errors] == [1, 2, 3, 4, 5]
    assert "or pass --answers-as-text" in str(errors[0])
    assert "--answers-as-text" not in str(errors[4])  # the question: text only, always
    problems, errors = read_problems(path, InputSpec(answers_as_text=True))
    assert [(p.id, p.answer) for p in problems] == [("a", "72"), ("b", "72"), ("c", "0.5")]
    assert [(e.line, e.field) for e in errors] == [(4, "answer"), (5, "question")]
