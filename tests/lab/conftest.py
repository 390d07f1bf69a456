import pytest

from tests.lab.harness import SESSION, lab_gate


@pytest.fixture(scope="session")
def lab_session():
    """The kernel lab runs of this pytest session (skips when the host cannot run the lab)."""
    lab_gate()
    return SESSION
