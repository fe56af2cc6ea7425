"""Resumable stores: a folder that one or several processes fill piece by piece, guarded by its configuration.

Two stores share this base: results (``results.ResultsStore``: one JSON line per evaluated batch) and
adversarial sets (``adversarial.AdversarialSet``: one safetensors shard per crafted batch). Both
hold ``config.json`` (the configuration and its hash: another configuration is refused, naming what
differs), list the images each finished piece covers, and are complete only when every expected
image is there exactly once. ``fill`` is the one protocol by which a run adds to a store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import CounterattackError

if TYPE_CHECKING:  # torch.distributed is heavy, and the command line's parser reads this module's cache helpers
    from .distributed import ProcessGroup
    from .records import RunDescription

# Settings that do not change any result: left out of the hash, so a resumed run may change them.
RUN_ONLY_KEYS = ("run",)


def config_hash(config: Mapping[str, Any]) -> str:
    relevant = {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary path)`` beside ``path``, then rename it into place: a reader never sees half a file, and a
    full disk leaves the previous file (or none), never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_tensors_atomically(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """A safetensors file, written whole or not at all (fsynced, then renamed into place). safetensors reports a
    full disk from its Rust side as its own error, not an OSError: it is raised as the OSError it is."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata))
        except SafetensorError as exc:
            code = re.search(r"os error (\d+)", str(exc))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number), str(path.parent)) from exc
        with tmp.open("rb") as f:
            os.fsync(f.fileno())

    return write_atomically(path, write)


def write_json_atomically(path: Path, payload: Any) -> None:
    """``payload`` as JSON, atomically; NaN and infinity are refused (they are not JSON)."""
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def dataset_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What changed in the datasets' identities, in words (file lists are fingerprinted)."""
    before = {d.get("name"): d for d in old.get("datasets", []) if isinstance(d, dict)}
    notes = []
    for dataset in new.get("datasets", []):
        previous = before.get(dataset["name"])
        if previous is not None and previous != dataset:
            notes.append(f"{dataset['name']} changed: {previous.get('images')} images (fingerprint "
                         f"{previous.get('fingerprint')}) then, {dataset['images']} "
                         f"(fingerprint {dataset['fingerprint']}) now")
    return ("; " + "; ".join(notes)) if notes else ""


def coverage_problems(counts: Counter, expected: Mapping[str, list], doubled: str, foreign: str) -> list[str]:
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


@dataclass(frozen=True)
class Piece:
    """One finished piece of a store: the images of one dataset it covers, the hash of the run that wrote it (every
    piece carries its run's identity), and where it is, for messages."""

    dataset: str
    ids: list
    run: str
    where: str


def differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The settings two configurations differ in, in words."""
    changed = sorted(k for k in set(old) | set(new) if k not in RUN_ONLY_KEYS and old.get(k) != new.get(k))
    return f"{', '.join(changed) or 'unknown'}{dataset_changes(old, new)}"


class Store:
    """A folder of pieces, each covering some images of one dataset, under one configuration.

    ``config.json`` holds the configuration and its hash; every piece carries that hash too, with the configuration
    it was written under, so a piece of another run (a file copied from another folder, a folder whose config.json
    was deleted and run again with other settings) is refused, naming the settings that differ, never merged.
    Subclasses say what they hold (``what``, words for messages), how a store of theirs is marked in its
    configuration (``kind``), list their finished pieces (``pieces``), give the configuration stored with a run's
    pieces (``described``) and say how to finish an incomplete store (``unfinished``).
    """

    what: ClassVar[str] = "results"
    kind: ClassVar[str | None] = None
    doubled: ClassVar[str] = "appear more than once"
    foreign: ClassVar[str] = "results are of images this run does not evaluate"

    def __init__(self, folder: Path, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        self.digest: str | None = None  # the bound run's hash: set by ``bind`` (writing) or ``read_bound`` (reading)
        self.bound: dict[str, Any] | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def bind(self, described: RunDescription, write: bool) -> None:
        """Bind the store to one run: refuse a folder (its config.json, or any of its pieces) of another
        configuration, naming the settings that differ; write config.json when absent and ``write`` (rebuilt from
        the pieces only when they are this run's)."""
        config = described.to_json()
        digest = config_hash(config)
        if self.config_path.exists():
            stored = self.read_config()
            if stored.get("hash") != digest:
                old = stored.get("config", {})
                raise CounterattackError(
                    f"{self.folder} holds {self.what_of(old)} of another configuration (hash {stored.get('hash')}, "
                    f"this one {digest}; differing: {differing(old, config)}). Use another --out: what is there is "
                    "kept.")
        self.digest, self.bound = digest, config
        self.check_pieces(self.pieces())
        if write and not self.config_path.exists():
            write_json_atomically(self.config_path, {"hash": digest, "config": config})

    def what_of(self, config: Mapping[str, Any]) -> str:
        """What a folder of this configuration holds, in words: a results folder is not an adversarial set."""
        kind = config.get("kind") if isinstance(config, Mapping) else None
        if kind == self.kind:
            return self.what
        return "an adversarial set" if kind == "adversarial set" else "results"

    def read_bound(self) -> None:
        """Bind to the run config.json names, for reading a finished store."""
        stored = self.read_config()
        self.digest, self.bound = stored["hash"], stored["config"]

    def check_pieces(self, pieces: Iterable[Piece]) -> list[Piece]:
        """``pieces``, once every one is of the bound run."""
        pieces = list(pieces)
        for piece in pieces:
            if piece.run != self.digest:
                other = self.described(piece.run)
                detail = (f"differing: {differing(other, self.bound or {})}" if other is not None
                          else "written by an earlier release, which did not record its run")
                raise CounterattackError(
                    f"{piece.where} holds {self.what} of another run (hash {piece.run}, this one {self.digest}; "
                    f"{detail}). Move that file out of {self.folder} (what it holds is kept there), or use another "
                    "--out.")
        return pieces

    def read_config(self) -> dict[str, Any]:
        """The stored ``{"hash", "config"}``; a damaged file is one line saying how to recover."""
        try:
            stored = json.loads(self.config_path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("hash"), str) \
                    or not isinstance(stored.get("config"), dict):
                raise ValueError("not a configuration written by counterattack")
        except (OSError, ValueError) as exc:
            raise CounterattackError(
                f"{self.config_path} is damaged ({type(exc).__name__}: {exc}). Move it aside (e.g. `mv "
                f"{self.config_path} {self.config_path}.damaged`) and run the same command again: it is rebuilt from "
                f"the {self.what} already there, which carry their run's identity.") from None
        return stored

    def pieces(self) -> Iterable[Piece]:
        """Every finished piece, in a fixed order."""
        raise NotImplementedError

    def described(self, run: str) -> dict[str, Any] | None:
        """The configuration stored with the pieces of run ``run``, if they carry one."""
        raise NotImplementedError

    def done(self) -> dict[str, set]:
        """Image ids already stored, per dataset (every process's): what a resumed run skips."""
        done: dict[str, set] = {}
        for piece in self.check_pieces(self.pieces()):
            done.setdefault(piece.dataset, set()).update(piece.ids)
        return done

    def unfinished(self, problems: list[str]) -> str:
        """The message for a store that is not exactly the expected images: what is wrong and how to finish it."""
        raise NotImplementedError

    def check_complete(self, expected: Mapping[str, list], pieces: Iterable[tuple[str, list]] | None = None) -> None:
        """Refuse a store that does not hold every expected image (per dataset) exactly once, and nothing else
        (``pieces``: ``(dataset, ids)`` of the store's, if already read)."""
        if pieces is None:
            pieces = [(p.dataset, p.ids) for p in self.check_pieces(self.pieces())]
        counts = Counter((dataset, image_id) for dataset, ids in pieces for image_id in ids)
        problems = coverage_problems(counts, expected, self.doubled, self.foreign)
        if problems:
            raise CounterattackError(self.unfinished(problems))

    def complete(self, expected: Mapping[str, list]) -> Any:
        """What a finished run reads back: nothing here, once the store is known to be complete."""
        self.check_complete(expected)


LOCK_NAME = ".counterattack.lock"
_HELD_LOCKS: set[int] = set()  # file descriptors of the folders this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loading worker): close the copies of the held folders' lock files. A ``flock`` lives
    as long as any process keeps its file open, so workers outliving a killed run would otherwise hold its folder."""
    for handle in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(handle)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for the block: a second run on it is refused at once, naming the holder, instead of both
    computing everything and clashing at the merge. The operating system releases the lock when the process ends,
    however it ends (forked children, such as data-loading workers, do not keep it: ``_drop_inherited_locks``)."""
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise CounterattackError(f"{folder} is a file, not a folder: give another --out.") from None
    except OSError as exc:
        raise CounterattackError(f"cannot use {folder} as the output folder ({exc.strerror}): "
                                 "give another --out.") from None
    locked = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 4096).decode("utf-8", "replace").strip() or "unknown"
            raise CounterattackError(f"{folder} is in use by another run ({holder}): wait for it to finish, or use "
                                     "another --out.") from None
        locked = True
        _HELD_LOCKS.add(handle)
        os.ftruncate(handle, 0)
        os.write(handle, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                         f"{' '.join(sys.argv)[:300]}".encode())
        yield
    finally:
        try:
            # Refused before writing anything: leave no trace. Only the holder cleans up, never a run refused the lock.
            if created and locked:
                with contextlib.suppress(OSError):
                    if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                        (folder / LOCK_NAME).unlink()
                        folder.rmdir()
        finally:
            _HELD_LOCKS.discard(handle)
            os.close(handle)


def fill(store: Store, described: RunDescription, expected: Mapping[str, list], group: ProcessGroup,
         produce: Callable[[dict[str, set]], None]) -> Any:
    """The one way a run adds to a store, on one process or under torchrun.

    The store is bound to the configuration (written, if new) on the main process first; every process then
    reads what is done, and none adds to the store before all have read it; each produces its share
    (``produce(done)``); the main process checks that the store is complete and returns what
    ``store.complete`` reads back (None on the other processes). A failure anywhere ends every process
    with its message, at the next of these steps.
    """
    group.first_on_main(lambda: store.bind(described, write=group.is_main))
    done = store.done()
    group.barrier()
    group.together(lambda: produce(done))
    return group.together(lambda: store.complete(expected) if group.is_main else None)
