"""``cord-spot-watch``: turn a spot preemption notice into SIGTERM for the worker.

    cord-spot-watch -- cord-worker --config run.yaml --pool alpha
    cord-spot-watch --provider gcp --notice-exit-code 75 -- cord-worker ...
    cord-spot-watch --pid 4242            # or --pid-file worker.pid: watch for a running one

A spot VM gets a notice before it is taken away: AWS two minutes ahead (IMDSv2
``spot/instance-action``, 404 until then), GCP about 30 seconds (``instance/preempted``
turns ``TRUE``). The worker drains on SIGTERM (finishes or hands back its task within
``reliability.shutdown_grace_s`` and exits 0), so the sooner it hears, the less work is
lost. The watcher runs the command as its child, polls the metadata service, sends the
child SIGTERM as soon as the notice comes, forwards the signals it gets itself, and exits
with the child's code.

``--notice-exit-code N`` makes it exit N instead of 0 when the child stopped because of a
notice: a supervisor that takes 0 for "done" (SkyPilot managed jobs) then relaunches the
worker elsewhere instead of ending the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from cord.common import env

METADATA_URL = "http://169.254.169.254"
Provider = Literal["aws", "gcp"]

# Ctrl-C in a terminal already reaches the child (same process group); forwarding SIGINT
# too would make Celery see it twice, and a second SIGINT is its cold shutdown.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _log(msg: str) -> None:
    sys.stderr.write(f"cord-spot-watch: {msg}\n")
    sys.stderr.flush()


def _request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, str, dict[str, str]]:
    """One HTTP request: (status, body, headers); an HTTP error status is returned, not
    raised. Network errors (OSError, URLError) propagate to the caller."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace"), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), dict(e.headers or {})


class AwsNotice:
    """EC2 IMDSv2: a session token, then ``spot/instance-action`` (404: no notice yet)."""

    TOKEN_TTL_S = 21600

    def __init__(self, base: str = METADATA_URL, timeout: float = 2.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.token: str | None = None

    def _fetch_token(self) -> str:
        status, body, _ = _request(
            f"{self.base}/latest/api/token",
            "PUT",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
            self.timeout,
        )
        if status != 200:
            raise OSError(f"IMDSv2 token request answered {status}")
        return body

    def check(self) -> str | None:
        """The notice's text, or None while there is none."""
        if self.token is None:
            self.token = self._fetch_token()
        url = f"{self.base}/latest/meta-data/spot/instance-action"
        status, body, _ = _request(url, headers={"X-aws-ec2-metadata-token": self.token})
        if status == 401:  # the token expired: one more try with a fresh one
            self.token = self._fetch_token()
            status, body, _ = _request(url, headers={"X-aws-ec2-metadata-token": self.token})
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"spot/instance-action answered {status}")
        try:
            action = json.loads(body)
            return f"AWS spot {action.get('action', '?')} at {action.get('time', '?')}"
        except (ValueError, AttributeError):
            return f"AWS spot instance-action {body.strip()!r}"


class GcpNotice:
    """GCE metadata ``instance/preempted``: FALSE, then TRUE. After the first read it
    waits on the server for a change (``wait_for_change``), so the notice arrives at
    once instead of at the next poll."""

    def __init__(self, base: str = METADATA_URL, timeout: float = 2.0, wait_s: float = 0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.wait_s = int(wait_s)
        self.etag: str | None = None

    def check(self) -> str | None:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        timeout = self.timeout
        if self.etag is not None and self.wait_s > 0:
            url += f"?wait_for_change=true&last_etag={self.etag}&timeout_sec={self.wait_s}"
            timeout += self.wait_s
        status, body, headers = _request(
            url, headers={"Metadata-Flavor": "Google"}, timeout=timeout
        )
        if status != 200:
            raise OSError(f"instance/preempted answered {status}")
        self.etag = {k.lower(): v for k, v in headers.items()}.get("etag")
        return "GCP preemption (instance/preempted is TRUE)" if body.strip() == "TRUE" else None


def detect(base: str = METADATA_URL, timeout: float = 1.0) -> Provider | None:
    """Which metadata service answers here: GCP's says ``Metadata-Flavor: Google``; AWS's
    hands out an IMDSv2 token. None off both clouds (or where the metadata service is
    out of reach, e.g. a container behind an IMDSv2 hop limit of 1)."""
    try:
        status, _, headers = _request(
            f"{base.rstrip('/')}/computeMetadata/v1/instance/preempted",
            headers={"Metadata-Flavor": "Google"},
            timeout=timeout,
        )
        if (
            status == 200
            and {k.lower(): v for k, v in headers.items()}.get("metadata-flavor") == "Google"
        ):
            return "gcp"
    except OSError:
        pass
    try:
        AwsNotice(base, timeout)._fetch_token()
        return "aws"
    except OSError:
        return None


class Watcher:
    """Polls one provider in a thread; calls ``on_notice`` once, when the notice comes."""

    def __init__(
        self,
        provider: str,
        base: str,
        interval_s: float,
        on_notice: Callable[[str], None],
    ) -> None:
        self.provider = provider
        self.base = base
        self.interval_s = interval_s
        self.on_notice = on_notice
        self.stopped = threading.Event()
        self.notice: str | None = None
        self.thread = threading.Thread(target=self._run, name="cord-spot-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _source(self) -> AwsNotice | GcpNotice | None:
        provider = detect(self.base) if self.provider == "auto" else self.provider
        if provider == "aws":
            return AwsNotice(self.base)
        if provider == "gcp":
            # Wait on the server a little less than the poll interval, at least 1 s.
            return GcpNotice(self.base, wait_s=max(1.0, self.interval_s))
        _log("no AWS or GCP metadata service answers; not watching for spot notices")
        return None

    def _run(self) -> None:
        source = self._source()
        failures = 0
        while source is not None and not self.stopped.is_set():
            started = time.monotonic()
            try:
                notice = source.check()
                failures = 0
            except OSError as e:
                # A metadata hiccup must not stop the worker; say so once, keep polling.
                failures += 1
                if failures == 1:
                    _log(f"metadata service error ({e}); still polling")
                notice = None
            if notice is not None:
                self.notice = notice
                self.on_notice(notice)
                return
            self.stopped.wait(max(0.0, self.interval_s - (time.monotonic() - started)))


def _exit_code(returncode: int) -> int:
    """A child killed by signal N exits the shell way, 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def run_child(cmd: list[str], watcher_args: dict[str, Any], notice_exit_code: int | None) -> int:
    """Run ``cmd``, forward signals to it, SIGTERM it on a notice; its exit code."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    # A handler, not SIG_IGN: an ignored signal stays ignored in the exec'd child, a
    # handled one goes back to its default there.
    signal.signal(signal.SIGINT, lambda *_: None)

    def on_notice(notice: str) -> None:
        _log(f"{notice}: sending SIGTERM to pid {child.pid if child else '?'}")
        forward(signal.SIGTERM, None)

    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        _log(f"cannot start {cmd[0]!r}: {e.strerror}")
        return 127
    for signum in pending:
        child.send_signal(signum)
    watcher = Watcher(on_notice=on_notice, **watcher_args)
    watcher.start()
    rc = _exit_code(child.wait())
    watcher.stop()
    if watcher.notice is not None and rc == 0 and notice_exit_code is not None:
        return notice_exit_code
    return rc


def watch_pid(pid_of: Callable[[], int | None], watcher_args: dict[str, Any]) -> int:
    """Watch for a worker started elsewhere: SIGTERM it on a notice; exit 0 when it is
    gone (with or without a notice)."""
    sent = threading.Event()

    def on_notice(notice: str) -> None:
        pid = pid_of()
        _log(f"{notice}: sending SIGTERM to pid {pid}")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        sent.set()

    watcher = Watcher(on_notice=on_notice, **watcher_args)
    watcher.start()
    while not sent.is_set() and _alive(pid_of()):
        sent.wait(watcher.interval_s)
    watcher.stop()
    return 0


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True  # a pid file not written yet: the worker is still starting
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_file_reader(path: str) -> Callable[[], int | None]:
    def read() -> int | None:
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            return None

    return read


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        # Everything from the command's first word on is the command's own.
        "allow_interspersed_args": False,
        "ignore_unknown_options": True,
    }
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "aws", "gcp"]),
    default="auto",
    show_default=True,
    help="Metadata service to poll; auto asks which one answers.",
)
@click.option(
    "--metadata-url",
    default=METADATA_URL,
    show_default=True,
    envvar=env.SPOT_METADATA_URL,
    help="Base URL of the metadata service (tests point it at a local server).",
)
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds per poll.")
@click.option(
    "--notice-exit-code",
    type=click.IntRange(0, 255),
    default=None,
    help="Exit with this instead of 0 when the child stopped after a notice.",
)
@click.option("--pid", type=int, default=None, help="Watch for this running process instead.")
@click.option(
    "--pid-file", type=click.Path(dir_okay=False), default=None, help="Or the pid in this file."
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def main(
    provider: str,
    metadata_url: str,
    interval: float,
    notice_exit_code: int | None,
    pid: int | None,
    pid_file: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (after --) and send it SIGTERM when a spot preemption notice comes."""
    if interval <= 0:
        raise click.BadParameter("must be more than 0 seconds", param_hint="--interval")
    if [pid is not None, pid_file is not None, bool(command)].count(True) != 1:
        raise click.UsageError(
            "give exactly one of: a command after --, --pid PID, or --pid-file FILE"
        )
    watcher_args = {"provider": provider, "base": metadata_url, "interval_s": interval}
    if command:
        sys.exit(run_child(list(command), watcher_args, notice_exit_code))
    pid_of = _pid_file_reader(pid_file) if pid_file else (lambda: pid)
    sys.exit(watch_pid(pid_of, watcher_args))


if __name__ == "__main__":
    main()
