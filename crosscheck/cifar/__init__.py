"""The CIFAR-10 run (``cifar10``): the seed tutorial's CNN trained in PyTorch and Flax from the same weights.

:mod:`~crosscheck.cifar.data` loads and verifies the data, :mod:`~crosscheck.cifar.models`
holds both models, :mod:`~crosscheck.cifar.training` one training loop per framework,
:mod:`~crosscheck.cifar.parity` runs and checks them, :mod:`~crosscheck.cifar.report` writes the report.
"""
