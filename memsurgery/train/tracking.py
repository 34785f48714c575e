"""Experiment trackers for training metrics, beside metrics.jsonl (which is always written).

One small interface, one class per backend, chosen by the recipe's `log.backend`:

    tensorboard   TensorBoard event files in run_dir/tensorboard/ (torch.utils.tensorboard)
    wandb         a Weights & Biases run (project `log.project`, name `log.run_name`), offline
                  when WANDB_MODE=offline
    mlflow        an MLflow run (experiment `log.project`, tracking URI `log.tracking_uri` or
                  MLFLOW_TRACKING_URI, else ./mlruns)
    none          metrics.jsonl only

The packages are optional and not dependencies of memsurgery: a backend whose package is
missing is skipped with one warning naming what to install, and training goes on.

    logger = build_logger(recipe, run_dir, log)
    logger.log_config(recipe_dict)
    logger.log_dict({"loss": 1.2, "lr": 3e-4}, step=10)
    logger.close()
"""

from __future__ import annotations

import math
from pathlib import Path

BACKENDS = ("none", "tensorboard", "wandb", "mlflow")
_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class MetricLogger:
    """What the training loop calls: scalars per step, the resolved recipe once, close at the end."""

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        """The resolved recipe, once at the start (backends without a config store ignore it)."""

    def close(self) -> None:
        """Flush and finish the run."""


class TensorBoardLogger(MetricLogger):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_dict(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_config(self, config):
        import yaml

        self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def close(self):
        self.writer.close()


class WandBLogger(MetricLogger):
    def __init__(self, run_dir: Path, project: str | None, run_name: str | None):
        import wandb

        self.run = wandb.init(project=project or "memsurgery", name=run_name or run_dir.name, dir=str(run_dir))

    def log_dict(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish()


class MLflowLogger(MetricLogger):
    def __init__(self, run_dir: Path, project: str | None, run_name: str | None, tracking_uri: str | None):
        import mlflow

        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(project or "memsurgery")
        self.run = mlflow.start_run(run_name=run_name or run_dir.name)

    def log_dict(self, metrics, step):
        self.mlflow.log_metrics(metrics, step=step)

    def log_config(self, config):
        # MLflow params are flat strings of <= 6000 characters
        self.mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})

    def close(self):
        self.mlflow.end_run()


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim/lr": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def scalars(rec: dict) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record (nested dicts flattened), without the step."""
    out = {}
    for k, v in flatten(rec).items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def build_logger(backend: str, run_dir: Path, *, project: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, log=lambda msg: None) -> MetricLogger | None:
    """The logger for `backend`, or None (backend none, or its package missing: warned once)."""
    if backend == "none":
        return None
    try:
        if backend == "tensorboard":
            return TensorBoardLogger(run_dir / "tensorboard")
        if backend == "wandb":
            return WandBLogger(run_dir, project, run_name)
        if backend == "mlflow":
            return MLflowLogger(run_dir, project, run_name, tracking_uri)
    except ImportError:
        log(f"warning: log.backend is {backend} but {_INSTALL[backend]} is not installed "
            f"(pip install {_INSTALL[backend]}); logging to metrics.jsonl only")
        return None
    except Exception as err:  # noqa: BLE001 - a tracker that cannot start: say so before training
        from memsurgery.errors import RuntimeFailure, one_line

        raise RuntimeFailure(f"log.backend {backend}: could not start a run ({type(err).__name__}: "
                             f"{one_line(str(err))[:200]}); fix its setup (login, tracking URI, WANDB_MODE=offline) "
                             "or set log.backend: none") from None
    raise ValueError(f"log.backend {backend!r}: choose {', '.join(BACKENDS)}")
