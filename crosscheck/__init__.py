"""Numerical parity of AdamW and training between PyTorch and JAX/Flax."""

from crosscheck.locate import Divergence, locate_divergence
from crosscheck.parity import ParityReport, assert_trajectories_match

__all__ = ["Divergence", "ParityReport", "assert_trajectories_match", "locate_divergence"]
