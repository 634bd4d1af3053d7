"""Training callbacks used by tests (TrainConfig.callbacks = ["tests.train_hooks:..."]): kept out of the
product code, plugged in through the same seam a user's callback would use."""

from __future__ import annotations

import os

from training.callbacks import TrainCallback


class CrashOnce(TrainCallback):
    """Rank 0's process dies (os._exit: no exception, no cleanup) right after the checkpoint of `step` was
    reported, once per run folder (a marker file there says it happened)."""

    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(self, step: int, env) -> None:
        if step != self.step or env.rank != 0 or not env.out_dir:
            return
        marker = os.path.join(env.out_dir, ".test-crash-done")
        if not os.path.exists(marker):
            _wait_until_registered()
            open(marker, "w").close()
            os._exit(1)


def _wait_until_registered() -> None:
    """Under Ray Train, a report returns before the controller has registered its checkpoint; dying at once
    would lose it and the restart would begin from scratch (and still end with the same weights, proving
    nothing about resume). Wait for the registration, so the restart really resumes."""
    try:
        import ray.train

        ray.train.get_all_reported_checkpoints()
    except Exception:  # not in a Ray Train worker: the in-process runner has persisted it already
        pass


def crash_after_step_3() -> CrashOnce:
    return CrashOnce(3)


class Recorder(TrainCallback):
    """Watches a run driven by `training.loop.train_worker` with `WorkerEnv(prepare=rec.prepare,
    callbacks=[rec])`: keeps the module the loop trains, and copies its gradients (as the optimiser used
    them: after clipping) at the end of the steps named. Weights are read from `module` after the run."""

    def __init__(self, steps: tuple[int, ...] = (1,), weights_at: tuple[int, ...] = ()):
        self.steps, self.weight_steps = set(steps), set(weights_at)
        self.module = None
        self.grads: dict[int, dict[str, "torch.Tensor"]] = {}
        self.weights_at: dict[int, dict[str, "torch.Tensor"]] = {}  # copies at the end of the steps named
        self.initial: dict[str, "torch.Tensor"] = {}

    def prepare(self, module):
        self.module = module
        self.initial = self.weights()
        return module

    def on_step_end(self, step: int, env) -> None:
        if step in self.steps:
            self.grads[step] = {n: p.grad.detach().clone() for n, p in self.module.named_parameters()
                                if p.grad is not None}
        if step in self.weight_steps:
            self.weights_at[step] = self.weights()

    def weights(self) -> dict[str, "torch.Tensor"]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}
