"""`probe --lm-eval-tasks`: lm-evaluation-harness tasks on the probed model, in the same process.

The loaded model object is handed to lm-eval's HFLM (no second load, no remote code), so a
grafted model is evaluated with memsurgery's own classes. Tasks are lm-eval task names;
`include` adds a directory of local task YAMLs (offline machines: a local `dataset_path:
json` task, as tests/unit/test_probe_lm_eval.py writes one). Results go into the probe
report under `lm_eval` (per model), in lm-eval's own layout (`results`, `versions`,
`n-samples`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from memsurgery.errors import InputError, MissingDependency, RuntimeFailure, one_line


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """'hellaswag,arc_easy' (or a list of such) -> ['hellaswag', 'arc_easy']."""
    if not text:
        return []
    items = text if isinstance(text, (list, tuple)) else [text]
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


@contextmanager
def _quiet():
    """lm-eval logs every step at INFO: keep the terminal for the probe's own progress."""
    names = ("lm_eval", "lm-eval", "datasets", "evaluate")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def prepare(tasks, include: str | None = None, limit: int | None = None) -> dict | None:
    """Check the tasks before any model is loaded: {tasks, manager, limit}, or None without tasks."""
    tasks = parse_tasks(tasks)
    if not tasks:
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependency("--lm-eval-tasks needs lm-eval: pip install 'memsurgery[eval]'") from None
    if limit is not None and limit < 1:
        raise InputError(f"--lm-eval-limit {limit}: must be at least 1")
    with _quiet():
        manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"--lm-eval-tasks: unknown task(s) {', '.join(unknown)}; see lm_eval --tasks list, or "
                         "give a directory of task YAMLs with --lm-eval-include")
    return {"tasks": tasks, "manager": manager, "limit": limit}


def run_lm_eval(model, tokenizer, job: dict, *, batch_size: int = 8, log=lambda msg: None) -> dict:
    """{"tasks", "results", "versions", "n-samples", "limit", "lm_eval"}: lm-eval's simple_evaluate on
    `model` (the loaded object, on its device) for a `prepare`d job."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = job["tasks"]
    device = str(next(model.parameters()).device)
    log(f"lm-eval: {', '.join(tasks)} on {device}")
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=job["manager"], limit=job["limit"],
                                          bootstrap_iters=0, log_samples=False)
        except (OSError, ConnectionError) as err:  # a task whose dataset is not available offline
            raise RuntimeFailure(f"--lm-eval-tasks {','.join(tasks)}: {type(err).__name__}: "
                                 f"{one_line(str(err))[:300]}; on an offline machine use local task "
                                 "definitions (--lm-eval-include)") from None
    return {"tasks": tasks, "results": res["results"], "versions": res.get("versions"),
            "n-samples": res.get("n-samples"), "limit": job["limit"],
            "lm_eval": getattr(lm_eval, "__version__", None)}
