"""The words every command shares: dtype names, devices, and the default memory shape.

One spelling each, so `--dtype`, `--value-dtype`, a recipe's `train.precision` and the
library calls all read the same way:

    dtype   float32 | bfloat16 | float16   (torch's own names; fp32 / bf16 / fp16 are accepted
                                            as aliases and normalized)
    device  auto | cpu | cuda              (auto: cuda when a GPU is visible, else cpu;
                                            cuda:N names one GPU)

Kept free of heavy imports: the CLI reads the defaults below while building `--help`.
"""

from __future__ import annotations

from memsurgery.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"

# The memory `graft` grafts and `inspect` prices when no flag says otherwise (one place,
# so the estimate describes what the graft would build). 1M slots = 1024^2 is the
# Memory+ design point; small models usually pass --slots 64K.
DEFAULT_SLOTS = 1 << 20
DEFAULT_HEADS = 4
DEFAULT_KNN = 32
DEFAULT_K_DIM = 256


def canonical_dtype(name: str, flag: str = "--dtype", allowed: tuple[str, ...] = DTYPES) -> str:
    """'bf16' -> 'bfloat16'; InputError naming `flag` for anything outside `allowed`."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        aliases = ", ".join(f"{a} = {c}" for a, c in DTYPE_ALIASES.items() if c in allowed and a != "half")
        raise InputError(f"{flag} {name}: choose {' | '.join(allowed)}" + (f" (aliases: {aliases})" if aliases else ""))
    return key


def torch_dtype(name: str, flag: str = "--dtype", allowed: tuple[str, ...] = DTYPES):
    """The torch dtype for a dtype name or alias."""
    import torch

    return getattr(torch, canonical_dtype(name, flag, allowed))


def resolve_device(name: str = DEFAULT_DEVICE, flag: str = "--device"):
    """torch.device for auto | cpu | cuda | cuda:N; InputError when CUDA is asked for and absent."""
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise InputError(f"{flag} {name}: choose auto, cpu or cuda (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{flag} {name}: no CUDA device is available; use {flag} cpu or auto")
    return torch.device(name)
