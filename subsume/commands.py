"""CLI handlers: turn parsed flags into typed configs, call pipeline/, training/ and feature_store/, and
return the JSON summary. Side effects (Ray start-up, printing) live here, at the edge."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any

from subsume.cli import CliError


@contextmanager
def _missing_key_is_a_usage_error():
    """A KEY that is not in the store is the user's to fix: exit 2 with the store's message."""
    from feature_store.store import KeyNotFound

    try:
        yield
    except KeyNotFound as e:
        raise CliError(str(e)) from e


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Settings (never credentials) that reach the cluster's workers with the job. Ray keeps a job's runtime_env
# (its dashboard and job records show it), so keys and tokens stay on the nodes: Kubernetes pods get them
# from secretKeyRef, a `ray start` elsewhere from its own environment; a local ray.init() shares the driver's.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HOME", "HF_HUB_OFFLINE")


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in FORWARDED_ENV}


def ensure_ray(address: str | None = None) -> None:
    """Join RAY_ADDRESS / --ray-address if given, else start a local Ray for this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True, "logging_level": "WARNING"}
    forwarded = forwarded_env(dict(os.environ))
    if forwarded:
        kwargs["runtime_env"] = {"env_vars": forwarded}
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, **kwargs)
    else:
        ray.init(**kwargs)


def _sampling(args: argparse.Namespace):
    from feature_store.spec import SamplingSpec

    fps = args.fps if (args.fps is not None or args.stride is not None) else 4.0
    try:
        return SamplingSpec(fps=fps, stride=args.stride, segment_frames=args.segment_frames, overlap=args.overlap,
                            max_frames=args.max_frames, short=args.short)
    except ValueError as e:
        raise CliError(str(e)) from e


def _teacher(args: argparse.Namespace):
    from feature_store.spec import TeacherSpec

    return TeacherSpec(model=args.teacher, revision=args.revision, output=args.output, patch_grid=args.patch_grid,
                       trust_remote_code=args.trust_remote_code, precision=args.precision)


KEY_FLAGS = ("teacher", "revision", "output", "patch_grid", "trust_remote_code", "precision", "size", "fps",
             "stride", "segment_frames", "overlap", "max_frames", "short", "frame_encoding", "target_dtype")


def _features_file(path: str | None, args: argparse.Namespace):
    """The typed KEY file (extract --config / train --features), or None. KEY flags beside it would be a
    second source of truth, so one that differs from its default is refused."""
    if path is None:
        return None
    from feature_store.features_config import FeaturesConfigError, load_features_config
    from subsume.cli import _add_feature_flags

    try:
        features = load_features_config(path)
    except FeaturesConfigError as e:
        raise CliError(str(e)) from e
    bare = argparse.ArgumentParser(add_help=False)
    _add_feature_flags(bare, for_lookup=True)
    defaults = vars(bare.parse_args([]))
    given = [f for f in KEY_FLAGS if getattr(args, f) != defaults[f]]
    if given:
        raise CliError(f"{path} names the KEY; --{given[0].replace('_', '-')} beside it is refused (edit the file)")
    return features


def key_settings(args: argparse.Namespace, path: str | None) -> tuple[Any, Any, Any, int | None]:
    """(TeacherSpec, SamplingSpec, StorageSpec, size): from the KEY file when given, else from the flags."""
    from feature_store.spec import StorageSpec

    features = _features_file(path, args)
    if features is not None:
        return features.teacher_spec(), features.sampling_spec(), features.storage_spec(), features.teacher.size
    if not args.teacher:
        raise CliError("give --teacher MODEL (with the sampling flags) or a KEY file (extract --config, "
                       "train --features); train also takes --key KEY")
    storage = StorageSpec(frame_encoding=args.frame_encoding, target_dtype=args.target_dtype)
    return _teacher(args), _sampling(args), storage, args.size


def _store_root(args: argparse.Namespace) -> str:
    if args.store:
        return args.store
    features = _features_file(args.config, args)
    if features is None or not features.store:
        raise CliError("give --store ROOT (or store: in the --config file)")
    return features.store


def extract_config(args: argparse.Namespace):
    from pipeline.extract import ExtractConfig

    teacher, sampling, storage, size = key_settings(args, args.config)
    return ExtractConfig(
        videos=args.videos, store=_store_root(args), teacher=teacher, sampling=sampling, storage=storage, size=size,
        max_failure_fraction=args.max_failure_fraction, max_attempts=args.max_attempts,
        retry_failed=args.retry_failed,
        decode_timeout=args.decode_timeout, batch_size=args.batch_size, teacher_actors=args.teacher_actors,
        decode_concurrency=args.decode_concurrency, samples_per_shard=args.samples_per_shard,
        commit_every_shards=args.commit_every, max_in_flight=args.max_in_flight,
        object_store_memory_gb=args.object_store_memory, decode_limits=_decode_limits(args),
        device=args.device, dry_run=args.dry_run, storage_options=args.storage_options,
        progress=not args.quiet, executor="ray" if args.ray_address and args.executor == "auto" else args.executor)


def _decode_limits(args: argparse.Namespace):
    from pipeline.decode import DecodeLimits

    return DecodeLimits(max_duration_s=args.max_duration, max_frames=args.max_video_frames,
                        max_file_bytes=int(args.max_file_size * 2**30), max_aspect=args.max_aspect)


def cmd_extract(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.extract import run_extract
    from pipeline.sources import SourceError

    cfg = extract_config(args)
    try:
        result = run_extract(cfg, connect=lambda: ensure_ray(args.ray_address))
    except (SourceError, FileNotFoundError, OSError, ValueError) as e:
        raise CliError(str(e)) from e
    _record_alias(cfg, result)
    if not args.json:
        _print_extract_report(result)
    return result


def _print_extract_report(r: dict[str, Any]) -> None:
    if r.get("dry_run"):
        print(f"dry run for KEY {r['key']} in {r['store']}: {r['videos_total']} videos; would compute "
              f"{r['to_compute']} ({r['to_complete']} to complete), reuse {r['reused']} "
              f"({r['frames_reused']} frames), skip {len(r['quarantined'])} quarantined, {len(r['unreadable'])} unreadable, "
              f"{r['duplicates']} duplicates")
        return
    print(f"KEY {r['key']} (snapshot {r['version']}) in {r['store']}")
    print(f"  videos: {r['videos_ok']} ok ({r['videos_reused']} reused), {r['videos_failed']} failed"
          + (f" {r['failures_by_reason']}" if r["failures_by_reason"] else ""))
    print(f"  frames: {r['frames_computed']} computed, {r['frames_reused']} reused; samples {r['samples']} "
          f"({r['samples_written']} new); shards {r['shards']} ({r['shards_written']} new, "
          f"{r['bytes_written'] / 1e6:.1f} MB)")
    steady = f", {r['steady_frames_per_s']:.1f} steady" if r.get("steady_frames_per_s") else ""
    where = {"local": "in this process", "ray": "on Ray"}.get(r.get("executor", ""), "")
    print(f"  wall {r['wall_s']:.1f} s {where}, {r['frames_per_s'] or 0:.1f} frames/s end to end{steady}; "
          "per stage (busy): "
          + ", ".join(f"{k} {v:.1f} frames/s" for k, v in r["stage_frames_per_s"].items()))


def _record_alias(cfg: Any, result: dict[str, Any]) -> None:
    """Settings -> KEY, for `train --features` on a pod that must not load the teacher (see features_config)."""
    from feature_store.features_config import alias_name, alias_request, record_alias
    from feature_store.store import FeatureStore

    request = alias_request(cfg.teacher, cfg.sampling, cfg.storage, cfg.size)
    if request is None or result.get("dry_run") or not result.get("key"):
        return
    record_alias(FeatureStore(cfg.store, cfg.storage_options), request, result["key"])
    result["alias"] = alias_name(request)


def _find_key(args: argparse.Namespace) -> str:
    """--key; or the KEY that the settings (--features file or flags) name: through the alias extraction
    recorded when there is one, else by loading the teacher to fingerprint it."""
    from feature_store.features_config import FeaturesConfigError, alias_name, alias_request, resolve_alias
    from feature_store.store import FeatureStore, KeyNotFound
    from feature_store.teacher import feature_spec_for

    if args.key:
        return args.key
    teacher, sampling, storage, size = key_settings(args, args.features)
    store = FeatureStore(args.store, args.storage_options)
    request = alias_request(teacher, sampling, storage, size)
    if request is not None:
        try:
            key = resolve_alias(store, request)
        except (FeaturesConfigError, KeyNotFound) as e:
            raise CliError(str(e)) from e
        if key is not None:
            return key
        _err(f"no alias {alias_name(request)} in {args.store}: loading {teacher.model} to fingerprint it")
    why = ("no alias for these settings either (extraction records one for hub teachers pinned to a commit)"
           if request is not None else "aliases are kept only for hub teachers pinned to a commit")
    try:
        spec = feature_spec_for(teacher, sampling, storage, size=size)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load {teacher.model} to find its KEY ({type(e).__name__}: {e}); {why}") from e
    if store.has_key(spec.key):
        return spec.key
    run = f"--config {args.features}" if args.features else _flags_hint(args)
    raise CliError(f"no KEY in {args.store} matches these teacher and sampling settings (it would be {spec.key}; "
                   f"{why}); run: subsume extract --videos SRC --store {args.store} {run}")


def _flags_hint(args: argparse.Namespace) -> str:
    return f"--teacher {args.teacher} --segment-frames {args.segment_frames}" + (
        f" --fps {args.fps}" if args.fps else "") + (f" --stride {args.stride}" if args.stride else "")


# Flags that only serve to find the KEY, with their defaults: given with --key they change nothing.
KEY_LOOKUP_FLAGS = {"teacher": None, "revision": None, "output": "auto", "patch_grid": 0, "trust_remote_code": False,
                    "precision": "fp32", "size": None, "fps": None, "stride": None, "segment_frames": 16,
                    "overlap": 0, "max_frames": 0, "short": "pad", "frame_encoding": "jpeg",
                    "target_dtype": "float16"}


def _warn_train_flags(args: argparse.Namespace) -> None:
    if getattr(args, "deprecated_precision", None):
        _err("subsume train: --precision is deprecated (it is the TEACHER's precision, used to find the KEY): "
             "use --teacher-precision; the training precision is --set precision=bf16")
        args.precision = args.deprecated_precision
    if args.key:
        ignored = [f"--{'teacher-precision' if k == 'precision' else k.replace('_', '-')}"
                   for k, default in KEY_LOOKUP_FLAGS.items()
                   if getattr(args, k, default) != default]
        if ignored:
            _err(f"subsume train: {', '.join(ignored)} ignored: --key {args.key} already names the features "
                 "(these flags only serve to find a KEY)")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.store import KeyNotFound
    from training.config import load_config
    from training.train import run_train

    _warn_train_flags(args)
    overrides = list(args.set)
    for flag, field in (("steps", "steps"), ("workers", "workers"), ("targets", "targets"),
                        ("objective", "objective")):
        if getattr(args, flag) is not None:
            overrides.append(f"{field}={getattr(args, flag)}")
    if args.use_gpu:
        overrides.append("use_gpu=true")
    if args.report_to is not None:
        sinks = [x.strip() for x in args.report_to.split(",") if x.strip() and x.strip() != "none"]
        overrides.append(f"report_to=[{', '.join(sinks)}]")
    try:
        cfg = load_config(args.config, overrides)
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"config: {e}") from e
    key = _find_key(args)
    if cfg.workers > 1 or cfg.use_gpu:
        ensure_ray(args.ray_address)
    try:
        result = run_train(cfg, args.store, key, args.out, storage_options=args.storage_options,
                           storage_path=args.storage_path, log=(lambda m: None) if args.quiet else _err)
    except (KeyNotFound, ValueError) as e:
        raise CliError(str(e)) from e
    result.pop("loss_history", None)  # in OUT/metrics.jsonl; too long for a summary line
    return result


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.store import KeyNotFound
    from training.evaluate import evaluate

    try:
        result = evaluate(args.checkpoint, args.store, args.key, storage_options=args.storage_options, k=args.k,
                          heldout_fraction=args.heldout_fraction)
    except (KeyNotFound, ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from e
    from training.locate import save_eval

    result["eval_json"] = save_eval(result)
    if not args.json:
        print(format_eval(result))
    return result


def format_eval(r: dict[str, Any]) -> str:
    lines = [f"held-out samples: {r['n']} from {r['heldout_videos']} videos (bank: {r['n_train']} samples; "
             f"{r['key']} v{r['version']}, held-out fraction {r['heldout_fraction']})",
             f"{'label':<12} {'student':>8} {'random':>8} {'teacher':>8}   (kNN, k={r['k']}; linear probe below)"]
    for name, row in r["per_label"].items():
        lines.append(f"{name:<12} {row['student_knn']:>8.3f} {row['random_student_knn']:>8.3f} "
                     f"{row['teacher_knn']:>8.3f}   chance {row['chance']:.3f}")
        lines.append(f"{'':<12} {row['student_linear']:>8.3f} {row['random_student_linear']:>8.3f} "
                     f"{row['teacher_linear']:>8.3f}")
    return "\n".join(lines)


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from subsume.embed import run_embed

    try:
        return run_embed(args.checkpoint, args.videos, args.out, fps=args.fps, storage_options=args.storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e


def _store(args: argparse.Namespace):
    from feature_store.store import FeatureStore

    return FeatureStore(args.root, args.storage_options)


def cmd_store_ls(args: argparse.Namespace) -> dict[str, Any]:
    store = _store(args)
    rows = []
    for key in store.keys():
        snap = store.open(key)
        m = snap.manifest
        spec = snap.spec
        rows.append({"key": key, "teacher": spec.teacher.model, "version": snap.version,
                     "samples": m.get("counts", {}).get("samples", 0), "videos": m.get("counts", {}).get("videos", 0),
                     "segment_frames": spec.sampling.segment_frames,
                     "fps": spec.sampling.fps, "stride": spec.sampling.stride})
    if not args.json:
        if not rows:
            print(f"no KEYs in {args.root}")
        for r in rows:
            print(f"{r['key']}  {r['samples']:>7} samples {r['videos']:>6} videos  v{r['version']}  "
                  f"teacher={r['teacher']}  frames={r['segment_frames']} "
                  + (f"fps={r['fps']}" if r["fps"] else f"stride={r['stride']}"))
    return {"root": args.root, "keys": rows}


def cmd_store_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.maintenance import inspect
    with _missing_key_is_a_usage_error():
        info = inspect(_store(args), args.key)
    if not args.json:
        print(json.dumps(info, indent=2, default=str))
    return info


def cmd_store_verify(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.maintenance import verify
    with _missing_key_is_a_usage_error():
        if args.ray:
            import ray

            ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
        rep = verify(_store(args), args.key, args.version, sample=args.sample, on_ray=args.ray)
    out = {"key": rep.key, "version": rep.version, "ok": rep.ok, "shards_checked": rep.shards_checked,
           "samples_checked": rep.samples_checked, "problems": rep.problems, "notes": rep.notes}
    if not args.json:
        print(f"{rep.key} v{rep.version}: {rep.shards_checked} shards, {rep.samples_checked} samples checked, "
              f"{len(rep.problems)} problems")
        for p in rep.problems:
            print(f"  {p['kind']}: {p['where']}: {p['detail']}")
    if not rep.ok:
        out["_exit_code"] = 1
        out["error"] = f"{len(rep.problems)} problems in {rep.key} (first: {rep.problems[0]['kind']} at {rep.problems[0]['where']})"
    return out


def cmd_store_gc(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.maintenance import gc
    from feature_store.retention import Retention

    since = None
    if args.keep_since:
        import datetime as dt

        since = dt.datetime.fromisoformat(args.keep_since.replace("Z", "+00:00")).timestamp()
    rule = Retention(keep_last=args.keep_last, keep_since=since, keep=tuple(args.keep))
    with _missing_key_is_a_usage_error():
        out = gc(_store(args), grace=args.grace, delete_keys=args.delete_key, retention=rule)
    if not args.json:
        print(f"removed {out['count']} leftovers" + "".join(f"\n  {p}" for p in out["removed"]))
    return out


def cmd_store_failures(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.maintenance import failures_report
    with _missing_key_is_a_usage_error():
        rows = failures_report(_store(args), args.key)
    cols = ["source", "video_sha256", "stage", "error", "cause", "attempts", "last_attempt", "next_run", "why", "message"]
    if args.csv and not args.json:
        import csv
        import sys

        w = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    elif not args.json:
        print(f"{len(rows)} failed videos in {args.key}")
        for r in rows:
            print(f"  {r['source']}  {r['error']} ({r['cause']}, {r['attempts']} runs) -> {r['next_run']}: {r['why']}")
    return {"key": args.key, "failures": [{c: r.get(c) for c in cols} for r in rows]}


def cmd_store_runs(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.runs import list_runs
    with _missing_key_is_a_usage_error():
        runs = list_runs(_store(args), args.key)
    if not args.json:
        print(f"{len(runs)} runs in {args.key}")
        for r in runs:
            nodes = len([n for n in r.get("nodes", []) if n.get("alive")])
            print(f"  {r.get('run_id')}  ok={r.get('videos_ok')} failed={r.get('videos_failed')} "
                  f"frames={r.get('frames_computed')} versions={r.get('versions_committed')} nodes={nodes} "
                  f"failures={r.get('failures_by_reason')}")
    return {"key": args.key, "runs": runs}


def cmd_store_upgrade(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.upgrade import upgrade_format1

    try:
        out = upgrade_format1(_store(args), args.key)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    if not args.json:
        print(f"{args.key}: format 1 snapshot {out['from_snapshot']} -> format 2 version {out['version']} "
              f"({out['samples']} samples, {out['shards']} shards)")
    return out


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from subsume.demo import run_demo

    return run_demo(args.workdir, steps=args.steps, workers=args.workers, quiet_json=args.json)


def cmd_downstream(args: argparse.Namespace) -> dict[str, Any]:
    from feature_store.store import KeyNotFound
    from training.downstream import DownstreamError, downstream_config, run_downstream

    try:
        cfg = downstream_config(protocol=args.protocol, label=args.label, split_column=args.split_column,
                                clips_per_segment=args.clips_per_segment, epochs=args.epochs, lr=args.lr,
                                encoder_lr=args.encoder_lr, batch_size=args.batch_size, seed=args.seed,
                                device=args.device)
        result = run_downstream(args.checkpoint, args.key, cfg, root=args.store, storage_options=args.storage_options,
                                log=(lambda m: None) if args.quiet else _err)
    except (KeyNotFound, DownstreamError, FileNotFoundError) as e:
        raise CliError(str(e)) from e
    summary = result.summary
    if args.out:
        summary["predictions_csv"] = _write_downstream(args.out, result)
    if not args.json:
        print(format_downstream(summary))
    return summary


def _write_downstream(out: str, result: Any) -> str:
    """The JSON summary at OUT and the student's per-video test predictions beside it (CSV)."""
    import csv
    from collections import Counter

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    scores = result.scores["student"]
    classes = result.summary["class_names"]
    path = os.path.splitext(out)[0] + ".predictions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_sha256", "label", "prediction", "clips"])
        counts = Counter(scores.clip_videos)
        for v, y, logits in zip(scores.videos, scores.video_labels, scores.video_logits):
            w.writerow([v, classes[int(y)], classes[int(logits.argmax())], counts[v]])
    with open(out, "w") as f:
        json.dump({**result.summary, "predictions_csv": path}, f, indent=1)
    return path


def format_downstream(r: dict[str, Any]) -> str:
    s, t = r["student"], r["teacher_linear"]
    lines = [f"{r['protocol']} on {r['key']} v{r['version']}, label {r['label']!r}: {r['classes']} classes, "
             f"{r['train_samples']} train samples; test {r['test_clips']} clips of {r['test_videos']} videos",
             f"{'':<16} {'clip':>8} {'video':>8}",
             f"{'student':<16} {s['clip_accuracy']:>8.3f} {s['video_accuracy']:>8.3f}",
             f"{'teacher (linear)':<16} {t['clip_accuracy']:>8.3f} {t['video_accuracy']:>8.3f}",
             f"{'chance (video)':<16} {'':>8} {r['chance_video']:>8.3f}"]
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


def cmd_manifest(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from pipeline.manifests import ManifestError, holdout_manifest, official_manifest

    try:
        if args.manifest_command == "holdout":
            summary = holdout_manifest(args.manifest, args.test_fraction, args.out, stratify=args.stratify,
                                       seed=args.seed)
        else:
            summary = official_manifest(args.manifest_command, args.splits, args.videos, args.split, args.out,
                                        label_column=args.label)
    except (ManifestError, OSError) as e:
        raise CliError(str(e)) from e
    if summary.missing:
        _err(f"subsume manifest: {summary.missing} of {summary.videos} videos do not exist (first: "
             f"{summary.missing_examples[0]}); extraction will record them as missing")
    if not args.json:
        print(f"{summary.out}: {summary.videos} videos ({summary.train} train, {summary.test} test"
              + (f", {summary.classes} classes" if summary.classes else "")
              + (f"; {summary.left_out} in neither split left out" if summary.left_out else "") + ")")
    return asdict(summary)
