"""One file names a KEY: the typed extraction config, and the alias record that finds its KEY without the teacher.

`subsume extract --config FILE` and `subsume train --features FILE` read the same file, so the settings that
define a KEY (teacher, revision, output, patch grid, precision, input size, sampling, storage) are written once.

A KEY is a hash that includes the teacher's weights fingerprint, so finding it from settings alone normally
means loading (and, for a hub id, downloading) the teacher. Extraction therefore records an alias in the store:
ROOT/aliases/<name>.json, where <name> hashes the requested settings with the hub id and its pinned commit.
A training pod resolves the alias by reading two small JSON files (the alias and the KEY's spec.json) and
never touches the weights. Aliases are recorded only for hub teachers pinned to a commit: a branch or a
local folder can change under the same name, so those are resolved by fingerprinting, as before.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feature_store import fsutil
from feature_store.spec import FORMAT_VERSION, SamplingSpec, StorageSpec, TeacherSpec, canonical_json, to_dict

ALIASES = "aliases"
COMMIT = re.compile(r"[0-9a-f]{40}")


class FeaturesConfigError(ValueError):
    """The file is missing, not YAML, or does not follow the schema; the message says where."""


class _Section(BaseModel):
    # Unknown keys are typos, and YAML already gives every value its type: no silent coercion.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TeacherSection(_Section):
    model: str = Field(min_length=1)
    revision: str | None = None
    output: Literal["auto", "image_embeds", "pooler", "cls", "cls+mean_patch"] = "auto"
    patch_grid: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    size: int | None = Field(None, gt=0)
    trust_remote_code: bool = False


class SamplingSection(_Section):
    fps: float | None = Field(None, gt=0)
    stride: int | None = Field(None, ge=1)
    segment_frames: int = Field(16, ge=1)
    overlap: int = Field(0, ge=0)
    max_frames: int = Field(0, ge=0)
    short: Literal["pad", "drop"] = "pad"

    @model_validator(mode="after")
    def _one_rate(self) -> "SamplingSection":
        if self.fps is not None and self.stride is not None:
            raise ValueError("give fps or stride, not both")
        if self.overlap >= self.segment_frames:
            raise ValueError("overlap must be smaller than segment_frames")
        return self


class StorageSection(_Section):
    frame_encoding: Literal["jpeg", "png", "npy"] = "jpeg"
    target_dtype: Literal["float16", "float32"] = "float16"


class FeaturesConfig(_Section):
    """What an extract.yaml holds. `store` is optional: a --store flag (a deployment's location) wins over it."""

    teacher: TeacherSection
    sampling: SamplingSection = SamplingSection()
    storage: StorageSection = StorageSection()
    store: str | None = None

    def teacher_spec(self) -> TeacherSpec:
        t = self.teacher
        return TeacherSpec(model=t.model, revision=t.revision, output=t.output, patch_grid=t.patch_grid,
                           trust_remote_code=t.trust_remote_code, precision=t.precision)

    def sampling_spec(self) -> SamplingSpec:
        s = self.sampling
        fps = s.fps if (s.fps is not None or s.stride is not None) else 4.0  # the CLI's default rate
        return SamplingSpec(fps=fps, stride=s.stride, segment_frames=s.segment_frames, overlap=s.overlap,
                            max_frames=s.max_frames, short=s.short)

    def storage_spec(self) -> StorageSpec:
        return StorageSpec(frame_encoding=self.storage.frame_encoding, target_dtype=self.storage.target_dtype)


def load_features_config(path: str | Path) -> FeaturesConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise FeaturesConfigError(f"{path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise FeaturesConfigError(f"{path}: not YAML: {e}") from e
    if not isinstance(data, dict):
        raise FeaturesConfigError(f"{path}: expected a mapping with a 'teacher' section")
    try:
        return FeaturesConfig.model_validate(data)
    except ValidationError as e:
        raise FeaturesConfigError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    return f"{where}: {err['msg']}"


# --- the alias record ------------------------------------------------------------------------------------


def alias_request(teacher: TeacherSpec, sampling: SamplingSpec, storage: StorageSpec, size: int | None) -> dict | None:
    """What an alias stands for, or None when the name could later mean other weights (local folder, branch)."""
    if Path(teacher.model).expanduser().exists() or not COMMIT.fullmatch(teacher.revision or ""):
        return None
    return {"teacher": to_dict(teacher), "size": size, "sampling": to_dict(sampling), "storage": to_dict(storage),
            "format_version": FORMAT_VERSION}


def alias_name(request: dict) -> str:
    return "fa-" + hashlib.sha256(canonical_json(request).encode()).hexdigest()[:16]


def _alias_path(store: Any, request: dict) -> str:
    return fsutil.join(store.path, ALIASES, alias_name(request) + ".json")


def record_alias(store: Any, request: dict, key: str) -> str:
    """Write ROOT/aliases/<name>.json -> KEY (atomically; rewriting the same alias is harmless)."""
    path = _alias_path(store, request)
    body = json.dumps({"alias": alias_name(request), "key": key, "request": request}, indent=1, sort_keys=True)
    if fsutil.is_local(store.fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write(store.fs, path, body.encode())
    return path


def resolve_alias(store: Any, request: dict) -> str | None:
    """The KEY an alias names, checked against that KEY's own spec.json; None when there is no such alias."""
    path = _alias_path(store, request)
    if not fsutil.exists(store.fs, path):
        return None
    record = json.loads(fsutil.read_bytes(store.fs, path))
    key = record["key"]
    spec = store.spec(key)  # KeyNotFound when the KEY was deleted after the alias was written
    found = {"teacher": to_dict(spec.teacher), "sampling": to_dict(spec.sampling), "storage": to_dict(spec.storage)}
    wanted = {k: request[k] for k in found}
    if found != wanted:
        raise FeaturesConfigError(f"alias {path} names {key}, whose spec differs from the request; "
                                  f"delete the alias and extract again")
    return key
