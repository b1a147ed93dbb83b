"""Untrusted and foreign weight files: pickles that run code, random bytes, other key layouts."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error

from deeplab_cli.testing import random_state_dict
from deeplab_cli.weightfiles.formats import load_weights


@pytest.fixture(autouse=True)
def _own_cache(isolated_cache: Path) -> None:
    """Every test gets its own cache directory and no $DEEPLAB_WEIGHTS."""


# ---------------------------------------------------------------------------------------------
# Untrusted and foreign files


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, photo_file, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"conv1_1.weight": Evil(marker)}
    if writer == "torch":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    for args in (("segment", photo_file, "--weights", evil, "-o", tmp_path / "m.png"), ("weights", "info", evil)):
        line = one_line_error(cli(*args), alone=False)
        assert str(evil) in line and "refusing to unpickle" in line
    assert not marker.exists()
    assert not (tmp_path / "m.png").exists()


def test_random_file_fails_in_one_line(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(2).bytes(5000))
    assert str(path) in one_line_error(cli("weights", "info", path), alone=False)


def _torchvision_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under torchvision-VGG-like names: features.N for the convolutions, classifier.N for fc6–fc8."""
    conv_index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    names = [f"features.{i}" for i in conv_index] + ["classifier.0", "classifier.3", "classifier.6"]
    layers = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    return {f"{new}.{p}": sd[f"{old}.{p}"] for old, new in zip(layers, names, strict=True) for p in ("weight", "bias")}


@pytest.mark.parametrize("layout", ["module", "torchvision"])
def test_foreign_state_dict_layouts_import(tmp_path, layout):
    sd = random_state_dict("largefov", seed=9)
    foreign = {f"module.{k}": v for k, v in sd.items()} if layout == "module" else _torchvision_layout(sd)
    path = tmp_path / f"{layout}.pth"
    torch.save({"state_dict": foreign}, path)
    w = load_weights(path)
    assert (w.arch, w.num_classes) == ("largefov", 21)
    assert all(torch.equal(w.state_dict[k], v) for k, v in sd.items())
    result = cli("weights", "info", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    summary = (info["arch"], info["classes"], info["parameters"], info["format"])
    assert summary == ("largefov", 21, 20_505_429, "pytorch")


def test_unmappable_keys_are_named(tmp_path):
    sd = {f"module.{k}": v for k, v in random_state_dict("largefov").items()}
    sd["module.bn1.running_mean"] = torch.zeros(64)
    path = tmp_path / "bn.pth"
    torch.save(sd, path)
    line = one_line_error(cli("weights", "info", path), alone=False)
    assert str(path) in line and "bn1.running_mean" in line
    sd = _torchvision_layout(random_state_dict("largefov"))
    del sd["features.28.weight"], sd["features.28.bias"]
    torch.save(sd, path)
    assert "found 15 convolution weights, need 16" in one_line_error(cli("weights", "info", path), alone=False)
