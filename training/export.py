"""A trained student that stands alone: a Hugging Face-style folder (`config.json` + `model.safetensors`)
that also says how to feed it (the sampling and preprocessing of its training KEY, then the resize to its
own input size), loaded with one call and no feature store:

    from training.export import VideoStudent
    model = VideoStudent.from_pretrained("runs/x/checkpoints/step_00000500/student")  # or a Hub repo id
    emb = model.embed(frames_uint8)  # [B, T, H, W, 3] uint8 -> [B, E]

Built on huggingface_hub's PyTorchModelHubMixin, so `model.push_to_hub(repo_id)` publishes it as well.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from training.data import resize_frames
from training.models import StudentConfig, build_student, unwrap_model, video_to_input


class VideoStudent(nn.Module, PyTorchModelHubMixin, library_name="subsume",
                   tags=["video", "self-supervised", "feature-extraction"]):
    """The student network plus its input contract. The constructor's arguments are what config.json holds."""

    def __init__(self, student: dict[str, Any], sampling: dict[str, Any] | None = None,
                 preprocess: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None):
        super().__init__()
        self.student_config = StudentConfig.from_dict(student)
        self.sampling = dict(sampling or {})  # fps/stride and segment length of the training KEY
        self.preprocess = dict(preprocess or {})  # the KEY's resize/crop, before the resize to image_size
        self.lineage = dict(lineage or {})  # store, KEY, version, manifest hash: where it came from
        self.encoder = build_student(self.student_config)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def forward(self, video: torch.Tensor):
        """Normalised float video [B, T, 3, H, W] -> StudentOutput(clip [B, E], frames [B, T, E])."""
        return self.encoder(video)

    @torch.no_grad()
    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, T, H, W, 3] (any H = W) -> clip embeddings [B, E], resized to the student's size."""
        x = resize_frames(frames, self.student_config.image_size)
        return self.encoder(video_to_input(x.to(next(self.parameters()).device), self.student_config)).clip


def export_student(student: nn.Module, cfg: StudentConfig, folder: str, *, sampling: dict[str, Any],
                   preprocess: dict[str, Any], lineage: dict[str, Any]) -> str:
    """Write the stand-alone model folder from a trained student module (DDP-wrapped or not)."""
    model = VideoStudent(cfg.resolved().to_dict(), sampling, preprocess, lineage)
    model.encoder.load_state_dict(unwrap_model(student).state_dict())
    model.save_pretrained(folder)
    return folder


def load_exported(path: str, device: str | torch.device = "cpu") -> VideoStudent:
    """A saved student folder (or Hub repo id), weights loaded strictly."""
    # huggingface_hub prints "Loading weights from local directory" on stdout, where our commands put their
    # JSON summary: it goes to stderr instead
    with contextlib.redirect_stdout(sys.stderr):
        model = VideoStudent.from_pretrained(path, strict=True)
    return model.to(device).eval()


def push(folder: str, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Publish an exported student to the Hugging Face Hub (needs network and a token)."""
    return load_exported(folder).push_to_hub(repo_id, private=private, token=token)
