"""The HTML report layer (installed as the ``normscope_reports`` package)."""
