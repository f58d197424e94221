"""Materialised levels: one rank served by a session whose weights are constants, built beside serving.

Weight views (``deploy.ort.views``) serve every rank from one session, but ONNX Runtime cannot
pre-pack a weight that arrives as an input, and above a layer's break-even rank the two factors
cost more than the dense weight they replace: ``r (d_in + d_out) > d_in d_out``. A level fixes both
for one rank ``r``. Each factorised layer becomes

- below its break-even rank: its prefixes ``A[:r]`` and ``B[:r]`` as constant initializers;
- at or above it: one ``MatMul`` with the product ``A[:r].T @ B[:r]`` (``d_in x d_out``), computed
  once, so the layer costs what the dense layer costs and never more.

In an int8 export (``nsn-export --weights int8``) the level stays int8: each layer's ``MatMul``
becomes ONNX Runtime's ``MatMulNBits`` (8 bits) on int8 constants.

The constants reach ONNX Runtime as in-memory external initializers, so it folds and pre-packs them
as it would a graph exported for that rank alone. A level takes seconds to build (a thread beside
the running session), and holds its weights in ONNX Runtime's packed form: ``Levels`` keeps one at a
time, and two only while a new one is being built.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..int8 import dequantize_rows, quantize_rows
from .views import RankView

log = logging.getLogger("nsn.levels")

# The location recorded on a level's constants: they are handed to ONNX Runtime from memory
# (``add_external_initializers``), never read from a file of this name.
IN_MEMORY = "nsn-level-in-memory"


@dataclass(frozen=True)
class Factor:
    """A rank-sliced factor as a layer reads it: its stored rows (``rank x d``), fp32, or int8 with
    one scale per row dequantised by a ``DequantizeLinear`` node (an int8 export)."""

    view: RankView
    scale: RankView | None = None
    dequantize: str | None = None  # the DequantizeLinear node's name

    @property
    def rows(self) -> int:
        return self.view.rows

    def at(self, rank: int) -> np.ndarray:
        """The first ``rank`` rows in fp32."""
        rows = self.view.weight[:min(rank, self.rows)]
        return dequantize_rows(rows, self.scale.weight[:len(rows)]) if self.scale is not None else rows


@dataclass(frozen=True)
class FactorPair:
    """One factorised layer of a view graph: ``y = (x @ Transpose(A)) @ B`` with ``A`` (rank x d_in)
    and ``B`` (rank x d_out) fed as prefix views; the node names say what a product replaces."""

    a: Factor
    b: Factor
    transpose: str  # Transpose(A)
    first: str  # x @ A^T
    second: str  # (x @ A^T) @ B

    @property
    def d_in(self) -> int:
        return self.a.view.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.b.view.weight.shape[1]

    @property
    def int8(self) -> bool:
        return self.a.scale is not None and self.b.scale is not None

    def uses_product(self, rank: int) -> bool:
        """Whether the layer's factors at ``rank`` cost at least its dense weight (then the product runs)."""
        return min(rank, self.a.rows) * (self.d_in + self.d_out) >= self.d_in * self.d_out

    def flops_saved(self, ranks: np.ndarray) -> np.ndarray:
        """Multiply-add FLOPs per token the product saves at each of ``ranks`` (0 below the break-even
        rank)."""
        factors = 2 * np.minimum(ranks, self.a.rows) * (self.d_in + self.d_out)
        return np.maximum(0, factors - 2 * self.d_in * self.d_out)


def factor_pairs(graph: onnx.GraphProto, views: list[RankView]) -> list[FactorPair]:
    """The layers of a view graph whose two factors are recognisably one layer (``Transpose`` of the
    ``A`` factor into a ``MatMul`` whose only consumer is a ``MatMul`` with a ``B`` factor; in an
    int8 export each factor is a ``DequantizeLinear`` of two views, its rows and their scales).
    Views in no pair stay as they are in every level."""
    by_name = {view.name: view for view in views}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    factors: dict[str, Factor] = {}  # by the value the layer reads
    for view in views:
        dequantize = only(view.name, "DequantizeLinear")
        if dequantize is None:
            factors[view.name] = Factor(view)
        elif (dequantize.input[0] == view.name and len(dequantize.input) == 2 and dequantize.input[1] in by_name
              and all(a.name != "axis" or a.i == 0 for a in dequantize.attribute)):
            factors[dequantize.output[0]] = Factor(view, by_name[dequantize.input[1]], dequantize.name)
    pairs = []
    for read, a in factors.items():
        transpose = only(read, "Transpose")
        first = transpose and only(transpose.output[0], "MatMul")
        second = first and first.input[1] == transpose.output[0] and only(first.output[0], "MatMul")
        if not second or second.input[0] != first.output[0] or second.input[1] not in factors:
            continue
        b = factors[second.input[1]]
        perm = next((list(x.ints) for x in transpose.attribute if x.name == "perm"), [1, 0])
        if (perm == [1, 0] and a.view.weight.ndim == b.view.weight.ndim == 2 and a.rows == b.rows
                and (a.scale is None) == (b.scale is None)):
            pairs.append(FactorPair(a, b, transpose.name, first.name, second.name))
    return pairs


# A decoder level's extra input: the logits of how many last positions a call wants. A prompt
# chunk needs only the last one; the LM head over every position of a 256-token chunk is a fifth of
# SmolLM2's prefill (49,152 x 576 per position) and 50 MB of logits to copy out.
LOGITS_POSITIONS = "nsn.logits_positions"


@dataclass
class LevelGraph:
    """A view graph rewritten for one rank: the serialized graph and its constants, by name."""

    rank: int
    graph: bytes
    constants: dict[str, np.ndarray] = field(repr=False)
    products: int  # layers that run their product
    logits_positions: bool = False  # the graph reads LOGITS_POSITIONS

    @property
    def constant_bytes(self) -> int:
        return sum(array.nbytes for array in self.constants.values())


def level_graph(view_model: onnx.ModelProto, views: list[RankView], pairs: list[FactorPair],
                rank: int) -> LevelGraph:
    """``view_model`` (not modified) with every view a constant at ``rank``: a product where the
    layer's factors cost at least its dense weight, the factors' prefixes elsewhere. In an int8
    export each of the layer's ``MatMul`` nodes becomes a ``MatMulNBits`` on int8 constants with a
    scale per output column (``nbits_blocks``)."""
    model = copy.deepcopy(view_model)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    constants: dict[str, np.ndarray] = {}
    dropped: set[str] = set()
    paired: set[str] = set()
    products = 0

    def int8_matmul(node: onnx.NodeProto, name: str, q_kn: np.ndarray, scale_n: np.ndarray) -> None:
        """Turn ``node`` (a ``MatMul`` of its first input by a ``K x N`` weight) into ONNX Runtime's int8
        kernel on ``q_kn`` with a scale per column."""
        packed, scales = nbits_blocks(q_kn, scale_n)
        constants[f"{name}.int8"], constants[f"{name}.scale"] = packed, scales
        k, n = q_kn.shape
        node.op_type, node.domain = "MatMulNBits", "com.microsoft"
        node.input[1:] = [f"{name}.int8", f"{name}.scale"]
        node.attribute.extend([onnx.helper.make_attribute(key, value) for key, value in dict(
            K=k, N=n, bits=8, block_size=NBITS_BLOCK, accuracy_level=4).items()])

    for pair in pairs:
        paired.update(v.name for f in (pair.a, pair.b) for v in (f.view, f.scale) if v is not None)
        dropped.update(f.dequantize for f in (pair.a, pair.b) if f.dequantize)
        rows = min(rank, pair.a.rows)
        first, second = nodes[pair.first], nodes[pair.second]
        if pair.uses_product(rank):
            name = f"{pair.a.view.name}.product"
            product = pair.a.at(rank).T @ pair.b.at(rank)  # d_in x d_out
            second.input[0], second.input[1] = first.input[0], name
            if pair.int8:
                q, scale = quantize_rows(product.T)  # a scale per output column
                int8_matmul(second, name, q.T, scale)
            else:
                constants[name] = np.ascontiguousarray(product, np.float32)
            dropped.update((pair.transpose, pair.first))
            products += 1
        elif pair.int8:
            # (x @ A_q^T diag(a_s)) @ diag(b_s) B_q: both scales belong to the rank components, the
            # first product's columns, so they fold into its per-column scale and B_q runs unscaled.
            scale = pair.a.scale.weight[:rows] * pair.b.scale.weight[:rows]
            int8_matmul(first, f"{pair.a.view.name}.level", pair.a.view.weight[:rows].T, scale)
            int8_matmul(second, f"{pair.b.view.name}.level", pair.b.view.weight[:rows], np.ones(pair.d_out, np.float32))
            dropped.add(pair.transpose)
        else:
            constants[pair.a.view.name] = np.ascontiguousarray(pair.a.view.weight[:rows])
            constants[pair.b.view.name] = np.ascontiguousarray(pair.b.view.weight[:rows])
    for view in views:
        if view.name not in paired:
            constants[view.name] = np.ascontiguousarray(view.weight[:min(rank, view.rows)])
    if any(pair.int8 for pair in pairs) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    kept = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    view_names = {view.name for view in views}
    inputs = [i for i in graph.input if i.name not in view_names and (i.name != "rank" or "rank" in used)]
    del graph.input[:]
    graph.input.extend(inputs)
    for name in [name for name in constants if name not in used]:
        del constants[name]  # a dropped layer's views
    for name, array in constants.items():
        tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", IN_MEMORY
        graph.initializer.append(tensor)
    sliced = logits_of_last_positions(graph)
    return LevelGraph(rank, model.SerializeToString(), constants, products, sliced)


def logits_of_last_positions(graph: onnx.GraphProto) -> bool:
    """Give a decoder graph the ``LOGITS_POSITIONS`` input: its LM head (the ``MatMul`` that writes
    ``logits``) reads only that many last positions of the final hidden states (none: no logits,
    for a prompt chunk that is not the last). False (graph unchanged) where ``logits`` comes from
    anything else."""
    at = next((index for index, node in enumerate(graph.node) if "logits" in node.output), None)
    if at is None or graph.node[at].op_type != "MatMul":
        return False
    head = graph.node[at]
    hidden, length, start, end, axis = (f"{LOGITS_POSITIONS}.{part}" for part in ("hidden", "length", "start", "end",
                                                                                   "axis"))
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), end),
                              onnx.numpy_helper.from_array(np.array([1]), axis)])
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_POSITIONS, onnx.TensorProto.INT64, [1]))
    graph.node.insert(at, onnx.helper.make_node("Slice", [head.input[0], start, end, axis], [hidden],
                                                name=f"{LOGITS_POSITIONS}.Slice"))
    # start = positions - wanted: the positions are the shape's entry at ``axis`` ([1]), by Shape then
    # Gather (Shape's own start/end attributes need opset 15; exports may be 14)
    shape = f"{LOGITS_POSITIONS}.shape"
    graph.node.insert(at, onnx.helper.make_node("Sub", [length, LOGITS_POSITIONS], [start],
                                                name=f"{LOGITS_POSITIONS}.Sub"))
    graph.node.insert(at, onnx.helper.make_node("Gather", [shape, axis], [length], name=f"{LOGITS_POSITIONS}.Gather"))
    graph.node.insert(at, onnx.helper.make_node("Shape", [head.input[0]], [shape], name=f"{LOGITS_POSITIONS}.Shape"))
    head.input[0] = hidden
    return True


# MatMulNBits computes in int8 (accuracy level 4), rounding its activations with one scale per block
# of this many inputs. Measured on SmolLM2's int8 export (greedy agreement with the exact int8
# arithmetic over 200 tokens; decode ms): rank 127, blocks of 16 / 32 / 64 / 128: 0.94 / 0.91 / 0.92 /
# 0.89 (12.3 / 13.1 / 12.9 / 11.6 ms); rank 576: 0.96 / 0.96 / 0.94 / 0.95. Smaller is more exact
# and barely slower.
NBITS_BLOCK = 32


def nbits_blocks(q_kn: np.ndarray, scale_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An int8 ``K x N`` weight with a scale per column in ``MatMulNBits``' 8-bit layout: ``N`` rows of
    ``ceil(K / NBITS_BLOCK)`` blocks of unsigned values around 128, the column's scale per block."""
    k, n = q_kn.shape
    blocks = -(-k // NBITS_BLOCK)
    packed = np.full((n, blocks * NBITS_BLOCK), 128, np.uint8)
    packed[:, :k] = (q_kn.T.astype(np.int16) + 128).astype(np.uint8)
    scales = np.repeat(np.asarray(scale_n, np.float32)[:, None], blocks, axis=1)
    return packed.reshape(n, blocks, NBITS_BLOCK), np.ascontiguousarray(scales.reshape(-1))


@dataclass
class Level:
    """A built level: the session that runs ``rank`` with constants, and what it holds."""

    rank: int
    session: object  # an onnxruntime.InferenceSession
    feeds: dict  # inputs every call gets (``rank`` when the level graph still reads it)
    products: int
    constant_bytes: int
    build_s: float
    keep: list = field(default_factory=list, repr=False)  # the OrtValues the session reads
    logits_positions: bool = False  # its graph reads LOGITS_POSITIONS


class Levels:
    """One materialised level at a time, built on a thread beside the running session.

    ``prepare(rank)`` asks for a level (returns at once; ``wait=True`` blocks until it is ready);
    ``ready(rank)`` is the level for ``rank`` if it is built, else ``None`` (the caller runs its weight
    views meanwhile). When several ranks are asked for while one builds, only the latest is built next.
    A build that fails is logged and leaves the views serving; ``error`` says why."""

    def __init__(self, build: Callable[[int], Level]):
        self._build = build
        self.current: Level | None = None
        self.wanted: int | None = None
        self.building: int | None = None
        self.error: str | None = None
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None

    def ready(self, rank: int) -> Level | None:
        level = self.current
        return level if level is not None and level.rank == rank else None

    def prepare(self, rank: int, wait: bool = False) -> Level | None:
        with self._lock:
            if self.ready(rank) is None:
                self.wanted = rank
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="nsn-levels", daemon=True)
                    self._worker.start()
            while wait and self.ready(rank) is None and (self.wanted == rank or self.building == rank):
                self._lock.wait()
        return self.ready(rank)

    def state(self, rank: int) -> str:
        """``"ready"``, ``"building"`` or ``"views"`` (no level for ``rank`` is built or wanted)."""
        if self.ready(rank) is not None:
            return "ready"
        return "building" if rank in (self.wanted, self.building) else "views"

    def _work(self) -> None:
        while True:
            with self._lock:
                rank, self.wanted = self.wanted, None
                if rank is None or self.ready(rank) is not None:
                    self._worker = None
                    self._lock.notify_all()
                    return
                self.building = rank
            try:
                level = self._build(rank)
                error = None
            except Exception as failure:  # serving goes on with the weight views
                level, error = None, f"{type(failure).__name__}: {failure}"
                log.warning("could not build the level for rank %d (%s); serving it from weight views", rank, error)
            with self._lock:
                if level is not None:
                    self.current = level  # the previous level is freed once no call still runs it
                self.error, self.building = error, None
                self._lock.notify_all()
