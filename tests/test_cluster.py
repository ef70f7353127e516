"""Cluster launch: job entrypoints and configs, launcher YAML, KubeRay manifests, a real 2-node Ray."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jsonschema
import pytest
import yaml

from helpers import write_photo_folder
from pipeline import config
from pipeline.cli import VERBS
from pipeline.io import storage
from pipeline.models import autoencoder
from pipeline.stages.shards import ShardsConfig, run_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
STAGES = {
    "shards": "shards",
    "train_vae": "train-vae",
    "train_refiner": "train-refiner",
    "encode": "encode",
    "train": "train",
    "restore": "restore",
}
JOBS = {**STAGES, "finetune": "finetune"}  # Ray job entrypoints: the stages with a RayJob, and finetune


# --------------------------------------------------------------------------- jobs/


@pytest.mark.parametrize("stage", sorted(JOBS))
def test_job_entrypoint_and_config_exist_and_load(stage):
    entry = os.path.join(ROOT, "jobs", f"{stage}.py")
    conf = os.path.join(ROOT, "jobs", "configs", f"{stage}.yaml")
    assert os.path.exists(entry) and os.path.exists(conf)
    verb = next(v for v in VERBS if v.name == JOBS[stage])
    cfg = config.from_dict(verb.config_cls(), yaml.safe_load(open(conf)), section=stage)  # every key is valid
    assert cfg is not None
    out = subprocess.run([sys.executable, entry, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"latent-pipeline {JOBS[stage]}" in out.stdout


# --------------------------------------------------------------------------- cluster/


@pytest.mark.parametrize("name", ["aws", "gcp", "local"])
def test_cluster_launcher_configs_pass_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster", f"{name}.yaml")))
    validate_config(prepare_config(copy.deepcopy(cfg)))
    bad = copy.deepcopy(cfg)
    bad["max_wokers"] = 3  # a misspelt field must fail
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# --------------------------------------------------------------------------- manifests/


def _closed(schema):
    """Close every object that lists properties (as kubeconform does); relax metadata."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        if "metadata" in out.get("properties", {}):
            out["properties"]["metadata"] = {"type": "object"}
        return out
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    return schema


SCHEMAS = {
    kind: _closed(json.load(open(os.path.join(DATA, f"kuberay-v1.7.0-{name}-v1.json"))))
    for kind, name in (("RayJob", "rayjobs"), ("RayCluster", "rayclusters"))
}


def _validate(doc):
    if doc["kind"] in SCHEMAS:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
    else:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def _manifest_files():
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "manifests")):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".yaml") and f != "kustomization.yaml"]
    return sorted(out)


def _render():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: rendered manifests not checked")
    out = subprocess.run(
        ["kubectl", "kustomize", os.path.join(ROOT, "manifests")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_manifest_files_validate_against_kuberay_crds(path):
    for doc in yaml.safe_load_all(open(path)):
        _validate(doc)


def test_rendered_kustomization_validates_and_names_existing_entrypoints():
    docs = _render()
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RayJob"}
    assert set(jobs) == {f"latent-pipeline-{s}" for s in STAGES.values()}
    assert any(d["kind"] == "RayCluster" for d in docs) and any(d["kind"] == "ServiceAccount" for d in docs)
    for doc in docs:
        _validate(doc)
        assert doc["metadata"].get("namespace") == "latent-pipeline"
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        paths = re.findall(r"/app/(jobs/\S+\.(?:py|yaml))", spec["entrypoint"])
        assert len(paths) == 2, spec["entrypoint"]
        for p in paths:
            assert os.path.exists(os.path.join(ROOT, p)), p
        stage = name.split("latent-pipeline-")[1]
        assert f"jobs/{stage.replace('-', '_')}.py" in spec["entrypoint"]
        for group in [spec["rayClusterSpec"]["headGroupSpec"]] + spec["rayClusterSpec"]["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "latent-pipeline"
            assert pod["containers"][0]["image"] == "registry.example.com/ml/latent-pipeline:0.1.0"


def test_a_misspelt_manifest_field_fails_validation():
    doc = yaml.safe_load(open(os.path.join(ROOT, "manifests", "base", "rayjob.yaml")))
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)
    doc = yaml.safe_load(open(os.path.join(ROOT, "manifests", "raycluster.yaml")))
    doc["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)


# --------------------------------------------------------------------------- a real 2-node cluster


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ray_bin():
    return os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture
def two_node_cluster(s3_endpoint):
    """`ray start --head` plus a second `ray start --address` on this machine; every process it
    started is killed afterwards (found by its private temp dir), without touching other Rays."""
    import psutil

    temp = tempfile.mkdtemp(prefix="lp-ray-")
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = _free_ports(7)
    # the cluster's `python` is the environment the project is installed in, as on a real node
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    env.pop("RAY_ADDRESS", None)
    head = [
        _ray_bin(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=1",
        f"--temp-dir={temp}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    out = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        a_http, a_grpc, r_env, m2 = _free_ports(4)
        worker = [
            _ray_bin(),
            "start",
            f"--address=127.0.0.1:{gcs}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--dashboard-agent-listen-port={a_http}",
            f"--dashboard-agent-grpc-port={a_grpc}",
            f"--runtime-env-agent-port={r_env}",
            f"--metrics-export-port={m2}",
            "--disable-usage-stats",
        ]
        out = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if temp in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
        time.sleep(1)
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"


def test_ray_job_submit_encode_on_two_nodes(two_node_cluster, bucket, tmp_path):
    write_photo_folder(str(tmp_path / "photos"), n=8, size=64)
    run_shards(ShardsConfig(src=str(tmp_path / "photos"), out=f"{bucket}/shards", samples_per_shard=2))
    autoencoder.save_kl(autoencoder.new_kl("tiny")[0], f"{bucket}/vae")
    cmd = [
        _ray_bin(),
        "job",
        "submit",
        "--address",
        two_node_cluster["dashboard"],
        "--working-dir",
        ROOT,
        "--",
        "python",
        "jobs/encode.py",
        "--config",
        "jobs/configs/encode.yaml",
        "--input",
        f"{bucket}/shards/shard-*.tar",
        "--output",
        f"{bucket}/latents",
        "--vae",
        f"{bucket}/vae",
        "--resolution",
        "64",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        "--num-gpus",
        "0",
        "--num-cpus",
        "1",
        "--tasks",
        "",
    ]
    out = subprocess.run(cmd, env=two_node_cluster["env"], capture_output=True, text=True, timeout=400)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    assert re.search(r"\[encode\] shards \d+/4", logs), logs[-3000:]  # progress in the job's logs
    man = storage.read_json(f"{bucket}/latents/_manifest.json")
    assert man["totals"]["written"] == 8
    nodes = {storage.read_json(f"{bucket}/latents/_shards/shard-00000{i}.tar.json")["node"] for i in range(4)}
    assert len(nodes) == 2, nodes  # tasks ran on both raylets
