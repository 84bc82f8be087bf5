"""AdamW step time of every implementation against the memory-bandwidth floor, measured in the same run.

    python benchmarks/step_time.py [--device cpu|gpu] [--sizes 1e5,1e6,1e7] [--layouts one,many,layers16]
                                   [--impls ...] [--dtype float32] [--repeats 15] [--pairs] [--out DIR]

A float32 AdamW step reads params, grads and both moments and writes params and
both moments: 28 bytes per parameter, so its floor is 28 N / bandwidth.  The
bandwidth is measured in the same process and the same rounds, by an in-place
kernel (torch's ``addcmul_``, reading three arrays and writing one: 16 B/element),
taken as the median over the rounds.

Each round runs every implementation once, in a rotated order (A B C, B C A,
...), so drift in the machine's speed hits all alike; with ``--pairs`` each
row is timed with ``torch.optim.AdamW(fused=True)`` alone (A T A T ...), as
on a 2-core CPU whichever row runs before a JAX step can slow it (measured:
the exact step over 300 leaves 1.13-1.33x torch in pairs, 1.63-1.69x among
15 rows, GC frozen, with or without pauses between calls).  After warm-up, the
median over rounds and its interquartile range are reported, with ms/step,
effective GB/s at 28 B/param, fraction of the measured bandwidth and the
ratio to the fastest peer.  JAX steps are jitted with donated buffers and
timed to ``block_until_ready``.  Also reported: optimizer-state bytes per
parameter, and the compile time of the jitted step.

With ``(device-to-device copy)`` among the implementations (the ``gpu`` command
always adds it), a copy of the params' size runs in the same rounds and every
row also gets ``fraction_of_copy_bandwidth``: 28 B/param over the copy's
bandwidth, the HBM figure on a GPU.

Besides the bare step, rows time the update as Flax code runs it: through
``optax.apply_updates``, ``nnx.Optimizer`` / ``jax_impl.ExactOptimizer`` (under
``@nnx.jit``, in the split-graph loop, through ``nnx.cached_partial``) and
linen's ``TrainState`` (``apply_gradients`` or ``jax_impl.apply_gradients_exact``),
and a loop that waits for the result only every 10 steps (JAX's asynchronous
dispatch); the ``vs torch fused`` column is the ratio to
``torch.optim.AdamW(fused=True)`` measured in the same rounds.
"""

from __future__ import annotations

import os

# Both frameworks run thread pools in this one process.  After a parallel
# region torch's OpenMP threads spin for GOMP_SPINCOUNT iterations (default
# 300000, about a millisecond), and on a 2-core machine they take the cores
# XLA's threads need when a JAX step follows a torch step: measured at 1e7,
# jax_impl 7.5 ms after torch vs 5.3 ms alone, torch unchanged.  10000 keeps
# them spinning between torch's own back-to-back regions (its times are
# unchanged, one tensor or 250) and parks them before the next framework runs.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_impl  # noqa: E402
import torch_impl  # noqa: E402

BANDWIDTH = "(bandwidth kernel)"
TORCH_FUSED = "torch.optim.AdamW(fused)"
OURS = ("jax_impl", "torch_impl", "ExactOptimizer")
BYTES_PER_PARAM = {"float32": 28, "bfloat16": 14, "float16": 14, "float64": 56}


def many_shapes(total: int, leaves: int = 300, seed: int = 0) -> list[tuple[int, ...]]:
    """``leaves`` leaves of mixed rank (0-d to 4-d, transformer- and CNN-like) summing to about ``total``."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0, 1.5, leaves)
    sizes = np.maximum(1, (weights / weights.sum() * total).astype(int))
    shapes = []
    for i, size in enumerate(sizes):
        kind = i % 5
        if kind == 0 or size < 8:
            shapes.append((int(size),) if kind else ())
        elif kind == 1:
            shapes.append((int(size),))
        elif kind == 2:
            cols = max(1, int(np.sqrt(size)))
            shapes.append((int(size) // cols, cols))
        elif kind == 3:
            out = max(1, int(size) // 9)
            shapes.append((out, 1, 3, 3))
        else:
            shapes.append((2, int(size) // 2 or 1))
    return shapes


def layer_shapes(total: int, layers: int = 16) -> list[tuple[int, ...]]:
    """An MLP of ``layers`` square Linear layers (kernel and bias each) with about ``total`` parameters."""
    width = max(1, round(np.sqrt(total / layers)))
    return [shape for _ in range(layers) for shape in ((width, width), (width,))]


LAYOUTS = {"one": lambda n: [(n,)], "many": many_shapes, "layers16": layer_shapes}


@dataclass
class Bench:
    name: str
    step: Callable[[], None]  # steps_per_call optimizer steps, finished when it returns
    state_bytes: Callable[[], int]
    compile_seconds: float | None = None
    steps_per_call: int = 1


def torch_bench(name: str, cls, path: str, shapes, dtype, device) -> Bench:
    torch_dtype = getattr(torch, dtype)
    params = [torch.randn(s, dtype=torch_dtype, device=device, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[path]
    optimizer = cls(params, lr=1e-3, weight_decay=1e-2, **flags)

    def step():
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return Bench(name, step, lambda: sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                         for k, t in s.items() if torch.is_tensor(t) and k != "step"))


def jax_bench(name: str, tx, shapes, dtype, kind: str, steps_per_call: int = 1, flat: bool = False,
              dispatches: int = 1) -> Bench:
    if jax.default_backend() == "cpu":
        rng = np.random.default_rng(0)
        params = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
        grads = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
    else:  # made on the device: 1e9 host normals would take longer than the benchmark
        keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
        params = [jax.random.normal(k, s, dtype) for k, s in zip(keys[::2], shapes)]
        grads = [jax.random.normal(k, s, dtype) for k, s in zip(keys[1::2], shapes)]
    if flat:
        # The parameters live in flat buffers (jax.grad of a loss of layout.unflatten(flat)
        # gives flat gradients); tx must be built with layout.adamw_options().
        layout = jax_impl.FlatLayout(params)
        tx = tx(layout)
        params, grads = layout.flatten(params), layout.flatten(grads)
    holder = {"params": params, "state": tx.init(params)}
    if kind == "exact":
        fn = lambda g, p, s: jax_impl.apply_exact(tx, g, s, p)  # noqa: E731
    else:
        def fn(g, p, s):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s
    if steps_per_call > 1:
        # Several steps inside one jitted program, as inside a jitted train step:
        # JAX's per-buffer dispatch (about 5 us per array) is paid once.
        one_step = fn
        fn = lambda g, p, s: jax.lax.fori_loop(0, steps_per_call, lambda i, c: one_step(g, *c), (p, s))  # noqa: E731
    # params and state donated in the order they come back: updated in place.
    jitted = jax.jit(fn, donate_argnums=(1, 2))
    started = time.perf_counter()
    jitted.lower(grads, holder["params"], holder["state"]).compile()
    compile_seconds = time.perf_counter() - started

    def step():  # through jit's C++ dispatch path, as a training loop calls it
        # dispatches > 1: a loop that waits only at the end, as one that logs
        # every N steps does; JAX dispatches the next step while one runs.
        for _ in range(dispatches):
            holder["params"], holder["state"] = jitted(grads, holder["params"], holder["state"])
        jax.block_until_ready(holder["params"])

    step()
    return Bench(name, step, lambda: sum(x.nbytes for x in jax.tree.leaves(holder["state"]) if x.ndim),
                 compile_seconds, steps_per_call * dispatches)


def _arrays(shapes, dtype, seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def nnx_bench(name: str, tx, shapes, dtype, optimizer_cls: str, loop: str) -> Bench:
    """``optimizer.update(model, grads)`` of an nnx model whose params have ``shapes``.

    ``loop``: "nnx.jit" (``@nnx.jit`` over the objects, no donation: the
    object graph is traversed on every call), "split" (Flax's functional
    pattern: ``nnx.split`` once, ``jax.jit`` of the pure state with
    ``nnx.merge`` inside, donated), "leaves" (the same with the state passed
    as its list of leaves, the README's loop: JAX flattens a list in C++,
    an ``nnx.State`` of ``Variable`` nodes in Python, both ways, per call) or
    "cached_partial" (``nnx.cached_partial`` of an ``nnx.jit`` function with
    the objects donated).
    """
    from flax import nnx

    class Params(nnx.Module):
        def __init__(self, arrays):
            for i, array in enumerate(arrays):
                setattr(self, f"p{i:03d}", nnx.Param(array))

    model = Params(_arrays(shapes, dtype, 0))
    grads = nnx.state(Params(_arrays(shapes, dtype, 1)), nnx.Param)
    cls = jax_impl.ExactOptimizer if optimizer_cls == "exact" else nnx.Optimizer
    optimizer = cls(model, tx, wrt=nnx.Param)

    def update(model, optimizer, grads):
        optimizer.update(model, grads)

    if loop in ("split", "leaves"):
        graphdef, state = nnx.split((model, optimizer))
        treedef, grads_treedef = jax.tree.structure(state), jax.tree.structure(grads)
        if loop == "leaves":  # the gradients too, as a train step would compute them inside
            state, grads = jax.tree.leaves(state), jax.tree.leaves(grads)

        # The state comes back in the order it goes in: donated buffers pair with outputs in order.
        @functools.partial(jax.jit, donate_argnums=0)
        def pure_update(state, grads):
            if loop == "leaves":
                state, grads = jax.tree.unflatten(treedef, state), jax.tree.unflatten(grads_treedef, grads)
            model, optimizer = nnx.merge(graphdef, state)
            update(model, optimizer, grads)
            new_state = nnx.state((model, optimizer))
            return new_state if loop == "split" else jax.tree.leaves(new_state)

        holder = {"state": state}
        started = time.perf_counter()
        pure_update.lower(state, grads).compile()
        compile_seconds = time.perf_counter() - started

        def step():
            holder["state"] = pure_update(holder["state"], grads)
            jax.block_until_ready(holder["state"])

        state_bytes = lambda: sum(x.nbytes for x in jax.tree.leaves(holder["state"]) if x.ndim) \
            - sum(int(np.prod(s)) for s in shapes) * jnp.dtype(dtype).itemsize  # noqa: E731
    else:
        if loop == "cached_partial":
            with nnx.set_graph_mode(True), nnx.set_graph_updates(True):
                jitted = nnx.jit(update, donate_argnums=(0, 1), graph=True, graph_updates=True)
                call = nnx.cached_partial(jitted, model, optimizer)
        else:
            jitted = nnx.jit(update)
            call = functools.partial(jitted, model, optimizer)
        compile_seconds = None

        def step():
            call(grads)
            jax.block_until_ready(jax.tree.leaves(nnx.state(model)))

        state_bytes = lambda: sum(x.nbytes for x in jax.tree.leaves(nnx.state(optimizer.opt_state))  # noqa: E731
                                  if x.ndim)
    step()
    return Bench(name, step, state_bytes, compile_seconds)


def train_state_bench(name: str, tx, shapes, dtype, exact: bool) -> Bench:
    """linen's ``TrainState.apply_gradients`` (or :func:`jax_impl.apply_gradients_exact`), jitted, state donated."""
    from flax.training.train_state import TrainState

    params = {f"p{i:03d}": a for i, a in enumerate(_arrays(shapes, dtype, 0))}
    grads = {f"p{i:03d}": a for i, a in enumerate(_arrays(shapes, dtype, 1))}
    holder = {"state": TrainState.create(apply_fn=None, params=params, tx=tx)}
    if exact:
        fn = lambda state, grads: jax_impl.apply_gradients_exact(state, grads=grads)  # noqa: E731
    else:
        fn = lambda state, grads: state.apply_gradients(grads=grads)  # noqa: E731
    jitted = jax.jit(fn, donate_argnums=0)
    started = time.perf_counter()
    jitted.lower(holder["state"], grads).compile()
    compile_seconds = time.perf_counter() - started

    def step():
        holder["state"] = jitted(holder["state"], grads)
        jax.block_until_ready(holder["state"].params)

    step()
    return Bench(name, step, lambda: sum(x.nbytes for x in jax.tree.leaves(holder["state"].opt_state) if x.ndim),
                 compile_seconds)


def _optax_adamw():
    return optax.adamw(1e-3, weight_decay=1e-2)


# Each row's builder gets its own name first: IMPLS[name](shapes, dtype, device).
_ROWS: dict[str, Callable[..., Bench]] = {
    "jax_impl.adamw": lambda name, sh, dt, dev: jax_bench(name, jax_impl.adamw(), sh, dt, "exact"),
    "jax_impl.adamw[xla]": lambda name, sh, dt, dev: jax_bench(name, jax_impl.adamw(kernel="xla"), sh, dt, "exact"),
    "jax_impl.adamw (10 steps per jit call)": lambda name, sh, dt, dev: jax_bench(
        name, jax_impl.adamw(), sh, dt, "exact", 10),
    "jax_impl.adamw (10 dispatches per wait)": lambda name, sh, dt, dev: jax_bench(
        name, jax_impl.adamw(), sh, dt, "exact", dispatches=10),
    "jax_impl.adamw (flat buffers)": lambda name, sh, dt, dev: jax_bench(
        name, lambda layout: jax_impl.adamw(**layout.adamw_options()), sh, dt, "exact", flat=True),
    # Whose rounding the XLA path follows (the default, "auto", is torch-cuda on a GPU, torch-cpu elsewhere):
    # the cost of the CUDA model's float64 arithmetic against plain float32.
    "jax_impl.adamw[xla; torch-cuda rounding]": lambda name, sh, dt, dev: jax_bench(
        name, jax_impl.adamw(kernel="xla", rounding="torch-cuda"), sh, dt, "exact"),
    "jax_impl.adamw[xla; torch-cpu rounding]": lambda name, sh, dt, dev: jax_bench(
        name, jax_impl.adamw(kernel="xla", rounding="torch-cpu"), sh, dt, "exact"),
    "jax_impl.adamw+apply_updates": lambda name, sh, dt, dev: jax_bench(name, jax_impl.adamw(), sh, dt, "updates"),
    # optax's update with XLA's three passes for every leaf (the default gives the kernel the moments).
    "jax_impl.adamw[xla]+apply_updates": lambda name, sh, dt, dev: jax_bench(
        name, jax_impl.adamw(kernel="xla"), sh, dt, "updates"),
    "optax.adamw": lambda name, sh, dt, dev: jax_bench(name, _optax_adamw(), sh, dt, "updates"),
    "nnx.Optimizer(jax_impl.adamw) [nnx.jit]": lambda name, sh, dt, dev: nnx_bench(
        name, jax_impl.adamw(), sh, dt, "nnx", "nnx.jit"),
    "nnx.Optimizer(jax_impl.adamw) [split]": lambda name, sh, dt, dev: nnx_bench(
        name, jax_impl.adamw(), sh, dt, "nnx", "split"),
    "nnx.Optimizer(optax.adamw) [split]": lambda name, sh, dt, dev: nnx_bench(
        name, _optax_adamw(), sh, dt, "nnx", "split"),
    "ExactOptimizer [split]": lambda name, sh, dt, dev: nnx_bench(name, jax_impl.adamw(), sh, dt, "exact", "split"),
    "nnx.Optimizer(jax_impl.adamw) [leaves]": lambda name, sh, dt, dev: nnx_bench(
        name, jax_impl.adamw(), sh, dt, "nnx", "leaves"),
    "nnx.Optimizer(optax.adamw) [leaves]": lambda name, sh, dt, dev: nnx_bench(
        name, _optax_adamw(), sh, dt, "nnx", "leaves"),
    "ExactOptimizer [leaves]": lambda name, sh, dt, dev: nnx_bench(name, jax_impl.adamw(), sh, dt, "exact", "leaves"),
    "ExactOptimizer [cached_partial]": lambda name, sh, dt, dev: nnx_bench(
        name, jax_impl.adamw(), sh, dt, "exact", "cached_partial"),
    "TrainState.apply_gradients(jax_impl.adamw)": lambda name, sh, dt, dev: train_state_bench(
        name, jax_impl.adamw(), sh, dt, False),
    "TrainState.apply_gradients(optax.adamw)": lambda name, sh, dt, dev: train_state_bench(
        name, _optax_adamw(), sh, dt, False),
    "jax_impl.apply_gradients_exact(TrainState)": lambda name, sh, dt, dev: train_state_bench(
        name, jax_impl.adamw(), sh, dt, True),
    "torch.optim.AdamW(fused)": lambda name, sh, dt, dev: torch_bench(name, torch.optim.AdamW, "fused", sh, dt, dev),
    "torch.optim.AdamW(foreach)": lambda name, sh, dt, dev: torch_bench(
        name, torch.optim.AdamW, "foreach", sh, dt, dev),
    "torch.optim.AdamW(for-loop)": lambda name, sh, dt, dev: torch_bench(
        name, torch.optim.AdamW, "for-loop", sh, dt, dev),
    "torch_impl.AdamW(fused)": lambda name, sh, dt, dev: torch_bench(name, torch_impl.AdamW, "fused", sh, dt, dev),
    "torch_impl.AdamW(foreach)": lambda name, sh, dt, dev: torch_bench(name, torch_impl.AdamW, "foreach", sh, dt, dev),
    "torch_impl.AdamW(for-loop)": lambda name, sh, dt, dev: torch_bench(
        name, torch_impl.AdamW, "for-loop", sh, dt, dev),
}
IMPLS: dict[str, Callable] = {name: functools.partial(make, name) for name, make in _ROWS.items()}


COPY = "(device-to-device copy)"


def copy_bench(shapes, dtype, device) -> Bench:
    """A device-to-device copy of the params' size (reads and writes 2 x itemsize B/param): the HBM bandwidth."""
    torch_dtype = getattr(torch, dtype)
    n = int(sum(np.prod(s) for s in shapes))
    source, target = torch.ones(n, dtype=torch_dtype, device=device), torch.empty(n, dtype=torch_dtype, device=device)

    def step():
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return Bench(COPY, step, lambda: 0)


IMPLS[COPY] = copy_bench


def bandwidth_kernel(n: int, dtype: str, device: str) -> tuple[Callable[[], None], int]:
    """An in-place kernel with an optimizer's access pattern: a.addcmul_(b, c) reads 3 arrays and writes 1."""
    torch_dtype = getattr(torch, dtype)
    a, b, c = (torch.randn(n, dtype=torch_dtype, device=device) for _ in range(3))

    def run():
        a.addcmul_(b, c, value=1e-30)
        if device == "cuda":
            torch.cuda.synchronize()

    return run, 4 * n * a.element_size()


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, in rounds of all of them, rotated (A B C, B C A, ...) after warm-up."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - started)
    return times


def measure(benches: list[Bench], bandwidth: Callable[[], None], repeats: int):
    """Per-step seconds of each implementation, and of the bandwidth kernel, measured in the same rounds."""
    times = interleaved({**{b.name: b.step for b in benches}, BANDWIDTH: bandwidth}, repeats)
    stream = times.pop(BANDWIDTH)
    return {b.name: [t / b.steps_per_call for t in times[b.name]] for b in benches}, stream


def groups_of(impls: list[str], pairs: bool) -> list[list[str]]:
    """The sets of rows timed together: all of them, or (``pairs``) each with torch fused alone (A B A B ...)."""
    if not pairs or TORCH_FUSED not in impls or len(impls) < 3:
        return [impls]
    return [[name, TORCH_FUSED] for name in impls if name != TORCH_FUSED]


def run(device: str, sizes: list[int], layouts: list[str], impls: list[str], dtype: str, repeats: int,
        progress: bool = True, leaves: int = 300, pairs: bool = False) -> list[dict]:
    torch_device = "cuda" if device == "gpu" else "cpu"
    rows = []
    cases = [(layout, n) for layout in layouts for n in sizes]
    groups = groups_of(impls, pairs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(groups), desc="step_time", unit="group", file=sys.stderr)
    for layout, n in cases:
        shapes = many_shapes(n, leaves) if layout == "many" else LAYOUTS[layout](n)
        for g, group in enumerate(groups):
            for row in measure_group(group, shapes, dtype, torch_device, repeats, layout):
                if g == 0 or row["implementation"] != TORCH_FUSED:  # torch fused's row once, from the first pair
                    rows.append(row)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows


def measure_group(names: list[str], shapes, dtype: str, torch_device: str, repeats: int, layout: str) -> list[dict]:
    """One row per implementation in ``names``, timed in the same interleaved rounds."""
    numel = int(sum(np.prod(s) for s in shapes))
    benches = [IMPLS[i](shapes, dtype, torch_device) for i in names]
    kernel, kernel_bytes = bandwidth_kernel(numel, dtype, torch_device)
    # Every row's arrays and objects live in this one process; a JAX call
    # makes ~900 new arrays over 300 leaves, and the collections that
    # triggers would scan all rows' objects (805k in the full run at 8e6:
    # 0.75 s of GC in the timed rounds), a cost of the harness, not of a
    # row.  Frozen, setup objects are skipped; what the steps make is
    # still collected.
    gc.collect()
    gc.freeze()
    try:
        times, stream = measure(benches, kernel, repeats)
    finally:
        gc.unfreeze()
    bandwidth = kernel_bytes / statistics.median(stream)
    floor = BYTES_PER_PARAM[dtype] * numel / bandwidth
    medians = {name: statistics.median(t) for name, t in times.items()}
    # Peers: the other libraries' rows (torch.optim, optax, through any Flax container).
    peers = [v for k, v in medians.items() if not any(ours in k for ours in OURS)]
    fastest_peer = min(peers or medians.values())
    # With the copy in the rounds: the floor over the copy's bandwidth (the HBM figure on a GPU) too.
    copy_bandwidth = (2 * np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize * numel
                      / medians[COPY]) if COPY in medians else None
    torch_fused = medians.get(TORCH_FUSED)
    rows = []
    for b in benches:
        t = sorted(times[b.name])
        q1, q3 = t[len(t) // 4], t[(3 * len(t)) // 4]
        rows.append({
            "layout": layout, "leaves": len(shapes), "params": numel, "implementation": b.name,
            "ms": 1e3 * medians[b.name], "iqr_ms": 1e3 * (q3 - q1),
            "gb_per_s": BYTES_PER_PARAM[dtype] * numel / medians[b.name] / 1e9,
            "fraction_of_bandwidth": floor / medians[b.name], "vs_fastest_peer": medians[b.name] / fastest_peer,
            "vs_torch_fused": None if torch_fused is None else medians[b.name] / torch_fused,
            "floor_ms": 1e3 * floor, "bandwidth_gb_per_s": bandwidth / 1e9,
            "state_bytes_per_param": b.state_bytes() / numel,
            "compile_s": b.compile_seconds,
            "copy_bandwidth_gb_per_s": None if copy_bandwidth is None else copy_bandwidth / 1e9,
            "fraction_of_copy_bandwidth": None if copy_bandwidth is None else
            BYTES_PER_PARAM[dtype] * numel / copy_bandwidth / medians[b.name]})
    return rows


def markdown(rows: list[dict], device: str, dtype: str) -> str:
    lines = [f"AdamW step time, {device}, {dtype} ({jax.devices()[0].device_kind}; torch "
             f"{torch.__version__}, jax {jax.__version__}); median of interleaved rounds; GOMP_SPINCOUNT="
             f"{os.environ.get('GOMP_SPINCOUNT')}; floor = "
             f"{BYTES_PER_PARAM[dtype]} B/param over the bandwidth measured in the same rounds.", "",
             "| layout | params | implementation | ms/step (IQR) | GB/s | of bandwidth floor | vs torch fused | "
             "vs fastest peer | state B/param | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        vs_torch = "-" if r["vs_torch_fused"] is None else f"{r['vs_torch_fused']:.2f}x"
        lines.append(f"| {r['layout']} ({r['leaves']} leaves) | {r['params']:.2g} | {r['implementation']} | "
                     f"{r['ms']:.3f} ({r['iqr_ms']:.3f}) | {r['gb_per_s']:.1f} | {100 * r['fraction_of_bandwidth']:.0f}% | "
                     f"{vs_torch} | {r['vs_fastest_peer']:.2f}x | {r['state_bytes_per_param']:.0f} | {compile_s} |")
    lines += ["", "| layout | params | measured bandwidth GB/s (range over groups) | floor ms |", "|---|---|---|---|"]
    for (layout, n), group in floors(rows).items():
        bandwidths = [r["bandwidth_gb_per_s"] for r in group]
        lines.append(f"| {layout} | {n:.2g} | {statistics.median(bandwidths):.1f} ({min(bandwidths):.1f}–"
                     f"{max(bandwidths):.1f}) | {statistics.median(r['floor_ms'] for r in group):.3f} |")
    return "\n".join(lines) + "\n"


def floors(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The rows of each (layout, params) case; with --pairs each group measured its own bandwidth floor."""
    cases: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        cases.setdefault((r["layout"], r["params"]), []).append(r)
    return cases


def series_styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, marker, line style) per series: colours from tab20, markers and dashes cycled apart."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    markers = "osD^vP*Xh<>p"
    dashes = ["-", "--", "-.", ":"]
    # Every series differs from every other in colour (up to 20 series), and
    # consecutive ones also in marker and line style, so no two are alike in print either.
    return {name: dict(color=colours[(2 * i) % 20 + (2 * i) // 20 % 2], marker=markers[i % len(markers)],
                       linestyle=dashes[i % len(dashes)])
            for i, name in enumerate(names)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    styles = series_styles(list(dict.fromkeys(r["implementation"] for r in rows)))
    fig, axes = plt.subplots(1, len(layouts), figsize=(8 * len(layouts), 6), squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        sub = [r for r in rows if r["layout"] == layout]
        for name in dict.fromkeys(r["implementation"] for r in sub):
            points = sorted((r["params"], r["ms"]) for r in sub if r["implementation"] == name)
            ax.plot(*zip(*points), label=name, lw=1, markersize=5, **styles[name])
        floor = sorted((n, statistics.median(r["floor_ms"] for r in case))
                       for (_, n), case in floors(sub).items())
        # A wide bar marker, so that the floor shows when only one size was measured.
        ax.plot(*zip(*floor), color="k", linestyle="--", marker="_", markersize=24, markeredgewidth=2,
                label="bandwidth floor (28 B/param)", lw=1.5)
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms / step", title=f"layout: {layout}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated parameter counts")
    parser.add_argument("--layouts", default="one,many",
                        help="comma-separated: one (1 tensor), many (300 mixed leaves), layers16 (16 Linear layers)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    parser.add_argument("--dtype", default="float32", choices=list(BYTES_PER_PARAM))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_time"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--pairs", action="store_true",
                        help="time each row in rounds with torch fused alone (A B A B ...), not all rows together: "
                             "on a 2-core CPU the row before a JAX step slows it by up to 1.5x")
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes must be numbers, got {args.sizes!r}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    layouts = [x for x in args.layouts.split(",") if x]
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    if not layouts or any(x not in LAYOUTS for x in layouts):
        parser.error(f"--layouts takes {', '.join(LAYOUTS)}, got {args.layouts!r}")
    if any(n < 1 for n in sizes) or args.repeats < 3:
        parser.error("--sizes must be >= 1 and --repeats >= 3")
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no CUDA device visible to torch")
    if args.device == "gpu" and jax.default_backend() != "gpu":
        parser.error("--device gpu: JAX has no GPU backend here")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = run(args.device, sizes, layouts, impls, args.dtype, args.repeats, not args.no_progress,
               pairs=args.pairs)
    text = markdown(rows, args.device, args.dtype)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(rows, indent=1))
    (args.out / "report.md").write_text(text)
    plot(rows, args.out / "step_time.png")
    print(f"report: {args.out}/report.json, report.md, step_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
