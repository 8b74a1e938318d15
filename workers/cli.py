"""``cord-worker``: one Celery worker process serving one model pool.

    cord-worker --config examples/demo.yaml --teacher alpha

The model is loaded once, before the worker takes any task. A teacher's worker consumes
``<ns>.expand.<name>`` (step expansion and final answers); the meta-prover's consumes
``<ns>.score.<name>``; a model that is both consumes both. Threads pool, concurrency 1:
one engine per process, and Celery's main loop keeps sending heartbeats while a task runs.
"""

from __future__ import annotations

import os
import socket
import sys

import click
import redis

from cord.common.celery_app import make_celery
from cord.common.config import ConfigError, load_config, redact_url
from cord.common.keys import Keys, queue_name
from cord.common.log import configure, get_logger


@click.command(context_settings={"auto_envvar_prefix": "CORD_WORKER"})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Run config (YAML).",
)
@click.option(
    "--teacher",
    "--model",
    "model_name",
    required=True,
    help="Pool to serve: a teacher's name or the meta-prover's.",
)
@click.option(
    "--name", "node", default=None, help="Celery node name (default: <model>-<id>@<host>)."
)
@click.option("--device", default=None, help="Override the model's device, e.g. cuda:1.")
@click.option("--loglevel", default="INFO", show_default=True)
def main(
    config_path: str, model_name: str, node: str | None, device: str | None, loglevel: str
) -> None:
    """Serve one model pool from the run config's Redis queues."""
    configure(level=loglevel)
    try:
        cfg = load_config(config_path)
        spec = cfg.pool(model_name)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    if device:
        spec = spec.model_copy(update={"device": device})
    queues = []
    if model_name in cfg.teacher_names:
        queues.append(queue_name(cfg.namespace, "expand", model_name))
    if model_name == cfg.meta_prover.name:
        queues.append(queue_name(cfg.namespace, "score", model_name))
    suffix = os.environ.get("HONCHO_PROCESS_NAME", "").replace(".", "-") or str(os.getpid())
    node = node or f"{model_name}-{suffix}@{socket.gethostname()}"
    log = get_logger("cord.worker", worker=node, model=model_name)
    log.info(
        "loading_model",
        path=spec.model,
        engine=spec.engine,
        device=spec.device,
        redis=redact_url(cfg.redis_url),
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from cord.workers.engines import load_engine
    from cord.workers.tasks import WorkerRuntime, register_tasks

    engine = load_engine(spec)
    client = redis.Redis.from_url(cfg.redis_url, health_check_interval=30)
    runtime = WorkerRuntime(engine, node, client, Keys(cfg.namespace), queues)
    app = make_celery(cfg)
    register_tasks(app, runtime)
    runtime.start_heartbeat(cfg.reliability.heartbeat_s)
    log.info("worker_ready", queues=queues)
    try:
        app.worker_main(
            [
                "worker",
                "-Q",
                ",".join(queues),
                "-n",
                node,
                "-P",
                "threads",
                "-c",
                "1",
                "-l",
                loglevel,
                "--without-gossip",
                "--without-mingle",
                "-E",
            ]
        )
    finally:
        runtime.deregister()
        log.info("worker_stopped", tasks_done=runtime.tasks_done)
    sys.exit(0)


if __name__ == "__main__":
    main()
