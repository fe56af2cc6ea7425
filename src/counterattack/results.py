"""The results store: per-batch results appended as they are produced, so a run can resume.

Layout under ``--out``::

    config.json          the run's settings and their hash; a different configuration is refused
    parts/rank-R.jsonl   one line per finished batch, appended and fsynced by process R
    results.json         the summary records, written at the end (atomically)

A run killed at any moment (even ``kill -9``) leaves at worst one half-written last line, which is
ignored and cut off; running the same command again skips every image already done. Every line
carries a checksum of its content and is checked for its shape when read: a line edited or damaged
after it was written is refused, naming the file and the line, never merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import CounterattackError
from .store import Store


def _checksum(batch: dict) -> str:
    return hashlib.sha256(json.dumps(batch, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


def _checked_batch(line: dict) -> dict:
    """A part line's batch, once its checksum matches and every list holds one entry per image."""
    if not isinstance(line, dict) or "checksum" not in line:
        raise ValueError("no checksum")
    batch = {k: v for k, v in line.items() if k != "checksum"}
    if _checksum(batch) != line["checksum"]:
        raise ValueError("its checksum does not match its content")
    count = len(batch["ids"])
    if not isinstance(batch["dataset"], str) or len(batch["labels"]) != count or not count:
        raise ValueError("ids and labels do not pair up")
    for result in batch["defenses"].values():
        for per_image in (result["clean"], *result["adv"].values()):
            if any(values is not None and len(values) != count
                   for key, values in per_image.items() if key != "components"):
                raise ValueError("a defense's results are not one per image")
    return batch


def _per_image_lists(batch: dict) -> Iterator[tuple[dict, str]]:
    """Every (dict, key) of a batch whose value is a list with one entry per image."""
    yield batch, "ids"
    yield batch, "labels"
    for result in batch["defenses"].values():
        for per_image in (result["clean"], *result["adv"].values(), *(
                part for adv in result["adv"].values() for part in adv.get("components", {}).values())):
            for key, values in per_image.items():
                if isinstance(values, list):
                    yield per_image, key


def _image_results(batch: dict, i: int) -> list:
    """One image's results in a batch, everything but the batch's costs."""
    return [values[key][i] for values, key in _per_image_lists(batch) if key != "ids"]


def _only(batch: dict, keep: list[int]) -> dict:
    """A batch with only the images at ``keep``; its costs scaled to their share."""
    copy = json.loads(json.dumps(batch))
    for values, key in _per_image_lists(copy):
        values[key] = [values[key][i] for i in keep]
    share = len(keep) / len(batch["ids"])
    for result in copy["defenses"].values():
        for cost in ("forwards", "backwards", "defended_images", "seconds"):
            result[cost] = result[cost] * share
    return copy


class ResultsStore(Store):
    what = "results"

    def __init__(self, out: Path, rank: int = 0):
        super().__init__(out, rank)
        self.parts = self.folder / "parts"

    def _lines(self, path: Path) -> Iterator[dict]:
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    return  # the half-written last line of a killed run
                try:
                    yield _checked_batch(json.loads(line.decode("utf-8")))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CounterattackError(
                        f"{path}, line {number}, is damaged or was edited ({exc}). Delete that line (its images are "
                        "evaluated again) and run the same command again.") from None

    def _all_batches(self) -> list[dict]:
        return [batch for _, batch in self._batches_with_files()]

    def _batches_with_files(self) -> list[tuple[Path, dict]]:
        return [(path, batch) for path in sorted(self.parts.glob("rank-*.jsonl")) for batch in self._lines(path)]

    def _without_repeats(self) -> list[dict]:
        """Every batch, an image evaluated twice kept once where both results agree (a repeat changes nothing);
        two different results for one image are refused, naming the files and how to keep one."""
        first: dict[tuple[str, object], tuple[Path, dict, int]] = {}
        kept = []
        for path, batch in self._batches_with_files():
            keep = []
            for i, image_id in enumerate(batch["ids"]):
                key = (batch["dataset"], image_id)
                if key not in first:
                    first[key] = (path, batch, i)
                    keep.append(i)
                    continue
                other_path, other, j = first[key]
                if _image_results(other, j) != _image_results(batch, i):
                    raise CounterattackError(
                        f"image {image_id!r} of {batch['dataset']} has two different results, in {other_path} and "
                        f"{path} (two runs wrote {self.folder}). Keep one run's: delete the other's file "
                        f"(e.g. `rm {path}`) and run the same command again; the images it held are evaluated again.")
            if len(keep) == len(batch["ids"]):
                kept.append(batch)
            elif keep:
                kept.append(_only(batch, keep))
        return kept

    def pieces(self) -> Iterator[tuple[str, list]]:
        return ((batch["dataset"], batch["ids"]) for batch in self._all_batches())

    def unfinished(self, problems: list[str]) -> str:
        return (f"Cannot merge the results in {self.parts}: {'; '.join(problems)}. Run the same command again "
                "to evaluate what is missing; if results are doubled or foreign, the folder was written by "
                "something else: use another --out.")

    def complete(self, expected: Mapping[str, list]) -> list[dict]:
        """Every batch, once each expected image id (per dataset) is found exactly once and no other is.

        The merge of the processes' files: a missing or doubled image refuses the summary rather
        than averaging over whatever happens to be there.
        """
        batches = self._without_repeats()
        self.check_complete(expected, [(batch["dataset"], batch["ids"]) for batch in batches])
        return batches

    def batches(self) -> list[dict]:
        """Every finished batch of every process; an image met twice counts once."""
        seen: set[tuple[str, int]] = set()
        result = []
        for batch in self._all_batches():
            keys = [(batch["dataset"], i) for i in batch["ids"]]
            if any(k in seen for k in keys):
                continue
            seen.update(keys)
            result.append(batch)
        return result

    def append(self, batch: dict) -> None:
        path = self.parts / f"rank-{self.rank}.jsonl"
        self.parts.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as f:
            # Cut a half-written last line left by a killed run before adding to the file.
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    content = path.read_bytes()
                    f.truncate(content.rfind(b"\n") + 1)
            f.write((json.dumps({**batch, "checksum": _checksum(batch)}, allow_nan=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
