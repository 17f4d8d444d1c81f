"""Shared CLI plumbing: consoles, one-line errors, output formats, finding tables."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable

import typer

from normscope.errors import NormscopeError

SEVERITIES = ("error", "warning", "info")
RANK = {s: i for i, s in enumerate(SEVERITIES)}
STYLE = {"error": "bold red", "warning": "yellow", "info": "blue"}
STATE = {"debug": False}


def err_console():
    from rich.console import Console

    return Console(stderr=True, no_color="NO_COLOR" in os.environ or None, highlight=False)


def out_console():
    from rich.console import Console

    con = Console(no_color="NO_COLOR" in os.environ or None, highlight=False)
    if not con.is_terminal:  # piped or captured: wide enough for messages, never narrower than a TTY
        con = Console(no_color="NO_COLOR" in os.environ or None, highlight=False, width=max(con.width, 140))
    return con


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit (``--debug`` re-raises for a traceback)."""
    typer.echo(f"normscope: error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Bad input → one line on stderr and exit 2; ``--debug`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except NormscopeError as e:
            if STATE["debug"]:
                traceback.print_exc()
            fail(str(e))
        except Exception as e:  # noqa: BLE001 - never a traceback dump for the user
            if STATE["debug"]:
                traceback.print_exc()
            fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)")

    return wrapper


def check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise NormscopeError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def load_config(path: str | None) -> dict | None:
    """A TOML file of thresholds and options: ``[dead-units] warn = 0.2`` (one table per check)."""
    if path is None:
        return None
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise NormscopeError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise NormscopeError(f"config file {path} is not valid TOML: {e}") from None
    return data.get("checks", data) if isinstance(data.get("checks"), dict) else data


# evidence names that carry a finding's headline number, most telling first
KEY_HINTS = ("measured_shift", "shift", "dead_fraction", "fraction", "frac", "ratio", "gap", "batch", "count", "rate")


def key_number(evidence: dict) -> str:
    """The one number a table row shows: evidence['key'] names it, else the most telling numeric item."""
    if not evidence:
        return ""
    key = evidence.get("key")
    items = list(evidence.items())
    ranked = sorted(
        items, key=lambda kv: next((i for i, h in enumerate(KEY_HINTS) if h in kv[0] and "threshold" not in kv[0]), 99)
    )
    items = [(key, evidence[key])] if key in evidence else ranked
    for k, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return f"{k}={v}"
        return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
    return ""


def findings_table(findings: list[dict], title: str = "Findings"):
    from rich.table import Table

    t = Table(title=title, show_lines=False, expand=False)
    t.add_column("severity", no_wrap=True)
    t.add_column("check", no_wrap=True)
    t.add_column("layer", overflow="fold", max_width=24)
    t.add_column("message", overflow="fold", ratio=1)
    keys = [key_number(f.get("evidence") or {}) for f in findings]
    # a number is read whole: the column never wraps, it is as wide as its longest value
    t.add_column("key number", no_wrap=True, min_width=max((len(k) for k in keys), default=10))
    for f in sorted(findings, key=lambda f: RANK.get(f["severity"], 9)):
        n = (f.get("evidence") or {}).get("affected_layers") or 1
        where = (f.get("layer") or "") + (f" (+{n - 1} more)" if n > 1 else "")
        t.add_row(f"[{STYLE.get(f['severity'], '')}]{f['severity']}[/]", f["check"], _esc(where),
                  _esc(f["message"]), key_number(f.get("evidence") or {}))  # fmt: skip
    return t


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(str(text))


def summary(findings: list[dict]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITIES}


def exit_code(findings: list[dict], fail_on: str | None) -> int:
    if fail_on is None:
        return 0
    return 1 if any(RANK[f["severity"]] <= RANK[fail_on] for f in findings) else 0


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=1, default=str, allow_nan=False)


def to_junit(findings: list[dict], checks_run: list[str], skipped: list[dict], fail_on: str | None, name: str) -> str:
    """JUnit XML: a test case per check run; findings at/above --fail-on (default: warning) fail it."""
    threshold = RANK[fail_on or "warning"]
    suite = ET.Element("testsuite", name=f"normscope:{name}")
    by_check: dict[str, list[dict]] = {}
    for f in findings:
        by_check.setdefault(f["check"], []).append(f)
    n_fail = n_skip = 0
    for check in sorted(set(checks_run) | set(by_check) | {s["check"] for s in skipped}):
        case = ET.SubElement(suite, "testcase", classname="normscope", name=check)
        fs = by_check.get(check, [])
        failing = [f for f in fs if RANK[f["severity"]] <= threshold]
        sk = [s for s in skipped if s["check"] == check]
        if failing:
            n_fail += 1
            text = "\n".join(f"{f['severity']}: {f.get('layer') or '-'}: {f['message']}" for f in failing)
            ET.SubElement(case, "failure", message=failing[0]["message"], type=failing[0]["severity"]).text = text
        elif sk:
            n_skip += 1
            ET.SubElement(case, "skipped", message=sk[0].get("reason", ""))
        if fs and len(failing) < len(fs):
            ET.SubElement(case, "system-out").text = "\n".join(
                f"{f['severity']}: {f.get('layer') or '-'}: {f['message']}" for f in fs if f not in failing
            )
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(n_fail))
    suite.set("skipped", str(n_skip))
    suite.set("errors", "0")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
