"""Prometheus metrics of ``nsn-serve``, named as vLLM names its own (``vllm:`` becomes ``nsn:``) so
that existing dashboards fit, plus what only an NSN server has: the rank, its switches, each
policy's ceiling, the device's temperatures, power and battery, TensorRT profile switches."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self.labels = labels

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, ["model_name", *extra], registry=registry)

        def counter(name, doc, extra=()):
            return Counter(name, doc, ["model_name", *extra], registry=registry)

        def histogram(name, doc, buckets=LATENCY_BUCKETS_S):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry)

        # vLLM's names
        self.running = gauge("nsn:num_requests_running", "Requests being decoded")
        self.waiting = gauge("nsn:num_requests_waiting", "Requests waiting in the queue")
        self.cache_tokens = gauge("nsn:kv_cache_tokens", "Tokens held in the KV caches of running requests")
        self.prompt_tokens = counter("nsn:prompt_tokens", "Prefill tokens processed")
        self.generation_tokens = counter("nsn:generation_tokens", "Tokens generated")
        self.success = counter("nsn:request_success", "Finished requests by finish reason", ["finished_reason"])
        self.ttft = histogram("nsn:time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("nsn:inter_token_latency_seconds", "Time between two tokens of a request")
        self.e2e = histogram("nsn:e2e_request_latency_seconds", "End-to-end request latency")
        self.queue_time = histogram("nsn:request_queue_time_seconds", "Time a request waited before it ran")
        self.spec_drafted = counter("nsn:spec_decode_num_draft_tokens", "Tokens the speculative draft rank proposed")
        self.spec_accepted = counter("nsn:spec_decode_num_accepted_tokens", "Drafted tokens the target rank kept")
        self.batch_size = histogram("nsn:decode_batch_size", "Sequences decoded in one call (continuous batching)",
                                    BATCH_BUCKETS)
        # ours
        self.rank = gauge("nsn:rank", "The rank the latest token or batch ran at")
        self.rank_ceiling = gauge("nsn:rank_ceiling", "The device's rank ceiling set by the governor")
        self.rank_switches = counter("nsn:rank_switches", "Changes of the governor's rank ceiling")
        self.policy_ceiling = gauge("nsn:policy_ceiling_work", "Each policy's ceiling on the work fraction (0-1)",
                                    ["policy"])
        self.temperature = gauge("nsn:temperature_celsius", "Thermal zone temperature", ["zone"])
        self.power = gauge("nsn:power_watts", "Board power (VDD_IN, else the battery's draw)")
        self.rail_power = gauge("nsn:rail_power_watts", "INA3221 rail power", ["rail"])
        self.battery = gauge("nsn:battery_percent", "Battery capacity")
        self.profile_switches = gauge("nsn:tensorrt_profile_switches", "TensorRT optimization profile switches")
        self.info = gauge("nsn:model_info", "The served model (value 1)", ["runtime", "max_rank"])
        self._last_ceiling: int | None = None

    # ---- the scheduler's reports ---------------------------------------------------------------------
    def queue(self, running: int, waiting: int, cache_tokens: int, profile_switches: int | None = None) -> None:
        self.running.labels(**self.labels).set(running)
        self.waiting.labels(**self.labels).set(waiting)
        self.cache_tokens.labels(**self.labels).set(cache_tokens)
        if profile_switches is not None:
            self.profile_switches.labels(**self.labels).set(profile_switches)

    def queued(self, seconds: float) -> None:
        self.queue_time.labels(**self.labels).observe(seconds)

    def token(self, first: bool, since_s: float, rank: int) -> None:
        (self.ttft if first else self.itl).labels(**self.labels).observe(since_s)
        self.rank.labels(**self.labels).set(rank)

    def batched(self, size: int) -> None:
        self.batch_size.labels(**self.labels).observe(size)

    def embedded(self, rank: int) -> None:
        self.rank.labels(**self.labels).set(rank)

    def finished(self, reason: str, e2e_s: float, prompt_tokens: int, generated: int) -> None:
        self.success.labels(**self.labels, finished_reason=reason).inc()
        self.e2e.labels(**self.labels).observe(e2e_s)
        self.prompt_tokens.labels(**self.labels).inc(prompt_tokens)
        self.generation_tokens.labels(**self.labels).inc(generated)

    def speculated(self, drafted: int, accepted: int) -> None:
        self.spec_drafted.labels(**self.labels).inc(drafted)
        self.spec_accepted.labels(**self.labels).inc(accepted)

    def ceiling(self, rank: int) -> None:
        if self._last_ceiling is not None and rank != self._last_ceiling:
            self.rank_switches.labels(**self.labels).inc()
        self._last_ceiling = rank
        self.rank_ceiling.labels(**self.labels).set(rank)

    # ---- the governor's readings -----------------------------------------------------------------------
    def decision(self, decision) -> None:
        for ceiling in decision.ceilings:
            self.policy_ceiling.labels(**self.labels, policy=ceiling["policy"]).set(ceiling["work"])
        readings = decision.readings
        for zone, temp in (readings.get("temps_c") or {}).items():
            if temp is not None:
                self.temperature.labels(**self.labels, zone=zone).set(temp)
        if readings.get("power_w") is not None:
            self.power.labels(**self.labels).set(readings["power_w"])
        if readings.get("battery_pct") is not None:
            self.battery.labels(**self.labels).set(readings["battery_pct"])

    def rails(self, rails_w: dict) -> None:
        for rail, watts in rails_w.items():
            if watts is not None:
                self.rail_power.labels(**self.labels, rail=rail).set(watts)

    def text(self) -> bytes:
        return generate_latest(self.registry)
