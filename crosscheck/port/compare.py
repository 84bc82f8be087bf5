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
