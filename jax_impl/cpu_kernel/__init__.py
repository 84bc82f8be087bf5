"""The one-pass CPU kernel (``adamw_kernel.cc``), built on first use and called through ``jax.ffi``.

It is compiled with the system C++ compiler into a per-user cache, keyed by
the source, the compiler and jaxlib's FFI headers, and registered as the XLA
FFI target ``jax_impl_adamw``.  Where no compiler
is available :func:`available` is False and ``jax_impl.adamw`` uses its XLA path
(the two agree bit for bit; ``tests/jax_impl_tests/test_cpu_kernel.py``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

SOURCE = Path(__file__).with_name("adamw_kernel.cc")
CACHE = Path(os.environ.get("JAX_IMPL_KERNEL_CACHE", Path.home() / ".cache" / "jax_impl"))
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-pthread"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                    platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _build() -> Path:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    # -march=native: the CPU is part of the key (a shared home directory may serve other machines).
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + " ".join(FLAGS).encode()
                         + str(include).encode() + jax.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = CACHE / f"adamw_kernel-{key}.so"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=CACHE, prefix=".adamw_kernel-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", partial],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def available() -> bool:
    """Build and register the kernel once; False (with a warning) where that fails."""
    if os.environ.get("JAX_IMPL_DISABLE_CPU_KERNEL"):
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target("jax_impl_adamw", jax.ffi.pycapsule(library.JaxImplAdamW), platform="cpu")
    except Exception as err:  # no compiler, no headers, a failed build: the XLA path works everywhere
        warnings.warn(f"jax_impl: the one-pass CPU kernel is unavailable ({err}); using the XLA path", stacklevel=2)
        return False
    return True


MODES = {"in_place": 0, "update": 1, "moments": 2}  # adamw_kernel.cc's Mode


def step(leaves, scalars, tails, *, b1: float, b2: float, eps: float, maximize: bool, decay: bool, amsgrad: bool,
         mode: str = "in_place"):
    """New (param, exp_avg, exp_avg_sq, max_exp_avg_sq) for each leaf, in one call, in place of the inputs.

    ``leaves``: (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None) per
    float32 leaf; ``tails``: per leaf, the flat positions of torch's scalar tail.
    ``mode``: ``"in_place"`` (the new param over the old); ``"update"`` (instead
    of the new param, its optax update ``p_new - p``, float32, bitwise the XLA
    path's subtraction, in a new buffer; the params are only read, so XLA need
    not copy them to keep the caller's); ``"moments"`` (no param: None in its
    place, for XLA to compute it from the new moments).
    """
    per_leaf = 5 if amsgrad else 4
    first = 1 if mode == "moments" else 0  # the first of (param, exp_avg, exp_avg_sq, max) returned
    args, results, aliases = [scalars], [], {}
    for param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq in leaves:
        base = len(args)
        args += [param, grad, exp_avg, exp_avg_sq] + ([max_exp_avg_sq] if amsgrad else [])
        for k, source in enumerate((0, 2, 3, 4)[first:per_leaf - 1]):
            if not (mode == "update" and source == 0):
                aliases[base + source] = len(results) + k
        results += [jax.ShapeDtypeStruct(param.shape, param.dtype)] * (per_leaf - 1 - first)
    offsets = np.cumsum([0] + [len(t) for t in tails]).astype(np.int64)
    flat_tails = np.concatenate([np.asarray(t, np.int64) for t in tails]) if tails else np.zeros(0, np.int64)
    call = jax.ffi.ffi_call("jax_impl_adamw", results, input_output_aliases=aliases)
    out = call(*args, weight=np.float32(1 - b1), b2=np.float32(b2), coefficient2=np.float32(1 - b2),
               eps=np.float32(eps), maximize=bool(maximize), decay=bool(decay), amsgrad=bool(amsgrad),
               mode=np.int32(MODES[mode]), tail_offsets=offsets, tails=flat_tails)
    k = per_leaf - 1 - first
    return [(None,) * first + tuple(out[i * k:(i + 1) * k]) + ((None,) if not amsgrad else ())
            for i in range(len(leaves))]
