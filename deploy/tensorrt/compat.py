"""Will TensorRT's ONNX parser build this graph with ``rank`` as a shape input? Checked on the
CPU, without TensorRT (``nsn-trt check``; ``nsn-export`` runs it and warns).

What is checked, each problem naming the node and the fix:
- every operator is in the parser's support matrix (``onnx_tensorrt_10_ops.json``, with its source);
- the opset is one the parser accepts;
- ``rank`` is a 0-d int64 input whose value reaches data only as the ``starts``/``ends`` of a
  ``Slice`` — 1-D, with constant ``axes`` — so TensorRT makes it a shape tensor (a mask-mode export
  multiplies data by a rank mask instead: no rank profiles are possible there);
- constants in the rank arithmetic fit in int32 (TensorRT 10.3 passes shape values as int32);
- every external weight is a regular file inside the export directory (``check_external_data``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..external_data import UnsafeModelError, load_graph, model_file

INT32_MAX = 2**31 - 1
# Operators that may compute on the rank value itself (shape arithmetic TensorRT runs on the host).
SHAPE_ARITHMETIC = {"Clip", "Min", "Max", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Add", "Sub", "Mul", "Div",
                    "Concat", "Identity", "Gather", "Neg"}
SUPPORTED_TRT_MAJOR = (10,)


@dataclass(frozen=True)
class Problem:
    node: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message}; {self.fix}"


def operator_table() -> dict:
    with resources.files(__package__).joinpath("onnx_tensorrt_10_ops.json").open() as handle:
        return json.load(handle)


def trt_major(version: str) -> int:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major not in SUPPORTED_TRT_MAJOR:
        raise ValueError(f"TensorRT version {version!r} is not supported; give a 10.x version such as 10.3 "
                         f"(JetPack 6); an int64 rank shape input needs TensorRT 10")
    return major


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small constants (initializers stored in the graph and ``Constant`` nodes)."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(i.dims)) <= 64}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '(unnamed)'} ({node.op_type})"


def check_rank_input(model: onnx.ModelProto) -> list[Problem]:
    graph = model.graph
    rank = next((i for i in graph.input if i.name == "rank"), None)
    if rank is None:
        return [Problem("input rank", "the graph has no rank input (a specialist or dense export)",
                        "export the NSN checkpoint with nsn-export (a dynamic rank input)")]
    problems = []
    tensor_type = rank.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.INT64 or len(tensor_type.shape.dim) != 0:
        problems.append(Problem("input rank", f"must be a 0-d int64 tensor, is "
                                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)} with "
                                f"{len(tensor_type.shape.dim)} dims", "re-export with nsn-export"))
    constants = constant_values(graph)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    ranks_of = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info
                if v.type.tensor_type.HasField("shape")}
    rank_valued = {"rank"}  # values computed from rank and constants only
    for node in graph.node:
        fed = [i for i in node.input if i in rank_valued]
        fed_positions = {position for position, name in enumerate(node.input) if name in rank_valued}
        if not fed:
            continue
        others_constant = all(not i or i in rank_valued or i in constants for i in node.input)
        if node.op_type in SHAPE_ARITHMETIC and others_constant:
            rank_valued.update(node.output)
            big = [name for name in node.input if name in constants
                   and np.issubdtype(constants[name].dtype, np.integer) and np.abs(constants[name]).max(initial=0) > INT32_MAX]
            problems += [Problem(node_label(node), f"rank arithmetic uses the constant {name!r} beyond int32",
                                 "TensorRT 10.3 passes shape values as int32; re-export with nsn-export")
                         for name in big]
            continue
        if node.op_type == "Slice" and fed_positions <= {1, 2}:
            axes = node.input[3] if len(node.input) > 3 else ""
            if not axes or axes not in constants:
                problems.append(Problem(node_label(node), "Slice by rank has no constant axes",
                                        "TensorRT needs constant Slice axes; re-export with nsn-export"))
            for name in fed:
                if ranks_of.get(name, 1) != 1:
                    problems.append(Problem(node_label(node), f"Slice ends {name!r} derived from rank are "
                                            f"{ranks_of[name]}-D", "TensorRT needs 1-D ends; re-export with nsn-export"))
            continue
        problems.append(Problem(node_label(node), "the rank value flows into data, not only into Slice sizes, so "
                                "TensorRT cannot treat rank as a shape input (a mask-mode export?)",
                                "re-export with --rank-mode slice for TensorRT rank profiles"))
        break
    return problems


def check_graph(model_path: str | Path, trt_version: str = "10.3") -> list[Problem]:
    """Every reason TensorRT ``trt_version`` would not build ``model_path`` with a rank shape input."""
    trt_major(trt_version)
    model_path = model_file(model_path)
    try:
        model = load_graph(model_path)
    except UnsafeModelError as error:
        return [Problem("external data", str(error), "keep model.onnx_data inside the export directory")]
    table = operator_table()
    supported = set(table["supported"])
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not table["opset_min"] <= opset <= table["opset_max"]:
        problems.append(Problem("model", f"opset {opset} is outside the TensorRT 10 parser's range "
                                f"[{table['opset_min']}, {table['opset_max']}]", "re-export with --opset 17"))
    seen = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem(node_label(node), f"custom domain {node.domain!r} needs a TensorRT plugin",
                                    "nsn-trt builds without plugins; re-export without custom operators"))
        elif node.op_type not in supported and node.op_type not in seen:
            seen.add(node.op_type)
            problems.append(Problem(node_label(node), f"operator {node.op_type} is not supported by TensorRT's "
                                    f"ONNX parser", "re-export with an opset or model without it"))
    return problems + check_rank_input(model)
