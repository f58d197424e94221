"""``nsn-serve``: an OpenAI-compatible HTTP server for an nsn-export directory (ONNX Runtime) or an
nsn-trt engine directory (TensorRT), with the rank governor inside."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import click

from ..cli import FiniteFloat, needs_extra, user_errors

log = logging.getLogger("nsn.serve")


def runtime_label(runtime) -> str:
    plan = getattr(runtime, "plan", None)
    if plan is not None:
        return f"TensorRT {runtime.providers[0]}"
    import onnxruntime

    device = "GPU" if runtime.providers[0] == "CUDAExecutionProvider" else "CPU"
    return f"ONNX Runtime {onnxruntime.__version__} {device}"


def context_limits(runtime) -> tuple[int, int]:
    """(longest prompt, longest prompt + completion): the model's, or within a TensorRT engine's profiles."""
    from ..text import model_max_length

    model_limit = model_max_length(runtime.model_dir)
    plan = getattr(runtime, "plan", None)
    if plan is not None:
        return min(runtime.max_length, plan.bounds.max_seq), min(model_limit, plan.bounds.max_context)
    return runtime.max_length, model_limit


@click.command(context_settings={"show_default": True})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it on every network)")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="0: any free port (printed at start)")
@click.option("--model-name", default=None, help="the model id clients send [default: the directory's name]")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="governor policy TOML [default: the shipped example]")
@click.option("--no-governor", is_flag=True, help="serve at a fixed rank (--rank, else the maximum)")
@click.option("--sysfs-root", type=click.Path(path_type=Path), default=Path("/"), help="read sensors under this root")
@click.option("--period-s", default=1.0, type=FiniteFloat(0.05, 3600), help="seconds between governor ticks")
@click.option("--rank", default=None, type=click.IntRange(min=1),
              help="with --no-governor: the rank served; with a governor: a manual cap (the override)")
@click.option("--api-key", default=None, envvar="NSN_API_KEY", show_envvar=True,
              help="require Authorization: Bearer KEY on /v1 routes (prefer the environment variable)")
@click.option("--max-queue", default=64, type=click.IntRange(1, 100_000), help="waiting requests before 503s")
@click.option("--max-tokens", default=512, type=click.IntRange(1, 1_000_000), help="largest max_tokens a request may ask")
@click.option("--max-body-mib", default=1.0, type=FiniteFloat(0.001, 1024), help="largest request body")
@click.option("--shutdown-timeout", default=30.0, type=FiniteFloat(0, 3600),
              help="on SIGTERM/SIGINT: seconds to finish the requests in flight")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="the governor's decisions, one JSON line per tick")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads")
@user_errors
@needs_extra("serve")
def serve_command(model_dir, host, port, model_name, policy_path, no_governor, sysfs_root, period_s, rank, api_key,
                  max_queue, max_tokens, max_body_mib, shutdown_timeout, log_path, threads):
    """Serve MODEL_DIR over the OpenAI API, its rank governed by the device's temperature and battery."""
    import uvicorn

    from ..atomic import check_output_files
    from ..governor.config import load_policy
    from ..governor.sensors import SysfsSensors
    from .app import ServerState, create_app
    from .metrics import Metrics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_output_files({"--log": log_path}, [model_dir, policy_path])
    if not (model_dir / "engine.json").is_file() and not (model_dir / "model.onnx").is_file():
        raise FileNotFoundError(f"{model_dir}: neither an nsn-export directory (model.onnx) nor an nsn-trt engine "
                                f"directory (engine.json); run nsn-export first")
    policy = None if no_governor else load_policy(policy_path)
    sensors = None if no_governor else SysfsSensors(sysfs_root)
    state = ServerState(model_name=model_name or model_dir.resolve().name, api_key=api_key or None,
                        max_tokens=max_tokens, metrics=None)
    state.metrics = Metrics(state.model_name)

    def load() -> None:
        try:
            start_model(state, model_dir, policy, sensors, rank, max_queue, period_s, log_path, threads)
        except Exception as error:  # reported by /health and every route; the process keeps answering
            log.error("loading %s failed: %s", model_dir, error)
            state.load_error = str(error)

    def unload() -> None:
        scheduler, governor = state.scheduler, state.governor
        if scheduler is not None:
            scheduler.drain(shutdown_timeout)
            scheduler.stop()
        if governor is not None:
            governor.stop()
        if state.ticker is not None:
            state.ticker.set()

    app = create_app(state, load=load, unload=unload, max_body_bytes=int(max_body_mib * 2**20))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    server = make_server(config, state)
    started = threading.Thread(target=announce, args=(server, state), daemon=True)
    started.start()
    server.run()
    if state.load_error:
        raise click.ClickException(f"the model failed to load: {state.load_error}")


def start_model(state, model_dir: Path, policy, sensors, rank, max_queue, period_s, log_path, threads,
                runtime=None) -> None:
    """Load the runtime (unless given one), start the scheduler and the governor; ``/health`` turns
    200 after this."""
    from ..governor.cli import open_runtime, thermal_control
    from ..governor.loop import Governor
    from ..text import load_tokenizer
    from .chat import ChatTemplate
    from .scheduler import Scheduler

    runtime = runtime or open_runtime(model_dir, intra_op_threads=threads)
    scheduler = Scheduler(runtime, max_queue=max_queue, metrics=state.metrics)
    state.scheduler = scheduler
    state.runtime_label = runtime_label(runtime)
    state.prompt_limit, state.context_limit = context_limits(runtime)
    state.chat_template = ChatTemplate.from_model_dir(model_dir) if runtime.info.task == "text-generation" else None
    state.tokenizer = load_tokenizer(model_dir)  # the routes' own copy
    state.metrics.info.labels(model_name=state.model_name, runtime=state.runtime_label,
                              max_rank=str(runtime.info.max_rank)).set(1)
    if policy is None:
        if rank is not None:
            scheduler.set_rank(min(rank, runtime.info.max_rank))
        state.levels = [scheduler.ceiling]
        state.events.notes = ["no governor (--no-governor): a fixed rank"]
        state.ticker = tick_without_governor(state, period_s)
    else:
        def on_decision(decision) -> None:
            scheduler.reason = governor_reason(decision, governor)
            state.metrics.decision(decision)
            state.metrics.rails(decision.readings.get("rails_w") or {})
            state.events.publish(state, decision)

        governor = Governor(sensors, policy, scheduler, runtime.info.max_rank, runtime.info.flops, log_path=log_path,
                            on_decision=on_decision)
        if rank is not None:
            governor.override(min(rank, runtime.info.max_rank))
        state.governor, state.levels = governor, governor.levels.ranks
        zones = (policy.thermal or {}).get("zones", [])
        state.events.sensors = {**sensors.describe(), "thermal_control": thermal_control(sensors, zones),
                                "trip_c": sensors.trip_c(zones)}
        state.events.notes = governor.notes
        governor.start(period_s)
    scheduler.start()
    state.ready = True


def governor_reason(decision, governor) -> str:
    """The binding policy and its reason, in words; when no policy limits the rank, why it is where
    it is (climbing back after a limit, one level per dwell)."""
    binding = min(decision.ceilings, key=lambda c: c["work"])
    if binding["work"] < 1:
        return f"{binding['policy']}: {binding['reason']}"
    if decision.rank < governor.levels.ranks[-1]:
        return f"no policy limits the rank: climbing back one level every {governor.config.min_dwell_s:g} s"
    return "no policy limits the rank"


def tick_without_governor(state, period_s: float) -> threading.Event:
    """Without a governor the page still gets a tick a second (rank, throughput, queue)."""
    stop = threading.Event()

    def run():
        while not stop.wait(period_s):
            state.events.publish(state)

    threading.Thread(target=run, name="nsn-ticker", daemon=True).start()
    return stop


def announce(server, state) -> None:
    """One JSON line on stdout once the port is bound (``--port 0``: the port chosen)."""
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        sockets = [s for srv in server.servers for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else ("?", 0)
        print(json.dumps({"listening": f"http://{host}:{port}", "model": state.model_name}), flush=True)


def make_server(config, state):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT first turn new requests into 503s, then uvicorn finishes
        those in flight (up to the graceful timeout), and the process exits 0 (uvicorn would re-raise
        the signal and exit with its status)."""

        def __init__(self, config, state):
            super().__init__(config)
            self.nsn_state = state

        def handle_exit(self, sig, frame):
            self.nsn_state.draining = True
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server(config, state)
