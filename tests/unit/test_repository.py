"""Both profiles' configs parse as Triton model configs and chain the same tensor names."""
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kernels.query_memory import QueryMemoryConfig
from model_repository.writer import PROFILES, ServingConfig, model_configs
from kernels.bank import Bank
from kernels.contract import default_contract
from kernels.errors import InvalidInputError


@pytest.fixture
def bank(mixed_size_bank) -> Bank:
    return mixed_size_bank().with_meta(draws_per_input=32, model_sha256="ab" * 32)


@pytest.mark.parametrize("profile", PROFILES)
def test_configs_parse_with_tritons_model_config_protobuf(bank, profile):
    configs = {name: text_format.Parse(text, model_config_pb2.ModelConfig())
               for name, text in model_configs(bank, default_contract([1, 28, 28], bank.num_classes), profile, ServingConfig(audit=True)).items()}
    classifier, detector, ensemble = configs["classifier"], configs["fingerprint_detector"], configs["guarded_classifier"]
    assert [o.name for o in classifier.output] == ["logits", "activations"]
    assert list(classifier.output[1].dims) == [300]
    assert [i.name for i in detector.input] == ["logits", "activations", "images"]  # the image: for the query memory
    assert [o.name for o in detector.output][4:] == ["checked", "fingerprint_ids", "query_flagged"]
    assert list(detector.output[5].dims) == [32]
    assert {s.model_name: dict(s.input_map) for s in ensemble.ensemble_scheduling.step}["fingerprint_detector"] == {
        "logits": "logits", "activations": "activations", "images": "images"}
    assert detector.parameters["query_threshold"].string_value == str(QueryMemoryConfig().threshold)
    assert ensemble.platform == "ensemble" and len(ensemble.ensemble_scheduling.step) == 2
    assert detector.parameters["model_sha256"].string_value == "ab" * 32
    assert detector.parameters["audit"].string_value == "true"
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if profile == "gpu" else model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert classifier.instance_group[0].kind == kind and detector.instance_group[0].kind == kind
    assert classifier.backend == ("onnxruntime" if profile == "gpu" else "python")


def test_unknown_profile_is_refused(bank):
    with pytest.raises(InvalidInputError, match="unknown profile 'tpu'"):
        model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "tpu", ServingConfig())


def test_the_fused_model_has_the_ensembles_inputs_and_outputs_in_the_cpu_profile_only(bank):
    configs = {name: text_format.Parse(text, model_config_pb2.ModelConfig())
               for name, text in model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "cpu", ServingConfig(fused=True)).items()}
    fused, ensemble = configs["guarded_classifier_fused"], configs["guarded_classifier"]
    assert fused.backend == "python"
    assert [(t.name, list(t.dims)) for t in fused.input] == [(t.name, list(t.dims)) for t in ensemble.input]
    assert [(t.name, list(t.dims)) for t in fused.output] == [(t.name, list(t.dims)) for t in ensemble.output]
    assert fused.parameters["model_sha256"].string_value == "ab" * 32
    assert "guarded_classifier_fused" not in model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "cpu", ServingConfig())
    with pytest.raises(InvalidInputError, match="cpu profile only"):
        model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "gpu", ServingConfig(fused=True))


@pytest.mark.parametrize("fused", [False, True])
def test_the_draws_are_no_output_unless_the_repository_is_written_for_audit(bank, fused):
    configs = {name: text_format.Parse(text, model_config_pb2.ModelConfig())
               for name, text in model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "cpu", ServingConfig(fused=fused)).items()}
    for name, config in configs.items():
        assert "fingerprint_ids" not in [o.name for o in config.output], name
        assert all("fingerprint_ids" not in s.output_map for s in config.ensemble_scheduling.step)
    assert configs["fingerprint_detector"].parameters["audit"].string_value == "false"


@pytest.mark.parametrize("fused", [False, True])
def test_a_repository_written_without_a_query_memory_has_no_query_flagged_and_no_image_at_the_detector(bank, fused):
    configs = {name: text_format.Parse(text, model_config_pb2.ModelConfig())
               for name, text in model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "cpu",
                                               ServingConfig(fused=fused, watch_queries=False)).items()}
    for name, config in configs.items():
        assert "query_flagged" not in [o.name for o in config.output], name
        assert not [k for k in config.parameters if k.startswith("query_")], name
    assert [i.name for i in configs["fingerprint_detector"].input] == ["logits", "activations"]
    knobs = QueryMemoryConfig(capacity=7, threshold=3, repeats="flag")
    detector = text_format.Parse(model_configs(bank, default_contract([1, 28, 28], bank.num_classes), "cpu",
                                               ServingConfig(query_memory=knobs))["fingerprint_detector"],
                                 model_config_pb2.ModelConfig())
    written = {k[len("query_"):]: v.string_value for k, v in detector.parameters.items() if k.startswith("query_")}
    assert QueryMemoryConfig.from_strings(written) == knobs  # what the served model rebuilds


def test_an_unexpected_failure_in_a_model_is_logged_in_full_and_answered_without_internals():
    """``answered_safely`` stands between Triton and each model's ``execute``; Triton's Python-backend
    module exists only inside its stub, so its three names are given here as plain stand-ins."""
    from types import SimpleNamespace

    from model_repository.serving import answered_safely

    logged = []
    pb = SimpleNamespace(Logger=SimpleNamespace(log_error=logged.append), TritonError=lambda m: m,
                         InferenceResponse=lambda error: SimpleNamespace(error=error))

    def crash(requests):
        raise RuntimeError("[ONNXRuntimeError] /srv/models/classifier/1/model.onnx: bad node")

    answers = answered_safely(pb, "classifier", crash, ["r1", "r2"])
    assert [a.error for a in answers] == ["internal error in model classifier (RuntimeError); details are in the "
                                          "server's log"] * 2
    assert "/srv/models" in logged[0] and "Traceback" in logged[0]
    assert answered_safely(pb, "classifier", lambda requests: ["ok"] * len(requests), ["r"]) == ["ok"]


@pytest.mark.parametrize("damage", ["truncated npz", "invalid json"])
def test_a_corrupt_bank_stops_serve_with_one_line_naming_the_file(tiny_run, tmp_path, damage, capsys):
    import shutil

    from export.cli import main

    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("activations", "attacks", "repository"))
    target = out / "bank" / ("bank.npz" if damage == "truncated npz" else "bank.json")
    target.write_bytes(target.read_bytes()[:200])
    assert main(["serve", "--out", str(out), "--write-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nfp serve: error: bank") and target.name in err[0]
