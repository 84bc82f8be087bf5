"""Every scheduler configuration of PyTorch's ``test/optim/test_lrscheduler.py``, as a compact table.

Derived by hand from the file of pytorch/pytorch at commit 01f9ef32eae5ef513002dd44902c23cbe6be3aae (the
newest copy the project's source index holds; it has no v2.13.0 tag; the file's TestLRScheduler is
what torch 2.13's test suite runs): one entry per scheduler configuration a test builds, named after the
test, with the optimizer's param groups of that test (``setUp``'s SGD: lr 0.05 and ``torch.tensor(0.5)``,
unless the test sets others), the way it steps (``step()``, ``step(epoch)``, several schedulers on one
optimizer, a checkpoint resume) and its number of steps.  Tests that build the same configuration
share one entry.  Entries ``raises=True`` are the configurations torch refuses: the twin must raise
torch's error type and message.  ``NOT_TWINNED`` lists the tests whose scheduler use has no
one-param-group twin, with the reason.

Each entry gives the torch side (``torch(optimizer) -> (schedulers, rounds[, optimizer])``: ``rounds[t]`` lists the
``(index, epoch)`` calls ``schedulers[index].step(epoch)`` after the t-th ``optimizer.step()``) and the
twin side (``twin(lr, g)``: the ``jax_impl.schedules`` twin of param group ``g`` whose lr is ``lr``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

from jax_impl import schedules as S

T = torch.optim.lr_scheduler
SWALR = torch.optim.swa_utils.SWALR
TENSOR = "tensor"  # a group lr given as torch.tensor(value) (float32)
SETUP = (0.05, (TENSOR, 0.5))  # TestLRScheduler.setUp's two param groups


@dataclass
class Config:
    test: str
    torch: object  # optimizer -> (schedulers, rounds), or raises
    twin: object  # (lr, group index) -> TorchSchedule, or raises
    classes: str = ""
    groups: tuple = SETUP
    optimizer: str = "SGD"
    raises: bool = False
    note: str = ""
    id: str = field(default="")


def each_step(n: int, steps: int):
    return [[(i, None) for i in range(n)] for _ in range(steps)]


def plain(test, make_torch, make_twin, steps=10, classes="", **kw):
    """``scheduler.step()`` (each of several schedulers, in order) after every ``optimizer.step()``."""
    def torch_side(o):
        made = make_torch(o)
        schedulers = list(made) if isinstance(made, (list, tuple)) else [made]
        return schedulers, each_step(len(schedulers), steps)
    return Config(test, torch_side, make_twin, classes, **kw)


def with_epochs(test, make_torch, make_twin, epochs, classes="", **kw):
    """``scheduler.step(epoch)`` for each of ``epochs`` (the deprecated epoch argument, fractional included)."""
    epochs = list(epochs)
    return Config(test, lambda o: ([make_torch(o)], [[(0, e)] for e in epochs]),
                  lambda lr, g: make_twin(lr, g, epochs), classes, **kw)


def refused(test, make_torch, make_twin, classes="", **kw):
    return Config(test, make_torch, make_twin, classes, raises=True, **kw)


def chained_twin(lr, *makers):
    return S.chained_scheduler(lr, [m(lr) for m in makers])


def closed_form(test, make, make_twin, epochs=20, classes=""):
    """_test_against_closed_form: two schedulers built on one optimizer; the second stepped with
    ``step(epoch)`` for epoch in range(epochs), then the first with ``step()`` as many times."""
    rounds = [[(1, e)] for e in range(epochs)] + [[(0, None)]] * epochs
    return Config(test, lambda o: ([make(o), make(o)], rounds),
                  lambda lr, g: S.replay(lr, [make_twin(lr), make_twin(lr)], rounds), classes)


def resumed(test, make_torch, make_twin, steps=10, classes="", **kw):
    """test_lr_scheduler_checkpoint: one step, the optimizer's state into a new optimizer, the scheduler
    rebuilt there with last_epoch=0, then stepped."""
    def torch_side(o):
        first = make_torch(o)
        o.step()
        first.step()
        o2 = type(o)(o.param_groups[0]["params"])
        o2.load_state_dict(o.state_dict())
        second = make_torch(o2, last_epoch=0)
        return [second], each_step(1, steps), o2

    def twin_side(lr, g):
        first = make_twin(lr)
        return make_twin(type(first.lr)(first.table[1]), last_epoch=0, initial_lr=first.param_group_initial_lr)
    return Config(test, torch_side, twin_side, classes, **kw)


class LambdaLRTestObject:  # the test file's callable object
    def __init__(self, value):
        self.value = value

    def __call__(self, epoch):
        return self.value * epoch


def _zero_arg():
    return 0.95


def scale_half(_):
    return 0.5


L = dict(  # lambdas shared by the torch side and the twin side
    one=lambda epoch: 1.0, e10=lambda e: e // 10, e30=lambda epoch: epoch // 30, x=lambda x: x,
    p9=lambda x1: 0.9 ** x1, p8=lambda x2: 0.8 ** x2, m9=lambda x1: 0.9, m8=lambda x2: 0.8,
    m95=lambda epoch: 0.95,
)

CONFIGS: list[Config] = []
add = CONFIGS.append

# ----------------------------------------------------------------- single schedulers, step()
add(plain("test_no_cyclic_references[_in_step]", lambda o: T.LambdaLR(o, L["one"]),
          lambda lr, g: S.lambda_lr(lr, L["one"]), classes="LambdaLR", groups=(0.5,)))
add(plain("test_old/new_pattern_*", lambda o: T.StepLR(o, gamma=0.1, step_size=3),
          lambda lr, g: S.step_lr(lr, gamma=0.1, step_size=3), steps=35, classes="StepLR"))
add(plain("test_step_lr", lambda o: T.StepLR(o, gamma=0.1, step_size=3),
          lambda lr, g: S.step_lr(lr, gamma=0.1, step_size=3), classes="StepLR"))
add(plain("test_get_last_lr_step_lr", lambda o: T.StepLR(o, 3, gamma=0.1),
          lambda lr, g: S.step_lr(lr, 3, gamma=0.1), classes="StepLR", groups=(0.1,)))
add(plain("test_[get_last_lr_]multi_step_lr", lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
          lambda lr, g: S.multi_step_lr(lr, gamma=0.1, milestones=[2, 5, 9]), classes="MultiStepLR"))
add(plain("test_[get_last_lr_]constantlr", lambda o: T.ConstantLR(o, factor=1.0 / 2, total_iters=5),
          lambda lr, g: S.constant_lr(lr, factor=1.0 / 2, total_iters=5), classes="ConstantLR"))
add(plain("test_get_last_lr_linearlr", lambda o: T.LinearLR(o, start_factor=1.0 / 4, end_factor=3.0 / 5, total_iters=4),
          lambda lr, g: S.linear_lr(lr, start_factor=1.0 / 4, end_factor=3.0 / 5, total_iters=4), classes="LinearLR"))
add(plain("test_linearlr", lambda o: T.LinearLR(o, start_factor=1.0 / 2, total_iters=4),
          lambda lr, g: S.linear_lr(lr, start_factor=1.0 / 2, total_iters=4), classes="LinearLR"))
add(plain("test_exp_lr", lambda o: T.ExponentialLR(o, gamma=0.9),
          lambda lr, g: S.exponential_lr(lr, gamma=0.9), classes="ExponentialLR"))
add(plain("test_poly_lr", lambda o: T.PolynomialLR(o, power=0.9, total_iters=5),
          lambda lr, g: S.polynomial_lr(lr, power=0.9, total_iters=5), classes="PolynomialLR"))
add(plain("test_cos_anneal_lr", lambda o: T.CosineAnnealingLR(o, T_max=10, eta_min=1e-10),
          lambda lr, g: S.cosine_annealing_lr(lr, T_max=10, eta_min=1e-10), classes="CosineAnnealingLR"))
add(plain("test_lambda_lr", lambda o: T.LambdaLR(o, lr_lambda=[L["p9"], L["p8"]]),
          lambda lr, g: S.lambda_lr(lr, lr_lambda=[L["p9"], L["p8"]][g]), classes="LambdaLR", groups=(0.05, 0.4)))
add(plain("test_multiplicative_lr", lambda o: T.MultiplicativeLR(o, lr_lambda=[L["m9"], L["m8"]]),
          lambda lr, g: S.multiplicative_lr(lr, lr_lambda=[L["m9"], L["m8"]][g]), classes="MultiplicativeLR",
          groups=(0.05, 0.4)))
for T_mult in (1, 2, 4):
    add(plain(f"test_CosineAnnealingWarmRestarts_lr1[T_mult={T_mult}]",
              partial(lambda o, m: T.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=m, eta_min=1e-10), m=T_mult),
              partial(lambda lr, g, m: S.cosine_annealing_warm_restarts(lr, T_0=10, T_mult=m, eta_min=1e-10),
                      m=T_mult), steps=99, classes="CosineAnnealingWarmRestarts"))

# ----------------------------------------------------------------- step(epoch), fractional epochs
for name, make, twin in [
        ("StepLR", lambda o: T.StepLR(o, 2), lambda lr, g, e: S.step_lr(lr, 2, step_epochs=e)),
        ("ExponentialLR", lambda o: T.ExponentialLR(o, gamma=0.9),
         lambda lr, g, e: S.exponential_lr(lr, gamma=0.9, step_epochs=e)),
        ("ConstantLR", lambda o: T.ConstantLR(o), lambda lr, g, e: S.constant_lr(lr, step_epochs=e)),
        ("LinearLR", lambda o: T.LinearLR(o), lambda lr, g, e: S.linear_lr(lr, step_epochs=e)),
        ("PolynomialLR", lambda o: T.PolynomialLR(o, power=0.9), lambda lr, g, e: S.polynomial_lr(lr, power=0.9,
                                                                                                  step_epochs=e))]:
    add(with_epochs(f"test_{name}_is_constant_for_constant_epoch", make, twin, [2] * 10, classes=name))
add(with_epochs("test_multi_step_lr_with_epoch", lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                lambda lr, g, e: S.multi_step_lr(lr, gamma=0.1, milestones=[2, 5, 9], step_epochs=e), range(10),
                classes="MultiStepLR"))
add(with_epochs("test_constantlr_with_epoch", lambda o: T.ConstantLR(o, factor=1.0 / 2, total_iters=5),
                lambda lr, g, e: S.constant_lr(lr, factor=1.0 / 2, total_iters=5, step_epochs=e), range(10),
                classes="ConstantLR"))
add(with_epochs("test_linearlr_with_epoch", lambda o: T.LinearLR(o, start_factor=1.0 / 2, total_iters=4),
                lambda lr, g, e: S.linear_lr(lr, start_factor=1.0 / 2, total_iters=4, step_epochs=e), range(10),
                classes="LinearLR"))
for T_mult in (1, 2, 4):
    epochs = [round(e.item(), 1) for e in torch.arange(0, 30, 0.1)]  # _test_CosineAnnealingWarmRestarts
    add(with_epochs(f"test_CosineAnnealingWarmRestarts_lr2[T_mult={T_mult}]",
                    partial(lambda o, m: T.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=m, eta_min=1e-10), m=T_mult),
                    partial(lambda lr, g, e, m: S.cosine_annealing_warm_restarts(lr, T_0=10, T_mult=m, eta_min=1e-10,
                                                                                 step_epochs=e), m=T_mult),
                    epochs, classes="CosineAnnealingWarmRestarts"))
for T_mult, epochs in zip((1, 2, 3), ([0, 1, 2, 3, 4, 5, 12, 27, 3, 4, 5, 6, 13],
                                      [0, 1, 2, 3, 4, 5, 25, 32, 33, 34, 80, 81, 3],
                                      [0, 0.1, 0.2, 0.3, 1.3, 2.3, 17.5, 18.5, 19.5, 29.5, 30.5, 31.5, 50])):
    add(with_epochs(f"test_CosineAnnealingWarmRestarts_lr3[T_mult={T_mult}]",
                    partial(lambda o, m: T.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=m, eta_min=1e-10), m=T_mult),
                    partial(lambda lr, g, e, m: S.cosine_annealing_warm_restarts(lr, T_0=10, T_mult=m, eta_min=1e-10,
                                                                                 step_epochs=e), m=T_mult),
                    epochs, classes="CosineAnnealingWarmRestarts"))

# ----------------------------------------------------------------- two schedulers on one optimizer, closed form
add(closed_form("test_closed_form_step_lr", lambda o: T.StepLR(o, gamma=0.1, step_size=3),
                lambda lr: S.step_lr(lr, gamma=0.1, step_size=3), classes="StepLR"))
add(closed_form("test_closed_form_linearlr", lambda o: T.LinearLR(o, start_factor=1.0 / 3, end_factor=0.7,
                                                                  total_iters=4),
                lambda lr: S.linear_lr(lr, start_factor=1.0 / 3, end_factor=0.7, total_iters=4), classes="LinearLR"))
add(closed_form("test_closed_form_constantlr", lambda o: T.ConstantLR(o, factor=1.0 / 3, total_iters=4),
                lambda lr: S.constant_lr(lr, factor=1.0 / 3, total_iters=4), classes="ConstantLR"))
add(closed_form("test_closed_form_multi_step_lr", lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                lambda lr: S.multi_step_lr(lr, gamma=0.1, milestones=[2, 5, 9]), classes="MultiStepLR"))
add(closed_form("test_closed_form_exp_lr", lambda o: T.ExponentialLR(o, gamma=0.9),
                lambda lr: S.exponential_lr(lr, gamma=0.9), classes="ExponentialLR"))
add(closed_form("test_closed_form_poly_lr", lambda o: T.PolynomialLR(o, power=0.9),
                lambda lr: S.polynomial_lr(lr, power=0.9), classes="PolynomialLR"))
add(closed_form("test_closed_form_cos_anneal_lr", lambda o: T.CosineAnnealingLR(o, T_max=5, eta_min=1e-10),
                lambda lr: S.cosine_annealing_lr(lr, T_max=5, eta_min=1e-10), classes="CosineAnnealingLR"))

# ----------------------------------------------------------------- resuming (last_epoch)
def _continue_torch(o):
    first = T.CosineAnnealingLR(o, T_max=5, eta_min=0.1)
    o.step()
    first.step()
    return [T.CosineAnnealingLR(o, T_max=5, eta_min=0.1, last_epoch=0)], each_step(1, 10)


def _continue_twin(lr, g):
    first = S.cosine_annealing_lr(lr, T_max=5, eta_min=0.1)
    return S.cosine_annealing_lr(type(first.lr)(first.table[1]), T_max=5, eta_min=0.1, last_epoch=0,
                                 initial_lr=first.param_group_initial_lr)


add(Config("test_cos_anneal_lr_continue", _continue_torch, _continue_twin, "CosineAnnealingLR"))


def _resuming_torch(o):
    for group in o.param_groups:
        group["initial_lr"] = 0.01
    return [T.StepLR(o, gamma=0.1, step_size=3, last_epoch=10)], each_step(1, 35)


add(Config("test_old_pattern_warning_resuming[_with_arg]", _resuming_torch,
           lambda lr, g: S.step_lr(lr, gamma=0.1, step_size=3, last_epoch=10, initial_lr=0.01), "StepLR"))
add(refused("test_raise_error_when_last_epoch_is_greater_than_0_and_initial_lr_is_not_specified",
            lambda o: T.StepLR(o, step_size=3, gamma=0.1, last_epoch=1),
            lambda lr, g: S.step_lr(lr, step_size=3, gamma=0.1, last_epoch=1), "StepLR", groups=(0.1,)))
for name, make, twin in [
        ("ExponentialLR", lambda o, **k: T.ExponentialLR(o, gamma=0.999, **k),
         lambda lr, **k: S.exponential_lr(lr, gamma=0.999, **k)),
        ("LambdaLR", lambda o, **k: T.LambdaLR(o, lr_lambda=L["e30"], **k),
         lambda lr, **k: S.lambda_lr(lr, lr_lambda=L["e30"], **k)),
        ("MultiplicativeLR", lambda o, **k: T.MultiplicativeLR(o, lr_lambda=L["m95"], **k),
         lambda lr, **k: S.multiplicative_lr(lr, lr_lambda=L["m95"], **k)),
        ("StepLR", lambda o, **k: T.StepLR(o, step_size=30, **k), lambda lr, **k: S.step_lr(lr, step_size=30, **k)),
        ("MultiStepLR", lambda o, **k: T.MultiStepLR(o, milestones=[30, 80], **k),
         lambda lr, **k: S.multi_step_lr(lr, milestones=[30, 80], **k)),
        ("ConstantLR", lambda o, **k: T.ConstantLR(o, **k), lambda lr, **k: S.constant_lr(lr, **k)),
        ("LinearLR", lambda o, **k: T.LinearLR(o, **k), lambda lr, **k: S.linear_lr(lr, **k)),
        ("PolynomialLR", lambda o, **k: T.PolynomialLR(o, **k), lambda lr, **k: S.polynomial_lr(lr, **k)),
        ("CosineAnnealingLR", lambda o, **k: T.CosineAnnealingLR(o, T_max=10, **k),
         lambda lr, **k: S.cosine_annealing_lr(lr, T_max=10, **k)),
        ("CosineAnnealingWarmRestarts", lambda o, **k: T.CosineAnnealingWarmRestarts(o, T_0=20, **k),
         lambda lr, **k: S.cosine_annealing_warm_restarts(lr, T_0=20, **k)),
        ("CyclicLR", lambda o, **k: T.CyclicLR(o, base_lr=0.01, max_lr=0.1, **k),
         lambda lr, **k: S.cyclic_lr(lr, base_lr=0.01, max_lr=0.1, **k)),
        ("OneCycleLR", lambda o, **k: T.OneCycleLR(o, max_lr=0.01, total_steps=10, **k),
         lambda lr, **k: S.one_cycle_lr(max_lr=0.01, total_steps=10, lr=lr, **k)),
        ("SWALR", lambda o, **k: SWALR(o, swa_lr=0.01, **k), lambda lr, **k: S.swalr(lr, swa_lr=0.01, **k))]:
    add(resumed(f"test_lr_scheduler_checkpoint[{name}]", make, twin, steps=9 if name == "OneCycleLR" else 10,
                classes=name, groups=(0.001,), optimizer="AdamW"))

# ----------------------------------------------------------------- tensor lr, step(epoch) (test_constant_initial_*)
for name, make, twin in [
        ("LambdaLR", lambda o: T.LambdaLR(o, lr_lambda=L["e10"]), lambda lr, g, e: S.lambda_lr(lr, L["e10"],
                                                                                               step_epochs=e)),
        ("MultiplicativeLR", lambda o: T.MultiplicativeLR(o, lr_lambda=L["m95"]),
         lambda lr, g, e: S.multiplicative_lr(lr, L["m95"], step_epochs=e)),
        ("StepLR", lambda o: T.StepLR(o, step_size=30), lambda lr, g, e: S.step_lr(lr, 30, step_epochs=e)),
        ("MultiStepLR", lambda o: T.MultiStepLR(o, milestones=[30, 80]),
         lambda lr, g, e: S.multi_step_lr(lr, [30, 80], step_epochs=e)),
        ("ConstantLR", lambda o: T.ConstantLR(o), lambda lr, g, e: S.constant_lr(lr, step_epochs=e)),
        ("LinearLR", lambda o: T.LinearLR(o), lambda lr, g, e: S.linear_lr(lr, step_epochs=e)),
        ("ExponentialLR", lambda o: T.ExponentialLR(o, gamma=0.9), lambda lr, g, e: S.exponential_lr(lr, 0.9,
                                                                                                     step_epochs=e)),
        ("PolynomialLR", lambda o: T.PolynomialLR(o), lambda lr, g, e: S.polynomial_lr(lr, step_epochs=e)),
        ("CosineAnnealingLR", lambda o: T.CosineAnnealingLR(o, T_max=10),
         lambda lr, g, e: S.cosine_annealing_lr(lr, 10, step_epochs=e)),
        ("CosineAnnealingWarmRestarts", lambda o: T.CosineAnnealingWarmRestarts(o, T_0=20),
         lambda lr, g, e: S.cosine_annealing_warm_restarts(lr, 20, step_epochs=e))]:
    add(with_epochs(f"test_constant_initial_lr[{name}]", make, twin, [0, 1], classes=name, groups=((TENSOR, 0.1),),
                    note="without the test's lr.multiply_(0.1) between steps (a change from outside the scheduler)"))
add(with_epochs("test_constant_initial_params_cyclelr",
                lambda o: T.CyclicLR(o, base_lr=torch.tensor(0.1), max_lr=torch.tensor(0.2),
                                     base_momentum=torch.tensor(0.8), max_momentum=torch.tensor(0.9)),
                lambda lr, g, e: S.cyclic_lr(lr, base_lr=torch.tensor(0.1), max_lr=torch.tensor(0.2), step_epochs=e),
                [0, 1], classes="CyclicLR", groups=((TENSOR, 0.1),), note="without the tests' multiply_(0.5)"))
add(with_epochs("test_constant_initial_params_onecyclelr",
                lambda o: T.OneCycleLR(o, max_lr=torch.tensor(0.1), total_steps=10, base_momentum=torch.tensor(0.85),
                                       max_momentum=torch.tensor(0.95)),
                lambda lr, g, e: S.one_cycle_lr(torch.tensor(0.1), total_steps=10, lr=lr, step_epochs=e),
                [0, 1], classes="OneCycleLR", groups=((TENSOR, 0.1),), note="without the tests' multiply_(0.5)"))
add(plain("test_constant_initial_params_swalr", lambda o: SWALR(o, swa_lr=torch.tensor(0.05)),
          lambda lr, g: S.swalr(lr, swa_lr=torch.tensor(0.05)), steps=2, classes="SWALR", groups=((TENSOR, 0.1),),
          note="without the tests' multiply_(0.5)"))

# ----------------------------------------------------------------- SequentialLR
add(plain("test_sequentiallr1", lambda o: T.SequentialLR(o, [T.ExponentialLR(o, gamma=0.8), T.StepLR(o, gamma=0.1,
                                                                                                     step_size=4)], [3]),
          lambda lr, g: S.sequential_lr(lr, [S.exponential_lr(lr, 0.8), S.step_lr(lr, 4, 0.1)], [3]), steps=19,
          classes="SequentialLR"))
add(plain("test_sequentiallr2", lambda o: T.SequentialLR(o, [T.ConstantLR(o, factor=0.1, total_iters=3),
                                                             T.ExponentialLR(o, gamma=0.9)], [3]),
          lambda lr, g: S.sequential_lr(lr, [S.constant_lr(lr, 0.1, 3), S.exponential_lr(lr, 0.9)], [3]), steps=13,
          classes="SequentialLR"))
add(plain("test_[get_last_lr_]sequentiallr[3]",
          lambda o: T.SequentialLR(o, [T.ConstantLR(o, factor=0.1, total_iters=3), T.ExponentialLR(o, gamma=0.8),
                                       T.StepLR(o, gamma=0.1, step_size=2)], [3, 6]),
          lambda lr, g: S.sequential_lr(lr, [S.constant_lr(lr, 0.1, 3), S.exponential_lr(lr, 0.8),
                                             S.step_lr(lr, 2, 0.1)], [3, 6]), steps=12, classes="SequentialLR"))
add(plain("test_sequentiallr4", lambda o: T.SequentialLR(o, [T.ConstantLR(o, factor=1), T.ConstantLR(o, factor=0.1)],
                                                         milestones=[10]),
          lambda lr, g: S.sequential_lr(lr, [S.constant_lr(lr, factor=1), S.constant_lr(lr, factor=0.1)], [10]),
          steps=20, classes="SequentialLR", groups=(0.1,)))


def _sequential5_torch(o):
    const_sched = T.ConstantLR(optimizer=o, factor=0.1, total_iters=5)
    lin_sched = T.LinearLR(optimizer=o, start_factor=0.1, total_iters=5)
    chained = T.ChainedScheduler([lin_sched, const_sched])
    const_sched2 = T.ConstantLR(optimizer=o, factor=0.5, total_iters=5)
    return [T.SequentialLR(o, schedulers=[chained, const_sched2], milestones=[5])], each_step(1, 10)


add(Config("test_sequentiallr5", _sequential5_torch,
           lambda lr, g: S.sequential_lr(lr, [S.chained_scheduler(lr, [S.linear_lr(lr, 0.1, total_iters=5),
                                                                        S.constant_lr(lr, 0.1, 5)]),
                                              S.constant_lr(lr, 0.5, 5)], [5]), "SequentialLR+ChainedScheduler",
           note="torch builds the ConstantLR before the LinearLR it chains after it; SequentialLR's reset makes "
                "the order moot"))
add(plain("test_sequentiallr_no_warnings",
          lambda o: T.SequentialLR(o, [T.LinearLR(o, start_factor=0.5, end_factor=0.1, total_iters=5),
                                       T.ExponentialLR(o, gamma=0.9)], [5]),
          lambda lr, g: S.sequential_lr(lr, [S.linear_lr(lr, 0.5, 0.1, 5), S.exponential_lr(lr, 0.9)], [5]),
          classes="SequentialLR"))
add(plain("test_sequentiallr_does_not_alias_lr_and_initial_lr",
          lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 0.8, total_iters=4), T.LinearLR(o, 0.8, 0.1,
                                                                                          total_iters=4)], milestones=[4]),
          lambda lr, g: S.sequential_lr(lr, [S.linear_lr(lr, 0.1, 0.8, 4), S.linear_lr(lr, 0.8, 0.1, 4)], [4]),
          steps=8, classes="SequentialLR", groups=((TENSOR, 2.0),)))

# ----------------------------------------------------------------- ChainedScheduler, schedulers stepping one optimizer
add(plain("test_chained_lr1", lambda o: T.ChainedScheduler([T.StepLR(o, gamma=0.1, step_size=3)]),
          lambda lr, g: chained_twin(lr, lambda lr: S.step_lr(lr, 3, 0.1)), classes="ChainedScheduler"))
add(plain("test_chained_lr2", lambda o: T.ChainedScheduler([T.LinearLR(o, start_factor=0.4, total_iters=3)]),
          lambda lr, g: chained_twin(lr, lambda lr: S.linear_lr(lr, 0.4, total_iters=3)), classes="ChainedScheduler"))
add(plain("test_chained_lr3[_get_last_lr_before_step]",
          lambda o: T.ChainedScheduler([T.LinearLR(o, start_factor=0.4, total_iters=3), T.MultiStepLR(o,
                                                                                                      milestones=[4,
                                                                                                                  8, 10], gamma=0.1)]),
          lambda lr, g: chained_twin(lr, lambda lr: S.linear_lr(lr, 0.4, total_iters=3),
                                     lambda lr: S.multi_step_lr(lr, [4, 8, 10], 0.1)), classes="ChainedScheduler"))
add(plain("test_chained_lr4",
          lambda o: T.ChainedScheduler([T.ExponentialLR(o, gamma=0.9), T.ConstantLR(o, factor=0.2, total_iters=4),
                                        T.StepLR(o, gamma=0.1, step_size=3)]),
          lambda lr, g: chained_twin(lr, lambda lr: S.exponential_lr(lr, 0.9), lambda lr: S.constant_lr(lr, 0.2, 4),
                                     lambda lr: S.step_lr(lr, 3, 0.1)), steps=9, classes="ChainedScheduler"))
add(plain("test_chained_lr5",
          lambda o: T.ChainedScheduler([T.PolynomialLR(o, power=0.9, total_iters=5), T.ConstantLR(o, factor=0.1)]),
          lambda lr, g: chained_twin(lr, lambda lr: S.polynomial_lr(lr, 5, 0.9), lambda lr: S.constant_lr(lr, 0.1)),
          classes="ChainedScheduler"))
COMPOUND = {
    "step_and_multistep": (lambda o: T.StepLR(o, gamma=0.1, step_size=3), lambda lr: S.step_lr(lr, 3, 0.1),
                           lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                           lambda lr: S.multi_step_lr(lr, [2, 5, 9], 0.1)),
    "step_and_exp": (lambda o: T.StepLR(o, gamma=0.1, step_size=3), lambda lr: S.step_lr(lr, 3, 0.1),
                     lambda o: T.ExponentialLR(o, gamma=0.9), lambda lr: S.exponential_lr(lr, 0.9)),
    "exp_and_multistep": (lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                          lambda lr: S.multi_step_lr(lr, [2, 5, 9], 0.1),
                          lambda o: T.ExponentialLR(o, gamma=0.9), lambda lr: S.exponential_lr(lr, 0.9)),
    "exp_and_linearlr": (lambda o: T.LinearLR(o, start_factor=0.4, end_factor=0.9, total_iters=4),
                         lambda lr: S.linear_lr(lr, 0.4, 0.9, 4),
                         lambda o: T.ExponentialLR(o, gamma=0.9), lambda lr: S.exponential_lr(lr, 0.9)),
    "step_and_constantlr": (lambda o: T.StepLR(o, gamma=0.1, step_size=3), lambda lr: S.step_lr(lr, 3, 0.1),
                            lambda o: T.ConstantLR(o, factor=0.4, total_iters=4), lambda lr: S.constant_lr(lr, 0.4, 4)),
    "linearlr_and_multistep": (lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                               lambda lr: S.multi_step_lr(lr, [2, 5, 9], 0.1),
                               lambda o: T.LinearLR(o, start_factor=0.4, total_iters=4),
                               lambda lr: S.linear_lr(lr, 0.4, total_iters=4)),
    "cosanneal_and_step": (lambda o: T.CosineAnnealingLR(o, T_max=10, eta_min=1e-10),
                           lambda lr: S.cosine_annealing_lr(lr, 10, 1e-10),
                           lambda o: T.StepLR(o, gamma=0.1, step_size=3), lambda lr: S.step_lr(lr, 3, 0.1)),
    "cosanneal_and_multistep": (lambda o: T.CosineAnnealingLR(o, T_max=10, eta_min=1e-10),
                                lambda lr: S.cosine_annealing_lr(lr, 10, 1e-10),
                                lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9]),
                                lambda lr: S.multi_step_lr(lr, [2, 5, 9], 0.1)),
    "cosanneal_and_linearlr": (lambda o: T.LinearLR(o, start_factor=0.4, total_iters=4),
                               lambda lr: S.linear_lr(lr, 0.4, total_iters=4),
                               lambda o: T.CosineAnnealingLR(o, T_max=10, eta_min=1e-10),
                               lambda lr: S.cosine_annealing_lr(lr, 10, 1e-10)),
    "cosanneal_and_exp": (lambda o: T.CosineAnnealingLR(o, T_max=10, eta_min=1e-10),
                          lambda lr: S.cosine_annealing_lr(lr, 10, 1e-10),
                          lambda o: T.ExponentialLR(o, gamma=0.1), lambda lr: S.exponential_lr(lr, 0.1)),
}
for name, (t0, j0, t1, j1) in COMPOUND.items():
    add(plain(f"test_compound_{name}[_lr]", lambda o, t0=t0, t1=t1: [t0(o), t1(o)],
              lambda lr, g, j0=j0, j1=j1: chained_twin(lr, j0, j1), classes="two schedulers, one optimizer"))

# ----------------------------------------------------------------- CyclicLR
CYCLIC = [
    ("test_cycle_lr_triangular_mode_one_lr", dict(base_lr=1, max_lr=5, step_size_up=4, cycle_momentum=True,
                                                  base_momentum=1, max_momentum=5, mode="triangular"), 11),
    ("test_cycle_lr_triangular_mode_one_lr_no_momentum", dict(base_lr=1, max_lr=5, step_size_up=4,
                                                              cycle_momentum=False, mode="triangular"), 11),
    ("test_cycle_lr_triangular2_mode_one_lr", dict(base_lr=1, max_lr=5, step_size_up=4, cycle_momentum=True,
                                                   base_momentum=1, max_momentum=5, mode="triangular2"), 22),
    ("test_cycle_lr_exp_range_mode_one_lr", dict(base_lr=1, max_lr=5, step_size_up=4, cycle_momentum=True,
                                                 base_momentum=1, max_momentum=5, mode="exp_range", gamma=0.9), 13),
    ("test_cycle_lr_triangular_mode", dict(base_lr=[1, 2], max_lr=[5, 6], step_size_up=4, cycle_momentum=True,
                                           base_momentum=[1, 2], max_momentum=[5, 6], mode="triangular"), 11),
    ("test_cycle_lr_triangular2_mode", dict(base_lr=[1, 3], max_lr=[5, 7], step_size_up=4, cycle_momentum=True,
                                            base_momentum=[1, 3], max_momentum=[5, 7], mode="triangular2"), 22),
    ("test_cycle_lr_exp_range_mode", dict(base_lr=[1, 5], max_lr=[5, 12], step_size_up=4, cycle_momentum=True,
                                          base_momentum=[1, 5], max_momentum=[5, 12], mode="exp_range", gamma=0.9), 13),
    ("test_cycle_lr_triangular_mode_step_size_up_down", dict(base_lr=1, max_lr=5, step_size_up=4, step_size_down=6,
                                                             cycle_momentum=True, base_momentum=1, max_momentum=5,
                                                             mode="triangular"), 11),
    ("test_cycle_lr_triangular2_mode_step_size_up_down", dict(base_lr=[1, 3], max_lr=[5, 7], step_size_up=2,
                                                              step_size_down=6, cycle_momentum=True,
                                                              base_momentum=[1, 3], max_momentum=[5, 7],
                                                              mode="triangular2"), 24),
    ("test_cycle_lr_exp_range_mode_step_size_up_down", dict(base_lr=1, max_lr=5, step_size_up=2, step_size_down=6,
                                                            cycle_momentum=True, base_momentum=1, max_momentum=5,
                                                            mode="exp_range", gamma=0.9), 13),
]


def _per_group(kwargs, g):
    return {k: (v[g] if isinstance(v, list) else v) for k, v in kwargs.items()}


for name, kwargs, steps in CYCLIC:
    add(plain(name, lambda o, k=kwargs: T.CyclicLR(o, **k), lambda lr, g, k=kwargs: S.cyclic_lr(lr, **_per_group(k, g)),
              steps=steps, classes="CyclicLR"))
add(plain("test_cycle_lr_with_momentumless_optimizer",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, step_size_up=4, cycle_momentum=False, mode="triangular"),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, step_size_up=4, cycle_momentum=False, mode="triangular"),
          steps=11, classes="CyclicLR", groups=(0.05, 0.5), optimizer="Adam"))
add(plain("test_cycle_lr_cycle_momentum_with_beta1_optimizer[_state_dict_picklable]",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, cycle_momentum=True),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, cycle_momentum=True), classes="CyclicLR",
          groups=(0.001,), optimizer="Adam"))
add(plain("test_cycle_lr_removed_after_out_of_scope[_state_dict_picklable built-in]",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, cycle_momentum=False),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, cycle_momentum=False), classes="CyclicLR",
          groups=(0.001,), optimizer="Adam"))


class ScaleFn:  # test_cycle_lr_state_dict_picklable's callable class
    def __init__(self) -> None:
        self.x = 0.5

    def __call__(self, _):
        return self.x


add(plain("test_cycle_lr_state_dict_picklable[ScaleFn object]",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, cycle_momentum=False, scale_fn=ScaleFn()),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, cycle_momentum=False, scale_fn=ScaleFn()),
          steps=4500, classes="CyclicLR", groups=(0.001,), optimizer="Adam"))
add(plain("test_cycle_lr_state_dict_picklable[scale_fn]",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, cycle_momentum=False, scale_fn=scale_half),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, cycle_momentum=False, scale_fn=scale_half),
          steps=4500, classes="CyclicLR", groups=(0.001,), optimizer="Adam"))
add(plain("test_cycle_lr_scale_fn_restored_from_state_dict[triangular2]",
          lambda o: T.CyclicLR(o, base_lr=1, max_lr=5, cycle_momentum=False, mode="triangular2"),
          lambda lr, g: S.cyclic_lr(lr, base_lr=1, max_lr=5, cycle_momentum=False, mode="triangular2"),
          steps=9000, classes="CyclicLR", groups=(0.001,), optimizer="Adam"))
add(plain("test_cosine_then_cyclic[cyclic]",
          lambda o: T.CyclicLR(o, base_lr=0.1, max_lr=0.3, step_size_up=1, step_size_down=3),
          lambda lr, g: S.cyclic_lr(lr, base_lr=0.1, max_lr=0.3, step_size_up=1, step_size_down=3), steps=40,
          classes="CyclicLR", groups=(0.5,)))


def _cosine_then_cyclic_torch(o):
    cosine = T.CosineAnnealingLR(o, T_max=20, eta_min=0.1)
    cyclic = T.CyclicLR(o, base_lr=0.1, max_lr=0.3, step_size_up=1, step_size_down=3)
    return [cosine, cyclic], [[(0, None)] if i <= 20 else [(1, None)] for i in range(40)]


add(Config("test_cosine_then_cyclic", _cosine_then_cyclic_torch,
           lambda lr, g: S.replay(lr, [S.cosine_annealing_lr(lr, 20, 0.1),
                                       S.cyclic_lr(lr, base_lr=0.1, max_lr=0.3, step_size_up=1, step_size_down=3)],
                                  [[(0, None)] if i <= 20 else [(1, None)] for i in range(40)]),
           "CosineAnnealingLR+CyclicLR", groups=(0.5,)))
add(refused("test_cycle_lr_invalid_mode", lambda o: T.CyclicLR(o, base_lr=0, max_lr=0, mode="CATS"),
            lambda lr, g: S.cyclic_lr(lr, base_lr=0, max_lr=0, mode="CATS"), "CyclicLR"))

# ----------------------------------------------------------------- OneCycleLR
ONE_CYCLE = [
    ("test_onecycle_lr_linear_annealing", dict(max_lr=25, final_div_factor=2, base_momentum=1, max_momentum=22,
                                               total_steps=10, anneal_strategy="linear"), SETUP, "SGD"),
    ("test_onecycle_lr_linear_annealing_three_phases", dict(max_lr=25, div_factor=25, base_momentum=1,
                                                            max_momentum=22, total_steps=10, anneal_strategy="linear",
                                                            pct_start=0.4, final_div_factor=4, three_phase=True),
     SETUP, "SGD"),
    ("test_onecycle_lr_cosine_annealing[_legacy_state_dict]", dict(max_lr=25, final_div_factor=2, base_momentum=1,
                                                                   max_momentum=22, total_steps=10), SETUP, "SGD"),
    ("test_cycle_lr_with_adam", dict(max_lr=25, final_div_factor=2, base_momentum=1, max_momentum=22, total_steps=10,
                                     anneal_strategy="linear"), (0.05, 0.5), "Adam"),
    ("test_lr_scheduler_state_dict_load[OneCycleLR]", dict(max_lr=0.01, total_steps=10, anneal_strategy="linear"),
     SETUP, "SGD"),
]
for name, kwargs, groups, optimizer in ONE_CYCLE:
    add(plain(name, lambda o, k=kwargs: T.OneCycleLR(o, **k), lambda lr, g, k=kwargs: S.one_cycle_lr(lr=lr, **k),
              steps=10, classes="OneCycleLR", groups=groups, optimizer=optimizer,
              note="10 steps: torch raises at the 11th (past total_steps); so does the twin"))
add(plain("OneCycleLR(epochs, steps_per_epoch) (the signature; not in the test file)",
          lambda o: T.OneCycleLR(o, 0.1, None, 4, 5), lambda lr, g: S.one_cycle_lr(0.1, None, 4, 5, lr=lr), steps=21,
          classes="OneCycleLR"))
add(refused("test_onecycle_lr_invalid_anneal_strategy",
            lambda o: T.OneCycleLR(o, max_lr=1e-3, total_steps=10, anneal_strategy="CATS"),
            lambda lr, g: S.one_cycle_lr(max_lr=1e-3, total_steps=10, anneal_strategy="CATS", lr=lr), "OneCycleLR"))
add(refused("test_onecycle_lr_invalid_pct_start", lambda o: T.OneCycleLR(o, max_lr=1e-3, total_steps=10, pct_start=1.1),
            lambda lr, g: S.one_cycle_lr(max_lr=1e-3, total_steps=10, pct_start=1.1, lr=lr), "OneCycleLR"))
add(refused("test_onecycle_lr_cannot_calculate_total_steps", lambda o: T.OneCycleLR(o, max_lr=1e-3),
            lambda lr, g: S.one_cycle_lr(max_lr=1e-3, lr=lr), "OneCycleLR"))

# ----------------------------------------------------------------- SWALR
add(Config("test_swalr_no_anneal", lambda o: ([SWALR(o, anneal_epochs=1, swa_lr=0.01)], [[]] * 5 + [[(0, None)]] * 5),
           lambda lr, g: S.replay(lr, [S.swalr(lr, anneal_epochs=1, swa_lr=0.01)], [[]] * 5 + [[(0, None)]] * 5),
           "SWALR"))
for name, swa_lrs, anneal_epochs, strategy in [("test_swalr_cosine_anneal_after_multiplicative", [0.01, 0.01], 5,
                                                "cos"),
                                               ("test_swalr_linear_anneal_after_multiplicative", [0.01, 0.02], 4,
                                                "linear")]:
    rounds = [[(0, None)]] * 5 + [[(1, None)]] * 10
    add(Config(name, lambda o, s=swa_lrs, a=anneal_epochs, st=strategy, r=rounds: (
        [T.MultiplicativeLR(o, lr_lambda=L["m9"]), SWALR(o, anneal_epochs=a, anneal_strategy=st, swa_lr=s)], r),
        lambda lr, g, s=swa_lrs, a=anneal_epochs, st=strategy, r=rounds: S.replay(
            lr, [S.multiplicative_lr(lr, L["m9"]), S.swalr(lr, s[g], a, st)], r), "MultiplicativeLR+SWALR"))
add(refused("test_swalr_hypers[anneal_strategy]", lambda o: SWALR(o, anneal_strategy="exponential", swa_lr=1.0),
            lambda lr, g: S.swalr(lr, anneal_strategy="exponential", swa_lr=1.0), "SWALR"))
add(refused("test_swalr_hypers[anneal_epochs=-1]", lambda o: SWALR(o, anneal_epochs=-1, swa_lr=1.0),
            lambda lr, g: S.swalr(lr, anneal_epochs=-1, swa_lr=1.0), "SWALR"))
add(refused("test_swalr_hypers[anneal_epochs=1.7]", lambda o: SWALR(o, anneal_epochs=1.7, swa_lr=1.0),
            lambda lr, g: S.swalr(lr, anneal_epochs=1.7, swa_lr=1.0), "SWALR"))
add(refused("test_swalr_hypers[swa_lr list]", lambda o: SWALR(o, swa_lr=[1.0, 0.1, 0.01]),
            lambda lr, g: S.swalr(lr, swa_lr=[1.0, 0.1, 0.01]), "SWALR", groups=(0.05,),
            note="one param group on both sides: the message counts the optimizer's groups"))

# ----------------------------------------------------------------- MultiplicativeLR / LambdaLR refusals and objects
add(refused("test_multiplicative_lr_with_lr_lambda", lambda o: T.MultiplicativeLR(o, 0.95),
            lambda lr, g: S.multiplicative_lr(lr, 0.95), "MultiplicativeLR"))
add(refused("test_multiplicative_lr_with_lr_lambda[list]", lambda o: T.MultiplicativeLR(o, [0.95, 0.95]),
            lambda lr, g: S.multiplicative_lr(lr, [0.95, 0.95][g:g + 1]), "MultiplicativeLR"))

# ----------------------------------------------------------------- state-dict tests: their schedulers, stepped
STATE = [
    ("test_step_lr_state_dict", lambda o: T.StepLR(o, gamma=0.1, step_size=3), lambda lr: S.step_lr(lr, 3, 0.1)),
    ("test_step_lr_state_dict[2]", lambda o: T.StepLR(o, gamma=0.01 / 2, step_size=1), lambda lr: S.step_lr(lr, 1,
                                                                                                            0.01 / 2)),
    ("test_multi_step_lr_state_dict[2]", lambda o: T.MultiStepLR(o, gamma=0.01, milestones=[1, 4, 6]),
     lambda lr: S.multi_step_lr(lr, [1, 4, 6], 0.01)),
    ("test_exp_step_lr_state_dict", lambda o: T.ExponentialLR(o, gamma=0.1), lambda lr: S.exponential_lr(lr, 0.1)),
    ("test_exp_step_lr_state_dict[2]", lambda o: T.ExponentialLR(o, gamma=0.01), lambda lr: S.exponential_lr(lr, 0.01)),
    ("test_cosine_lr_state_dict[2]", lambda o: T.CosineAnnealingLR(o, T_max=5, eta_min=1e-10 / 2),
     lambda lr: S.cosine_annealing_lr(lr, 5, 1e-10 / 2)),
    ("test_lambda_lr_state_dict_fn", lambda o: T.LambdaLR(o, lr_lambda=L["x"]), lambda lr: S.lambda_lr(lr, L["x"])),
    ("test_lambda_lr_state_dict_obj", lambda o: T.LambdaLR(o, lr_lambda=LambdaLRTestObject(10)),
     lambda lr: S.lambda_lr(lr, LambdaLRTestObject(10))),
    ("test_lambda_lr_state_dict_obj[2]", lambda o: T.LambdaLR(o, lr_lambda=LambdaLRTestObject(-1)),
     lambda lr: S.lambda_lr(lr, LambdaLRTestObject(-1))),
    ("test_CosineAnnealingWarmRestarts_lr_state_dict", lambda o: T.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2),
     lambda lr: S.cosine_annealing_warm_restarts(lr, 10, 2)),
    ("test_CosineAnnealingWarmRestarts_lr_state_dict[2]", lambda o: T.CosineAnnealingWarmRestarts(o, T_0=100),
     lambda lr: S.cosine_annealing_warm_restarts(lr, 100)),
    ("test_swa_lr_state_dict", lambda o: SWALR(o, anneal_epochs=3, swa_lr=0.5), lambda lr: S.swalr(lr, 0.5, 3)),
    ("test_swa_lr_state_dict[2]", lambda o: SWALR(o, anneal_epochs=10, anneal_strategy="linear", swa_lr=5.0),
     lambda lr: S.swalr(lr, 5.0, 10, "linear")),
]
STATE_CLASSES = {"test_step": "StepLR", "test_multi": "MultiStepLR", "test_exp_": "ExponentialLR",
                 "test_cosine": "CosineAnnealingLR", "test_lambda": "LambdaLR", "test_Cosine": "CosineAnnealingWarmRestarts",
                 "test_swa": "SWALR"}
for name, make, twin in STATE:
    add(plain(name, make, lambda lr, g, twin=twin: twin(lr),
              classes=next(v for k, v in STATE_CLASSES.items() if name.startswith(k))))

# ----------------------------------------------------------------- test_lr_scheduler_state_dict_load: defaults
LOAD = [
    ("LambdaLR", lambda o: T.LambdaLR(o, lr_lambda=L["e10"]), lambda lr: S.lambda_lr(lr, L["e10"])),
    ("MultiplicativeLR", lambda o: T.MultiplicativeLR(o, lr_lambda=_zero_arg),
     lambda lr: S.multiplicative_lr(lr, _zero_arg)),  # torch raises TypeError at the first step: so must the twin
    ("StepLR", lambda o: T.StepLR(o, step_size=30), lambda lr: S.step_lr(lr, 30)),
    ("MultiStepLR", lambda o: T.MultiStepLR(o, milestones=[30, 80]), lambda lr: S.multi_step_lr(lr, [30, 80])),
    ("ConstantLR", lambda o: T.ConstantLR(o), lambda lr: S.constant_lr(lr)),
    ("LinearLR", lambda o: T.LinearLR(o), lambda lr: S.linear_lr(lr)),
    ("ExponentialLR", lambda o: T.ExponentialLR(o, gamma=0.9), lambda lr: S.exponential_lr(lr, 0.9)),
    ("PolynomialLR", lambda o: T.PolynomialLR(o), lambda lr: S.polynomial_lr(lr)),
    ("CosineAnnealingLR", lambda o: T.CosineAnnealingLR(o, T_max=10), lambda lr: S.cosine_annealing_lr(lr, 10)),
    ("ChainedScheduler", lambda o: T.ChainedScheduler(schedulers=[T.ConstantLR(o), T.ConstantLR(o)]),
     lambda lr: S.chained_scheduler(lr, [S.constant_lr(lr), S.constant_lr(lr)])),
    ("SequentialLR", lambda o: T.SequentialLR(o, schedulers=[T.ConstantLR(o), T.ConstantLR(o)], milestones=[2]),
     lambda lr: S.sequential_lr(lr, [S.constant_lr(lr), S.constant_lr(lr)], [2])),
    ("CyclicLR", lambda o: T.CyclicLR(o, base_lr=0.01, max_lr=0.1), lambda lr: S.cyclic_lr(lr, 0.01, 0.1)),
    ("CosineAnnealingWarmRestarts", lambda o: T.CosineAnnealingWarmRestarts(o, T_0=20),
     lambda lr: S.cosine_annealing_warm_restarts(lr, 20)),
    ("SWALR", lambda o: SWALR(o, swa_lr=0.01), lambda lr: S.swalr(lr, 0.01)),
]
for name, make, twin in LOAD:
    add(plain(f"test_lr_scheduler_state_dict_load[{name}]", make, lambda lr, g, twin=twin: twin(lr), steps=12,
              classes=name))

# ----------------------------------------------------------------- the cases (not in the test file)
c = T.ConstantLR
add(plain("nested SequentialLR",
          lambda o: T.SequentialLR(o, [T.SequentialLR(o, [c(o, factor=0.5, total_iters=2), c(o, factor=0.2,
                                                                                             total_iters=10)], [2])], []),
          lambda lr, g: S.sequential_lr(lr, [S.sequential_lr(lr, [S.constant_lr(lr, 0.5, 2), S.constant_lr(lr, 0.2,
                                                                                                           10)],
                                                             [2])], []), steps=15, classes="SequentialLR"))
add(plain("nested SequentialLR at a milestone",
          lambda o: T.SequentialLR(o, [c(o, factor=0.5, total_iters=2),
                                       T.SequentialLR(o, [c(o, factor=0.5, total_iters=2), c(o, factor=0.2,
                                                                                             total_iters=10)], [2])], [3]),
          lambda lr, g: S.sequential_lr(lr, [S.constant_lr(lr, 0.5, 2),
                                             S.sequential_lr(lr, [S.constant_lr(lr, 0.5, 2), S.constant_lr(lr, 0.2,
                                                                                                           10)],
                                                             [2])], [3]), steps=6, classes="SequentialLR",
          note="torch raises NotImplementedError at the milestone (a SequentialLR has no get_lr); so does the twin"))
add(plain("ConstantLR(factor=0)", lambda o: c(o, factor=0, total_iters=3), lambda lr, g: S.constant_lr(lr, 0, 3),
          steps=6, classes="ConstantLR", note="torch raises ZeroDivisionError at step 3; so does the twin"))
add(plain("LinearLR(total_iters=0)", lambda o: T.LinearLR(o, total_iters=0), lambda lr, g: S.linear_lr(lr,
                                                                                                       total_iters=0),
          steps=5, classes="LinearLR"))

# ----------------------------------------------------------------- ReduceLROnPlateau (fed the metric)
PLATEAU_GROUPS = (0.5, 0.5)  # the plateau tests set every group's lr to 0.5 (a float)
PLATEAU = [  # (test, kwargs, metrics, param group lrs); a list-valued kwarg is per group
    ("test_reduce_lr_on_plateau1", dict(threshold_mode="abs", mode="min", threshold=0.01, patience=5, cooldown=5),
     [10 - i * 0.0167 for i in range(20)], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau2", dict(patience=5, cooldown=0, threshold_mode="abs", mode="min", threshold=0.1),
     [10 - i * 0.0165 for i in range(22)], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau3", dict(mode="max", patience=5, cooldown=5, threshold_mode="abs"),
     [-0.8] * 2 + [-0.234] * 20, PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau4", dict(mode="max", patience=3, threshold_mode="rel", threshold=0.1),
     [1.5 * (1.025 ** i) for i in range(20)], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau5", dict(mode="max", threshold_mode="rel", threshold=0.1, patience=5, cooldown=5),
     [1.5 * (1.005 ** i) for i in range(20)], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau6", dict(mode="min", threshold_mode="rel", threshold=0.1),
     [1.5 * (0.85 ** i) for i in range(20)], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau7", dict(mode="min", threshold_mode="rel", threshold=0.1, patience=5, cooldown=5),
     [1] * 7 + [0.6] + [0.5] * 12, PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau8", dict(mode="max", threshold_mode="rel", min_lr=[0.4, 0.3], threshold=0.1,
                                        patience=5, cooldown=5), [1.5 * (1.005 ** i) for i in range(20)],
     PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau_get_last_lr_before_step", dict(), [], PLATEAU_GROUPS),
    ("test_reduce_lr_on_plateau_preserves_lr_type", dict(mode="min", patience=0), [1.0, 2.0], SETUP),
    ("test_reduce_lr_on_plateau_state_dict", dict(mode="min", factor=0.1, patience=2),
     [1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 5.0, 3.0, 2.0, 1.0], SETUP),
    ("test_add_param_group_does_not_break_reduce_lr_on_plateau[scalar]",
     dict(mode="min", threshold_mode="rel", threshold=0.1, patience=5, cooldown=5, min_lr=0),
     [1] * 7 + [0.6] + [0.5] * 12, PLATEAU_GROUPS),
    ("test_add_param_group_does_not_break_reduce_lr_on_plateau[list]",
     dict(mode="min", threshold_mode="rel", threshold=0.1, patience=5, cooldown=5, min_lr=[1e-5, 1e-4]),
     [1] * 7 + [0.6] + [0.5] * 12, PLATEAU_GROUPS),
    ("test_lr_scheduler_checkpoint_on_plateau", dict(mode="min"), [1], (0.001,)),
    ("test_lr_scheduler_state_dict_load[ReduceLROnPlateau]", dict(), [1.0] * 15, SETUP),
]


def plateau_kwargs(kwargs, g):
    return _per_group(kwargs, g)


for name, kwargs, metrics, groups in PLATEAU:  # the host-side scheduler, through replay
    add(Config(name, lambda o, k=kwargs, m=metrics: ([T.ReduceLROnPlateau(o, **k)], [[(0, x)] for x in m]),
               lambda lr, g, k=kwargs, m=metrics: S.replay(lr, [S.reduce_lr_on_plateau(lr, **plateau_kwargs(k, g))],
                                                           [[(0, x)] for x in m]),
               "ReduceLROnPlateau", groups=groups))

COMPOUND_PLATEAU = [  # test_compound_reduce_lr_on_plateau1..5: the plateau scheduler, then a chainable one
    (1, dict(threshold_mode="abs", mode="min", threshold=0.01, patience=5, cooldown=5),
     [10 - i * 0.0167 for i in range(20)], 10, lambda o: T.StepLR(o, gamma=0.1, step_size=3),
     lambda lr: S.step_lr(lr, 3, 0.1)),
    (2, dict(patience=5, cooldown=0, threshold_mode="abs", mode="min", threshold=0.1),
     [10 - i * 0.0165 for i in range(22)], 22, lambda o: T.MultiStepLR(o, gamma=0.1, milestones=[3, 8, 12]),
     lambda lr: S.multi_step_lr(lr, [3, 8, 12], 0.1)),
    (3, dict(mode="max", patience=5, cooldown=5, threshold_mode="abs"), [-0.8] * 2 + [-0.234] * 20, 22,
     lambda o: T.ExponentialLR(o, gamma=0.1), lambda lr: S.exponential_lr(lr, 0.1)),
    (4, dict(mode="max", patience=3, threshold_mode="rel", threshold=0.1), [1.5 * (1.025 ** i) for i in range(20)], 10,
     lambda o: T.CosineAnnealingLR(o, 10, 1e-10), lambda lr: S.cosine_annealing_lr(lr, 10, 1e-10)),
    (5, dict(patience=5, cooldown=0, threshold_mode="abs", mode="min", threshold=0.1),
     [10 - i * 0.0165 for i in range(22)], 22, lambda o: T.LinearLR(o, start_factor=0.4, total_iters=4),
     lambda lr: S.linear_lr(lr, 0.4, total_iters=4)),
]
for n, kwargs, metrics, epochs, make, twin in COMPOUND_PLATEAU:
    rounds = [[(0, metrics[e]), (1, None)] for e in range(epochs)]
    add(Config(f"test_compound_reduce_lr_on_plateau{n}",
               lambda o, k=kwargs, r=rounds, make=make: ([T.ReduceLROnPlateau(o, **k), make(o)], r),
               lambda lr, g, k=kwargs, r=rounds, twin=twin: S.replay(lr, [S.reduce_lr_on_plateau(lr, **k), twin(lr)],
                                                                     r),
               "ReduceLROnPlateau+chainable", groups=(0.05, 0.05) if n == 4 else PLATEAU_GROUPS))

NOT_TWINNED = {
    "test_error_when_getlr_has_epoch": "a user subclass of LRScheduler with a wrong get_lr signature",
    "test_cycle_lr_cycle_momentum_fail_with_momentumless_optimizer":
        "refused for the optimizer (Rprop has no momentum): a twin has no optimizer; its lr is unaffected",
    "test_add_param_group_errors_reduce_lr_on_plateau": "a param group added to the optimizer mid-run",
    "test_add_param_group_does_not_break_reduce_lr_on_plateau[added group]":
        "the added group shares the first groups' plateau state (twinned: the first two groups)",
    "test_CosineAnnealingWarmRestarts_T_cur_reset": "sets the scheduler's T_cur attribute from outside",
}
