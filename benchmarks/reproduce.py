#!/usr/bin/env python3
"""Prune a benchmark case with the default recipe and print the written model's SHA-256, the wall time and the
machine's load: run it twice (once beside other work) and compare the hashes.

    python benchmarks/reproduce.py --case ppocr-cls --sparsity 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.cases import get_case
    from benchmarks.provenance import git_state
    from onnxsparse import PruneConfig, prune

    torch.set_num_threads(args.threads)
    case = get_case(args.case)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        result = prune(case.model, out, case.calib, PruneConfig(sparsity=args.sparsity, seed=args.seed,
                                                                device="cpu"),
                       preprocess=case.preprocess, progress=False)
        digest = sha256(out)
    state = git_state()
    print(json.dumps({
        "case": args.case, "sparsity": args.sparsity, "threads": args.threads, "seed": args.seed,
        "sha256": digest, "wall_s": round(time.perf_counter() - started, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "gate": result.report["quality_gate"].get("agreement"), "commit": state.commit, "dirty": state.dirty,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
