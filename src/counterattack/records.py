"""What a run writes, in one typed home: the per-batch record, the summary record and the run's description.

Each is a dataclass with one writer (``to_json``: plain JSON data, optional fields left out while unset) and one
reader (``from_json``), which validates what it reads: a field of the wrong type, a per-image list of another
length than the batch's, a missing field are refused with the field's name (``RecordError``), so a damaged or
foreign file never passes for a record. Every command reads and writes these through here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from .errors import CounterattackError

ImageId = Union[int, str]  # the dataset's own index, or an image file's path relative to its folder


class RecordError(ValueError):
    """A stored record that is not one: the caller says which file and how to recover."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(payload: Mapping[str, Any], key: str, kind: Any, what: str, optional: bool = False) -> Any:
    if not isinstance(payload, Mapping):
        raise RecordError(f"{what} is a {type(payload).__name__}, not an object")
    if key not in payload:
        if optional:
            return None
        raise RecordError(f"{what} has no {key!r}")
    value = payload[key]
    if value is None and optional:
        return None
    if kind == "number":
        ok = _number(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise RecordError(f"{what}'s {key!r} is {value!r}")
    return value


def _without_unset(payload: dict[str, Any], optional: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if not (k in optional and v is None)}


# --- per batch ---------------------------------------------------------------------------------------------


def flat(values: Sequence) -> list:
    """Per-image values, each a number or (a gate per view, MAC) a list of them, as one flat list."""
    return [v for item in values for v in (item if isinstance(item, list) else [item])]


@dataclass
class ImageResults:
    """One defense's results on one kind of input (the clean images, or one attack's), one entry per image.

    ``score`` is the gate's score (a list per image where a defense gates each view, MAC), ``counterattacked``
    whether the gate flagged it; both None for a defense without a gate. ``components``: under an adaptive
    attack, the results on the transfer attack's images and on the adaptive attack's own (the entries above are
    then the per-image worst case of the two).
    """

    pred: list[int]
    score: list | None = None
    counterattacked: list | None = None
    components: dict[str, ImageResults] | None = None

    def gate_scores(self) -> list[float] | None:
        """The gate's scores, one per image (or per view), or None for an ungated defense."""
        return None if self.score is None else flat(self.score)

    def only(self, keep: Sequence[int]) -> ImageResults:
        """The results of the images at ``keep``."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in keep]

        return ImageResults(pick(self.pred), pick(self.score), pick(self.counterattacked),
                            None if self.components is None else {k: c.only(keep) for k, c in self.components.items()})

    def of_image(self, i: int) -> tuple:
        """Everything recorded of image ``i``: two results of one image are equal when these are."""
        parts = () if self.components is None else tuple(c.of_image(i) for c in self.components.values())
        return (self.pred[i], None if self.score is None else self.score[i],
                None if self.counterattacked is None else self.counterattacked[i], parts)

    def to_json(self) -> dict[str, Any]:
        payload = {"pred": self.pred, "score": self.score, "counterattacked": self.counterattacked}
        if self.components is not None:
            payload["components"] = {k: c.to_json() for k, c in self.components.items()}
        return payload

    @classmethod
    def from_json(cls, payload: Any, count: int, what: str) -> ImageResults:
        pred = _require(payload, "pred", list, what)
        score = _require(payload, "score", list, what, optional=True)
        counterattacked = _require(payload, "counterattacked", list, what, optional=True)
        for key, values in (("pred", pred), ("score", score), ("counterattacked", counterattacked)):
            if values is not None and len(values) != count:
                raise RecordError(f"{what}'s {key} has {len(values)} entries for {count} images")
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in pred):
            raise RecordError(f"{what}'s predictions are not class indices")
        components = _require(payload, "components", dict, what, optional=True)
        return cls(pred, score, counterattacked, None if components is None else
                   {k: cls.from_json(v, count, f"{what}, component {k}") for k, v in components.items()})


@dataclass
class DefenseBatch:
    """One defense on one batch: its results on the clean images and under each attack, and what it cost.

    Costs are the defense's own, over its clean and adversarial inputs (``defended_images`` of them): image-encoder
    forwards and backwards (counted), seconds and peak memory; ``attack_seconds`` per attack.
    """

    gate_score: str | None
    clean: ImageResults
    adv: dict[str, ImageResults]
    forwards: float
    backwards: float
    defended_images: float
    seconds: float
    peak_memory_mb: float | None
    attack_seconds: dict[str, float]

    COSTS = ("forwards", "backwards", "defended_images", "seconds")

    def only(self, keep: Sequence[int], count: int) -> DefenseBatch:
        """The results of the images at ``keep``, its costs scaled to their share of the ``count`` images."""
        share = len(keep) / count
        return DefenseBatch(self.gate_score, self.clean.only(keep), {a: r.only(keep) for a, r in self.adv.items()},
                            self.forwards * share, self.backwards * share, self.defended_images * share,
                            self.seconds * share, self.peak_memory_mb,
                            {a: s * share for a, s in self.attack_seconds.items()})

    def to_json(self) -> dict[str, Any]:
        return {"gate_score": self.gate_score, "clean": self.clean.to_json(),
                "adv": {a: r.to_json() for a, r in self.adv.items()}, "forwards": self.forwards,
                "backwards": self.backwards, "defended_images": self.defended_images, "seconds": self.seconds,
                "peak_memory_mb": self.peak_memory_mb, "attack_seconds": self.attack_seconds}

    @classmethod
    def from_json(cls, payload: Any, count: int, what: str) -> DefenseBatch:
        adv = _require(payload, "adv", dict, what)
        costs = {key: _require(payload, key, "number", what) for key in cls.COSTS}
        attack_seconds = _require(payload, "attack_seconds", dict, what)
        if not all(_number(v) for v in attack_seconds.values()):
            raise RecordError(f"{what}'s attack_seconds are not numbers")
        return cls(_require(payload, "gate_score", str, what, optional=True),
                   ImageResults.from_json(payload.get("clean"), count, f"{what}, clean"),
                   {a: ImageResults.from_json(r, count, f"{what}, {a}") for a, r in adv.items()},
                   **costs, peak_memory_mb=_require(payload, "peak_memory_mb", "number", what, optional=True),
                   attack_seconds=attack_seconds)


@dataclass
class BatchRecord:
    """One evaluated batch: its images (dataset, ids, labels) and every defense's results on them. ``targets``: the
    labels the attacks were crafted against where they were not the true ones (the clean predictions)."""

    dataset: str
    ids: list[ImageId]
    labels: list[int]
    defenses: dict[str, DefenseBatch]
    targets: list[int] | None = None

    def only(self, keep: Sequence[int]) -> BatchRecord:
        """The batch with only the images at ``keep`` (in that order); costs scaled to their share."""
        return BatchRecord(self.dataset, [self.ids[i] for i in keep], [self.labels[i] for i in keep],
                           {n: d.only(keep, len(self.ids)) for n, d in self.defenses.items()},
                           None if self.targets is None else [self.targets[i] for i in keep])

    def of_image(self, i: int) -> tuple:
        """One image's results (its labels and every defense's), without the batch's costs."""
        return (self.labels[i], None if self.targets is None else self.targets[i],
                tuple((n, d.clean.of_image(i), tuple((a, r.of_image(i)) for a, r in d.adv.items()))
                      for n, d in self.defenses.items()))

    def to_json(self) -> dict[str, Any]:
        payload = {"dataset": self.dataset, "ids": self.ids, "labels": self.labels,
                   "defenses": {n: d.to_json() for n, d in self.defenses.items()}}
        if self.targets is not None:
            payload["targets"] = self.targets
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> BatchRecord:
        dataset = _require(payload, "dataset", str, "the batch")
        ids = _require(payload, "ids", list, "the batch")
        labels = _require(payload, "labels", list, "the batch")
        if not ids or len(labels) != len(ids):
            raise RecordError("its ids and labels do not pair up")
        if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
            raise RecordError("its image ids are not indices or file names")
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
            raise RecordError("its labels are not class indices")
        targets = _require(payload, "targets", list, "the batch", optional=True)
        if targets is not None and (len(targets) != len(ids) or not all(isinstance(y, int) for y in targets)):
            raise RecordError("its attack targets are not one class index per image")
        defenses = _require(payload, "defenses", dict, "the batch")
        return cls(dataset, ids, labels,
                   {n: DefenseBatch.from_json(d, len(ids), f"defense {n}") for n, d in defenses.items()}, targets)


# --- the summary --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One dataset, attack and defense of a run, summarised: what results.json lists and every table shows.

    Accuracies in percent with 95% Wilson intervals over the ``n`` images; under an adaptive attack,
    ``robust_acc`` is the per-image worst case of the transfer attack and the adaptive ones (exact and
    straight-through), each also given (``robust_acc_transfer``, ``robust_acc_exact``, ``robust_acc_bpda``). The
    attacks were crafted against ``attack_labels`` (the true labels, or the clean predictions); accuracy is always
    the true labels'. ``fixed_by_attack``: the percentage of images the defense gets wrong when clean but right when
    attacked (label leakage shows there). ``masking``: under adaptive attacks, "none" or why the defense's gradient
    looks masked; ``warnings``: what a reader must know before trusting the numbers. The gate's mean score and
    flagged fraction are over images (or views); costs are the defense's own per defended image. A run over several
    seeds gives the mean of each accuracy with its sample standard deviation and per-seed values; a sweep names its
    ``setting``.
    """

    dataset: str
    attack: str
    defense: str
    n: int
    clean_acc: float
    robust_acc: float
    threat: str = "paper"
    adaptive: str | None = None
    clean_ci95: tuple[float, float] | None = None
    robust_ci95: tuple[float, float] | None = None
    attack_labels: str = "true"
    fixed_by_attack: float | None = None
    robust_acc_transfer: float | None = None
    robust_acc_exact: float | None = None
    robust_acc_bpda: float | None = None
    masking: str | None = None
    warnings: list[str] | None = None
    gate_score: str | None = None
    mean_score_clean: float | None = None
    mean_score_adv: float | None = None
    counterattacked_clean: float | None = None
    counterattacked_adv: float | None = None
    forwards_per_image: float | None = None
    backwards_per_image: float | None = None
    ms_per_image: float | None = None
    peak_memory_mb: float | None = None
    seeds: list[int] | None = None
    clean_acc_std: float | None = None
    robust_acc_std: float | None = None
    clean_acc_per_seed: list[float] | None = None
    robust_acc_per_seed: list[float] | None = None
    setting: dict[str, Any] | None = None

    # Left out of the JSON while unset: they exist only for some runs.
    OPTIONAL = ("robust_acc_transfer", "robust_acc_exact", "robust_acc_bpda", "masking", "warnings", "seeds",
                "clean_acc_std", "robust_acc_std", "clean_acc_per_seed", "robust_acc_per_seed", "setting")
    NUMBERS = ("clean_acc", "robust_acc", "fixed_by_attack", "robust_acc_transfer", "robust_acc_exact",
               "robust_acc_bpda", "mean_score_clean",
               "mean_score_adv", "counterattacked_clean", "counterattacked_adv", "forwards_per_image",
               "backwards_per_image", "ms_per_image", "peak_memory_mb", "clean_acc_std", "robust_acc_std")

    def to_json(self) -> dict[str, Any]:
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("clean_ci95", "robust_ci95"):
            payload[key] = None if payload[key] is None else list(payload[key])
        return _without_unset(payload, self.OPTIONAL)

    @classmethod
    def from_json(cls, payload: Any) -> Record:
        if not isinstance(payload, Mapping):
            raise RecordError(f"a record is a {type(payload).__name__}, not an object")
        payload = _upgraded(payload)
        what = "a record"
        values: dict[str, Any] = {}
        for key in ("dataset", "attack", "defense"):
            values[key] = _require(payload, key, str, what)
        values["n"] = _require(payload, "n", int, what)
        for key in ("threat", "adaptive", "gate_score", "attack_labels", "masking"):
            values[key] = _require(payload, key, str, what, optional=True)
        for key in cls.NUMBERS:
            values[key] = _require(payload, key, "number", what, optional=key not in ("clean_acc", "robust_acc"))
            if values[key] is not None and not math.isfinite(values[key]):
                raise RecordError(f"{what}'s {key!r} is {values[key]}")
        for key in ("clean_ci95", "robust_ci95"):
            interval = _require(payload, key, list, what, optional=True)
            if interval is not None and (len(interval) != 2 or not all(_number(v) for v in interval)):
                raise RecordError(f"{what}'s {key!r} is {interval!r}")
            values[key] = None if interval is None else (float(interval[0]), float(interval[1]))
        for key in ("seeds", "clean_acc_per_seed", "robust_acc_per_seed", "warnings"):
            values[key] = _require(payload, key, list, what, optional=True)
        values["setting"] = _require(payload, "setting", dict, what, optional=True)
        for key, unset in (("threat", "paper"), ("attack_labels", "true")):
            if values[key] is None:
                values[key] = unset
        return cls(**values)


def _upgraded(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """A summary record under today's keys: runs before 0.2 called every gate's mean score ``mean_tau_*``."""
    if "mean_tau_clean" not in payload:
        return payload
    renamed = {k: v for k, v in payload.items() if k not in ("mean_tau_clean", "mean_tau_adv")}
    return {**renamed, "gate_score": "tau" if payload["mean_tau_clean"] is not None else None,
            "mean_score_clean": payload["mean_tau_clean"], "mean_score_adv": payload["mean_tau_adv"]}


@dataclass
class Average:
    """Per attack and defense, the mean clean and robust accuracy over a scope of datasets (``paper``: those of the
    TTC paper's 16 that were run; ``all``)."""

    scope: str
    attack: str
    defense: str
    datasets: int
    clean_acc: float
    robust_acc: float

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ADVERSARIAL_SET = "adversarial set"  # the kind of an adversarial set's description: a results folder's is None
UNITS = "eps and step sizes in [0, 1] pixel units"


@dataclass
class RunDescription:
    """Everything a run's numbers depend on (hashed), and ``run``: what they do not depend on.

    The weights and the images are identified by content (``weights``, each dataset's ``fingerprint``);
    ``attacks`` and ``defenses`` are each instance's ``describe()``; budgets in [0, 1] pixel units.
    """

    model: str
    datasets: list[dict]
    attacks: list[dict]
    threat: str = "paper"
    attack_labels: str = "true"
    kind: str | None = None
    pretrained: str | None = None
    weights: str | None = None
    vision_checkpoint: str | None = None
    backbone: str | None = None
    prompts: str = "paper"
    templates: list[str] | None = None
    descriptions: dict[str, str] | None = None  # per dataset, the content digest of the class descriptions read
    transform: str = "model"
    limit: int | None = None
    skip_unreadable: bool = False
    tau_model: str | dict | None = None
    adaptive: dict | None = None
    defenses: list[dict] | None = None
    defenses_per_dataset: dict[str, list[dict]] | None = None
    units: str = UNITS
    precision: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    seeds: list[int] | None = None
    preset: str | None = None
    quantize_adversarial: str | None = None  # "round" or "floor": adversarial images put on the 8-bit grid
    batch_composition: dict | None = None
    adversarial: dict | None = None
    sweep: dict | None = None
    stability: dict | None = None
    run: dict[str, Any] = field(default_factory=dict)

    # Written even when unset (None says "each dataset's own", "every image", "none"); the rest only when set.
    ALWAYS = ("model", "datasets", "attacks", "threat", "attack_labels", "prompts", "templates", "transform",
              "limit", "skip_unreadable", "tau_model", "adaptive", "defenses", "units", "precision", "seed", "run")
    _TYPES = {"model": str, "datasets": list, "attacks": list, "threat": str, "attack_labels": str, "kind": str,
              "pretrained": str, "weights": str, "vision_checkpoint": str, "backbone": str, "prompts": str,
              "templates": list, "descriptions": dict, "transform": str, "limit": int, "skip_unreadable": bool,
              "tau_model": (str, dict), "adaptive": dict, "defenses": list, "defenses_per_dataset": dict, "units": str,
              "precision": dict, "seed": int, "seeds": list, "preset": str, "quantize_adversarial": str,
              "batch_composition": dict, "adversarial": dict, "sweep": dict, "stability": dict, "run": dict}

    def to_json(self) -> dict[str, Any]:
        payload = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name in self.ALWAYS:
                payload[f.name] = value
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> RunDescription:
        """A stored description, checked field by field (unknown fields are refused: another release wrote it)."""
        if not isinstance(payload, Mapping):
            raise RecordError(f"the run's description is a {type(payload).__name__}, not an object")
        unknown = sorted(set(payload) - set(cls._TYPES))
        if unknown:
            raise RecordError(f"the run's description has fields this release does not know: {', '.join(unknown)}")
        for key in ("model", "datasets", "attacks"):
            if key not in payload:
                raise RecordError(f"the run's description has no {key!r}")
        for key, value in payload.items():
            kind = cls._TYPES[key]
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise RecordError(f"the run's description's {key!r} is {value!r}")
        return cls(**payload)


@dataclass
class Results:
    """What results.json holds: the run's description, its records, their averages, the images left out."""

    config: RunDescription
    records: list[Record]
    average: list[Average] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "records": [r.to_json() for r in self.records],
                "average": [a.to_json() for a in self.average], "unreadable": self.unreadable}

    @classmethod
    def from_json(cls, payload: Any) -> Results:
        config = RunDescription.from_json(_require(payload, "config", dict, "results"))
        records = [Record.from_json(r) for r in _require(payload, "records", list, "results")]
        average = [Average(**a) for a in _require(payload, "average", list, "results", optional=True) or []
                   if isinstance(a, dict) and set(a) == {f.name for f in fields(Average)}]
        return cls(config, records, average, _require(payload, "unreadable", list, "results", optional=True) or [])

    @classmethod
    def read(cls, folder: Path) -> Results:
        """A run folder's results.json, checked; what is missing or damaged is one line saying what to run."""
        path, run = Path(folder) / "results.json", f"`counterattack eval --out {folder}`"
        if not path.is_file():
            raise CounterattackError(f"No results.json in {folder}: run {run} first.")
        try:
            results = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # a RecordError, a JSONDecodeError and a UnicodeDecodeError among them
            raise CounterattackError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}): run the "
                                     f"command that made it again (such as {run}), which rewrites it from the "
                                     "finished batches in parts/.") from None
        if not results.records:
            raise CounterattackError(f"{path} holds no records yet: run the command that made it again (such as "
                                     f"{run}; it resumes) to finish the run.")
        return results
