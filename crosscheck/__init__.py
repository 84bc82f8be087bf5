"""Numerical parity of AdamW and training between PyTorch and JAX/Flax."""

from crosscheck.parity import ParityReport, assert_trajectories_match

__all__ = ["ParityReport", "assert_trajectories_match"]
