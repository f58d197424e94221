"""Symmetric int8 with one scale per row: how int8 exports store weights (``nsn-export --weights
int8``) and how a level re-quantises the products it computes. Torch-free."""

from __future__ import annotations

import numpy as np


def quantize_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)`` with ``weight[i] ~= q[i] * scale[i]``: symmetric int8, one scale per row."""
    weight = np.asarray(weight, np.float32)
    scale = (np.abs(weight).max(axis=1) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What ``DequantizeLinear`` computes: ``q * scale`` in fp32, a scale per row."""
    return q.astype(np.float32) * scale[:, None]
