"""The GPU command (``gpu``): parity with torch's CUDA AdamW and step time against HBM, in one run.

:mod:`~crosscheck.gpu.command` splits the budget and runs the parts, each in a module of its own
(:mod:`~crosscheck.gpu.parity`, :mod:`~crosscheck.gpu.speed`, :mod:`~crosscheck.gpu.training`,
:mod:`~crosscheck.gpu.cifar`) on :mod:`~crosscheck.gpu.settings`; :mod:`~crosscheck.gpu.report` writes the report.
"""
