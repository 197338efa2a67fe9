#!/usr/bin/env python3
"""Two pruned models on one benchmark case, sample by sample: which test samples only one of them gets right,
and whether that difference is more than chance (exact McNemar test).

    python benchmarks/paired.py --case ppocr-rec --sparsity 0.5 --methods unipts,reconstruct
    python benchmarks/paired.py --case ppocr-cls --models a.onnx,b.onnx

With ``--methods`` both models are pruned here with the configuration ``benchmarks/run.py`` uses for that cell
(same calibration images, seed, splits; quality gate off). A sample is right when the classifier's top-1
is its label, or the recogniser's greedy transcription equals its text (exact line, whitespace-normalised).
Prints one JSON object: the counts right by each, right by one only (``only_a``, ``only_b``) and the two-sided
exact McNemar p-value (the binomial test of ``only_a`` among ``only_a + only_b`` at 1/2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.cases.metrics import (  # noqa: E402
    TextLines,
    TopOne,
    ctc_greedy_decode,
    first_outputs,
    model_charset,
    normalise_text,
)
from onnxsparse.errors import OnnxSparseError  # noqa: E402

logger = logging.getLogger("benchmarks.paired")


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail of the discordant pairs at 1/2."""
    if only_a < 0 or only_b < 0:
        raise OnnxSparseError(f"discordant counts must be non-negative, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def right_per_sample(session, inputs: np.ndarray, labels, metric) -> np.ndarray:
    """Which test samples ``session`` gets right, by the case's metric (classifiers and text lines only)."""
    if isinstance(metric, TopOne):
        predicted = np.concatenate([out.reshape(len(out), -1).argmax(axis=1) for out in first_outputs(session, inputs)])
        return predicted == np.asarray(labels)
    if isinstance(metric, TextLines):
        charset = model_charset(session)
        texts: list[str] = []
        for probs in first_outputs(session, inputs):
            texts += ctc_greedy_decode(probs, charset)
        return np.array([normalise_text(p) == normalise_text(t) for p, t in zip(texts, labels)])
    raise OnnxSparseError(f"a paired test needs a right/wrong per sample; the {type(metric).__name__} metric "
                          "scores maps against the dense model")


def compare(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    if right_a.shape != right_b.shape:
        raise OnnxSparseError(f"the models were scored on different samples: {right_a.shape} vs {right_b.shape}")
    only_a = int((right_a & ~right_b).sum())
    only_b = int((right_b & ~right_a).sum())
    return {"samples": int(right_a.size), "right_a": int(right_a.sum()), "right_b": int(right_b.sum()),
            "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact(only_a, only_b)}


def _prune(case, method: str, sparsity: float, seed: int, out: Path, budget: float | None) -> Path:
    from benchmarks.run import _config
    from onnxsparse.pipeline import prune

    prune(case.model, out, case.calib, _config(method, sparsity, seed, budget), preprocess=case.preprocess,
          force=True, progress=False)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--case", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", help="two methods to prune with, comma-separated (e.g. unipts,reconstruct)")
    which.add_argument("--models", help="two pruned ONNX files, comma-separated")
    parser.add_argument("--sparsity", type=float, help="with --methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unipts-budget", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    from benchmarks.cases import get_case, load_test
    from benchmarks.run import _session

    torch.set_num_threads(args.threads)
    names = [v for v in (args.methods or args.models).split(",") if v]
    if len(names) != 2:
        parser.error(f"give exactly two, got {len(names)}")
    if args.methods and args.sparsity is None:
        parser.error("--methods needs --sparsity")
    case = get_case(args.case)
    test = load_test(case)
    with tempfile.TemporaryDirectory(prefix="onnxsparse-paired-") as work:
        paths = ([_prune(case, m, args.sparsity, args.seed, Path(work) / f"{m}.onnx", args.unipts_budget)
                  for m in names] if args.methods else [Path(p) for p in names])
        right = [right_per_sample(_session(p, args.threads), test.inputs, test.labels, case.metric) for p in paths]
    result = {"case": args.case, "a": names[0], "b": names[1], **({"sparsity": args.sparsity} if args.methods else {}),
              **compare(*right)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
