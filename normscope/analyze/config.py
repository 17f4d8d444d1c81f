"""Thresholds for every check (defaults from CHECKS.md), overridable from a plain dict.

``Config.from_dict({"dead-units": {"warn": 0.2}, "disable": ["weight-sparsity"]})`` is what the
CLI builds from a TOML file; unknown checks, unknown keys and wrongly typed values raise a
one-line :class:`~normscope.errors.NormscopeError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from normscope.errors import NormscopeError

if TYPE_CHECKING:
    from normscope.analyze.registry import Thresholds


class Config:
    def __init__(self, thresholds: Mapping[str, Mapping[str, Any]] | None = None, disable: Iterable[str] = ()):
        from normscope.analyze.registry import registry

        reg = registry()
        self._values: dict[str, dict[str, Any]] = {cid: dict(spec.thresholds) for cid, spec in reg.items()}
        if isinstance(disable, str):
            disable = [disable]
        self.disabled: set[str] = set()
        for cid in disable:
            if cid not in reg:
                raise NormscopeError(f"cannot disable unknown check {cid!r}: known ids are {', '.join(sorted(reg))}.")
            self.disabled.add(cid)
        for cid, values in (thresholds or {}).items():
            if cid not in reg:
                raise NormscopeError(
                    f"unknown check {cid!r} in the configuration: known ids are {', '.join(sorted(reg))}."
                )
            if not isinstance(values, Mapping):
                raise NormscopeError(
                    f"configuration for {cid!r} must be a table of thresholds, got {type(values).__name__}."
                )
            for key, v in values.items():
                defaults = self._values[cid]
                if key not in defaults:
                    known = ", ".join(sorted(defaults)) or "none"
                    raise NormscopeError(f"unknown setting {key!r} for check {cid!r}: known settings are {known}.")
                self._values[cid][key] = _coerce(cid, key, defaults[key], v)
            _check_order(cid, reg[cid].thresholds, self._values[cid])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Config:
        """Build from ``{check_id: {setting: value}, "disable": [ids]}`` (e.g. a parsed TOML file)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise NormscopeError(f"configuration must be a table (dict), got {type(data).__name__}.")
        data = dict(data)
        disable = data.pop("disable", ())
        if not isinstance(disable, (list, tuple, set, str)):
            raise NormscopeError("configuration key 'disable' must be a list of check ids.")
        return cls(data, disable)

    def thresholds(self, check_id: str) -> Thresholds:
        """The thresholds a check runs with (defaults overridden by this configuration)."""
        from normscope.analyze.registry import Thresholds

        return Thresholds(self._values[check_id], check_id)

    def get(self, check_id: str, key: str) -> Any:
        return self._values[check_id][key]

    def enabled(self, check_id: str) -> bool:
        return check_id not in self.disabled

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {cid: dict(v) for cid, v in sorted(self._values.items()) if v}
        if self.disabled:
            out["disable"] = sorted(self.disabled)
        return out

    def __repr__(self) -> str:
        return f"Config(disabled={sorted(self.disabled)})"


def _coerce(cid: str, key: str, default: Any, v: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise NormscopeError(f"{cid}.{key} must be true or false, got {v!r}.")
        return v
    if isinstance(default, (int, float)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise NormscopeError(f"{cid}.{key} must be a number, got {v!r}.")
        if isinstance(default, int) and not isinstance(default, bool) and float(v) != int(v):
            raise NormscopeError(f"{cid}.{key} must be a whole number, got {v!r}.")
        return type(default)(v)
    if isinstance(default, str):
        if not isinstance(v, str):
            raise NormscopeError(f"{cid}.{key} must be a string, got {v!r}.")
        return v
    return v


def _check_order(cid: str, defaults: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """A warn threshold must sit on the milder side of its error threshold, in the direction the
    defaults give (dead-units: warn 0.1 < error 0.4; small-batch-bn: warn 16 > error 4)."""
    for wk in defaults:
        if "warn" not in wk:
            continue
        ek = wk.replace("warn", "error")
        if ek not in defaults or not all(
            isinstance(d.get(k), (int, float)) for d in (defaults, values) for k in (wk, ek)
        ):
            continue
        rising = defaults[ek] > defaults[wk]  # larger values are worse
        w, e = values[wk], values[ek]
        if (rising and w > e) or (not rising and w < e):
            side = "at or below" if rising else "at or above"
            raise NormscopeError(
                f"{cid}: {wk} = {w} must be {side} {ek} = {e} (a warning comes before an error); swap or fix them."
            )
