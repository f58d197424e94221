"""Materialised levels: one rank served by a session whose weights are constants, built beside serving.

Weight views (``deploy.ort.views``) serve every rank from one session, but ONNX Runtime cannot
pre-pack a weight that arrives as an input, and above a layer's break-even rank the two factors
cost more than the dense weight they replace: ``r (d_in + d_out) > d_in d_out``. A level fixes both
for one rank ``r``. Each factorised layer becomes

- below its break-even rank: its prefixes ``A[:r]`` and ``B[:r]`` as constant initializers;
- at or above it: one ``MatMul`` with the product ``A[:r].T @ B[:r]`` (``d_in x d_out``), computed
  once, so the layer costs what the dense layer costs and never more.

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

from .views import RankView

log = logging.getLogger("nsn.levels")

# The location recorded on a level's constants: they are handed to ONNX Runtime from memory
# (``add_external_initializers``), never read from a file of this name.
IN_MEMORY = "nsn-level-in-memory"


@dataclass(frozen=True)
class FactorPair:
    """One factorised layer of a view graph: ``y = (x @ Transpose(A)) @ B`` with ``A`` (rank x d_in)
    and ``B`` (rank x d_out) fed as prefix views; the node names say what a product replaces."""

    a: RankView
    b: RankView
    transpose: str  # Transpose(A)
    first: str  # x @ A^T
    second: str  # (x @ A^T) @ B

    @property
    def d_in(self) -> int:
        return self.a.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.b.weight.shape[1]

    def uses_product(self, rank: int) -> bool:
        """Whether the layer's factors at ``rank`` cost at least its dense weight (then the product runs)."""
        return min(rank, self.a.rows) * (self.d_in + self.d_out) >= self.d_in * self.d_out

    def flops_saved(self, rank: int) -> int:
        """Multiply-add FLOPs per token the product saves at ``rank`` (0 below the break-even rank)."""
        factors = 2 * min(rank, self.a.rows) * (self.d_in + self.d_out)
        return max(0, factors - 2 * self.d_in * self.d_out)


def factor_pairs(graph: onnx.GraphProto, views: list[RankView]) -> list[FactorPair]:
    """The layers of a view graph whose two factors are recognisably one layer (``Transpose`` of the
    ``A`` view into a ``MatMul`` whose only consumer is a ``MatMul`` with a ``B`` view). Views in no
    pair stay factors in every level."""
    by_name = {view.name: view for view in views}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    pairs = []
    for view in views:
        transpose = only(view.name, "Transpose")
        first = transpose and only(transpose.output[0], "MatMul")
        second = first and first.input[1] == transpose.output[0] and only(first.output[0], "MatMul")
        if not second or second.input[0] != first.output[0] or second.input[1] not in by_name:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        b = by_name[second.input[1]]
        if perm == [1, 0] and view.weight.ndim == b.weight.ndim == 2 and view.rows == b.rows:
            pairs.append(FactorPair(view, b, transpose.name, first.name, second.name))
    return pairs


@dataclass
class LevelGraph:
    """A view graph rewritten for one rank: the serialized graph and its constants, by name."""

    rank: int
    graph: bytes
    constants: dict[str, np.ndarray] = field(repr=False)
    products: int  # layers that run their product
    factor_layers: int  # layers (or lone views) that run their factors

    @property
    def constant_bytes(self) -> int:
        return sum(array.nbytes for array in self.constants.values())


def level_graph(view_model: onnx.ModelProto, views: list[RankView], pairs: list[FactorPair],
                rank: int) -> LevelGraph:
    """``view_model`` (not modified) with every view a constant at ``rank``: a product where the
    layer's factors cost at least its dense weight, the factors' prefixes elsewhere."""
    model = copy.deepcopy(view_model)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    constants: dict[str, np.ndarray] = {}
    dropped: set[str] = set()
    paired: set[str] = set()
    products = 0
    for pair in pairs:
        paired.update((pair.a.name, pair.b.name))
        rows = min(rank, pair.a.rows)
        if pair.uses_product(rank):
            name = f"{pair.a.name}.product"
            constants[name] = np.ascontiguousarray(pair.a.weight[:rows].T @ pair.b.weight[:rows], np.float32)
            second = nodes[pair.second]
            second.input[0], second.input[1] = nodes[pair.first].input[0], name
            dropped.update((pair.transpose, pair.first))
            products += 1
        else:
            constants[pair.a.name] = np.ascontiguousarray(pair.a.weight[:rows])
            constants[pair.b.name] = np.ascontiguousarray(pair.b.weight[:rows])
    for view in views:
        if view.name not in paired:
            constants[view.name] = np.ascontiguousarray(view.weight[:min(rank, view.rows)])
    kept = [node for node in graph.node if node.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    view_names = {view.name for view in views}
    inputs = [i for i in graph.input if i.name not in view_names and (i.name != "rank" or "rank" in used)]
    del graph.input[:]
    graph.input.extend(inputs)
    for name, array in constants.items():
        tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", IN_MEMORY
        graph.initializer.append(tensor)
    return LevelGraph(rank, model.SerializeToString(), constants, products,
                      len(pairs) - products + len(views) - len(paired))


@dataclass
class Level:
    """A built level: the session that runs ``rank`` with constants, and what it holds."""

    rank: int
    session: object  # an onnxruntime.InferenceSession
    feeds: dict  # inputs every call gets (``rank`` when the level graph still reads it)
    products: int
    factor_layers: int
    constant_bytes: int
    build_s: float
    keep: list = field(default_factory=list, repr=False)  # the OrtValues the session reads


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
