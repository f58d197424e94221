"""Self-speculative decoding: a low rank of the same model drafts, the target rank verifies.

An NSN's rank ``d < t`` is a strict subspace of rank ``t``: same weights, same graph, same
tokenizer, so it is a draft model that ships for free. Each round the draft proposes ``k`` tokens
with its own KV cache; the target scores them all (and the position after them) in one call with
its cache; the longest agreeing prefix is kept, plus one token from the target; both caches are
cut back to what was kept. Greedy output is the target's greedy output, token for token; sampled
output follows the target's distribution through the accept/reject rule of speculative sampling
(Leviathan et al. 2023; Chen et al. 2023): a drafted ``x`` is kept with probability
``min(1, p(x) / q(x))``, and on rejection the token is drawn from ``max(0, p - q)``, renormalised.

``k`` adapts as Hugging Face's assisted generation does: +2 when every draft was kept, -1
otherwise, within ``[1, max_k]``. And speculation switches itself off where it does not pay: the
first decode round after the prompt runs plainly and is timed; once eight speculative rounds have
cost more per token than that, the rest of the generation decodes plainly (``off``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_DRAFT_TOKENS = 16


# Speculative rounds timed before speculation may switch itself off, and the weight of each new
# round in the running mean of their cost per token.
ROUNDS_BEFORE_OFF, RECENT_WEIGHT = 8, 0.2


@dataclass
class Speculation:
    """What a generation drafts with: the draft rank, how many tokens a round proposes (adapted),
    counts of drafted and accepted tokens, and the timing that may switch it off (``auto_off``)."""

    draft_rank: int
    k: int = 4
    max_k: int = 8
    auto_off: bool = True
    drafted: int = 0
    accepted: int = 0
    plain_ms: float | None = None  # per token, the plain decode round after the prompt
    speculative_ms: float | None = None  # per kept token, a running mean over speculative rounds
    rounds: int = 0
    off: bool = False  # switched off: it cost more per token than plain decoding

    def learn(self, proposed: int, kept: int) -> None:
        self.drafted += proposed
        self.accepted += kept
        self.k = min(self.max_k, self.k + 2) if kept == proposed else max(1, self.k - 1)

    @property
    def ready(self) -> bool:
        """Whether the next round drafts: on, and the plain round it is measured against has run."""
        return not self.off and (self.plain_ms is not None or not self.auto_off)

    def timed(self, speculative: bool, ms: float, tokens: int) -> None:
        """Record one decode round (not the prompt's): ``ms`` for ``tokens`` kept."""
        per_token = ms / tokens
        if not speculative:
            if self.plain_ms is None:
                self.plain_ms = per_token
            return
        self.rounds += 1
        self.speculative_ms = per_token if self.speculative_ms is None else (
            (1 - RECENT_WEIGHT) * self.speculative_ms + RECENT_WEIGHT * per_token)
        if self.auto_off and self.rounds >= ROUNDS_BEFORE_OFF and self.speculative_ms > self.plain_ms:
            self.off = True


def check_speculation(draft_rank, k, max_rank: int) -> tuple[int, int]:
    """``(draft_rank, k)`` validated: a draft rank in ``[1, max_rank - 1]``, ``k`` in ``[1, 16]``."""
    for name, value, top in (("draft rank", draft_rank, max_rank - 1), ("draft tokens (k)", k, MAX_DRAFT_TOKENS)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= top:
            raise ValueError(f"speculative {name} must be an integer in [1, {top}], got {value!r}; the draft runs "
                             f"below the target rank")
    return int(draft_rank), int(k)


def accept(proposal: int, target: np.ndarray, draft: np.ndarray, random) -> tuple[bool, int]:
    """The speculative sampling rule for one drafted token: ``(kept, token)``. ``target`` and
    ``draft`` are the two distributions (probabilities) at that position; when the draft is not
    kept, ``token`` is drawn from the residual ``max(0, target - draft)``."""
    q = float(draft[proposal])
    if q > 0 and random.random() < min(1.0, float(target[proposal]) / q):
        return True, proposal
    residual = np.maximum(target - draft, 0.0)
    total = residual.sum()
    if total <= 0:  # the two distributions are equal where it matters: sample the target
        return False, int(random.choice(len(target), p=target))
    return False, int(random.choice(len(target), p=residual / total))
