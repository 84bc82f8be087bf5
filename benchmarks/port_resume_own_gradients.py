#!/usr/bin/env python
"""Resume with each framework's own gradients: k torch steps, convert, k Flax steps (Flax gradients) vs 2k torch.

    PYTHONPATH=. python benchmarks/port_resume_own_gradients.py resnet_block 5

A measurement for the README ("Porting"), not a speed benchmark: with shared gradients the
resume is bitwise (tests/crosscheck_tests/port/test_ports.py); with each framework's own it is not, and this says by how much.
"""
import copy
import sys
import torch
import jax.numpy as jnp
from flax import nnx
import jax_impl
from crosscheck import convert
from crosscheck.port import parity
from crosscheck.port import examples as pe
from crosscheck.common.metrics import distance
from crosscheck.port import compare
from crosscheck.common import losses
from crosscheck.convert import trees


def main(name: str, k: int) -> None:
    ex = pe.EXAMPLES[name]
    tm, fm = ex.pair(0); layers = ex.layers(tm)
    ref = copy.deepcopy(tm)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2, fused=True)
    def tstep(model, o, t):
        x, y = ex.batch(t); o.zero_grad()
        losses.torch_cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward(); o.step()
    for t in range(2 * k): tstep(ref, opt, t)
    opt2 = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2, fused=True)
    for t in range(k): tstep(tm, opt2, t)
    nnx.update(fm, convert.torch_to_nnx(tm.state_dict(), layers, fm))
    names = convert.param_names(tm, opt2)
    state = convert.torch_optimizer_to_jax(opt2.state_dict(), layers, names)
    tx = jax_impl.adamw(1e-3, weight_decay=1e-2, torch_layout=convert.torch_layout(tm, layers))
    params = nnx.to_pure_dict(nnx.state(fm, nnx.Param))
    trainable = set(trees.flatten(convert.params_to_flax({n: dict(tm.named_parameters())[n] for n in names}, layers)))
    params = trees.nest({p: v for p, v in trees.flatten(params).items() if p in trainable})
    grads_fn = nnx.jit(lambda m, x, y: losses.flax_loss_and_grads(m, x, y, losses.flax_cross_entropy))
    for t in range(k, 2 * k):
        x, y = ex.batch(t)
        _, _, g = grads_fn(fm, jnp.asarray(compare.channels_last(x)), jnp.asarray(y))
        g = trees.nest({p: v for p, v in trees.flatten(nnx.to_pure_dict(g)).items() if p in trainable})
        params, state = jax_impl.apply_exact(tx, g, state, params)
        nnx.update(fm, parity.with_params(fm, params))
    got = convert.params_to_torch(params, layers, names)
    exp = dict(ref.named_parameters())
    rel = max(float((got[n] - exp[n].detach()).abs().max() / exp[n].detach().abs().max()) for n in names)
    ulps = max(int(distance(got[n].numpy(), exp[n].detach().numpy()).max_ulps) for n in names)
    print(f"{name} k={k}: own gradients resume vs 2k torch: max rel {rel:.2g}, max ulps {ulps}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in pe.EXAMPLES:
        print(f"usage: {sys.argv[0]} EXAMPLE K  (EXAMPLE one of {sorted(pe.EXAMPLES)})", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], int(sys.argv[2]))
