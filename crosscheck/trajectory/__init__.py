"""The trajectory harness (``python -m crosscheck``, ``trajectory``): every AdamW fed the same gradients.

:mod:`~crosscheck.trajectory.implementations` puts each AdamW behind one interface,
:mod:`~crosscheck.trajectory.sources` makes the param sets and gradient streams,
:mod:`~crosscheck.trajectory.harness` runs and measures them, :mod:`~crosscheck.trajectory.suite`
holds the built-in cases, :mod:`~crosscheck.trajectory.report` writes their tables and figure.
"""
