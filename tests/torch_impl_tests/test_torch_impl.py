"""torch_impl.AdamW against torch.optim.AdamW, path by path, bit for bit; state dicts both ways."""

import copy

import numpy as np
import pytest
import torch

import torch_impl
from crosscheck.trajectory.implementations import Hyper
from helpers import OPTIONS, run_pair

STEPS = 1000
PATHS = ["for-loop", "foreach", "fused"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", OPTIONS)
def test_bitwise_with_torch_path(path, option):
    mismatches = run_pair(f"torch_impl({path})", f"torch.AdamW({path})", Hyper(**OPTIONS[option]), STEPS,
                          check_every=500)
    assert not mismatches, mismatches[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("path", PATHS)
def test_bitwise_other_dtypes(path, dtype):
    assert not run_pair(f"torch_impl({path})", f"torch.AdamW({path})", Hyper(dtype=dtype), 300)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _train(model, optimizer, steps, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_continues_bitwise(direction, amsgrad):
    classes = (torch.optim.AdamW, torch_impl.AdamW)
    first, second = classes if direction == "torch->ours" else classes[::-1]
    model = _model()
    opt = first(model.parameters(), lr=3e-3, amsgrad=amsgrad)
    _train(model, opt, 20)
    saved = copy.deepcopy(opt.state_dict())
    # Continue with the class that wrote the state, and with the other class loading it.
    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = first(model_a.parameters(), lr=3e-3, amsgrad=amsgrad)
    opt_a.load_state_dict(copy.deepcopy(saved))  # load_state_dict keeps the tensors it is given
    opt_b = second(model_b.parameters(), lr=3e-3, amsgrad=amsgrad)
    opt_b.load_state_dict(copy.deepcopy(saved))
    _train(model_a, opt_a, 30, seed=2)
    _train(model_b, opt_b, 30, seed=2)
    assert _same(model_a, model_b)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][name]), (key, name)


def test_lr_tensor_and_scheduler():
    model_a, model_b = _model(), _model()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=torch.tensor(2e-3))
    opt_b = torch_impl.AdamW(model_b.parameters(), lr=torch.tensor(2e-3))
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=40)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=40)
    _train(model_a, opt_a, 40, scheduler=sched_a)
    _train(model_b, opt_b, 40, scheduler=sched_b)
    assert _same(model_a, model_b)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch_impl.AdamW([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3))  # no decay, no step
    assert b not in opt.state
    assert not torch.equal(a, torch.ones(3))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
    ({"lr": float("nan")}, "Invalid learning rate: nan"),
    ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"weight_decay": -0.01}, "Invalid weight_decay value: -0.01"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch_impl.AdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch_impl.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_nan_and_inf_gradients_propagate_like_torch():
    for path in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        a = torch.nn.Parameter(torch.ones(5))
        b = torch.nn.Parameter(torch.ones(5))
        grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
        ours, theirs = torch_impl.AdamW([a], **path), torch.optim.AdamW([b], **path)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        assert np.array_equal(a.detach().numpy(), b.detach().numpy(), equal_nan=True), path
