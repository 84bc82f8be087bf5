"""PyTorch's own AdamW test inputs, run against torch_impl.AdamW beside torch.optim.AdamW.

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel) holds the OptimizerInfo that
PyTorch's test/test_optim.py is driven by. Its AdamW entry gives every configuration torch tests (each
with foreach / fused / differentiable switched on in turn) and every error case. Here each configuration
runs step for step in both optimizers on test_optim's model (``_test_derived_optimizers``: a small MLP
plus a 0-d param, a frozen layer and a step without grads), and must give the same bits; each error case
must raise (or warn) with the same type and message. The full upstream run (test/test_optim.py with
torch_impl.AdamW substituted) is described in the README.
"""

import copy
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import torch_impl

# A differentiable step runs on non-leaf params (torch's own tests do the same); reading their
# .grad warns, in torch.optim.AdamW as in ours.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

ADAMW_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.AdamW)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _configs(dtype):
    inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, ADAMW_INFO)
    # The helper adds foreach only where torch has foreach kernels (not the CPU); test_optim's
    # test_foreach_matches_forloop runs it on the CPU anyway (float64), and so does this.
    if dtype in (torch.float32, torch.float64):
        inputs += [type(i)(params=None, kwargs={**copy.deepcopy(i.kwargs), "foreach": True}, desc=i.desc)
                   for i in ADAMW_INFO.optim_inputs_func(device="cpu", dtype=dtype)]
    return [(i.desc, _path(i.kwargs), i.kwargs) for i in inputs]


def _path(kwargs):
    return next((flag for flag in ("foreach", "fused", "differentiable") if kwargs.get(flag)), "for-loop")


CASES = [pytest.param(dtype, kwargs, id=f"{str(dtype)[6:]}-{desc}, {path}")
         for dtype in DTYPES for desc, path, kwargs in _configs(dtype)]


def _run(cls, kwargs, dtype, iterations=7):
    """test_optim's _compare_between: 7 steps; layer 2 frozen at steps 3-4, no backward at step 2."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                torch.nn.Sigmoid()).to(dtype)
    # test_optim's "empty_param" is torch.empty(()) (uninitialized); seeded here so both runs start equal.
    empty_param = torch.rand((), dtype=dtype, requires_grad=True)
    empty_param.grad = torch.rand_like(empty_param)
    params = list(model.parameters()) + [empty_param]
    if kwargs.get("differentiable"):
        # A differentiable step updates its params in place under autograd: not leaves (torch's _diff_fn).
        params = [p.detach().clone().requires_grad_().clone() for p in params]
        for p, q in zip(params, list(model.parameters()) + [empty_param]):
            p.grad = None if q.grad is None else q.grad.clone()
    optimizer = cls(params, **copy.deepcopy(kwargs))
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    history = []
    for i in range(iterations):
        optimizer.zero_grad()
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:
            if kwargs.get("differentiable"):
                for p in params:
                    p.grad = torch.rand_like(p)
            else:
                model(inputs).sum().backward()
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history, optimizer.state_dict()


@pytest.mark.parametrize("dtype, kwargs", CASES)
def test_optim_db_input_bitwise_with_torch(dtype, kwargs):
    torch.manual_seed(0)
    theirs = _run(torch.optim.AdamW, kwargs, dtype)
    torch.manual_seed(0)
    ours = _run(torch_impl.AdamW, kwargs, dtype)
    for step, (a, b) in enumerate(zip(theirs[0], ours[0])):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"params differ after step {step + 1}"
    assert theirs[1]["param_groups"] == ours[1]["param_groups"]
    for key, state in theirs[1]["state"].items():
        for name, value in state.items():
            other = ours[1]["state"][key][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (key, name)


def _outcome(cls, error_input, when):
    """What constructing (and stepping) ``cls`` on the error input does: (kind, type, message)."""
    optim_input = error_input.optimizer_error_input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            optimizer = cls(optim_input.params, **optim_input.kwargs)
            if when == OptimizerErrorEnum.STEP_ERROR:
                optimizer.step()
        except Exception as e:  # noqa: BLE001 - compared below
            return "raise", type(e), str(e)
    relevant = [w for w in caught if issubclass(w.category, error_input.error_type)]
    return ("warn", relevant[0].category, str(relevant[0].message)) if relevant else ("none", None, None)


ERROR_INPUTS = ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("index", range(len(ERROR_INPUTS)),
                         ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_optim_db_error_input_as_torch(index):
    # Fresh inputs for each class: a case may hold params that a first construction would touch.
    theirs_input = ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    ours_input = ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    theirs = _outcome(torch.optim.AdamW, theirs_input, theirs_input.error_on)
    ours = _outcome(torch_impl.AdamW, ours_input, ours_input.error_on)
    assert theirs[0] != "none", "torch neither raised nor warned: the case tests nothing"
    assert ours == theirs
