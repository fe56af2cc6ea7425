"""The gallery: what a run keeps of a few images, so a person can see what each defense did to them.

For a class-balanced sample of ``--gallery N`` images per dataset (chosen from the run's images alone, so the same
whatever the batch size or the number of processes), a run keeps the clean image, and for every defense and every
input it judged (the clean image, and each attack's adversarial image: under an adaptive attack, the component the
defense failed first, as its record counts it): the image it saw, the pixels it classified where it changes pixels,
a few of the views it classified where it classifies views (``DefenseOutput.views``), how far it moved the image's
feature where it moves features (``DefenseOutput.feature_shift``, degrees), its prediction and that prediction's
probability, the true label's probability, its gate's score and decision, and the undefended model's prediction on
the same input. Layout under ``--out``::

    gallery/rank-R-NNNNNN.safetensors   one evaluated batch's sample: float32 images (lossless; a defense's k-th
                                        view under its own key), and in its metadata the run's hash, the dataset,
                                        the image ids, labels and each view's numbers
    gallery/index.json                  written when the run completes: the run, each dataset's class names, and
                                        where each image's entry lies

Shards are written before the batch's results line, so a run killed between the two redoes that batch and writes
the same images again: a reader keeps the first entry of each image. A gallery written before views and feature
shifts were kept reads with none of either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CounterattackError
from .store import write_json_atomically, write_tensors_atomically

GALLERY = "gallery"
SHARD = re.compile(r"rank-(\d+)-(\d+)\.safetensors")


@dataclass
class View:
    """One defense on one input of one image."""

    defense: str
    input: str  # "clean", or an attack's name
    pred: int
    prob: float  # the defense's probability of its prediction (softmax of its logits)
    label_prob: float  # and of the true label
    bare_pred: int  # the undefended model's prediction on the same input
    bare_prob: float
    score: float | list[float] | None = None  # the gate's score (a list where a defense gates each view)
    flagged: bool | list[bool] | None = None
    component: str | None = None  # under an adaptive attack: transfer, exact or bpda, the image shown
    view_count: int | None = None  # how many views of the image the defense classified, where it keeps views
    feature_shift: float | None = None  # degrees between the feature it classified with and f(input), if it moves it
    image: torch.Tensor | None = None  # (3, H, W): the input the defense saw
    defended: torch.Tensor | None = None  # (3, H, W): the pixels it classified, where it changes pixels
    views: list[torch.Tensor] | None = None  # a few (3, h, w) views it classified (DefenseOutput.views)

    def numbers(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in NUMBERS}


TENSORS = ("image", "defended", "views")
NUMBERS = tuple(f.name for f in fields(View) if f.name not in TENSORS)


@dataclass
class Item:
    """One image of the gallery: its clean pixels, true label and every view."""

    dataset: str
    image_id: int | str
    label: int
    clean: torch.Tensor
    views: list[View] = field(default_factory=list)


def _key(defense: str, input_: str) -> str:
    return f"{defense}\x1f{input_}"


def write_batch(folder: Path, rank: int, run: str, dataset: str, items: Sequence[Item]) -> None:
    """Store one batch's sample as one shard, written whole (a temporary file renamed into place)."""
    if not items:
        return
    shards = Path(folder) / GALLERY
    shards.mkdir(parents=True, exist_ok=True)
    numbers = [int(m[2]) for p in shards.iterdir() if (m := SHARD.fullmatch(p.name)) and int(m[1]) == rank]
    path = shards / f"rank-{rank}-{max(numbers, default=-1) + 1:06d}.safetensors"
    tensors = {"clean": torch.stack([item.clean for item in items])}
    views = [[view.numbers() for view in item.views] for item in items]
    for row, item in enumerate(items):
        for view in item.views:
            key = _key(view.defense, view.input)
            for kind, tensor in (("image", view.image), ("defended", view.defended)):
                if tensor is not None:
                    tensors[f"{kind}/{row}/{key}"] = tensor
            for k, tensor in enumerate(view.views or ()):
                tensors[f"view/{row}/{k}/{key}"] = tensor
    tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items()}  # a view shares memory
    metadata = {"run": run, "dataset": dataset, "ids": json.dumps([item.image_id for item in items]),
                "labels": json.dumps([item.label for item in items]), "views": json.dumps(views)}
    write_tensors_atomically(path, tensors, metadata)


def write_index(folder: Path, run: str, class_names: Mapping[str, Sequence[str]], wanted: Sequence[tuple]) -> Path:
    """``gallery/index.json``: the run, each dataset's class names and where each of the ``wanted`` (dataset, image
    id) images lies (the first shard that holds it), in ``wanted``'s order: the same whatever the batching and the
    number of processes that wrote the shards."""
    order = {key: position for position, key in enumerate(wanted)}
    found: dict[tuple, dict] = {}
    for path, metadata in _shards(Path(folder), run):
        for row, image_id in enumerate(json.loads(metadata["ids"])):
            key = (metadata["dataset"], image_id)
            if key in order and key not in found:
                found[key] = {"dataset": metadata["dataset"], "id": image_id, "shard": path.name, "row": row}
    entries = [found[key] for key in sorted(found, key=order.__getitem__)]
    index = Path(folder) / GALLERY / "index.json"
    write_json_atomically(index, {"run": run, "class_names": {k: list(v) for k, v in class_names.items()},
                                  "images": entries})
    return index


def _shards(folder: Path, run: str | None) -> list[tuple[Path, dict[str, str]]]:
    found = []
    shards = folder / GALLERY
    paths = sorted((int(m[1]), int(m[2]), p) for p in shards.glob("rank-*.safetensors")
                   if (m := SHARD.fullmatch(p.name)))
    for _, _, path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
        except Exception as exc:  # safetensors' own error types for a cut or foreign file
            raise CounterattackError(f"{path} is damaged ({type(exc).__name__}): move it out of the folder and run the "
                                     "same command again (its images are evaluated again).") from None
        if run is None or metadata.get("run") == run:  # another run's sample is not this run's gallery
            found.append((path, metadata))
    return found


def read_gallery(folder: Path) -> tuple[dict[str, list[str]], list[Item]]:
    """Each dataset's class names and the kept images, in the index's order (an empty gallery: no index)."""
    index_path = Path(folder) / GALLERY / "index.json"
    if not index_path.is_file():
        return {}, []
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        run, class_names, entries = index["run"], index["class_names"], index["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CounterattackError(f"{index_path} is damaged ({exc}): run the command that made the run again (it "
                                 "resumes and writes it anew).") from None

    def damaged(what: str) -> CounterattackError:
        return CounterattackError(f"{index_path} is damaged ({what}): run the command that made the run again (it "
                                  "resumes and writes it anew).")

    by_shard: dict[str, list[dict]] = {}
    for number, entry in enumerate(entries if isinstance(entries, list) else [None]):
        if not (isinstance(entry, dict) and {"dataset", "id", "shard", "row"} <= entry.keys()
                and isinstance(entry["shard"], str) and type(entry["row"]) is int):
            raise damaged(f"image entry {number} is not an object with a dataset, id, shard and whole-number row")
        by_shard.setdefault(entry["shard"], []).append(entry)
    items = []
    for path, metadata in _shards(Path(folder), run):
        if path.name not in by_shard:
            continue
        labels, views = json.loads(metadata["labels"]), json.loads(metadata["views"])
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for entry in by_shard[path.name]:
                row = entry["row"]
                if not 0 <= row < min(len(labels), len(views)):
                    raise damaged(f"row {row} of {path.name}, which holds {len(labels)} images")
                item = Item(metadata["dataset"], entry["id"], labels[row], f.get_tensor("clean")[row].clone())
                item.views = [_read_view(f, keys, row, numbers) for numbers in views[row]]
                items.append(item)
    order = {(e["dataset"], e["id"]): i for i, e in enumerate(entries)}
    return class_names, sorted(items, key=lambda item: order[(item.dataset, item.image_id)])


def _read_view(f: Any, keys: set[str], row: int, numbers: dict[str, Any]) -> View:
    """One view of a shard's row; a tensor an older gallery did not keep (its views) reads as None."""
    key = _key(numbers["defense"], numbers["input"])

    def tensor(name: str) -> torch.Tensor | None:
        return f.get_tensor(name).clone() if name in keys else None

    views = []
    while (view := tensor(f"view/{row}/{len(views)}/{key}")) is not None:
        views.append(view)
    return View(**numbers, image=tensor(f"image/{row}/{key}"), defended=tensor(f"defended/{row}/{key}"),
                views=views or None)


def add_views(items: Mapping[int, Item], name: str, gated: bool, labels: torch.Tensor, clean_input: torch.Tensor,
              clean: Any, outputs: Mapping[str, Mapping[str, Any]], inputs: Mapping[str, Mapping[str, torch.Tensor]],
              bare: Any) -> None:
    """Add one defense's views to the batch's gallery items (by row): on the clean images and, per attack, on the
    component its record counts (the first the defense fails, else the last). ``outputs`` and ``inputs`` are, per
    attack and component, the defense's outputs and the images it saw; ``bare(images)`` the undefended logits."""

    def view(row: int, input_name: str, output: Any, image: torch.Tensor, component: str | None) -> View:
        probs = torch.softmax(output.logits[row].float(), dim=-1)
        bare_probs = torch.softmax(bare(image[row:row + 1])[0].float(), dim=-1)
        pred, bare_pred = int(probs.argmax()), int(bare_probs.argmax())
        score = None if output.score is None else output.score[row].tolist()
        flagged = None if output.counterattacked is None else output.counterattacked[row].tolist()
        changed = output.images is not None and not torch.equal(output.images[row], image[row])
        views = [view[row] for view in output.views] if output.views else None
        shift = None if output.feature_shift is None else float(output.feature_shift[row])
        return View(name, input_name, pred, float(probs[pred]), float(probs[int(labels[row])]), bare_pred,
                    float(bare_probs[bare_pred]), score if gated else None, flagged if gated else None, component,
                    view_count=output.view_count if views else None, feature_shift=shift, image=image[row],
                    defended=output.images[row] if changed else None, views=views)

    for row, item in items.items():
        item.views.append(view(row, "clean", clean, clean_input, None))
        for attack, parts in outputs.items():
            names = list(parts)
            failed = [part for part in names if int(parts[part].logits[row].argmax()) != int(labels[row])]
            part = failed[0] if failed else names[-1]
            item.views.append(view(row, attack, parts[part], inputs[attack][part], part if len(names) > 1 else None))
