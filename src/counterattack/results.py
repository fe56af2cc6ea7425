"""The results store: per-batch results appended as they are produced, so a run can resume.

Layout under ``--out``::

    config.json          the run's settings and their hash; a different configuration is refused
    parts/rank-R.jsonl   process R's lines, appended and fsynced: first the run it belongs to (its hash and
                         settings), then one line per finished batch, each carrying that hash
    results.json         the summary records, written at the end (atomically)

A run killed at any moment (even ``kill -9``) leaves at worst one half-written last line, which is
ignored and cut off; running the same command again skips every image already done. Every line
carries a checksum of its content and is checked for its shape when read: a line edited or damaged
after it was written is refused, naming the file and the line, never merged. Every batch carries its
run's hash: a parts file of another run (copied from another folder, or left by other settings after
config.json was deleted) is refused, naming the settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CounterattackError
from .records import BatchRecord, RecordError
from .store import Piece, Store


def _checksum(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


@dataclass
class _Line:
    """One line of a parts file: a run's header (``config``) or a batch (``batch``), with the run's hash."""

    path: Path
    number: int
    run: str
    config: dict | None = None
    batch: BatchRecord | None = None

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.number}"


class EarlierRelease(RecordError):
    """A part line whose checksum holds but which names no run: the layout before lines were bound to their run."""


def _parsed(line: Any) -> tuple[str, dict | None, BatchRecord | None]:
    """A part line's run, and its header's configuration or its batch, once its checksum matches."""
    if not isinstance(line, dict) or "checksum" not in line:
        raise RecordError("no checksum")
    content = {k: v for k, v in line.items() if k != "checksum"}
    if _checksum(content) != line["checksum"]:
        raise RecordError("its checksum does not match its content")
    if not isinstance(content.get("run"), str):
        raise EarlierRelease("it names no run")
    if "config" in content:
        if not isinstance(content["config"], dict):
            raise RecordError("its run's configuration is not an object")
        return content["run"], content["config"], None
    return content["run"], None, BatchRecord.from_json(content.get("batch"))


class ResultsStore(Store):
    what = "results"

    def __init__(self, out: Path, rank: int = 0):
        super().__init__(out, rank)
        self.parts = self.folder / "parts"
        self._headed = False  # this process's parts file names the bound run

    def _lines(self, path: Path) -> Iterator[_Line]:
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    return  # the half-written last line of a killed run
                try:
                    run, config, batch = _parsed(json.loads(line.decode("utf-8")))
                except EarlierRelease:
                    raise CounterattackError(
                        f"{path} was written by an earlier release of clip-counterattack, whose batches this one "
                        f"cannot bind to their run: move {self.folder} aside (nothing is deleted) or give another "
                        "--out, and run the same command again.") from None
                except (ValueError, UnicodeDecodeError) as exc:
                    raise CounterattackError(
                        f"{path}, line {number}, is damaged or was edited ({exc}). Drop that line (e.g. `sed -i "
                        f"'{number}d' {path}`: the images of that batch are evaluated again) and run the same command "
                        "again.") from None
                yield _Line(path, number, run, config, batch)

    def _all_lines(self) -> list[_Line]:
        return [line for path in sorted(self.parts.glob("rank-*.jsonl")) for line in self._lines(path)]

    def _batch_lines(self) -> list[_Line]:
        return [line for line in self._all_lines() if line.batch is not None]

    def described(self, run: str) -> dict[str, Any] | None:
        return next((line.config for line in self._all_lines() if line.config is not None and line.run == run), None)

    def pieces(self) -> Iterator[Piece]:
        return (Piece(line.batch.dataset, line.batch.ids, line.run, line.where) for line in self._batch_lines())

    def _checked_batch_lines(self) -> list[_Line]:
        lines = self._batch_lines()
        self.check_pieces(Piece(line.batch.dataset, line.batch.ids, line.run, line.where) for line in lines)
        return lines

    def _without_repeats(self) -> list[BatchRecord]:
        """Every batch, an image evaluated twice kept once where both results agree (a repeat changes nothing);
        two different results for one image are refused, naming both lines and how to drop one."""
        first: dict[tuple[str, object], tuple[_Line, int]] = {}
        kept = []
        for line in self._checked_batch_lines():
            batch, keep = line.batch, []
            for i, image_id in enumerate(batch.ids):
                key = (batch.dataset, image_id)
                if key not in first:
                    first[key] = (line, i)
                    keep.append(i)
                    continue
                other, j = first[key]
                if other.batch.of_image(j) != batch.of_image(i):
                    raise CounterattackError(
                        f"image {image_id!r} of {batch.dataset} has two different results: {other.where} and "
                        f"{line.where} (two runs wrote {self.folder}). Keep one: drop either line (e.g. `sed -i "
                        f"'{line.number}d' {line.path}`; the images of that batch are evaluated again) and run the "
                        "same command again.")
            if len(keep) == len(batch.ids):
                kept.append(batch)
            elif keep:
                kept.append(batch.only(keep))
        return kept

    def unfinished(self, problems: list[str]) -> str:
        return (f"Cannot merge the results in {self.parts}: {'; '.join(problems)}. Run the same command again "
                "to evaluate what is missing; if results are doubled or foreign, the folder was written by "
                "something else: use another --out.")

    def complete(self, expected: Mapping[str, list]) -> list[BatchRecord]:
        """Every batch, once each expected image id (per dataset) is found exactly once and no other is.

        The merge of the processes' files: a missing or doubled image refuses the summary rather
        than averaging over whatever happens to be there.
        """
        batches = self._without_repeats()
        self.check_complete(expected, [(batch.dataset, batch.ids) for batch in batches])
        return batches

    def batches(self) -> list[BatchRecord]:
        """Every finished batch of every process of the run config.json names (none in a folder of no batches, such
        as the summary folder of a run over several seeds); an image met twice counts once."""
        if not self.parts.is_dir():
            return []
        if self.digest is None:
            self.read_bound()
        seen: set[tuple[str, object]] = set()
        result = []
        for line in self._checked_batch_lines():
            keys = [(line.batch.dataset, i) for i in line.batch.ids]
            if any(k in seen for k in keys):
                continue
            seen.update(keys)
            result.append(line.batch)
        return result

    def _write_line(self, path: Path, content: dict) -> None:
        with path.open("a+b") as f:
            # Cut a half-written last line left by a killed run before adding to the file.
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = path.read_bytes()
                    f.truncate(data.rfind(b"\n") + 1)
            f.write((json.dumps({**content, "checksum": _checksum(content)}, allow_nan=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def append(self, batch: BatchRecord) -> None:
        """Add one batch of the bound run to this process's parts file (its first line names the run)."""
        if self.digest is None:
            raise RuntimeError("bind the store to its run before appending")
        path = self.parts / f"rank-{self.rank}.jsonl"
        self.parts.mkdir(parents=True, exist_ok=True)
        if not self._headed:  # read once per run: a resumed file already names it
            if not any(line.config is not None and line.run == self.digest
                       for line in (self._lines(path) if path.exists() else ())):
                self._write_line(path, {"run": self.digest, "config": self.bound})
            self._headed = True
        self._write_line(path, {"run": self.digest, "batch": batch.to_json()})
