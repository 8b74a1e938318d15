"""Cluster material rendered from the run config, so queue names and models always match.

    cord-coord ops render --config run.yaml --out ops/

writes ``k8s/`` (``kubectl apply -f``: namespace, the config as a ConfigMap, Redis with
AOF, the coordinator, Flower behind basic auth, and per pool a worker Deployment with a
KEDA ScaledObject on its queue) and ``skypilot/`` (per pool a managed spot job task,
``launch.sh`` that starts them, and the config they mount). Manifests are Python data
(Kubernetes ones in ``ops/deploy/k8s.py``) dumped by PyYAML's safe dumper; queue names
come from ``cord.common.keys.queue_name``, never spelled here. Secrets are never
written: containers read ``CORD_REDIS_URL`` and ``FLOWER_BASIC_AUTH`` from Secrets the
user creates (docs/deploy.md).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cord.common.config import ConfigError, RunConfig, load_config
from cord.coordinator.deploy.k8s import k8s_files, termination_grace_s

HEADER = "# Rendered by `cord-coord ops render`"
# cord-spot-watch exits with this (EX_TEMPFAIL) when a notice stopped the worker; the
# SkyPilot task lists it in recover_on_exit_codes, so the job is relaunched, not ended.
NOTICE_EXIT_CODE = 75
SKY_MAX_RESTARTS = 3  # other failures (a bad model path) are retried this often
# Spot notices: AWS gives two minutes; GKE gives pods 15 s of its 30 s by default.
NOTICE_S = {"gke": 15.0, "karpenter": 120.0, "aws": 120.0, "gcp": 30.0}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, without &anchors for dicts used twice (labels)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line text (the config in its ConfigMap) as a readable | block.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _dump(docs: list[Any]) -> str:
    # Wide lines: a folded shell command is valid YAML but hard to read.
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=4096)


@dataclass
class Rendered:
    """Files by path relative to the output folder, and what the user should know."""

    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    executable: set[str] = field(default_factory=set)


def render_config(config_path: str | Path) -> Rendered:
    """Load and validate the config (model paths as written) and render it."""
    cfg = load_config(config_path, resolve_models=False)
    return render(cfg, source=str(config_path))


def render(cfg: RunConfig, source: str = "the run config") -> Rendered:
    names = _k8s_names(cfg)
    _check_parallel(cfg)
    config_text = _config_yaml(cfg)
    out = Rendered()
    header = f"{HEADER} from {source}; change the config and render again.\n"
    k8s = k8s_files(cfg, names, config_text)
    for path, docs in k8s.items():
        out.files[f"k8s/{path}"] = header + _dump(docs)
    out.files["skypilot/run.yaml"] = header + config_text
    for pool in cfg.model_names:
        task = _sky_task(cfg, pool)
        out.files[f"skypilot/{names[pool]}.yaml"] = header + _dump([task])
    out.files["skypilot/launch.sh"] = _sky_launch(cfg, names, header)
    out.executable.add("skypilot/launch.sh")
    out.warnings = _warnings(cfg)
    return out


def write_rendered(rendered: Rendered, out: Path) -> list[Path]:
    """Write the files; remove files an earlier render left that this one no longer
    makes (a pool taken out of the config must not stay deployed)."""
    for sub in ("k8s", "skypilot"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for old in folder.iterdir():
            rel = f"{sub}/{old.name}"
            if old.is_file() and rel not in rendered.files and _ours(old):
                old.unlink()
    written = []
    for rel, text in sorted(rendered.files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if rel in rendered.executable:
            path.chmod(0o755)
        written.append(path)
    return written


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(400)
    except (OSError, UnicodeDecodeError):
        return False
    return HEADER in head


# -- names and the config -------------------------------------------------------------


def _k8s_names(cfg: RunConfig) -> dict[str, str]:
    """Each pool's name as Kubernetes objects and files take it (lower case, '-')."""
    names: dict[str, str] = {}
    for pool in cfg.model_names:
        name = pool.lower().replace("_", "-")
        if not DNS_LABEL.match(name):
            raise ConfigError(
                f"pool {pool!r}: as a Kubernetes name it becomes {name!r}, which is not a "
                "DNS label (letters, digits, '-', starting and ending with a letter or "
                "digit); rename the teacher or meta_prover"
            )
        clash = [p for p, n in names.items() if n == name]
        if clash:
            raise ConfigError(
                f"pools {clash[0]!r} and {pool!r} both become {name!r} as Kubernetes names "
                "(case and '_' are folded); rename one of them"
            )
        names[pool] = name
    return names


def _check_parallel(cfg: RunConfig) -> None:
    """A worker's server spans `parallel` GPUs: its pod must get at least as many."""
    for pool in cfg.model_names:
        need, got = cfg.pool(pool).parallel, cfg.deploy.gpus_of(pool)
        if need > 1 and got < need:
            raise ConfigError(
                f"pool {pool!r}: its server spans {need} GPUs (tensor parallelism) but "
                f"deploy gives each worker {got}; set deploy.gpus: {{{pool}: {need}}}"
            )


def _config_yaml(cfg: RunConfig) -> str:
    """The validated config as the cluster reads it: the fields the file set (defaults
    stay defaults). redis_url is left out: every container gets CORD_REDIS_URL from the
    Secret, so no password lands in a ConfigMap."""
    data = cfg.model_dump(mode="json", exclude={"redis_url"}, exclude_unset=True)
    return _dump([data])


# -- SkyPilot ----------------------------------------------------------------------------

SKY_CONFIG = "~/cord/run.yaml"


def sky_run_command(cfg: RunConfig, pool: str) -> str:
    worker = ["cord-worker", "--config", SKY_CONFIG, "--pool", pool]
    watch = ["cord-spot-watch", "--notice-exit-code", str(NOTICE_EXIT_CODE), "--"]
    # The config path is left unquoted so that the shell expands ~.
    return " ".join(shlex.quote(w) if w != SKY_CONFIG else w for w in [*watch, *worker])


def _sky_task(cfg: RunConfig, pool: str) -> dict[str, Any]:
    d = cfg.deploy
    resources: dict[str, Any] = {}
    if d.infra is not None:
        resources["infra"] = d.infra
    accelerators = d.accelerators_of(pool)
    if accelerators is not None:
        resources["accelerators"] = accelerators
    else:
        resources["cpus"] = f"{d.cpu}+"
    resources["use_spot"] = True
    resources["image_id"] = f"docker:{d.image}"
    resources["job_recovery"] = {
        # Preempted in a region: that region is short of spot capacity; try the next.
        "strategy": "EAGER_NEXT_REGION",
        "max_restarts_on_errors": SKY_MAX_RESTARTS,
        "recover_on_exit_codes": [NOTICE_EXIT_CODE],
    }
    return {
        "name": f"{cfg.namespace}-{pool}".lower().replace("_", "-"),
        "resources": resources,
        # The local path is relative to where `sky` runs: launch.sh changes there first.
        "file_mounts": {SKY_CONFIG: "run.yaml"},
        # null: `sky jobs launch --secret CORD_REDIS_URL` takes it from the environment.
        "secrets": {"CORD_REDIS_URL": None},
        "run": sky_run_command(cfg, pool),
    }


def _sky_launch(cfg: RunConfig, names: dict[str, str], header: str) -> str:
    lines = [
        "#!/bin/sh",
        header.rstrip(),
        "# One managed spot job per worker: deploy.max_replicas of each pool.",
        "set -eu",
        'cd "$(dirname "$0")"',
        ': "${CORD_REDIS_URL:?set CORD_REDIS_URL to the fleet Redis URL (with its password)}"',
    ]
    for pool in cfg.model_names:
        task = f"{names[pool]}.yaml"
        for i in range(1, cfg.deploy.max_replicas_of(pool) + 1):
            job = f"{cfg.namespace}-{names[pool]}-{i}".lower().replace("_", "-")
            lines.append(
                f"sky jobs launch -y -d -n {shlex.quote(job)} --secret CORD_REDIS_URL "
                f"{shlex.quote(task)}"
            )
    return "\n".join(lines) + "\n"


# -- warnings -----------------------------------------------------------------------------


def _warnings(cfg: RunConfig) -> list[str]:
    d = cfg.deploy
    out = []
    relative = [p for p in cfg.model_names if cfg.pool(p).model.startswith(("./", "../", "~"))]
    if relative:
        out.append(
            f"{', '.join(relative)}: relative model paths; in a container they must exist "
            f"beside the config ({posixpath.dirname(d.config_path)}) or under the working "
            "directory. Give absolute paths, in the image or under deploy.models_mount"
        )
    on_cpu = [p for p in cfg.model_names if d.gpus_of(p) and cfg.pool(p).device == "cpu"]
    if on_cpu:
        out.append(
            f"{', '.join(on_cpu)}: device is 'cpu' but deploy gives their workers GPUs; "
            "set device: cuda in the config (or deploy.gpus: {name: 0} for a CPU pool)"
        )
    for pool in cfg.model_names:
        spec, got = cfg.pool(pool), d.gpus_of(pool)
        need = spec.parallel
        if got > need and spec.device != "cpu":
            out.append(
                f"{pool}: deploy gives each worker {got} GPUs, its server uses {need}; "
                "the rest idle (set deploy.gpus, or the server's tensor parallelism)"
            )
        pinned = getattr(spec, "gpus", None)
        if pinned and max(pinned) >= got:
            out.append(
                f"{pool}: gpus {pinned} names GPUs a pod of {got} does not have (a pod "
                "numbers its GPUs from 0); drop gpus for a cluster"
            )
    m = cfg.metrics
    if (m.coordinator_port or m.worker_port) and m.host in ("127.0.0.1", "localhost"):
        out.append(
            f"metrics.host is {m.host}: Prometheus cannot scrape the pods; set "
            "metrics.host: 0.0.0.0 for a cluster"
        )
    grace = cfg.reliability.shutdown_grace_s
    notice = NOTICE_S.get(d.spot)
    if notice is not None and termination_grace_s(cfg) > notice:
        out.append(
            f"Kubernetes: a worker may take {termination_grace_s(cfg)} s to stop "
            f"(reliability.shutdown_grace_s {grace:g} + deploy.drain_margin_s "
            f"{d.drain_margin_s:g}), but {d.spot} spot nodes give pods about {notice:g} s; "
            "a task still running then is lost and re-sent after "
            "reliability.worker_lost_s. Lower them, or lengthen the node's shutdown grace"
        )
    if grace > NOTICE_S["gcp"]:
        out.append(
            f"SkyPilot: reliability.shutdown_grace_s ({grace:g} s) is longer than GCP's "
            f"{NOTICE_S['gcp']:g} s spot notice; on GCP a running task is then cut off"
        )
    return out
