"""``nsn-serve``: an OpenAI-compatible HTTP server for an nsn-export directory (ONNX Runtime) or an
nsn-trt engine directory (TensorRT), with the rank governor inside."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import click

from ..batch import DEFAULT_PREFILL_CHUNK, MAX_PREFILL_CHUNK
from ..cli import FiniteFloat, Threads, levels_option, needs_extra, speculative_option, user_errors

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
@click.option("--no-governor", is_flag=True, help="serve at a fixed rank (--rank, else the highest rank that costs no "
                                                  "more than the dense model)")
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
@click.option("--threads", default=None, type=Threads(), help="ONNX Runtime intra-op threads")
@click.option("--request-timeout-s", default=30.0, type=FiniteFloat(1, 3600),
              help="a request's headers, and then its body, must arrive within this (slow clients are cut off)")
@levels_option
@speculative_option
@click.option("--no-batching", is_flag=True,
              help="decode one sequence per call, in turn (default: every generation at one rank in one call)")
@click.option("--prefill-chunk", default=DEFAULT_PREFILL_CHUNK, type=click.IntRange(1, MAX_PREFILL_CHUNK),
              help="prompt tokens read per step between decode steps (batching): smaller keeps running streams "
                   "smoother while a long prompt arrives, larger reads it sooner")
@click.option("--no-read-beside", is_flag=True,
              help="read long prompts between decode steps only (default on ONNX Runtime CPU with 2+ threads: on "
                   "a second session and thread beside the steps, which doubles the levels' memory)")
@user_errors
@needs_extra("serve")
def serve_command(model_dir, host, port, model_name, policy_path, no_governor, sysfs_root, period_s, rank, api_key,
                  max_queue, max_tokens, max_body_mib, shutdown_timeout, log_path, threads, request_timeout_s, levels,
                  draft_rank, no_batching, prefill_chunk, no_read_beside):
    """Serve MODEL_DIR over the OpenAI API, its rank governed by the device's temperature and battery."""
    import uvicorn

    from ..atomic import check_output_files
    from ..governor.config import load_policy
    from ..governor.sensors import SysfsSensors
    from .app import ServerState, create_app
    from .metrics import Metrics

    from ..metadata import read_model_info, validate_rank
    from .guard import request_deadline_protocol

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if no_governor:
        for option, value in (("--policy", policy_path), ("--log", log_path)):
            if value is not None:
                raise click.UsageError(f"{option} is the governor's, and --no-governor turns the governor off; "
                                       f"drop one of them")
    check_host(host, api_key)
    check_output_files({"--log": log_path}, [model_dir, policy_path])
    if log_path is not None and not os.access(log_path.parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{log_path}: its directory {log_path.parent} does not exist or is not writable; "
                                 f"create it or choose another path", param_hint="--log")
    if not (model_dir / "engine.json").is_file() and not (model_dir / "model.onnx").is_file():
        raise FileNotFoundError(f"{model_dir}: neither an nsn-export directory (model.onnx) nor an nsn-trt engine "
                                f"directory (engine.json); run nsn-export first")
    if rank is not None:
        validate_rank(rank, read_model_info(model_dir).max_rank, "--rank")
    if draft_rank is not None:
        info = read_model_info(model_dir)
        if info.task != "text-generation":
            raise click.BadParameter(f"{model_dir} is an encoder ({info.task}): there is nothing to draft",
                                     param_hint="--speculative")
        validate_rank(draft_rank, info.max_rank - 1, "--speculative")
    policy = None if no_governor else load_policy(policy_path)
    sensors = None if no_governor else SysfsSensors(sysfs_root)
    state = ServerState(model_name=model_name or model_dir.resolve().name, api_key=api_key or None,
                        max_tokens=max_tokens, metrics=None)
    state.metrics = Metrics(state.model_name)

    def load() -> None:
        try:
            start_model(state, model_dir, policy, sensors, rank, max_queue, period_s, log_path, threads, levels=levels,
                        draft_rank=draft_rank, batching=not no_batching, prefill_chunk=prefill_chunk,
                        read_beside=not no_read_beside)
        except Exception as error:  # reported by /health and every route; the process keeps answering
            log.error("loading %s failed: %s", model_dir, error)
            state.load_error = str(error)

    def drain(cut: threading.Event | None = None) -> None:
        state.draining = True
        scheduler = state.scheduler
        if scheduler is not None:
            if not scheduler.drain(shutdown_timeout, cut):
                log.warning("shutting down: ending %d request(s) still running", scheduler.busy())
            scheduler.stop()

    def unload() -> None:
        drain()
        governor = state.governor
        if governor is not None:
            governor.stop()
        if state.ticker is not None:
            state.ticker.set()

    app = create_app(state, load=load, unload=unload, max_body_bytes=int(max_body_mib * 2**20),
                     request_timeout_s=request_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=FLUSH_S,
                            access_log=False, http=request_deadline_protocol(request_timeout_s))
    server = make_server(config, drain)
    started = threading.Thread(target=announce, args=(server, state), daemon=True)
    started.start()
    server.run()
    if state.load_error:
        raise click.ClickException(f"the model failed to load: {state.load_error}")


def check_host(host: str, api_key: str | None) -> None:
    """``--host`` must name an address this machine can bind; one that other machines can reach gets
    a warning when no API key guards it."""
    import ipaddress
    import socket

    if not host.strip():
        raise click.BadParameter("'' is empty (an empty $HOST?), which would listen on every network; give "
                                 "127.0.0.1, or 0.0.0.0 to expose the server on purpose", param_hint="--host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as error:
        raise click.BadParameter(f"{host!r} is not an address of this machine ({error}); give 127.0.0.1, a local "
                                 f"interface's address or 0.0.0.0", param_hint="--host") from None
    loopback = all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)
    if not loopback and not api_key:
        click.echo(f"warning: --host {host} is reachable from other machines and no API key is set: anyone who "
                   f"reaches it can use the model; set NSN_API_KEY (or --api-key)", err=True)


def start_model(state, model_dir: Path, policy, sensors, rank, max_queue, period_s, log_path, threads,
                runtime=None, levels: bool = True, draft_rank: int | None = None, batching: bool = True,
                prefill_chunk: int = DEFAULT_PREFILL_CHUNK, read_beside: bool = True) -> None:
    """Load the runtime (unless given one), start the scheduler and the governor; ``/health`` turns
    200 after this."""
    from ..governor.cli import thermal_control
    from ..governor.loop import Governor
    from ..runtime import open_runtime
    from ..text import load_tokenizer
    from .chat import ChatTemplate
    from .scheduler import Scheduler

    runtime = runtime or open_runtime(model_dir, intra_op_threads=threads, levels=levels)
    if draft_rank is not None and not runtime.supports_speculation:
        raise ValueError(f"--speculative: {runtime_label(runtime)} cannot verify drafts (build the engine with "
                         f"nsn-trt build --draft-tokens K, or serve without --speculative)")
    if draft_rank is None and policy is not None and policy.frontier and runtime.supports_speculation:
        draft_rank = frontier_draft(policy.frontier, runtime)
    scheduler = Scheduler(runtime, max_queue=max_queue, metrics=state.metrics, draft_rank=draft_rank,
                          batching=batching, prefill_chunk=prefill_chunk, read_beside=read_beside)
    state.scheduler = scheduler
    state.runtime_label = runtime_label(runtime)
    state.prompt_limit, state.context_limit = context_limits(runtime)
    state.chat_template = ChatTemplate.from_model_dir(model_dir) if runtime.info.task == "text-generation" else None
    state.tokenizer = load_tokenizer(model_dir)  # the routes' own copy
    state.metrics.info.labels(model_name=state.model_name, runtime=state.runtime_label,
                              max_rank=str(runtime.info.max_rank)).set(1)
    if policy is None:
        if rank is not None:
            scheduler.set_rank(rank)
        state.levels = [scheduler.ceiling]
        state.events.notes = ["no governor (--no-governor): a fixed rank"]
        state.ticker = tick_without_governor(state, period_s)
    else:
        def on_decision(decision) -> None:
            scheduler.reason = governor_reason(decision, governor)
            state.metrics.decision(decision)
            state.metrics.rails(decision.readings.get("rails_w") or {})
            state.events.publish(state, decision)

        governor = Governor(sensors, policy, scheduler, runtime.info.max_rank, runtime.level_flops, log_path=log_path,
                            on_decision=on_decision, dense_flops=runtime.info.dense_flops)
        if rank is not None:
            governor.override(rank)
        state.governor, state.levels = governor, governor.levels.ranks
        zones = (policy.thermal or {}).get("zones", [])
        state.events.sensors = {**sensors.describe(), "thermal_control": thermal_control(sensors, zones),
                                "trip_c": sensors.trip_c(zones)}
        state.events.notes = governor.notes
        governor.start(period_s)
    state.events.notes = [*state.events.notes, scheduler.batching]
    scheduler.start()
    state.ready = True


def frontier_draft(path, runtime) -> int | None:
    """The draft rank the frontier names for self-speculative decoding (``nsn-calibrate`` found it
    faster than plain decoding on this device), if any."""
    from ..frontier import read_frontier

    found = read_frontier(path, getattr(runtime, "model_path", None)).get("speculative") or {}
    draft = found.get("draft_rank")
    if draft is not None and draft < runtime.info.max_rank:
        log.info("self-speculative decoding: rank %d drafts (%sx plain decoding in %s)", draft, found.get("speedup"),
                 path)
        return draft
    return None


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


FLUSH_S = 5.0  # after the drain: time for the final events to reach the clients before connections close


def make_server(config, drain):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with the drain SERVING.md describes. The first SIGTERM/SIGINT runs
        ``drain(cut)`` on a thread while the port stays open (new work gets 503 with Retry-After):
        the requests in flight finish, or at the shutdown timeout end with an error event, and then
        uvicorn closes the connections. A second signal sets ``cut`` (the drain ends at once), a
        third exits without waiting. The process exits 0 (uvicorn would re-raise the signal)."""

        def __init__(self, config):
            super().__init__(config)
            self.cut = threading.Event()
            self.draining: threading.Thread | None = None

        def handle_exit(self, sig, frame):
            if self.draining is None:
                self.draining = threading.Thread(target=self.drain, name="nsn-drain", daemon=True)
                self.draining.start()
            elif not self.cut.is_set():
                log.warning("second signal: ending the drain now")
                self.cut.set()
            else:
                self.force_exit = self.should_exit = True

        def drain(self):
            try:
                drain(self.cut)
            except Exception:  # the process must still exit
                log.exception("draining failed")
            self.should_exit = True

    return Server(config)
