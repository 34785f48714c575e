"""Fuzz the safetensors header parser: any bytes either parse or raise a one-line InputError.

Beyond "never crashes", every file the parser accepts must also load with the
real `safetensors` library — otherwise our checks are weaker than the loader's
and a bad file would fail later with an unfriendly error.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memsurgery.checkpoint.safetensors_header import DTYPE_BITS, read_safetensors_header
from memsurgery.errors import InputError

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_DIR = Path(tempfile.mkdtemp(prefix="memsurgery-fuzz-"))
_PATH = _DIR / "fuzz.safetensors"

# dtypes torch can materialise, so the cross-check with safetensors' loader can run.
_LOADABLE = ["F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F64"]


def _check(data: bytes) -> dict | None:
    """Parse `data` as a file; assert the outcome is a header or a clean InputError."""
    _PATH.write_bytes(data)
    try:
        header, start = read_safetensors_header(_PATH)
    except InputError as exc:
        msg = str(exc)
        assert msg.startswith(str(_PATH) + ": "), msg
        assert "\n" not in msg and "\r" not in msg
        return None
    assert isinstance(header, dict) and 8 <= start <= len(data)
    return header


def _loads_in_safetensors(header: dict) -> None:
    """A header we accepted must be accepted by the real loader too."""
    from safetensors import safe_open

    with safe_open(str(_PATH), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
            if header[name]["dtype"] in _LOADABLE:
                fh.get_tensor(name)


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data):
    _check(data)


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=2**64 - 1))
def test_arbitrary_header_with_any_length(body, length):
    _check(struct.pack("<Q", length) + body)


def _header_bytes(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


_dims = st.lists(st.integers(min_value=-2, max_value=6), max_size=3)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=5), st.integers()),
        "shape": st.one_of(_dims, st.text(max_size=3), st.booleans()),
        "data_offsets": st.one_of(
            st.lists(st.integers(min_value=-4, max_value=80), min_size=0, max_size=3),
            st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=2),
        ),
    },
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=6), _entry, max_size=4),
    st.one_of(
        st.none(),
        st.dictionaries(
            st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()), max_size=2
        ),
    ),
    st.integers(min_value=0, max_value=100),
)
def test_structured_headers(entries, metadata, data_len):
    obj: dict = dict(entries)
    if metadata is not None:
        obj["__metadata__"] = metadata
    header = _check(_header_bytes(obj) + bytes(data_len))
    if header is not None:
        _loads_in_safetensors(header)


_ITEM_BYTES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F64": 8,
}
_perturbation = st.one_of(
    st.tuples(
        st.just("offset"),
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=0, max_value=1),
        st.integers(min_value=-9, max_value=9),
    ),
    st.tuples(
        st.just("shape"),
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=0, max_value=2),
        st.integers(min_value=-1, max_value=3),
    ),
    st.tuples(
        st.just("dtype"),
        st.integers(min_value=0, max_value=3),
        st.sampled_from(_LOADABLE),
        st.just(0),
    ),
    st.tuples(st.just("data"), st.integers(min_value=-9, max_value=9), st.just(0), st.just(0)),
    st.tuples(st.just("meta"), st.sampled_from([1, None, "x", ["x"]]), st.just(0), st.just(0)),
)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_LOADABLE), st.lists(st.integers(min_value=0, max_value=4), max_size=3)
        ),
        min_size=1,
        max_size=4,
    ),
    st.lists(_perturbation, max_size=2),
)
def test_near_valid_headers_agree_with_safetensors(tensors, perturbations):
    """Well-formed files with small perturbations: we accept exactly what the real loader accepts."""
    from safetensors import safe_open

    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for i, (dtype, shape) in enumerate(tensors):
        n = _ITEM_BYTES[dtype] * (0 if 0 in shape else __import__("math").prod(shape))
        header[f"t{i}"] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    data_len = pos
    for kind, a, b, c in perturbations:
        entry = header.get(f"t{a % len(tensors)}") if isinstance(a, int) else None
        if kind == "offset":
            entry["data_offsets"][b] += c
        elif kind == "shape" and entry["shape"]:
            entry["shape"][b % len(entry["shape"])] += c
        elif kind == "dtype":
            entry["dtype"] = b
        elif kind == "data":
            data_len = max(0, data_len + a)
        elif kind == "meta":
            header["__metadata__"] = {"format": a} if a != ["x"] else a
    ours = _check(_header_bytes(header) + bytes(data_len)) is not None
    try:
        with safe_open(str(_PATH), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                fh.get_tensor(name)
        theirs = True
    except Exception:  # noqa: BLE001 - any refusal by the library
        theirs = False
    assert ours == theirs, (header, data_len)


@pytest.fixture(scope="module")
def valid_bytes(small_safetensors) -> bytes:
    return small_safetensors.read_bytes()


_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=8)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("length"), st.integers(min_value=-16, max_value=16), st.just(0)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for kind, pos, arg in mutations:
        if kind == "length":
            if len(buf) < 8:
                continue
            n = struct.unpack("<Q", bytes(buf[:8]))[0]
            buf[:8] = struct.pack("<Q", max(0, n + pos))
            continue
        pos = pos % max(1, min(len(buf), header_end))  # aim at the length field and the header JSON
        if kind == "set" and buf:
            buf[pos] = arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@FUZZ
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_valid_file(valid_bytes, mutations):
    header = _check(_mutate(valid_bytes, mutations))
    if header is not None:
        _loads_in_safetensors(header)


def test_unmutated_file_is_accepted(valid_bytes):
    header = _check(valid_bytes)
    assert header is not None and set(header) == {"__metadata__", "a", "b", "c"}
    _loads_in_safetensors(header)
