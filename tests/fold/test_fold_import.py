"""``import normscope.fold`` stays light: no onnx, onnxruntime, typer, rich or matplotlib."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_import_is_light():
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import fold_testlib, normscope.fold; "
        "print([m for m in ('onnx', 'onnxruntime', 'onnxscript', 'typer', 'rich', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
