"""The TRN network: shapes, [0, 1] output, identity at initialisation, both streams matter, the one-stream ablation,
the split forward, the variant registry and shape errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trn.errors import ConfigError, ShapeError
from trn.model import TRN, TRN_VARIANTS, TRNConfig, create_trn, list_trn_variants


def _randomise_head(net: TRN, seed: int = 0) -> TRN:
    """Give the zero-initialised head weights, as training would, so the output depends on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=g) * 0.5)
        net.head.bias.copy_(torch.randn(net.head.bias.shape, generator=g) * 0.1)
    return net


def _inputs(b: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


@pytest.mark.parametrize(("name", "channels"), [("trn_tiny", 1), ("trn_small_28", 1), ("trn_base_32", 3)])
@pytest.mark.parametrize(("h", "w"), [(8, 8), (28, 28), (32, 32), (12, 20)])
@pytest.mark.parametrize("batch", [1, 2])
def test_shapes_and_range(name: str, channels: int, h: int, w: int, batch: int) -> None:
    net = _randomise_head(create_trn(name)).eval()
    assert net.cfg.in_channels == channels
    x, g = _inputs(batch, channels, h, w)
    with torch.no_grad():
        out = net(x, g)
    assert out.shape == (batch, channels, h, w) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


def test_three_channel_override_of_a_grey_variant() -> None:
    net = create_trn("trn_tiny", in_channels=3)
    x, g = _inputs(2, 3, 8, 8)
    assert net(x, g).shape == (2, 3, 8, 8)


def test_empty_batch() -> None:
    net = create_trn("trn_tiny")
    x, g = _inputs(0, 1, 8, 8)
    assert net(x, g).shape == (0, 1, 8, 8)


def test_output_is_clamped_to_unit_range() -> None:
    net = create_trn("trn_tiny")
    with torch.no_grad():
        net.head.bias.fill_(5.0)  # pushes every pixel far above 1
    x, g = _inputs(2, 1, 8, 8)
    assert torch.equal(net(x, g), torch.ones_like(x))
    with torch.no_grad():
        net.head.bias.fill_(-5.0)
    assert torch.equal(net(x, g), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["trn_tiny", "trn_small_28", "trn_base_32"])
@pytest.mark.parametrize("two_stream", [True, False])
def test_zero_init_head_is_the_identity(name: str, two_stream: bool) -> None:
    net = create_trn(name, two_stream=two_stream)
    assert (net.head.weight == 0).all() and (net.head.bias == 0).all()
    c = net.cfg.in_channels
    x, g = _inputs(3, c, 16, 16)
    assert torch.equal(net(x, g if two_stream else None), x)  # clean images pass unharmed from step 0


def test_output_depends_on_both_streams() -> None:
    net = _randomise_head(create_trn("trn_tiny")).eval()
    x, g = _inputs(2, 1, 8, 8)
    x2, g2 = _inputs(2, 1, 8, 8, seed=1)
    with torch.no_grad():
        base = net(x, g)
        assert not torch.allclose(net(x, g2), base, atol=1e-6)  # the gradient map changes the restoration
        assert not torch.allclose(net(x2, g), base, atol=1e-6)
        assert not torch.allclose(net(x, torch.zeros_like(g)), base, atol=1e-6)
    xg, gg = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
    net(xg, gg).sum().backward()
    assert xg.grad.abs().sum() > 0 and gg.grad.abs().sum() > 0  # and it is differentiable in both


def test_one_stream_variant_ignores_the_gradient_map() -> None:
    one = _randomise_head(create_trn("trn_tiny", two_stream=False)).eval()
    two = create_trn("trn_tiny")
    assert one.grad_stream is None and all(b.to_grad is None for b in one.fusion)
    assert sum(p.numel() for p in one.parameters()) < sum(p.numel() for p in two.parameters())
    x, g = _inputs(2, 1, 8, 8)
    with torch.no_grad():
        out = one(x)
        assert torch.equal(one(x, g), out) and torch.equal(one(x, None), out)


def test_split_forward_matches_forward() -> None:
    net = _randomise_head(create_trn("trn_small_28")).eval()
    x, g = _inputs(2, 1, 28, 28)
    with torch.no_grad():
        fused = net.fuse(x, g)
        assert [f.shape[1] for f in fused] == net.widths == [16, 32, 64]
        assert [f.shape[-1] for f in fused] == [28, 14, 7]
        torch.testing.assert_close((x + net.decode(fused)).clamp(0, 1), net(x, g))
        assert net.encode_image(x, 0).shape == (2, 16, 28, 28)
        assert net.encode_gradient(g, 0).shape == (2, 16, 28, 28)
    assert net.divisor == 4


def test_variants_and_registry() -> None:
    assert list_trn_variants() == ["trn_base_28", "trn_base_32", "trn_small_28"]  # the test-only trn_tiny is not public
    assert list_trn_variants(include_private=True) == ["trn_base_28", "trn_base_32", "trn_small_28", "trn_tiny"]
    assert "trn_tiny" in TRN_VARIANTS and "trn_tiny" not in TRN_VARIANTS.list()
    assert TRN_VARIANTS.describe()["trn_small_28"].startswith("Grey 28x28")  # the factory's docstring
    small = create_trn("trn_small_28")
    assert isinstance(small, nn.Module) and small.cfg == TRNConfig(1, 16, 3, True)
    assert create_trn("trn_base_32").cfg == TRNConfig(3, 32, 3, True)
    assert create_trn("trn_base_28").cfg == TRNConfig(1, 32, 3, True)
    assert create_trn("trn_tiny", width=8).cfg.width == 8
    assert create_trn().cfg == small.cfg  # the default variant
    assert sum(p.numel() for p in small.parameters()) < 1_000_000  # cheap enough for a 2-core CPU


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown TRN variant 'trn_huge'; available: \['trn_base_28'"):
        create_trn("trn_huge")
    with pytest.raises(ConfigError, match=r"unknown TRN variant 'trn_huge'; available: \['trn_base_28', 'trn_base_32', 'trn_small_28'\]$"):
        create_trn("trn_huge")  # the private trn_tiny is not offered
    with pytest.raises(ConfigError, match="bad arguments for TRN variant 'trn_tiny'.*depth"):
        create_trn("trn_tiny", depth=3)
    for bad in ({"in_channels": 2}, {"width": 2}, {"levels": 0}):
        with pytest.raises(ConfigError, match="bad TRN config"):
            TRN(TRNConfig(**bad))


def test_shape_errors() -> None:
    net = create_trn("trn_small_28")  # levels 3: H and W divisible by 4
    x, g = _inputs(2, 1, 28, 28)
    with pytest.raises(ShapeError, match="divisible by 4, got 30x30"):
        net(*_inputs(1, 1, 30, 30))
    with pytest.raises(ShapeError, match="divisible by 4, got 28x26"):
        net(*_inputs(1, 1, 28, 26))
    with pytest.raises(ShapeError, match=r"TRN expects \(B, 1, H, W\) images, got \(2, 3, 28, 28\)"):
        net(*_inputs(2, 3, 28, 28))
    with pytest.raises(ShapeError, match=r"TRN expects \(B, 1, H, W\)"):
        net(x[0], g[0])
    with pytest.raises(ShapeError, match=r"gradient map must have shape \(2, 1, 28, 28\)"):
        net(x, None)
    with pytest.raises(ShapeError, match="gradient map must have shape"):
        net(x, g[:1])
    assert create_trn("trn_tiny")(*_inputs(1, 1, 10, 6)).shape == (1, 1, 10, 6)  # levels 2: divisible by 2 is enough


def test_gradient_stream_with_more_channels_than_the_image() -> None:
    net = _randomise_head(create_trn("trn_tiny", grad_channels=2)).eval()
    assert net.map_channels == 2 and net.grad_stream[0][0].in_channels == 2
    x, _ = _inputs(2, 1, 8, 8)
    g = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, out2 = net(x, g), net(x, torch.cat([g[:, :1], -g[:, 1:]], 1))
    assert out.shape == (2, 1, 8, 8) and not torch.equal(out, out2)  # the second map channel is read
    with pytest.raises(ShapeError, match=r"gradient map must have shape \(2, 2, 8, 8\)"):
        net(x, g[:, :1])
    with pytest.raises(ConfigError, match="bad TRN config"):
        create_trn("trn_tiny", grad_channels=-1)
