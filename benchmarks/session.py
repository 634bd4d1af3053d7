"""What the benchmarks share within one run: the scratch folder, teachers, sample videos, Ray, and the
extraction runs (made once, with the memory of all the job's processes sampled while they run).

Ray, decord and webdataset are imported only by the methods that extract, so the Ray-free benchmarks run
where those are missing.
"""

from __future__ import annotations

import csv
import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.config import TEACHER_SHAPES, BenchConfig
from benchmarks.measure import TreeMemorySampler


def save_random_clip(folder: Path, shape_name: str, image_size: int, seed: int = 0) -> Path:
    """A random-weight CLIPVisionModelWithProjection + its image processor, as a hub checkpoint would be."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    s = TEACHER_SHAPES[shape_name]
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                           num_attention_heads=s.heads, image_size=image_size, patch_size=s.patch,
                           projection_dim=s.projection)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def synthetic_frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, size, size, 3]: smooth random colour fields plus a little noise, different per frame.

    Costs of the teacher and the student do not depend on content; fidelity does (a random teacher maps
    uniform noise to nearly one direction), so frames vary at a coarse scale as real ones do.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g) * 255
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 6
    return x.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class BenchSession:
    def __init__(self, cfg: BenchConfig, workdir: Path, log: Callable[[str], None]):
        from feature_store.teacher import resolve_device

        self.cfg, self.workdir, self.log = cfg, Path(workdir), log
        self.device = resolve_device(cfg.device)
        self._teachers: dict[str, tuple[Any, float]] = {}
        self._manifests: dict[int, str] = {}
        self._extracts: dict[str, dict[str, Any]] = {}
        self.ray_start_s: float | None = None
        self.student_rates: dict[str, float] = {}  # teacher -> cached samples/s of the student step
        self.default_threads = torch.get_num_threads()  # torch's own choice, before cfg.threads applies

    # -- teachers ------------------------------------------------------------------------------------------
    def teacher_dir(self, name: str) -> Path:
        folder = self.workdir / "teachers" / f"{name}-{self.cfg.image_size}"
        if not (folder / "config.json").exists():
            self.log(f"building a random {name} teacher at {self.cfg.image_size} px")
            folder.mkdir(parents=True, exist_ok=True)
            save_random_clip(folder, name, self.cfg.image_size, seed=self.cfg.seed)
        return folder

    def teacher(self, name: str) -> tuple[Any, float]:
        """(the loaded Teacher on the benchmark device, its load time in seconds)."""
        if name not in self._teachers:
            from feature_store.spec import TeacherSpec
            from feature_store.teacher import load_teacher

            folder = self.teacher_dir(name)
            t0 = time.perf_counter()
            teacher = load_teacher(TeacherSpec(model=str(folder)), device=str(self.device))
            self._teachers[name] = (teacher, time.perf_counter() - t0)
        return self._teachers[name]

    def frames(self, n: int, seed: int = 0) -> torch.Tensor:
        return synthetic_frames(n, self.cfg.image_size, seed=self.cfg.seed * 7919 + seed)

    # -- videos and extraction (Ray) ---------------------------------------------------------------------
    def manifest(self, scale: int) -> str:
        """A manifest of the first scale x `videos` sample videos (all generated once, for the largest scale)."""
        if not self._manifests:
            from subsume.sample_data import generate_videos

            n = self.cfg.videos * max(self.cfg.scales)
            self.log(f"generating {n} sample videos ({self.cfg.video_size} px, {self.cfg.video_frames} frames)")
            full = Path(generate_videos(self.workdir / "videos", n, seed=self.cfg.seed, size=self.cfg.video_size,
                                        frames=self.cfg.video_frames, fps=self.cfg.fps))
            with open(full, newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames, list(reader)
            for s in self.cfg.scales:
                out = full.parent / f"manifest-{s}x.csv"
                with open(out, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows[: s * self.cfg.videos])
                self._manifests[s] = str(out)
        return self._manifests[scale]

    def ensure_ray(self) -> None:
        if self.ray_start_s is None:
            from subsume.commands import ensure_ray

            t0 = time.perf_counter()
            ensure_ray()
            self.ray_start_s = time.perf_counter() - t0
            self.log(f"Ray started in {self.ray_start_s:.1f} s")

    def actor_counts(self) -> tuple[int, int]:
        """(decode actors, teacher actors) for the pipeline runs: what pipeline.extract picks by default."""
        from pipeline.extract import cluster_actor_plan

        self.ensure_ray()
        plan = cluster_actor_plan(self.cfg.device)
        return plan.decode_actors, plan.teacher_actors

    def extract_config(self, manifest: str, store: str, *, pipeline: bool = True):
        """The extraction settings every run shares; `pipeline=False` leaves the actor counts unset (no Ray)."""
        from feature_store.spec import SamplingSpec, StorageSpec, TeacherSpec
        from pipeline.extract import ExtractConfig

        n_decode, n_teacher = self.actor_counts() if pipeline else (None, None)
        return ExtractConfig(
            videos=manifest, store=store, teacher=TeacherSpec(model=str(self.teacher_dir(self.cfg.extract_teacher))),
            sampling=SamplingSpec(fps=self.cfg.fps, segment_frames=self.cfg.segment_frames), storage=StorageSpec(),
            batch_size=self.cfg.extract_batch, teacher_actors=n_teacher, decode_concurrency=n_decode,
            samples_per_shard=self.cfg.samples_per_shard, device=self.cfg.device, progress=False)

    def run_extract(self, manifest: str, store: str, executor: str = "ray") -> dict[str, Any]:
        """One extraction, timed, with the peak memory of this process and all its descendants. `executor`:
        the Ray Data pipeline, or "local" (pipeline.local: this process, Ray left idle)."""
        import dataclasses

        from pipeline.extract import run_extract

        on_ray = executor != "local"
        if on_ray:
            self.ensure_ray()
        ecfg = dataclasses.replace(self.extract_config(manifest, store, pipeline=on_ray), executor=executor)
        gc.collect()
        time.sleep(1.0)  # let the previous run's actors exit before the idle figure is taken
        with TreeMemorySampler(self.cfg.rss_interval_s) as mem:
            t0 = time.perf_counter()
            result = run_extract(ecfg, connect=self.ensure_ray)
            wall = time.perf_counter() - t0
        if result.get("videos_failed"):
            raise RuntimeError(f"extraction of {manifest} had failures: {result.get('failures_by_reason')}")
        pk = mem.peak
        result["bench"] = {"wall_s": wall, "peak_rss_bytes": pk.rss_bytes, "peak_pss_bytes": pk.pss_bytes,
                           "idle_rss_bytes": pk.idle_rss_bytes, "processes": pk.processes,
                           "memory_samples": pk.samples, "decode_actors": ecfg.decode_concurrency,
                           "teacher_actors": ecfg.teacher_actors}
        return result

    def extract(self, scale: int) -> dict[str, Any]:
        """The first extraction of the scale x set into a fresh store (made once per run and shared)."""
        tag = f"{scale}x"
        if tag not in self._extracts:
            self.log(f"extracting the {tag} set ({scale * self.cfg.videos} videos)")
            self._extracts[tag] = self.run_extract(self.manifest(scale), str(self.workdir / "stores" / tag))
            r = self._extracts[tag]
            self.log(f"  {r['frames_computed']} frames in {r['bench']['wall_s']:.1f} s, peak RSS "
                     f"{r['bench']['peak_rss_bytes'] / 2**20:.0f} MiB over {r['bench']['processes']} processes")
        return self._extracts[tag]

