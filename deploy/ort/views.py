"""Zero-copy rank views: run an NSN slice-mode graph on prefix views of its full factors.

In the exported graph every factor is sliced by ``rank`` along its leading axis:
``Slice(W, 0, min(rank, R_l))`` with ``W`` a stored initializer. ONNX Runtime copies that prefix
on every run, and a non-constant weight cannot be pre-packed: that copy is most of the cost of
a dynamic rank (docs/PERFORMANCE.md). Because each prefix ``W[:r]`` of a row-major ``W`` is one
contiguous block, we can instead remove those ``Slice`` nodes, make their outputs graph inputs,
and feed numpy views of the full factors: no copy, and one set of weights serves every rank.

The file on disk is unchanged (plain ONNX Runtime callers and TensorRT use it as exported); this
transformation happens in memory when a session is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..external_data import check_external_data, confined_path


@dataclass
class RankView:
    """One factor served by prefix views: graph input ``name`` gets ``weight[:min(rank, rows)]``."""

    name: str
    weight: np.ndarray

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


def dependents(graph: onnx.GraphProto, source: str) -> set[str]:
    """Every value computed (transitively) from the graph input ``source`` (nodes are in
    topological order, as ONNX requires)."""
    reached = {source}
    for node in graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def small_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the graph's small constants (initializers and Constant nodes of <= 8 elements)."""
    values = {}
    for init in graph.initializer:
        if int(np.prod(init.dims)) <= 8 and init.data_location != onnx.TensorProto.EXTERNAL:
            values[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def rank_slices(model: onnx.ModelProto, rank_input: str = "rank") -> list[onnx.NodeProto]:
    """``Slice`` nodes that cut a stored weight along axis 0 from 0 to a ``rank``-derived end."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    constants = small_constants(graph)
    rank_dependent = dependents(graph, rank_input)

    def equals(name: str, expected: int) -> bool:
        value = constants.get(name)
        return value is not None and value.size == 1 and int(value.reshape(-1)[0]) == expected

    found = []
    for node in graph.node:
        if node.op_type != "Slice" or node.input[0] not in initializers or len(node.input) < 4:
            continue
        unit_steps = len(node.input) < 5 or not node.input[4] or equals(node.input[4], 1)
        if (equals(node.input[1], 0) and equals(node.input[3], 0) and unit_steps
                and node.input[2] in rank_dependent):
            found.append(node)
    return found


def prune_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing uses (the rank arithmetic that fed the removed slices)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)


def factor_array(init: onnx.TensorProto, model_dir: Path | None) -> np.ndarray:
    """The weight as a numpy array: memory-mapped read-only from the external data file when the
    export stored it there (no copy, pages shared with the OS cache), else decoded from the graph."""
    if init.data_location == onnx.TensorProto.EXTERNAL and model_dir is not None:
        info = {entry.key: entry.value for entry in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        return np.memmap(confined_path(model_dir, info["location"], f"tensor {init.name!r}"), dtype=dtype, mode="r",
                         offset=int(info.get("offset", 0)), shape=tuple(init.dims))
    return numpy_helper.to_array(init, base_dir=str(model_dir or ""))


def to_view_graph(model: onnx.ModelProto, model_dir: str | Path | None = None,
                  rank_input: str = "rank") -> tuple[bytes, list[RankView]]:
    """Rewrite ``model`` (in place) so rank-sliced weights become inputs; returns the serialized
    graph and the factors whose prefix views feed those inputs. ``model_dir`` resolves external
    data (load the model with ``load_external_data=False`` to keep weights out of memory).
    Raises ``ValueError`` when the graph has no rank slices (e.g. a mask-mode export)."""
    graph = model.graph
    slices = rank_slices(model, rank_input)
    if not slices:
        raise ValueError("the graph has no rank-sliced weights (is it a mask-mode export?); "
                         "weight views need a slice-mode export")
    model_dir = Path(model_dir) if model_dir is not None else None
    if model_dir is not None:
        check_external_data(model, model_dir)  # before any weight is mapped
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    views, removed_nodes, removed_inits = [], set(), set()
    for node in slices:
        source = initializers[node.input[0]]
        weight = factor_array(source, model_dir)
        views.append(RankView(node.output[0], weight))
        info = onnx.helper.make_tensor_value_info(
            node.output[0], source.data_type, [f"{node.output[0]}_rows", *weight.shape[1:]])
        graph.input.append(info)
        removed_nodes.add(id(node))
        if consumers[source.name] == 1:
            removed_inits.add(source.name)
    kept = [n for n in graph.node if id(n) not in removed_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    remaining = [init for init in graph.initializer if init.name not in removed_inits]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    prune_dead_nodes(graph)
    return model.SerializeToString(), views


def views_at(views: list[RankView], rank: int) -> dict[str, np.ndarray]:
    """Feeds for ``rank``: each factor's first ``min(rank, R_l)`` rows, as views (no copy)."""
    return {view.name: view.weight[: min(rank, view.rows)] for view in views}
