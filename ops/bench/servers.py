"""The fleet on inference servers: the lab's CoRD with every pool on a vLLM server
(vLLM's CPU build here), against the same fleet on the in-worker `hf` engine, on the
same problems. Part of `make bench` (ops/bench/run_all.py runs it as `vllm`).

    python ops/bench/servers.py --problems 12

Printed: per engine the wall time, generated tokens per second (all models, kept and
discarded steps, answers), the prompt tokens the prefix caches served (the rows' own
count) and, for vLLM, the share from the servers' own counters
(`vllm:prefix_cache_hits_total` over `vllm:prefix_cache_queries_total`, as each worker's
heartbeat reports them); last `vllm_vs_hf_wall_ratio=`. Server start-up is not timed.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import (
    SEED,
    Fleet,
    cache_share,
    emit,
    fleet_dict,
    lab_problems,
    machine,
    r3,
    redis_at,
    run_fleet,
    tokens_of,
)

from cord.common.config import allow_bench_engine
from cord.common.log import configure
from cord.common.messages import EngineStats


def server_share(stats: dict[str, EngineStats]) -> float | None:
    hits = sum(s.server_cache_hit_tokens or 0 for s in stats.values())
    queries = sum(s.server_cache_query_tokens or 0 for s in stats.values())
    return round(hits / queries, 4) if queries else None


@click.command()
@click.option("--redis-url", default=None, help="Default: CORD_REDIS_URL or the local one.")
@click.option("--problems", default=12, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write figures here.")
def main(redis_url: str | None, problems: int, json_path: str | None) -> None:
    import os

    configure(level="WARNING")
    allow_bench_engine()
    os.environ.pop("CORD_NAMESPACE", None)
    redis_url = redis_url or os.environ.get("CORD_REDIS_URL", "redis://127.0.0.1:6379/0")
    todo = lab_problems(problems, SEED + 7)
    figures: dict[str, Any] = {"servers_problems": problems}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        for engine in ("hf", "vllm"):
            ns = f"bench-{uuid.uuid4().hex[:8]}"
            fleet = Fleet(fleet_dict(redis_url, ns, engine=engine), Path(tmp))
            try:
                start_s = fleet.start(timeout_s=900)
                run = run_fleet(fleet.cfg, todo)
                stats = fleet.engine_stats()
            finally:
                fleet.stop()
            walls[engine] = run.wall_s
            tokens = tokens_of(run.rows) * len(run.rows)
            figures[f"{engine}_start_s"] = r3(start_s)
            figures[f"{engine}_wall_s"] = r3(run.wall_s)
            figures[f"{engine}_done"] = len(run.rows)
            figures[f"{engine}_failed"] = run.failed
            figures[f"{engine}_tokens_per_s"] = r3(tokens / run.wall_s if run.wall_s else 0.0)
            figures[f"{engine}_prefix_cache_hit"] = cache_share(run.rows)
            if engine == "vllm":
                figures["vllm_server_prefix_cache_hit"] = server_share(stats)
            click.echo(
                f"{engine}: {len(run.rows)} done in {run.wall_s:.1f}s, "
                f"{figures[f'{engine}_tokens_per_s']} generated tok/s, "
                f"cache {figures[f'{engine}_prefix_cache_hit']}",
                err=True,
            )
    figures["machine"] = machine()
    figures["vllm_vs_hf_wall_ratio"] = r3(walls["vllm"] / walls["hf"])
    emit(figures, json_path)


if __name__ == "__main__":
    main()
