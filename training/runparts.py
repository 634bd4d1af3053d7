"""The small builders train_worker strings together: the loader, the checkpointer, the metrics writer and
the step timer. No Ray here either (what differs under Ray Train comes in through WorkerEnv)."""

from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from training.augment import crops_enabled
from training.checkpoint import (EXPORT_DIR, STATE_FILE, RankState, RunLineage, capture_rng, read_rank_state,
                                 restore_rng, write_lineage, write_rank_state)
from training.config import TrainConfig
from training.data import DataPosition, StreamSpec, make_loader
from training.loop import DataSource, Parts, WorkerEnv
from training.metrics import MetricsWriter


@dataclass
class Progress:
    step: int
    position: DataPosition
    history: list[float] = field(default_factory=list)
    resumed_at: int | None = None  # the step this worker continued from, if it restored a checkpoint

    def record(self, terms: dict[str, float]) -> None:
        self.step += 1
        self.history.append(terms["loss"])

    def summary(self) -> dict[str, Any]:
        return {"steps": self.step, "loss_first": self.history[0] if self.history else None,
                "loss_last": self.history[-1] if self.history else None, "loss_history": list(self.history),
                "resumed_at": self.resumed_at}


def loader_for(cfg: TrainConfig, src: DataSource, env: WorkerEnv, position: DataPosition) -> torch.utils.data.DataLoader:
    spec = StreamSpec(root=src.root, key=src.key, version=src.version, storage_options=dict(src.storage_options),
                      rank=env.rank, world_size=env.world_size, seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                      heldout_fraction=cfg.data.heldout_fraction, batch_size=cfg.data.batch_size,
                      image_size=cfg.student.image_size, with_patches=crops_enabled(cfg.augment))
    return make_loader(spec, position, num_workers=cfg.loader.num_workers, prefetch_factor=cfg.loader.prefetch_factor,
                       pin_memory=cfg.loader.pin_memory and env.device.type == "cuda")


def metrics_writer(cfg: TrainConfig, src: DataSource, env: WorkerEnv) -> MetricsWriter | None:
    if env.rank != 0 or not env.out_dir:
        return None
    return MetricsWriter(env.out_dir, cfg.report_to, src.lineage.get("run_name", ""), cfg.to_dict())


class StepTimer:
    """Time waiting for the loader apart from the whole step; samples/s over the steps since the last log."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.wait = self.busy = 0.0
        self.steps = 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t0

    @contextmanager
    def stepping(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.busy += time.perf_counter() - t0
        self.steps += 1

    def metrics(self, progress: Progress, terms: dict[str, float], lr: float, extra: dict[str, float]) -> dict[str, Any]:
        """The log record since the last one; resets the window. Held-out probes are not in the timings."""
        out = {"step": progress.step, "epoch": progress.position.epoch, **{k: round(v, 6) for k, v in terms.items()},
               "lr": lr, "samples_per_s": round(self.steps * self.samples_per_step / max(self.busy, 1e-9), 2),
               "data_time_s": round(self.wait, 4), "step_time_s": round(self.busy - self.wait, 4),
               "data_wait_frac": round(self.wait / max(self.busy, 1e-9), 4), **extra}
        self.wait = self.busy = 0.0
        self.steps = 0
        return out


class Checkpointer:
    """Saves and restores a run: shared state from rank 0, each rank's own state, the lineage, the export."""

    def __init__(self, parts: Parts, cfg: TrainConfig, src: DataSource, env: WorkerEnv):
        self.parts, self.cfg, self.src, self.env = parts, cfg, src, env

    def restore(self, log: Callable[[str], None]) -> Progress:
        random.seed(self.cfg.seed)
        streams = max(1, self.cfg.loader.num_workers)
        if not self.env.restore_dir:
            return Progress(0, DataPosition.start(streams))
        folder = self.env.restore_dir
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        self.parts.module.load_state_dict(state["model"])
        self.parts.optimizer.load_state_dict(state["optimizer"])
        self.parts.scheduler.load_state_dict(state["scheduler"])
        mine = read_rank_state(folder, self.env.rank, self.env.world_size)
        self.parts.scaler.load_state_dict(mine.scaler)
        restore_rng(mine.rng, self.env.device)
        progress = Progress(int(state["step"]), mine.position, list(state["loss_history"]), int(state["step"]))
        log(f"resumed at step {progress.step} (rank {self.env.rank}: epoch {mine.position.epoch})")
        return progress

    def save(self, progress: Progress, metrics: dict[str, Any] | None) -> None:
        env = self.env
        with tempfile.TemporaryDirectory() as tmp:
            write_rank_state(tmp, env.rank, RankState(capture_rng(env.device), self.parts.scaler.state_dict(),
                                                      progress.position))
            if env.rank == 0:
                self._save_shared(tmp, progress)
            env.report(metrics or {"step": progress.step, "loss": progress.history[-1]}, tmp)
        for cb in env.callbacks:
            cb.on_checkpoint(progress.step, env)

    def _save_shared(self, folder: str, progress: Progress) -> None:
        from training.export import export_student

        p = self.parts
        torch.save({"model": p.module.state_dict(), "optimizer": p.optimizer.state_dict(),
                    "scheduler": p.scheduler.state_dict(), "step": progress.step, "loss_history": progress.history,
                    "world_size": self.env.world_size}, os.path.join(folder, STATE_FILE))
        lineage = RunLineage.from_dict(self.src.lineage)
        export_student(p.module.student_module, self.cfg.student, os.path.join(folder, EXPORT_DIR),
                       sampling=lineage.sampling, preprocess=lineage.preprocess, lineage=lineage.to_dict())
        write_lineage(folder, lineage, step=progress.step, world_size=self.env.world_size)
