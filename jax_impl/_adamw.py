"""AdamW for JAX with ``torch.optim.AdamW`` semantics and torch's CPU rounding.

The update is the one of torch's fused CPU kernel (``torch.optim.AdamW(fused=True)``),
operation by operation, so that on the CPU the jitted update reproduces torch's
parameters and moments bit for bit.  Three XLA:CPU habits stand in the way and
are each countered where they occur:

* LLVM contracts ``a * b + c`` into one FMA wherever it may.  torch's kernel
  has FMAs in some places (the ``lerp`` of the first moment, the second-moment
  update) and none in others (the weight-decay multiply).  Where a product
  must stay rounded on its own, a ``-0.0`` is added to it: ``fma(p, d, -0.0)``
  is the correctly rounded ``p * d`` whether or not LLVM contracts, and the
  following ``+ update`` can no longer fuse with the multiply.
* XLA rewrites division by a broadcast scalar into multiplication by its
  reciprocal.  torch divides, so the divisor is made elementwise by adding
  the same ``-0.0`` to it.
* torch's kernel processes each tensor in vectors of 32 bytes and finishes the
  last ``numel % width`` elements with scalar C++ whose FMA contraction differs
  (the second moment becomes ``fma(b2, v, (c * g) * g)`` instead of
  ``fma(c * g, g, b2 * v)``).  Those tail elements get the tail formula here.

The ``-0.0`` is ``-min(|g|, 0)``: exactly ``-0.0`` for every non-NaN gradient
(infinite ones included) and NaN only where torch's result is NaN too.

All of this is pinned by ``tests/jax_impl_tests/test_jax_parity.py``, which fails if a
new XLA release contracts or rewrites differently.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike

from jax_impl import cuda_rounding
from jax_impl._cpu_rounding import TORCH_PATHS, validate_order
from jax_impl._dispatch import KERNELS, adamw_step, with_delta
from jax_impl._state import (AdamWState, MaskOrFn, ScalarOrSchedule,
                             check_grads, check_params, check_state,
                             concrete_hyperparameter, dtype_of,
                             exact_recorders, optax_tree, optax_update,
                             validate_hyperparameters)


def _is_complex(leaf) -> bool:
    return jnp.issubdtype(dtype_of(leaf), jnp.complexfloating)


def _real_view(x):
    """torch.view_as_real: a complex array as real pairs in a trailing axis of 2."""
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1) if x is not None and _is_complex(x) else x


def _from_real_view(x, dtype):
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(dtype)


def _cast_grads(grads: optax.Updates, params: optax.Params) -> optax.Updates:
    """Gradients in the params' dtypes, as optax casts them (float32 grads for bfloat16 params, ...).

    Only floating to floating (or complex) casts: an integer gradient, or a
    complex one for a real parameter, is refused with the parameter's path.
    """
    if jax.tree.structure(grads) != jax.tree.structure(params):
        return grads  # check_grads names both trees
    def cast(path, g, p):
        g_dtype, p_dtype = jnp.result_type(g), jnp.result_type(p)
        if g_dtype == p_dtype:
            return g
        if not jnp.issubdtype(g_dtype, jnp.inexact) or (
                jnp.issubdtype(g_dtype, jnp.complexfloating) and not jnp.issubdtype(p_dtype, jnp.complexfloating)):
            raise TypeError(
                f"adamw: gradient for parameter {jax.tree_util.keystr(path) or '<root>'} has dtype {g_dtype}, "
                f"which cannot be cast to the parameter's dtype {p_dtype}"
            )
        return jnp.asarray(g).astype(p_dtype)
    return jax.tree_util.tree_map_with_path(cast, grads, params)


def _conventions_step(grads, state: tuple, params, delta=None, **options):
    """:func:`adamw_step` behind optax's conventions: grads cast to the params' dtypes, the state checked and
    read as its torch-named view (optax's tree in and out), an empty tree, complex params as torch treats them
    (``torch.view_as_real``: each real and imaginary part is a parameter of its own)."""
    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    grads = _cast_grads(grads, params)
    check_grads(grads, params)
    layout = dict(schedule=callable(options["learning_rate"]), masked=options["mask"] is not None)
    view = check_state(state, params, options["mu_dtype"], options["amsgrad"], **layout)
    new_params, new_view = _torch_named_step(grads, view, params, delta, **options)
    return new_params, optax_tree(new_view, **layout)


def _torch_named_step(grads, state: AdamWState, params, delta=None, **options):
    if not jax.tree.leaves(params):
        return params, state._replace(count=optax.safe_increment(state.count))
    mu_dtype = options["mu_dtype"]
    complex_mu = mu_dtype is not None and jnp.issubdtype(mu_dtype, jnp.complexfloating)
    if not complex_mu and not any(_is_complex(p) for p in jax.tree.leaves(params)):
        return adamw_step(grads, state, params, delta=delta, **options)
    # The mask is resolved on the complex params (a callable may look at their ndim).
    mask = options["mask"]
    options = dict(options, mask=mask(params) if callable(mask) else mask,
                   mu_dtype=None if mu_dtype is None else jnp.finfo(mu_dtype).dtype)  # complex64 -> float32

    def to_real(x, p):  # a complex param's leaves as its real view; a real param's complex moment (mu_dtype) as its real part
        return None if x is None else _real_view(x) if _is_complex(p) else jnp.real(x)

    def back(new, old, p):
        return None if new is None else _from_real_view(new, old.dtype) if _is_complex(p) else new.astype(old.dtype)

    real = lambda tree: None if tree is None else jax.tree.map(to_real, tree, params)  # noqa: E731
    moments = [state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq]
    new_params, new_state = adamw_step(real(grads), AdamWState(state.count, *map(real, moments)), real(params),
                                        **options)
    new_moments = [None if old is None else jax.tree.map(back, new, old, params)
                   for new, old in zip(new_state[1:], moments)]
    new_params = jax.tree.map(back, new_params, params, params)
    return with_delta(delta, new_params, params), AdamWState(new_state.count, *new_moments)


def _update_dtype(dtype) -> jnp.dtype:
    # optax's convention: updates have the params' dtype (lax.cond around
    # tx.update and optax's dtype checks rely on it).  For bfloat16/float16
    # params p + (p_new - p) then rounds twice; apply_exact is exact.
    return jnp.dtype(dtype)


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: MaskOrFn = None,
    decay_rounding: str = "torch",
    torch_layout: Any | None = None,
    scalar_tail: Any | None = None,
    kernel: str = "auto",
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    rounding: str | cuda_rounding.CudaRounding = "auto",
    torch_path: str = "fused",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with decoupled weight decay, following ``torch.optim.AdamW``.

    Defaults are torch's (``weight_decay=1e-2``; optax's ``adamw`` uses 1e-4).
    With :math:`g_t` the gradient (negated when ``maximize``), :math:`\gamma_t`
    the learning rate and :math:`\lambda` the weight decay, step :math:`t` is

    .. math::

      \begin{aligned}
        \theta' &\leftarrow \theta_{t-1} (1 - \gamma_t \lambda) \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        \theta_t &\leftarrow \theta' - \frac{\gamma_t}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
      \end{aligned}

    evaluated with the rounding of torch's fused CPU kernel, so that on the CPU
    it equals ``torch.optim.AdamW(fused=True)`` bit for bit (see the module
    docstring).  A schedule is called with the update count before this update
    (0, 1, ...), which is the lr torch uses when an ``lr_scheduler`` is stepped
    after each ``optimizer.step()``.

    Args:
      learning_rate: a float, or a schedule mapping the update count to the lr.
      b1, b2: the exponential decay rates of the moments (torch's ``betas``).
      eps: added to the denominator, after the bias correction (as in torch).
      weight_decay: decoupled weight decay :math:`\lambda`.
      amsgrad: use the running maximum of :math:`v_t` (Reddi et al., 2018).
      maximize: maximize the objective (the gradient is negated).
      mask: a pytree of bools like the params, or a callable returning one
        (a leaf that is not a bool is a ``TypeError``);
        weight decay applies where True (as in ``optax.adamw``), like a torch
        param group with ``weight_decay=0`` where False.
      decay_rounding: ``"torch"`` multiplies by ``1 - lr*wd`` rounded to float32,
        as torch does (pytorch/pytorch#64475: at lr=1e-3, wd=1e-2 that factor
        is off by -1.36e-8, a bias toward zero); ``"precise"`` computes
        ``p - (lr*wd)*p`` instead, whose rounding error is ~1e5 times smaller.
      torch_layout: for bit parity with torch when the params are the torch
        tensors in another layout (Flax kernels are transposed): a pytree like
        the params whose leaves are None (same element order as torch) or an
        int array of the leaf's shape holding each element's flat index in the
        torch tensor (``crosscheck.convert.torch_layout`` builds it).  It picks
        the elements that get the rounding of torch's scalar tail (the last
        ``numel % width`` in torch's order); the math is the same either way.
      scalar_tail: the same choice made explicitly: a pytree like the params
        of int arrays, the flat positions that get the tail's rounding (e.g.
        each tensor's tail inside a flat buffer: ``jax_impl.flat``).
      kernel: ``"xla"`` computes the step with XLA ops (any backend, shards
        without communication); ``"cpu"`` sends float32 leaves to a one-pass
        C++ kernel through ``jax.ffi`` (built on first use; ~3x less memory
        traffic than XLA:CPU's fusions); ``"auto"`` (default) uses the kernel on
        a single-device CPU backend when it builds, else XLA.  In optax's
        ``update`` the kernel writes the update of leaves up to 65,536
        elements, and only the moments of larger ones, whose param XLA
        computes in one pass with ``optax.apply_updates``' add (their update
        would need a fresh buffer per call).  The two agree bit for bit.
        Injected (traced) b1, b2 or eps, ``nesterov`` and a ``mu_dtype`` other
        than float32 take the XLA path.
      mu_dtype: the dtype the first moment is stored in (optax's memory saver,
        e.g. ``jnp.bfloat16``); None: the params' dtype.  The step computes in
        float32 (float64 for float64 params) either way.
      nesterov: optax's Nesterov momentum (``optax.adamw(nesterov=True)``);
        torch's AdamW has none, so this is not torch-exact.
      rounding: whose rounding to reproduce: ``"torch-cpu"`` (torch's fused CPU
        kernel, as above), ``"torch-cuda"`` (torch's fused CUDA kernel: moments
        and decay in double, rounded once; ``jax_impl.cuda_rounding`` has the
        model; computed with float64 scoped to the update, dtypes unchanged),
        or ``"auto"`` (default): torch-cuda on a GPU backend, else torch-cpu.
        A ``jax_impl.CudaRounding`` picks nvcc's FMA contractions explicitly.
        ``nesterov`` and ``mu_dtype`` are optax's, with no CUDA-kernel twin:
        ``"auto"`` then takes the CPU rounding.
      torch_path: which of torch's CPU paths to reproduce: ``"fused"``
        (default, ``torch.optim.AdamW(fused=True)``), ``"for-loop"``
        (``foreach=False``, torch's default on the CPU) or ``"foreach"``
        (``foreach=True``).  The for-loop and foreach paths run one ATen op at a
        time, each rounding to the param dtype (bfloat16/float16 after every
        op); foreach differs from the for-loop only for bfloat16/float16, where
        it rounds the decay factor and ``b2`` to the param dtype.  Bitwise for
        bfloat16 and float16; for float32 and float64 too where MKL is found
        (torch's CPU ``sqrt`` is MKL's, not correctly rounded: the ``mkl``
        extra, ``jax_impl.cpu_kernel.sqrt_source()``), else every op but the
        sqrt (±1 ulp in 17% of float32 values; docs/exactness.md measures the
        drift).  ``torch_layout`` and ``scalar_tail`` concern the
        fused kernel's tail and are ignored by the other paths; ``nesterov``
        needs ``"fused"``; with ``rounding="auto"`` the other paths take the CPU
        rounding on every backend.

    Hyperparameters are real numbers (a complex number or a string is a
    ``TypeError``, as in torch) or one-element arrays, as ``optax.inject_hyperparams``
    passes them: concrete ones are validated and used as Python floats; traced ones
    (under ``jax.jit``) are not validated and the per-step scalars are computed
    in the graph in float64 (scoped ``jax.enable_x64``; float32 on TPU), which
    is bitwise torch's given the same floats (``tests/jax_impl_tests/test_optax_conventions.py``).

    Complex params are treated as torch treats them (``torch.view_as_real``:
    real and imaginary parts are separate parameters); the moments are
    complex arrays like the params, their real views torch's moments.
    ``torch_layout`` and ``scalar_tail`` of a complex leaf refer to its real view.
    In ``update`` (optax's path) gradients of another floating dtype are cast
    to the params' dtypes before the step; :func:`apply_exact` refuses them
    (``RuntimeError``), as torch refuses a ``.grad`` of another dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra ``update`` arguments
      are accepted and ignored).  Its state is ``optax.adamw``'s tree for the same
      options: ``(ScaleByAdamState(count, mu, nu), EmptyState() | MaskedState(EmptyState()),
      EmptyState() | ScaleByScheduleState(count))``, the first a
      ``ScaleByAmsgradState(count, mu, nu, nu_max)`` with amsgrad (``nu_max``:
      torch's ``max_exp_avg_sq``); :func:`jax_impl.torch_view` reads it under torch's names.  Updates have the params' dtypes (optax's
      convention); ``optax.apply_updates`` recovers torch's parameters exactly
      wherever ``p_new - p`` is exact in that dtype (for float32 whenever
      ``p_new`` and ``p`` are within a factor 2, i.e. not for a parameter that
      crosses or nears zero; for bfloat16/float16 rarely).  Where ``p_new == p``
      the update is 0 (bitwise ``p_new - p`` for a finite ``p``), so an infinite
      param stays infinite.  :func:`apply_exact` returns the new params
      themselves and is exact everywhere.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.
    """
    given = (learning_rate, b1, b2, eps, weight_decay)
    learning_rate, b1, b2, eps, weight_decay = (
        concrete_hyperparameter(value, name) for value, name in zip(
            given, ("learning_rate", "b1", "b2", "eps", "weight_decay")))
    try:
        validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding)
    except ValueError as error:
        narrow = {str(v.dtype) for v in given if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
                  and jnp.finfo(v.dtype).bits < 32}
        if narrow:  # optax.inject_hyperparams casts the hyperparameters to the params' dtype (0.999 -> 1.0 in bf16)
            raise ValueError(f"{error}; the hyperparameters arrived as {', '.join(sorted(narrow))} arrays: give "
                             "optax.inject_hyperparams hyperparam_dtype=jnp.float32") from None
        raise
    if kernel not in KERNELS:
        raise ValueError(f"Invalid kernel: {kernel!r} (choose from {KERNELS})")
    cuda_rounding.check_rounding(rounding)
    if torch_path not in TORCH_PATHS:
        raise ValueError(f"Invalid torch_path: {torch_path!r} (choose from {TORCH_PATHS})")
    if torch_path != "fused" and nesterov:
        raise ValueError(f"adamw: nesterov is optax's, with no torch path; torch_path={torch_path!r} needs "
                         "nesterov=False (or torch_path='fused')")
    if torch_path != "fused" and not (isinstance(rounding, str) and rounding in ("auto", "torch-cpu")):
        raise ValueError(f"adamw: torch_path={torch_path!r} reproduces torch's CPU ops; rounding={rounding!r} "
                         "follows torch's fused CUDA kernel: use rounding='auto' or 'torch-cpu'")
    if torch_layout is not None:
        torch_layout = jax.tree.map(validate_order, torch_layout)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.inexact):
        raise ValueError(f"Invalid mu_dtype: {mu_dtype} (mu_dtype must be a floating or complex dtype)")
    options = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   mu_dtype=mu_dtype, nesterov=bool(nesterov), amsgrad=bool(amsgrad), maximize=bool(maximize),
                   mask=mask, decay_rounding=decay_rounding, torch_layout=torch_layout, scalar_tail=scalar_tail,
                   kernel=kernel, rounding=rounding, torch_path=torch_path)

    def zeros_like(p, dtype=None):
        if isinstance(p, jax.ShapeDtypeStruct):  # as optax's init accepts it
            return jnp.zeros(p.shape, dtype or p.dtype, device=p.sharding)
        # shard_alike: each moment takes its parameter's sharding, also when
        # init runs under jax.jit (plain zeros_like would land on one device).
        return shard_alike(jnp.zeros_like(p, dtype), p)[0]

    def init_fn(params: optax.Params) -> tuple:
        check_params(params, mu_dtype)
        zeros = lambda dtype=None: jax.tree.map(lambda p: zeros_like(p, dtype), params)  # noqa: E731
        view = AdamWState(count=jnp.zeros([], jnp.int32), exp_avg=zeros(mu_dtype), exp_avg_sq=zeros(),
                          max_exp_avg_sq=zeros() if amsgrad else None)
        return optax_tree(view, schedule=callable(learning_rate), masked=mask is not None)

    def step_fn(grads, state, params):
        return _conventions_step(grads, state, params, **options)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # optax.GradientTransformationExtraArgs: extra arguments are for other transformations
        for record in exact_recorders:
            record(options, params)
        def delta(new, old):  # p_new - p, and 0 where p_new == p (an infinite p stays infinite)
            dtype = _update_dtype(old.dtype)
            return optax_update(new.astype(dtype), old.astype(dtype))

        # The step computes each leaf's delta itself (the CPU kernel writes it directly).
        return _conventions_step(updates, state, params, delta=delta, **options)

    update_fn.exact_step = step_fn
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# This module's annotations are strings (``from __future__ import annotations``);
# code that inspects ``learning_rate``'s annotation for optax's
# ``ScalarOrSchedule`` (optax's contrib tests do) finds optax's own object.
adamw.__annotations__["learning_rate"] = optax.ScalarOrSchedule
