"""Widening a trained TRN (trn.widen): same output before training, new channels that can learn."""

from __future__ import annotations

import pytest
import torch

from trn.errors import ConfigError
from trn.model import create_trn
from trn.widen import widen_trn


def _trained_like(name: str, two_stream: bool, seed: int = 0):
    """A net with non-zero weights everywhere (a fresh TRN's zero head would make every output the identity)."""
    net = create_trn(name, two_stream=two_stream)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("name", ["trn_tiny", "trn_small_28"])
@pytest.mark.parametrize("two_stream", [False, True])
def test_widened_net_computes_the_same_output(name: str, two_stream: bool) -> None:
    net = _trained_like(name, two_stream)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wide = widen_trn(net, 2 * net.cfg.width)
    assert wide.cfg.width == 2 * net.cfg.width and wide.widths == [2 * w for w in net.widths]
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in net.parameters())
    x = torch.rand(5, 1, 28, 28)
    g = torch.randn(5, net.map_channels, 28, 28) if two_stream else None
    with torch.no_grad():
        torch.testing.assert_close(wide(x, g), net(x, g), rtol=0, atol=1e-6)
        assert not torch.allclose(net(x, g), x)  # the net really changes images: the check above is not trivial
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the narrow net is untouched


def test_new_channels_learn() -> None:
    """After one step the wide net differs from the narrow one: gradient reaches the new channels through the head."""
    net = _trained_like("trn_tiny", two_stream=False)
    wide = widen_trn(net, 8)
    x = torch.rand(4, 1, 28, 28)
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    wide(x).square().mean().backward()
    head_new = wide.head.weight.grad[:, net.cfg.width :]
    assert head_new.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(wide(x), net(x), atol=1e-6)


def test_narrower_width_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot widen"):
        widen_trn(create_trn("trn_small_28"), 8)
