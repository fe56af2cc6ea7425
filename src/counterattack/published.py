"""Numbers other papers printed for TTC and the defenses around it, so a run can be held against them.

The data ship with the package as ``counterattack/data/published.json``: one record per printed number
pair (clean %, robust %), with the paper it was read from. It was transcribed by a script kept with the
project's test assets (``shared/data/published/build.py``), which shows where each number came from
(table, figure, the order a paper's columns were read in); rerun it there and copy the JSON here to
change the data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CounterattackError

DEFAULT_PATH = Path(__file__).with_name("data") / "published.json"

# MAC's and DBD's 10 fine-grained datasets (their averages are over these).
FINE_GRAINED10: tuple[str, ...] = ("caltech101", "dtd", "flowers102", "oxford_pets", "ucf101", "fgvc_aircraft",
                                   "eurosat", "stanford_cars", "sun397", "food101")
AVERAGE16 = "average16"
AVERAGE10_FINE_GRAINED = "average10-fine-grained"
AVERAGE_KEYS = (AVERAGE16, AVERAGE10_FINE_GRAINED)

_RECORD_KEYS = ("source", "model", "backbone", "defense", "attack", "eps", "steps", "dataset", "clean", "robust")
_TAU_KEYS = ("source", "model", "backbone", "dataset", "noise_eps", "tau_clean", "tau_adv", "precision")
_VENUE = re.compile(r"\b(AAAI|NeurIPS|CVPR|ICCV|ECCV|ICLR|ICML|TPAMI|arXiv)\s+(\d{4})\b")


@dataclass(frozen=True)
class Source:
    """A paper numbers were read from; ``primary`` is the TTC paper itself, the others re-ran TTC."""

    key: str
    cite: str
    primary: bool

    @property
    def label(self) -> str:
        return describe_source(self)


@dataclass(frozen=True)
class PublishedRecord:
    """One printed (clean, robust) pair in percent; ``eps`` in 1/255, ``clean`` None where not printed.

    ``dataset`` is a registry name or an average key (``average16``, ``average10-fine-grained``).
    """

    source: str
    model: str
    backbone: str
    defense: str
    attack: str
    eps: float
    steps: int
    dataset: str
    clean: float | None
    robust: float


@dataclass(frozen=True)
class PublishedTau:
    """The poster's mean tau of clean and adversarial images under uniform noise of ``noise_eps``/255."""

    source: str
    model: str
    backbone: str
    dataset: str
    noise_eps: float
    tau_clean: float
    tau_adv: float
    precision: str


@dataclass(frozen=True)
class Published:
    """Everything published.json holds, checked: sources by key, the TTC paper's 16 datasets, the records."""

    sources: dict[str, Source]
    datasets16: tuple[str, ...]
    records: tuple[PublishedRecord, ...]
    tau: tuple[PublishedTau, ...]
    about: str = ""

    def average_scope(self, key: str) -> tuple[str, ...]:
        """The datasets a published average is taken over (an empty tuple for a key that is no average)."""
        return {AVERAGE16: self.datasets16, AVERAGE10_FINE_GRAINED: FINE_GRAINED10}.get(key, ())


def describe_source(source: Source) -> str:
    """A source in a few words, saying whether it is the TTC paper or a re-run of TTC by other authors:
    every table with a published number names it this way, so a re-run is never taken for the original."""
    if source.primary:
        return f"TTC {'poster' if 'poster' in source.cite.lower() else 'paper'} (primary)"
    name = re.match(r"\s*([A-Za-z0-9][\w-]*)\s*[:,(]", source.cite)
    venue = _VENUE.search(source.cite)
    who = f"{name.group(1)}'s authors" if name else f"the authors of {source.key}"
    return f"re-run of TTC by {who}" + (f" ({venue.group(1)} {venue.group(2)})" if venue else "")


class _Malformed(Exception):
    pass


def _field(entry: dict, key: str, where: str) -> Any:
    if key not in entry:
        raise _Malformed(f"{where} has no {key!r}")
    return entry[key]


def _text(entry: dict, key: str, where: str) -> str:
    value = _field(entry, key, where)
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _number(entry: dict, key: str, where: str, low: float, high: float, optional: bool = False) -> float | None:
    value = _field(entry, key, where)
    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        raise _Malformed(f"{where}: {key!r} must be a number from {low:g} to {high:g}{' or null' if optional else ''}, "
                         f"got {value!r}")
    return float(value)


def _record(entry: Any, where: str, sources: dict[str, Source]) -> PublishedRecord:
    if not isinstance(entry, dict):
        raise _Malformed(f"{where} is not an object")
    source = _text(entry, "source", where)
    if source not in sources:
        raise _Malformed(f"{where}: source {source!r} is not among the sources ({', '.join(sources)})")
    steps = _field(entry, "steps", where)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise _Malformed(f"{where}: 'steps' must be a positive integer, got {steps!r}")
    return PublishedRecord(source=source, model=_text(entry, "model", where), backbone=_text(entry, "backbone", where),
                           defense=_text(entry, "defense", where), attack=_text(entry, "attack", where),
                           eps=_number(entry, "eps", where, 0, 255), steps=steps,
                           dataset=_text(entry, "dataset", where),
                           clean=_number(entry, "clean", where, 0, 100, optional=True),
                           robust=_number(entry, "robust", where, 0, 100))


def _tau(entry: Any, where: str, sources: dict[str, Source]) -> PublishedTau:
    if not isinstance(entry, dict):
        raise _Malformed(f"{where} is not an object")
    source = _text(entry, "source", where)
    if source not in sources:
        raise _Malformed(f"{where}: source {source!r} is not among the sources ({', '.join(sources)})")
    return PublishedTau(source=source, model=_text(entry, "model", where), backbone=_text(entry, "backbone", where),
                        dataset=_text(entry, "dataset", where), noise_eps=_number(entry, "noise_eps", where, 0, 255),
                        tau_clean=_number(entry, "tau_clean", where, -math.inf, math.inf),
                        tau_adv=_number(entry, "tau_adv", where, -math.inf, math.inf),
                        precision=_text(entry, "precision", where))


def _list(data: dict, key: str) -> list:
    value = _field(data, key, "the file")
    if not isinstance(value, list):
        raise _Malformed(f"{key!r} must be a list, got {type(value).__name__}")
    return value


def _parse(data: Any) -> Published:
    if not isinstance(data, dict):
        raise _Malformed(f"the top level must be an object, got {type(data).__name__}")
    raw_sources = _field(data, "sources", "the file")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise _Malformed("'sources' must be a non-empty object")
    sources = {}
    for key, entry in raw_sources.items():
        where = f"sources[{key!r}]"
        if not isinstance(entry, dict):
            raise _Malformed(f"{where} is not an object")
        primary = _field(entry, "primary", where)
        if not isinstance(primary, bool):
            raise _Malformed(f"{where}: 'primary' must be true or false, got {primary!r}")
        sources[key] = Source(key=key, cite=_text(entry, "cite", where), primary=primary)
    datasets16 = _list(data, "datasets16")
    if len(datasets16) != 16 or len(set(datasets16)) != 16 or not all(isinstance(d, str) and d for d in datasets16):
        raise _Malformed(f"'datasets16' must list 16 distinct dataset names, got {datasets16!r}")
    records = tuple(_record(entry, f"records[{i}]", sources) for i, entry in enumerate(_list(data, "records")))
    seen: dict[tuple, int] = {}
    for i, r in enumerate(records):
        key = (r.source, r.model, r.backbone, r.defense, r.attack, r.eps, r.steps, r.dataset)
        if key in seen:
            raise _Malformed(f"records[{i}] repeats records[{seen[key]}] (same source, model, backbone, defense, "
                             "attack, budget, steps and dataset)")
        seen[key] = i
    tau = tuple(_tau(entry, f"tau[{i}]", sources) for i, entry in enumerate(_list(data, "tau")))
    about = data.get("about", "")
    return Published(sources=sources, datasets16=tuple(datasets16), records=records, tau=tau,
                     about=about if isinstance(about, str) else "")


def load_published(path: Path | None = None) -> Published:
    """Read and check published.json (the package's copy unless ``path`` is given).

    The file is checked whole before anything uses it, so a transcription slip (a missing field, a robust
    accuracy of 350, a record naming an unknown source) fails here with the file and the entry named,
    not later as a wrong comparison. The numbers were transcribed by ``shared/data/published/build.py``
    (in the project's test assets), which records where in each paper every number was read.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise CounterattackError(f"Published numbers not found: {path} does not exist or is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CounterattackError(f"Cannot read the published numbers in {path}: {reason}.") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CounterattackError(f"{path} is not JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from e
    try:
        return _parse(data)
    except _Malformed as e:
        raise CounterattackError(f"{path} is not a valid published-numbers file: {e}.") from None
