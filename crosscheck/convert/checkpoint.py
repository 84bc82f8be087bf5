"""Checkpoints that are checked before they touch anything.

JAX: params and the ``jax_impl.adamw`` state through orbax; torch: model and
optimizer ``state_dict`` through ``torch.save``.  Every save writes SHA-256
checksums: orbax checkpoints get ``crosscheck-manifest.json`` (one per file
of the directory), torch checkpoints a ``"manifest"`` entry (one per tensor
and value).  Restoring first verifies them (bit rot, a truncated or swapped
file: :class:`CheckpointError` naming the file or entry), then compares the
checkpoint with the running state entry by entry (paths, shapes, dtypes; for
the optimizer also every state key, ``step`` and param-group option) and
raises naming the first misfit *before* anything is loaded, so a refused
checkpoint leaves the running state as it was.  Writes go to a temporary name
first, so a crash leaves no half-written checkpoint under the final name; a
partial one left by a killed save is removed by the next save (with a
warning).  Cross-framework resumption is these plus :mod:`crosscheck.convert`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

from crosscheck.common.metrics import as_numpy


class CheckpointError(ValueError):
    """A checkpoint that does not fit the running state, or is damaged; the message names the entry or file."""


MANIFEST = "crosscheck-manifest.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _directory_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _verify_directory(root: Path) -> None:
    """Every file of an orbax checkpoint as :func:`save_jax` wrote it, or an error naming the first that is not."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no {MANIFEST} (not written by save_jax, or its save did not finish)") \
            from None
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"{root / MANIFEST}: unreadable ({type(err).__name__}: {err})") from None
    found = _directory_digests(root)
    for name, digest in manifest.items():
        if name not in found:
            raise CheckpointError(f"{root / name}: missing from the checkpoint")
        if found[name] != digest:
            raise CheckpointError(f"{root / name}: checksum mismatch (SHA-256 {found[name][:16]}..., saved "
                                  f"{digest[:16]}...): the file changed after it was saved")
    extra = sorted(set(found) - set(manifest))
    if extra:
        raise CheckpointError(f"{root / extra[0]}: not part of the checkpoint as saved")


def _remove_partials(path: Path) -> None:
    """Remove what a killed save left next to ``path`` (never read as a checkpoint), and say so."""
    for partial in sorted(path.parent.glob(f".{path.name}.partial*")) + sorted(
            path.parent.glob(f".{path.name}.*.partial")):
        warnings.warn(f"removing {partial}: a partial checkpoint left by an interrupted save", stacklevel=3)
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _user_mode(path: Path) -> None:
    """Give a file the mode the user's umask gives new files (``mkstemp`` makes it 0600)."""
    mask = os.umask(0o077)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
    _remove_partials(path)
    tmp = path.with_name(f".{path.name}.partial")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp, {"params": params, "opt_state": opt_state})
    (tmp / MANIFEST).write_text(json.dumps({"sha256": _directory_digests(tmp)}, indent=1))
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
    _verify_directory(path)  # before orbax reads a byte: a damaged file gives one clear line, not tracebacks
    like = {"params": params_like, "opt_state": opt_state_like}
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(path)
        except Exception as err:  # orbax raises many types for an unreadable checkpoint
            raise CheckpointError(f"{path}: unreadable orbax metadata ({type(err).__name__}: {err})") from None
        saved = getattr(metadata, "item_metadata", metadata)
        saved = getattr(saved, "tree", saved)
        _check_tree(_plain(saved), _plain(like), f"JAX checkpoint {path.name}")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              like)
        try:
            restored = checkpointer.restore(path, target)
        except Exception as err:
            raise CheckpointError(f"{path}: orbax could not restore it ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
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

def _entry_digests(tree: Any, prefix: str = "") -> dict[str, str]:
    """SHA-256 of every tensor (dtype, shape, bytes) and value (its repr) of a state dict, by path."""
    out = {}
    if isinstance(tree, Mapping):
        for key in sorted(tree, key=str):
            out.update(_entry_digests(tree[key], f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(_entry_digests(value, f"{prefix}/{i}"))
    elif torch.is_tensor(tree):
        t = tree.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[prefix] = digest.hexdigest()
    else:
        out[prefix] = hashlib.sha256(repr(tree).encode()).hexdigest()
    return out


def save_torch(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """``torch.save({"model": ..., "optimizer": ..., "manifest": checksums})``, written atomically."""
    path = Path(path)
    _remove_partials(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        content = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save({**content, "manifest": {"sha256": _entry_digests(content)}}, tmp)
        _user_mode(Path(tmp))
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
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"model", "optimizer", "manifest"}:
        raise CheckpointError(f"{path}: expected a dict with 'model', 'optimizer' and 'manifest' (written by "
                              "save_torch)")
    _verify_entries(path, checkpoint)
    what = f"torch checkpoint {path.name}"
    _check_tree({k: as_numpy(v) for k, v in checkpoint["model"].items()},
                {k: as_numpy(v) for k, v in model.state_dict().items()}, f"{what} model")
    _check_optimizer(checkpoint["optimizer"], optimizer, what)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])


def _verify_entries(path: Path, checkpoint: Mapping) -> None:
    manifest = checkpoint["manifest"].get("sha256") if isinstance(checkpoint["manifest"], Mapping) else None
    if not isinstance(manifest, Mapping):
        raise CheckpointError(f"{path}: unreadable manifest")
    found = _entry_digests({"model": checkpoint["model"], "optimizer": checkpoint["optimizer"]})
    for name in sorted(set(manifest) | set(found)):
        if manifest.get(name) != found.get(name):
            what = "missing" if name not in found else "not in the manifest" if name not in manifest else \
                "checksum mismatch: the file changed after it was saved"
            raise CheckpointError(f"{path}: {name}: {what}")


_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def _check_optimizer(saved: Mapping, optimizer: torch.optim.Optimizer, what: str) -> None:
    """Every group option and state entry a torch AdamW needs, valid, before anything is loaded."""
    what = f"{what} optimizer"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), Mapping):
        raise CheckpointError(f"{what}: expected a state dict with 'state' and 'param_groups'")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = saved["param_groups"]
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{what}: param_groups[{i}] has no 'params' list")
        # What AdamW's step reads; torch fills the other options (amsgrad, maximize, ...) with defaults.
        missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
        if missing:
            raise CheckpointError(f"{what}: param_groups[{i}] has no {missing[0]!r}")
        for key in ("lr", "eps", "weight_decay"):
            value = group[key]
            value = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise CheckpointError(f"{what}: param_groups[{i}][{key!r}] = {value!r} (a finite number >= 0)")
        betas = group["betas"]
        if isinstance(betas, (tuple, list)):
            betas = tuple(b.item() if torch.is_tensor(b) and b.numel() == 1 else b for b in betas)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise CheckpointError(f"{what}: param_groups[{i}]['betas'] = {betas!r} (two numbers in [0, 1))")
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"{what}: parameter groups of sizes {sizes}, running "
                              f"{[len(g['params']) for g in optimizer.param_groups]}")
    amsgrad_of = {index: bool(g.get("amsgrad", False)) for g in groups for index in g["params"]}
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"{what}: state for parameter {index}, which the optimizer has not")
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{what}: state[{index}] is not a dict")
        needed = _ADAMW_STATE + (("max_exp_avg_sq",) if amsgrad_of.get(index) else ())
        missing = [k for k in needed if k not in entry]
        if missing:
            raise CheckpointError(f"{what}: state[{index}] has no {missing[0]!r}")
        step = entry["step"]
        step_value = step.item() if torch.is_tensor(step) and step.numel() == 1 else step
        if not isinstance(step_value, (int, float)) or isinstance(step_value, bool) \
                or not math.isfinite(step_value) or step_value < 0 or step_value != int(step_value):
            raise CheckpointError(f"{what}: state[{index}]['step'] = {step_value!r} (a whole number >= 0)")
        param = params[index]
        for key, value in entry.items():
            if key == "step":
                continue
            if not torch.is_tensor(value):
                raise CheckpointError(f"{what}: state[{index}][{key!r}] is a {type(value).__name__}, not a tensor")
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{what}: state[{index}][{key!r}] has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(param.shape)}")
            if value.dtype != param.dtype:
                raise CheckpointError(f"{what}: state[{index}][{key!r}] has dtype {value.dtype}, "
                                      f"the parameter {param.dtype}")
