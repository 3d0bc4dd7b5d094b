#!/usr/bin/env python3
"""Set up and run groundloop with nothing but Python >= 3.11.

    python3 dev.py search [ARGS]   venv + install, then `groundloop search --env tinygpt ARGS`
    python3 dev.py test [ARGS]     venv + install, then `python -m pytest ARGS`
    python3 dev.py setup           venv + install only
    python3 dev.py run CMD [ARGS]  venv + install, then any command inside the venv

The virtual environment lives in .venv beside this file and is reinstalled only when
pyproject.toml changes. torch is pinned to 2.13.0 for CPU machines; to use your own build
(e.g. CUDA), install it into .venv first and it is kept.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".groundloop-installed"
TORCH = "torch==2.13.0"
EXTRAS = "envs,grpo-math,llm,api,report,postgres,dev"


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py must run on old Pythons to say so
        sys.exit(f"groundloop needs Python >= 3.11; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    sh(*pip, "--upgrade", "pip", "setuptools>=68", "wheel")
    has_torch = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        sh(*pip, TORCH)
    sh(*pip, "-e", f".[{EXTRAS}]")
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    setup()
    if command == "setup":
        return 0
    if command == "search":
        args = rest if any(a.startswith("--env") for a in rest) else ["--env", "tinygpt", *rest]
        cmd = [str(BIN / "groundloop"), "search", *args]
    elif command == "test":
        cmd = [str(PYTHON), "-m", "pytest", *rest]
    elif command == "run":
        cmd = [str(BIN / rest[0]) if (BIN / rest[0]).exists() else rest[0], *rest[1:]]
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
