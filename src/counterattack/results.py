"""The results store: per-batch results appended as they are produced, so a run can resume.

Layout under ``--out``::

    config.json          the run's settings and their hash; a different configuration is refused
    parts/rank-R.jsonl   one line per finished batch, appended and fsynced by process R
    results.json         the summary records, written at the end (atomically)

A run killed at any moment (even ``kill -9``) leaves at worst one half-written last line, which is
ignored and cut off; running the same command again skips every image already done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .errors import CounterattackError

# Settings that do not change any result: left out of the hash, so a resumed run may change them.
RUN_ONLY_KEYS = ("run",)


def config_hash(config: dict) -> str:
    relevant = {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _dataset_changes(old: dict, new: dict) -> str:
    """What changed in the datasets' identities, in words (file lists are fingerprinted)."""
    before = {d.get("name"): d for d in old.get("datasets", []) if isinstance(d, dict)}
    notes = []
    for dataset in new.get("datasets", []):
        previous = before.get(dataset["name"])
        if previous is not None and previous != dataset:
            notes.append(f"{dataset['name']} changed: {previous.get('images')} images (fingerprint "
                         f"{previous.get('fingerprint')}) then, {dataset['images']} (fingerprint {dataset['fingerprint']}) now")
    return ("; " + "; ".join(notes)) if notes else ""


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def coverage_problems(counts: Counter, expected: dict[str, list], doubled: str, foreign: str) -> list[str]:
    """What keeps ``counts`` (per (dataset, image id)) from holding each expected image exactly once and
    nothing else, in words: "N images of D {doubled}", "N {foreign}"."""
    problems = []
    for dataset, ids in expected.items():
        missing = sum(1 for image_id in ids if counts[(dataset, image_id)] == 0)
        repeated = sum(1 for image_id in ids if counts[(dataset, image_id)] > 1)
        if missing:
            problems.append(f"{missing} of {len(ids)} images of {dataset} are missing")
        if repeated:
            problems.append(f"{repeated} images of {dataset} {doubled}")
    wanted = {(dataset, image_id) for dataset, ids in expected.items() for image_id in ids}
    others = sum(1 for key in counts if key not in wanted)
    if others:
        problems.append(f"{others} {foreign}")
    return problems


def check_stored_config(path: Path, config: dict, write: bool, what: str) -> None:
    """Refuse to mix two configurations in one folder: ``path`` (a config.json) must hold this one's hash,
    naming the settings that differ; it is written when absent and ``write``."""
    digest = config_hash(config)
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("hash") != digest:
            old = stored.get("config", {})
            changed = sorted(k for k in set(old) | set(config) if k not in RUN_ONLY_KEYS and old.get(k) != config.get(k))
            raise CounterattackError(
                f"{path.parent} holds {what} of another configuration (hash {stored.get('hash')}, this one "
                f"{digest}; differing: {', '.join(changed) or 'unknown'}{_dataset_changes(old, config)}). "
                "Use another --out, or delete the folder to start over."
            )
    elif write:
        write_json_atomically(path, {"hash": digest, "config": config})


class ResultsStore:
    def __init__(self, out: Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.rank = rank

    @property
    def config_path(self) -> Path:
        return self.out / "config.json"

    def check_config(self, config: dict, write: bool) -> None:
        """Refuse to mix runs: the stored configuration must be this one (written if absent and ``write``)."""
        check_stored_config(self.config_path, config, write, "results")

    def complete_batches(self, expected: dict[str, list]) -> list[dict]:
        """Every batch, once each expected image id (per dataset) is found exactly once and no other is.

        The merge of the processes' files: a missing or doubled image refuses the summary rather
        than averaging over whatever happens to be there.
        """
        batches = [batch for path in sorted(self.parts.glob("rank-*.jsonl")) for batch in self._lines(path)]
        counts = Counter((batch["dataset"], image_id) for batch in batches for image_id in batch["ids"])
        problems = coverage_problems(counts, expected, doubled="appear more than once",
                                     foreign="results are of images this run does not evaluate")
        if problems:
            raise CounterattackError(
                f"Cannot merge the results in {self.parts}: {'; '.join(problems)}. Run the same command again "
                "to evaluate what is missing; if results are doubled or foreign, the folder was written by "
                "something else: use another --out."
            )
        return batches

    def _lines(self, path: Path) -> Iterator[dict]:
        with path.open("r", encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return  # the half-written last line of a killed run
                yield json.loads(line)

    def batches(self) -> list[dict]:
        """Every finished batch of every process; an image met twice counts once."""
        seen: set[tuple[str, int]] = set()
        result = []
        for path in sorted(self.parts.glob("rank-*.jsonl")):
            for batch in self._lines(path):
                keys = [(batch["dataset"], i) for i in batch["ids"]]
                if any(k in seen for k in keys):
                    continue
                seen.update(keys)
                result.append(batch)
        return result

    def done(self) -> dict[str, set]:
        """Image ids already evaluated, per dataset."""
        done: dict[str, set[int]] = {}
        for batch in self.batches():
            done.setdefault(batch["dataset"], set()).update(batch["ids"])
        return done

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
