"""Kubernetes manifests of a cord fleet, as Python data (rendered by ops/deploy/render.py).

Per pool a worker Deployment (GPU requests, spot node selector and tolerations, a grace
period longer than the worker's drain, a preStop hook) and a KEDA ScaledObject on the
pool's shared queues; the coordinator, Flower behind basic auth, Redis with AOF, the
config as a ConfigMap. Containers take CORD_REDIS_URL and FLOWER_BASIC_AUTH from Secrets
the user creates (docs/deploy.md); no secret value is written here.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from typing import Any

from cord.common.config import RunConfig

REDIS_SECRET = "cord-redis"  # keys: url (CORD_REDIS_URL), password (Redis and KEDA)
FLOWER_SECRET = "cord-flower"  # key: basic-auth (user:password)
CONFIG_MAP = "cord-config"
REDIS_PORT = 6379
FLOWER_PORT = 5555
OUTPUT_DIR = "/var/lib/cord"
SPOT_PRESETS: dict[str, tuple[dict[str, str], list[dict[str, str]]]] = {
    "gke": (
        {"cloud.google.com/gke-spot": "true"},
        [
            {
                "key": "cloud.google.com/gke-spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            }
        ],
    ),
    "karpenter": ({"karpenter.sh/capacity-type": "spot"}, []),
    "none": ({}, []),
}


def _labels(component: str, pool: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "cord", "app.kubernetes.io/component": component}
    if pool is not None:
        labels["cord-pool"] = pool
    return labels


def _meta(cfg: RunConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.deploy.namespace, "labels": labels}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _with_metrics(container: dict[str, Any], port: int | None) -> dict[str, Any]:
    """List the Prometheus endpoint (metrics.*_port) as a port named for a PodMonitor.
    A worker is alone in its pod, so it gets worker_port itself; 0 (any port) is not
    listed."""
    if port:
        container["ports"] = [{"name": "metrics", "containerPort": port}]
    return container


def _config_volume() -> dict[str, Any]:
    return {"name": "config", "configMap": {"name": CONFIG_MAP}}


def _config_mount(cfg: RunConfig) -> dict[str, Any]:
    path = cfg.deploy.config_path
    return {"name": "config", "mountPath": posixpath.dirname(path), "readOnly": True}


def _pod_spec(containers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # No service links: Kubernetes would inject FLOWER_PORT=tcp://… and the like, and
    # Flower reads every FLOWER_* variable as one of its options.
    return {"enableServiceLinks": False, **extra, "containers": containers}


def _template(labels: dict[str, str], config_hash: str, spec: dict[str, Any]) -> dict[str, Any]:
    # The hash rolls the pods when the config changes (a ConfigMap edit alone does not).
    return {
        "metadata": {"labels": labels, "annotations": {"cord/config-sha256": config_hash}},
        "spec": spec,
    }


def _deployment(
    cfg: RunConfig, name: str, labels: dict[str, str], template: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, name, labels),
        "spec": {"selector": {"matchLabels": labels}, **spec, "template": template},
    }


def _service(cfg: RunConfig, name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, name, labels),
        "spec": {"selector": labels, "ports": [{"name": name, "port": port, "targetPort": port}]},
    }


def _pvc(cfg: RunConfig, name: str, labels: dict[str, str], size: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(cfg, name, labels),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


# -- Kubernetes ---------------------------------------------------------------------------


def k8s_files(
    cfg: RunConfig, names: dict[str, str], config_text: str
) -> dict[str, list[dict[str, Any]]]:
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()
    files: dict[str, list[dict[str, Any]]] = {
        "00-namespace.yaml": [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": cfg.deploy.namespace, "labels": _labels("namespace")},
            }
        ],
        "01-config.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta(cfg, CONFIG_MAP, _labels("config")),
                "data": {posixpath.basename(cfg.deploy.config_path): config_text},
            }
        ],
    }
    if cfg.deploy.redis.in_cluster:
        files["10-redis.yaml"] = _redis(cfg)
    files["20-coordinator.yaml"] = _coordinator(cfg, config_hash)
    files["30-flower.yaml"] = _flower(cfg, config_hash)
    files["40-keda-auth.yaml"] = [_trigger_auth(cfg)]
    for pool in cfg.model_names:
        files[f"50-worker-{names[pool]}.yaml"] = _worker(cfg, pool, names[pool], config_hash)
    return files


def _redis(cfg: RunConfig) -> list[dict[str, Any]]:
    spec = cfg.deploy.redis
    labels = _labels("redis")
    # AOF with fsync every second, as `cord-coord redis-up` runs it: a restarted Redis
    # keeps queues, leases and committed beams. noeviction: an evicted key is lost work.
    args = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", "/data"]
    args += ["--maxmemory-policy", "noeviction", "--requirepass", "$(REDIS_PASSWORD)"]
    container = {
        "name": "redis",
        "image": spec.image,
        "command": ["redis-server"],
        "args": args,
        "env": [_secret_env("REDIS_PASSWORD", REDIS_SECRET, "password")],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    claim = _pvc(cfg, "data", labels, spec.storage)
    del claim["metadata"]["namespace"]
    stateful = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cfg, "cord-redis", labels),
        "spec": {
            "serviceName": "cord-redis",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec([container])},
            "volumeClaimTemplates": [claim],
        },
    }
    return [_service(cfg, "cord-redis", labels, REDIS_PORT), stateful]


def _coordinator(cfg: RunConfig, config_hash: str) -> list[dict[str, Any]]:
    labels = _labels("coordinator")
    args = ["run", "--config", cfg.deploy.config_path, "--follow", "--no-progress"]
    args += ["--out", f"{OUTPUT_DIR}/out"]
    container = {
        "name": "coordinator",
        "image": cfg.deploy.image,
        "command": ["cord-coord"],
        "args": args,
        "env": [_secret_env("CORD_REDIS_URL", REDIS_SECRET, "url")],
        "volumeMounts": [_config_mount(cfg), {"name": "data", "mountPath": OUTPUT_DIR}],
    }
    volumes = [
        _config_volume(),
        {"name": "data", "persistentVolumeClaim": {"claimName": "cord-coordinator-data"}},
    ]
    # On SIGTERM the coordinator hands its problems back at once; rows are fsynced.
    spec = _pod_spec(
        [_with_metrics(container, cfg.metrics.coordinator_port)],
        terminationGracePeriodSeconds=60,
        volumes=volumes,
    )
    deployment = _deployment(
        cfg,
        "cord-coordinator",
        labels,
        _template(labels, config_hash, spec),
        replicas=1,
        # One writer on a ReadWriteOnce volume: the old pod goes before the new one starts.
        strategy={"type": "Recreate"},
    )
    claim = _pvc(cfg, "cord-coordinator-data", labels, cfg.deploy.coordinator_storage)
    return [claim, deployment]


def _flower(cfg: RunConfig, config_hash: str) -> list[dict[str, Any]]:
    labels = _labels("flower")
    args = ["flower", "--config", cfg.deploy.config_path, "--address", "0.0.0.0"]
    args += ["--port", str(FLOWER_PORT)]
    container = {
        "name": "flower",
        "image": cfg.deploy.image,
        "command": ["cord-coord"],
        "args": args,
        "env": [
            _secret_env("CORD_REDIS_URL", REDIS_SECRET, "url"),
            _secret_env("FLOWER_BASIC_AUTH", FLOWER_SECRET, "basic-auth"),
        ],
        "ports": [{"name": "http", "containerPort": FLOWER_PORT}],
        # /healthcheck is the one Flower page served without auth.
        "readinessProbe": {"httpGet": {"path": "/healthcheck", "port": FLOWER_PORT}},
        "volumeMounts": [_config_mount(cfg)],
    }
    spec = _pod_spec([container], volumes=[_config_volume()])
    template = _template(labels, config_hash, spec)
    deployment = _deployment(cfg, "cord-flower", labels, template, replicas=1)
    return [_service(cfg, "cord-flower", labels, FLOWER_PORT), deployment]


def _trigger_auth(cfg: RunConfig) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": _meta(cfg, "cord-redis", _labels("autoscaling")),
        "spec": {
            "secretTargetRef": [{"parameter": "password", "name": REDIS_SECRET, "key": "password"}]
        },
    }


def termination_grace_s(cfg: RunConfig) -> int:
    """Longer than the worker's own drain, so Kubernetes never SIGKILLs a draining worker."""
    return math.ceil(cfg.reliability.shutdown_grace_s + cfg.deploy.drain_margin_s)


def _placement(cfg: RunConfig, gpus: int) -> tuple[dict[str, str], list[dict[str, str]]]:
    d = cfg.deploy
    preset_selector, preset_tolerations = SPOT_PRESETS[d.spot]
    selector = dict(preset_selector if d.node_selector is None else d.node_selector)
    tolerations = list(preset_tolerations if d.tolerations is None else d.tolerations)
    if gpus and not any(t.get("key") == d.gpu_resource for t in tolerations):
        # GPU nodes are commonly tainted with the resource name (GKE does it itself).
        tolerations.append({"key": d.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return selector, tolerations


def _worker_container(cfg: RunConfig, pool: str, gpus: int) -> dict[str, Any]:
    d = cfg.deploy
    command = ["cord-worker"]
    if d.watch_spot_notice:
        command = ["cord-spot-watch", "--", "cord-worker"]
    requests: dict[str, Any] = {"cpu": d.cpu, "memory": d.memory}
    limits: dict[str, Any] = {"memory": d.memory}
    if gpus:
        requests[d.gpu_resource] = gpus
        limits[d.gpu_resource] = gpus
    mounts = [_config_mount(cfg)]
    if d.models_volume is not None:
        mounts.append({"name": "models", "mountPath": d.models_mount, "readOnly": True})
    return {
        "name": "worker",
        "image": d.image,
        "command": command,
        "args": ["--config", d.config_path, "--pool", pool],
        "env": [_secret_env("CORD_REDIS_URL", REDIS_SECRET, "url")],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        # Kubernetes sends SIGTERM only after preStop returns, and the grace period
        # counts both: a sleep here would only eat the drain. It just says why it stops.
        "lifecycle": {
            "preStop": {
                "exec": {
                    "command": [
                        "/bin/sh",
                        "-c",
                        'echo "preStop: pod terminating, SIGTERM next" > /proc/1/fd/1 || true',
                    ]
                }
            }
        },
    }


def _worker(cfg: RunConfig, pool: str, k8s_name: str, config_hash: str) -> list[dict[str, Any]]:
    d = cfg.deploy
    name = f"cord-worker-{k8s_name}"
    labels = _labels("worker", pool)
    gpus = d.gpus_of(pool)
    selector, tolerations = _placement(cfg, gpus)
    volumes = [_config_volume()]
    if d.models_volume is not None:
        claim = {"claimName": d.models_volume, "readOnly": True}
        volumes.append({"name": "models", "persistentVolumeClaim": claim})
    spec = _pod_spec(
        [_with_metrics(_worker_container(cfg, pool, gpus), cfg.metrics.worker_port)],
        terminationGracePeriodSeconds=termination_grace_s(cfg),
        nodeSelector=selector,
        tolerations=tolerations,
        volumes=volumes,
    )
    # No replicas: KEDA owns the count, and `kubectl apply` must not reset it.
    deployment = _deployment(cfg, name, labels, _template(labels, config_hash, spec))
    return [deployment, _scaled_object(cfg, pool, name)]


def _scaled_object(cfg: RunConfig, pool: str, target: str) -> dict[str, Any]:
    d = cfg.deploy
    address = d.redis.address or f"cord-redis.{d.namespace}.svc.cluster.local:{REDIS_PORT}"
    triggers = []
    # Celery's Redis transport keeps a queue as a LIST named exactly like the queue
    # (cord sends no priorities, so no sub-lists). KEDA counts what waits there, not
    # the task a worker runs: scaling in relies on the termination grace above.
    for queue in cfg.pool_queues(pool):
        metadata = {
            "address": address,
            "listName": queue,
            "listLength": str(d.queue_per_replica),
            "databaseIndex": str(d.redis.database),
        }
        if d.redis.tls:
            metadata["enableTLS"] = "true"
        triggers.append(
            {"type": "redis", "metadata": metadata, "authenticationRef": {"name": "cord-redis"}}
        )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(cfg, target, _labels("autoscaling", pool)),
        "spec": {
            "scaleTargetRef": {"name": target},
            "minReplicaCount": 0,
            "maxReplicaCount": d.max_replicas_of(pool),
            "pollingInterval": d.polling_s,
            "cooldownPeriod": d.cooldown_s,
            "triggers": triggers,
        },
    }
