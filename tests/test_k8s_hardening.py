"""The hardening of the rendered manifests, each item a rule over the objects of every overlay (as in
tests/test_k8s.py): memory for Ray's object store, bounded scratch space, a head that holds the driver and stays
off preemptible nodes, network reach limited to the job's own pods, Ray token authentication, no credentials in
what a job carries, autoscaled extraction workers, and deadlines that fit the planned corpus at a stated rate.
The last test breaks each item on purpose and sees its rule catch it.

The planning figures (docs/kubernetes.md, "Sizing"): unmeasured estimates, stated where they are used.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import pytest
import yaml

from tests.test_k8s import (SENSITIVE, containers, find, mounted_file, objects_of, parse_quantity, parsed_entrypoints,
                            pods, rayjob_specs, rendered)  # noqa: F401  (rendered is a fixture)

GIB = 2**30
# The extraction driver, MEASURED by the ingest_scale benchmark (docs/benchmarks.md, 2026-11-30): peak RSS about
# 0.65 GiB at 10^4 listed videos, growing by about 2.2 KiB a listed video up to 10^5 (dry run; the real run grew
# less). Extrapolated linearly to the planned corpus (docs/kubernetes.md, "Sizing the head"), plus the head's own
# Ray processes (GCS, raylet, dashboard, Ray Data's executor: an ESTIMATE) and a margin for planning's transient
# joins. Required of every cluster that plans >= 10^6 videos. (Since planning works in chunks the measured slope is
# ~1.6 KiB a video; the 2.2 KiB measured before it is kept as the sizing's margin.)
DRIVER_BASE_GIB = 0.65
DRIVER_KIB_PER_VIDEO = 2.2
HEAD_RAY_GIB = 5.0
HEAD_MARGIN = 1.5


def extract_head_gib(videos: int) -> float:
    return (DRIVER_BASE_GIB + DRIVER_KIB_PER_VIDEO * videos / 2**20 + HEAD_RAY_GIB) * HEAD_MARGIN


TRAIN_HEAD_GIB_AT_1M = 16  # the KEY's index as Arrow (~0.5 KB a sample, 7.5 samples a video) + the Train controller
LARGE = 10**6
# Throughput per unit (docs/kubernetes.md, "Deadlines"): CLIP ViT-B/16 in bf16 on one data-centre GPU; decoding
# 640x480 H.264 sampled at 4 fps per CPU core; the same teacher on one CPU core. Estimates, not measurements.
GPU_TEACHER_FPS = 2000
DECODE_FPS_PER_CORE = 25
CPU_TEACHER_FPS_PER_CORE = 1.3
DEADLINE_MARGIN = 1.5
PREEMPTIBLE_LABELS = {"cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible", "eks.amazonaws.com/capacityType",
                      "karpenter.sh/capacity-type", "kubernetes.azure.com/scalesetpriority"}
RAY_PORTS = {6379, 8265}  # GCS, dashboard
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}


def ray_pods(spec: dict) -> Iterator[tuple[str, str, dict, dict]]:
    """(role, group name, rayStartParams, pod template) of a Ray cluster's head and worker groups."""
    cluster = spec.get("rayClusterSpec") or {}
    head = cluster.get("headGroupSpec", {})
    yield "head", "head", head.get("rayStartParams", {}), head.get("template", {})
    for g in cluster.get("workerGroupSpecs", []):
        yield "worker", g["groupName"], g.get("rayStartParams", {}), g.get("template", {})


def memory_limit(container: dict) -> float:
    return parse_quantity(container.get("resources", {}).get("limits", {}).get("memory", 0))


def extractions(objs: list[dict]) -> Iterator[tuple[str, Any, dict]]:
    for where, ns, spec, _ in parsed_entrypoints(objs)[0]:
        if ns.command == "extract":
            yield where, ns, spec


def planned_videos(objs: list[dict]) -> int:
    return max((int(o["metadata"].get("annotations", {}).get("subsume.io/planned-videos", 0))
                for o in objects_of(objs, "RayJob").values()), default=0)


# --- the rules ----------------------------------------------------------------------------------------


def shm_problems(objs: list[dict]) -> list[str]:
    """Ray's object store lives in /dev/shm (64 MiB by default in a container): a memory volume at least as big
    as the store (object-store-memory, else Ray's default of 30% of memory), within the memory limit."""
    problems = []
    for where, spec, _ in rayjob_specs(objs):
        for role, group, params, template in ray_pods(spec):
            pod = template.get("spec", {})
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            c = pod.get("containers", [{}])[0]
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
            empty = vols.get(mount["name"], {}).get("emptyDir") if mount else None
            if empty is None or empty.get("medium") != "Memory" or "sizeLimit" not in empty:
                problems.append(f"{where} {group}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit")
                continue
            size, limit = parse_quantity(empty["sizeLimit"]), memory_limit(c)
            store = float(params.get("object-store-memory", 0.3 * limit))
            if not store <= size <= limit:
                problems.append(f"{where} {group}: /dev/shm {empty['sizeLimit']} must hold the object store "
                                f"({store / GIB:.1f} GiB) and fit the memory limit ({limit / GIB:.1f} GiB)")
    return problems


def scratch_problems(objs: list[dict]) -> list[str]:
    """Every emptyDir (/tmp: Ray's logs and spilled objects, HOME) has a sizeLimit: a full node disk evicts
    everything on the node, a full emptyDir only the pod that filled it."""
    problems = []
    for where, _, _, pod in pods(objs):
        for v in pod.get("volumes", []):
            if "emptyDir" in v and "sizeLimit" not in (v["emptyDir"] or {}):
                problems.append(f"{where}: emptyDir {v['name']} has no sizeLimit")
        for c in containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if "/tmp" not in mounts:
                problems.append(f"{where} container {c['name']}: /tmp is not a (size-limited) volume")
    return problems


def head_problems(objs: list[dict]) -> list[str]:
    """The head (driver, GCS) stays off spot/preemptible nodes; at >= 10^6 planned videos it has the memory the
    driver needs (extract_head_gib: the measured growth, extrapolated)."""
    problems = []
    large = planned_videos(objs) >= LARGE
    for where, spec, _ in rayjob_specs(objs):
        pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        terms = (pod.get("affinity", {}).get("nodeAffinity", {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
        for term in terms or [{}]:  # terms are ORed: each one must keep spot nodes out
            kept_out = {e["key"] for e in term.get("matchExpressions", [])
                        if e["operator"] == "DoesNotExist" or (e["operator"] == "NotIn" and e.get("values"))}
            if not PREEMPTIBLE_LABELS <= kept_out:
                problems.append(f"{where} head: node affinity must keep out {sorted(PREEMPTIBLE_LABELS - kept_out)}")
        for t in pod.get("tolerations", []):
            if t.get("key") in PREEMPTIBLE_LABELS or (t.get("operator") == "Exists" and not t.get("key")):
                problems.append(f"{where} head: tolerates preemptible nodes ({t})")
        extract = spec["entrypoint"].split()[1] == "extract"
        needed = extract_head_gib(planned_videos(objs)) if extract else TRAIN_HEAD_GIB_AT_1M
        have = memory_limit(pod["containers"][0]) / GIB
        if large and have < needed:
            problems.append(f"{where} head: {have:.0f} GiB, the driver at {planned_videos(objs)} planned videos "
                            f"needs ~{needed:.0f} GiB (measured driver growth, extrapolated)")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def job_labels(spec: dict) -> list[dict]:
    out = [t.get("metadata", {}).get("labels", {}) for _, _, _, t in ray_pods(spec)]
    return out + [spec.get("submitterPodTemplate", {}).get("metadata", {}).get("labels", {})]


def peer_problem(peer: dict, rule: dict, own: dict, others: list[dict]) -> str | None:
    """Why this `from` peer lets more than the job's own pods (or the operator, on 8265 only) reach the head."""
    ports = {p.get("port") for p in rule.get("ports", [])}
    if "ipBlock" in peer or "podSelector" not in peer:
        return "admits addresses or whole namespaces"
    if "namespaceSelector" in peer:
        operator_only = peer["podSelector"].get("matchLabels") == OPERATOR and ports == {8265}
        return None if operator_only else "admits pods of other namespaces beyond the operator on 8265"
    if not selects(peer["podSelector"], own) or any(selects(peer["podSelector"], o) for o in others):
        return "admits pods that are not the job's own"
    return None


def network_problems(objs: list[dict]) -> list[str]:
    """Only the job's own pods reach its head's GCS and dashboard (the operator: the dashboard only); the
    job's pods all carry the labels that admit them."""
    problems = []
    policies = objects_of(objs, "NetworkPolicy").values()
    specs = list(rayjob_specs(objs))
    for where, spec, _ in specs:
        labels = job_labels(spec)
        own = labels[0]
        if not own or any(lab != own for lab in labels):
            problems.append(f"{where}: head, workers and submitter must carry the same pod labels, got {labels}")
        others = [job_labels(s)[0] for w, s, _ in specs if job_labels(s)[0] != own]
        guarding = [p for p in policies if selects(p["spec"]["podSelector"], own)
                    and "Ingress" in p["spec"].get("policyTypes", [])]
        if not guarding:
            problems.append(f"{where}: no NetworkPolicy restricts ingress to the head")
        for p in guarding:
            for rule in p["spec"].get("ingress", []):
                ports = {q.get("port") for q in rule.get("ports", [])}
                if ports and not ports & RAY_PORTS:
                    continue
                for peer in rule.get("from") or [{}]:  # no `from`: every source
                    why = peer_problem(peer, rule, own, others)
                    if why:
                        problems.append(f"{where}: NetworkPolicy/{p['metadata']['name']} {why}")
        admitted = any(selects(peer.get("podSelector", {"matchLabels": {"x": object()}}), own)
                       and "namespaceSelector" not in peer and not rule.get("ports")
                       for p in guarding for rule in p["spec"].get("ingress", []) for peer in rule.get("from", []))
        if guarding and not admitted:
            problems.append(f"{where}: the job's own pods cannot reach each other (Ray needs all ports between them)")
    return problems


def auth_problems(objs: list[dict]) -> list[str]:
    problems = []
    for where, spec, _ in rayjob_specs(objs):
        if (spec.get("rayClusterSpec") or {}).get("authOptions", {}).get("mode") != "token":
            problems.append(f"{where}: rayClusterSpec.authOptions.mode must be token (Ray token authentication)")
        for _, group, _, template in ray_pods(spec):
            for c in containers(template.get("spec", {})):
                mode = next((e.get("value") for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"), "token")
                if mode != "token":
                    problems.append(f"{where} {group}: RAY_AUTH_MODE={mode} turns authentication off")
    return problems


def runtime_env_problems(objs: list[dict]) -> list[str]:
    """A job's runtime_env is kept by Ray (job records, dashboard): no credentials in it, and none in the
    submitter pod, whose environment is the job's."""
    problems = []
    for where, spec, _ in rayjob_specs(objs):
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        for name in env.get("env_vars", {}):
            if SENSITIVE.search(name):
                problems.append(f"{where}: runtimeEnvYAML carries {name}")
        for c in spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    problems.append(f"{where} submitter: {e['name']} from a Secret; credentials stay on the Ray pods")
    return problems


def cores_and_gpus(group: dict) -> tuple[float, int]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return parse_quantity(limits["cpu"]) * group["maxReplicas"], int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]


def capacity_fps(spec: dict) -> float:
    """Frames/s the worker groups can deliver at maxReplicas, by the planning figures above."""
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(cores_and_gpus(g)[1] for g in groups)
    cpu_cores = sum(cores_and_gpus(g)[0] for g in groups if not cores_and_gpus(g)[1])
    if gpus:
        return min(gpus * GPU_TEACHER_FPS, cpu_cores * DECODE_FPS_PER_CORE)
    return cpu_cores * CPU_TEACHER_FPS_PER_CORE


def deadline_problems(objs: list[dict]) -> list[str]:
    """activeDeadlineSeconds covers the planned corpus (annotations) at the planned rate with a margin, and the
    worker groups at maxReplicas can deliver that rate."""
    problems = []
    cms = objects_of(objs, "ConfigMap")
    for where, ns, spec in extractions(objs):
        rayjob = next(o for o in objects_of(objs, "RayJob").values() if o["spec"] is spec)
        notes = rayjob["metadata"].get("annotations", {})
        try:
            videos, seconds, fps = (float(notes[f"subsume.io/planned-{k}"])
                                    for k in ("videos", "seconds-per-video", "frames-per-second"))
        except KeyError as e:
            problems.append(f"{where}: annotate what the deadline is sized for ({e.args[0]})")
            continue
        sampled = yaml.safe_load(mounted_file(ns.config, spec, cms))["sampling"]["fps"]
        needed = videos * seconds * sampled / fps * DEADLINE_MARGIN
        if spec["activeDeadlineSeconds"] < needed:
            problems.append(f"{where}: activeDeadlineSeconds {spec['activeDeadlineSeconds']} < {needed:.0f} s "
                            f"({videos:.0f} videos x {seconds:.0f} s x {sampled} fps / {fps:.0f} frames/s x 1.5)")
        if fps > capacity_fps(spec):
            problems.append(f"{where}: planned {fps:.0f} frames/s, the groups deliver ~{capacity_fps(spec):.0f}")
    return problems


def autoscaling_problems(objs: list[dict]) -> list[str]:
    """At >= 10^6 planned videos the extraction's decode workers scale between minReplicas and maxReplicas."""
    if planned_videos(objs) < LARGE:
        return []
    problems = []
    for where, ns, spec in extractions(objs):
        cluster = spec["rayClusterSpec"]
        cpu_groups = [g for g in cluster["workerGroupSpecs"] if not cores_and_gpus(g)[1]]
        if not cluster.get("enableInTreeAutoscaling"):
            problems.append(f"{where}: enableInTreeAutoscaling: the decode workers follow the work")
        if not any(g["minReplicas"] < g["maxReplicas"] for g in cpu_groups):
            problems.append(f"{where}: a CPU worker group with minReplicas < maxReplicas")
        cores = sum(cores_and_gpus(g)[0] for g in cpu_groups)
        if not ns.decode_concurrency or ns.decode_concurrency > cores:
            problems.append(f"{where}: --decode-concurrency {ns.decode_concurrency} must be set, at most the "
                            f"{cores:.0f} cores at maxReplicas (the plan otherwise sees only the starting cluster)")
    return problems


RULES = (shm_problems, scratch_problems, head_problems, network_problems, auth_problems, runtime_env_problems,
         deadline_problems, autoscaling_problems)


@pytest.mark.parametrize("rule", RULES, ids=lambda f: f.__name__)
def test_hardening_holds_in_every_overlay(rendered, rule):
    for name, objs in rendered.items():
        assert rule(objs) == [], name


def test_the_gpu_overlays_plan_for_ten_million_videos(rendered):
    for name in ("gpu", "gpu-raycronjob", "gpu-pvc"):
        assert planned_videos(rendered[name]) >= 10**7, name


# --- the rules catch what they claim to catch ----------------------------------------------------------


def extract(objs: list[dict]) -> dict:
    return find(objs, "RayJob", "subsume-extract")


def head(objs: list[dict], name: str = "subsume-extract") -> dict:
    return find(objs, "RayJob", name)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


def workers(objs: list[dict], i: int = 0) -> dict:
    return extract(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][i]


BREAKAGES = {
    "/dev/shm on disk": (lambda o: volume(head(o), "dshm")["emptyDir"].pop("medium"), shm_problems),
    "/dev/shm smaller than the object store": (
        lambda o: volume(head(o), "dshm")["emptyDir"].update(sizeLimit="1Gi"), shm_problems),
    "no /dev/shm": (lambda o: head(o)["containers"][0]["volumeMounts"].pop(), shm_problems),
    "/tmp without a limit": (lambda o: volume(head(o), "tmp")["emptyDir"].pop("sizeLimit"), scratch_problems),
    "head on spot nodes": (lambda o: head(o).pop("affinity"), head_problems),
    "head tolerates everything": (lambda o: head(o).update(tolerations=[{"operator": "Exists"}]), head_problems),
    "head too small for 10^6 videos": (
        lambda o: head(o)["containers"][0]["resources"].update(limits={"cpu": "8", "memory": "8Gi"}), head_problems),
    "no NetworkPolicy": (lambda o: [o.remove(p) for p in list(objects_of(o, "NetworkPolicy").values())],
                         network_problems),
    "dashboard open to the namespace": (
        lambda o: find(o, "NetworkPolicy", "subsume-extract-ray")["spec"]["ingress"].append(
            {"from": [{"podSelector": {}}], "ports": [{"port": 8265}]}), network_problems),
    "GCS open to everything": (
        lambda o: find(o, "NetworkPolicy", "subsume-extract-ray")["spec"]["ingress"].append({}), network_problems),
    "training pods reach the extraction head": (
        lambda o: find(o, "NetworkPolicy", "subsume-extract-ray")["spec"]["ingress"][0]["from"][0]["podSelector"][
            "matchLabels"].pop("app.kubernetes.io/component"), network_problems),
    "a worker without the job's labels": (
        lambda o: workers(o)["template"]["metadata"].pop("labels"), network_problems),
    "token auth off": (lambda o: extract(o)["spec"]["rayClusterSpec"].pop("authOptions"), auth_problems),
    "RAY_AUTH_MODE disabled": (
        lambda o: head(o)["containers"][0]["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
        auth_problems),
    "a secret in the runtime_env": (
        lambda o: extract(o)["spec"].update(runtimeEnvYAML="env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"),
        runtime_env_problems),
    "a secret in the submitter": (
        lambda o: extract(o)["spec"]["submitterPodTemplate"]["spec"]["containers"][0].setdefault("env", []).append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "subsume-hf", "key": "token"}}}),
        runtime_env_problems),
    "deadline too short for the corpus": (
        lambda o: extract(o)["spec"].update(activeDeadlineSeconds=86400), deadline_problems),
    "rate the workers cannot deliver": (lambda o: workers(o).update(maxReplicas=4), deadline_problems),
    "no planning annotations": (lambda o: extract(o)["metadata"].pop("annotations"), deadline_problems),
    "fixed-size extraction": (lambda o: workers(o).update(minReplicas=workers(o)["maxReplicas"]),
                              autoscaling_problems),
    "autoscaler off": (lambda o: extract(o)["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
                       autoscaling_problems),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_hardening_rules_catch_broken_manifests(rendered, breakage):
    objs = copy.deepcopy(rendered["gpu"])
    mutate, rule = BREAKAGES[breakage]
    assert rule(objs) == [], "the manifest was already broken"
    mutate(objs)
    assert rule(objs), f"{rule.__name__} missed: {breakage}"
