"""Load a transformers image model as a frozen teacher and compute its per-frame embeddings.

The model class is the one named in the checkpoint's `config.architectures` (AutoModel would silently load
`CLIPVisionModel` from a `CLIPVisionModelWithProjection` checkpoint and drop `visual_projection`). For a
task-head class (`...ForImageClassification`) the backbone (`model.base_model`) is the encoder.

Which output is the embedding (`TeacherSpec.output`):
- "auto", by family:
  - models with `get_image_features` (CLIPModel, SiglipModel, Siglip2Model, other dual encoders): its
    output, the image embedding in the joint space ("image_embeds");
  - `*VisionModelWithProjection` (CLIP): `image_embeds`;
  - DINOv2 (with or without registers) and plain ViT: the CLS token of the final (layer-normed)
    `last_hidden_state` ("cls");
  - anything else (documented fallback): `pooler_output` when the model returns one ("pooler"), else the
    CLS token ("cls"); a model with neither (no pooler, no prefix token) needs an explicit output.
- "image_embeds", "pooler" (the vision tower's `pooler_output`, before any projection), "cls" (first token
  of the vision tower's `last_hidden_state`; for CLIP that is before `post_layernorm`), or
  "cls+mean_patch" (CLS concatenated with the mean patch token, as DINOv2's linear evaluation does).

`patch_grid = g > 0` also keeps the vision tower's last hidden state at the patch positions (CLS, distillation
and register tokens dropped), average-pooled from the native grid to g x g.

SigLIP2 NaFlex models take patchified inputs; a square frame becomes its full grid of patches (no padding
patches, which the model masks out anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from feature_store.preprocess import normalize, resolve_preprocess
from feature_store.spec import FeatureSpec, PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec

log = logging.getLogger(__name__)

OUTPUTS = ("auto", "image_embeds", "pooler", "cls", "cls+mean_patch")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Families whose "auto" embedding is the CLS token although they also return a pooler_output
# (ViTModel's pooler is an extra dense+tanh layer, untrained in most checkpoints).
CLS_FAMILIES = ("Dinov2Model", "Dinov2WithRegistersModel", "ViTModel")

# The files transformers loads weights from, in its order of preference; anything else (training_args.bin,
# open_clip_*.safetensors next to the transformers weights) is not the model and is not fingerprinted.
_WEIGHT_PATTERNS = (
    re.compile(r"model(-\d+-of-\d+)?\.safetensors"),
    re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin"),
)
_HUB_CONFIG_FILES = ["config.json", "preprocessor_config.json", "processor_config.json", "*.index.json"]


@dataclass
class TeacherOutput:
    embeds: torch.Tensor  # float32 [N, D] on CPU
    patch_grid: torch.Tensor | None  # float32 [N, g, g, Dp] on CPU, or None without patch_grid


class Teacher:
    """A loaded, frozen image model plus the preprocessing that feeds it; cheap to call many times."""

    def __init__(self, spec: TeacherSpec, preprocess: PreprocessSpec, model: torch.nn.Module, *,
                 fingerprint: str, device: torch.device, precision: str = "fp32") -> None:
        if spec.output not in OUTPUTS:
            raise ValueError(f"unknown output {spec.output!r}; expected one of {OUTPUTS}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
        if spec.patch_grid < 0:
            raise ValueError(f"patch_grid must be >= 0, got {spec.patch_grid}")
        self.spec = spec
        self.preprocess = preprocess
        self.model_class = type(model).__name__
        self.fingerprint = fingerprint
        self.device = device
        self.precision = precision
        self._model = model.eval().requires_grad_(False).to(device)
        self._encoder = _encoder_of(self._model)
        self._tower = getattr(self._encoder, "vision_model", self._encoder)
        self._patch_size = _patch_size(self._encoder.config)
        self._naflex = "spatial_shapes" in inspect.signature(self._tower.forward).parameters
        self._interpolate = preprocess.crop != _image_size(self._encoder.config)

        probe = torch.zeros((1, preprocess.crop, preprocess.crop, 3), dtype=torch.uint8, device=device)
        self.output_used = spec.output if spec.output != "auto" else self._auto_output(probe)
        with torch.inference_mode():
            embeds, hidden = self._forward(normalize(probe, preprocess))
        self.embed_dim = int(embeds.shape[-1])
        self._prefix, self._grid = self._patch_layout(hidden)
        self.patch_dim: int | None = None
        if spec.patch_grid > 0:
            if self._grid is None:
                raise ValueError(f"{self.model_class}: cannot locate the patch tokens for patch_grid")
            if spec.patch_grid > self._grid:
                raise ValueError(f"patch_grid {spec.patch_grid} exceeds the native {self._grid}x{self._grid} grid")
            self.patch_dim = int(hidden.shape[1] if hidden.ndim == 4 else hidden.shape[-1])

    def embed(self, frames: np.ndarray | torch.Tensor) -> TeacherOutput:
        """uint8 [N, crop, crop, 3] frames (already resize_crop'd) -> embeddings (and patch grid) on CPU."""
        x = self._check_frames(frames)
        if x.shape[0] == 0:
            g = self.spec.patch_grid
            grid = torch.zeros((0, g, g, self.patch_dim or 0)) if g > 0 else None
            return TeacherOutput(torch.zeros((0, self.embed_dim)), grid)
        return self._embed_on_device(x.to(self.device, non_blocking=True))

    def _check_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        crop = self.preprocess.crop
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (crop, crop, 3):
            raise ValueError(f"expected uint8 [N, {crop}, {crop}, 3], got {x.dtype} {tuple(x.shape)}")
        return x

    def _embed_on_device(self, x: torch.Tensor) -> TeacherOutput:
        with torch.inference_mode(), self._autocast():
            embeds, hidden = self._forward(normalize(x, self.preprocess))
            grid = self._pool_patches(hidden) if self.spec.patch_grid > 0 else None
            embeds = embeds.float().cpu()
            grid = grid.float().cpu() if grid is not None else None
        # Clones outside inference mode are ordinary tensors, usable anywhere downstream.
        return TeacherOutput(embeds.clone(), grid.clone() if grid is not None else None)

    def embed_batched(self, frames: np.ndarray | torch.Tensor, batch_size: int) -> TeacherOutput:
        """`embed` in batches of `batch_size` frames. On CUDA the next batch is copied to the device (from
        pinned memory, on a side stream) while the current one computes; elsewhere batches run in turn."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.device.type == "cuda" and len(frames) > 0:
            outs = list(self._overlapped(self._check_frames(frames), batch_size))
        else:
            outs = [self.embed(frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)]
        if not outs:
            return self.embed(frames)
        grids = [o.patch_grid for o in outs]
        return TeacherOutput(torch.cat([o.embeds for o in outs]),
                             torch.cat(grids) if grids[0] is not None else None)

    def _overlapped(self, x: torch.Tensor, batch_size: int) -> Iterable[TeacherOutput]:
        copy_stream = torch.cuda.Stream(device=self.device)
        compute = torch.cuda.current_stream(self.device)

        def upload(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            host = x[i:i + batch_size].pin_memory()  # pinned: the copy can run asynchronously
            with torch.cuda.stream(copy_stream):
                dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
            return dev, done

        starts = range(0, len(x), batch_size)
        nxt = upload(0)
        for i in starts:
            dev, done = nxt
            if i + batch_size < len(x):
                nxt = upload(i + batch_size)  # queued on the copy stream, runs under this batch's compute
            compute.wait_event(done)
            dev.record_stream(compute)  # the allocator must not reuse it before the compute stream is done
            yield self._embed_on_device(dev)

    # -- internals -------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device_type=self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _inputs(self, pixel_values: torch.Tensor, fn: Any) -> dict[str, Any]:
        if self._naflex:
            return _naflex_inputs(pixel_values, self._patch_size)
        inputs: dict[str, Any] = {"pixel_values": pixel_values}
        if self._interpolate and "interpolate_pos_encoding" in inspect.signature(fn).parameters:
            inputs["interpolate_pos_encoding"] = True
        return inputs

    def _auto_output(self, probe: torch.Tensor) -> str:
        encoder = self._encoder
        if hasattr(encoder, "get_image_features"):
            return "image_embeds"
        with torch.inference_mode():
            pixel_values = normalize(probe, self.preprocess)
            out = encoder(**self._inputs(pixel_values, encoder.forward))
            if getattr(out, "image_embeds", None) is not None:
                return "image_embeds"
            if type(encoder).__name__ in CLS_FAMILIES:
                return "cls"
            if type(encoder) is not type(self._tower):
                out = self._tower(**self._inputs(pixel_values, self._tower.forward))
        return "pooler" if getattr(out, "pooler_output", None) is not None else "cls"

    def _forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings [N, D], the vision tower's last hidden state or None)."""
        if self.output_used == "image_embeds":
            encoder = self._encoder
            if hasattr(encoder, "get_image_features"):
                out = encoder.get_image_features(**self._inputs(pixel_values, encoder.get_image_features))
                if isinstance(out, torch.Tensor):  # transformers < 5 returned the bare embedding
                    return out, self._tower_output(pixel_values).last_hidden_state
                embeds = getattr(out, "image_embeds", None)
                return (out.pooler_output if embeds is None else embeds), out.last_hidden_state
            out = encoder(**self._inputs(pixel_values, encoder.forward))
            if getattr(out, "image_embeds", None) is None:
                raise ValueError(f"{self.model_class} has no image_embeds output")
            return out.image_embeds, out.last_hidden_state

        out = self._tower_output(pixel_values)
        hidden = out.last_hidden_state
        if self.output_used == "pooler":
            if out.pooler_output is None:
                raise ValueError(f"{self.model_class} returns no pooler_output")
            return out.pooler_output.flatten(1), hidden
        prefix, _ = self._patch_layout(hidden)
        if hidden.ndim != 3 or not prefix:
            raise ValueError(f"{self.model_class} has no CLS token; choose output='pooler' or 'image_embeds'")
        if self.output_used == "cls":
            return hidden[:, 0], hidden
        return torch.cat([hidden[:, 0], hidden[:, prefix:].mean(dim=1)], dim=-1), hidden

    def _tower_output(self, pixel_values: torch.Tensor) -> Any:
        return self._tower(**self._inputs(pixel_values, self._tower.forward))

    def _patch_layout(self, hidden: torch.Tensor | None) -> tuple[int | None, int | None]:
        """(number of leading non-patch tokens, side of the native patch grid); None where unknown."""
        if hidden is None:
            return None, None
        if hidden.ndim == 4:  # convolutional feature map [N, C, h, w]
            return 0, int(hidden.shape[-1]) if hidden.shape[-1] == hidden.shape[-2] else None
        tokens = int(hidden.shape[1])
        if self._patch_size:
            side = self.preprocess.crop // self._patch_size
            if 0 <= tokens - side * side:
                return tokens - side * side, side
        for prefix in (0, 1):
            side = math.isqrt(max(tokens - prefix, 0))
            if side and side * side == tokens - prefix:
                return prefix, side
        return None, None

    def _pool_patches(self, hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is None:
            raise ValueError(f"{self.model_class} returned no hidden state for patch_grid")
        side = self._grid
        if hidden.ndim == 4:
            maps = hidden
        else:
            tokens = hidden[:, self._prefix:]
            maps = tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1]).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(maps.float(), self.spec.patch_grid)
        return pooled.permute(0, 2, 3, 1).contiguous()


def load_teacher(spec: TeacherSpec, *, size: int | None = None, device: str = "auto",
                 precision: str | None = None) -> Teacher:
    """Load `spec.model` (local folder or hub id at `spec.revision`) as a frozen teacher.

    size: input size override (see resolve_preprocess); device: "auto" (CUDA when available) or a torch
    device string; precision: "fp32", or "bf16"/"fp16" autocast around the forward pass.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load bar in every actor's log says nothing useful

    folder = model_folder(spec)
    fingerprint = weights_fingerprint(folder)
    preprocess = resolve_preprocess(str(folder), size=size)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    model_cls = _architecture_class(config, folder, trust_remote_code=spec.trust_remote_code)
    # fp32 weights whatever the checkpoint stores: reduced precision is the autocast's job.
    model = model_cls.from_pretrained(folder, config=config, dtype=torch.float32)
    return Teacher(spec, preprocess, model, fingerprint=fingerprint, device=resolve_device(device),
                   precision=precision or spec.precision)


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher contributes to a FeatureSpec, without the model."""

    fingerprint: str
    model_class: str
    output_used: str
    embed_dim: int
    patch_dim: int | None
    preprocess: PreprocessSpec


def describe_teacher(spec: TeacherSpec, *, size: int | None = None) -> TeacherInfo:
    """Load the teacher once on the CPU (the embedding size and output need a forward pass) and describe it."""
    teacher = load_teacher(spec, size=size, device="cpu")
    return TeacherInfo(fingerprint=teacher.fingerprint, model_class=teacher.model_class,
                       output_used=teacher.output_used, embed_dim=teacher.embed_dim, patch_dim=teacher.patch_dim,
                       preprocess=teacher.preprocess)


def feature_spec_for(teacher: TeacherSpec, sampling: SamplingSpec, storage: StorageSpec, *,
                     size: int | None = None) -> FeatureSpec:
    """Everything that defines a KEY for these settings. Reads the teacher's config and weights (to
    fingerprint them), so extraction and a KEY lookup from teacher + sampling agree by construction."""
    info = describe_teacher(teacher, size=size)
    return FeatureSpec(teacher=teacher, teacher_fingerprint=info.fingerprint, teacher_class=info.model_class,
                       embed_dim=info.embed_dim, output_used=info.output_used, preprocess=info.preprocess,
                       sampling=sampling, storage=storage)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_folder(spec: TeacherSpec) -> Path:
    """The local folder holding the checkpoint: `spec.model` itself, or its hub snapshot (downloaded once)."""
    local = Path(spec.model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:  # whatever the cache holds for this revision
        return Path(snapshot_download(spec.model, revision=spec.revision, local_files_only=True))
    weights = select_weight_files(HfApi().list_repo_files(spec.model, revision=spec.revision))
    if not weights:
        raise FileNotFoundError(f"{spec.model}: no model weight files in the repository")
    patterns = [*weights, *_HUB_CONFIG_FILES, *(["*.py"] if spec.trust_remote_code else [])]
    return Path(snapshot_download(spec.model, revision=spec.revision, allow_patterns=patterns))


def select_weight_files(names: Iterable[str]) -> list[str]:
    """The weight files transformers would load from a checkpoint's top-level file names, sorted."""
    top = [n for n in names if "/" not in n]
    for pattern in _WEIGHT_PATTERNS:
        chosen = sorted(n for n in top if pattern.fullmatch(n))
        if chosen:
            return chosen
    return sorted(n for n in top if n.endswith((".safetensors", ".bin")))


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over the checkpoint's weight files: names and contents, in name order."""
    folder = Path(folder)
    names = select_weight_files(p.name for p in folder.iterdir() if p.is_file())
    if not names:
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{_file_sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _architecture_class(config: Any, folder: Path, *, trust_remote_code: bool) -> type:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        log.warning("%s: config names no architecture; falling back to AutoModel", folder)
        return _AutoModelLoader(trust_remote_code)
    name = architectures[0]
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    for ref in (getattr(config, "auto_map", None) or {}).values():
        if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == name:
            if not trust_remote_code:
                raise ValueError(f"{name} is remote code; it runs only with --trust-remote-code (TeacherSpec.trust_remote_code)")
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            return get_class_from_dynamic_module(ref, str(folder))
    raise ValueError(f"architecture {name!r} is neither in transformers nor in the checkpoint's auto_map")


class _AutoModelLoader:
    """from_pretrained through AutoModel, for configs that name no architecture."""

    def __init__(self, trust_remote_code: bool) -> None:
        self.trust_remote_code = trust_remote_code

    def from_pretrained(self, folder: Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(folder, trust_remote_code=self.trust_remote_code, **kwargs)


def _encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone of a task-head model (ViTForImageClassification -> ViTModel), else the model itself."""
    base = getattr(model, "base_model", model)
    return base if "For" in type(model).__name__ and base is not model else model


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _patch_size(config: Any) -> int | None:
    size = getattr(_vision_config(config), "patch_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def _image_size(config: Any) -> int | None:
    size = getattr(_vision_config(config), "image_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def _naflex_inputs(pixel_values: torch.Tensor, patch_size: int | None) -> dict[str, torch.Tensor]:
    """SigLIP2 NaFlex inputs for square images: all patches, row-major, channels last within a patch."""
    if not patch_size:
        raise ValueError("a patchified-input model needs patch_size in its config")
    n, c, height, width = pixel_values.shape
    gh, gw = height // patch_size, width // patch_size
    patches = pixel_values.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    device = pixel_values.device
    return {
        "pixel_values": patches.reshape(n, gh * gw, patch_size * patch_size * c),
        "pixel_attention_mask": torch.ones((n, gh * gw), dtype=torch.int32, device=device),
        "spatial_shapes": torch.tensor([[gh, gw]] * n, dtype=torch.long, device=device),
    }
