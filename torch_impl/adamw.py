"""AdamW for PyTorch, a drop-in for ``torch.optim.AdamW`` (torch 2.13).

Each path performs torch's own operations in torch's order, so on the same
device it is bitwise identical to ``torch.optim.AdamW``'s path of that name:

* ``_single_tensor_adamw``: a for-loop of in-place tensor ops (also the
  ``differentiable`` and ``capturable`` variants);
* ``_multi_tensor_adamw``: the same arithmetic with ``torch._foreach_*`` ops;
* ``_fused_adamw``: torch's fused kernel (``torch._fused_adamw_``), with
  ``GradScaler``'s ``grad_scale`` / ``found_inf`` handed to the kernel.

On the CPU the first two round differently from the fused kernel because
``torch.sqrt`` there is not correctly rounded (MKL's vector math); the fused
kernel is the one ``jax_impl.adamw`` reproduces.

As in torch 2.13, ``AdamW`` is a subclass of ``torch.optim.Adam`` (code that
checks ``isinstance(opt, torch.optim.Adam)`` keeps working) whose weight decay
is always decoupled; its constructor is ``Adam``'s, so hyperparameter errors
are torch's, type for type and message for message.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _default_to_fused_or_foreach,
    _device_dtype_check_for_fused,
    _disable_dynamo_if_unsupported,
    _get_capturable_supported_devices,
    _get_scalar_dtype,
    _get_value,
    _stack_if_compiling,
    _to_scalar,
    _use_grad_for_differentiable,
    _view_as_real,
)

__all__ = ["AdamW", "adamw"]


class AdamW(torch.optim.Adam):
    r"""AdamW (Loshchilov & Hutter, 2019) with ``torch.optim.AdamW``'s semantics.

    .. math::

      \begin{aligned}
        \theta' &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \\
        m_t &\leftarrow \operatorname{lerp}(m_{t-1}, g_t, 1 - \beta_1) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &\leftarrow \theta' - \frac{\gamma}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
      \end{aligned}

    with :math:`v_t` replaced by its running maximum under ``amsgrad``,
    :math:`g_t` negated under ``maximize``, and a complex parameter updated as
    its real view (``torch.view_as_real``).

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer.
        lr: learning rate, a float or a 1-element tensor (default 1e-3); a tensor
            needs ``foreach=False`` unless ``capturable=True``.
        betas: decay rates of the first and second moments, both floats or both
            1-element tensors (default (0.9, 0.999)).
        eps: added to the denominator after bias correction (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        amsgrad: use the running maximum of the second moment (default False).
        maximize: maximize the objective (default False).
        foreach: True for the ``torch._foreach_*`` path, False for the for-loop;
            None picks foreach on CUDA and the for-loop on the CPU, as torch does.
        capturable: keep ``step`` on the params' device and do the bias
            correction in tensors, for CUDA graphs (CUDA/XPU/HPU only, as torch).
        differentiable: let autograd run through ``step`` (for-loop path only).
        fused: use torch's fused kernel (CPU and CUDA; float types only). The
            fused path takes ``GradScaler``'s unscale and inf check itself.

    Params whose ``.grad`` is None are skipped (no decay, no step), as in torch.
    The state dict has ``torch.optim.AdamW``'s layout (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` per parameter index), so either
    optimizer loads the other's, and an ``Adam`` state dict loads as AdamW.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # Adam's constructor validates every hyperparameter with torch's
        # messages and sets _step_supports_amp_scaling for fused.
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Adam's turns a Python-number ``step`` (older checkpoints) into a tensor;
        # whatever was loaded (an Adam state dict too), the decay stays decoupled.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps) -> bool:
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
            if p.grad.shape != p.shape:
                # torch has no such check; without it a mismatched grad fails deep
                # inside an in-place op, or broadcasts.
                raise ValueError(f"AdamW: grad of shape {tuple(p.grad.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                if group["fused"]:
                    _device_dtype_check_for_fused(p)
                # torch keeps ``step`` on the CPU (a kernel launch per step costs on
                # CUDA) unless capturable or fused need it beside the params.
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
                    if group["capturable"] or group["fused"]
                    else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
                raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
            state_steps.append(state["step"])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                           state_steps)
            beta1, beta2 = group["betas"]
            _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                  foreach=group["foreach"], capturable=group["capturable"],
                  differentiable=group["differentiable"], fused=group["fused"],
                  # Set by torch.amp.GradScaler around step() when fused (_step_supports_amp_scaling).
                  grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                  has_complex=has_complex, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=group["maximize"],
                  # Always True after construction or loading; a group edited to False by hand gets
                  # Adam's L2 decay, as torch.optim.AdamW's (i.e. Adam's) step gives it.
                  decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss


def _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale,
                         found_inf, *, amsgrad, has_complex, beta1, beta2, lr, weight_decay, eps, maximize,
                         capturable, differentiable, decoupled_weight_decay):
    del has_complex  # each param is checked itself
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Expected grad_scale and found_inf to be None")
    # A 1-element tensor becomes 0-d and stays a tensor: the arithmetic on a
    # tensor lr or beta is then tensor arithmetic, as in torch.
    lr, beta1, beta2 = _to_scalar(lr), _to_scalar(beta1), _to_scalar(beta2)
    # torch casts a tensor beta1 to each param's device and dtype before lerp_
    # (for bfloat16/float16 params the weight is rounded to that dtype).
    beta1_by_device_dtype = {(beta1.device, beta1.dtype): beta1} if isinstance(beta1, Tensor) else None

    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if not torch.compiler.is_compiling() and capturable:
            supported_devices = _get_capturable_supported_devices()
            if not (param.device.type == step_t.device.type and param.device.type in supported_devices):
                raise AssertionError(f"If capturable=True, params and state_steps must be on supported devices: "
                                     f"{supported_devices}.")
        step_t += 1
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            elif differentiable and isinstance(weight_decay, Tensor) and weight_decay.requires_grad:
                grad = grad.addcmul_(param.clone(), weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if amsgrad:
                max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
            param = torch.view_as_real(param)

        if beta1_by_device_dtype is not None:
            key = (param.device, param.dtype)
            if key not in beta1_by_device_dtype:
                beta1_by_device_dtype[key] = beta1.to(device=param.device, dtype=param.dtype, non_blocking=True)
            device_beta1 = beta1_by_device_dtype[key]
        else:
            device_beta1 = beta1
        exp_avg.lerp_(grad, 1 - device_beta1)
        if differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
            exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=cast(float, 1 - beta2))

        if capturable or differentiable:
            # Bias correction in tensors: no host sync (capturable), and a graph
            # autograd can follow back to lr and betas (differentiable).
            step = step_t
            # A clone, so autograd does not see step_t, which step() bumps in place.
            step_for_beta1 = step.clone() if differentiable and isinstance(beta1, Tensor) and beta1.requires_grad \
                else step
            step_for_beta2 = step.clone() if differentiable and isinstance(beta2, Tensor) and beta2.requires_grad \
                else step
            bias_correction1 = 1 - beta1**step_for_beta1
            bias_correction2 = 1 - beta2**step_for_beta2
            step_size = lr / bias_correction1
            step_size_neg = step_size.neg()
            bias_correction2_sqrt = bias_correction2.sqrt()
            if amsgrad:
                max_exp_avg_sq = max_exp_avg_sqs[i].clone() if differentiable else max_exp_avg_sqs[i]
                max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
                denom = (max_exp_avg_sqs[i].sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
                    eps / step_size_neg)
            else:
                denom = (exp_avg_sq.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
            param.addcdiv_(exp_avg.clone() if differentiable else exp_avg, denom)
        else:
            step = _get_value(step_t)
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

        if amsgrad and torch.is_complex(params[i]):
            max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])


def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale,
                        found_inf, *, amsgrad, has_complex, beta1, beta2, lr, weight_decay, eps, maximize,
                        capturable, differentiable, decoupled_weight_decay):
    if len(params) == 0:
        return
    if isinstance(lr, Tensor):
        if not capturable:
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(beta, Tensor):
            if not capturable:
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")
    if not torch.compiler.is_compiling() and capturable:
        supported_devices = _get_capturable_supported_devices(supports_xla=False)
        if not all(p.device.type == step.device.type and p.device.type in supported_devices
                   for p, step in zip(params, state_steps, strict=True)):
            raise AssertionError(f"If capturable=True, params and state_steps must be on supported devices: "
                                 f"{supported_devices}.")
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Expected grad_scale and found_inf to be None")
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    lr, beta1, beta2 = _to_scalar(lr), _to_scalar(beta1), _to_scalar(beta2)

    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    beta1_by_device = {beta1.device: beta1} if isinstance(beta1, Tensor) and str(beta1.device) != "cpu" else None
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs,
         device_state_steps), _ in grouped.values():
        device = device_params[0].device
        if beta1_by_device is not None and device not in beta1_by_device:
            beta1_by_device[device] = beta1.to(device=device, non_blocking=True)
        device_beta1 = beta1_by_device[device] if beta1_by_device else beta1
        if has_complex:
            if amsgrad:
                _view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs,
                              device_max_exp_avg_sqs)
            else:
                _view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs)
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if not torch.compiler.is_compiling() and device_state_steps[0].is_cpu:
            # One wrapped scalar instead of one per tensor (torch's slow-path note).
            torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(device_state_steps, 1)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            elif maximize:  # device_grads is already a fresh negated copy
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
            else:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        torch._foreach_lerp_(device_exp_avgs, device_grads, cast(float, 1 - device_beta1))
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        if isinstance(beta2, Tensor):
            scaled_device_grads, value = torch._foreach_mul(device_grads, 1 - beta2), 1.0
        else:
            scaled_device_grads, value = device_grads, 1 - beta2
        torch._foreach_addcmul_(device_exp_avg_sqs, scaled_device_grads, device_grads, value)
        del device_grads, scaled_device_grads

        if capturable:
            # step_size = lr / (1 - beta1**t) and sqrt(1 - beta2**t), on the device.
            bias_correction1 = torch._foreach_pow(beta1, device_state_steps)
            bias_correction2 = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_sub_(bias_correction1, 1)
            torch._foreach_sub_(bias_correction2, 1)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_div_(bias_correction1, lr)
            torch._foreach_reciprocal_(bias_correction1)
            torch._foreach_sqrt_(bias_correction2)
            step_size, bias_correction2_sqrt = bias_correction1, bias_correction2
            if amsgrad:
                torch._foreach_maximum_(device_max_exp_avg_sqs, device_exp_avg_sqs)
                exp_avg_sq_sqrt = torch._foreach_sqrt(device_max_exp_avg_sqs)
            else:
                exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, eps)
            torch._foreach_div_(exp_avg_sq_sqrt, step_size)
            torch._foreach_addcdiv_(device_params, device_exp_avgs, exp_avg_sq_sqrt)
        else:
            bias_correction1 = [1 - beta1 ** _get_value(step) for step in device_state_steps]
            bias_correction2 = [1 - beta2 ** _get_value(step) for step in device_state_steps]
            step_size = _stack_if_compiling([(lr / bc) * -1 for bc in bias_correction1])
            bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
            if amsgrad:
                torch._foreach_maximum_(device_max_exp_avg_sqs, device_exp_avg_sqs)
                exp_avg_sq_sqrt = torch._foreach_sqrt(device_max_exp_avg_sqs)
            else:
                exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, eps)
            torch._foreach_addcdiv_(device_params, device_exp_avgs, exp_avg_sq_sqrt, step_size)


# As torch does for its own fused functions: dynamo does not trace into the fused
# kernel call (functionalization cannot handle its in-place list arguments).
@torch._disable_dynamo
def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale, found_inf, *,
                 amsgrad, has_complex, beta1, beta2, lr, weight_decay, eps, maximize, capturable, differentiable,
                 decoupled_weight_decay):
    del has_complex, capturable  # the kernel refuses complex params; it keeps its state on the device anyway
    if not params:
        return
    if differentiable:
        raise RuntimeError("Adam with fused=True does not support differentiable=True")
    beta1, beta2 = _to_scalar(beta1), _to_scalar(beta2)
    grad_scale_by_device = {grad_scale.device: grad_scale} if grad_scale is not None else {}
    found_inf_by_device = {found_inf.device: found_inf} if found_inf is not None else {}
    # A CPU tensor lr is read by the kernel; elsewhere it is copied once per device.
    lr_by_device = {lr.device: lr} if isinstance(lr, Tensor) and str(lr.device) != "cpu" else None
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    # Under torch.compile the grouping key is (None, None): no device to look at here.
    for (device, _), ((device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs,
                       device_state_steps), _) in grouped.items():
        device_grad_scale = device_found_inf = None
        if grad_scale is not None:
            device_grad_scale = grad_scale_by_device.setdefault(device, grad_scale.to(device, non_blocking=True))
        if found_inf is not None:
            device_found_inf = found_inf_by_device.setdefault(device, found_inf.to(device, non_blocking=True))
        if lr_by_device is not None and device not in lr_by_device:
            lr_by_device[device] = lr.to(device=device, non_blocking=True)
            lr = lr_by_device[device]
        torch._foreach_add_(device_state_steps, 1)
        kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        kernel(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs,
               device_state_steps, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
               eps=eps, maximize=maximize, grad_scale=device_grad_scale, found_inf=device_found_inf)
        if device_found_inf is not None:
            # The kernel skipped the update on inf/nan grads; undo the step count too.
            torch._foreach_sub_(device_state_steps, [device_found_inf] * len(device_state_steps))


def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
          # Positional-with-default, as torch's functional (torch.distributed.optim passes them so).
          foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
          fused: bool | None = None, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
          has_complex: bool = False, *, amsgrad: bool, beta1: float | Tensor, beta2: float | Tensor,
          lr: float | Tensor, weight_decay: float, eps: float, maximize: bool) -> None:
    """Functional AdamW: updates ``params`` and the state tensors in place (see :class:`AdamW`)."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=foreach,
          capturable=capturable, differentiable=differentiable, fused=fused, grad_scale=grad_scale,
          found_inf=found_inf, has_complex=has_complex, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
          weight_decay=weight_decay, eps=eps, maximize=maximize, decoupled_weight_decay=True)


# Under torch.compile, CUDA state steps without capturable run this eagerly, as in torch.
@_disable_dynamo_if_unsupported()
def _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=None, capturable=False,
          differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False, *, amsgrad,
          beta1, beta2, lr, weight_decay, eps, maximize, decoupled_weight_decay) -> None:
    """torch's ``adam`` dispatch: picks the path as torch does and runs it."""
    if fused is None and foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
        # A tensor lr is not supported by foreach unless capturable: fall back rather than raise.
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False
    fused, foreach = bool(fused), bool(foreach)
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("API has changed, `state_steps` argument must contain a list of singleton tensors")
    if fused:
        func = _fused_adamw
    elif foreach:
        func = _multi_tensor_adamw
    else:
        func = _single_tensor_adamw
    func(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale, found_inf,
         amsgrad=amsgrad, has_complex=has_complex, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
         eps=eps, maximize=maximize, capturable=capturable, differentiable=differentiable,
         decoupled_weight_decay=decoupled_weight_decay)
