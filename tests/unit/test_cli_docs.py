"""docs/cli.md matches the CLI: every option of every command is documented with the default
`--help` shows, no documented flag is stale, help defaults come from the code, and the docs
point at nothing outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import typer

from memsurgery.cli import app
from tests.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "cli.md"
NO_DEFAULT = "–"


def _commands() -> dict[str, object]:
    """{"convert": command, "bench kernels": command, ...}; "" is the root (global options)."""
    root = typer.main.get_command(app)
    out = {"": root}

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            if hasattr(sub, "commands"):
                walk(sub, path + [name])
            else:
                out[" ".join(path + [name])] = sub

    walk(root, [])
    return out


def _options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option" and "--help" not in p.opts]


def expected_default(p) -> str:
    """What docs/cli.md must say: off for a flag, the default, or the help's "(default X)" words."""
    if p.is_flag:
        return "off"
    if p.default is not None and p.default != ():
        return str(p.default)
    m = re.search(r"\(default:? ([^)]*)\)", p.help or "")
    return m.group(1).strip() if m else NO_DEFAULT


def _doc_tables() -> dict[str, dict[str, str]]:
    """{command path: {flag: documented default}} from the `| flag | default | meaning |` tables."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in CLI_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip().strip("`")
            if title == "Global options":
                current = ""
            elif title.startswith("memsurgery "):
                words = []
                for w in title.split()[1:]:
                    if not re.fullmatch(r"[a-z][a-z-]*", w):
                        break
                    words.append(w)
                current = " ".join(words)
            else:
                current = None
            if current is not None:
                tables.setdefault(current, {})
        elif current is not None and line.startswith("| `-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for flag in re.findall(r"`(--[\w-]+)`", cells[0]):
                tables[current][flag] = cells[1].strip("`")
    return tables


def test_every_option_is_documented_with_its_default():
    docs, problems = _doc_tables(), []
    for path, cmd in _commands().items():
        if path not in docs:
            problems.append(f"{path or 'global options'}: no section in docs/cli.md")
            continue
        documented = dict(docs[path])
        for p in _options(cmd):
            want = expected_default(p)
            for flag in p.opts:
                got = documented.pop(flag, None)
                if got is None:
                    problems.append(f"{path} {flag}: not in docs/cli.md")
                elif got != want:
                    problems.append(f"{path} {flag}: docs say {got!r}, --help says {want!r}")
        problems += [f"{path} {flag}: documented but not an option" for flag in documented]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted(p for p in _commands() if p))
def test_help_shows_every_documented_flag_and_default(path, capsys):
    code, out, err = run_cli(path.split() + ["--help"], capsys)
    assert code == 0, err
    text = " ".join(out.split())  # rich wraps lines anywhere
    for flag, default in _doc_tables()[path].items():
        assert flag in text, f"{path}: {flag} missing from --help"
        if default not in ("off", NO_DEFAULT):
            assert f"[default: {default}]" in text or f"default {default})" in text or \
                f"default: {default})" in text, f"{path} {flag}: --help does not show {default!r}"


def test_help_defaults_come_from_the_code():
    from memsurgery import demo
    from memsurgery.commands._common import slots_text
    from memsurgery.graft.plan import GraftPlan
    from memsurgery.probe.signals import PRIMARY_SIGNAL

    cmds = _commands()
    opt = {path: {p.opts[0]: p for p in _options(cmd)} for path, cmd in cmds.items()}
    plan = GraftPlan()
    for flag, field in (("--slots", "slots"), ("--heads", "heads"), ("--knn", "knn"), ("--k-dim", "k_dim"),
                        ("--mode", "mode"), ("--keys", "keys"), ("--query-init", "query_init"),
                        ("--calib-tokens", "calib_tokens"), ("--heldout-tokens", "heldout_tokens"),
                        ("--distill-steps", "distill_steps"), ("--seed", "seed"), ("--value-dtype", "value_dtype")):
        value = getattr(plan, field)
        want = slots_text(value) if field == "slots" else str(value)
        assert expected_default(opt["graft"][flag]) == want, flag
        if flag in opt["inspect"]:  # inspect prices what graft would build
            assert expected_default(opt["inspect"][flag]) == want, flag
    assert expected_default(opt["probe"]["--signal"]) == PRIMARY_SIGNAL
    assert [opt["demo"][f].default for f in ("--people", "--steps", "--world-limit")] == \
        [demo.DEMO_PEOPLE, demo.DEMO_STEPS, demo.DEMO_WORLD_LIMIT]
    # one spelling of dtype and device everywhere
    for path, options in opt.items():
        if "--dtype" in options:
            assert options["--dtype"].default == "float32", path
        if "--device" in options and path != "train":
            assert options["--device"].default == "auto", path


def _tracked(*patterns) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split()]


def test_docs_and_code_cite_nothing_outside_the_repository():
    files = _tracked("*.md", "*.py", "*.yaml", "*.toml")
    assert len(files) > 50
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\bFIELD(\.md)? ?§|\bFIELD\.md\b", line)]
    assert not hits, hits
    broken = []
    for md in _tracked("*.md"):
        prose = re.sub(r"```.*?```|`[^`\n]*`", "", md.read_text(encoding="utf-8"), flags=re.S)  # links, not code
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken
