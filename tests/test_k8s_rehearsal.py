"""Rehearsal of what the overlays run: every entrypoint, as deployed, on the shared local Ray cluster.

An overlay is rendered with `kubectl kustomize`; each Ray job it starts is taken in order: the RayJobs that run on
apply (extraction), then the scheduled training runs: for the CronJob variant, the RayJob its creator script
makes (the script runs against a stand-in kubectl), for the RayCronJob variant its jobTemplate. Each entrypoint
is expanded the way the submitter pod's shell expands it (its env and envFrom ConfigMaps, RUN_NAME from the
Job name), then run here as the head's container would run it, with

- the head's mounts mapped to a scratch folder: a PVC to one folder per claim (so extraction and training share
  the store, as on the cluster), a ConfigMap to a folder holding its files, an emptyDir to a fresh folder;
  `s3://BUCKET/...` to a folder per bucket;
- the head's environment (plain values and ConfigMap keys; every Secret is optional and absent here);
- the hub teacher (openai/clip-vit-base-patch16 at the pinned commit) as a stand-in saved in the mapped
  Hugging Face cache under that commit, with CLIP ViT-B/16's preprocessing (224 px); HF_HUB_OFFLINE=1.

Only counts are scaled down (training steps and batch size; a few short videos), and on the GPU overlays what
needs a GPU is put on this machine's CPUs (ON_CPU: the device, --use-gpu, the actor and worker counts). Every
setting that names the KEY or shapes the student stays as rendered (bf16 included), so a training config that
does not fit the extraction beside it fails here. Before training, the teacher's weights are taken out of the
cache: a training pod finds its KEY without loading them.

Two overlays run: cpu-dev (PVC store, CronJob) and gpu-raycronjob (S3 store, RayCronJob, the GPU entrypoints);
gpu and gpu-pvc run the very same entrypoints (checked below), with the store on S3 and on a PVC respectively.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import VENV_BIN, cli_env
from tests.test_k8s import (KUBECTL, command_argv, fake_kubectl, objects_of, parse_cli, render,  # noqa: F401
                            run_creator, submitter_env)


HUB_TEACHER = "openai/clip-vit-base-patch16"  # the stand-in below has its preprocessing
SCALE_DOWN = {"train": ["--steps", "2", "--set", "data.batch_size=1", "--set", "checkpoint_every=2",
                        "--set", "log_every=1"]}
N_VIDEOS = 5
# A GPU overlay's flags on this machine's CPUs: (flag, what it becomes); None drops a switch. The student's bf16
# autocast is dropped too (--set precision=...: hours on CPUs without bf16 units; it changes no shape or KEY).
ON_CPU = {"--device": "cpu", "--use-gpu": None, "--workers": "2", "--teacher-actors": "1", "--decode-concurrency": "1"}
REHEARSED = ("cpu-dev", "gpu-raycronjob")


def save_clip_b16_stand_in(folder: Path) -> Path:
    """A tiny random CLIPVisionModelWithProjection with CLIP ViT-B/16's input contract: 224 px, CLIP's
    resize-crop and normalisation (CLIPImageProcessor's defaults are that checkpoint's); big patches keep it cheap."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


# --- the jobs an overlay starts, in order ---------------------------------------------------------------


def scheduled_runs(objs: list[dict], kubectl: tuple[Path, Path]) -> list[tuple[str, dict]]:
    """(RayJob name, spec) of each scheduled run: what the CronJob's creator makes, or a RayCronJob's template."""
    bindir, state = kubectl
    runs = []
    for cj in objects_of(objs, "CronJob").values():
        template_name = next(e["value"] for c in cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
                             for e in c.get("env", []) if e["name"] == "TEMPLATE")
        (state / f"{template_name}.json").write_text(json.dumps(objects_of(objs, "RayJob")[template_name]))
        done = run_creator(cj, bindir, f"{cj['metadata']['name']}-29000000")
        assert done.returncode == 0, done.stderr
        created = json.loads((state / f"{template_name}-29000000.json").read_text())
        runs.append((created["metadata"]["name"], created["spec"]))
    for rcj in objects_of(objs, "RayCronJob").values():
        runs.append((f"{rcj['metadata']['name']}-rehearsal", rcj["spec"]["jobTemplate"]))
    return runs


def jobs_in_order(objs: list[dict], kubectl: tuple[Path, Path]) -> list[tuple[str, dict]]:
    on_apply = [(name, o["spec"]) for name, o in objects_of(objs, "RayJob").items() if not o["spec"].get("suspend")]
    return on_apply + scheduled_runs(objs, kubectl)


# --- mapping the head's container to this machine -------------------------------------------------------


def head_container(spec: dict) -> tuple[dict, dict[str, dict]]:
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return pod["containers"][0], {v["name"]: v for v in pod.get("volumes", [])}


def map_mounts(spec: dict, objs: list[dict], scratch: Path, job: str) -> dict[str, Path]:
    """mountPath -> local folder, for every volume the head mounts."""
    container, volumes = head_container(spec)
    cms = objects_of(objs, "ConfigMap")
    out: dict[str, Path] = {}
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "persistentVolumeClaim" in vol:
            local = scratch / "pvc" / vol["persistentVolumeClaim"]["claimName"]
        elif "configMap" in vol:
            local = scratch / "configmap" / job / vol["configMap"]["name"]
            local.mkdir(parents=True, exist_ok=True)
            for name, text in cms[vol["configMap"]["name"]].get("data", {}).items():
                (local / name).write_text(text)
        else:
            local = scratch / "emptydir" / job / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = local
    return out


def map_path(word: str, mounts: dict[str, Path], scratch: Path) -> str:
    if word.startswith("s3://"):
        return str(scratch / "s3" / word[len("s3://"):])
    for mount in sorted(mounts, key=len, reverse=True):
        if word == mount or word.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + word[len(mount.rstrip("/")):]
    return word


def head_env(spec: dict, objs: list[dict], mounts: dict[str, Path], scratch: Path) -> dict[str, str]:
    container, _ = head_container(spec)
    cms = objects_of(objs, "ConfigMap")
    env: dict[str, str] = {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = map_path(e["value"], mounts, scratch)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = cms.get(ref["name"], {}).get("data", {})
            assert ref["key"] in data or ref.get("optional"), f"env {e['name']}: {ref} is missing"
            if ref["key"] in data:
                env[e["name"]] = map_path(data[ref["key"]], mounts, scratch)
        elif "secretKeyRef" in source:
            assert source["secretKeyRef"].get("optional"), f"env {e['name']}: a required Secret cannot be rehearsed"
    return env


# --- running one job ---------------------------------------------------------------------------------


def job_command(name: str, spec: dict, objs: list[dict], scratch: Path) -> tuple[list[str], dict[str, str]]:
    """The entrypoint as the head will run it (expanded, paths mapped, counts scaled down) and its environment."""
    mounts = map_mounts(spec, objs, scratch, name)
    argv = command_argv(spec["entrypoint"], submitter_env(spec, objs, name))
    ns, complaint = parse_cli(argv)
    assert ns is not None, f"{name}: {complaint}"
    argv = on_cpu([map_path(w, mounts, scratch) for w in argv]) + SCALE_DOWN.get(ns.command, [])
    env = {**head_env(spec, objs, mounts, scratch), "HF_HUB_OFFLINE": "1"}
    return argv, env


def on_cpu(argv: list[str]) -> list[str]:
    out, words = [], iter(argv)
    for w in words:
        if w == "--set":
            value = next(words)
            out += [] if value.startswith("precision=") else [w, value]
            continue
        if w in ON_CPU:
            if ON_CPU[w] is not None:
                next(words)
                out += [w, ON_CPU[w]]
            continue
        out.append(w)
    return out


def run_subsume(argv: list[str], env: dict[str, str], ray_address: str, cwd: Path) -> dict:
    proc = subprocess.run([str(VENV_BIN / "subsume"), *argv[1:]], capture_output=True, text=True, timeout=900,
                          env={**cli_env(ray_address), **env}, cwd=cwd)
    assert proc.returncode == 0, f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def teacher_of(argv: list[str]) -> tuple[str, str]:
    """(hub id, revision) the entrypoint asks for, from its KEY file or its flags."""
    from feature_store.features_config import load_features_config

    ns, _ = parse_cli(argv)
    key_file = ns.config if ns.command == "extract" else ns.features
    if key_file:
        t = load_features_config(key_file).teacher
        return t.model, t.revision
    return ns.teacher, ns.revision


def install_stand_in(env: dict[str, str], argv: list[str], standin: Path) -> Path:
    """Put the stand-in in the mapped HF cache as the pinned commit of the hub teacher; returns that folder."""
    model, revision = teacher_of(argv)
    assert model == HUB_TEACHER, f"the rehearsal's stand-in is for {HUB_TEACHER}, the overlay asks for {model}"
    folder = Path(env["HF_HOME"]) / "hub" / f"models--{model.replace('/', '--')}" / "snapshots" / revision
    if not folder.exists():
        shutil.copytree(standin, folder)
    return folder


# --- the test ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return save_clip_b16_stand_in(tmp_path_factory.mktemp("clip-b16-stand-in"))


@pytest.fixture(scope="module")
def few_videos(tmp_path_factory) -> list[Path]:
    from subsume.sample_data import generate_videos

    out = tmp_path_factory.mktemp("rehearsal-videos")
    generate_videos(out, N_VIDEOS, seed=3, size=64, frames=24, fps=12.0)
    return sorted(out.rglob("*.mp4"))


def entrypoints(objs: list[dict]) -> set[str]:
    return {o["spec"]["entrypoint"] for o in objects_of(objs, "RayJob").values()} | {
        o["spec"]["jobTemplate"]["entrypoint"] for o in objects_of(objs, "RayCronJob").values()}


def test_every_entrypoint_is_among_the_rehearsed():
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH: the rehearsal renders the overlays with `kubectl kustomize`")
    from tests.test_k8s import OVERLAYS

    rehearsed = set().union(*(entrypoints(render(o)) for o in REHEARSED))
    for overlay in OVERLAYS:
        assert entrypoints(render(overlay)) <= rehearsed, overlay


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("overlay", REHEARSED)
def test_overlay_runs_as_deployed(overlay, ray_address, standin, few_videos, fake_kubectl, tmp_path):
    if KUBECTL is None:
        pytest.skip("kubectl not found on PATH: the rehearsal renders the overlays with `kubectl kustomize`")
    objs = render(overlay)
    jobs = jobs_in_order(objs, fake_kubectl)
    assert {spec["entrypoint"] for _, spec in jobs} == entrypoints(objs), "a job not rehearsed"
    scratch = tmp_path / "cluster"
    results: dict[str, dict] = {}
    for name, spec in jobs:
        argv, env = job_command(name, spec, objs, scratch)
        command = argv[1]
        if command == "extract":
            videos = Path(parse_cli(argv)[0].videos)  # s3://BUCKET/videos or /data/videos, mapped
            videos.mkdir(parents=True, exist_ok=True)
            for v in few_videos:
                shutil.copy(v, videos / v.name)
            install_stand_in(env, argv, standin)
        else:  # a training pod finds its KEY without the teacher's weights
            weights = install_stand_in(env, argv, standin) / "model.safetensors"
            weights.unlink(missing_ok=True)
        results[command] = run_subsume(argv, env, ray_address, cwd=tmp_path)
    extract, train = results["extract"], results["train"]
    assert extract["videos_ok"] == N_VIDEOS and extract["videos_failed"] == 0
    assert extract.get("alias"), "extraction recorded no alias for the hub teacher"
    assert train["key"] == extract["key"]
    assert train["steps"] == 2 and os.path.isdir(train["checkpoint"])
    # The run folder is the scheduled RayJob's own, on the data volume; the store where the overlay puts it.
    assert str(scratch / "pvc" / "subsume-data" / "runs") in train["out"]
    assert (overlay == "cpu-dev") == (str(scratch / "pvc") in extract["store"])
    assert yaml.safe_load((Path(train["out"]) / "config.yaml").read_text())["student"]["image_size"] == 224
