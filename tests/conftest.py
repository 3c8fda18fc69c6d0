from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora shared next to the repo (../shared/data); never copied into it."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert path.is_dir(), f"shared test data folder {path} is missing"
    return path
