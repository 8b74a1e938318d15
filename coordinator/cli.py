"""``cord-coord``: enqueue problems, run the coordinator, report status.

cord-coord enqueue --config examples/demo.yaml problems.jsonl
cord-coord run --config examples/demo.yaml --out data/
cord-coord status --config examples/demo.yaml [--json]
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, cast

import click

from cord.common import env
from cord.common.cli import OneLineGroup
from cord.common.config import ConfigError, InputSpec, RunConfig, load_config
from cord.common.log import LEVELS, configure, get_logger
from cord.common.redisconn import DEFAULT_SENTINEL_URL, connect, parse_sentinel, redact_url
from cord.coordinator.inputs.answers import ANSWER_FROM
from cord.coordinator.matching import MATCH_METHODS
from cord.coordinator.search import lookup, strategy_names, strategy_of

config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Run config (YAML); CORD_REDIS_URL overrides its redis_url.",
)


out_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: output.dir of the config).",
)


def _load(config_path: str) -> RunConfig:
    try:
        cfg = load_config(config_path)
        strategy_of(cfg, config_path)
        return cfg
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


LOG_LEVEL_HELP = "DEBUG, INFO, WARNING (env CORD_LOG_LEVEL)."


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        configure(level=value)


class CoordGroup(OneLineGroup):
    """Every verb takes --log-level too, after its name as before it."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "log_level" for p in cmd.params):
            cmd.params.append(
                click.Option(
                    ["--log-level"],
                    type=click.Choice(LEVELS, case_sensitive=False),
                    expose_value=False,
                    callback=_set_log_level,
                    help=LOG_LEVEL_HELP,
                )
            )
        super().add_command(cmd, name)


@click.group(cls=CoordGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(LEVELS, case_sensitive=False),
    default=None,
    help=LOG_LEVEL_HELP,
)
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (env CORD_DEBUG=1).")
@click.version_option(package_name="cord")
def main(log_level: str | None, debug: bool) -> None:
    """Coordinator of a cord fleet (CoRD beam search over teacher pools)."""
    if debug:
        env.set_debug()
    configure(level=log_level)


def input_options(f: Any) -> Any:
    """Where a source's records keep their fields (each overrides the config's `input:`)."""
    options = [
        click.option(
            "--question-field",
            default=None,
            help="Field with the question (default: `question`, or `problem`).",
        ),
        click.option(
            "--answer-field",
            default=None,
            help="Field with the reference answer (default: answer).",
        ),
        click.option(
            "--answer-from",
            type=click.Choice(ANSWER_FROM),
            default=None,
            help="How the answer field writes the reference: the whole value (field), after "
            "the last #### (gsm8k), the last \\boxed{} (boxed).",
        ),
        click.option(
            "--id-field",
            default=None,
            help="Field with each problem's id (default: `id` where present, else a digest).",
        ),
        click.option(
            "--answers-as-text",
            is_flag=True,
            default=None,
            help='Take a number in the answer field as its text (72 as "72").',
        ),
        click.option("--split", default=None, help="Split of a dataset folder or Hub dataset."),
        click.option("--subset", default=None, help="Configuration of a Hub dataset."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _input_spec(cfg: RunConfig, flags: dict[str, str | None]) -> InputSpec:
    given = {k: v for k, v in flags.items() if v is not None}
    return cfg.input.model_copy(update=given)


@main.command()
@config_option
@click.argument("source")
@input_options
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Enqueue the valid records; write the rejected ones to --rejects.",
)
@click.option(
    "--rejects",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where --skip-invalid writes rejected records (default: <source>.rejected.jsonl).",
)
def enqueue(
    config_path: str,
    source: str,
    skip_invalid: bool,
    rejects: str | None,
    **flags: str | None,
) -> None:
    """Check every record of SOURCE, then enqueue the problems (idempotent by id).

    SOURCE: a .jsonl, .json, .csv, .tsv or .parquet file, a folder written by
    `datasets.save_to_disk`, or a Hub dataset name (read with `datasets.load_dataset`;
    offline, from the local cache). A source with any bad record enqueues nothing (exit
    2) unless --skip-invalid is given. The first bad records are printed, then how many
    more; memory stays bounded at any size (temporary files about the source's size,
    under TMPDIR)."""
    from cord.coordinator.inputs.intake import enqueue_source
    from cord.coordinator.inputs.sources import SourceError, open_source

    cfg = _load(config_path)
    try:
        src = open_source(source, _input_spec(cfg, flags))
        report = enqueue_source(cfg, src, skip_invalid, rejects)
    except SourceError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"read {report.source}", err=True)
    for err in report.errors:
        click.echo(f"{source}: {err}", err=True)
    more = report.error_count - len(report.errors)
    if more:
        where = f" (all are in {report.rejects_path})" if report.rejects_path else ""
        click.echo(f"{source}: ... and {more} more bad {report.unit}(s){where}", err=True)
    if report.error_count and not skip_invalid:
        click.echo(
            f"{report.error_count} bad {report.unit}(s); nothing enqueued. Fix them, or pass "
            f"--skip-invalid to enqueue the valid {report.unit}s.",
            err=True,
        )
        sys.exit(2)
    if report.rejects_path:
        click.echo(
            f"{report.error_count} bad {report.unit}(s) written to {report.rejects_path}",
            err=True,
        )
    click.echo(
        f"enqueued {report.added} new problem(s); {report.known} already known "
        f"(namespace {cfg.namespace!r} at {redact_url(cfg.redis_url)})"
    )
    if report.replicas:
        if not report.replicated:
            raise click.ClickException(
                f"none of the primary's {report.replicas} replica(s) confirmed the problems "
                "within 10 s: a failover now could lose them. Run the same enqueue again "
                "once a replica has caught up (a known problem is not added twice)."
            )
        click.echo(f"confirmed by {report.replicated} of {report.replicas} replica(s)")
    if report.known and not report.added:
        click.echo(
            "a known problem is not run again: to start over, `cord-coord reset --config "
            f"{config_path} --rows`, or enqueue into another namespace (CORD_NAMESPACE)",
            err=True,
        )


@main.command()
@config_option
@out_option
@click.option(
    "--rows", is_flag=True, help="Also delete the output folder's traces and failure records."
)
@click.option("--force", is_flag=True, help="Even while a coordinator runs on the namespace.")
@click.confirmation_option(
    "--yes", "-y", prompt="Delete every problem, state and queued task of this namespace?"
)
def reset(config_path: str, out_dir: str | None, rows: bool, force: bool) -> None:
    """Start a namespace over: delete its problems, their states, leases and finished
    marks, and its queued tasks; live workers stay registered and keep serving.

    Rows on disk are kept unless --rows: a coordinator marks the problems they hold done
    again at its start, so a problem re-enqueued beside its row is not run again."""

    from cord.common.keys import Keys
    from cord.coordinator.fleet import wipe_namespace
    from cord.coordinator.status import coordinators

    cfg = _load(config_path)
    client, keys = connect(cfg.redis_url), Keys(cfg.namespace)
    running, _ = coordinators(client, keys)
    if running and not force:
        raise click.UsageError(
            f"coordinator(s) {', '.join(running)} run on namespace {cfg.namespace!r}; stop "
            "them first (Ctrl-C), or pass --force"
        )
    deleted = wipe_namespace(client, keys, keep_workers=True)
    click.echo(f"deleted {deleted} key(s) of namespace {cfg.namespace!r}")
    out = Path(out_dir or cfg.output.dir)
    for prefix in (cfg.output.traces_prefix, cfg.output.failed_prefix):
        path = out / f"{prefix}.jsonl"
        if path.exists():
            if rows:
                path.unlink()
                click.echo(f"deleted {path}")
            else:
                click.echo(f"kept {path} (--rows deletes it)")


@main.command()
@config_option
@out_option
@click.option("--follow", is_flag=True, help="Keep waiting for new problems instead of exiting.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
def run(config_path: str, out_dir: str | None, follow: bool, progress: bool | None) -> None:
    """Drive every enqueued problem to a trace or a failure record, then exit 0.

    Ctrl-C (or SIGTERM) stops at the next pass of the loop: the problems in flight are
    handed back, the summary is printed, and the same command resumes them (exit 130 on
    Ctrl-C). A second Ctrl-C stops at once; the problems then come back when their lease
    runs out."""
    from tqdm import tqdm

    from cord.coordinator.driver import Coordinator

    cfg = _load(config_path)
    out = out_dir or cfg.output.dir
    show = sys.stderr.isatty() if progress is None else progress
    bar: Any = None
    if show:
        bar = tqdm(total=_open_problems(cfg), unit="problem", desc="cord")
    # Off a TTY (honcho, a cluster) progress is a JSON log line per problem closed.
    log = get_logger("cord.run")
    closed = {"done": 0, "failed": 0}

    def on_event(kind: str, pid: str) -> None:
        closed[kind] += 1
        if bar is not None:
            bar.update(1)
            if kind == "failed":
                bar.set_postfix_str(f"failed: {pid}")
        else:
            log.info("progress", problem_id=pid, outcome=kind, **closed, **_open_now(coord))

    def on_wait(pools: list[str]) -> None:
        start = [f"cord-worker --config {config_path} --pool {p}" for p in pools]
        log.warning("waiting_for_workers", pools=pools, start=start)
        if bar is not None:
            bar.set_postfix_str(f"no live worker: {', '.join(pools)}")

    coord = Coordinator(cfg, out, follow=follow, on_event=on_event, on_wait=on_wait)
    paths = {"traces_file": str(coord.writer.traces), "failed_file": str(coord.writer.failed)}
    log.info("writing", **paths)
    if cfg.metrics.coordinator_port is not None:
        from cord.coordinator.metrics import serve_coordinator

        serve_coordinator(coord, cfg.metrics.coordinator_port, cfg.metrics.host)
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        interrupted.append(signum)
        coord.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        summary = coord.run()
    finally:
        if bar is not None:
            bar.close()
    shown = ("done", "failed", "tasks_sent", "redispatched", "late_results", "wall_s")
    click.echo(json.dumps({**{k: summary[k] for k in shown}, **paths}))
    if interrupted:
        left = _open_problems(cfg)
        more = f"{left} problem(s) left; " if left else ""
        click.echo(
            f"stopped: {more}run `cord-coord run --config {config_path}"
            f"{f' --out {out_dir}' if out_dir else ''}` again to resume.",
            err=True,
        )
        if interrupted[0] == signal.SIGINT:
            sys.exit(130)


def _open_now(coord: Any) -> dict[str, int]:
    """The run's problems still queued and in flight (all coordinators), for a progress
    line; nothing when Redis does not answer (the loop then waits for it)."""
    import redis

    try:
        counts = coord.store.counts()
    except (redis.ConnectionError, redis.TimeoutError):
        return {}
    return {"queued": counts["queued"], "in_flight": counts["in_flight"]}


def _open_problems(cfg: RunConfig) -> int | None:
    """Problems queued or in flight now (the progress bar's total); None without Redis
    (the coordinator then waits for it)."""
    import redis

    from cord.common.keys import Keys
    from cord.coordinator.store import Store

    try:
        counts = Store(connect(cfg.redis_url), Keys(cfg.namespace)).counts()
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    return int(counts["queued"] + counts["in_flight"])


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: str, as_json: bool) -> None:
    """Problems queued / in flight / done / failed, ETA; per pool: queue depth, live
    workers, generated tokens per second over the last minute, cache hit share."""
    from cord.coordinator.status import fleet_status, format_status

    cfg = _load(config_path)
    st = fleet_status(cfg)
    click.echo(json.dumps(st) if as_json else format_status(st, cfg.redis_url))


@main.command()
@config_option
@click.option(
    "--problems",
    "problems_file",
    type=click.Path(exists=True, dir_okay=False),
    default="examples/problems.jsonl",
    show_default=True,
)
@out_option
@click.option(
    "--fresh/--keep",
    default=True,
    show_default=True,
    help="Clear the namespace and earlier output first, so the demo runs again.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=".run",
    show_default=True,
    help="Where logs (and a Redis started here) live.",
)
def demo(
    config_path: str, problems_file: str, out_dir: str | None, fresh: bool, run_dir: str
) -> None:
    """Start Redis (if none answers) and one worker per pool, run the problems, summarize."""
    from cord.coordinator.demo import run_demo

    cfg = _load(config_path)
    run_demo(cfg, config_path, problems_file, Path(out_dir or cfg.output.dir), fresh, Path(run_dir))


@main.command("eval")
@config_option
@click.argument("source", required=False)
@click.option("--problems", "problems_file", hidden=True, help="SOURCE, as an option.")
@input_options
@click.option(
    "--strategies",
    default="cord,curation",
    show_default=True,
    help="Comma-separated, of: " + ", ".join(strategy_names()) + ".",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="data/eval",
    show_default=True,
    help="Rows of each strategy go to <out>/<strategy>/.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--start-workers",
    is_flag=True,
    help="Start Redis (if none answers) and one worker per pool for the run.",
)
def eval_cmd(
    config_path: str,
    source: str | None,
    problems_file: str | None,
    strategies: str,
    out_dir: str,
    as_json: bool,
    start_workers: bool,
    **flags: str | None,
) -> None:
    """Run the problems of SOURCE through the live workers once per strategy and compare
    them. SOURCE is what `enqueue` reads (a file, dataset folder or Hub name)."""
    from cord.coordinator.evaluate import evaluate, format_table
    from cord.coordinator.inputs.sources import SourceError, read_problems

    if (source is None) == (problems_file is None):
        raise click.UsageError("give the problems once: `cord-coord eval --config CFG SOURCE`")
    problems_file = source or problems_file
    assert problems_file is not None
    cfg = _load(config_path)
    try:
        problems, errors = read_problems(problems_file, _input_spec(cfg, flags))
    except SourceError as e:
        raise click.UsageError(str(e)) from e
    if errors:
        for err in errors:
            click.echo(f"{problems_file}: {err}", err=True)
        sys.exit(2)
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        if lookup(name) is None:
            raise click.BadParameter(
                f"unknown strategy {name!r}; use one of {', '.join(strategy_names())}",
                param_hint="--strategies",
            )
    out = Path(out_dir)
    for name in names:
        for f in (out / name.replace(":", "-")).glob("*.jsonl"):
            f.unlink()
    if start_workers:
        from cord.coordinator.fleet import FleetError, LocalFleet

        with LocalFleet(config_path, ".run", cfg=cfg, echo=click.echo) as fleet:
            try:
                fleet.up()
            except FleetError as e:
                raise click.ClickException(str(e)) from e
            report = evaluate(cfg, problems, names, out)
    else:
        report = evaluate(cfg, problems, names, out)
    click.echo(json.dumps(report) if as_json else format_table(report))


@main.command(context_settings={"ignore_unknown_options": True})
@config_option
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0 in a cluster.")
@click.option(
    "--auth-file",
    type=click.Path(dir_okay=False),
    default=".run/flower-auth",
    show_default=True,
    help="user:password used when FLOWER_BASIC_AUTH is unset (generated if missing).",
)
@click.option(
    "--inspect-every",
    type=click.FloatRange(min=1.0),
    default=15.0,
    show_default=True,
    help="Seconds between inspections of the workers (their queues, late joiners).",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(
    config_path: str,
    port: int,
    address: str,
    auth_file: str,
    inspect_every: float,
    flower_args: tuple[str, ...],
) -> None:
    """Flower (Celery's web monitor) on the run's broker, behind basic auth.

    Credentials: FLOWER_BASIC_AUTH=user:password, else those in --auth-file (created
    with a random password for user `cord` when missing). Other Flower options go after
    `--` or in FLOWER_<OPTION> variables."""
    from cord.coordinator.flower import FlowerError, resolve_auth, run_flower

    cfg = _load(config_path)
    try:
        _, source = resolve_auth(Path(auth_file))
        click.echo(
            f"flower on http://{address}:{port}/ for {redact_url(cfg.redis_url)}; "
            f"basic auth from {source}",
            err=True,
        )
        code = run_flower(cfg, port, address, Path(auth_file), flower_args, inspect_every)
    except FlowerError as e:
        raise click.UsageError(str(e)) from e
    sys.exit(code)


@main.command("redis-up")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--url", default=None, help="Redis URL (default: the config's redis_url).")
@click.option(
    "--dir",
    "data_dir",
    default=".run/redis",
    show_default=True,
    help="Where a started server keeps its AOF and log.",
)
@click.option("--foreground", is_flag=True, help="Run the server in the foreground (Procfile).")
@click.option(
    "--replica",
    is_flag=True,
    help="A primary, a replica and three Sentinels, for a redis+sentinel:// URL (default "
    f"{DEFAULT_SENTINEL_URL}); implied by such a URL.",
)
@click.option(
    "--data-ports",
    default="6380,6381",
    show_default=True,
    help="With Sentinels: the ports of the primary and the replica.",
)
def redis_up(
    config_path: str | None,
    url: str | None,
    data_dir: str,
    foreground: bool,
    replica: bool,
    data_ports: str,
) -> None:
    """Start a local Redis (with AOF) unless one already answers at the URL; with
    --replica (or a redis+sentinel:// URL), a primary, its replica and the URL's
    Sentinels, to try a failover on one machine."""
    from cord.coordinator.redis_server import RedisUnavailable, SentinelGroup, ping, start_redis

    target = url or (_load(config_path).redis_url if config_path else None)
    if target is None and replica:
        target = DEFAULT_SENTINEL_URL
    if target is None:
        raise click.UsageError("give --config or --url (or --replica for a local Sentinel group)")
    if replica and not parse_sentinel(target):
        raise click.UsageError(
            f"--replica needs a redis+sentinel:// URL naming the Sentinels to start, e.g. "
            f"{DEFAULT_SENTINEL_URL}; {redact_url(target)} names one server"
        )
    try:
        if ping(target):
            click.echo(f"redis answers at {redact_url(target)}")
            if foreground:
                signal.pause()
            return
        if replica or parse_sentinel(target):
            ports = _two_ports(data_ports)
            group = SentinelGroup(target, data_dir, ports)
            group.start(daemonize=not foreground)
            click.echo(
                f"started a primary on 127.0.0.1:{ports[0]}, its replica on 127.0.0.1:"
                f"{ports[1]} and Sentinels (data in {data_dir}); point cord at them: "
                f"CORD_REDIS_URL={redact_url(target)}"
            )
            if foreground:  # until SIGINT or SIGTERM, then the whole group
                stop = threading.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: stop.set())
                while not stop.wait(1.0):
                    pass
                group.stop()
            return
        proc = start_redis(target, data_dir, daemonize=not foreground)
    except RedisUnavailable as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"started redis at {redact_url(target)} (data in {data_dir})")
    if proc is not None:
        sys.exit(proc.wait())


def _two_ports(text: str) -> tuple[int, int]:
    try:
        first, second = (int(p) for p in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: two port numbers, comma-separated (6380,6381)", param_hint="--data-ports"
        ) from None
    return first, second


@main.group(cls=CoordGroup)
def ops() -> None:
    """Deployment material rendered from the run config (docs/deploy.md)."""


@ops.command("render")
@config_option
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for k8s/ and skypilot/ (files an earlier render made there are replaced).",
)
def ops_render(config_path: str, out_dir: str) -> None:
    """Write Kubernetes manifests and SkyPilot tasks for this config.

    Kubernetes: per pool a worker Deployment and a KEDA ScaledObject on its queues, the
    coordinator, Redis with AOF, Flower behind basic auth. SkyPilot: per pool a managed
    spot job task. Queue names, models and the config itself come from the config."""
    from cord.coordinator.deploy.render import render_config, write_rendered

    try:
        rendered = render_config(config_path)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    written = write_rendered(rendered, Path(out_dir))
    for warning in rendered.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {len(written)} files under {out_dir} (k8s/, skypilot/)")


# -- a finished run's rows: export and report ---------------------------------------------
def _run_dir_options(f: Any) -> Any:
    """--in, --match and the file prefixes, shared by `export` and `report`."""
    for option in reversed(
        [
            click.option(
                "--in",
                "in_dir",
                required=True,
                type=click.Path(exists=True, file_okay=False),
                help="The --out folder of `cord-coord run` (traces.jsonl, failed.jsonl) "
                "or of `cord-coord eval` (one folder per strategy).",
            ),
            click.option(
                "--match",
                type=click.Choice(MATCH_METHODS),
                default=None,
                help="Judge every row's answer again with this method (default: keep the "
                "rows' own `correct`; rows without one are judged with math).",
            ),
            click.option("--traces-prefix", default="traces", show_default=True),
            click.option("--failed-prefix", default="failed", show_default=True),
        ]
    ):
        f = option(f)
    return f


def _read_run_dir(in_dir: str, match: str | None, traces_prefix: str, failed_prefix: str) -> Any:
    from cord.coordinator.rundir import RunDirError, read_run_dir

    try:
        return read_run_dir(in_dir, traces_prefix, failed_prefix, cast(Any, match))
    except RunDirError as e:
        raise click.BadParameter(str(e), param_hint="--in") from e


@main.command("export")
@_run_dir_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "parquet", "hf"]),
    default="jsonl",
    show_default=True,
    help="hf: a datasets.save_to_disk folder (load_from_disk).",
)
@click.option("--out", "out_path", required=True, type=click.Path(), help="File (folder for hf).")
@click.option("--correct-only", is_flag=True, help="Only traces whose final answer is right.")
@click.option(
    "--min-score",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Only traces with S (0 to 1) at least this.",
)
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    help="Only this strategy's traces (repeatable; an eval folder has several).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export_cmd(
    in_dir: str,
    match: str | None,
    traces_prefix: str,
    failed_prefix: str,
    fmt: str,
    out_path: str,
    correct_only: bool,
    min_score: float | None,
    strategies: tuple[str, ...],
    force: bool,
) -> None:
    """Write a run's traces as a training set for TRL's SFTTrainer.

    Columns: id, messages ([user, assistant]), prompt ([user]) and completion
    ([assistant]), then provenance: question, reference_answer, final_answer, correct,
    correct_by, score (S), strategy, teachers (of each chosen step), answer_teacher,
    steps, thinking/answer/generated tokens, tokens_by_teacher, wall_s. Given both
    forms, SFTTrainer trains on prompt/completion (loss on the completion); drop them
    with dataset.remove_columns(["prompt", "completion"]) to train on messages."""
    from cord.coordinator.export import ExportError, export

    run = _read_run_dir(in_dir, match, traces_prefix, failed_prefix)
    try:
        picked = list(strategies) or None
        result = export(run, out_path, cast(Any, fmt), correct_only, min_score, picked, force)
    except ExportError as e:
        raise click.UsageError(str(e)) from e
    why = []
    if correct_only:
        why.append(f"{result.not_correct} not correct")
    if min_score is not None:
        why.append(f"{result.below_score} with S below {min_score:g}")
    click.echo(
        f"wrote {result.written} of {result.total} traces to {result.path} ({fmt}); "
        f"filtered out {result.filtered}" + (f" ({', '.join(why)})" if why else "")
    )
    if result.failed:
        click.echo(f"{result.failed} failed problem(s) have no trace and are not exported")


@main.command("report")
@_run_dir_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for index.html and its PNGs (replaced if there).",
)
def report_cmd(
    in_dir: str, match: str | None, traces_prefix: str, failed_prefix: str, out_dir: str
) -> None:
    """Write an HTML page with plots of a run: accuracy and S per strategy, S of right and
    wrong traces, which teacher wrote each chosen step, tokens per teacher, time per
    problem. Static: open <out>/index.html in any browser."""
    from cord.coordinator.report import write_report

    run = _read_run_dir(in_dir, match, traces_prefix, failed_prefix)
    report = write_report(run, out_dir)
    click.echo(
        f"wrote {report.index} with {len(report.plots)} plots "
        f"({len(run.traces)} traces, {len(run.failed)} failed, {len(run.runs)} "
        f"{'strategy' if len(run.runs) == 1 else 'strategies'})"
    )


if __name__ == "__main__":
    main()
