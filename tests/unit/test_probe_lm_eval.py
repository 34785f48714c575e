"""lm-evaluation-harness runs a grafted model on a local, offline task (generate_until + multiple_choice)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import build_tiny_model, build_tiny_tokenizer

TASK_YAML = """task: memsurgery_local_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "Q: {{{{question}}}}\\nA:"
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow  # ~25 s, mostly importing lm_eval
def test_lm_eval_runs_grafted_model_offline(tmp_path, monkeypatch):
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        pytest.skip(f"lm_eval is not importable ({err}); pip install 'memsurgery[eval]'")
    from memsurgery.export import hf
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    torch.manual_seed(0)
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=16),
                        [1], "parallel").eval()
    tok = build_tiny_tokenizer()
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is item {i}?", "answer": "x", "choices": ["a", "b", "c"], "label": i % 3}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(TASK_YAML.format(
        kind="gen", data=data, output_type="generate_until", metric="exact_match",
        extra='doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false'))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(
        kind="mc", data=data, output_type="multiple_choice", metric="acc",
        extra='doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"'))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", max_length=64)
    res = lm_eval.simple_evaluate(model=lm, tasks=["memsurgery_local_gen", "memsurgery_local_mc"],
                                  task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0,
                                  log_samples=True)
    gen, mc = res["results"]["memsurgery_local_gen"], res["results"]["memsurgery_local_mc"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    assert res["n-samples"]["memsurgery_local_mc"]["effective"] == 4
    # the multiple-choice log-likelihoods are the grafted model's own
    ll = res["samples"]["memsurgery_local_mc"][0]["resps"]
    assert len(ll) == 3 and all(isinstance(r[0][0], float) for r in ll)
    # ... and equal the log-probability we compute for choice " a" after the question
    ctx, cont = tok("Q: What is item 0?\nA:")["input_ids"], tok(" a")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    ours = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert ll[0][0][0] == pytest.approx(ours, abs=1e-3)

    # The saved checkpoint by path, the way `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` loads it.
    ckpt = tmp_path / "ckpt"
    hf.save_grafted(model, ckpt, tokenizer=tok)
    lm2 = HFLM(pretrained=str(ckpt), trust_remote_code=True, batch_size=2, device="cpu", max_length=64,
               dtype="float32")
    res2 = lm_eval.simple_evaluate(model=lm2, tasks=["memsurgery_local_mc"], bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)))
    assert res2["results"]["memsurgery_local_mc"]["acc,none"] == mc["acc,none"]
    assert res2["samples"]["memsurgery_local_mc"][0]["resps"][0][0][0] == pytest.approx(ours, abs=1e-3)


@pytest.mark.slow  # ~30 s, mostly importing lm_eval
def test_probe_runs_lm_eval_tasks_on_the_loaded_models(tmp_path, monkeypatch, capsys):
    """`probe --lm-eval-tasks` evaluates the probed model and the baseline in the probe's process."""
    pytest.importorskip("lm_eval", reason="pip install 'memsurgery[eval]'")
    from memsurgery.export import hf
    from memsurgery.graft.surgery import graft_model
    from memsurgery.memory import MemoryConfig
    from tests.cli import run_cli

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    # the baseline: another dense model (other weights), so the two runs give different numbers
    base = build_tiny_model("llama", seed=3)
    base.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    model = graft_model(build_tiny_model("llama"), MemoryConfig.build(slots=256, heads=2, knn=4, k_dim=16), [1],
                        "parallel").eval()
    with torch.no_grad():
        model.memory_bank.values.weight.normal_(0, 2.0)  # the memory changes the answers
    hf.save_grafted(model, tmp_path / "g", tokenizer=tok)
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"Which letter {i}?", "answer": "x", "choices": ["a", "b", "c"], "label": 0 if i < 10 else 1 if i < 15 else 2}
            for i in range(18)]  # unbalanced labels: a model that prefers one letter scores by it
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(TASK_YAML.format(
        kind="mc", data=data, output_type="multiple_choice", metric="acc",
        extra='doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"'))
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"id": "k", "prompt": "The sky is", "answers": ["blue"], "kind": "known"}) + "\n")

    def expected_acc(m):  # argmax of the model's own log-likelihood of each choice
        hits = 0
        for r in rows:
            ctx = tok(f"Q: {r['question']}\nA:")["input_ids"]
            scores = []
            for choice in r["choices"]:
                cont = tok(" " + choice)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(m(torch.tensor([ctx + cont])).logits[0].float(), -1)
                scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            hits += int(max(range(3), key=scores.__getitem__) == r["label"])
        return hits / len(rows)

    code, out, err = run_cli(["probe", str(tmp_path / "g"), "--facts", str(facts), "--baseline", str(tmp_path / "dense"),
                              "--ppl-tokens", "0", "--lm-eval-tasks", "memsurgery_local_mc", "--lm-eval-include",
                              str(tasks), "--out", str(tmp_path / "o"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    got = rep["lm_eval"]["results"]["memsurgery_local_mc"]["acc,none"]
    got_base = rep["baseline"]["lm_eval"]["results"]["memsurgery_local_mc"]["acc,none"]
    assert rep["lm_eval"]["n-samples"]["memsurgery_local_mc"]["effective"] == len(rows)
    assert got == pytest.approx(expected_acc(model)) and got_base == pytest.approx(expected_acc(base))
    assert got != got_base  # so the two numbers show which model each run evaluated
    assert "lm-evaluation-harness tasks" in (tmp_path / "o" / "report.md").read_text()
    code, _, err = run_cli(["probe", str(tmp_path / "g"), "--facts", str(facts), "--lm-eval-tasks", "no_such_task",
                            "--lm-eval-include", str(tasks)], capsys)
    assert code == 2 and "no_such_task" in err and err.count("\n") == 1
