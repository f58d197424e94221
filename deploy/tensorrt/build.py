"""Build ONE TensorRT engine with an optimization profile per (rank range, phase) from an
nsn-export directory, through the real TensorRT 10.x Python API (no plugins).

ENGINE_DIR, written atomically: ``model.plan``; ``engine.json`` (TensorRT version, GPU and compute
capability, the plan, build flags, sha256 of the source graph and weights, the NSN metadata);
``config.json`` and the tokenizer files.

The ``trt`` and ``cudart`` modules are parameters (the real ones by default) so the call sequence
is tested here against a double held to the recorded API. Flags and their ``trtexec`` spelling:
``--fp16`` (``--fp16``), ``--workspace-mib N`` (``--memPoolSize=workspace:NM``), ``--timing-cache
FILE`` (``--timingCacheFile=FILE``), ``--opt-level N`` (``--builderOptimizationLevel=N``),
profiles (``--minShapes/--optShapes/--maxShapes``, one ``--profile`` each).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_directory, atomic_file, check_output, check_output_files
from ..external_data import load_graph
from ..extras import install_command
from ..frontier import graph_sha256
from .compat import check_graph
from .cuda import Cuda, TensorRTUnavailable
from .plan import EnginePlan

ENGINE_FILE = "model.plan"
MANIFEST_FILE = "engine.json"
MANIFEST_VERSION = 1
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json", "vocab.txt")


class BuildError(ValueError):
    """TensorRT refused to parse or build the graph; the message carries its errors."""


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    workspace_mib: int = 1024
    opt_level: int = 3
    timing_cache: str | None = None
    refit: bool = False

    def check(self, profile_count: int) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"--opt-level must be in [0, 5] (TensorRT's builder optimization level), "
                             f"got {self.opt_level}")
        if self.workspace_mib < 1:
            raise ValueError(f"--workspace-mib must be >= 1, got {self.workspace_mib}")
        if self.refit and profile_count > 1:
            raise ValueError(f"a refittable engine allows one optimization profile, the plan has {profile_count}; "
                             f"drop --refit or give --profiles 1 with one phase")


def import_tensorrt():
    """TensorRT 10 or later, or a ``TensorRTUnavailable`` that says how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(f"TensorRT's Python package cannot be imported ({error}); on a Jetson it comes "
                                  f"with JetPack 6.1 or later (python3-libnvinfer; create the virtual environment "
                                  f"with --system-site-packages), on x86: pip install tensorrt-cu12, and "
                                  f"{install_command('trt')}") from None
    version = str(getattr(tensorrt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {version} is too old: nsn-export's engines need TensorRT 10 (int64 shape "
                                  f"inputs). On a Jetson that is JetPack 6.1 or 6.2 (TensorRT 10.3); JetPack 6.0 ships "
                                  f"TensorRT 8.6 and JetPack 5 TensorRT 8.5: upgrade JetPack")
    return tensorrt


def tensorrt_version(trt) -> str:
    return getattr(trt, "__version__")  # a module dunder: not in the recorded class/enum surface


def make_logger(trt):
    """A TensorRT logger that keeps errors, so a failed build can say why."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)

    return Logger()


def make_progress_monitor(trt, progress: Callable[[str, int, int], None]):
    """TensorRT's build phases reported as ``progress(phase, step, steps)`` (a progress bar)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            progress(phase_name, step + 1, self.steps.get(phase_name, step + 1))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            progress(phase_name, self.steps.get(phase_name, 0), self.steps.get(phase_name, 0))

    return Monitor()


def parse_network(trt, builder, logger, model_path: Path, strongly_typed: bool):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise BuildError(f"{model_path}: TensorRT's ONNX parser failed: {'; '.join(errors) or logger.errors}; "
                         f"run nsn-trt check on the export")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if "rank" not in inputs or not inputs["rank"].is_shape_tensor:
        raise BuildError(f"{model_path}: TensorRT did not make 'rank' a shape input, so profiles per rank range "
                         f"are impossible; run nsn-trt check on the export")
    return network, parser


def add_profiles(trt, builder, config, plan: EnginePlan) -> None:
    for profile in plan.profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization_profile.set_shape(name, low, opt, high)
        # rank is a 0-d shape tensor: one-element value lists (int32-sized in 10.3), never set_shape.
        ranks = profile.ranks
        optimization_profile.set_shape_input("rank", [ranks.low], [ranks.opt], [ranks.high])
        if profile.index > 0:
            optimization_profile.extra_memory_target = 0.0  # a hint: no extra weight copy per profile
        index = config.add_optimization_profile(optimization_profile)
        if index != profile.index:
            raise BuildError(f"TensorRT refused profile {profile.index} ({profile.phase}, ranks {ranks}) "
                             f"(add_optimization_profile returned {index}); check the shape bounds")


def configure(trt, builder, options: BuildOptions, plan: EnginePlan, timing_cache: bytes):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.opt_level
    if options.fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: strong typing only
            raise BuildError("this TensorRT has no FP16 builder flag (TensorRT 11); build an fp16-exported graph "
                             "instead, without --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    add_profiles(trt, builder, config, plan)
    return config


def build_engine(export_dir: str | Path, output_dir: str | Path, plan: EnginePlan, options: BuildOptions = BuildOptions(),
                 progress: Callable[[str, int, int], None] | None = None, trt=None, cudart=None) -> Path:
    """Build ``export_dir``'s graph into ``output_dir`` (see the module docstring); returns it."""
    export_dir, output_dir = Path(export_dir), Path(output_dir)
    model_path = export_dir / "model.onnx"
    check_output(output_dir, [export_dir], overwrite=True)
    check_output_files({"--timing-cache": options.timing_cache}, [export_dir, output_dir])
    options.check(len(plan.profiles))
    model = load_graph(model_path)  # every weight location confined to the export before TensorRT reads it
    problems = check_graph(model_path)
    if problems:
        raise BuildError(f"{model_path} would not build with rank profiles: " + "; ".join(map(str, problems)))
    trt = trt or import_tensorrt()
    cuda = Cuda(cudart)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, logger, model_path, strongly_typed=False)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    config = configure(trt, builder, options, plan, cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if progress is not None:
        config.progress_monitor = make_progress_monitor(trt, progress)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {model_path}: {'; '.join(logger.errors) or 'no error logged'}")
    if cache_path is not None:
        atomic_file(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    manifest = {
        "format_version": MANIFEST_VERSION,
        "tensorrt_version": tensorrt_version(trt),
        **cuda.device_description(),
        "plan": plan.to_dict(),
        "build": asdict(options),
        "source": {name: graph_sha256(export_dir / name) if (export_dir / name).is_file() else None
                   for name in ("model.onnx", "model.onnx_data")},
        "nsn": {p.key: p.value for p in model.metadata_props},
    }
    cuda.close()

    def fill(tmp: Path) -> None:
        (tmp / ENGINE_FILE).write_bytes(memoryview(serialized))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        for name in COPIED_FILES:
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, tmp / name)

    return atomic_directory(output_dir, fill, kind="tensorrt-engine", inputs=[export_dir])
