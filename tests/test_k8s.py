"""KubeRay/Kubernetes manifests: render the kustomize overlays with kustomize and validate them offline.

Built-in kinds are checked with kubernetes-validate, RayJob/RayCluster with jsonschema against the
KubeRay CRDs vendored in k8s/schemas, plus the semantic checks of k8s/validate.py. Broken manifests
are made by mutating parsed ones.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ["gpu-8x", "cpu-demo"]


def _load_validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", REPO / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


kv = _load_validator()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kv.render(REPO / "k8s" / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def gpu_worker_container(doc: dict) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_overlays_cover_the_required_resources(rendered):
    for name, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert {
            ("RayJob", "clip-vitb32-cc12m"),
            ("RayJob", "llm-1b-zero3"),
            ("RayCluster", "dist-tempnet"),
            ("Deployment", "mlflow"),
            ("Service", "mlflow"),
            ("PersistentVolumeClaim", "mlflow-artifacts"),
            ("Deployment", "mlflow-postgres"),
            ("ConfigMap", "dist-tempnet-configs"),
        } <= kinds, name
        assert all(d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid(rendered, overlay):
    problems = kv.validate(rendered[overlay])
    assert problems == [], "\n".join(problems)


def test_gpu_overlay_shape(rendered):
    docs = rendered["gpu-8x"]
    for name in ("clip-vitb32-cc12m", "llm-1b-zero3"):
        job = find(docs, "RayJob", name)
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
        limits = gpu_worker_container(job)["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
        assert job["spec"]["entrypoint"].startswith("dist-tempnet train --config /configs/")
    images = {c["image"] for d in docs for _, t in kv.pod_templates(d) for c in t["spec"]["containers"]}
    assert images == {"ghcr.io/dist-tempnet/dist-tempnet:0.1.0", "postgres:16.4"}


def test_cpu_demo_has_no_gpus_and_runs_tiny_configs(rendered):
    docs = rendered["cpu-demo"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(docs)
    entry = find(docs, "RayJob", "clip-vitb32-cc12m")["spec"]["entrypoint"]
    assert entry.startswith("dist-tempnet train --config /configs/clip_tiny.yaml")
    files = find(docs, "ConfigMap", "dist-tempnet-configs")["data"]
    assert {"clip_tiny.yaml", "lm_tiny_scratch.yaml", "clip_vitb32_cc12m.yaml", "llm_1b_zero3.yaml"} <= set(
        files
    )


def test_configmap_holds_the_repository_configs(rendered):
    files = find(rendered["gpu-8x"], "ConfigMap", "dist-tempnet-configs")["data"]
    for name, text in files.items():
        assert text == (REPO / "configs" / name).read_text()


def test_crd_schemas_are_vendored_in_the_repository():
    assert kv.SCHEMAS_DIR == REPO / "k8s" / "schemas"
    for kind in kv.CRD_FILES:
        crd = kv.load_crd(kind)
        assert crd["spec"]["names"]["kind"] == kind
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
        assert "v1" in {v["name"] for v in crd["spec"]["versions"]}
    assert "Apache License" in (kv.SCHEMAS_DIR / "LICENSE").read_text()
    assert "feeaf72facab4881ba2b179248bb67315634e229" in (kv.SCHEMAS_DIR / "README.md").read_text()


def test_markdown_references_in_k8s_docs_resolve():
    """Every .md file named in the k8s docs exists, and every #anchor is a heading of its file."""

    def anchors(path: Path) -> set[str]:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # no code blocks
        headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}

    for doc in (REPO / "k8s" / "README.md", REPO / "k8s" / "schemas" / "README.md"):
        for ref in re.findall(r"[\w./-]+\.md(?:#[\w-]+)?", doc.read_text()):
            file, _, anchor = ref.partition("#")
            target = next((p for p in (doc.parent / file, REPO / file) if p.is_file()), None)
            assert target is not None, f"{doc.relative_to(REPO)} refers to {file}, which does not exist"
            assert not anchor or anchor in anchors(target), f"{doc.relative_to(REPO)}: no heading #{anchor}"


def test_rendering_is_kustomize_with_kubernetes_merge_keys(tmp_path):
    """A strategic-merge patch merges volumeMounts on mountPath and ports on containerPort (their
    Kubernetes merge keys), not on `name`: a second mount of the same volume is added."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "x",
                            "ports": [{"name": "http", "containerPort": 80}],
                            "volumeMounts": [{"name": "data", "mountPath": "/a"}],
                        }
                    ]
                },
            },
        },
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "volumeMounts": [{"name": "data", "mountPath": "/b", "subPath": "b"}],
                        }
                    ]
                }
            }
        },
    }
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch))
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deployment.yaml]\npatches: [{path: patch.yaml}]\nnamespace: ns\n"
    )
    (doc,) = kv.render(tmp_path)
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/b", "/a"]
    assert sorted(p["containerPort"] for p in container["ports"]) == [80, 8080]
    assert doc["metadata"]["namespace"] == "ns"


def test_render_errors_name_the_kustomization_and_the_problem(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(kv.RenderError, match=r"kustomize failed: .*missing\.yaml"):
        kv.render(tmp_path)


# ---------------------------------------------------------------------------------------------
# Broken manifests fail with a clear message


def mutated(rendered, overlay="gpu-8x") -> list[dict]:
    return copy.deepcopy(rendered[overlay])


def problems_about(docs, *needles: str) -> list[str]:
    problems = kv.validate(docs)
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"expected a problem mentioning {needles}, got:\n" + "\n".join(problems)
    return hits


def test_unknown_field_in_a_rayjob_is_rejected(rendered):
    docs = mutated(rendered)
    gpu_worker_container(find(docs, "RayJob", "clip-vitb32-cc12m"))["resourcez"] = {}
    (hit,) = problems_about(docs, "RayJob/clip-vitb32-cc12m", "resourcez")
    assert "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]" in hit


def test_misplaced_field_in_a_raycluster_is_rejected(rendered):
    docs = mutated(rendered)
    find(docs, "RayCluster", "dist-tempnet")["spec"]["shutdownAfterJobFinishes"] = True  # a RayJob field
    problems_about(docs, "RayCluster/dist-tempnet", "shutdownAfterJobFinishes")


def test_gpu_group_without_gpu_request_is_rejected(rendered):
    docs = mutated(rendered)
    resources = gpu_worker_container(find(docs, "RayJob", "llm-1b-zero3"))["resources"]
    for part in resources.values():
        part.pop("nvidia.com/gpu")
    hits = problems_about(docs, "RayJob/llm-1b-zero3", "'gpu-workers'", "nvidia.com/gpu")
    assert any("do not request nvidia.com/gpu" in h for h in hits)
    # ... and the job no longer fits: its config asks for 8 GPU workers.
    problems_about(docs, "RayJob/llm-1b-zero3", "ray.num_workers=8", "0 GPUs")


def test_ttl_without_shutdown_and_bad_submission_mode_are_rejected(rendered):
    docs = mutated(rendered)
    job = find(docs, "RayJob", "clip-vitb32-cc12m")
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["submissionMode"] = "K8sMode"
    problems_about(docs, "ttlSecondsAfterFinished", "shutdownAfterJobFinishes: true")
    problems_about(docs, "submissionMode 'K8sMode'", "K8sJobMode")


def test_missing_dev_shm_is_rejected(rendered):
    docs = mutated(rendered)
    container = gpu_worker_container(find(docs, "RayCluster", "dist-tempnet"))
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    problems_about(docs, "RayCluster/dist-tempnet", "/dev/shm")


def test_entrypoints_must_be_real_commands_with_valid_configs(rendered):
    docs = mutated(rendered)
    find(docs, "RayJob", "clip-vitb32-cc12m")["spec"]["entrypoint"] = (
        "dist-tempnet trian --config /configs/x.yaml"
    )
    problems_about(docs, "RayJob/clip-vitb32-cc12m", "not a valid dist-tempnet command")

    docs = mutated(rendered)
    find(docs, "RayJob", "clip-vitb32-cc12m")["spec"]["entrypoint"] = "python train.py"
    problems_about(docs, "does not run the dist-tempnet CLI")

    docs = mutated(rendered)
    job = find(docs, "RayJob", "llm-1b-zero3")
    job["spec"]["entrypoint"] = "dist-tempnet train --config /configs/llm_7b.yaml"
    problems_about(docs, "/configs/llm_7b.yaml", "ConfigMap mounted at /configs has only")

    job["spec"]["entrypoint"] = "dist-tempnet train --config /configs/llm_1b_zero3.yaml train.stepz=5"
    problems_about(docs, "config does not validate", "train.stepz")

    docs = mutated(rendered)
    cm = find(docs, "ConfigMap", "dist-tempnet-configs")
    cm["data"]["llm_1b_zero3.yaml"] = cm["data"]["llm_1b_zero3.yaml"].replace(
        "zero_stage: 3", "zero_stage: 4"
    )
    problems_about(docs, "RayJob/llm-1b-zero3", "deepspeed.zero_stage")


def test_checkpoints_must_outlive_the_ray_cluster(rendered):
    """run.output_dir is on the shared PVC in every Ray pod, or an object store whose credentials
    every Ray pod gets from a Secret."""
    docs = mutated(rendered, "cpu-demo")
    job = find(docs, "RayJob", "clip-vitb32-cc12m")
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/mnt/shared/runs", "/tmp/runs")
    hits = problems_about(
        docs, "RayJob/clip-vitb32-cc12m", "run.output_dir=/tmp/runs", "PersistentVolumeClaim"
    )
    assert len(hits) == 2  # head and worker group

    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/tmp/runs", "s3://ckpt/runs")
    # The object store's credentials are missing on every Ray pod (see also the s3 overlay test).
    hits = problems_about(docs, "run.output_dir=s3://ckpt/runs", "does not get AWS_ENDPOINT_URL")
    assert len(hits) == 2


def readme_s3_overlay(tmp_path: Path) -> Path:
    """The gpu-8x-s3 overlay that k8s/README.md shows, in a temporary folder (kustomize wants
    relative paths, so they are made relative to that folder)."""
    text = (REPO / "k8s" / "README.md").read_text()
    section = text[text.index("## Checkpoints on an object store") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    block = section[start : section.index("\n```", start)]
    k8s = os.path.relpath(REPO / "k8s", tmp_path)
    block = block.replace("../../components/", f"{k8s}/components/").replace(
        "../gpu-8x", f"{k8s}/overlays/gpu-8x"
    )
    (tmp_path / "kustomization.yaml").write_text(block)
    return tmp_path


def test_s3_checkpoints_overlay_from_the_readme(tmp_path):
    from dist_tempnet.data.prepare import absolutize_paths

    docs = kv.render(readme_s3_overlay(tmp_path))
    ray_pods = [g for d in docs for g in kv.ray_groups(d)]
    assert len(ray_pods) == 6
    for g in ray_pods:
        (container,) = g.containers
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert {refs[k]["name"] for k in kv.OBJECT_STORE_ENV} == {"checkpoint-store"}, g.where
    assert "checkpoint-store" in kv.documented_secrets(REPO / "README.md", "Running on Kubernetes")

    # Valid exactly when the installed dist_tempnet keeps an s3:// run.output_dir as a URI.
    cfg = kv_config("s3://BUCKET/dist-tempnet")
    absolutize_paths(cfg)
    supported = cfg.run.output_dir == "s3://BUCKET/dist-tempnet"
    problems = kv.validate(docs)
    if supported:
        assert problems == []
    else:
        assert len(problems) == 2 and all("treats it as a local path" in p for p in problems), problems

    job = find(docs, "RayJob", "llm-1b-zero3")
    worker = gpu_worker_container(job)
    worker["env"] = [e for e in worker["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    problems_about(docs, "RayJob/llm-1b-zero3", "'gpu-workers'", "does not get AWS_SECRET_ACCESS_KEY")


def kv_config(output_dir: str):
    from dist_tempnet.config import load_config

    return load_config(REPO / "configs" / "llm_1b_zero3.yaml", [f"run.output_dir={output_dir}"])


def test_core_kinds_are_validated_strictly(rendered):
    docs = mutated(rendered)
    find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = (
        "Always"
    )
    problems_about(docs, "Deployment/mlflow", "imagePullPolicyy")


def test_image_and_ray_versions_must_agree(rendered):
    docs = mutated(rendered)
    gpu_worker_container(find(docs, "RayJob", "clip-vitb32-cc12m"))["image"] = (
        "ghcr.io/dist-tempnet/dist-tempnet:0.0.9"
    )
    find(docs, "RayCluster", "dist-tempnet")["spec"]["rayVersion"] = "2.50.0"
    problems_about(docs, "dist-tempnet:0.0.9", "expected ghcr.io/dist-tempnet/dist-tempnet:0.1.0")
    problems_about(docs, "RayCluster/dist-tempnet", "rayVersion '2.50.0'")


def test_mlflow_server_must_accept_the_service_host(rendered):
    docs = mutated(rendered)
    container = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [a for a in container["args"] if not a.startswith("--allowed-hosts")]
    problems_about(docs, "Deployment/mlflow", "--allowed-hosts", "mlflow:5000")

    docs = mutated(rendered)
    container = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [
        a if not a.startswith("--allowed-hosts") else "--allowed-hosts=mlflow" for a in container["args"]
    ]
    problems_about(docs, "does not accept Host mlflow:5000")


def test_root_containers_and_secret_values_are_rejected(rendered):
    docs = mutated(rendered)
    pod = find(docs, "Deployment", "mlflow-postgres")["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    pod["securityContext"]["runAsUser"] = 0
    problems_about(docs, "Deployment/mlflow-postgres", "may run as root")
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mlflow-db", "namespace": "dist-tempnet"},
            "stringData": {"password": "hunter2"},
        }
    )
    problems_about(docs, "Secret/mlflow-db", "must not live in the repository")


# ---------------------------------------------------------------------------------------------
# Access: MLflow login, NetworkPolicies, Secrets


def mlflow_container(docs: list[dict]) -> dict:
    return find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def env_entry(container: dict, name: str) -> dict:
    return next(e for e in container["env"] if e["name"] == name)


def test_mlflow_requires_a_login_with_credentials_from_secrets(rendered):
    docs = mutated(rendered)
    container = mlflow_container(docs)
    container["args"].remove("--app-name=basic-auth")
    problems_about(docs, "Deployment/mlflow", "--app-name=basic-auth")

    docs = mutated(rendered)
    env_entry(mlflow_container(docs), "MLFLOW_AUTH_ADMIN_PASSWORD").update(value="hunter2", valueFrom=None)
    env_entry(mlflow_container(docs), "MLFLOW_AUTH_ADMIN_PASSWORD").pop("valueFrom")
    problems_about(docs, "Deployment/mlflow", "MLFLOW_AUTH_ADMIN_PASSWORD must come from a Secret")

    docs = mutated(rendered)
    env_entry(mlflow_container(docs), "MLFLOW_AUTH_CONFIG_PATH")["value"] = "/etc/elsewhere/basic_auth.ini"
    problems_about(docs, "Deployment/mlflow", "is not a file of a ConfigMap mounted there")

    docs = mutated(rendered)
    cm = find(docs, "ConfigMap", "mlflow-auth-config")
    cm["data"]["basic_auth.ini"] = cm["data"]["basic_auth.ini"].replace("/mlflow/auth/", "/tmp/")
    problems_about(docs, "Deployment/mlflow", "not on a PersistentVolumeClaim")

    dockerfile = (REPO / "k8s" / "image" / "Dockerfile").read_text().replace("mlflow[auth]", "mlflow")
    (hit,) = kv.check_mlflow_auth(rendered["gpu-8x"], dockerfile)
    assert "Deployment/mlflow" in hit and "mlflow[auth]" in hit

    docs = mutated(rendered)
    worker = gpu_worker_container(find(docs, "RayJob", "llm-1b-zero3"))
    env_entry(worker, "MLFLOW_TRACKING_PASSWORD")["valueFrom"]["secretKeyRef"]["optional"] = True
    problems_about(docs, "RayJob/llm-1b-zero3", "(gpu-workers)", "MLFLOW_TRACKING_PASSWORD", "Secret")


def test_network_policies_isolate_mlflow_and_ray_and_allow_what_runs(rendered):
    docs = rendered["gpu-8x"]
    pods = {p.where: p for p in kv.all_pods(docs)}
    head = pods["RayJob/clip-vitb32-cc12m (namespace dist-tempnet) head"]
    worker = pods["RayJob/clip-vitb32-cc12m (namespace dist-tempnet) worker group 'gpu-workers'"]
    submitter = pods["RayJob/clip-vitb32-cc12m (namespace dist-tempnet) submitter"]
    mlflow = pods["Deployment/mlflow (namespace dist-tempnet)"]
    postgres = pods["Deployment/mlflow-postgres (namespace dist-tempnet)"]
    assert kv.admits(docs, worker, mlflow, 5000) and kv.admits(docs, head, mlflow, 5000)
    assert not kv.admits(docs, submitter, mlflow, 5000) and not kv.admits(docs, postgres, mlflow, 5000)
    assert kv.admits(docs, mlflow, postgres, 5432) and not kv.admits(docs, worker, postgres, 5432)
    assert kv.admits(docs, submitter, head, 8265) and not kv.admits(docs, submitter, head, 6379)
    assert kv.admits(docs, worker, head, None) and not kv.admits(docs, mlflow, head, 8265)

    docs = mutated(rendered)
    docs.remove(find(docs, "NetworkPolicy", "mlflow"))
    problems_about(docs, "Deployment/mlflow", "no NetworkPolicy selects these pods")

    docs = mutated(rendered)
    find(docs, "NetworkPolicy", "ray")["spec"]["ingress"][1].pop("from")
    problems_about(docs, "NetworkPolicy/ray", "spec.ingress[1] admits every source")

    docs = mutated(rendered)
    rule = find(docs, "NetworkPolicy", "mlflow")["spec"]["ingress"][0]
    rule["from"][0]["podSelector"]["matchExpressions"][0]["values"] = ["ray-head"]
    problems_about(docs, "worker group 'gpu-workers' cannot reach Deployment/mlflow", "port 5000")

    docs = mutated(rendered)
    submitter_labels = find(docs, "RayJob", "llm-1b-zero3")["spec"]["submitterPodTemplate"]["metadata"]
    submitter_labels["labels"]["app.kubernetes.io/component"] = "submitter"
    problems_about(docs, "RayJob/llm-1b-zero3 (namespace dist-tempnet) submitter cannot reach", "8265")


def test_every_secret_the_pods_use_is_created_in_the_readme(rendered):
    for docs in rendered.values():
        assert kv.referenced_secrets(docs) == {
            "mlflow-db": True,
            "mlflow-auth": True,
            "mlflow-client": True,
            "ray-auth-token": True,
            "mlflow-s3": False,
        }
    assert {"mlflow-db", "mlflow-auth", "mlflow-client", "ray-auth-token"} <= kv.documented_secrets(
        REPO / "README.md", "Running on Kubernetes"
    )
    docs = mutated(rendered)
    env_entry(mlflow_container(docs), "MLFLOW_AUTH_ADMIN_PASSWORD")["valueFrom"]["secretKeyRef"]["name"] = "x"
    problems_about(docs, "Secret 'x'", "README.md's deploy steps")


@pytest.mark.slow
def test_mlflow_server_as_deployed_requires_a_login(rendered, tmp_path, monkeypatch):
    """The Deployment's command, args, Secret-fed variables and auth ConfigMap, run on 127.0.0.1:
    anonymous and wrong-password requests get 401, the admin creates the training user as the
    README's deploy step does, and that user can record a run."""
    import requests
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    docs = rendered["gpu-8x"]
    container = mlflow_container(docs)
    ini = find(docs, "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text(ini.replace("sqlite:////mlflow/auth/", f"sqlite:///{tmp_path}/"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    args = [
        f"{a.split('=')[0]}={local[a.split('=')[0]]}" if a.split("=")[0] in local else a
        for a in container["args"]
    ]
    # The Secret mlflow-auth's keys, mapped to variables the way the manifest maps them.
    secret = {"admin_username": "admin", "admin_password": "admin-password-123", "flask_secret_key": "k" * 32}
    env = dict(
        os.environ,
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
        MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "basic_auth.ini"),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job-runner processes in a test
    )
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == "mlflow-auth":
            env[e["name"]] = secret[ref["key"]]
    assert container["command"] == ["mlflow", "server"]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),  # noqa: SIM115
        start_new_session=True,  # its own process group: stopped with its workers below
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=30).ok:  # the readiness probe, unauthenticated
                    break
            except requests.RequestException:
                pass  # not listening yet, or busy starting
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
        wrong = ("admin", "not-the-password")
        assert requests.get(search, params={"max_results": 1}, auth=wrong, timeout=30).status_code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["admin_password"])
        AuthServiceClient(url).create_user("trainer", "trainer-password-123")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trainer-password-123")
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("dist_tempnet"))
        client.log_metric(run.info.run_id, "loss", 1.5, step=1)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.5]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_host_rule_matches_mlflow():
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = ["mlflow", "mlflow:*", "mlflow.*", "localhost:*"]
    for host in (
        "mlflow:5000",
        "mlflow",
        "mlflow.ns.svc.cluster.local:5000",
        "localhost:5000",
        "evil:5000",
        "mlflowx:5000",
        "",
    ):
        assert kv.mlflow_allows_host(allowed, host) == is_allowed_host_header(allowed, host), host
    assert kv.mlflow_allows_host(["*"], "anything:1") == is_allowed_host_header(["*"], "anything:1")


@pytest.mark.slow
def test_validate_cli_reports_each_overlay():
    proc = subprocess.run(
        [sys.executable, str(REPO / "k8s" / "validate.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("valid") == len(OVERLAYS)
