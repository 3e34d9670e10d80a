"""Kernel tests run Triton under its CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection. Registers the `slow` marker
(CI runs `-m "not slow"`)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier kernel checks, deselected in CI (-m 'not slow')")
