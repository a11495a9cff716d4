"""Shared pytest setup: opt-in slow tests, offline model hub, quiet threads."""

from __future__ import annotations

import os
import tempfile

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches written by the code under test (weights hashes, sdists) go to a throwaway folder,
# never into the user's ~/.cache/codejepa.
if "CODEJEPA_CACHE" not in os.environ:
    os.environ["CODEJEPA_CACHE"] = tempfile.mkdtemp(prefix="codejepa-test-cache-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run tests marked slow (network downloads, long benchmarks)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
