"""Float64 NumPy AdamW: the yardstick every implementation is measured against.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019),
Algorithm 2, in torch's parameterization (the lr multiplies the decay, eps is
added after the bias correction of the denominator).  Every operation is one
float64 rounding, so against float32 implementations it stands in for exact
arithmetic.
"""

from __future__ import annotations

import math
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


# --- torch's fused CUDA kernel, emulated in NumPy -----------------------------------------------------------
# The rounding model is written down in jax_impl/cuda_rounding.py; this is a
# second, independent statement of it: FMAs are computed with exact rational
# arithmetic (fractions.Fraction) and rounded once, the rest in float64/float32
# NumPy.  Slow (a Python call per FMA per element): for tests and small checks.

def _exact_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fl64(a * b + c), elementwise, correctly rounded (non-finite values: the plain expression)."""
    from fractions import Fraction

    def one(x, y, z):
        plain = x * y + z
        if not math.isfinite(plain) or not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            return plain
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        if exact == 0:  # IEEE's signed zero: (+-0) + (+-0) where a factor is zero, +0 where terms cancel
            return plain if x == 0 or y == 0 else 0.0
        return float(exact)

    a, b, c = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (a, b, c)))
    return np.asarray(np.frompyfunc(one, 3, 1)(a, b, c)).astype(np.float64)


def _fraction_to_float32(x) -> np.float32:
    """The float32 nearest the rational x (ties to even), not via a double (which would round twice)."""
    guess = np.float32(float(x))
    if not np.isfinite(guess):
        return guess
    from fractions import Fraction

    options = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    return min(options, key=lambda f: (abs(Fraction(float(f)) - x), int(np.asarray(f).view(np.int32)) & 1))


def _exact_fma32(a, b, c) -> np.ndarray:
    """fl32(a * b + c) for float32 arrays, rounded once from the exact value."""
    from fractions import Fraction

    def one(x, y, z):
        plain = np.float32(x) * np.float32(y) + np.float32(z)
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)) or not np.isfinite(plain):
            return np.float32(np.float64(x) * np.float64(y) + np.float64(z))
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        if exact == 0:
            return np.float32(plain if x == 0 or y == 0 else 0.0)
        return _fraction_to_float32(exact)

    a, b, c = np.broadcast_arrays(*(np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c)))
    return np.asarray(np.frompyfunc(one, 3, 1)(a, b, c)).astype(np.float32)


def _torch_cuda_opmath_step(params, grads, state, *, lr, b1, b2, eps, weight_decay, amsgrad, maximize, decay_mask,
                            decay_fma, float_pow=None):
    """The kernel after pytorch/pytorch#154069 and #153782: opmath_t arithmetic, explicit FMAs."""
    t = state.step + 1
    new_params, new_m, new_v, new_max = [], [], [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = np.asarray(param).dtype
        opmath = np.float64 if dtype == np.float64 else np.float32
        fma = _exact_fma if opmath == np.float64 else _exact_fma32
        step = opmath(np.float32(t))
        lr_o, b1_o, b2_o, wd_o, eps_o = (opmath(x) for x in (lr, b1, b2, weight_decay, eps))
        # pow in opmath_t; the host's powf stands in for the device's (the GPU run compares the two).
        power = (lambda b: opmath(math.pow(float(b), float(step))))  # noqa: E731
        if float_pow is not None and opmath == np.float32:
            power = (lambda b: np.float32(float_pow(b, step)))  # noqa: E731
        bias_correction1 = opmath(opmath(1) - power(b1_o))
        bias_correction2_sqrt = opmath(np.sqrt(opmath(opmath(1) - power(b2_o))))
        step_size = opmath(lr_o / bias_correction1)
        load = lambda x: np.asarray(x).astype(opmath)  # noqa: E731
        p, g, m, v = load(param), load(grad), load(state.exp_avg[i]), load(state.exp_avg_sq[i])
        if maximize:
            g = -g
        with np.errstate(all="ignore"):
            if weight_decay != 0 and (decay_mask is None or decay_mask[i]):
                lr_wd = opmath(lr_o * wd_o)
                p = fma(-lr_wd, p, p).astype(opmath) if decay_fma == "fma" else p - lr_wd * p
            m = fma(b1_o, m, fma(-b1_o, g, g)).astype(opmath)
            grad_sq = (g * g).astype(opmath)
            v = fma(b2_o, v, fma(-b2_o, grad_sq, grad_sq)).astype(opmath)
            v_for_denom = v
            if amsgrad:
                old = np.asarray(state.max_exp_avg_sq[i]).astype(opmath)
                v_for_denom = np.where(old < v, v, old)
                new_max.append(v_for_denom.astype(dtype))
            denom = (np.sqrt(v_for_denom) / bias_correction2_sqrt + eps_o).astype(opmath)
            p = (p - (step_size * m) / denom).astype(opmath)
        new_params.append(p.astype(dtype))
        new_m.append(m.astype(dtype))
        new_v.append(v.astype(dtype))
    return new_params, ReferenceState(t, new_m, new_v, new_max if amsgrad else None)


def torch_cuda_step(
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
    contraction: tuple[str, str, str] = ("fma", "fma-first", "fma-first"),
    float_pow=None,
) -> tuple[list[np.ndarray], ReferenceState]:
    """One step of ``torch.optim.AdamW(fused=True)`` on CUDA, with its roundings; arrays keep the params' dtype.

    ``contraction`` is (decay, exp_avg, exp_avg_sq[, arithmetic]): which
    products nvcc fused into FMAs and which kernel generation
    (``jax_impl.CudaRounding``'s fields).  ``float_pow(beta, step)``: the
    float32 pow of the opmath generation (default: the host's, via double).  ``state`` holds the
    moments in the params' dtype; ``state.step`` counts steps.
    """
    decay_fma, exp_avg_fma, exp_avg_sq_fma = contraction[:3]
    if len(contraction) > 3 and contraction[3] == "opmath":
        return _torch_cuda_opmath_step(params, grads, state, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                       amsgrad=amsgrad, maximize=maximize, decay_mask=decay_mask,
                                       decay_fma=decay_fma, float_pow=float_pow)
    t = state.step + 1
    step = float(np.float32(t))  # torch's step is a float32 tensor
    new_params, new_m, new_v, new_max = [], [], [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = np.asarray(param).dtype
        opmath = np.float64 if dtype == np.float64 else np.float32
        bias_correction1 = opmath(1.0 - math.pow(b1, step))  # pow in double, stored as opmath_t
        bias_correction2_sqrt = opmath(math.sqrt(1.0 - math.pow(b2, step)))
        step_size = opmath(lr / float(bias_correction1))
        load = lambda x: np.asarray(x).astype(opmath).astype(np.float64)  # noqa: E731
        p, g, m, v = load(param), load(grad), load(state.exp_avg[i]), load(state.exp_avg_sq[i])
        if maximize:
            g = -g
        if weight_decay != 0 and (decay_mask is None or decay_mask[i]):
            lr_wd = lr * weight_decay
            p = _exact_fma(-lr_wd, p, p) if decay_fma == "fma" else p - lr_wd * p
            p = p.astype(opmath).astype(np.float64)
        with np.errstate(all="ignore"):
            if exp_avg_fma == "fma-first":
                m = _exact_fma(b1, m, (1.0 - b1) * g)
            elif exp_avg_fma == "fma-second":
                m = _exact_fma(1.0 - b1, g, b1 * m)
            else:
                m = b1 * m + (1.0 - b1) * g
            m = m.astype(opmath)
            weighted_grad = (1.0 - b2) * g
            if exp_avg_sq_fma == "fma-first":
                v = _exact_fma(b2, v, weighted_grad * g)
            elif exp_avg_sq_fma == "fma-second":
                v = _exact_fma(weighted_grad, g, b2 * v)
            else:
                v = b2 * v + weighted_grad * g
            v = v.astype(opmath)
            v_for_denom = v
            if amsgrad:
                old = np.asarray(state.max_exp_avg_sq[i]).astype(opmath)
                v_for_denom = np.where(old < v, v, old)
                new_max.append(v_for_denom.astype(dtype))
            scaled = np.sqrt(v_for_denom) / bias_correction2_sqrt  # opmath_t
            denom = (scaled.astype(np.float64) + eps).astype(opmath)
            p = p.astype(opmath) - (step_size * m) / denom
        new_params.append(p.astype(dtype))
        new_m.append(m.astype(dtype))
        new_v.append(v.astype(dtype))
    return new_params, ReferenceState(t, new_m, new_v, new_max if amsgrad else None)


def torch_cuda_init(params: Sequence[np.ndarray], amsgrad: bool = False) -> ReferenceState:
    """Zero moments in the params' dtypes, for :func:`torch_cuda_step`."""
    zeros = lambda: [np.zeros(np.shape(p), np.asarray(p).dtype) for p in params]  # noqa: E731
    return ReferenceState(0, zeros(), zeros(), zeros() if amsgrad else None)
