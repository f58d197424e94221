"""int8 weight-only exports that keep rank slicing (``nsn-export --weights int8``).

Every NSN factor is stored as int8 with one fp32 scale per *rank component*: a scale per row of
``A`` (``rank x d_in``) and per column of ``B`` (a row of the stored ``B^T``, ``rank x d_out``).
So the first ``r`` rows of each stored array, and the first ``r`` scales, are exactly the rank-``r``
factor: every rank prefix is still a prefix, and weight views keep working. In the graph each
rank slice of a factor becomes ``Slice`` of the int8 array and ``Slice`` of its scales, then
``DequantizeLinear`` (axis 0) into the layer as before.

The embeddings are quantised per row too: a table read by ``Gather`` gets a scale per row, applied
after the rows are gathered, and the output embedding (a ``MatMul`` weight ``hidden x vocab``,
21 % of SmolLM2's weights, read on every token) a scale per vocabulary entry, as
``DequantizeLinear`` (axis 1) into the ``MatMul``; ONNX Runtime fuses that pair into an int8
``MatMulNBits`` kernel. Linear layers left dense, norms and biases stay fp32.

The quantisation is symmetric: ``q = round(w / s)`` with ``s = max|w| / 127`` over the row.
``fake_quantized`` puts the same dequantised values into a PyTorch model, so an int8 export is
verified against PyTorch as tightly as an fp32 one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploy.int8 import dequantize_rows, quantize_rows

WEIGHT_FORMATS = ("fp32", "int8")
# Tensors with fewer elements stay fp32: norms and biases cost nothing to read.
MIN_QUANTIZED_ELEMENTS = 4096


def quantize_graph(model: onnx.ModelProto) -> None:
    """Rewrite ``model`` (loaded with its weights) in place to int8 weights."""
    from deploy.ort.views import rank_slices

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    placed: dict[int, list[onnx.NodeProto]] = {}  # new nodes, inserted after the node of this id
    replaced: set[str] = set()

    def add(array: np.ndarray, name: str) -> str:
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    for node in rank_slices(model):
        source = node.input[0]
        if len(consumers[source]) != 1:
            continue
        q, scale = quantize_rows(numpy_helper.to_array(initializers[source]))
        out = node.output[0]
        node.input[0] = add(q, f"{source}.int8")
        node.output[0] = f"{out}.int8"
        scale_slice = helper.make_node("Slice", [add(scale, f"{source}.scale"), *node.input[1:]], [f"{out}.scale"],
                                       name=f"{node.name}.scale")
        dequantize = helper.make_node("DequantizeLinear", [f"{out}.int8", f"{out}.scale"], [out], axis=0,
                                      name=f"{node.name}.dequantize")
        placed[id(node)] = [scale_slice, dequantize]
        replaced.add(source)

    def quantizable(name: str) -> bool:
        init = initializers[name]
        return (name not in replaced and len(init.dims) == 2 and int(np.prod(init.dims)) >= MIN_QUANTIZED_ELEMENTS
                and init.data_type == onnx.TensorProto.FLOAT and len(consumers.get(name, [])) == 1)

    tables = [(name, consumers[name][0]) for name in initializers if quantizable(name)
              and consumers[name][0].op_type == "Gather" and consumers[name][0].input[0] == name
              and all(a.name != "axis" or a.i == 0 for a in consumers[name][0].attribute)]
    for name, user in tables:  # a row per index: a scale per row, applied to the gathered rows
        q, scale = quantize_rows(numpy_helper.to_array(initializers[name]))
        rows, ids = user.output[0], user.input[1]
        user.input[0], user.output[0] = add(q, f"{name}.int8"), f"{rows}.int8"
        placed[id(user)] = [
            helper.make_node("Gather", [add(scale, f"{name}.scale"), ids], [f"{rows}.scale"], name=f"{user.name}.scale"),
            helper.make_node("Cast", [f"{rows}.int8"], [f"{rows}.float"], to=onnx.TensorProto.FLOAT,
                             name=f"{user.name}.cast"),
            helper.make_node("Unsqueeze", [f"{rows}.scale", add(np.array([-1], np.int64), f"{name}.last_axis")],
                             [f"{rows}.scale_column"], name=f"{user.name}.unsqueeze"),
            helper.make_node("Mul", [f"{rows}.float", f"{rows}.scale_column"], [rows], name=f"{user.name}.scale_rows"),
        ]
        replaced.add(name)
    transposed_tables = {tuple(reversed(initializers[name].dims)) for name, _ in tables}
    for name in list(initializers):
        if not quantizable(name) or tuple(initializers[name].dims) not in transposed_tables:
            continue
        user = consumers[name][0]
        if user.op_type != "MatMul" or user.input[1] != name:
            continue
        # the output embedding, hidden x vocab: a scale per column (per vocabulary entry)
        q, scale = quantize_rows(numpy_helper.to_array(initializers[name]).T)
        dequantize = helper.make_node("DequantizeLinear", [add(np.ascontiguousarray(q.T), f"{name}.int8"),
                                                          add(scale, f"{name}.scale")], [f"{name}.dequantized"],
                                      axis=1, name=f"{name}.dequantize")
        user.input[1] = f"{name}.dequantized"
        placed.setdefault(-1, []).append(dequantize)  # first: its inputs are initializers
        replaced.add(name)

    nodes = list(placed.get(-1, []))
    for node in graph.node:
        nodes.append(node)
        nodes.extend(placed.get(id(node), []))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)


@contextlib.contextmanager
def fake_quantized(model):
    """``model`` (an NSN PyTorch model) with every weight an int8 export quantises replaced by its
    dequantised value, as the graph computes it; restored on exit."""
    import torch

    from .surgery import nsn_layers

    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def replace(parameter: torch.nn.Parameter, rows: torch.Tensor, transpose: bool) -> None:
        saved.append((parameter, parameter.detach().clone()))
        array = rows.detach().cpu().numpy()
        value = torch.from_numpy(dequantize_rows(*quantize_rows(array)))
        with torch.no_grad():
            parameter.copy_(value.T if transpose else value)

    seen: set[int] = set()
    for _, layer in nsn_layers(model):
        replace(layer.A, layer.A, False)  # a scale per row of A
        replace(layer.B, layer.B.T, True)  # a scale per column of B
        seen.update((id(layer.A), id(layer.B)))
    for module in model.modules():  # every embedding table as large as the graph quantises
        if isinstance(module, torch.nn.Embedding) and module.weight.numel() >= MIN_QUANTIZED_ELEMENTS:
            replace(module.weight, module.weight, False)
            seen.add(id(module.weight))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and id(output.weight) not in seen and output.weight.numel() >= MIN_QUANTIZED_ELEMENTS:
        # untied: (vocab, hidden), a row per entry
        replace(output.weight, output.weight, False)
    try:
        yield model
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)
