"""The tiny grafted llama and data files the train tests share (built once per session)."""

from __future__ import annotations

import json
import random

GRAFT = {"layers": [1], "slots": 256, "heads": 2, "knn": 4, "k_dim": 16, "calib_tokens": 512,
         "heldout_tokens": 256, "seq_len": 32, "kmeans_iters": 3}


def train_assets(tmp_path_factory) -> dict:
    """A tiny dense llama, its graft, and small data files; built once per test session."""
    root = tmp_path_factory.getbasetemp() / "memsurgery-train-assets"
    done = root / "done"
    paths = {"dense": root / "dense", "grafted": root / "grafted", "text": root / "text.txt",
             "qa": root / "qa.jsonl", "docs": root / "docs.jsonl", "facts": root / "facts.jsonl",
             "cache": root / "cache"}
    if done.is_file():
        return paths
    from memsurgery.graft import graft
    from tests.tiny import make_tiny_checkpoint_with_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["the", "memory", "layer", "stores", "facts", "about", "people", "places", "and", "things", "in", "many", "slots"]
    paths["text"].write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    with open(paths["qa"], "w") as fh:
        fh.writelines(json.dumps({"prompt": f"Person {i} lives in", "answer": f"town {i * 7 % 11}"}) + "\n" for i in range(24))
    with open(paths["facts"], "w") as fh:  # structured facts (data.format: facts)
        fh.writelines(json.dumps({"entity": f"Person {i}", "relation": "home_town", "answer": f"town {i * 7 % 11}"})
                      + "\n" for i in range(6))
    with open(paths["docs"], "w") as fh:
        fh.writelines(json.dumps({"text": f"Person {i} lives in town {i * 7 % 11} and likes {words[i % 13]}."}) + "\n" for i in range(24))
    make_tiny_checkpoint_with_tokenizer("llama", paths["dense"])
    graft(paths["dense"], paths["grafted"], plan=dict(GRAFT, calib=str(paths["text"])))
    done.write_text("ok")
    return paths


def tiny_recipe(assets, out, **over) -> dict:
    r = {"model": str(assets["grafted"]), "output_dir": str(out), "seed": 0,
         "data": {"train": str(assets["text"]), "seq_len": 32},
         "train": {"method": "memory", "steps": 4, "batch_size": 4},
         "checkpoint": {"every": 2, "keep_last": 2}, "log": {"every": 2, "progress": "off"}}
    for k, v in over.items():
        node = r
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return r
