"""Shared test helpers: drive two implementations with one gradient stream and compare bits."""

from __future__ import annotations

import numpy as np

from crosscheck import implementations, sources
from crosscheck.metrics import distance

# Shapes that exercise torch's kernel layout: 0-d, empty, shorter than one
# vector, vectors plus a scalar tail, exact multiples, conv-like 4-d.
SHAPES = [(), (0,), (1,), (7,), (9,), (16,), (33,), (4, 3, 3, 3), (3, 5, 7)]

# One table of optimizer options for every parity test (a new option is one line).
OPTIONS = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "weight_decay=0": {"weight_decay": 0.0},
    "weight_decay=0.1": {"weight_decay": 0.1},
    "large lr and eps": {"lr": 0.1, "eps": 1e-3},
    "b1 >= 0.5 lerp branch": {"b1": 0.3, "b2": 0.6},
    "mask": {"decay_mask": (True, False) * 4 + (True,)},
    "amsgrad+maximize+mask": {"amsgrad": True, "maximize": True, "decay_mask": (False, True) * 4 + (False,)},
}


def initial_params(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def run_pair(impl: str, baseline: str, hyper: implementations.Hyper, steps: int, *,
             shapes=SHAPES, grads: str = "gaussian", check_every: int = 0):
    """Run both for ``steps`` steps on the same gradients; return [(step, leaf, quantity, Distance)] mismatches."""
    params = initial_params(shapes)
    a = implementations.make(impl, hyper, params)
    b = implementations.make(baseline, hyper, params)
    source = sources.synthetic(grads)
    mismatches = []
    for t in range(steps):
        g = source(t, params)
        a.step(g)
        b.step(g)
        if (check_every and (t + 1) % check_every == 0) or t + 1 == steps:
            mismatches += compare(a, b, t + 1)
            if mismatches:
                break
    return mismatches


def compare(a, b, step):
    out = []
    (pa, ma, va), (pb, mb, vb) = (a.params(), *a.moments()), (b.params(), *b.moments())
    for quantity, xs, ys in (("param", pa, pb), ("exp_avg", ma, mb), ("exp_avg_sq", va, vb)):
        for leaf, (x, y) in enumerate(zip(xs, ys)):
            d = distance(x, y)
            if d.first_mismatch >= 0:
                out.append((step, leaf, quantity, d))
    return out
