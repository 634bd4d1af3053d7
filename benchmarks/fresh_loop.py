"""The plain decode-teacher-write loop (`benchmarks.extraction.plain_loop`) in a fresh process, as a user's
own script would run: `python -m benchmarks.fresh_loop CONFIG_JSON WORKDIR MANIFEST STORE` prints the loop's
figures as one JSON line. The extraction benchmark times the whole process from outside (interpreter start,
imports, model load, the loop, exit), as it times `subsume extract`. Torch keeps its default threads."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from benchmarks.config import BenchConfig
    from benchmarks.extraction import plain_loop
    from benchmarks.session import BenchSession

    config, workdir, manifest, store = argv if argv is not None else sys.argv[1:]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config).items()}
    session = BenchSession(BenchConfig(**values), Path(workdir), log=lambda m: None)
    print(json.dumps(plain_loop(session, manifest, store)))


if __name__ == "__main__":
    main()
