"""A test double for ``tensorrt`` (10.x) and CUDA's runtime bindings (``cuda.bindings.runtime``).

It defines nothing the real modules lack (``test_tensorrt.py`` checks every class, member,
parameter name and enum value name against the recorded TensorRT 10.3 and 10.16 APIs, and every
``cudart`` name against the real cuda-python bindings), and it enforces the rules of
TENSORRT.md that a wrong caller would break:

- a build fails when a profile misses a dynamic input or the ``rank`` shape input, when ``rank``
  got ``set_shape``, when ``set_shape_input`` values are not one-element int lists within int32
  (10.3), when min <= opt <= max is broken, or when REFIT is combined with several profiles;
- ``get_tensor_profile_values`` has the real, swapped keyword names;
- at run time ``rank`` must be bound to a host (never device) int64 buffer whose value lies in the
  active profile's range; every input shape and address must be set again after a profile
  switch; shapes must lie inside the active profile; output buffers must be large enough.

Its "engine" executes the ONNX graph in ONNX Runtime on the double's device buffers, so an
``NSNEngine`` can be compared with an ``NSNSession`` end to end.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np
import onnx
import onnxruntime as ort

INT32_MAX = 2**31 - 1


# ---- CUDA runtime --------------------------------------------------------------------------------------
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaDeviceProp:
    def __init__(self):
        self.name = b"Fake Orin (test double)"
        self.major, self.minor = 8, 7


def make_cudart() -> types.ModuleType:
    """A fresh ``cudart`` double: device memory is numpy memory that the module tracks, so host and
    device pointers can be told apart and leaks counted (``cudart.allocations``)."""
    rt = types.ModuleType("cudart_double")
    rt.cudaError_t, rt.cudaMemcpyKind = cudaError_t, cudaMemcpyKind
    rt.allocations = {}  # ptr -> numpy uint8 array
    rt.malloc_calls = 0  # every cudaMalloc: a steady-state decode step must make none
    rt.streams = set()

    def find(address: int, count: int):
        for ptr, memory in rt.allocations.items():
            if ptr <= address and address + count <= ptr + memory.nbytes:
                return memory
        return None

    def cudaMalloc(size):
        rt.malloc_calls += 1
        memory = np.zeros(int(size), np.uint8)
        rt.allocations[memory.ctypes.data] = memory
        return cudaError_t.cudaSuccess, memory.ctypes.data

    def cudaFree(devPtr):
        if rt.allocations.pop(int(devPtr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        dst_device, src_device = find(dst, count) is not None, find(src, count) is not None
        expected = {cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
                    cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
                    cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True)}.get(kind)
        if stream not in rt.streams or expected != (dst_device, src_device):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, count)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate():
        stream = len(rt.streams) + 1
        rt.streams.add(stream)
        return cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(stream):
        return (cudaError_t.cudaSuccess if stream in rt.streams else cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamDestroy(stream):
        rt.streams.discard(stream)
        return (cudaError_t.cudaSuccess,)

    def cudaGetDevice():
        return cudaError_t.cudaSuccess, 0

    def cudaGetDeviceProperties(device):
        return cudaError_t.cudaSuccess, cudaDeviceProp()

    def cudaRuntimeGetVersion():
        return cudaError_t.cudaSuccess, 12060

    def cudaGetErrorString(error):
        return cudaError_t.cudaSuccess, cudaError_t(error).name.encode()

    for function in (cudaMalloc, cudaFree, cudaMemcpyAsync, cudaStreamCreate, cudaStreamSynchronize,
                     cudaStreamDestroy, cudaGetDevice, cudaGetDeviceProperties, cudaGetErrorString, cudaRuntimeGetVersion):
        setattr(rt, function.__name__, function)
    rt.find = find
    return rt


# ---- TensorRT -------------------------------------------------------------------------------------------
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    REFIT = 4


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


ONNX_TO_TRT = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
               onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.INT32: DataType.INT32,
               onnx.TensorProto.BOOL: DataType.BOOL}
NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64, DataType.INT32: np.int32,
         DataType.BOOL: np.bool_, DataType.INT8: np.int8}


def nptype(trt_type):
    return NUMPY[DataType(trt_type)]


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self):
        pass

    def log(self, severity, msg):
        pass


class Logger(ILogger):
    def __init__(self, min_severity=ILogger.WARNING):
        ILogger.__init__(self)
        self.min_severity = min_severity


class IProgressMonitor:
    def __init__(self):
        pass

    def phase_start(self, phase_name, parent_phase, num_steps):
        pass

    def step_complete(self, phase_name, step):
        return True

    def phase_finish(self, phase_name):
        pass


class IHostMemory(bytes):
    @property
    def nbytes(self):
        return len(self)


class ITensor:
    def __init__(self, name, dtype, shape, is_shape_tensor):
        self.name, self.dtype, self.shape, self.is_shape_tensor = name, dtype, shape, is_shape_tensor


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._model_path = None

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]


class ParserError:
    def __init__(self, message):
        self._message = message

    def desc(self):
        return self._message


def rank_is_shape_tensor(model: onnx.ModelProto) -> bool:
    """TensorRT makes ``rank`` a shape tensor when its value only sizes things: here, when no
    floating-point value is computed from it except through Slice starts/ends."""
    typed = onnx.shape_inference.infer_shapes(model)
    float_values = {v.name for v in list(typed.graph.value_info) + list(typed.graph.output)
                    if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    reached = {"rank"}
    for node in model.graph.node:
        positions = {i for i, name in enumerate(node.input) if name in reached}
        if not positions:
            continue
        if node.op_type == "Slice" and positions <= {1, 2}:
            continue
        if any(out in float_values for out in node.output):
            return False
        reached.update(node.output)
    return True


class OnnxParser:
    def __init__(self, network, logger):
        self._network, self._logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, model):
        try:
            proto = onnx.load(model, load_external_data=False)
        except Exception as error:  # the real parser reports, it does not raise
            self._errors.append(ParserError(f"cannot read {model}: {error}"))
            return False
        shape_rank = rank_is_shape_tensor(proto)
        for value in proto.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            dtype = ONNX_TO_TRT[value.type.tensor_type.elem_type]
            self._network._inputs.append(ITensor(value.name, dtype, dims, value.name == "rank" and shape_rank))
        for value in proto.graph.output:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self._network._outputs.append(ITensor(value.name, ONNX_TO_TRT[value.type.tensor_type.elem_type], dims,
                                                  False))
        self._network._model_path = model
        return True


class IOptimizationProfile:
    def __init__(self, version):
        self._version, self._shapes, self._values, self._errors = version, {}, {}, []
        self.extra_memory_target = 1.0

    def set_shape(self, input, min, opt, max):
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def set_shape_input(self, input, min, opt, max):
        values = (list(min), list(opt), list(max))
        if any(len(v) != 1 or not all(isinstance(x, int) for x in v) for v in values):
            self._errors.append(f"set_shape_input({input!r}): a 0-d shape input takes one-element int lists")
        elif self._version < (10, 11) and any(abs(v[0]) > INT32_MAX for v in values):
            self._errors.append(f"set_shape_input({input!r}): values must fit in int32 in TensorRT 10.3")
        self._values[input] = tuple(tuple(v) for v in values)

    def get_shape(self, input):
        return list(self._shapes.get(input, ()))

    def get_shape_input(self, input):
        return [list(v) for v in self._values.get(input, ())]


class ITimingCache:
    def __init__(self, data: bytes):
        self._data = bytes(data) or b"timing-cache"

    def serialize(self):
        return IHostMemory(self._data)


class IBuilderConfig:
    def __init__(self):
        self._flags, self._pools, self._profiles, self._cache = set(), {}, [], None
        self.builder_optimization_level = 3
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[MemoryPoolType(pool)] = pool_size

    def set_flag(self, flag):
        self._flags.add(BuilderFlag(flag))

    def get_flag(self, flag):
        return BuilderFlag(flag) in self._flags

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self):
        return len(self._profiles)


class Builder:
    def __init__(self, logger):
        self._logger = logger
        self._version = tuple(int(p) for p in __version__.split(".")[:2])

    def create_network(self, flags=0):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile(self._version)

    def _fail(self, message):
        self._logger.log(ILogger.ERROR, message)
        return None

    def build_serialized_network(self, network, config):
        if BuilderFlag.REFIT in config._flags and len(config._profiles) > 1:
            return self._fail("a refittable engine supports one optimization profile only")
        dynamic = [t for t in network._inputs if -1 in t.shape]
        shape_inputs = [t for t in network._inputs if t.is_shape_tensor]
        if (dynamic or shape_inputs) and not config._profiles:
            return self._fail("network has dynamic or shape inputs, but no optimization profile has been defined")
        profiles = []
        for index, profile in enumerate(config._profiles):
            if profile._errors:
                return self._fail(f"profile {index}: {'; '.join(profile._errors)}")
            for tensor in shape_inputs:
                if tensor.name in profile._shapes:
                    return self._fail(f"profile {index}: set_shape on shape input {tensor.name!r}; use set_shape_input")
                if tensor.name not in profile._values:
                    return self._fail(f"optimization profile is missing values for shape input {tensor.name!r} "
                                      f"(profile {index})")
                low, opt, high = (v[0] for v in profile._values[tensor.name])
                if not low <= opt <= high:
                    return self._fail(f"profile {index}: {tensor.name} min <= opt <= max is violated")
            for tensor in dynamic:
                if tensor.name not in profile._shapes:
                    return self._fail(f"dynamic input {tensor.name!r} is missing dimensions in profile {index}")
                low, opt, high = profile._shapes[tensor.name]
                fixed_ok = all(d == -1 or lo == op == hi == d for d, lo, op, hi in zip(tensor.shape, low, opt, high))
                if len(low) != len(tensor.shape) or not fixed_ok or not all(
                        lo <= op <= hi for lo, op, hi in zip(low, opt, high)):
                    return self._fail(f"profile {index}: bad dimensions for {tensor.name!r}: {low} {opt} {high}")
            profiles.append({"shapes": {k: [list(s) for s in v] for k, v in profile._shapes.items()},
                             "values": {k: [list(s) for s in v] for k, v in profile._values.items()}})
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, len(profiles))
            for step in range(len(profiles)):
                monitor.step_complete("Building engine", step)
            monitor.phase_finish("Building engine")
        plan = {"double": "trt_double", "model": network._model_path, "profiles": profiles,
                "inputs": [[t.name, int(t.dtype), list(t.shape), t.is_shape_tensor] for t in network._inputs],
                "outputs": [[t.name, int(t.dtype), list(t.shape)] for t in network._outputs]}
        return IHostMemory(json.dumps(plan).encode())


class Runtime:
    def __init__(self, logger):
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            plan = json.loads(bytes(serialized_engine))
            assert plan["double"] == "trt_double"
        except Exception:
            self._logger.log(ILogger.ERROR, "the serialized engine is corrupt")
            return None
        return ICudaEngine(plan)


class ICudaEngine:
    def __init__(self, plan):
        self._plan = plan
        self._io = {name: (TensorIOMode.INPUT, DataType(dtype), tuple(shape), shape_input)
                    for name, dtype, shape, shape_input in plan["inputs"]}
        self._io.update({name: (TensorIOMode.OUTPUT, DataType(dtype), tuple(shape), False)
                         for name, dtype, shape in plan["outputs"]})
        self._session = None

    @property
    def num_io_tensors(self):
        return len(self._io)

    @property
    def num_optimization_profiles(self):
        return len(self._plan["profiles"])

    def get_tensor_name(self, index):
        return list(self._io)[index]

    def get_tensor_mode(self, name):
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    def get_tensor_shape(self, name):
        return self._io[name][2]

    def get_tensor_location(self, name):
        return TensorLocation.HOST if self._io[name][3] else TensorLocation.DEVICE

    def is_shape_inference_io(self, name):
        return self._io[name][3]

    def get_tensor_profile_shape(self, name, profile_index):
        return [tuple(s) for s in self._plan["profiles"][profile_index]["shapes"][name]]

    def get_tensor_profile_values(self, name, profile_index):
        # The real binding's keyword names are swapped: ``name`` is the profile index.
        profile, tensor = name, profile_index
        if not isinstance(profile, int) or not isinstance(tensor, str):
            raise TypeError("get_tensor_profile_values(): incompatible function arguments")
        return [list(v) for v in self._plan["profiles"][profile]["values"][tensor]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self)

    def _ort(self):
        if self._session is None:
            self._session = ort.InferenceSession(self._plan["model"], providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    """Runs the ONNX graph in ONNX Runtime on the double's device buffers, after checking what
    TensorRT would: profile, shapes, addresses, a host int64 ``rank`` within range."""

    _cudart = None  # the cudart double whose device memory this context reads and writes

    def __init__(self, engine):
        self.engine = engine
        self.active_optimization_profile = 0
        self._shapes, self._addresses, self._outputs = {}, {}, {}
        self._input_ranges: dict[str, tuple[int, int]] = {}

    def set_optimization_profile_async(self, profile_index, stream_handle):
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        self.active_optimization_profile = profile_index
        self._shapes, self._addresses, self._outputs = {}, {}, {}  # must all be set again
        return True

    def _profile(self):
        return self.engine._plan["profiles"][self.active_optimization_profile]

    def set_input_shape(self, name, shape):
        bounds = self._profile()["shapes"].get(name)
        shape = tuple(int(d) for d in shape)
        if bounds is None or len(shape) != len(bounds[0]) or not all(
                lo <= d <= hi for lo, d, hi in zip(bounds[0], shape, bounds[2])):
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        self._addresses[name] = int(memory)
        return True

    def _rank_value(self) -> int:
        address = self._addresses.get("rank")
        if address is None:
            raise RuntimeError("the address of shape input 'rank' is not set")
        if self._cudart.find(address, 8) is not None:
            raise RuntimeError("shape input 'rank' must be bound to host memory, got a device pointer")
        value = ctypes.c_int64.from_address(address).value
        low, _, high = (v[0] for v in self._profile()["values"]["rank"])
        if not low <= value <= high:
            raise RuntimeError(f"infer_shapes error code: -1 (rank {value} outside the profile's [{low}, {high}])")
        return value

    def _run(self):
        feeds = {}
        for name, (mode, dtype, _, shape_input) in self.engine._io.items():
            if mode != TensorIOMode.INPUT or shape_input:
                continue
            if name not in self._shapes or name not in self._addresses:
                raise RuntimeError(f"input {name!r}: shape or address not set since the last profile switch")
            shape = self._shapes[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY[dtype]).itemsize
            if self._cudart.find(self._addresses[name], max(nbytes, 1)) is None:
                raise RuntimeError(f"input {name!r} is not bound to enough device memory")
            feeds[name] = np.frombuffer(ctypes.string_at(self._addresses[name], nbytes), NUMPY[dtype]).reshape(shape)
            self._input_ranges[name] = (self._addresses[name], self._addresses[name] + nbytes)
        feeds["rank"] = np.array(self._rank_value(), np.int64)
        session = self.engine._ort()
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def infer_shapes(self):
        self._outputs = self._run()
        return []

    def get_tensor_shape(self, name):
        if name in self._outputs:
            return tuple(self._outputs[name].shape)
        return self._shapes.get(name, self.engine.get_tensor_shape(name))

    def execute_async_v3(self, stream_handle):
        self._input_ranges = {}
        outputs = self._run()
        for name, value in outputs.items():
            address = self._addresses.get(name)
            if address is None or self._cudart.find(address, max(value.nbytes, 1)) is None:
                raise RuntimeError(f"output {name!r} is not bound to enough device memory")
            for source, (start, end) in self._input_ranges.items():  # TensorRT does not run in place
                if start < address + value.nbytes and address < end:
                    raise RuntimeError(f"output {name!r} aliases input {source!r}: inputs and outputs may not "
                                       f"share memory")
            ctypes.memmove(address, np.ascontiguousarray(value).ctypes.data, value.nbytes)
        return True


__version__ = "10.3.0"


def make_tensorrt(cudart, version: str = "10.3.0") -> types.ModuleType:
    """A ``tensorrt`` double reporting ``version``, whose contexts use ``cudart``'s device memory."""
    module = types.ModuleType("tensorrt_double")
    for name, value in globals().items():
        if isinstance(value, type) and value.__module__ == __name__ and not name.startswith("cuda"):
            setattr(module, name, value)
    module.nptype = nptype
    module.__version__ = version
    IExecutionContext._cudart = cudart
    globals()["__version__"] = version
    return module
