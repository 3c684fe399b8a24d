"""Widen a trained TRN without changing what it computes (Net2Net-style, Chen et al. 2016, zero-init variant).

Every channel the narrow net had keeps its weights; the new channels get a fresh random init for their *incoming*
weights and zeros for every weight that carries them into an old channel or into the output head. So the wide net's
output equals the narrow net's at step 0, and training can only use the new capacity from there: the new channels
first receive gradient through the head, then through every layer behind it.

Used through ``widen_to`` by :mod:`trn.train_robust`, :mod:`trn.train_agnostic` and ``trn fit``: more capacity without
throwing away what the net has learned. Measured so far (docs/design.md): neither the robust restorer (better under
PGD, not under Square) nor a fit to one classifier gained from it, so no shipped net is widened.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from trn.errors import ConfigError
from trn.model import TRN

__all__ = ["widen_trn"]

Segments = list[tuple[int, int]]  # the input channels of a conv as (old count, new count) blocks, in concat order


@torch.no_grad()
def _copy_conv(new: nn.Conv2d, old: nn.Conv2d, segments: Segments) -> None:
    """Put ``old``'s weights into ``new``'s old-output rows at the old input channels; zero the rest of those rows."""
    co = old.out_channels
    new.weight[:co].zero_()
    o = n = 0
    for old_c, new_c in segments:  # old channels of each block sit at the start of its (wider) new block
        new.weight[:co, n : n + old_c] = old.weight[:, o : o + old_c]
        o, n = o + old_c, n + new_c
    if o != old.in_channels or n != new.in_channels:
        raise ConfigError(f"segments {segments} do not match a {old.in_channels} -> {new.in_channels} conv")
    if old.bias is not None:
        new.bias[:co] = old.bias


def widen_trn(net: TRN, width: int, seed: int = 0) -> TRN:
    """A TRN of base ``width`` whose output equals ``net``'s for every input (before any training).

    Args:
        net: the trained narrow net.
        width: the new base width (channels at full resolution); at least ``net.cfg.width``.
        seed: seeds the random init of the new channels' incoming weights.

    Returns:
        A new :class:`TRN` (on ``net``'s device) with ``cfg.width == width``; ``net`` is not modified.

    Raises:
        ConfigError: ``width`` smaller than the net's.

    Example:
        >>> wide = widen_trn(create_trn("trn_small_28", two_stream=False), 32)   # 16/32/64 -> 32/64/128 channels
    """
    if width < net.cfg.width:
        raise ConfigError(f"cannot widen a width-{net.cfg.width} TRN to {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = TRN(replace(net.cfg, width=width))
    wide = wide.to(next(net.parameters()).device)
    ow, nw, c_in = net.widths, wide.widths, net.cfg.in_channels
    streams = [(wide.img_stream, net.img_stream, c_in)]
    if net.cfg.two_stream:
        streams.append((wide.grad_stream, net.grad_stream, net.map_channels))
    for new_s, old_s, c0 in streams:
        for i in range(net.cfg.levels):
            _copy_conv(new_s[i][0], old_s[i][0], [(c0, c0)] if i == 0 else [(ow[i - 1], nw[i - 1])])
    for i in range(net.cfg.levels):
        fb_new, fb_old = wide.fusion[i], net.fusion[i]
        _copy_conv(fb_new.mix[0], fb_old.mix[0], [(ow[i], nw[i])] * (2 if net.cfg.two_stream else 1))
        _copy_conv(fb_new.to_img, fb_old.to_img, [(ow[i], nw[i])])
        if net.cfg.two_stream:
            _copy_conv(fb_new.to_grad, fb_old.to_grad, [(ow[i], nw[i])])
    for i in range(net.cfg.levels - 1):  # decoder input: cat([upsampled level i+1, fused level i])
        _copy_conv(wide.up[i][0], net.up[i][0], [(ow[i + 1], nw[i + 1]), (ow[i], nw[i])])
    _copy_conv(wide.head, net.head, [(ow[0], nw[0])])
    return wide
