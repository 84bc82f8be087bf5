"""Flax NNX layers with torch's semantics, for ports that must agree with torch to rounding.

- :class:`BatchNorm`: ``nnx.BatchNorm`` updates ``var`` with the *biased* batch
  variance and calls ``momentum`` the weight of the old statistics (torch's
  0.1 is Flax's 0.9); torch uses the unbiased variance (n / (n - 1)) and
  counts batches in ``num_batches_tracked``.  This one does what torch does,
  with the same leaf names as ``nnx.BatchNorm`` (``scale``, ``bias``,
  ``mean``, ``var``) plus ``num_batches_tracked``, so ``crosscheck.convert``
  moves all five.  Channels last.
- :class:`LSTM` / :class:`GRU`: Flax's cells keep one bias per gate (and
  their own gate order); torch keeps two (``bias_ih``, ``bias_hh``), gates
  ``i, f, g, o`` (LSTM) and ``r, z, n`` (GRU, with ``b_hn`` inside the reset
  product).  These keep torch's parameters under torch's names and layouts
  (``weight_ih_l0`` (4H, I), ...), so conversion is the identity, and take
  and return what ``torch.nn.LSTM``/``GRU`` do: ``(output, (h_n, c_n))`` / ``(output, h_n)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm{1,2,3}d`` on channels-last inputs (same ``momentum`` and ``eps`` as torch)."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 use_running_average: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones(num_features, dtype))
        self.bias = nnx.Param(jnp.zeros(num_features, dtype))
        self.mean = nnx.BatchStat(jnp.zeros(num_features, dtype))
        self.var = nnx.BatchStat(jnp.ones(num_features, dtype))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        frozen = self.use_running_average if use_running_average is None else use_running_average
        axes = tuple(range(x.ndim - 1))
        channels = lambda v: v.reshape((1,) * (x.ndim - 1) + (-1,))  # noqa: E731  (explicit rank: no promotion)
        if frozen:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = x.mean(axes)
            var = jnp.square(x - channels(mean)).mean(axes)  # biased: what torch normalizes with
            n = x.size // x.shape[-1]
            unbiased = var * (n / max(n - 1, 1))  # what torch stores
            self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * mean
            self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * unbiased
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return ((x - channels(mean)) * channels(jax.lax.rsqrt(var + self.eps)) * channels(self.scale[...])
                + channels(self.bias[...]))


class _Recurrent(nnx.Module):
    gates = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
                 batch_first: bool = False, bidirectional: bool = False, rngs: nnx.Rngs):
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        bound = 1 / math.sqrt(hidden_size)  # torch's init: U(-1/sqrt(H), 1/sqrt(H))
        init = lambda *shape: nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))  # noqa
        for layer in range(num_layers):
            for suffix in self._suffixes(layer):
                width = input_size if layer == 0 else hidden_size * (2 if bidirectional else 1)
                setattr(self, f"weight_ih{suffix}", init(self.gates * hidden_size, width))
                setattr(self, f"weight_hh{suffix}", init(self.gates * hidden_size, hidden_size))
                if bias:
                    setattr(self, f"bias_ih{suffix}", init(self.gates * hidden_size))
                    setattr(self, f"bias_hh{suffix}", init(self.gates * hidden_size))

    def _suffixes(self, layer: int) -> tuple[str, ...]:
        return (f"_l{layer}", f"_l{layer}_reverse") if self.bidirectional else (f"_l{layer}",)

    def _weights(self, suffix: str):
        get = lambda name: getattr(self, f"{name}{suffix}")[...] if hasattr(self, f"{name}{suffix}") else 0.0  # noqa
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    def _run(self, x: jax.Array, states: list) -> tuple[jax.Array, list]:
        """x: (T, B, I); states: per layer and direction the cell state; returns outputs and final states."""
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
                state = states[len(finals)]
                seq = x[::-1] if direction else x
                # x @ W_ih^T + b_ih for all steps at once, as torch's kernels do outside the time loop
                projected = seq @ w_ih.T + jnp.reshape(b_ih, (1, 1, -1))
                state, out = jax.lax.scan(lambda s, p: self._cell(s, p, w_hh, b_hh), state, projected)
                outputs.append(out[::-1] if direction else out)
                finals.append(state)
            x = jnp.concatenate(outputs, axis=-1)
        return x, finals

    def _initial(self, batch: int, given, dtype) -> list:
        count = self.num_layers * (2 if self.bidirectional else 1)
        if given is None:
            return [jnp.zeros((batch, self.hidden_size), dtype)] * count
        return list(given)


class LSTM(_Recurrent):
    """``torch.nn.LSTM`` with torch's parameters: ``(output, (h_n, c_n)) = lstm(x, (h_0, c_0))``."""

    gates = 4

    def _cell(self, state, projected, w_hh, b_hh):
        h, c = state
        i, f, g, o = jnp.split(projected + (h @ w_hh.T + jnp.reshape(b_hh, (1, -1))), 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    def __call__(self, x: jax.Array, hx: tuple[jax.Array, jax.Array] | None = None):
        x = jnp.swapaxes(x, 0, 1) if self.batch_first else x
        h0, c0 = (None, None) if hx is None else hx
        hs, cs = self._initial(x.shape[1], h0, x.dtype), self._initial(x.shape[1], c0, x.dtype)
        out, finals = self._run(x, list(zip(hs, cs)))
        out = jnp.swapaxes(out, 0, 1) if self.batch_first else out
        return out, (jnp.stack([h for h, _ in finals]), jnp.stack([c for _, c in finals]))


class GRU(_Recurrent):
    """``torch.nn.GRU`` with torch's parameters: ``(output, h_n) = gru(x, h_0)``."""

    gates = 3

    def _cell(self, h, projected, w_hh, b_hh):
        x_r, x_z, x_n = jnp.split(projected, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(h @ w_hh.T + jnp.reshape(b_hh, (1, -1)), 3, axis=-1)
        r = jax.nn.sigmoid(x_r + h_r)
        z = jax.nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h

    def __call__(self, x: jax.Array, hx: jax.Array | None = None):
        x = jnp.swapaxes(x, 0, 1) if self.batch_first else x
        out, finals = self._run(x, self._initial(x.shape[1], hx, x.dtype))
        out = jnp.swapaxes(out, 0, 1) if self.batch_first else out
        return out, jnp.stack(finals)
