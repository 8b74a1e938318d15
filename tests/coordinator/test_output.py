import json

from cord.coordinator.output import JsonlWriter, repair_torn_tail
from tests.coordinator.conftest import failure_row, trace_row


def test_rows_append_whole_and_ids_read_back(tmp_path):
    w = JsonlWriter(tmp_path)
    trace = trace_row("a", x="ü")
    assert w.write_once(trace)
    assert w.write_once(failure_row("b"))
    lines = w.traces.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [trace.model_dump(mode="json")]
    assert json.loads(lines[0])["x"] == "ü" and "\\u" not in lines[0]  # UTF-8, not escapes
    assert w.written_ids() == ({"a"}, {"b"})


def test_torn_last_line_is_cut_on_open(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "ste')
    w = JsonlWriter(tmp_path)
    assert path.read_text() == '{"id": "a"}\n'
    assert w.written_ids() == ({"a"}, set())
    assert repair_torn_tail(path) is False


def test_the_folder_and_both_files_come_with_the_first_row(tmp_path):
    out = tmp_path / "out"
    w = JsonlWriter(out)
    assert not out.exists() and w.written_ids() == (set(), set())  # nothing to do, nothing made
    assert w.write_once(trace_row("a"))
    assert w.failed.exists() and w.failed.read_text() == ""
    assert w.written_ids() == ({"a"}, set())


def test_a_row_is_never_written_twice_whoever_wrote_it_first(tmp_path):
    """Two coordinators on one folder: what one wrote, the other's index reads on from
    where it stopped, and neither writes a second row for the id, of either kind."""
    first, second = JsonlWriter(tmp_path), JsonlWriter(tmp_path)
    assert first.write_once(trace_row("a"))
    assert second.written("a") is False  # a trace, written by the other
    assert not second.write_once(trace_row("a"))
    assert not second.write_once(failure_row("a"))
    assert second.write_once(failure_row("b"))
    assert first.written("b") is True and first.written("c") is None
    assert not first.write_once(trace_row("b"))
    assert [json.loads(x)["id"] for x in first.traces.read_text().splitlines()] == ["a"]
    assert [json.loads(x)["id"] for x in first.failed.read_text().splitlines()] == ["b"]


def test_the_index_reads_a_line_only_once_it_is_whole(tmp_path):
    w = JsonlWriter(tmp_path)
    assert w.write_once(trace_row("a"))
    line = trace_row("b").model_dump_json()
    with open(w.traces, "a") as f:  # another writer, mid-line
        f.write(line[:10])
    assert w.written("b") is None
    with open(w.traces, "a") as f:
        f.write(line[10:] + "\n")
    assert w.written("b") is False and w.written_ids() == ({"a", "b"}, set())
