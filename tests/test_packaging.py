"""pyproject lists packages explicitly (cli/ installs as onnxsparse_cli): keep the list complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "onnxsparse").rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert config["package-dir"]["onnxsparse_cli"] == "cli"
    assert (ROOT / "cli" / "__init__.py").is_file()
