"""The model card (README.md) of an export: Hub front matter, the probe's result, provenance.

Front matter: `base_model` (a Hub id, when the base's origin is known: a Hub input, a recorded
conversion of the demo GGUF, or `export --base-model`), `base_model_relation`, `license`
(`export --license`, else the base's), `library_name`, `pipeline_tag`, `tags`. The card holds
no absolute path: a path on the exporting machine means nothing on the Hub, so paths are shown
by their last component (`portable`).
"""

from __future__ import annotations

import json
import re

# An absolute POSIX path (not a URL's //host part): keep its last component only.
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"`,;)\]}]+/)*([^\s/'\"`,;)\]}]+)/?")


def portable(text: str) -> str:
    """`text` with every absolute path replaced by its last component ("/tmp/x/run/final" -> "final")."""
    return _ABS_PATH.sub(r"\1", text)


def front_matter(*, base_model: str | None, license: str | None, relation: str | None, library: str,
                 tags: list[str]) -> list[str]:
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {base_model}")
        if relation:
            lines.append(f"base_model_relation: {relation}")
    lines += [f"license: {license or 'other'}", f"library_name: {library}", "pipeline_tag: text-generation",
              "tags:"] + [f"- {t}" for t in tags] + ["---"]
    return lines


def _probe_section(name: str, rep: dict) -> list[str]:
    from memsurgery.probe.report import summary_markdown

    lines = ["", f"## Probe: {name}", ""] + summary_markdown(rep)
    lines.append(f"Full report: `reports/{name}/report.html` (and `report.md`, `report.json`, `samples.jsonl`).")
    return lines


def model_card(name: str, provenance: dict, reports: dict[str, dict]) -> str:
    """README.md of a merged export."""
    origin = provenance.get("origin") or {}
    grafted = provenance["grafted"]
    lines = front_matter(base_model=origin.get("base_model"), license=origin.get("license"),
                         relation="finetune" if provenance.get("training") or grafted else None,
                         library="transformers", tags=["memsurgery"] + (["memory-layers", "product-key-memory"]
                                                                        if grafted else []))
    load = (["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)', "```"]
            if grafted else
            ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```"])
    lines += ["", f"# {name}", "",
              "Exported by memsurgery: a Hugging Face checkpoint"
              + (" with a grafted shared product-key memory (Memory+)." if grafted else "."), ""] + load
    if grafted:
        lines += ["", "The memory layers are remote code shipped beside the weights (`modeling_memsurgery.py`, "
                      "plain PyTorch): loading needs `trust_remote_code=True`; the tokenizer is a standard one."]
    for rname, rep in reports.items():
        lines += _probe_section(rname, rep)
    lines += ["", "## Provenance", ""] + _provenance_lines(provenance)
    train = provenance.get("training")
    if train and train.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", portable(train["recipe"]).rstrip(), "```"]
    lines += ["", "Every file's SHA-256 is in `SHA256SUMS` (`sha256sum -c SHA256SUMS`).", ""]
    return "\n".join(lines)


def _provenance_lines(provenance: dict) -> list[str]:
    origin = provenance.get("origin") or {}
    lines = [f"- base model: {origin.get('base_model') or 'not recorded'}"
             + ("" if origin.get("license") else " (license not recorded: see the base model's terms)"),
             f"- source: `{portable(provenance['source'])}`, weights SHA-256 `{provenance['source_sha256']}`",
             f"- dtype: {provenance['dtype']}"]
    graft = provenance.get("graft")
    if graft:
        plan = {k: v for k, v in (graft.get("plan") or {}).items() if v is not None}
        lines += [f"- graft: layers {graft.get('layers')}, mode {graft.get('mode')}, {plan.get('slots')} slots; "
                  f"base weights SHA-256 `{graft.get('source_sha256')}`",
                  f"- graft plan: `{portable(json.dumps(plan, sort_keys=True))}`"]
    train = provenance.get("training")
    if train:
        lines.append(f"- training run: `{portable(train['run_dir'])}`, steps: {train.get('steps', 'unknown')}")
    return lines


def adapter_card(name: str, meta: dict, reports: dict[str, dict]) -> str:
    """README.md of a memory-adapter export (the memory alone, over an unchanged base)."""
    base = meta.get("base_model")
    lines = front_matter(base_model=base, license=meta.get("license"), relation="adapter", library="memsurgery",
                         tags=["memsurgery", "memory-layers", "product-key-memory", "memory-adapter"])
    m = meta["memory"]
    lines += ["", f"# {name}", "",
              "A memsurgery memory adapter: the shared product-key memory (value table, queries, keys, gates) "
              f"of a graft, as a delta over an unchanged base model ({base or 'see memory_adapter.json'}).", "",
              f"- memory: {m['config']['slots']:,} slots, {m['mode']} mode at layers {m['layers']}; "
              f"{meta['parameters']:,} parameters in `memory_adapter.safetensors`",
              f"- base weights SHA-256 (checked on load): `{meta['base_weights_sha256']}`", "",
              "```python", "from memsurgery.export import load_memory_adapter",
              f'model = load_memory_adapter("{base or "BASE_MODEL_DIR"}", "{name}")', "```", "",
              f"or `memsurgery export {name} MERGED_DIR --base {base or 'BASE_MODEL_DIR'}` for a merged "
              "checkpoint that loads with transformers alone."]
    for rname, rep in reports.items():
        lines += _probe_section(rname, rep)
    lines += ["", "Every file's SHA-256 is in `SHA256SUMS`.", ""]
    return "\n".join(lines)
