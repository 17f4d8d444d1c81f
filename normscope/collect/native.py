"""The fused CPU kernel (``fused.cpp``): build it once per machine, load it, and say which path runs.

One call per hooked tensor instead of ~20 torch ops: on many small layers the fixed cost of each
op is most of the collector's cost (README, "Overhead"). The kernel is optional. Without a C++
compiler, or with ``NORMSCOPE_KERNEL=off``, the torch reductions of
:mod:`normscope.collect.reducers_fast` run instead, with the same statistics (the tests compare
both with numpy).

- ``normscope build-kernel`` builds it now and says where; ``scripts/setup.sh`` does so.
- ``NORMSCOPE_KERNEL=auto`` (the default): :func:`load` imports a build that exists. When none
  does, it starts one build in a background process at the lowest CPU priority and the run
  carries on with the torch path; later runs get the kernel.
- ``NORMSCOPE_KERNEL=off``: never build or load it.

Builds are cached under ``$NORMSCOPE_CACHE`` (default ``~/.cache/normscope``), keyed by the
kernel source, the torch and Python versions and the CPU's instruction-set flags (the kernel is
compiled for the machine it runs on: ``-march=native``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused.cpp")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]

KERNEL = None  # the loaded extension module, or None: the torch path
STATE = "not loaded"  # what :func:`load` found, for meta.json and the notes
_BUILD: subprocess.Popen | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), platform.machine().encode(),
                 _cpu_flags().encode(), " ".join(CFLAGS).encode()):  # fmt: skip
        h.update(part)
        h.update(b"\0")
    return f"normscope_fused_{h.hexdigest()[:16]}"


def cache_dir() -> Path:
    root = os.environ.get("NORMSCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "normscope")
    return Path(root) / "kernels"


def library_path() -> Path:
    name = build_name()
    return cache_dir() / name / f"{name}.so"


def mode() -> str:
    m = os.environ.get("NORMSCOPE_KERNEL", "auto").strip().lower() or "auto"
    return "off" if m in ("off", "0", "no", "false", "torch") else "auto"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(background_build: bool = True):
    """The kernel module if built (imported once), else None; in ``auto`` mode, a missing build
    starts one background build per process. Never raises: a kernel that fails to import is
    reported in :data:`STATE` and the torch path runs."""
    global KERNEL, STATE, _BUILD
    if mode() == "off":
        KERNEL, STATE = None, "off (NORMSCOPE_KERNEL=off)"
        return None
    if KERNEL is not None:
        STATE = "fused"
        return KERNEL
    try:
        path = library_path()
        if path.exists():
            KERNEL, STATE = _import(path), "fused"
            return KERNEL
    except Exception as e:  # a broken build: say so, keep training on the torch path
        STATE = f"unavailable ({type(e).__name__}: {e}); run `normscope build-kernel` to rebuild"
        return None
    building = "building in the background (this run uses the torch path)"
    if _BUILD is not None:
        STATE = building if _BUILD.poll() is None else (
            "not built (the background build failed: run `normscope build-kernel` to see why)")  # fmt: skip
    elif background_build:
        try:
            _BUILD = _spawn_build()
            STATE = building
        except OSError as e:
            STATE = f"not built ({e}); run `normscope build-kernel`"
    else:
        STATE = "not built; run `normscope build-kernel`"
    return None


def _spawn_build() -> subprocess.Popen:
    log = cache_dir() / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        code = "import sys; from normscope.collect.native import main; sys.exit(main(['--quiet', '--nice']))"
        return subprocess.Popen([sys.executable, "-c", code],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def build(verbose: bool = False) -> Path:
    """Compile the kernel (unless this machine has it already) and return the library's path.
    Compiled in a private directory and moved into place, so a concurrent loader never sees a
    half-written library. Raises on a compiler failure."""
    from torch.utils import cpp_extension

    path = library_path()
    if path.exists():
        return path
    name = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    here = str(Path(sys.executable).parent)  # the environment's own ninja (pip's), if it has one
    if (Path(here) / "ninja").exists() and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=path.parent) as tmp:
        cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=tmp, extra_cflags=CFLAGS,
                           verbose=verbose)  # fmt: skip
        os.replace(Path(tmp) / f"{name}.so", path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--nice" in argv:
        try:
            os.nice(19)
        except OSError:
            pass
    try:
        path = build(verbose="--verbose" in argv)
    except Exception as e:
        print(f"normscope: the fused CPU kernel did not build ({type(e).__name__}: {str(e).strip()[:500]}); "
              "the collector uses its torch path (same statistics, more cost per hooked tensor).", file=sys.stderr)  # fmt: skip
        return 1
    if "--quiet" not in argv:
        print(f"normscope: fused CPU kernel ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
