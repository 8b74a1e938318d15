"""``cord-worker``: one Celery worker process serving one model pool.

    cord-worker --config examples/demo.yaml --pool alpha

The model is loaded once, before the worker takes any task. A teacher's worker consumes
``<ns>.expand.<name>`` (step expansion and final answers); the meta-prover's consumes
``<ns>.score.<name>``; a model that is both consumes both. Each worker also consumes its
own ``<shared queue>.w.<node name>``, where the coordinator sends cache-affine work.
Threads pool: one engine per process, and Celery's main loop keeps sending heartbeats while
a task runs. An in-worker engine (`hf`) runs one task at a time; a server engine runs
`concurrency` at once, so that its server batches their requests.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from celery import signals
from pydantic import ValidationError

from cord.common import env
from cord.common.celery_app import make_celery
from cord.common.cli import OneLineCommand
from cord.common.config import BENCH_ENGINES, ConfigError, RunConfig, load_config
from cord.common.keys import Keys, private_queue
from cord.common.log import LEVELS, configure, get_logger
from cord.common.pools import AnyModelSpec
from cord.common.redisconn import connect, redact_url

if TYPE_CHECKING:
    from cord.workers.tasks import WorkerRuntime


@click.command(
    cls=OneLineCommand,
    context_settings={
        "auto_envvar_prefix": env.WORKER_PREFIX,
        "help_option_names": ["-h", "--help"],
    },
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Run config (YAML).",
)
@click.option(
    "--pool",
    "--teacher",
    "pool",
    required=True,
    help="Pool to serve: a teacher's name or the meta-prover's (--teacher: the same).",
)
@click.option(
    "--name", "node", default=None, help="Celery node name (default: <model>-<id>@<host>)."
)
@click.option("--device", default=None, help="Override the model's device, e.g. cuda:1.")
@click.option(
    "--gpus",
    default=None,
    help="GPUs of this worker's launched server, e.g. 2,3 (its CUDA_VISIBLE_DEVICES; one "
    "per tensor-parallel rank); overrides the pool's gpus.",
)
@click.option(
    "--log-level",
    "--loglevel",
    "log_level",
    type=click.Choice(LEVELS, case_sensitive=False),
    default=None,
    help="DEBUG, INFO, WARNING (env CORD_LOG_LEVEL; default INFO).",
)
@click.version_option(package_name="cord")
def main(
    config_path: str,
    pool: str,
    node: str | None,
    device: str | None,
    gpus: str | None,
    log_level: str | None,
) -> None:
    """Serve one model pool from the run config's Redis queues.

    Every option can also be set as CORD_WORKER_<OPTION> (CORD_WORKER_POOL=alpha,
    CORD_WORKER_DEVICE=cuda:1): one image, its pool chosen by the environment."""
    loglevel = (log_level or env.log_level() or "INFO").upper()
    configure(level=loglevel)
    loading = _stop_on_sigterm_while_loading()
    try:
        cfg = load_config(config_path)
        spec = cfg.pool(pool)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    spec = _with_overrides(spec, device, gpus)
    missing = model_missing(spec, config_path)
    if missing:
        raise click.UsageError(missing)
    suffix = os.environ.get("HONCHO_PROCESS_NAME", "").replace(".", "-") or str(os.getpid())
    node = node or f"{pool}-{suffix}@{socket.gethostname()}"
    # The pool's shared queue, and this worker's own beside it: the coordinator sends
    # there the work whose prefix this worker has cached (cache-affine routing).
    queues = cfg.pool_queues(pool)
    queues += [private_queue(cfg.namespace, k, pool, node) for k in cfg.pool_kinds(pool)]
    log = get_logger("cord.worker", worker=node, model=pool)
    log.info(
        "loading_model",
        path=spec.model,
        engine=spec.engine,
        device=spec.device,
        redis=redact_url(cfg.redis_url),
    )
    runtime = _load_runtime(cfg, spec, node, queues)
    loading["runtime"] = runtime
    _serve(cfg, runtime, node, spec.task_slots, loglevel, log)


def _with_overrides(spec: AnyModelSpec, device: str | None, gpus: str | None) -> AnyModelSpec:
    """The pool's spec with this worker's --device and --gpus, checked as the config is."""
    update: dict[str, Any] = {}
    if device:
        update["device"] = device
    if gpus:
        try:
            update["gpus"] = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError as e:
            raise click.BadParameter(
                f"{gpus!r}: give GPU numbers, e.g. 2,3", param_hint="--gpus"
            ) from e
        if "gpus" not in type(spec).model_fields:
            raise click.BadParameter(
                f"engine {spec.engine!r} launches no server; --gpus is for vllm and sglang "
                "(an hf pool takes --device cuda:N)",
                param_hint="--gpus",
            )
    if not update:
        return spec
    try:
        return type(spec).model_validate({**spec.model_dump(), **update})
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise click.UsageError(f"pool {spec.name!r} on this worker: {problems}") from e


def model_missing(spec: AnyModelSpec, config_path: str) -> str | None:
    """Why the pool's model cannot be loaded here, offline; None when it can (or when the
    pool attaches to a server that has its own). Checked before transformers is imported:
    a wrong path is one line, at once."""
    if spec.engine in BENCH_ENGINES or spec.model is None or getattr(spec, "server_url", None):
        return None
    if Path(spec.model).expanduser().exists():
        return None
    where = f"{Path(config_path).resolve().parent} (the config's folder) and {Path.cwd()}"
    fix = f"fix `model:` of pool {spec.name!r} in {config_path}"
    if spec.model.startswith((".", "/", "~")) or spec.model.count("/") > 1:
        return f"pool {spec.name!r}: no model folder {spec.model!r} in {where}; {fix}"
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec.model, "config.json"), str)
    except Exception:  # not a valid hub id either
        cached = False
    if cached:
        return None
    return (
        f"pool {spec.name!r}: {spec.model!r} is no folder in {where} and not in the local "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}); workers load models offline: "
        f"download it first (`hf download {spec.model}`), or {fix}"
    )


def _stop_on_sigterm_while_loading() -> dict[str, Any]:
    """A spot notice can come while the model is still loading: there is no work to
    finish or hand back yet, so stop at once, cleanly. Celery replaces this handler with
    its warm shutdown when it starts. Returns where the runtime goes once it exists (it
    deregisters on such a stop)."""
    loading: dict[str, Any] = {"runtime": None}

    def stop_while_loading(signum: int, frame: Any) -> None:
        if loading["runtime"] is not None:
            loading["runtime"].deregister()
        sys.stderr.write("cord-worker: SIGTERM before serving; exiting\n")
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_while_loading)
    return loading


def _load_runtime(
    cfg: RunConfig, spec: AnyModelSpec, node: str, queues: list[str]
) -> WorkerRuntime:
    """The engine, loaded once, and the runtime that serves it (offline: a model path
    that is not on disk is not fetched)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from cord.workers.engines import load_engine
    from cord.workers.tasks import WorkerRuntime

    return WorkerRuntime(
        load_engine(spec),
        node,
        connect(cfg.redis_url, health_check_interval=30),
        Keys(cfg.namespace),
        queues,
        cfg.reliability.worker_lost_s,
        cfg.reliability.reply_ttl_s,
    )


def _serve(
    cfg: RunConfig, runtime: WorkerRuntime, node: str, slots: int, loglevel: str, log: Any
) -> None:
    """Register the tasks, start /metrics and the heartbeat, and run Celery's worker on
    the runtime's queues until a shutdown; exits 0 after a spot notice's drain."""
    from cord.workers.tasks import register_tasks

    app = make_celery(cfg)
    register_tasks(app, runtime)
    if cfg.metrics.worker_port is not None:  # before the first heartbeat, which names it
        port = runtime.metrics.start_server(cfg.metrics.worker_port, cfg.metrics.host)
        log.info("metrics_serving", url=f"http://{cfg.metrics.host}:{port}/metrics")
    runtime.start_heartbeat(cfg.reliability.heartbeat_s)
    grace = Grace(runtime, cfg.reliability.shutdown_grace_s, log)
    signals.worker_shutting_down.connect(grace.on_shutting_down, weak=False)
    log.info("worker_ready", queues=runtime.queues)
    argv = ["worker", "-Q", ",".join(runtime.queues), "-n", node, "-P", "threads"]
    argv += ["-c", str(slots), "-l", loglevel, "--without-gossip", "--without-mingle"]
    try:
        app.worker_main(argv)
    except SystemExit as e:
        if e.code not in (0, None) and not grace.requested:
            raise
    finally:
        runtime.deregister()
        log.info("worker_stopped", tasks_done=runtime.tasks_done, handed_back=grace.forced)
    if grace.forced:
        # The engine thread may still be inside a forward pass that nothing can
        # interrupt; the interpreter would wait for it at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(0)


class Grace:
    """SIGTERM is a spot notice: Celery's warm shutdown stops taking tasks and lets the
    running one finish. If it has not finished after ``shutdown_grace_s``, the task is
    handed back (the coordinator re-sends it at once) and a cold shutdown follows, which
    returns the unacked message to the queue. The worker exits 0 either way."""

    def __init__(self, runtime: WorkerRuntime, grace_s: float, log: Any) -> None:
        self.runtime = runtime
        self.grace_s = grace_s
        self.log = log
        self.requested = False
        self.forced = False

    def on_shutting_down(self, sig: str = "", how: str = "", **_: Any) -> None:
        if self.requested:
            return
        self.requested = True
        self.log.info("shutdown_requested", signal=sig, how=how, grace_s=self.grace_s)
        if how == "Warm" and self.runtime.busy:
            threading.Thread(target=self._watch, name="cord-grace", daemon=True).start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.runtime.busy and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.runtime.busy:
            self.forced = True
            self.runtime.hand_back(f"worker shutting down ({self.grace_s:g}s grace over)")
            os.kill(os.getpid(), signal.SIGQUIT)  # cold shutdown: requeue and exit


if __name__ == "__main__":
    main()
