"""memsurgery: graft shared product-key memory layers into dense transformer checkpoints.

    import memsurgery
    model, report = memsurgery.graft("ckpt_dir", "out_dir", slots="1M", layers=[5, 15, 25])
"""

__version__ = "0.1.0"

# Light import (no torch): `memsurgery.graft` is both the subpackage and a callable.
from memsurgery import graft  # noqa: E402,F401
from memsurgery import _register  # noqa: E402

_register.install()
