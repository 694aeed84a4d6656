"""Fixtures: the tiny Llama pools of :mod:`vocab_models`, built once per session."""

from __future__ import annotations

import pytest
from vocab_models import VocabPool, build_pool


@pytest.fixture(scope="session")
def vocab_pool(tmp_path_factory: pytest.TempPathFactory) -> VocabPool:
    return build_pool(tmp_path_factory.mktemp("vocab-pool"), tied=False)


@pytest.fixture(scope="session")
def tied_pool(tmp_path_factory: pytest.TempPathFactory) -> VocabPool:
    return build_pool(tmp_path_factory.mktemp("tied-pool"), tied=True)
