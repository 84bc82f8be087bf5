"""The one-pass CPU kernel (``adamw_kernel.cc``), built on first use and called through ``jax.ffi``.

It is compiled with the system C++ compiler into a per-user cache, keyed by
the source, the compiler and jaxlib's FFI headers, and registered as the XLA
FFI target ``jax_impl_adamw``.  Where no compiler
is available :func:`available` is False and ``jax_impl.adamw`` uses its XLA path
(the two agree bit for bit; ``tests/jax_impl_tests/test_cpu_kernel.py``).

torch's CPU ``Tensor.sqrt`` in float32/float64 (its for-loop and foreach AdamW
paths) is MKL's ``vmsSqrt``/``vmdSqrt`` (``VML_HA``), not correctly rounded.
Where ``libmkl_rt`` is found (the ``mkl`` package, the ``mkl`` extra, or
the path in ``$JAX_IMPL_MKL``; ``JAX_IMPL_MKL=0``: never) the kernel hands
those paths' sqrt to it, and :func:`vml_sqrt` gives XLA's graphs the same one;
elsewhere both are the correctly rounded sqrt.  :func:`sqrt_source` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
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
        jax.ffi.register_ffi_target("jax_impl_vml_sqrt", jax.ffi.pycapsule(library.JaxImplVmlSqrt), platform="cpu")
        mkl = _mkl()
        if mkl is not None:
            library.JaxImplSetVmlSqrt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            library.JaxImplSetVmlSqrt(*(ctypes.cast(f, ctypes.c_void_p) for f in (mkl.vmsSqrt, mkl.vmdSqrt)))
    except Exception as err:  # no compiler, no headers, a failed build: the XLA path works everywhere
        warnings.warn(f"jax_impl: the one-pass CPU kernel is unavailable ({err}); using the XLA path", stacklevel=2)
        return False
    return True


CORRECTLY_ROUNDED = "correctly rounded"
MKL_ENV = "JAX_IMPL_MKL"  # a path to libmkl_rt; empty or "0": never MKL


def _mkl_candidates() -> list[Path]:
    """Where ``libmkl_rt`` may be: ``$JAX_IMPL_MKL``, else the ``mkl`` distribution's files."""
    if MKL_ENV in os.environ:
        value = os.environ[MKL_ENV]
        return [] if value in ("", "0") else [Path(value)]
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(f.locate()) for f in files if Path(str(f)).name.startswith("libmkl_rt.so")]


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """MKL's runtime library (sequential: the kernel's threads are XLA's), or None where none is found."""
    for path in _mkl_candidates():
        try:
            mkl = ctypes.CDLL(str(path))
            mkl.MKL_Set_Threading_Layer(ctypes.c_int(1))  # MKL_THREADING_SEQUENTIAL, before any other call
            mkl.vmsSqrt, mkl.vmdSqrt  # noqa: B018  (both present, or this is not MKL's VML)
        except (OSError, AttributeError) as err:
            warnings.warn(f"jax_impl: {path} is not a usable libmkl_rt ({err}); torch's MKL sqrt is "
                          "replaced by the correctly rounded one", stacklevel=3)
            continue
        return mkl
    return None


def sqrt_source() -> str:
    """The float32/float64 sqrt of jax_impl's loop paths: ``"mkl 2024.2.2"`` (MKL's, as torch's CPU
    ``Tensor.sqrt``), or ``"correctly rounded"`` (no libmkl_rt found, no kernel built, or not a single CPU
    device: the custom call has no sharding rule, so several devices keep ``jnp.sqrt``)."""
    if not available() or _mkl() is None or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return CORRECTLY_ROUNDED
    text = ctypes.create_string_buffer(256)
    _mkl().mkl_get_version_string(text, len(text))  # "Intel(R) oneAPI Math Kernel Library Version 2024.2.2-Product ..."
    found = re.search(rb"Version (\d+(?:\.\d+)*)", text.value)
    return f"mkl {found.group(1).decode() if found else 'unknown version'}"


def vml_sqrt(x: jax.Array) -> jax.Array:
    """torch's CPU ``Tensor.sqrt`` of a float32/float64 array: MKL's where :func:`sqrt_source` names it, else
    ``jnp.sqrt``."""
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.float64) or sqrt_source() == CORRECTLY_ROUNDED:
        return jnp.sqrt(x)
    return jax.ffi.ffi_call("jax_impl_vml_sqrt", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(x)


MODES = {"in_place": 0, "update": 1, "moments": 2}  # adamw_kernel.cc's Mode


def step(leaves, scalars, tails, *, b1: float, b2: float, eps: float, maximize: bool, decay: bool, amsgrad: bool,
         mode: str = "in_place", torch_sqrt: bool = False):
    """New (param, exp_avg, exp_avg_sq, max_exp_avg_sq) for each leaf, in one call, in place of the inputs.

    ``leaves``: (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None) per
    float32 leaf; ``tails``: per leaf, the flat positions of torch's scalar tail.
    ``mode``: ``"in_place"`` (the new param over the old); ``"update"`` (instead
    of the new param, its optax update ``p_new - p``, float32, bitwise the XLA
    path's subtraction, in a new buffer; the params are only read, so XLA need
    not copy them to keep the caller's); ``"moments"`` (no param: None in its
    place, for XLA to compute it from the new moments).  ``torch_sqrt``: the
    loop paths' sqrt, torch's ``Tensor.sqrt`` (MKL's where :func:`sqrt_source`
    names it; no tails then); else the fused kernel's correctly rounded one.
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
               mode=np.int32(MODES[mode]),
               vml_sqrt=bool(torch_sqrt and sqrt_source() != CORRECTLY_ROUNDED), tail_offsets=offsets, tails=flat_tails)
    k = per_leaf - 1 - first
    return [(None,) * first + tuple(out[i * k:(i + 1) * k]) + ((None,) if not amsgrad else ())
            for i in range(len(leaves))]
