"""``jax_impl.adamw``'s state is ``optax.adamw``'s tree: same structure, node types, names, shapes and dtypes.

So code written for optax (``opt_state[0].mu``), sharding rules keyed on its
paths and checkpoints carry over both ways; ``jax_impl.torch_view`` gives torch's names.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jax_impl

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.array([0.5, -0.25])}
SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 10)
MASKS = {"none": None, "tree": {"w": True, "b": False}, "callable": lambda p: jax.tree.map(lambda x: x.ndim > 1, p)}
OPTIONS = list(itertools.product([1e-2, SCHEDULE], list(MASKS), [False, True], [None, jnp.bfloat16]))


def _layout(tree):
    return jax.tree.structure(tree), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def _optax_amsgrad(lr, mask, weight_decay=1e-2):
    """optax.adamw's chain with optax's AMSGrad moments in place of Adam's (optax.adamw has no amsgrad)."""
    return optax.chain(optax.scale_by_amsgrad(), optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(lr))


@pytest.mark.parametrize("lr, mask, nesterov, mu_dtype", OPTIONS,
                         ids=[f"{'schedule' if callable(lr) else 'float'}-{m}-nesterov={n}-mu={d}"
                              for lr, m, n, d in OPTIONS])
def test_tree_is_optax_adamw_tree(lr, mask, nesterov, mu_dtype):
    options = dict(mask=MASKS[mask], nesterov=nesterov, mu_dtype=mu_dtype)
    ours, theirs = jax_impl.adamw(lr, **options), optax.adamw(lr, **options)
    state = ours.init(PARAMS)
    assert _layout(state) == _layout(theirs.init(PARAMS))
    assert isinstance(state[0], optax.ScaleByAdamState) and state[0].mu["w"].dtype == (mu_dtype or jnp.float32)
    _, new_state = jax.jit(ours.update)(PARAMS, state, PARAMS)
    _, their_new_state = theirs.update(PARAMS, theirs.init(PARAMS), PARAMS)
    assert _layout(new_state) == _layout(their_new_state)
    # Both counts advance as optax's do (the schedule's too).
    assert [int(c) for c in jax.tree.leaves(new_state) if jnp.ndim(c) == 0 and c.dtype == jnp.int32] == \
           [int(c) for c in jax.tree.leaves(their_new_state) if jnp.ndim(c) == 0 and c.dtype == jnp.int32]


@pytest.mark.parametrize("lr, mask", [(1e-2, None), (SCHEDULE, MASKS["tree"])])
def test_amsgrad_tree_is_optax_scale_by_amsgrad_tree(lr, mask):
    state = jax_impl.adamw(lr, mask=mask, amsgrad=True).init(PARAMS)
    assert isinstance(state[0], optax.ScaleByAmsgradState)
    assert _layout(state) == _layout(_optax_amsgrad(lr, mask).init(PARAMS))


def test_torch_view_names_optax_fields():
    tx = jax_impl.adamw(SCHEDULE, amsgrad=True, mask=MASKS["tree"])
    _, state = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    view = jax_impl.torch_view(state)
    assert isinstance(view, jax_impl.AdamWState)
    assert (view.count, view.exp_avg, view.exp_avg_sq, view.max_exp_avg_sq) == \
           (state[0].count, state[0].mu, state[0].nu, state[0].nu_max)
    # Written back at another count: every count of the tree follows (the schedule reads its own).
    moved = jax_impl.from_torch_view(state, view._replace(count=jnp.asarray(7, jnp.int32)))
    assert jax.tree.structure(moved) == jax.tree.structure(state)
    assert int(moved[0].count) == int(moved[2].count) == 7
    assert jax_impl.torch_view(view) is view
    with pytest.raises(TypeError, match="expected the state of jax_impl.adamw or optax.adamw"):
        jax_impl.torch_view(optax.sgd(0.1).init(PARAMS))
    with pytest.raises(ValueError, match="amsgrad differs"):
        jax_impl.from_torch_view(jax_impl.adamw().init(PARAMS), view)


def test_a_state_of_another_layout_is_refused_naming_the_expected_tree():
    tx = jax_impl.adamw(SCHEDULE)
    with pytest.raises(TypeError, match=r"state must be the tree made by init .*ScaleByScheduleState"):
        tx.update(PARAMS, jax_impl.adamw(1e-2).init(PARAMS), PARAMS)
    view = jax_impl.torch_view(tx.init(PARAMS))
    with pytest.raises(TypeError, match="state must be the tree made by init"):
        tx.update(PARAMS, view, PARAMS)  # the torch-named view is not the state: from_torch_view makes one


def _steps(tx, state, params, count):
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(count)]
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("lr, mask", [(1e-2, None), (SCHEDULE, MASKS["tree"])], ids=["float", "schedule-mask"])
def test_orbax_checkpoint_round_trip_with_optax_adamw(tmp_path, lr, mask):
    """An optax.adamw run restores into jax_impl.adamw's template, and back, leaf for leaf."""
    ours, theirs = jax_impl.adamw(lr, weight_decay=1e-2, mask=mask), optax.adamw(lr, weight_decay=1e-2, mask=mask)
    checkpointer = ocp.StandardCheckpointer()
    for source, target, name in ((theirs, ours, "from_optax"), (ours, theirs, "to_optax")):
        params, state = _steps(source, source.init(PARAMS), PARAMS, 3)
        checkpointer.save(tmp_path / name, state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / name, target.init(PARAMS))
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        jax.tree.map(np.testing.assert_array_equal, restored, state)
        # The restored state runs on: the target's next step reads the moments and counts of the source's run.
        _, next_state = target.update(jax.tree.map(jnp.cos, params), restored, params)
        assert int(next_state[0].count) == 4


def test_flax_state_dict_round_trip_with_optax_adamw():
    """The same with flax.serialization state dicts (no orbax): same keys, values restored in place."""
    from flax import serialization

    ours, theirs = jax_impl.adamw(SCHEDULE, mask=MASKS["tree"]), optax.adamw(SCHEDULE, mask=MASKS["tree"])
    _, state = _steps(theirs, theirs.init(PARAMS), PARAMS, 2)
    as_dict = serialization.to_state_dict(state)
    assert as_dict == serialization.to_state_dict(jax.tree.map(lambda x: x, state))
    restored = serialization.from_state_dict(ours.init(PARAMS), as_dict)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    back = serialization.from_state_dict(theirs.init(PARAMS), serialization.to_state_dict(restored))
    jax.tree.map(np.testing.assert_array_equal, back, state)


def test_nnx_optimizer_state_has_optax_paths_and_sharding():
    """Flax's rule-by-path code (``opt_state[0]['mu']['kernel']``) finds jax_impl's moments, with the param's sharding."""
    mesh = jax.make_mesh((1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = nnx.Linear(2, 3, rngs=nnx.Rngs(0), use_bias=False, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), sharding=("a", "b")))
        optimizer = jax_impl.ExactOptimizer(model, jax_impl.adamw(0.1), wrt=nnx.Param)
    state = nnx.state(optimizer)
    assert state["opt_state"][0]["mu"]["kernel"].out_sharding == ("a", "b")
    assert nnx.get_partition_spec(state)["opt_state"][0]["nu"]["kernel"].get_value() == \
        jax.sharding.PartitionSpec("a", "b")


def _model():
    return nnx.Linear(3, 2, rngs=nnx.Rngs(0))


def _grads(model):
    return nnx.grad(lambda m: jnp.sum(m(jnp.linspace(-1.0, 2.0, 3)[None]) ** 2))(model)


@pytest.mark.parametrize("tx", [jax_impl.adamw(0.1), optax.chain(optax.clip_by_global_norm(1.0), jax_impl.adamw(0.1)),
                                optax.sgd(0.1)], ids=["adamw", "chain", "sgd"])
def test_exact_optimizer_update_returns_what_nnx_optimizer_returns(tx):
    exact_model, stock_model = _model(), _model()
    exact, stock = jax_impl.ExactOptimizer(exact_model, tx, wrt=nnx.Param), nnx.Optimizer(stock_model, tx, wrt=nnx.Param)
    for _ in range(2):
        ours = exact.update(exact_model, _grads(exact_model))
        theirs = stock.update(stock_model, _grads(stock_model))
        assert ours is not None and jax.tree.structure(ours) == jax.tree.structure(theirs)
        # Bitwise nnx.Optimizer's updates while the params agree (they do here: no zero crossing).
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(exact_model, nnx.Param), nnx.state(stock_model, nnx.Param))
