"""`memsurgery train`: the training run behind the CLI and `memsurgery.train.run`.

One optimizer step consumes batch_size x grad_accum x world_size sequences from a
seeded, resumable order. The loss is a token-level mean over the whole global
batch (each micro-batch's summed cross-entropy divided by the global target
count), so gradient accumulation and data parallelism give the same steps as one
big batch. Value-table gradients are row-sparse, restricted to rows real (non-pad)
tokens read, and for sparse_memory to the top-t TF-IDF slots of the step.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from memsurgery.errors import InputError, RuntimeFailure
from memsurgery.train import checkpoint as ckpt
from memsurgery.train import data as D
from memsurgery.train.dist import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_from_env,
    reduce_dense_grads,
    reduce_sparse_grad,
)
from memsurgery.train.fastpath import PrefixCache, agrees, keeps_logits, loss_sum, why_not
from memsurgery.train.params import (
    Optimizers,
    all_group_counts,
    apply_lora,
    grad_norm_,
    schedule_multiplier,
    select_trainable,
)
from memsurgery.train.recipe import (
    PARAM_GROUPS,
    RESUMABLE_CHANGES,
    Recipe,
    load_recipe,
    recipe_diff,
)


def _default_log(msg: str) -> None:
    sys.stderr.write(msg + "\n")


# ---------------------------------------------------------------- model


def load_model_and_tokenizer(path: str):
    from memsurgery.checkpoint.hub import resolve_checkpoint

    try:
        p = resolve_checkpoint(path, what="model")  # a Hub id becomes its cached snapshot
    except InputError as err:
        raise InputError(f"model: {err}") from None
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"model: {path} is not a Hugging Face model directory (no config.json); "
                         "give a grafted directory from `memsurgery graft` or a dense one")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"model: cannot read {cfg_path} ({type(err).__name__})") from None
    with _quiet_transformers():
        return _load(p, path, cfg)


@contextmanager
def _quiet_transformers():
    """transformers' load/save progress bars off: stderr is for the one-line error."""
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            tf_logging.enable_progress_bar()


def _load(p: Path, path: str, cfg: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memsurgery.export import hf

    try:
        if hf.is_grafted_config(cfg):
            model = hf.load_grafted(p, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(p)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"model: cannot load {path}: {type(err).__name__}: {err}") from None
    return model, tokenizer


def _max_positions(model) -> int | None:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _device(spec) -> torch.device:
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("train.device: cuda requested but no CUDA device is available; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------- reporting


class _Reporter:
    """metrics.jsonl, an optional tracker (train/tracking.py), progress bar or log lines (rank 0 only)."""

    def __init__(self, run_dir: Path | None, recipe: Recipe, total: int, start: int, main: bool, log):
        self.main, self.log, self.total = main, log, total
        self.fh = None
        self.tb = None
        self.progress = None
        self.task = None
        if not main or run_dir is None:
            return
        # Open for the whole run (closed in close()); each record is flushed as written.
        self.fh = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        from memsurgery.train.tracking import build_logger

        spec = recipe.log
        self.tb = build_logger(spec.backend, run_dir, project=spec.project, run_name=spec.run_name,
                               tracking_uri=spec.tracking_uri, log=log)
        if self.tb is not None:
            self.tb.log_config(recipe.model_dump(mode="json"))
        mode = recipe.log.progress
        if mode == "on" or (mode == "auto" and sys.stdout.isatty()):
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")

    def write(self, rec: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.tb is not None:
            from memsurgery.train.tracking import scalars

            self.tb.log_dict(scalars(rec), rec.get("step", 0))

    def step(self, step: int, rec: dict, line: bool) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{rec['loss']:.4f}",
                                 lr=f"{rec['lr']:.2e}", tps=f"{rec['tokens_per_s']:.0f}")
        elif line:
            extra = "".join(f" {k} {rec[k]:,}" if isinstance(rec[k], int) else f" {k} {rec[k]:.4g}"
                            for k in ("slots_touched", "slots_updated", "pct_used", "usage_kl", "reg/gate",
                                      "reg/l2", "reg/kl", "reg/neg") if k in rec)
            self.log(f"step {step}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                     f"{rec['tokens_per_s']:.0f} tok/s{extra}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- loss


@torch.no_grad()
def evaluate(model, seqs, batch_size: int, pad_id: int, device, autocast, max_batches) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    keep = keeps_logits(model)
    try:
        for b, start in enumerate(range(0, len(seqs), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = D.collate(seqs, list(range(start, min(start + batch_size, len(seqs)))), pad_id)
            loss, cnt = loss_sum(model, batch, device, autocast, keep=keep)
            total += float(loss)
            n += cnt
    finally:
        model.train(was)
    return total / max(n, 1)


def _probe(core, tokenizer, spec, log, warned: list) -> dict | None:
    try:
        from memsurgery.probe.api import quick_eval
    except ImportError:
        if not warned:
            log("warning: eval.probe is set but memsurgery.probe is not available; skipping probe evaluation")
            warned.append(True)
        return None
    was = core.training
    core.eval()
    try:
        return quick_eval(core, tokenizer, spec.facts, spec.limit)
    finally:
        core.train(was)


# ---------------------------------------------------------------- the run


def _prepare_run_dir(recipe: Recipe, resume: bool, main: bool, log) -> Path:
    run_dir = Path(recipe.output_dir)
    saved = run_dir / "recipe.yaml"
    has_run = (run_dir / "checkpoints").is_dir() or (run_dir / "final").exists() or saved.is_file()
    if has_run and not resume:
        raise InputError(f"output_dir {run_dir} already holds a run; pass --resume to continue it, "
                         "or choose another output_dir")
    if resume and saved.is_file():
        import yaml

        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        diff = [k for k in recipe_diff(old, recipe.model_dump(mode="json"))
                if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)]
        if diff:
            raise InputError(f"--resume: the recipe differs from the one this run started with in "
                             f"{', '.join(diff[:8])}; resume with the same settings ({saved})")
    return run_dir


def _write_recipe(run_dir: Path, recipe: Recipe) -> None:
    from memsurgery._atomic import atomic_file

    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / "recipe.yaml", "w") as fh:
        fh.write(recipe.to_yaml())


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after `step` by a run that died before its next checkpoint."""
    from memsurgery._atomic import atomic_file

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by the kill
    with atomic_file(path, "w") as fh:
        fh.write("".join(k + "\n" for k in keep))


def run(recipe, overrides: list[str] | None = None, *, resume: bool = False, dry_run: bool = False,
        log=None) -> dict:
    """Train as the recipe says; returns a JSON-able summary (see docs/recipes.md)."""
    training = TrainingRun(load_recipe(recipe, overrides).resolved(), resume=resume, dry_run=dry_run,
                           log=log or _default_log)
    training.setup()
    if dry_run:
        return {"dry_run": True, "recipe": training.recipe.model_dump(mode="json"), "plan": training.plan}
    training.prepare()
    training.train()
    return training.finish()


class TrainingRun:
    """One `memsurgery train` run: setup -> prepare -> train -> finish, the steps of `run`.

    setup     processes, seeds, model and data, what trains, the plan (all a dry run does)
    prepare   prefix cache, the run directory's recipe and plan, optimizers, resumed state
    train     the loop: a step, its record, evaluation and checkpoints
    finish    the final model (gathered from shards) and summary.json
    """

    def __init__(self, recipe: Recipe, *, resume: bool, dry_run: bool, log):
        self.recipe, self.resume, self.dry_run = recipe, resume, dry_run
        device = _device(recipe.train)
        self.dist = init_from_env(device.type)
        if self.dist.active and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.main = self.dist.main
        self.say = log if self.main else (lambda m: None)
        precision = recipe.train.precision
        self.bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if self.bf16 else nullcontext

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        """Processes agree on the run directory; seeds; model, data and trainable groups; the plan."""
        recipe, dist = self.recipe, self.dist
        self.run_dir = None if self.dry_run else _prepare_run_dir(recipe, self.resume, self.main, self.say)
        barrier(dist)  # every rank checks the directory before rank 0 writes into it
        _seed_everything(recipe.seed + dist.rank)
        t0 = time.perf_counter()
        self._load_model_and_data()
        self._place_model()
        self.plan = self._plan()
        self.plan["load_seconds"] = round(time.perf_counter() - t0, 2)
        named = [(n, p) for ps in self.groups.values() for n, p in ps]
        self.first, self.why = why_not(recipe, self.core, named, self.grafted, len(self.train_seqs),
                                       self.train_seqs.n_tokens)
        self.plan["prefix_cache"] = {"enabled": self.first is not None, "first_layer": self.first,
                                     "why_not": self.why or None}
        self.reg = None
        if recipe.regularize is not None and recipe.regularize.active:
            from memsurgery.train.regularize import Regularizer

            self.reg = Regularizer(recipe, self.core, self.tokenizer, self.pad_id, self.max_len, log=self.say)
            self.plan["regularize"] = self.reg.info()
            self.plan["load_seconds"] = round(time.perf_counter() - t0, 2)

    def _load_model_and_data(self) -> None:
        from memsurgery.export import hf

        recipe, say = self.recipe, self.say
        self.core, self.tokenizer = load_model_and_tokenizer(recipe.model)
        self.grafted = hf.is_grafted_model(self.core)
        self.max_len = max_len = _max_positions(self.core)
        spec = recipe.data
        self.train_seqs = D.load_sequences(spec.train, self.tokenizer, spec, key="data.train", max_len=max_len,
                                           log=say)
        self.eval_seqs = None
        if spec.eval:
            self.eval_seqs = D.load_sequences(spec.eval, self.tokenizer, spec, key="data.eval", max_len=max_len,
                                              log=say)
        else:
            self.train_seqs, self.eval_seqs = D.split_heldout(self.train_seqs, recipe.eval.heldout_fraction,
                                                              recipe.seed)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def _place_model(self) -> None:
        """Shard the table (memory parallel), add LoRA, choose what trains, move, FSDP2."""
        recipe, dist, grafted = self.recipe, self.dist, self.grafted
        self.table = None
        self.dp = dist  # the data-parallel view: who reads which sequences, who sums gradients
        if recipe.memory_parallel > 1:
            self.table = _shard_table(self.core, recipe.memory_parallel, dist, grafted)
            self.dp = DistInfo()  # every rank of a memory-parallel group reads the same tokens
        self.model = apply_lora(self.core, recipe.lora) if recipe.train.method == "lora" else self.core
        self.groups = select_trainable(self.model, recipe, grafted)
        self.model.to(self.device)
        if recipe.fsdp:
            _apply_fsdp(self.core, dist, grafted)
            self.groups = select_trainable(self.model, recipe, grafted)  # fully_shard replaced the Parameters
        self.collective = self.table is not None or recipe.fsdp  # checkpoints and probes need every rank
        self.trainable = [p for g in self.groups.values() for _, p in g]
        self.per_step = recipe.train.batch_size * recipe.train.grad_accum * self.dp.world

    def _plan(self) -> dict:
        """plan.json (and the dry run's output): model, data, parameter groups, token budget."""
        recipe, spec, groups, per_step = self.recipe, self.recipe.data, self.groups, self.per_step
        counts_all = all_group_counts(self.model, recipe.split_relevance_gate)
        train_seqs, eval_seqs = self.train_seqs, self.eval_seqs
        return {
            "model": recipe.model, "grafted": self.grafted, "method": recipe.train.method,
            "device": str(self.device), "precision": "bfloat16-autocast" if self.bf16 else "float32",
            "world_size": self.dist.world, "memory_parallel": recipe.memory_parallel, "fsdp": recipe.fsdp,
            "data": {"train": spec.train, "format": spec.format, "train_sequences": len(train_seqs),
                     "train_tokens": train_seqs.n_tokens, "eval_sequences": len(eval_seqs) if eval_seqs else 0,
                     "seq_len": spec.seq_len, "packing": spec.packing, "cached": train_seqs.info.get("cached"),
                     "memory_positions": spec.memory_positions, "views": train_seqs.info.get("views")},
            "groups": {g: {"params": counts_all.get(g, 0),
                           "trainable": sum(p.numel() for _, p in groups.get(g, [])),
                           "lr": recipe.lr(g), "weight_decay": recipe.weight_decay(g),
                           "optimizer": ("sparse-row-" + recipe.optim.value_optimizer) if g == "values" else "adamw"}
                       for g in PARAM_GROUPS if counts_all.get(g)},
            "trainable_params": sum(p.numel() for p in self.trainable),
            "total_params": sum(counts_all.values()),
            "steps": recipe.train.steps,
            "sequences_per_step": per_step,
            "tokens_per_step_max": per_step * spec.seq_len,
            "tokens_total_max": per_step * spec.seq_len * recipe.train.steps,
            "epochs": round(per_step * recipe.train.steps / max(len(train_seqs), 1), 3),
        }

    # ------------------------------------------------------------ prepare

    def prepare(self) -> None:
        """Prefix cache, recipe.yaml and plan.json, optimizers, TF-IDF, then a fresh or resumed state."""
        assert self.run_dir is not None
        self.at_targets = keeps_logits(self.model)  # logits only where the loss reads them
        self.prefix = self._prefix_cache()
        if self.main:  # only now: a recipe that fails on its inputs leaves no run directory behind
            _write_recipe(self.run_dir, self.recipe)
            (self.run_dir / "plan.json").write_text(json.dumps(self.plan, indent=2) + "\n", encoding="utf-8")
        from torch.distributed.tensor import DTensor

        groups = self.groups
        self.opt = Optimizers(groups, self.recipe)
        self.values_param = groups["values"][0][1] if "values" in groups else None
        # FSDP2 reduce-scatters its own (DTensor) gradients; we sum the rest over ranks.
        self.dense_params = [p for g, ps in groups.items() if g != "values" for _, p in ps
                             if not isinstance(p, DTensor)]
        self.bank = self.core.memory_bank if self.grafted else None
        self.slots = self.bank.values.weight.shape[0] if self.grafted else 0
        self.idf = self._background_idf() if self.recipe.train.method == "sparse_memory" else None
        if self.grafted:
            self.bank.set_record(True)  # slot counts for telemetry, pad-row masking and SMF
        self.step, self.position, self.consecutive, self.skipped, self.tokens_seen = 0, 0, 0, 0, 0
        self.usage = torch.zeros(self.slots, dtype=torch.float64) if self.grafted else None
        self.resumed_from = None
        if self.resume:
            self._resume()
        barrier(self.dist)

    def _prefix_cache(self) -> PrefixCache | None:
        """The cached input of the first memory layer, when it applies and agrees with a full forward."""
        recipe, first = self.recipe, self.first
        prefix = None
        if first is not None:
            t_pc = time.perf_counter()
            prefix = PrefixCache(self.core, first, self.train_seqs, recipe.train.batch_size, self.pad_id,
                                 self.device, self.autocast)
            idx = list(range(min(len(self.train_seqs), recipe.train.batch_size)))
            ok, diff = agrees(self.model, prefix, self.train_seqs, idx, self.pad_id, self.device, self.autocast,
                              self.at_targets, 1e-2 if self.bf16 else 1e-4)
            if ok:
                self.say(f"prefix cache: layers 0-{first - 1} run once per sequence "
                         f"({prefix.nbytes / 2**20:,.0f} MB, {time.perf_counter() - t_pc:.1f} s)")
            else:
                prefix, self.why = None, f"cached and full forwards differ by {diff:.1e} on this architecture"
                self.plan["prefix_cache"] = {"enabled": False, "first_layer": None, "why_not": self.why}
        if prefix is None and self.grafted and recipe.train.method in ("memory", "sparse_memory"):
            self.say(f"prefix cache: off ({self.why})")
        return prefix

    def _background_idf(self) -> torch.Tensor:
        """sparse_memory's background IDF over slots: computed once, saved, reloaded on resume."""
        from memsurgery.train.smf import background_idf

        idf_path = self.run_dir / "background_idf.safetensors"
        if self.resume and idf_path.is_file():
            from safetensors.torch import load_file

            idf = load_file(str(idf_path))["idf"]
        else:
            idf, _ = background_idf(self.core, self.tokenizer, self.recipe.sparse, self.slots, self.device,
                                    log=self.say)
            if self.main:
                from safetensors.torch import save

                from memsurgery._atomic import atomic_file

                with atomic_file(idf_path) as fh:
                    fh.write(save({"idf": idf.contiguous()}))
        return idf.to(self.device)

    def _resume(self) -> None:
        """Weights, optimizer state, counters and RNG from the last valid checkpoint, if any."""
        path = ckpt.latest_valid(self.run_dir, log=self.say)
        if path is None:
            self.say(f"--resume: no valid checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
            return
        tensors, jsons = ckpt.load_checkpoint(path)
        names = {n for ps in self.groups.values() for n, _ in ps}
        if set(tensors["trainable.safetensors"]) != names:
            raise InputError(f"--resume: {path} holds different trainable parameters than this recipe trains")
        self._restore_tensors(tensors["trainable.safetensors"], tensors["optimizer.safetensors"],
                              jsons["optimizer.json"])
        st = jsons["state.json"]
        self.step, self.position = st["step"], st["position"]
        self.consecutive, self.skipped, self.tokens_seen = st["consecutive_nonfinite"], st["skipped"], st["tokens_seen"]
        if self.grafted and "usage" in tensors["state.safetensors"]:
            self.usage = tensors["state.safetensors"]["usage"].clone()
        if self.dist.main:
            ckpt.set_rng_state(tensors["state.safetensors"], st["rng"])
        self.resumed_from = str(path)
        self.say(f"resumed from {path} (step {self.step})")
        if self.main:
            _trim_metrics(self.run_dir, self.step)

    def _restore_tensors(self, weights: dict, otensors: dict, ojson) -> None:
        from torch.distributed.tensor import DTensor

        table = self.table
        if table is not None:  # checkpoints hold the full table: take this rank's columns
            cols = slice(table.col_start, table.col_stop)
            weights = {n: (w[:, cols] if n.endswith("memory_bank.values.weight") else w)
                       for n, w in weights.items()}
            otensors = {k: (t[:, cols].contiguous() if k.startswith("values.") and t.dim() == 2 else t)
                        for k, t in otensors.items()}
        with torch.no_grad():
            for ps in self.groups.values():
                for n, p in ps:
                    w = weights[n].to(p.device, p.dtype)
                    if isinstance(p, DTensor):
                        from torch.distributed.tensor import distribute_tensor

                        w = distribute_tensor(w, p.device_mesh, p.placements)
                    p.copy_(w)
        self.opt.load_tensors_and_json(otensors, ojson)

    # ------------------------------------------------------------ train

    def train(self) -> None:
        """Steps until recipe.train.steps: each logged, evaluated and checkpointed as the recipe says."""
        recipe = self.recipe
        self.total = recipe.train.steps
        self.order = D.Order(len(self.train_seqs), recipe.seed)
        self.reporter = _Reporter(self.run_dir, recipe, self.total, self.step, self.main, self.say)
        self.window = torch.zeros(self.slots, dtype=torch.float64) if self.grafted else None
        self.losses: list[float] = []
        self.last_ckpt = self.resumed_from
        self.probe_warned: list = []
        self.eval_loss = None
        t_train = time.perf_counter()
        self.tokens_run = 0
        self.model.train()
        try:
            while self.step < self.total:
                finite = self._train_step()
                if self.consecutive >= recipe.nonfinite.max_consecutive:
                    where = (f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt
                             else "no checkpoint was written")
                    raise RuntimeFailure(
                        f"training stopped at step {self.step}: {self.consecutive} non-finite steps in a row "
                        f"(nonfinite.max_consecutive); {where}; lower the learning rates or check the data")
                if (recipe.eval.every and self.step % recipe.eval.every == 0) or self.step == self.total:
                    self._evaluate()
                if finite and (self.step % recipe.checkpoint.every == 0 or self.step == self.total):
                    saved = _save(self.run_dir, self.step, self.groups, self.opt, self.position, self.consecutive,
                                  self.skipped, self.tokens_seen, self.usage, recipe, self.table, self.main,
                                  self.collective)
                    self.last_ckpt = str(saved) if saved is not None else self.last_ckpt
                    barrier(self.dist)
        finally:
            self.reporter.close()
            if self.grafted:
                self.bank.set_record(False)
        self.seconds = time.perf_counter() - t_train

    def _train_step(self) -> bool:
        """One optimizer step over the global batch, logged; whether it was finite (and applied)."""
        t_step = time.perf_counter()
        lrs = self.opt.set_multiplier(schedule_multiplier(self.recipe.optim.schedule, self.step, self.total))
        micro, batches = self._micro_batches()
        local = torch.tensor([sum(int((b["labels"][:, 1:] != D.IGNORE).sum()) for b in batches),
                              sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64)
        all_reduce_sum(local, self.dp)
        n_targets, n_tokens = int(local[0]), int(local[1])
        loss_acc, step_counts = self._forward_backward(micro, batches, n_targets)
        reg_parts = reg_counts = None
        if self.reg is not None:  # after the batches: their slot counts are already taken
            reg_parts, reg_counts = self.reg.step(self.step, self.dp, self.device, self.autocast)
            all_reduce_sum(reg_parts, self.dp)
            reg_parts /= self.dp.world
        self.position += self.per_step
        kept_rows = self._reduce_gradients(step_counts, reg_counts, loss_acc)
        step_loss = float(loss_acc) / max(n_targets, 1)
        finite, norm = self._apply(step_loss, reg_parts)
        self.step += 1
        self.tokens_seen += n_tokens
        self.tokens_run += n_tokens
        dt = time.perf_counter() - t_step
        rec = {"step": self.step, "loss": step_loss, "lr": lrs.get("values", next(iter(lrs.values()))),
               "lrs": lrs, "grad_norm": norm, "tokens": n_tokens, "tokens_per_s": n_tokens / max(dt, 1e-9),
               "seconds": dt, "skipped": not finite}
        if reg_parts is not None:
            rec.update(self._penalty_record(reg_parts))
        self.losses.append(step_loss)
        is_log = self.step % self.recipe.log.every == 0 or self.step == self.total
        if self.grafted:
            self._slot_record(rec, step_counts, kept_rows, is_log)
        if self.main:
            self.reporter.write(rec)
        self.reporter.step(self.step, rec, is_log)
        return finite

    def _micro_batches(self) -> tuple[list, list]:
        """This rank's micro-batches of the step: (sequence indices, collated batches)."""
        bs, accum, dp = self.recipe.train.batch_size, self.recipe.train.grad_accum, self.dp
        idx = self.order.take(self.position, self.per_step)
        micro = [idx[(m * dp.world + dp.rank) * bs:(m * dp.world + dp.rank + 1) * bs] for m in range(accum)]
        return micro, [D.collate(self.train_seqs, mi, self.pad_id) for mi in micro]

    def _forward_backward(self, micro: list, batches: list, n_targets: int):
        """Gradients of the global token-mean loss; (summed loss, slot counts of real tokens)."""
        loss_acc = torch.zeros((), dtype=torch.float64)
        step_counts = torch.zeros(self.slots, dtype=torch.float64, device=self.device) if self.grafted else None
        for mi, b in zip(micro, batches):
            loss, _ = loss_sum(self.model, b, self.device, self.autocast, keep=self.at_targets, prefix=self.prefix,
                               idx=mi)
            if self.grafted:
                from memsurgery.train.smf import batch_slot_counts

                # with data.memory_positions: entity only the entity's reads count (the rest are masked)
                real = b["attention_mask"].bool() & b.get("memory_mask", torch.tensor(True))
                step_counts += batch_slot_counts(self.core, real.to(self.device), self.slots)
            (loss / max(n_targets, 1)).backward()
            loss_acc += loss.detach().double().cpu()
        return loss_acc, step_counts

    def _reduce_gradients(self, step_counts, reg_counts, loss_acc) -> int | None:
        """Coalesce, keep the rows real tokens read, sum over ranks, and (sparse_memory) keep only
        the step's top-t TF-IDF rows; returns how many rows that kept (None otherwise)."""
        values_param, dp = self.values_param, self.dp
        kept_rows = None
        if values_param is not None and values_param.grad is not None and values_param.grad.is_sparse:
            from memsurgery.train.smf import mask_sparse_rows

            values_param.grad = values_param.grad.coalesce()
            read = step_counts > 0
            if reg_counts is not None:  # rows the penalties' real tokens read keep their gradient
                read |= reg_counts > 0
            mask_sparse_rows(values_param, read)
        if values_param is not None:
            reduce_sparse_grad(values_param, dp)
        reduce_dense_grads(self.dense_params, dp)
        if self.grafted:
            all_reduce_sum(step_counts, dp)
        all_reduce_sum(loss_acc, dp)
        if self.idf is not None and values_param is not None and values_param.grad is not None:
            from memsurgery.train.smf import mask_sparse_rows, top_slots

            top = top_slots(step_counts, self.idf, self.recipe.sparse.top_t)
            keep = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
            keep[top] = True
            kept_rows = mask_sparse_rows(values_param, keep)
        return kept_rows

    def _apply(self, step_loss: float, reg_parts) -> tuple[bool, float]:
        """Clip and take the optimizer step, or skip a non-finite one; (finite, gradient norm)."""
        recipe = self.recipe
        sharded = [self.values_param] if self.table is not None and self.values_param is not None else ()
        norm = grad_norm_(self.trainable, recipe.train.max_grad_norm, sharded=sharded,
                          reduce=lambda t: all_reduce_sum(t, self.dist))
        finite = math.isfinite(step_loss) and math.isfinite(norm)
        if reg_parts is not None:
            finite = finite and bool(torch.isfinite(reg_parts).all())
        if finite:
            self.opt.step()
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.skipped += 1
            self.say(f"warning: step {self.step + 1}: non-finite "
                     f"{'loss' if not math.isfinite(step_loss) else 'gradient'}"
                     f" ({step_loss if not math.isfinite(step_loss) else norm}); skipped "
                     f"({self.consecutive} in a row, limit {recipe.nonfinite.max_consecutive})")
        self.opt.zero_grad()
        return finite, norm

    def _penalty_record(self, reg_parts) -> dict:
        """The regularizers' unweighted penalties this step, for those that are on."""
        from memsurgery.train.regularize import PARTS

        s_, reg = self.recipe.regularize, self.reg
        on = {"reg/gate": s_.gate_penalty > 0 and reg.text is not None,
              "reg/l2": s_.output_l2 > 0 and reg.text is not None,
              "reg/kl": s_.kl_to_base > 0 and reg.text is not None,
              "reg/neg": reg.neg is not None, "reg/neg_gate": reg.neg is not None and s_.gate_penalty > 0}
        return {k: float(v) for k, v in zip(PARTS, reg_parts) if on[k]}

    def _slot_record(self, rec: dict, step_counts, kept_rows, is_log: bool) -> None:
        """Slot telemetry in the step's record; usage accumulated over the run and the log window."""
        c = step_counts.cpu()
        rec["slots_touched"] = int((c > 0).sum())
        if kept_rows is not None:
            rec["slots_updated"] = kept_rows
        self.usage += c
        self.window += c
        if is_log:
            from memsurgery.telemetry import usage_stats

            rec["pct_used"] = 100.0 * float((self.usage > 0).sum()) / self.slots
            rec["usage_kl"] = usage_stats(self.window)["kl_uniform_count"]
            self.window.zero_()

    def _evaluate(self) -> None:
        """Held-out loss and the recipe's probe, written to metrics.jsonl and logged."""
        recipe, step = self.recipe, self.step
        erec = {"step": step}
        if self.eval_seqs is not None and len(self.eval_seqs):
            self.eval_loss = evaluate(self.model, self.eval_seqs, recipe.train.batch_size, self.pad_id, self.device,
                                      self.autocast, recipe.eval.max_batches)
            erec["eval_loss"] = self.eval_loss
        # Memory-parallel forwards are collective: every rank runs the probe.
        if recipe.eval.probe is not None and (self.main or self.collective):
            pr = _probe(self.core, self.tokenizer, recipe.eval.probe, self.say, self.probe_warned)
            if pr is not None:
                erec["probe"] = pr
        if len(erec) > 1 and self.main:
            self.reporter.write(erec)
            if "eval_loss" in erec:
                self.say(f"step {step}: eval loss {self.eval_loss:.4f}")
            if isinstance(erec.get("probe"), dict) and "exact_match" in erec["probe"]:
                self.say(f"step {step}: probe exact match {erec['probe']['exact_match']:.3f} "
                         f"on {erec['probe'].get('n', '?')} facts")

    # ------------------------------------------------------------ finish

    def finish(self) -> dict:
        """The final model in run_dir/final/ (rank 0) and the run's summary."""
        recipe, main, run_dir = self.recipe, self.main, self.run_dir
        final_dir = run_dir / "final"
        model = self.model
        if self.table is not None:
            _unshard_table(self.core, self.table, main)
        if recipe.fsdp:
            model = _unsharded_copy(self.core, recipe, main)
        if main:
            _save_final(model, self.tokenizer, recipe, final_dir, self.grafted)
        barrier(self.dist)
        seconds, losses = self.seconds, self.losses
        summary = {
            "run_dir": str(run_dir), "final_dir": str(final_dir), "method": recipe.train.method,
            "steps": self.step, "skipped_steps": self.skipped, "resumed_from": self.resumed_from,
            "final_loss": losses[-1] if losses else None, "losses": losses, "eval_loss": self.eval_loss,
            "tokens": self.tokens_seen, "seconds": round(seconds, 3),
            "tokens_per_s": self.tokens_run / seconds if seconds > 0 and self.tokens_run else None,
            "trainable_params": self.plan["trainable_params"], "groups": self.plan["groups"],
            "last_checkpoint": self.last_ckpt, "world_size": self.dist.world,
        }
        if self.grafted and self.usage is not None:
            summary["pct_slots_used"] = 100.0 * float((self.usage > 0).sum()) / self.slots
        if main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if self.dist.owned:
            import torch.distributed as tdist

            tdist.destroy_process_group()
        return summary


def _seed_everything(seed: int) -> None:
    """torch, random and numpy seeded alike (each rank with its own seed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def _shard_table(core, mp: int, dist, grafted: bool):
    """Column-shard the value table over all ranks (memory_parallel == processes)."""
    if not grafted:
        raise InputError(f"memory_parallel: {mp} needs a grafted model (it shards the memory's value table)")
    if dist.world != mp:
        raise InputError(f"memory_parallel: {mp} needs exactly {mp} processes (torchrun --nproc-per-node {mp}), "
                         f"got {dist.world}; combining it with data parallelism is not supported yet")
    from memsurgery.parallel import shard_bank

    shard_bank(core.memory_bank)
    return core.memory_bank.values


def _unshard_table(core, table, main: bool) -> None:
    """Gather the full table onto rank 0 and put it back in the model (for final/)."""
    from memsurgery.memory.values import SharedValueTable
    from memsurgery.parallel import gather_full_table

    full = gather_full_table(table, dst=0)
    if main:
        plain = SharedValueTable(full.shape[0], full.shape[1], dtype=full.dtype, device=full.device)
        with torch.no_grad():
            plain.weight.copy_(full)
        bank = core.memory_bank
        bank.values = plain
        for _, layer in bank:
            layer.bind_values(plain)


def _apply_fsdp(core, dist, grafted: bool) -> None:
    """FSDP2: shard every decoder layer and the rest of the base over all ranks.

    The memory bank stays out (ignored_params): its row-sparse table gradient and
    small dense parameters are summed over ranks by our own collectives. Gradients
    are summed, not averaged (divide factor 1), because each rank's loss is already
    divided by the global batch's token count.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from memsurgery.arch import spec_for_config

    if not dist.active:
        raise InputError("fsdp: true needs several processes; launch with torchrun --nproc-per-node N")
    ignored = set(core.memory_bank.parameters()) if grafted else None
    layers = core.decoder_layers() if grafted else spec_for_config(core.config).get_layers(core)
    for layer in layers:
        fully_shard(layer)
    fully_shard(core, ignored_params=ignored)
    for m in core.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def _unsharded_copy(core, recipe, main: bool):
    """Gather every FSDP2 shard (collective) into a fresh, ordinary model on rank 0."""
    from torch.distributed.tensor import DTensor

    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for n, p in core.named_parameters()}
    if not main:
        return None
    fresh, _ = load_model_and_tokenizer(recipe.model)
    result = fresh.load_state_dict(full, strict=False)
    if result.unexpected_keys:
        raise RuntimeFailure(f"fsdp: cannot rebuild the final model (unexpected {result.unexpected_keys[:3]})")
    return fresh


def _save(run_dir, step, groups, opt, position, consecutive, skipped, tokens_seen, usage, recipe,
          table=None, main=True, collective=False) -> Path | None:
    """Write a checkpoint (rank 0). With a sharded table or FSDP2 every rank must call it:
    shards (the table's columns, its row-Adam moments, FSDP2 parameters and AdamW state)
    are gathered to full size, so a checkpoint is the same whatever the number of ranks."""
    from torch.distributed.tensor import DTensor

    if not collective and not main:
        return None
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
               for ps in groups.values() for n, p in ps}
    otensors, ojson = opt.state_tensors_and_json()
    if table is not None:
        from memsurgery.parallel import gather_columns, gather_full_table

        for n in weights:
            if n.endswith("memory_bank.values.weight"):
                weights[n] = gather_full_table(table, dst=0)
        for k in sorted(otensors):
            t = otensors[k]
            if k.startswith("values.") and t.dim() == 2 and t.shape[1] == table.local_v_dim:
                otensors[k] = gather_columns(t.to(table.weight.device), table, dst=0)
        if not main:
            return None
        weights = {n: w.cpu() for n, w in weights.items()}
        otensors = {k: t.cpu() for k, t in otensors.items()}
    if not main:
        return None
    rtensors, rjson = ckpt.rng_state()
    state_t = dict(rtensors)
    if usage is not None:
        state_t["usage"] = usage
    state = {"step": step, "position": position, "consecutive_nonfinite": consecutive, "skipped": skipped,
             "tokens_seen": tokens_seen, "rng": rjson}
    return ckpt.save_checkpoint(
        run_dir, step,
        {"trainable.safetensors": weights, "optimizer.safetensors": otensors, "state.safetensors": state_t},
        {"optimizer.json": ojson, "state.json": state}, recipe.checkpoint.keep_last)


def _save_final(model, tokenizer, recipe, final_dir: Path, grafted: bool) -> None:
    from memsurgery._atomic import atomic_output_dir
    from memsurgery.export import hf

    out = model
    if recipe.train.method == "lora":
        out = model.merge_and_unload()  # adapters folded into the base weights
    out.eval()
    info = json.dumps({"recipe": recipe.model_dump(mode="json"), "source_model": recipe.model}, indent=2) + "\n"
    with _quiet_transformers(), atomic_output_dir(final_dir, force=True) as tmp:
        if grafted:
            extra = {"train.json": info}
            # Keep the graft's provenance (source SHA-256, plan, init statistics) with the trained model.
            from memsurgery.checkpoint.hub import resolve_checkpoint

            graft_json = resolve_checkpoint(recipe.model) / "graft.json"
            if graft_json.is_file():
                extra["graft.json"] = graft_json.read_text(encoding="utf-8")
            hf.save_grafted(out.to("cpu"), tmp, tokenizer=tokenizer, extra_files=extra)
        else:
            out.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / "train.json").write_text(info, encoding="utf-8")


__all__ = ["evaluate", "load_model_and_tokenizer", "run"]
