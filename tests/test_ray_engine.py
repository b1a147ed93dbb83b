"""`deeplab batch --engine ray`: NumPy post-processing vs torch, the stages without Ray, the messy tree through a
local Ray vs the local engine, a two-node simulated cluster (work on both nodes, a killed network actor, a poison
image), and a real subprocess whose private Ray leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_cli import storage, transforms
from deeplab_cli.archs import ARCHS
from deeplab_cli.batch import discover_inputs, plan_jobs
from deeplab_cli.crf import CRFParams
from deeplab_cli.numpy_transforms import probs_from_scores, upsample_scores
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.weightfiles.formats import build_model, load_weights

from deeplab_cli.batch.ray_engine import LOST, RayOptions, RayRun
from deeplab_cli.batch.ray_stages import NetworkStage, crf_and_write, decode_rows
from helpers import FAST, mask_name, read_report, resized
from helpers import batch_cli as run

try:
    import ray
except ImportError:  # the stages and the NumPy pieces are tested without it
    ray = None
on_ray = pytest.mark.skipif(ray is None, reason="needs Ray: pip install -e '.[ray]'")
RAY_ARGS = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)


# ---------------------------------------------------------------------------------------------
# Torch-free pieces, no Ray


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fc8", [(65, 65), (17, 12), (5, 9), (2, 3)])
def test_numpy_upsampling_equals_torch(arch: str, fc8: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(fc8))
    scores = (rng.standard_normal((21, *fc8)) * 8).astype(np.float32)
    up = transforms.upsample_scores(torch.from_numpy(scores)[None], arch)[0]
    offset = ARCHS[arch].crop_offset
    assert arch not in ("deeplab", "largefov") or offset == {"deeplab": 7, "largefov": 0}[arch]  # the authors' crops
    height, width = max(1, up.shape[1] - 3), max(1, up.shape[2] - 1)  # a crop smaller than the padded map, as for a real photo
    ours = upsample_scores(scores, height, width, ARCHS[arch].output_stride, offset)
    theirs = up[:, :height, :width].numpy()
    assert ours.shape == theirs.shape == (21, height, width)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert (ours.argmax(0) == theirs.argmax(0)).all()
    probs = probs_from_scores(scores, height, width, ARCHS[arch].output_stride, offset)
    reference = transforms.scores_to_probs(up, height, width).numpy()
    assert np.abs(probs - reference).max() <= 1e-5 and (probs.argmax(0) == reference.argmax(0)).all()


def test_numpy_upsampling_refuses_a_crop_beyond_the_map() -> None:
    with pytest.raises(ValueError, match="too small"):
        upsample_scores(np.zeros((2, 3, 3), np.float32), 18, 10, 8, 0)


def test_stages_without_ray_equal_the_segmenter(tmp_path: Path, photo: np.ndarray, weights_file: Path) -> None:
    """decode → network → CRF + write called as plain functions: the masks are the Segmenter's, bad rows pass through."""
    Image.fromarray(photo).save(tmp_path / "a.png")
    resized(photo, 40, 31).save(tmp_path / "b.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths = [tmp_path / n for n in ("a.png", "b.png", "bad.jpg")]
    batch = {"index": np.arange(3), "path": np.array([str(p) for p in paths], object),
             "mask": np.array([str(tmp_path / f"out{i}.png") for i in range(3)], object),
             "overlay": np.array(["", str(tmp_path / "b.overlay.jpg"), ""], object), "probs": np.array([""] * 3, object),
             "legend": np.array([True] * 3)}
    params = CRFParams(iterations=3)
    weights = load_weights(weights_file)
    out = crf_and_write(NetworkStage(weights, device="cpu")(decode_rows(batch)), params)
    assert list(out["status"]) == ["ok", "ok", "failed"] and "not an image" in out["error"][2]
    assert "image" not in out and "scores" not in out  # only small columns go back to the driver
    seg = Segmenter(build_model(weights), device="cpu", crf=params, crf_backend="pydensecrf")
    for i in range(2):
        expected = seg.segment(np.array(Image.open(paths[i]).convert("RGB"))).labels
        assert np.array_equal(np.array(Image.open(tmp_path / f"out{i}.png")), expected)
    assert Image.open(tmp_path / "b.overlay.jpg").size == (40, 31)
    assert not (tmp_path / "out2.png").exists()


def test_storage_writes_urls_whole_through_pyarrow(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/out/a/x.png"
    storage.write_bytes(url, b"mask")
    assert (tmp_path / "out/a/x.png").read_bytes() == b"mask" == storage.read_bytes(url)
    assert [p.name for p in (tmp_path / "out/a").iterdir()] == ["x.png"]  # no temporary name left
    assert [(str(rel), size) for _, rel, size in storage.list_files(f"file://{tmp_path}/out")] == [("a/x.png", 4)]
    assert storage.join("s3://bucket/masks/", "a/x.png") == "s3://bucket/masks/a/x.png"
    assert storage.is_url("gs://b/k") and not storage.is_url("C:\\photos") and not storage.is_url("photos/x.jpg")


# ---------------------------------------------------------------------------------------------
# A local Ray shared by the tests of this module


@pytest.fixture(scope="session")
def ray_session_started() -> None:
    """Start the test session's private local Ray once (2 CPUs, no dashboard); stopped when the session ends."""
    yield
    if ray is not None:
        ray.shutdown()


@pytest.fixture()
def local_ray(ray_session_started: None) -> None:
    """The local Ray: started on first use, and again after a test that ran its own cluster."""
    if not ray.is_initialized():
        ray.init(address="local", **RAY_ARGS)


@pytest.mark.slow
@on_ray
def test_tree_through_ray_equals_the_local_engine(tmp_path: Path, tree, weights_file: Path, local_ray: None) -> None:
    root, good, bad = tree
    results = {}
    for engine in ("local", "ray"):
        out, report = tmp_path / engine, tmp_path / f"{engine}.jsonl"
        res = run(root, "-o", out, "--weights", weights_file, "--report", report, "--engine", engine, *FAST)
        assert res.exit_code == 1, res.output  # the bad images failed
        assert res.stdout == ""
        results[engine] = read_report(report)
    assert {p: r["status"] for p, r in results["ray"].items()} == {p: r["status"] for p, r in results["local"].items()}
    for rel, word in bad.items():
        assert word in results["ray"][str(root / rel)]["error"]
    for rel, size in good.items():
        local, remote = (np.array(Image.open(tmp_path / e / mask_name(rel))) for e in ("local", "ray"))
        assert remote.shape == (size[1], size[0]) and np.array_equal(local, remote), rel
        record = results["ray"][str(root / rel)]
        assert record["size"] == list(size) and set(record["timings"]) == {"decode", "network", "upsample", "crf", "write"}
    written = sorted(str(p.relative_to(tmp_path / "ray")) for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert written == sorted(mask_name(rel) for rel in good)  # no temporary files, nothing for the bad inputs


@pytest.mark.slow
@on_ray
def test_ray_rerun_skips_and_recreates_a_deleted_output(tmp_path: Path, tree, weights_file: Path,
                                                        local_ray: None) -> None:
    root, _, bad = tree
    for rel in bad:
        (root / rel).unlink()
    out, report = tmp_path / "masks", tmp_path / "report.jsonl"
    args = (root, "-o", out, "--weights", weights_file, "--report", report, "--engine", "ray", "--overlay", *FAST)
    assert run(*args).exit_code == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = run(*args)
    assert res.exit_code == 0 and {r["status"] for r in read_report(report).values()} == {"skipped"}
    assert "on Ray" not in res.stderr  # nothing to do: neither the model nor Ray is touched
    victim = out / mask_name("nested/deeper/tall.webp")
    victim.unlink()
    assert run(*args).exit_code == 0
    statuses = {path: r["status"] for path, r in read_report(report).items()}
    assert statuses.pop(str(root / "nested/deeper/tall.webp")) == "done" and set(statuses.values()) == {"skipped"}
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != victim and p.suffix == ".png")


@pytest.mark.slow
@on_ray
def test_ray_dataset_keeps_decode_out_of_the_model_actor(tmp_path: Path, photo_file: Path, weights_file: Path,
                                                         local_ray: None, capsys) -> None:
    jobs = plan_jobs(discover_inputs([photo_file]), tmp_path / "out")
    RayRun(jobs, load_weights(weights_file), device="cpu").build_dataset().explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    assert "TaskPoolMapOperator[MapBatches(decode_rows)]" in plan
    assert "ActorPoolMapOperator[MapBatches(NetworkStage)]" in plan  # not "decode_rows)->MapBatches(NetworkStage)"


@pytest.mark.slow
@on_ray
def test_urls_in_and_out_through_pyarrow(tmp_path: Path, photo: np.ndarray, weights_file: Path, local_ray: None) -> None:
    """file:// URLs take the pyarrow path that s3:// and gs:// take: listing, reading, whole writes, skipping."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    resized(photo, 50, 40).save(tmp_path / "in" / "a.jpg")
    resized(photo, 44, 52).save(tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    source, out, report = f"file://{tmp_path}/in", f"file://{tmp_path}/out", tmp_path / "report.jsonl"
    res = run(source, "-o", out, "--weights", weights_file, "--engine", "ray", "--report", report, "--save-probs",
              *FAST)
    assert res.exit_code == 0, res.output
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "a.png", "a.probs.npy", "sub", "sub/b.png", "sub/b.probs.npy"]
    probs = np.load(tmp_path / "out" / "sub" / "b.probs.npy")
    assert probs.shape == (21, 52, 44) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert {r["output"] for r in read_report(report).values()} == {f"{out}/a.png", f"{out}/sub/b.png"}
    res = run(source, "-o", out, "--weights", weights_file, "--engine", "ray", "--report", report, "--save-probs",
              *FAST)
    assert {r["status"] for r in read_report(report).values()} == {"skipped"}
    res = run(source, "-o", out, "--weights", weights_file, *FAST)
    assert res.exit_code == 2 and "need --engine ray" in res.stderr


@pytest.mark.slow
@on_ray
def test_large_photo_runs_at_the_working_resolution_like_segment_and_the_local_engine(
        tmp_path: Path, photo: np.ndarray, weights_file: Path, local_ray: None) -> None:
    """A photo over --max-side: downscaled for network and CRF (a JPEG decoded at reduced scale unless an overlay
    needs every pixel), mask and overlay at full size; masks equal to `deeplab segment`'s and the local engine's."""
    from helpers import cli

    (tmp_path / "in").mkdir()
    resized(photo, 1100, 800).save(tmp_path / "in" / "big.jpg", quality=90)
    fast = ("--device", "cpu", "--crf-iterations", "3", "--max-side", "200", "--net-threads", "1", "--no-progress",
            "--crf-workers", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the network actor: oneDNN's sums round differently with other thread counts
    try:
        res = cli("segment", tmp_path / "in" / "big.jpg", "-o", tmp_path / "segment.png", "--weights", weights_file,
                  "--crf-backend", "pydensecrf", *fast[:6])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    for name, extra in (("ray", ()), ("ray-overlay", ("--overlay",)), ("local-overlay", ("--overlay",))):
        engine = name.split("-")[0]
        res = run(tmp_path / "in", "-o", tmp_path / name, "--weights", weights_file, "--engine", engine, *extra, *fast)
        assert res.exit_code == 0, res.output
    masks = {name: np.array(Image.open(tmp_path / name / "big.png")) for name in ("ray", "ray-overlay", "local-overlay")}
    assert masks["ray"].shape == (800, 1100)
    assert np.array_equal(masks["ray"], np.array(Image.open(tmp_path / "segment.png")))  # reduced-scale decoding
    assert np.array_equal(masks["ray-overlay"], masks["local-overlay"])  # full decoding, then downscaled
    assert Image.open(tmp_path / "ray-overlay" / "big.overlay.jpg").size == (1100, 800)


def _ray_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line or environment mentions marker (Ray's workers retitle their
    command line, so a test marks the processes it starts through an environment variable they inherit)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                text = b"".join(Path(f"/proc/{entry}/{name}").read_bytes() for name in ("cmdline", "environ"))
            except OSError:
                continue
            if marker.encode() in text:
                pids.append(int(entry))
    return pids


@pytest.mark.slow
@on_ray
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's processes through /proc")
def test_cli_subprocess_interrupted_leaves_no_ray_process_and_resumes(tmp_path: Path, photo: np.ndarray,
                                                                     weights_file: Path, local_ray: None) -> None:
    """The real command with its private local Ray: Ctrl-C after the first mask exits 130 with only whole files
    and leaves no Ray process behind; the rerun (in this process, on the module's Ray) does the rest."""
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    n = 64  # 8 blocks of 8 rows: masks arrive a block at a time, so a Ctrl-C after the first leaves some undone
    for i in range(n):
        resized(photo, 50 + i, 40).save(root / f"x{i:02}.jpg")
    temp = tempfile.mkdtemp(prefix="dlr", dir="/tmp")  # every Ray process of these runs inherits $RAY_TMPDIR
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "deeplab_cli.cli", "batch", str(root), "-o", str(out), "--weights", str(weights_file),
           "--engine", "ray", *FAST]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while not (out.is_dir() and any(out.glob("*.png"))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "not started (interrupted)" in err
    written = [p for p in out.iterdir() if not p.name.startswith(".")]  # .NAME.xxxxxxxx.part: killed mid-write
    assert 0 < len(written) < n and all(p.suffix == ".png" for p in written)
    for mask in written:  # whole files only
        assert Image.open(mask).size == (50 + int(mask.stem[1:]), 40)
    deadline = time.monotonic() + 20
    while _ray_processes(temp) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes(temp) == []
    shutil.rmtree(temp, ignore_errors=True)

    res = run(root, "-o", out, "--weights", weights_file, "--engine", "ray", *FAST)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [f"x{i:02}.png" for i in range(n)]  # temporary files cleared


# ---------------------------------------------------------------------------------------------
# Two simulated nodes: spread, a killed network actor, a poison image


def _abort_on_width_61(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """A CRF that crashes its process (SIGABRT) on every image 61 px wide; counts the crashes in $POISON_LOG."""
    if image.shape[1] == 61:
        with open(os.environ["POISON_LOG"], "a") as log:
            log.write("crash\n")
        os.abort()
    from deeplab_cli.batch.ray_stages import refine_pydensecrf

    return refine_pydensecrf(image, probs, params)


def _children(pids: set[int]) -> dict[int, str]:
    """Direct children of pids → their command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid in pids:
                    found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.slow
@on_ray
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's processes through /proc")
def test_two_node_cluster_spreads_work_survives_a_killed_actor_and_fails_a_poison_image(
        tmp_path: Path, photo: np.ndarray, weights_file: Path, monkeypatch) -> None:
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test connects to its own cluster; the module's local Ray restarts when next needed
    root = tmp_path / "in"
    root.mkdir()
    for i in range(14):
        resized(photo, 40 + 2 * i, 36 + i).save(root / f"p{i:02}.png")  # even widths: never 61
    resized(photo, 61, 47).save(root / "poison.png")
    poison_log = tmp_path / "poison.log"
    monkeypatch.setenv("POISON_LOG", str(poison_log))  # inherited by the nodes' workers
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    temp = tempfile.mkdtemp(prefix="dlr", dir="/tmp")  # short: Ray's socket paths live below it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "temp_dir": temp})
    try:
        cluster.add_node(num_cpus=2, temp_dir=temp)
        ray.init(address=cluster.address, log_to_driver=False)
        raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
        weights = load_weights(weights_file)
        out = tmp_path / "out"
        jobs = plan_jobs(discover_inputs([root]), out)
        killed: list[str] = []

        def kill_network_actor_after_two_masks() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                if len(list(out.glob("*.png"))) >= 2:
                    for pid, cmd in _children(raylets).items():
                        if "NetworkStage" in cmd:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(cmd)
                time.sleep(0.05)

        killer = threading.Thread(target=kill_network_actor_after_two_masks, daemon=True)
        killer.start()
        run = RayRun(jobs, weights, device="cpu", crf=CRFParams(iterations=2), refine=_abort_on_width_61,
                     options=RayOptions(rows_per_block=3, max_crashes=2))
        results = {r.job.path.name: r for r in run}
        killer.join()
        assert killed, "no network actor was found to kill"
        poison = results.pop("poison.png")
        assert poison.status == "failed" and "crashed its worker process" in poison.error, poison.error
        assert poison_log.read_text().count("crash") == 3  # once in its batch, then max_crashes=2 times alone
        assert {r.status for r in results.values()} == {"done"} and len(results) == 14
        assert sorted(p.name for p in out.iterdir()) == sorted(f"p{i:02}.png" for i in range(14))
        assert len({node for (_, node) in run.placement}) == 2  # work landed on both nodes
        assert LOST not in {r.error for r in results.values()}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 20
    while _ray_processes(str(poison_log)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes(str(poison_log)) == []  # every process the cluster started carries $POISON_LOG
