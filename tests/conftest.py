"""Fixtures shared by several test modules."""

import pytest
from hub_server import HubServer


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub-compatible server (tests/hub_server.py) for one test module, stopped after it."""
    server = HubServer(tmp_path_factory.mktemp("hub_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """save(T) -> the directory of a saved HFDDPMPipeline: the `test-tiny` UNet at 16x16 with one channel (the
    weights of seed 0) and T diffusion steps; for the tests that run a command on a model."""
    import torch
    from diffusers import UNet2DModel

    from hf_ddpm import HFDDPMPipeline, HFDDPMScheduler, unet_config

    def save(num_train_timesteps: int):
        path = tmp_path_factory.mktemp("tiny_pipeline") / "pipeline"
        torch.manual_seed(0)
        unet = UNet2DModel(**unet_config("test-tiny", sample_size=16, in_channels=1, out_channels=1))
        scheduler = HFDDPMScheduler(num_train_timesteps=num_train_timesteps)
        HFDDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
        return path

    return save


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run builds its own Accelerator; accelerate keeps process-wide singletons, reset before
    and after the test (between two runs of one test: training_runs.reset_accelerate). A module whose every test trains in
    process asks for it with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    import torch
    from training_runs import reset_accelerate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest, and immune to a busy machine
    reset_accelerate()  # also before: an in-process evaluation or CLI test of another module may have left state
    yield
    reset_accelerate()
    torch.set_num_threads(threads)


@pytest.fixture
def no_data(monkeypatch):
    """Reading a training run's data fails the test: the checks under test must all come first."""
    monkeypatch.setattr("hf_ddpm.training.main.load_training_data", lambda *_: pytest.fail("data read before checks"))


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images the data cache decodes (in this process: small data is preprocessed without a pool)."""
    import hf_ddpm.data.cache as cache_module

    count = [0]
    real = cache_module.decode_image

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "decode_image", counting)
    return count


@pytest.fixture
def one_thread():
    """One torch thread for the test (small models: fastest, and immune to a busy machine), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
