"""engine-info --check-trt: every graph op by op against the TensorRT ONNX parser's operator table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffusion_engine.engine.cli import info_main
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import CPU_GRAPH
from diffusion_engine.engine.trt_ops import check_graph, load_table

F, I32, U8, F64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.UINT8, TensorProto.DOUBLE


def run_check(engine: Path, capsys) -> tuple[int, str]:
    rc = info_main([str(engine), "--check-trt"])
    return rc, capsys.readouterr().out


@pytest.fixture
def engine_copy(tiny_engine, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_engine, tmp_path / "engine"))


def test_table_records_its_source():
    src = load_table()["source"]
    assert src["repository"] == "https://github.com/onnx/onnx-tensorrt" and src["document"].startswith("docs/operators.md")
    assert src["tensorrt_version"] == "10.1" and len(src["commit"]) == 40 and src["read_on"]
    assert load_table()["operators"]["Resize"]["supported"] and not load_table()["operators"]["Unique"]["supported"]


def test_check_trt_on_the_tiny_engine(tiny_engine, capsys):
    manifest = read_manifest(tiny_engine)
    files = {f for c in manifest.components.values() for k, f in c.files.items() if k != CPU_GRAPH}
    rc, out = run_check(tiny_engine, capsys)
    assert all(f in out for f in files)  # every graph of every component, fp32 and fp16
    assert ".cpu.onnx" not in out  # ONNX Runtime's own graph (com.microsoft attention) is not TensorRT's to build
    assert "op type" in out and "Resize" in out and "onnx-tensorrt" in out
    assert rc == 0 and "all graphs supported" in out, out


def test_uint8_intermediate_is_flagged(engine_copy, capsys):
    """TensorRT allows UINT8 only as network I/O: a uint8 tensor inside the graph is named."""
    path = engine_copy / read_manifest(engine_copy).components["vae_decoder"].files["fp32"]
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    last = next(n for n in model.graph.node if out in n.output)  # the final Cast to uint8
    last.output[0] = "pixels_u8"
    model.graph.node.extend([
        helper.make_node("Transpose", ["pixels_u8"], ["pixels_t"], name="planted_transpose", perm=[0, 1, 2, 3]),
        helper.make_node("Identity", ["pixels_t"], [out], name="planted_identity"),
    ])
    onnx.save(model, str(path))
    rc, text = run_check(engine_copy, capsys)
    assert rc != 0 and "UINT8" in text and "vae_decoder.fp32.onnx" in text, text


def test_planted_unsupported_ops_are_named(engine_copy, capsys):
    files = {n: c.files for n, c in read_manifest(engine_copy).components.items()}
    unet = engine_copy / files["unet"]["fp16"]
    model = onnx.load(str(unet))
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    next(a for a in resize.attribute if a.name == "mode").s = b"cubic"
    onnx.save(model, str(unet))
    text = engine_copy / files["text_encoder"]["fp32"]
    model = onnx.load(str(text))
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    sigmoid.op_type = "Unique"
    onnx.save(model, str(text))
    rc, out = run_check(engine_copy, capsys)
    assert rc == 1
    assert f"unet.fp16.onnx: Resize node {resize.name!r}: mode='cubic' is not supported (allowed: nearest, linear)" in out
    assert f"text_encoder.fp32.onnx: Unique node {sigmoid.name!r}: listed as unsupported" in out
    assert "unet.fp32.onnx" in out and "Unique" in out.split("unsupported   ")[0]  # in the op table too


def test_unreadable_graph_is_an_error(engine_copy, capsys):
    (engine_copy / read_manifest(engine_copy).components["unet"].files["fp16"]).write_bytes(b"not onnx")
    assert info_main([str(engine_copy), "--check-trt"]) == 1
    assert "not a readable ONNX graph" in capsys.readouterr().err


# --- single rules on small graphs ------------------------------------------------------------------


def graph_file(tmp_path, nodes, inputs, outputs, inits=(), opset=20, functions=(), name="g.onnx") -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def reasons(check) -> list[str]:
    return [p.reason for p in check.problems]


def test_op_table_and_domains(tmp_path):
    path = graph_file(tmp_path, [helper.make_node("NotAnOp", ["x"], ["y"], name="n1"),
                                 helper.make_node("FusedGelu", ["y"], ["z"], domain="com.microsoft", name="n2")],
                      [("x", F, [2])], [("z", F, [2])])
    check = check_graph(path)
    assert not check.ok and check.ops == {"NotAnOp": 1, "com.microsoft::FusedGelu": 1}
    assert reasons(check) == ["not in the TensorRT ONNX parser's operator table",
                              "custom domain 'com.microsoft': TensorRT needs a plugin for it"]


def test_opset_and_version_gates(tmp_path):
    path = graph_file(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])], [("y", F, [2])], opset=21)
    assert reasons(check_graph(path)) == ["opset 21 is outside [9, 20], the range TensorRT 10.1's ONNX parser reads"]
    assert check_graph(path, target="10.15").ok
    later = graph_file(tmp_path, [helper.make_node("RMSNormalization", ["x", "s"], ["y"])],
                       [("x", F, [2, 4]), ("s", F, [4])], [("y", F, [2, 4])], name="rms.onnx")
    assert reasons(check_graph(later)) == ["supported only from TensorRT 10.15 (checking for 10.1)"]
    assert check_graph(later, target="10.15").ok


def test_constant_inputs(tmp_path):
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    ok = graph_file(tmp_path, [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [("x", F, [2])],
                    [("y", F, [1, 2])], inits=[axes])
    assert check_graph(ok).ok
    const = graph_file(tmp_path, [helper.make_node("Constant", [], ["a"], value=axes),
                                  helper.make_node("Unsqueeze", ["x", "a"], ["y"])],
                       [("x", F, [2])], [("y", F, [1, 2])], name="const.onnx")
    assert check_graph(const).ok
    dynamic = graph_file(tmp_path, [helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="u")],
                         [("x", F, [2]), ("a", TensorProto.INT64, [1])], [("y", F, [1, 2])], name="dyn.onnx")
    assert reasons(check_graph(dynamic)) == ["input 1 ('a') must be an initializer or a Constant"]


def test_tensor_types(tmp_path):
    ints = graph_file(tmp_path, [helper.make_node("MatMul", ["a", "b"], ["c"])], [("a", I32, [2, 2]), ("b", I32, [2, 2])],
                      [("c", I32, [2, 2])])
    assert reasons(check_graph(ints)) == ["input 0 ('a') is INT32; the table allows FP32, FP16, BF16"]
    doubles = graph_file(tmp_path, [helper.make_node("Add", ["a", "a"], ["b"])], [("a", F64, [2])], [("b", F64, [2])],
                         name="double.onnx")
    check = check_graph(doubles)
    assert check.ok and [w.reason for w in check.warnings] == ["input 0 ('a') is DOUBLE: TensorRT casts it down to FP32"]
    uint8 = graph_file(tmp_path, [helper.make_node("Cast", ["x"], ["u"], to=U8), helper.make_node("Cast", ["u"], ["y"], to=F)],
                       [("x", F, [2])], [("y", F, [2])], name="u8.onnx")
    assert set(reasons(check_graph(uint8))) == {"'u' is UINT8, which TensorRT allows only as a network input or output"}
    io = graph_file(tmp_path, [helper.make_node("Cast", ["x"], ["y"], to=U8)], [("x", F, [2])], [("y", U8, [2])],
                    name="io.onnx")
    assert check_graph(io).ok


def test_attribute_and_output_rules(tmp_path):
    norm = graph_file(tmp_path, [helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean", "inv"])],
                      [("x", F, [2, 4]), ("s", F, [4])], [("y", F, [2, 4])])
    assert reasons(check_graph(norm)) == ["only the first 1 output(s) are supported; it uses 3"]
    pool = graph_file(tmp_path, [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
                      [("x", F, [1, 1, 8, 8])], [("y", F, [1, 1, 6, 6])], name="pool.onnx")
    assert reasons(check_graph(pool)) == ["dilations=[2, 2] must be empty or all ones"]
    resize = graph_file(tmp_path, [helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear", antialias=1,
                                                    coordinate_transformation_mode="tf_crop_and_resize")],
                        [("x", F, [1, 1, 4, 4])], [("y", F, [1, 1, 8, 8])],
                        inits=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")], name="resize.onnx")
    assert sorted(reasons(check_graph(resize))) == [
        "antialias=1 is not supported (allowed: 0)",
        "coordinate_transformation_mode='tf_crop_and_resize' is not supported (allowed: half_pixel, "
        "pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners)",
    ]


def test_local_function_bodies_are_checked(tmp_path):
    body = helper.make_function("local", "Wrapped", ["a"], ["b"], [helper.make_node("Unique", ["a"], ["b"], name="inner")],
                                [helper.make_opsetid("", 20)])
    path = graph_file(tmp_path, [helper.make_node("Wrapped", ["x"], ["y"], domain="local")],
                      [("x", F, [2])], [("y", F, [2])], functions=[body])
    check = check_graph(path)
    assert [(p.node, p.op_type, p.reason) for p in check.problems] == [("inner", "Unique", "listed as unsupported by the TensorRT ONNX parser")]
