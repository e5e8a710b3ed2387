import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny policy, value model and verifier, built once per test session."""
    from huatuo.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
