"""``nnx.Optimizer`` that writes ``jax_impl.adamw``'s new parameters themselves."""

from __future__ import annotations

from flax import nnx

from jax_impl._adamw import apply_exact


class ExactOptimizer(nnx.Optimizer):
    """An ``nnx.Optimizer`` for :func:`jax_impl.adamw` whose ``update`` is bitwise torch's step.

    ``nnx.Optimizer.update`` applies ``p + (p_new - p)`` through
    ``optax.apply_updates``, which can lose low bits where a float32 parameter
    nears zero; this one writes ``p_new`` (:func:`jax_impl.apply_exact`).
    Same constructor and ``update(model, grads)`` as ``nnx.Optimizer``.
    """

    def update(self, model, grads, /, **kwargs):
        if kwargs:
            raise TypeError(f"ExactOptimizer.update takes no extra arguments, got {sorted(kwargs)}")
        graph = {"graph": self.graph} if hasattr(self, "graph") else {}
        params = nnx.as_pure(nnx.state(model, self.wrt, **graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, **graph))
        new_params, new_state = apply_exact(self.tx, grad_arrays, nnx.as_pure(self.opt_state), params)
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_state, **graph))
        self.step[...] += 1
