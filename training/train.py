"""Run training: in-process (one worker, no Ray; tests and quick runs) or on Ray Train with DDP workers.

A run lives in its --out folder. `run.json` there pins what it trains on (store, KEY, snapshot version,
manifest checksum) and the Ray Train run name, so running again with the same --out resumes the same run on
the same samples even if the KEY has grown since, and a new --out starts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from dataclasses import asdict, replace
from typing import Any, Callable

from feature_store.spec import FeatureSpec, to_dict
from feature_store.store import FeatureStore
from training.augment import crops_enabled
from training.callbacks import load_callbacks
from training.checkpoint import EXPORT_DIR, RunLineage
from training.config import TrainConfig, config_from_dict, dump_config
from training.loop import DataSource, WorkerEnv, patch_mean_stats, train_worker
from training.metrics import missing_sinks

RUN_FILE = "run.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_student(cfg: TrainConfig, spec: FeatureSpec) -> TrainConfig:
    """Fill the student's input shape the config left to the KEY (0): frames at the KEY's crop, views of half
    a segment (room for the two views to sit at different times). An explicit shape is the student's own."""
    seg = spec.sampling.segment_frames
    frames = cfg.student.frames or max(1, seg // 2)
    if frames > seg:
        raise ValueError(f"student.frames {frames} > the KEY's segment length {seg}: views are windows of a segment")
    student = replace(cfg.student, frames=frames, image_size=cfg.student.image_size or spec.preprocess.crop)
    return replace(cfg, student=student)


def _new_run(cfg: TrainConfig, store: FeatureStore, key: str, out: str) -> dict[str, Any]:
    snap = store.open(key)
    samples = snap.manifest["counts"]["samples"] if snap.version else 0  # counted in Arrow, no index rows
    if samples == 0:
        raise ValueError(f"KEY {key} in {store.root} has no samples yet")
    run = {"run_name": f"subsume-{uuid.uuid4().hex[:10]}", "store": store.root, "key": key, "version": snap.version,
           "manifest_sha256": snap.manifest_sha256, "samples": samples, "config": cfg.to_dict()}
    with open(os.path.join(out, RUN_FILE), "w") as f:
        json.dump(run, f, indent=1)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    return run


def _open_run(store: FeatureStore, key: str, out: str) -> dict[str, Any]:
    with open(os.path.join(out, RUN_FILE)) as f:
        run = json.load(f)
    if run["key"] != key or run["store"] != store.root:
        raise ValueError(f"{out} is a run on {run['store']}/{run['key']}, not {store.root}/{key}: use a new --out")
    return run


def prepare_run(cfg: TrainConfig, root: str, key: str, out: str, storage_options: dict[str, Any]
                ) -> tuple[TrainConfig, DataSource, dict[str, Any]]:
    """Create or reopen the run folder; returns the config with the student resolved against the KEY, the
    data source (with the lineage every checkpoint carries) and the run record."""
    missing = missing_sinks(cfg.report_to)
    if missing:
        raise ValueError(f"report_to {missing}: not installed (pip install 'subsume[{','.join(missing)}]')")
    os.makedirs(out, exist_ok=True)
    store = FeatureStore(root, storage_options)  # root absolute when local: workers run elsewhere
    run = _open_run(store, key, out) if os.path.exists(os.path.join(out, RUN_FILE)) else None
    snap = store.open(key, run["version"] if run else None)
    cfg = resolve_student(cfg, snap.spec)
    run = run or _new_run(cfg, store, key, out)
    if snap.manifest_sha256 != run["manifest_sha256"]:
        raise ValueError(f"snapshot {snap.version} of {key} changed since this run started (manifest hash differs)")
    src = _data_source(cfg, store, snap, storage_options)
    src.lineage = RunLineage(store=store.root, key=key, version=snap.version, manifest_sha256=snap.manifest_sha256,
                             heldout_fraction=cfg.data.heldout_fraction, seed=cfg.seed, student=cfg.student.to_dict(),
                             sampling=to_dict(snap.spec.sampling), preprocess=to_dict(snap.spec.preprocess),
                             run_name=run["run_name"], target_space=src.target_space, config=cfg.to_dict()).to_dict()
    return cfg, src, run


def _data_source(cfg: TrainConfig, store: FeatureStore, snap: Any, storage_options: dict[str, Any]) -> DataSource:
    spec, key = snap.spec, snap.key
    mean, std = snap.target_mean_std()
    src = DataSource(root=store.root, key=key, version=snap.version, storage_options=dict(storage_options),
                     target_mean=mean.tolist(), target_std=std.tolist(), teacher_model=spec.teacher.model,
                     teacher_revision=spec.teacher.revision, teacher_fingerprint=spec.teacher_fingerprint,
                     teacher_precision=spec.teacher.precision, image_size=spec.preprocess.crop,
                     segment_frames=spec.sampling.segment_frames, embed_dim=spec.embed_dim)
    if crops_enabled(cfg.augment):  # crops train on patch-grid means, standardised with their own stats
        if cfg.targets == "online":
            raise ValueError("random crops (augment.random_crop_scale < 1) use the stored patch grids; with "
                             "--targets online there are none: use cached targets, or no crops")
        if cfg.objective != "iboot":
            raise ValueError("random crops are wired for the iboot objective only (its targets follow the crop)")
        if spec.teacher.patch_grid < 1:
            raise ValueError(f"augment.random_crop_scale < 1 needs stored patch grids, and {key} has none: extract "
                             "with --patch-grid G (crops with unchanged embedding targets are not offered)")
        pmean, pstd = patch_mean_stats(store, key, snap.version)
        src.target_space, src.embed_dim = "patch_mean", int(pmean.shape[0])
        src.target_mean, src.target_std = pmean.tolist(), pstd.tolist()
    return src


def run_in_process(cfg: TrainConfig, src: DataSource, out: str, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """One worker in this process. Checkpoints go to OUT/checkpoints/step_N; a rerun resumes from the last."""
    import shutil

    ckpt_root = os.path.join(out, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    for d in os.listdir(ckpt_root):  # a copy cut short by a kill
        if d.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    done = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step_") and d[5:].isdigit()),
                  key=lambda d: int(d[5:]))
    last: dict[str, str | None] = {"path": os.path.join(ckpt_root, done[-1]) if done else None}

    def report(metrics: dict[str, Any], ckpt: str | None) -> None:
        if ckpt:
            dest = os.path.join(ckpt_root, f"step_{metrics['step']:08d}")
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ckpt, tmp)
            os.replace(tmp, dest)  # a checkpoint appears whole or not at all
            last["path"] = dest

    env = WorkerEnv(report=report, restore_dir=last["path"], out_dir=out, callbacks=load_callbacks(cfg.callbacks))
    summary = train_worker(cfg, src, env, log=log)
    return {**summary, "checkpoint": last["path"]}


def _ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The function each Ray Train worker runs."""
    import tempfile

    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    src = DataSource(**config["src"])
    ctx = ray.train.get_context()
    restore = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], ckpt: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt) if ckpt else None)

    def run(restore_dir: str | None) -> dict[str, Any]:
        env = WorkerEnv(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        device=ray.train.torch.get_device(), prepare=ray.train.torch.prepare_model,
                        report=report, restore_dir=restore_dir, out_dir=config["out"],
                        callbacks=load_callbacks(cfg.callbacks))
        # A logger, not print: Ray Train patches print on its workers to log each line as well as print it
        # (two lines on the console); its logging setup sends our records to the driver's stderr once.
        return train_worker(cfg, src, env, log=logging.getLogger("subsume.train").info)

    if restore is not None:
        with restore.as_directory() as d:
            with tempfile.TemporaryDirectory() as local:  # the checkpoint folder may vanish once we return
                import shutil

                shutil.copytree(d, local, dirs_exist_ok=True)
                return run(local)
    return run(None)


def run_ray(cfg: TrainConfig, src: DataSource, out: str, run_name: str, storage_path: str | None = None,
            storage_filesystem: Any = None) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = storage_path or os.path.abspath(os.path.join(out, "ray"))
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "src": asdict(src), "out": os.path.abspath(out)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    summary = dict(result.return_value or {})
    ckpt = result.checkpoint
    path = ckpt.path if ckpt is not None else None
    if path and "://" in storage_path and "://" not in path:  # Ray gives the path inside its filesystem
        path = f"{storage_path.split('://', 1)[0]}://{path.lstrip('/')}"
    return {**summary, "checkpoint": path}


def run_train(cfg: TrainConfig, root: str, key: str, out: str, *, storage_options: dict[str, Any] | None = None,
              storage_path: str | None = None, in_process: bool | None = None,
              log: Callable[[str], None] = _log) -> dict[str, Any]:
    cfg, src, run = prepare_run(cfg, root, key, out, storage_options or {})
    in_process = (cfg.workers <= 1 and not cfg.use_gpu) if in_process is None else in_process
    if in_process:
        summary = run_in_process(cfg, src, out, log)
    else:
        summary = run_ray(cfg, src, out, run["run_name"], storage_path)
    if summary.get("checkpoint"):
        write_curves(out, log)
    result = {"out": os.path.abspath(out), "run_name": run["run_name"], "key": key, "version": src.version,
              "manifest_sha256": run["manifest_sha256"], "objective": cfg.objective, "targets": cfg.targets,
              "workers": cfg.workers, "student": {"frames": cfg.student.frames, "image_size": cfg.student.image_size},
              **summary, "export": _join(summary["checkpoint"], EXPORT_DIR) if summary.get("checkpoint") else None}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "loss_history"}, f, indent=1)
    return result


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def write_curves(out: str, log: Callable[[str], None] = _log) -> str | None:
    """A PNG of the training curves from metrics.jsonl (the last record per step wins after a resume)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[r["step"]] = r
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(rows)
    keys = [k for k in ("loss", "cross", "frame", "cos_cross", "cos_frame", "lr", "samples_per_s", "data_wait_frac")
            if k in rows[steps[-1]]]
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(3.2 * ((len(keys) + 1) // 2), 5.5), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        ax.plot(steps, [rows[s].get(k) for s in steps])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    png = os.path.join(out, "curves.png")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
