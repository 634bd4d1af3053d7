"""One file names a KEY: the typed extract config (extract --config, train --features), the alias extraction
records so that a training pod finds its KEY without the teacher's weights, and what a job carries to Ray.
Fast: no Ray, no teacher (the end-to-end path is tests/test_k8s_rehearsal.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from feature_store.features_config import (FeaturesConfigError, alias_name, alias_request, load_features_config,
                                           record_alias, resolve_alias)
from feature_store.spec import SamplingSpec, StorageSpec, TeacherSpec
from feature_store.store import FeatureStore, KeyNotFound
from subsume.cli import CliError, build_parser
from subsume.commands import _find_key, extract_config, forwarded_env
from tests.conftest import REPO, VENV_BIN
from tests.storehelpers import small_spec

COMMIT = "57c216476eefef5ab752ec549e440a49ae4ae5f3"
GOOD = f"""\
teacher:
  model: openai/clip-vit-base-patch16
  revision: {COMMIT}
  precision: bf16
  patch_grid: 2
sampling:
  fps: 4
  segment_frames: 8
storage:
  target_dtype: float32
"""
KEY_FILES = sorted([*REPO.glob("configs/extract*.yaml"), *REPO.glob("k8s/**/extract.yaml")])


def parse(argv: list[str]):
    """As subsume.cli.main parses them (it adds the parsed --storage-option pairs)."""
    args = build_parser().parse_args(argv)
    args.storage_options = {}
    return args


def write(tmp_path: Path, text: str, name: str = "extract.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_key_file_gives_the_specs_extraction_uses(tmp_path):
    args = parse(["extract", "--videos", "v", "--store", "s", "--config", write(tmp_path, GOOD)])
    cfg = extract_config(args)
    assert cfg.teacher == TeacherSpec(model="openai/clip-vit-base-patch16", revision=COMMIT, patch_grid=2,
                                      precision="bf16")
    assert cfg.sampling == SamplingSpec(fps=4.0, segment_frames=8)
    assert cfg.storage == StorageSpec(target_dtype="float32")
    assert cfg.store == "s"


def test_the_file_gives_the_same_settings_as_the_flags(tmp_path):
    flags = parse(["extract", "--videos", "v", "--store", "s", "--teacher",
                                       "openai/clip-vit-base-patch16", "--revision", COMMIT, "--precision", "bf16",
                                       "--patch-grid", "2", "--fps", "4", "--segment-frames", "8",
                                       "--target-dtype", "float32"])
    from_flags, from_file = extract_config(flags), extract_config(parse(
        ["extract", "--videos", "v", "--store", "s", "--config", write(tmp_path, GOOD)]))
    assert (from_flags.teacher, from_flags.sampling, from_flags.storage, from_flags.size) == (
        from_file.teacher, from_file.sampling, from_file.storage, from_file.size)


@pytest.mark.parametrize("text, complaint", [
    ("teacher: {model: m, precison: bf16}\n", "teacher.precison: unknown key"),
    ("teacher: {model: m}\nsampling: {segment_frames: '16'}\n", "sampling.segment_frames"),
    ("teacher: {model: m}\nsampling: {fps: 4, stride: 2}\n", "fps or stride"),
    ("teacher: {model: m, precision: fp8}\n", "teacher.precision"),
    ("sampling: {fps: 4}\n", "teacher: Field required"),
    ("teacher: {model: m}\nworkers: 3\n", "workers: unknown key"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_key_files_are_refused_with_where(tmp_path, text, complaint):
    with pytest.raises(FeaturesConfigError, match=re.escape(complaint)):
        load_features_config(write(tmp_path, text))


def test_the_cli_refuses_a_bad_file_with_exit_code_2_and_one_line(tmp_path):
    bad = write(tmp_path, "teacher: {model: m, sise: 224}\n")
    proc = subprocess.run([str(VENV_BIN / "subsume"), "extract", "--videos", str(tmp_path), "--store",
                           str(tmp_path / "s"), "--config", bad], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"subsume extract: {bad}: teacher.sise: unknown key"]


def test_key_flags_beside_the_file_are_refused(tmp_path):
    args = parse(["extract", "--videos", "v", "--store", "s", "--config", write(tmp_path, GOOD),
                                      "--fps", "2"])
    with pytest.raises(CliError, match="--fps beside it is refused"):
        extract_config(args)


def test_store_comes_from_the_flag_or_the_file(tmp_path):
    path = write(tmp_path, GOOD + "store: /from/file\n")
    assert extract_config(parse(["extract", "--videos", "v", "--config", path])).store == "/from/file"
    assert extract_config(parse(["extract", "--videos", "v", "--config", path, "--store", "/flag"])).store == "/flag"
    with pytest.raises(CliError, match="--store"):
        extract_config(parse(["extract", "--videos", "v", "--config", write(tmp_path, GOOD, "b.yaml")]))


@pytest.mark.parametrize("path", KEY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_key_files_load(path):
    cfg = load_features_config(path)
    assert alias_request(cfg.teacher_spec(), cfg.sampling_spec(), cfg.storage_spec(), cfg.teacher.size), \
        f"{path}: a hub teacher pinned to a commit (training pods then find the KEY without the weights)"


def test_there_are_key_files():
    assert any(p.parts[-3:-1] == ("k8s", "base") for p in KEY_FILES) and any(p.parent.name == "configs" for p in KEY_FILES)


# --- the alias ---------------------------------------------------------------------------------------------


def request_for(teacher: TeacherSpec, spec=None) -> dict | None:
    spec = spec or small_spec()
    return alias_request(teacher, spec.sampling, spec.storage, None)


def test_aliases_only_for_hub_teachers_pinned_to_a_commit(tmp_path):
    assert request_for(TeacherSpec(model="org/model", revision=COMMIT)) is not None
    assert request_for(TeacherSpec(model="org/model", revision="main")) is None  # a branch moves
    assert request_for(TeacherSpec(model="org/model")) is None
    (tmp_path / "local").mkdir()
    assert request_for(TeacherSpec(model=str(tmp_path / "local"), revision=COMMIT)) is None  # a folder changes
    a, b = request_for(TeacherSpec(model="org/model", revision=COMMIT)), request_for(
        TeacherSpec(model="org/model", revision=COMMIT, precision="bf16"))
    assert alias_name(a) != alias_name(b)


def store_with_key(tmp_path: Path, teacher: TeacherSpec) -> tuple[FeatureStore, str]:
    from dataclasses import replace

    store = FeatureStore(str(tmp_path / "store"))
    return store, store.ensure_key(replace(small_spec(), teacher=teacher))


def test_an_alias_resolves_to_its_key_and_is_checked_against_the_spec(tmp_path):
    teacher = TeacherSpec(model="org/model", revision=COMMIT)
    store, key = store_with_key(tmp_path, teacher)
    request = request_for(teacher)
    assert resolve_alias(store, request) is None
    record_alias(store, request, key)
    assert resolve_alias(store, request) == key
    assert key in store.keys() and len(store.keys()) == 1  # aliases/ is not a KEY
    other = request_for(TeacherSpec(model="org/model", revision=COMMIT, output="cls"))
    record_alias(store, other, key)  # a wrong record: the KEY's own spec says otherwise
    with pytest.raises(FeaturesConfigError, match="differs"):
        resolve_alias(store, other)
    store.delete_key(key)
    with pytest.raises(KeyNotFound):
        resolve_alias(store, request)


def train_args(store: str, key_file: str):
    return parse(["train", "--store", store, "--features", key_file, "--out", "o"])


def test_train_features_finds_the_key_through_the_alias_without_the_teacher(tmp_path, monkeypatch):
    teacher = TeacherSpec(model="org/model", revision=COMMIT)
    store, key = store_with_key(tmp_path, teacher)
    spec = small_spec()
    text = (f"teacher: {{model: org/model, revision: '{COMMIT}'}}\n"
            f"sampling: {{fps: {spec.sampling.fps}, segment_frames: {spec.sampling.segment_frames}}}\n")
    record_alias(store, request_for(teacher), key)
    import feature_store.teacher

    def no_loading(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(feature_store.teacher, "feature_spec_for", no_loading)
    assert _find_key(train_args(store.root, write(tmp_path, text))) == key


def test_without_an_alias_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the fallback cannot load the teacher here
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = train_args(str(tmp_path / "empty"), write(tmp_path, GOOD))
    with pytest.raises(CliError, match="no alias for these settings"):
        _find_key(args)


# --- what a job carries to Ray ------------------------------------------------------------------------------


def test_no_credentials_travel_in_the_runtime_env():
    environ = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "HF_TOKEN": "h",
               "AWS_ENDPOINT_URL": "http://minio:9000", "HF_HOME": "/cache/huggingface", "HF_HUB_OFFLINE": "1",
               "AWS_REGION": "eu-west-1"}
    sent = forwarded_env(environ)
    assert sent == {"AWS_ENDPOINT_URL": "http://minio:9000", "HF_HOME": "/cache/huggingface", "HF_HUB_OFFLINE": "1",
                    "AWS_REGION": "eu-west-1"}
    from tests.test_k8s import SENSITIVE

    assert not [k for k in sent if SENSITIVE.search(k)]
