"""Shared pytest setup: opt-in slow tests, offline model hub, quiet threads, tiny teachers."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches written by the code under test (weights hashes, sdists) go to a throwaway folder,
# never into the user's ~/.cache/codejepa.
_OWN_CACHE: str | None = None
if "CODEJEPA_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["CODEJEPA_CACHE"] = tempfile.mkdtemp(prefix="codejepa-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE is not None:  # one folder a test session, not one left in /tmp after every run
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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


@pytest.fixture(scope="session")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny causal (Qwen2) and a tiny bidirectional (BERT) teacher, built once per session
    (a test that changes one puts it back)."""
    from _embed_fixtures import make_tiny_bert, make_tiny_qwen2
    from codejepa.embed.teacher import Teacher, resolve_teacher

    tmp = tmp_path_factory.mktemp("teachers")
    return {
        "causal": Teacher(resolve_teacher(str(make_tiny_qwen2(tmp / "q"))), device="cpu", dtype="float32"),
        "bidirectional": Teacher(resolve_teacher(str(make_tiny_bert(tmp / "b"))), device="cpu", dtype="float32"),
    }
