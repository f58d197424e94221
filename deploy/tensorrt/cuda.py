"""CUDA through ``cuda-python``'s runtime bindings, as NVIDIA's TensorRT 10 samples use it: every
call's error code checked in one place, device memory owned by one small object.

The ``cudart`` module is passed in (``load_cudart()`` by default) so tests can hand in a double.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..extras import install_command


class TensorRTUnavailable(RuntimeError):
    """TensorRT or cuda-python is not installed, or there is no GPU."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def load_cudart():
    """``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailable(f"cuda-python is not installed: {install_command('trt')}; on a Jetson, pip "
                                      f"install cuda-python matching the JetPack CUDA version") from None
    return cudart


class Cuda:
    """One CUDA device and stream; ``call`` turns every error code into a ``CudaError``."""

    def __init__(self, cudart=None):
        self.rt = cudart or load_cudart()
        self.stream = self.call(self.rt.cudaStreamCreate())

    def call(self, result):
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorString(error)[1]
            raise CudaError(f"CUDA error {error}: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def device_description(self) -> dict:
        device = self.call(self.rt.cudaGetDevice())
        props = self.call(self.rt.cudaGetDeviceProperties(device))
        name = props.name.decode().rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}

    def to_device(self, array: np.ndarray, buffer: "DeviceBuffer", offset: int = 0) -> None:
        """``array`` (C-contiguous) into ``buffer`` at byte ``offset`` (stream-ordered: the array must
        live until the stream is synchronised)."""
        self.call(self.rt.cudaMemcpyAsync(buffer.ptr + offset, array.ctypes.data, array.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, buffer: "DeviceBuffer", array: np.ndarray, offset: int = 0) -> None:
        """``buffer`` from byte ``offset`` into ``array`` (C-contiguous; stream-ordered)."""
        self.call(self.rt.cudaMemcpyAsync(array.ctypes.data, buffer.ptr + offset, array.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def copy(self, target: "DeviceBuffer", target_offset: int, source: "DeviceBuffer", source_offset: int,
             nbytes: int) -> None:
        """``nbytes`` from ``source`` to ``target`` on the device, at byte offsets (stream-ordered)."""
        self.call(self.rt.cudaMemcpyAsync(target.ptr + target_offset, source.ptr + source_offset, nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))

    def synchronize(self) -> None:
        self.call(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        if self.stream is not None:
            self.call(self.rt.cudaStreamDestroy(self.stream))
            self.stream = None


@dataclass
class DeviceBuffer:
    """Device memory of ``nbytes`` that this object owns; ``free`` releases it (once)."""

    cuda: Cuda
    nbytes: int
    ptr: int = 0

    def __post_init__(self):
        self.ptr = int(self.cuda.call(self.cuda.rt.cudaMalloc(max(self.nbytes, 1))))

    def free(self) -> None:
        if self.ptr:
            self.cuda.call(self.cuda.rt.cudaFree(self.ptr))
            self.ptr = 0


@dataclass
class DeviceTensor:
    """A tensor that stays on the device between calls (the KV cache): its buffer, shape, dtype."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        self.buffer.cuda.to_host(self.buffer, host)
        self.buffer.cuda.synchronize()
        return host
