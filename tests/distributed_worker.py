"""Two gloo processes training a small model with torch_impl.AdamW; run by tests/torch_impl_tests/test_distributed.py.

``python tests/distributed_worker.py MODE OUT``: MODE is ``ddp`` (DistributedDataParallel,
torch_impl.AdamW fused) or ``zero`` (DDP + ZeroRedundancyOptimizer wrapping
torch_impl.AdamW); rank 0 saves the final parameters to OUT.  The process group
is created and destroyed here; spawn joins both ranks before returning.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_impl  # noqa: E402

STEPS = 20
WORLD = 2
HYPER = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 10, generator=gen), torch.randn(16, 3, generator=gen)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    half = x.shape[0] // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def _worker(rank: int, mode: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        if mode == "ddp":
            optimizer = torch_impl.AdamW(ddp.parameters(), fused=True, **HYPER)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch_impl.AdamW, fused=True,
                                                **HYPER)
        for step in range(STEPS):
            x, y = shard(step, rank)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()
        if rank == 0:
            torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, out)
        # Neither rank tears gloo down while the other still talks to it, and DDP's
        # reducer lets go of the group before it is destroyed.
        dist.barrier()
        del ddp, optimizer
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without the C++ destructors of interpreter exit, where
    # gloo's threads still aborted now and then ("terminate called without an active
    # exception", SIGABRT: twice in eleven CI runs, with the barrier above in place).
    os._exit(0)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(mode, str(Path(tmp) / "rendezvous"), out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
