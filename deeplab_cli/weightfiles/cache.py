"""The cache directory and the integrity of what is in it: where weights are found, the sha256 of files, and
the trust record (`trusted-sha256.json`) against which every use of a fetched model is verified.

The authors never published checksums for their Caffe models, so the first download's sha256 is recorded
(trust on first use; see weightfiles/fetch.py) and the converted file's sha256 with it: the cached default
model is re-hashed on every use and refused if it changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..errors import DeeplabError, UsageError
from ..io import write_bytes

WEIGHTS_ENV = "DEEPLAB_WEIGHTS"
CACHE_ENV = "DEEPLAB_CACHE"
DEFAULT_MODEL = "largefov-voc12"
TRUST_FILE = "trusted-sha256.json"


def cache_dir() -> Path:
    """The user cache directory: $DEEPLAB_CACHE, else the platform's cache dir + /deeplab-cli."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deeplab-cli"


def cached_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Where `deeplab weights fetch NAME` stores the converted model."""
    return cache_dir() / f"{name}.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """The weights file to use: --weights, then $DEEPLAB_WEIGHTS, then the cached default model; None if none."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UsageError(f"{path}: weights file not found")
        return path
    if os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise UsageError(f"{path}: weights file not found (from ${WEIGHTS_ENV})")
        return path
    path = cached_model_path()
    return path if path.is_file() else None


def no_weights_message() -> str:
    """Where weights were looked for and how to get them (the one-line error when none are found)."""
    path = cached_model_path()
    return (f"no weights found: looked at --weights, ${WEIGHTS_ENV} and {path}; "
            f"get them with `deeplab weights fetch` or `deeplab weights convert MODEL.caffemodel -o {path}`")


def resolve_weights(explicit: str | os.PathLike | None = None) -> Path:
    """Find the weights file (find_weights; the cached default model verified) or raise a UsageError."""
    path = find_weights(explicit)
    if path is None:
        raise UsageError(no_weights_message())
    if path == cached_model_path() and not explicit and not os.environ.get(WEIGHTS_ENV):
        verify_cached_model(DEFAULT_MODEL)  # what `fetch` wrote is re-checked on every use
    return path


def trust_path() -> Path:
    """The JSON file recording the sha256 each model had on its first download."""
    return cache_dir() / TRUST_FILE


def read_trust() -> dict[str, dict]:
    """Model name → {url, sha256, size, converted_sha256, trust, recorded_at}; {} when none recorded."""
    path = trust_path()
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())["models"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DeeplabError(f"{path}: unreadable trust record ({exc}); fix or delete it") from None
    return records if isinstance(records, dict) else {}


def write_trust(records: dict[str, dict]) -> None:
    """Rewrite the trust record file atomically."""
    body = {"comment": "sha256 of each fetched model's source file, recorded by deeplab-cli on first download",
            "models": records}
    write_bytes(trust_path(), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def verify_cached_model(name: str) -> None:
    """Raise a DeeplabError when a cached model that `fetch` wrote no longer has the sha256 it recorded."""
    record = read_trust().get(name)
    path = cached_model_path(name)
    if record and record.get("converted_sha256") and sha256_file(path) != record["converted_sha256"]:
        raise DeeplabError(f"{path}: changed since `deeplab weights fetch` wrote it (sha256 differs from "
                           f"{trust_path()}); fetch it again with --force or pass --weights")
