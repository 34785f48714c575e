"""CLI commands that live in their own modules; each exposes `register(app)`.

Kept out of cli.py so that each command's flags sit next to the code they drive,
and every heavy import stays inside the command function (fast `--help`).
"""
