"""`deeplab batch`: a tree of good and bad images, resumption, interruption (SIGINT, SIGKILL), names, the library API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, mask_name, read_report, resized
from helpers import batch_cli as run
from PIL import Image

from deeplab_cli.batch import (
    Job,
    OutputPaths,
    check_no_overwrite,
    discover_inputs,
    is_complete,
    output_base_names,
    plan_jobs,
    remove_stale_parts,
    run_batch,
)
from deeplab_cli.errors import UsageError
from deeplab_cli.io import atomic_path
from deeplab_cli.pipeline import Segmenter

def assert_masks(out: Path, good: dict[str, tuple[int, int]]) -> None:
    for rel, size in good.items():
        mask = Image.open(out / mask_name(rel))
        assert mask.mode == "P" and mask.size == size, rel
        assert np.array(mask).max() < 21


def test_tree_end_to_end(tmp_path: Path, tree, weights_file: Path) -> None:
    root, good, bad = tree
    out, report = tmp_path / "masks", tmp_path / "report.jsonl"
    res = run(root, "-o", out, "--weights", weights_file, "--report", report, *FAST)
    assert res.exit_code == 1, res.output
    assert res.stdout == ""
    assert_masks(out, good)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(mask_name(rel) for rel in good)  # nothing else: no temp files, no outputs for bad inputs
    records = read_report(report)
    assert set(records) == {str(root / rel) for rel in [*good, *bad]}  # notes.txt and .hidden.jpg are not inputs
    for rel in good:
        r = records[str(root / rel)]
        assert r["status"] == "done" and r["error"] is None and r["output"] == str(out / mask_name(rel))
        assert r["size"] == list(good[rel])
        assert set(r["timings"]) == {"decode", "network", "upsample", "crf", "write"}
    for rel, word in bad.items():
        r = records[str(root / rel)]
        assert r["status"] == "failed" and word in r["error"], r
        assert str(root / rel) in res.stderr  # listed in the summary with its reason
    assert "done" in res.stderr and "failed" in res.stderr


def test_rerun_skips_and_recreates_only_a_deleted_output(tmp_path: Path, tree, weights_file: Path) -> None:
    root, _, bad = tree
    for rel in bad:
        (root / rel).unlink()
    out, report = tmp_path / "masks", tmp_path / "report.jsonl"
    assert run(root, "-o", out, "--weights", weights_file, *FAST).exit_code == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    res = run(root, "-o", out, "--weights", weights_file, "--report", report, *FAST)
    assert res.exit_code == 0
    assert {r["status"] for r in read_report(report).values()} == {"skipped"}
    assert "on cpu" not in res.stderr  # nothing to do: the model is not even loaded
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps

    victim = out / mask_name("nested/deeper/tall.webp")
    victim.unlink()
    res = run(root, "-o", out, "--weights", weights_file, "--report", report, *FAST)
    assert res.exit_code == 0
    statuses = {path: r["status"] for path, r in read_report(report).items()}
    assert statuses.pop(str(root / "nested/deeper/tall.webp")) == "done"
    assert set(statuses.values()) == {"skipped"}
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != victim)

    res = run(root, "-o", out, "--weights", weights_file, "--report", report, "--overwrite", *FAST)
    assert res.exit_code == 0 and {r["status"] for r in read_report(report).values()} == {"done"}


def test_overlay_and_probs_beside_masks(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    resized(photo, 60, 44).save(root / "x.jpg")
    resized(photo, 48, 40).save(root / "x.png")
    resized(photo, 40, 40).save(root / "x.overlay.jpg")  # an input named like another's overlay
    out = tmp_path / "out"
    res = run(root, "-o", out, "--weights", weights_file, "--overlay", "--save-probs", *FAST)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "x.jpg.png", "x.jpg.overlay.jpg", "x.jpg.probs.npy",
        "x.png.png", "x.png.overlay.jpg", "x.png.probs.npy",
        "x.overlay.png", "x.overlay.overlay.jpg", "x.overlay.probs.npy",
    ])
    probs = np.load(out / "x.jpg.probs.npy")
    assert probs.shape == (21, 44, 60) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert Image.open(out / "x.jpg.overlay.jpg").size == (60, 44)


def test_output_names_never_collide() -> None:
    assert output_base_names(["a.jpg", "b.png"]) == {"a.jpg": "a", "b.png": "b"}
    assert output_base_names(["x.jpg", "x.png"]) == {"x.jpg": "x.jpg", "x.png": "x.png"}
    # x.jpg.png's stem is x.jpg, which is another input's name: both must keep whole names.
    assert output_base_names(["x.jpg", "x.jpg.png"]) == {"x.jpg": "x", "x.jpg.png": "x.jpg.png"}
    rng = np.random.default_rng(0)
    parts = ["x", "x.jpg", "x.png", "y", "x.overlay", "x.probs", "X"]
    for _ in range(300):
        names = sorted({"".join(rng.choice(parts, size=rng.integers(1, 3))) + rng.choice([".jpg", ".png", ".tif"])
                        for _ in range(rng.integers(1, 8))})
        bases = output_base_names(names)
        outputs = [b + suffix for b in bases.values() for suffix in (".png", ".overlay.jpg", ".probs.npy")]
        assert len(set(outputs)) == len(outputs), names
        assert bases == output_base_names(list(reversed(names)))  # independent of order


def test_names_mirror_the_tree_for_folders_globs_and_lists(tmp_path: Path, photo: np.ndarray, monkeypatch) -> None:
    src = tmp_path / "shots"
    (src / "a" / "b").mkdir(parents=True)
    for rel in ("top.jpg", "a/one.jpg", "a/b/two.png", "a/b/skip.txt"):
        (src / rel).write_bytes(b"x")
    out = tmp_path / "masks"
    keys = lambda inputs: sorted(str(i.key) for i in inputs)
    assert keys(discover_inputs([src])) == ["a/b/two.png", "a/one.jpg", "top.jpg"]
    assert keys(discover_inputs([src], recursive=False)) == ["top.jpg"]
    assert keys(discover_inputs([f"{src}/**/*.jpg"])) == ["a/one.jpg", "top.jpg"]
    assert keys(discover_inputs([f"{src}/a/*/*.png"])) == ["b/two.png"]
    monkeypatch.chdir(tmp_path)
    listed = tmp_path / "list.txt"
    listed.write_text("./shots/a/one.jpg\nshots/a/b/two.png\n\nshots/a/b/skip.txt\n")
    assert keys(discover_inputs(from_list=str(listed))) == ["shots/a/b/two.png", "shots/a/one.jpg"]
    listed.write_bytes(b"shots/top.jpg\0shots/a/one.jpg\0")
    assert keys(discover_inputs(from_list=str(listed))) == ["shots/a/one.jpg", "shots/top.jpg"]
    # The same file reached twice is one input; the output folder inside the tree is not walked.
    (src / "masks").mkdir()
    (src / "masks" / "old.png").write_bytes(b"x")
    assert keys(discover_inputs([src, src / "top.jpg"], exclude=src / "masks")) == ["a/b/two.png", "a/one.jpg", "top.jpg"]
    jobs = plan_jobs(discover_inputs([src]), out, overlay=True)
    assert sorted(str(j.outputs.mask.relative_to(out)) for j in jobs) == ["a/b/two.png", "a/one.png", "masks/old.png", "top.png"]
    with pytest.raises(UsageError, match="no files match"):
        discover_inputs([f"{src}/*.gif"])
    with pytest.raises(UsageError, match="no such file"):
        discover_inputs([tmp_path / "missing"])


def test_refuses_outputs_over_inputs(tmp_path: Path, tree, weights_file: Path) -> None:
    root, _, _ = tree
    res = run(root, "-o", root, "--weights", weights_file, *FAST)
    assert res.exit_code == 2 and "input folder" in res.stderr and "Traceback" not in res.output
    res = run(f"{root}/*.png", "-o", root, "--weights", weights_file, *FAST)
    assert res.exit_code == 2 and "refusing to overwrite the input" in res.stderr
    assert run("-o", tmp_path / "x", *FAST).exit_code == 2  # no inputs at all
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "same.jpg").write_bytes(b"x"), (b / "same.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="would both be written"):
        plan_jobs(discover_inputs([a, b]), tmp_path / "out")
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        check_no_overwrite([Job(a / "same.jpg", OutputPaths(b / "same.jpg")), Job(b / "same.jpg")])
    jobs = plan_jobs(discover_inputs([a / "same.jpg"]), tmp_path / "out")
    assert not is_complete(jobs[0])


def test_output_inside_the_input_tree_and_from_list_stdin(tmp_path: Path, photo: np.ndarray, weights_file: Path,
                                                          monkeypatch) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    resized(photo, 50, 40).save(root / "a.jpg")
    resized(photo, 40, 50).save(root / "sub" / "b.png")
    out = root / "masks"
    assert run(root, "-o", out, "--weights", weights_file, *FAST).exit_code == 0
    report = tmp_path / "r.jsonl"
    res = run(root, "-o", out, "--weights", weights_file, "--report", report, *FAST)
    assert res.exit_code == 0 and len(read_report(report)) == 2  # masks/ was not read back as input
    monkeypatch.chdir(tmp_path)
    listing = b"photos/a.jpg\nphotos/sub/b.png\n"
    res = run("--from-list", "-", "-o", "listed", "--weights", weights_file, "--no-crf", *FAST, input=listing)
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "listed/photos/sub/b.png").size == (40, 50)


def test_library_api_results_without_writing(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    seg = Segmenter.from_weights(weights_file, device="cpu")
    paths = []
    for i, (w, h) in enumerate([(60, 45), (60, 45), (41, 66), (60, 45), (52, 52)]):
        p = tmp_path / f"im{i}.png"
        resized(photo, w, h).save(p)
        paths.append(p)
    jobs = [Job(p, tag=i) for i, p in enumerate(paths)] + [Job(tmp_path / "missing.jpg", tag="m")]
    run_ = run_batch(seg, jobs, batch_size=3, crf_workers=1, keep_probs=True, keep_crf_probs=True, keep_images=True)
    results = {r.job.tag: r for r in run_}
    assert not run_.interrupted and set(results) == {0, 1, 2, 3, 4, "m"}
    assert results["m"].status == "failed" and "no such file" in results["m"].error
    for i, p in enumerate(paths):
        r = results[i]
        image = np.array(Image.open(p).convert("RGB"))
        reference = seg.segment(image)
        assert r.status == "done" and np.array_equal(r.image, image)
        np.testing.assert_allclose(r.probs, reference.probs, atol=1e-4)  # batched (3 of one size) or alone
        assert np.array_equal(r.labels_before_crf, r.probs.argmax(0))
        assert np.array_equal(r.labels_after_crf, r.crf_probs.argmax(0))
        assert np.array_equal(r.labels, r.labels_after_crf)
        assert (reference.labels != r.labels).mean() < 0.01
    assert list(tmp_path.iterdir()) == paths or sorted(tmp_path.iterdir()) == sorted(paths)  # nothing written

    same = list(run_batch(seg, [Job(paths[2])], crf_workers=0, keep_crf_probs=True))[0]  # CRF on a thread here
    np.testing.assert_allclose(same.crf_probs, results[2].crf_probs, atol=1e-5)

    seg.crf = None  # no CRF: labels are the network's argmax; the CRF stage is absent
    results = list(run_batch(seg, [Job(paths[2])], crf_workers=0))
    assert results[0].labels_after_crf is None and results[0].labels.shape == (66, 41)
    assert "crf" not in results[0].timings


def test_a_dying_crf_worker_fails_only_its_images(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    seg = Segmenter.from_weights(weights_file, device="cpu")
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"im{i:02d}.png")
        resized(photo, 40 + i, 40).save(paths[-1])
    run_ = run_batch(seg, [Job(p) for p in paths], crf_workers=1, net_threads=1)
    results = []
    for result in run_:
        if not results:
            for pid in run_._crf_pool.pids():
                os.kill(pid, signal.SIGKILL)
        results.append(result)
    assert sorted(r.job.path for r in results) == paths
    failed = [r for r in results if not r.ok]
    assert all("CRF worker process died" in r.error for r in failed)
    assert len(failed) < 6 and results[-1].ok  # work in flight may fail; a fresh pool takes over


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "m.png") as tmp:
        raise RuntimeError
    tmp.write_bytes(b"half a PNG")  # what a SIGKILL would have left: the cleanup never ran
    (tmp_path / ".keep.part").write_bytes(b"")  # not one of ours: left alone
    assert remove_stale_parts([tmp_path]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.part"]


# ---------------------------------------------------------------------------------------------
# Interruptions of a real `deeplab batch` process


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "deeplab_cli.cli", "batch", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_masks(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"batch ended early: {proc.stderr.read().decode()}")
        if out.exists() and sum(1 for _ in out.rglob("*.png")) >= n:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no outputs appeared in time")


@pytest.fixture()
def many(tmp_path: Path, photo: np.ndarray) -> tuple[Path, int]:
    root = tmp_path / "many"
    for i in range(40):
        folder = root / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        resized(photo, 40 + (i * 7) % 50, 40 + (i * 11) % 50).save(folder / f"img{i:02d}.png")
    return root, 40


def _check_outputs_whole(root: Path, out: Path) -> int:
    count = 0
    for mask in out.rglob("*.png"):
        source = root / mask.relative_to(out)
        with Image.open(mask) as im:
            im.load()  # a truncated PNG raises here
            assert im.size == Image.open(source).size
        count += 1
    return count


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGINT twice", "SIGKILL"])
def test_interrupted_run_leaves_whole_files_and_resumes(tmp_path: Path, many, weights_file: Path, how: str) -> None:
    root, n = many
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    args = [str(root), "-o", str(out), "--weights", str(weights_file), "--report", str(report), *FAST,
            "--crf-iterations", "10"]
    proc = _start(args, tmp_path)
    _wait_for_masks(out, 3, proc)
    proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
    if how == "SIGINT twice":
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # abort: the work in flight is dropped
    _, err = proc.communicate(timeout=60)  # also: no orphaned worker keeps stderr open after a SIGKILL
    written = _check_outputs_whole(root, out)
    if how.startswith("SIGINT"):
        # A Ctrl-C landing in interpreter finalization (Python has reset SIGINT to its default by then) ends
        # the process by the signal itself; a shell reports both as status 130.
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err.decode()[-2000:])
        assert "interrupted" in err.decode() and "Traceback" not in err.decode()
        records = read_report(report)  # the report covers what was done before the interrupt
        assert {r["status"] for r in records.values()} == {"done"}
        # An abort may leave a mask whose result was never reported: whole, so it is skipped next time.
        assert len(records) == written if how == "SIGINT" else len(records) <= written
    if how == "SIGINT":
        assert "not started" in err.decode()  # the summary was printed
        assert not list(out.rglob(".*.part"))  # finished cleanly: no temporary files either
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    assert written < n

    res = run(*args)
    assert res.exit_code == 0, res.output
    assert _check_outputs_whole(root, out) == n
    assert not list(out.rglob(".*.part"))
    statuses = [r["status"] for r in read_report(report).values()]
    assert statuses.count("skipped") >= written and statuses.count("done") == n - statuses.count("skipped")


def test_single_folder_without_o_writes_beside_it_and_reruns_skip(tmp_path: Path, photo: np.ndarray,
                                                                   weights_file: Path, monkeypatch) -> None:
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    resized(photo, 40, 30).save(root / "a.jpg")
    resized(photo, 33, 29).save(root / "sub" / "b.png")
    monkeypatch.chdir(tmp_path)
    res = run("dir/", "--weights", weights_file, *FAST)
    assert res.exit_code == 0, res.output
    out = tmp_path / "dir_masks"
    assert res.stderr.splitlines()[0] == f"deeplab: writing to {out} (no -o given)"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.png", "sub/b.png"]
    assert not any(p.name.endswith(".png") and p.parent.name == "dir" for p in root.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = run("dir", "--weights", weights_file, *FAST)
    assert again.exit_code == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    # Several inputs, a glob, an image or a list: -o stays required, said in one line.
    for args in (["dir", "dir/sub"], ["dir/*.jpg"], ["dir/a.jpg"], ["--from-list", "-"]):
        res = run(*args, "--weights", weights_file, *FAST, input=b"dir/a.jpg\n")
        assert res.exit_code == 2 and "-o DIR is required" in res.stderr and res.stderr.count("\n") == 1, args
