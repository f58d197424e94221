"""``NSNEngine``: one TensorRT engine (profiles per rank range and phase) serving every rank, with
the same interface as ``NSNSession``: ``rank`` / ``set_rank``, ``run``, ``decode_step``,
``generate`` (with ``rank_at``) and ``embed``.

Rank and profile switching:
- a rank change inside the active profile's range only writes the new value into the int64 host
  buffer bound to ``rank`` (TensorRT reads it at enqueue; the buffer lives as long as the engine);
- a change to another range or phase selects that profile on the enqueue stream
  (``set_optimization_profile_async``), after which every input shape and every address, ``rank``
  included, is set again — we set them on every call, so a switch needs nothing special.

One execution context with the default (static) device memory, rather than one context per
profile sharing a ``USER_MANAGED`` block: contexts that share memory must never run at the same
time, so they would serialise exactly like one context does, with more state to keep right. The
profile switch is a stream-ordered call; its cost on a Jetson is measured by
``scripts/jetson_selfcheck.py`` (not measurable here).

The KV cache stays in device memory across rank and profile switches: ``decode_step`` returns it
as ``DeviceTensor``s and takes ownership of the cache passed in (freed once consumed).

Batched decode steps (``decode_batch``, for ``deploy.batch``: decode profiles built with
``--max-batch N``) keep a batch's cache in device buffers sized for N rows, pooled and reused when
sequences join or leave. Self-speculative decoding (``decode_positions``, ``truncate_cache``: decode
profiles built with ``--draft-tokens K``) verifies up to K drafts in one call and cuts rejected ones
off with device-to-device copies. Neither allocates device memory per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..external_data import confined_path, read_json_object
from ..metadata import NSNModelInfo
from ..runtime import NSNRuntime, decoder_feeds, warn_if_not_finite
from ..schema import ListOf, MapOf, Number, Pair, Table, Text, check, optional
from ..speculative import MAX_DRAFT_TOKENS
from .build import ENGINE_FILE, MANIFEST_FILE, MANIFEST_VERSION, import_tensorrt, make_logger, tensorrt_version
from .cuda import Cuda, DeviceBuffer, DeviceTensor
from .plan import PHASES, EnginePlan, ShapeBounds


class EngineMismatchError(ValueError):
    """The engine was built for another TensorRT version or GPU."""


DIMS = ListOf(Number(0, 2**31 - 1, integer=True), max_len=16)
RANGE = Table({"low": Number(1, 1_000_000, integer=True), "high": Number(1, 1_000_000, integer=True),
               "opt": Number(1, 1_000_000, integer=True)})
# engine.json, as nsn-trt build writes it (deploy/tensorrt/build.py).
MANIFEST_SCHEMA = Table({
    "format_version": Number(MANIFEST_VERSION, MANIFEST_VERSION, integer=True),
    "tensorrt_version": Text(example="10.3.0"),
    "gpu": Text(example="Orin"),
    "compute_capability": Text(pattern=r"\d+\.\d+", example="8.7"),
    "plan": Table({
        "format_version": Number(1, 1, integer=True),
        "task": Text(choices=tuple(PHASES)),
        "max_rank": Number(1, 1_000_000, integer=True),
        "bounds": Table({**{name: Number(1, 2**31 - 1, integer=True) for name in ShapeBounds.__dataclass_fields__},
                         "draft_tokens": optional(Number(0, MAX_DRAFT_TOKENS, integer=True), 0)}),
        "ranges": ListOf(RANGE, min_len=1, max_len=1024),
        "profiles": ListOf(Table({"index": Number(0, 4096, integer=True), "phase": Text(choices=("prefill", "decode",
                                                                                                "encode")),
                                  "ranks": RANGE, "shapes": MapOf(Pair((DIMS, DIMS, DIMS), ("min", "opt", "max")))}),
                           min_len=1, max_len=4096),
    }),
    "build": optional(Table(open=True), dict),
    "source": optional(Table(open=True), dict),
    "nsn": MapOf(Text()),
})


def read_manifest(engine_dir: Path) -> dict:
    """``engine.json``, checked against ``MANIFEST_SCHEMA``."""
    path = confined_path(engine_dir, MANIFEST_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{engine_dir}: no {MANIFEST_FILE}; not an engine directory (build one with "
                                f"nsn-trt build)")
    manifest = read_json_object(path, "rebuild the engine with nsn-trt build")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unknown engine manifest format; rebuild the engine with nsn-trt build")
    try:
        return check(manifest, MANIFEST_SCHEMA, str(path))
    except ValueError as error:
        raise ValueError(f"{error}; rebuild the engine with nsn-trt build") from None


def check_compatible(manifest: dict, running_version: str, device: dict, source: str) -> None:
    """A plan runs only on the TensorRT version and GPU model it was built with."""
    built = (manifest.get("tensorrt_version"), manifest.get("gpu"), manifest.get("compute_capability"))
    here = (running_version, device["gpu"], device["compute_capability"])
    if built != here:
        raise EngineMismatchError(
            f"{source}: built with TensorRT {built[0]} for {built[1]} (compute {built[2]}), running TensorRT "
            f"{here[0]} on {here[1]} (compute {here[2]}); rebuild the engine on this device with nsn-trt build")


class NSNEngine(NSNRuntime):
    """Load ENGINE_DIR (``nsn-trt build`` output) and run it at ``rank`` on the GPU."""

    def __init__(self, engine_dir: str | Path, rank: int | None = None, trt=None, cudart=None):
        self.model_dir = Path(engine_dir)
        manifest = read_manifest(self.model_dir)
        self.plan = EnginePlan.from_dict(manifest.get("plan", {}), source=str(self.model_dir / MANIFEST_FILE))
        self.info = NSNModelInfo.from_props(manifest.get("nsn", {}), source=str(self.model_dir / MANIFEST_FILE))
        self.trt = trt or import_tensorrt()
        self.cuda = Cuda(cudart)
        check_compatible(manifest, tensorrt_version(self.trt), self.cuda.device_description(), str(self.model_dir))
        self.logger = make_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(confined_path(self.model_dir, ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise ValueError(f"{self.model_dir / ENGINE_FILE}: TensorRT cannot load the plan "
                             f"({'; '.join(self.logger.errors)}); rebuild the engine with nsn-trt build")
        self._check_rank_binding()
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n] and n != "rank"]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.input_shapes = {n: list(self.engine.get_tensor_shape(n)) for n in self.input_names}
        self._rank_value = np.zeros(1, np.int64)  # TensorRT reads it at every enqueue: kept for our lifetime
        self._staging: dict[str, DeviceBuffer] = {}
        self._outputs: dict[str, DeviceBuffer] = {}
        self._batch_caches: list[DeviceKVCache] = []  # device caches of batches, kept for the next layout
        self.active_profile: int | None = None
        self.profile_switches = 0
        self.load_text_files(self.model_dir, max_length=self.plan.bounds.max_seq)  # within the profiles
        self.max_batch = self.plan.bounds.max_batch
        hidden = list(self.engine.get_tensor_shape(self.output_names[0]))[-1]
        self.hidden_size = max(int(hidden), 0)
        self._rank = self.info.max_rank
        if rank is not None:
            self.rank = rank

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {tensorrt_version(self.trt)}"]

    def _check_rank_binding(self) -> None:
        engine, trt = self.engine, self.trt
        if not engine.is_shape_inference_io("rank") or engine.get_tensor_location("rank") != trt.TensorLocation.HOST:
            raise ValueError(f"{self.model_dir}: the engine's rank is not a host shape input; rebuild it from a "
                             f"slice-mode export with nsn-trt build")
        if engine.get_tensor_dtype("rank") != trt.DataType.INT64:
            raise ValueError(f"{self.model_dir}: the engine's rank is {engine.get_tensor_dtype('rank')}, expected "
                             f"INT64 (TensorRT 10); rebuild the engine with nsn-trt build")

    # ---- one call ---------------------------------------------------------------------------
    def _select_profile(self, rank: int, phase: str):
        profile = self.plan.profile_for(rank, phase)
        if profile.index != self.active_profile:
            if not self.context.set_optimization_profile_async(profile.index, self.cuda.stream_handle):
                raise RuntimeError(f"TensorRT refused optimization profile {profile.index}: "
                                   f"{'; '.join(self.logger.errors)}")
            self.active_profile = profile.index
            self.profile_switches += 1
        return profile

    def _staged(self, name: str, array: np.ndarray) -> DeviceBuffer:
        """A device buffer per input, filled from ``array`` on the stream: sized at once for the
        largest shape any profile accepts (ids, masks, positions are small), so decoding with a
        growing attention mask never reallocates; grow-only for the cache inputs, which come from
        the host only empty (at prefill)."""
        buffer = self._staging.get(name)
        if buffer is None or buffer.nbytes < array.nbytes:
            if buffer is not None:
                buffer.free()
            largest = 0 if name.startswith("past_key_values.") else max(
                int(np.prod(profile.shapes[name][2], dtype=np.int64)) for profile in self.plan.profiles
                if name in profile.shapes) * self.dtypes[name].itemsize
            buffer = self._staging[name] = DeviceBuffer(self.cuda, max(array.nbytes, largest,
                                                                       2 * (buffer.nbytes if buffer else 0)))
        self.cuda.to_device(array, buffer)
        return buffer

    def _output_buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        """A grow-only device buffer per output that the caller reads at once (the logits)."""
        buffer = self._outputs.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self._outputs[name] = DeviceBuffer(self.cuda, max(nbytes, 2 * (buffer.nbytes if buffer else 0)))
        return buffer

    def run_device(self, feeds: dict, phase: str, destinations: dict[str, DeviceBuffer] | None = None,
                   rank: int | None = None) -> dict[str, DeviceTensor]:
        """Run at the current rank (or ``rank``, a speculative draft's); ``feeds`` are numpy arrays or
        ``DeviceTensor``s. Outputs named in ``destinations`` are written there (buffers the caller
        owns, checked to be large enough); every other output gets a new device buffer, returned,
        that the caller frees."""
        destinations = destinations or {}
        if rank is None:
            rank = self.last_rank = self._rank  # read once: a governor thread may change it meanwhile
        profile = self._select_profile(rank, phase)
        context = self.context
        host_inputs = []
        for name in self.input_names:
            value = feeds[name]
            shape = tuple(int(d) for d in value.shape)
            if not profile.accepts(name, shape):
                low, _, high = profile.shapes[name]
                raise ValueError(f"input {name!r} has shape {list(shape)}, outside the {phase} profile for ranks "
                                 f"{profile.ranks} ({list(low)}..{list(high)}); rebuild the engine with larger "
                                 f"--max-seq / --max-context / --max-batch")
            if isinstance(value, DeviceTensor):
                address = value.buffer.ptr
            else:
                array = np.ascontiguousarray(value, dtype=self.dtypes[name])
                host_inputs.append(array)  # alive until the stream is synchronised
                address = self._staged(name, array).ptr
            if not context.set_input_shape(name, shape):
                raise ValueError(f"TensorRT refused shape {list(shape)} for input {name!r}")
            context.set_tensor_address(name, address)
        self._rank_value[0] = rank
        context.set_tensor_address("rank", self._rank_value.ctypes.data)
        context.infer_shapes()
        outputs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            buffer = destinations.get(name)
            if buffer is None:
                buffer = DeviceBuffer(self.cuda, nbytes)
                outputs[name] = DeviceTensor(buffer, shape, self.dtypes[name])
            elif buffer.nbytes < nbytes:
                raise ValueError(f"output {name!r} needs {nbytes} bytes, its buffer holds {buffer.nbytes}")
            context.set_tensor_address(name, buffer.ptr)
        if not context.execute_async_v3(self.cuda.stream_handle):
            for tensor in outputs.values():
                tensor.buffer.free()
            raise RuntimeError(f"TensorRT execution failed at rank {rank}: {'; '.join(self.logger.errors)}")
        self.cuda.synchronize()
        return outputs

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the engine at the current rank on the task's standard inputs; outputs on the host."""
        phase = "encode" if self.info.task == "feature-extraction" else (
            "prefill" if feeds[next(n for n in self.input_names if n.startswith("past_key_values."))].shape[2] == 0
            else "decode")
        device = self.run_device(feeds, phase)
        try:
            return {name: device[name].numpy() for name in (outputs or self.output_names)}
        finally:
            for tensor in device.values():
                tensor.buffer.free()

    def decode_step(self, token_ids: np.ndarray, cache: "DeviceKVCache | None", past_length: int,
                    logits: bool = True, rank: int | None = None):
        """One decoder call. The generation's cache is allocated once, at prefill, for the engine's
        maximum context; every later step writes into it and allocates nothing. The engine computes
        the logits whether wanted or not (``logits`` is the runtimes' common signature)."""
        if cache is None:
            cache = self._new_cache(token_ids.shape[0])
        return self._call(token_ids, cache, past_length, "prefill" if past_length == 0 else "decode", rank=rank)

    @property
    def supports_batching(self) -> bool:
        return "position_ids" in self.input_shapes

    def decode_batch(self, token_ids: np.ndarray, cache, attention_mask: np.ndarray, position_ids: np.ndarray):
        """A batched decode step (``deploy.batch``) within the decode profile's batch range
        (``--max-batch``). The batch's cache lives on the device in buffers sized for ``max_batch``
        rows and the maximum context: a cache laid out on the host (after a sequence joined or left)
        is uploaded into such buffers, reused from earlier batches, and every later step writes into
        them and allocates nothing."""
        rows, width = attention_mask.shape[0], attention_mask.shape[1] - 1
        device = cache
        if not isinstance(cache, DeviceKVCache):  # laid out on the host after a join or leave
            device = self._batch_caches.pop() if self._batch_caches else self._new_cache(self.max_batch, pooled=True)
        try:
            if device is not cache:
                device.upload(cache, rows, width)
            return self._call(token_ids, device, width, "decode", attention_mask, position_ids)
        except BaseException:
            if device is not cache:  # the batch keeps its host layout; these buffers go back to the pool
                self.release_cache(device)
            raise

    def read_row(self, cache, index: int, width: int, length: int) -> list[np.ndarray]:
        """From a batch's cache on the device, only that row's positions are downloaded."""
        if isinstance(cache, DeviceKVCache):
            return cache.read_row(index, length)
        return super().read_row(cache, index, width, length)

    def write_row(self, cache, index: int, width: int, own, length: int) -> bool:
        """Into a batch's cache on the device: copies on the device from a sequence's own device
        cache (its prompt just read), or uploads of its host rows (it changed batch); nothing is
        allocated. A batch laid out on the host and not yet uploaded is laid out again."""
        if not isinstance(cache, DeviceKVCache):
            return False
        cache.write_row(index, own, length)
        return True

    def host_cache(self, cache) -> list[np.ndarray]:
        if isinstance(cache, DeviceKVCache):
            return [tensor.numpy() for tensor in cache.past()]
        return super().host_cache(cache)

    def _new_cache(self, rows: int, pooled: bool = False) -> "DeviceKVCache":
        return DeviceKVCache(self.cuda, {name: self.input_shapes[name] for name in self.input_names
                                         if name.startswith("past_key_values.")},
                             self.output_names[1:], rows, self.plan.bounds.max_context, self.dtypes, pooled)

    def _call(self, token_ids: np.ndarray, cache: "DeviceKVCache", past_length: int, phase: str,
              attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None,
              rank: int | None = None, every_position: bool = False):
        feeds = decoder_feeds(self.input_shapes, token_ids, cache.past() if past_length else None, past_length,
                              attention_mask, position_ids)
        logits_name = self.output_names[0]
        vocab = list(self.engine.get_tensor_shape(logits_name))[-1]
        logits_bytes = token_ids.size * max(int(vocab), 1) * self.dtypes[logits_name].itemsize
        destinations = {logits_name: self._output_buffer(logits_name, logits_bytes), **cache.destinations()}
        try:
            self.run_device(feeds, phase, destinations, rank)
        except BaseException:
            if not cache.pooled:  # a generation's cache ends with its failed call; a batch keeps its own
                cache.free()
            raise
        cache.advance(past_length + token_ids.shape[1])
        shape = tuple(int(d) for d in self.context.get_tensor_shape(logits_name))
        logits = DeviceTensor(destinations[logits_name], shape, self.dtypes[logits_name]).numpy()
        logits = logits[0] if every_position else logits[:, -1]
        warn_if_not_finite(logits, "logits")
        return logits, cache

    # ---- self-speculative decoding (an engine built with --draft-tokens) ---------------------------------
    @property
    def supports_speculation(self) -> bool:
        return self.info.task == "text-generation" and self.plan.bounds.draft_tokens > 0

    @property
    def max_draft_tokens(self) -> int:
        """Drafts a verify call may hold: the decode profiles take ``1 + draft_tokens`` new tokens."""
        return self.plan.bounds.draft_tokens

    def decode_positions(self, token_ids: np.ndarray, cache: "DeviceKVCache | None", past_length: int,
                         rank: int | None = None):
        """One call on one sequence, at the current rank or ``rank``: the logits of every new position
        and the cache (allocated once, at prefill, like ``decode_step``'s)."""
        if cache is None:
            cache = self._new_cache(token_ids.shape[0])
        return self._call(token_ids, cache, past_length, "prefill" if past_length == 0 else "decode", rank=rank,
                          every_position=True)

    def truncate_cache(self, cache: "DeviceKVCache", length: int) -> "DeviceKVCache":
        """The cache cut back to its first ``length`` positions (rejected drafts dropped): copied on
        the device into the other buffer of each pair, no allocation."""
        cache.truncate(length)
        return cache

    def release_cache(self, cache) -> None:
        """A generation's cache is freed; a batch's goes back to the pool for the next layout."""
        if isinstance(cache, DeviceKVCache):
            if cache.pooled:
                if cache not in self._batch_caches:
                    self._batch_caches.append(cache)
            else:
                cache.free()

    def close(self) -> None:
        """Free the device memory this engine owns (also done when it is garbage collected)."""
        for buffer in [*self._staging.values(), *self._outputs.values()]:
            buffer.free()
        for cache in self._batch_caches:
            cache.free()
        self._batch_caches.clear()
        self._staging.clear()
        self._outputs.clear()
        self.cuda.close()


class DeviceKVCache:
    """A KV cache on the device for up to ``capacity`` rows: two buffers per cache tensor, each sized
    for that many rows at the engine's maximum context, used in turn (TensorRT's inputs and outputs
    may not alias). Allocated once; a decode step reads one buffer of each pair and writes the
    other. ``pooled``: a batch's cache, which the engine keeps for reuse instead of freeing."""

    def __init__(self, cuda, past_shapes: dict[str, list], present_names: list[str], capacity: int, max_context: int,
                 dtypes: dict, pooled: bool = False):
        self.cuda, self.past_names, self.present_names = cuda, list(past_shapes), present_names
        self.capacity, self.rows, self.pooled = capacity, capacity, pooled
        self.layouts = [(int(shape[1]), int(shape[3]), dtypes[name]) for name, shape in past_shapes.items()]
        self.pairs = [tuple(DeviceBuffer(cuda, capacity * heads * max_context * dim * dtype.itemsize) for _ in range(2))
                      for heads, dim, dtype in self.layouts]
        self.current, self.length = 0, 0

    def past(self) -> list[DeviceTensor]:
        """The cache so far, as the next call's ``past_key_values.*`` inputs."""
        return [DeviceTensor(pair[self.current], (self.rows, heads, self.length, dim), dtype)
                for pair, (heads, dim, dtype) in zip(self.pairs, self.layouts)]

    def upload(self, arrays: list[np.ndarray], rows: int, length: int) -> None:
        """Fill the cache from host arrays of ``rows`` rows and ``length`` positions (a batch's layout)."""
        if rows > self.capacity:
            raise ValueError(f"a batch of {rows} sequences is above the engine's --max-batch {self.capacity}")
        for pair, array, (_, _, dtype) in zip(self.pairs, arrays, self.layouts):
            self.cuda.to_device(np.ascontiguousarray(array, dtype=dtype), pair[self.current])
        self.cuda.synchronize()  # the host arrays may go once this returns
        self.rows, self.length = rows, length

    def read_row(self, index: int, length: int) -> list[np.ndarray]:
        """Row ``index``'s last ``length`` positions, downloaded one block per head into host arrays
        of shape (1, heads, ``length``, dim)."""
        self._check_row(index, length)
        arrays = []
        for pair, (heads, dim, dtype) in zip(self.pairs, self.layouts):
            array, row = np.empty((1, heads, length, dim), dtype), dim * dtype.itemsize
            for head in range(heads):
                self.cuda.to_host(pair[self.current], array[0, head], self._at(index * heads + head, length, row))
            arrays.append(array)
        self.cuda.synchronize()
        return arrays

    def _at(self, block: int, length: int, row: int) -> int:
        """The byte offset of the last ``length`` positions of (row, head) ``block``."""
        return ((block + 1) * self.length - length) * row

    def _check_row(self, index: int, length: int) -> None:
        if not 0 <= index < self.rows or not 0 < length <= self.length:
            raise ValueError(f"row {index}, {length} positions: not in this cache ({self.rows} rows, {self.length} "
                             f"positions)")

    def write_row(self, index: int, own: "DeviceKVCache | list[np.ndarray]", length: int) -> None:
        """Row ``index`` of this cache (the current buffer of each pair) takes ``own``'s ``length``
        positions at its right end, one block per head: copied on the device from another (one-row)
        device cache, or uploaded from host arrays of shape (1, heads, ``length``, dim). The row's
        other positions keep what they held (the mask hides them)."""
        self._check_row(index, length)
        on_device = isinstance(own, DeviceKVCache)
        if on_device and own.length != length:
            raise ValueError(f"the joining cache holds {own.length} positions, not {length}")
        hosts = [] if on_device else [np.ascontiguousarray(array[0], dtype=dtype)
                                      for array, (_, _, dtype) in zip(own, self.layouts)]
        for layer, (pair, (heads, dim, dtype)) in enumerate(zip(self.pairs, self.layouts)):
            target, row = pair[self.current], dim * dtype.itemsize
            for head in range(heads):
                offset = self._at(index * heads + head, length, row)
                if on_device:
                    self.cuda.copy(target, offset, own.pairs[layer][own.current], head * length * row, length * row)
                else:
                    self.cuda.to_device(hosts[layer][head], target, offset)
        self.cuda.synchronize()  # the host rows may go once this returns

    def destinations(self) -> dict[str, DeviceBuffer]:
        """Where the next call writes ``present.*``: the other buffer of each pair."""
        return {name: pair[1 - self.current] for name, pair in zip(self.present_names, self.pairs)}

    def advance(self, length: int) -> None:
        self.current, self.length = 1 - self.current, length

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions: each (row, head) block moves, on the device, from the
        current buffer to the other one at the shorter stride; then the other one is current."""
        if length >= self.length:
            return
        for pair, (heads, dim, dtype) in zip(self.pairs, self.layouts):
            source, target = pair[self.current], pair[1 - self.current]
            row = dim * dtype.itemsize
            for block in range(self.rows * heads):
                self.cuda.copy(target, block * length * row, source, block * self.length * row, length * row)
        self.current, self.length = 1 - self.current, length

    def free(self) -> None:
        for pair in self.pairs:
            for buffer in pair:
                buffer.free()
