"""Fixtures shared by several test modules."""

import pytest
from hub_server import HubServer


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub-compatible server (tests/hub_server.py) for one test module, stopped after it."""
    server = HubServer(tmp_path_factory.mktemp("hub_server"))
    yield server
    server.stop()
