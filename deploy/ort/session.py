"""``NSNSession``: one exported NSN graph in ONNX Runtime, serving every rank.

Torch-free: it needs only numpy, onnxruntime and tokenizers, so it runs on a device image.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from ..extras import check_single_onnxruntime, import_extra
from ..external_data import load_graph, model_file
from ..metadata import NSNModelInfo, validate_rank
from ..runtime import NSNRuntime, decoder_feeds, warn_if_not_finite
from .levels import LOGITS_POSITIONS, Level, Levels, factor_pairs, level_graph
from .views import RankView, to_view_graph, views_at

ort = import_extra("onnxruntime", "cpu", "ONNX Runtime (NSNSession, nsn-run, nsn-calibrate)")

def open_session(model_path: Path, options, providers: list[str], weight_views: bool | None = False):
    """An ONNX Runtime session for the export, with weight views when asked (or by default on the
    CPU for slice-mode graphs). Every weight location is checked first (``load_graph``): nothing
    outside the model directory is read. Returns ``(session, views, view graph or None)``."""
    proto = load_graph(model_path)
    views: list[RankView] = []
    view_model = None
    source: str | bytes = str(model_path)
    if weight_views or (weight_views is None and providers[0] == "CPUExecutionProvider"):
        mode = next((p.value for p in proto.metadata_props if p.key == "nsn.rank_mode"), None)
        if mode == "slice":
            source, views = to_view_graph(proto, model_path.parent)
            view_model = proto
            # The rewritten graph is loaded from memory: point it at the external weight file.
            external_weights_folder(options, model_path.parent)
        elif weight_views:
            raise WeightViewsError(f"{model_path}: weight views need a slice-mode export, this one is "
                                   f"{mode!r}; re-export with --rank-mode slice or pass weight_views=False")
    return load_session(model_path, source, options, providers), views, view_model


def load_session(model_path: Path, source: str | bytes, options, providers: list[str]):
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as error:  # onnxruntime's load failures are of several pybind11 types
        raise ValueError(f"{model_path}: ONNX Runtime cannot load the exported model ({type(error).__name__}: "
                         f"{error}); re-export it with nsn-export, keeping model.onnx_data next to it") from None


def external_weights_folder(options, folder: Path) -> None:
    """A graph loaded from memory finds its external weight file in ``folder``."""
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(folder).resolve()))


def session_options(intra_op_threads: int | None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return options


class WeightViewsError(ValueError):
    """Weight views were requested for a graph that does not slice its weights by rank."""


def input_shapes(session) -> dict[str, list]:
    """Each graph input's declared shape (symbolic dimensions as strings), by name."""
    return {i.name: i.shape for i in session.get_inputs()}


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu is installed (it falls back to CPU without a GPU), else CPU."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return preferred + ["CPUExecutionProvider"]


class NSNSession(NSNRuntime):
    """Load ``model.onnx`` (a directory or the file), read its NSN metadata, run it at ``rank``.

    ``rank`` is validated: an int in ``[1, info.max_rank]``. Changing it is instant (it selects the
    value fed to ``rank`` and the weight views) and may happen between generation steps.

    ``weight_views`` (default: on for slice-mode graphs on the CPU) serves the factors as zero-copy
    prefix views instead of letting the graph slice them on every run (see ``deploy.ort.views``);
    outputs are the same, decoding is 1.5-4x faster (docs/PERFORMANCE.md). Off, the graph runs as
    exported. On a GPU provider leave it off: host views would be copied to the device every call.

    ``levels`` (default: on with weight views) materialises the rank the governor sets: ``set_rank``
    (or ``prepare``) builds, on a thread, a session for that rank whose weights are constants, with
    each layer's product ``B[:, :r] @ A[:r]`` wherever the factors would cost more than the dense
    weight (see ``deploy.ort.levels``). Calls at that rank use it once it is ready; any other rank
    runs on the views meanwhile. Outputs agree with the views' to rounding.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_threads: int | None = None,
                 rank: int | None = None, weight_views: bool | None = None, levels: bool | None = None):
        check_single_onnxruntime()
        self.model_path = model_file(path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no exported model here; run nsn-export first")
        self.model_dir = self.model_path.parent
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 0):
            raise ValueError(f"intra_op_threads must be an integer >= 0 (0 or None: ONNX Runtime's default), got "
                             f"{intra_op_threads!r}")
        self.intra_op_threads = intra_op_threads
        providers = providers or default_providers()
        self._view_cache: dict[int, dict[str, ort.OrtValue]] = {}
        self.session, self.views, view_model = open_session(self.model_path, session_options(intra_op_threads),
                                                            providers, weight_views)
        if levels and not self.views:
            raise WeightViewsError(f"{self.model_path}: levels are built from weight views, which this session does "
                                   f"not use; pass levels=False, or weight_views=True on the CPU with a slice-mode export")
        self.view_model = view_model  # the graph the views feed (None without views): levels are built from it
        self.pairs = factor_pairs(view_model.graph, self.views) if view_model is not None else []
        self.levels = Levels(self._build_level) if self.views and levels is not False else None
        # a speculative draft rank's own level, beside the governed one (its factors are small)
        self.draft_levels = Levels(self._build_level) if self.levels is not None else None
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = NSNModelInfo.from_props(props, source=str(self.model_path))
        view_names = {view.name for view in self.views}
        self.input_shapes = {name: shape for name, shape in input_shapes(self.session).items()
                             if name not in view_names}
        self.input_names = list(self.input_shapes)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.load_text_files(self.model_dir)
        hidden = self.session.get_outputs()[0].shape[-1]
        self.hidden_size = hidden if isinstance(hidden, int) else 0
        self._rank = self.info.max_rank
        self.last_level: Level | None = None  # the level the latest call ran on (None: the views or the graph)
        if rank is not None:
            self.rank = rank

    # ---- materialised levels ----------------------------------------------------------------
    def prepare(self, rank: int, wait: bool = False) -> Level | None:
        """Ask for ``rank``'s level (no-op without levels); ``wait`` blocks until it is built."""
        rank = validate_rank(rank, self.info.max_rank)
        return self.levels.prepare(rank, wait) if self.levels is not None else None

    def prepare_draft(self, rank: int, wait: bool = False) -> Level | None:
        """Ask for a speculative draft rank's level, kept beside the governed rank's (no-op without levels)."""
        rank = validate_rank(rank, self.info.max_rank)
        return self.draft_levels.prepare(rank, wait) if self.draft_levels is not None else None

    def level_flops(self, rank: int, context_length: int = 0) -> int:
        """FLOPs per token as this session runs ``rank`` once its level is built: the products save
        what the factors cost above each layer's break-even rank."""
        flops = self.info.flops(rank, context_length)
        return flops - self._flops_saved[rank - 1] if self.levels is not None else flops

    @functools.cached_property
    def _flops_saved(self) -> list[int]:
        """What the products save at each rank (index ``rank - 1``): computed once, because the
        governor and the default ceiling ask for every rank."""
        ranks = np.arange(1, self.info.max_rank + 1, dtype=np.int64)
        return sum((pair.flops_saved(ranks) for pair in self.pairs), np.zeros_like(ranks)).tolist()

    def level_state(self, rank: int | None = None) -> dict:
        """What runs ``rank`` (default: the current one): ``"level"`` (its constants, ``products`` of
        the ``layers`` as one dense product), ``"building"`` (views until it is ready), ``"views"``."""
        rank = self._rank if rank is None else rank
        products = sum(pair.uses_product(rank) for pair in self.pairs)
        state = {"rank": rank, "layers": len(self.pairs), "products": products}
        if self.levels is None:
            return {**state, "runs_on": "views" if self.views else "graph", "levels": "off"}
        runs_on = {"ready": "level", "building": "views (level building)", "views": "views"}[self.levels.state(rank)]
        built = self.levels.ready(rank)
        return {**state, "runs_on": runs_on, "levels": "on",
                **({"level_mib": round(built.constant_bytes / 2**20, 1), "build_s": round(built.build_s, 2)}
                   if built else {}), **({"level_error": self.levels.error} if self.levels.error else {})}

    def _build_level(self, rank: int) -> Level:
        start = time.perf_counter()
        graph = level_graph(self.view_model, self.views, self.pairs, rank)
        options = session_options(self.intra_op_threads)
        external_weights_folder(options, self.model_dir)
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in graph.constants.values()]
        options.add_external_initializers(list(graph.constants), values)
        session = load_session(self.model_path, graph.graph, options, self.session.get_providers())
        inputs = {i.name for i in session.get_inputs()}
        feeds = {"rank": ort.OrtValue.ortvalue_from_numpy(np.array(rank, np.int64))} if "rank" in inputs else {}
        return Level(rank, session, feeds, graph.products, graph.constant_bytes,
                     time.perf_counter() - start, keep=values, logits_positions=graph.logits_positions)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def weight_views(self) -> bool:
        return bool(self.views)

    def rank_feeds(self, rank: int) -> dict[str, ort.OrtValue]:
        """``rank`` plus, with weight views, every factor's prefix view, as ``OrtValue``s that
        wrap the factors' memory without copying (built once per rank, then cached)."""
        feeds = self._view_cache.get(rank)
        if feeds is None:
            arrays = {"rank": np.array(rank, np.int64), **views_at(self.views, rank)}
            feeds = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
            self._view_cache[rank] = feeds
        return feeds

    def run_values(self, feeds: dict, outputs: list[str] | None = None, rank: int | None = None,
                   last_logits: int | None = None) -> list[ort.OrtValue]:
        """Run at the current rank (or ``rank``, a speculative draft's); ``feeds`` are numpy arrays or
        ``OrtValue``s (passed through, so a KV cache returned by one call feeds the next without a copy).
        ``last_logits``: a decoder's logits are wanted for that many last positions only (a level
        computes just those; the views compute all of them)."""
        values = {name: value if isinstance(value, ort.OrtValue)
                  else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
        if rank is None:
            rank = self.last_rank = self._rank  # read once: a governor thread may change it meanwhile
        level = self.last_level = (self.levels.ready(rank) or self.draft_levels.ready(rank)
                                   if self.levels is not None else None)
        if level is not None:
            if level.logits_positions:
                wanted = values["input_ids"].shape()[1] if last_logits is None else last_logits
                values[LOGITS_POSITIONS] = ort.OrtValue.ortvalue_from_numpy(np.array([wanted], np.int64))
            return level.session.run_with_ort_values(outputs or self.output_names, {**values, **level.feeds})
        return self.session.run_with_ort_values(outputs or self.output_names, {**values, **self.rank_feeds(rank)})

    def run_raw(self, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run at the current rank; ``feeds`` are numpy arrays of the standard inputs."""
        return [result.numpy() for result in self.run_values(feeds, outputs)]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph at the current rank; ``feeds`` holds the task's standard inputs."""
        return dict(zip(outputs or self.output_names, self.run_raw(feeds, outputs)))

    def decode_step(self, token_ids: np.ndarray, cache: list | None, past_length: int, logits: bool = True,
                    rank: int | None = None):
        """One decoder call (``cache`` None at prefill) at the current rank or ``rank``: returns
        ``(logits of the last position, new cache)``; the cache stays as ONNX Runtime values for the
        next call. ``logits=False`` (a prompt chunk before the last): None for the logits, which a
        level does not compute."""
        return self._decoded(decoder_feeds(self.input_shapes, token_ids, cache, past_length), rank, wanted=logits)

    def _decoded(self, feeds: dict, rank: int | None = None, every_position: bool = False, wanted: bool = True):
        """One decoder call: the logits of the last position of each row (or of every position of the
        one row), checked to be finite, and the new cache as ONNX Runtime values."""
        values = self.run_values(feeds, rank=rank, last_logits=None if every_position else 1 if wanted else 0)
        if not wanted:
            return None, values[1:]
        logits = values[0].numpy()
        logits = logits[0] if every_position else logits[:, -1]
        warn_if_not_finite(logits, "logits")
        return logits, values[1:]

    @property
    def supports_batching(self) -> bool:
        return "position_ids" in self.input_shapes

    def decode_batch(self, token_ids: np.ndarray, cache, attention_mask: np.ndarray, position_ids: np.ndarray):
        return self._decoded(decoder_feeds(self.input_shapes, token_ids, cache, attention_mask.shape[1] - 1,
                                           attention_mask, position_ids))

    def host_cache(self, cache) -> list[np.ndarray]:
        return [value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value) for value in cache]

    def level_ready(self, rank: int) -> bool:
        return self.levels is not None and self.levels.ready(rank) is not None

    def prompt_reader(self) -> "NSNSession | None":
        """A second session of the model on one thread, with its own levels, to read a long prompt
        at the same time as the decode steps of this one (it doubles the levels' memory). None on
        a GPU provider, without levels, or on fewer than two threads."""
        threads = self.intra_op_threads or os.cpu_count() or 1
        if self.levels is None or self.providers[0] != "CPUExecutionProvider" or threads < 2:
            return None
        return NSNSession(self.model_dir, providers=self.providers, intra_op_threads=1, weight_views=True)

    def write_row(self, cache, index: int, width: int, own, length: int) -> bool:
        """Written through numpy into the cache's own memory: a layout built here (numpy), or ONNX
        Runtime's outputs where ``OrtValue.numpy()`` views them (it does in the versions tested;
        where it copies, False, and the batch is laid out again)."""
        arrays = self.host_cache(cache)
        if not all((isinstance(value, np.ndarray) or array.ctypes.data == value.data_ptr()) and array.flags.writeable
                   for value, array in zip(cache, arrays)):
            return False
        for array, row in zip(arrays, self.host_cache(own)):
            array[index, :, width - length:] = row[0]
        return True

    supports_speculation = True

    def decode_positions(self, token_ids: np.ndarray, cache: list | None, past_length: int, rank: int | None = None):
        """One decoder call on one sequence: ``(logits of every new position, new cache)``, at the
        current rank or ``rank``."""
        return self._decoded(decoder_feeds(self.input_shapes, token_ids, cache, past_length), rank, every_position=True)

    @staticmethod
    def truncate_cache(cache: list, length: int) -> list:
        """The KV cache cut back to its first ``length`` positions (a rejected draft's entries dropped)."""
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[:, :, :length])) for value in cache]
