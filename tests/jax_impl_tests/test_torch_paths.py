"""jax_impl.adamw(torch_path="for-loop" | "foreach") against torch's default AdamW paths on the CPU.

torch's for-loop (``_single_tensor_adam``, the CPU default) and foreach paths
run one ATen op at a time; jax_impl models each op's rounding
(``jax_impl._cpu_rounding.loop_leaf_step``).  bfloat16 and float16 are bitwise.
For float32 and float64 ``torch.sqrt`` on the CPU is MKL's vector sqrt
(``VML_HA``), not correctly rounded: where jax_impl found MKL too
(``jax_impl.cpu_kernel.sqrt_source()``) it calls the same one and the
``*_with_mkl_sqrt`` tests compare with torch as it is; without MKL the
``*_but_for_mkl_sqrt`` tests swap a correctly rounded sqrt into torch
(:func:`correctly_rounded_sqrt`), which proves every other op bitwise, and
``test_float32_sqrt_drift_is_bounded`` measures what MKL's sqrt leaves.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_impl
from jax_impl import cpu_kernel
from crosscheck.trajectory import implementations, sources
from crosscheck.trajectory.implementations import Hyper, JaxRunner, TorchRunner, torch_path_of
from helpers import OPTIONS, compare, initial_params

PATHS = ("for-loop", "foreach")
STEPS = 100
# foreach differs from the for-loop only in two scalars (rounded to bfloat16/float16): fewer options suffice.
FOREACH_OPTIONS = ["default", "weight_decay=0.1", "amsgrad+maximize+mask"]
# jax_impl's float32/float64 loop-path sqrt: torch's (MKL's), or the correctly rounded one where MKL is not found.
MKL_SQRT = cpu_kernel.sqrt_source() != cpu_kernel.CORRECTLY_ROUNDED
needs_mkl = pytest.mark.skipif(not MKL_SQRT, reason="no libmkl_rt found (pip install -e \".[mkl]\", or "
                               "JAX_IMPL_MKL=/path/to/libmkl_rt.so.2): jax_impl's sqrt is the correctly rounded one")


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """torch's float32/float64 ``Tensor.sqrt`` and ``_foreach_sqrt`` replaced by NumPy's correctly rounded one."""
    tensor_sqrt, foreach_sqrt = torch.Tensor.sqrt, torch._foreach_sqrt

    def sqrt(t):
        if t.dtype not in (torch.float32, torch.float64):
            return tensor_sqrt(t)
        return torch.from_numpy(np.asarray(np.sqrt(t.detach().numpy())))

    torch.Tensor.sqrt, torch._foreach_sqrt = sqrt, lambda tensors: [sqrt(t) for t in tensors]
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch._foreach_sqrt = tensor_sqrt, foreach_sqrt


def run(path, hyper, steps=STEPS, *, kernel="auto", grads="gaussian", exact_sqrt=False, check_every=50, seed=0):
    """jax_impl(torch_path=path) and torch.optim.AdamW on ``path`` with the same gradients; the mismatches.

    ``exact_sqrt``: torch's sqrt made correctly rounded where jax_impl's is (no MKL found); with MKL both are MKL's.
    """
    exact_sqrt = exact_sqrt and not MKL_SQRT
    params = initial_params(seed=seed)
    ours = JaxRunner(f"jax_impl({path})", hyper, params, kind="exact", torch_path=path, kernel=kernel)
    theirs = TorchRunner(f"torch.AdamW({path})", hyper, params, cls=torch.optim.AdamW, path=path)
    source = sources.synthetic(grads)
    for t in range(steps):
        g = source(t, params)
        ours.step(g)
        with correctly_rounded_sqrt() if exact_sqrt else contextlib.nullcontext():
            theirs.step(g)
        if (t + 1) % check_every == 0 or t + 1 == steps:
            mismatches = compare(ours, theirs, t + 1)
            if mismatches:
                return mismatches
    return []


# Options every run covers; the rest of OPTIONS run with the slow tests (`-m slow`) to keep the suite short.
FAST_OPTIONS = ("default", "amsgrad+maximize+mask", "b1 >= 0.5 lerp branch", "weight_decay=0")


def _path_options(options, fast=FAST_OPTIONS):
    pairs = [("for-loop", o) for o in options] + [("foreach", o) for o in FOREACH_OPTIONS if o in options]
    return [pytest.param(p, o, marks=() if o in fast and (p == "for-loop" or o == "default") else pytest.mark.slow)
            for p, o in pairs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("path, option", _path_options(OPTIONS))
def test_half_precision_bitwise(path, option, dtype):
    hyper = Hyper(dtype=dtype, **OPTIONS[option])
    if dtype == "float16":
        hyper = Hyper(**{**hyper.__dict__, "eps": max(hyper.eps, 1e-4)})  # 1e-8 is 0 in float16, as in torch
    mismatches = run(path, hyper)
    assert not mismatches, f"first mismatch (step, leaf, quantity, distance): {mismatches[0]}"


@pytest.mark.parametrize("path, option", _path_options(OPTIONS))
def test_float32_bitwise_but_for_mkl_sqrt(path, option):
    """The default kernel (the C++ one on a single CPU device) and XLA's ops, each on every option."""
    mismatches = run(path, Hyper(**OPTIONS[option]), exact_sqrt=True)
    assert not mismatches, mismatches[0]


@pytest.mark.parametrize("option", ["default", "amsgrad+maximize+mask", "b1 >= 0.5 lerp branch"])
def test_float32_xla_path_bitwise_but_for_mkl_sqrt(option):
    assert not run("for-loop", Hyper(**OPTIONS[option]), kernel="xla", exact_sqrt=True)


@pytest.mark.parametrize("path, option", _path_options(["default", "amsgrad+maximize+mask", "b1 >= 0.5 lerp branch"]))
def test_float64_bitwise_but_for_mkl_sqrt(x64, path, option):
    mismatches = run(path, Hyper(dtype="float64", **OPTIONS[option]), exact_sqrt=True)
    assert not mismatches, mismatches[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_schedule_bitwise_with_x64(x64, dtype):
    hyper = Hyper(dtype=dtype, lr=1e-2, schedule=sources.CosineSchedule(1e-2, STEPS))
    assert not run("for-loop", hyper, exact_sqrt=True)


@pytest.mark.slow
def test_gradient_kinds_bitwise():
    for grads in sources.SYNTHETIC:
        assert not run("for-loop", Hyper(dtype="bfloat16"), steps=30, grads=grads), grads


def test_foreach_rounds_its_scalars_to_the_param_dtype():
    """torch's ``_foreach_mul_`` rounds the decay and ``b2`` to bfloat16 (b2=0.99 -> 0.98828125); the for-loop's
    ``mul_`` does not: the two torch paths differ, and each jax_impl path follows its own."""
    hyper = Hyper(dtype="bfloat16", b2=0.99, weight_decay=0.5, lr=1e-2)
    params = initial_params()
    loop, foreach = (TorchRunner(p, hyper, params, cls=torch.optim.AdamW, path=p) for p in PATHS)
    source = sources.synthetic("gaussian")
    for t in range(20):
        g = source(t, params)
        loop.step(g)
        foreach.step(g)
    assert compare(loop, foreach, 20), "the torch paths agree here: this test would not tell them apart"
    for path in PATHS:
        assert not run(path, hyper, steps=20), path


@pytest.mark.parametrize("path, option", _path_options(OPTIONS, fast=("default", "amsgrad+maximize+mask")))
@needs_mkl
def test_float32_bitwise_with_mkl_sqrt(path, option):
    """torch's own sqrt, unpatched: jax_impl's (the C++ kernel's blocks through vmsSqrt) is the same, 200 steps."""
    mismatches = run(path, Hyper(**OPTIONS[option]), steps=200, check_every=100)
    assert not mismatches, mismatches[0]


@needs_mkl
@pytest.mark.parametrize("dtype, wrapped", [("float32", False), ("float32", True), ("float64", False)])
def test_large_leaf_bitwise_with_mkl_sqrt(x64, dtype, wrapped):
    """float32: a leaf the kernel splits over threads and 512-element sqrt blocks (300,007 elements, amsgrad,
    decay), in place; and inside optax.chain, where the kernel writes only the moments and XLA the param, through
    apply_exact's recomputation with MKL's sqrt.  float64 (XLA's ops): 1.3% of its sqrts are MKL's own."""
    rng = np.random.default_rng(0)
    value, grads = rng.standard_normal(300_007), [rng.standard_normal(300_007) for _ in range(5)]
    tparam = torch.tensor(value, dtype=getattr(torch, dtype), requires_grad=True)
    optimizer = torch.optim.AdamW([tparam], lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    adamw = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=True, torch_path="for-loop")
    tx = optax.chain(optax.identity(), adamw) if wrapped else adamw
    params = [jnp.asarray(value, dtype)]
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t, g in enumerate(grads):
        tparam.grad = torch.tensor(g, dtype=tparam.dtype)
        optimizer.step()
        params, state = step([jnp.asarray(g, dtype)], state, params)
        np.testing.assert_array_equal(np.asarray(params[0]), tparam.detach().numpy(), err_msg=f"step {t + 1}")


@needs_mkl
def test_float32_xla_path_bitwise_with_mkl_sqrt():
    """XLA's ops with the custom call jax_impl_vml_sqrt in place of jnp.sqrt."""
    assert not run("for-loop", Hyper(amsgrad=True), kernel="xla")


@needs_mkl
@pytest.mark.parametrize("dtype, bits", [(np.float32, np.uint32), (np.float64, np.uint64)])
def test_vml_sqrt_is_torchs_sqrt(x64, dtype, bits):
    """Every element at any offset and length (VML's result does not depend on them), subnormals, inf, nan."""
    rng = np.random.default_rng(0)
    x = (rng.integers(0, np.iinfo(bits).max, 1 << 14, dtype=bits, endpoint=True) >> bits(1)).view(dtype)
    x[:4] = [0.0, np.inf, np.nan, np.finfo(dtype).smallest_subnormal]
    want = torch.from_numpy(x).sqrt().numpy().view(bits)
    for start, stop in ((0, x.size), (3, 3 + 37), (1, x.size - 5)):
        got = np.asarray(jax.jit(cpu_kernel.vml_sqrt)(x[start:stop])).view(bits)
        np.testing.assert_array_equal(got, want[start:stop], err_msg=f"{dtype.__name__} [{start}:{stop}]")
    with np.errstate(invalid="ignore"):
        assert np.sum(want != np.sqrt(x).view(bits)) > 0  # the correctly rounded sqrt would not pass


def test_mkl_env_var_turns_mkl_off():
    """``JAX_IMPL_MKL=0``: the correctly rounded sqrt, whatever is installed (a fresh process: the choice is made
    once, when the kernel loads)."""
    code = "from jax_impl import cpu_kernel; print(cpu_kernel.sqrt_source())"
    env = {**os.environ, cpu_kernel.MKL_ENV: "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == cpu_kernel.CORRECTLY_ROUNDED, done.stderr[-2000:]


@pytest.mark.skipif(MKL_SQRT, reason="measures the correctly rounded fallback; jax_impl found MKL")
def test_float32_sqrt_drift_is_bounded():
    """MKL's sqrt is within 1 ulp of the correctly rounded one (±1 ulp in 17% of float32 values, 0.75 ulp
    max error); through the denominator that moves a param by about one ulp of its step.  Measured on this
    stream, torch's for-loop against jax_impl(for-loop): params within 3.0e-8 abs. after 100 steps, 1.2e-7
    after 300 and after 1000 (bounded; benchmarks/torch_paths.py has the table).  The bound is 4x 1.2e-7."""
    params = initial_params()
    ours = JaxRunner("jax_impl(for-loop)", Hyper(), params, kind="exact", torch_path="for-loop")
    theirs = TorchRunner("torch.AdamW(for-loop)", Hyper(), params, cls=torch.optim.AdamW, path="for-loop")
    source = sources.synthetic("gaussian")
    for t in range(STEPS):
        g = source(t, params)
        ours.step(g)
        theirs.step(g)
    worst = max(float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
                for x, y in zip(ours.params(), theirs.params()))
    assert compare(ours, theirs, STEPS), "MKL's sqrt left no trace: the docs' measured table is out of date"
    assert worst <= 4 * 1.2e-7, worst


def test_torch_sqrt_is_not_correctly_rounded():
    """What the float32/float64 tests swap out: torch's CPU sqrt differs from the correctly rounded one by
    at most 1 ulp, in about 17% of float32 values (MKL's VML_HA vsSqrt); bfloat16/float16 round a correct one."""
    rng = np.random.default_rng(0)
    x = (np.abs(rng.standard_normal(1 << 16)) * 10.0 ** rng.uniform(-30, 5, 1 << 16)).astype(np.float32)
    ulps = torch.from_numpy(x).sqrt().numpy().view(np.int32).astype(np.int64) - np.sqrt(x).view(np.int32)
    assert set(np.unique(ulps)) <= {-1, 0, 1}
    assert 0.1 < np.mean(ulps != 0) < 0.25
    half = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(half.sqrt(), torch.from_numpy(np.sqrt(half.float().numpy())).to(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
def test_exact_wrappers_recompute_the_loop_param(path):
    """apply_exact through wrappers rebuilds p_new from the new moments: for the loop paths also in bfloat16,
    where every moment is stored in the param dtype (the fused kernel's float32 registers are not)."""
    rng = np.random.default_rng(0)
    shapes = [(7,), (3, 11), ()]
    values = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(10)]
    tparams = [torch.tensor(v, dtype=torch.bfloat16, requires_grad=True) for v in values]
    optimizer = torch.optim.AdamW(tparams, lr=1e-2, weight_decay=0.1, foreach=path == "foreach")
    for step_grads in grads:
        for p, g in zip(tparams, step_grads):
            p.grad = torch.tensor(g, dtype=torch.bfloat16)
        optimizer.step()
    expected = [p.detach().float().numpy() for p in tparams]
    adamw = jax_impl.adamw(1e-2, weight_decay=0.1, torch_path=path)
    wrappers = {"chain": optax.chain(optax.identity(), adamw), "MultiSteps": optax.MultiSteps(adamw, 1)}
    for name, tx in wrappers.items():
        params = [jnp.asarray(v, jnp.bfloat16) for v in values]
        state = tx.init(params)
        step = jax.jit(lambda g, s, p, tx=tx: jax_impl.apply_exact(tx, g, s, p))
        for step_grads in grads:
            params, state = step([jnp.asarray(g, jnp.bfloat16) for g in step_grads], state, params)
        for got, want in zip(params, expected):
            np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=f"{path} {name}")


def test_exact_optimizer_for_loop():
    nnx = pytest.importorskip("flax.nnx")
    rng = np.random.default_rng(1)
    w0, grads = rng.standard_normal((5, 3)), [rng.standard_normal((5, 3)) for _ in range(6)]
    w = torch.tensor(w0, dtype=torch.bfloat16, requires_grad=True)
    optimizer = torch.optim.AdamW([w], lr=1e-2, amsgrad=True)  # the CPU default: the for-loop
    assert torch_path_of(optimizer) == "for-loop"

    class Model(nnx.Module):
        def __init__(self, value):
            self.w = nnx.Param(jnp.asarray(value, jnp.bfloat16))

    model = Model(w0)
    opt = jax_impl.ExactOptimizer(model, jax_impl.adamw(1e-2, amsgrad=True, torch_path="for-loop"), wrt=nnx.Param)
    step = nnx.jit(lambda model, opt, grads: opt.update(model, grads))
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.bfloat16)
        optimizer.step()
        step(model, opt, Model(g))  # nnx gradients come as a model-shaped state
    np.testing.assert_array_equal(np.asarray(model.w[...], np.float32), w.detach().float().numpy())


def test_torch_path_of_follows_torchs_resolution(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    assert torch_path_of(torch.optim.AdamW([p])) == "for-loop"  # foreach=None on the CPU
    assert torch_path_of(torch.optim.AdamW([p], foreach=True)) == "foreach"
    assert torch_path_of(torch.optim.AdamW([p], fused=True)) == "fused"
    assert torch_path_of(torch.optim.AdamW([p], differentiable=True)) == "for-loop"
    # Where torch's own rule picks foreach (a device with native foreach kernels: CUDA), so does the harness.
    from torch.optim import optimizer as torch_optimizer
    monkeypatch.setattr(torch_optimizer, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    assert torch_path_of(torch.optim.AdamW([p])) == "foreach"
    assert torch_path_of(torch.optim.AdamW([p], lr=torch.tensor(1e-3))) == "for-loop"
    with pytest.raises(ValueError, match="different paths"):
        torch_path_of(torch.optim.AdamW([{"params": [p]}, {"params": [torch.zeros(2)], "foreach": False}]))


def test_torch_default_runner_takes_the_path_torch_takes():
    hyper = Hyper(dtype="bfloat16", b2=0.99, weight_decay=0.5)
    params = initial_params()
    default = implementations.make("torch.AdamW(default)", hyper, params)
    assert default.path == "for-loop"
    ours = implementations.make("jax_impl(torch default)", hyper, params)
    source = sources.synthetic("gaussian")
    for t in range(10):
        g = source(t, params)
        default.step(g)
        ours.step(g)
    assert not compare(ours, default, 10)


@pytest.mark.parametrize("bad, match", [
    (dict(torch_path="loop"), "Invalid torch_path: 'loop'"),
    (dict(torch_path="for-loop", nesterov=True), "nesterov"),
    (dict(torch_path="foreach", rounding="torch-cuda"), "rounding='torch-cuda'"),
])
def test_bad_torch_path_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        jax_impl.adamw(1e-3, **bad)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_ten_thousand_steps_bitwise(dtype):
    hyper = Hyper(dtype=dtype, amsgrad=True, decay_mask=OPTIONS["mask"]["decay_mask"],
                  eps=1e-4 if dtype == "float16" else 1e-8)
    assert not run("for-loop", hyper, steps=10_000, check_every=1000, exact_sqrt=dtype == "float32")


@pytest.mark.slow  # about 50 s: three compiled steps per layout, in a subprocess of 8 devices
def test_sharded_on_8_cpu_devices():
    from helpers import run_on_8_cpu_devices

    run_on_8_cpu_devices("torch_paths_sharded_checks.py")
