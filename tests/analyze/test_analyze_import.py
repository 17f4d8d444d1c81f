import subprocess
import sys


def test_analyze_and_probe_import_light():
    code = (
        "import sys, normscope.analyze, normscope.probe\n"
        "heavy = [m for m in ('matplotlib', 'jinja2', 'typer', 'rich', 'sklearn', 'onnx') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
