"""The whole offline pipeline through the command line, on 600 real MNIST images."""
import json

import numpy as np
import pytest

from export.cli import main


def test_main_job_runs_every_stage_and_records_a_manifest(tiny_run):
    out, printed = tiny_run
    report = json.loads(printed[: printed.index("\nDetection on the test split")])
    assert report["train"]["accuracy"]["test"] > 0.7
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["prepare", "train", "attack", "capture", "search", "calibrate", "evaluate",
                                         "export"]
    assert "Served by Triton over gRPC" in printed and report["demo"]["clean test"]["images"] == 120
    assert "activations/fit_attacked.npy" in manifest["stages"]["capture"]["files"]

    layout = json.loads((out / "activations" / "layout.json").read_text())
    assert layout["num_neurons"] == 12938
    attacked = np.load(out / "activations" / "fit_attacked.npy")
    meta = np.load(out / "activations" / "fit_attacked.npz")
    assert attacked.shape == (len(meta["label"]), 12938)
    np.testing.assert_array_equal(meta["predicted"], meta["label"])  # attacked rows land in their focal class
    for name in ("eval_fgsm_eps0.3", "eval_pgd-targeted_eps0.2", "eval_deepfool", "eval_cw-l2"):
        assert (out / "activations" / f"{name}.npy").exists()
    summary = json.loads((out / "attacks" / "summary.json").read_text())
    assert summary["eval"]["cw-l2"]["params"]["max_iter"] == 3

    bank = json.loads((out / "bank" / "bank.json").read_text())
    assert bank["draws_per_input"] == 16 and set(bank["calibration"]) == {"lrt", "vote", "anomaly"}
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    fgsm = evaluation["attacks"]["fgsm_eps0.3"]
    assert fgsm["lrt"]["auc"] > 0.8 and fgsm["spread"]["draws"] == 5
    assert (out / "report" / "roc.png").stat().st_size > 10_000
    assert "| fgsm_eps0.3 |" in (out / "report" / "evaluation.md").read_text()

    from export.models import sha256_file
    from kernels.bank import Bank

    assert report["export"]["max_abs_diff_activations"] <= 1e-4
    Bank.load(out / "bank", model_sha256=sha256_file(out / "model.onnx"))  # bound to the exported model


def test_stages_out_of_order_say_which_stage_to_run_first(tmp_path, capsys):
    assert main(["capture", "--out", str(tmp_path / "nothing")]) == 2
    assert "run `nfp prepare" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "train", "attack", "capture", "search", "calibrate", "evaluate",
                                     "export", "serve", "predict", "whitebox", "demo", "pipeline"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_a_users_model_and_weights_replace_training(tiny_run, tmp_path):
    import shutil

    from export import pipeline
    from export.workspace import Workspace
    from kernels.errors import ModelMismatchError

    out, _ = tiny_run
    for name in ("data.json", "splits.npz"):
        shutil.copy2(out / name, tmp_path / name)
    ws = Workspace(tmp_path)
    trained = json.loads((out / "classifier.json").read_text())["accuracy"]
    result = pipeline.train(ws, factory="export.models:SmallCNN", weights=out / "classifier.pt", progress=False)
    assert result["trained"] is False and result["accuracy"] == trained
    with pytest.raises(ModelMismatchError, match="do not match SmallCNN"):
        pipeline.train(ws, factory="export.models:SmallCNN", factory_kwargs={"num_classes": 7},
                       weights=out / "classifier.pt", progress=False)


def test_whitebox_command_reports_each_draw_size_and_bank_size(tiny_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["whitebox", "--out", str(out), "--m-values", "4", "16", "--bank-sizes", "20", "40",
                 "--adaptive-eps", "0.3", "--adaptive-count", "10"]) == 0
    printed = capsys.readouterr().out
    for size in (20, 40):
        assert f"| {size} | 4 | fgsm_eps0.3 |" in printed and f"| {size} | 16 | fgsm_eps0.3 |" in printed
    result = json.loads((out / "report" / "whitebox.json").read_text())
    assert (out / "report" / "whitebox.png").stat().st_size > 5_000
    assert {(r["bank_size"], r["m"]) for r in result["filter"]} == {(20, 4), (20, 16), (40, 4), (40, 16)}
    for r in result["filter"]:
        for name in ("static", "random"):
            assert r[name]["flagged_by_server"] + r[name]["evaded_server"] == r[name]["passed_local"] <= r["attacked"]
    aware = [r for r in result["adaptive"] if r["weight"] == 1]
    assert sorted(r["bank_size"] for r in aware) == [20, 40]
    for r in aware:
        assert r["attacked"] <= 10 and 0 <= r["random_m16"]["evaded"] <= r["misclassified"]
