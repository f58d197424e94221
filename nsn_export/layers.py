"""The NSN layer: a linear layer factorised so that every rank prefix is a valid, cheaper layer.

At rank ``r`` the layer computes ``y = (x @ A[:r].T) @ B[:, :r].T + bias``. Because every rank-``r``
layer is a prefix of every higher-rank one, one set of weights serves every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from deploy.metadata import validate_rank as check_rank

RANK_MODES = ("slice", "mask")


WHITENING_DAMPING = 1e-2  # lambda relative to the mean activation variance: keeps L invertible, barely biases C
# lambda relative to the mean output-gradient variance: the sampled Gauss-Newton factor is noisy and
# often nearly singular (measured on MiniLM at rank 128: 1e-3 to 3e-1 within 0.01 cosine, 1e-1 best)
FISHER_DAMPING = 1e-1


def validate_rank(rank, max_rank: int, what: str = "rank") -> int:
    """Return ``rank`` as a Python int if it is an integer in ``[1, max_rank]``, else raise ``ValueError``.

    Accepts a one-element integer tensor too; the rule itself is ``deploy.metadata.validate_rank``."""
    if isinstance(rank, torch.Tensor):
        if rank.numel() != 1 or rank.is_floating_point() or rank.dtype == torch.bool:
            raise ValueError(
                f"{what} must be a single integer in [1, {max_rank}], got a tensor of shape "
                f"{tuple(rank.shape)} and dtype {rank.dtype}; pass a Python int"
            )
        rank = int(rank.item())
    return check_rank(rank, max_rank, what)


class NSNLinear(nn.Module):
    """A rank-elastic linear layer ``y = B[:, :r] @ (A[:r] @ x) + bias``.

    ``A`` has shape ``(max_rank, in_features)`` and ``B`` has shape ``(out_features, max_rank)``.
    The active rank is ``self.rank`` (an int, or a 0-d int64 tensor while exporting so that the
    rank becomes a graph input); it defaults to ``max_rank``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        limit = min(in_features, out_features)
        validate_rank(max_rank, limit, what="max_rank")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.max_rank = max_rank
        self.A = nn.Parameter(torch.empty(max_rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, max_rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        nn.init.normal_(self.A, std=in_features**-0.5)
        nn.init.normal_(self.B, std=max_rank**-0.5)
        self.rank: int | torch.Tensor = max_rank
        self.rank_mode = "slice"
        self.init_method = "random"  # from_linear says "svd", "whitened", "fisher" or why it fell back

    @classmethod
    def from_linear(cls, layer: nn.Module, max_rank: int, input_moment=None, damping: float = WHITENING_DAMPING,
                    min_tokens: int | None = None, output_moment=None,
                    output_damping: float = FISHER_DAMPING) -> "NSNLinear":
        """Factorise a pretrained ``nn.Linear`` or transformers ``Conv1D``; ``init_method`` on the result
        says how (``"svd"``, ``"whitened"``, ``"fisher"``, or the fallback and its reason).

        Plain (no ``input_moment``): truncated SVD ``W = U S V^T`` in float64, ``B = U_R sqrt(S_R)``,
        ``A = sqrt(S_R) V_R^T`` — each rank-``r`` prefix is the best rank-``r`` approximation of ``W``.

        Data-aware (``input_moment``, an ``activations.InputMoment``): with ``C = X^T X / n + lambda I =
        L L^T`` (``lambda = damping * mean(diag(X^T X / n))``), ``W L = U S V^T``, ``B = U_R sqrt(S_R)``,
        ``A = sqrt(S_R) V_R^T L^-1`` — each prefix minimises ``||(W - W_r) L||_F``, the error on the
        calibration activations, for every ``r`` at once; nesting holds, and at full rank
        ``min(d_in, d_out)`` the layer is exact. Falls back to plain SVD (saying why in ``how``) when
        there are fewer than ``min_tokens`` (default ``d_in``) tokens or the statistics are not finite.

        Two-sided, "fisher" (``input_moment`` and ``output_moment``, the second moment of the loss's
        gradients at the layer's output from ``activations.output_moments``): with ``G = G^T G / n +
        mu I`` (``mu = output_damping * mean(diag)``), ``G^1/2 W L = U S V^T``,
        ``B = G^-1/2 U_R sqrt(S_R)`` — each prefix minimises ``||G^1/2 (W - W_r) L||_F``, the
        Kronecker-factored estimate of the loss's growth, for every ``r`` at once; nesting and
        exactness at full rank hold as before. Without usable output statistics it stays "whitened".

        Data-aware factors are balanced (``balanced``): each component's row of ``A`` and column of
        ``B`` have the same norm, as in plain SVD.
        """
        weight = dense_weight(layer)
        out_features, in_features = weight.shape
        nsn = cls(in_features, out_features, max_rank, bias=layer.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        w64 = weight.detach().to(torch.float64)
        how, factor = "svd", None
        if input_moment is not None:
            covariance = input_moment.covariance.to(w64.device)
            if input_moment.tokens < (min_tokens or in_features):
                how = f"svd (fallback: {input_moment.tokens} calibration tokens < {min_tokens or in_features})"
            elif not torch.isfinite(covariance).all():
                how = "svd (fallback: non-finite activation statistics)"
            else:
                scale = float(covariance.diagonal().mean()) or 1.0
                factor, info = torch.linalg.cholesky_ex(covariance + damping * scale * torch.eye(
                    in_features, dtype=torch.float64, device=w64.device))
                how = "whitened" if int(info) == 0 else "svd (fallback: activation covariance not positive definite)"
                factor = factor if int(info) == 0 else None
        root_g = inverse_root_g = None
        if factor is not None and output_moment is not None:
            how, root_g, inverse_root_g = output_metric(output_moment, output_damping, out_features, w64.device)
        target = w64 @ factor if factor is not None else w64
        u, s, vh = torch.linalg.svd(root_g @ target if root_g is not None else target, full_matrices=False)
        root = s[:max_rank].sqrt()
        a = root[:, None] * vh[:max_rank]
        if factor is not None:
            a = torch.linalg.solve_triangular(factor, a, upper=False, left=False)  # a L^-1
        b = u[:, :max_rank] * root
        if inverse_root_g is not None:
            b = inverse_root_g @ b  # G^-1/2 U sqrt(S)
        a, b = balanced(a, b)
        with torch.no_grad():
            nsn.B.copy_(b.to(weight.dtype))
            nsn.A.copy_(a.to(weight.dtype))
            if layer.bias is not None:
                nsn.bias.copy_(layer.bias.detach())
        nsn.init_method = how
        return nsn

    def effective_rank(self):
        """The rank this layer runs at: ``min(self.rank, max_rank)`` (a tensor while exporting)."""
        if isinstance(self.rank, torch.Tensor):
            return torch.clamp(self.rank, min=1, max=self.max_rank)
        return min(self.rank, self.max_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.effective_rank()
        # B.T is (max_rank, out_features): its first `rank` rows are one contiguous block. While
        # exporting, the transpose of the constant B folds into a stored initializer, so the graph
        # slices both factors along their leading axis (a contiguous prefix of each).
        if self.rank_mode == "mask":
            hidden = x @ self.A.T
            keep = torch.arange(self.max_rank, device=x.device) < rank
            y = (hidden * keep.to(hidden.dtype)) @ self.B.T
        elif isinstance(rank, int) and rank == self.max_rank:
            y = (x @ self.A.T) @ self.B.T
        else:
            y = (x @ self.A[:rank].T) @ self.B.T[:rank]
        if self.bias is not None:
            y = y + self.bias
        return y

    def weight_at(self, rank: int) -> torch.Tensor:
        """The merged ``(out_features, in_features)`` weight ``B[:, :r] @ A[:r]`` at ``rank``."""
        r = validate_rank(rank, self.max_rank)
        return self.B[:, :r] @ self.A[:r]

    def to_dense(self, rank: int) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this layer at ``rank`` (for specialist baselines and tests)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.A.device, dtype=self.A.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight_at(rank))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def flops_per_token(self, rank: int | None = None) -> int:
        """Multiply-add FLOPs per token at ``rank``: ``2 r (d_in + d_out)`` (bias not counted)."""
        r = self.max_rank if rank is None else min(rank, self.max_rank)
        return 2 * r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_rank={self.max_rank}, bias={self.bias is not None}")


def balanced(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D a, b D^-1)`` with the diagonal ``D`` that gives each rank component's row of ``a`` and
    column of ``b`` the same norm, as plain SVD's ``sqrt(S)`` split does. Every prefix product is
    unchanged; what changes is the optimiser's view: the whitening and output weighting leave one
    factor over a thousand times larger than the other (the gradients' scale is arbitrary), and Adam,
    which moves every weight by about the learning rate, then wrecks the smaller factor."""
    scale = (b.norm(dim=0) / a.norm(dim=1).clamp(min=1e-300)).clamp(min=1e-300).sqrt()
    return a * scale[:, None], b / scale


def output_metric(moment, damping: float, out_features: int, device) -> tuple[str, torch.Tensor | None,
                                                                             torch.Tensor | None]:
    """``(how, G^1/2, G^-1/2)`` of the damped output-gradient second moment (``how`` says "fisher",
    or why the layer stays "whitened" with ``None`` roots)."""
    metric = moment.covariance.to(device)
    scale = float(metric.diagonal().mean()) if torch.isfinite(metric).all() else float("nan")
    if not scale > 0:  # non-finite, or no gradient reached this layer's output
        reason = "zero output gradients" if scale == 0 else "non-finite output-gradient statistics"
        return f"whitened (fisher skipped: {reason})", None, None
    values, vectors = torch.linalg.eigh(metric + damping * scale * torch.eye(out_features, dtype=torch.float64,
                                                                              device=device))
    values = values.clamp(min=damping * scale)  # eigh's rounding may dip under the damping
    return "fisher", (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if is_conv1d(layer):
        return layer.weight.T  # GPT-2's Conv1D stores (in_features, out_features)
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2


def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_conv1d(layer)
