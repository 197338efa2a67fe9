#!/usr/bin/env python3
"""Merge results files of benchmark runs made in parallel (``run.py --results X --no-write``) into
``benchmarks/results.json``, then regenerate RESULTS.md's generated section and curve.png.

    python benchmarks/merge.py /tmp/bench/cls.json /tmp/bench/rapid.json [--drop-unrecorded]

A run of a later file replaces the same case's run of the same method and sparsity; invocations are appended.
``--drop-unrecorded`` removes rows without provenance (no commit: made before rows recorded one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import report  # noqa: E402


def merge(base: dict, new: dict) -> dict:
    base.setdefault("cases", {})
    base.setdefault("invocations", [])
    for name, case in new.get("cases", {}).items():
        into = base["cases"].setdefault(name, {"runs": {}})
        runs = into.setdefault("runs", {})
        into.update({k: v for k, v in case.items() if k != "runs"})
        runs.update(case.get("runs", {}))
    base["invocations"] += new.get("invocations", [])
    if new.get("machine"):
        base["machine"] = new["machine"]
    return base


def drop_unrecorded(results: dict) -> int:
    dropped = 0
    for case in results.get("cases", {}).values():
        runs = case.get("runs", {})
        for key in [k for k, row in runs.items() if not row.get("commit")]:
            del runs[key]
            dropped += 1
    results["invocations"] = [inv for inv in results.get("invocations", []) if inv.get("commit")]
    return dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--drop-unrecorded", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and curve.png")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if args.drop_unrecorded:
        print(f"dropped {drop_unrecorded(results)} rows without provenance", file=sys.stderr)
    for path in args.files:
        results = merge(results, json.loads(path.read_text()))
    args.results.write_text(json.dumps(results, indent=1))
    text = report.markdown(results)
    print(text)
    if not args.no_write:
        report.update_results_md(HERE / "RESULTS.md", text)
        report.curve(results, HERE / "curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
