"""The results store: per-batch results appended as they are produced, so a run can resume.

Layout under ``--out``::

    config.json          the run's settings and their hash; a different configuration is refused
    parts/rank-R.jsonl   one line per finished batch, appended and fsynced by process R
    results.json         the summary records, written at the end (atomically)

A run killed at any moment (even ``kill -9``) leaves at worst one half-written last line, which is
ignored and cut off; running the same command again skips every image already done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .store import Store


class ResultsStore(Store):
    what = "results"

    def __init__(self, out: Path, rank: int = 0):
        super().__init__(out, rank)
        self.parts = self.folder / "parts"

    def _lines(self, path: Path) -> Iterator[dict]:
        with path.open("r", encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return  # the half-written last line of a killed run
                yield json.loads(line)

    def _all_batches(self) -> list[dict]:
        return [batch for path in sorted(self.parts.glob("rank-*.jsonl")) for batch in self._lines(path)]

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
        batches = self._all_batches()
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
            f.write((json.dumps(batch) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
