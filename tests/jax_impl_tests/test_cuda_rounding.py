"""rounding="torch-cuda": the JAX update against the NumPy emulation of torch's fused CUDA kernel, bit for bit.

No GPU here: these pin the model (jax_impl/cuda_rounding.py) to its second,
independent statement (crosscheck.reference.torch_cuda_step, exact rational
FMAs), check that every contraction candidate is distinguishable, and that the
model differs from torch's CPU kernel where it should.  Whether the model is
torch's CUDA kernel is for ``python -m crosscheck gpu`` to say.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jax_impl
from crosscheck.common import reference
from jax_impl import cuda_rounding as cuda

SHAPES = [(), (0,), (7,), (33,), (4, 3, 3)]
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
OPTIONS = {
    "default": {},
    "amsgrad+maximize+mask, wd=0.1, lr=0.1, eps=1e-3": {"amsgrad": True, "maximize": True, "weight_decay": 0.1,
                                                        "lr": 0.1, "eps": 1e-3, "mask": [True, False] * 2 + [True]},
    "wd=0": {"weight_decay": 0.0},
}
# Contraction candidates run by default (all 18 are @slow): the likeliest, none, and mixed choices.
SOME_CANDIDATES = [jax_impl.CudaRounding(), jax_impl.CudaRounding("none", "none", "none"),
                   jax_impl.CudaRounding("fma", "fma-second", "fma-second"),
                   jax_impl.CudaRounding(arithmetic="opmath")]


def _bits(x) -> np.ndarray:
    return np.asarray(x).reshape(-1).view(np.uint8)


def _stream(dtype, steps, seed=0):
    """Gradients spanning 1e-6..1e2 (the moments' products round differently across that range)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.uniform(-6, 2, s)).astype(dtype) for s in SHAPES]
             for _ in range(steps)]
    return params, grads


def _run_jax(params, grads, rounding, lr=1e-3, **options):
    tx = jax_impl.adamw(lr, rounding=rounding, **options)
    leaves = [jnp.asarray(p) for p in params]
    state = tx.init(leaves)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for g in grads:
        leaves, state = step([jnp.asarray(x) for x in g], state, leaves)
    return leaves, jax_impl.torch_view(state)  # torch's names, as the numpy model's


_xla_pow = jax.jit(lambda b, t: jnp.power(b, t))


def _device_pow(beta, step):
    """The backend's float32 pow, as CudaRounding(pow="device") uses it in the graph."""
    return np.asarray(_xla_pow(jnp.float32(beta), jnp.float32(step)))


def _run_numpy(params, grads, contraction, lr=1e-3, mask=None, **options):
    state = reference.torch_cuda_init(params, options.get("amsgrad", False))
    leaves = list(params)
    float_pow = _device_pow if getattr(contraction, "pow", "host") == "device" else None
    for g in grads:
        leaves, state = reference.torch_cuda_step(leaves, g, state, lr=lr, decay_mask=mask,
                                                  contraction=tuple(contraction), float_pow=float_pow, **options)
    return leaves, state


def _assert_bitwise(jax_result, numpy_result):
    (jax_params, jax_state), (np_params, np_state) = jax_result, numpy_result
    pairs = [("param", jax_params, np_params), ("exp_avg", jax_state.exp_avg, np_state.exp_avg),
             ("exp_avg_sq", jax_state.exp_avg_sq, np_state.exp_avg_sq)]
    if np_state.max_exp_avg_sq is not None:
        pairs.append(("max_exp_avg_sq", jax_state.max_exp_avg_sq, np_state.max_exp_avg_sq))
    for quantity, ours, expected in pairs:
        for i, (a, b) in enumerate(zip(ours, expected)):
            assert np.asarray(a).dtype == np.asarray(b).dtype, (quantity, i)
            assert np.array_equal(_bits(a), _bits(b)), f"{quantity} leaf {i}: {np.asarray(a)} != {np.asarray(b)}"


@pytest.mark.parametrize("dtype, option", [("float32", option) for option in OPTIONS] + [
    ("bfloat16", option) for option in list(OPTIONS)[:2]] + [("float16", "default")])
def test_jax_equals_numpy_emulation(dtype, option):
    params, grads = _stream(DTYPES[dtype], 12)
    options = OPTIONS[option]
    _assert_bitwise(_run_jax(params, grads, "torch-cuda", **options),
                    _run_numpy(params, grads, jax_impl.CudaRounding(), **options))


def _check_candidates(candidates, dtype, steps):
    # lr * wd = 0.05: the decay's product is rounded differently often enough to show.
    params, grads = _stream(dtype, steps, seed=1)
    for candidate in candidates:
        _assert_bitwise(_run_jax(params, grads, candidate, lr=0.1, weight_decay=0.5),
                        _run_numpy(params, grads, candidate, lr=0.1, weight_decay=0.5))


def test_contraction_candidates_float64(x64):
    _check_candidates(SOME_CANDIDATES, np.float64, 6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_opmath_kernel_generation(dtype):
    """The newer kernel (float32 hyperparameters, explicit FMAs), each decay contraction, against the emulation."""
    params, grads = _stream(DTYPES[dtype], 8, seed=9)
    options = {"amsgrad": True, "weight_decay": 0.5, "lr": 0.1}
    for decay in ("fma", "none"):
        candidate = jax_impl.CudaRounding(decay, arithmetic="opmath")
        _assert_bitwise(_run_jax(params, grads, candidate, **options),
                        _run_numpy(params, grads, candidate, **options))


def test_opmath_pow_on_device():
    """pow="device": the bias corrections come from the backend's float32 pow (here XLA:CPU's), all else equal."""
    params, grads = _stream(np.float32, 6, seed=11)
    candidate = jax_impl.CudaRounding(arithmetic="opmath", pow="device")
    expected, _ = _run_numpy(params, grads, candidate)
    ours, _ = _run_jax(params, grads, candidate)
    for a, b in zip(ours, expected):
        assert np.array_equal(_bits(a), _bits(b))


def test_kernel_generations_differ_in_float32():
    """float32 hyperparameters and FMAs change float32 results often: the GPU run tells the generations apart."""
    params, grads = _stream(np.float32, 3, seed=10)
    double, _ = _run_numpy(params, grads, jax_impl.CudaRounding())
    opmath, _ = _run_numpy(params, grads, jax_impl.CudaRounding(arithmetic="opmath"))
    differing = sum(int(np.sum(_bits(a) != _bits(b))) for a, b in zip(double, opmath))
    assert differing > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_contraction_candidate(dtype):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == np.float64)
    try:
        _check_candidates(cuda.candidates(), dtype, 20)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_candidates_are_distinguishable_in_float64(x64):
    """Each contraction choice changes some bits of float64 params, so one GPU run can tell them apart.

    For float32/float16/bfloat16 params the choice is almost invisible: the
    double results differ in their last bit, which changes the float32
    rounding with probability ~2**-29 per operation (a 30-step run here found
    2 classes out of 18).  Parity on those dtypes holds whichever nvcc chose;
    the float64 case of the GPU run decides.
    """
    params, grads = _stream(np.float64, 20, seed=3)
    # pow="device" applies to float32 only: in float64 it is its pow="host" twin.
    results = {c: _run_numpy(params, grads, c, lr=0.1, weight_decay=0.5) for c in cuda.candidates()
               if c.pow == "host"}

    def fingerprint(result):
        leaves, state = result
        return b"".join(_bits(x).tobytes() for x in [*leaves, *state.exp_avg, *state.exp_avg_sq])

    prints = {c: fingerprint(r) for c, r in results.items()}
    assert len(prints) == 20 and len(set(prints.values())) == len(prints)


def test_differs_from_torch_cpu_kernel_within_a_few_ulps():
    """The CUDA model is not the CPU kernel (eps in double, moments in double, decay p - lr*wd*p)."""
    params, grads = _stream(np.float32, 1, seed=4)
    tensors = [torch.from_numpy(np.array(p)).requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(tensors, lr=1e-3, weight_decay=0.1, fused=True)
    for t, g in zip(tensors, grads[0]):
        t.grad = torch.from_numpy(np.array(g))
    opt.step()
    cuda_params, _ = _run_jax(params, grads, "torch-cuda", weight_decay=0.1)
    cpu = np.concatenate([t.detach().numpy().reshape(-1) for t in tensors])
    ours = np.concatenate([np.asarray(p).reshape(-1) for p in cuda_params])
    differing = cpu.view(np.int32) != ours.view(np.int32)
    assert differing.any()
    # One step: each model is within an ulp or two of exact, so they are within a few ulps of each other.
    assert np.max(np.abs(cpu.view(np.int32).astype(np.int64) - ours.view(np.int32))) <= 4


def test_auto_is_cpu_rounding_on_cpu_and_dtypes_and_x64_unchanged():
    assert jax.default_backend() == "cpu"
    params, grads = _stream(np.float32, 3, seed=5)
    auto, state = _run_jax(params, grads, "auto")
    cpu, _ = _run_jax(params, grads, "torch-cpu")
    for a, b in zip(auto, cpu):
        assert np.array_equal(_bits(a), _bits(b))
    cuda_params, cuda_state = _run_jax(params, grads, "torch-cuda")
    assert [p.dtype for p in cuda_params] == [jnp.float32] * len(SHAPES)
    assert cuda_state.count.dtype == jnp.int32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(cuda_state) if x.ndim)
    assert not jax.config.jax_enable_x64


def test_update_inside_user_jit_and_apply_updates():
    params, grads = _stream(np.float32, 1, seed=6)
    tx = jax_impl.adamw(rounding="torch-cuda")
    leaves = [jnp.asarray(p) for p in params]

    @jax.jit
    def train_step(g, state, p):
        updates, state = tx.update(g, state, p)
        return jax.tree.map(lambda a, b: a + b, p, updates), state

    new, _ = train_step([jnp.asarray(g) for g in grads[0]], tx.init(leaves), leaves)
    expected, _ = _run_numpy(params, grads, jax_impl.CudaRounding())
    for a, b, p in zip(new, expected, params):
        # p + (p_new - p) is exact where p_new and p are within a factor 2 (all of them at lr=1e-3).
        assert np.array_equal(_bits(a), _bits(b))


def test_schedules():
    params, grads = _stream(np.float32, 6, seed=7)
    lrs = [1e-3 * (0.5 + 0.1 * t) for t in range(6)]
    table = jax_impl.schedules.TorchSchedule("test", lrs)
    expected_state = reference.torch_cuda_init(params)
    expected = list(params)
    for t, g in enumerate(grads):
        expected, expected_state = reference.torch_cuda_step(expected, g, expected_state, lr=lrs[t])
    # A float32 traced schedule gives the lr as float32 (then exactly widened): torch's lr is a double.
    lr32 = [float(np.float32(x)) for x in lrs]
    traced, _ = _run_jax(params, grads, "torch-cuda", lr=lambda count: jnp.asarray(lr32, jnp.float32)[count])
    expected32_state, expected32 = reference.torch_cuda_init(params), list(params)
    for t, g in enumerate(grads):
        expected32, expected32_state = reference.torch_cuda_step(expected32, g, expected32_state, lr=lr32[t])
    for a, b in zip(traced, expected32):
        assert np.array_equal(_bits(a), _bits(b))
    # torch's own lr values (float64, tabulated): exactly torch's double lr.
    tabled, _ = _run_jax(params, grads, "torch-cuda", lr=table)
    for a, b in zip(tabled, expected):
        assert np.array_equal(_bits(a), _bits(b))


def test_fma64_is_exact():
    rng = np.random.default_rng(8)
    with cuda.x64_scope():
        a = rng.standard_normal(2000) * 10.0 ** rng.uniform(-30, 30, 2000)
        b = rng.standard_normal(2000) * 10.0 ** rng.uniform(-30, 30, 2000)
        # c near -a*b: the cancellations where a two-rounding a*b + c loses everything.
        c = -(a * b) * (1 + rng.standard_normal(2000) * 1e-12)
        ours = np.asarray(jax.jit(cuda.fma64)(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)))
    exact = np.array([float(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a, b, c)])
    assert np.array_equal(ours, exact)
    assert not np.array_equal(a * b + c, exact)  # the test data do need an FMA


def test_bad_rounding_and_kernel_combination():
    with pytest.raises(ValueError, match="Invalid rounding: 'cuda'"):
        jax_impl.adamw(rounding="cuda")
    with pytest.raises(ValueError, match="Invalid rounding"):
        jax_impl.adamw(rounding=jax_impl.CudaRounding(decay="maybe"))
    tx = jax_impl.adamw(rounding="torch-cuda", kernel="cpu")
    p = [jnp.ones(3)]
    with pytest.raises(ValueError, match="kernel='cpu'"):
        tx.update(p, tx.init(p), p)
