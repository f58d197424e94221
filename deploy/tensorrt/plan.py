"""The optimization-profile plan of a TensorRT engine: which rank ranges and shapes each profile
covers. Pure Python (no TensorRT): ``nsn-trt plan`` prints it, the builder consumes it and the
engine manifest records it.

Each rank range gets one profile per phase, as TensorRT-LLM splits context and generation:
decoders a **prefill** profile (a prompt, empty KV cache; opt = a typical prompt length) and a
**decode** profile (one new token; opt = a typical context); encoders one **encode** profile
(batch x sequence). Every profile gives a range for every dynamic input and for the ``rank``
shape input, because TensorRT refuses a build otherwise.

Opt rank of a range: the rank whose FLOPs are closest to the middle of the range's FLOPs span.
Latency is close to linear in FLOPs, so kernels tuned there are never more than half a range
from either end; choosing an end would tune for one end at the other's expense.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..metadata import NSNModelInfo, OptionValueError
from ..speculative import MAX_DRAFT_TOKENS

PLAN_FORMAT_VERSION = 1
PHASES = {"text-generation": ("prefill", "decode"), "feature-extraction": ("encode",)}
RANGE_SPEC = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class RankRange:
    low: int
    high: int
    opt: int

    def __contains__(self, rank: int) -> bool:
        return self.low <= rank <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class ShapeBounds:
    """Batch, sequence and KV-context bounds of every profile (``nsn-trt build`` flags)."""

    max_batch: int = 1
    max_seq: int = 512
    max_context: int = 1024
    opt_seq: int = 64
    opt_context: int = 256
    opt_batch: int = 1
    draft_tokens: int = 0  # self-speculative decoding: decode profiles take up to 1 + draft_tokens new tokens

    def check(self, task: str) -> None:
        for name in ("max_batch", "max_seq", "max_context", "opt_seq", "opt_context", "opt_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.draft_tokens, int) or not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise OptionValueError(f"--draft-tokens must be an integer in [0, {MAX_DRAFT_TOKENS}], got "
                                   f"{self.draft_tokens!r}")
        if not self.opt_batch <= self.max_batch:
            raise OptionValueError(f"opt batch {self.opt_batch} is above --max-batch {self.max_batch}; lower it")
        if not self.opt_seq <= self.max_seq:
            raise OptionValueError(f"--opt-seq {self.opt_seq} is above --max-seq {self.max_seq}; lower it or raise "
                                   f"--max-seq")
        if task == "text-generation" and not (self.max_seq <= self.max_context and self.opt_context < self.max_context):
            raise OptionValueError(f"decoders need --max-seq ({self.max_seq}) <= --max-context ({self.max_context}) and "
                             f"--opt-context ({self.opt_context}) < --max-context: the cache holds the prompt")


@dataclass(frozen=True)
class Profile:
    index: int
    phase: str
    ranks: RankRange
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def accepts(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.shapes[name]
        return len(shape) == len(low) and all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))


@dataclass
class EnginePlan:
    task: str
    max_rank: int
    bounds: ShapeBounds
    ranges: list[RankRange]
    profiles: list[Profile] = field(default_factory=list)
    format_version: int = PLAN_FORMAT_VERSION

    def profile_for(self, rank: int, phase: str) -> Profile:
        for profile in self.profiles:
            if profile.phase == phase and rank in profile.ranks:
                return profile
        raise ValueError(f"no {phase} profile covers rank {rank}; this engine serves ranks "
                         f"{', '.join(map(str, self.ranges))} for phases {', '.join(PHASES[self.task])}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "EnginePlan":
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"{source}: unknown engine plan format {data.get('format_version')!r} (this nsn-export "
                             f"reads {PLAN_FORMAT_VERSION}); rebuild the engine with nsn-trt build")
        try:
            return cls(task=data["task"], max_rank=int(data["max_rank"]), bounds=ShapeBounds(**data["bounds"]),
                       ranges=[RankRange(**r) for r in data["ranges"]],
                       profiles=[Profile(p["index"], p["phase"], RankRange(**p["ranks"]),
                                         {k: tuple(tuple(int(d) for d in s) for s in v)
                                          for k, v in p["shapes"].items()}) for p in data["profiles"]])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: damaged engine plan ({type(error).__name__}: {error}); rebuild the engine "
                             f"with nsn-trt build") from None

    def table(self) -> list[dict]:
        """One row per profile, for printing."""
        return [{"profile": p.index, "phase": p.phase, "ranks": str(p.ranks), "opt_rank": p.ranks.opt,
                 **{name: f"{list(lo)}..{list(hi)} (opt {list(opt)})" for name, (lo, opt, hi) in p.shapes.items()
                    if lo != hi}} for p in self.profiles]


def opt_rank(info: NSNModelInfo, low: int, high: int) -> int:
    """The rank in ``[low, high]`` whose FLOPs are nearest the middle of the range's FLOPs."""
    middle = (info.flops(low) + info.flops(high)) / 2
    return min(range(low, high + 1), key=lambda r: (abs(info.flops(r) - middle), r))


def ranges_from_bounds(info: NSNModelInfo, pairs: list[tuple[int, int]], spec: str) -> list[RankRange]:
    """Check that ``pairs`` cover ``[1, max_rank]`` without gaps or overlaps, in order."""
    expected = 1
    for low, high in pairs:
        if low < 1:
            raise OptionValueError(f"--profiles {spec!r}: range {low}-{high} starts below rank 1; ranks start at 1")
        if low != expected:
            problem = "a gap" if low > expected else "an overlap"
            raise OptionValueError(f"--profiles {spec!r}: {problem} at rank {min(low, expected)} (range {low}-{high}); "
                             f"ranges must cover [1, {info.max_rank}] in order, e.g. 1-{info.max_rank // 2},"
                             f"{info.max_rank // 2 + 1}-{info.max_rank}")
        if high < low:
            raise OptionValueError(f"--profiles {spec!r}: range {low}-{high} is empty; write LOW-HIGH with LOW <= HIGH")
        expected = high + 1
    if expected != info.max_rank + 1:
        raise OptionValueError(f"--profiles {spec!r}: the ranges end at {expected - 1}, the model's ranks go to "
                         f"{info.max_rank}; the last range must end at {info.max_rank}")
    return [RankRange(low, high, opt_rank(info, low, high)) for low, high in pairs]


def equal_flops_ranges(info: NSNModelInfo, count: int) -> list[RankRange]:
    """``count`` ranges whose FLOPs spans are as equal as whole ranks allow."""
    if not 1 <= count <= info.max_rank:
        raise OptionValueError(f"--profiles {count}: the number of rank ranges must be in [1, {info.max_rank}]")
    lowest, highest = info.flops(1), info.flops(info.max_rank)
    ends: list[int] = []
    for k in range(1, count):
        target = lowest + (highest - lowest) * k / count
        end = max((r for r in range(1, info.max_rank + 1) if info.flops(r) <= target), default=1)
        ends.append(min(max(end, ends[-1] + 1 if ends else 1), info.max_rank - (count - k)))  # >= 1 rank each
    ends.append(info.max_rank)
    return ranges_from_bounds(info, list(zip([1] + [e + 1 for e in ends[:-1]], ends)), str(count))


def parse_ranges(spec: str, info: NSNModelInfo, model_path: str | Path | None = None) -> list[RankRange]:
    """``"1-64,65-192,193-448"`` (explicit ranges), ``"3"`` (that many ranges of equal FLOPs span), or
    ``frontier.json`` (the ranges nsn-calibrate recommends; checked to be of ``model_path``)."""
    spec = str(spec).strip()
    if spec.isdigit():
        return equal_flops_ranges(info, int(spec))
    if spec.endswith(".json"):
        from ..frontier import read_frontier

        return parse_ranges(read_frontier(spec, model_path)["profiles"], info)
    pairs = []
    for part in spec.split(","):
        match = RANGE_SPEC.match(part)
        if not match:
            raise OptionValueError(f"--profiles {spec!r}: {part.strip()!r} is not LOW-HIGH; give e.g. "
                             f"1-{info.max_rank // 2},{info.max_rank // 2 + 1}-{info.max_rank} or a count such as 2")
        pairs.append((int(match.group(1)), int(match.group(2))))
    return ranges_from_bounds(info, pairs, spec)


def dimension_values(phase: str, bounds: ShapeBounds) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension an Optimum-exported graph uses, per phase."""
    batch = (1, bounds.opt_batch, bounds.max_batch)
    if phase == "prefill":
        return {"batch_size": batch, "sequence_length": (1, bounds.opt_seq, bounds.max_seq),
                "past_sequence_length": (0, 0, 0)}
    if phase == "decode":  # one new token, or a speculative round's drafts and the token after them
        return {"batch_size": batch, "sequence_length": (1, 1, 1 + bounds.draft_tokens),
                "past_sequence_length": (1, bounds.opt_context, bounds.max_context - 1)}
    return {"batch_size": batch, "sequence_length": (1, bounds.opt_seq, bounds.max_seq)}


def evaluate_dimension(dim: int | str, values: dict[str, tuple[int, int, int]], where: str) -> tuple[int, int, int]:
    """A graph dimension (an int, a symbol, or a sum such as ``past_sequence_length + sequence_length``)
    as (min, opt, max)."""
    if isinstance(dim, int):
        return dim, dim, dim
    total = [0, 0, 0]
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            term_values = (int(term),) * 3
        elif term in values:
            term_values = values[term]
        else:
            raise ValueError(f"{where}: dynamic dimension {dim!r} is not one the planner knows "
                             f"({', '.join(values)}); re-export the model with nsn-export")
        total = [t + v for t, v in zip(total, term_values)]
    return tuple(total)


def make_plan(info: NSNModelInfo, inputs: dict[str, list[int | str]], ranges: list[RankRange],
              bounds: ShapeBounds) -> EnginePlan:
    """One profile per (rank range, phase); ``inputs`` are the graph's inputs and their dims (ints
    or symbols), ``rank`` excluded."""
    if info.task not in PHASES:
        raise ValueError(f"task {info.task!r} has no TensorRT plan; supported: {', '.join(PHASES)}")
    bounds.check(info.task)
    plan = EnginePlan(info.task, info.max_rank, bounds, ranges)
    for rank_range in ranges:
        for phase in PHASES[info.task]:
            values = dimension_values(phase, bounds)
            shapes = {}
            for name, dims in inputs.items():
                per_dim = [evaluate_dimension(d, values, f"input {name!r}") for d in dims]
                shapes[name] = tuple(tuple(d[i] for d in per_dim) for i in range(3))
            plan.profiles.append(Profile(len(plan.profiles), phase, rank_range, shapes))
    return plan


def graph_inputs(model) -> dict[str, list[int | str]]:
    """The ONNX graph's inputs (``rank`` excluded) with their dims: ints, or symbol strings."""
    inputs = {}
    for value in model.graph.input:
        if value.name == "rank":
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return inputs


def plan_for_export(export_dir: str | Path, profiles: str, bounds: ShapeBounds) -> EnginePlan:
    """The plan for an nsn-export directory (reads only the graph's structure and metadata)."""
    from ..external_data import load_graph, model_file

    model_path = model_file(export_dir)
    model = load_graph(model_path)
    info = NSNModelInfo.from_props({p.key: p.value for p in model.metadata_props}, source=str(export_dir))
    return make_plan(info, graph_inputs(model), parse_ranges(profiles, info, model_path), bounds)


def plan_json(plan: EnginePlan) -> str:
    return json.dumps(plan.to_dict(), indent=1)
