"""One AdamW step over a tree: which leaves go to the CPU kernel, which to XLA, and which rounding model runs.

Shared by optax's ``update`` (which wants updates) and :func:`jax_impl.apply_exact`
(which wants the new params).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import cpu_kernel, cuda_rounding
from jax_impl._cpu_rounding import (leaf_step, loop_leaf_step, loop_new_param, nesterov_scalars,
                                    new_param, opmath_dtype, resolve_tails,
                                    step_scalars)
from jax_impl._state import AdamWState, check_grads, is_traced, resolve_mask

KERNELS = ("auto", "xla", "cpu")


def with_delta(delta, new_params, params):
    """``new_params``, or the optax updates ``delta(new, old)`` leaf by leaf when a ``delta`` is given."""
    return new_params if delta is None else jax.tree.map(delta, new_params, params)


def adamw_step(grads, state: AdamWState, params, *, learning_rate, b1, b2, eps, weight_decay,
                amsgrad, maximize, mask, decay_rounding, torch_layout, scalar_tail, kernel, mu_dtype=None,
                nesterov=False, rounding="torch-cpu", torch_path="fused", delta=None):
    """New (params, state): the whole update, shared by ``update`` and :func:`apply_exact`.

    ``torch_path``: the rounding of torch's fused kernel, or of its for-loop /
    foreach ops (:func:`jax_impl._cpu_rounding.loop_leaf_step`; float32 leaves
    take the CPU kernel with no scalar tail, which is that formula too).

    With ``delta`` (``delta(new_param, param)``, the optax update of a leaf),
    (updates, state) instead; the CPU kernel then writes float32 leaves'
    updates itself, reading the params without overwriting them, so XLA copies
    nothing to keep them for the caller.
    """
    # torch's CUDA fused kernel has no for-loop twin here: "auto" keeps the CPU model for the other paths.
    contraction = cuda_rounding.resolve(rounding) if torch_path == "fused" or rounding != "auto" else None
    if contraction is not None and (nesterov or mu_dtype is not None):
        if rounding != "auto":
            raise ValueError(f"adamw: rounding={rounding!r} follows torch's CUDA kernel, which has no nesterov "
                             "or mu_dtype; use rounding='torch-cpu' (or 'auto') with them")
        contraction = None
    if contraction is not None:  # torch's CUDA kernel's rounding: its own module
        new_params, new_state = cuda_rounding.adamw_step(
            grads, state, params, contraction, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, mask=mask, kernel=kernel)
        return with_delta(delta, new_params, params), new_state
    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    check_grads(grads, params)
    decay_flags = resolve_mask(mask, params)
    loop_path = torch_path != "fused"
    # The for-loop's ops round alike in their vector body and scalar remainder: no tail.
    tails = [np.zeros(0, np.int64)] * len(jax.tree.leaves(params)) if loop_path else \
        resolve_tails(torch_layout, scalar_tail, params)
    # The kernel takes b1, b2 and eps as compile-time attributes: injected
    # (traced) ones go through the XLA path, which agrees with it bit for bit.
    use_kernel = _use_kernel(kernel) and not any(is_traced(x) for x in (b1, b2, eps))
    count = state.count
    t = optax.safe_increment(count)
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    exp_avg_leaves = treedef.flatten_up_to(state.exp_avg)
    exp_avg_sq_leaves = treedef.flatten_up_to(state.exp_avg_sq)
    max_leaves = treedef.flatten_up_to(state.max_exp_avg_sq) if amsgrad else [None] * len(param_leaves)

    scalars_by_dtype: dict = {}
    results: list = [None] * len(param_leaves)
    kernel_groups: dict[tuple[bool, str], list[int]] = {}  # (decay flag, kernel mode) -> leaves for the CPU kernel
    for i, (p, g, m, v, vmax, decay_on, tail_positions) in enumerate(zip(
            param_leaves, grad_leaves, exp_avg_leaves, exp_avg_sq_leaves, max_leaves, decay_flags, tails)):
        opmath = opmath_dtype(p.dtype)
        if opmath not in scalars_by_dtype:
            scalars_by_dtype[opmath] = step_scalars(learning_rate, b1, b2, weight_decay, count, t, opmath,
                                                    torch_path=torch_path)
            if nesterov:
                scalars_by_dtype[opmath] = nesterov_scalars(scalars_by_dtype[opmath], b1, t, opmath)
        decay = decay_on and (is_traced(weight_decay) or weight_decay != 0)
        if (use_kernel and p.dtype == jnp.float32 and decay_rounding == "torch" and not nesterov
                and m.dtype == jnp.float32):
            if p.size:
                kernel_groups.setdefault((decay, _kernel_mode(delta is not None, p.size)), []).append(i)
            else:
                results[i] = (p, m, v, vmax)
            continue
        if loop_path:
            results[i] = loop_leaf_step(p, g, m, v, vmax, scalars_by_dtype[opmath], b1=b1, b2=b2, eps=eps,
                                        decay=decay, decay_rounding=decay_rounding, amsgrad=amsgrad,
                                        maximize=maximize, torch_path=torch_path, mu_dtype=mu_dtype)
            continue
        results[i] = leaf_step(p, g, m, v, vmax, scalars_by_dtype[opmath], b1=b1, b2=b2, eps=eps, decay=decay,
                                decay_rounding=decay_rounding, amsgrad=amsgrad, maximize=maximize,
                                tail_positions=tail_positions, mu_dtype=mu_dtype)
    scalars = scalars_by_dtype.get(jnp.dtype(jnp.float32))
    for (decay, mode), all_indices in kernel_groups.items():
        for start in range(0, len(all_indices), KERNEL_LEAVES_PER_CALL):
            indices = all_indices[start:start + KERNEL_LEAVES_PER_CALL]
            leaves = [(param_leaves[i], grad_leaves[i], exp_avg_leaves[i], exp_avg_sq_leaves[i], max_leaves[i])
                      for i in indices]
            out = cpu_kernel.step(leaves,
                                  jnp.stack([scalars.decay, scalars.step_size_neg, scalars.bias_correction2_sqrt]),
                                  [tails[i] for i in indices], b1=b1, b2=b2, eps=eps, maximize=maximize,
                                  decay=decay, amsgrad=amsgrad, mode=mode, torch_sqrt=loop_path)
            for i, (new_p, *moments) in zip(indices, out):
                if mode == "moments":  # the param from the new moments, in XLA's pass with the caller's apply_updates
                    param_from_moments = functools.partial(loop_new_param, torch_path=torch_path) if loop_path \
                        else new_param
                    new_p = param_from_moments(param_leaves[i], *moments, scalars, eps=eps, decay=decay,
                                               decay_rounding=decay_rounding, amsgrad=amsgrad)
                results[i] = (new_p, *moments)
    if delta is not None:
        # The kernel's "update" leaves hold their updates already (float32, as
        # delta gives float32 params); the others get theirs here.
        written = {i for (_, mode), indices in kernel_groups.items() if mode == "update" for i in indices}
        results = [r if i in written else (delta(r[0], param_leaves[i]), *r[1:]) for i, r in enumerate(results)]

    new_params, new_m, new_v, new_max = (treedef.unflatten(list(column)) for column in zip(*results))
    new_state = AdamWState(count=t, exp_avg=new_m, exp_avg_sq=new_v,
                           max_exp_avg_sq=new_max if amsgrad else None)
    return new_params, new_state


# XLA's compile time over one custom call grows faster than linearly with its
# operands (1,200 leaves in one call: 110 s to compile; in calls of 16: 2.4 s),
# so the kernel takes at most this many leaves per call.  A call still splits
# its elements over the thread pool, so large leaves lose nothing.
# Measured: benchmarks/compile_time.py.
KERNEL_LEAVES_PER_CALL = 16

# In optax's update the kernel writes the update of leaves up to this many
# elements; of larger ones only the moments, in place, and XLA computes the
# param in one pass with apply_updates' add.  The kernel's update needs a
# buffer of its own, which XLA:CPU allocates per call, from fresh pages once it
# is large; small leaves save XLA a program each.  Measured: benchmarks/step_time.py.
_UPDATE_KERNEL_MAX_SIZE = 1 << 16


def _kernel_mode(optax_update: bool, size: int) -> str:
    if not optax_update:
        return "in_place"
    return "update" if size <= _UPDATE_KERNEL_MAX_SIZE else "moments"


def _use_kernel(kernel: str) -> bool:
    if kernel == "xla":
        return False
    if kernel == "cpu":
        if not cpu_kernel.available():
            raise RuntimeError("adamw: kernel='cpu' asked for, but the CPU kernel could not be built")
        return True
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and cpu_kernel.available()
