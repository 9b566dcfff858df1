"""The MLflow tests run in a configured depthtune process (offline, quiet, no HTTP retries against a dead server)."""
from depthtune import runtime


def pytest_configure(config):
    runtime.configure_process()
