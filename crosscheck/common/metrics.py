"""Distances between float arrays: bitwise equality, ulps, absolute and relative error."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {2: np.int64, 4: np.int64, 8: np.int64}


def as_numpy(x) -> np.ndarray:
    """A NumPy array from a numpy, JAX or torch array (bfloat16 kept, via ml_dtypes)."""
    if hasattr(x, "detach"):  # torch
        import ml_dtypes
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    return x.view(_UINT[x.dtype.itemsize])


def ordered(x: np.ndarray) -> np.ndarray:
    """Map floats to integers whose difference counts representable values (ulps); +0 and -0 meet."""
    x = np.ascontiguousarray(x)
    width = 8 * x.dtype.itemsize
    raw = bits(x).astype(np.uint64)
    sign = raw >> np.uint64(width - 1)
    magnitude = (raw & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)
    return np.where(sign == 1, -magnitude, magnitude)


class Distance(NamedTuple):
    n: int  # elements compared
    bitwise_equal: float  # fraction of elements whose bits are identical
    max_ulps: float  # inf where one side is NaN and the other is not
    max_abs: float
    max_rel: float
    first_mismatch: int  # flat index of the first element whose bits differ, -1 if none
    nonfinite: int = 0  # elements that are NaN or infinite in either array (equal NaNs count: they prove nothing)


def distance(a, b) -> Distance:
    """Compare ``a`` with ``b`` (same shape and dtype); ``b`` is the baseline for relative error."""
    a, b = as_numpy(a), as_numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"distance: shapes differ: {a.shape} vs {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"distance: dtypes differ: {a.dtype} vs {b.dtype}")
    n = a.size
    if n == 0:
        return Distance(0, 1.0, 0.0, 0.0, 0.0, -1)
    a, b = a.reshape(-1), b.reshape(-1)
    same_bits = bits(a) == bits(b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    nan_mismatch = nan_a != nan_b
    both_nan = nan_a & nan_b
    ulps = np.abs(ordered(a) - ordered(b)).astype(np.float64)
    ulps = np.where(both_nan, 0.0, np.where(nan_mismatch, np.inf, ulps))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        abs_err = np.where(both_nan | (a64 == b64), 0.0, np.abs(a64 - b64))
        rel_err = np.where(abs_err == 0, 0.0, abs_err / np.abs(b64))
    abs_err = np.where(nan_mismatch, np.inf, abs_err)
    rel_err = np.where(nan_mismatch, np.inf, rel_err)
    mismatches = np.flatnonzero(~same_bits)
    nonfinite = int(np.count_nonzero(~(np.isfinite(a64) & np.isfinite(b64))))
    return Distance(n, float(same_bits.mean()), float(ulps.max()), float(abs_err.max()),
                    float(np.nan_to_num(rel_err, nan=np.inf).max()),
                    int(mismatches[0]) if mismatches.size else -1, nonfinite)


def ulps_from_reference(x, reference64) -> np.ndarray:
    """Error of ``x`` against a float64 value, in ulps of ``x``'s dtype at the reference."""
    x = as_numpy(x)
    ref = np.asarray(reference64, np.float64)
    spacing = np.spacing(ref.astype(x.dtype)).astype(np.float64)
    return np.abs(x.astype(np.float64) - ref) / np.abs(spacing)
