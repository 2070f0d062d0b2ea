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
    assert bank["draws_per_input"] == 16 and set(bank["calibration"]) == {"lrt", "vote", "margin", "squeeze", "fused"}
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    for name, row in evaluation["attacks"].items():  # every successful attack counts, checkable or not
        if "skipped" not in row:
            assert row["n_attacked"] == summary["eval"][name]["successful"], name
            assert 0 <= row["unchecked_attacked"] <= row["n_attacked"] and row["spread"]["draws"] == 5
    assert (out / "report" / "roc.png").stat().st_size > 10_000
    assert "| fgsm_eps0.3 |" in (out / "report" / "evaluation.md").read_text()

    from kernels.bank import sha256_file
    from kernels.bank import Bank

    assert report["export"]["max_abs_diff_activations"] <= 1e-4
    Bank.load(out / "bank", model_sha256=sha256_file(out / "model.onnx"))  # bound to the exported model


def test_stages_out_of_order_say_which_stage_to_run_first(tmp_path, capsys):
    assert main(["capture", "--out", str(tmp_path / "nothing")]) == 2
    assert "run `nfp prepare" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "train", "attack", "capture", "search", "harden", "calibrate", "evaluate",
                                     "export", "serve", "rotate", "build-bank", "layers", "predict", "whitebox", "demo",
                                     "study", "synthetic-bank", "pipeline"])
def test_every_subcommand_explains_itself_and_each_of_its_options_is_read(command, capsys):
    """A flag the code never reads would be a lie in --help: every option becomes a field of the
    command's frozen Config, and the command's module must read each one as ``cfg.<name>`` (``out`` and
    ``quiet`` the dispatcher reads; ``nfp pipeline`` reads its options through its stages' modules)."""
    import dataclasses
    import inspect

    from export.cli import build_parser
    from export.cli import command as module_of
    from export.cli import options

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: nfp " + command in capsys.readouterr().out
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    module = module_of(command)
    modules = [module_of(name) for name in module.STAGES] if command == "pipeline" else [module]
    source = inspect.getsource(options) + "".join(inspect.getsource(m) for m in modules)
    fields = {f.name for m in modules for f in dataclasses.fields(m.Config)}
    dests = [a.dest for a in sub._actions if a.dest not in ("help", "quiet")]
    assert set(dests) <= fields | {"out"}, f"nfp {command}: options without a Config field"
    unread = [d for d in dests if f"cfg.{d}" not in source and d != "out"]
    assert not unread, f"nfp {command} accepts options nothing reads: {unread}"


def test_bad_factory_kwargs_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--factory-kwargs", "{bad"])
    assert "--factory-kwargs: not valid JSON" in capsys.readouterr().err


def test_predict_against_a_dead_server_says_so_in_one_line_without_loading_torch(tmp_path):
    import subprocess
    import sys

    from model_repository.server import free_port

    image = tmp_path / "x.npz"
    np.savez(image, x=np.zeros((1, 28, 28), np.uint8))
    code = ("import sys; from export.cli import main; rc = main(['predict', '--url', '127.0.0.1:%d', '--timeout', '2', "
            "%r]); print('torch' in sys.modules); sys.exit(rc)" % (free_port(), str(image)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout.strip() == "False"
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nfp predict: error: no Triton server answers at 127.0.0.1:"), err


def test_a_users_model_and_weights_replace_training(tiny_run, tmp_path):
    import shutil

    from export.pipeline import stages as pipeline
    from export.data.workspace import Workspace
    from kernels.errors import ModelMismatchError

    out, _ = tiny_run
    for name in ("data.json", "splits.npz"):
        shutil.copy2(out / name, tmp_path / name)
    ws = Workspace(tmp_path)
    trained = json.loads((out / "classifier.json").read_text())["accuracy"]
    result = pipeline.train(ws, factory="export.models.classifier:SmallCNN", weights=out / "classifier.pt", progress=False)
    assert result["trained"] is False and result["accuracy"] == trained
    with pytest.raises(ModelMismatchError, match="do not match SmallCNN"):
        pipeline.train(ws, factory="export.models.classifier:SmallCNN", factory_kwargs={"num_classes": 7},
                       weights=out / "classifier.pt", progress=False)


def test_search_with_max_correlation_keeps_each_classs_fingerprints_apart(tiny_run, tmp_path):
    import shutil

    import numpy as np

    from export.data.artifacts import load_activation_set
    from export.data.workspace import Workspace
    from kernels.bank import Bank

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["search", "--out", str(out), "--candidates", "4000", "--keep", "40", "--max-correlation", "0.5"]) == 0
    bank = Bank.load(out / "bank")
    assert bank.meta["search"]["max_correlation"] == 0.5 and len(bank.meta["search"]["layer_starts"]) > 1
    attacked, meta = load_activation_set(Workspace(out), "fit_attacked", mmap=False)
    for c in range(bank.num_classes):
        rows = range(bank.class_offsets[c], bank.class_offsets[c + 1])
        if len(rows) < 2:
            continue
        values = np.stack([attacked[meta["label"] == c][:, bank.indices[f, : bank.lengths[f]]].mean(1) for f in rows])
        r = np.corrcoef(values.astype(np.float64))
        assert np.nanmax(np.abs(r[np.triu_indices(len(rows), 1)])) <= 0.5 + 1e-6


def test_harden_command_attacks_the_bank_searches_again_and_keeps_the_bank_the_attacker_does_worst_against(tiny_run, tmp_path):
    import shutil

    from kernels.bank import Bank

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = Bank.load(out / "bank")
    assert main(["harden", "--out", str(out), "--rounds", "1", "--count", "12", "--steps", "3", "--quiet"]) == 0
    after = Bank.load(out / "bank")
    first, second = after.meta["hardening"]["rounds_done"]  # attack, search again, attack the new bank
    assert first["added"] > 0 and "added" not in second
    assert after.meta["search"] == before.meta["search"] and after.meta["model_sha256"] == before.meta["model_sha256"]
    kept = min((first, second), key=lambda r: r["mean_expected_pass"])  # the bank the attacker did worst against
    searched_again = not np.array_equal(after.cohen_d, before.cohen_d)
    assert searched_again == (kept is second) and after.num_fingerprints == kept["fingerprints"]
    assert ("calibration" in after.meta) == (not searched_again)  # a new bank needs a new calibration
    assert main(["calibrate", "--out", str(out), "--quiet"]) == 0 and "calibration" in Bank.load(out / "bank").meta


def test_whitebox_command_attacks_every_defence_at_every_eps(tiny_run, tmp_path, capsys):
    import shutil

    from export.adversary.defences import DEFENCES

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["whitebox", "--out", str(out), "--defences", *DEFENCES, "--eps", "0.1", "0.3", "--count", "8",
                 "--steps", "4", "--draws", "3", "--harden-rounds", "1", "--harden-count", "12",
                 "--harden-steps", "3"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "report" / "whitebox.json").read_text())
    assert (out / "report" / "whitebox.png").stat().st_size > 5_000
    assert [(r["defence"], r["eps"]) for r in result["rows"]] == [(d, e) for d in DEFENCES for e in (0.1, 0.3)]
    for r in result["rows"]:
        assert f"| {r['defence']} | {r['eps']:g} |" in printed
        assert r["attacked"] <= 8 and r["eot_all_draws"] <= r["misclassified"] <= r["attacked"]
        assert 0 <= r["eot_evasion"] <= r["misclassified"] / r["attacked"]
        assert r["eot_ci95"][0] <= r["eot_evasion"] <= r["eot_ci95"][1]
        assert r["filter_sent"] <= r["attacked"] and 0 <= r["clean_fpr"] <= 1
        assert r["misclassified"] <= sum(r["runs_kept"].values()) <= r["attacked"]
    notes = {r["defence"]: r["notes"] for r in result["rows"]}
    assert 0 <= notes["secret-k5"]["attacker_bank_overlap"] < notes["secret"]["attacker_bank_overlap"] <= 1
    assert [h["round"] for h in notes["hardened"]["rounds"]] == [0, 1]


def test_the_design_study_and_the_transfer_study_measure_every_design_on_every_attack(tiny_run, tmp_path):
    """`nfp study` (--only keeps it short) and `nfp study --transfer` (leave one family out, on a few
    images per family): every row has a realized clean FPR and a TPR and AUC per attack; the transfer
    study marks the families each design's bank never saw and adds the black-box attack no bank saw."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["study", "--out", str(out), "--quiet", "--only", "vote"]) == 0
    study = json.loads((out / "report" / "study.json").read_text())["designs"]
    assert len(study) >= 3 and all("vote" in name for name in study)
    assert main(["study", "--out", str(out), "--quiet", "--transfer", "--family-images", "40"]) == 0
    report = json.loads((out / "report" / "transfer.json").read_text())
    transfer, family_of = report["designs"], report["family_of"]
    assert transfer["default (bank: L-inf)"]["bank_families"] == ["L-inf"]
    assert {f"bank: all but {f}" for f in ("L-inf", "DeepFool", "EAD (L1)")} <= set(transfer)
    unseen = [k for k in family_of if family_of[k] != "L-inf"]
    table = (out / "report" / "transfer.md").read_text()
    default_row = next(line for line in table.splitlines() if line.startswith("| default (bank: L-inf)"))
    assert default_row.count("*") == len(unseen)  # every column of another family is marked unseen
    for rows in (study, transfer):
        for name, row in rows.items():
            assert 0 <= row["clean_fpr"] <= 0.2, name
            cells = [v for v in row.values() if isinstance(v, dict)]
            assert cells and all(0 <= c["tpr"] <= 1 and 0 <= c["auc"] <= 1 for c in cells), name
    assert any("black-box" in key for key in next(iter(transfer.values())))
