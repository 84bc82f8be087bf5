"""``python -m crosscheck port``: check a Flax port of a torch model and say where it is wrong.

    python -m crosscheck --out port-report port --example transformer
    python -m crosscheck port --torch mypkg.models:Net --flax mypkg.port:NnxNet \\
        --input-shape 8,3,32,32 --classes 10 --flatten-from fc1=64,8,8
    python -m crosscheck port --torch ... --flax ... --batch batch.npz   # arrays "inputs" and "labels"
    python -m crosscheck port --torch ... --flax ... --input-shape 8,3 --print-mapping   # the table only
    python -m crosscheck port --torch ... --flax ... --input-shape 8,3 --mapping names.json

It places every torch layer in the Flax model (``convert.match``: a
``--mapping`` file, names under the common conventions, then shape and
execution order; the table is printed when a layer was placed by structure,
and ``--print-mapping`` prints it and stops), converts the torch weights into the Flax model, runs
:func:`crosscheck.locate_divergence` on one batch (report.md, report.json,
errors.png: every module's output error against its rounding band), then
``assert_trajectories_match`` over ``--steps`` steps, and, with ``--resume``,
checks that k torch steps + k ``jax_impl`` steps after converting the AdamW
state equal 2k torch steps bitwise.  Exit status: 0 pass, 1 mismatch, 2 bad
usage or input (errors on stderr), also a report that cannot be written.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import numpy as np

from crosscheck.common import losses
from crosscheck.common.arguments import non_negative_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("port", help="check a Flax port of a torch model; locate where it departs")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--example", help="one of crosscheck.port_examples.EXAMPLES")
    source.add_argument("--torch", dest="torch_factory", help="module:callable returning the torch model")
    p.add_argument("--flax", dest="flax_factory", help="module:callable returning the nnx model (with --torch)")
    p.add_argument("--input-shape", help="comma-separated torch input shape (random uniform inputs in [-1, 1])")
    p.add_argument("--tokens", type=int, default=0, help="with --input-shape: integer token inputs below this")
    p.add_argument("--classes", type=int, default=10, help="labels below this for the default cross entropy")
    p.add_argument("--batch", help=".npz with arrays 'inputs' and 'labels' (torch layout)")
    p.add_argument("--flatten-from", action="append", default=[], metavar="NAME=C,H,W",
                   help="layers_of flatten_from for a Linear after a channels-first flatten (repeatable)")
    p.add_argument("--transpose-kernel", action="store_true", default=None,
                   help="the port's ConvTranspose layers use transpose_kernel=True (default: read from the nnx model)")
    p.add_argument("--mapping", metavar="FILE.json",
                   help='JSON object: torch name or prefix -> Flax path ("transformer": "", "fc1": "Dense_0", '
                        '"downsample": "downsample/layers"); the rest is matched by name, shape and order')
    p.add_argument("--print-mapping", action="store_true",
                   help="print the proposed table (torch name -> Flax path, kind, how it was matched) and stop")
    p.add_argument("--steps", type=non_negative_int, default=10, help="steps of assert_trajectories_match (0: locate only)")
    p.add_argument("--resume", type=non_negative_int, default=0, metavar="K", help="also check a torch->JAX resume after K steps")
    p.add_argument("--seed", type=non_negative_int, default=0)
    return p  # --out (report.md, report.json, errors.png) is the shared option of python -m crosscheck


def _factory(spec: str, what: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{what}={spec!r}: expected module:callable")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}={spec!r}: {err}") from None


def read_mapping(path: str) -> dict[str, str]:
    """A ``--mapping`` file: a JSON object of torch names or prefixes to Flax paths (``"a/0/b"`` or a list)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--mapping={path!r}: {err}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"--mapping={path!r}: expected a JSON object of torch name -> Flax path, "
                         f"got {type(mapping).__name__}")
    for key, value in mapping.items():
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, (str, int)) for v in value))
        if not ok:
            raise ValueError(f"--mapping={path!r}: {key!r} -> {value!r}: a Flax path is a string ('a/0/b') or a list")
    return {key: value if isinstance(value, str) else tuple(value) for key, value in mapping.items()}


def _setup(args):
    """(torch model, flax model, layers_of options, batch maker) from the arguments; ValueError on bad usage."""
    import torch

    from crosscheck.port import examples as port_examples
    flatten = {}
    for item in args.flatten_from:
        name, _, shape = item.partition("=")
        try:
            flatten[name] = tuple(int(v) for v in shape.split(","))
        except ValueError:
            raise ValueError(f"--flatten-from={item!r}: expected NAME=C,H,W") from None
    mapping = read_mapping(args.mapping) if getattr(args, "mapping", None) else {}
    if args.example:
        if args.example not in port_examples.EXAMPLES:
            raise ValueError(f"--example={args.example!r}: choose from {sorted(port_examples.EXAMPLES)}")
        example = port_examples.EXAMPLES[args.example]
        torch_model, flax_model = example.pair(args.seed)
        options = dict(example.layers_options)
        options.setdefault("flatten_from", {}).update(flatten)
        if mapping:
            options["rename"] = {**options.get("rename", {}), **mapping}
        return torch_model, flax_model, options, example.batch
    if not (args.torch_factory and args.flax_factory):
        raise ValueError("give --example, or both --torch and --flax")
    torch.manual_seed(args.seed)
    torch_model = _factory(args.torch_factory, "--torch")()
    flax_model = _factory(args.flax_factory, "--flax")()
    options = {"flatten_from": flatten, "transpose_kernel": args.transpose_kernel, "rename": mapping}
    if args.batch:
        try:
            data = np.load(args.batch)
            inputs, labels = data["inputs"], data["labels"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"--batch={args.batch!r}: {err}") from None
        return torch_model, flax_model, options, lambda seed=0: (inputs, labels)
    if not args.input_shape:
        raise ValueError("give --input-shape or --batch")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        raise ValueError(f"--input-shape={args.input_shape!r}: expected comma-separated integers") from None

    def make(seed: int = 0):
        rng = np.random.default_rng(seed)
        inputs = (rng.integers(0, args.tokens, shape) if args.tokens
                  else rng.uniform(-1, 1, shape).astype(np.float32))
        with torch.no_grad():
            out = copy.deepcopy(torch_model)(torch.from_numpy(inputs))
        out = out[0] if isinstance(out, tuple) else out
        # labels shaped for the default loss: (N,), (N, *spatial) per position, (B, T) per token
        label_shape = tuple(out.shape[:-1]) if out.ndim > 2 and args.tokens else (out.shape[0], *out.shape[2:])
        return inputs, rng.integers(0, args.classes, label_shape)
    return torch_model, flax_model, options, make


def place_layers(torch_model, flax_model, options: dict, batch, seed: int, print_table: bool):
    """The layer table matched against the Flax model (torch's execution order from one batch); the table is
    printed when asked, or when a layer was placed by structure rather than by name."""
    import torch

    from crosscheck import convert
    example = torch.from_numpy(np.asarray(batch(seed)[0]))
    matching = convert.match(torch_model, flax_model, example=example, show_table=False, **options)
    if print_table or matching.structural:
        print(matching)
    return matching.layers


def resume_check(torch_model, layers, batch, k: int) -> int:
    """Max ulps between 2k torch AdamW steps and k torch + k jax_impl steps (after converting the state).

    Gradients come from torch at the current parameters in both runs (shared
    gradients: with each framework's own, the runs part by rounding).
    """
    import jax
    import jax.numpy as jnp
    import torch

    import jax_impl
    from crosscheck import convert
    from crosscheck.common.metrics import distance

    def grads_at(model, step):
        inputs, labels = batch(step)
        model.zero_grad()
        losses.torch_cross_entropy(model(torch.from_numpy(inputs)), torch.from_numpy(labels)).backward()

    def fresh():
        model = copy.deepcopy(torch_model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1, fused=True)

    model, optimizer = fresh()
    for t in range(2 * k):
        grads_at(model, t)
        optimizer.step()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, optimizer = fresh()
    for t in range(k):
        grads_at(model, t)
        optimizer.step()
    names = convert.param_names(model, optimizer)
    named = dict(model.named_parameters())
    params = jax.tree.map(jnp.asarray, convert.params_to_flax({n: named[n] for n in names}, layers))
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    tx = jax_impl.adamw(1e-2, weight_decay=0.1, torch_layout=convert.torch_layout(model, layers))
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(k, 2 * k):
        with torch.no_grad():
            for name, value in convert.params_to_torch(params, layers, names).items():
                model.get_parameter(name).copy_(value)
        grads_at(model, t)
        grads = convert.params_to_flax({n: named[n].grad for n in names}, layers)
        params, state = step(jax.tree.map(jnp.asarray, grads), state, params)
    got = convert.params_to_torch(params, layers, names)
    return max(int(distance(got[n].numpy(), expected[n].numpy()).max_ulps) for n in names)


def _error(message: str) -> int:
    print(f"crosscheck port: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    from crosscheck.common.report import report_errors
    from crosscheck.port import locate
    from crosscheck.port.parity import assert_trajectories_match
    try:
        for name in ("steps", "resume", "seed"):  # argparse checks these; port.run(args) may be called directly
            if getattr(args, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
        torch_model, flax_model, options, batch = _setup(args)
    except ValueError as err:
        return _error(f"error: {err}")
    from crosscheck.convert import ConversionError

    try:
        layers = place_layers(torch_model, flax_model, options, batch, args.seed, args.print_mapping)
    except ConversionError as err:
        return _error(f"conversion refused: {err}")
    if args.print_mapping:
        return 0
    out = Path(args.out)
    summary: dict = {"steps": args.steps}
    try:
        divergence = locate.locate_divergence(torch_model, flax_model, batch(args.seed), layers=layers)
    except ConversionError as err:
        return _error(f"conversion refused: {err}")
    print(divergence)
    passed = divergence.ok
    if args.steps:
        try:
            report = assert_trajectories_match(copy.deepcopy(torch_model), flax_model,
                                               (batch(args.seed + i) for i in range(args.steps)),
                                               layers=layers, steps=args.steps, locate=False)
            summary.update(parity="pass", logit_gap=report.logit_gap,
                           grad_gap=max(r.grad_gap for r in report.steps),
                           param_max_ulps=max(r.param_max_ulps for r in report.steps))
            print(report)
        except AssertionError as err:
            passed = False
            summary.update(parity="fail", parity_message=str(err).splitlines()[0])
            print(err)
    if args.resume:
        ulps = resume_check(torch_model, layers, batch, args.resume)
        summary["resume_max_ulps"] = ulps
        passed = passed and ulps == 0
        print(f"resume after {args.resume} torch steps, {args.resume} jax_impl steps: max {ulps} ulps "
              "from the 2k-step torch run")
    with report_errors(out):
        locate.write_report(divergence, out, title=args.example or f"{args.torch_factory} -> {args.flax_factory}",
                            checks=summary)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'errors.png'}")
    return 0 if passed else 1
