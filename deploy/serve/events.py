"""The governor's ticks as a live event stream (``GET /v1/nsn/events``, server-sent events) and the
server's status (``GET /v1/nsn/status``): what the page draws, and what a script can follow.

Each tick is published by the thread that made it (the governor's, or the server's own ticker when
there is no governor) into a short ring buffer; each subscriber's stream sends what it has not
seen yet. Nothing here touches the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time

HISTORY_TICKS = 900  # 15 minutes at one tick a second: what a newly opened page draws at once


class EventHub:
    def __init__(self):
        self.ticks: collections.deque[dict] = collections.deque(maxlen=HISTORY_TICKS)
        self.sequence = 0
        self.lock = threading.Lock()
        self.sensors: dict = {}
        self.notes: list[str] = []
        self._last_tokens: tuple[float, int] | None = None
        self._last_calls: tuple[int, int] = (0, 0)

    def publish(self, state, decision=None) -> dict:
        """Record one tick from the scheduler's state and, with a governor, its ``Decision``."""
        scheduler = state.scheduler
        now = time.monotonic()
        tokens = scheduler.tokens_total if scheduler else 0
        rate = 0.0
        if self._last_tokens is not None and now > self._last_tokens[0]:
            rate = (tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        self._last_tokens = (now, tokens)
        calls, rows = (scheduler.decode_calls, scheduler.decoded_rows) if scheduler else (0, 0)
        batch = (rows - self._last_calls[1]) / (calls - self._last_calls[0]) if calls > self._last_calls[0] else 0.0
        self._last_calls = (calls, rows)
        tick = {"time": time.time(), "ceiling": scheduler.ceiling if scheduler else None,
                "rank": scheduler.last_rank if scheduler else None, "tokens_per_s": round(rate, 2),
                "waiting": len(scheduler.waiting) if scheduler else 0,
                "running": len(scheduler.active) if scheduler else 0,
                "batch": round(batch, 2),  # sequences per decode call since the last tick
                "reason": scheduler.reason if scheduler else "loading",
                "profile_switches": scheduler.profile_switches if scheduler else None,
                "level": scheduler.level_state() if scheduler else None}
        if decision is not None:
            binding = min(decision.ceilings, key=lambda c: c["work"]) if decision.ceilings else None
            tick.update(temps_c=decision.readings.get("temps_c") or {}, power_w=decision.readings.get("power_w"),
                        battery_pct=decision.readings.get("battery_pct"),
                        ceilings=[{"policy": c["policy"], "work": round(c["work"], 4), "reason": c["reason"]}
                                  for c in decision.ceilings],
                        policy=binding["policy"] if binding and binding["work"] < 1 else None)
            if tick["policy"] is not None:
                tick["reason"] = binding["reason"]  # the policy is named beside it
        with self.lock:
            self.sequence += 1
            tick["seq"] = self.sequence
            self.ticks.append(tick)
        return tick

    def since(self, sequence: int) -> list[dict]:
        with self.lock:
            return [tick for tick in self.ticks if tick["seq"] > sequence]

    def status(self, state) -> dict:
        scheduler = state.scheduler
        info = scheduler.runtime.info if scheduler else None
        return {
            "model": state.model_name, "ready": state.ready, "runtime": state.runtime_label,
            "task": info.task if info else None, "max_rank": info.max_rank if info else None,
            "levels": state.levels, "uptime_s": round(time.time() - state.started_s, 1),
            "requests_served": scheduler.served if scheduler else 0,
            "ceiling": scheduler.ceiling if scheduler else None, "reason": scheduler.reason if scheduler else None,
            "governor": state.governor is not None, "chat": state.chat_template is not None,
            "key_required": bool(state.api_key), "sensors": self.sensors, "notes": self.notes,
            "context_length": state.context_limit,
            "level": scheduler.level_state() if scheduler else None,
        }

    async def stream(self, request, state, poll_s: float = 0.25):
        """Server-sent events: ``status`` first, then every tick as ``tick`` (the history at once)."""
        yield f"event: status\ndata: {json.dumps(self.status(state))}\n\n"
        seen = 0
        while not state.draining:
            for tick in self.since(seen):
                seen = tick["seq"]
                yield f"event: tick\nid: {seen}\ndata: {json.dumps(tick)}\n\n"
            if await request.is_disconnected():
                break
            await asyncio.sleep(poll_s)
