"""``torch.optim.lr_scheduler`` as optax schedules, bit for bit.

Each function is named after a torch scheduler (snake case) and takes its
arguments in torch's order, the optimizer's lr in the optimizer's place.  It
returns a :class:`TorchSchedule`: an optax-style schedule mapping the update
count ``c`` (0, 1, ...) to the lr that torch uses for update ``c + 1`` when
the scheduler is stepped after each ``optimizer.step()`` -- that is, the lr
after ``c`` scheduler steps.  A twin stands for one param group.  Every twin
also takes ``last_epoch``/``initial_lr`` (resuming a checkpoint, torch's
``last_epoch`` with the group's ``initial_lr``) and ``step_epochs`` (the
argument of each ``scheduler.step(epoch)`` call, fractional ones included; one
table entry per call).  The lr may be a 0-d float32 array or tensor: torch
then computes on the tensor in float32, and so does the emulation.
Several schedulers on one param group: :func:`chained_scheduler`,
:func:`replay`.  ``ReduceLROnPlateau``, driven by a metric, is the optax
transformation :func:`reduce_lr_on_plateau`.

torch's chainable schedulers compute each lr from the previous one
(``CosineAnnealingLR``'s recursive form, ``StepLR``'s repeated ``* gamma``),
so rounding accumulates; the closed forms round differently.  Here the same
Python float operations run on the host, in the same order, from a faithful
emulation of each scheduler's ``step`` on a parameter group, and the values
are tabulated: the table is torch's Python floats exactly.  ``closed_form=True``
tabulates torch's ``_get_closed_form_lr`` instead, where torch has one.

Inside ``jax.jit`` the schedule looks the count up in the table (float64
under ``jax_enable_x64``, else float32).  ``jax_impl.adamw`` recognizes a
``TorchSchedule`` and derives its per-step float32 scalars from the float64
table on the host, as torch's kernels do from the Python float, so the
trajectory stays bitwise equal to torch's with or without x64.

The table covers counts ``0 .. horizon - 1``; by default ``horizon`` covers
what the arguments describe (``T_max``, ``total_iters``, the last milestone,
``total_steps``; at least 100,000 counts).  Past the table a schedule whose
lr can no longer change (``StepLR`` once ``lr * gamma == lr``, ``MultiStepLR``
after its last milestone, ``LinearLR``/``ConstantLR``/``PolynomialLR`` after
``total_iters``) holds its last entry, which is torch's value; any other
(a cosine, a lambda) has no value there: a concrete count raises
``ValueError`` and a traced count gives NaN (inside ``jax.jit`` nothing can
raise; NaN makes the run fail loudly instead of training on a wrong lr).
"""

from __future__ import annotations

import array
import copy
import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_HORIZON = 100_000


class TorchSchedule:
    """An optax schedule holding torch's lr for counts ``0 .. horizon - 1`` (``table``, float64).

    ``holds_beyond``: the last entry is torch's lr at every later count too.
    Otherwise a count past the table raises ``ValueError`` (concrete) or
    gives NaN (traced).  ``error``: the exception torch raises at the next
    scheduler step, where the table ends there because torch cannot go on
    (``OneCycleLR`` past ``total_steps``, ``ConstantLR(factor=0)`` at
    ``total_iters``, a ``lr_lambda`` that raises), else None.
    """

    def __init__(self, name: str, table: Sequence[float], holds_beyond: bool = False,
                 error: BaseException | None = None):
        self.name = name
        self.table = np.asarray(table, dtype=np.float64)
        self.table.setflags(write=False)
        self.holds_beyond = bool(holds_beyond) and error is None
        self.error = error  # what torch raises at the scheduler step after the table's last entry, if it does

    @property
    def horizon(self) -> int:
        return len(self.table)

    def check_count(self, count: int) -> None:
        """Raise ``ValueError`` if this schedule has no value at ``count`` (a concrete count)."""
        if count >= self.horizon and self.error is not None:
            raise ValueError(f"{self.name}: no lr at count {count}: torch raises {type(self.error).__name__}: "
                             f"{self.error} at scheduler step {self.horizon}") from self.error
        if count < 0 or (count >= self.horizon and not self.holds_beyond):
            raise ValueError(f"{self.name}: no lr at count {count}: the table covers counts 0..{self.horizon - 1} "
                             f"and the lr still changes after it; build the schedule with horizon > {count}")

    def __call__(self, count) -> jax.Array:
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        if not isinstance(count, jax.core.Tracer) and np.ndim(count) == 0:
            self.check_count(int(count))
        count = jnp.asarray(count)
        value = jnp.asarray(self.table, dtype)[jnp.clip(count, 0, self.horizon - 1)]
        if self.holds_beyond:
            return value
        return jnp.where(count < self.horizon, value, jnp.asarray(np.nan, dtype))

    def __repr__(self) -> str:
        return f"TorchSchedule({self.name}, horizon={self.horizon})"


# ----------------------------------------------------------------------------
# Emulation of torch's LRScheduler on one parameter group (a dict with "lr" and
# "initial_lr").  Methods and attributes mirror torch's so the code can be read
# side by side with torch/optim/lr_scheduler.py.
#
# A float32 tensor lr (``torch.tensor(0.5)`` in a param group) is held as an
# ``np.float32``: torch then computes ``group["lr"] * gamma`` in float32 (the
# Python float rounded to float32 first), which numpy's scalar promotion
# (NEP 50) reproduces, and ``_set_lr`` rounds what is written back as torch's
# ``group["lr"].fill_(value)`` does.


def _set_lr(group: dict, value, key: str = "lr") -> None:
    """torch's ``_update_param_group_val``: a tensor lr is filled (rounded to float32), a float replaced."""
    group[key] = np.float32(value) if isinstance(group[key], np.float32) else value


_INITIAL_LR_MISSING = (
    "param 'initial_lr' is not specified in param_groups[0] when resuming scheduler with last_epoch >= 0.\n"
    "This typically happens when:\n"
    "1. You're trying to resume training from a checkpoint but haven't properly loaded the optimizer state\n"
    "2. You're using last_epoch >= 0 for a fresh training run (not recommended)")


class _Emulator:
    has_closed_form = True
    composite = False  # SequentialLR / ChainedScheduler: hold sub-schedulers (torch's ``_schedulers``)

    def __init__(self, closed_form: bool = False):
        self.closed_form = closed_form

    def attach(self, group: dict, last_epoch: int = -1) -> None:
        """What torch's ``LRScheduler.__init__`` does: record initial_lr (or check it), take the initial step."""
        if last_epoch == -1:
            group.setdefault("initial_lr", group["lr"])
        elif "initial_lr" not in group:
            raise KeyError(_INITIAL_LR_MISSING)
        self.group = group
        self.base_lr = group["initial_lr"]
        self.last_epoch = last_epoch
        self.initial_step()

    def initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self, epoch=None) -> None:
        self._step_count += 1
        self.update_lr(epoch)

    def update_lr(self, epoch) -> None:
        if epoch is None:
            self.last_epoch += 1
            value = self.closed() if self.closed_form else self.get_lr()
        else:
            self.last_epoch = epoch
            value = self.closed() if self.has_closed_form else self.get_lr()
        _set_lr(self.group, value)

    def get_lr(self):
        raise NotImplementedError  # torch's LRScheduler.get_lr (reached by a composite at a milestone)

    def closed(self):
        raise NotImplementedError

    def extent(self) -> int:
        """The last step count the arguments describe (T_max, total_iters, the last milestone...)."""
        return 0

    def steady(self) -> bool:
        """True when no later ``step`` can change the lr (checked after the last tabulated step)."""
        return False


def _run_table(emulator: _Emulator, group: dict, horizon: int, last_epoch: int,
               step_epochs: Sequence | None) -> tuple[np.ndarray, BaseException | None]:
    """The lr after construction and after each of ``horizon - 1`` steps; stops where torch raises."""
    emulator.attach(group, last_epoch)  # torch raises these from the constructor: so does the twin
    # array('d') holds raw doubles (8 B each) and hands them to numpy without a
    # copy: a list of Python floats would need ~4x the memory at its peak.
    values = array.array("d", [float(group["lr"])])
    append, step = values.append, emulator.step
    error = None
    try:
        if step_epochs is not None:
            for epoch in step_epochs:
                step(epoch)
                append(float(group["lr"]))
        elif type(group["lr"]) is not float:
            for _ in range(horizon - 1):
                step()
                append(float(group["lr"]))
        elif hasattr(emulator, "run_steps") and not emulator.closed_form and emulator._step_count >= 1:
            emulator.run_steps(horizon - 1, append)
        elif type(emulator).step is _Emulator.step and type(emulator).update_lr is _Emulator.update_lr \
                and not emulator.closed_form:
            # _Emulator.step + update_lr(None), inlined: a third of the time of a long table.
            get_lr = emulator.get_lr
            for _ in range(horizon - 1):
                emulator._step_count += 1
                emulator.last_epoch += 1
                group["lr"] = value = get_lr()
                append(value)
        else:
            for _ in range(horizon - 1):
                step()
                append(group["lr"])
    except Exception as raised:  # noqa: BLE001 -- torch raises the same at this step: the table ends here
        error = raised
    return np.frombuffer(values, dtype=np.float64), error


def _schedule(name: str, emulator: _Emulator, lr, horizon: int | None, *, last_epoch: int = -1,
              initial_lr=None, step_epochs: Sequence | None = None) -> TorchSchedule:
    if step_epochs is not None:
        if horizon is not None:
            raise ValueError("Invalid horizon: give horizon or step_epochs, not both (the table has one entry "
                             "per step_epochs entry, after the initial lr)")
        step_epochs = list(step_epochs)
        horizon = len(step_epochs) + 1
    elif horizon is None:
        horizon = max(DEFAULT_HORIZON, emulator.extent() + 1)
    _check_horizon(horizon)
    _check_resume(last_epoch)
    fresh = copy.deepcopy(emulator)  # for sequential_lr and friends, which rerun it from the start
    group = _group(lr, initial_lr)
    table, error = _run_table(emulator, group, horizon, last_epoch, step_epochs)
    holds = error is None and step_epochs is None and emulator.steady()
    schedule = TorchSchedule(name, table, holds_beyond=holds, error=error)
    schedule.emulator = fresh
    schedule.lr = _lr_value(lr)
    schedule.initial_lr = initial_lr
    schedule.last_epoch = last_epoch
    schedule.param_group_initial_lr = group.get("initial_lr")  # what a checkpoint of torch's param group holds
    return schedule


def _lr_value(lr, name: str = "lr"):
    """``lr`` as the emulation holds it: a Python float, or ``np.float32`` for a float32 (tensor) lr."""
    if isinstance(lr, bool):
        value = None
    elif isinstance(lr, (int, float)):
        value = float(lr)
    elif isinstance(lr, np.generic) or hasattr(lr, "dtype") or hasattr(lr, "__array__"):
        try:
            array_ = np.asarray(lr)
        except Exception:  # noqa: BLE001 -- not convertible: refused below
            array_ = None
        if array_ is not None and array_.ndim == 0 and array_.dtype == np.float32:
            value = np.float32(array_)
        elif array_ is not None and array_.ndim == 0 and array_.dtype == np.float64:
            value = float(array_)
        else:
            value = None
    else:
        value = None
    if value is None:
        raise ValueError(f"Invalid {name}: {lr!r} (a number, or a 0-d float32/float64 array or tensor)")
    return value


def _check_lr(lr, name: str = "lr") -> None:
    value = _lr_value(lr, name)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid {name}: {lr!r} (a finite number >= 0)")


def _group(lr, initial_lr=None) -> dict:
    group = {"lr": _lr_value(lr)}
    if initial_lr is not None:
        group["initial_lr"] = _lr_value(initial_lr, "initial_lr")
    return group


def _check_resume(last_epoch) -> None:
    if not isinstance(last_epoch, (int, np.integer)) or isinstance(last_epoch, bool) or last_epoch < -1:
        raise ValueError(f"Invalid last_epoch: {last_epoch!r} (-1 for a fresh scheduler, or the step to resume at)")


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (a positive integer)")


def _check_horizon(horizon) -> None:
    _check_positive_int(horizon, "horizon")


def _one_group_param(name: str, value) -> object:
    """torch's ``_format_param`` for the one param group a twin stands for."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(value)} values, param_groups has 1.")
        value = value[0]
    return value


def _one_lambda(lr_lambda):
    if isinstance(lr_lambda, (list, tuple)):
        if len(lr_lambda) != 1:
            raise ValueError(f"Expected 1 lr_lambdas, but got {len(lr_lambda)}")
        lr_lambda = lr_lambda[0]
    return lr_lambda


# ------------------------------------------------------------------ schedulers

class _StepLR(_Emulator):
    def __init__(self, step_size, gamma, closed_form):
        super().__init__(closed_form)
        self.step_size, self.gamma = step_size, gamma

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self.group["lr"]
        return self.group["lr"] * self.gamma

    def closed(self):
        return self.base_lr * self.gamma ** (self.last_epoch // self.step_size)

    def extent(self):
        return self.step_size

    def steady(self):
        lr = self.group["lr"]
        if self.closed_form:  # base_lr * gamma**k: fixed once gamma**k is 0 or inf (or gamma is 1)
            return self.gamma == 1.0 or lr == 0.0 or math.isinf(lr)
        return lr * self.gamma == lr  # 0, inf, or gamma == 1


def step_lr(lr: float, step_size: int, gamma: float = 0.1, *, closed_form: bool = False, last_epoch: int = -1,
            initial_lr=None, step_epochs=None, horizon: int | None = None) -> TorchSchedule:
    """``StepLR``: multiply by ``gamma`` every ``step_size`` steps."""
    _check_lr(lr)
    _check_positive_int(step_size, "step_size")
    return _schedule("step_lr", _StepLR(step_size, gamma, closed_form), lr, horizon, last_epoch=last_epoch,
                     initial_lr=initial_lr, step_epochs=step_epochs)


class _MultiStepLR(_Emulator):
    def __init__(self, milestones, gamma, closed_form):
        super().__init__(closed_form)
        self.milestones, self.gamma = Counter(milestones), gamma

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return self.group["lr"]
        return self.group["lr"] * self.gamma ** self.milestones[self.last_epoch]

    def closed(self):
        milestones = sorted(self.milestones.elements())
        return self.base_lr * self.gamma ** bisect_right(milestones, self.last_epoch)

    def extent(self):
        return max(self.milestones, default=0)

    def steady(self):
        return self.last_epoch >= self.extent()


def multi_step_lr(lr: float, milestones: Sequence[int], gamma: float = 0.1, *, closed_form: bool = False,
                  last_epoch: int = -1, initial_lr=None, step_epochs=None,
                  horizon: int | None = None) -> TorchSchedule:
    """``MultiStepLR``: multiply by ``gamma`` at each milestone (strictly increasing step numbers)."""
    _check_lr(lr)
    milestones = list(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 0 for m in milestones) \
            or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"Invalid milestones: {milestones!r} (non-negative integers in increasing order)")
    return _schedule("multi_step_lr", _MultiStepLR(milestones, gamma, closed_form), lr, horizon,
                     last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _ConstantLR(_Emulator):
    def __init__(self, factor, total_iters, closed_form):
        super().__init__(closed_form)
        self.factor, self.total_iters = factor, total_iters

    def get_lr(self):
        if self.last_epoch == 0:
            return self.group["lr"] * self.factor
        if self.last_epoch != self.total_iters:
            return self.group["lr"]
        return self.group["lr"] * (1.0 / self.factor)  # factor=0: ZeroDivisionError here, as in torch

    def closed(self):
        return self.base_lr * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))

    def extent(self):
        return self.total_iters

    def steady(self):
        return self.last_epoch >= self.total_iters


def constant_lr(lr: float, factor: float = 1.0 / 3, total_iters: int = 5, *, closed_form: bool = False,
                last_epoch: int = -1, initial_lr=None, step_epochs=None,
                horizon: int | None = None) -> TorchSchedule:
    """``ConstantLR``: ``lr * factor`` for the first ``total_iters`` steps, then ``lr``.

    ``factor=0`` is accepted, as torch does; torch's step ``total_iters``
    then divides by it (``ZeroDivisionError``): the table ends before it.
    """
    _check_lr(lr)
    if factor > 1.0 or factor < 0:
        raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
    return _schedule("constant_lr", _ConstantLR(factor, total_iters, closed_form), lr, horizon,
                     last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _LinearLR(_Emulator):
    def __init__(self, start_factor, end_factor, total_iters, closed_form):
        super().__init__(closed_form)
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters

    def get_lr(self):
        if self.last_epoch == 0:
            return self.group["lr"] * self.start_factor
        if self._is_initial or self.last_epoch > self.total_iters:
            return self.group["lr"]
        return self.group["lr"] * (1.0 + (self.end_factor - self.start_factor) / (
            self.total_iters * self.start_factor + (self.last_epoch - 1) * (self.end_factor - self.start_factor)))

    def closed(self):
        return self.base_lr * (self.start_factor + (self.end_factor - self.start_factor)
                               * min(self.total_iters, self.last_epoch) / self.total_iters)

    def extent(self):
        return self.total_iters

    def steady(self):
        return self.last_epoch >= self.total_iters


def linear_lr(lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5, *,
              closed_form: bool = False, last_epoch: int = -1, initial_lr=None, step_epochs=None,
              horizon: int | None = None) -> TorchSchedule:
    """``LinearLR``: the factor goes linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` steps.

    ``total_iters=0`` is accepted, as torch does (``lr * start_factor``
    from count 0 on, which torch never leaves; its closed form divides by
    zero, as torch's).
    """
    _check_lr(lr)
    if start_factor > 1.0 or start_factor <= 0:
        raise ValueError("Starting multiplicative factor expected to be greater than 0 and less or equal to 1.")
    if end_factor > 1.0 or end_factor < 0:
        raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
    return _schedule("linear_lr", _LinearLR(start_factor, end_factor, total_iters, closed_form), lr, horizon,
                     last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _ExponentialLR(_Emulator):
    def __init__(self, gamma, closed_form):
        super().__init__(closed_form)
        self.gamma = gamma

    def get_lr(self):
        if self._is_initial:
            return self.group["lr"]
        return self.group["lr"] * self.gamma

    def closed(self):
        return self.base_lr * self.gamma ** self.last_epoch

    def steady(self):
        lr = self.group["lr"]
        if self.closed_form:  # base_lr * gamma**t: fixed once gamma**t is 0 or inf (or gamma is 1)
            return self.gamma == 1.0 or lr == 0.0 or math.isinf(lr)
        return lr * self.gamma == lr  # 0, inf, or gamma == 1


def exponential_lr(lr: float, gamma: float, *, closed_form: bool = False, last_epoch: int = -1, initial_lr=None,
                   step_epochs=None, horizon: int | None = None) -> TorchSchedule:
    """``ExponentialLR``: multiply by ``gamma`` every step."""
    _check_lr(lr)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"Invalid gamma: {gamma!r} (a finite number >= 0)")
    return _schedule("exponential_lr", _ExponentialLR(gamma, closed_form), lr, horizon, last_epoch=last_epoch,
                     initial_lr=initial_lr, step_epochs=step_epochs)


class _PolynomialLR(_Emulator):
    def __init__(self, total_iters, power, closed_form):
        super().__init__(closed_form)
        self.total_iters, self.power = total_iters, power

    def get_lr(self):
        if self._is_initial or self.last_epoch > self.total_iters:
            return self.group["lr"]
        decay_factor = ((1.0 - self.last_epoch / self.total_iters)
                        / (1.0 - (self.last_epoch - 1) / self.total_iters)) ** self.power
        return self.group["lr"] * decay_factor

    def closed(self):
        return self.base_lr * (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters) ** self.power

    def extent(self):
        return self.total_iters

    def steady(self):
        return self.last_epoch >= self.total_iters


def polynomial_lr(lr: float, total_iters: int = 5, power: float = 1.0, *, closed_form: bool = False,
                  last_epoch: int = -1, initial_lr=None, step_epochs=None,
                  horizon: int | None = None) -> TorchSchedule:
    """``PolynomialLR``: ``lr * (1 - t / total_iters) ** power``, then 0."""
    _check_lr(lr)
    _check_positive_int(total_iters, "total_iters")
    return _schedule("polynomial_lr", _PolynomialLR(total_iters, power, closed_form), lr, horizon,
                     last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _CosineAnnealingLR(_Emulator):
    def __init__(self, T_max, eta_min, closed_form):
        super().__init__(closed_form)
        self.T_max, self.eta_min = T_max, eta_min

    def get_lr(self):
        if self._is_initial:
            return self.group["lr"]
        if self._step_count == 1 and self.last_epoch > 0:
            return self.eta_min + (self.base_lr - self.eta_min) * (
                1 + math.cos(self.last_epoch * math.pi / self.T_max)) / 2
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return self.group["lr"] + (self.base_lr - self.eta_min) * (1 - math.cos(math.pi / self.T_max)) / 2
        return ((1 + math.cos(math.pi * self.last_epoch / self.T_max))
                / (1 + math.cos(math.pi * (self.last_epoch - 1) / self.T_max))
                * (self.group["lr"] - self.eta_min) + self.eta_min)

    def closed(self):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2

    def extent(self):
        return self.T_max

    def run_steps(self, n: int, append) -> None:
        """``n`` recursive steps, as ``step()`` would take them, appending each lr: a long table's fast path.

        The same Python float operations in the same order (the denominator's
        cosine is the previous step's numerator's, the same expression of the
        same integer), without the method calls: 2.5x faster for 1e7 counts.
        """
        group, cos, pi = self.group, math.cos, math.pi
        base, eta, T = self.base_lr, self.eta_min, self.T_max
        restart_step = (base - eta) * (1 - cos(pi / T)) / 2
        e, lr = self.last_epoch, group["lr"]
        previous = 1 + cos(pi * e / T)
        for _ in range(n):
            e += 1
            current = 1 + cos(pi * e / T)
            if (e - 1 - T) % (2 * T) == 0:
                lr = lr + restart_step
            else:
                lr = current / previous * (lr - eta) + eta
            previous = current
            append(lr)
        self.last_epoch, self._step_count = e, self._step_count + n
        group["lr"] = lr


def cosine_annealing_lr(lr: float, T_max: int, eta_min: float = 0.0, *, closed_form: bool = False,  # noqa: N803
                        last_epoch: int = -1, initial_lr=None, step_epochs=None,
                        horizon: int | None = None) -> TorchSchedule:
    """``CosineAnnealingLR``: half a cosine from ``lr`` to ``eta_min`` over ``T_max`` steps (then back up).

    torch's recursive form by default; ``closed_form=True`` gives
    ``eta_min + (lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.
    """
    _check_lr(lr)
    _check_positive_int(T_max, "T_max")
    _check_lr(eta_min, "eta_min")
    return _schedule("cosine_annealing_lr", _CosineAnnealingLR(T_max, eta_min, closed_form), lr, horizon,
                     last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _CosineAnnealingWarmRestarts(_Emulator):
    has_closed_form = False

    def __init__(self, T_0, T_mult, eta_min):
        super().__init__(False)
        self.T_0, self.T_i, self.T_mult, self.eta_min = T_0, T_0, T_mult, eta_min

    def attach(self, group, last_epoch=-1):
        self.T_cur = last_epoch
        super().attach(group, last_epoch)

    def get_lr(self):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2

    def step(self, epoch=None):
        # torch overrides step(): it advances T_cur and T_i itself (epoch may be fractional).
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** n
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        _set_lr(self.group, self.get_lr())

    def extent(self):
        return self.T_0


def cosine_annealing_warm_restarts(lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0, *,  # noqa: N803
                                   last_epoch: int = -1, initial_lr=None, step_epochs=None,
                                   horizon: int | None = None) -> TorchSchedule:
    """``CosineAnnealingWarmRestarts`` (SGDR, the AdamW paper's AdamWR): cosine cycles of ``T_0 * T_mult**i`` steps.

    ``step_epochs`` may be fractional (``scheduler.step(epoch + i / iters)``, torch's per-batch use).
    """
    _check_lr(lr)
    if T_0 <= 0 or not isinstance(T_0, int):
        raise ValueError(f"Expected positive integer T_0, but got {T_0}")
    if T_mult < 1 or not isinstance(T_mult, int):
        raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
    if not isinstance(eta_min, (float, int)):
        raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}")
    return _schedule("cosine_annealing_warm_restarts", _CosineAnnealingWarmRestarts(T_0, T_mult, eta_min), lr,
                     horizon, last_epoch=last_epoch, initial_lr=initial_lr, step_epochs=step_epochs)


class _LambdaLR(_Emulator):
    has_closed_form = False

    def __init__(self, lr_lambda):
        super().__init__(False)
        self.lr_lambda = lr_lambda

    def get_lr(self):
        return self.base_lr * self.lr_lambda(self.last_epoch)


def lambda_lr(lr: float, lr_lambda: Callable[[int], float], *, last_epoch: int = -1, initial_lr=None,
              step_epochs=None, horizon: int | None = None) -> TorchSchedule:
    """``LambdaLR``: ``lr * lr_lambda(t)`` (evaluated on the host, in Python floats, as torch does)."""
    _check_lr(lr)
    return _schedule("lambda_lr", _LambdaLR(_one_lambda(lr_lambda)), lr, horizon, last_epoch=last_epoch,
                     initial_lr=initial_lr, step_epochs=step_epochs)


class _MultiplicativeLR(_Emulator):
    has_closed_form = False

    def __init__(self, lr_lambda):
        super().__init__(False)
        self.lr_lambda = lr_lambda

    def get_lr(self):
        if not self._is_initial:
            return self.group["lr"] * self.lr_lambda(self.last_epoch)
        return self.group["lr"]


def multiplicative_lr(lr: float, lr_lambda: Callable[[int], float], *, last_epoch: int = -1, initial_lr=None,
                      step_epochs=None, horizon: int | None = None) -> TorchSchedule:
    """``MultiplicativeLR``: multiply the lr by ``lr_lambda(t)`` at step ``t``."""
    _check_lr(lr)
    lr_lambda = _one_lambda(lr_lambda)
    if not callable(lr_lambda):
        raise TypeError(f"lr_lambda should be a function, but got {type(lr_lambda).__name__}")
    return _schedule("multiplicative_lr", _MultiplicativeLR(lr_lambda), lr, horizon, last_epoch=last_epoch,
                     initial_lr=initial_lr, step_epochs=step_epochs)


class _CyclicLR(_Emulator):
    has_closed_form = False

    def __init__(self, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode):
        super().__init__(False)
        self.base_lr_arg, self.max_lr = base_lr, max_lr
        step_size_up = float(step_size_up)
        step_size_down = float(step_size_down) if step_size_down is not None else step_size_up
        self.total_size = step_size_up + step_size_down
        self.step_ratio = step_size_up / self.total_size
        self.mode, self.gamma, self.scale_fn_custom = mode, gamma, scale_fn
        if scale_fn is None:  # torch's _init_scale_fn
            self.scale_mode = {"triangular": "cycle", "triangular2": "cycle", "exp_range": "iterations"}[mode]
        else:
            self.scale_mode = scale_mode

    def scale_fn(self, x):
        if self.scale_fn_custom is not None:
            return self.scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma ** x

    def attach(self, group, last_epoch=-1):
        if last_epoch == -1:
            _set_lr(group, self.base_lr_arg)
        super().attach(group, last_epoch)  # the initial step uses initial_lr as base_lr, as torch's does
        self.base_lr = self.base_lr_arg

    def get_lr(self):
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        base_height = (self.max_lr - self.base_lr) * scale_factor
        if self.scale_mode == "cycle":
            return self.base_lr + base_height * self.scale_fn(cycle)
        return self.base_lr + base_height * self.scale_fn(self.last_epoch)


def cyclic_lr(lr: float, base_lr: float, max_lr: float, step_size_up: int = 2000, step_size_down: int | None = None,
              mode: str = "triangular", gamma: float = 1.0, scale_fn: Callable[[float], float] | None = None,
              scale_mode: str = "cycle", cycle_momentum: bool = True, base_momentum: float = 0.8,
              max_momentum: float = 0.9, *, last_epoch: int = -1, initial_lr=None, step_epochs=None,
              horizon: int | None = None) -> TorchSchedule:
    """``CyclicLR``: triangular cycles between ``base_lr`` and ``max_lr`` (its lr).

    ``lr`` is the optimizer's lr: torch overwrites it with ``base_lr``, so
    only its type matters (a float32 tensor lr rounds each value to float32),
    and its value when resuming.  ``cycle_momentum`` and the momenta cycle
    torch's momentum/beta1, which ``jax_impl.adamw`` keeps fixed; they do not
    change the lr and are accepted for torch's signature.
    """
    _check_lr(lr)
    del cycle_momentum, base_momentum, max_momentum  # the momentum cycle: not an lr (see the docstring)
    base_lr = _one_group_param("base_lr", base_lr)
    max_lr = _one_group_param("max_lr", max_lr)
    if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
        raise ValueError("mode is invalid and scale_fn is None")
    emulator = _CyclicLR(base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode)
    return _schedule("cyclic_lr", emulator, lr, horizon, last_epoch=last_epoch, initial_lr=initial_lr,
                     step_epochs=step_epochs)


class _SWALR(_Emulator):
    has_closed_form = False

    def __init__(self, swa_lr, anneal_epochs, anneal_strategy):
        super().__init__(False)
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = swa_lr, anneal_epochs, anneal_strategy

    def attach(self, group, last_epoch=-1):
        group["swa_lr"] = self.swa_lr
        super().attach(group, last_epoch)

    def anneal_func(self, t):
        if self.anneal_strategy == "cos":
            return (1 - math.cos(math.pi * t)) / 2
        return t

    def get_lr(self):
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        prev_t = max(0, min(1, (step - 1) / max(1, self.anneal_epochs)))
        prev_alpha = self.anneal_func(prev_t)
        lr, swa_lr = self.group["lr"], self.group["swa_lr"]
        prev_lr = swa_lr if prev_alpha == 1 else (lr - prev_alpha * swa_lr) / (1 - prev_alpha)
        t = max(0, min(1, step / max(1, self.anneal_epochs)))
        alpha = self.anneal_func(t)
        return swa_lr * alpha + prev_lr * (1 - alpha)

    def extent(self):
        return self.anneal_epochs

    def steady(self):
        return self._step_count - 1 >= self.anneal_epochs + 1 and self.group["lr"] == self.group["swa_lr"]


def swalr(lr: float, swa_lr: float, anneal_epochs: int = 10, anneal_strategy: str = "cos", *, last_epoch: int = -1,
          initial_lr=None, step_epochs=None, horizon: int | None = None) -> TorchSchedule:
    """``torch.optim.swa_utils.SWALR``: anneal from the lr to ``swa_lr`` over ``anneal_epochs`` steps.

    torch's SWA recipe steps another scheduler before ``swa_start`` and SWALR
    after it: :func:`replay` gives that (``replay(lr, [before, swa], rounds)``).
    """
    _check_lr(lr)
    swa_lr = _one_group_param("swa_lr", swa_lr)
    if anneal_strategy not in ["cos", "linear"]:
        raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
    if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
    return _schedule("swalr", _SWALR(swa_lr, anneal_epochs, anneal_strategy), lr, horizon, last_epoch=last_epoch,
                     initial_lr=initial_lr, step_epochs=step_epochs)


class _OneCycleLR(_Emulator):
    has_closed_form = False

    def __init__(self, max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor, three_phase):
        super().__init__(False)
        self.total_steps, self.anneal_strategy = total_steps, anneal_strategy
        self.max_lr, self.div_factor, self.final_div_factor = max_lr, div_factor, final_div_factor
        ends = ([float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2, total_steps - 1]
                if three_phase else [float(pct_start * total_steps) - 1, total_steps - 1])
        names = ([("initial_lr", "max_lr"), ("max_lr", "initial_lr"), ("initial_lr", "min_lr")] if three_phase
                 else [("initial_lr", "max_lr"), ("max_lr", "min_lr")])
        self.phases = [{"end_step": end, "start_lr": a, "end_lr": b} for end, (a, b) in zip(ends, names)]

    def attach(self, group, last_epoch=-1):
        # A fresh constructor overwrites initial_lr: the optimizer's lr does not matter.  A resumed
        # one reads max_lr and min_lr from the (loaded) group: the same values, from the same arguments.
        if last_epoch == -1:
            group["initial_lr"] = self.max_lr / self.div_factor
            group["max_lr"] = self.max_lr
            group["min_lr"] = group["initial_lr"] / self.final_div_factor
        elif "initial_lr" in group:
            group.setdefault("max_lr", self.max_lr)
            group.setdefault("min_lr", group["initial_lr"] / self.final_div_factor)
        super().attach(group, last_epoch)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def get_lr(self):
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"Tried to step {step_num} times. The specified number of total steps is "
                             f"{self.total_steps}")
        start_step = 0.0
        for i, phase in enumerate(self.phases):
            end_step = phase["end_step"]
            if step_num <= end_step or i == len(self.phases) - 1:
                pct = (step_num - start_step) / (end_step - start_step)
                return self._anneal(self.group[phase["start_lr"]], self.group[phase["end_lr"]], pct)
            start_step = phase["end_step"]
        raise AssertionError("unreachable")

    def extent(self):
        return self.total_steps


def one_cycle_lr(max_lr: float, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum: float = 0.85, max_momentum: float = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False, *,
                 lr: float = 0.0, last_epoch: int = -1, initial_lr=None, step_epochs=None,
                 horizon: int | None = None) -> TorchSchedule:
    """``OneCycleLR`` (its lr), torch's arguments in torch's order.

    torch's ``cycle_momentum`` also cycles beta1, which ``jax_impl.adamw``
    keeps fixed; the momenta do not change the lr.  ``lr`` is the optimizer's
    lr: torch overwrites it, so only its type matters (a float32 tensor lr
    rounds each value to float32).  torch refuses to step past
    ``total_steps``; the table covers counts ``0 .. total_steps`` and its
    ``error`` is torch's refusal (``horizon`` may not ask for more).
    """
    _check_lr(lr)
    del cycle_momentum, base_momentum, max_momentum  # the momentum cycle: not an lr (see the docstring)
    max_lr = _one_group_param("max_lr", max_lr)
    if total_steps is not None:
        if total_steps <= 0 or not isinstance(total_steps, int):
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
    elif epochs is not None and steps_per_epoch is not None:
        if not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"Expected positive integer epochs, but got {epochs}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
        total_steps = epochs * steps_per_epoch
    else:
        raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
    if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
        raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    if anneal_strategy not in ["cos", "linear"]:
        raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
    if step_epochs is None:
        # By default one step more than torch takes: torch's refusal becomes the table's ``error``.
        horizon = total_steps + 2 if horizon is None else horizon
        if horizon > total_steps + 2:
            raise ValueError(f"Invalid horizon: {horizon} steps asked for, but total_steps={total_steps} "
                             f"(torch stops at step {total_steps})")
    emulator = _OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor,
                           three_phase)
    return _schedule("one_cycle_lr", emulator, lr, horizon, last_epoch=last_epoch, initial_lr=initial_lr,
                     step_epochs=step_epochs)


# ------------------------------------------------------------ compositions

def _undo(emulators) -> None:
    """torch's ``SequentialLR.recursive_undo``: into composites, one step back for the rest."""
    for emulator in emulators:
        if emulator.composite:
            _undo(emulator.emulators)
        else:
            emulator.last_epoch -= 1


class _SequentialLR(_Emulator):
    has_closed_form = False
    composite = True

    def __init__(self, emulators, milestones):
        super().__init__(False)
        self.emulators, self.milestones = emulators, milestones

    def attach(self, group, last_epoch=-1):
        # The user builds each torch scheduler on the optimizer first, in order...
        for emulator in self.emulators:
            emulator.attach(group)
        # ... then SequentialLR resets the lr, undoes their initial steps (recursively:
        # a nested SequentialLR's or ChainedScheduler's own schedulers) and restarts the first one.
        self.group = group
        self.last_epoch = last_epoch + 1
        _set_lr(group, group["initial_lr"])
        _undo(self.emulators)
        self.emulators[bisect_right(self.milestones, 0)].initial_step()

    def extent(self):
        return self.milestones[-1] + self.emulators[-1].extent() if self.milestones else self.emulators[0].extent()

    def steady(self):
        return self.last_epoch >= (self.milestones[-1] if self.milestones else 0) and self.emulators[-1].steady()

    def step(self):
        self.last_epoch += 1
        idx = bisect_right(self.milestones, self.last_epoch)
        emulator = self.emulators[idx]
        if idx > 0 and self.milestones[idx - 1] == self.last_epoch:
            emulator.update_lr(0)  # a composite has no get_lr here: NotImplementedError, as torch raises
        else:
            emulator.step()


class _ChainedScheduler(_Emulator):
    has_closed_form = False
    composite = True

    def __init__(self, emulators):
        super().__init__(False)
        self.emulators = emulators

    def attach(self, group, last_epoch=-1):
        # torch's ChainedScheduler only collects the schedulers (built on the optimizer, in order).
        for emulator in self.emulators:
            emulator.attach(group)
        self.group = group

    def step(self):
        for emulator in self.emulators:
            emulator.step()

    def extent(self):
        return max(emulator.extent() for emulator in self.emulators)

    def steady(self):
        return all(emulator.steady() for emulator in self.emulators)


def _sub_emulators(lr, schedulers, what: str) -> list[_Emulator]:
    for i, schedule in enumerate(schedulers):
        if isinstance(schedule, ReduceLROnPlateau) and what == "replay":
            if schedule.lr != _lr_value(lr) or type(schedule.lr) is not type(_lr_value(lr)):
                raise ValueError(f"Invalid schedulers[{i}]: built with lr={schedule.lr!r}, not lr={lr!r}")
            continue
        if not isinstance(schedule, TorchSchedule) or not hasattr(schedule, "emulator"):
            raise ValueError(f"Invalid schedulers[{i}]: {schedule!r} (a schedule from jax_impl.schedules)")
        if schedule.last_epoch != -1:
            raise ValueError(f"Invalid schedulers[{i}]: built with last_epoch={schedule.last_epoch}; {what} "
                             "builds its schedulers fresh")
        if schedule.name != "one_cycle_lr" and schedule.name != "cyclic_lr" and \
                (schedule.lr != _lr_value(lr) or type(schedule.lr) is not type(_lr_value(lr))):
            raise ValueError(f"Invalid schedulers[{i}]: built with lr={schedule.lr!r}, not lr={lr!r}")
    return [copy.deepcopy(s.emulator) for s in schedulers]


def sequential_lr(lr: float, schedulers: Sequence[TorchSchedule], milestones: Sequence[int], *, last_epoch: int = -1,
                  horizon: int | None = None) -> TorchSchedule:
    """``SequentialLR``: ``schedulers[i]`` from ``milestones[i-1]`` on (e.g. linear warmup, then cosine).

    The schedules must be built from this module with the same ``lr`` (torch's
    sub-schedulers share the optimizer's lr); their emulators are rerun here
    exactly as torch chains them, including its quirks (a sub-scheduler built
    after another starts from the lr the first one left; a nested
    ``SequentialLR`` or ``ChainedScheduler`` is undone recursively; one that
    starts at a milestone makes torch raise ``NotImplementedError`` there,
    where the table ends).
    """
    _check_lr(lr)
    schedulers, milestones = list(schedulers), list(milestones)
    if len(schedulers) < 1:
        raise ValueError("SequentialLR expects at least one scheduler, but got no scheduler.")
    if len(milestones) != len(schedulers) - 1:
        raise ValueError("Sequential Schedulers expects number of schedulers provided to be one more than the "
                         f"number of milestone points, but got number of schedulers {len(schedulers)} and the "
                         f"number of milestones to be equal to {len(milestones)}")
    emulators = _sub_emulators(lr, schedulers, "sequential_lr")
    return _schedule("sequential_lr", _SequentialLR(emulators, milestones), lr, horizon, last_epoch=last_epoch)


def chained_scheduler(lr: float, schedulers: Sequence[TorchSchedule], *, horizon: int | None = None) -> TorchSchedule:
    """``ChainedScheduler``: every schedule steps at every step, in order, each from the lr the previous left.

    Also the twin of several schedulers stepping one optimizer
    (``for s in schedulers: s.step()``): the same lr.  The schedules are built
    on the optimizer in the order given, from the same ``lr``.
    """
    _check_lr(lr)
    schedulers = list(schedulers)
    if len(schedulers) < 1:
        raise ValueError("ChainedScheduler expects at least one scheduler to be chained, but got no scheduler.")
    emulators = _sub_emulators(lr, schedulers, "chained_scheduler")
    return _schedule("chained_scheduler", _ChainedScheduler(emulators), lr, horizon)


class _Replay(_Emulator):
    has_closed_form = False

    def __init__(self, emulators, rounds):
        super().__init__(False)
        self.emulators, self.rounds, self.done = emulators, rounds, 0

    def attach(self, group, last_epoch=-1):
        for emulator in self.emulators:
            emulator.attach(group)
        self.group = group

    def step(self, epoch=None):
        for index, argument in self.rounds[self.done]:
            self.emulators[index].step(argument)
        self.done += 1


def replay(lr: float, schedulers: Sequence[TorchSchedule], rounds: Sequence[Sequence[tuple[int, float | None]]]
           ) -> TorchSchedule:
    """Several torch schedulers on one param group, stepped as ``rounds`` says.

    The schedulers are built on the optimizer in the order given (from the
    same ``lr``); ``rounds[t]`` lists the ``(index, epoch)`` calls
    ``schedulers[index].step(epoch)`` (``epoch`` None for a plain ``step()``)
    made between update ``t + 1`` and ``t + 2``.  The table has
    ``len(rounds) + 1`` entries.  E.g. torch's SWA recipe,
    ``scheduler.step()`` for 5 steps, then ``swa_scheduler.step()``:
    ``replay(lr, [scheduler, swa], [[(0, None)]] * 5 + [[(1, None)]] * 10)``.
    """
    _check_lr(lr)
    schedulers = list(schedulers)
    rounds = [[(int(index), argument) for index, argument in calls] for calls in rounds]
    for t, calls in enumerate(rounds):
        for index, _ in calls:
            if not 0 <= index < len(schedulers):
                raise ValueError(f"Invalid rounds[{t}]: schedule index {index} (0..{len(schedulers) - 1})")
    emulators = _sub_emulators(lr, schedulers, "replay")
    return _schedule("replay", _Replay(emulators, rounds), lr, len(rounds) + 1)



# ------------------------------------------------------------ ReduceLROnPlateau: fed the metric

def _is_better(mode: str, threshold_mode: str, threshold: float, a, best):
    """torch's ``ReduceLROnPlateau._is_better`` (Python floats, or float64 arrays: the same IEEE operations)."""
    if mode == "min" and threshold_mode == "rel":
        return a < best * (1.0 - threshold)
    if mode == "min" and threshold_mode == "abs":
        return a < best - threshold
    if mode == "max" and threshold_mode == "rel":
        return a > best * (threshold + 1.0)
    return a > best + threshold


class _ReduceLROnPlateau(_Emulator):
    """torch's ReduceLROnPlateau on one group: ``step(metric)``; its constructor takes no step, sets no initial_lr."""

    has_closed_form = False

    def __init__(self, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps):
        super().__init__(False)
        self.mode, self.factor, self.patience, self.threshold = mode, factor, patience, threshold
        self.threshold_mode, self.cooldown, self.min_lr, self.eps = threshold_mode, cooldown, min_lr, eps

    def attach(self, group, last_epoch=-1):
        self.group, self.last_epoch = group, 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.cooldown_counter = self.num_bad_epochs = 0

    def step(self, metrics, epoch=None):
        current = float(metrics)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if _is_better(self.mode, self.threshold_mode, self.threshold, current, self.best):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.reduce()
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def reduce(self) -> bool:
        old_lr = float(self.group["lr"])
        new_lr = max(old_lr * self.factor, self.min_lr)
        if old_lr - new_lr > self.eps:
            _set_lr(self.group, new_lr)
            return True
        return False


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_lr_on_plateau` (torch's scheduler attributes; ``lr`` is ``group["lr"]``)."""

    lr: jax.Array  # torch's lr now: float64 under jax_enable_x64, else the float32 nearest it
    best: jax.Array  # the best metric so far (+-inf before the first), in the metric's dtype
    num_bad_epochs: jax.Array  # int32
    cooldown_counter: jax.Array  # int32
    num_reductions: jax.Array  # int32: lr is ``lrs[num_reductions]`` of the host-side table


class ReduceLROnPlateau(optax.GradientTransformationExtraArgs):
    """The transformation :func:`reduce_lr_on_plateau` returns (``.lrs``: the lr after k reductions, float64)."""


def reduce_lr_on_plateau(lr: float, mode: str = "min", factor: float = 0.1, patience: int = 10,
                         threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                         min_lr: float = 0, eps: float = 1e-8) -> ReduceLROnPlateau:
    """``ReduceLROnPlateau`` as an optax transformation fed the metric: ``update(updates, state, value=metric)``.

    torch's semantics bit for bit: each call is ``scheduler.step(metric)``
    (better than ``best`` by ``threshold``, else a bad epoch; after more than
    ``patience`` bad epochs, outside ``cooldown``, ``lr = max(lr * factor,
    min_lr)`` unless that changes it by ``eps`` or less).  The lr after k
    reductions is a host-side table (Python floats, as torch's; a float32
    tensor ``lr`` rounds each to float32), so ``state.lr`` is torch's lr
    (float64 under ``jax_enable_x64``); the comparisons are torch's double
    ones (in float64 under x64, else on the host through ``jax.pure_callback``,
    the metric being the float32 it arrives as).

    ``updates`` are scaled by ``lr_now / lr`` with the lr *before* this
    metric (torch's ``optimizer.step()`` precedes ``scheduler.step(metric)``):
    ``optax.chain(jax_impl.adamw(lr), reduce_lr_on_plateau(lr))``, as
    ``optax.contrib.reduce_on_plateau`` is used.  One transformation stands
    for one param group (``min_lr`` one value).
    """
    _check_lr(lr)
    if factor >= 1.0:
        raise ValueError("Factor should be < 1.0.")
    min_lr = _one_group_param_list("min_lr", min_lr, "min_lrs")
    if mode not in {"min", "max"}:
        raise ValueError("mode " + mode + " is unknown!")
    if threshold_mode not in {"rel", "abs"}:
        raise ValueError("threshold mode " + threshold_mode + " is unknown!")
    emulator = _ReduceLROnPlateau(mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)
    emulator.attach(_group(lr))
    probe = copy.deepcopy(emulator)
    lrs = [float(probe.group["lr"])]
    while len(lrs) < DEFAULT_HORIZON and probe.reduce():  # torch's _reduce_lr, until it stops changing the lr
        lrs.append(float(probe.group["lr"]))
    lrs = np.asarray(lrs, np.float64)
    scales = lrs / lrs[0] if lrs[0] != 0 else np.ones_like(lrs)
    worse = math.inf if mode == "min" else -math.inf

    def is_better(a, best):
        if jax.config.jax_enable_x64:
            return _is_better(mode, threshold_mode, threshold, a.astype(jnp.float64), best.astype(jnp.float64))

        def host(a_, best_):  # numpy float64: the same IEEE double operations as torch's Python floats
            return np.asarray(_is_better(mode, threshold_mode, threshold, np.float64(a_), np.float64(best_)))
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.bool_), a, best, vmap_method="sequential")

    def init_fn(params) -> ReduceLROnPlateauState:
        del params
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        zero = jnp.zeros((), jnp.int32)
        return ReduceLROnPlateauState(lr=jnp.asarray(lrs[0], dtype), best=jnp.asarray(worse, dtype),
                                      num_bad_epochs=zero, cooldown_counter=zero, num_reductions=zero)

    def update_fn(updates, state: ReduceLROnPlateauState, params=None, *, value, **extra_args):
        del params, extra_args
        current = jnp.asarray(value, state.best.dtype)
        better = is_better(current, state.best)
        best = jnp.where(better, current, state.best)
        bad = jnp.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        k = jnp.where(reduce, jnp.minimum(state.num_reductions + 1, len(lrs) - 1), state.num_reductions)
        cooldown_counter = jnp.where(reduce, cooldown, cooldown_counter)
        bad = jnp.where(reduce, 0, bad)
        scale = jnp.asarray(scales, state.lr.dtype)[state.num_reductions]
        updates = jax.tree.map(lambda u: (u * scale.astype(u.dtype)), updates)
        new_state = ReduceLROnPlateauState(
            lr=jnp.asarray(lrs, state.lr.dtype)[k], best=best, num_bad_epochs=bad.astype(jnp.int32),
            cooldown_counter=cooldown_counter.astype(jnp.int32), num_reductions=k.astype(jnp.int32))
        return updates, new_state

    transformation = ReduceLROnPlateau(init_fn, update_fn)
    transformation.lrs = lrs
    transformation.emulator = emulator  # for replay(): the host-side scheduler, stepped with the metric
    transformation.lr = _lr_value(lr)
    return transformation


def _one_group_param_list(name: str, value, plural: str):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected 1 {plural}, got {len(value)}")
        value = value[0]
    return value

__all__ = ["ReduceLROnPlateau", "ReduceLROnPlateauState", "TorchSchedule", "chained_scheduler", "constant_lr",
           "cosine_annealing_lr", "cosine_annealing_warm_restarts", "cyclic_lr", "exponential_lr", "lambda_lr",
           "linear_lr", "multi_step_lr", "multiplicative_lr", "one_cycle_lr", "polynomial_lr",
           "reduce_lr_on_plateau", "replay", "sequential_lr", "step_lr", "swalr"]
