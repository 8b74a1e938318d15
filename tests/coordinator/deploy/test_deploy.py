"""`cord-coord ops render`: the manifests parse, carry the config's queue names, images
and resources, keep secrets out, and KEDA's list is the list Celery really fills."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner

from cord.common.celery_app import make_celery
from cord.common.config import config_from_dict, load_config
from cord.common.keys import queue_name
from cord.coordinator.cli import main
from cord.coordinator.deploy.render import NOTICE_EXIT_CODE, render_config
from tests.conftest import ROOT, write_config

DEMO = ROOT / "examples" / "demo.yaml"


def _render(config: Path, out: Path) -> str:
    res = CliRunner().invoke(main, ["ops", "render", "--config", str(config), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res.output


def _docs(out: Path) -> list[dict[str, Any]]:
    docs = []
    for f in sorted((out / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _cmdline(doc: dict[str, Any]) -> list[str]:
    c = _container(doc)
    return [*c["command"], *c["args"]]


def _demo_with_deploy(tmp_path: Path, deploy: dict[str, Any], **top: Any) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data.update(top)
    data["deploy"] = deploy
    return write_config(tmp_path / "run.yaml", data)


def test_demo_renders_one_worker_and_scaler_per_pool(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _render(DEMO, out)
    cfg = load_config(DEMO)
    docs = _docs(out)
    deployments = _by_kind(docs, "Deployment")
    scalers = _by_kind(docs, "ScaledObject")
    workers = {n: d for n, d in deployments.items() if n.startswith("cord-worker-")}
    assert sorted(workers) == sorted(f"cord-worker-{p}" for p in cfg.model_names)
    assert sorted(scalers) == sorted(workers)
    expected_queues = {t: [queue_name(cfg.namespace, "expand", t)] for t in cfg.teacher_names}
    expected_queues[cfg.meta_prover.name] = [queue_name(cfg.namespace, "score", "meta")]
    for pool in cfg.model_names:
        worker, scaler = workers[f"cord-worker-{pool}"], scalers[f"cord-worker-{pool}"]
        spec = scaler["spec"]
        assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == 4
        assert [t["type"] for t in spec["triggers"]] == ["redis"]
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == expected_queues[pool]
        for t in spec["triggers"]:
            assert all(isinstance(v, str) for v in t["metadata"].values())  # KEDA wants strings
            assert t["authenticationRef"]["name"] in _by_kind(docs, "TriggerAuthentication")
        args = _cmdline(worker)
        assert args[0] == "cord-worker"
        assert args[args.index("--pool") + 1] == pool
        assert args[args.index("--config") + 1] == "/etc/cord/run.yaml"
        c = _container(worker)
        assert c["image"] == "cord:latest"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        pod = worker["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
        keys = {t["key"] for t in pod["tolerations"]}
        assert keys == {"cloud.google.com/gke-spot", "nvidia.com/gpu"}
        assert pod["terminationGracePeriodSeconds"] > cfg.reliability.shutdown_grace_s
        assert "preStop" in c["lifecycle"]
        assert "replicas" not in worker["spec"], "KEDA owns the replica count"


def test_demo_renders_redis_coordinator_and_flower(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _render(DEMO, out)
    docs = _docs(out)
    redis_set = _by_kind(docs, "StatefulSet")["cord-redis"]
    args = _container(redis_set)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in _container(redis_set)["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "cord-redis"

    deployments = _by_kind(docs, "Deployment")
    coord = " ".join(_cmdline(deployments["cord-coordinator"]))
    assert coord.startswith("cord-coord run ") and "--follow" in coord
    flower = deployments["cord-flower"]
    assert _cmdline(flower)[:2] == ["cord-coord", "flower"]
    flower_env = {e["name"]: e for e in _container(flower)["env"]}
    auth = flower_env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert auth == {"name": "cord-flower", "key": "basic-auth"}
    for name in ("cord-coordinator", "cord-flower"):
        env = {e["name"]: e for e in _container(deployments[name])["env"]}
        assert env["CORD_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "cord-redis"
        # Kubernetes would inject FLOWER_PORT=tcp://… otherwise, which Flower chokes on.
        assert deployments[name]["spec"]["template"]["spec"]["enableServiceLinks"] is False

    config_map = _by_kind(docs, "ConfigMap")["cord-config"]
    shipped = config_from_dict(yaml.safe_load(config_map["data"]["run.yaml"]))
    assert shipped.model_names == load_config(DEMO).model_names
    assert shipped.namespace == "cord-demo"
    assert "redis_url" not in config_map["data"]["run.yaml"]


def test_skypilot_tasks_are_spot_jobs_that_recover(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _render(DEMO, out)
    cfg = load_config(DEMO)
    launch = (out / "skypilot" / "launch.sh").read_text().splitlines()
    for pool in cfg.model_names:
        task = yaml.safe_load((out / "skypilot" / f"{pool}.yaml").read_text())
        res = task["resources"]
        assert res["use_spot"] is True
        assert res["accelerators"] == "A100:1"
        assert res["image_id"] == "docker:cord:latest"
        assert NOTICE_EXIT_CODE in res["job_recovery"]["recover_on_exit_codes"]
        run = task["run"].split()
        assert run[0] == "cord-spot-watch"
        assert run[run.index("--notice-exit-code") + 1] == str(NOTICE_EXIT_CODE)
        assert run[run.index("--pool") + 1] == pool
        assert task["secrets"] == {"CORD_REDIS_URL": None}
        for local in task["file_mounts"].values():
            assert (out / "skypilot" / local).is_file()
        assert sum(f" {pool}.yaml" in line for line in launch if line.startswith("sky ")) == 4
    assert (out / "skypilot" / "launch.sh").stat().st_mode & 0o100


def test_deploy_settings_reach_the_manifests(tmp_path: Path) -> None:
    config = _demo_with_deploy(
        tmp_path,
        {
            "image": "ghcr.io/lab/cord:1.2",
            "namespace": "distill",
            "default_gpus": 2,
            "gpus": {"meta": 0},
            "max_replicas": {"alpha": 9},
            "spot": "karpenter",
            "accelerators": {"beta": "H100:2"},
            "watch_spot_notice": True,
            "models_volume": "weights",
            "redis": {"in_cluster": False, "address": "redis.lab:6380", "database": 3},
        },
        redis_url="redis://:hunter2@redis.lab:6380/3",
        metrics={},
    )
    out = tmp_path / "out"
    _render(config, out)
    docs = _docs(out)
    assert {d["metadata"].get("namespace", "distill") for d in docs} == {"distill"}
    assert "cord-redis" not in _by_kind(docs, "StatefulSet")
    deployments, scalers = _by_kind(docs, "Deployment"), _by_kind(docs, "ScaledObject")
    alpha, meta = deployments["cord-worker-alpha"], deployments["cord-worker-meta"]
    assert _container(alpha)["image"] == "ghcr.io/lab/cord:1.2"
    assert _container(alpha)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in _container(meta)["resources"]["limits"]
    assert meta["spec"]["template"]["spec"]["tolerations"] == []
    assert alpha["spec"]["template"]["spec"]["nodeSelector"] == {
        "karpenter.sh/capacity-type": "spot"
    }
    assert _cmdline(alpha)[:3] == ["cord-spot-watch", "--", "cord-worker"]
    assert "ports" not in _container(alpha), "no metrics configured, no metrics port"
    mounts = {m["name"]: m for m in _container(alpha)["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models"
    assert scalers["cord-worker-alpha"]["spec"]["maxReplicaCount"] == 9
    trigger = scalers["cord-worker-alpha"]["spec"]["triggers"][0]["metadata"]
    assert trigger["address"] == "redis.lab:6380" and trigger["databaseIndex"] == "3"
    beta = yaml.safe_load((out / "skypilot" / "beta.yaml").read_text())
    assert beta["resources"]["accelerators"] == "H100:2"
    meta_task = yaml.safe_load((out / "skypilot" / "meta.yaml").read_text())
    assert "accelerators" not in meta_task["resources"]
    # The password in the config's redis_url never reaches a rendered file.
    for f in out.rglob("*"):
        if f.is_file():
            assert "hunter2" not in f.read_text(), f


def test_metrics_ports_are_listed_for_scraping(tmp_path: Path) -> None:
    config = _demo_with_deploy(
        tmp_path, {}, metrics={"host": "0.0.0.0", "coordinator_port": 9300, "worker_port": 9301}
    )
    out = tmp_path / "out"
    output = _render(config, out)
    deployments = _by_kind(_docs(out), "Deployment")
    ports = {"name": "metrics", "containerPort": 9301}
    assert _container(deployments["cord-worker-beta"])["ports"] == [ports]
    ports = {"name": "metrics", "containerPort": 9300}
    assert _container(deployments["cord-coordinator"])["ports"] == [ports]
    assert "metrics.host" not in output
    local = _demo_with_deploy(tmp_path, {}, metrics={"worker_port": 9301})
    res = CliRunner().invoke(
        main, ["ops", "render", "--config", str(local), "--out", str(tmp_path / "o2")]
    )
    assert "metrics.host is 127.0.0.1" in res.stderr


def test_meta_prover_that_is_a_teacher_scales_on_both_queues(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["meta_prover"] = {"name": "gamma"}
    out = tmp_path / "out"
    _render(write_config(tmp_path / "run.yaml", data), out)
    scalers = _by_kind(_docs(out), "ScaledObject")
    assert sorted(scalers) == ["cord-worker-alpha", "cord-worker-beta", "cord-worker-gamma"]
    lists = [t["metadata"]["listName"] for t in scalers["cord-worker-gamma"]["spec"]["triggers"]]
    assert lists == ["cord-demo.expand.gamma", "cord-demo.score.gamma"]


@pytest.mark.parametrize(
    ("deploy", "teachers", "expected"),
    [
        ({"gpus": {"delta": 1}}, None, "deploy.gpus: ['delta'] name no pool"),
        ({"redis": {"in_cluster": False}}, None, "deploy.redis.address: required"),
        ({"gpu": 1}, None, "deploy.gpu: unknown field"),
        ({"namespace": "Cord_Fleet"}, None, "deploy.namespace"),
        ({}, ["a_b", "a-b"], "both become 'a-b'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(
    tmp_path: Path, deploy: dict[str, Any], teachers: list[str] | None, expected: str
) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["deploy"] = deploy
    if teachers:
        data["teachers"] = [{"name": t, "model": "m"} for t in teachers]
    config = write_config(tmp_path / "run.yaml", data)
    res = CliRunner().invoke(
        main, ["ops", "render", "--config", str(config), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert expected in res.output
    assert not (tmp_path / "o").exists()


def test_render_again_drops_pools_taken_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _render(DEMO, out)
    mine = out / "k8s" / "99-my-ingress.yaml"
    mine.write_text("kind: Ingress\n")
    data = yaml.safe_load(DEMO.read_text())
    data["teachers"] = [t for t in data["teachers"] if t["name"] != "beta"]
    _render(write_config(tmp_path / "run.yaml", data), out)
    assert not (out / "k8s" / "50-worker-beta.yaml").exists()
    assert not (out / "skypilot" / "beta.yaml").exists()
    assert (out / "k8s" / "50-worker-alpha.yaml").exists()
    assert mine.exists(), "a file the render did not write is the user's"


def test_warnings_tell_what_will_not_work(tmp_path: Path) -> None:
    output = CliRunner().invoke(
        main, ["ops", "render", "--config", str(DEMO), "--out", str(tmp_path / "o")]
    )
    # The demo's models are relative paths on CPU; GKE gives pods 15 s, the worker 35.
    assert "relative model paths" in output.stderr
    assert "set device: cuda" in output.stderr
    assert "gke spot nodes give pods about 15 s" in output.stderr
    quiet = _demo_with_deploy(tmp_path, {"spot": "karpenter", "default_gpus": 0})
    res = CliRunner().invoke(
        main, ["ops", "render", "--config", str(quiet), "--out", str(tmp_path / "o2")]
    )
    assert res.exit_code == 0, res.output
    assert "device is 'cpu'" not in res.stderr and "spot nodes" not in res.stderr


def test_a_pod_must_hold_the_gpus_its_server_spans(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "paper.yaml").read_text())
    data["teachers"][0].update({"tensor_parallel_size": 2, "gpus": [0, 1]})
    one = write_config(tmp_path / "one.yaml", {**data, "deploy": {"default_gpus": 1}})
    res = CliRunner().invoke(
        main, ["ops", "render", "--config", str(one), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert (
        "pool 'r1': its server spans 2 GPUs (tensor parallelism) but deploy gives each worker 1"
        in res.output
    )
    assert not (tmp_path / "o").exists()
    # Room for it: rendered, with a word on GPUs that would idle and on GPU numbers a pod
    # does not have (a pod numbers its own from 0).
    two = write_config(tmp_path / "two.yaml", {**data, "deploy": {"default_gpus": 2}})
    res = CliRunner().invoke(
        main, ["ops", "render", "--config", str(two), "--out", str(tmp_path / "p")]
    )
    assert res.exit_code == 0, res.output
    assert "qwq: deploy gives each worker 2 GPUs, its server uses 1" in res.stderr
    assert "phi4: gpus [2] names GPUs a pod of 2 does not have" in res.stderr
    worker = _by_kind(_docs(tmp_path / "p"), "Deployment")
    r1 = next(d for name, d in worker.items() if name.endswith("r1"))
    assert _container(r1)["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_the_paper_config_validates_and_places_each_server(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "examples" / "paper.yaml")
    assert cfg.teacher_names == ["r1", "qwq", "phi4"] and cfg.meta_prover.name == "qwq"
    assert [cfg.pool(t).visible_gpus for t in cfg.teacher_names] == [[0], [1], [2]]
    assert (cfg.search.beam_width, cfg.search.thinking_budget, cfg.search.answer_budget) == (
        4,
        16384,
        4096,
    )
    procfile = (ROOT / "examples" / "paper.Procfile").read_text()
    served = {
        line.split("--pool ")[1].split()[0] for line in procfile.splitlines() if "--pool" in line
    }
    assert served == set(cfg.model_names)


def test_committed_ops_output_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """ops/k8s and ops/skypilot are `make ops-render` of the demo config."""
    monkeypatch.chdir(ROOT)  # the files name the config as the Makefile gives it
    rendered = render_config("examples/demo.yaml")
    for rel, text in rendered.files.items():
        committed = ROOT / "ops" / rel
        assert committed.read_text() == text, f"{committed} is stale: run make ops-render"


@pytest.mark.redis
def test_keda_list_is_the_list_celery_fills(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data.update(namespace=namespace, redis_url=redis_url)
    out = tmp_path / "out"
    _render(write_config(tmp_path / "run.yaml", data), out)
    scaler = _by_kind(_docs(out), "ScaledObject")["cord-worker-meta"]
    list_name = scaler["spec"]["triggers"][0]["metadata"]["listName"]
    app = make_celery(config_from_dict(data))
    try:
        # Sent as the coordinator sends a scoring task (driver._send): by queue name.
        app.send_task("cord.score", args=[{}], queue=queue_name(namespace, "score", "meta"))
        # What KEDA's redis scaler runs: LLEN on listName in databaseIndex.
        assert redis_client.llen(list_name) == 1
    finally:
        redis_client.delete(list_name)
        app.close()


# The Kubernetes version the rendered manifests are checked against (kubernetes-validate
# ships the schemas of every release, offline); KEDA's kinds are custom resources it has
# no schema for.
K8S_VERSION = "1.32"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}


@pytest.mark.parametrize(
    "config", [DEMO, ROOT / "examples" / "vllm.yaml", ROOT / "examples" / "paper.yaml"]
)
def test_rendered_kubernetes_kinds_match_the_real_schemas(tmp_path: Path, config: Path) -> None:
    import kubernetes_validate

    out = tmp_path / "out"
    _render(config, out)
    docs = _docs(out)
    checked = set()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        # strict: a field the schema does not know (a typo, a wrong level) is an error too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Namespace"} <= checked
    # The check bites: a misplaced field fails it.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
