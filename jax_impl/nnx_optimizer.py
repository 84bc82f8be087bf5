"""``nnx.Optimizer`` that writes ``jax_impl.adamw``'s new parameters themselves."""

from __future__ import annotations

from flax import nnx

from jax_impl.exact import exact_step_with_updates


class ExactOptimizer(nnx.Optimizer):
    """An ``nnx.Optimizer`` for :func:`jax_impl.adamw` whose ``update`` is bitwise torch's step.

    ``nnx.Optimizer.update`` applies ``p + (p_new - p)`` through
    ``optax.apply_updates``, which can lose low bits where a float32 parameter
    nears zero; this one writes ``p_new`` (:func:`jax_impl.apply_exact`).
    ``tx`` may wrap the AdamW (``optax.chain`` with clipping before it,
    ``MultiSteps``, ``multi_transform``, ``inject_hyperparams``,
    ``apply_if_finite``, ``jax_impl.param_groups``, ...).  Same constructor and
    ``update(model, grads, **kwargs)`` as ``nnx.Optimizer`` (kwargs go to ``tx.update``),
    and ``update`` returns what ``nnx.Optimizer.update`` returns: the updates of
    ``tx.update`` (for AdamW leaves ``p_new - p``, 0 where ``p_new == p``).
    Leaves no AdamW updates, and every leaf of a ``tx`` with no :func:`jax_impl.adamw`
    (``optax.sgd``), get ``p + u`` exactly as ``nnx.Optimizer`` gives them.
    Gradients must have their params' dtypes, as torch's ``.grad`` must
    (``RuntimeError`` otherwise; ``nnx.Optimizer`` casts them).
    """

    def update(self, model, grads, /, **kwargs):
        graph = {"graph": self.graph} if hasattr(self, "graph") else {}
        params = nnx.as_pure(nnx.state(model, self.wrt, **graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, **graph))
        new_params, new_state, updates = exact_step_with_updates(
            self.tx, grad_arrays, nnx.as_pure(self.opt_state), params, require_adamw=False, **nnx.as_pure(kwargs))
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_state, **graph))
        self.step[...] += 1
        return updates
