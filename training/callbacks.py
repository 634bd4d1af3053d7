"""Training callbacks: code a run plugs into every worker's loop without editing it.

`TrainConfig.callbacks` lists import paths ("package.module:factory"); each worker imports them and calls
the factory with no arguments to get an object with any of the `TrainCallback` methods. Uses: custom
logging, early stopping by raising, and (in tests/train_hooks.py) simulating a worker that dies.
"""

from __future__ import annotations

import importlib
from typing import Any


class TrainCallback:
    """Override what you need; every method is called on every rank."""

    def on_step_end(self, step: int, env: Any) -> None:
        pass

    def on_checkpoint(self, step: int, env: Any) -> None:
        """After the checkpoint of `step` was reported (and, under Ray Train, persisted)."""


def load_callbacks(paths: list[str]) -> list[TrainCallback]:
    out = []
    for path in paths:
        module, sep, name = path.partition(":")
        if not sep:
            raise ValueError(f"callback {path!r} is not 'package.module:factory'")
        out.append(getattr(importlib.import_module(module), name)())
    return out
