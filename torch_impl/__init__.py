"""AdamW for PyTorch, bitwise equal to torch.optim.AdamW's paths and state-dict compatible with it."""

from torch_impl.adamw import AdamW, adamw

__all__ = ["AdamW", "adamw"]
