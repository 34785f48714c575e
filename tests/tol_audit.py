"""Tolerance audit (a pytest plugin, off by default): how close each float comparison comes
to its tolerance.

    MEMSURGERY_TOL_AUDIT=/tmp/audit.jsonl python -m pytest -p tests.tol_audit ...

wraps torch.testing.assert_close, torch.allclose and pytest.approx's scalar comparison and
appends, per call, the test, the calling line and `ratio` = max over elements of
|actual - expected| / (atol + rtol * |expected|): 1.0 is exactly at the tolerance. Run it
under other CPU code paths (ATEN_CPU_CAPABILITY=default / avx2, 2 threads) and compare the
worst ratio per line: a tolerance that follows from the operation's error keeps every
ratio well below 1 everywhere.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

_PATH = os.environ.get("MEMSURGERY_TOL_AUDIT")
_RECORDS: list[dict] = []
_CURRENT = {"test": None}


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/tests/" in name and not name.endswith("tol_audit.py"):
            return f"{os.path.relpath(name)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _ratio(actual, expected, rtol, atol) -> tuple[float, float]:
    import torch

    a = torch.as_tensor(actual).detach()
    b = torch.as_tensor(expected).detach()
    if a.is_sparse:
        a = a.to_dense()
    if b.is_sparse:
        b = b.to_dense()
    a, b = torch.broadcast_tensors(a.double(), b.double())
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - b).abs()
    finite = torch.isfinite(diff)
    diff = torch.where(finite, diff, torch.zeros_like(diff))
    tol = atol + rtol * b.abs()
    ratio = torch.where(tol > 0, diff / tol.clamp_min(1e-300), torch.where(diff > 0, torch.inf, 0.0))
    return float(ratio.max()), float(diff.max())


def _record(kind: str, actual, expected, rtol, atol) -> None:
    try:
        ratio, diff = _ratio(actual, expected, rtol, atol)
    except Exception:  # non-tensor inputs (dicts, lists of tensors, ...): not audited
        return
    _RECORDS.append({"test": _CURRENT["test"], "site": _site(), "kind": kind, "ratio": ratio,
                     "max_abs_diff": diff, "rtol": rtol, "atol": atol})


def pytest_configure(config):
    if not _PATH:
        return
    import torch
    try:
        from _pytest import approx as python_api
    except ImportError:  # pytest < 9
        from _pytest import python_api

    orig_close = torch.testing.assert_close
    orig_allclose = torch.allclose

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
        if rtol is None or atol is None:
            from torch.testing._comparison import default_tolerances

            try:
                r, a = default_tolerances(torch.as_tensor(actual), torch.as_tensor(expected))
            except Exception:
                r, a = 0.0, 0.0
            rtol = r if rtol is None else rtol
            atol = a if atol is None else atol
        _record("assert_close", actual, expected, rtol, atol)
        return orig_close(actual, expected, *args, rtol=rtol, atol=atol, **kw)

    def allclose(input, other, rtol=1e-5, atol=1e-8, equal_nan=False):
        _record("allclose", input, other, rtol, atol)
        return orig_allclose(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)

    orig_eq = python_api.ApproxScalar.__eq__

    def approx_eq(self, actual):
        try:
            tol = self.tolerance
            diff = abs(actual - self.expected)
            ratio = diff / tol if tol > 0 else (0.0 if diff == 0 else float("inf"))
            _RECORDS.append({"test": _CURRENT["test"], "site": _site(), "kind": "approx",
                             "ratio": float(ratio), "max_abs_diff": float(diff), "tol": float(tol)})
        except Exception:
            pass
        return orig_eq(self, actual)

    from tests import numerics

    orig_normwise = numerics.assert_close_normwise

    def assert_close_normwise(actual, expected, rtol, msg="", norm="max"):
        try:
            diff, scale = numerics.normwise_error(actual, expected, norm)
            bound = rtol * scale + torch.finfo(torch.float32).tiny
            _RECORDS.append({"test": _CURRENT["test"], "site": _site(), "kind": f"normwise-{norm}",
                             "ratio": diff / bound, "max_abs_diff": diff, "tol": bound, "msg": msg})
        except Exception:
            pass
        return orig_normwise(actual, expected, rtol, msg, norm)

    numerics.assert_close_normwise = assert_close_normwise
    torch.testing.assert_close = assert_close
    torch.allclose = allclose
    python_api.ApproxScalar.__eq__ = approx_eq


def pytest_collection_finish(session):
    """tests/unit/test_embedding_bag.py has its own assert_close (max diff <= atol OR relative
    RMS error <= rtol): record min(diff / atol, rel / rtol), its distance to failing."""
    if not _PATH:
        return
    mod = sys.modules.get("tests.unit.test_embedding_bag")
    if mod is None or getattr(mod.assert_close, "_audited", False):
        return
    orig = mod.assert_close

    def assert_close(name, ref, got, rtol, atol):
        try:
            wide = mod._wide
            diff = (wide(ref) - wide(got)).abs().max().item() if ref.numel() else 0.0
            rel = mod.rel_err(ref, got) if ref.numel() else 0.0
            ratio = min(diff / atol if atol else float("inf"), rel / rtol if rtol else float("inf"))
            _RECORDS.append({"test": _CURRENT["test"], "site": _site(), "kind": "bag_assert_close",
                             "ratio": ratio, "max_abs_diff": diff, "rel_rms": rel, "rtol": rtol, "atol": atol})
        except Exception:
            pass
        return orig(name, ref, got, rtol, atol)

    assert_close._audited = True
    mod.assert_close = assert_close


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _CURRENT["test"] = item.nodeid
    yield
    _CURRENT["test"] = None


def pytest_sessionfinish(session):
    if not _PATH or not _RECORDS:
        return
    import torch

    env = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    with open(_PATH, "a") as fh:
        for r in _RECORDS:
            fh.write(json.dumps({**env, **r}) + "\n")
