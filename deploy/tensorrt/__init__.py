"""TensorRT for exported NSN graphs: profile plans per rank range, a compatibility check, the
engine builder and the engine runtime. Torch-free; ``tensorrt`` and ``cuda-python`` are imported
only when an engine is built or run (on a Jetson they come with JetPack)."""

from .build import BuildOptions, build_engine
from .compat import check_graph
from .engine import NSNEngine
from .plan import EnginePlan, Profile, RankRange, ShapeBounds, make_plan, parse_ranges, plan_for_export

__all__ = ["NSNEngine", "BuildOptions", "build_engine", "check_graph", "EnginePlan", "Profile", "RankRange",
           "ShapeBounds", "make_plan", "parse_ranges", "plan_for_export"]
