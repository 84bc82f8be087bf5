from __future__ import annotations

import numpy as np


def channels_last(x: np.ndarray) -> np.ndarray:
    """The default input conversion: float inputs of rank 3-5 (torch's N, C, *spatial) to channels-last.

    Integer inputs (token ids) and rank-2 inputs (features) pass unchanged.  A
    port whose float input of rank 3 is not channels-first ((B, T, E)
    embeddings) passes ``to_flax_input=lambda x: x``.
    """
    x = np.asarray(x)
    if x.dtype.kind == "f" and 3 <= x.ndim <= 5:
        return np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x


def align_to_flax(torch_value: np.ndarray, flax_value: np.ndarray, channels_first: bool | None = None) -> np.ndarray:
    """A torch activation in the Flax layout: channels moved last for ``channels_first`` (a torch conv or
    norm output of rank >= 3); with ``None``, as is when the shapes agree, else channels-last; when both
    fit (a square (N, C, H, W) with C == H == W), the one closer to ``flax_value``."""
    torch_value, flax_value = np.asarray(torch_value), np.asarray(flax_value)
    moved = np.moveaxis(torch_value, 1, -1) if torch_value.ndim >= 3 else None
    if channels_first and moved is not None and moved.shape == flax_value.shape:
        return moved
    if torch_value.shape == flax_value.shape:
        if channels_first is None and moved is not None and moved.shape == flax_value.shape:
            err = lambda t: float(np.max(np.abs(t - flax_value), initial=0.0))  # noqa: E731
            return moved if err(moved) < err(torch_value) else torch_value
        return torch_value
    if moved is None or moved.shape != flax_value.shape:
        raise AssertionError(f"torch output shape {torch_value.shape} matches the Flax output {flax_value.shape} "
                             "neither as is nor channels-last")
    return moved


# A leaf whose true gradient is zero (a conv bias before a train-mode BatchNorm, attention's key bias,
# which softmax cancels) holds only rounding noise in both frameworks; divided by its own largest
# element that noise is of order 1.  So each leaf is measured against at least GRAD_FLOOR of the
# model's largest gradient element.  Measured on the port examples (tests/crosscheck_tests/port/test_ports.py prints it):
# such leaves hold <= 3e-7 of the global scale (resnet_block conv biases, transformer attn/key/bias,
# which divided by their own scale are off by 0.98-1.7); 1e-3 puts them at <= 3e-4, 30x below grad_tol,
# while a real defect moves a leaf by order 1 of its own scale.
GRAD_FLOOR = 1e-3


def relative_gaps(flax_flat: dict, torch_flat: dict, floor: float) -> dict[str, float]:
    """max|flax - torch| / max(max|torch| of the leaf, floor * max|torch| over all leaves), by leaf name."""
    scale = max(float(np.max(np.abs(np.asarray(x)), initial=0.0)) for x in torch_flat.values())
    gaps = {}
    for path, x in flax_flat.items():
        t = np.asarray(torch_flat[path])
        own = float(np.max(np.abs(t), initial=0.0))
        gaps["/".join(map(str, path))] = (float(np.max(np.abs(np.asarray(x) - t), initial=0.0))
                                          / max(own, floor * scale, 1e-30))
    return gaps


# ---------------------------------------------------------------- outputs of any shape

def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (str, bytes))


def _children(out) -> list:
    if isinstance(out, dict):  # also transformers' ModelOutput (an OrderedDict of its non-None fields)
        return [v for v in out.values() if v is not None]
    if isinstance(out, (tuple, list)):
        return list(out)
    return []


def first_array(out):
    """The first array leaf of ``out`` (depth first, in field order); None when it holds none."""
    if _is_array(out):
        return out
    for child in _children(out):
        found = first_array(child)
        if found is not None:
            return found
    return None


def select_output(out, selector=None):
    """The array to compare from a model's (or module's) output ``out``, a pytree of any shape.

    ``selector``: None (``.logits`` / ``["logits"]`` if there is one, else the first array leaf:
    nanoGPT's ``(logits, loss)``, a ``ModelOutput``, ``(output, (h, c))``), a callable
    (``lambda out: out.last_hidden_state``), a string (an attribute or key; dotted for a nested one:
    ``"hidden_states.2"``) or an int (an index).
    """
    if callable(selector):
        return selector(out)
    if selector is None:
        logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        chosen = logits if _is_array(logits) else first_array(out)
        if chosen is None:
            raise TypeError(f"the output ({type(out).__name__}) holds no array; pass output= to select one")
        return chosen
    parts = selector.split(".") if isinstance(selector, str) else [selector]
    for part in parts:
        if isinstance(out, dict) and part in out:
            out = out[part]
        elif isinstance(part, int) or (isinstance(part, str) and part.lstrip("-").isdigit()):
            out = out[int(part)]
        else:
            out = getattr(out, part)
    return out


# ---------------------------------------------------------------- calling a Flax model (nnx, or linen via ToNNX)

def check_flax_model(model, argument: str = "flax_model") -> None:
    """Refuse a bare linen module (it holds no weights): it goes in ``nnx.bridge.ToNNX``, initialized."""
    from flax import linen, nnx
    if isinstance(model, linen.Module):
        raise TypeError(f"{argument} is a linen module ({type(model).__name__}), which holds no variables: wrap it, "
                        "model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)), and initialize it, "
                        "nnx.bridge.lazy_init(model, example_input)")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{argument} must be an nnx.Module (or a linen module in nnx.bridge.ToNNX), "
                        f"got {type(model).__name__}")


def is_linen_bridge(model) -> bool:
    from flax.nnx import bridge
    return isinstance(model, bridge.ToNNX)


def call_flax(model, x):
    """``model(x)``; a linen module wrapped in ``nnx.bridge.ToNNX`` may update its non-param collections
    (BatchNorm's ``batch_stats``), as ``nnx.BatchNorm`` does in train mode."""
    if is_linen_bridge(model):
        from flax.nnx.bridge import variables as bridge_variables

        attrs = {k: v for k, v in vars(model).items() if not k.startswith(("to_nnx__", "_pytree__"))}
        collections = [c for c in bridge_variables.nnx_attrs_to_linen_vars(attrs) if c != "params"]
        return model(x, mutable=collections or False)
    return model(x)


def loss_and_grads(model, x, y, loss, output=None):
    """(loss, selected output, gradient with respect to the model's Params) of a Flax model (nnx or ToNNX)."""
    from flax import nnx

    def loss_fn(m):
        out = select_output(call_flax(m, x), output)
        return loss(out, y), out

    (value, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return value, out, grads


# ---------------------------------------------------------------- rounding bands

# A faithful port's error is rounding of the size of torch's own float32 error (measured on the built-in
# examples and on the third-party models of tests/crosscheck_tests/port/test_third_party.py: at most 6x,
# see docs/porting.md); BAND_FACTOR leaves 5x room above that.
BAND_FACTOR = 32.0
ULPS = 8 * 2.0 ** -23  # a few float32 ulps of a value's scale: the band of an exactly-computed value


def rounding_band(t32, t64, factor: float = BAND_FACTOR) -> float:
    """``factor`` x torch's own float32 error max|t32 - t64| (plus a few ulps of the scale max|t64|)."""
    t32, t64 = np.asarray(t32, np.float64), np.asarray(t64, np.float64)
    scale = float(np.max(np.abs(t64), initial=0.0))
    return max(factor * float(np.max(np.abs(t32 - t64), initial=0.0)), ULPS * scale)


def gradient_bands(g32: dict, g64s: list[dict], factor: float = BAND_FACTOR) -> dict:
    """The rounding band of every gradient leaf: ``factor`` x the largest distance of torch's float32
    gradient from its float64 ones (the exact run and runs at parameters perturbed by float32 rounding),
    at least a few ulps of the model's largest gradient element (a leaf whose true gradient is zero).

    The perturbed runs are what makes a ReLU kink (or max-pool tie) explicable: a pre-activation within
    rounding of zero takes the other branch in one framework, which moves one summand of the gradient;
    perturbing the parameters by their float32 rounding moves the same near-zero pre-activations.
    """
    scale = max(float(np.max(np.abs(np.asarray(x)), initial=0.0)) for x in g32.values())
    bands = {}
    for path, x in g32.items():
        x = np.asarray(x, np.float64)
        own = max(float(np.max(np.abs(x - np.asarray(g[path], np.float64)), initial=0.0)) for g in g64s)
        bands[path] = max(factor * own, ULPS * scale)
    return bands


def absolute_gaps(flax_flat: dict, torch_flat: dict) -> dict:
    return {path: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(torch_flat[path], np.float64)),
                               initial=0.0)) for path, x in flax_flat.items()}


# ---------------------------------------------------------------- torch's own rounding

PERTURBED_RUNS = 2  # float64 runs at parameters moved by their float32 rounding (see gradient_bands)


def torch_run(model, x, y, loss, output=None, *, float64: bool = False, perturb_seed: int | None = None):
    """(selected output, loss, {name: gradient}) of a *copy* of ``model`` on (x, y), in float32 or float64.

    ``perturb_seed``: first move every parameter by a random fraction of its float32 rounding
    (relative, uniform in +-2^-24), as another framework's rounding might.
    """
    import copy

    import torch

    from crosscheck.common.metrics import as_numpy

    twin = copy.deepcopy(model)
    if float64:
        twin = twin.double()
    x = torch.as_tensor(x)
    if float64 and x.is_floating_point():
        x = x.double()
    if perturb_seed is not None:
        gen = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1 + (torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * 2.0 ** -24)
    named = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    twin.zero_grad()
    out = select_output(twin(x), output)
    value = loss(out, torch.as_tensor(y)) if y is not None else None
    grads = {}
    if value is not None:
        value.backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in named.items()}
    return (as_numpy(out).astype(np.float64), None if value is None else float(value.item()),
            {n: as_numpy(g).astype(np.float64) for n, g in grads.items()})


def torch_references(model, x, y, loss, output=None, perturbed: int = PERTURBED_RUNS) -> list:
    """torch's float64 runs at the model's parameters: the exact one, then ``perturbed`` perturbed ones."""
    return [torch_run(model, x, y, loss, output, float64=True, perturb_seed=None if i == 0 else i)
            for i in range(perturbed + 1)]
