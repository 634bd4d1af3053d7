import dataclasses

import pytest

from feature_store.spec import (FeatureSpec, PreprocessSpec, SamplingSpec, StorageSpec, TeacherSpec,
                                feature_spec_from_dict, to_dict)


def make_spec(**changes) -> FeatureSpec:
    base = FeatureSpec(
        teacher=TeacherSpec(model="openai/clip-vit-base-patch16"), teacher_fingerprint="ab" * 32,
        teacher_class="CLIPVisionModelWithProjection", embed_dim=512, output_used="image_embeds",
        preprocess=PreprocessSpec(resize=224, crop=224, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27)),
        sampling=SamplingSpec(fps=4.0, segment_frames=16), storage=StorageSpec())
    return dataclasses.replace(base, **changes)


def test_key_is_stable_and_safe():
    a, b = make_spec(), make_spec()
    assert a.key == b.key
    assert a.key.startswith("fk-") and "." not in a.key and "/" not in a.key


@pytest.mark.parametrize("change", [
    {"teacher_fingerprint": "cd" * 32},
    {"output_used": "pooler"},
    {"teacher": TeacherSpec(model="openai/clip-vit-base-patch16", patch_grid=7)},
    {"preprocess": PreprocessSpec(resize=256, crop=224, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27))},
    {"sampling": SamplingSpec(fps=2.0, segment_frames=16)},
    {"sampling": SamplingSpec(fps=None, stride=2, segment_frames=16)},
    {"sampling": SamplingSpec(fps=4.0, segment_frames=8)},
    {"storage": StorageSpec(target_dtype="float32")},
    {"storage": StorageSpec(frame_encoding="png")},
    {"format_version": 2},
])
def test_everything_that_changes_bytes_changes_the_key(change):
    assert make_spec(**change).key != make_spec().key


def test_where_the_teacher_was_loaded_from_does_not_change_the_key():
    moved = make_spec(teacher=TeacherSpec(model="/models/clip-b16", revision="abc123"))
    assert moved.key == make_spec().key


def test_json_round_trip():
    spec = make_spec()
    assert feature_spec_from_dict(to_dict(spec)) == spec


@pytest.mark.parametrize("kwargs", [dict(fps=None, stride=None), dict(fps=4.0, stride=2), dict(fps=0.0),
                                    dict(segment_frames=0), dict(overlap=16), dict(short="loop")])
def test_sampling_spec_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        SamplingSpec(**kwargs)
