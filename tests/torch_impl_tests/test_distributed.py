"""torch_impl.AdamW under DistributedDataParallel (gloo, 2 CPU processes) and ZeroRedundancyOptimizer.

Both equal the single-process run that averages the two half-batch gradients,
bit for bit: DDP's average of two gradients is (g0 + g1) / 2, exact in the
division by 2 and the same sum in either order.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_impl

import distributed_worker as worker


def _single_process() -> dict[str, torch.Tensor]:
    model = worker.make_model()
    optimizer = torch_impl.AdamW(model.parameters(), fused=True, **worker.HYPER)
    for step in range(worker.STEPS):
        grads = []
        for rank in range(worker.WORLD):
            x, y = worker.shard(step, rank)
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / worker.WORLD
        optimizer.step()
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "zero"])
def test_two_processes_equal_one(mode, tmp_path):
    out = tmp_path / "params.pt"
    done = subprocess.run([sys.executable, str(Path(worker.__file__)), mode, str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = torch.load(out)
    expected = _single_process()
    for name, value in expected.items():
        assert torch.equal(distributed[name], value), name
