"""Command-line front end (installed as the ``onnxsparse_cli`` package)."""
