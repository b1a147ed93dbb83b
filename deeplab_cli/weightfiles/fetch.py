"""Getting weights with integrity: resumable HTTP(S) downloads, sha256 checks, trust on first use; and the
list of known and cached models.

The authors never published checksums for their Caffe models, so a manifest entry may carry no
sha256. Then the first download's sha256 is shown and recorded (`trusted-sha256.json` in the cache
directory, weightfiles/cache.py) and every later download of that model, from any mirror, must match
it; `--sha256` pins one explicitly. Nothing downloaded is used before its sha256 has been checked.
Progress reaches the caller through a callback (the command draws a bar); one-line logs go to stderr.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import DeeplabError, UsageError
from .cache import (
    DEFAULT_MODEL, cache_dir, cached_model_path, find_weights, no_weights_message, read_trust, resolve_weights,
    sha256_file, trust_path, write_trust,
)
from .caffe import load_caffemodel
from .formats import Weights, load_weights, save_weights
from .manifest import load_manifest

# progress(name, bytes received, total bytes or None): called as a download advances.
Progress = Callable[[str, int, "int | None"], None]
MODEL_URL_ENV = "DEEPLAB_MODEL_URL"  # overrides the default model's URL (a mirror, an air-gapped cache)
CHUNK_BYTES = 1 << 16
RETRIES = 3  # resumptions after a dropped connection, per URL
RETRY_DELAY_S = 1.0  # grows linearly with the attempt
TIMEOUT_S = 30.0  # per socket operation
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HTTPFailure(DeeplabError):
    """The server could not be reached or refused the file (no network, 404, ...): another mirror may help."""


class ChecksumMismatch(DeeplabError):
    """A download whose sha256 is not the expected one (it has been deleted)."""


def log(message: str) -> None:
    """One line of progress for people, on stderr."""
    print(f"deeplab: {message}", file=sys.stderr, flush=True)


def check_sha256(value: str | None) -> str | None:
    """Normalise a user-given sha256 (64 hex digits) or raise a UsageError."""
    if value is None:
        return None
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise UsageError(f"--sha256 {value!r} is not a sha256 (64 hexadecimal digits)")
    return value


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _transfer(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    """One request: continue `part` from its current size (Range) or restart it; raises OSError-like errors on drops."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"deeplab-cli/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # our partial file is not a prefix of theirs: start again
            part.unlink()
            raise ConnectionError("server refused to resume; restarting") from None
        raise
    with response:
        if offset and response.status == 206 and _content_range_start(response.headers.get("Content-Range")) == offset:
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # the server ignored Range: take the whole file again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        name = part.name.removesuffix(".part")
        received = offset
        if progress:  # first called once the server answers, so that a failed connection draws no empty bar
            progress(name, received, total)
        with open(part, mode) as f:
            while block := response.read(CHUNK_BYTES):
                f.write(block)
                received += len(block)
                if progress:
                    progress(name, received, total)
        if total is not None and received < total:
            raise http.client.IncompleteRead(b"", total - received)


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    quiet: bool = False,
    retries: int = RETRIES,
    timeout: float = TIMEOUT_S,
    progress: Progress | None = None,
) -> str:
    """Download url to dest through `dest.part` (resumed with Range requests), check its sha256, return it.

    A dropped connection is resumed up to `retries` times; the `.part` file stays for a later run.
    With sha256 given, a mismatch deletes the download and raises ChecksumMismatch. progress(name, bytes,
    total) follows the transfer unless quiet.
    """
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise UsageError(f"{url}: only http:// and https:// URLs can be fetched")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        log(f"resuming {part} ({part.stat().st_size / 1e6:.1f} MB already there)")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, None if quiet else progress, timeout)
            break
        except urllib.error.HTTPError as exc:
            raise HTTPFailure(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise HTTPFailure(f"cannot download {url}: {reason}") from None
        except (http.client.HTTPException, OSError) as exc:  # dropped connection, timeout, reset
            have = part.stat().st_size if part.exists() else 0
            reason = str(exc) if not isinstance(exc, http.client.IncompleteRead) else ""
            reason = reason or type(exc).__name__
            if attempt == retries:
                raise HTTPFailure(
                    f"download of {url} interrupted after {have / 1e6:.1f} MB ({reason}); "
                    f"run the same command again to resume from {part}"
                ) from None
            log(f"connection lost after {have / 1e6:.1f} MB ({reason}); "
                f"resuming (attempt {attempt + 2}/{retries + 1})")
            time.sleep(RETRY_DELAY_S * (attempt + 1))
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumMismatch(f"{url}: sha256 mismatch: expected {sha256}, got {digest}; the download was deleted")
    part.replace(dest)
    return digest


@dataclass
class FetchResult:
    """What `fetch` did: the converted model's path, the source's sha256 and why it is trusted."""

    name: str
    path: Path
    url: str | None
    sha256: str | None
    trust: str  # pinned | published | recorded | first-use | unverified (a file fetch did not write)
    downloaded: bool
    arch: str | None = None
    classes: int | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _source_format(url: str, declared: str | None) -> str:
    if declared:
        return declared
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    return {".caffemodel": "caffemodel", ".safetensors": "safetensors"}.get(suffix, "pytorch")


def _download_name(url: str, name: str, fmt: str) -> str:
    base = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base or f"{name}.{fmt}"


def _expected_sha256(
    name: str, pinned: str | None, published: str | None, record: dict | None
) -> tuple[str | None, str]:
    recorded = (record or {}).get("sha256")
    if pinned:
        for what, other in (("the manifest's", published), ("the recorded", recorded)):
            if other and other != pinned:
                log(f"{name}: --sha256 differs from {what} sha256 {other}; using yours")
        return pinned, "pinned"
    if published:
        return published, "published"
    if recorded:
        return recorded, "recorded"
    return None, "first-use"


def fetch(
    name: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    quiet: bool = False,
    arch: str | None = None,
    progress: Progress | None = None,
) -> FetchResult:
    """Download a known model (or `url`), verify it, convert it to .safetensors in the cache, record its sha256.

    progress(name, bytes, total) follows the download unless quiet.
    """
    name = name or DEFAULT_MODEL
    if not _NAME.match(name):
        raise UsageError(f"{name!r} is not a model name (letters, digits, '.', '_', '-')")
    sha256 = check_sha256(sha256)
    entry = load_manifest().get(name)
    if entry is None and url is None:
        known = ", ".join(load_manifest())
        raise UsageError(f"unknown model {name!r}; known: {known} (or give --url URL for another file)")
    entry = entry or {}
    if url is None and name == DEFAULT_MODEL and os.environ.get(MODEL_URL_ENV):
        url = os.environ[MODEL_URL_ENV]
    urls = [url] if url else [entry["url"], *entry.get("mirrors", [])]
    dest = cached_model_path(name)
    records = read_trust()
    record = records.get(name)
    expected, how = _expected_sha256(name, sha256, entry.get("sha256"), record)

    if dest.exists() and not force:
        if record is None:
            log(f"{dest} exists but was not written by `fetch`, so it is not verified; use --force to download")
            return FetchResult(name, dest, None, None, "unverified", False)
        if sha256_file(dest) != record.get("converted_sha256"):
            raise DeeplabError(f"{dest}: changed since `fetch` wrote it (sha256 differs from {trust_path()}); "
                               "delete it or fetch again with --force")
        if expected is not None and expected != record.get("sha256"):
            raise DeeplabError(f"{dest}: was converted from a file with sha256 {record.get('sha256')}, not {expected}; "
                               "fetch again with --force")
        log(f"{name}: already in the cache at {dest} (verified against {trust_path().name})")
        return FetchResult(name, dest, record.get("url"), record.get("sha256"), record.get("trust", how), False)

    fmt = _source_format(urls[0], entry.get("format"))
    downloads = cache_dir() / "downloads"
    failures = []
    for u in urls:
        src = downloads / _download_name(u, name, fmt)
        log(f"downloading {name} from {u}")
        try:
            digest = download(u, src, expected, quiet=quiet, progress=progress)
            break
        except HTTPFailure as exc:
            failures.append(str(exc))
        except ChecksumMismatch as exc:
            why = {
                "pinned": "the sha256 you gave",
                "published": "the manifest's sha256",
                "recorded": f"the sha256 recorded on its first download in {trust_path()}; if the file changed "
                "upstream on purpose, pin the new one with --sha256",
            }[how]
            raise ChecksumMismatch(f"{exc} (expected = {why})") from None
    else:
        then = f"run `deeplab weights convert FILE -o {dest}`" if fmt == "caffemodel" else "pass it with --weights"
        raise DeeplabError(f"{'; '.join(failures)}. Fetch {urls[0]} by hand and {then}")
    try:
        weights = _store(src, dest, fmt, arch or entry.get("arch"), u, entry.get("crf_preset"))
    finally:
        src.unlink(missing_ok=True)
    records[name] = {
        "url": u, "sha256": digest, "trust": how, "converted_sha256": sha256_file(dest),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_trust(records)
    if how == "first-use":
        log(f"sha256 of {src.name}: {digest} (no checksum was published: recorded in {trust_path()}; "
            "later downloads must match it)")
    else:
        log(f"sha256 verified ({how}): {digest}")
    log(f"{name}: {weights.arch}, {weights.num_classes} classes, saved to {dest}")
    return FetchResult(name, dest, u, digest, how, True, weights.arch, weights.num_classes)


def _store(src: Path, dest: Path, fmt: str, arch: str | None, url: str, crf_preset: str | None = None) -> Weights:
    """Convert or re-save a verified download as our .safetensors, with its origin (and the manifest's CRF preset,
    which `--crf-preset auto` then takes) in the metadata."""
    if fmt == "caffemodel":
        weights = load_caffemodel(src, arch)
    else:
        weights = load_weights(src, arch)
        weights.metadata = {"source": src.name, "source_sha256": sha256_file(src), "source_format": fmt}
    weights.metadata["source_url"] = url
    if crf_preset:
        weights.metadata["crf_preset"] = crf_preset
    save_weights(weights.state_dict, dest, weights.arch, weights.metadata)
    weights.path = dest
    return weights


def resolve_or_fetch(explicit: str | os.PathLike | None = None, offline: bool = False,
                     progress: Progress | None = None) -> Path:
    """The weights file to use (cache.find_weights); on first use, the default model downloaded into the cache.

    The download follows `deeplab weights fetch`'s integrity rules (sha256 pinned, published or trusted on
    first use, resumed); $DEEPLAB_MODEL_URL replaces its URL. offline: never download, fail in one line.
    """
    if find_weights(explicit) is None:
        if offline:
            raise UsageError(f"offline: {no_weights_message()} on a machine with network, then copy "
                             f"{cached_model_path()} here (or pass --weights FILE)")
        log(f"no weights found: downloading the default model {DEFAULT_MODEL} into {cache_dir()} (once)")
        fetch(DEFAULT_MODEL, progress=progress)
    return resolve_weights(explicit)


def list_models(verify: bool = True) -> list[dict]:
    """The known models (manifest) and the other .safetensors files of the cache, with their cache and trust state."""
    records = read_trust()
    rows = []
    for name, entry in load_manifest().items():
        rows.append(_row(name, entry, records.get(name), verify))
    known = {r["name"] for r in rows}
    if cache_dir().is_dir():
        for path in sorted(cache_dir().glob("*.safetensors")):
            if path.stem not in known:
                rows.append(_row(path.stem, None, records.get(path.stem), verify))
    return rows


def _row(name: str, entry: dict | None, record: dict | None, verify: bool) -> dict:
    path = cached_model_path(name)
    row = {
        "name": name,
        "known": entry is not None,
        "description": (entry or {}).get("description", "local file"),
        "arch": (entry or {}).get("arch"),
        "crf_preset": (entry or {}).get("crf_preset"),
        "classes": (entry or {}).get("classes"),
        "url": (entry or {}).get("url") or (record or {}).get("url"),
        "published_sha256": (entry or {}).get("sha256"),
        "recorded_sha256": (record or {}).get("sha256"),
        "cached": path.is_file(),
        "path": str(path) if path.is_file() else None,
        "size": path.stat().st_size if path.is_file() else None,
        "status": "not fetched",
    }
    if path.is_file():
        if record is None:
            row["status"] = "present (not fetched by deeplab)"
        elif not verify:
            row["status"] = "fetched"
        else:
            ok = sha256_file(path) == record.get("converted_sha256")
            row["status"] = "fetched, verified" if ok else "MODIFIED since fetch"
    return row
