from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crosscheck.gpu.settings import (Clock, Settings, benchmark_module,
                                     free_device_memory, say)


def _transformer_pair(vocab: int, width: int, depth: int, heads: int, seq: int):
    """A small pre-norm transformer language model in torch and in Flax NNX (same shapes; timing only)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.pos = torch.nn.Parameter(torch.zeros(seq, width))
            layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                     norm_first=True, activation="gelu")
            self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, tokens):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
            h = self.blocks(self.embed(tokens) + self.pos, mask=mask, is_causal=True)
            return self.head(self.norm(h))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1, self.norm2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.up, self.down = nnx.Linear(width, 4 * width, rngs=rngs), nnx.Linear(4 * width, width, rngs=rngs)

        def __call__(self, h, mask):
            h = h + self.attention(self.norm1(h), mask=mask)
            return h + self.down(jax.nn.gelu(self.up(self.norm2(h)), approximate=False))

    class FlaxLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.pos = nnx.Param(jnp.zeros((seq, width)))
            self.blocks = nnx.List([Block(rngs) for _ in range(depth)]) if hasattr(nnx, "List") else \
                [Block(rngs) for _ in range(depth)]
            self.norm = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, tokens):
            mask = nnx.make_causal_mask(tokens)
            h = self.embed(tokens) + self.pos[...][None]  # explicit batch axis: no rank promotion
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.norm(h))

    torch.manual_seed(0)
    return TorchLM(), FlaxLM(nnx.Rngs(0))


def part_train_step(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    import jax_impl
    from crosscheck.cifar import models
    step_time = benchmark_module("step_time")
    device = settings.device
    rows, errors = [], []
    partial.update({"rows": rows, "errors": errors})
    small = settings.dry_run
    # (name, batch, torch model, flax model, torch input, flax input, labels, loss kind)
    workloads = []
    for batch in ((8,) if small else (128, 512)):
        workloads.append(("SimpleCNN", batch))
    workloads.append(("transformer", 2 if small else 32))
    for model_name, batch in workloads:
        if clock.expired():
            errors.append({"model": model_name, "batch": batch, "why": "budget"})
            continue
        rng = np.random.default_rng(0)
        if model_name == "SimpleCNN":
            torch_model, flax_model = models.simple_cnn_pair(0)
            x = rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)
            y = rng.integers(0, 10, batch)
            torch_x, flax_x = torch.from_numpy(x).to(device), jnp.asarray(models.nchw_to_nhwc(x))
            torch_y, flax_y = torch.from_numpy(y).to(device), jnp.asarray(y)
        else:
            vocab, width, depth, heads, seq = (64, 32, 2, 2, 16) if small else (8192, 512, 6, 8, 256)
            torch_model, flax_model = _transformer_pair(vocab, width, depth, heads, seq)
            tokens = rng.integers(0, vocab, (batch, seq))
            labels = rng.integers(0, vocab, (batch, seq))
            torch_x, flax_x = torch.from_numpy(tokens).to(device), jnp.asarray(tokens)
            torch_y, flax_y = torch.from_numpy(labels).to(device), jnp.asarray(labels)
        torch_model = torch_model.to(device)
        n_params = sum(p.numel() for p in torch_model.parameters())
        steps: dict[str, Callable[[], None]] = {}
        compile_s: dict[str, float] = {}

        def torch_step_fn(model, optimizer):
            def step():
                optimizer.zero_grad(set_to_none=True)
                logits = model(torch_x)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_y.reshape(-1))
                loss.backward()
                optimizer.step()
                if device == "cuda":
                    torch.cuda.synchronize()
            return step

        fused = True
        eager_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, fused=fused)
        steps["torch eager + AdamW(fused)"] = torch_step_fn(torch_model, eager_opt)
        try:
            if settings.dry_run:
                raise RuntimeError("not tried in a dry run (minutes of CPU compilation)")
            import copy

            compiled_model = copy.deepcopy(torch_model)
            compiled_opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-4, fused=fused)
            compiled_step = torch_step_fn(torch.compile(compiled_model), compiled_opt)
            started = time.perf_counter()
            compiled_step()
            compile_s["torch.compile + AdamW(fused)"] = time.perf_counter() - started
            steps["torch.compile + AdamW(fused)"] = compiled_step
        except Exception as err:  # noqa: BLE001  -- torch.compile needs a compiler toolchain; recorded
            errors.append({"model": model_name, "batch": batch, "what": "torch.compile",
                           "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"})

        graphdef, state = nnx.split(flax_model, nnx.Param)
        params = jax.tree.map(jnp.copy, nnx.as_pure(state)) if hasattr(nnx, "as_pure") else state
        tx = jax_impl.adamw(1e-4)
        holder = {"params": params, "opt": tx.init(params)}

        def loss_fn(p, x, y):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]),
                                                                   y.reshape(-1)).mean()

        def train(p, opt, x, y):
            grads = jax.grad(loss_fn)(p, x, y)
            return jax_impl.apply_exact(tx, grads, opt, p)

        jitted = jax.jit(train, donate_argnums=(0, 1))
        started = time.perf_counter()
        compiled = jitted.lower(holder["params"], holder["opt"], flax_x, flax_y).compile()
        compile_s["Flax (XLA) + jax_impl.adamw"] = time.perf_counter() - started

        def flax_step():
            holder["params"], holder["opt"] = compiled(holder["params"], holder["opt"], flax_x, flax_y)
            jax.block_until_ready(holder["params"])

        steps["Flax (XLA) + jax_impl.adamw"] = flax_step
        say(f"train_step: {model_name}, batch {batch}, {n_params:.2e} params: {', '.join(steps)}")
        times = step_time.interleaved(steps, settings.repeats)
        medians = {k: float(np.median(v)) for k, v in times.items()}
        base = medians["torch eager + AdamW(fused)"]
        for name, t in times.items():
            q1, q3 = np.percentile(t, [25, 75])
            rows.append({"model": model_name, "batch": batch, "params": n_params, "implementation": name,
                         "ms": 1e3 * medians[name], "iqr_ms": 1e3 * float(q3 - q1),
                         "vs_torch_eager": medians[name] / base, "compile_s": compile_s.get(name)})
        del steps, holder, torch_model, flax_model, eager_opt
        gc.collect()
        free_device_memory(settings)
    status = "pass" if not any(e.get("why") == "budget" for e in errors) else "timeout"
    return {"status": status, "rows": rows, "errors": errors}
