"""Stand-in inputs shared by the scheduler tests: x_0 on the pixel grid, network outputs, seeded generators."""

import torch

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
F64 = torch.float64


def f64(value) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)  # torch.tensor(python float) would round to float32


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_output(variance_type: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A stand-in network output: (B, C, H, W), or (B, 2C, H, W) with v in [-1, 1] for learned_range."""
    gen = seeded(seed)
    out = torch.randn(SHAPE, generator=gen, dtype=dtype)
    if variance_type == "learned_range":
        out = torch.cat([out, torch.rand(SHAPE, generator=gen, dtype=dtype) * 2 - 1], dim=1)
    return out


def pixels(seed: int, dtype=F64) -> torch.Tensor:
    """x_0 on the pixel grid k/127.5 - 1, with both edge values present."""
    k = torch.randint(0, 256, SHAPE, generator=seeded(seed))
    k.view(-1)[:2] = torch.tensor([0, 255])
    return k.to(dtype) / 127.5 - 1.0
