"""Reading and writing files by path or by URL (s3://, gs://, hdfs://, file://), for engines whose workers run anywhere.

Local paths go through io.py (outputs to a temporary name, renamed when complete). A URL goes through
pyarrow's filesystem layer: object stores (S3, GCS) publish an object only when its upload completes,
so a written object is whole or absent; other filesystems (file://, hdfs://) get a temporary name and a
move, like local paths. Torch-free.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from . import io as local_io
from .errors import DeeplabError, UsageError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
_ATOMIC_UPLOADS = frozenset({"s3", "gcs"})  # pyarrow type names of object stores


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://…' (s3, gs, hdfs, file …); False for local paths, including Windows drives."""
    return bool(_URL.match(os.fspath(path)))


@lru_cache(maxsize=16)
def _filesystem(root: str) -> Any:
    """One pyarrow filesystem per 'scheme://authority' (resolving an S3 bucket's region costs a request)."""
    try:
        import pyarrow.fs
    except ImportError:
        raise UsageError(f"{root}: URLs are read through pyarrow: pip install 'deeplab-cli[ray]'") from None

    try:
        return pyarrow.fs.FileSystem.from_uri(root + "/")[0]
    except (OSError, ValueError) as exc:
        raise DeeplabError(f"{root}: cannot open this storage ({' '.join(str(exc).split())})") from None


def resolve(url: str) -> tuple[Any, str]:
    """A URL → (pyarrow filesystem, path inside it)."""
    scheme, rest = url.split("://", 1)
    if scheme == "file":
        return _filesystem("file://"), "/" + rest.lstrip("/")
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest.rstrip("/")


def join(root: str, relative: str | PurePosixPath) -> str:
    """root (a URL or a local folder) joined with a relative POSIX path."""
    rel = PurePosixPath(relative).as_posix()
    if is_url(root):
        return f"{root.rstrip('/')}/{rel}"
    return os.path.join(root, *PurePosixPath(rel).parts)


def read_bytes(path: str) -> bytes:
    """The whole file at a local path or URL."""
    if not is_url(path):
        return local_io.read_bytes(path)
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise DeeplabError(f"{path}: no such file") from None
    except OSError as exc:
        raise DeeplabError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a file whole or not at all: local paths via io.write_bytes, URLs via pyarrow (see the module doc)."""
    if not is_url(path):
        local_io.write_bytes(path, data)
        return
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0]
    if fs.type_name in _ATOMIC_UPLOADS:
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{inner.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.part"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, inner)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def list_files(url: str) -> Iterator[tuple[str, PurePosixPath, int]]:
    """Every file below a URL (recursively), hidden names skipped: (url, path relative to it, size in bytes).
    A URL naming one file gives that file, relative to its folder."""
    fs, inner = resolve(url)  # first: a one-line error when pyarrow is missing
    import pyarrow.fs

    try:
        info = fs.get_file_info(inner)
        if info.type == pyarrow.fs.FileType.File:
            yield url, PurePosixPath(info.base_name), info.size or 0
            return
        if info.type == pyarrow.fs.FileType.NotFound:
            raise UsageError(f"{url}: no such file or folder")
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise UsageError(f"{url}: cannot list ({' '.join(str(exc).split())})") from None
    base = PurePosixPath(inner)
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pyarrow.fs.FileType.File:
            continue
        rel = PurePosixPath(info.path).relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        yield join(url, rel), rel, info.size or 0


class Listing:
    """Folder listings taken once and remembered: file names → sizes, per folder URL (for skipping complete outputs)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, int]] = {}

    def sizes(self, folder: str) -> dict[str, int]:
        """Names → sizes of the files directly in a folder URL (listed on first use; {} when it does not exist)."""
        if folder not in self._folders:
            fs, inner = resolve(folder)
            import pyarrow.fs

            try:
                infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=False, allow_not_found=True))
            except OSError:
                infos = []
            self._folders[folder] = {i.base_name: i.size or 0 for i in infos if i.type == pyarrow.fs.FileType.File}
        return self._folders[folder]


class URL(str):
    """A file named by URL where the batch code expects a Path: str() is the URL; name, parent and stat() as for
    paths. stat() reads the folder's listing from `listing` (shared by the URLs of one plan), else lists it."""

    listing: Listing | None

    def __new__(cls, text: str, listing: Listing | None = None) -> "URL":
        url = super().__new__(cls, text)
        url.listing = listing
        return url

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "URL":
        return URL(self.rstrip("/").rsplit("/", 1)[0], self.listing)

    def stat(self) -> os.stat_result:
        """st_size of the file (the other fields are 0); FileNotFoundError when it does not exist."""
        sizes = (self.listing or Listing()).sizes(str(self.parent))
        if self.name not in sizes:
            raise FileNotFoundError(str(self))
        return os.stat_result((0, 0, 0, 0, 0, 0, sizes[self.name], 0, 0, 0))
