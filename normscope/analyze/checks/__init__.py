"""The built-in checks; importing this package registers them (ids as in CHECKS.md)."""

from normscope.analyze.checks import (  # noqa: F401
    batchnorm,
    covariate_shift,
    dead_units,
    fitting,
    gradients,
    inputs,
    nonfinite,
    optimization,
    saturation,
    structure,
    weights,
)
