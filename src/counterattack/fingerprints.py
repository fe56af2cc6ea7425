"""Files identified by content: one digest (SHA-256) of many files.

A dataset is identified by the bytes of the files that hold its images (:func:`files_content_digest`): the same
files reached by another path are the same dataset, other bytes behind the same names another. A digest is computed
once and cached with each file's size, modification and change times and inode, so ten thousand images or a
multi-gigabyte archive are hashed once per change, not once per command. (Weights are identified by the tensors a
run loaded, in ``backbones.py``; where they were read from is recorded beside, :func:`resolved_location`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .store import write_json_atomically

_CHUNK = 1 << 24


def cache_path() -> Path:
    """Where fingerprints are cached: ``$COUNTERATTACK_CACHE``, else the user's cache folder."""
    root = os.environ.get("COUNTERATTACK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "counterattack")
    return Path(root) / "fingerprints.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    """What a cached digest is kept by. A user can set mtime back (``touch -d``, ``cp -p``, an unpacked archive)
    but not ctime, which any write or rename moves, nor the inode, which a file replaced by another changes."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_cache(cache: Path, entries: dict[str, Any]) -> None:
    try:
        write_json_atomically(cache, entries)
    except OSError:
        pass  # a read-only home only costs hashing again next time


CONTENT_PREFIX = "content:"
CONTENT_ENTRIES_KEPT = 2048  # folders' entries beyond these, oldest first, are dropped: stale ones pile up otherwise
PROGRESS_FROM_FILES = 1000  # fewer files hash in a blink: no bar


def files_content_digest(paths: Sequence[Path | str], progress: bool = True, what: str = "files") -> str:
    """One SHA-256 (16 hex digits) of the files' bytes, in the order given; names and paths play no part.

    Computed once per state of the files: the cache entry is keyed by the digest of every file's absolute path,
    size, mtime, ctime and inode, so a 50,000-file folder is one look-up, and a file rewritten in place, replaced,
    or swapped with another of the same size is hashed again. A file that cannot be read (missing, a folder,
    no permission) counts as unreadable, so that the decode check reports it rather than this one failing."""
    states = []
    for path in paths:
        absolute = os.path.abspath(path)
        try:
            state = "\t".join(map(str, _stat_key(os.stat(absolute)).values()))
        except OSError as exc:
            state = f"unreadable {exc.errno}"
        states.append(f"{absolute}\t{state}")
    key = CONTENT_PREFIX + hashlib.sha256("\n".join(states).encode("utf-8", "surrogateescape")).hexdigest()
    cache = cache_path()
    entries = _read_cache(cache)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("files") == len(states) and isinstance(entry.get("digest"), str):
        return entry["digest"]
    combined = hashlib.sha256()
    bar = tqdm(paths, desc=f"hashing {what}", unit="file", leave=False,
               disable=not progress or len(states) < PROGRESS_FROM_FILES)
    for path in bar:
        try:
            combined.update(_sha256(path).encode() + b"\n")
        except OSError as exc:
            combined.update(f"unreadable {exc.errno}\n".encode())
    digest = combined.hexdigest()[:16]
    kept = [k for k in entries if k.startswith(CONTENT_PREFIX)]
    for stale in kept[: max(0, len(kept) + 1 - CONTENT_ENTRIES_KEPT)]:  # JSON keeps insertion order: oldest first
        del entries[stale]
    entries[key] = {"files": len(states), "digest": digest}
    _write_cache(cache, entries)
    return digest


def resolved_location(model: str, pretrained: str | None, vision_checkpoint: Path | None) -> dict[str, str | None]:
    """Where the weights were read from (recorded beside a run's identity, not in it)."""
    scheme, _, rest = model.partition(":") if ":" in model else ("", "", model)
    local = scheme in ("local-dir", "transformers") and Path(rest).expanduser().is_dir()
    return {"model": f"{scheme}:{Path(rest).expanduser().resolve()}" if local else model,
            "pretrained": str(Path(pretrained).expanduser().resolve())
            if pretrained and Path(pretrained).expanduser().is_file() else pretrained,
            "vision_checkpoint": str(Path(vision_checkpoint).expanduser().resolve()) if vision_checkpoint else None}
