"""The whole main job on EfficientNet-Lite0 (1,000 ImageNet classes) with photos of two classes."""
import json

import numpy as np
import pytest

pytest.importorskip("skimage")

CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Class-index folders 285/ and 967/ with 12 random 224 px crops of skimage's cat and coffee photos."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label, photo in ((CAT, data.chelsea()), (ESPRESSO, data.coffee())):
        folder = root / str(label)
        folder.mkdir()
        h, w = photo.shape[:2]
        for i in range(12):
            side = int(rng.integers(int(0.8 * min(h, w)), min(h, w) + 1))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((224, 224))
            (crop.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else crop).save(folder / f"{i}.png")
    return root


def test_efficientnet_pipeline_builds_a_bank_for_two_classes_and_serves_it(photo_folder, tmp_path, capsys):
    from export.cli import main

    out = tmp_path / "run"
    rc = main(["--threads", "2", "pipeline", "--out", str(out), "--quiet", "--dataset", str(photo_folder),
               "--num-classes", "1000", "--fractions", "0.5", "0.25", "0.25",
               "--factory", "efficientnet-lite0", "--pretrained",
               "--per-class", "4", "--eval-count", "4", "--eval-attacks", "pgd:eps=0.03",
               "--layers", "_avg_pooling", "_fc", "--candidates", "3000", "--keep", "16", "--m", "8",
               "--spread-draws", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.index("\nDetection on the test split")])
    assert report["train"]["trained"] is False and report["train"]["accuracy"]["fit"] >= 0.8
    bank = json.loads((out / "bank" / "bank.json").read_text())
    counts = bank["fingerprints_per_class"]
    assert len(counts) == 1000 and counts[CAT] > 0 and counts[ESPRESSO] > 0 and sum(counts) == counts[CAT] + counts[ESPRESSO]
    assert report["capture"]["num_neurons"] == 1280 + 1000
    assert report["evaluate"] and (out / "report" / "roc.png").exists()
    clean = report["demo"]["clean test"]
    if clean["refused_requests"] == 0:  # a crop predicted outside 285/967 makes its request refused
        assert clean["images"] == 6 and clean["accuracy"] == pytest.approx(report["train"]["accuracy"]["test"], abs=1e-3)
    assert "Served by Triton over gRPC" in printed
