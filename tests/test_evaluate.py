"""`deeplab evaluate`: metrics with hand-computed answers, dataset discovery, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import cli
from PIL import Image

from deeplab_cli.errors import UsageError
from deeplab_cli.evaluate import (
    Evaluation, confusion_matrix, folder_dataset, label_problem, read_label, scores_from_confusion, voc_dataset,
)
from deeplab_cli.io import write_mask
from deeplab_cli.palette import VOC_CLASSES


run = cli


def make_voc(root: Path, items: dict[str, tuple[np.ndarray, np.ndarray]], split: str = "val",
             listed: list[str] | None = None) -> Path:
    """Write a VOC-layout dataset: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette), the split list."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for key, (image, label) in items.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{key}.jpg", quality=95)
        write_mask(root / "SegmentationClass" / f"{key}.png", label)
    names = listed if listed is not None else list(items)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{k}\n" for k in names))
    return root


def blocks(h: int, w: int, classes: list[int], seed: int) -> np.ndarray:
    """A label map of random rectangles of the given classes, with a void (255) outline as VOC draws them."""
    rng = np.random.default_rng(seed)
    label = np.full((h, w), classes[0], np.uint8)
    for c in classes[1:]:
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 12)
        dy, dx = rng.integers(8, h - y + 1), rng.integers(10, w - x + 1)
        label[y:y + dy, x:x + dx] = c
        label[y, x:x + dx] = label[y + dy - 1, x:x + dx] = 255
    return label


def image_for(label: np.ndarray, seed: int) -> np.ndarray:
    """A photo-like image whose regions follow the label (so the CRF has edges to work with)."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (256, 3))
    return np.clip(colors[label] + rng.normal(0, 8, (*label.shape, 3)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- metrics


def test_confusion_counts_rows_gt_columns_pred() -> None:
    gt = np.array([[0, 0, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 0, 2]])
    conf = confusion_matrix(gt, pred, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert conf.dtype == np.int64


def test_prediction_equal_to_ground_truth_scores_100() -> None:
    gt = np.random.default_rng(0).integers(0, 5, (30, 40))
    s = scores_from_confusion(confusion_matrix(gt, gt, 5))
    assert s.miou == s.pixel_accuracy == s.mean_class_accuracy == 1.0
    assert np.all(s.iou == 1.0) and s.pixels == gt.size


def test_known_confusion_gives_hand_computed_ious() -> None:
    # Class 0: 6 pixels, 5 right, 1 taken for class 1. Class 1: 4 pixels, 3 right, 1 taken for class 0.
    gt = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])[None]
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])[None]
    s = scores_from_confusion(confusion_matrix(gt, pred, 2))
    assert s.iou[0] == pytest.approx(5 / 7)  # TP 5 / (TP 5 + FN 1 + FP 1)
    assert s.iou[1] == pytest.approx(3 / 5)  # TP 3 / (TP 3 + FN 1 + FP 1)
    assert s.miou == pytest.approx((5 / 7 + 3 / 5) / 2)
    assert s.pixel_accuracy == pytest.approx(8 / 10)
    assert s.mean_class_accuracy == pytest.approx((5 / 6 + 3 / 4) / 2)


def test_void_pixels_are_ignored_whatever_is_predicted_there() -> None:
    gt = np.array([[0, 1, 255, 255]])
    a = confusion_matrix(gt, np.array([[0, 1, 0, 1]]), 2)
    b = confusion_matrix(gt, np.array([[0, 1, 1, 0]]), 2)
    assert np.array_equal(a, b) and a.sum() == 2
    assert scores_from_confusion(a).miou == 1.0


def test_absent_class_has_no_iou_and_false_positives_score_zero() -> None:
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 never in the ground truth but predicted once; class 3 nowhere
    s = scores_from_confusion(confusion_matrix(gt, pred, 4))
    assert s.iou[2] == 0.0 and math.isnan(s.iou[3])
    assert s.miou == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert math.isnan(s.class_accuracy[2]) and s.mean_class_accuracy == pytest.approx((1 / 2 + 1) / 2)


def test_accumulation_is_over_pixels_of_all_images_not_a_mean_of_images() -> None:
    ev = Evaluation.empty(["a", "b"], ["no_crf"])
    gt1, pred1 = np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)
    gt2, pred2 = np.array([[1, 1, 1, 1, 1, 1]]), np.array([[1, 1, 1, 0, 0, 0]])
    ev.add("one", gt1, {"no_crf": pred1})
    ev.add("two", gt2, {"no_crf": pred2})
    joint = confusion_matrix(np.concatenate([gt1.ravel(), gt2.ravel()]),
                             np.concatenate([pred1.ravel(), pred2.ravel()]), 2)
    assert np.array_equal(ev.confusion["no_crf"], joint)
    assert ev.scores("no_crf").iou.tolist() == pytest.approx([4 / 7, 3 / 6])


def test_confusion_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="ground truth"):
        confusion_matrix(np.array([[3]]), np.array([[0]]), 3)


def test_label_problems_named() -> None:
    assert label_problem(np.zeros((4, 5), np.uint8), (4, 5), 21) is None
    assert label_problem(np.full((4, 5), 255, np.uint8), (4, 5), 21) is None
    assert "label is 5×4 (W×H) but the image is 6×4" in label_problem(np.zeros((4, 5), np.uint8), (4, 6), 21)
    bad = np.array([[0, 21, 40, 255]], np.uint8)
    assert "class values 21, 40 outside the model's 21 classes" in label_problem(bad, (1, 4), 21)


# --------------------------------------------------------------------------------------------- datasets


def test_voc_dataset_reads_split_in_order_and_reports_missing(tmp_path: Path) -> None:
    items = {k: (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)) for k in ("b", "a")}
    root = make_voc(tmp_path / "VOC", items, listed=["b", "a", "ghost", "a"])
    ds = voc_dataset(root, "val")
    assert [s.key for s in ds.samples] == ["b", "a"]
    assert [(p.key, p.reason) for p in ds.problems] == [("ghost", "image listed in the split but missing")]
    with pytest.raises(UsageError, match="split 'train' not found; available: val"):
        voc_dataset(root, "train")
    with pytest.raises(UsageError, match="not a VOC-layout dataset"):
        voc_dataset(tmp_path, "val")


def test_predicted_equal_to_ground_truth_on_a_voc_dataset(tmp_path: Path) -> None:
    items = {f"im{i}": (image_for(lab := blocks(40, 60, [0, 3, 7], i), i), lab) for i in range(3)}
    ds = voc_dataset(make_voc(tmp_path, items), "val")
    ev = Evaluation.empty(VOC_CLASSES, ["no_crf", "crf"])
    for sample in ds.samples:
        gt = read_label(sample, (40, 60), 21)
        ev.add(sample.key, gt, {"no_crf": gt, "crf": gt})
    report = ev.as_dict()
    for mode in ("no_crf", "crf"):
        r = report["results"][mode]
        assert r["miou"] == r["pixel_accuracy"] == r["mean_class_accuracy"] == 1.0
        assert [c["index"] for c in r["per_class"] if c["iou"] is not None] == [0, 3, 7]
        assert r["pixels"] == sum(int((lab != 255).sum()) for _, lab in items.values())


def test_folder_dataset_matches_by_relative_name(tmp_path: Path) -> None:
    for rel in ("img/a.jpg", "img/s/b.png", "img/c.jpg", "img/d.jpg", "img/d.png", "lab/a.png", "lab/s/b.png",
                "lab/d.png", "lab/e.png", "img/readme.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    ds = folder_dataset(tmp_path / "img", tmp_path / "lab")
    assert [s.key for s in ds.samples] == ["a", "s/b"]
    assert ds.unmatched_images == ["c"] and ds.unmatched_labels == ["e"]
    assert [p.key for p in ds.problems] == ["d"] and "ambiguous" in ds.problems[0].reason


# --------------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Three 40×60-ish images with block labels (classes 0, 5, 12, 15 and void outlines), VOC layout."""
    root = tmp_path_factory.mktemp("VOC2012")
    sizes = [(40, 60), (44, 56), (40, 60)]
    items = {}
    for i, (h, w) in enumerate(sizes):
        label = blocks(h, w, [0, 5, 12, 15], seed=i)
        items[f"2007_00{i}"] = (image_for(label, i), label)
    make_voc(root, items)
    return root, items


def naive_confusion(gts: list[np.ndarray], preds: list[np.ndarray], c: int = 21) -> np.ndarray:
    """Pixel by pixel, independent of the vectorised implementation."""
    conf = np.zeros((c, c), np.int64)
    for gt, pred in zip(gts, preds):
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
            if g != 255:
                conf[g, p] += 1
    return conf


def test_cli_evaluate_json_matches_segment_outputs(tmp_path: Path, voc, weights_file: Path) -> None:
    root, items = voc
    res = run("evaluate", root, "--weights", weights_file, "--device", "cpu", "--crf", "both", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["images"] == {"total": 3, "scored": 3, "skipped": 0, "interrupted": False}
    assert report["problems"] == []
    assert report["dataset"]["layout"] == "voc" and report["dataset"]["split"] == "val"
    assert report["model"]["arch"] == "largefov" and report["model"]["num_classes"] == 21
    assert report["crf"]["bi_xy"] == 121.0
    assert set(report["results"]) == {"no_crf", "crf"}

    gts = [lab for _, lab in items.values()]
    for mode, flags in (("no_crf", ["--no-crf"]), ("crf", [])):
        preds = []
        for key in items:
            out = tmp_path / f"{key}-{mode}.png"
            seg = run("segment", root / "JPEGImages" / f"{key}.jpg", "-o", out, "--weights", weights_file,
                      "--device", "cpu", *flags)
            assert seg.exit_code == 0, seg.output
            preds.append(np.array(Image.open(out)))
        conf = naive_confusion(gts, preds)
        r = report["results"][mode]
        assert r["confusion"] == conf.tolist()
        tp, gt_n, pred_n = np.diag(conf), conf.sum(1), conf.sum(0)
        union = gt_n + pred_n - tp
        ious = [tp[i] / union[i] if union[i] else None for i in range(21)]
        assert [c["iou"] for c in r["per_class"]] == pytest.approx(ious, abs=1e-6)
        assert r["miou"] == pytest.approx(np.mean([x for x in ious if x is not None]), abs=1e-6)
        assert r["pixel_accuracy"] == pytest.approx(tp.sum() / conf.sum(), abs=1e-6)
        assert r["pixels"] == sum(int((g != 255).sum()) for g in gts)
        assert [c["name"] for c in r["per_class"]] == list(VOC_CLASSES)


def test_cli_crf_both_runs_the_network_once_per_image(voc, weights_file: Path, monkeypatch) -> None:
    from deeplab_cli.pipeline import Segmenter

    calls = []
    original = Segmenter.scores

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(Segmenter, "scores", counting)
    results = {}
    for mode in ("off", "on", "both"):
        calls.clear()
        res = run("evaluate", voc[0], "--weights", weights_file, "--device", "cpu", "--crf", mode, "--json")
        assert res.exit_code == 0, res.output
        assert sum(calls) == 3  # images through the network, whatever the mode
        results[mode] = json.loads(res.stdout)["results"]
    assert results["both"]["no_crf"] == results["off"]["no_crf"]
    assert results["both"]["crf"] == results["on"]["crf"]


def test_cli_table_on_stdout_and_folder_pairs(tmp_path: Path, voc, weights_file: Path) -> None:
    root, _ = voc
    res = run("evaluate", root, "--weights", weights_file, "--device", "cpu", "--crf", "off", "--limit", "2")
    assert res.exit_code == 0, res.output
    assert "mean IoU" in res.stdout and "tvmonitor" in res.stdout and "2 images scored" in res.stdout
    json_voc = json.loads(run("evaluate", root, "--weights", weights_file, "--crf", "off", "--json").stdout)
    res = run("evaluate", "--images", root / "JPEGImages", "--labels", root / "SegmentationClass",
              "--weights", weights_file, "--crf", "off", "--json")
    assert res.exit_code == 0, res.output
    json_dirs = json.loads(res.stdout)
    assert json_dirs["dataset"]["layout"] == "folders"
    assert json_dirs["results"] == json_voc["results"]


def test_cli_bad_labels_reported_per_file_not_fatal(tmp_path: Path, voc, weights_file: Path) -> None:
    _, items = voc
    image, label = next(iter(items.values()))
    bad_values = label.copy()
    bad_values[0, :5] = 30
    data = {"good": (image, label), "small": (image, label[:-4]), "values": (image, bad_values)}
    root = make_voc(tmp_path / "VOC", data, listed=["good", "small", "values", "gone"])
    (root / "SegmentationClass" / "broken.png").write_bytes(b"not a png")
    (root / "JPEGImages" / "broken.jpg").write_bytes((root / "JPEGImages" / "good.jpg").read_bytes())
    with open(root / "ImageSets/Segmentation/val.txt", "a") as f:
        f.write("broken\n")
    res = run("evaluate", root, "--weights", weights_file, "--crf", "off", "--json")
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert report["images"] == {"total": 5, "scored": 1, "skipped": 4, "interrupted": False}
    reasons = {p["key"]: p["reason"] for p in report["problems"]}
    assert "label is 60×36 (W×H) but the image is 60×40" in reasons["small"]
    assert "class values 30 outside the model's 21 classes" in reasons["values"]
    assert "missing" in reasons["gone"] and "cannot decode label image" in reasons["broken"]
    assert "skipped" in res.stderr and res.stderr.strip().endswith("4 of 5 images could not be scored (listed above)")


def test_cli_usage_errors(tmp_path: Path, voc, weights_file: Path) -> None:
    cases = [
        (["evaluate", tmp_path, "--weights", weights_file], "not a VOC-layout dataset"),
        (["evaluate", voc[0], "--split", "test", "--weights", weights_file], "split 'test' not found"),
        (["evaluate", "--images", tmp_path, "--weights", weights_file], "--images and --labels go together"),
        (["evaluate", voc[0], "--crf", "both", "--no-crf", "--weights", weights_file], "--no-crf contradicts"),
        (["evaluate", "--weights", weights_file], "no dataset"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_cli_interrupted_reports_partial_scores_and_exits_130(voc, weights_file: Path, monkeypatch) -> None:
    import deeplab_cli.batch as batch

    real_run_batch = batch.run_batch

    class StoppedAfterOne:
        """What run_batch gives after a Ctrl-C during the first image: that image finished, no others."""

        def __init__(self, segmenter, jobs, **options):
            self.jobs = list(jobs)[:1]
            self.run = real_run_batch(segmenter, self.jobs, **options)
            self.interrupted = True

        def __iter__(self):
            return iter(self.run)

        def close(self) -> None:
            self.run.close()

    monkeypatch.setattr(batch, "run_batch", StoppedAfterOne)
    res = run("evaluate", voc[0], "--weights", weights_file, "--crf", "off", "--json")
    assert res.exit_code == 130
    report = json.loads(res.stdout)
    assert report["images"] == {"total": 3, "scored": 1, "skipped": 0, "interrupted": True}
    assert "interrupted: the scores cover only 1 of 3 images" in res.stderr
