"""Bad input is refused with an error naming the argument and the value; torch's conventions on the exact paths.

Hyperparameter types, mask leaves, the state's count, ``FlatLayout``'s buffers and trees, gradient dtypes
(torch's rule on apply_exact / ExactOptimizer / apply_gradients_exact, optax's on ``tx.update``), and the
optax update of an infinite parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_impl
from jax_impl import cpu_kernel

KERNELS = ["xla"] + (["cpu"] if cpu_kernel.available() else [])


def _same_bits(a, b) -> bool:
    """Bitwise equal, a NaN equal to any NaN (its sign and payload are not specified)."""
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes())


def _error(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test compares whatever was raised
        return err
    return None


# --- 10. hyperparameters of the wrong type ---------------------------------------------------------------------

def _torch_adamw(name, value):
    torch_kwargs = {"learning_rate": {"lr": value}, "b1": {"betas": (value, 0.999)},
                    "b2": {"betas": (0.9, value)}, "eps": {"eps": value}, "weight_decay": {"weight_decay": value}}
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], **torch_kwargs[name])


TORCH_TYPE_ERRORS = [("learning_rate", 1j), ("learning_rate", "1e-3"), ("learning_rate", None),
                     ("learning_rate", 1e-3 + 0j), ("b1", 0.9j), ("b2", "0.999"), ("eps", 1e-8j),
                     ("eps", "1e-8"), ("weight_decay", 0.01j), ("weight_decay", "0")]


@pytest.mark.parametrize("name, value", TORCH_TYPE_ERRORS, ids=[f"{n}={v!r}" for n, v in TORCH_TYPE_ERRORS])
def test_hyperparameter_types_torch_refuses_are_refused_with_torchs_error(name, value):
    expected = _error(lambda: _torch_adamw(name, value))
    assert isinstance(expected, TypeError)
    ours = _error(lambda: jax_impl.adamw(**{name: value}))
    assert type(ours) is TypeError, ours
    assert str(expected) in str(ours) and name in str(ours) and repr(value) in str(ours), str(ours)


@pytest.mark.parametrize("name, value, error, message", [
    ("learning_rate", np.asarray(1e-3 + 1e-4j), TypeError, "learning_rate must be a real number, got (0.001+0.0001j)"),
    ("b1", jnp.asarray([0.9, 0.8]), ValueError, "b1 must be a single number, got an array of shape (2,)"),
    ("learning_rate", np.asarray("1e-3"), TypeError, "learning_rate must be a real number, got array('1e-3'"),
])
def test_hyperparameter_arrays_that_are_not_one_real_number_are_refused(name, value, error, message):
    with pytest.raises(error) as info:
        jax_impl.adamw(**{name: value})
    assert message in str(info.value)


@pytest.mark.parametrize("value", [True, 1, np.float32(1e-3), np.asarray(1e-3), jnp.asarray([1e-3]),
                                   jnp.asarray(1e-3 + 0j, jnp.complex64)],
                         ids=["bool", "int", "np.float32", "0-d array", "1-element array", "complex64 0j array"])
def test_real_hyperparameters_are_accepted(value):
    tx = jax_impl.adamw(value)  # torch accepts lr=True, lr=1 and 1-element tensors
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update(params, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_injected_complex_hyperparameters_of_complex_params_keep_working(dtype, request):
    # inject_hyperparams makes its hyperparameters complex arrays (imaginary part 0) for complex params.
    if dtype == "complex128":
        request.getfixturevalue("x64")
    params = {"w": jnp.asarray([1 + 2j, -0.5j, 3.0], dtype)}
    grads = {"w": jnp.asarray([0.3 - 1j, 2 + 0.1j, -1j], dtype)}
    plain = jax_impl.adamw(1e-2, amsgrad=True)
    injected = optax.inject_hyperparams(jax_impl.adamw, static_args=("amsgrad",))(learning_rate=1e-2, amsgrad=True)
    state = injected.init(params)
    assert state.hyperparams["learning_rate"].dtype == dtype
    expected, _ = plain.update(grads, plain.init(params), params)
    for update in (injected.update, jax.jit(injected.update)):
        updates, _ = update(grads, state, params)
        assert np.asarray(updates["w"]).tobytes() == np.asarray(expected["w"]).tobytes()
    new_params, _ = jax_impl.apply_exact(injected, grads, state, params)
    exact, _ = jax_impl.apply_exact(plain, grads, plain.init(params), params)
    assert np.asarray(new_params["w"]).tobytes() == np.asarray(exact["w"]).tobytes()


# --- 10. mask leaves that are not bools ------------------------------------------------------------------------

BAD_MASKS = [("no", "'no'"), ("", "''"), (1, "1"), (0.0, "0.0"), (None, "None"), (np.asarray([True, False]), "array"),
             (jnp.asarray(1, jnp.int32), "Array(1")]


@pytest.mark.parametrize("leaf, shown", BAD_MASKS, ids=[shown for _, shown in BAD_MASKS])
@pytest.mark.parametrize("where", ["adamw", "mask callable", "FlatLayout"])
def test_mask_leaves_must_be_bools(where, leaf, shown):
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    mask = {"w": True, "b": leaf}
    if where == "FlatLayout":
        run = lambda: jax_impl.FlatLayout(params, mask=mask)  # noqa: E731
    else:
        tx = jax_impl.adamw(mask=(lambda p: mask) if where == "mask callable" else mask)
        run = lambda: tx.update(params, tx.init(params), params)  # noqa: E731
    with pytest.raises(TypeError, match=r"mask leaf for parameter \['b'\] is ") as info:
        run()
    assert shown in str(info.value) and "bool" in str(info.value)


@pytest.mark.parametrize("flag", [False, np.bool_(False), jnp.asarray(False), np.asarray(False)],
                         ids=["bool", "np.bool_", "jax 0-d", "numpy 0-d"])
def test_bool_mask_leaves_are_accepted(flag):
    params = {"w": jnp.ones(3)}
    tx = jax_impl.adamw(1.0, weight_decay=0.5, mask={"w": flag})
    reference = jax_impl.adamw(1.0, weight_decay=0.0)
    updates, _ = tx.update(params, tx.init(params), params)
    expected, _ = reference.update(params, reference.init(params), params)
    np.testing.assert_array_equal(updates["w"], expected["w"])


# --- 10. the state's count ---------------------------------------------------------------------------------------

BAD_COUNTS = {  # id: (count, error, message, whether a jitted update can see it: a traced count's value is unknown)
    "-1": (jnp.asarray(-1, jnp.int32), ValueError, "adamw: state[0].count is -1; it must be >= 0", False),
    "float32": (jnp.asarray(1.0, jnp.float32), TypeError, "adamw: state[0].count has dtype float32; it must be an integer",
                True),
    "bool": (jnp.asarray(True), TypeError, "adamw: state[0].count has dtype bool; it must be an integer", True),
    "shape (2,)": (jnp.zeros(2, jnp.int32), ValueError, "adamw: state[0].count has shape (2,); it must be a scalar", True),
}
COUNT_CASES = [pytest.param(path, *case[:3], id=f"{path}-{name}") for name, case in BAD_COUNTS.items()
               for path in ("update", "apply_exact", "jit update") if path != "jit update" or case[3]]


@pytest.mark.parametrize("path, count, error, message", COUNT_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_count_is_refused(kernel, path, count, error, message):
    params = {"w": jnp.ones(3)}
    tx = jax_impl.adamw(kernel=kernel)
    moments, *rest = tx.init(params)
    state = (moments._replace(count=count), *rest)
    run = {"update": lambda: tx.update(params, state, params),
           "jit update": lambda: jax.jit(tx.update)(params, state, params),
           "apply_exact": lambda: jax_impl.apply_exact(tx, params, state, params)}[path]
    with pytest.raises(error) as info:
        run()
    assert message in str(info.value)


def test_a_large_count_is_accepted():
    params = {"w": jnp.ones(3)}
    tx = jax_impl.adamw()
    moments, *rest = tx.init(params)
    state = (moments._replace(count=jnp.asarray(2 ** 23, jnp.int32)), *rest)
    updates, new_state = tx.update(params, state, params)
    assert int(new_state[0].count) == 2 ** 23 + 1 and np.all(np.isfinite(np.asarray(updates["w"])))


# --- 11. FlatLayout: buffers and trees of another shape -----------------------------------------------------------

def _layout():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "h": jnp.ones(5, jnp.bfloat16)}
    return params, jax_impl.FlatLayout(params)


@pytest.mark.parametrize("flat, message", [
    ({"float32": jnp.arange(5.0), "bfloat16": jnp.zeros(5, jnp.bfloat16)},
     "FlatLayout.unflatten: buffer 'float32' has shape (5,), the layout's is (7,)"),
    ({"float32": jnp.arange(9.0), "bfloat16": jnp.zeros(5, jnp.bfloat16)},
     "FlatLayout.unflatten: buffer 'float32' has shape (9,), the layout's is (7,)"),
    ({"float32": jnp.zeros((7, 1)), "bfloat16": jnp.zeros(5, jnp.bfloat16)},
     "FlatLayout.unflatten: buffer 'float32' has shape (7, 1), the layout's is (7,)"),
    ({"float32": jnp.zeros(7)}, "FlatLayout.unflatten: expected the buffers ['bfloat16', 'float32'], got ['float32']"),
    ({"float32": jnp.zeros(7), "bfloat16": jnp.zeros(5, jnp.bfloat16), "x": jnp.zeros(1)},
     "FlatLayout.unflatten: expected the buffers ['bfloat16', 'float32'], got ['bfloat16', 'float32', 'x']"),
    (jnp.zeros(12), "FlatLayout.unflatten: expected a dict of buffers, got an array of shape (12,)"),
], ids=["short", "long", "2-d", "missing", "extra", "not a dict"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unflatten_refuses_buffers_of_another_size(jit, flat, message):
    _, layout = _layout()
    with pytest.raises(ValueError) as info:
        (jax.jit(layout.unflatten) if jit else layout.unflatten)(flat)
    assert message in str(info.value)


@pytest.mark.parametrize("change, error, message", [
    (lambda t: {**t, "a": jnp.ones(4)}, ValueError, "FlatLayout.flatten: leaf ['a'] has shape (4,), the layout's is (3,)"),
    (lambda t: {**t, "b": jnp.ones((4, 1))}, ValueError,
     "FlatLayout.flatten: leaf ['b'] has shape (4, 1), the layout's is (2, 2)"),
    (lambda t: {**t, "b": {"c": t["b"]}}, ValueError, "FlatLayout.flatten: the tree does not match the layout's"),
    (lambda t: {"a": t["a"], "h": t["h"]}, ValueError, "FlatLayout.flatten: the tree does not match the layout's"),
    (lambda t: [t["a"], t["b"], t["h"]], ValueError, "FlatLayout.flatten: the tree does not match the layout's"),
], ids=["longer leaf", "same size, other shape", "deeper tree", "missing leaf", "other container"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_flatten_refuses_trees_of_another_shape(jit, change, error, message):
    params, layout = _layout()
    with pytest.raises(error) as info:
        (jax.jit(layout.flatten) if jit else layout.flatten)(change(params))
    assert message in str(info.value)


# --- 12. gradients of another dtype: refused on the exact paths (torch), cast by tx.update (optax) -------------

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "complex64": torch.complex64, "int32": torch.int32}
GRAD_DTYPES = [("bfloat16", "float32"), ("float16", "float32"), ("float32", "bfloat16"), ("float32", "float16"),
               ("complex64", "float32"), ("float32", "int32")]


def _torch_grad_error(param_dtype, grad_dtype) -> RuntimeError:
    param = torch.ones(3, dtype=TORCH_DTYPES[param_dtype], requires_grad=True)
    err = _error(lambda: setattr(param, "grad", torch.ones(3, dtype=TORCH_DTYPES[grad_dtype])))
    assert isinstance(err, RuntimeError)
    return err


def _exact_paths():
    from flax import nnx
    from flax.training.train_state import TrainState

    def bare(tx, grads, params):
        return jax_impl.apply_exact(tx, grads, tx.init(params), params)

    def chain(tx, grads, params):
        tx = optax.chain(optax.clip(1.0), tx)
        return jax_impl.apply_exact(tx, grads, tx.init(params), params)

    def train_state(tx, grads, params):
        return jax_impl.apply_gradients_exact(TrainState.create(apply_fn=None, params=params, tx=tx), grads=grads)

    def nnx_optimizer(tx, grads, params):
        class Model(nnx.Module):
            def __init__(self):
                self.w = nnx.Param(params["w"])
        model = Model()
        jax_impl.ExactOptimizer(model, tx, wrt=nnx.Param).update(model, nnx.State({"w": nnx.Param(grads["w"])}))

    return {"apply_exact": bare, "apply_exact(chain)": chain, "apply_exact jitted": jax.jit(bare, static_argnums=0),
            "apply_gradients_exact": train_state, "ExactOptimizer": nnx_optimizer}


@pytest.mark.parametrize("param_dtype, grad_dtype", GRAD_DTYPES, ids=[f"{p}<-{g}" for p, g in GRAD_DTYPES])
@pytest.mark.parametrize("path", list(_exact_paths()))
def test_exact_paths_refuse_gradients_of_another_dtype_as_torch_does(path, param_dtype, grad_dtype):
    params = {"w": jnp.linspace(-1, 1, 3).astype(param_dtype)}
    grads = {"w": jnp.linspace(0.3, -2, 3).astype(grad_dtype)}
    with pytest.raises(RuntimeError) as info:
        _exact_paths()[path](jax_impl.adamw(1e-2), grads, params)
    message = str(info.value)
    assert f"gradient for parameter ['w'] has dtype {grad_dtype}, the parameter has dtype {param_dtype}" in message
    torch_first_sentence = str(_torch_grad_error(param_dtype, grad_dtype)).split(". ")[0]
    assert torch_first_sentence in message, (torch_first_sentence, message)


@pytest.mark.parametrize("param_dtype, grad_dtype", GRAD_DTYPES[:5], ids=[f"{p}<-{g}" for p, g in GRAD_DTYPES[:5]])
def test_optax_update_casts_gradients_of_another_floating_dtype(param_dtype, grad_dtype):
    # optax's path accepts them (optax.adamw does), cast to the param's dtype before the step.
    params = {"w": jnp.linspace(-1, 1, 3).astype(param_dtype)}
    grads = {"w": jnp.linspace(0.3, -2, 3).astype(grad_dtype)}
    tx = jax_impl.adamw(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected, _ = tx.update(jax.tree.map(lambda g: g.astype(param_dtype), grads), tx.init(params), params)
    assert updates["w"].dtype == param_dtype
    assert np.asarray(updates["w"]).tobytes() == np.asarray(expected["w"]).tobytes()
    # and the exact path takes the same step once the caller casts, as torch's caller must
    cast = jax.tree.map(lambda g: g.astype(param_dtype), grads)
    new_params, _ = jax_impl.apply_exact(tx, cast, tx.init(params), params)
    assert new_params["w"].dtype == param_dtype


# --- 13. the optax update of an infinite parameter --------------------------------------------------------------

def _torch_step(params: np.ndarray, grads: np.ndarray, weight_decay: float, amsgrad: bool) -> np.ndarray:
    p = torch.nn.Parameter(torch.from_numpy(params.copy()))
    optimizer = torch.optim.AdamW([p], lr=1e-3, weight_decay=weight_decay, amsgrad=amsgrad, fused=True)
    p.grad = torch.from_numpy(grads.copy())
    optimizer.step()
    return p.detach().numpy()


# 37 elements: the kernel's update mode (and a scalar tail); 70,003: its moments mode (> 65,536 elements).
@pytest.mark.parametrize("size", [37, 70_003])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_optax_update_keeps_an_infinite_param_infinite(kernel, amsgrad, weight_decay, size):
    rng = np.random.default_rng(size)
    p = rng.standard_normal(size).astype(np.float32)
    p[[0, 5, size - 1]] = [np.inf, -np.inf, np.inf]  # size - 1: in the scalar tail
    p[7] = np.nan
    g = rng.standard_normal(size).astype(np.float32)
    g[9] = 0.0
    tx = jax_impl.adamw(1e-3, weight_decay=weight_decay, amsgrad=amsgrad, kernel=kernel)
    params = {"w": jnp.asarray(p)}
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init(params), params)
    applied = np.asarray(optax.apply_updates(params, updates)["w"])
    torch_new = _torch_step(p, g, weight_decay, amsgrad)
    assert applied[0] == np.inf and applied[5] == -np.inf and applied[size - 1] == np.inf and np.isnan(applied[7])
    exact, _ = jax_impl.apply_exact(tx, {"w": jnp.asarray(g)}, tx.init(params), params)
    exact = np.asarray(exact["w"])
    assert _same_bits(exact, torch_new)
    # The update is p_new - p bit for bit wherever p_new differs from p, and +0 where they are equal.
    u = np.asarray(updates["w"])
    with np.errstate(invalid="ignore"):
        expected_u = np.where(exact == p, np.float32(0), exact - p)
    assert _same_bits(u, expected_u)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_optax_update_keeps_an_infinite_param_infinite_in_other_dtypes(dtype, x64):
    p = jnp.asarray([np.inf, -np.inf, 0.5, np.inf], dtype)
    g = jnp.asarray([0.1, -0.2, 0.3, 0.0], dtype)
    for weight_decay in (0.0, 0.1):
        tx = jax_impl.adamw(1e-3, weight_decay=weight_decay)
        updates, _ = tx.update(g, tx.init(p), p)
        applied = optax.apply_updates(p, updates)
        assert applied.dtype == p.dtype
        np.testing.assert_array_equal(np.asarray(applied, np.float64)[[0, 1, 3]], [np.inf, -np.inf, np.inf])
        exact, _ = jax_impl.apply_exact(tx, g, tx.init(p), p)
        np.testing.assert_array_equal(np.asarray(exact, np.float64)[[0, 1, 3]], [np.inf, -np.inf, np.inf])


@pytest.mark.parametrize("kernel", KERNELS)
def test_apply_exact_through_a_wrapper_accepts_an_infinite_param(kernel):
    # apply_exact checks the updates it gets against adamw's own: both must be the same +0 at an inf param.
    tx = optax.chain(optax.clip(10.0), jax_impl.adamw(1e-3, weight_decay=0.0, kernel=kernel))
    params = {"w": jnp.asarray([np.inf, 1.0, -np.inf], jnp.float32)}
    grads = {"w": jnp.asarray([0.5, 0.5, 0.5], jnp.float32)}
    new_params, _ = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(grads, tx.init(params), params)
    jax.effects_barrier()
    new = np.asarray(new_params["w"])
    assert new[0] == np.inf and new[2] == -np.inf and np.isfinite(new[1])
