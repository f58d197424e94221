"""The one gate between an untrusted model directory and the bytes we read from it.

An ONNX graph names the files that hold its weights (``external_data``: ``location``, ``offset``,
``length``). A crafted graph could name ``../../etc/passwd``, an absolute path, a device file or a
FIFO (which blocks the reader forever). Every place that reads an exported model — ONNX Runtime
sessions, the zero-copy weight views, verification, calibration, the TensorRT builder — goes
through ``load_graph`` / ``check_external_data`` first, so nothing is read before every location
is proven to be a regular file inside the model directory with the tensor's bytes in range.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx


class UnsafeModelError(ValueError):
    """A model file points outside its directory, at a non-regular file, or past a file's end."""


def confined_path(model_dir: str | os.PathLike, name: str, what: str = "file") -> Path:
    """``model_dir / name`` when ``name`` is relative and, with symlinks resolved, stays inside
    ``model_dir`` and is a regular file (or does not exist); else ``UnsafeModelError``."""
    root = Path(model_dir).resolve()
    if not name or os.path.isabs(name) or "\x00" in name:
        raise UnsafeModelError(f"{what} location {name!r} is not a relative path inside {root}; "
                               f"a model may only reference files in its own directory (re-export it)")
    path = Path(model_dir) / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise UnsafeModelError(f"{what} location {name!r} resolves to {resolved}, outside the model directory "
                               f"{root}; a model may only reference files in its own directory (re-export it)")
    try:
        mode = os.stat(resolved).st_mode  # stat, never open: opening a FIFO would block
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise UnsafeModelError(f"{what} location {name!r} is not a regular file (a device, FIFO, socket or "
                               f"directory); refusing to read it")
    return path


def model_file(path: str | os.PathLike) -> Path:
    """The graph file of an export: ``path/model.onnx`` for a directory, else ``path`` itself."""
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


class NotRegularFileError(ValueError):
    """A path that should be a small file we read is a FIFO, device, socket or directory."""


def read_regular_bytes(path: str | os.PathLike, max_bytes: int = 64 << 20) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them. A FIFO, device,
    socket or directory is refused before a byte is read and without blocking (it is opened
    non-blocking and checked with ``fstat``); a larger file is a ``ValueError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NotRegularFileError(f"{path} is a directory; give the path of a file")
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} is not a regular file (a FIFO, device or socket); give the path of "
                                      f"a file")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes, too large for what it should hold; check the path")
    return b"".join(chunks)


def read_regular_text(path: str | os.PathLike, max_bytes: int = 64 << 20) -> str:
    """``read_regular_bytes`` decoded as UTF-8 (a ``ValueError`` naming the file otherwise)."""
    try:
        return read_regular_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; anything else is a ``ValueError`` naming the file and ``fix``."""
    try:
        data = json.loads(read_regular_text(path))
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a file we wrote; {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def external_tensors(graph: onnx.GraphProto):
    """Every tensor stored outside the graph: initializers and ``Constant`` node values, in
    subgraphs too."""
    for init in graph.initializer:
        yield init
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from external_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from external_tensors(subgraph)


def check_external_data(model: onnx.ModelProto, model_dir: str | os.PathLike) -> None:
    """Refuse any external tensor whose location leaves ``model_dir``, is not a regular file, is
    missing, or whose ``offset + length`` does not fit in the file. Reads no tensor bytes."""
    sizes: dict[Path, int] = {}
    for tensor in external_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        what = f"tensor {tensor.name!r}: external data"
        path = confined_path(model_dir, location, what)
        if path not in sizes:
            if not path.is_file():
                raise UnsafeModelError(f"{what} file {location!r} is missing from {model_dir}; copy it next to "
                                       f"model.onnx or re-export")
            sizes[path] = path.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", tensor_nbytes(tensor)))
        except ValueError:
            raise UnsafeModelError(f"{what} has a non-integer offset or length {info}; the graph is corrupt, "
                                   f"re-export it") from None
        if offset < 0 or length != tensor_nbytes(tensor):
            raise UnsafeModelError(f"{what} offset {offset} / length {length} do not describe the tensor's "
                                   f"{tensor_nbytes(tensor)} bytes; the graph is corrupt, re-export it")
        if offset + length > sizes[path]:
            raise UnsafeModelError(f"{what} bytes [{offset}, {offset + length}) lie past the end of {location!r} "
                                   f"({sizes[path]} bytes); the data file is truncated or from another export")


def load_graph(model_path: str | os.PathLike) -> onnx.ModelProto:
    """The graph at ``model_path`` without its weights, after ``check_external_data`` proved that
    every weight it names is safe to read. Errors name the file and say what to do."""
    model_path = Path(model_path)
    confined_path(model_path.parent, model_path.name, "model file")
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such file; give an nsn-export directory (it holds model.onnx)")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (OSError, google.protobuf.message.DecodeError, ValueError) as error:
        raise ValueError(f"{model_path}: not a readable ONNX graph ({type(error).__name__}: {error}); the file is "
                         f"damaged, re-export it with nsn-export") from None
    try:
        check_external_data(model, model_path.parent)
    except UnsafeModelError as error:
        raise UnsafeModelError(f"{model_path}: {error}") from None
    return model
