"""`memsurgery version`."""

from __future__ import annotations


def version() -> None:
    """Print the memsurgery version."""
    from memsurgery import __version__

    print(__version__)
