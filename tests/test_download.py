"""Fetching with integrity, against a local HTTP server: downloads, resumption, the trust record, mirrors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from helpers import cli, one_line_error

from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.model import ARCHS
from deeplab_cli.testing import caffemodel_bytes, random_state_dict
from deeplab_cli.weightfiles import cache
from deeplab_cli.weightfiles import fetch as dl
from deeplab_cli.weightfiles.cache import cached_model_path, sha256_file
from deeplab_cli.weightfiles.formats import load_weights
from deeplab_cli.weightfiles.manifest import load_manifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# A local HTTP server with Range support that can drop a connection half-way.


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # path → how many responses to cut half-way
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.drops.get(self.path, 0) > 0:
            state.drops[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    """(base URL, state) of an HTTP server on 127.0.0.1 serving state.files."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_retry_delays(isolated_cache, monkeypatch) -> None:
    """Every test gets its own cache directory (no $DEEPLAB_WEIGHTS) and no retry delays."""
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)


PAYLOAD = np.random.default_rng(1).bytes(1_000_003)


@pytest.fixture(scope="module")
def caffemodel() -> bytes:
    """A LargeFOV caffemodel with seeded random weights, in the authors' old V1 layout."""
    return caffemodel_bytes(random_state_dict("largefov", seed=5), "fc8_voc12", legacy=True)


# ---------------------------------------------------------------------------------------------
# download()


def test_download_verifies_sha256(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    assert dl.download(f"{base}/f.bin", dest, sha(PAYLOAD), quiet=True) == sha(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_wrong_checksum_deletes_the_download(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    with pytest.raises(dl.ChecksumMismatch, match=f"sha256 mismatch: expected {'0' * 64}, got {sha(PAYLOAD)}.*deleted"):
        dl.download(f"{base}/f.bin", tmp_path / "f.bin", "0" * 64, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.drops["/f.bin"] = 1
    assert dl.download(f"{base}/f.bin", tmp_path / "f.bin", sha(PAYLOAD), quiet=True) == sha(PAYLOAD)
    assert state.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(PAYLOAD) // 2}-")]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_interrupted_download_is_kept_and_resumed_by_the_next_run(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.drops["/f.bin"] = 1
    part = tmp_path / "f.bin.part"
    with pytest.raises(dl.HTTPFailure, match=r"interrupted after 0\.5 MB.*run the same command again"):
        dl.download(f"{base}/f.bin", tmp_path / "f.bin", sha(PAYLOAD), quiet=True, retries=0)
    assert part.read_bytes() == PAYLOAD[: len(PAYLOAD) // 2]
    dl.download(f"{base}/f.bin", tmp_path / "f.bin", sha(PAYLOAD), quiet=True, retries=0)
    assert state.requests[-1] == ("/f.bin", f"bytes={len(PAYLOAD) // 2}-")
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes of another file")
    assert dl.download(f"{base}/f.bin", tmp_path / "f.bin", sha(PAYLOAD), quiet=True) == sha(PAYLOAD)


def test_part_longer_than_the_file_restarts_after_416(server, tmp_path):
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    assert dl.download(f"{base}/f.bin", tmp_path / "f.bin", sha(PAYLOAD), quiet=True) == sha(PAYLOAD)
    assert state.requests == [("/f.bin", f"bytes={len(PAYLOAD) + 10}-"), ("/f.bin", None)]


def test_404_and_no_network_name_the_url(server, tmp_path):
    base, _ = server
    with pytest.raises(dl.HTTPFailure, match=f"cannot download {base}/missing.bin: HTTP 404"):
        dl.download(f"{base}/missing.bin", tmp_path / "x", quiet=True)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.HTTPFailure, match=f"cannot download http://127.0.0.1:{port}/x.bin: .*refused"):
        dl.download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x", quiet=True)
    with pytest.raises(UsageError, match="only http"):
        dl.download("file:///etc/passwd", tmp_path / "x", quiet=True)


# ---------------------------------------------------------------------------------------------
# fetch: end to end, through the real CLI


def test_fetch_cli_pinned_then_segment_uses_it(server, caffemodel, isolated_cache, photo_file, tmp_path):
    base, state = server
    url = f"{base}/ccvl/DeepLab-LargeFOV/train2_iter_8000.caffemodel"
    state.files[url[len(base):]] = caffemodel
    result = cli("weights", "fetch", "--url", url, "--sha256", sha(caffemodel).upper(), "-q", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["trust"] == "pinned" and out["sha256"] == sha(caffemodel) and out["arch"] == "largefov"
    path = cached_model_path()
    assert out["path"] == str(path) and path.parent == isolated_cache
    w = load_weights(path)
    assert w.metadata["source"] == "train2_iter_8000.caffemodel"
    assert w.metadata["source_sha256"] == sha(caffemodel) and w.metadata["source_url"] == url
    assert not any((isolated_cache / "downloads").iterdir())  # the source is not kept
    record = json.loads((isolated_cache / cache.TRUST_FILE).read_text())["models"]["largefov-voc12"]
    assert record["sha256"] == sha(caffemodel) and record["converted_sha256"] == sha256_file(path)

    # `deeplab segment` now finds the fetched model without --weights.
    seg = cli("segment", photo_file, "-o", tmp_path / "mask.png", "--no-crf")
    assert seg.exit_code == 0, seg.output
    assert str(path) in seg.stderr

    # A second fetch checks the cache against the record and downloads nothing.
    n = len(state.requests)
    again = cli("weights", "fetch", "--url", url, "--sha256", sha(caffemodel))
    assert again.exit_code == 0 and "already in the cache" in again.stderr and len(state.requests) == n
    listing = {r["name"]: r for r in json.loads(cli("weights", "list", "--json").stdout)}
    assert listing["largefov-voc12"]["status"] == "fetched, verified"

    # Every later use re-checks the cached model: a tampered file is refused by `segment` too.
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x01")
    tampered = cli("segment", photo_file, "-o", tmp_path / "mask2.png", "--no-crf")
    assert tampered.exit_code == 1 and "changed since `deeplab weights fetch`" in tampered.stderr
    assert not (tmp_path / "mask2.png").exists()


def test_trust_on_first_use(server, caffemodel, isolated_cache, capsys):
    base, state = server
    state.files["/m.caffemodel"] = caffemodel
    first = dl.fetch("mymodel", url=f"{base}/m.caffemodel", quiet=True)
    assert (first.trust, first.sha256) == ("first-use", sha(caffemodel))
    assert f"sha256 of m.caffemodel: {sha(caffemodel)}" in capsys.readouterr().err
    records = cache.read_trust()
    assert records["mymodel"]["sha256"] == sha(caffemodel)
    converted = sha256_file(first.path)

    # The file changes upstream: a later download must match the recorded sha256, and is deleted.
    tampered = bytearray(caffemodel)
    tampered[len(tampered) // 2] ^= 0xFF
    state.files["/m.caffemodel"] = bytes(tampered)
    recorded = f"expected {sha(caffemodel)}.*deleted.*recorded on its first download"
    with pytest.raises(dl.ChecksumMismatch, match=recorded):
        dl.fetch("mymodel", url=f"{base}/m.caffemodel", force=True, quiet=True)
    assert sha256_file(first.path) == converted
    assert not any((isolated_cache / "downloads").iterdir())

    # Back to the original: verified against the record.
    state.files["/m.caffemodel"] = caffemodel
    again = dl.fetch("mymodel", url=f"{base}/m.caffemodel", force=True, quiet=True)
    assert again.trust == "recorded" and again.downloaded

    # The cached model is verified on every later fetch: a modified one is refused.
    with open(first.path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    with pytest.raises(DeeplabError, match="changed since `fetch` wrote it"):
        dl.fetch("mymodel", url=f"{base}/m.caffemodel", quiet=True)
    listing = {r["name"]: r for r in dl.list_models()}
    assert listing["mymodel"]["status"] == "MODIFIED since fetch"


def test_fetch_falls_back_to_a_mirror_and_names_the_url_when_all_fail(server, caffemodel, monkeypatch):
    base, state = server
    state.files["/mirror/m.caffemodel"] = caffemodel
    manifest = {"m": {"url": f"{base}/dead/m.caffemodel", "mirrors": [f"{base}/mirror/m.caffemodel"],
                      "format": "caffemodel", "arch": "largefov", "classes": 21, "sha256": None}}
    monkeypatch.setattr(dl, "load_manifest", lambda: manifest)
    result = dl.fetch("m", quiet=True)
    assert result.url == f"{base}/mirror/m.caffemodel" and result.trust == "first-use"

    manifest["n"] = {**manifest["m"], "mirrors": []}
    line = one_line_error(cli("weights", "fetch", "n", "-q"), alone=False)
    assert f"cannot download {base}/dead/m.caffemodel: HTTP 404" in line
    assert "by hand" in line and "deeplab weights convert" in line
    assert "unknown model" in one_line_error(cli("weights", "fetch", "nope"), code=2, alone=False)
    assert "not a sha256" in one_line_error(cli("weights", "fetch", "m", "--sha256", "abc"), code=2, alone=False)


def test_manifest_is_well_formed():
    manifest = load_manifest()
    assert "largefov-voc12" in manifest
    for entry in manifest.values():
        assert entry["url"].startswith("http") and entry["arch"] in ARCHS and entry["format"] == "caffemodel"
        # The authors published no checksums: never a made-up one.
        assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])


# ---------------------------------------------------------------------------------------------
# First run: a command without weights downloads the default model once (integrity rules of fetch)


def test_first_run_downloads_the_default_model_once(server, caffemodel, isolated_cache, photo_file, tmp_path,
                                                     monkeypatch):
    base, state = server
    state.files["/mirror/train2_iter_8000.caffemodel"] = caffemodel
    monkeypatch.delenv("DEEPLAB_OFFLINE")
    monkeypatch.setenv("DEEPLAB_MODEL_URL", f"{base}/mirror/train2_iter_8000.caffemodel")
    first = cli("segment", photo_file, "-o", tmp_path / "a.png", "--no-crf")
    assert first.exit_code == 0, first.output
    assert "downloading the default model largefov-voc12" in first.stderr and (tmp_path / "a.png").is_file()
    record = json.loads((isolated_cache / cache.TRUST_FILE).read_text())["models"]["largefov-voc12"]
    assert record["trust"] == "first-use" and record["sha256"] == sha(caffemodel)
    assert record["converted_sha256"] == sha256_file(cached_model_path())
    n = len(state.requests)
    second = cli("segment", photo_file, "-o", tmp_path / "b.png", "--no-crf")
    assert second.exit_code == 0 and len(state.requests) == n and "downloading" not in second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_never_downloads(server, caffemodel, photo_file, tmp_path, monkeypatch, how):
    base, state = server
    state.files["/m.caffemodel"] = caffemodel
    monkeypatch.setenv("DEEPLAB_MODEL_URL", f"{base}/m.caffemodel")
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1" if how == "env" else "0")
    args = ["segment", photo_file, "-o", tmp_path / "m.png"] + (["--offline"] if how == "flag" else [])
    line = one_line_error(cli(*args), code=2)
    assert "offline" in line and "deeplab weights fetch" in line
    assert not state.requests and not (tmp_path / "m.png").exists()


def test_readme_first_command_runs(tmp_path, isolated_cache):
    """README's first command, minus `pip install`, with the default model already in the cache."""
    import shutil
    import subprocess

    from deeplab_cli.weightfiles.formats import save_weights

    readme = Path(__file__).resolve().parents[1] / "README.md"
    first = readme.read_text().split("```")[1].splitlines()[1]
    command = first.split("&&", 1)[1].split()
    assert command[:2] == ["deeplab", "segment"], first
    shutil.copytree(readme.parent / "examples", tmp_path / "examples")
    save_weights(random_state_dict("largefov", seed=3), cached_model_path(), "largefov")
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DEEPLAB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    outputs = [tmp_path / a for a in command[command.index("-o") + 1:] if not a.startswith("-")]
    assert outputs and all(p.is_file() and p.stat().st_size > 0 for p in outputs)
