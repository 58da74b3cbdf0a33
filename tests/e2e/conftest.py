"""End-to-end tests: whole commands and chains of them (convert -> cache -> train with kill -9 / resume -> export ->
sample) run through scripts/ and convert/, in subprocesses or in-process ``main``. Every test here is marked ``e2e``
(``make test-fast`` leaves them out; ``make test`` runs them)."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
