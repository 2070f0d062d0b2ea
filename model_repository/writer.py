"""Writing a Triton model repository from the offline pipeline's output folder.

One source of truth, two profiles:

- ``cpu``: runs on the Triton server shipped in the ``nvidia-pytriton`` wheel, which has only the
  Python backend; the classifier is a Python-backend model running onnxruntime.
- ``gpu``: NVIDIA's Triton container; the classifier runs on the native ``onnxruntime`` backend on
  ``KIND_GPU`` and the detector takes GPU tensors through DLPack into the CUDA kernel.

Tensor names are the ONNX graph's (``images``, ``logits``, ``activations`` and, when the bank's detector
has a feature-squeezing member, ``squeezed_logits``), so the detector and the ensemble configs are the
same in both profiles. Models:

- ``classifier``: images -> logits, activations (, squeezed_logits);
- ``fingerprint_detector``: logits, activations (, squeezed_logits) (, the images, with a query memory) -> label,
  probabilities, score, is_attacked, checked (, ``query_flagged``, with a query memory: the image is a
  near-copy of a recent query, :mod:`kernels.query_memory`) (and ``fingerprint_ids``, the request's draws,
  only in a repository written with ``audit``);
- ``guarded_classifier`` (ensemble): images -> the same outputs;
- ``guarded_classifier_fused`` (cpu profile, when ``ServingConfig.fused``): the same inputs and outputs
  from one Python-backend step running both the classifier and the detector.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from kernels.bank import Bank
from kernels.contract import Contract, default_contract, load_contract
from kernels.errors import InvalidInputError
from kernels.query_memory import QueryMemoryConfig
from kernels.served import served_squeezers

SOURCES = Path(__file__).resolve().parent  # the models' code, package data (see pyproject)
ENSEMBLE, CLASSIFIER, DETECTOR, FUSED = "guarded_classifier", "classifier", "fingerprint_detector", "guarded_classifier_fused"
PROFILES = ("cpu", "gpu")
QUERY_MEMORY = "query_memory.json"  # in the pipeline folder: the query memory calibrated by `nfp calibrate`


@dataclass(frozen=True)
class ServingConfig:
    """Serving knobs; ``python -m client.benchmark`` measures their effect.

    Attributes:
        max_batch_size: largest batch Triton forms for one model execution.
        queue_delay_us: dynamic-batching wait. Delays add up across the two ensemble steps; with a
            toy CNN ensemble on this kind of machine, 0 gave batch-1 p50 ~1 ms against ~6 ms with
            2 ms per step (DESIGN.md).
        instances: model instances per model.
        false_positive_rate: which calibrated threshold decides ``is_attacked``.
        fused: also serve ``guarded_classifier_fused`` (cpu profile only).
        audit: also answer each request's draws (``fingerprint_ids``). Off by default: the draws are
            the detector's secret, and an attacker who sees them learns which fingerprints a request met.
        watch_queries: give the detecting models a query memory (:mod:`kernels.query_memory`) and the
            output ``query_flagged``.
        query_memory: its knobs; None: the pipeline folder's calibrated ones (``query_memory.json``,
            written by ``nfp calibrate``), else the defaults.
    """

    max_batch_size: int = 256
    queue_delay_us: int = 0
    instances: int = 1
    false_positive_rate: float = 0.01
    fused: bool = False
    audit: bool = False
    watch_queries: bool = True
    query_memory: QueryMemoryConfig | None = None


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _batching(cfg: ServingConfig) -> str:
    return f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.queue_delay_us} }}\n"


def _instances(kind: str, cfg: ServingConfig) -> str:
    return f"instance_group [ {{ count: {cfg.instances} kind: {kind} }} ]\n"


DETECTION_OUTPUTS = ("label", "probabilities", "score", "is_attacked", "checked", "fingerprint_ids", "activations",
                     "squeezed_logits", "query_flagged")


def model_configs(bank: Bank, contract: Contract, profile: str, cfg: ServingConfig,
                  imported: bool = False) -> dict[str, str]:
    """``config.pbtxt`` text of each model for ``profile``, by model name. The image input is the
    ``contract``'s; an ``imported`` model's own outputs are served beside the detection outputs."""
    if profile not in PROFILES:
        raise InvalidInputError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if cfg.fused and profile != "cpu":
        raise InvalidInputError("the fused guarded classifier exists in the cpu profile only; the gpu profile "
                                "runs the classifier on Triton's onnxruntime backend")
    originals = contract.outputs if imported else []
    clash = sorted({o["name"] for o in originals} & set(DETECTION_OUTPUTS))
    if clash:
        raise InvalidInputError(f"the model's outputs {clash} clash with the detection outputs; rename them")
    c, d, m = bank.num_classes, bank.num_neurons, int(bank.meta["draws_per_input"])
    images = _tensor(contract.input_name, contract.input_type, contract.dims)
    if contract.layout == "NHWC":
        images = images.replace(" dims:", " format: FORMAT_NHWC dims:")
    logits_type = next(o["data_type"] for o in contract.outputs if o["name"] == contract.logits)
    model_outputs = [_tensor(o["name"], o["data_type"], o["dims"]) for o in contract.outputs]
    acts = _tensor("activations", "TYPE_FP32", [d])
    squeezers = len(served_squeezers(bank))  # feature squeezing: the logits of each squeezed copy
    evidence = [acts] + [_tensor("squeezed_logits", "TYPE_FP32", [squeezers, c])] * bool(squeezers)
    results = [_tensor("label", "TYPE_INT64", [1]), _tensor("probabilities", "TYPE_FP32", [c]),
               _tensor("score", "TYPE_FP32", [1]), _tensor("is_attacked", "TYPE_BOOL", [1]),
               _tensor("checked", "TYPE_BOOL", [1])] + [_tensor("fingerprint_ids", "TYPE_INT64", [m])] * cfg.audit
    memory = (cfg.query_memory or QueryMemoryConfig()) if cfg.watch_queries else None
    results += [_tensor("query_flagged", "TYPE_BOOL", [1])] * (memory is not None)
    guarded = [_tensor(o["name"], o["data_type"], o["dims"]) for o in originals] + results
    head = lambda name, backend: f'name: "{name}"\n{backend}\nmax_batch_size: {cfg.max_batch_size}\n'  # noqa: E731
    interface = (f'parameters {{ key: "input_scale" value: {{ string_value: "{contract.scale:g}" }} }}\n'
                 + f'parameters {{ key: "logits_output" value: {{ string_value: "{contract.logits}" }} }}\n')
    if profile == "cpu":
        classifier = (head(CLASSIFIER, 'backend: "python"') + _io("input", [images])
                      + _io("output", model_outputs + evidence) + _batching(cfg) + _instances("KIND_CPU", cfg)
                      + interface)
    else:
        classifier = (head(CLASSIFIER, 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"')
                      + _io("input", [images]) + _io("output", model_outputs + evidence) + _batching(cfg)
                      + _instances("KIND_GPU", cfg))
    detection = (f'parameters {{ key: "model_sha256" value: {{ string_value: "{bank.meta["model_sha256"]}" }} }}\n'
                 + f'parameters {{ key: "false_positive_rate" value: {{ string_value: "{cfg.false_positive_rate:g}" }} }}\n'
                 + f'parameters {{ key: "audit" value: {{ string_value: "{str(cfg.audit).lower()}" }} }}\n'
                 + "".join(f'parameters {{ key: "query_{k}" value: {{ string_value: "{v}" }} }}\n'
                           for k, v in (memory.to_json() if memory else {}).items()))
    watched = [images] * (memory is not None)  # the detector step sees the image too, to remember it
    detector = (head(DETECTOR, 'backend: "python"') + _io("input", [_tensor("logits", logits_type, [c]), *evidence,
                                                                     *watched])
                + _io("output", results) + _batching(cfg)
                + _instances("KIND_GPU" if profile == "gpu" else "KIND_CPU", cfg) + detection)
    if memory is not None:
        detector += interface
    if profile == "gpu":  # hand the detector GPU tensors (DLPack) instead of copies on the host
        detector += 'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n'
    names = (["label", "probabilities", "score", "is_attacked", "checked"] + ["fingerprint_ids"] * cfg.audit
             + ["query_flagged"] * (memory is not None))
    evidence_names = ["activations"] + ["squeezed_logits"] * bool(squeezers)
    ensemble = (head(ENSEMBLE, 'platform: "ensemble"') + interface + _io("input", [images]) + _io("output", guarded)
                + "ensemble_scheduling {\n  step [\n"
                + f'    {{ model_name: "{CLASSIFIER}" model_version: -1\n'
                + f'      input_map {{ key: "{contract.input_name}" value: "{contract.input_name}" }}\n'
                + "".join(f'      output_map {{ key: "{o["name"]}" value: "{o["name"]}" }}\n' for o in contract.outputs)
                + "".join(f'      output_map {{ key: "{n}" value: "{n}" }}\n' for n in evidence_names)[:-1] + " },\n"
                + f'    {{ model_name: "{DETECTOR}" model_version: -1\n'
                + f'      input_map {{ key: "logits" value: "{contract.logits}" }}\n'
                + "".join(f'      input_map {{ key: "{n}" value: "{n}" }}\n'
                          for n in evidence_names + [contract.input_name] * (memory is not None))
                + "".join(f'      output_map {{ key: "{n}" value: "{n}" }}\n' for n in names) + "    }\n  ]\n}\n")
    configs = {CLASSIFIER: classifier, DETECTOR: detector, ENSEMBLE: ensemble}
    if cfg.fused:
        configs[FUSED] = (head(FUSED, 'backend: "python"') + _io("input", [images]) + _io("output", guarded)
                          + _batching(cfg) + _instances("KIND_CPU", cfg) + detection + interface)
    return configs


def calibrated_query_memory(pipeline_out: Path) -> QueryMemoryConfig:
    """The query memory's knobs ``nfp calibrate`` chose for a pipeline folder (``query_memory.json``), else
    the defaults."""
    path = Path(pipeline_out) / QUERY_MEMORY
    return QueryMemoryConfig(**json.loads(path.read_text())["config"]) if path.is_file() else QueryMemoryConfig()


def write_repository(pipeline_out: Path, target: Path, profile: str = "cpu",
                     cfg: ServingConfig = ServingConfig(), signing_key: Path | None = None) -> Path:
    """Write a runnable repository for ``profile`` from a pipeline output folder into ``target``.

    Needs ``model.onnx`` and a calibrated ``bank/`` bound to it (``nfp export``). With ``signing_key``
    (a private key kept outside ``target``, :func:`model_repository.signing.create_keys`) every model
    folder is signed; a server started with the public key loads nothing else.
    """
    pipeline_out, target = Path(pipeline_out), Path(target)
    onnx = pipeline_out / "model.onnx"
    if not onnx.is_file():
        raise InvalidInputError(f"{onnx} not found: run `nfp export --out {pipeline_out}` first")
    bank = Bank.load(pipeline_out / "bank")
    if "model_sha256" not in bank.meta or "calibration" not in bank.meta:
        raise InvalidInputError(f"the bank in {pipeline_out} is not calibrated and exported: run calibrate and export")
    contract = load_contract(pipeline_out)
    imported = contract is not None
    if cfg.watch_queries and cfg.query_memory is None:
        cfg = replace(cfg, query_memory=calibrated_query_memory(pipeline_out))
    if contract is None:
        contract = default_contract(json.loads((pipeline_out / "data.json").read_text())["image_shape"], bank.num_classes)
    if signing_key is not None and Path(signing_key).resolve().is_relative_to(target.resolve()):
        raise InvalidInputError("the signing key must be kept outside the model repository it signs")
    if target.exists():
        shutil.rmtree(target)
    for name, text in model_configs(bank, contract, profile, cfg, imported).items():
        version = target / name / "1"
        version.mkdir(parents=True)
        (target / name / "config.pbtxt").write_text(text)
    shutil.copy2(onnx, target / CLASSIFIER / "1" / "model.onnx")
    if profile == "cpu":
        shutil.copy2(SOURCES / CLASSIFIER / "1" / "model.py", target / CLASSIFIER / "1" / "model.py")
    for name in (DETECTOR, FUSED) if cfg.fused else (DETECTOR,):
        shutil.copy2(SOURCES / name / "1" / "model.py", target / name / "1" / "model.py")
        shutil.copytree(pipeline_out / "bank", target / name / "1" / "bank")
    if cfg.fused:
        shutil.copy2(onnx, target / FUSED / "1" / "model.onnx")
    if signing_key is not None:
        from model_repository.signing import sign_repository

        sign_repository(target, signing_key)
    return target


def add_bank_version(repository: Path, bank: Bank, signing_key: Path | None = None) -> dict[str, int]:
    """Add ``bank`` to every detecting model of ``repository`` as a new version (the latest one's code,
    and for the fused model its ONNX file, beside the new bank), then re-sign each model folder.

    Returns the new version of each model. The versions before stay on disk until a server loads the
    new one (Triton serves the latest version of each model); the bank must be bound to the same ONNX
    model (``model_sha256``), which the detecting models check at load.
    """
    repository = Path(repository)
    if bank.meta.get("model_sha256") is None or "calibration" not in bank.meta:
        raise InvalidInputError("a new bank version must be calibrated and bound to the served model (model_sha256)")
    versions = {}
    for name in (DETECTOR, FUSED):
        model = repository / name
        if not (model / "config.pbtxt").is_file():
            continue
        latest = max((int(v.name) for v in model.iterdir() if v.is_dir() and v.name.isdigit()), default=None)
        if latest is None:
            raise InvalidInputError(f"{model} has no version folder")
        new = model / str(latest + 1)
        shutil.copytree(model / str(latest), new, ignore=shutil.ignore_patterns("bank", "__pycache__"))
        bank.save(new / "bank")
        versions[name] = latest + 1
    if not versions:
        raise InvalidInputError(f"{repository} has no detecting model ({DETECTOR} or {FUSED})")
    if signing_key is not None:
        from model_repository.signing import sign_model

        for name in versions:
            sign_model(repository / name, signing_key)
    return versions
