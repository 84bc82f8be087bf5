"""Checkpoints that are checked before they touch anything.

JAX: params and the ``jax_impl.adamw`` state through orbax (any pytrees,
``nnx.State`` included, restored into templates of the same kind); torch:
model and optimizer ``state_dict`` through ``torch.save``.  Every save writes
a format version and SHA-256 checksums: orbax checkpoints get
``crosscheck-manifest.json`` (one per file of the directory), torch
checkpoints a ``"manifest"`` entry (one per tensor and value).  Restoring
first checks the version (one this crosscheck does not know is refused) and
the checksums (bit rot, a truncated or swapped file: :class:`CheckpointError`
naming the file or entry), then compares the checkpoint with the running
state entry by entry (paths, shapes, dtypes; for the optimizer also every
state key, ``step`` and param-group option) and raises naming the first
misfit *before* anything is loaded, so a refused checkpoint leaves the
running state as it was.  Writes go to a temporary name first, so a crash
leaves no half-written checkpoint under the final name; a partial one left by
a killed save is removed by the next save (with a warning).  In a multi-process
JAX job every process calls :func:`save_jax` (each writes its shards), the
primary process alone writes the manifest and commits, between barriers, as
orbax does.  :class:`CheckpointManager` keeps numbered checkpoints of a run:
the latest valid step, the newest ``max_to_keep``.  Cross-framework resumption
is these plus :mod:`crosscheck.convert`.
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
FORMAT_VERSION = 1  # what save_jax and save_torch write
KNOWN_FORMAT_VERSIONS = (1,)  # what restore_jax and restore_torch read (a manifest without one is version 1)


def _check_version(manifest: Mapping, where: str) -> None:
    version = manifest.get("format_version", 1)  # written before versions were: the same format as 1
    if isinstance(version, bool) or not isinstance(version, int) or version not in KNOWN_FORMAT_VERSIONS:
        raise CheckpointError(f"{where}: format_version {version!r}, this crosscheck reads format_version "
                              f"{', '.join(map(str, KNOWN_FORMAT_VERSIONS))} (saved by a newer crosscheck? "
                              "upgrade it to restore this checkpoint)")


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
        content = json.loads((root / MANIFEST).read_text())
        manifest = content["sha256"]
        if not isinstance(manifest, Mapping):
            raise TypeError(f"'sha256' is a {type(manifest).__name__}, not an object")
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no {MANIFEST} (not written by save_jax, or its save did not finish)") \
            from None
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"{root / MANIFEST}: unreadable ({type(err).__name__}: {err})") from None
    _check_version(content, str(root / MANIFEST))
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


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_names(path) -> tuple[str, ...]:
    names = tuple(_key_name(k) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def _leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    """Leaves by path of names, as orbax's metadata keys them (fields, dict keys and indices as strings).

    An ``nnx.Variable`` holds its array under ``value`` (orbax's metadata too);
    that last level is dropped, so an ``nnx.State`` and its pure dict
    (``nnx.to_pure_dict``) have the same paths.
    """
    return {_path_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _show(names: tuple[str, ...]) -> str:
    return "".join(f"[{n!r}]" for n in names) or "<root>"


def _check_tree(saved: dict, like: dict, what: str) -> None:
    """Same paths, shapes and dtypes (both by :func:`_leaves`), or an error naming the first misfit."""
    missing = sorted(set(like) - set(saved))
    extra = sorted(set(saved) - set(like))
    if missing:
        raise CheckpointError(f"{what}: the checkpoint has no {_show(missing[0])}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{what}: the checkpoint has {_show(extra[0])}, which the running state has not")
    for key, want in like.items():
        got = saved[key]
        if tuple(np.shape(got)) != tuple(np.shape(want)):
            raise CheckpointError(f"{what}: {_show(key)} has shape {tuple(np.shape(got))} in the checkpoint, "
                                  f"{tuple(np.shape(want))} running")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{what}: {_show(key)} has dtype {np.dtype(got.dtype)} in the checkpoint, "
                                  f"{np.dtype(want.dtype)} running")


# ---------------------------------------------------------------- JAX (orbax)

_barriers = 0  # every process saves in the same order, so the n-th barrier has one name in all of them


def _sync(what: str, path: Path) -> None:
    """orbax's barrier across the processes of a ``jax.distributed`` job (nothing in a single process)."""
    from orbax.checkpoint import multihost

    global _barriers
    _barriers += 1
    multihost.sync_global_processes(f"crosscheck_{what}_{_barriers}:{path}")


def _is_primary() -> bool:
    return jax.process_index() == 0


def save_jax(path: str | os.PathLike, params: Any, opt_state: Any, *, force: bool = False) -> Path:
    """Save params and optimizer state (any pytrees: dicts, ``nnx.State``, optax states such as ``jax_impl.adamw``'s) with orbax.

    An existing ``path`` is refused unless ``force=True`` (as orbax's
    ``save(..., force=True)``): then the new checkpoint, complete, replaces it.
    In a ``jax.distributed`` job every process calls this with its shards;
    the primary process (0) writes the manifest and renames the checkpoint
    into place after all have written theirs, and no process returns before.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a checkpoint directory; choose a new checkpoint path")
    if path.exists() and not force:
        raise CheckpointError(f"{path} exists; choose a new checkpoint path (or pass force=True to replace it)")
    tmp = path.with_name(f".{path.name}.partial")
    if _is_primary():
        _remove_partials(path)
    _sync("save_start", path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp, {"params": params, "opt_state": opt_state})
    _sync("shards_written", path)  # every process's files are in tmp
    if _is_primary():
        (tmp / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                "sha256": _directory_digests(tmp)}, indent=1))
        old = path.with_name(f".{path.name}.replaced.partial")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    _sync("committed", path)
    return path


def restore_jax(path: str | os.PathLike, params_like: Any, opt_state_like: Any) -> tuple[Any, Any]:
    """(params, opt_state) from :func:`save_jax`, placed and sharded like the ``*_like`` trees.

    The templates may be arrays or ``jax.ShapeDtypeStruct`` (with shardings; without, the first local device),
    in dicts, ``nnx.State``s or optax state trees; what comes back has their
    structure (an ``nnx.State`` template gives an ``nnx.State``, whichever kind
    was saved).  The checkpoint's paths, shapes and dtypes are checked against them first.
    """
    return _restore_jax(Path(path).absolute(), params_like, opt_state_like, verify=True)


def _restore_jax(path: Path, params_like: Any, opt_state_like: Any, verify: bool) -> tuple[Any, Any]:
    import orbax.checkpoint as ocp

    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint")
    if verify:
        _verify_directory(path)  # before orbax reads a byte: a damaged file gives one clear line, not tracebacks
    like = {"params": params_like, "opt_state": opt_state_like}
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(path)
        except Exception as err:  # orbax raises many types for an unreadable checkpoint
            raise CheckpointError(f"{path}: unreadable orbax metadata ({type(err).__name__}: {err})") from None
        saved = getattr(metadata, "item_metadata", metadata)
        saved = _plain(getattr(saved, "tree", saved))
        like_leaves = _leaves(like)
        _check_tree(_leaves(saved), like_leaves, f"JAX checkpoint {path.name}")
        # Restored in the checkpoint's own structure (orbax wants it), then put into the templates' structure;
        # a template without a sharding (a NumPy array) is restored onto this process's first device.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map_with_path(
            lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=getattr(like_leaves[_path_names(p)],
                                                                                    "sharding", None) or device),
            saved)
        try:
            restored = _leaves(checkpointer.restore(path, target))
        except Exception as err:
            raise CheckpointError(f"{path}: orbax could not restore it ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
    out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), [restored[k] for k in like_leaves])
    return out["params"], out["opt_state"]


def _plain(tree: Any) -> Any:
    """orbax's metadata as nested dicts and lists (its leaves kept)."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return [_plain(v) for v in tree]
    return tree


class CheckpointManager:
    """Numbered :func:`save_jax` checkpoints of one run in ``directory`` (``directory/<step>``), as orbax's manager.

    ``save(step, params, opt_state)`` writes ``directory/<step>``, removes what
    killed saves left in ``directory`` (hidden ``.<name>.partial*`` folders,
    with a warning) and, with ``max_to_keep``, the oldest steps beyond the
    newest ``max_to_keep``; ``latest_step()`` is the newest step whose
    checkpoint verifies (version, checksums: a newer damaged or unfinished one
    is skipped with a warning naming it); ``restore(step, params_like,
    opt_state_like)`` restores it (``step=None``: the latest valid).  In a
    ``jax.distributed`` job every process makes the same calls.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be None (keep all) or an integer >= 1, got {max_to_keep!r}")
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory; choose a checkpoint directory")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to wait for (saves are synchronous); here for orbax's ``with CheckpointManager(...)``."""

    def wait_until_finished(self) -> None:
        """Nothing to wait for (saves are synchronous), as for orbax's manager."""

    def step_path(self, step: int) -> Path:
        return self.directory / str(_check_step(step))

    def all_steps(self) -> list[int]:
        """Every step with a checkpoint folder, oldest first (valid or not; hidden partial folders never)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.is_dir() and p.name.isascii() and p.name.isdigit() and p.name == str(int(p.name)))

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint verifies, or None; newer ones that do not are skipped, with a warning."""
        for step in reversed(self.all_steps()):
            try:
                _verify_directory(self.step_path(step))
            except CheckpointError as err:
                warnings.warn(f"skipping step {step}: {err}", stacklevel=2)
                continue
            return step
        return None

    def save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> Path:
        """Save step ``step`` (refused if it exists, unless ``force=True``); then keep the newest ``max_to_keep``."""
        path = self.step_path(step)
        if path.exists() and not force:
            raise CheckpointError(f"{self.directory}: step {step} already exists (pass force=True to replace it)")
        if _is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            for partial in sorted(self.directory.glob(".*.partial*")):
                warnings.warn(f"removing {partial}: a partial checkpoint left by an interrupted save", stacklevel=2)
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink(missing_ok=True)
        _sync("manager_ready", self.directory)
        save_jax(path, params, opt_state, force=force)
        if self.max_to_keep is not None:  # this step and the newest max_to_keep - 1 others stay
            others = [s for s in self.all_steps() if s != step]
            doomed = others[:max(0, len(others) - (self.max_to_keep - 1))]
            _sync("listed", self.directory)  # every process has listed the steps before one is removed
            if _is_primary():
                for old in doomed:
                    self._remove(old)
            _sync("pruned", self.directory)
        return path

    def restore(self, step: int | None, params_like: Any, opt_state_like: Any) -> tuple[Any, Any]:
        """(params, opt_state) of ``step``, or of :meth:`latest_step` if None, as :func:`restore_jax` gives them."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no valid checkpoint (steps found: {self.all_steps()})")
            return _restore_jax(self.step_path(step), params_like, opt_state_like, verify=False)  # just verified
        path = self.step_path(step)
        if not path.is_dir():
            raise CheckpointError(f"{self.directory}: no step {step} (steps found: {self.all_steps()})")
        return restore_jax(path, params_like, opt_state_like)

    def delete(self, step: int) -> None:
        """Remove step ``step`` (every process calls it; the primary removes)."""
        path = self.step_path(step)
        _sync("delete", path)  # no process still reads it
        if _is_primary():
            self._remove(step)
        _sync("deleted", path)

    def _remove(self, step: int) -> None:
        """Renamed to a hidden partial first, so a killed removal leaves no half step."""
        path = self.step_path(step)
        if path.is_dir():
            doomed = path.with_name(f".{path.name}.deleted.partial")
            os.replace(path, doomed)
            shutil.rmtree(doomed)


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


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
    """``torch.save({"model": ..., "optimizer": ..., "manifest": version and checksums})``, written atomically.

    ``path`` is a file name in an existing folder; an existing file is replaced
    (as ``torch.save`` does), a directory is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; save_torch writes a file (give a file name, e.g. "
                              f"{path / 'checkpoint.pt'})")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise CheckpointError(f"{path}: cannot save, the folder {path.parent} {what} (create it first)")
    _remove_partials(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot save ({err.strerror or err})") from None
    os.close(fd)
    try:
        content = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save({**content, "manifest": {"format_version": FORMAT_VERSION, "sha256": _entry_digests(content)}},
                   tmp)
        _user_mode(Path(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot save ({err.strerror or err})") from None
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
    _check_tree({(str(k),): as_numpy(v) for k, v in sorted(checkpoint["model"].items())},
                {(str(k),): as_numpy(v) for k, v in sorted(model.state_dict().items())}, f"{what} model")
    _check_optimizer(checkpoint["optimizer"], optimizer, what)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])


def _verify_entries(path: Path, checkpoint: Mapping) -> None:
    manifest = checkpoint["manifest"].get("sha256") if isinstance(checkpoint["manifest"], Mapping) else None
    if not isinstance(manifest, Mapping):
        raise CheckpointError(f"{path}: unreadable manifest")
    _check_version(checkpoint["manifest"], f"{path}: manifest")
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
