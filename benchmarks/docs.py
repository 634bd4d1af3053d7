"""docs/benchmarks.md: a fixed introduction, then one section per (machine, preset), each replaced only by a
run on that same machine with that same preset, so a CPU run never overwrites figures recorded on a GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from benchmarks.machine import MachineInfo
from benchmarks.report import BenchResult, markdown_table, results_json

DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

_BEGIN = "<!-- benchmark-section: {} -->"
_END = "<!-- /benchmark-section: {} -->"
_SECTION = re.compile(r"<!-- benchmark-section: (?P<id>[A-Za-z0-9_.-]+) -->\n(?P<body>.*?)"
                      r"<!-- /benchmark-section: (?P=id) -->\n?", re.S)

INTRO = """\
# Benchmarks

`make bench` (that is, `python -m benchmarks`) measures the claims this project rests on, each as a ratio of
two figures measured side by side in one run, and compares it with a target. `--json` prints one object
keyed by benchmark name as the last stdout line; `--preset gpu` runs the benchmarks that need no Ray and no
decord, at realistic sizes; `--set FIELD=VALUE` changes one size (see `benchmarks/config.py`).

| benchmark | ratio (value) | target |
|---|---|---|
| `cached_vs_online` | measured speed-up of training on cached targets over the teacher in the loop, divided by the ideal speed-up (teacher forward + student step) / student step, both measured alone per sample; the smaller of the two teachers' ratios | >= 0.9 |
| `extraction` | `subsume extract` frames/s over the 96-video set, run from a fresh shell as a user runs it (a fresh process timed from start to exit: interpreter, imports, planning, model load, commits; `--executor auto` picks where it runs: in process for this set, `pipeline/local.py`), over a plain decode-teacher-write loop script run the same way (a fresh process, torch's default threads) over the same videos, median of `repeats` interleaved runs each (CPU); beside it, in one warm process, the in-process executor and the Ray pipeline (its start included) over the loop (the faster of one torch thread and all cores), and the Ray pipeline's steady-state ratio over the teacher stage's working window; over the bound of the slowest stage measured alone (GPU, where the pipeline runs) | >= 1 (CPU), >= 0.85 (GPU) |
| `loader` | samples/s the training DataLoader (default loader workers, frames stored at 224 px) delivers alone over samples/s the student step consumes at 224 px; also the training loop's data-wait fraction | >= 3 |
| `reuse` | wall time of a second extraction over the same videos over the first | <= 0.1 |
| `storage` | mean centred cosine of float16 targets against the float32 teacher output (the lowest over teachers and the store's own record) | >= 0.9999 |
| `scaling` | peak RSS of all the job's processes (driver, Ray, workers, decoder children) at the largest video count over the 1x count | <= 1.2 |
| `store_scale` | median time of a real 512-row store commit on a KEY of 10^6 samples over one of 10^4 (the worse of local disk and S3 on moto); also the committing process's peak RSS ratio (<= 1.3), opening the 10^6 KEY and planning 10^4 new videos against it | <= 1.5 |
| `decode_memory` | peak RSS of the decode stage on a long generated video (20 min) over a 1-minute one, each in a fresh process: the larger of the parent's (the decode actor's) and the decoder child's ratio; a whole-video decode is reported beside it | <= 1.5 |
| `multinode` | wall time of `subsume extract` (the 1x set) on a simulated cluster (0-CPU head, two 1-CPU worker raylets) that loses a worker node right after the run's first commit and gets a fresh one, over the same run undisturbed; where each stage ran and whether every sample is unique are reported beside it | <= 1.5 |
| `ingest_scale` | peak RSS of the extraction driver (a fresh process; `extract --dry-run` and a real run, on a separate Ray cluster) over a corpus of 10^5 real files against one of 10^4, each planned against a KEY that already holds all but a few of them (the real run computes only those); planning wall time (listing, joins, plan) beside it | <= 1.3 |

End-to-end figures (`e2e_*`, `wall_s`) include start-up (Ray, model loads); per-stage figures exclude it.
Teachers are random-weight `CLIPVisionModelWithProjection` models of the named shape (nothing is
downloaded); frames for the step and teacher measurements are synthetic (smooth random colour fields), videos
are the demo's generated H.264 files. Student-step costs are medians over steps, the three modes interleaved
step by step. The CPU preset runs torch on one thread in the benchmark process, as Ray Train's CPU workers
and the pipeline's actors do (one CPU each); the plain extraction loop runs on one thread and on all cores,
`repeats` times each (median), and the faster one is the baseline. The load average at the start and the end of a run is recorded: other
work on the machine moves every figure (a multi-threaded torch process that competes for the cores slows down
far more than a single-threaded one).
"""


def section_id(info: MachineInfo, preset: str) -> str:
    return f"{info.machine_id}-{preset}"


def split_sections(text: str) -> dict[str, str]:
    """Section id -> full section text (markers included), in file order."""
    return {m.group("id"): m.group(0) for m in _SECTION.finditer(text)}


def wrap_section(sid: str, body: str) -> str:
    return f"{_BEGIN.format(sid)}\n{body.rstrip()}\n{_END.format(sid)}\n"


def merge_section(existing: str, sid: str, body: str, intro: str = INTRO) -> str:
    """The document with section `sid` replaced (or appended) and every other section kept verbatim."""
    sections = split_sections(existing)
    sections[sid] = wrap_section(sid, body)
    return intro.rstrip() + "\n\n" + "\n".join(s.rstrip() + "\n" for s in sections.values())


def render_section(info: MachineInfo, preset: str, results: Iterable[BenchResult], *, when: str,
                   command: str, load_avg: tuple[float, float] | None, config: dict[str, Any],
                   wall_s: float) -> str:
    results = list(results)
    lines = [f"## {info.label}: preset `{preset}`", "",
             f"Machine `{info.machine_id}`: {info.cpu_model}; {info.cores} cores; {info.ram_gib} GiB RAM; "
             f"GPU: {info.gpu}; torch {info.torch}, transformers {info.transformers}, Python {info.python}.",
             f"Run {when} with `{command}`, {wall_s:.0f} s in all"
             + (f"; load average (1 min) {load_avg[0]:.2f} at the start, {load_avg[1]:.2f} at the end "
                f"(more than the core count means other work competed for the CPUs)." if load_avg else "."), "",
             markdown_table(results), ""]
    for r in results:
        for note in r.notes:
            lines.append(f"- `{r.name}`: {note}")
    if any(r.notes for r in results):
        lines.append("")
    lines += ["<details><summary>All figures (the --json object) and the sizes used</summary>", "",
              "```json", _json_one_line_per_key(results_json(results)), "```", "",
              "```json", json.dumps(config, indent=None), "```", "", "</details>"]
    return "\n".join(lines)


def _json_one_line_per_key(obj: dict[str, Any]) -> str:
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}"


def write_section(path: Path, sid: str, body: str) -> None:
    existing = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(merge_section(existing, sid, body))
    tmp.replace(path)
