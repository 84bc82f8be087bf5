"""Float64 NumPy AdamW: the yardstick every implementation is measured against.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019),
Algorithm 2, in torch's parameterization (the lr multiplies the decay, eps is
added after the bias correction of the denominator).  Every operation is one
float64 rounding, so against float32 implementations it stands in for exact
arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class ReferenceState(NamedTuple):
    step: int
    exp_avg: list[np.ndarray]  # float64, like the params
    exp_avg_sq: list[np.ndarray]
    max_exp_avg_sq: list[np.ndarray] | None


def reference_init(params: Sequence[np.ndarray], amsgrad: bool = False) -> ReferenceState:
    zeros = lambda: [np.zeros(np.shape(p), np.float64) for p in params]  # noqa: E731
    return ReferenceState(0, zeros(), zeros(), zeros() if amsgrad else None)


def reference_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    state: ReferenceState,
    *,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decay_mask: Sequence[bool] | None = None,
) -> tuple[list[np.ndarray], ReferenceState]:
    """One AdamW step in float64; ``lr`` is this step's learning rate."""
    t = state.step + 1
    bias_correction1 = 1.0 - b1**t
    bias_correction2 = 1.0 - b2**t
    new_params, new_m, new_v, new_max = [], [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        p = np.asarray(p, np.float64)
        g = -np.asarray(g, np.float64) if maximize else np.asarray(g, np.float64)
        if decay_mask is None or decay_mask[i]:
            p = p * (1.0 - lr * weight_decay)
        m = b1 * state.exp_avg[i] + (1.0 - b1) * g
        v = b2 * state.exp_avg_sq[i] + (1.0 - b2) * g * g
        v_hat = v
        if amsgrad:
            v_hat = np.maximum(state.max_exp_avg_sq[i], v)
            new_max.append(v_hat)
        denom = np.sqrt(v_hat) / np.sqrt(bias_correction2) + eps
        new_params.append(p - (lr / bias_correction1) * m / denom)
        new_m.append(m)
        new_v.append(v)
    return new_params, ReferenceState(t, new_m, new_v, new_max if amsgrad else None)
