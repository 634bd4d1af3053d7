"""Where rank 0's metrics go: OUT/metrics.jsonl always, plus the sinks named in `report_to`
(TensorBoard, Weights & Biases, MLflow; the last two are optional extras: pip install 'subsume[wandb]')."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # sink -> module it imports


def missing_sinks(names: list[str]) -> list[str]:
    """Sinks whose library is not installed (checked on the driver, before any worker starts)."""
    return [n for n in names if importlib.util.find_spec(EXTRAS[n]) is None]


class TensorBoardSink:
    def __init__(self, out_dir: str, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per training run (id = the run name, so a resumed run continues the same curves)."""

    def __init__(self, out_dir: str, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "subsume"), id=run_name, name=run_name,
                              resume="allow", dir=out_dir, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run (tracking URI from MLFLOW_TRACKING_URI, else ./mlruns) tagged with the run name."""

    def __init__(self, out_dir: str, run_name: str, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "subsume"))
        self.run = mlflow.start_run(run_name=run_name, tags={"subsume.run_name": run_name})
        flat = {f"{s}.{k}": v for s, sec in config.items() if isinstance(sec, dict) for k, v in sec.items()}
        flat.update({k: v for k, v in config.items() if not isinstance(v, dict)})
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


class MetricsWriter:
    """Appends one JSON line per logged step and forwards the numbers to the configured sinks."""

    def __init__(self, out_dir: str, sinks: list[str], run_name: str, config: dict[str, Any]):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.sinks = [SINKS[name](out_dir, run_name, config) for name in sinks]

    def write(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for sink in self.sinks:
            sink.log(numbers, metrics["step"])

    def close(self) -> None:
        self.file.close()
        for sink in self.sinks:
            sink.close()
