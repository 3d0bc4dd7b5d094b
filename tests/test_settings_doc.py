"""docs/settings.md lists every GROUNDLOOP_* variable and is what the settings classes say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from groundloop.cli.settings_doc import settings_classes

ROOT = Path(__file__).resolve().parents[1]


def test_committed_settings_doc_is_regenerated_unchanged() -> None:
    fresh = subprocess.run(
        [sys.executable, "-m", "groundloop.cli", "settings"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert fresh == committed, "docs/settings.md is stale: groundloop settings > docs/settings.md"
    assert "`GROUNDLOOP_RUNNER_GPUS_PER_RUN`" in committed
    assert "`GROUNDLOOP_LLM_PRICES_FILE`" in committed


def test_every_basesettings_class_in_the_source_tree_is_documented() -> None:
    declared: set[str] = set()
    for path in [*ROOT.glob("shared/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        declared |= set(re.findall(r"^class (\w+)\(BaseSettings\)", path.read_text(), re.M))
    assert declared, "found no settings class: the search pattern is wrong"
    assert declared <= {cls.__name__ for cls in settings_classes()}
