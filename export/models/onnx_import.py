"""Guarding a model that is already served: an ONNX file or a Triton model folder as the classifier.

    nfp layers --onnx-model models/resnet                             # its tensors, with shapes
    nfp pipeline --out runs/mine --onnx-model models/resnet [--layers T1 T2] --dataset my_photos/

The user's model keeps its contract (:class:`Contract`, read from its ``config.pbtxt`` with
tritonclient's model-config protobuf, or from the graph): input name, dtype (UINT8, FP16, FP32),
layout (NCHW or NHWC), the preprocessing inside its graph, its outputs. The pipeline's stages work on
images ``(B, C, H, W)`` float in [0, 1]; :class:`OnnxClassifier` puts the user's graph behind that
interface (layout, scale, dtype) after converting it to torch with ``onnx2torch`` (attacks need
gradients), checked against onnxruntime on real images. The fingerprinted layers are tensors of the
graph, by name; the default is the outputs of its last two Conv / Gemm / MatMul nodes, as for torch
models. At ``nfp export`` the served ``model.onnx`` is the user's graph with one output added,
``activations`` (those tensors flattened and concatenated), its own outputs bit-identical
(:func:`with_activations`), and the repository serves the user's contract with the detection
outputs beside the original ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kernels.contract import CONTRACT, DTYPES, Contract
from kernels.errors import InvalidInputError, ModelMismatchError

USER_MODEL = "user_model.onnx"
ACTIVATIONS = "activations"
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
CONVERSION_ATOL = 1e-4


def _type_name(elem_type: int) -> str:
    names = {v[0]: k for k, v in DTYPES.items()}
    if elem_type not in names:
        import onnx

        raise InvalidInputError(f"input of type {onnx.TensorProto.DataType.Name(elem_type)} is not an image type "
                                f"this tool serves ({', '.join(sorted(DTYPES))})")
    return names[elem_type]


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def _layout(dims: list[int]) -> str:
    """A layout nobody stated, from one image's dims: NHWC when the last is 1 or 3 and the first is not."""
    return "NHWC" if len(dims) == 3 and dims[-1] in (1, 3) and dims[0] not in (1, 3) else "NCHW"


def read_model(path: Path, logits: str | None = None, scale: float | None = None) -> tuple[Path, Contract]:
    """The ONNX file and the contract of ``path``: a Triton model folder (``config.pbtxt`` and a version
    folder with the ONNX file; the highest version) or an ONNX file (contract from the graph); a layout
    neither states is guessed (:func:`_layout`)."""
    import onnx

    path = Path(path)
    if path.is_dir():
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        config_path = path / "config.pbtxt"
        if not config_path.is_file():
            raise InvalidInputError(f"{path} is no Triton model folder: config.pbtxt is missing")
        config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
        versions = sorted((int(v.name) for v in path.iterdir() if v.is_dir() and v.name.isdigit()))
        filename = config.default_model_filename or "model.onnx"
        if not versions or not (path / str(versions[-1]) / filename).is_file():
            raise InvalidInputError(f"{path} has no version folder holding {filename}")
        onnx_path = path / str(versions[-1]) / filename
        if len(config.input) != 1:
            raise InvalidInputError(f"{path}: one image input is supported, the config has {len(config.input)}")
        (inp,) = config.input
        dims = list(inp.dims)
        layout = {mc.ModelInput.FORMAT_NHWC: "NHWC", mc.ModelInput.FORMAT_NCHW: "NCHW"}.get(inp.format, _layout(dims))
        if config.max_batch_size == 0:
            raise InvalidInputError(f"{path}: max_batch_size 0 (no batch dimension) is not supported")
        outputs = [{"name": o.name, "data_type": mc.DataType.Name(o.data_type), "dims": list(o.dims)} for o in config.output]
        input_name, input_type = inp.name, mc.DataType.Name(inp.data_type)
    else:
        if not path.is_file():
            raise InvalidInputError(f"no model at {path}")
        onnx_path = path
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise InvalidInputError(f"{path}: one image input is supported, the graph has {[i.name for i in inputs]}")
        (inp,) = inputs
        dims = [int(d) for d in _dims(inp)[1:]]
        layout = _layout(dims)
        input_name, input_type = inp.name, _type_name(inp.type.tensor_type.elem_type)
        outputs = [{"name": o.name, "data_type": "TYPE_" + onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type)
                    .replace("FLOAT16", "FP16").replace("FLOAT", "FP32"), "dims": [int(d) for d in _dims(o)[1:]]}
                   for o in graph.output]
    if scale is None:
        scale = 255.0 if input_type == "TYPE_UINT8" else 1.0
    return onnx_path, Contract(input_name, input_type, dims, layout, scale, outputs, logits or outputs[0]["name"])


def intermediate_tensors(onnx_path: Path) -> list[dict[str, Any]]:
    """Every float tensor a node of the graph produces, in graph order, with its shape (shape inference)
    and the producing node's operator."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    info = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    tensors = []
    for node in model.graph.node:
        for out in node.output:
            v = info.get(out)
            if v is not None and v.type.tensor_type.elem_type in (1, 10) and node.op_type != "Constant":
                tensors.append({"name": out, "shape": _dims(v), "op": node.op_type})
    return tensors


def proposed_layers(onnx_path: Path) -> list[str]:
    """The outputs of the graph's last Conv / Gemm / MatMul nodes, as many as the torch default takes
    (:data:`export.models.activations.DEFAULT_LAYER_COUNT`)."""
    from export.models.activations import DEFAULT_LAYER_COUNT

    weighted = [t["name"] for t in intermediate_tensors(onnx_path) if t["op"] in WEIGHTED_OPS]
    if not weighted:
        raise InvalidInputError(f"{onnx_path} has no Conv, Gemm or MatMul node: name the layers with --layers")
    return weighted[-DEFAULT_LAYER_COUNT:]


class OnnxClassifier(nn.Module):
    """The user's ONNX graph, converted by ``onnx2torch``, behind the pipeline's interface: images
    ``(B, C, H, W)`` float in [0, 1] -> the ``logits`` output. Intermediate tensors are reached by
    their ONNX names through :attr:`module_of` (the converted module that produces each), so the usual
    activation capture and white-box attacks run on it; :attr:`fingerprint_layers` are the default
    layers to capture."""

    def __init__(self, path: str, contract: dict[str, Any]) -> None:
        super().__init__()
        import onnx
        from onnx2torch import convert
        from onnx2torch.onnx_graph import OnnxGraph

        self.contract = Contract.from_json(contract)
        proto = onnx.load(path)
        try:
            self.graph = convert(proto)
        except NotImplementedError as e:  # onnx2torch names the operator it cannot convert
            raise ModelMismatchError(f"onnx2torch cannot convert {path}: {e}. Attacks need a differentiable copy; "
                                     "remove or replace that operator, or use a black-box attack") from None
        self.graph.eval()
        nodes = OnnxGraph(proto.graph).nodes
        self.module_of = {out: f"graph.{name}" for name, node in nodes.items() for out in node.output_values}
        self.tensor_of = {m: t for t, m in self.module_of.items()}
        self.output_index = [o.name for o in proto.graph.output].index(self.contract.logits)
        self.fingerprint_layers = [self.module_of[t] for t in proposed_layers(Path(path))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 2, 3, 1) if self.contract.layout == "NHWC" else images
        x = x * self.contract.scale  # UINT8 graphs start with a Cast to float: the gradient flows through
        if self.contract.input_type == "TYPE_FP16":
            x = x.half()
        out = self.graph(x)
        logits = out[self.output_index] if isinstance(out, (tuple, list)) else out
        return logits.float()


def onnx_classifier(path: str, contract: dict[str, Any]) -> OnnxClassifier:
    """The ``ClassifierSpec`` factory of an imported model (the workspace's copy of the user's graph)."""
    return OnnxClassifier(path, contract)


def conversion_gap(model: OnnxClassifier, onnx_path: Path, images: np.ndarray) -> float:
    """Max |torch - onnxruntime| of the logits on ``images``; raises above :data:`CONVERSION_ATOL`."""
    from kernels.onnx_runtime import ort_session

    reference = ort_session(onnx_path, providers=["CPUExecutionProvider"]).run(
        [model.contract.logits], {model.contract.input_name: model.contract.served_images(images)})[0]
    with torch.no_grad():
        converted = model(torch.from_numpy(images)).numpy()
    gap = float(np.abs(converted - reference).max())
    if gap > CONVERSION_ATOL or (converted.argmax(1) != reference.argmax(1)).any():
        raise ModelMismatchError(f"the onnx2torch copy of {onnx_path} disagrees with onnxruntime: max |diff| of the "
                                 f"logits {gap:.2e} (allowed {CONVERSION_ATOL:g})")
    return gap


def with_activations(onnx_path: Path, tensors: list[str], target: Path) -> Path:
    """Write the graph of ``onnx_path`` with one more output, ``activations (B, D) float32``: ``tensors``
    flattened after the batch dimension and concatenated in order. Nothing else changes."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    if ACTIVATIONS in [o.name for o in graph.output]:
        raise InvalidInputError(f"{onnx_path} already has an output named {ACTIVATIONS!r}")
    produced = {out for node in graph.node for out in node.output}
    missing = [t for t in tensors if t not in produced]
    if missing:
        raise InvalidInputError(f"tensors {missing} are not produced by any node of {onnx_path}")
    flat = []
    for i, t in enumerate(tensors):
        graph.node.extend([helper.make_node("Flatten", [t], [f"nfp_flat_{i}"], axis=1, name=f"nfp_flatten_{i}"),
                           helper.make_node("Cast", [f"nfp_flat_{i}"], [f"nfp_float_{i}"], to=1, name=f"nfp_cast_{i}")])
        flat.append(f"nfp_float_{i}")
    graph.node.append(helper.make_node("Concat", flat, [ACTIVATIONS], axis=1, name="nfp_activations"))
    graph.output.append(helper.make_tensor_value_info(ACTIVATIONS, onnx.TensorProto.FLOAT, ["batch", None]))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


def export_imported(model: OnnxClassifier, layout, user_onnx: Path, target: Path, images: np.ndarray):
    """``target``: the user's graph with the ``activations`` output of ``layout`` (:func:`with_activations`);
    checked on ``images``: every original output bit-identical to the user's graph under onnxruntime, and
    the activations equal to the torch copy's capture (within :data:`CONVERSION_ATOL`)."""
    import time

    import onnx

    from export.models.onnx_export import ClassifierWithActivations, ExportReport
    from kernels.bank import sha256_file
    from kernels.onnx_runtime import ort_session

    started = time.perf_counter()
    if any(s.where != "output" or s.name not in model.tensor_of for s in layout.slices):
        raise InvalidInputError(f"an imported model's layers are graph tensors (outputs of its nodes), got {layout.layers}")
    with_activations(user_onnx, [model.tensor_of[s.name] for s in layout.slices], target)
    feed = model.contract.served_images(images)
    names = [o["name"] for o in model.contract.outputs]
    original = ort_session(user_onnx, providers=["CPUExecutionProvider"]).run(names, {model.contract.input_name: feed})
    guarded = ort_session(target, providers=["CPUExecutionProvider"]).run(names + [ACTIVATIONS],
                                                                          {model.contract.input_name: feed})
    changed = [n for n, a, b in zip(names, original, guarded) if not np.array_equal(a, b)]
    if changed:
        raise ModelMismatchError(f"adding the activations output changed the outputs {changed} of {user_onnx}")
    with torch.no_grad():
        logits, acts = (t.numpy() for t in ClassifierWithActivations(model, layout)(torch.from_numpy(images)))
    d_logits = float(np.abs(guarded[names.index(model.contract.logits)] - logits).max())
    d_acts = float(np.abs(guarded[-1] - acts).max())
    if max(d_logits, d_acts) > CONVERSION_ATOL:
        raise ModelMismatchError(f"the served graph and the torch copy disagree: logits {d_logits:.2e}, activations "
                                 f"{d_acts:.2e} (allowed {CONVERSION_ATOL:g})")
    opset = max(o.version for o in onnx.load(str(target), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return ExportReport(str(target), sha256_file(target), opset, "the user's graph + an activations output",
                        round(time.perf_counter() - started, 2), len(images), d_logits, d_acts)


def import_model(ws, path: Path, logits: str | None = None, scale: float | None = None,
                 check_count: int = 64) -> dict[str, Any]:
    """Make the user's model the workspace's classifier (instead of ``nfp train``): copy its graph and
    contract into the workspace, convert it, check the conversion on real images of the data set."""
    import time

    from export.models.classifier import ClassifierSpec, save_checkpoint
    from export.models.classifier import accuracy
    from export.data.artifacts import load_prepared

    started = time.time()
    ds, splits, _ = load_prepared(ws)
    onnx_path, contract = read_model(path, logits, scale)
    if contract.image_shape != tuple(ds.image_shape):
        raise ModelMismatchError(f"the model takes images {contract.image_shape} (C, H, W), the data set has "
                                 f"{tuple(ds.image_shape)}")
    import onnx

    copy = ws.root / USER_MODEL
    onnx.save(onnx.load(str(onnx_path)), str(copy))  # one file: weights kept as external data come inside
    spec = ClassifierSpec("export.models.onnx_import:onnx_classifier", tuple(ds.image_shape), ds.num_classes,
                          {"path": str(copy.resolve()), "contract": contract.to_json()})
    model = spec.build()
    gap = conversion_gap(model, copy, ds.x[splits.fit[:check_count]])
    (ws.root / CONTRACT).write_text(json.dumps(contract.to_json(), indent=2))
    acc = {name: round(accuracy(model, ds.x[idx], ds.y[idx]), 4) for name, idx in splits.as_dict().items()}
    results = {"accuracy": acc, "trained": False, "conversion_max_abs_diff": gap,
               "default_layers": [model.tensor_of[m] for m in model.fingerprint_layers], "contract": contract.to_json()}
    save_checkpoint(model, spec, ws.classifier, results)
    ws.record("train", {"imported": str(path), "logits": logits, "scale": scale}, [copy, ws.root / CONTRACT, ws.classifier,
                                                                   ws.classifier.with_suffix(".json")], started, results)
    return results
