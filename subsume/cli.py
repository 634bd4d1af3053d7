"""The `subsume` command line: extract, train, eval, embed, store, demo, downstream, manifest.

Every subcommand takes --json: its last stdout line is then one JSON object summarising the result.
Exit code 0 on success; otherwise non-zero with a one-line reason on stderr. Heavy imports (Ray, torch,
transformers) happen inside the handlers so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable


class CliError(Exception):
    """An error whose message is the one line the user sees."""


def _storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs → fsspec storage options; values are parsed as JSON where they can be."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CliError(f"--storage-option expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", default=[],
                   help="fsspec storage option for the store (repeatable), e.g. endpoint_url=http://host:9000; "
                        "S3 endpoint and credentials otherwise come from the standard AWS environment")


def _add_feature_flags(p: argparse.ArgumentParser, *, for_lookup: bool = False, for_train: bool = False) -> None:
    """Flags that define a feature KEY (teacher, preprocessing, sampling, storage). `for_lookup`: --teacher may
    come from a KEY file instead; `for_train`: the teacher's precision is spelled --teacher-precision."""
    g = p.add_argument_group("teacher and sampling (these define the KEY)")
    g.add_argument("--teacher", required=not for_lookup, metavar="MODEL",
                   help="Hugging Face model id (e.g. openai/clip-vit-base-patch16) or a local folder")
    g.add_argument("--revision", default=None, help="hub revision (commit, tag or branch) to pin the teacher to")
    g.add_argument("--output", default="auto",
                   help="teacher output used as the embedding: auto (the family's image embedding), "
                        "image_embeds, pooler, cls, cls+mean_patch (default: auto)")
    g.add_argument("--patch-grid", type=int, default=0, metavar="G",
                   help="also store the patch tokens pooled to a GxG grid per frame (0: off, default)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the teacher checkpoint to run its own code (off by default)")
    if for_train:  # named apart from the training precision (--set precision=bf16)
        g.add_argument("--teacher-precision", dest="precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="the teacher precision the KEY was extracted with (finds the KEY) (default fp32)")
        g.add_argument("--precision", dest="deprecated_precision", choices=["fp32", "bf16", "fp16"],
                       default=None, help=argparse.SUPPRESS)  # old spelling; warns
    else:
        g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="teacher compute precision (autocast on GPU; part of the KEY) (default fp32)")
    g.add_argument("--size", type=int, default=None,
                   help="teacher input size; default: the checkpoint's own preprocessor config")
    g.add_argument("--fps", type=float, default=None,
                   help="sample frames at this rate by timestamps (default 4 unless --stride is given)")
    g.add_argument("--stride", type=int, default=None, help="instead of --fps: take every N-th decoded frame")
    g.add_argument("--segment-frames", type=int, default=16, metavar="N",
                   help="frames per sample (segment) (default 16)")
    g.add_argument("--overlap", type=int, default=0, help="frames shared by consecutive segments (default 0)")
    g.add_argument("--max-frames", type=int, default=0, help="cap on sampled frames per video (0: none, default)")
    g.add_argument("--short", choices=["pad", "drop"], default="pad",
                   help="videos shorter than one segment: pad by repeating the last frame, or drop (default pad)")
    g.add_argument("--frame-encoding", choices=["jpeg", "png", "npy"], default="jpeg",
                   help="how stored frames are encoded (default jpeg; targets are computed on the decoded frames)")
    g.add_argument("--target-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of stored targets (default float16)")


def _add_decode_limits(p: argparse.ArgumentParser) -> None:
    """Caps per video (a video over one fails with the reason; 0 lifts the cap)."""
    lim = p.add_argument_group("limits per video (a video over one is recorded as failed with the reason; 0 lifts it)")
    lim.add_argument("--max-duration", type=float, default=3 * 3600.0, metavar="SECONDS",
                     help="longest video (default 10800, 3 hours): too_long")
    lim.add_argument("--max-video-frames", type=int, default=648_000, metavar="N",
                     help="most frames in a video (default 648000, 3 hours at 60 fps): too_long")
    lim.add_argument("--max-file-size", type=float, default=16.0, metavar="GB",
                     help="largest file, in GiB (default 16): too_large")
    lim.add_argument("--max-aspect", type=float, default=4.0, metavar="RATIO",
                     help="longest side over shortest side of a frame (default 4): bad_aspect")


def _add_extract(sub) -> None:
    """`subsume extract`: decode, run the teacher once, write shards."""
    p = sub.add_parser("extract", help="decode videos, run the image teacher once, write shards to the store",
                       description="Decode videos, sample frames, run the image teacher in a Ray Data actor pool "
                                   "(or, for a small job with no cluster addressed, in this process: see "
                                   "--executor) and write per-frame embeddings with the frames to the feature "
                                   "store. Videos already in the KEY are reused, failed ones are recorded and "
                                   "retried.")
    p.add_argument("--videos", required=True, metavar="SRC",
                   help="a folder (searched recursively), a glob, or a manifest (.txt one path a line; .csv or "
                        ".parquet with a 'path' column, optional 'video_id', other columns are labels)")
    p.add_argument("--store", default=None, metavar="ROOT",
                   help="store root: a folder or an fsspec URL (s3://...); overrides the --config file's store")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="extraction config naming the KEY: teacher, revision, sampling, storage (see "
                        "configs/extract.yaml); the KEY flags below are then refused")
    _add_feature_flags(p, for_lookup=True)  # --teacher: required unless --config names it
    r = p.add_argument_group("run")
    r.add_argument("--max-failure-fraction", type=float, default=0.5,
                   help="exit non-zero when more than this fraction of the videos failed (default 0.5)")
    r.add_argument("--max-attempts", type=int, default=3,
                   help="runs that may retry a video failing for a transient cause (timeout, memory, I/O) before "
                        "it is skipped (default 3); deterministic failures of the same bytes are not retried")
    r.add_argument("--retry-failed", action="store_true",
                   help="retry every failed video once more, whatever the failure ledger says")
    r.add_argument("--decode-timeout", type=float, default=300.0,
                   help="seconds one video may take to decode before its decoder is killed (default 300)")
    _add_decode_limits(p)
    r.add_argument("--batch-size", type=int, default=64, help="frames per teacher forward pass (default 64)")
    r.add_argument("--teacher-actors", type=int, default=None,
                   help="teacher actor pool size (default: one per GPU; on CPU one single-threaded actor per core)")
    r.add_argument("--decode-concurrency", type=int, default=None,
                   help="largest decode actor pool (default: the CPUs left by the teacher on GPU, half the cores on CPU)")
    r.add_argument("--max-in-flight", type=int, default=2, metavar="N",
                   help="batches queued per decode/teacher actor: enough to hide latency, small enough that "
                        "decoded frames never pile up in memory (default 2)")
    r.add_argument("--object-store-memory", type=float, default=None, metavar="GB",
                   help="cap on Ray Data's object store use for this job (default: Ray's own limit)")
    r.add_argument("--samples-per-shard", type=int, default=64, help="samples per shard (default 64)")
    r.add_argument("--commit-every", type=int, default=8, metavar="SHARDS",
                   help="commit to the store after this many new shards (and every 30 s); a killed run "
                        "loses at most the shards since its last commit (default 8)")
    r.add_argument("--device", default="auto", help="teacher device: auto, cpu, cuda (default auto)")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    r.add_argument("--executor", choices=("auto", "ray", "local"), default="auto",
                   help="where the stages run: ray (a Ray Data pipeline on the cluster), local (this process, "
                        "no Ray: decode, teacher and writer threads) or auto (default): local for a work list of "
                        "at most 256 videos and 256 MiB when no cluster is addressed (--ray-address, "
                        "RAY_ADDRESS), since starting Ray costs more than such a job; else ray")
    r.add_argument("--dry-run", action="store_true", help="say what would be computed, reused and skipped")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_extract")

def _add_train(sub) -> None:
    """`subsume train`: a student on a KEY's cached targets."""
    p = sub.add_parser("train", help="train a video student on cached teacher targets (Ray Train)",
                       description="Train a video student against the cached targets of a KEY with Ray Train. "
                                   "Running again with the same --out resumes that run; a new --out starts anew.")
    p.add_argument("--store", required=True, metavar="ROOT", help="store root (folder or fsspec URL)")
    p.add_argument("--key", default=None,
                   help="feature KEY to train on; or give --features FILE (or --teacher and the sampling flags) to find it")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (metrics, checkpoints, exports)")
    p.add_argument("--config", default=None, metavar="YAML", help="run config file (see configs/)")
    p.add_argument("--features", default=None, metavar="YAML",
                   help="the extraction config (extract --config) whose KEY to train on; found through the "
                        "alias extraction recorded, without loading the teacher")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one config field, e.g. --set student.arch=vit (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the config)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (overrides the config)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--targets", choices=["cached", "online"], default=None,
                   help="cached (default): stored targets; online: run the KEY's teacher in the loop")
    p.add_argument("--objective", choices=["iboot", "byol"], default=None,
                   help="iboot (default): predict the image teacher; byol: video-only baseline, no teacher")
    p.add_argument("--report-to", default=None, metavar="SINKS",
                   help="metric sinks beside OUT/metrics.jsonl, comma-separated: tensorboard (default), wandb, "
                        "mlflow (the last two: pip install 'subsume[wandb]' / 'subsume[mlflow]'); 'none' for none")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (default: OUT/ray); may be s3://")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_feature_flags(p, for_lookup=True, for_train=True)
    _add_storage(p)
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_train")

def _add_eval(sub) -> None:
    """`subsume eval`: held-out accuracy of a checkpoint."""
    p = sub.add_parser("eval", help="kNN and linear-probe accuracy of a trained student on held-out samples",
                       description="Embed the held-out labelled samples of a KEY with the student and report kNN "
                                   "and linear-probe accuracy per label, beside the teacher's frame-averaged "
                                   "embeddings and a randomly initialised student.")
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="a checkpoint, or a run folder (its latest checkpoint); local, Ray Train layout or s3://. "
                        "It names its store, KEY snapshot and held-out fraction: nothing else is needed")
    p.add_argument("--store", default=None, metavar="ROOT", help="override the checkpoint's store (e.g. moved)")
    p.add_argument("--key", default=None, help="evaluate on another KEY (its latest snapshot) than the run's")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="override the run's held-out fraction (default: the one it trained with)")
    p.add_argument("--k", type=int, default=5, help="neighbours for kNN (default 5)")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_eval")

def _add_embed(sub) -> None:
    """`subsume embed`: clip embeddings of new videos."""
    p = sub.add_parser("embed", help="write a trained student's clip embeddings for videos to Parquet")
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="a checkpoint or a run folder (its latest checkpoint); local, Ray Train layout or s3://. "
                        "The sampling and preprocessing the student expects come with it: no store needed")
    p.add_argument("--videos", required=True, metavar="SRC", help="folder, glob or manifest, as for extract")
    p.add_argument("--out", required=True, metavar="FILE", help="output .parquet file")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default: the one the student was trained on)")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_embed")

def _add_store(sub) -> None:
    """`subsume store ...`: list, inspect, verify, clean."""
    p = sub.add_parser("store", help="list, inspect, verify and clean a feature store")
    ssub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    def store_action(name: str, help: str, with_key: bool) -> argparse.ArgumentParser:
        a = ssub.add_parser(name, help=help, description=help)
        a.add_argument("root", metavar="ROOT", help="store root: a folder or an fsspec URL (s3://...)")
        if with_key:
            a.add_argument("key", metavar="KEY", help="feature KEY (see `subsume store ls ROOT`)")
        _add_storage(a)
        _add_common(a)
        a.set_defaults(handler=f"subsume.commands:cmd_store_{name}")
        return a

    store_action("ls", "list KEYs with their teacher and sample counts", with_key=False)
    store_action("inspect", "teacher, settings, counts, size, failures and fidelity of a KEY", with_key=True)
    v = store_action("verify", "re-read shards and check them against the index; exit non-zero on any damage",
                     with_key=True)
    v.add_argument("--sample", type=float, default=1.0, metavar="F", help="verify a random fraction F of the shards")
    v.add_argument("--version", type=int, default=None, help="version to verify (default: the latest)")
    v.add_argument("--ray", action="store_true", help="check the shards in Ray tasks (a large KEY; joins "
                                                     "RAY_ADDRESS's cluster or starts a local one)")
    f = store_action("failures", "failed videos of a KEY with reasons and what the next run does", with_key=True)
    f.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    store_action("runs", "the KEY's extraction runs: when, nodes, videos, failures by reason, versions committed",
                 with_key=True)
    store_action("upgrade", "convert a KEY written by store format 1 to format 2 (once)", with_key=True)
    s = store_action("gc", "remove leftovers of killed jobs and expired versions; optionally whole KEYs",
                     with_key=False)
    s.add_argument("--delete-key", action="append", default=[], metavar="KEY", help="also delete this KEY entirely")
    s.add_argument("--grace", type=float, default=3600.0,
                   help="seconds a leftover must be older than, on the storage's clock (default 3600; never less "
                        "than the 15-minute floor, far above the writers' 60 s heartbeat)")
    s.add_argument("--keep-last", type=int, default=None, metavar="N", help="retain the N latest versions")
    s.add_argument("--keep-since", default=None, metavar="TIME",
                   help="retain versions committed at or after TIME (ISO 8601, e.g. 2026-11-01T00:00:00Z)")
    s.add_argument("--keep", type=int, action="append", default=[], metavar="VERSION", help="retain this version")

def _add_demo(sub) -> None:
    """`subsume demo`: the whole path on generated data."""
    p = sub.add_parser("demo", help="generate sample videos and a demo teacher, then extract, train and eval",
                       description="The whole path on the embedded default: sample videos it generates, a small "
                                   "local teacher, a local store.")
    p.add_argument("--workdir", default="demo-work", help="folder for videos, teacher, store and run (default demo-work)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the demo config's)")
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_demo")

def _add_downstream(sub) -> None:
    """`subsume downstream`: linear probe or finetune on a labelled KEY with a train/test split."""
    p = sub.add_parser("downstream", help="linear probe or finetune of a trained student on a labelled, split KEY",
                       description="Train a linear probe (frozen student) or finetune the student with a linear "
                                   "head on the samples of KEY whose split label is 'train', and report clip-level "
                                   "and video-level (multi-clip: mean of a video's clip logits) accuracy on the "
                                   "'test' samples, beside the teacher's own embeddings under the same linear "
                                   "probe. Extract the labelled folder first from a manifest with a split column "
                                   "(see `subsume manifest`).")
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="a checkpoint or a run folder (its latest checkpoint); local, Ray Train layout or s3://")
    p.add_argument("--key", required=True, help="the KEY the labelled, split folder was extracted into")
    p.add_argument("--store", default=None, metavar="ROOT", help="store holding KEY (default: the checkpoint's)")
    p.add_argument("--label", default="action", help="label column holding the class (default action)")
    p.add_argument("--protocol", choices=["linear", "finetune"], default="linear",
                   help="linear: frozen student, logistic regression; finetune: student + head end to end "
                        "(default linear)")
    p.add_argument("--split-column", default="split", help="label column holding train/test (default split)")
    p.add_argument("--clips-per-segment", type=int, default=2, metavar="N",
                   help="evenly spaced clips per stored segment for testing (and linear training) (default 2)")
    p.add_argument("--epochs", type=int, default=10, help="finetune epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="finetune: the head's learning rate (default 1e-3)")
    p.add_argument("--encoder-lr", type=float, default=1e-4,
                   help="finetune: the student's learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's init and the finetune order (default 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="(default cpu)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the JSON result and per-video test predictions (FILE and FILE's stem + "
                        "'.predictions.csv')")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(handler="subsume.commands:cmd_downstream")


def _add_manifest(sub) -> None:
    """`subsume manifest ...`: a labelled manifest with a train/test split column."""
    p = sub.add_parser("manifest", help="write a labelled manifest with a train/test split column",
                       description="Write the CSV manifest `subsume extract --videos` reads, with a class label "
                                   "and a 'split' column (train/test): from UCF101's or HMDB51's official split "
                                   "files, or by holding out a fraction of an existing manifest.")
    msub = p.add_subparsers(dest="manifest_command", required=True, metavar="SOURCE")
    for name, files in (("ucf101", "the ucfTrainTestlist folder (classInd.txt, trainlist0N.txt, testlist0N.txt)"),
                        ("hmdb51", "the testTrainMulti_7030_splits folder (<class>_test_split<N>.txt)")):
        a = msub.add_parser(name, help=f"{name.upper()} official split N", description=f"{name.upper()}: "
                            f"official split N from {files}; videos at VIDEOS/<class>/<file>.avi.")
        a.add_argument("--splits", required=True, metavar="DIR", help=files)
        a.add_argument("--videos", required=True, metavar="DIR",
                       help="the folder holding one subfolder per class (a local folder or an fsspec URL)")
        a.add_argument("--split", type=int, default=1, choices=[1, 2, 3], help="official split (default 1)")
        a.add_argument("--label", default="action", help="name of the class column (default action)")
        a.add_argument("--out", required=True, metavar="FILE.csv", help="manifest to write")
        _add_common(a)
        a.set_defaults(handler="subsume.commands:cmd_manifest")
    h = msub.add_parser("holdout", help="add a deterministic train/test split to an existing CSV manifest",
                        description="Copy a CSV manifest with a 'split' column added: per class of --stratify (or "
                                    "over all videos) a fraction of the videos, chosen by a hash of their video_id, "
                                    "goes to test. Relative paths are made absolute.")
    h.add_argument("--manifest", required=True, metavar="FILE.csv", help="the manifest to split (e.g. the demo's)")
    h.add_argument("--test-fraction", type=float, default=0.3, help="fraction of videos for test (default 0.3)")
    h.add_argument("--stratify", default=None, metavar="LABEL", help="keep this label's class balance in both splits")
    h.add_argument("--seed", type=int, default=0, help="another seed gives another split (default 0)")
    h.add_argument("--out", required=True, metavar="FILE.csv", help="manifest to write")
    _add_common(h)
    h.set_defaults(handler="subsume.commands:cmd_manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subsume",
        description="Teach video encoders from strong image models: run the image teacher once over your "
                    "videos into a feature store, then train video students against the cached targets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_embed(sub)
    _add_store(sub)
    _add_demo(sub)
    _add_downstream(sub)
    _add_manifest(sub)
    return parser


def _resolve(handler: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    import importlib

    module, name = handler.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.storage_options = _storage_options(getattr(args, "storage_option", None))
        result = _resolve(args.handler)(args)
    except CliError as e:
        print(f"subsume {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"subsume {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected error: one line, the traceback only on request
        if os.environ.get("SUBSUME_DEBUG"):
            raise
        print(f"subsume {args.command}: {type(e).__name__}: {e} (set SUBSUME_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    exit_code = int(result.pop("_exit_code", 0)) if isinstance(result, dict) else 0
    _stop_log_forwarding()
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result, default=str))
    if exit_code:
        print(f"subsume {args.command}: {result.get('error', 'failed')}", file=sys.stderr)
    return exit_code


def _stop_log_forwarding() -> None:
    """Disconnect from Ray before the summary: its workers' output reaches the driver asynchronously (a restarted
    worker group's lines can land seconds later) and must not follow the --json line on stdout."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
