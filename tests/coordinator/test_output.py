import json

from cord.coordinator.output import JsonlWriter, read_ids, repair_torn_tail
from tests.coordinator.conftest import failure_row, trace_row


def test_rows_append_whole_and_ids_read_back(tmp_path):
    w = JsonlWriter(tmp_path)
    trace = trace_row("a", x="ü")
    w.write(trace)
    w.write(failure_row("b"))
    lines = w.traces.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [trace.model_dump(mode="json")]
    assert json.loads(lines[0])["x"] == "ü" and "\\u" not in lines[0]  # UTF-8, not escapes
    assert w.written_ids() == ({"a"}, {"b"})


def test_torn_last_line_is_cut_on_open(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "ste')
    JsonlWriter(tmp_path)
    assert path.read_text() == '{"id": "a"}\n'
    assert read_ids(path) == {"a"}
    assert repair_torn_tail(path) is False


def test_the_folder_and_both_files_come_with_the_first_row(tmp_path):
    out = tmp_path / "out"
    w = JsonlWriter(out)
    assert not out.exists() and w.written_ids() == (set(), set())  # nothing to do, nothing made
    w.write(trace_row("a"))
    assert w.failed.exists() and w.failed.read_text() == ""
    assert w.written_ids() == ({"a"}, set())
