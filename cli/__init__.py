"""The ``normscope`` command line (installed as the ``normscope_cli`` package)."""
