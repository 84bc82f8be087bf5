"""``torch.optim.lr_scheduler`` as optax schedules, bit for bit.

Each function is named after a torch scheduler (snake case) and takes its
arguments, the initial lr first.  It returns a :class:`TorchSchedule`: an
optax-style schedule mapping the update count ``c`` (0, 1, ...) to the lr
that torch uses for update ``c + 1`` when the scheduler is stepped after each
``optimizer.step()`` -- that is, the lr after ``c`` scheduler steps.

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

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_HORIZON = 100_000


class TorchSchedule:
    """An optax schedule holding torch's lr for counts ``0 .. horizon - 1`` (``table``, float64).

    ``holds_beyond``: the last entry is torch's lr at every later count too.
    Otherwise a count past the table raises ``ValueError`` (concrete) or
    gives NaN (traced).
    """

    def __init__(self, name: str, table: Sequence[float], holds_beyond: bool = False):
        self.name = name
        self.table = np.asarray(table, dtype=np.float64)
        self.table.setflags(write=False)
        self.holds_beyond = bool(holds_beyond)

    @property
    def horizon(self) -> int:
        return len(self.table)

    def check_count(self, count: int) -> None:
        """Raise ``ValueError`` if this schedule has no value at ``count`` (a concrete count)."""
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

class _Emulator:
    has_closed_form = True

    def __init__(self, closed_form: bool = False):
        self.closed_form = closed_form

    def attach(self, group: dict) -> None:
        """What the torch constructor does (last_epoch=-1): record initial_lr, take the initial step."""
        group.setdefault("initial_lr", group["lr"])
        self.group = group
        self.base_lr = group["initial_lr"]
        self.last_epoch = -1
        self.initial_step()

    def initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self) -> None:
        self._step_count += 1
        self.update_lr(None)

    def update_lr(self, epoch: int | None) -> None:
        if epoch is None:
            self.last_epoch += 1
            value = self.closed() if self.closed_form else self.get_lr()
        else:
            self.last_epoch = epoch
            value = self.closed() if self.has_closed_form else self.get_lr()
        self.group["lr"] = value

    def get_lr(self) -> float:
        raise NotImplementedError

    def closed(self) -> float:
        raise NotImplementedError

    def extent(self) -> int:
        """The last step count the arguments describe (T_max, total_iters, the last milestone...)."""
        return 0

    def steady(self) -> bool:
        """True when no later ``step`` can change the lr (checked after the last tabulated step)."""
        return False


def _table(emulator: _Emulator, lr: float, horizon: int) -> np.ndarray:
    group = {"lr": lr}
    emulator.attach(group)
    # array('d') holds raw doubles (8 B each) and hands them to numpy without a
    # copy: a list of Python floats would need ~4x the memory at its peak.
    values = array.array("d", [group["lr"]])
    append, step = values.append, emulator.step
    if hasattr(emulator, "run_steps") and not emulator.closed_form and emulator._step_count >= 1:
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
    return np.frombuffer(values, dtype=np.float64)


def _schedule(name: str, emulator: _Emulator, lr: float, horizon: int | None) -> TorchSchedule:
    if horizon is None:
        horizon = max(DEFAULT_HORIZON, emulator.extent() + 1)
    _check_horizon(horizon)
    fresh = copy.deepcopy(emulator)  # for sequential_lr, which reruns it from the start
    table = _table(emulator, float(lr), horizon)
    schedule = TorchSchedule(name, table, holds_beyond=emulator.steady())
    schedule.emulator = fresh
    schedule.lr = float(lr)
    return schedule


def _check_lr(lr: float, name: str = "lr") -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid {name}: {lr!r} (a finite number >= 0)")


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (a positive integer)")


def _check_horizon(horizon) -> None:
    _check_positive_int(horizon, "horizon")


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


def step_lr(lr: float, step_size: int, gamma: float = 0.1, *, closed_form: bool = False,
            horizon: int | None = None) -> TorchSchedule:
    """``StepLR``: multiply by ``gamma`` every ``step_size`` steps."""
    _check_lr(lr)
    _check_positive_int(step_size, "step_size")
    return _schedule("step_lr", _StepLR(step_size, gamma, closed_form), lr, horizon)


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
                  horizon: int | None = None) -> TorchSchedule:
    """``MultiStepLR``: multiply by ``gamma`` at each milestone (strictly increasing step numbers)."""
    _check_lr(lr)
    milestones = list(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 0 for m in milestones) \
            or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"Invalid milestones: {milestones!r} (non-negative integers in increasing order)")
    return _schedule("multi_step_lr", _MultiStepLR(milestones, gamma, closed_form), lr, horizon)


class _ConstantLR(_Emulator):
    def __init__(self, factor, total_iters, closed_form):
        super().__init__(closed_form)
        self.factor, self.total_iters = factor, total_iters

    def get_lr(self):
        if self.last_epoch == 0:
            return self.group["lr"] * self.factor
        if self.last_epoch != self.total_iters:
            return self.group["lr"]
        return self.group["lr"] * (1.0 / self.factor)

    def closed(self):
        return self.base_lr * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))

    def extent(self):
        return self.total_iters

    def steady(self):
        return self.last_epoch >= self.total_iters


def constant_lr(lr: float, factor: float = 1.0 / 3, total_iters: int = 5, *, closed_form: bool = False,
                horizon: int | None = None) -> TorchSchedule:
    """``ConstantLR``: ``lr * factor`` for the first ``total_iters`` steps, then ``lr``."""
    _check_lr(lr)
    if not 0 <= factor <= 1:
        raise ValueError(f"Invalid factor: {factor!r} (between 0 and 1)")
    if not isinstance(total_iters, int) or total_iters < 0:
        raise ValueError(f"Invalid total_iters: {total_iters!r} (an integer >= 0)")
    return _schedule("constant_lr", _ConstantLR(factor, total_iters, closed_form), lr, horizon)


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
              closed_form: bool = False, horizon: int | None = None) -> TorchSchedule:
    """``LinearLR``: the factor goes linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` steps."""
    _check_lr(lr)
    if not 0 < start_factor <= 1:
        raise ValueError(f"Invalid start_factor: {start_factor!r} (in (0, 1])")
    if not 0 <= end_factor <= 1:
        raise ValueError(f"Invalid end_factor: {end_factor!r} (in [0, 1])")
    _check_positive_int(total_iters, "total_iters")
    return _schedule("linear_lr", _LinearLR(start_factor, end_factor, total_iters, closed_form), lr, horizon)


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


def exponential_lr(lr: float, gamma: float, *, closed_form: bool = False,
                   horizon: int | None = None) -> TorchSchedule:
    """``ExponentialLR``: multiply by ``gamma`` every step."""
    _check_lr(lr)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"Invalid gamma: {gamma!r} (a finite number >= 0)")
    return _schedule("exponential_lr", _ExponentialLR(gamma, closed_form), lr, horizon)


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
                  horizon: int | None = None) -> TorchSchedule:
    """``PolynomialLR``: ``lr * (1 - t / total_iters) ** power``, then 0."""
    _check_lr(lr)
    _check_positive_int(total_iters, "total_iters")
    return _schedule("polynomial_lr", _PolynomialLR(total_iters, power, closed_form), lr, horizon)


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
                        horizon: int | None = None) -> TorchSchedule:
    """``CosineAnnealingLR``: half a cosine from ``lr`` to ``eta_min`` over ``T_max`` steps (then back up).

    torch's recursive form by default; ``closed_form=True`` gives
    ``eta_min + (lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.
    """
    _check_lr(lr)
    _check_positive_int(T_max, "T_max")
    _check_lr(eta_min, "eta_min")
    return _schedule("cosine_annealing_lr", _CosineAnnealingLR(T_max, eta_min, closed_form), lr, horizon)


class _CosineAnnealingWarmRestarts(_Emulator):
    has_closed_form = False

    def __init__(self, T_0, T_mult, eta_min):
        super().__init__(False)
        self.T_0, self.T_i, self.T_mult, self.eta_min = T_0, T_0, T_mult, eta_min

    def attach(self, group):
        self.T_cur = -1
        super().attach(group)

    def get_lr(self):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2

    def step(self):
        # torch overrides step(): it advances T_cur and T_i itself.
        if self.last_epoch < 0:
            epoch = 0
            self.T_i, self.T_cur = self.T_0, epoch
        else:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        self.last_epoch = math.floor(epoch)
        self.group["lr"] = self.get_lr()

    def extent(self):
        return self.T_0


def cosine_annealing_warm_restarts(lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0, *,  # noqa: N803
                                   horizon: int | None = None) -> TorchSchedule:
    """``CosineAnnealingWarmRestarts`` (SGDR, the AdamW paper's AdamWR): cosine cycles of ``T_0 * T_mult**i`` steps."""
    _check_lr(lr)
    _check_positive_int(T_0, "T_0")
    _check_positive_int(T_mult, "T_mult")
    _check_lr(eta_min, "eta_min")
    return _schedule("cosine_annealing_warm_restarts", _CosineAnnealingWarmRestarts(T_0, T_mult, eta_min), lr,
                     horizon)


class _LambdaLR(_Emulator):
    has_closed_form = False

    def __init__(self, lr_lambda):
        super().__init__(False)
        self.lr_lambda = lr_lambda

    def get_lr(self):
        return self.base_lr * self.lr_lambda(self.last_epoch)


def lambda_lr(lr: float, lr_lambda: Callable[[int], float], *, horizon: int | None = None) -> TorchSchedule:
    """``LambdaLR``: ``lr * lr_lambda(t)`` (evaluated on the host, in Python floats, as torch does)."""
    _check_lr(lr)
    if not callable(lr_lambda):
        raise ValueError(f"Invalid lr_lambda: {lr_lambda!r} (a function of the step)")
    return _schedule("lambda_lr", _LambdaLR(lr_lambda), lr, horizon)


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

    def attach(self, group):
        # The constructor overwrites initial_lr: the optimizer's lr does not matter.
        group["initial_lr"] = self.max_lr / self.div_factor
        group["max_lr"] = self.max_lr
        group["min_lr"] = group["initial_lr"] / self.final_div_factor
        super().attach(group)

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


def one_cycle_lr(max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False, *,
                 horizon: int | None = None) -> TorchSchedule:
    """``OneCycleLR`` (its lr; torch's ``cycle_momentum`` also cycles beta1, which ``jax_impl.adamw`` keeps fixed).

    torch refuses to step past ``total_steps``; the table covers counts
    ``0 .. total_steps`` (``horizon`` may not ask for more).
    """
    _check_lr(max_lr, "max_lr")
    _check_positive_int(total_steps, "total_steps")
    if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
        raise ValueError(f"Invalid pct_start: {pct_start!r} (a float between 0 and 1)")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"Invalid anneal_strategy: {anneal_strategy!r} (choose 'cos' or 'linear')")
    horizon = total_steps + 1 if horizon is None else horizon
    if horizon > total_steps + 1:
        raise ValueError(f"Invalid horizon: {horizon} steps asked for, but total_steps={total_steps} "
                         f"(torch stops at step {total_steps})")
    emulator = _OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor,
                           three_phase)
    return _schedule("one_cycle_lr", emulator, max_lr, horizon)


class _SequentialLR(_Emulator):
    has_closed_form = False

    def __init__(self, emulators, milestones):
        super().__init__(False)
        self.emulators, self.milestones = emulators, milestones

    def attach(self, group):
        # The user builds each torch scheduler on the optimizer first, in order...
        for emulator in self.emulators:
            emulator.attach(group)
        # ... then SequentialLR resets the lr, undoes their initial steps and
        # restarts the first one.
        self.group = group
        self.last_epoch = 0
        group["lr"] = group["initial_lr"]
        for emulator in self.emulators:
            emulator.last_epoch -= 1
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
            emulator.update_lr(0)
        else:
            emulator.step()


def sequential_lr(lr: float, schedules: Sequence[TorchSchedule], milestones: Sequence[int], *,
                  horizon: int | None = None) -> TorchSchedule:
    """``SequentialLR``: ``schedules[i]`` from ``milestones[i-1]`` on (e.g. linear warmup, then cosine).

    The schedules must be built from this module with the same ``lr`` (torch's
    sub-schedulers share the optimizer's lr); their emulators are rerun here
    exactly as torch chains them, including its quirks (a sub-scheduler built
    after another starts from the lr the first one left).
    """
    _check_lr(lr)
    schedules, milestones = list(schedules), list(milestones)
    if not schedules:
        raise ValueError("Invalid schedules: [] (at least one)")
    if len(milestones) != len(schedules) - 1:
        raise ValueError(f"Invalid milestones: {milestones!r} ({len(schedules) - 1} expected for "
                         f"{len(schedules)} schedules)")
    if any(not isinstance(m, (int, np.integer)) or m <= 0 for m in milestones) \
            or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"Invalid milestones: {milestones!r} (positive integers in increasing order)")
    for i, schedule in enumerate(schedules):
        if not isinstance(schedule, TorchSchedule) or not hasattr(schedule, "emulator"):
            raise ValueError(f"Invalid schedules[{i}]: {schedule!r} (a schedule from jax_impl.schedules)")
        if schedule.lr != float(lr) and schedule.name != "one_cycle_lr":
            raise ValueError(f"Invalid schedules[{i}]: built with lr={schedule.lr}, not lr={lr}")
    emulators = [copy.deepcopy(s.emulator) for s in schedules]
    return _schedule("sequential_lr", _SequentialLR(emulators, milestones), lr, horizon)


__all__ = ["TorchSchedule", "constant_lr", "cosine_annealing_lr", "cosine_annealing_warm_restarts", "exponential_lr",
           "lambda_lr", "linear_lr", "multi_step_lr", "one_cycle_lr", "polynomial_lr", "sequential_lr", "step_lr"]
