"""torch_impl.AdamW as a drop-in for torch.optim.AdamW beyond the update rule (issue 11, one test per gap).

Every check runs torch.optim.AdamW beside torch_impl.AdamW on the same input and asks for the same
bits, or the same exception type and message.
"""

import copy

import pytest
import torch

import torch_impl

# A differentiable step runs on non-leaf params (torch's own tests do the same); reading their
# .grad warns, in torch.optim.AdamW as in ours.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

PATHS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
CLASSES = {"torch": torch.optim.AdamW, "ours": torch_impl.AdamW}


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (), (0,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _train(cls, kwargs, steps=5, dtype=torch.float32, params=None, optimizer=None, seed=1, compile_step=False):
    """``steps`` steps on seeded gradients; returns (params, optimizer)."""
    params = _params(dtype) if params is None else params
    optimizer = cls(params, **kwargs) if optimizer is None else optimizer
    step = torch.compile(optimizer.step) if compile_step else optimizer.step
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        step()
    return params, optimizer


def _assert_same_bits(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            x, y = sa[key][name], sb[key][name]
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), (key, name)


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the exception itself is what we compare
        return type(e), str(e)
    return None


def _same_error(make_call):
    """``make_call(cls)`` returns a thunk; both classes must raise the same type and message."""
    theirs, ours = _error(make_call(torch.optim.AdamW)), _error(make_call(torch_impl.AdamW))
    assert theirs is not None, "torch raised nothing: the case does not test an error"
    assert ours == theirs


# 1. differentiable= and capturable=

@pytest.mark.parametrize("path", PATHS)
def test_1_differentiable_and_capturable_false_are_accepted(path):
    kwargs = dict(PATHS[path], differentiable=False, capturable=False, amsgrad=True)
    _assert_same_bits(*_train(torch.optim.AdamW, kwargs), *_train(torch_impl.AdamW, kwargs))


def _multistep(cls, params, grad, state, hyper, steps):
    """torch's ``_multistep_backprop_diff_hyperparams_fn`` (test/optim/test_optim.py): differentiable
    steps, then the meta-loss and everything that requires grad."""
    params = params.clone()
    params.grad = grad
    optimizer = cls([params], differentiable=True, **hyper)
    optimizer.state[params].update({k: v.clone() for k, v in state.items()})
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(x * torch.sum(params), y)
        loss.backward(inputs=(params,), create_graph=True)
        optimizer.step()
        optimizer.zero_grad()
    return (loss, params, *(v for v in optimizer.state[params].values() if v.requires_grad))


def _differentiable_inputs(amsgrad):
    gen = torch.Generator().manual_seed(0)
    rand = lambda: torch.rand(10, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    state = {"step": torch.tensor(10.0, dtype=torch.float64), "exp_avg": rand(), "exp_avg_sq": rand()}
    if amsgrad:
        state["max_exp_avg_sq"] = rand()
    return rand(), rand(), state


# (hyperparameters, steps). amsgrad takes one step: its maximum keeps exp_avg_sq for backward, which
# the next step overwrites in place (torch raises then too, so torch's own tests do one amsgrad step).
HYPER_GRADS = {
    "amsgrad wrt params and state": (lambda: {"lr": 0.9, "amsgrad": True}, 1),
    "lr": (lambda: {"lr": torch.tensor(0.001, dtype=torch.float64, requires_grad=True)}, 2),
    "weight_decay": (lambda: {"weight_decay": torch.tensor(0.999, dtype=torch.float64, requires_grad=True)}, 2),
    "betas": (lambda: {"betas": (torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
                                 torch.tensor(0.999, dtype=torch.float64, requires_grad=True))}, 2),
    "all": (lambda: {"lr": torch.tensor([0.001], dtype=torch.float64, requires_grad=True),
                     "weight_decay": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
                     "betas": (torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
                               torch.tensor(0.99, dtype=torch.float64, requires_grad=True))}, 2),
    "all, amsgrad": (lambda: {"lr": torch.tensor([0.001], dtype=torch.float64, requires_grad=True),
                              "weight_decay": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
                              "betas": (torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
                                        torch.tensor(0.99, dtype=torch.float64, requires_grad=True)),
                              "amsgrad": True}, 1),
}


@pytest.mark.parametrize("case", HYPER_GRADS)
def test_1_differentiable_gradients_equal_torch(case):
    """Autograd through two steps: outputs and gradients wrt params, grad, state, lr, weight decay and
    betas equal torch's bit for bit (the same ops in the same order build the same graph)."""
    results = {}
    for name, cls in CLASSES.items():
        make_hyper, steps = HYPER_GRADS[case]
        hyper = make_hyper()
        params, grad, state = _differentiable_inputs(hyper.get("amsgrad", False))
        outputs = _multistep(cls, params, grad, state, hyper, steps)
        hyper_tensors = [v for v in [hyper.get("lr"), hyper.get("weight_decay"), *hyper.get("betas", ())]
                         if isinstance(v, torch.Tensor)]
        inputs = [params, grad, *(v for v in state.values() if v.requires_grad), *hyper_tensors]
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), inputs, allow_unused=True)
        results[name] = [o.detach() for o in outputs] + [g for g in grads if g is not None]
        assert sum(g is not None for g in grads) >= 2 + len(hyper_tensors)
    assert len(results["torch"]) == len(results["ours"])
    for a, b in zip(results["torch"], results["ours"]):
        assert torch.equal(a, b)


def test_1_differentiable_passes_gradcheck():
    """torch's own check (TestDifferentiableOptimizer.test_adamw): numerical vs analytical Jacobian."""
    params, grad, state = _differentiable_inputs(amsgrad=True)

    def one_step(p, g, *state_values):
        p = p.clone()
        p.grad = g
        optimizer = torch_impl.AdamW([p], lr=0.9, amsgrad=True, differentiable=True)
        optimizer.state[p].update({k: v.clone() for k, v in zip(state, state_values)})
        optimizer.step()
        return (p, *(v for v in optimizer.state[p].values() if v.requires_grad))

    assert torch.autograd.gradcheck(one_step, (params, grad, *state.values()))


@pytest.mark.parametrize("foreach", [False, True])
def test_1_capturable_on_cpu_raises_as_torch(foreach):
    def call(cls):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        return lambda: cls([p], capturable=True, foreach=foreach).step()
    _same_error(call)


@pytest.mark.parametrize("kwargs", [{"fused": True, "differentiable": True},
                                    {"foreach": True, "differentiable": True}], ids=["fused", "foreach"])
def test_1_differentiable_with_fused_or_foreach_raises_as_torch(kwargs):
    def call(cls):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        return lambda: cls([p], **kwargs).step()
    _same_error(call)


# 2. complex params

@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1}])
@pytest.mark.parametrize("path", ["for-loop", "foreach"])
def test_2_complex_params_bitwise_with_torch(path, options):
    def complex_params():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=gen)),
                torch.nn.Parameter(torch.randn(5, generator=gen)),  # real beside complex, as torch's test
                torch.nn.Parameter(torch.randn(2, dtype=torch.complex128, generator=gen))]
    kwargs = dict(PATHS[path], **options)
    theirs = _train(torch.optim.AdamW, kwargs, params=complex_params())
    ours = _train(torch_impl.AdamW, kwargs, params=complex_params())
    _assert_same_bits(*theirs, *ours)
    # And a complex param moves as its real view does (torch's test_complex).
    as_real = [torch.nn.Parameter(torch.view_as_real(p.detach()).clone()) if p.is_complex()
               else torch.nn.Parameter(p.detach().clone()) for p in complex_params()]
    opt = torch_impl.AdamW(as_real, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(as_real, complex_params()):
            g = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype)
            p.grad = torch.view_as_real(g) if g.is_complex() else g
        opt.step()
    for p, q in zip(as_real, ours[0]):
        assert torch.equal(p, torch.view_as_real(q) if q.is_complex() else q)


def test_2_complex_params_with_fused_raise_as_torch():
    def call(cls):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
        p.grad = torch.ones_like(p)
        return lambda: cls([p], fused=True).step()
    _same_error(call)


# 3. constructor checks

CONSTRUCTOR_ERRORS = {
    "tensor lr with foreach": {"lr": torch.tensor(1e-3), "foreach": True},
    "two-element tensor lr": {"lr": torch.tensor([1e-3, 1e-3])},
    "float and tensor betas": {"betas": (0.9, torch.tensor(0.999))},
    "tensor and float betas": {"betas": (torch.tensor(0.9), 0.999)},
    "tensor betas with foreach": {"betas": (torch.tensor(0.9), torch.tensor(0.999)), "foreach": True},
    "two-element tensor beta1": {"betas": (torch.tensor([0.9, 0.9]), torch.tensor(0.999))},
    "fused and foreach": {"fused": True, "foreach": True},
    "fused and differentiable": {"fused": True, "differentiable": True},
    "negative lr": {"lr": -1e-3},
    "nan lr": {"lr": float("nan")},
    "negative eps": {"eps": -1.0},
    "beta1 = 1": {"betas": (1.0, 0.999)},
    "beta2 < 0": {"betas": (0.9, -0.1)},
    "negative weight decay": {"weight_decay": -0.01},
}


@pytest.mark.parametrize("case", CONSTRUCTOR_ERRORS)
def test_3_constructor_errors_as_torch(case):
    _same_error(lambda cls: lambda: cls([torch.nn.Parameter(torch.ones(2))], **CONSTRUCTOR_ERRORS[case]))


def test_3_tensor_lr_is_checked_at_step_too():
    """A tensor lr put into a foreach group after construction (e.g. by a scheduler)."""
    def call(cls):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        opt = cls([p], foreach=True)
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
        return opt.step
    _same_error(call)


# 4. a state dict whose step is a Python float

@pytest.mark.parametrize("path", PATHS)
def test_4_python_float_step_loads_and_continues(path):
    kwargs = dict(PATHS[path], amsgrad=True)
    params, opt = _train(torch.optim.AdamW, kwargs, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = state["step"].item()  # as written by torch < 1.12
    runs = []
    for cls in CLASSES.values():
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = cls(copies, **kwargs)
        optimizer.load_state_dict(copy.deepcopy(saved))
        runs.append(_train(cls, kwargs, steps=3, params=copies, optimizer=optimizer, seed=2))
    _assert_same_bits(*runs[0], *runs[1])


# 5. torch.compile(optimizer.step)

def _compiled_run(cls, kwargs, steps=3):
    torch._dynamo.reset()
    return _train(cls, kwargs, steps=steps, params=_params()[:2], compile_step=True)


def test_5_compiled_fused_step_bitwise_with_torch():
    """Fast: dynamo does not trace into the fused kernel (as for torch's), so little is compiled."""
    kwargs = {"fused": True, "amsgrad": True}
    _assert_same_bits(*_compiled_run(torch.optim.AdamW, kwargs), *_compiled_run(torch_impl.AdamW, kwargs))
    # And compiled equals eager on the fused path (the kernel itself runs).
    _assert_same_bits(*_compiled_run(torch_impl.AdamW, kwargs), *_train(torch_impl.AdamW, kwargs, steps=3,
                                                                        params=_params()[:2]))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["for-loop", "foreach"])
def test_5_compiled_step_as_torch(path):
    """Inductor compiles the for-loop (tens of seconds cold); compiled for-loop equals compiled torch bit for
    bit. The foreach path fails to compile on the CPU in torch 2.13 itself (a CPU tensor step_size list
    under fake tensors); ours fails the same way."""
    def call(cls):
        return lambda: _compiled_run(cls, dict(PATHS[path]))
    theirs, ours = _error(call(torch.optim.AdamW)), _error(call(torch_impl.AdamW))
    assert (theirs is None) == (ours is None)
    if theirs is None:
        _assert_same_bits(*_compiled_run(torch.optim.AdamW, PATHS[path]),
                          *_compiled_run(torch_impl.AdamW, PATHS[path]))
    else:
        assert theirs[0] is ours[0]


# 6. tensor betas on the for-loop path with low-precision params

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", ["for-loop", "fused"])
def test_6_tensor_betas_bitwise_with_torch(path, dtype):
    """torch casts a tensor beta1 to the param's dtype before lerp_ (for bf16, 0.9 -> 0.8984375)."""
    def kwargs():
        return dict(PATHS[path], betas=(torch.tensor(0.9), torch.tensor(0.999)), eps=1e-3)
    _assert_same_bits(*_train(torch.optim.AdamW, kwargs(), steps=20, dtype=dtype),
                      *_train(torch_impl.AdamW, kwargs(), steps=20, dtype=dtype))


# 7. amsgrad positional; an Adam subclass

def test_7_amsgrad_positional_and_adam_subclass():
    ours = torch_impl.AdamW(_params(), 1e-2, (0.9, 0.99), 1e-6, 0.1, True)
    assert isinstance(ours, torch.optim.Adam) and issubclass(torch_impl.AdamW, torch.optim.Adam)
    assert ours.defaults["amsgrad"] is True
    theirs = torch.optim.AdamW(_params(), 1e-2, (0.9, 0.99), 1e-6, 0.1, True)
    _assert_same_bits(*_train(None, {}, params=theirs.param_groups[0]["params"], optimizer=theirs),
                      *_train(None, {}, params=ours.param_groups[0]["params"], optimizer=ours))


# 8. an Adam state dict loads as AdamW

def test_8_adam_state_dict_forces_decoupled_weight_decay():
    params, adam = _train(torch.optim.Adam, {"weight_decay": 0.1, "foreach": False}, steps=3)
    saved = copy.deepcopy(adam.state_dict())
    assert saved["param_groups"][0]["decoupled_weight_decay"] is False
    runs = []
    for cls in CLASSES.values():
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = cls(copies, weight_decay=0.1, foreach=False)
        optimizer.load_state_dict(copy.deepcopy(saved))
        assert optimizer.param_groups[0]["decoupled_weight_decay"] is True
        runs.append(_train(cls, {}, steps=3, params=copies, optimizer=optimizer, seed=2))
    _assert_same_bits(*runs[0], *runs[1])


@pytest.mark.parametrize("path", PATHS)
def test_8_group_set_to_coupled_decay_by_hand_steps_as_torch(path):
    """Loading always decouples; a group edited to decoupled_weight_decay=False gets Adam's L2 decay,
    as in torch.optim.AdamW (whose step is Adam's)."""
    runs = []
    for cls in CLASSES.values():
        optimizer = cls(_params(), weight_decay=0.1, maximize=True, **PATHS[path])
        optimizer.param_groups[0]["decoupled_weight_decay"] = False
        runs.append(_train(cls, {}, params=optimizer.param_groups[0]["params"], optimizer=optimizer))
    _assert_same_bits(*runs[0], *runs[1])


# 9. fused + GradScaler: the kernel unscales and skips inf steps

def _scaled_loop(cls, steps=12, inf_steps=(2, 7)):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = cls(model.parameters(), lr=1e-2, fused=True)
    # 1000 is not a power of two: the kernel's divide by the scale and GradScaler's own
    # multiply by its reciprocal round differently, so the grads (which the kernel writes
    # back unscaled) and the params show who unscaled.
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    scales, scaled_grads = [], []
    for t in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if t in inf_steps:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        scaled_grads.append([p.grad.clone() for p in model.parameters()])
    return list(model.parameters()), optimizer, scales, scaled_grads


def test_9_grad_scaler_hands_unscale_to_the_fused_kernel():
    assert torch_impl.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True)._step_supports_amp_scaling
    theirs, ours = _scaled_loop(torch.optim.AdamW), _scaled_loop(torch_impl.AdamW)
    _assert_same_bits(*theirs[:2], *ours[:2])
    assert theirs[2] == ours[2] and ours[2][2] < ours[2][1]  # the inf steps halved the scale
    for a, b in zip(theirs[3], ours[3]):  # unscaled by the kernel, as torch's: same bits (NaN on inf steps)
        assert all(torch.equal(x, y) or torch.isnan(x).all() and torch.isnan(y).all() for x, y in zip(a, b))
    assert all(s["step"].item() == 10 for s in ours[1].state.values())  # 12 steps, 2 skipped


# 10. error messages for the same errors

def _meta_model():
    with torch.device("meta"):
        return torch.nn.Linear(2, 3)


def test_10_fused_on_meta_message_as_torch():
    def call(cls):
        model = _meta_model()
        opt = cls(model.parameters(), fused=True)
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        return opt.step
    _same_error(call)


def test_10_sparse_grad_message_as_torch():
    def call(cls):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        emb(torch.tensor([1, 2])).sum().backward()
        return cls(emb.parameters()).step
    _same_error(call)


def test_10_integer_param_with_fused_message_as_torch():
    def call(cls):
        p = torch.ones(3, dtype=torch.int64)
        p.grad = torch.ones(3, dtype=torch.int64)
        return cls([p], fused=True).step
    _same_error(call)
