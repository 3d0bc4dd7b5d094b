"""Fixtures for the runner's tests: a copy of the environments whose manifests have a short
budget, and settings that point the runner at it."""

from pathlib import Path

import pytest

from groundloop.settings import Settings
from tests.runner_support import make_environments


@pytest.fixture
def envs(tmp_path: Path) -> Path:
    return make_environments(tmp_path / "envs", wall=60)


@pytest.fixture
def env_settings(settings: Settings, envs: Path) -> Settings:
    return settings.model_copy(update={"environments_dir": envs})
