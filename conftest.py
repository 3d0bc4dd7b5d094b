"""Registers the shared test fixtures for every test folder (shared/tests, services/*/tests,
tests): unit tests live beside their code, so the fixtures cannot come from one folder's
conftest.py."""

pytest_plugins = ["tests.fixtures", "tests.databases"]
