from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

DTYPES = {
    "float32": (np.float32, torch.float32, jnp.float32),
    "float64": (np.float64, torch.float64, jnp.float64),
    "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16, jnp.bfloat16),
    "float16": (np.float16, torch.float16, jnp.float16),
}


def to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    np_dtype, torch_dtype, _ = DTYPES[dtype]
    x = np.asarray(x, np_dtype)
    if dtype == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_jax(x: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(np.asarray(x, DTYPES[dtype][0]))
