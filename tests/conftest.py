import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ONNXSPARSE_FAILURE_LOG set, each failure's name and last lines are appended to that file as it
    happens (benchmarks/gpu_check.sh: a run cut by its time limit still names what failed)."""
    path = os.environ.get("ONNXSPARSE_FAILURE_LOG")
    if not path or not report.failed:
        return
    tail = str(report.longrepr).splitlines()[-15:]
    with open(path, "a") as fh:
        fh.write(f"FAILED {report.nodeid} ({report.when})\n" + "\n".join(tail) + "\n\n")
