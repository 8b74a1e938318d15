import json

from cord.common.problems import default_id, read_problems


def write(tmp_path, data: bytes):
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    return path


def test_valid_file_with_alias_default_id_and_extra_fields(tmp_path):
    rows = [
        {"id": "p1", "question": "What is 1 + 2?", "answer": "3", "source": "lab"},
        {"problem": "What is 2 + 2?", "answer": 4},
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
        (10, None),
    }
    by_line = {e.line: str(e) for e in errors}
    assert "not valid JSON" in by_line[2]
    assert "not an object" in by_line[3]
    assert "missing" in by_line[4] and "add a `question`" in by_line[4]
    assert "empty" in by_line[5]
    assert "must be a string, got null" in by_line[6]
    assert "duplicate id 'dup' (first on line 7)" in by_line[8]
    assert "invalid UTF-8" in by_line[9]
    assert "truncated last line" in by_line[10]


def test_empty_file(tmp_path):
    problems, errors = read_problems(write(tmp_path, b"\n\n"))
    assert problems == [] and len(errors) == 1 and "empty" in str(errors[0])
