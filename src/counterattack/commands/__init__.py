"""The commands that run something: one module each, with ``run(config, group, device)``.

``config`` is the frozen ``RunConfig`` the command line built (every default in it), ``group`` the
process group (torchrun's, or this process alone) and ``device`` this process's device. What the
commands share (loading, the resumable stores, writing results) is in ``context``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

def command(name: str) -> Callable[..., Any]:
    """The ``run`` function of a command (imported only when it runs: torch and the model code are heavy)."""
    return importlib.import_module(f"{__name__}.{name}").run
