"""Where the checkout's folders are, for tests (they always run from a checkout)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = REPO_ROOT / "environments"


def smoked_synthetic(tmp: Path) -> Path:
    """A copy of the synthetic environment under `tmp`, without `trusted_knobs`, so that its
    knob patches get a pre-flight smoke run; the folder to load it from."""
    import shutil

    copy = tmp / "envs" / "synthetic"
    shutil.copytree(ENVIRONMENTS / "synthetic", copy)
    manifest = copy / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("trusted_knobs = true", ""))
    return copy.parent
