"""End to end: a real Triton server (from the nvidia-pytriton wheel) answering gRPC requests."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from client.grpc_client import DetectorClient, RequestError
from client.metrics import detector_counters, signature_verified
from export.data.datasets import load_dataset
from kernels.bank import Bank
from kernels.calibration import Calibration
from kernels.onnx_runtime import ort_session
from model_repository.server import ServerError, TritonServer
from model_repository.signing import INSECURE_ENV, PUBLIC_KEY_ENV, create_keys
from model_repository.writer import ServingConfig, write_repository
from tests.functional.replay import replayed_fused_score, served_outputs

GUARDED = ("guarded_classifier", "guarded_classifier_fused")  # the ensemble and its one-step equivalent
FPR = 0.05


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    out, _ = tiny_run
    # served at 5%: the tiny run calibrates on 120 images, whose 1% threshold is its single lowest score;
    # written for audit, so that the replay tests see each request's draws
    private, public = create_keys(tmp_path_factory.mktemp("keys"))  # outside the repository
    repo = write_repository(out, tmp_path_factory.mktemp("repo") / "cpu", "cpu",
                            ServingConfig(fused=True, false_positive_rate=FPR, audit=True), signing_key=private)
    with TritonServer(repo, public_key=public) as server:
        yield server


@pytest.fixture(scope="module", params=GUARDED)
def served(tiny_run, server, request):
    client = DetectorClient(server.grpc_url, model=request.param)
    yield tiny_run[0], server, client
    client.close()


def test_served_results_equal_the_offline_pipeline_for_the_same_draws(served, mnist_subset):
    out, _, client = served
    x = mnist_subset[0][:40]
    result = client.detect(x)
    logits, acts = served_outputs(out, x)
    bank = Bank.load(out / "bank")
    assert bank.meta["calibration"]["fused"]["members"] == ["vote", "margin", "squeeze"]  # the default
    z = replayed_fused_score(bank, logits, acts, result.fingerprint_ids, out, x)
    labels = logits.argmax(1)
    fused = Calibration.from_json(bank.meta["calibration"]["fused"])
    one_class = np.zeros(len(x), np.int64)
    np.testing.assert_array_equal(result.label, labels)
    np.testing.assert_allclose(result.score, z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result.is_attacked, z < fused.threshold(FPR, one_class))
    np.testing.assert_allclose(result.probabilities.sum(1), 1, atol=1e-5)


def test_attacked_images_are_flagged_and_clean_ones_pass(served, mnist):
    out, _, client = served
    with np.load(out / "attacks" / "eval" / "pgd_eps0.3.npz") as adv:
        attacked = adv["x_adv"][adv["success"]]
    with np.load(out / "splits.npz") as s:
        test = s["test"]

    images = load_dataset(json.loads((out / "data.json").read_text())["dataset"]).x[test]
    # the tiny run calibrates 1% on 120 images (about 12 per class: too few for a class's own
    # statistics, so all share the pooled ones) and has about 10 successful attacks; the server's draws
    # are unseeded, so each set is sent 5 times and the bound is loose
    attacked_rate = np.mean([client.detect(attacked).is_attacked.mean() for _ in range(5)])
    clean_rate = np.mean([client.detect(images).is_attacked.mean() for _ in range(5)])
    assert attacked_rate > 0.6 and clean_rate < 0.2 and attacked_rate - clean_rate > 0.5


def bad_request(client, images, dtype="FP32"):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("images", list(images.shape), dtype)
    tensor.set_data_from_numpy(images)
    return client.client.infer(client.model, [tensor])


def test_bad_requests_get_errors_while_concurrent_good_ones_succeed(served, mnist_subset):
    _, _, client = served
    good = mnist_subset[0][:4]
    nan = good.copy()
    nan[1, 0, 3, 3] = np.nan
    futures = [client.submit(good), client.submit(nan), client.submit(good * 3), client.submit(good)]
    assert futures[0].result().label.shape == (4,) and futures[3].result().label.shape == (4,)
    with pytest.raises(RequestError, match="NaN"):
        futures[1].result()
    with pytest.raises(RequestError, match=r"must lie in \[0, 1\]"):
        futures[2].result()
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unexpected shape"):
        bad_request(client, np.zeros((1, 1, 27, 27), np.float32))
    with pytest.raises(InferenceServerException, match="data-type is .FP64., but .* expects .FP32."):
        bad_request(client, np.zeros((1, 1, 28, 28), np.float64), "FP64")
    assert client.detect(good).label.shape == (4,), "the server keeps serving"


def test_concurrent_clients_each_get_their_own_images_answer(served, mnist_subset):
    """64 single-image requests from 8 threads: each answer must be the label of the image that request
    sent (a server or client that mixed up responses under concurrency would fail this)."""
    out, _, client = served
    x = mnist_subset[0][:64]
    expected = ort_session(out / "model.onnx").run(["logits"], {"images": x})[0].argmax(1)
    with ThreadPoolExecutor(8) as pool:
        labels = list(pool.map(lambda i: int(client.detect(x[i : i + 1]).label[0]), range(64)))
    assert labels == expected.tolist()


def test_async_client_answers_the_same_as_the_offline_model(served, mnist_subset):
    import asyncio

    from client.grpc_client import AsyncDetectorClient

    out, server, client = served
    x = mnist_subset[0][:12]
    expected = ort_session(out / "model.onnx").run(["logits"], {"images": x})[0].argmax(1)

    async def ask():
        async with AsyncDetectorClient(server.grpc_url, client.model) as aio:
            return await asyncio.gather(*(aio.detect(x[i : i + 4]) for i in range(0, 12, 4)))

    results = asyncio.run(ask())
    assert np.concatenate([r.label for r in results]).tolist() == expected.tolist()
    assert all(r.checked.all() for r in results)


def test_detection_counts_are_exported_as_prometheus_metrics(served, mnist_subset):
    _, server, client = served
    detector = {"guarded_classifier": "fingerprint_detector"}.get(client.model, client.model)

    before = detector_counters(server.metrics_url, detector)
    result = client.detect(mnist_subset[0][:3])
    after = detector_counters(server.metrics_url, detector)
    assert after["nfp_inputs_total"] == before["nfp_inputs_total"] + 3
    assert after["nfp_flagged_total"] == before["nfp_flagged_total"] + result.is_attacked.sum()
    assert after["nfp_kernel_microseconds_total"] > before["nfp_kernel_microseconds_total"]


@pytest.mark.parametrize("shift", ["none", "contrast"])
def test_nfp_drift_alarms_on_shifted_clean_traffic_and_not_on_unshifted(served, shift, capsys):
    """`nfp drift` over a window of the server's score histogram: the run's clean test images (a random
    split, like the calibration's) keep the false-positive rate; the same images at half contrast (a new
    camera) do not, and it says so."""
    import threading
    import time

    from export.cli import main
    from export.data.artifacts import load_prepared
    from export.data.workspace import Workspace

    out, server, client = served
    detector = {"guarded_classifier": "fingerprint_detector"}.get(client.model, client.model)
    ds, splits, _ = load_prepared(Workspace(out))
    x = ds.x[splits.test]
    if shift == "contrast":
        x = (0.5 * x + 0.25).astype(np.float32)
    result = {}
    watcher = threading.Thread(target=lambda: result.update(rc=main(
        ["drift", "--out", str(out), "--metrics-url", server.metrics_url, "--model", detector, "--window", "10",
         "--fpr", str(FPR)])))
    watcher.start()
    time.sleep(3)  # the command's first reading of the metrics opens the window
    for chunk in np.array_split(x, 10):
        client.detect(chunk)
    watcher.join()
    assert result["rc"] == (1 if shift == "contrast" else 0)
    printed = capsys.readouterr().out
    assert f"window: {len(x)} inputs" in printed and ("ALARM" if shift == "contrast" else "OK: the false-positive") in printed


def test_a_bank_built_for_another_model_is_refused_at_load(tiny_run, tmp_path):
    out, _ = tiny_run
    repo = write_repository(out, tmp_path / "repo", "cpu")
    meta_path = repo / "fingerprint_detector" / "1" / "bank" / "bank.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model_sha256": "0" * 64}))
    with pytest.raises(ServerError, match="built for model sha256 0000"):
        TritonServer(repo).start()


def perturbed_model(path):
    """Another valid classifier: the ONNX file with one weight changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    w = next(i for i in model.graph.initializer if numpy_helper.to_array(i).size > 100)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    onnx.save(model, path)


def thresholds_to_minus_infinity(version):
    bank = version / "bank" / "bank.json"
    meta = json.loads(bank.read_text())
    for cal in meta["calibration"].values():
        cal["thresholds"] = {k: [-1e30] * len(v) for k, v in cal["thresholds"].items()}
    bank.write_text(json.dumps(meta))


def zero_the_recorded_model_hash(version):
    bank = version / "bank" / "bank.json"
    bank.write_text(json.dumps({**json.loads(bank.read_text()), "model_sha256": "0" * 64}))


TAMPERS = {  # what an attacker with write access to the repository tried, and the refusal each gets
    "another model.onnx": (lambda repo: perturbed_model(repo / "guarded_classifier_fused" / "1" / "model.onnx"),
                           "guarded_classifier_fused fails its signature check.*model.onnx"),
    "thresholds that flag nothing": (lambda repo: thresholds_to_minus_infinity(repo / "fingerprint_detector" / "1"),
                                     "fingerprint_detector fails its signature check.*bank.json"),
    "a zeroed model hash": (lambda repo: zero_the_recorded_model_hash(repo / "fingerprint_detector" / "1"),
                            "fingerprint_detector fails its signature check"),
    "a looser served false-positive rate": (
        lambda repo: (repo / "fingerprint_detector" / "config.pbtxt").write_text(
            (repo / "fingerprint_detector" / "config.pbtxt").read_text().replace('"0.01"', '"0.05"')),
        "fingerprint_detector fails its signature check.*config.pbtxt"),
    "an added file": (lambda repo: (repo / "classifier" / "1" / "extra.onnx").write_bytes(b"x"),
                      "classifier fails its signature check.*extra.onnx"),
    "the signatures removed": (lambda repo: [p.unlink() for p in repo.glob("*/model.sig")], "is not signed"),
}


@pytest.fixture(scope="module")
def signed(tiny_run, tmp_path_factory):
    """A signed repository (fused too) and its key pair, written once; tests tamper with copies."""
    private, public = create_keys(tmp_path_factory.mktemp("signing"))
    repo = write_repository(tiny_run[0], tmp_path_factory.mktemp("signed") / "repo", "cpu", ServingConfig(fused=True),
                            signing_key=private)
    return repo, public


@pytest.mark.parametrize("tamper", TAMPERS)
def test_a_tampered_repository_is_refused_at_load_with_the_reason(signed, tamper, tmp_path):
    import shutil

    repo, public = signed
    copy = shutil.copytree(repo, tmp_path / "repo")
    change, reason = TAMPERS[tamper]
    change(copy)
    with pytest.raises(ServerError, match=reason):
        TritonServer(copy, public_key=public).start()


def test_a_repository_signed_with_another_key_is_refused(signed, tmp_path):
    repo, _ = signed
    _, other = create_keys(tmp_path / "other")
    with pytest.raises(ServerError, match="fails its signature check"):
        TritonServer(repo, public_key=other).start()


def test_a_signed_repository_started_without_a_key_is_not_ready_and_says_why(signed, monkeypatch):
    repo, _ = signed
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    with pytest.raises(ServerError, match=f"is signed .* no public key to check it with.*{PUBLIC_KEY_ENV}"):
        TritonServer(repo).start()  # what a user's own tritonserver command gets: no key in the environment


def test_with_the_explicit_opt_out_a_signed_repository_serves_unverified_and_warns(signed, monkeypatch, mnist_subset):
    repo, public = signed
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    monkeypatch.setenv(INSECURE_ENV, "1")
    with TritonServer(repo) as server, DetectorClient(server.grpc_url) as client:
        assert client.detect(mnist_subset[0][:2]).checked.all()
        assert set(signature_verified(server.metrics_url).values()) == {False}
        assert "WITHOUT checking its signature" in "\n".join(server.log_lines)
    monkeypatch.delenv(INSECURE_ENV)
    with TritonServer(repo, public_key=public) as server:
        verified = signature_verified(server.metrics_url)
    assert verified == dict.fromkeys(["classifier", "fingerprint_detector", "guarded_classifier_fused"], True)


def test_an_unsigned_server_still_refuses_to_guard_another_model(tiny_run, tmp_path):
    repo = write_repository(tiny_run[0], tmp_path / "repo", "cpu", ServingConfig(fused=True))
    perturbed_model(repo / "classifier" / "1" / "model.onnx")  # what the ensemble's detector guards
    with pytest.raises(ServerError, match="refusing to guard another model"):
        TritonServer(repo).start()


def test_admin_protocols_need_the_key_header_and_inference_does_not(server, mnist_subset):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    anonymous = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (lambda c, h: c.update_log_settings({"log_verbose_level": 1}, headers=h),
                 lambda c, h: c.register_system_shared_memory("nfp_probe", "/nfp_probe", 64, headers=h),
                 lambda c, h: c.get_inference_statistics(headers=h),
                 lambda c, h: c.get_model_repository_index(headers=h)):
        with pytest.raises(InferenceServerException, match="protocol is restricted"):
            call(anonymous, None)
        with pytest.raises(InferenceServerException, match="protocol is restricted"):
            call(anonymous, {"triton-grpc-protocol-nfp-admin-key": "wrong"})
    assert anonymous.get_model_repository_index(headers=server.admin_headers)
    assert anonymous.get_inference_statistics(headers=server.admin_headers)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    with pytest.raises(InferenceServerException):
        http.update_log_settings({"log_verbose_level": 1})
    assert http.get_model_repository_index(headers={"nfp-admin-key": server.admin_key}) is not None
    http.close()
    with DetectorClient(server.grpc_url) as client:  # inference, health, metadata and configs stay open
        assert client.detect(mnist_subset[0][:2]).label.shape == (2,) and client.detector_parameters()
    anonymous.close()


def test_a_server_written_without_audit_keeps_its_draws_secret(tiny_run, mnist_subset, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = write_repository(tiny_run[0], tmp_path / "repo", "cpu", ServingConfig(fused=True))
    with TritonServer(repo) as server:
        for model in GUARDED:
            with DetectorClient(server.grpc_url, model) as client:
                result = client.detect(mnist_subset[0][:4])
            assert result.fingerprint_ids is None and result.checked.all()
            raw = grpcclient.InferenceServerClient(server.grpc_url)
            images = grpcclient.InferInput("images", [1, 1, 28, 28], "FP32")
            images.set_data_from_numpy(mnist_subset[0][:1])
            with pytest.raises(InferenceServerException, match="fingerprint_ids"):  # asking for them by name fails
                raw.infer(model, [images], outputs=[grpcclient.InferRequestedOutput("fingerprint_ids")])
            raw.close()


def test_the_server_shuts_down_cleanly_leaving_no_shared_memory(tiny_run, tmp_path):
    out, _ = tiny_run
    server = TritonServer(write_repository(out, tmp_path / "repo", "cpu")).start()
    assert server.stop() == 0
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_predict_command_prints_a_verdict_per_image(server, mnist_subset, tmp_path, capsys):
    from PIL import Image

    from export.cli import main

    Image.fromarray((mnist_subset[0][0, 0] * 255).astype(np.uint8)).save(tmp_path / "digit.png")
    np.savez(tmp_path / "batch.npz", x=(mnist_subset[0][1:3, 0] * 255).astype(np.uint8))
    assert main(["predict", "--url", server.grpc_url, str(tmp_path / "digit.png"), str(tmp_path / "batch.npz")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["image", "label", "confidence", "score"]
    assert [line.split()[0] for line in lines[1:]] == ["digit.png", "batch.npz[0]", "batch.npz[1]"]
    assert all(line.split()[-1] in ("clean", "ATTACKED") for line in lines[1:])


@pytest.mark.parametrize("model", GUARDED)
def test_whitebox_command_sends_the_adaptive_attacks_to_the_running_server(tiny_run, server, model, tmp_path, capsys):
    import shutil

    from export.cli import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["whitebox", "--out", str(out), "--url", server.grpc_url, "--model", model, "--eps", "0.3",
                 "--count", "6", "--steps", "4", "--draws", "2"]) == 0
    assert f"the Triton server at {server.grpc_url} ({model})" in capsys.readouterr().out
    assert not (out / "report" / "whitebox.json").exists()
    result = json.loads((out / "report" / "whitebox_served.json").read_text())
    assert result["label_mismatches"] == 0 and result["fpr"] == FPR
    (row,) = result["rows"]
    assert row["defence"] == "default" and row["attacked"] <= 6
    assert row["eot_all_draws"] <= row["misclassified"] and row["filter_sent"] <= row["attacked"]


def test_whitebox_refuses_a_server_that_serves_another_model(tiny_run, server, tmp_path):
    import shutil

    from export.adversary.whitebox import WhiteboxConfig, whitebox
    from export.data.workspace import Workspace
    from kernels.errors import ModelMismatchError

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    Bank.load(out / "bank").with_meta(model_sha256="0" * 64).save(out / "bank")
    with pytest.raises(ModelMismatchError, match="attack the served model"):
        whitebox(Workspace(out), WhiteboxConfig(url=server.grpc_url))


def test_the_classifier_returns_only_the_outputs_asked_for(server, mnist_subset):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("images", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist_subset[0][:2])
    logits_only = client.infer("classifier", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
    everything = client.infer("classifier", [tensor])
    client.close()
    assert logits_only.as_numpy("activations") is None and logits_only.as_numpy("logits").shape == (2, 10)
    np.testing.assert_array_equal(everything.as_numpy("logits"), logits_only.as_numpy("logits"))
    assert everything.as_numpy("activations").shape[0] == 2


def test_the_detector_step_checks_the_squeezed_copies_logits_and_keeps_serving(server, mnist_subset):
    """The ensemble's second step also takes ``squeezed_logits`` (feature squeezing's evidence): a request
    forging them with NaN gets an error naming them; a request with the classifier's own gets the answer
    the ensemble gives."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    images = grpcclient.InferInput("images", [2, 1, 28, 28], "FP32")
    images.set_data_from_numpy(mnist_subset[0][:2])
    step1 = client.infer("classifier", [images])
    evidence = {name: step1.as_numpy(name) for name in ("logits", "activations", "squeezed_logits")}
    assert evidence["squeezed_logits"].shape == (2, 2, 10)

    def ask(values):
        inputs = []
        for name, value in values.items():
            inputs.append(grpcclient.InferInput(name, list(value.shape), "FP32"))
            inputs[-1].set_data_from_numpy(value)
        return client.infer("fingerprint_detector", inputs)

    evidence["images"] = mnist_subset[0][:2]  # the step's query memory remembers the image too
    forged = dict(evidence, squeezed_logits=np.full_like(evidence["squeezed_logits"], np.nan))
    with pytest.raises(InferenceServerException, match="squeezed_logits hold NaN"):
        ask(forged)
    answer = ask(evidence)
    ensemble = client.infer("guarded_classifier", [images])
    client.close()
    np.testing.assert_array_equal(answer.as_numpy("label"), ensemble.as_numpy("label"))


def test_benchmark_measures_every_model_side_by_side(tiny_run, tmp_path):
    from client import benchmark

    out = write_repository(tiny_run[0], tmp_path / "repo", "cpu", ServingConfig(fused=True))
    report = benchmark.run(out, [1, 4], [1, 2], window_s=0.4, warmup_s=0.1, rounds=2)
    models = ("classifier", "guarded_classifier", "guarded_classifier_fused")
    assert [(p["model"], p["batch"], p["concurrency"]) for p in report["points"]] == [
        (m, b, c) for b in (1, 4) for c in (1, 2) for m in models]
    for p in report["points"]:
        assert p["requests"] > 0 and p["errors"] == 0 and p["p50_ms"] <= p["p99_ms"]
        assert (p["kernel_us_per_request"] is None) == (p["model"] == "classifier")
    assert set(report["ratios"]) == {"guarded_classifier", "guarded_classifier_fused"}
    markdown = benchmark.markdown({"tiny": report})
    assert "| guarded_classifier_fused | 4 | 2 |" in markdown
    benchmark.plot({"tiny": report}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 5_000
    shm = benchmark.run(out, [2], [1], window_s=0.2, warmup_s=0.1, rounds=1, shared_memory=True)
    assert all(p["requests"] > 0 and p["errors"] == 0 for p in shm["points"])
    assert not list(Path("/dev/shm").glob("nfp_bench_*")), "the input region is removed afterwards"


def test_a_server_does_not_outlive_the_process_that_started_it(tiny_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = write_repository(tiny_run[0], tmp_path / "repo", "cpu")
    script = ("import sys, time; from model_repository.server import TritonServer; "
              f"s = TritonServer({str(repo)!r}).start(); print(s.process.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # no chance to clean up
    parent.wait()

    def alive():
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    deadline = time.time() + 15
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive()
