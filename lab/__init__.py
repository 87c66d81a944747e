"""The experiments on top of ``partition``, ``hessian`` and ``optimizer``.

Testbed models and data, the training loop, the experiment runners behind ``figures/`` and the
``adam-mini-lab`` command line (:mod:`lab.cli`).
"""
