"""Fixtures shared by several test modules."""

import pytest
from hub_server import HubServer


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub-compatible server (tests/hub_server.py) for one test module, stopped after it."""
    server = HubServer(tmp_path_factory.mktemp("hub_server"))
    yield server
    server.stop()


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run builds its own Accelerator; accelerate keeps process-wide singletons, reset after
    the test. A module whose every test trains in process asks for it with
    `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest, and immune to a busy machine
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
