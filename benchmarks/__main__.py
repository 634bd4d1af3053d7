"""`python -m benchmarks [--preset cpu|gpu] [--json] [--only NAME,...] [--set FIELD=VALUE ...]`

Prints a table (stdout), progress (stderr), and with --json one object keyed by benchmark name as the last
stdout line. A full run of a preset records its figures in docs/benchmarks.md, in the section of this machine
and preset; runs with --only or --set write there only when --docs names a file.
Exit status: 0; 1 if a benchmark failed to run; 2 for bad arguments, or with --strict if a target was missed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.config import BENCHMARKS, DEFAULT_BENCHMARKS, RAY_FREE_BENCHMARKS, make_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: everything, small (a few minutes on 2 cores); gpu: realistic sizes, only what needs "
                        f"no Ray and no decord ({', '.join(RAY_FREE_BENCHMARKS)})")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one size of the preset (fields of benchmarks.config.BenchConfig)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--docs", default="", help="write this machine's section into this file (default: "
                                                "docs/benchmarks.md after a full run of a preset)")
    p.add_argument("--no-docs", action="store_true", help="write no docs")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_free = args.preset == "gpu"
    if ray_free:  # before anything can import them: the preset must run where they are missing
        from benchmarks.runner import block_imports

        block_imports()
    from benchmarks.docs import DOCS_PATH, render_section, section_id, write_section
    from benchmarks.machine import machine_info
    from benchmarks.report import format_table, json_line
    from benchmarks.runner import check_selection, run_benchmarks

    default_only = RAY_FREE_BENCHMARKS if ray_free else DEFAULT_BENCHMARKS
    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) or default_only
    try:
        cfg = make_config(args.preset, args.set)
        check_selection(only, ray_free)
    except ValueError as e:
        print(f"python -m benchmarks: {e}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="subsume-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started, t0 = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    log(f"preset {args.preset}, benchmarks {', '.join(only)}, scratch {workdir}")
    try:
        results = run_benchmarks(cfg, only, workdir, ray_free=ray_free, log=log)
    finally:
        if not args.workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    load_avg = (load_start, os.getloadavg()[0]) if load_start is not None else None

    print(format_table(results), flush=True)
    failed = any("error" in r.figures for r in results)
    full_run = only == default_only and not args.set and not failed  # a partial table must not replace a full one
    if not args.no_docs and (args.docs or full_run):
        info = machine_info()
        command = "python -m benchmarks" + (f" --preset {args.preset}" if args.preset != "cpu" else "") + "".join(
            f" --set {s}" for s in args.set) + (f" --only {args.only}" if args.only else "")
        body = render_section(info, args.preset, results, when=started.strftime("%Y-%m-%d %H:%M UTC"),
                              command=command, load_avg=load_avg, config=cfg.to_dict(), wall_s=wall)
        path = Path(args.docs) if args.docs else DOCS_PATH
        sid = section_id(info, args.preset) + ("" if only == default_only else "-" + "+".join(only))
        write_section(path, sid, body)  # a partial run gets a section of its own beside the full one
        log(f"recorded in {path} (machine {info.machine_id}: {info.label})")
    if args.json:
        print(json_line(results), flush=True)
    if failed:
        return 1
    if args.strict and any(r.met is False for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
