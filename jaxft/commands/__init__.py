"""The `jaxft` subcommands that live outside `jaxft/cli.py`, one module per command or group.

Each module has `register(sub, command)`: `sub` is the top-level subparsers object and `command`
is cli's `_command(sub, name, func, *, config=False, **kw)` helper (CONFIG [--set K=V] when
`config`).  Handlers take the parsed arguments and return the exit status; they import the library
lazily so `jaxft --help` stays fast.  Errors are raised as exceptions: cli turns them into one line.
"""

from __future__ import annotations

import importlib

# In `jaxft --help` order.
MODULES = ("jaxft.commands.evaluate", "jaxft.commands.chat", "jaxft.commands.export", "jaxft.commands.vocab",
           "jaxft.commands.params", "jaxft.commands.plan")


def register_all(sub, command) -> None:
    for name in MODULES:
        importlib.import_module(name).register(sub, command)
