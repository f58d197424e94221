"""Self-check on a real Jetson: does nsn-export's TensorRT path work on this device?

    python scripts/jetson_selfcheck.py [--export EXPORT_DIR] [--work DIR] [--report report.json]

Prints PASS/FAIL per step and writes a JSON report to attach to a bug report:
1. platform: L4T release (/etc/nv_tegra_release), TensorRT, CUDA runtime and the GPU;
2. an export: EXPORT_DIR, or a tiny random Llama exported here (needs torch + transformers);
3. nsn-trt check, then an engine with two rank ranges (prefill + decode profiles each);
4. TensorRT against ONNX Runtime at ranks in each range (prefill and one decode step);
5. greedy generation with rank switches inside and across ranges: the same tokens as ONNX Runtime;
6. decode latency per rank, and the added cost of a switch across ranges (a profile switch)
   against a switch inside a range;
7. the sensors a rank governor can read (thermal zones, power supplies, INA3221 power rails).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy import NSNSession  # noqa: E402
from deploy.atomic import atomic_file, check_output_files  # noqa: E402
from deploy.tensorrt.build import BuildOptions, build_engine, import_tensorrt, tensorrt_version  # noqa: E402
from deploy.tensorrt.compat import check_graph  # noqa: E402
from deploy.tensorrt.cuda import Cuda  # noqa: E402
from deploy.tensorrt.engine import NSNEngine  # noqa: E402
from deploy.tensorrt.plan import ShapeBounds, plan_for_export  # noqa: E402

PROMPT = [5, 17, 3, 60, 22, 9]
BOUNDS = ShapeBounds(max_seq=64, max_context=128, opt_seq=16, opt_context=32)


def require(trt):
    """The TensorRT module, or the reason it is missing (a FAIL of the step that needs it)."""
    if trt is None:
        raise RuntimeError("TensorRT is not importable (see the 'import tensorrt' step); on JetPack 6 create the "
                           "virtual environment with --system-site-packages")
    return trt


class SelfCheck:
    def __init__(self):
        self.steps: list[dict] = []

    def step(self, name: str, function):
        start = time.perf_counter()
        try:
            details = function() or {}
            status = "PASS"
        except Exception as error:  # every failure is reported, then the next step runs
            details = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=3)}
            status = "FAIL"
        self.steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
                           **details})
        print(f"[{status}] {name}: {details.get('error') or json.dumps(details)[:200]}", flush=True)
        return status == "PASS"


def platform_info(root: Path, trt, cudart) -> dict:
    release = root / "etc" / "nv_tegra_release"
    cuda = Cuda(cudart)
    info = {"machine": platform.machine(), "l4t": release.read_text().splitlines()[0] if release.is_file() else None,
            "tensorrt": tensorrt_version(trt), "cuda_runtime": cuda.call(cuda.rt.cudaRuntimeGetVersion()),
            **cuda.device_description()}
    cuda.close()
    if info["l4t"] is None:
        raise RuntimeError(f"not a Jetson ({release} is missing); the other steps still run: {info}")
    return info


def tiny_export(work: Path) -> Path:
    """A tiny random Llama, NSN-adapted and exported (needs torch and transformers)."""
    import torch
    import transformers

    import nsn_export as nsn
    from nsn_export.export import export_onnx

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    nsn.adapt(model, "all-linear", max_rank=16)
    return export_onnx(model, work / "tiny-export", overwrite=True).path.parent


def compatibility(export: Path) -> dict:
    problems = check_graph(export)
    if problems:
        raise RuntimeError("; ".join(map(str, problems)))
    return {"problems": []}


def compare_ranks(engine: NSNEngine, session: NSNSession, ranks: list[int]) -> dict:
    worst = 0.0
    for rank in ranks:
        engine.rank = session.rank = rank
        ids = np.array([PROMPT], np.int64)
        logits_e, cache_e = engine.decode_step(ids, None, 0)
        logits_s, cache_s = session.decode_step(ids, None, 0)
        step_e, cache_e = engine.decode_step(np.array([[7]], np.int64), cache_e, len(PROMPT))
        step_s, _ = session.decode_step(np.array([[7]], np.int64), cache_s, len(PROMPT))
        engine.release_cache(cache_e)
        for a, b in ((logits_e, logits_s), (step_e, step_s)):
            worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12)))
    if worst > 1e-3:
        raise RuntimeError(f"TensorRT differs from ONNX Runtime by {worst:.2e} (relative) at ranks {ranks}")
    return {"ranks": ranks, "max_relative_error": worst}


def same_generation(engine: NSNEngine, session: NSNSession, schedule: dict) -> dict:
    by_engine = engine.generate(PROMPT, max_new_tokens=24, stop_ids=set(), rank_at=schedule.get)
    by_session = session.generate(PROMPT, max_new_tokens=24, stop_ids=set(), rank_at=schedule.get)
    if by_engine.token_ids != by_session.token_ids:
        raise RuntimeError(f"tokens differ: TensorRT {by_engine.token_ids} vs ONNX Runtime {by_session.token_ids}")
    return {"schedule": {str(k): v for k, v in schedule.items()}, "tokens": by_engine.token_ids,
            "profile_switches": engine.profile_switches}


def decode_timing(engine: NSNEngine, ranks: list[int], repeats: int = 30) -> dict:
    """Median decode ms per rank; then the same decode alternating two ranks inside one range and
    alternating across the two ranges: the difference is what a profile switch adds."""
    ids = np.array([PROMPT], np.int64)

    def decode_ms(rank_for_call) -> float:
        engine.rank = rank_for_call(0)
        _, cache = engine.decode_step(ids, None, 0)
        timings, past = [], len(PROMPT)
        for call in range(repeats):
            engine.rank = rank_for_call(call)
            start = time.perf_counter()
            _, cache = engine.decode_step(np.array([[7]], np.int64), cache, past)
            timings.append((time.perf_counter() - start) * 1e3)
            past += 1
        engine.release_cache(cache)
        return statistics.median(timings)

    per_rank = {str(r): round(decode_ms(lambda call, r=r: r), 3) for r in ranks}
    low_range, high_range = engine.plan.ranges[0], engine.plan.ranges[-1]
    inside = decode_ms(lambda call: (low_range.low, low_range.high)[call % 2])
    across = decode_ms(lambda call: (low_range.high, high_range.low)[call % 2])
    return {"decode_ms_by_rank": per_rank, "alternating_inside_range_ms": round(inside, 3),
            "alternating_across_ranges_ms": round(across, 3), "profile_switch_cost_ms": round(across - inside, 3)}


def governor_sensors(root: Path) -> dict:
    def read(path: Path):
        try:
            return path.read_text().strip()
        except OSError:
            return None

    zones = {read(z / "type"): read(z / "temp") for z in sorted((root / "sys/class/thermal").glob("thermal_zone*"))}
    supplies = {s.name: read(s / "type") for s in sorted((root / "sys/class/power_supply").glob("*"))}
    rails = {read(label): read(label.with_name(label.name.replace("_label", "_input").replace("in", "curr", 1)))
             for label in sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*/in*_label"))}
    return {"thermal_zones_millic": zones, "power_supplies": supplies, "ina3221_rails_ma": rails}


def main(argv=None, trt=None, cudart=None, root: Path = Path("/")) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="an nsn-export directory (default: a tiny one)")
    parser.add_argument("--work", type=Path, default=Path("runs/jetson-selfcheck"))
    parser.add_argument("--report", type=Path, default=Path("runs/jetson-selfcheck/report.json"))
    args = parser.parse_args(argv)
    check, state = SelfCheck(), {}
    check_output_files({"--report": args.report}, [args.export])
    if trt is None and not check.step("import tensorrt", lambda: {"tensorrt": tensorrt_version(
            state.setdefault("trt", import_tensorrt()))}):
        trt = None  # every TensorRT step below is reported as FAIL; the sensors are still read
    trt = trt or state.get("trt")
    check.step("platform", lambda: platform_info(root, require(trt), cudart))
    if check.step("export", lambda: {"export": str(state.setdefault("export", args.export or tiny_export(args.work)))}):
        export = state["export"]
        check.step("nsn-trt check", lambda: compatibility(export))
        plan = plan_for_export(export, "2", BOUNDS)
        built = check.step("build two rank ranges", lambda: {"engine": str(build_engine(
            export, args.work / "engine", plan, BuildOptions(workspace_mib=512), trt=require(trt), cudart=cudart)),
            "ranges": [str(r) for r in plan.ranges]})
        if built:
            engine = NSNEngine(args.work / "engine", trt=trt, cudart=cudart)
            session = NSNSession(export, providers=["CPUExecutionProvider"])
            ranks = [r for rr in plan.ranges for r in (rr.low, rr.high)]
            check.step("TensorRT vs ONNX Runtime in each range", lambda: compare_ranks(engine, session, ranks))
            low, high = plan.ranges[0], plan.ranges[-1]
            schedule = {0: high.high, 6: high.low, 12: low.high, 18: high.opt}
            check.step("generation switching ranks", lambda: same_generation(engine, session, schedule))
            check.step("decode latency and switch cost", lambda: decode_timing(engine, ranks))
            engine.close()
    check.step("governor sensors", lambda: governor_sensors(root))
    atomic_file(args.report, json.dumps({"steps": check.steps}, indent=1) + "\n")
    failed = [s["step"] for s in check.steps if s["status"] == "FAIL"]
    print(f"{len(check.steps) - len(failed)} of {len(check.steps)} steps passed; report: {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
