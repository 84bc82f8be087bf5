"""AdamW for PyTorch, state-dict compatible with ``torch.optim.AdamW``.

Each path performs torch's own operations in torch's order, so on the same
device it is bitwise identical to ``torch.optim.AdamW``'s path of that name:

* ``_single_tensor_adamw``: a for-loop of in-place tensor ops;
* ``_multi_tensor_adamw``: the same arithmetic with ``torch._foreach_*`` ops;
* ``_fused_adamw``: torch's fused kernel (``torch._fused_adamw_``).

On the CPU the first two round differently from the fused kernel because
``torch.sqrt`` there is not correctly rounded (MKL's vector math); the fused
kernel is the one ``jax_impl.adamw`` reproduces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["AdamW", "adamw"]


def _scalar(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else value


def _as_hyperparameter(value: float | Tensor) -> float | Tensor:
    """A 1-element tensor becomes 0-d and stays a tensor, as torch's ``_to_scalar``:
    the arithmetic on a tensor lr is then float32 tensor arithmetic, as in torch."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


class AdamW(Optimizer):
    r"""AdamW (Loshchilov & Hutter, 2019) with ``torch.optim.AdamW``'s semantics.

    .. math::

      \begin{aligned}
        \theta' &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \\
        m_t &\leftarrow \operatorname{lerp}(m_{t-1}, g_t, 1 - \beta_1) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &\leftarrow \theta' - \frac{\gamma}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
      \end{aligned}

    with :math:`v_t` replaced by its running maximum under ``amsgrad`` and
    :math:`g_t` negated under ``maximize``.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer.
        lr: learning rate, a float or a 1-element tensor (default 1e-3).
        betas: decay rates of the first and second moments (default (0.9, 0.999)).
        eps: added to the denominator after bias correction (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        amsgrad: use the running maximum of the second moment (default False).
        maximize: maximize the objective (default False).
        foreach: True for the ``torch._foreach_*`` path, False for the for-loop;
            None picks foreach on CUDA and the for-loop on the CPU, as torch does.
        fused: use torch's fused kernel (CPU and CUDA; float types only).

    Params whose ``.grad`` is None are skipped (no decay, no step), as in torch.
    The state dict has ``torch.optim.AdamW``'s layout (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` per parameter index), so either
    optimizer loads the other's.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        if not 0.0 <= _scalar(lr):  # also rejects NaN
            raise ValueError(f"Invalid learning rate: {_scalar(lr)}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (expected two values)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, fused=fused,
                        # Keys torch.optim.AdamW writes, so its load_state_dict finds them.
                        capturable=False, differentiable=False, decoupled_weight_decay=True)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("fused", None),
                               ("capturable", False), ("differentiable", False),
                               ("decoupled_weight_decay", True)):
                group.setdefault(key, value)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "AdamW does not support sparse gradients; use torch.optim.SparseAdam "
                    f"(parameter of shape {tuple(p.shape)} has a sparse grad)")
            if torch.is_complex(p):
                raise TypeError(f"AdamW: complex parameter of shape {tuple(p.shape)} is not supported")
            if p.grad.shape != p.shape:
                raise ValueError(f"AdamW: grad of shape {tuple(p.grad.shape)} for a parameter of shape {tuple(p.shape)}")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                # torch keeps step as a float32 tensor: on the CPU unless fused.
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                  lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                  maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"])
        return loss


def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor, beta1: float,
          beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
          foreach: bool | None = None, fused: bool | None = None) -> None:
    """Functional AdamW: updates ``params`` and the state tensors in place."""
    if not params:
        return
    if fused:
        func = _fused_adamw
    elif foreach is None:
        func = _multi_tensor_adamw if all(p.is_cuda for p in params) else _single_tensor_adamw
    else:
        func = _multi_tensor_adamw if foreach else _single_tensor_adamw
    func(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


def _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                         lr, beta1, beta2, eps, weight_decay, amsgrad, maximize):
    lr = _as_hyperparameter(lr)
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize):
    if isinstance(lr, Tensor):
        raise RuntimeError("lr as a Tensor is not supported with foreach=True (as in torch.optim.AdamW)")
    groups = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs,
         device_state_steps), _ in groups.values():
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if device_state_steps[0].is_cpu:
            # One wrapped scalar instead of one per tensor (torch's slow-path note).
            torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(device_state_steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        del device_grads
        steps = [step.item() for step in device_state_steps]
        step_size = [(lr / (1 - beta1**step)) * -1 for step in steps]
        bias_correction2_sqrt = [(1 - beta2**step) ** 0.5 for step in steps]
        if amsgrad:
            torch._foreach_maximum_(device_max_exp_avg_sqs, device_exp_avg_sqs)
            exp_avg_sq_sqrt = torch._foreach_sqrt(device_max_exp_avg_sqs)
        else:
            exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)
        torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
        torch._foreach_add_(exp_avg_sq_sqrt, eps)
        torch._foreach_addcdiv_(device_params, device_exp_avgs, exp_avg_sq_sqrt, step_size)


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                 lr, beta1, beta2, eps, weight_decay, amsgrad, maximize):
    groups = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    for (device, _), ((device_params, device_grads, device_exp_avgs, device_exp_avg_sqs,
                       device_max_exp_avg_sqs, device_state_steps), _) in groups.items():
        if device.type not in ("cpu", "cuda", "mps", "xpu"):
            raise RuntimeError(f"fused AdamW is not supported on device {device}")
        torch._foreach_add_(device_state_steps, 1)
        torch._fused_adamw_(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs,
                            device_max_exp_avg_sqs, device_state_steps, amsgrad=amsgrad, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            maximize=maximize, grad_scale=None, found_inf=None)


