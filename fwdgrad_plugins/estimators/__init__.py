"""Gradient estimators, one module per family, and ``ForwardGradientEstimator`` (``core``),
which every integration uses in place of ``loss.backward()``.

- ``weight``: FG-W, the paper's weight perturbation;
- ``blockwise`` and ``guided``: lower-variance weight perturbation;
- ``activity``: FG-A, activity perturbation; ``per_example``: per-example weight perturbation;
- ``local_losses``: LG-FG-A, activity perturbation with local losses;
- ``spsa``: MeZO's zeroth-order estimator, the comparator.

Each registers its names through the ``register_estimators`` hook
(``python -m fwdgrad_plugins list`` lists them).
"""

from fwdgrad_plugins.estimators.core import Estimate, ForwardGradientEstimator

__all__ = ["Estimate", "ForwardGradientEstimator"]
