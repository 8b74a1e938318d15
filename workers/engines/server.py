"""The inference server behind a server engine (`sglang`, `vllm`): launched and
supervised, or attached. `ServerSupervisor` holds what both need; each engine's module
says how its server is started and probed (`command`, `health_path`, `probe_request`).

Supervised (no `<engine>_url`): a daemon thread owns the server subprocess. It starts it
in its own session (so its whole tree is killed together), waits until the health path
answers 200, then watches it: the process exiting, or two health probes in a row
failing, ends that server, which is killed and started again with a growing backoff. A
probe is the health path and a one-token generation: a health endpoint can keep
answering 200 after the scheduler died (docs/method.md, "SGLang": sglang #6624). A
request that fails on the wire or with a 5xx wakes the watcher at once.

While a server is down, requests wait up to `startup_timeout_s` for the next one; a
request the dead server held fails with a retryable `EngineError`, never silently.

Attached (`<engine>_url`): nothing is launched or restarted; the server must answer its
health check within `startup_timeout_s` at start, and failed requests are retryable.

HTTP is the standard library's (http.client): JSON bodies, no proxies, one connection
per request (requests from several threads at once are fine).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cord.common.log import get_logger
from cord.common.metrics import free_port
from cord.common.pools import ServerSpec
from cord.workers.engines.base import EngineError

_PROBE_FAILURES = 2  # in a row before a running server is replaced: one slow probe is no death
_MAX_BACKOFF_S = 60.0
_STABLE_S = 60.0  # a server that stayed up this long resets the restart backoff


class RequestRejected(Exception):
    """The server refused a request (4xx): the request, not the server, is at fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def request_json(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP request with a JSON body; the status and the decoded JSON answer (or its
    text when it is not JSON). Transport failures raise OSError or HTTPException."""
    parts = urlsplit(url)
    conn_type = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    conn = conn_type(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        path = parts.path or "/"
        conn.request(method, path + (f"?{parts.query}" if parts.query else ""), data, headers)
        response = conn.getresponse()
        raw = response.read()
        status = response.status
    finally:
        conn.close()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def error_message(payload: Any) -> str:
    """The message of a server's error answer ({"error": {"message": ...}}, or FastAPI's
    {"message": ...} / {"detail": ...}), else the answer as text."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail"):
            if key in payload:
                return str(payload[key])
    return str(payload)[:2000]


# Loaded here, not in the forked child: loading a library between fork and exec can
# deadlock on a lock another thread held at fork time.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGKILL when the thread that launched it ends (the worker
    died), so a worker killed with -9 leaves no server holding the GPU. The supervisor
    thread that launches it lives as long as the engine."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServerSupervisor:
    """One server of one worker. Subclasses set `kind` (names logs and fields), `label`
    (in messages), `health_path`, and implement `command` and `probe_request`."""

    kind = "server"
    label = "server"
    health_path = "/health"

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.supervised = spec.server_url is None
        self.url = (spec.server_url or "").rstrip("/")
        self.log = get_logger(f"cord.{self.kind}", model=spec.name)
        self.restarts = 0
        name = f"cord-{self.kind}-{spec.name}-{os.getpid()}.log"
        self.log_path = Path(tempfile.gettempdir()) / name
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._trouble = threading.Event()
        self._stop = threading.Event()
        self._failed: str | None = None  # why the first launch never became ready
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Launch (or reach) the server and wait until it is ready; RuntimeError if not
        within `startup_timeout_s`."""
        timeout = self.spec.startup_timeout_s
        if not self.supervised:
            if not self._wait_healthy(timeout):
                raise RuntimeError(
                    f"{self.label} server {self.url} did not answer {self.health_path} within "
                    f"{timeout:g}s ({self.kind}_url of {self.spec.name!r})"
                )
            self._ready.set()
            return
        self._thread = threading.Thread(
            target=self._supervise, name=f"cord-{self.kind}-{self.spec.name}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._failed is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(
                    f"{self.label} server for {self.spec.name!r} did not start: "
                    f"{self._failed or f'not ready within {timeout:g}s'}; "
                    f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                )

    def close(self) -> None:
        self._stop.set()
        self._trouble.set()
        self._ready.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        self._kill()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- requests ----------------------------------------------------------------------
    def post(self, path: str, body: Any) -> Any:
        """POST `body` and return the decoded answer. A refused request raises
        RequestRejected; a server that is down, fails or times out raises a retryable
        EngineError (and the supervisor is told)."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while True:
            url = self._ready_url(deadline)
            try:
                status, payload = request_json(
                    "POST", url + path, body, self.spec.request_timeout_s
                )
                break
            except ConnectionRefusedError as e:
                # Nothing was sent: the server is gone (maybe dead but not yet noticed).
                # A supervised one is replaced, and its successor takes the request.
                self._trouble.set()
                if not self.supervised or self._stop.is_set() or time.monotonic() > deadline:
                    raise EngineError(f"{self.label} server {url}: {e}", retryable=True) from None
                time.sleep(0.2)
            except (OSError, HTTPException) as e:
                self._trouble.set()
                raise EngineError(
                    f"{self.label} server {url}: {type(e).__name__}: {e}", retryable=True
                ) from None
        if status == 200:
            return payload
        if 400 <= status < 500:
            raise RequestRejected(status, error_message(payload))
        self._trouble.set()
        raise EngineError(
            f"{self.label} server {url} answered {status}: {error_message(payload)}",
            retryable=True,
        )

    def _ready_url(self, deadline: float) -> str:
        """The URL of a ready server, waiting for one until `deadline`. A supervised
        server that died and is not yet replaced never held the request: it waits for
        the successor instead of failing."""
        while not self._stop.is_set():
            if self._ready.is_set() and (not self.supervised or self.pid is not None):
                return self.url
            if time.monotonic() > deadline:
                raise EngineError(
                    f"{self.label} server of {self.spec.name!r} is not ready (being restarted)",
                    retryable=True,
                )
            time.sleep(0.05)
        raise EngineError(
            f"the {self.label} engine of {self.spec.name!r} is closed", retryable=True
        )

    # -- health ------------------------------------------------------------------------
    def probe_request(self) -> tuple[str, dict[str, Any], str]:
        """A one-token generation: its path, body, and a key its answer must hold."""
        raise NotImplementedError

    def probe(self) -> bool:
        """The server answers its health path and generates one token, both in time."""
        timeout = self.spec.health_timeout_s
        path, body, key = self.probe_request()
        try:
            status, _ = request_json("GET", self.url + self.health_path, timeout=timeout)
            if status != 200:
                return False
            status, answer = request_json("POST", self.url + path, body, timeout)
        except (OSError, HTTPException):
            return False
        return status == 200 and isinstance(answer, dict) and key in answer

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                return False
            try:
                status, _ = request_json(
                    "GET", self.url + self.health_path, timeout=self.spec.health_timeout_s
                )
                if status == 200:
                    return True
            except (OSError, HTTPException):
                pass
            self._stop.wait(0.5)
        return False

    # -- supervision (its own thread) --------------------------------------------------
    def command(self, port: int) -> list[str]:
        """The launch command for a server on `port` (127.0.0.1)."""
        raise NotImplementedError

    def launch_command(self, port: int) -> list[str]:
        """`command`, with a first word `python` as the worker's own interpreter."""
        cmd = self.command(port)
        return [sys.executable, *cmd[1:]] if cmd and cmd[0] == "python" else cmd

    def launch_env(self) -> dict[str, str]:
        """Environment the launched server gets on top of the worker's (an engine's own)."""
        return {}

    def server_env(self) -> dict[str, str]:
        """`launch_env`, and the GPUs the server may use (`visible_gpus`)."""
        env = self.launch_env()
        gpus = self.spec.visible_gpus
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        return env

    def _launch(self) -> None:
        port = self.spec.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = self.launch_command(port)
        self.log.info("server_launch", cmd=cmd, log=str(self.log_path))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                env={**os.environ, **self.server_env()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _kill(self) -> None:
        """End the server's whole process group: SIGTERM, then SIGKILL after 15 s."""
        proc = self._proc
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # The group outlives its leader: children of a leader killed with -9 remain.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                if proc.poll() is not None and not self._group_alive(proc.pid):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        # Forgotten once gone: signalling the group again later could hit a reused pid.
        self._proc = None

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _supervise(self) -> None:
        backoff = 1.0
        ever_ready = False
        while not self._stop.is_set():
            reason, up_s = self._serve_once()
            self._kill()
            if self._stop.is_set():
                return
            if up_s is None and not ever_ready:
                # A server that never started is a config error: report it, no loop.
                self._failed = reason
                return
            ever_ready = True
            if up_s is not None and up_s > _STABLE_S:
                backoff = 1.0
            self.restarts += 1
            self.log.warning("server_restart", reason=reason, wait_s=backoff, n=self.restarts)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _serve_once(self) -> tuple[str, float | None]:
        """Launch one server and keep it until it is gone: why it ended, and how long it
        was ready (None: never)."""
        try:
            self._launch()
        except OSError as e:  # e.g. no such program: the launch setting is wrong
            return f"cannot run {self.spec.launch}: {e}", None
        if not self._wait_healthy(self.spec.startup_timeout_s):
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                return f"exited with {proc.returncode} while starting", None
            return f"not ready within {self.spec.startup_timeout_s:g}s", None
        up_since = time.monotonic()
        self._ready.set()
        self.log.info("server_ready", url=self.url, pid=self.pid)
        reason = self._watch()
        self._ready.clear()
        return reason, time.monotonic() - up_since

    def _watch(self) -> str:
        """Until the running server is gone: return why."""
        interval = self.spec.health_interval_s
        next_probe = time.monotonic() + interval
        failures = 0
        proc = self._proc
        assert proc is not None
        while not self._stop.is_set():
            if proc.poll() is not None:
                return f"exited with {proc.returncode}"
            woken = self._trouble.wait(0.5)
            if self._stop.is_set():
                break
            if not woken and time.monotonic() < next_probe:
                continue
            self._trouble.clear()
            if self.probe():
                failures = 0
                next_probe = time.monotonic() + interval
                continue
            failures += 1
            self.log.warning("server_probe_failed", url=self.url, failures=failures)
            if failures >= _PROBE_FAILURES:
                return f"{failures} health probes failed"
            next_probe = time.monotonic() + 1.0  # look again soon, not a whole interval later
        return "closing"
