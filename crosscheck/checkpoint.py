"""Checkpoints that are checked before they touch anything.

JAX: params and the ``jax_impl.adamw`` state through orbax; torch: model and
optimizer ``state_dict`` through ``torch.save``.  Restoring compares the
checkpoint with the running state entry by entry (paths, shapes, dtypes) and
raises :class:`CheckpointError` naming the first misfit *before* anything is
loaded, so a refused checkpoint leaves the running state as it was.  Writes go
to a temporary name first, so a crash leaves no half-written checkpoint.
Cross-framework resumption is these plus :mod:`crosscheck.convert`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

from crosscheck.metrics import as_numpy


class CheckpointError(ValueError):
    """A checkpoint that does not fit the running state; the message names the entry."""


def _describe(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _check_tree(saved: Any, like: Any, what: str) -> None:
    """Same tree structure, shapes and dtypes, or an error naming the first misfit."""
    saved_leaves = {_describe(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    like_leaves = {_describe(p): x for p, x in jax.tree_util.tree_leaves_with_path(like)}
    missing = sorted(set(like_leaves) - set(saved_leaves))
    extra = sorted(set(saved_leaves) - set(like_leaves))
    if missing:
        raise CheckpointError(f"{what}: the checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                               if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{what}: the checkpoint has {extra[0]}, which the running state has not")
    for key, want in like_leaves.items():
        got = saved_leaves[key]
        if tuple(np.shape(got)) != tuple(np.shape(want)):
            raise CheckpointError(f"{what}: {key} has shape {tuple(np.shape(got))} in the checkpoint, "
                                  f"{tuple(np.shape(want))} running")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{what}: {key} has dtype {np.dtype(got.dtype)} in the checkpoint, "
                                  f"{np.dtype(want.dtype)} running")


# ---------------------------------------------------------------- JAX (orbax)

def save_jax(path: str | os.PathLike, params: Any, opt_state: Any) -> Path:
    """Save params and optimizer state (any pytrees, e.g. ``jax_impl.AdamWState``) with orbax."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"{path} exists; choose a new checkpoint path")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp, {"params": params, "opt_state": opt_state})
    os.replace(tmp, path)
    return path


def restore_jax(path: str | os.PathLike, params_like: Any, opt_state_like: Any) -> tuple[Any, Any]:
    """(params, opt_state) from :func:`save_jax`, placed and sharded like the ``*_like`` trees.

    The checkpoint's tree, shapes and dtypes are checked against them first.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint")
    like = {"params": params_like, "opt_state": opt_state_like}
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        saved = getattr(metadata, "item_metadata", metadata)
        saved = getattr(saved, "tree", saved)
        _check_tree(_plain(saved), _plain(like), f"JAX checkpoint {path.name}")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              like)
        restored = checkpointer.restore(path, target)
    return restored["params"], restored["opt_state"]


def _plain(tree: Any) -> Any:
    """Nested dicts keyed by field name or index: what orbax's metadata holds for any pytree."""
    if hasattr(tree, "_asdict"):
        tree = tree._asdict()
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, (list, tuple)):
        return {str(i): _plain(v) for i, v in enumerate(tree) if v is not None}
    return tree


# ---------------------------------------------------------------- torch

def save_torch(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """``torch.save({"model": ..., "optimizer": ...})``, written atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def restore_torch(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a :func:`save_torch` checkpoint into ``model`` and ``optimizer``, after checking every entry."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"model", "optimizer"}:
        raise CheckpointError(f"{path}: expected a dict with 'model' and 'optimizer'")
    what = f"torch checkpoint {path.name}"
    _check_tree({k: as_numpy(v) for k, v in checkpoint["model"].items()},
                {k: as_numpy(v) for k, v in model.state_dict().items()}, f"{what} model")
    _check_optimizer(checkpoint["optimizer"], optimizer, what)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])


def _check_optimizer(saved: Mapping, optimizer: torch.optim.Optimizer, what: str) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = saved.get("param_groups", [])
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"{what} optimizer: parameter groups of sizes {sizes}, running "
                              f"{[len(g['params']) for g in optimizer.param_groups]}")
    for index, entry in saved.get("state", {}).items():
        if not 0 <= index < len(params):
            raise CheckpointError(f"{what} optimizer: state for parameter {index}, which the optimizer has not")
        param = params[index]
        for key, value in entry.items():
            if key == "step" or not torch.is_tensor(value):
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{what} optimizer: state[{index}][{key!r}] has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(param.shape)}")
            if value.dtype != param.dtype:
                raise CheckpointError(f"{what} optimizer: state[{index}][{key!r}] has dtype {value.dtype}, "
                                      f"the parameter {param.dtype}")
