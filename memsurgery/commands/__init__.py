"""The CLI commands, a module per command (or group); memsurgery/cli.py registers them.

Each command is a plain function whose signature holds its flags and whose docstring is
its help: parse -> one library call -> render. Every heavy import stays inside the
function, so `memsurgery --help` stays fast. Shared pieces are in `_common`.
"""
