"""What the command line needs of the registered defenses and attacks, without importing them.

Flags, help, bounds, listings and the conversion of budgets come from each class's ``option(...)``
fields; reading those means importing the registries, and with them torch and open_clip (seconds).
The same facts are kept as plain data in a cache keyed by the package's source files (their names,
sizes and modification times), built once per change of the code, so ``counterattack --help`` or a
mistyped flag answers without loading a model library. Where the registries are already imported
(a library user, a test, a running command) they are read directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
KINDS = ("defense", "attack", "adaptive")
_LOADED_MARK = "counterattack.defenses"  # once imported, the live registries are the truth


@dataclass(frozen=True)
class OptionSpec:
    """One option of a registered class, as the command line uses it."""

    name: str
    default: Any
    help: str
    unit: str | None
    low: float | None
    high: float | None
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]
    integer: bool


@dataclass(frozen=True)
class EntrySpec:
    """A registered class: its listing line, its options and what a listing adds (a defense's paper precision)."""

    summary: str
    options: tuple[OptionSpec, ...]
    paper_precision: str | None = None


def option_spec(field: Any) -> OptionSpec:
    """An ``option(...)`` dataclass field as plain data."""
    meta = field.metadata
    default = field.default
    return OptionSpec(field.name, default, meta["help"], meta["unit"], meta["low"], meta["high"],
                      tuple(meta["choices"]) if meta["choices"] is not None else None, tuple(meta["aliases"]),
                      isinstance(default, int) and not isinstance(default, bool))


def _live() -> dict[str, dict[str, EntrySpec]]:
    from .adaptive import AdaptiveAttack
    from .attacks import ATTACKS
    from .defenses import DEFENSES
    from .options import options_of

    def entry(cls: type, summary: str, kind: str) -> EntrySpec:
        return EntrySpec(summary, tuple(option_spec(f) for f in options_of(cls)),
                         cls.paper_precision if kind == "defense" else None)

    adaptive_summary = (AdaptiveAttack.__doc__ or "").strip().splitlines()[0]
    return {"defense": {name: entry(cls, DEFENSES.summary(name), "defense") for name, cls in DEFENSES.items()},
            "attack": {name: entry(cls, ATTACKS.summary(name), "attack") for name, cls in ATTACKS.items()},
            "adaptive": {"adaptive": entry(AdaptiveAttack, adaptive_summary, "adaptive")}}


def _source_key() -> str:
    """Changes whenever a source file of the package changes (an added defense is a new file)."""
    from . import __version__

    digest = hashlib.sha256(__version__.encode())
    for root, _, names in sorted(os.walk(PACKAGE)):
        for name in sorted(names):
            if name.endswith(".py"):
                stat = os.stat(os.path.join(root, name))
                relative = os.path.relpath(os.path.join(root, name), PACKAGE)
                digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cache_file() -> Path:
    from .fingerprints import cache_path

    return cache_path().with_name(f"registry-{_source_key()}.json")


def _decode(data: dict) -> dict[str, dict[str, EntrySpec]]:
    return {kind: {name: EntrySpec(entry["summary"], tuple(
        OptionSpec(**{**o, "choices": tuple(o["choices"]) if o["choices"] is not None else None,
                      "aliases": tuple(o["aliases"])}) for o in entry["options"]), entry["paper_precision"])
                   for name, entry in data[kind].items()} for kind in KINDS}


def registered() -> dict[str, dict[str, EntrySpec]]:
    """Every registered class's options by kind (``defense``, ``attack``, ``adaptive``) and name, in listing order."""
    if _LOADED_MARK in sys.modules:
        return _live()
    cache = _cache_file()
    try:
        return _decode(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    specs = _live()
    try:
        from .store import write_json_atomically

        write_json_atomically(cache, {kind: {name: asdict(entry) for name, entry in entries.items()}
                                      for kind, entries in specs.items()})
    except (OSError, ValueError):
        pass  # no cache: the next command reads the registries again
    return specs
