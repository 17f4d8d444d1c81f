"""Reading a run directory back: :func:`load` → :class:`Run` with pandas DataFrames."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from normscope.errors import NormscopeError
from normscope.store.sidecars import read_fold, read_probe
from normscope.store.writer import FORMAT, LEGACY_TABLE_DIRS, SCHEMA, TABLES, _arrow_type

if TYPE_CHECKING:  # pandas is imported on first read, keeping `import normscope` (and training) light
    import pandas as pd


class Run:
    """A recorded run. Tables are read lazily and cached; :meth:`reload` re-reads a live run.

    - ``meta``: the run's ``meta.json`` (model summary, execution order, options, versions).
    - ``stats``: activation statistics, one row per step × phase × layer call × output.
    - ``grads``: gradient statistics w.r.t. hooked outputs (same keys as ``stats``).
    - ``params``: per parameter tensor norms (‖w‖, ‖∇w‖, ‖Δw‖), lr and weight decay.
    - ``scalars``: values logged with ``Scope.log`` (loss, ...), and, phase ``"amp"``, the loss
      scale of a ``GradScaler`` run (``loss_scale``, ``skipped``, ``skipped_total``).
    - ``skipped_steps``: the sampled steps whose optimizer step the loss scaler skipped.
    - ``signals``: named per-layer measurements beyond the activation pack (long format: step,
      phase, layer, call, name, value), e.g. the attention-logit maximum or BN running-stat drift.
    - ``layers``: hooked layers in execution order of the first forward (DataFrame).
    - ``modules``: ``{name: {type, params, hooked, family, ...}}`` for every module of the model.
    - ``probe`` / ``fold``: the side files ``probe.json`` / ``fold.json`` ({} / None when absent).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.meta = _read_meta(self.run_dir)

    def reload(self) -> Run:
        return Run(self.run_dir)

    def _table(self, name: str) -> pd.DataFrame:
        return read_table(self.run_dir, name)

    @cached_property
    def stats(self) -> pd.DataFrame:
        return self._table("stats")

    @cached_property
    def grads(self) -> pd.DataFrame:
        return self._table("grads")

    @cached_property
    def params(self) -> pd.DataFrame:
        return self._table("params")

    @cached_property
    def scalars(self) -> pd.DataFrame:
        return self._table("scalars")

    @cached_property
    def signals(self) -> pd.DataFrame:
        return self._table("signals")

    @cached_property
    def skipped_steps(self) -> frozenset[int]:
        """Sampled steps a ``GradScaler`` skipped (Inf/NaN gradients: the optimizer did not step;
        the gradients recorded there are the overflowed ones the scaler discarded)."""
        sc = self.scalars
        if not len(sc):
            return frozenset()
        d = sc[(sc.phase == "amp") & (sc.name == "skipped") & (sc.value > 0)]
        return frozenset(int(s) for s in d.step)

    def signal(self, name: str, phase: str | None = "train") -> pd.DataFrame:
        """The rows of one signal (all phases when ``phase`` is None), sorted by layer and step."""
        s = self.signals
        s = s[s.name == name]
        if phase is not None:
            s = s[s.phase == phase]
        return s.sort_values(["layer", "call", "step"]).reset_index(drop=True)

    @cached_property
    def layers(self) -> pd.DataFrame:
        import pandas as pd

        rows = self.meta.get("execution_order") or []
        types = {m["name"]: m for m in self.meta.get("modules", [])}
        out = []
        for i, r in enumerate(rows):
            m = types.get(r["layer"], {})
            out.append(
                {
                    "order": i,
                    "layer": r["layer"],
                    "call": r["call"],
                    "module_type": m.get("type"),
                    "params": m.get("params"),
                }
            )
        return pd.DataFrame(out, columns=["order", "layer", "call", "module_type", "params"])

    @cached_property
    def modules(self) -> dict[str, dict]:
        return {m["name"]: dict(m) for m in self.meta.get("modules", [])}

    @cached_property
    def probe(self) -> dict:
        return read_probe(self.run_dir) or {}

    @cached_property
    def fold(self) -> dict | None:
        return read_fold(self.run_dir)

    @property
    def state(self) -> dict:
        """Whether the run is still being written: :func:`writer_state` of ``meta`` with the last
        step whose rows reached the disk."""
        st = self.stats
        last = int(st["step"].max()) if len(st) else None
        return writer_state(self.meta, last)

    @property
    def steps(self) -> list[int]:
        s = self.stats
        return sorted(s["step"].unique().tolist()) if len(s) else []

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, status={self.meta.get('status')!r})"


STALE_S = 900.0  # a writer on another host is presumed dead after this long without a flush


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def writer_state(meta: dict, last_step: int | None = None, now: float | None = None) -> dict:
    """``{"state", "last_step", "why", "text"}``; state is ``complete``, ``failed``, ``running`` (the
    writer is alive, or cannot be checked) or ``incomplete`` (status says running but the writer
    is gone: killed, crashed, or silent for :data:`STALE_S` on another host). ``last_step``: the
    last step whose rows were flushed (default: ``meta["last_step"]``)."""
    status = str(meta.get("status") or "?")
    if last_step is None:
        last_step = meta.get("last_step")
    out = {"state": status, "last_step": last_step, "why": "", "text": status}
    if status == "complete":
        return out
    if status.startswith("failed"):
        out["state"] = "failed"
        return out
    if status != "running":
        return out
    w = meta.get("writer") or {}
    why = ""
    pid, host = w.get("pid"), w.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        if not _pid_alive(pid):
            why = f"its writer (pid {pid} on {host}) is gone"
    elif meta.get("heartbeat"):
        try:
            beat = _dt.datetime.fromisoformat(meta["heartbeat"]).timestamp()
        except (TypeError, ValueError):
            beat = None
        age = (now if now is not None else time.time()) - beat if beat is not None else None
        if age is not None and age > STALE_S:
            why = f"no flush for {age / 60:.0f} min (writer pid {pid} on {host})"
    if why:
        shown = "none" if last_step is None else str(last_step)
        out.update(state="incomplete", why=why, text=f"incomplete: last flushed step {shown} ({why})")
    return out


def _read_meta(run_dir: Path) -> dict:
    if not run_dir.exists():
        raise NormscopeError(f"run directory {run_dir} does not exist: pass a folder written by normscope.watch.")
    if not run_dir.is_dir():
        raise NormscopeError(f"{run_dir} is not a directory: pass a run folder written by normscope.watch.")
    path = run_dir / "meta.json"
    if not path.exists():
        raise NormscopeError(f"{path} is missing: {run_dir} is not a normscope run directory.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormscopeError(f"{path} is corrupt ({type(e).__name__}: {e}); the run cannot be read.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NormscopeError(f"{path} is not a normscope run ({FORMAT}) metadata file.")
    return meta


def _empty(name: str) -> pd.DataFrame:
    import pyarrow as pa

    schema = pa.schema([(c, _arrow_type(t)) for c, t in SCHEMA[name].items()])
    return schema.empty_table().to_pandas()


def read_table(run_dir: Path, name: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if name not in TABLES:
        raise NormscopeError(f"unknown table {name!r}: one of {', '.join(TABLES)}.")
    parts = []
    for sub in (name, *LEGACY_TABLE_DIRS.get(name, ())):
        folder = Path(run_dir) / "stats" / sub
        parts += sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        return _empty(name)
    tables = []
    schema = pa.schema([(c, _arrow_type(t)) for c, t in SCHEMA[name].items()])
    for p in parts:
        try:
            tables.append(pq.read_table(p).cast(schema))
        except FileNotFoundError:
            continue  # removed between listing and reading: nothing to read
        except (OSError, pa.ArrowException) as e:
            raise NormscopeError(f"{p} is corrupt ({e}); delete it to read the rest of the run.") from None
    df = pa.concat_tables(tables, promote_options="default").to_pandas() if tables else _empty(name)
    return df.reset_index(drop=True)
