"""Checking a user's port (``port``, ``assert_trajectories_match``, ``locate_divergence``).

:mod:`~crosscheck.port.parity` trains both models on shared batches and compares,
:mod:`~crosscheck.port.locate` finds the first module whose output parts and names the cause,
:mod:`~crosscheck.port.compare` holds what both compare with (layouts, gradient gaps),
:mod:`~crosscheck.port.examples` the built-in example ports, :mod:`~crosscheck.port.command` the CLI.
"""
