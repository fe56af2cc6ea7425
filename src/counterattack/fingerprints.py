"""What weights a run loads, by content: a run's identity holds these fingerprints, not the paths it was given.

The same weights reached by another path (a relative spelling, a symlink, a copy) are the same run;
other weights behind the same path are another run, refused on resume rather than merged. A file's
fingerprint (its size and SHA-256) is computed once and cached with the file's size and modification
time, so a multi-gigabyte checkpoint is hashed once per change, not once per command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .store import write_json_atomically

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
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


def file_fingerprint(path: Path) -> str:
    """``"<size>:<sha256, 16 hex digits>"`` of a file's content (cached by resolved path, size and mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    cache = cache_path()
    entries = _read_cache(cache)
    key = str(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["fingerprint"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    fingerprint = f"{stat.st_size}:{digest.hexdigest()[:16]}"
    entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fingerprint": fingerprint}
    try:
        write_json_atomically(cache, entries)
    except OSError:
        pass  # a read-only home only costs hashing again next time
    return fingerprint


def folder_fingerprint(folder: Path) -> str:
    """One fingerprint of a model folder: its weight files' and JSON configurations', by name."""
    folder = Path(folder)
    parts = [f"{p.name}={file_fingerprint(p)}" for p in sorted(folder.iterdir())
             if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def weights_identity(model: str, pretrained: str | None, vision_checkpoint: Path | None) -> dict[str, Any]:
    """The weights a run loads, by content where they are local files; hub names and tags identify themselves.

    ``model`` is ``local-dir:DIR``, ``transformers:DIR|ORG/NAME``, ``hf-hub:ORG/NAME`` or a built-in name
    (``pretrained`` then is a tag or a weights file).
    """
    scheme, _, rest = model.partition(":") if ":" in model else ("", "", model)
    if scheme in ("local-dir", "transformers") and Path(rest).expanduser().is_dir():
        described: dict[str, Any] = {"model": f"{scheme}:folder",
                                     "weights": folder_fingerprint(Path(rest).expanduser())}
    elif scheme:
        described = {"model": model}
    elif pretrained and Path(pretrained).expanduser().is_file():
        described = {"model": model, "pretrained": "file", "weights": file_fingerprint(Path(pretrained).expanduser())}
    else:
        described = {"model": model, "pretrained": pretrained}
    if vision_checkpoint is not None:
        described["vision_checkpoint"] = file_fingerprint(Path(vision_checkpoint).expanduser())
    return described


def resolved_location(model: str, pretrained: str | None, vision_checkpoint: Path | None) -> dict[str, str | None]:
    """Where the weights were read from (recorded beside a run's identity, not in it)."""
    scheme, _, rest = model.partition(":") if ":" in model else ("", "", model)
    local = scheme in ("local-dir", "transformers") and Path(rest).expanduser().is_dir()
    return {"model": f"{scheme}:{Path(rest).expanduser().resolve()}" if local else model,
            "pretrained": str(Path(pretrained).expanduser().resolve())
            if pretrained and Path(pretrained).expanduser().is_file() else pretrained,
            "vision_checkpoint": str(Path(vision_checkpoint).expanduser().resolve()) if vision_checkpoint else None}
