"""Strict, lazy parser for the header of a .safetensors file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
describing every tensor (dtype, shape, byte range in the data section), then the
raw tensor bytes. We parse the header ourselves instead of asking the
`safetensors` library because we want (a) the tensor table without mapping or
reading any tensor data and (b) one clean, actionable `InputError` for every
way a file can be damaged, instead of a Rust panic message or a bare
`SafetensorError`. The checks mirror what the `safetensors` loader enforces, so
a file that passes here also loads there.

Only the first 8 + N bytes of the file are ever read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from memsurgery.errors import InputError, one_line

# The library refuses headers above 100 MB; real ones are a few hundred KB.
MAX_HEADER_BYTES = 100_000_000

# Size in *bits* of one element of each dtype the safetensors format defines.
# Bits rather than bytes because the format has sub-byte float types.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

_FIX = "the file is truncated or corrupt — re-download or re-convert it"


def _q(name: str, limit: int = 80) -> str:
    """Quote a tensor name for a message: escaped (no raw newlines) and bounded in length."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes a tensor of `dtype` and `shape` occupies (sub-byte types round up, as the format does)."""
    return (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8


def _capped_numel(shape: list[int], cap: int) -> int:
    """Product of `shape`, or `cap + 1` once it exceeds `cap` (0 if any dimension is 0)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return cap + 1
    return n


def _shape_text(shape: list[int]) -> str:
    """Shape for a message, bounded in length."""
    text = "x".join(str(d) if d < 10**18 else "huge" for d in shape[:8]) or "scalar"
    return text + ("x..." if len(shape) > 8 else "")


def _is_int(value) -> bool:
    # JSON true/false decode to bool, which is an int subclass; a shape of [true] is garbage.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a repeated key would silently shadow a tensor, so refuse it."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """Read and validate the header of the safetensors file at `path`.

    Returns `(header, data_start)`: `header` is the decoded JSON object (tensor
    name -> {"dtype", "shape", "data_offsets"}, plus "__metadata__" if present),
    and `data_start` is the absolute file offset where the data section begins
    (tensor offsets are relative to it). Raises `InputError` naming the file and
    the problem for any malformed input; never reads tensor data.
    """
    path = Path(path)
    label = str(path)

    def fail(what: str, fix: str = _FIX) -> InputError:
        return InputError(one_line(f"{label}: {what}; {fix}"))

    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            if file_size < 8:
                raise fail(
                    f"file is {file_size} bytes, too short to hold the 8-byte safetensors header length"
                )
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise fail(
                    f"header length {n} bytes is absurd (limit {MAX_HEADER_BYTES}); "
                    "this is not a safetensors file or it is corrupt",
                    "re-download or re-convert it",
                )
            if n > file_size - 8:
                raise fail(
                    f"header length {n} bytes is more than the {file_size - 8} bytes that follow it"
                )
            raw = fh.read(n)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(
            one_line(
                f"{label}: cannot read file ({exc.strerror or exc}); check the path and permissions"
            )
        ) from None
    if len(raw) != n:  # the file shrank under us
        raise fail(f"header is {len(raw)} bytes, expected {n}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 (byte {exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise fail(f"header names tensor {_q(exc.key)} twice") from None
    except RecursionError:
        raise fail("header JSON is nested too deeply to be a safetensors header") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise fail(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, expected an object of tensors")

    data_start = 8 + n
    _validate_entries(header, file_size - data_start, fail)
    return header, data_start


def _validate_entries(header: dict, data_size: int, fail) -> None:
    """Check every entry of a decoded header against the format and the data section size."""
    if "__metadata__" in header:
        meta = header["__metadata__"]
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise fail("__metadata__ must map strings to strings")

    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        t = _q(name)
        if not isinstance(entry, dict):
            raise fail(
                f"tensor {t} entry is a {type(entry).__name__}, "
                "expected an object with dtype, shape and data_offsets"
            )
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise fail(f"tensor {t} has no {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise fail(f"tensor {t} dtype is not a string")
        if dtype not in DTYPE_BITS:
            raise fail(
                f"tensor {t} has unknown dtype {_q(dtype, 24)}",
                "the file is corrupt or written by a newer safetensors — re-convert it",
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"tensor {t} shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise fail(f"tensor {t} data_offsets must be a list of two integers")
        begin, end = offsets
        if begin < 0 or end < 0:
            raise fail(f"tensor {t} has negative data offsets [{begin}, {end}]")
        if begin > end:
            raise fail(f"tensor {t} data offsets are reversed [{begin}, {end}]")
        if end > data_size:
            raise fail(
                f"tensor {t} data runs past the end of the file (offset {end} > {data_size} bytes)"
            )
        # Cap the element count: a hostile shape of huge numbers must not turn
        # into a slow bignum product; anything beyond the file cannot match anyway.
        numel = _capped_numel(shape, cap=8 * data_size + 8)
        want_bits = numel * DTYPE_BITS[dtype]
        if want_bits % 8 or want_bits // 8 != end - begin:
            need = f"{want_bits // 8}" if numel <= 8 * data_size else "more than the file's"
            raise fail(
                f"tensor {t} holds {end - begin} bytes but shape {_shape_text(shape)} of {dtype} "
                f"needs {need} bytes"
            )
        spans.append((begin, end, name))

    # The data section must be tiled exactly: no overlaps (two tensors reading
    # the same bytes), no holes and no trailing bytes (the loader rejects both).
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise fail(
                f"tensor {_q(name)} overlaps tensor {_q(prev)} in the data section (offset {begin} < {pos})"
            )
        if begin > pos:
            raise fail(
                f"{begin - pos} unused bytes before tensor {_q(name)} in the data section (offset {pos})"
            )
        pos, prev = end, name
    if pos != data_size:
        raise fail(f"{data_size - pos} bytes after the last tensor are not described by the header")


def tensor_table(header: dict) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """`{name: (dtype, shape, nbytes)}` for every tensor of a validated header, in file order."""
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = (entry["dtype"], tuple(entry["shape"]), end - begin)
    return out
