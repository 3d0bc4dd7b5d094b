#!/usr/bin/env python3
"""Set up and run groundloop with nothing but Python >= 3.11.

    python3 dev.py search [ARGS]   venv + install, then `groundloop search --env tinygpt ARGS`
    python3 dev.py test [ARGS]     venv + install, then `python -m pytest ARGS`
    python3 dev.py check           venv + install, then ruff format --check, ruff lint, pyright
    python3 dev.py setup           venv + install only
    python3 dev.py run CMD [ARGS]  venv + install, then any command inside the venv

The virtual environment lives in .venv beside this file and is reinstalled only when a
member's pyproject.toml or constraints.txt changes. Every workspace member (shared/ and each
services/<role>/) is installed editable, with its own dependencies, pinned by constraints.txt.
torch is pinned to 2.13.0 for CPU machines; to use your own build (e.g. CUDA), install it into
.venv first and it is kept. The environments are data: .venv/share/groundloop/environments
links to this checkout's environments/ (an image copies them there instead).
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
CONSTRAINTS = ROOT / "constraints.txt"
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"
# Workspace members and the extras a developer wants.
MEMBERS = [
    "shared[llm,otlp]",
    "services/api[postgres]",
    "services/evolver",
    "services/ideator",
    "services/implementer[grpo-math]",
    "services/runner[grpo-math]",
    "services/rl-trainer",
    "services/cli",
]


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py must run on old Pythons to say so
        sys.exit(f"groundloop needs Python >= 3.11; this is {sys.version.split()[0]}")
    inputs = [CONSTRAINTS, DEV_REQUIREMENTS]
    inputs += [ROOT / m.split("[")[0] / "pyproject.toml" for m in MEMBERS]
    wanted = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + str(MEMBERS).encode())
    wanted = wanted.hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    sh(*pip, "--upgrade", "pip", "setuptools>=77", "wheel")
    has_torch = (
        subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True).returncode == 0
    )
    if not has_torch:
        sh(*pip, TORCH)
    editables = [arg for m in MEMBERS for arg in ("-e", f"./{m}")]
    sh(*pip, "-c", CONSTRAINTS, *editables, "-r", DEV_REQUIREMENTS)
    link_environments()
    STAMP.write_text(wanted)


def link_environments() -> None:
    """Install the environments as data where Settings looks for them (sys.prefix/share)."""
    target = VENV / "share" / "groundloop" / "environments"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(ROOT / "environments", target_is_directory=True)


def check() -> int:
    """The static checks CI runs before the tests; each must be clean."""
    steps = [
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "ruff", "check", "."],
        [BIN / "pyright"],
    ]
    failed = []
    for step in steps:
        print("+", " ".join(str(s) for s in step), flush=True)
        if subprocess.call([str(s) for s in step], cwd=ROOT) != 0:
            failed.append(step[1] if step[0].name == "ruff" else step[0].name)
    if failed:
        print(f"checks failed: {', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


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
    elif command == "check":
        return check()
    elif command == "run":
        cmd = [str(BIN / rest[0]) if (BIN / rest[0]).exists() else rest[0], *rest[1:]]
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
