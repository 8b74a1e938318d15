"""cord-spot-watch against a local metadata server that emulates AWS IMDSv2 and the GCE
metadata service: no notice first, then a notice. The watched worker is a real child
process that records when SIGTERM reaches it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from cord.workers.spot import detect, main

TOKEN = "test-token"

CHILD = """
import pathlib, signal, sys, time
out, ready, code = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
def on_term(*_):
    out.write_text(repr(time.time()))
    sys.exit(code)
signal.signal(signal.SIGTERM, on_term)
ready.write_text("ready")
while True:
    time.sleep(0.02)
"""


class Metadata:
    """The fake metadata service's state, shared with its request handler."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.notice = threading.Event()
        self.polls = 0
        self.bad_requests: list[str] = []


def _handler(md: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            if md.flavour == "aws" and self.path == "/latest/api/token":
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    md.bad_requests.append("token PUT without a TTL header")
                    return self._send(400)
                return self._send(200, TOKEN)
            self._send(404)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if md.flavour == "aws" and url.path == "/latest/meta-data/spot/instance-action":
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    md.bad_requests.append("instance-action without the token")
                    return self._send(401)
                md.polls += 1
                if md.notice.is_set():
                    body = '{"action": "terminate", "time": "2026-12-01T08:22:00Z"}'
                    return self._send(200, body)
                return self._send(404, "Not Found")
            if md.flavour == "gcp" and url.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    md.bad_requests.append("preempted without Metadata-Flavor")
                    return self._send(403)
                md.polls += 1
                query = parse_qs(url.query)
                if query.get("wait_for_change") == ["true"] and not md.notice.is_set():
                    # Like the real server: hold the request until the value changes.
                    md.notice.wait(float(query.get("timeout_sec", ["60"])[0]))
                value = "TRUE" if md.notice.is_set() else "FALSE"
                flavour = {"Metadata-Flavor": "Google", "ETag": f"etag-{value}"}
                return self._send(200, value, flavour)
            self._send(404)

    return Handler


@pytest.fixture(params=["aws", "gcp"])
def metadata(request: pytest.FixtureRequest) -> Iterator[tuple[Metadata, str]]:
    md = Metadata(request.param)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(md))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield md, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        md.notice.set()  # release any held long poll
        server.shutdown()
        server.server_close()


def _wait_for(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _start_watch(
    tmp_path: Path, url: str, *extra: str, child_code: int = 0
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out, ready = tmp_path / "got-sigterm", tmp_path / "ready"
    cmd = [sys.executable, "-m", "cord.workers.spot", "--metadata-url", url]
    cmd += ["--interval", "0.2", *extra, "--"]
    cmd += [sys.executable, str(child), str(out), str(ready), str(child_code)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    _wait_for(ready)
    return proc, out, ready


@pytest.mark.parametrize("notice_code", [None, 75])
def test_notice_sends_sigterm_to_the_child_at_once(
    tmp_path: Path, metadata: tuple[Metadata, str], notice_code: int | None
) -> None:
    md, url = metadata
    extra = ["--notice-exit-code", str(notice_code)] if notice_code is not None else []
    proc, out, _ = _start_watch(tmp_path, url, *extra)
    try:
        time.sleep(1.0)  # several polls without a notice: the child must be left alone
        assert proc.poll() is None and not out.exists()
        assert md.polls >= 2, "the watcher never polled the metadata service"
        noticed_at = time.time()
        md.notice.set()
        proc.wait(timeout=15)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.exists(), f"the child never got SIGTERM; watcher said: {stderr}"
    assert float(out.read_text()) - noticed_at < 2.0
    assert proc.returncode == (0 if notice_code is None else notice_code)
    assert md.bad_requests == []
    assert "sending SIGTERM" in stderr


def test_signals_are_forwarded_and_the_childs_code_is_kept(
    tmp_path: Path, metadata: tuple[Metadata, str]
) -> None:
    _, url = metadata
    proc, out, _ = _start_watch(tmp_path, url, "--notice-exit-code", "75", child_code=3)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.exists(), "SIGTERM to the watcher never reached the child"
    # No notice came, so the child's own code stands, even with --notice-exit-code.
    assert proc.returncode == 3


def test_pid_file_mode(tmp_path: Path, metadata: tuple[Metadata, str]) -> None:
    md, url = metadata
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out, ready, pid_file = tmp_path / "got-sigterm", tmp_path / "ready", tmp_path / "w.pid"
    worker = subprocess.Popen([sys.executable, str(child), str(out), str(ready), "0"])
    watch = None
    try:
        _wait_for(ready)
        pid_file.write_text(f"{worker.pid}\n")
        cmd = [sys.executable, "-m", "cord.workers.spot", "--metadata-url", url]
        watch = subprocess.Popen([*cmd, "--interval", "0.2", "--pid-file", str(pid_file)])
        time.sleep(0.8)
        assert worker.poll() is None and watch.poll() is None
        md.notice.set()
        assert worker.wait(timeout=15) == 0
        assert watch.wait(timeout=15) == 0
    finally:
        for p in (worker, watch):
            if p is not None and p.poll() is None:
                p.kill()
    assert out.exists()


def test_detect_names_the_cloud(metadata: tuple[Metadata, str]) -> None:
    md, url = metadata
    assert detect(url) == md.flavour


def test_detect_off_cloud_is_none() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there: connection refused, at once.
    assert detect(f"http://127.0.0.1:{port}") is None


def test_usage_errors_name_the_fix() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["--pid", str(os.getpid()), "--", "true"])
    assert res.exit_code == 2
    assert "exactly one of" in res.output
    res = runner.invoke(main, [])
    assert res.exit_code == 2
    res = runner.invoke(main, ["--interval", "0", "--", "true"])
    assert res.exit_code == 2 and "--interval" in res.output
