"""The run config: one pydantic model, loaded from YAML and validated once at the edge.

Errors name the field and the fix. ``CORD_REDIS_URL`` overrides ``redis_url`` and
``CORD_NAMESPACE`` overrides ``namespace`` (`cord.common.env`). docs/config.md is the
reference for every field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from cord.common import env, prompts
from cord.common.keys import queue_name
from cord.common.messages import TaskKind
from cord.common.pools import (
    ENGINES,
    META_PROVER_MAX_BATCH,
    NAME_PATTERN,
    AnyModelSpec,
    ModelName,
    ModelSpec,
    Strict,
)
from cord.common.redisconn import check_url


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field and the fix."""


class PromptSpec(Strict):
    template: str = Field(
        default=prompts.DEFAULT_TEMPLATE,
        description="the user turn; {question} is replaced by the problem's question",
    )

    @model_validator(mode="after")
    def _has_question(self) -> PromptSpec:
        if "{question}" not in self.template:
            raise ValueError("prompt.template must contain {question}")
        return self

    def render(self, question: str) -> str:
        return prompts.user_prompt(question, self.template)


# How a record writes its reference answer (`cord.coordinator.inputs.answers`): the whole
# field, the text after GSM8K's last `####`, or the last `\boxed{...}` (MATH).
AnswerFrom = Literal["field", "gsm8k", "boxed"]


class InputSpec(Strict):
    """Where a record keeps its question, reference answer and id (the run config's
    ``input:``; each has a ``cord-coord enqueue``/``eval`` flag that overrides it)."""

    question_field: str | None = Field(
        default=None,
        description="the field with the question; default `question`, or its alias `problem`",
    )
    answer_field: str = Field(
        default="answer", description="the field with the reference answer (or the text it is in)"
    )
    answer_from: AnswerFrom = Field(
        default="field",
        description="how the reference is written in `answer_field`: `field`, the whole "
        "value; `gsm8k`, the text after the last `####`; `boxed`, the last `\\boxed{...}`",
    )
    answers_as_text: bool = Field(
        default=False,
        description='take a number in the answer field as its text (`72` as "72"): '
        "AIME-style sets stored with integer answers; off, a number is refused",
    )
    id_field: str | None = Field(
        default=None,
        description="the field with each problem's id (then every record needs one); "
        "default `id` where a record has it, else a digest of the question",
    )
    split: str | None = Field(
        default=None,
        description="a dataset folder's or Hub dataset's split (default: its only split)",
    )
    subset: str | None = Field(
        default=None, description="a Hub dataset's configuration (`load_dataset`'s name)"
    )


class SearchSpec(Strict):
    strategy: str = "cord"
    beam_width: int = Field(default=4, ge=1)
    samples_per_beam: int = Field(default=1, ge=1, description="samples per teacher per beam")
    temperature: float = Field(default=0.6, ge=0.0)
    thinking_budget: int = Field(
        default=16384, ge=1, description="tokens of thinking per trajectory"
    )
    answer_budget: int = Field(default=4096, ge=1, description="tokens of the final answer")
    max_step_tokens: int = Field(default=1024, ge=1, description="tokens per step before it is cut")
    answers: Literal["best", "all"] = Field(
        default="best",
        description="cord: which complete trajectories get a final answer: `best`, the trace "
        "only, written once no beam is live (one answer per problem, as curation writes); "
        "`all`, each as it completes (the alternatives then carry answers too)",
    )
    straggler_cut: int = Field(
        default=0,
        ge=0,
        description="cord: select once all but this many of a step's candidates are "
        "scored; the slowest are left out and their late results ignored. 0 (the "
        "default) waits for every candidate, the only setting whose rows do not depend "
        "on which server was slow",
    )
    curation_samples: int | None = Field(
        default=None,
        ge=1,
        description="trajectories per teacher for curation; "
        "default beam_width x samples_per_beam (CoRD's generated tokens)",
    )
    mcts_tokens: int | None = Field(
        default=None,
        ge=1,
        description="generated tokens per problem for mcts; default beam_width x "
        "samples_per_beam x teachers x thinking_budget (eval matches it to CoRD's)",
    )
    mcts_c: float = Field(
        default=0.1,
        ge=0.0,
        description="mcts: UCB's exploration weight (S differs by tenths between steps)",
    )
    seed: int = 0


class OutputSpec(Strict):
    dir: str = "data"
    traces_prefix: str = "traces"
    failed_prefix: str = "failed"
    keep_alternatives: bool = True


class EvalSpec(Strict):
    match: Literal["math", "exact"] = Field(
        default="math",
        description="how a final answer is checked against the reference "
        "(cord.coordinator.matching): `math` compares them as mathematics with math-verify, "
        "exact matching where it finds nothing to compare; `exact` only exact matching",
    )


class ReliabilitySpec(Strict):
    task_timeout_s: float = Field(default=600.0, gt=0, description="re-dispatch a task after this")
    max_attempts: int = Field(
        default=3, ge=1, description="tries per task before the problem fails"
    )
    visibility_timeout_s: int = Field(
        default=7200, ge=60, description="broker redelivery of unacked tasks"
    )
    heartbeat_s: float = Field(default=5.0, gt=0)
    worker_lost_s: float = Field(
        default=15.0,
        gt=0,
        description="a worker silent this long is gone: its running task is sent elsewhere",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lost(self) -> ReliabilitySpec:
        if self.worker_lost_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"reliability.worker_lost_s ({self.worker_lost_s:g}) must be at least twice "
                f"reliability.heartbeat_s ({self.heartbeat_s:g}), or live workers look lost"
            )
        return self

    lease_s: float = Field(
        default=30.0, gt=0, description="a dead coordinator's problems are taken over after this"
    )
    reply_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="a coordinator's reply stream expires this long after its last write or "
        "the coordinator's last lease renewal: a killed coordinator's stream goes away",
    )

    @model_validator(mode="after")
    def _reply_outlives_renewal(self) -> ReliabilitySpec:
        if self.reply_ttl_s < self.lease_s:
            raise ValueError(
                f"reliability.reply_ttl_s ({self.reply_ttl_s:g}) must be at least "
                f"reliability.lease_s ({self.lease_s:g}): a live coordinator refreshes it "
                "every third of lease_s"
            )
        return self

    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="after SIGTERM a worker finishes its task within this, else hands it back",
    )


class RoutingSpec(Strict):
    affinity: bool = Field(
        default=True,
        description="send a problem's work to the worker of each pool that served it before "
        "(its prefix is cached there); off: every task goes to the pool's shared queue",
    )
    balance_tasks: float = Field(
        default=4.0,
        ge=0,
        description="a problem leaves its worker when that worker has more than this many "
        "tasks' worth of items outstanding (the pool's max_batch x concurrency each) beyond "
        "the pool's least loaded worker; higher keeps prefixes where they are cached longer",
    )


HOLD_S = 0.2  # an in-worker engine's partial batch waits this long at most


class SchedulingSpec(Strict):
    """How work reaches the pools; the defaults keep GPUs busy across CoRD's step barrier
    (docs/config.md, "scheduling")."""

    stream_results: bool = Field(
        default=True,
        description="workers reply per item as items finish, not once per task: a finished "
        "candidate is scored while the slowest of its task still runs",
    )
    hold_s: float | None = Field(
        default=None,
        ge=0,
        description="longest a partial batch waits for more work of its pool; None = 0.2 s "
        "for in-worker engines (fuller batches pay there), 0 for servers that batch "
        "continuously",
    )
    kv_admission: bool = Field(
        default=True,
        description="admit problems while the pools' KV caches (as their workers report "
        "them) hold their sequences; max_in_flight stays the ceiling",
    )

    def hold_of(self, continuous_batching: bool) -> float:
        if self.hold_s is not None:
            return self.hold_s
        return 0.0 if continuous_batching else HOLD_S


class MetricsSpec(Strict):
    """Prometheus endpoints; a port left out (None) turns that endpoint off."""

    host: str = Field(
        default="127.0.0.1", description="address the metrics endpoints bind; 0.0.0.0 in a cluster"
    )
    coordinator_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="`cord-coord run` serves /metrics on the first free port from this one",
    )
    worker_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="each `cord-worker` serves /metrics on the first free port from this one "
        "(several workers share a host); 0 = any free port",
    )


# Kubernetes object and namespace names: a DNS-1123 label.
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class RedisDeploySpec(Strict):
    """The Redis a cluster fleet uses (`cord-coord ops render`, docs/deploy.md)."""

    in_cluster: bool = Field(
        default=True, description="render a Redis StatefulSet (AOF on, password from the Secret)"
    )
    address: str | None = Field(
        default=None,
        pattern=r"^[^\s:/]+:[0-9]{1,5}$",
        description="host:port KEDA reads queue lengths from; default the in-cluster Service",
    )
    database: int = Field(default=0, ge=0, description="the database index of CORD_REDIS_URL")
    tls: bool = Field(default=False, description="KEDA talks TLS to Redis (a rediss:// URL)")
    image: str = "redis:7.4"
    storage: str = Field(default="10Gi", description="the AOF volume of the in-cluster Redis")

    @model_validator(mode="after")
    def _address_known(self) -> RedisDeploySpec:
        if not self.in_cluster and self.address is None:
            raise ValueError(
                "deploy.redis.address: required when deploy.redis.in_cluster is false "
                "(KEDA reads queue lengths there), e.g. address: redis.example.com:6379"
            )
        return self


class DeploySpec(Strict):
    """How `cord-coord ops render` lays the fleet out on Kubernetes and SkyPilot.

    Per-pool settings are maps from pool name to value; pools not named get the default."""

    image: str = Field(default="cord:latest", description="container image with cord installed")
    namespace: Annotated[str, Field(pattern=K8S_NAME_PATTERN)] = "cord"
    config_path: str = Field(
        default="/etc/cord/run.yaml",
        pattern=r"^/",
        description="where containers find the run config (mounted from a ConfigMap)",
    )
    models_volume: str | None = Field(
        default=None, description="PersistentVolumeClaim with the weights, mounted in workers"
    )
    models_mount: str = Field(default="/models", pattern=r"^/", description="where it is mounted")
    gpu_resource: str = "nvidia.com/gpu"
    default_gpus: int = Field(default=1, ge=0, description="GPUs per worker")
    gpus: dict[ModelName, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    default_max_replicas: int = Field(default=4, ge=1, description="workers per pool at most")
    max_replicas: dict[ModelName, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    cpu: str = Field(default="4", description="CPU request of a worker")
    memory: str = Field(default="32Gi", description="memory request of a worker")
    spot: Literal["gke", "karpenter", "none"] = Field(
        default="gke", description="node selector and tolerations preset for spot GPU nodes"
    )
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, str]] | None = None
    drain_margin_s: float = Field(
        default=15.0,
        ge=0,
        description="termination grace beyond reliability.shutdown_grace_s (unload, exit)",
    )
    watch_spot_notice: bool = Field(
        default=False, description="run Kubernetes workers under cord-spot-watch too"
    )
    queue_per_replica: int = Field(
        default=2, ge=1, description="KEDA listLength: waiting tasks per worker"
    )
    polling_s: int = Field(default=15, ge=1, description="KEDA pollingInterval")
    cooldown_s: int = Field(default=300, ge=0, description="KEDA cooldownPeriod before zero")
    coordinator_storage: str = Field(default="10Gi", description="the coordinator's output volume")
    accelerator: str = Field(default="A100", description="SkyPilot accelerator type")
    accelerators: dict[ModelName, str] = Field(default_factory=dict)
    infra: str | None = Field(default=None, description="SkyPilot resources.infra, e.g. aws")
    redis: RedisDeploySpec = RedisDeploySpec()

    def check_pools(self, pools: list[str]) -> None:
        """Per-pool maps may name only the config's pools (a typo would be ignored)."""
        for field in ("gpus", "max_replicas", "accelerators"):
            unknown = sorted(set(getattr(self, field)) - set(pools))
            if unknown:
                raise ValueError(f"deploy.{field}: {unknown} name no pool; pools are {pools}")

    def gpus_of(self, pool: str) -> int:
        return self.gpus.get(pool, self.default_gpus)

    def max_replicas_of(self, pool: str) -> int:
        return self.max_replicas.get(pool, self.default_max_replicas)

    def accelerators_of(self, pool: str) -> str | None:
        """SkyPilot `resources.accelerators` of one worker; None for a CPU pool."""
        if pool in self.accelerators:
            return self.accelerators[pool]
        n = self.gpus_of(pool)
        return f"{self.accelerator}:{n}" if n else None


class RunConfig(Strict):
    redis_url: Annotated[str, AfterValidator(check_url)] = env.DEFAULT_REDIS_URL
    namespace: Annotated[str, Field(pattern=NAME_PATTERN)] = "cord"
    teachers: list[ModelSpec] = Field(min_length=1)
    meta_prover: ModelSpec
    prompt: PromptSpec = PromptSpec()
    input: InputSpec = InputSpec()
    search: SearchSpec = Field(default_factory=SearchSpec)
    max_in_flight: int = Field(
        default=64, ge=1, description="problems the coordinator drives at once"
    )
    output: OutputSpec = OutputSpec()
    eval: EvalSpec = EvalSpec()
    reliability: ReliabilitySpec = ReliabilitySpec()
    routing: RoutingSpec = RoutingSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    metrics: MetricsSpec = MetricsSpec()
    deploy: DeploySpec = DeploySpec()

    @model_validator(mode="before")
    @classmethod
    def _meta_prover_batch(cls, data: Any) -> Any:
        """The meta-prover's `max_batch` defaults to 32 (scoring items are cheap)."""
        if isinstance(data, dict) and isinstance(data.get("meta_prover"), dict):
            mp = data["meta_prover"]
            if "max_batch" not in mp:
                data = {**data, "meta_prover": {**mp, "max_batch": META_PROVER_MAX_BATCH}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [t.name for t in self.teachers]
        for index, t in enumerate(self.teachers):
            if t.model is None:
                raise ValueError(f"teachers.{index}.model: required field is missing ({t.name})")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teachers: names must be unique, {dupes} repeat")
        mp = self.meta_prover
        if mp.model is None and mp.name not in names:
            raise ValueError(
                f"meta_prover: give `model`, or set `name` to one of the teachers {names} "
                f"(now {mp.name!r})"
            )
        if mp.name in names and mp.model is not None:
            teacher = self.teacher(mp.name)
            if teacher.model != mp.model:
                raise ValueError(
                    f"meta_prover: name {mp.name!r} is a teacher with model {teacher.model!r}; "
                    "leave meta_prover.model out or give the meta-prover its own name"
                )
        self.deploy.check_pools(self.model_names)
        return self

    # -- derived views -------------------------------------------------------------
    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def teacher(self, name: str) -> AnyModelSpec:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def model_names(self) -> list[str]:
        """Every pool: the teachers, and the meta-prover when it is not one of them."""
        names = self.teacher_names
        return names if self.meta_prover.name in names else [*names, self.meta_prover.name]

    def pool(self, name: str) -> AnyModelSpec:
        """The spec a worker of pool `name` loads (a teacher's, or the meta-prover's)."""
        if name in self.teacher_names:
            return self.teacher(name)
        mp = self.meta_prover
        if name != mp.name:
            raise ConfigError(
                f"no model named {name!r} in this config; pools are {self.model_names}"
            )
        assert mp.model is not None  # guaranteed by _cross_checks
        return mp

    def pool_kinds(self, name: str) -> list[TaskKind]:
        """The task kinds pool `name` serves: expansion (and answers) for a teacher,
        scoring for the meta-prover, both for a teacher that also scores."""
        kinds: list[TaskKind] = []
        if name in self.teacher_names:
            kinds.append("expand")
        if name == self.meta_prover.name:
            kinds.append("score")
        return kinds

    def pool_queues(self, name: str) -> list[str]:
        """The shared queues the workers of pool `name` consume."""
        return [queue_name(self.namespace, k, name) for k in self.pool_kinds(name)]

    def temperature(self, teacher: str) -> float:
        t = self.teacher(teacher).temperature
        return self.search.temperature if t is None else t


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid run config:"]
    for e in err.errors():
        # A pool's errors are located under its engine's tag (teachers.0.vllm.port):
        # the tag is not a field the user wrote, so it is left out.
        parts = e["loc"]
        tags = [
            i
            for i, p in enumerate(parts)
            if p in ENGINES
            and i > 0
            and (isinstance(parts[i - 1], int) or parts[i - 1] == "meta_prover")
        ]
        loc = ".".join(str(p) for i, p in enumerate(parts) if i not in tags)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            engine = f" of engine {parts[tags[0]]}" if tags else ""
            msg = f"unknown field{engine}; check its spelling against docs/config.md"
        elif e["type"] == "missing":
            msg = "required field is missing"
        # Cross-field checks run on the whole config and name their fields themselves.
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def _resolve_model_paths(data: dict, base: Path) -> None:
    """A relative model path resolves against the config file's folder when it exists
    there; anything else (a hub id, an absolute path) is kept as written."""
    entries = [*(data.get("teachers") or []), data.get("meta_prover") or {}]
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            p = Path(entry["model"]).expanduser()
            if not p.is_absolute() and (base / p).exists():
                entry["model"] = str((base / p).resolve())


def load_config(
    path: str | os.PathLike[str], overrides: dict | None = None, resolve_models: bool = True
) -> RunConfig:
    """Load, resolve and validate a run config; raise ConfigError naming the field.

    ``resolve_models=False`` keeps model paths as written (`ops render` ships the config
    to other machines, where this machine's absolute paths mean nothing)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the run config ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the run config must be a YAML mapping of fields")
    if resolve_models:
        _resolve_model_paths(data, p.resolve().parent)
    return config_from_dict(data, source=str(p), overrides=overrides)


def config_from_dict(
    data: dict, source: str = "config", overrides: dict | None = None
) -> RunConfig:
    data = dict(data)
    if url := env.redis_url():
        data["redis_url"] = url
    if ns := env.namespace():
        data["namespace"] = ns
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    bench = [n for n in cfg.model_names if cfg.pool(n).engine in BENCH_ENGINES]
    if bench and not _bench_engine_allowed:
        engines = sorted({cfg.pool(n).engine for n in bench})
        raise ConfigError(
            f"{source}: pools {bench} use `engine: {'/'.join(engines)}`, which returns "
            "placeholder text for benchmarks and never makes data; it runs only under the "
            "benchmark harness (python ops/bench/fleet.py, make bench). Use engine hf, "
            "vllm or sglang"
        )
    return cfg


# Engines whose text is a placeholder: `bench` (workers/engines/bench.py) answers at once,
# `sim` (workers/engines/sim.py) after a simulated GPU's time.
BENCH_ENGINES = ("bench", "sim")
# The `bench` engine (workers/engines/bench.py) answers with placeholder text at once.
# Only the benchmark harness turns it on, inside its own processes, and it discards the
# rows; any other config load (cord-coord run/demo/eval, cord-worker) refuses it.
_bench_engine_allowed = False


def allow_bench_engine() -> None:
    """Let this process load configs with `engine: bench` (ops/bench/ only)."""
    global _bench_engine_allowed
    _bench_engine_allowed = True


def _set_dotted(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
