"""Continued training of grafted (and dense) checkpoints from YAML recipes (docs/recipes.md).

    from memsurgery.train import run
    summary = run("recipes/knowledge-injection.yaml", overrides=["train.steps=50"])

`run` is what `memsurgery train` calls; heavy imports happen inside it. `distill` is
the other training loop: replace-mode graft values fitted to imitate the MLPs they
replace (`memsurgery graft --values distill`).
"""

from __future__ import annotations

from memsurgery.train.recipe import Recipe, apply_overrides, load_recipe


def run(recipe, overrides=None, *, resume: bool = False, dry_run: bool = False, log=None) -> dict:
    """Train per `recipe` (a YAML path, dict or Recipe) with `--set`-style `overrides`.

    Returns a JSON-able summary: run_dir, final_dir, steps, losses, eval_loss,
    tokens, tokens_per_s, trainable parameters by group, last_checkpoint, ...
    With dry_run=True nothing is trained or written: {"dry_run", "recipe", "plan"}.
    """
    from memsurgery.train.loop import run as _run

    return _run(recipe, overrides, resume=resume, dry_run=dry_run, log=log)


__all__ = ["Recipe", "apply_overrides", "load_recipe", "run"]
