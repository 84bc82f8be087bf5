"""AdamW with the rounding of torch's fused CUDA kernel, in XLA (``jax_impl.adamw(..., rounding="torch-cuda")``).

torch's fused CUDA AdamW (``FusedAdamMathFunctor`` / ``adam_math`` in
``aten/src/ATen/native/cuda/fused_adam_utils.cuh``, called from
``fused_adamw_impl.cu``) is not its CPU kernel.  Two generations of it exist
and the sources reachable here do not say which one a given release (2.11 on
the GPU machine, 2.13 here) ships, so both are modelled and the GPU run picks:

* ``arithmetic="double"`` (the default; the kernel of ``adam_math(...,
  const double lr, ...)``): described below.
* ``arithmetic="opmath"`` (pytorch/pytorch#154069 "force computation in
  opmath_t" and #153782 "write lerp with fma"): lr, betas, weight decay and
  eps are cast to ``opmath_t`` once; the bias corrections are
  ``1 - pow_(opmath_t beta, opmath_t step)`` (CUDA's ``powf`` for float32, not
  correctly rounded: the GPU run compares it with the host's); the moments are
  ``fma(b1, m, fma(-b1, g, g))`` and ``fma(b2, v, fma(-b2, g*g, g*g))``;
  everything else as below but in ``opmath_t`` (eps too).  Only the decay's
  contraction is left to nvcc.

In the double generation, the hyperparameters arrive as C ``double``
(``lr``, ``beta1``, ``beta2``, ``weight_decay``, ``eps``), its arithmetic type
``opmath_t`` is ``float`` for float32/float16/bfloat16 params and ``double``
for float64, and C++ promotion does the rest.  For float32 params, per element:

=====================================  =========================================================
source line                            rounding
=====================================  =========================================================
``param -= lr * weight_decay * param`` ``fl32(p - fl64(fl64(lr*wd) * p))``: double, rounded once
                                       (nvcc may contract: ``fl32(fma(-lr*wd, p, p))``)
``exp_avg = beta1 * exp_avg +``        ``fl32(fl64(b1*m) + fl64((1-b1)*g))`` in double, rounded once
``(1 - beta1) * grad``                 (contracted: ``fma(b1, m, (1-b1)*g)`` or ``fma(1-b1, g, b1*m)``)
``exp_avg_sq = beta2 * exp_avg_sq +``  ``fl32(fl64(b2*v) + fl64(fl64((1-b2)*g)*g))``
``(1 - beta2) * grad * grad``          (contracted: ``fma(b2, v, .)`` or ``fma((1-b2)*g, g, b2*v)``)
``bias_correction1 = 1 - pow_(beta1,`` ``pow(double, double(float step))`` on the device, in double,
``*step_count)`` (per tensor)          then passed to ``adam_math`` as ``opmath_t``: rounded to float32
``bias_correction2_sqrt``              ``sqrt`` in double of ``1 - pow(beta2, step)``, rounded to float32
``step_size = lr / bias_correction1``  ``fl32(lr / double(bc1_f32))``: double division, rounded
``denom = sqrt(v) / bc2_sqrt + eps``   ``fl32(fl64(double(fl32(sqrtf(v) / bc2_sqrt_f32)) + eps))``
``param -= step_size * exp_avg /       all float32: ``p - fl32(fl32(step_size * m) / denom)``
denom``                                (no product meets an add: nothing to contract)
``max(max_exp_avg_sq, exp_avg_sq)``    ``std::max`` of the rounded float32 values
=====================================  =========================================================

float16/bfloat16 params are loaded to float32 and the results rounded to the
param dtype at the store; float64 params do everything in double.  The CPU
kernel instead rounds ``1 - lr*wd`` to float32 and multiplies (float32), runs the
moments in float32 with a ``lerp`` and adds ``eps`` in float32.

Which products nvcc contracts into FMAs cannot be read from the source (it is
free to under ``--fmad=true``, its default; LLVM's DAG combiner fuses the first
product of ``a*b + c*d`` unless the other has fewer uses): each site is a
:class:`CudaRounding` option, ``CudaRounding()`` is the likeliest, and
``python -m crosscheck gpu`` compares every combination with torch on a GPU.

How it is computed without changing users' dtypes: the elementwise part is
traced under a scoped ``jax_enable_x64`` (float64 exists only inside the
update; params, grads and state keep their dtypes).  Inside, a rounded double
product is ``a * b + (-0.0)`` (no FMA can swallow it), and an FMA is computed
exactly from products that are exact in double (one factor split into 18-bit
pieces, the other into 27-bit pieces, by masking bits, not by arithmetic a
compiler could contract; two pieces when the other factor is a float32 value) summed with TwoSum: the result is ``fl64(a*b + c)``
unless ``a*b + c`` lies within 2**-100 of it of a double rounding midpoint.  So
the update is the same bits on any XLA backend, whatever its own contraction
habits.  Float64 arithmetic is slow on most GPUs but the update is memory-bound;
on an H100 (67 TFLOP/s in float64) its ~100 double operations per element
cost less than the 28 bytes it moves.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl import bias_correction as bc
from jax_impl._state import AdamWState, check_grads, resolve_mask
from jax_impl._x64 import x64_scope

ROUNDINGS = ("auto", "torch-cpu", "torch-cuda")
DECAY_CONTRACTIONS = ("fma", "none")
MOMENT_CONTRACTIONS = ("fma-first", "fma-second", "none")
ARITHMETICS = ("double", "opmath")
POWS = ("host", "device")


class CudaRounding(NamedTuple):
    """Which kernel generation, and which products nvcc contracted into FMAs (one GPU run tells; see module doc)."""

    decay: str = "fma"  # "fma": fma(-lr*wd, p, p); "none": p - fl(lr*wd*p)
    exp_avg: str = "fma-first"  # "fma-first": fma(b1, m, (1-b1)*g); "fma-second": fma(1-b1, g, b1*m)
    exp_avg_sq: str = "fma-first"  # "fma-first": fma(b2, v, ((1-b2)*g)*g); "fma-second": fma((1-b2)*g, g, b2*v)
    # "double": hyperparameters as double (the kernel the issue describes); "opmath": everything in opmath_t
    # with explicit std::fma lerps (pytorch/pytorch#154069 and #153782; exp_avg/exp_avg_sq then do not apply).
    arithmetic: str = "double"
    # opmath generation, float32: bias corrections from the host's powf tables ("host") or from the backend's
    # own float32 pow in the graph ("device": on a GPU, XLA's pow is libdevice's powf, as torch's kernel's is).
    pow: str = "host"

    def label(self) -> str:
        if self.arithmetic == "opmath":
            return f"opmath,decay={self.decay},pow={self.pow}"
        return f"decay={self.decay},exp_avg={self.exp_avg},exp_avg_sq={self.exp_avg_sq}"


def candidates() -> list[CudaRounding]:
    """Every kernel generation and contraction choice: 2 * 3 * 3 double-arithmetic ones, 2 opmath ones."""
    double = [CudaRounding(*c) for c in itertools.product(DECAY_CONTRACTIONS, MOMENT_CONTRACTIONS,
                                                           MOMENT_CONTRACTIONS)]
    return double + [CudaRounding(decay=d, arithmetic="opmath", pow=p) for d in DECAY_CONTRACTIONS
                     for p in POWS]


def check_rounding(rounding) -> None:
    """Raise ValueError naming ``rounding`` unless it is one of ROUNDINGS or a valid CudaRounding."""
    if isinstance(rounding, CudaRounding):
        if (rounding.decay not in DECAY_CONTRACTIONS or rounding.exp_avg not in MOMENT_CONTRACTIONS
                or rounding.exp_avg_sq not in MOMENT_CONTRACTIONS or rounding.arithmetic not in ARITHMETICS or rounding.pow not in POWS):
            raise ValueError(f"Invalid rounding: {rounding!r} (decay in {DECAY_CONTRACTIONS}, exp_avg and "
                             f"exp_avg_sq in {MOMENT_CONTRACTIONS})")
        return
    if rounding not in ROUNDINGS:
        raise ValueError(f"Invalid rounding: {rounding!r} (expected one of {ROUNDINGS} or a CudaRounding)")


def resolve(rounding) -> CudaRounding | None:
    """The CUDA contraction model to follow, or None for torch's CPU rounding (``auto``: CUDA on a GPU backend)."""
    if isinstance(rounding, CudaRounding):
        return rounding
    if rounding == "torch-cuda" or (rounding == "auto" and jax.default_backend() == "gpu"):
        return CudaRounding()
    return None


# --- exact double arithmetic from operations no compiler may rewrite ------------------------------------

def _keep_high_bits(x: jax.Array, bits: int) -> jax.Array:
    """x with all but its leading ``bits`` significant bits cleared (by masking: exact, not contractible)."""
    mask = np.uint64((0xFFFFFFFFFFFFFFFF << (53 - bits)) & 0xFFFFFFFFFFFFFFFF)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.uint64) & mask, jnp.float64)


def _split(x: jax.Array, bits: int, pieces: int) -> list[jax.Array]:
    """x as ``pieces`` doubles of at most ``bits`` significant bits each, summing to x exactly."""
    parts = []
    rest = x
    for _ in range(pieces - 1):
        high = _keep_high_bits(rest, bits)
        parts.append(high)
        rest = rest - high  # exact: the low bits of rest
    parts.append(rest)
    return parts


def _two_sum(a, b):
    """s, e with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fma64(a: jax.Array, b: jax.Array, c: jax.Array, b_is_float32: bool = False) -> jax.Array:
    """``fl64(a * b + c)`` for doubles, from exact partial products and TwoSum (see module docstring).

    ``b_is_float32``: b holds a float32 value (24 bits), so two pieces of a suffice.
    """
    if b_is_float32:
        # 27 + 26 bits times 24 bits: <= 51 bits, exact in double.
        products = [x * b for x in _split(a, 27, 2)]
    else:
        # 18 + 18 + 17 bits times 27 + 26 bits: every partial product has <= 45 bits, exact in double.
        products = [x * y for x in _split(a, 18, 3) for y in _split(b, 27, 2)]
    terms = [c] + products
    # Ogita-Rump-Oishi Sum2: as accurate as summing in double-double, then rounding.
    total, error = terms[0], jnp.zeros_like(c)
    for term in terms[1:]:
        total, e = _two_sum(total, term)
        error = error + e
    exact = total + error
    # Infinite operands make the splits NaN (inf - inf); there the plain expression is the fma's value.  An
    # exact zero takes IEEE's sign: that of (+-0) + (+-0) where a factor is zero, else +0.
    plain = a * b + c
    exact = jnp.where(exact == 0, jnp.where((a == 0) | (b == 0), plain, jnp.zeros_like(exact)), exact)
    return jnp.where(jnp.isfinite(plain), exact, plain)


def _rounded_mul(a, b, neg_zero):
    # fma(a, b, -0.0) is the rounded product: a compiler that contracts gets the same bits.
    return a * b + neg_zero


# --- per-step scalars ------------------------------------------------------------------------------------

def _sum_of_products(contraction: str, a, x, b, y, neg_zero, narrow):
    """``a*x + b*y`` in double as nvcc may contract it: ``fma(a, x, b*y)`` ("fma-first"),
    ``fma(b, y, a*x)`` ("fma-second") or both products rounded ("none")."""
    if contraction == "fma-first":
        return fma64(a, x, _rounded_mul(b, y, neg_zero), narrow)
    if contraction == "fma-second":
        return fma64(b, y, _rounded_mul(a, x, neg_zero), narrow)
    return _rounded_mul(a, x, neg_zero) + _rounded_mul(b, y, neg_zero)


class _CudaScalars(NamedTuple):
    lr_wd: jax.Array  # float64: lr * weight_decay in double
    step_size: jax.Array  # opmath: lr / bias_correction1 (float32: bc1 rounded to float32 first)
    bias_correction2_sqrt: jax.Array  # opmath


def _device_bias_correction(beta: float, t: jax.Array) -> jax.Array:
    """1 - beta**step in double, step a float32 as torch keeps it (past the host table)."""
    return 1.0 - jnp.power(jnp.float64(beta), t.astype(jnp.float32).astype(jnp.float64))


def _bias_correction_at(beta: float, t: jax.Array) -> jax.Array:
    table = bc.bias_correction(beta)
    value = jnp.asarray(table, jnp.float64)[jnp.minimum(t, table.shape[0]) - 1]
    if bc.is_saturated(table):
        return value
    return jnp.where(t <= table.shape[0], value, _device_bias_correction(beta, t))


def _lr_double(learning_rate, count) -> jax.Array:
    """The step's lr in float64 (call inside x64_scope()): a torch schedule's float64 table value (NaN past a
    table that does not hold its last value, as ``TorchSchedule`` gives), a traced schedule's value, or the float."""
    if callable(learning_rate):
        return jnp.asarray(learning_rate(count)).astype(jnp.float64)
    return jnp.asarray(learning_rate).astype(jnp.float64)


def _scalars(learning_rate, b1, b2, weight_decay, count, t, opmath) -> _CudaScalars:
    """Float64 inside x64_scope(): the kernel's per-tensor scalars, rounded where it rounds them."""
    lr = _lr_double(learning_rate, count)
    bias_correction1 = _bias_correction_at(b1, t).astype(opmath).astype(jnp.float64)
    bias_correction2_sqrt = jnp.sqrt(_bias_correction_at(b2, t)).astype(opmath)
    step_size = (lr / bias_correction1).astype(opmath)
    return _CudaScalars(lr * weight_decay, step_size, bias_correction2_sqrt)


# --- the kernel's adam_math, one leaf -------------------------------------------------------------------

def _leaf(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: _CudaScalars, *, b1, b2, eps, decay,
          amsgrad, maximize, contraction: CudaRounding):
    if contraction.arithmetic == "opmath":
        return _leaf_opmath(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, b1=b1, b2=b2, eps=eps,
                            decay=decay, amsgrad=amsgrad, maximize=maximize, contraction=contraction)
    dtype = param.dtype
    opmath = jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)
    narrow = opmath == jnp.float32  # p, g, m, v hold float32 values: cheaper exact FMAs
    f64 = lambda x: x.astype(opmath).astype(jnp.float64)  # noqa: E731  (a load into opmath_t, then promotion)
    p, g, m, v = (f64(x) for x in (param, grad, exp_avg, exp_avg_sq))
    if maximize:
        g = -g
    neg_zero = -jnp.minimum(jnp.abs(g), 0)  # -0.0 that XLA cannot fold (NaN where torch's result is NaN)

    if decay:
        if contraction.decay == "fma":
            p = fma64(-scalars.lr_wd, p, p, narrow)
        else:
            p = p - _rounded_mul(scalars.lr_wd, p, neg_zero)
        p = p.astype(opmath).astype(jnp.float64)  # param is opmath_t

    beta1, weight1 = jnp.float64(b1), jnp.float64(1.0 - b1)
    m = _sum_of_products(contraction.exp_avg, beta1, m, weight1, g, neg_zero, narrow).astype(opmath)
    beta2, weight2 = jnp.float64(b2), jnp.float64(1.0 - b2)
    weighted_grad = _rounded_mul(weight2, g, neg_zero)
    v = _sum_of_products(contraction.exp_avg_sq, beta2, v, weighted_grad, g, neg_zero, narrow).astype(opmath)

    v_for_denom, new_max = v, None
    if amsgrad:
        old_max = max_exp_avg_sq.astype(opmath)
        new_max = jnp.where(old_max < v, v, old_max)  # std::max(a, b): a < b ? b : a
        v_for_denom = new_max
    # The rest is opmath_t arithmetic (correctly rounded on CUDA, which PyTorch builds without fast math) but
    # for eps, added in double.  Each float32 operation is done in double and rounded: for +, -, *, / and sqrt
    # of float32 operands that is the float32 result (53 >= 2 * 24 + 2), and it keeps us independent of a
    # backend's approximate float32 division or square root.
    rnd = lambda x: x.astype(opmath).astype(jnp.float64)  # noqa: E731
    divisor = scalars.bias_correction2_sqrt.astype(jnp.float64) + neg_zero  # elementwise: XLA keeps the division
    scaled = rnd(rnd(jnp.sqrt(f64(v_for_denom))) / divisor)
    denom = rnd(scaled + jnp.float64(eps))
    update = rnd(rnd(scalars.step_size.astype(jnp.float64) * f64(m)) / denom)
    p = rnd(p - update)

    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return cast(p), cast(m), cast(v), cast(new_max)


def step_leaves(param_leaves, grad_leaves, exp_avg_leaves, exp_avg_sq_leaves, max_leaves, decay_flags, *,
                count, t, learning_rate, b1, b2, eps, weight_decay, amsgrad, maximize,
                contraction: CudaRounding) -> list[tuple]:
    """New (param, exp_avg, exp_avg_sq, max_exp_avg_sq) per leaf, as torch's fused CUDA kernel computes them."""
    with x64_scope():
        scalars = {}
        results = []
        for p, g, m, v, vmax, decay_on in zip(param_leaves, grad_leaves, exp_avg_leaves, exp_avg_sq_leaves,
                                              max_leaves, decay_flags):
            if p.size == 0:
                results.append((p, m, v, vmax))
                continue
            opmath = jnp.dtype(jnp.float64) if p.dtype == jnp.float64 else jnp.dtype(jnp.float32)
            if opmath not in scalars:
                if contraction.arithmetic == "opmath":
                    scalars[opmath] = _scalars_opmath(learning_rate, b1, b2, weight_decay, count, t, opmath,
                                                      contraction.pow == "device")
                else:
                    scalars[opmath] = _scalars(learning_rate, b1, b2, weight_decay, count, t, opmath)
            results.append(_leaf(p, g, m, v, vmax, scalars[opmath], b1=b1, b2=b2, eps=eps,
                                 decay=decay_on and weight_decay != 0, amsgrad=amsgrad, maximize=maximize,
                                 contraction=contraction))
    return results


def host_bias_corrections(b1: float, b2: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The float32 bias_correction1 and bias_correction2_sqrt of steps 1..steps from the host's double pow.

    The GPU command compares these with the device's ``pow`` (CUDA's libdevice),
    which the kernel uses: where they differ, the host tables would have to be
    replaced by the device's values.
    """
    t = np.arange(1, steps + 1)
    bc1 = np.array([1.0 - math.pow(b1, float(np.float32(s))) for s in t])
    bc2 = np.array([1.0 - math.pow(b2, float(np.float32(s))) for s in t])
    return bc1.astype(np.float32), np.sqrt(bc2).astype(np.float32)


def adamw_step(grads, state, params, contraction: CudaRounding, *, learning_rate, b1, b2, eps, weight_decay,
               amsgrad, maximize, mask, kernel, **unused):
    """``adamw_step`` with torch's CUDA rounding: new (params, state).

    ``decay_rounding``, ``torch_layout`` and ``scalar_tail`` do not apply: the
    CUDA kernel already decays as ``p - (lr*wd)*p`` in double, and its aligned
    and unaligned loops run the same arithmetic, so no element is special.
    """
    del unused
    import optax

    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    if kernel == "cpu":
        raise ValueError("adamw: kernel='cpu' computes torch's CPU rounding; rounding='torch-cuda' needs kernel='xla' "
                         "or 'auto'")
    check_grads(grads, params)
    decay_flags = resolve_mask(mask, params)
    count = state.count
    t = optax.safe_increment(count)
    param_leaves, treedef = jax.tree.flatten(params)
    flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
    max_leaves = flat(state.max_exp_avg_sq) if amsgrad else [None] * len(param_leaves)
    results = step_leaves(param_leaves, flat(grads), flat(state.exp_avg), flat(state.exp_avg_sq), max_leaves,
                          decay_flags, count=count, t=t, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                          weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, contraction=contraction)
    new_params, new_m, new_v, new_max = (treedef.unflatten(list(column)) for column in zip(*results))
    return new_params, AdamWState(count=t, exp_avg=new_m, exp_avg_sq=new_v,
                                  max_exp_avg_sq=new_max if amsgrad else None)


# --- the newer kernel: opmath_t arithmetic with explicit FMAs ----------------------------------------------
# pytorch/pytorch#154069 casts lr, betas, weight_decay and eps to opmath_t once per block, takes the bias
# corrections from pow_(opmath_t, opmath_t) (powf for float32: CUDA's, not correctly rounded: the GPU run
# compares it with the host's) and #153782 writes the moments as explicit FMAs:
#   exp_avg = fma(b1, m, fma(-b1, g, g)),  exp_avg_sq = fma(b2, v, fma(-b2, g*g, g*g)).
# For float32 opmath every operation is emulated in double and rounded to float32 (exact for +, -, *, /,
# sqrt); a float32 FMA is rounded once from the exact value (TwoSum, then round-to-odd in double).

def _round_to_odd_then_f32(total, error):
    """fl32(total + error) exactly, for a TwoSum pair: make total's last bit sticky (odd) when error != 0."""
    bits = jax.lax.bitcast_convert_type(total, jnp.int64)
    even = (bits & 1) == 0
    # Move one ulp toward error where total is even and inexact (toward zero when error opposes total's sign).
    toward = jnp.where((error > 0) == (total > 0), 1, -1).astype(jnp.int64)
    adjusted = jax.lax.bitcast_convert_type(bits + toward, jnp.float64)
    odd = jnp.where((error != 0) & even & (total != 0), adjusted, total)
    return odd.astype(jnp.float32).astype(jnp.float64)


def fma32(a, b, c):
    """fl32(a * b + c) for float32 values held in doubles: the product is exact in double."""
    product = a * b
    total, error = _two_sum(product, c)
    plain = product + c
    exact = jnp.where(total == 0, plain, _round_to_odd_then_f32(total, error))
    return jnp.where(jnp.isfinite(plain), exact, plain.astype(jnp.float32).astype(jnp.float64))


def _opmath_bias_corrections(beta: float, opmath) -> np.ndarray:
    """(1 - pow_(beta, t)) per step t = 1.., in opmath_t, from the host's pow; ends where it reaches 1."""
    if opmath == jnp.float64:
        return bc.bias_correction(beta)
    return _float32_bias_correction(float(np.float32(beta)))


_FLOAT32_TABLES: dict = {}


def _float32_bias_correction(beta32: float) -> np.ndarray:
    if beta32 not in _FLOAT32_TABLES:
        values, start, chunk = [], 1, 1 << 16
        while start <= bc.MAX_TABLE_STEPS:
            t = np.arange(start, start + chunk, dtype=np.float32).astype(np.float64)
            powered = np.power(beta32, t).astype(np.float32)
            block = (np.float32(1) - powered).astype(np.float32)
            done = np.flatnonzero(block == 1)
            if done.size:
                values.append(block[:done[0] + 1])
                break
            values.append(block)
            start += chunk
        table = np.concatenate(values)
        table.setflags(write=False)
        _FLOAT32_TABLES[beta32] = table
    return _FLOAT32_TABLES[beta32]


def float32_bias_corrections(b1: float, b2: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The opmath kernel's float32 bias_correction1 and bias_correction2_sqrt for steps 1..steps (host powf)."""
    t = np.arange(1, steps + 1, dtype=np.float32).astype(np.float64)
    one = np.float32(1)
    bc1 = one - np.power(float(np.float32(b1)), t).astype(np.float32)
    bc2 = one - np.power(float(np.float32(b2)), t).astype(np.float32)
    return bc1.astype(np.float32), np.sqrt(bc2.astype(np.float32))


def _opmath_bc_at(beta: float, t, opmath, pow_on_device: bool = False):
    if pow_on_device and opmath == jnp.float32:
        beta32 = jnp.asarray(np.float32(beta), jnp.float32)
        return (1 - jnp.power(beta32, t.astype(jnp.float32))).astype(jnp.float64)
    table = _opmath_bias_corrections(beta, opmath)
    value = jnp.asarray(table, opmath)[jnp.minimum(t, table.shape[0]) - 1]
    if table[-1] == 1:
        return value.astype(jnp.float64)
    beyond = 1 - jnp.power(jnp.asarray(beta, opmath), t.astype(jnp.float32).astype(opmath))
    return jnp.where(t <= table.shape[0], value, beyond).astype(jnp.float64)


def _scalars_opmath(learning_rate, b1, b2, weight_decay, count, t, opmath, pow_on_device=False) -> _CudaScalars:
    """The opmath kernel's scalars (held in float64, with float32 values for float32 opmath)."""
    rnd = lambda x: jnp.asarray(x, jnp.float64).astype(opmath).astype(jnp.float64)  # noqa: E731
    lr = _lr_double(learning_rate, count)
    lr = rnd(lr)
    bias_correction1 = _opmath_bc_at(b1, t, opmath, pow_on_device)
    bias_correction2_sqrt = rnd(jnp.sqrt(_opmath_bc_at(b2, t, opmath, pow_on_device)))
    return _CudaScalars(rnd(lr * rnd(weight_decay)), rnd(lr / bias_correction1), bias_correction2_sqrt)


def _leaf_opmath(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: _CudaScalars, *, b1, b2, eps,
                 decay, amsgrad, maximize, contraction: CudaRounding):
    dtype = param.dtype
    opmath = jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)
    narrow = opmath == jnp.float32
    rnd = lambda x: x.astype(opmath).astype(jnp.float64)  # noqa: E731
    fma = fma32 if narrow else fma64
    const = lambda x: jnp.float64(np.float32(x) if narrow else x)  # noqa: E731  (hyperparameters in opmath_t)
    p, g, m, v = (rnd(x) for x in (param, grad, exp_avg, exp_avg_sq))
    if maximize:
        g = -g
    neg_zero = -jnp.minimum(jnp.abs(g), 0)
    if decay:
        if contraction.decay == "fma":
            p = fma(-scalars.lr_wd, p, p)
        else:
            p = rnd(p - rnd(_rounded_mul(scalars.lr_wd, p, neg_zero)))
    beta1, beta2 = const(b1), const(b2)
    m = fma(beta1, m, fma(-beta1, g, g))
    grad_sq = rnd(_rounded_mul(g, g, neg_zero))
    v = fma(beta2, v, fma(-beta2, grad_sq, grad_sq))
    v_for_denom, new_max = v, None
    if amsgrad:
        old_max = rnd(max_exp_avg_sq)
        new_max = jnp.where(old_max < v, v, old_max)
        v_for_denom = new_max
    divisor = scalars.bias_correction2_sqrt + neg_zero
    denom = rnd(rnd(rnd(jnp.sqrt(v_for_denom)) / divisor) + const(eps))
    update = rnd(rnd(_rounded_mul(scalars.step_size, m, neg_zero)) / denom)
    p = rnd(p - update)
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return cast(p), cast(m), cast(v), cast(new_max)
