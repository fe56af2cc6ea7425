"""Stored adversarial images: attack once, then evaluate any number of defenses on the same images.

Layout under ``counterattack attack --out ADV``::

    config.json                          the attack's settings and their hash; a different configuration is refused
    shards/rank-R-NNNNNN.safetensors     one batch written by process R: tensors ``labels`` (int64, n) and
                                         ``adv/<attack>`` (float32, n x C x H x W), metadata ``dataset`` and
                                         ``ids`` (a JSON list of image ids: torchvision indices or relative paths)

Images are stored losslessly (float32, bit-exact). A shard is written to a temporary file and renamed into
place, so a run killed at any moment leaves whole shards only; running the same command again continues
after the highest shard number of its rank and skips every image already stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CounterattackError
from .records import ADVERSARIAL_SET, RecordError, RunDescription
from .store import Piece, Store, config_hash, dataset_changes, write_tensors_atomically

SHARD_NAME = re.compile(r"rank-(\d+)-(\d+)\.safetensors")
CACHED_TENSORS = 4  # shard tensors kept in memory while reading: a large set is never loaded whole


def tensor_checksum(tensor: torch.Tensor) -> str:
    """A tensor's checksum: its dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class AdversarialSet(Store):
    """A folder of adversarial images: ADV/config.json (config + hash) and ADV/shards/rank-R-NNNNNN.safetensors."""

    what = "adversarial images"
    kind = "adversarial set"  # in the stored configuration: a results folder's config.json is not a set
    doubled = "are stored more than once"
    foreign = "stored images are not of this run's datasets"

    def __init__(self, folder: Path, rank: int = 0):
        super().__init__(folder, rank)
        self.shards = self.folder / "shards"
        self._config: dict | None = None
        self._index: dict[tuple[str, object], tuple[Path, int]] | None = None
        self._cache: OrderedDict[tuple[Path, str], torch.Tensor] = OrderedDict()

    @classmethod
    def open(cls, folder: Path) -> AdversarialSet:
        """An existing set for reading, bound to the run that made it: its config.json, or, where that file is
        missing, the configuration its shards carry (when they agree). A folder that is not a set is refused
        before any work is done."""
        adversarial = cls(folder)
        not_a_set = CounterattackError(f"{adversarial.folder} is not an adversarial set (no config.json of one); "
                                       "make one with `counterattack attack --out DIR`.")
        if adversarial.config_path.exists():
            try:
                config = json.loads(adversarial.config_path.read_text(encoding="utf-8"))["config"]
                if config["kind"] != ADVERSARIAL_SET:
                    raise ValueError(config["kind"])
            except (OSError, ValueError, KeyError, TypeError):
                raise not_a_set from None
        else:
            runs = {piece.run for piece in adversarial.pieces()} if adversarial.shards.is_dir() else set()
            config = adversarial.described(next(iter(runs))) if len(runs) == 1 else None
            if config is None:
                raise not_a_set
        try:
            adversarial._config = RunDescription.from_json(config)
        except RecordError as exc:
            raise CounterattackError(f"{adversarial.folder}'s configuration is not one this release reads ({exc}): "
                                     "craft the set again with `counterattack attack` (into another folder).") from None
        adversarial.digest, adversarial.bound = config_hash(config), config
        return adversarial

    @property
    def config(self) -> RunDescription:
        """The stored configuration: what the images were made with (model, attacks, datasets)."""
        if self._config is None:
            self._config = type(self).open(self.folder).config
        return self._config

    def bind(self, described: RunDescription, write: bool) -> None:
        super().bind(described, write)
        self._config = None

    @property
    def hash(self) -> str:
        """The stored configuration's hash: an evaluation records which set it read."""
        return config_hash(self.config.to_json())

    def check_identity(self, identity: dict) -> None:
        """Refuse to evaluate on images made for another model, prompt set, preprocessing or image subset:
        each key of ``identity`` must equal the stored one; the differing ones are named."""
        stored = self.config.to_json()
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        if changed:
            def shown(key: str, value: object) -> str:
                if key == "datasets" and isinstance(value, list):  # names and sizes; fingerprints follow if they differ
                    return ", ".join(f"{d.get('name')} ({d.get('images')} images)"
                                     for d in value if isinstance(d, dict))
                return json.dumps(value)[:200]

            details = "; ".join(f"{k}: {shown(k, stored.get(k))} in the set, {shown(k, identity[k])} here"
                                for k in changed)
            raise CounterattackError(
                f"{self.folder} was made with other settings: {details}{dataset_changes(stored, identity)}. "
                "Craft a set for these settings with `counterattack attack`, or give the set's settings."
            )

    def _shard_paths(self) -> list[tuple[int, int, Path]]:
        """(rank, number, path) of every finished shard; temporary files do not match the name."""
        found = []
        for path in self.shards.glob("rank-*-*.safetensors"):
            match = SHARD_NAME.fullmatch(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def _metadata(self) -> list[tuple[Path, dict[str, str]]]:
        """Every shard's metadata (no tensor is read)."""
        result = []
        for _, _, path in self._shard_paths():
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata()
                if not all(key in metadata for key in ("dataset", "ids", "run")):
                    raise ValueError("its metadata names no dataset, images or run (written by an earlier release?)")
                json.loads(metadata["ids"])
            except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
                raise self._damaged(path, exc) from None
            result.append((path, metadata))
        return result

    def described(self, run: str) -> dict[str, Any] | None:
        return next((json.loads(m["config"]) for _, m in self._metadata() if m["run"] == run and "config" in m), None)

    def _shard_ids(self) -> list[tuple[Path, str, list]]:
        """(path, dataset, ids) of every shard of the bound run; a shard of another run is refused."""
        shards = [(path, m["dataset"], json.loads(m["ids"]), m["run"]) for path, m in self._metadata()]
        self.check_pieces(Piece(dataset, ids, run, str(path)) for path, dataset, ids, run in shards)
        return [(path, dataset, ids) for path, dataset, ids, _ in shards]

    def _damaged(self, shard: Path, exc: Exception) -> CounterattackError:
        return CounterattackError(f"{shard} is damaged ({type(exc).__name__}: {str(exc)[:200]}). Move it out of "
                                  "the folder and run the same `counterattack attack` again: its images are crafted "
                                  "anew, the other shards are kept.")

    def append(self, dataset: str, ids: list, labels: torch.Tensor, images: dict[str, torch.Tensor],
               targets: torch.Tensor | None = None) -> None:
        """Store one batch as one shard, all at once: a killed run leaves no half shard. ``targets``: the labels the
        attacks were crafted against, where they are not the true ones."""
        labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).contiguous()
        tensors = {"labels": labels}
        if targets is not None:
            tensors["targets"] = torch.as_tensor(targets).detach().to("cpu", torch.int64).contiguous()
        for attack, adv in images.items():
            tensors[f"adv/{attack}"] = adv.detach().to("cpu", torch.float32).contiguous()
        if any(t.shape[0] != len(ids) for t in tensors.values()):
            raise ValueError(f"{len(ids)} ids but tensors of {[tuple(t.shape) for t in tensors.values()]}")
        numbers = [number for rank, number, _ in self._shard_paths() if rank == self.rank]
        path = self.shards / f"rank-{self.rank}-{max(numbers, default=-1) + 1:06d}.safetensors"
        # The run's identity and settings travel with every shard, and each tensor's checksum with it.
        checksums = {key: tensor_checksum(tensor) for key, tensor in tensors.items()}
        metadata = {"dataset": dataset, "ids": json.dumps(list(ids)), "run": self.digest,
                    "config": json.dumps(self.bound), "checksums": json.dumps(checksums)}
        write_tensors_atomically(path, tensors, metadata)
        self._index = None

    def pieces(self) -> list[Piece]:
        return [Piece(m["dataset"], json.loads(m["ids"]), m["run"], str(path)) for path, m in self._metadata()]

    def unfinished(self, problems: list[str]) -> str:
        """No defense is evaluated on a part of a set."""
        return (f"The adversarial set {self.folder} is incomplete: {'; '.join(problems)}. Run `counterattack attack` "
                "again with the same arguments to finish it; if images are doubled or foreign, the folder was "
                "written by something else: use another --out.")

    def _rows(self, dataset: str, ids: list) -> list[tuple[Path, int]]:
        if self._index is None:
            self._index = {}
            for path, shard_dataset, shard_ids in self._shard_ids():
                for row, image_id in enumerate(shard_ids):
                    self._index.setdefault((shard_dataset, image_id), (path, row))
        rows = []
        for image_id in ids:
            if (dataset, image_id) not in self._index:
                raise CounterattackError(
                    f"image {image_id!r} of {dataset} is not in {self.folder}; the set was made for another subset."
                )
            rows.append(self._index[(dataset, image_id)])
        return rows

    def shard_of(self, dataset: str, image_id: object) -> Path:
        """The shard that stores an image."""
        return self._rows(dataset, [image_id])[0][0]

    def _tensor(self, path: Path, key: str) -> torch.Tensor:
        """One shard's tensor, from a small LRU cache: batches are read in roughly the order they were written."""
        if (path, key) in self._cache:
            self._cache.move_to_end((path, key))
            return self._cache[(path, key)]
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = f.keys()
                if key not in stored:
                    raise CounterattackError(
                        f"attack {key.removeprefix('adv/')!r} is not in {self.folder} (it holds: "
                        f"{', '.join(k.removeprefix('adv/') for k in stored if k.startswith('adv/'))}); "
                        "choose one of those, or attack again with it."
                    )
                # A copy, not a view of the mapped file: a shard cut short later must not crash the process.
                tensor = f.get_tensor(key).clone()
                expected = json.loads(f.metadata().get("checksums", "{}")).get(key)
            if expected != tensor_checksum(tensor):
                raise ValueError(f"the checksum of {key} does not match its content")
        except CounterattackError:
            raise
        except Exception as exc:
            raise self._damaged(path, exc) from None
        self._cache[(path, key)] = tensor
        if len(self._cache) > CACHED_TENSORS:
            self._cache.popitem(last=False)
        return tensor

    def _gather(self, dataset: str, ids: list, key: str) -> torch.Tensor:
        """Rows of one stored tensor for those ids, in that order, each shard read once however the ids interleave."""
        rows = self._rows(dataset, ids)
        by_shard: dict[Path, list[int]] = {}
        for position, (path, _) in enumerate(rows):
            by_shard.setdefault(path, []).append(position)
        out: torch.Tensor | None = None
        for path, positions in by_shard.items():
            tensor = self._tensor(path, key)
            if out is None:
                out = tensor.new_empty((len(ids), *tensor.shape[1:]))
            out[positions] = tensor[[rows[p][1] for p in positions]]
        assert out is not None, "no ids"
        return out

    def images(self, dataset: str, ids: list, attack: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The stored images of those ids, in that order (float32, exactly as attacked)."""
        return self._gather(dataset, ids, f"adv/{attack}").to(device)

    def labels(self, dataset: str, ids: list) -> list[int]:
        """The stored labels of those ids, in that order."""
        return self._gather(dataset, ids, "labels").tolist()

    def targets(self, dataset: str, ids: list, device: torch.device | str = "cpu") -> torch.Tensor:
        """The labels the attacks were crafted against for those ids: the true ones, or the stored predictions."""
        key = "labels" if self.config.attack_labels == "true" else "targets"
        return self._gather(dataset, ids, key).to(device)
