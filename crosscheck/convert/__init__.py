"""Model weights and AdamW state between a torch ``state_dict`` and Flax: the converter every part uses.

Flax keeps a layer's arrays in channels-last layouts; torch keeps them
channels-first.  Every conversion here is a pure permutation of elements
(transposes and reshapes, never arithmetic), so round trips are exact:

============  =============================  ==================================
torch layer   torch key (layout)             Flax leaf (collection, layout)
============  =============================  ==================================
Conv{1,2,3}d  weight (O, I, *K), bias        kernel (*K, I, O), bias   (params)
Linear        weight (out, in), bias         kernel (in, out), bias    (params)
HF Conv1D     weight (in, out), bias         kernel (in, out), bias    (params)
BatchNorm     weight, bias                   scale, bias               (params)
              running_mean, running_var      mean, var            (batch_stats)
LayerNorm,    weight, bias                   scale, bias               (params)
GroupNorm
Embedding     weight (num, features)         embedding (num, features) (params)
============  =============================  ==================================

A Linear fed by torch's NCHW flatten (``x.view(-1, C*H*W)`` after a conv
stack) sees its inputs in (C, H, W) order, while the Flax port flattens NHWC
in (H, W, C) order: give that layer ``flatten_from=(C, H, W)`` and its kernel
rows are permuted to match (without it the port's outputs are simply wrong).

BatchNorm's ``num_batches_tracked`` has no Flax counterpart; converting back,
it is taken from ``reference`` (the target's current ``state_dict()``) or set to 0.

The AdamW state converts with the same layouts: ``exp_avg``, ``exp_avg_sq`` and
``max_exp_avg_sq`` of a parameter move exactly as its weight does, into optax's
``mu``, ``nu`` and ``nu_max`` (``jax_impl.adamw``'s state is ``optax.adamw``'s tree;
``jax_impl.torch_view`` reads it under torch's names); torch's per-parameter
float32 ``step`` becomes the state's int32 ``count``; torch's parameter indices
(the optimizer's order) become pytree paths.

The modules: :mod:`~crosscheck.convert.layers` (the layer table: which torch
module is which kind, and how each kind's arrays move), :mod:`~crosscheck.convert.matching`
(``layers_of``: where each layer lives in the port, by name, convention, shape and order),
:mod:`~crosscheck.convert.weights`
(state dicts to and from linen and nnx, ``torch_layout``),
:mod:`~crosscheck.convert.optimizer` (AdamW state, also by param group),
:mod:`~crosscheck.convert.checkpoint` (verified checkpoints in both frameworks),
:mod:`~crosscheck.convert.flax_layers` (Flax layers with torch's semantics).
"""

from crosscheck.convert.layers import KINDS, ConversionError, Layer, conv_transpose_padding, parse_path
from crosscheck.convert.matching import Matching, layers_of, match
from crosscheck.convert.optimizer import (jax_optimizer_groups_to_torch, jax_optimizer_to_torch,
                                          load_nnx_optimizer_state, torch_optimizer_groups_to_jax,
                                          torch_optimizer_to_jax)
from crosscheck.convert.trees import Path
from crosscheck.convert.weights import (linen_to_torch, nnx_to_torch, param_names, params_to_flax, params_to_torch,
                                        torch_layout, torch_to_linen, torch_to_nnx)

__all__ = ["KINDS", "ConversionError", "Layer", "Matching", "Path", "match", "parse_path", "conv_transpose_padding", "jax_optimizer_groups_to_torch",
           "jax_optimizer_to_torch", "layers_of", "linen_to_torch", "load_nnx_optimizer_state", "nnx_to_torch",
           "param_names", "params_to_flax", "params_to_torch", "torch_layout", "torch_optimizer_groups_to_jax",
           "torch_optimizer_to_jax", "torch_to_linen", "torch_to_nnx"]
