"""Shared data for the report tests (a unique module name: several test folders have a conftest)."""

FINDINGS = [
    {"check": "saturation", "severity": "warning", "layer": "gate", "step": [0, 5],
     "message": "The sigmoid gate is saturated.", "evidence": {"frac_sat": 0.9}, "recommendation": "Scale inputs down."},
    {"check": "dead-units", "severity": "info", "layer": "<script>alert(1)</script>", "step": 5,
     "message": "Some units of <script>alert(1)</script> never fire.", "evidence": {}, "recommendation": ""},
]  # fmt: skip
