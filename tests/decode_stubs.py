"""Stand-in decoders for DecoderProcess tests, importable by its spawned child (a decode_fn must be).

`decoder="sleep:<s>"` sleeps first, `decoder="crash"` kills the child, anything else decodes normally.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline.decode import iter_decode


def stand_in(source: str, sampling: Any, *, decoder: str = "auto", **kwargs: Any):
    if decoder.startswith("sleep:"):
        time.sleep(float(decoder.split(":", 1)[1]))
        decoder = "auto"
    elif decoder == "crash":
        os._exit(70)
    return iter_decode(source, sampling, decoder=decoder, **kwargs)


def crash_after_first_chunk(source: str, sampling: Any, **kwargs: Any):
    for i, event in enumerate(iter_decode(source, sampling, **kwargs)):
        yield event
        if i >= 1:  # the plan, then one chunk
            os._exit(71)


def by_name(source: str, sampling: Any, **kwargs: Any):
    """A file named crash* kills the child after the first chunk; one named slow* hangs after it."""
    name = os.path.basename(source)
    for i, event in enumerate(iter_decode(source, sampling, **kwargs)):
        yield event
        if i >= 1 and name.startswith("crash"):
            os._exit(72)
        if i >= 1 and name.startswith("slow"):
            time.sleep(600)
