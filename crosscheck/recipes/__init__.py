"""Training recipes (``recipes``) and lr schedules (``schedules``) against torch, step by step.

:mod:`~crosscheck.recipes.training` runs clipping, accumulation, loss scaling and param
groups in both frameworks; :mod:`~crosscheck.recipes.schedules` every torch lr scheduler
against its ``jax_impl.schedules`` twin.
"""
