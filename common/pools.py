"""A model pool's spec: a teacher or the meta-prover, one model class per engine (a union
on ``engine``), each holding only its own settings: a field of another engine is refused
by name. Part of the run config (`cord.common.config.RunConfig.teachers`,
``meta_prover``); docs/config.md is the reference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"
ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    """A section of the run config: unknown fields are errors, values are fixed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _PoolSpec(Strict):
    """What every pool has, whatever runs its model. A pool's spec is one of the engine
    models below (`ModelSpec`, a union on `engine`): each holds only its own settings."""

    name: ModelName
    model: str | None = Field(
        default=None,
        description="HF path or hub id; relative paths resolve against the config "
        "(required for teachers; a meta-prover that names a teacher uses the teacher's)",
    )
    temperature: float | None = Field(
        default=None, ge=0.0, description="overrides search.temperature"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch: int = Field(default=16, ge=1, description="items per task sent to this pool")

    @property
    def task_slots(self) -> int:
        """Tasks one worker of this pool runs at once (an in-worker engine: one)."""
        return 1

    @property
    def parallel(self) -> int:
        """GPUs one server of this pool spans (its tensor parallelism; in a worker: one)."""
        return 1

    @property
    def continuous_batching(self) -> bool:
        """Whether the pool's runtime batches requests as they come (a server, or the
        simulated GPU): then a partial batch gains nothing by waiting for more work."""
        return False


# Threads of a pool's compute on a CPU: the hf engine's torch threads, a CPU vLLM
# server's OpenMP threads. Several workers or servers share a host here, and threads that
# outnumber the cores spin against each other: four CPU vLLM servers with vLLM's default
# (a thread per core) ran the 12-problem bench 5x slower than with one thread each.
CpuThreads = Annotated[
    int,
    Field(ge=1, description="threads per worker (or CPU server) on CPU; 1 unless it has the host"),
]


class HFSpec(_PoolSpec):
    """`engine: hf`: transformers + torch inside the worker (workers/engines/hf.py)."""

    engine: Literal["hf"] = "hf"
    prefix_cache_tokens: int = Field(
        default=65536, ge=0, description="LRU prefix KV cache size in tokens; 0 = off"
    )
    cpu_threads: CpuThreads = 1


class BenchSpec(_PoolSpec):
    """`engine: bench`: placeholder text at once, for overhead benchmarks only."""

    engine: Literal["bench"] = "bench"


class _Batching(_PoolSpec):
    """A runtime that batches requests as they come (a server, the simulated GPU): a
    worker runs `concurrency` tasks at once and their requests reach it together."""

    concurrency: int = Field(
        default=4,
        ge=1,
        description="tasks a worker runs at once: their requests reach the server together, "
        "which batches them (one task at a time leaves it idle between tasks and draining "
        "at the end of each)",
    )

    @property
    def task_slots(self) -> int:
        return self.concurrency

    @property
    def continuous_batching(self) -> bool:
        return True


class _ServerSpec(_Batching):
    """An inference server per worker, launched and supervised or attached
    (workers/engines/server.py). Each engine names its own url/launch/port/args fields;
    `server_url`, `launch`, `port` and `extra_args` read them for the supervisor."""

    startup_timeout_s: float = Field(
        default=900.0, gt=0, description="wait this long for a launched server to be ready"
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="a request longer than this fails, retryable"
    )
    health_timeout_s: float = Field(
        default=30.0, gt=0, description="timeout of one health probe of the server"
    )
    health_interval_s: float = Field(
        default=30.0, gt=0, description="a launched server is probed this often"
    )
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        description="the GPUs a launched server uses (its CUDA_VISIBLE_DEVICES), one per "
        "tensor-parallel rank, e.g. [2, 3]; None: the GPU `device` names (cuda:N), else "
        "every GPU the worker sees. `cord-worker --gpus 2,3` sets it per worker",
    )

    @property
    def visible_gpus(self) -> list[int] | None:
        """The launched server's CUDA_VISIBLE_DEVICES; None leaves the worker's."""
        if self.gpus is not None:
            return self.gpus
        if self.device.startswith("cuda:"):
            return [int(self.device.split(":", 1)[1])]
        return None

    @model_validator(mode="after")
    def _gpus_fit(self) -> _ServerSpec:
        if self.gpus is not None and self.device.startswith("cpu"):
            raise ValueError("gpus is set but device is cpu; set device: cuda")
        if self.gpus is not None and len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus {self.gpus} names a GPU twice")
        have = self.visible_gpus
        if have is not None and len(have) != self.parallel:
            raise ValueError(
                f"the server spans {self.parallel} GPU(s) (tensor parallelism) but is given "
                f"{len(have)} ({have}); list one GPU per rank in gpus, e.g. "
                f"{list(range(self.parallel))}"
            )
        return self

    @property
    def server_url(self) -> str | None:
        raise NotImplementedError

    @property
    def launch(self) -> list[str]:
        raise NotImplementedError

    @property
    def port(self) -> int | None:
        raise NotImplementedError

    @property
    def extra_args(self) -> list[str]:
        raise NotImplementedError


class SGLangSpec(_ServerSpec):
    """`engine: sglang` (workers/engines/sglang.py)."""

    engine: Literal["sglang"] = "sglang"
    sglang_url: str | None = Field(
        default=None,
        description="attach to this running SGLang server (http://host:port) instead of "
        "launching one; nothing is restarted then",
    )
    sglang_launch: list[str] = Field(
        default=["python", "-m", "sglang.launch_server"],
        min_length=1,
        description="the command that starts the server (the worker adds --model-path, "
        "--host, --port, ...); a first word `python` is the worker's own interpreter",
    )
    sglang_port: int | None = Field(
        default=None, ge=1, le=65535, description="port of the launched server; None = a free one"
    )
    sglang_args: list[str] = Field(
        default=[], description="extra launch_server arguments, e.g. [--context-length, '32768']"
    )
    sglang_deterministic: bool = Field(
        default=True,
        description="launch with --enable-deterministic-inference: SGLang honours a "
        "request's sampling_seed only then (a re-sent item samples the same text)",
    )
    tp_size: int = Field(default=1, ge=1, description="tensor parallel GPUs of the server")
    mem_fraction_static: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="GPU memory for weights and KV; None = SGLang's"
    )

    @property
    def parallel(self) -> int:
        return self.tp_size

    @property
    def server_url(self) -> str | None:
        return self.sglang_url

    @property
    def launch(self) -> list[str]:
        return self.sglang_launch

    @property
    def port(self) -> int | None:
        return self.sglang_port

    @property
    def extra_args(self) -> list[str]:
        return self.sglang_args


class VLLMSpec(_ServerSpec):
    """`engine: vllm` (workers/engines/vllm.py): vLLM's OpenAI-compatible server."""

    engine: Literal["vllm"] = "vllm"
    vllm_url: str | None = Field(
        default=None,
        description="attach to this running vLLM server (http://host:port) instead of "
        "launching one; nothing is restarted then",
    )
    vllm_launch: list[str] = Field(
        default=["python", "-m", "vllm.entrypoints.openai.api_server"],
        min_length=1,
        description="the command that starts the server (the worker adds --model, --host, "
        "--port, ...); a first word `python` is the worker's own interpreter",
    )
    vllm_port: int | None = Field(
        default=None, ge=1, le=65535, description="port of the launched server; None = a free one"
    )
    vllm_args: list[str] = Field(
        default=[],
        description="extra api_server arguments, e.g. [--gpu-memory-utilization, '0.85']",
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="--max-model-len of the launched server; None = vLLM's"
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="--tensor-parallel-size of the launched server"
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0.0, le=1.0, description="--gpu-memory-utilization; None = vLLM's"
    )
    cpu_kvcache_gib: float = Field(
        default=1.0,
        gt=0,
        description="GiB of KV cache of a launched server on device cpu "
        "(--kv-cache-memory-bytes; vLLM's own default takes far more)",
    )
    cpu_threads: CpuThreads = 1

    @property
    def parallel(self) -> int:
        return self.tensor_parallel_size

    @property
    def server_url(self) -> str | None:
        return self.vllm_url

    @property
    def launch(self) -> list[str]:
        return self.vllm_launch

    @property
    def port(self) -> int | None:
        return self.vllm_port

    @property
    def extra_args(self) -> list[str]:
        return self.vllm_args


class SimSpec(_Batching):
    """`engine: sim`: one simulated GPU serving one model, for cost benchmarks only
    (workers/engines/sim.py): continuous batching priced by a roofline of `model` (a shape
    named in the engine's table) on `card`, a block prefix cache of the card's KV
    capacity, and step, trace and answer lengths drawn from the ranges below. Its texts
    are placeholders: nothing it produces is data."""

    engine: Literal["sim"] = "sim"
    card: str = Field(default="h100-sxm", description="a card of the engine's table")
    time_scale: float = Field(default=0.05, gt=0, description="real seconds per simulated second")
    concurrency: int = Field(default=64, ge=1, description="tasks a worker runs at once")
    max_seqs: int | None = Field(
        default=None, ge=1, description="sequences decoded at once; None = the card's"
    )
    block_tokens: int = Field(default=16, ge=1, description="tokens per KV cache block")
    kv_tokens: int | None = Field(
        default=None, ge=1, description="KV cache capacity; None = what the card leaves"
    )
    prompt_tokens: tuple[int, int] = (150, 250)
    step_tokens: tuple[int, int] = (100, 400)
    trace_tokens: tuple[int, int] = (2000, 16000)
    # Traces a teacher writes whole (curation), where they run otherwise than the ones
    # built step by step; None: trace_tokens.
    whole_trace_tokens: tuple[int, int] | None = None
    answer_tokens: int = Field(default=10, ge=1)
    same_step_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of candidates that write the same step as the others on their "
        "trajectory that do (identical trajectories are scored once)",
    )
    score_passes: Literal["one", "per_token"] = Field(
        default="one",
        description="a scoring item as one pass over context and answer (a server that "
        "returns prompt log-probs), or one prompt per answer token (the vllm engine's way)",
    )
    burn_cpu: bool = Field(
        default=False,
        description="a measured CPU server: each pass spins a core for its time, so the "
        "host's servers and the fleet share its cores as real CPU servers do",
    )
    # Measured costs instead of the roofline (a CPU server): seconds per decode pass
    # (base + per sequence [+ per token of context held]), per uncached prompt token, and
    # per request.
    decode_s: tuple[float, float] | tuple[float, float, float] | None = None
    prefill_token_s: float | None = None
    request_s: float = Field(default=0.0, ge=0)


META_PROVER_MAX_BATCH = 32  # scoring items per task unless meta_prover.max_batch says

ENGINES: tuple[str, ...] = ("hf", "sglang", "vllm", "bench", "sim")


def _engine_of(value: Any) -> str:
    """The union's tag: `engine` as written (hf when left out)."""
    if isinstance(value, dict):
        engine = value.get("engine", "hf")
        return engine if engine in ENGINES else str(engine)
    return str(getattr(value, "engine", "hf"))


# One model pool: a teacher or the meta-prover, one spec class per engine.
ModelSpec = Annotated[
    Annotated[HFSpec, Tag("hf")]
    | Annotated[SGLangSpec, Tag("sglang")]
    | Annotated[VLLMSpec, Tag("vllm")]
    | Annotated[BenchSpec, Tag("bench")]
    | Annotated[SimSpec, Tag("sim")],
    Discriminator(
        _engine_of,
        custom_error_type="engine",
        custom_error_message=f"unknown engine; use one of {', '.join(ENGINES)}",
    ),
]
AnyModelSpec = HFSpec | SGLangSpec | VLLMSpec | BenchSpec | SimSpec
ServerSpec = _ServerSpec
_MODEL_SPEC: TypeAdapter[AnyModelSpec] = TypeAdapter(ModelSpec)


def model_spec(**fields: Any) -> AnyModelSpec:
    """A pool's spec from its fields (`engine` picks the class; hf when left out)."""
    return _MODEL_SPEC.validate_python(fields)
