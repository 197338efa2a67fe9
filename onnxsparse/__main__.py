"""``python -m onnxsparse``: the command line, as torchrun needs it (``torchrun ... -m onnxsparse prune ...``)."""

from onnxsparse_cli.main import main

if __name__ == "__main__":
    main(prog_name="onnxsparse")
