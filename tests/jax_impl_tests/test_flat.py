"""jax_impl.FlatLayout: a tree's leaves in a few flat buffers, updated bit for bit as the tree would be."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHAPES

import jax_impl


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    tree = {f"w{i}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(SHAPES)}
    tree["half"] = jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16)
    return tree


@pytest.mark.parametrize("kernel", ["cpu", "xla"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_buffers_update_exactly_like_the_tree(kernel, amsgrad):
    params = _tree()
    mask = {k: not k.startswith(("w1", "w3")) for k in params}
    layout = jax_impl.FlatLayout(params, mask=mask)
    assert set(layout.sizes) == {"float32", "float32/no_decay", "bfloat16"}
    tree_tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad, mask=mask, kernel=kernel)
    flat_tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad, kernel=kernel, **layout.adamw_options())
    tree, tree_state = params, tree_tx.init(params)
    flat = layout.flatten(params)
    flat_state = flat_tx.init(flat)
    tree_step = jax.jit(lambda g, p, s: jax_impl.apply_exact(tree_tx, g, s, p))
    flat_step = jax.jit(lambda g, p, s: jax_impl.apply_exact(flat_tx, layout.flatten(g), s, p))
    for seed in range(1, 60):
        grads = jax.tree.map(lambda x: (x * 3 + 1) * seed % 5 - 2, _tree(seed))
        tree, tree_state = tree_step(grads, tree, tree_state)
        flat, flat_state = flat_step(grads, flat, flat_state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(layout.unflatten(flat))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)


def test_unflatten_is_the_inverse():
    params = _tree()
    layout = jax_impl.FlatLayout(params)
    back = jax.jit(layout.unflatten)(layout.flatten(params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))



def test_buffers_of_another_layout_are_refused():
    # Another tree's buffers would be sliced into overlapping or truncated leaves (test_input_checks.py has the table).
    params = _tree()
    layout = jax_impl.FlatLayout(params)
    other = jax_impl.FlatLayout({**params, "w3": jnp.ones(8)})
    with pytest.raises(ValueError, match=r"buffer 'float32' has shape \(\d+,\), the layout's is"):
        layout.unflatten(other.flatten({**params, "w3": jnp.ones(8)}))
    with pytest.raises(ValueError, match=r"leaf \['w3'\] has shape \(8,\), the layout's is \(7,\)"):
        layout.flatten({**params, "w3": jnp.ones(8)})


def test_scalar_tail_positions_are_checked():
    with pytest.raises(ValueError, match=r"scalar_tail positions must be in 0\.\.9"):
        tx = jax_impl.adamw(scalar_tail=[np.array([10])])
        tx.init([jnp.ones(10)])
        jax_impl.apply_exact(tx, [jnp.ones(10)], tx.init([jnp.ones(10)]), [jnp.ones(10)])
