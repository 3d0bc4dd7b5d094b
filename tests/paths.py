"""Where the checkout's folders are, for tests (they always run from a checkout)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = REPO_ROOT / "environments"
