"""Experiment trackers (log.backend: wandb | mlflow | tensorboard | none) on a tiny training run, with
fake wandb / mlflow modules injected through sys.modules (neither package is installed here)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from memsurgery.errors import InputError, RuntimeFailure
from tests.train_assets import tiny_recipe

pytestmark = pytest.mark.usefixtures("train_cache")


def _fake_wandb(calls):
    mod = types.ModuleType("wandb")

    class Run:
        def __init__(self, **kw):
            calls.append(("init", kw))
            self.config = types.SimpleNamespace(update=lambda cfg, **kw: calls.append(("config", cfg)))

        def log(self, metrics, step):
            calls.append(("log", step, dict(metrics)))

        def finish(self):
            calls.append(("finish",))

    mod.init = lambda **kw: Run(**kw)
    return mod


def _fake_mlflow(calls):
    mod = types.ModuleType("mlflow")
    mod.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    mod.set_experiment = lambda name: calls.append(("experiment", name))
    mod.start_run = lambda run_name=None: calls.append(("start", run_name)) or object()
    mod.log_params = lambda params: calls.append(("params", dict(params)))
    mod.log_metrics = lambda metrics, step: calls.append(("log", step, dict(metrics)))
    mod.end_run = lambda: calls.append(("end",))
    return mod


def _steps_logged(calls):
    return {c[1]: c[2] for c in calls if c[0] == "log" and "loss" in c[2]}


def test_wandb_gets_every_step_the_recipe_and_a_finish(assets, tmp_path, monkeypatch):
    from memsurgery.train import run

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    rec = tiny_recipe(assets, tmp_path / "run", **{"log.backend": "wandb", "log.project": "p1", "log.every": 1})
    summary = run(rec, log=lambda m: None)
    assert calls[0] == ("init", {"project": "p1", "name": "run", "dir": str(tmp_path / "run")})
    assert calls[1][0] == "config" and calls[1][1]["log"]["backend"] == "wandb"
    steps = _steps_logged(calls)
    assert sorted(steps) == [1, 2, 3, 4]
    assert [steps[s]["loss"] for s in sorted(steps)] == summary["losses"]
    assert "lrs/values" in steps[1] and "step" not in steps[1]  # nested dicts flattened, the step is the axis
    assert calls[-1] == ("finish",)
    # the same numbers as metrics.jsonl
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if "loss" in r] == summary["losses"]


def test_mlflow_gets_params_and_metrics(assets, tmp_path, monkeypatch):
    from memsurgery.train import run

    calls = []
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(calls))
    rec = tiny_recipe(assets, tmp_path / "r2", **{"log.backend": "mlflow", "log.tracking_uri": "file:///tmp/ml",
                                                  "log.run_name": "tiny"})
    summary = run(rec, log=lambda m: None)
    assert calls[:3] == [("uri", "file:///tmp/ml"), ("experiment", "memsurgery"), ("start", "tiny")]
    params = next(c[1] for c in calls if c[0] == "params")
    assert params["train/method"] == "memory" and params["train/steps"] == "4"
    assert sorted(_steps_logged(calls)) == [1, 2, 3, 4] and calls[-1] == ("end",)
    assert summary["steps"] == 4


def test_a_missing_package_warns_and_training_goes_on(assets, tmp_path, monkeypatch):
    from memsurgery.train import run

    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    said = []
    summary = run(tiny_recipe(assets, tmp_path / "r3", **{"log.backend": "wandb"}), log=said.append)
    assert summary["steps"] == 4 and (tmp_path / "r3" / "metrics.jsonl").is_file()
    warning = [m for m in said if "wandb" in str(m)]
    assert len(warning) == 1 and "pip install wandb" in str(warning[0])


def test_bad_backend_and_a_tracker_that_cannot_start(assets, tmp_path, monkeypatch):
    from memsurgery.train import run

    with pytest.raises(InputError, match="log.backend"):
        run(tiny_recipe(assets, tmp_path / "r4", **{"log.backend": "comet"}), log=lambda m: None)
    broken = types.ModuleType("wandb")

    def init(**kw):
        raise PermissionError("api key missing")

    broken.init = init
    monkeypatch.setitem(sys.modules, "wandb", broken)
    with pytest.raises(RuntimeFailure, match="log.backend wandb: could not start a run"):
        run(tiny_recipe(assets, tmp_path / "r5", **{"log.backend": "wandb"}), log=lambda m: None)
