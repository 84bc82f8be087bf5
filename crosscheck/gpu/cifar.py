from __future__ import annotations

from pathlib import Path

from crosscheck.common.losses import torch_cross_entropy
from crosscheck.gpu.settings import Clock, Settings, say


def part_cifar10(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    import jax
    import torch
    from flax import nnx

    import jax_impl
    from crosscheck import convert
    from crosscheck.cifar import data as cifar10
    from crosscheck.cifar import models
    from crosscheck.cifar.training import FlaxRun
    from crosscheck.common.metrics import distance

    try:
        data = cifar10.load(settings.data_dir)
    except (cifar10.DataError, ValueError, OSError) as err:
        message = f"no CIFAR-10 data ({err}); pass --data-dir or set ${cifar10.ENV_VAR}"
        say(f"cifar10: skipped: {message}")
        return {"status": "skipped", "why": message}
    device = settings.device
    batch, lr, weight_decay = 32, 1e-3, 1e-2
    max_steps = settings.cifar_steps or 10**9
    torch_model, flax_model = models.simple_cnn_pair(0)
    layers = models.simple_cnn_layers(torch_model)
    names = [n for n, _ in torch_model.named_parameters()]
    # torch_layout matters only for the CPU model (its scalar tail); the CUDA model ignores it.
    layout = nnx.State(convert.torch_layout(torch_model, layers))
    torch_model = torch_model.to(device)
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    flax = FlaxRun("jax_impl.adamw", flax_model, jax_impl.adamw(lr, weight_decay=weight_decay, torch_layout=layout,
                                                                rounding=settings.rounding), layers, names)
    steps, first_mismatch, worst, losses = 0, None, 0, []
    result = {"device": device, "jax_backend": jax.default_backend(), "batch": batch, "lr": lr,
              "weight_decay": weight_decay, "data": data.source, "rounding": str(settings.rounding)}
    partial.update(result)
    epoch = 0
    while not clock.expired() and steps < max_steps and epoch < 2:
        for x, y in cifar10.batches(data.train_images, data.train_labels, batch, seed=0, epoch=epoch):
            if clock.expired() or steps >= max_steps:
                break
            torch_model.train()
            optimizer.zero_grad()
            loss = torch_cross_entropy(torch_model(torch.from_numpy(x).to(device)),
                                              torch.from_numpy(y).to(device))
            loss.backward()
            grads = {n: p.grad.detach().cpu() for n, p in torch_model.named_parameters()}
            optimizer.step()
            flax.step_with(grads)
            steps += 1
            losses.append(loss.item())
            ours = flax.params_torch()
            ulps = max(int(distance(ours[n], p.detach().cpu().numpy()).max_ulps)
                       for n, p in torch_model.named_parameters())
            worst = max(worst, ulps)
            if ulps and first_mismatch is None:
                first_mismatch = steps
            partial.update({"steps": steps, "max_ulps": worst, "first_mismatch_step": first_mismatch})
        epoch += 1
    result.update({"steps": steps, "epochs_started": epoch, "max_ulps": worst, "first_mismatch_step": first_mismatch,
                   "final_loss": losses[-1] if losses else None, "budget_ended_run": clock.expired()})
    result["status"] = "pass" if worst == 0 and steps > 0 else "mismatch"
    return result
