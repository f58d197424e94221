"""Optional parts of the distribution (``pip install '.[EXTRA]'`` in a clone) and the one-line errors
for a missing one. nsn-export is not on PyPI: it installs from a clone, or from a wheel built there
with ``python -m build`` and copied to the device, so every hint names those two ways. The core install is the device side alone; everything else is an extra:

- ``cpu``: onnxruntime; ``gpu``: onnxruntime-gpu (never both in one environment);
- ``export``: torch, transformers, accelerate, safetensors, optimum-onnx, the built-in MiniLM;
- ``serve``: the HTTP server (FastAPI, uvicorn, prometheus-client, jinja2);
- ``trt``: cuda-python 12.x (TensorRT itself: JetPack's apt package, or pip's ``tensorrt`` on x86);
- ``plot``: matplotlib; ``dev``: the tests.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
from types import ModuleType

# The modules each extra provides, in the order they are checked.
EXTRA_MODULES = {
    "export": ("torch", "transformers", "accelerate", "safetensors", "optimum"),
    "cpu": ("onnxruntime",),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "jinja2"),
    "trt": ("cuda",),
    "plot": ("matplotlib",),
}
# Distributions that all install the same ``onnxruntime`` package folder: two of them overwrite
# each other's files, and whichever was installed last silently decides the execution providers.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-qnn")


class MissingExtraError(ImportError):
    """A part of nsn-export needs an extra that is not installed; the message says which to install."""


class RuntimeConflictWarning(RuntimeWarning):
    """Two ONNX Runtime distributions are installed in one environment."""


JETSON_ORT_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"


def install_command(extras: str) -> str:
    """How to install nsn-export with ``extras`` ("cpu,serve"): from a clone, or from a built wheel."""
    try:
        version = importlib.metadata.version("nsn-export")
    except importlib.metadata.PackageNotFoundError:
        version = "VERSION"
    return (f"pip install '.[{extras}]' in a clone of nsn-export (or 'nsn_export-{version}-py3-none-any.whl[{extras}]', "
            f"a wheel built there with python -m build)")


def install_hint(extra: str) -> str:
    if extra == "cpu":
        return (f"{install_command('cpu')}; [gpu] instead on an NVIDIA GPU; on a Jetson: pip install 'numpy<2' "
                f"onnxruntime-gpu --extra-index-url {JETSON_ORT_INDEX}")
    return install_command(extra)


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtraError`` naming the install command when ``extra`` is not installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(f"{what} needs the {extra} extra ({', '.join(missing)} not installed): "
                                f"{install_hint(extra)}")


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or a ``MissingExtraError`` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            raise  # installed but broken: the real error says more than an install hint
        raise MissingExtraError(f"{what} needs the {extra} extra ({module} is not installed): "
                                f"{install_hint(extra)}") from error


def installed_onnxruntimes() -> list[str]:
    found = []
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_single_onnxruntime() -> None:
    """Warn about an environment with two ONNX Runtime distributions (microsoft/onnxruntime#7748),
    naming the conflict and the fix."""
    found = installed_onnxruntimes()
    if len(found) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[-1]
        warnings.warn(f"{' and '.join(found)} are both installed; they overwrite the same onnxruntime/ folder, so "
                      f"the execution providers depend on which was installed last (CUDA may silently be missing): "
                      f"pip uninstall -y {' '.join(found)} && pip install {keep}", RuntimeConflictWarning,
                      stacklevel=3)
