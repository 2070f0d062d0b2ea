"""An imported ONNX model: its contract read from a Triton folder or the graph, the activations output
added without touching the original outputs, the conversion checked, failures named."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.models.onnx_import import OnnxClassifier, conversion_gap, intermediate_tensors, proposed_layers, read_model, with_activations
from kernels.contract import Contract
from kernels.errors import InvalidInputError, ModelMismatchError
from kernels.onnx_runtime import ort_session


def tiny_graph(path, opset=17, cast_to=TensorProto.FLOAT):
    """pixels (B, 4, 4, 1) uint8 -> Cast -> /255 -> Flatten -> Gemm(16->5) -> Relu -> Gemm(5->3) = scores."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 5)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(255, np.float32), "k")]
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=cast_to, name="cast"),
             helper.make_node("Div", ["x", "k"], ["scaled"], name="div"),
             helper.make_node("Flatten", ["scaled"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "w1"], ["hidden"], name="fc1"),
             helper.make_node("Relu", ["hidden"], ["relu"], name="relu"),
             helper.make_node("Gemm", ["relu", "w2"], ["scores"], name="fc2")]
    graph = helper.make_graph(nodes, "user", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["b", 4, 4, 1])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "1").mkdir()
    tiny_graph(tmp_path / "m" / "3" / "model.onnx")
    (tmp_path / "m" / "config.pbtxt").write_text(
        'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "pixels" data_type: TYPE_UINT8 dims: [ 4, 4, 1 ] } ]\n'
        'output [ { name: "scores" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')
    return tmp_path / "m"


def test_the_contract_is_the_same_read_from_the_triton_folder_or_from_the_graph(folder):
    path, from_config = read_model(folder)
    _, from_graph = read_model(path)
    assert path == folder / "3" / "model.onnx", "the highest version"
    assert from_config == from_graph == Contract("pixels", "TYPE_UINT8", [4, 4, 1], "NHWC", 255.0,
                                                 [{"name": "scores", "data_type": "TYPE_FP32", "dims": [3]}], "scores")
    assert from_config.image_shape == (1, 4, 4)


def test_served_images_equal_a_pixel_by_pixel_conversion():
    contract = Contract("pixels", "TYPE_UINT8", [4, 5, 3], "NHWC", 255.0, [{"name": "s", "data_type": "TYPE_FP32",
                                                                            "dims": [2]}], "s")
    images = np.random.default_rng(1).random((2, 3, 4, 5), dtype=np.float32)
    served = contract.served_images(images)
    assert served.dtype == np.uint8 and served.shape == (2, 4, 5, 3)
    for b in range(2):
        for c in range(3):
            for h in range(4):
                for w in range(5):
                    assert served[b, h, w, c] == int(np.round(float(images[b, c, h, w]) * 255))


def test_the_activations_output_leaves_the_original_outputs_bit_identical(folder, tmp_path):
    path, contract = read_model(folder)
    assert [t["name"] for t in intermediate_tensors(path)] == ["x", "scaled", "flat", "hidden", "relu", "scores"]
    assert proposed_layers(path) == ["hidden", "scores"]
    guarded = with_activations(path, ["hidden", "relu"], tmp_path / "guarded.onnx")
    pixels = np.random.default_rng(2).integers(0, 256, (6, 4, 4, 1)).astype(np.uint8)
    scores, acts = ort_session(guarded).run(["scores", "activations"], {"pixels": pixels})
    np.testing.assert_array_equal(scores, ort_session(path).run(["scores"], {"pixels": pixels})[0])
    # the reference: the same tensors asked for as outputs of the original graph, concatenated by hand
    model = onnx.load(str(path))
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("hidden", "relu")])
    onnx.save(model, str(tmp_path / "probe.onnx"))
    hidden, relu = ort_session(tmp_path / "probe.onnx").run(["hidden", "relu"], {"pixels": pixels})
    np.testing.assert_array_equal(acts, np.concatenate([hidden, relu], axis=1))
    with pytest.raises(InvalidInputError, match="not produced by any node"):
        with_activations(path, ["nowhere"], tmp_path / "bad.onnx")


def test_the_torch_copy_agrees_with_onnxruntime_and_reaches_tensors_by_name(folder):
    path, contract = read_model(folder)
    model = OnnxClassifier(str(path), contract.to_json())
    images = np.random.default_rng(3).integers(0, 256, (5, 1, 4, 4)).astype(np.float32) / 255
    assert conversion_gap(model, path, images) < 1e-5
    assert [model.tensor_of[m] for m in model.fingerprint_layers] == ["hidden", "scores"]


def test_an_operator_onnx2torch_cannot_convert_is_named(tmp_path):
    path = tiny_graph(tmp_path / "new.onnx", opset=21)  # Cast 21: newer than onnx2torch converts
    _, contract = read_model(path)
    with pytest.raises(ModelMismatchError, match="Cast"):
        OnnxClassifier(str(path), contract.to_json())
