"""The probe's own file in a run directory: ``probe.json`` (atomic write, plain JSON).

It holds what the collector does not record and the probe measures with extra passes: the
module graph, module attributes, the optimizer's param groups, first-layer input statistics,
BN running statistics next to population statistics, the train/eval output gap, weight
sparsity and signal-propagation data. ``analyze`` reads it through ``run.run_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from normscope.errors import NormscopeError

PROBE_FILE = "probe.json"
PROBE_FORMAT = "normscope-probe/1"


def read_probe(run_dir) -> dict | None:
    path = Path(run_dir) / PROBE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormscopeError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it or re-run the probe.") from None
    if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT:
        raise NormscopeError(f"{path} is not a normscope probe file ({PROBE_FORMAT}); delete it or re-run the probe.")
    return data


def write_probe(run_dir, data: dict) -> None:
    from normscope.store.writer import write_json

    data = dict(data)
    data["format"] = PROBE_FORMAT
    write_json(Path(run_dir) / PROBE_FILE, data)
