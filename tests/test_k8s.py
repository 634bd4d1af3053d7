"""Offline checks of the Kubernetes manifests in k8s/.

Every overlay in k8s/overlays is rendered with `kubectl kustomize` (no cluster needed), and every object
is validated against the KubeRay v1.7.0 CRD schemas and the Kubernetes v1.37 JSON schemas in
../shared/k8s-schemas. Then the project's rules are checked on the rendered objects: non-root and locked
down pods, requests and limits on every container, no inline secrets, GPUs only on GPU worker groups,
references that resolve, the KubeRay rules that no schema expresses, entrypoints that `subsume`'s own
argument parser accepts, and per-run names for the scheduled training runs. Each rule is a function
that returns the problems it finds, so the last tests can break a manifest on purpose and see it caught.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from subsume.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The checkout and shared/ are siblings (here and in CI).
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas"
CORE_SCHEMAS = SCHEMAS / "kubernetes" / "v1.37.0-standalone-strict"
KUBECTL = shutil.which("kubectl")

CORE_SCHEMA_FILES = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("batch/v1", "CronJob"): "cronjob-batch-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json",
}
# No NetworkPolicy schema in ../shared/k8s-schemas: this is its structure (networking.k8s.io/v1), strict.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                    "required": ["key", "operator"], "properties": {
        "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}},
    "not": {"required": ["ipBlock", "podSelector"]}}
_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "endPort": {"type": "integer"}}}
NETWORK_POLICY_SCHEMA = {"type": "object", "additionalProperties": False,
                         "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"}, "metadata": {},
    "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
        "podSelector": _SELECTOR,
        "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
        "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
        "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}}}}}}
CRD_FILES = {("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml", ("ray.io/v1", "RayCronJob"): "ray.io_raycronjobs.yaml"}

# The image's user and model cache (tests/test_dockerfile.py checks the Dockerfile itself).
DOCKERFILE = (REPO / "Dockerfile").read_text()
DOCKER_UID = int(re.findall(r"^USER\s+(\d+)", DOCKERFILE, re.M)[-1])
HF_HOME = re.findall(r"\bHF_HOME=(\S+)", DOCKERFILE)[-1]
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster name limit 53 minus the 6 characters it appends
SENSITIVE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)
LEAKED = re.compile(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|-----BEGIN [A-Z ]*PRIVATE KEY-----")
FEATURE_FLAGS = ("teacher", "revision", "output", "patch_grid", "trust_remote_code", "precision", "size", "fps", "stride",
                 "segment_frames", "overlap", "max_frames", "short", "frame_encoding", "target_dtype")
FEATURE_DEFAULTS = {k: v for k, v in vars(build_parser().parse_args(["train", "--store", "s", "--out", "o"])).items()
                    if k in FEATURE_FLAGS}


# --- rendering and schemas ---------------------------------------------------------------------------


def render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH: `kubectl kustomize` renders the overlays offline")
    return {name: render(name) for name in OVERLAYS}


def strict_openapi(node: Any) -> Any:
    """A CRD's structural OpenAPI schema as JSON Schema: int-or-string spelled out, and unknown fields
    rejected (the API server prunes or, with strict field validation, refuses them)."""
    if isinstance(node, list):
        return [strict_openapi(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_openapi(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[tuple[str, str], Any]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"schemas not found at {SCHEMAS}: shared/k8s-schemas is expected beside the checkout")
    out: dict[tuple[str, str], Any] = {}
    for key, name in CORE_SCHEMA_FILES.items():
        schema = json.loads((CORE_SCHEMAS / name).read_text())
        out[key] = jsonschema.validators.validator_for(schema)(schema)
    # CRD schemas leave metadata as a bare object: check it against the core ObjectMeta instead.
    object_meta = json.loads((CORE_SCHEMAS / "configmap-v1.json").read_text())["properties"]["metadata"]
    for key, name in CRD_FILES.items():
        crd = yaml.load((SCHEMAS / "kuberay" / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == key[0].split("/")[1])
        schema = strict_openapi(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = object_meta
        out[key] = jsonschema.Draft4Validator(schema)
    netpol = dict(NETWORK_POLICY_SCHEMA, properties=dict(NETWORK_POLICY_SCHEMA["properties"], metadata=object_meta))
    out[("networking.k8s.io/v1", "NetworkPolicy")] = jsonschema.Draft7Validator(netpol)
    return out


def schema_problems(objs: list[dict], validators: dict) -> list[str]:
    problems = []
    for obj in objs:
        key = (obj.get("apiVersion"), obj.get("kind"))
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if key not in validators:
            problems.append(f"{where}: no schema for {key} (only {sorted(validators)})")
            continue
        for err in sorted(validators[key].iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
            path = "/".join(str(p) for p in err.absolute_path)
            problems.append(f"{where}: {path}: {err.message[:300]}")
    return problems


# --- walking the objects -----------------------------------------------------------------------------


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def rayjob_specs(objs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, RayJob spec, owning object) for every RayJob and every RayCronJob's jobTemplate."""
    for obj in objs:
        if obj["kind"] == "RayJob":
            yield name_of(obj), obj["spec"], obj
        elif obj["kind"] == "RayCronJob":
            yield name_of(obj) + ".jobTemplate", obj["spec"].get("jobTemplate", {}), obj


def pods(objs: list[dict]) -> Iterator[tuple[str, str, str | None, dict]]:
    """(where, role, worker group name, pod spec) for every pod template in the objects."""
    for where, spec, _ in rayjob_specs(objs):
        cluster = spec.get("rayClusterSpec") or {}
        head = cluster.get("headGroupSpec", {}).get("template", {}).get("spec")
        if head is not None:
            yield f"{where} head", "head", None, head
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{where} group {group.get('groupName')}", "worker", group.get("groupName"), group["template"]["spec"]
        if spec.get("submitterPodTemplate"):
            yield f"{where} submitter", "submitter", None, spec["submitterPodTemplate"]["spec"]
    for obj in objs:
        if obj["kind"] == "CronJob":
            yield name_of(obj), "job", None, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] == "Job":
            yield name_of(obj), "job", None, obj["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def objects_of(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def parse_quantity(q: Any) -> float:
    s = str(q)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


def gpu_resources(container: dict) -> dict[str, Any]:
    res = container.get("resources", {})
    return {k: v for part in ("requests", "limits") for k, v in res.get(part, {}).items() if k.endswith("/gpu")}


# --- the rules ---------------------------------------------------------------------------------------


def security_problems(objs: list[dict]) -> list[str]:
    problems = []
    autoscaled = {id(spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]) for _, spec, _ in rayjob_specs(objs)
                  if (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling")}
    for where, role, _, pod in pods(objs):
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
        if psc.get("runAsUser") != DOCKER_UID:
            problems.append(f"{where}: pod runs as {psc.get('runAsUser')!r}, not the image's user {DOCKER_UID}")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile should be RuntimeDefault")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{where}: {flag} is set")
        for vol in pod.get("volumes", []):
            if "hostPath" in vol:
                problems.append(f"{where}: hostPath volume {vol['name']}")
        # The autoscaler sidecar talks to the API with the head's token; every other Ray pod needs none.
        if role != "job" and pod.get("automountServiceAccountToken") is not False and id(pod) not in autoscaled:
            problems.append(f"{where}: Ray pods need no API token: automountServiceAccountToken: false")
        for c in containers(pod):
            csc = c.get("securityContext", {})
            cw = f"{where} container {c.get('name')}"
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation must be false")
            if csc.get("privileged"):
                problems.append(f"{cw}: privileged")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem must be true")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cw}: capabilities must drop ALL")
            if csc.get("capabilities", {}).get("add"):
                problems.append(f"{cw}: adds capabilities")
            if csc.get("runAsUser", DOCKER_UID) == 0 or csc.get("runAsNonRoot") is False:
                problems.append(f"{cw}: runs as root")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{cw}: image {image!r} has no pinned tag")
            if csc.get("readOnlyRootFilesystem"):
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                vols = {v["name"]: v for v in pod.get("volumes", [])}
                if "emptyDir" not in vols.get(mounts.get("/tmp"), {}):
                    problems.append(f"{cw}: read-only root but /tmp is not an emptyDir (Ray's temp dir, HOME)")
    return problems


def resource_problems(objs: list[dict]) -> list[str]:
    problems = []
    for where, _, _, pod in pods(objs):
        for c in containers(pod):
            cw = f"{where} container {c.get('name')}"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for key in ("cpu", "memory"):
                    if key not in res.get(part, {}):
                        problems.append(f"{cw}: no {part}.{key}")
            for key, req in res.get("requests", {}).items():
                lim = res.get("limits", {}).get(key)
                if lim is not None and parse_quantity(req) > parse_quantity(lim):
                    problems.append(f"{cw}: {key} request {req} above limit {lim}")
    return problems


def gpu_problems(objs: list[dict]) -> list[str]:
    problems = []
    for where, role, group, pod in pods(objs):
        is_gpu_group = role == "worker" and "gpu" in (group or "")
        for c in containers(pod):
            gpus = gpu_resources(c)
            cw = f"{where} container {c.get('name')}"
            if gpus and not is_gpu_group:
                problems.append(f"{cw}: requests GPUs ({gpus}) outside a GPU worker group")
            res = c.get("resources", {})
            if is_gpu_group and not any(k.endswith("/gpu") for k in res.get("limits", {})):
                problems.append(f"{cw}: GPU group without a GPU limit")
            for key in gpus:
                if res.get("requests", {}).get(key, res.get("limits", {}).get(key)) != res.get("limits", {}).get(key):
                    problems.append(f"{cw}: {key} requests and limits must be equal")
    return problems


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_problems(objs: list[dict]) -> list[str]:
    problems = []
    text = yaml.safe_dump_all(objs)
    for hit in LEAKED.findall(text):
        problems.append(f"something that looks like a credential is inline: {hit[:12]}...")
    for obj in objs:
        if obj["kind"] == "Secret":
            problems.append(f"{name_of(obj)}: Secrets are created out of band, never rendered from the repo")
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                if SENSITIVE.search(key):
                    problems.append(f"{name_of(obj)}: key {key} belongs in a Secret")
    for where, _, _, pod in pods(objs):
        for c in containers(pod):
            for name, e in env_of(c).items():
                if SENSITIVE.search(name) and "secretKeyRef" not in e.get("valueFrom", {}):
                    problems.append(f"{where} container {c.get('name')}: env {name} must come from a secretKeyRef")
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    problems.append(f"{where} container {c.get('name')}: envFrom a whole Secret; use secretKeyRef")
    for where, spec, _ in rayjob_specs(objs):
        for word in shlex.split(spec.get("entrypoint", "")):
            if "=" in word and SENSITIVE.search(word.split("=", 1)[0]):
                problems.append(f"{where}: entrypoint passes {word.split('=', 1)[0]} inline")
    return problems


def reference_problems(objs: list[dict]) -> list[str]:
    problems = []
    pvcs, cms = objects_of(objs, "PersistentVolumeClaim"), objects_of(objs, "ConfigMap")
    sas, roles = objects_of(objs, "ServiceAccount"), objects_of(objs, "Role")
    for where, role, _, pod in pods(objs):
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for v in vols.values():
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"{where}: volume {v['name']} claims a PVC not rendered here")
            if "configMap" in v and v["configMap"]["name"] not in cms:
                problems.append(f"{where}: volume {v['name']} uses a ConfigMap not rendered here")
        sa = pod.get("serviceAccountName")
        if sa is not None and sa not in sas:
            problems.append(f"{where}: service account {sa} not rendered here")
        for c in containers(pod):
            cw = f"{where} container {c.get('name')}"
            mounts = c.get("volumeMounts", [])
            for m in mounts:
                if m["name"] not in vols:
                    problems.append(f"{cw}: mounts unknown volume {m['name']}")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {})
                if cm and cm["name"] not in cms and not cm.get("optional"):
                    problems.append(f"{cw}: envFrom ConfigMap {cm['name']} not rendered here")
            for name, e in env_of(c).items():
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and not ref.get("optional") and ref["key"] not in cms.get(ref["name"], {}).get("data", {}):
                    problems.append(f"{cw}: env {name} needs key {ref['key']} of ConfigMap {ref['name']}")
            # Where the image writes under a read-only root: these must be on writable volumes.
            writable = [m["mountPath"] for m in mounts if not m.get("readOnly")]
            for name in ("HOME", "HF_HOME"):
                value = env_of(c).get(name, {}).get("value")
                if value is not None and not any(value == p or value.startswith(p.rstrip("/") + "/") for p in writable):
                    problems.append(f"{cw}: {name}={value} is not on a writable volume")
            if role in ("head", "worker") and env_of(c).get("HF_HOME", {}).get("value") != HF_HOME:
                problems.append(f"{cw}: HF_HOME must be {HF_HOME} (the image's model cache volume)")
    for rb in objects_of(objs, "RoleBinding").values():
        if rb["roleRef"]["kind"] != "Role" or rb["roleRef"]["name"] not in roles:
            problems.append(f"{name_of(rb)}: binds {rb['roleRef']['kind']}/{rb['roleRef']['name']}, not a Role here")
        for s in rb.get("subjects", []):
            if s["kind"] != "ServiceAccount" or s["name"] not in sas:
                problems.append(f"{name_of(rb)}: subject {s['kind']}/{s['name']} not a ServiceAccount here")
    return problems


def constraint_pin(package: str) -> str:
    for line in (REPO / "configs" / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in configs/constraints.txt")


def rayjob_problems(objs: list[dict]) -> list[str]:
    """What KubeRay's Go validation checks and the schema does not, plus this project's policy."""
    problems = []
    ray_version = constraint_pin("ray")
    for where, spec, obj in rayjob_specs(objs):
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            problems.append(f"{where}: exactly one of rayClusterSpec and clusterSelector")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: suspend needs shutdownAfterJobFinishes")
        if spec.get("clusterSelector") and spec.get("backoffLimit", 0) > 0:
            problems.append(f"{where}: backoffLimit does not work with clusterSelector")
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"{where}: unknown submissionMode {spec.get('submissionMode')}")
        # Policy: the cluster goes after the job, retries and a deadline are set, and the submitter is a
        # Kubernetes Job (RUN_NAME comes from its job-name label).
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: shutdownAfterJobFinishes must be true (the cluster goes when the job ends)")
        if not spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{where}: set ttlSecondsAfterFinished")
        if not spec.get("backoffLimit", 0) >= 1:
            problems.append(f"{where}: set backoffLimit >= 1")
        if not spec.get("activeDeadlineSeconds", 0) > 0:
            problems.append(f"{where}: set activeDeadlineSeconds")
        if spec.get("submissionMode") != "K8sJobMode" or not spec.get("submitterPodTemplate"):
            problems.append(f"{where}: use submissionMode K8sJobMode with a submitterPodTemplate")
        if spec.get("jobId"):
            problems.append(f"{where}: a fixed jobId collides across runs and retries")
        if not spec.get("entrypoint", "").strip():
            problems.append(f"{where}: no entrypoint")
        cluster = spec.get("rayClusterSpec") or {}
        if cluster.get("rayVersion") != ray_version:
            problems.append(f"{where}: rayVersion {cluster.get('rayVersion')!r} is not the pinned ray {ray_version}")
        if cluster.get("enableInTreeAutoscaling"):  # KubeRay injects the sidecar: lock it down from here
            auto = cluster.get("autoscalerOptions", {})
            sc = auto.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: autoscalerOptions.securityContext: no privilege escalation, drop ALL")
            if not {"cpu", "memory"} <= set(auto.get("resources", {}).get("limits", {})):
                problems.append(f"{where}: autoscalerOptions.resources: set limits")
        if cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("dashboard-host") != "0.0.0.0":
            problems.append(f"{where}: the submitter reaches the dashboard only with dashboard-host 0.0.0.0")
        groups = cluster.get("workerGroupSpecs", [])
        if len({g["groupName"] for g in groups}) != len(groups):
            problems.append(f"{where}: duplicate worker group names")
        for g in groups:
            if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
                problems.append(f"{where}: group {g['groupName']}: minReplicas <= replicas <= maxReplicas")
        if obj["kind"] == "RayJob":
            name = obj["metadata"]["name"]
            if len(name) > MAX_RAYJOB_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
                problems.append(f"{where}: name must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    return problems


def submitter_env(spec: dict, objs: list[dict], run_name: str) -> dict[str, str]:
    """What the submitter pod's shell sees: its env, its envFrom ConfigMaps, RUN_NAME from the job-name
    label (KubeRay names the submitter Job after the RayJob), and what KubeRay adds."""
    cms = objects_of(objs, "ConfigMap")
    env: dict[str, str] = {"RAY_DASHBOARD_ADDRESS": "head-svc:8265", "RAY_JOB_SUBMISSION_ID": "id"}
    for c in spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])[:1]:
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref:
                env.update(cms.get(ref["configMapRef"]["name"], {}).get("data", {}))
        for name, e in env_of(c).items():
            if "value" in e:
                env[name] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == JOB_NAME_LABEL:
                env[name] = run_name
    return env


VAR = re.compile(r"\$\{(\w+)\}|\$\((\w+)\)|\$(\w+)")


def command_argv(command: str, env: dict[str, str]) -> list[str]:
    """A command line as the shell would run it: split, unwrapped from `bash -c`, variables expanded."""
    words = shlex.split(command)
    while len(words) >= 3 and Path(words[0]).name in ("bash", "sh") and words[1].startswith("-") and "c" in words[1]:
        words = shlex.split(words[2])

    def expand(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name not in env:
            raise KeyError(name)
        return env[name]

    return [VAR.sub(expand, w) for w in words]


def parse_cli(argv: list[str]) -> tuple[Any, str]:
    """`subsume` argv → (argparse namespace or None, argparse's complaint)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(argv[1:]), ""
        except SystemExit:
            return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exit"


def parsed_entrypoints(objs: list[dict], run_name: str = "subsume-train-29000000") -> tuple[list[tuple], list[str]]:
    """[(where, namespace, spec, env)], problems — for every RayJob entrypoint and every container
    command that runs `subsume`."""
    out, problems = [], []
    for where, spec, _ in rayjob_specs(objs):
        env = submitter_env(spec, objs, run_name)
        try:
            argv = command_argv(spec.get("entrypoint", ""), env)
        except KeyError as e:
            problems.append(f"{where}: entrypoint uses ${{{e.args[0]}}}, which the submitter pod does not define")
            continue
        if not argv or argv[0] != "subsume":
            problems.append(f"{where}: entrypoint does not run subsume: {argv[:3]}")
            continue
        ns, complaint = parse_cli(argv)
        if ns is None:
            problems.append(f"{where}: `{' '.join(argv)}` does not parse: {complaint}")
            continue
        out.append((where, ns, spec, env))
    for where, _, _, pod in pods(objs):
        for c in containers(pod):
            line = shlex.join(c.get("command", []) + c.get("args", []))
            if not line:
                continue
            env = {k: e.get("value", "x") for k, e in env_of(c).items()}
            try:
                argv = command_argv(line, env)
            except (KeyError, ValueError):
                continue
            if argv and Path(argv[0]).name == "subsume":
                ns, complaint = parse_cli(argv)
                if ns is None:
                    problems.append(f"{where} container {c.get('name')}: does not parse: {complaint}")
    return out, problems


def worker_groups(spec: dict) -> list[dict]:
    return (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs", [])


def head_mounts(spec: dict) -> dict[str, dict]:
    """mountPath -> the volume behind it, in the head's Ray container (where the driver runs)."""
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: vols.get(m["name"], {}) for m in pod["containers"][0].get("volumeMounts", [])}


def volume_for(path: str, mounts: dict[str, dict]) -> dict | None:
    best = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    return mounts.get(best) if best else None


def mounted_file(path: str, spec: dict, cms: dict[str, dict]) -> str | None:
    """The text the head sees at `path`, when a mounted ConfigMap provides it."""
    vol = volume_for(path, head_mounts(spec))
    cm = cms.get(((vol or {}).get("configMap") or {}).get("name"), {})
    return cm.get("data", {}).get(Path(path).name)


def key_of(where: str, ns: Any, spec: dict, cms: dict[str, dict], problems: list[str]) -> tuple | None:
    """What names this job's KEY (the mounted KEY file's settings, and the store), or None with the problem."""
    from feature_store.features_config import COMMIT, FeaturesConfig

    path = ns.config if ns.command == "extract" else ns.features
    flag = "--config" if ns.command == "extract" else "--features"
    given = [f for f in FEATURE_FLAGS if getattr(ns, f) != FEATURE_DEFAULTS[f]]
    if given:
        problems.append(f"{where}: KEY flags {given} on the command line: the KEY file alone names the KEY")
    if path is None:
        problems.append(f"{where}: name the KEY with the mounted extract.yaml ({flag}), not with flags")
        return None
    text = mounted_file(path, spec, cms)
    if text is None:
        problems.append(f"{where}: {flag} {path} is not a key of a mounted ConfigMap")
        return None
    try:
        cfg = FeaturesConfig.model_validate(yaml.safe_load(text))
    except ValueError as e:
        problems.append(f"{where}: {flag} {path}: {e}")
        return None
    if not COMMIT.fullmatch(cfg.teacher.revision or ""):
        problems.append(f"{where}: hub teacher {cfg.teacher.model} needs its revision pinned to a commit")
    if cfg.teacher.trust_remote_code:
        problems.append(f"{where}: trust_remote_code is off unless asked for")
    return cfg.model_dump_json(exclude={"store"}), ns.store


def entrypoint_problems(objs: list[dict]) -> list[str]:
    run_name = "subsume-train-29000000"
    parsed, problems = parsed_entrypoints(objs, run_name)
    cms = objects_of(objs, "ConfigMap")
    keys: dict[str, tuple] = {}
    for where, ns, spec, env in parsed:
        gpu_groups = [g for g in worker_groups(spec) if "gpu" in g["groupName"]]
        if not ns.json:
            problems.append(f"{where}: pass --json (one JSON summary line for whoever reads the logs)")
        if ns.command not in ("extract", "train"):
            problems.append(f"{where}: unexpected command {ns.command}")
            continue
        key = key_of(where, ns, spec, cms, problems)
        if key is not None:
            keys[ns.command] = key
        if not ns.store.startswith("s3://") and volume_for(ns.store, head_mounts(spec)) is None:
            problems.append(f"{where}: store {ns.store} is neither s3:// nor on a mounted volume")
        if ns.command == "extract":
            if gpu_groups and ns.device != "cuda":
                problems.append(f"{where}: GPU worker group but --device {ns.device}")
            if not gpu_groups and ns.device == "cuda":
                problems.append(f"{where}: --device cuda without a GPU worker group")
            if gpu_groups and ns.teacher_actors != sum(g["maxReplicas"] for g in gpu_groups):
                problems.append(f"{where}: --teacher-actors {ns.teacher_actors} is not one per GPU worker")
            if gpu_groups and not any("gpu" not in g["groupName"] for g in worker_groups(spec)):
                problems.append(f"{where}: decoding wants a CPU worker group beside the GPU one")
        if ns.command == "train":
            n_workers = sum(g["replicas"] for g in worker_groups(spec))
            if ns.workers != n_workers:
                problems.append(f"{where}: --workers {ns.workers} but the worker groups have {n_workers} replicas")
            if ns.workers <= 1 and not ns.use_gpu:
                problems.append(f"{where}: one CPU worker trains inside the driver on the head, not on the workers")
            if bool(gpu_groups) != ns.use_gpu:
                problems.append(f"{where}: --use-gpu must match the presence of a GPU worker group")
            # A scheduled run's folder and checkpoints carry its own name; a retry reuses them.
            if run_name not in ns.out:
                problems.append(f"{where}: --out {ns.out} does not carry the run name (${{RUN_NAME}})")
            if ns.storage_path is not None and run_name not in ns.storage_path:
                problems.append(f"{where}: --storage-path {ns.storage_path} does not carry the run name")
            vol = volume_for(ns.out, head_mounts(spec))
            if vol is None or "persistentVolumeClaim" not in vol:
                problems.append(f"{where}: --out {ns.out} must be on a PVC (it outlives the cluster)")
            if ns.config:
                text = mounted_file(ns.config, spec, cms)
                if text is None:
                    problems.append(f"{where}: --config {ns.config} is not a key of a mounted ConfigMap")
                elif not isinstance(yaml.safe_load(text), dict):
                    problems.append(f"{where}: --config {ns.config} is not a YAML mapping")
            run_env = [e for c in spec["submitterPodTemplate"]["spec"]["containers"][:1]
                       for e in c.get("env", []) if e["name"] == "RUN_NAME"]
            if not run_env or run_env[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != JOB_NAME_LABEL:
                problems.append(f"{where}: RUN_NAME must come from the submitter pod's {JOB_NAME_LABEL}")
    if "extract" in keys and "train" in keys and keys["extract"] != keys["train"]:
        problems.append(f"extract and train name different KEYs or stores: {keys['extract']} != {keys['train']}")
    return problems


def cron_matches(fields: list[set[int]], minute: int) -> bool:
    """Does a parsed 5-field schedule fire at this minute of a Monday-first week-long cycle (UTC)?"""
    day, rem = divmod(minute, 24 * 60)
    hour, minute_of_hour = divmod(rem, 60)
    dow = (day + 1) % 7  # minute 0 is a Monday 00:00; cron counts Sunday as 0
    return minute_of_hour in fields[0] and hour in fields[1] and dow in fields[4]


def parse_cron(schedule: str) -> list[set[int]]:
    parts = schedule.split()
    assert len(parts) == 5, f"schedule {schedule!r} is not 5 fields"
    assert parts[2] == "*" and parts[3] == "*", "only day-of-month/month wildcards are checked here"
    out = []
    for text, (lo, hi) in zip(parts, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]):
        values: set[int] = set()
        for item in text.split(","):
            rng, _, step = item.partition("/")
            a, b = (lo, hi) if rng == "*" else (int(rng.split("-")[0]), int(rng.split("-")[-1]))
            values.update(range(a, b + 1, int(step or 1)))
        out.append(values)
    return out


def min_period_seconds(schedule: str) -> int:
    fields = parse_cron(schedule)
    week = 7 * 24 * 60
    fires = [m for m in range(week) if cron_matches(fields, m)]
    assert fires, f"schedule {schedule!r} never fires"
    gaps = [b - a for a, b in zip(fires, fires[1:])] + [fires[0] + week - fires[-1]]
    return min(gaps) * 60


def worst_case_seconds(spec: dict) -> int:
    return spec["activeDeadlineSeconds"] * (spec["backoffLimit"] + 1)


def schedule_problems(objs: list[dict]) -> list[str]:
    problems = []
    rayjobs, cronjobs = objects_of(objs, "RayJob"), objects_of(objs, "CronJob")
    raycronjobs = objects_of(objs, "RayCronJob")
    for rcj in raycronjobs.values():
        where, spec = name_of(rcj), rcj["spec"]
        if "TZ" in spec["schedule"] or not spec.get("timeZone"):
            problems.append(f"{where}: the zone goes in timeZone, not in the schedule")
        # Its RayJobs are named <name>-<5 random characters> (KubeRay 1.6) or rayjob-<name>-<minutes since
        # epoch> (later): leave room for the longer form.
        if len(rcj["metadata"]["name"]) > MAX_RAYJOB_NAME - len("rayjob--") - 10:
            problems.append(f"{where}: name too long for the RayJob names derived from it")
        # No concurrencyPolicy: a run (all its retries) must be over before the next one starts.
        if worst_case_seconds(spec["jobTemplate"]) >= min_period_seconds(spec["schedule"]):
            problems.append(f"{where}: activeDeadlineSeconds * (backoffLimit + 1) must be shorter than the period")
    for cj in cronjobs.values():
        where, spec = name_of(cj), cj["spec"]
        job = spec["jobTemplate"]["spec"]
        pod = job["template"]["spec"]
        if spec.get("concurrencyPolicy") != "Forbid":
            problems.append(f"{where}: concurrencyPolicy must be Forbid")
        for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit", "startingDeadlineSeconds"):
            if key not in spec:
                problems.append(f"{where}: set {key}")
        if "TZ" in spec["schedule"] or not spec.get("timeZone"):
            problems.append(f"{where}: the zone goes in timeZone, not in the schedule")
        env = {k: e for c in pod["containers"] for k, e in env_of(c).items()}
        template = rayjobs.get(env.get("TEMPLATE", {}).get("value"))
        if template is None:
            problems.append(f"{where}: TEMPLATE does not name a RayJob rendered here")
            continue
        if template["spec"].get("suspend") is not True:
            problems.append(f"{where}: the template RayJob must be suspended (it would run by itself)")
        if env.get("JOB_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != JOB_NAME_LABEL:
            problems.append(f"{where}: JOB_NAME must come from {JOB_NAME_LABEL} (one RayJob per scheduled Job)")
        if job.get("activeDeadlineSeconds", 0) < worst_case_seconds(template["spec"]):
            problems.append(f"{where}: the creator must outlive the RayJob it follows, or Forbid stops covering it")
        if job.get("activeDeadlineSeconds", 0) >= min_period_seconds(spec["schedule"]):
            problems.append(f"{where}: the creator's deadline must be shorter than the schedule's period")
        images = {c["image"] for c in pod["containers"]}
        head_image = template["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        if images != {head_image}:
            problems.append(f"{where}: the creator needs the project image (with kubectl) {head_image}, has {images}")
        sa = pod.get("serviceAccountName")
        bound = {rb["roleRef"]["name"] for rb in objects_of(objs, "RoleBinding").values()
                 if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in rb.get("subjects", []))}
        rules = [r for name in bound for r in objects_of(objs, "Role").get(name, {}).get("rules", [])]
        allowed = {(g, r, v) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
                   for v in rule.get("verbs", [])}
        if not {("ray.io", "rayjobs", "get"), ("ray.io", "rayjobs", "create")} <= allowed:
            problems.append(f"{where}: service account {sa} may not get and create RayJobs")
        extra = {a for a in allowed if a[:2] != ("ray.io", "rayjobs") or a[2] not in ("get", "create")}
        if extra or any("*" in str(r) for r in rules):
            problems.append(f"{where}: Role grants more than get/create on rayjobs: {sorted(extra)}")
    if raycronjobs and "subsume-train" in rayjobs:
        problems.append("RayJob subsume-train would start a run on apply beside the RayCronJob")
    return problems


ALL_RULES = (security_problems, resource_problems, gpu_problems, secret_problems, reference_problems,
             rayjob_problems, entrypoint_problems, schedule_problems)


# --- the tests ---------------------------------------------------------------------------------------


def test_every_overlay_renders(rendered):
    assert {"cpu-dev", "gpu"} <= set(OVERLAYS)
    for name, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert "RayJob" in kinds, f"{name}: no extraction RayJob"
        assert kinds & {"CronJob", "RayCronJob"}, f"{name}: no scheduled training"
        assert all(o["metadata"].get("namespace") == "subsume" for o in objs), f"{name}: objects outside the namespace"
        extract = objects_of(objs, "RayJob")["subsume-extract"]
        assert any("gpu" in g["groupName"] for g in worker_groups(extract["spec"])) == name.startswith("gpu")


def test_both_schedule_variants_exist(rendered):
    kinds = {k for objs in rendered.values() for k in (o["kind"] for o in objs)}
    assert {"RayCronJob", "CronJob"} <= kinds
    assert any(
        o["kind"] == "ConfigMap" and o["data"].get("SUBSUME_STORE", "").startswith("s3://")
        for objs in rendered.values() for o in objs), "no overlay with the store on S3"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_match_schemas(rendered, validators, overlay):
    assert schema_problems(rendered[overlay], validators) == []


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rules_hold(rendered, overlay, rule):
    assert rule(rendered[overlay]) == []


def test_entrypoints_parse_with_the_cli(rendered):
    commands = {}
    for name, objs in rendered.items():
        parsed, problems = parsed_entrypoints(objs)
        assert problems == [], name
        commands[name] = {ns.command for _, ns, _, _ in parsed}
        assert commands[name] == {"extract", "train"}, f"{name}: {commands[name]}"


def test_train_config_loads_with_the_training_code(rendered, tmp_path):
    """The mounted run config, with the entrypoint's --set overrides, is a valid TrainConfig."""
    config = pytest.importorskip("training.config")
    for name, objs in rendered.items():
        for where, ns, _, _ in parsed_entrypoints(objs)[0]:
            if ns.command != "train":
                continue
            data = objects_of(objs, "ConfigMap")["subsume-config"]["data"][Path(ns.config).name]
            path = tmp_path / f"{name}.yaml"
            path.write_text(data)
            cfg = config.load_config(str(path), list(ns.set))
            assert cfg.steps > 0, f"{name} {where}"


# Single-node (a laptop) or without an object store: everything on the volume. The rest are multi-node
# clusters, where a shared file server would carry every node's reads and writes.
ON_THE_VOLUME = {"cpu-dev", "gpu-pvc"}


def test_store_location_follows_the_overlay(rendered):
    for name, objs in rendered.items():
        on_s3 = name not in ON_THE_VOLUME
        for where, ns, _, _ in parsed_entrypoints(objs)[0]:
            assert ns.store.startswith("s3://") == on_s3, f"{name} {where}: store {ns.store}"
            if ns.command == "train":
                assert ns.storage_path.startswith("s3://") == on_s3, f"{name}: checkpoints {ns.storage_path}"
            if ns.command == "extract":
                assert ns.videos.startswith("s3://") == on_s3, f"{name}: videos {ns.videos}"


@pytest.fixture()
def fake_kubectl(tmp_path):
    """A stand-in for kubectl that keeps RayJobs as JSON files: enough to run the creator script."""
    bindir, state = tmp_path / "bin", tmp_path / "state"
    bindir.mkdir()
    state.mkdir()
    script = bindir / "kubectl"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        from pathlib import Path
        state = Path({str(state)!r})
        args = sys.argv[1:]
        with open(state / "calls.log", "a") as log:
            log.write(" ".join(args) + "\\n")
        if args[:2] == ["get", "rayjob"]:
            f = state / (args[2] + ".json")
            if not f.exists():
                sys.exit("NotFound")
            obj = json.loads(f.read_text())
            if "jsonpath={{.status.jobDeploymentStatus}}" in args:
                print(obj.get("status", {{}}).get("jobDeploymentStatus", ""), end="")
            elif "json" in args:
                print(json.dumps(obj))
            else:
                print("rayjob.ray.io/" + args[2])
        elif args[:2] == ["create", "-f"]:
            obj = json.loads(sys.stdin.read())
            f = state / (obj["metadata"]["name"] + ".json")
            if f.exists():
                sys.exit("AlreadyExists")
            obj["status"] = {{"jobDeploymentStatus": "Complete"}}
            f.write_text(json.dumps(obj))
            print("rayjob.ray.io/" + obj["metadata"]["name"] + " created")
        else:
            sys.exit("unexpected: " + " ".join(args))
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir, state


def run_creator(cronjob: dict, bindir: Path, job_name: str) -> subprocess.CompletedProcess:
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {k: e["value"] for k, e in env_of(container).items() if "value" in e}
    # python3 is the test's own interpreter, as in the image (the venv is first on PATH there too).
    env.update(JOB_NAME=job_name, POLL_SECONDS="0", HOME=str(bindir),
               PATH=os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    return subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_creator_starts_one_rayjob_per_scheduled_run(rendered, validators, fake_kubectl):
    """The CronJob's script, run with a stand-in kubectl: a new RayJob per scheduled Job, named after it,
    unsuspended, schema-valid; a retried pod of the same Job follows that RayJob instead of creating one."""
    bindir, state = fake_kubectl
    objs = rendered["gpu"]
    cronjob = objects_of(objs, "CronJob")["subsume-train"]
    template = objects_of(objs, "RayJob")["subsume-train"]
    (state / "subsume-train.json").write_text(json.dumps(template))

    first = run_creator(cronjob, bindir, "subsume-train-29000000")
    assert first.returncode == 0, first.stderr
    created = json.loads((state / "subsume-train-29000000.json").read_text())
    created.pop("status")
    assert created["spec"]["suspend"] is False
    assert created["spec"] | {"suspend": True} == template["spec"]
    assert schema_problems([created], validators) == []
    assert rayjob_problems([created]) == []
    assert len(created["metadata"]["name"]) <= MAX_RAYJOB_NAME

    retry = run_creator(cronjob, bindir, "subsume-train-29000000")
    assert retry.returncode == 0, retry.stderr
    creates = [c for c in (state / "calls.log").read_text().splitlines() if c.startswith("create")]
    assert len(creates) == 1, "a retried creator pod started a second run"

    assert run_creator(cronjob, bindir, "subsume-train-29001440").returncode == 0
    assert (state / "subsume-train-29001440.json").exists(), "the next scheduled run got no RayJob of its own"


def test_creator_reports_a_failed_run(rendered, fake_kubectl):
    bindir, state = fake_kubectl
    objs = rendered["gpu"]
    cronjob = objects_of(objs, "CronJob")["subsume-train"]
    failed = copy.deepcopy(objects_of(objs, "RayJob")["subsume-train"])
    failed["metadata"]["name"] = "subsume-train-29000000"
    failed["status"] = {"jobDeploymentStatus": "Failed"}
    (state / "subsume-train-29000000.json").write_text(json.dumps(failed))
    result = run_creator(cronjob, bindir, "subsume-train-29000000")
    # 3 is the exit code the Job's podFailurePolicy turns into FailJob (no pointless pod retries).
    assert result.returncode == 3, (result.returncode, result.stderr)
    rules = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and 3 in r["onExitCodes"]["values"] for r in rules)


def test_cron_period():
    assert min_period_seconds("0 3 * * *") == 86400
    assert min_period_seconds("*/15 * * * *") == 900
    assert min_period_seconds("0 3 * * 1,4") == 3 * 86400
    assert min_period_seconds("30 1,13 * * *") == 12 * 3600


def test_command_argv_expands_and_unwraps():
    env = {"RUN_NAME": "r1", "STORE": "/data/store"}
    assert command_argv("bash -c 'subsume train --out /runs/${RUN_NAME} --store $STORE'", env) == [
        "subsume", "train", "--out", "/runs/r1", "--store", "/data/store"]
    assert command_argv("subsume x --out $(RUN_NAME)", env)[-1] == "r1"
    with pytest.raises(KeyError):
        command_argv("subsume train --out ${MISSING}", env)


# --- the checks catch what they claim to catch ---------------------------------------------------------


def find(objs: list[dict], kind: str, name: str) -> dict:
    return objects_of(objs, kind)[name]


def key_file(objs: list[dict]) -> dict:
    return find(objs, "ConfigMap", "subsume-config")["data"]


def extract_head(objs: list[dict]) -> dict:
    return find(objs, "RayJob", "subsume-extract")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


BREAKAGES = {
    "typo in a RayJob field": (
        lambda o: find(o, "RayJob", "subsume-extract")["spec"].update(shutdownAfterJobFinish=True), schema_problems),
    "string where an integer goes": (
        lambda o: find(o, "CronJob", "subsume-train")["spec"].update(successfulJobsHistoryLimit="3"), schema_problems),
    "head runs as root": (
        lambda o: extract_head(o)["securityContext"].update(runAsUser=0), security_problems),
    "writable root filesystem": (
        lambda o: extract_head(o)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        security_problems),
    "privilege escalation": (
        lambda o: extract_head(o)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        security_problems),
    "no memory limit": (
        lambda o: extract_head(o)["containers"][0]["resources"]["limits"].pop("memory"), resource_problems),
    "GPU on the head": (
        lambda o: extract_head(o)["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": 1}), gpu_problems),
    "inline token": (
        lambda o: extract_head(o)["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "x"}),
        secret_problems),
    "a Secret in the manifests": (
        lambda o: o.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                            "stringData": {"AWS_SECRET_ACCESS_KEY": "x"}}), secret_problems),
    "unknown CLI flag": (
        lambda o: find(o, "RayJob", "subsume-extract")["spec"].update(
            entrypoint=find(o, "RayJob", "subsume-extract")["spec"]["entrypoint"] + " --frames-per-second 4"),
        entrypoint_problems),
    "undefined variable": (
        lambda o: find(o, "RayJob", "subsume-extract")["spec"].update(
            entrypoint=find(o, "RayJob", "subsume-extract")["spec"]["entrypoint"].replace(
                "${SUBSUME_STORE}", "${STORE_ROOT}")), entrypoint_problems),
    "unpinned teacher": (
        lambda o: key_file(o).update({"extract.yaml": re.sub(r"revision: \S+", "revision: main",
                                                             key_file(o)["extract.yaml"])}), entrypoint_problems),
    "KEY flags beside the KEY file": (
        lambda o: find(o, "RayJob", "subsume-extract")["spec"].update(
            entrypoint=find(o, "RayJob", "subsume-extract")["spec"]["entrypoint"] + " --fps 2"), entrypoint_problems),
    "typo in the KEY file": (
        lambda o: key_file(o).update({"extract.yaml": key_file(o)["extract.yaml"].replace("segment_frames",
                                                                                          "segment_frame")}),
        entrypoint_problems),
    "fixed run folder": (
        lambda o: find(o, "RayJob", "subsume-train")["spec"].update(
            entrypoint=find(o, "RayJob", "subsume-train")["spec"]["entrypoint"].replace(
                "/data/runs/${RUN_NAME}", "/data/runs/nightly")), entrypoint_problems),
    "training in the driver": (
        lambda o: find(o, "RayJob", "subsume-train")["spec"].update(
            entrypoint=find(o, "RayJob", "subsume-train")["spec"]["entrypoint"].replace(
                "--workers 4 --use-gpu", "--workers 1")), entrypoint_problems),
    "train looks up another KEY": (
        lambda o: (key_file(o).update({"other.yaml": key_file(o)["extract.yaml"].replace("fps: 4", "fps: 2")}),
                   find(o, "RayJob", "subsume-train")["spec"].update(
                       entrypoint=find(o, "RayJob", "subsume-train")["spec"]["entrypoint"].replace(
                           "/etc/subsume/extract.yaml", "/etc/subsume/other.yaml"))), entrypoint_problems),
    "no TTL": (lambda o: find(o, "RayJob", "subsume-extract")["spec"].pop("ttlSecondsAfterFinished"), rayjob_problems),
    "cluster kept after the job": (
        lambda o: find(o, "RayJob", "subsume-extract")["spec"].update(shutdownAfterJobFinishes=False), rayjob_problems),
    "overlapping scheduled runs": (
        lambda o: find(o, "CronJob", "subsume-train")["spec"].update(concurrencyPolicy="Allow"), schedule_problems),
    "template not suspended": (
        lambda o: find(o, "RayJob", "subsume-train")["spec"].pop("suspend"), schedule_problems),
    "Role too wide": (
        lambda o: find(o, "Role", "subsume-train-scheduler")["rules"][0]["verbs"].append("delete"),
        schedule_problems),
    "missing PVC": (lambda o: o.remove(find(o, "PersistentVolumeClaim", "subsume-data")), reference_problems),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checks_catch_broken_manifests(rendered, request, breakage):
    objs = copy.deepcopy(rendered["gpu"])
    mutate, rule = BREAKAGES[breakage]
    mutate(objs)
    if rule is schema_problems:
        found = schema_problems(objs, request.getfixturevalue("validators"))
    else:
        found = rule(objs)
    assert found, f"{rule.__name__} missed: {breakage}"


def test_raycronjob_schedule_is_checked_against_deadlines(rendered):
    objs = copy.deepcopy(rendered["gpu-raycronjob"])
    rcj = find(objs, "RayCronJob", "subsume-train")
    rcj["spec"]["schedule"] = "0 */6 * * *"
    assert any("period" in p for p in schedule_problems(objs))
