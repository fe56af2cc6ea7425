"""Class descriptions: sentences about each class written by a language model, read from a file the user gives.

DBD builds its classifier from CuPL's descriptions and COLA transports image views onto AWT's. Those texts
are their authors' and are not shipped here: ``--descriptions PATH`` names a JSON file mapping class names to
lists of sentences (the layout CuPL and AWT publish), or a folder of such files named by dataset
(``cifar10.json``, ``dtd.json``, ...). A class is found under its name as the classifier names it, or the
same name ignoring case, underscores and surrounding spaces.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CounterattackError

WHERE_TO_GET = ("CuPL's files (github.com/sarahpratt/CuPL, e.g. CuPL_prompts_imagenet.json) or AWT's "
                "(github.com/MCG-NJU/AWT, one JSON file per dataset), or write your own: a JSON object mapping each "
                "class name to a list of sentences")

Descriptions = dict[str, list[str]]
log = logging.getLogger(__name__)


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def descriptions_file(path: Path, dataset: str) -> Path:
    """The file that describes ``dataset``'s classes: ``path`` itself, or in a folder ``DATASET.json`` (an image
    folder's by its short name, ``cifar10/test`` as ``cifar10_test.json`` or ``cifar10.json``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CounterattackError(f"--descriptions {path}: no such file or folder. It should hold {WHERE_TO_GET}.")
    from .data import short_name

    short = short_name(dataset)
    candidates = [path / f"{name}.json" for name in (dataset, short.replace("/", "_"), short.split("/")[0])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CounterattackError(f"--descriptions {path} is a folder without a file for {short} (looked for "
                             f"{', '.join(c.name for c in dict.fromkeys(candidates))}).")


def read_descriptions(path: Path) -> Descriptions:
    """A descriptions file's content, checked: a JSON object of class names to non-empty lists of sentences."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CounterattackError(f"--descriptions {path} cannot be read as JSON ({exc}).") from None
    if not isinstance(content, dict) or not content:
        raise CounterattackError(f"--descriptions {path} is not a JSON object mapping class names to sentences.")
    bad = [name for name, sentences in content.items()
           if not isinstance(sentences, list) or not all(isinstance(s, str) and s.strip() for s in sentences)]
    if bad:
        raise CounterattackError(f"--descriptions {path}: the entries of {', '.join(map(repr, bad[:5]))} are not "
                                 "lists of sentences.")
    return content


def file_digest(path: Path) -> str:
    """The content's identity: a run's numbers depend on the sentences, not on where the file lies."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def for_classes(descriptions: Mapping[str, Sequence[str]], class_names: Sequence[str], needed: int, who: str,
                source: str = "--descriptions") -> Descriptions:
    """The sentences of each of ``class_names``; classes the file lacks, or with fewer than ``needed`` sentences,
    are refused, naming them (``who`` is the method that needs them)."""
    by_key: dict[str, list[str]] = {}
    for name, sentences in descriptions.items():
        by_key.setdefault(_key(name), list(sentences))
    missing = [name for name in class_names if _key(name) not in by_key]
    if missing:
        shown = ", ".join(map(repr, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CounterattackError(f"{who} needs descriptions of every class; {source} has none for {shown}.")
    short = [(name, len(by_key[_key(name)])) for name in class_names if len(by_key[_key(name)]) < needed]
    if short:
        shown = ", ".join(f"{name!r} ({count})" for name, count in short[:8])
        raise CounterattackError(f"{who} needs at least {needed} descriptions per class; {source} gives fewer for "
                                 f"{shown}{' and more' if len(short) > 8 else ''}.")
    return {name: by_key[_key(name)] for name in class_names}


@dataclass(frozen=True)
class RunDescriptions:
    """The class descriptions a run reads, per dataset: the sentences and the content digest of the file."""

    by_dataset: Mapping[str, Descriptions]
    digests: Mapping[str, str]


def for_run(path: Path | None, datasets: Sequence[str], defenses: Sequence[Any]) -> RunDescriptions | None:
    """Check, before anything loads, that every defense that needs descriptions has them, and read the files (one
    line for a missing or malformed one); None where no defense of the run reads them (a file then given is said to
    be unused)."""
    readers = [d for d in defenses if d.reads_descriptions != "no"]
    required = [d.name for d in readers if d.reads_descriptions == "required"]
    if path is None:
        if required:
            raise CounterattackError(f"{', '.join(required)} {'needs' if len(required) == 1 else 'need'} class "
                                     f"descriptions: give --descriptions PATH, {WHERE_TO_GET}.")
        return None
    if not readers:
        log.warning("--descriptions %s is not used: none of the defenses reads class descriptions", path)
        return None
    files = {dataset: descriptions_file(path, dataset) for dataset in datasets}
    return RunDescriptions({d: read_descriptions(f) for d, f in files.items()},
                           {d: file_digest(f) for d, f in files.items()})


def check_coverage(descriptions: RunDescriptions | None, dataset: str, class_names: Sequence[str],
                   defenses: Sequence[Any]) -> None:
    """Refuse, naming them, classes a reading defense finds no descriptions for, or too few."""
    if descriptions is None:
        return
    for defense in defenses:
        if defense.reads_descriptions != "no":
            for_classes(descriptions.by_dataset[dataset], class_names, defense.descriptions_needed, defense.name,
                        f"--descriptions (for {dataset})")
