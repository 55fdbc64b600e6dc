"""UNet presets: the paper's parameter counts, output shapes, learned variance, and errors on bad input.

The two paper-sized models are built on the "meta" device (shapes only, no memory, no initialization), which
keeps these tests fast; the slow tests build them for real and run a forward pass.
"""

import pytest
import torch
from diffusers import UNet2DModel

from hf_ddpm.unet import UNET_PRESETS, unet_config

SMALL_PRESETS = ["mnist-28", "digits-16-tiny", "test-tiny"]
PAPER_PRESETS = ["ddpm-cifar10-32", "ddpm-celebahq-256"]


def build(config: dict, device: str = "cpu") -> UNet2DModel:
    with torch.device(device):
        return UNet2DModel(**config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward(model: UNet2DModel, batch_size: int = 2) -> torch.Tensor:
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.randn(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)  # (B, C, H, W)
    t = torch.tensor([0, 999] * (batch_size // 2) + [500] * (batch_size % 2), device=device)
    with torch.no_grad():
        return model(x, t).sample


def test_preset_names():
    assert set(UNET_PRESETS) == {*PAPER_PRESETS, *SMALL_PRESETS}


def test_cifar10_has_the_papers_35_7m_parameters():
    # Ho et al. 2020, Appendix B: "Our CIFAR10 model has 35.7 million parameters".
    n = n_params(build(unet_config("ddpm-cifar10-32"), "meta"))
    assert n == 35_746_307
    assert round(n / 1e6, 1) == 35.7


def test_celebahq_has_the_papers_114m_parameters():
    # Ho et al. 2020, Appendix B: "our LSUN and CelebA-HQ models have 114 million parameters".
    n = n_params(build(unet_config("ddpm-celebahq-256"), "meta"))
    assert n == 113_673_219
    assert round(n / 1e6) == 114


def test_cifar10_matches_the_hub_checkpoint_config():
    # google/ddpm-cifar10-32/unet/config.json, the converted checkpoint of the paper's model.
    hub = {
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": (128, 256, 256, 256),
        "center_input_sample": False,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    }
    cfg = unet_config("ddpm-cifar10-32")
    assert {k: cfg[k] for k in hub} == hub


def test_cifar10_dropout_is_the_papers_0_1():
    cfg = unet_config("ddpm-cifar10-32")
    assert cfg["dropout"] == 0.1
    model = build(cfg, "meta")
    # Dropout sits in every residual block (8 down, 2 middle, 12 up) and nowhere else, as in the paper's code.
    resnets = [r for block in (*model.down_blocks, model.mid_block, *model.up_blocks) for r in block.resnets]
    assert [r.dropout.p for r in resnets] == [0.1] * 22
    all_dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert sorted(all_dropouts) == [0.0] * (len(all_dropouts) - 22) + [0.1] * 22  # attention output: none
    assert unet_config("ddpm-celebahq-256")["dropout"] == 0.0


def test_attention_is_single_head_at_16x16():
    model = build(unet_config("ddpm-cifar10-32"), "meta")
    # Down path: level 1 (16x16) only; up path: level 2 (16x16) only; plus the middle block.
    assert [hasattr(b, "attentions") for b in model.down_blocks] == [False, True, False, False]
    assert [hasattr(b, "attentions") for b in model.up_blocks] == [False, False, True, False]
    assert all(a.heads == 1 for b in model.down_blocks if hasattr(b, "attentions") for a in b.attentions)
    assert model.mid_block.attentions[0].heads == 1


@pytest.mark.parametrize("name", UNET_PRESETS)
def test_every_preset_maps_sample_size_to_itself(name):
    cfg = unet_config(name)
    device = "cpu" if name in SMALL_PRESETS else "meta"  # the paper's models: shapes only
    out = forward(build(cfg, device))
    assert out.shape == (2, cfg["out_channels"], cfg["sample_size"], cfg["sample_size"])


@pytest.mark.parametrize("name", UNET_PRESETS)
def test_learned_variance_doubles_the_output_channels(name):
    cfg = unet_config(name, learned_variance=True)
    assert cfg["out_channels"] == 2 * cfg["in_channels"]
    device = "cpu" if name == "test-tiny" else "meta"
    out = forward(build(cfg, device))
    assert out.shape == (2, 2 * cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])


def test_learned_variance_doubles_an_overridden_out_channels():
    assert unet_config("test-tiny", out_channels=5, learned_variance=True)["out_channels"] == 10


def test_small_presets_are_small():
    counts = {name: n_params(build(unet_config(name), "meta")) for name in SMALL_PRESETS}
    assert counts == {"mnist-28": 6_469_889, "digits-16-tiny": 810_817, "test-tiny": 45_259}


def test_test_tiny_is_deterministic_given_the_seed():
    torch.manual_seed(0)
    a = build(unet_config("test-tiny"))
    torch.manual_seed(0)
    b = build(unet_config("test-tiny"))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    assert torch.equal(a(x, t).sample, b(x, t).sample)


def test_overrides_replace_preset_values():
    cfg = unet_config("test-tiny", sample_size=16, in_channels=1, out_channels=1)
    assert (cfg["sample_size"], cfg["in_channels"], cfg["out_channels"]) == (16, 1, 1)
    assert forward(build(cfg)).shape == (2, 1, 16, 16)


def test_configs_are_fresh_copies():
    cfg = unet_config("test-tiny")
    cfg["sample_size"] = 1024
    assert unet_config("test-tiny")["sample_size"] == 8


def test_unknown_preset_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown UNet preset 'cifar10'.*'ddpm-cifar10-32'.*'test-tiny'"):
        unet_config("cifar10")


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match=r"unknown UNet2DModel argument\(s\) \['num_res_blocks'\]"):
        unet_config("test-tiny", num_res_blocks=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_run_for_real(name):
    cfg = unet_config(name)
    torch.manual_seed(0)
    model = build(cfg).eval()
    out = forward(model, batch_size=1)
    assert out.shape == (1, 3, cfg["sample_size"], cfg["sample_size"])
    assert torch.isfinite(out).all()


def test_weights_digest_names_the_weights_in_any_memory_format_and_continues_a_digest():
    import hashlib

    from hf_ddpm.unet import weights_digest

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("test-tiny"))
    same = weights_digest(unet).hexdigest()
    channels_last = unet.to(memory_format=torch.channels_last)  # the layout is not the weights
    assert weights_digest(channels_last).hexdigest() == same
    assert weights_digest(unet, hashlib.sha256(b"config")).hexdigest() != same  # continued from what it is given
    with torch.no_grad():
        unet.conv_in.bias[0] += 1e-3  # one value changed
    assert weights_digest(unet).hexdigest() != same
    assert weights_digest(unet.half()).hexdigest() != weights_digest(unet.float()).hexdigest()  # the dtype counts
