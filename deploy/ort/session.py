"""``NSNSession``: one exported NSN graph in ONNX Runtime, serving every rank.

Torch-free: it needs only numpy, onnxruntime and tokenizers, so it runs on a device image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..extras import check_single_onnxruntime, import_extra
from ..external_data import load_graph, model_file
from ..metadata import NSNModelInfo
from ..runtime import NSNRuntime, decoder_feeds, warn_if_not_finite
from .views import RankView, to_view_graph, views_at

ort = import_extra("onnxruntime", "cpu", "ONNX Runtime (NSNSession, nsn-run, nsn-calibrate)")

def open_session(model_path: Path, options, providers: list[str], weight_views: bool | None = False):
    """An ONNX Runtime session for the export, with weight views when asked (or by default on the
    CPU for slice-mode graphs). Every weight location is checked first (``load_graph``): nothing
    outside the model directory is read. Returns ``(session, views)``."""
    proto = load_graph(model_path)
    views: list[RankView] = []
    source: str | bytes = str(model_path)
    if weight_views or (weight_views is None and providers[0] == "CPUExecutionProvider"):
        mode = next((p.value for p in proto.metadata_props if p.key == "nsn.rank_mode"), None)
        if mode == "slice":
            source, views = to_view_graph(proto, model_path.parent)
            # The rewritten graph is loaded from memory: point it at the external weight file.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(model_path.parent))
        elif weight_views:
            raise WeightViewsError(f"{model_path}: weight views need a slice-mode export, this one is "
                                   f"{mode!r}; re-export with --rank-mode slice or pass weight_views=False")
    try:
        return ort.InferenceSession(source, options, providers=providers), views
    except Exception as error:  # onnxruntime's load failures are of several pybind11 types
        raise ValueError(f"{model_path}: ONNX Runtime cannot load the exported model ({type(error).__name__}: "
                         f"{error}); re-export it with nsn-export, keeping model.onnx_data next to it") from None


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
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_threads: int | None = None,
                 rank: int | None = None, weight_views: bool | None = None):
        check_single_onnxruntime()
        self.model_path = model_file(path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no exported model here; run nsn-export first")
        self.model_dir = self.model_path.parent
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 0):
            raise ValueError(f"intra_op_threads must be an integer >= 0 (0 or None: ONNX Runtime's default), got "
                             f"{intra_op_threads!r}")
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        providers = providers or default_providers()
        self._view_cache: dict[int, dict[str, ort.OrtValue]] = {}
        self.session, self.views = open_session(self.model_path, options, providers, weight_views)
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
        if rank is not None:
            self.rank = rank

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

    def run_values(self, feeds: dict, outputs: list[str] | None = None) -> list[ort.OrtValue]:
        """Run at the current rank; ``feeds`` are numpy arrays or ``OrtValue``s (passed through, so a
        KV cache returned by one call feeds the next without a copy)."""
        values = {name: value if isinstance(value, ort.OrtValue)
                  else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
        rank = self.last_rank = self._rank  # read once: a governor thread may change it meanwhile
        return self.session.run_with_ort_values(outputs or self.output_names, {**values, **self.rank_feeds(rank)})

    def run_raw(self, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run at the current rank; ``feeds`` are numpy arrays of the standard inputs."""
        return [result.numpy() for result in self.run_values(feeds, outputs)]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph at the current rank; ``feeds`` holds the task's standard inputs."""
        return dict(zip(outputs or self.output_names, self.run_raw(feeds, outputs)))

    def decode_step(self, token_ids: np.ndarray, cache: list | None, past_length: int):
        """One decoder call (``cache`` None at prefill): returns ``(logits of the last position, new
        cache)``; the cache stays as ONNX Runtime values for the next call."""
        values = self.run_values(decoder_feeds(self.input_shapes, token_ids, cache, past_length))
        logits = values[0].numpy()[:, -1]
        warn_if_not_finite(logits, "logits")
        return logits, values[1:]
