"""The shipped class lists and the naming rules that turn a dataset's own class names into prompt text.

This module reads only its own data files (``raw_classes.json``, ``classnames.json``) and imports neither the
registry nor the prompt sets: the registry's rows name these rules, and ``prompts.py`` builds the prompt sets from
the rows, so both sit above it and neither imports the other.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

IMAGENET_DROPPED_WNID = "n03710637"
"""The ILSVRC-2012 synset (maillot) missing from the TTC authors' refined ImageNet names: the paper's
ImageNet has 999 classes, so this class is left out of the ``paper`` prompts."""

OPENAI_TEMPLATE = "This is a photo of a {}."
PAPER_TEMPLATE = "This is a photo of a {}."
"""The TTC code's template where a dataset has none of its own."""
COOP_TEMPLATE = "a photo of a {}."
"""CoOp's and R-TPT's prompt for the ImageNet variants (R-TPT's prompt initialisation, ``a_photo_of_a``)."""
UCF101_TEMPLATE = "a photo of a person doing {}."
"""CoOp's zero-shot template for UCF101 (its ``CUSTOM_TEMPLATES``)."""
PCAM_PAPER_PROMPTS = [
    "This is a photo of a healthy lymph node tissue.",
    "This is a photo of a lymph node tumor tissue.",
]


@cache
def _shipped() -> dict:
    text = files("counterattack.data").joinpath("raw_classes.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def curated_class_names() -> dict[str, list[str]]:
    """The ``openai`` names of ``classnames.json`` per dataset (its ``_`` keys are notes on their sources)."""
    text = files("counterattack.data").joinpath("classnames.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def shipped_own_classes(dataset: str) -> list[str] | None:
    """The dataset's own class list as ``raw_classes.json`` ships it (a fresh list), or None where none ships.
    An entry that is a string names the dataset whose list it shares (ImageNet-V2 and -Sketch: ImageNet's)."""
    lists = _shipped()["own_classes"]
    entry = lists.get(dataset)
    if isinstance(entry, str):
        entry = lists[entry]
    return None if entry is None else list(entry)


# --- The paper's naming rules: one small function per rule, applied to raw names. ---------------------

def as_is(name: str) -> str:
    """CIFAR, STL-10 and SUN397 names go into the template untouched (underscores and slashes included)."""
    return name


def clean(name: str) -> str:
    """The authors' usual tidying: lower-case, then ``_`` and ``-`` become spaces (nothing is stripped)."""
    return name.lower().replace("_", " ").replace("-", " ")


def caltech101_name(category: str) -> str:
    """Caltech-101 folder names as they are, except both face classes (``Faces``, ``Faces_easy``) become "person"."""
    return "person" if category in ("Faces", "Faces_easy") else category


def caltech256_name(folder: str) -> str:
    """Caltech-256 folders lose their ``NNN.`` prefix and a ``-101`` suffix, then are cleaned and stripped:
    ``145.motorbikes-101`` -> ``motorbikes``."""
    number, _, rest = folder.partition(".")
    name = rest if number.isdigit() and rest else folder
    return clean(name.removesuffix("-101")).strip()


def aircraft_name(variant: str) -> str:
    """FGVC-Aircraft variants: Boeing's bare numbers (``707-320``) get their maker in front; then lower-case
    with ``_`` as spaces, hyphens kept: ``boeing 707-320``."""
    if variant.startswith("7"):
        variant = "Boeing " + variant
    return variant.lower().replace("_", " ")


def stanford_cars_name(name: str) -> str:
    """Stanford Cars names lose their last 5 characters (" 2012", the year), then are cleaned; this merges
    7 pairs of classes that differ only in the year."""
    return clean(name[:-5])


def country211_name(code: str) -> str:
    """Country211's alpha-2 folder code as its ISO 3166 short name (pycountry's, shipped as data), with ``_`` and
    ``-`` as spaces and the case kept: ``XK`` -> ``Kosovo``, ``TL`` -> ``Timor Leste``."""
    name = _shipped()["country_names"][code]
    return name.replace("_", " ").replace("-", " ")


def imagenet_paper_name(wnid: str) -> str:
    """The TTC authors' refined ImageNet name of a WordNet id (none for :data:`IMAGENET_DROPPED_WNID`)."""
    return _shipped()["paper_names"]["imagenet"][wnid]


def tinyimagenet_paper_name(wnid: str) -> str:
    """The TTC authors' refined Tiny ImageNet name of a WordNet id."""
    return _shipped()["paper_names"]["tinyimagenet"][wnid]


@cache
def _openai_imagenet_names() -> dict[str, str]:
    return dict(zip(_shipped()["own_classes"]["imagenet"], curated_class_names()["imagenet"], strict=True))


def openai_imagenet_name(wnid: str) -> str:
    """A WordNet id of ImageNet-1k named as OpenAI's curated ImageNet name (Tiny ImageNet and the ImageNet
    variants use only ImageNet-1k synsets); an unknown id stays as it is."""
    return _openai_imagenet_names().get(wnid, wnid)


def imagenet_variant_paper_name(wnid: str) -> str:
    """The ImageNet variants (-A, -R, -V2, -Sketch) are not in the TTC paper: the TTC authors' refined ImageNet
    name where their table has one, else OpenAI's curated name (only :data:`IMAGENET_DROPPED_WNID`, "tights").
    No class is dropped, so every image of the variants' published protocol (R-TPT's, CoOp's) is scored."""
    return _shipped()["paper_names"]["imagenet"].get(wnid) or openai_imagenet_name(wnid)


def words(name: str) -> str:
    """A name whose words are joined by ``_`` (CoOp's UCF101 classes: ``Apply_Eye_Makeup``) with spaces instead,
    as CoOp's and R-TPT's prompt learners write it; the case is kept."""
    return name.replace("_", " ")


def readable(name: str) -> str:
    """Caltech-256's folder names as words: ``002.american-flag`` -> ``american flag``,
    ``145.motorbikes-101`` -> ``motorbikes``."""
    if "." in name and name.split(".", 1)[0].isdigit():
        name = name.split(".", 1)[1]
    name = name.removesuffix("-101")
    return name.replace("_", " ").replace("-", " ").strip()
