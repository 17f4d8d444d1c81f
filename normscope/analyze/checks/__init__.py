"""The built-in checks, one module per check id (``dead-units`` → ``dead_units.py``).

The registry imports every public module of this package on first use; modules whose name
starts with ``_`` hold helpers shared by a family of checks (``_bn.py``: BatchNorm,
``_gradflow.py``: gradient flow along depth, ``_fitting.py``: loss curves, ``_util.py``:
message formatting). See docs/contributing.md for adding a check.
"""
