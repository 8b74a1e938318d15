"""The fleet on a Redis that wants a password and speaks only TLS (``rediss://``): the
whole run works end to end, and the password appears in no output and no log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cord.common.metrics import free_port
from cord.coordinator.redis_server import redis_binary
from cord.lab.arith import make_problems
from tests.conftest import MODELS, write_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]
SECRET = "s3cr3t-Pa55-for-the-test"


@pytest.fixture
def tls_redis(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(openssl, check=True, capture_output=True)
    port = free_port()
    server = [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    server += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    server += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    server += ["--requirepass", SECRET, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://:{SECRET}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.skip(f"this redis-server cannot serve TLS: {out[-300:]}")
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url, port, cert
    finally:
        proc.terminate()
        proc.wait(10)


def test_password_and_tls_end_to_end_without_leaking_the_password(tmp_path, tls_redis):
    url, port, cert = tls_redis
    # The server really wants both: no password, or no TLS, gets nowhere.
    no_password = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(no_password).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://:{SECRET}@127.0.0.1:{port}/0", socket_timeout=2).ping()

    config = write_config(
        tmp_path / "run.yaml",
        {
            "redis_url": url,
            "namespace": "sec",
            "prompt": {"template": "{question}"},
            "teachers": [{"name": "alpha", "model": str(MODELS / "alpha")}],
            "meta_prover": {"name": "meta", "model": str(MODELS / "meta")},
            "search": {
                "beam_width": 2,
                "thinking_budget": 160,
                "max_step_tokens": 48,
                "answer_budget": 24,
            },
            "reliability": {"heartbeat_s": 1.0},
        },
    )
    problems = make_problems(3, seed=4711)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    out, run_dir = tmp_path / "out", tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cord.coordinator.cli",
            "demo",
            "--config",
            str(config),
            "--problems",
            str(path),
            "--out",
            str(out),
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in problems)
    assert all(r["steps"] and r["messages"][1]["content"].startswith("<think>") for r in rows)
    logs = [done.stdout, done.stderr]
    logs += [p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log")]
    assert any("***" in text for text in logs)  # the URL is logged, redacted
    assert not any(SECRET in text for text in logs)
