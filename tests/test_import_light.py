import subprocess
import sys


def test_import_normscope_is_light():
    code = (
        "import sys, normscope\n"
        "heavy = [m for m in ('matplotlib', 'jinja2', 'typer', 'rich', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_matches_package_metadata():
    from importlib.metadata import version

    import normscope

    assert normscope.__version__ == version("normscope")
