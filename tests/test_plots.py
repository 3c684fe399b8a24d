"""PNG figures from evaluation results (trn.plots)."""

from __future__ import annotations

import pytest
from PIL import Image

from trn.plots import plot_fidelity_tradeoff


def _results(n_restorers: int) -> dict:
    rows = [{"restorer": "none", "members": {"a": {"clean": 90.0, "attacked": 5.0}}, "clean": 90.0, "attacked": 5.0,
             "psnr_attacked": 22.1}]
    for k in range(n_restorers):
        rows.append({"restorer": f"trn_fmnist_agnostic_v{k}", "members": {"a": {"clean": 88.0, "attacked": 70.0 + k}},
                     "clean": 88.0, "attacked": 70.0 + k, "psnr_clean": 33.0 + k, "psnr_attacked": 22.1,
                     "psnr_restored": 23.5 + k})
    return {"attack": "pgd", "eps": 0.1, "images": 500, "rows": rows}


def test_fidelity_tradeoff_writes_a_two_panel_png(tmp_path):
    out = plot_fidelity_tradeoff(tmp_path / "sub" / "tradeoff.png", _results(3))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        w, h = im.size
    assert w > 1.5 * h  # two panels side by side


def test_fidelity_tradeoff_needs_a_restorer_row(tmp_path):
    with pytest.raises(ValueError, match="at least one restorer row"):
        plot_fidelity_tradeoff(tmp_path / "x.png", _results(0))
    assert not (tmp_path / "x.png").exists()


def test_accuracy_vs_eps_writes_into_a_folder_that_does_not_exist_yet(tmp_path):
    from trn.plots import plot_accuracy_vs_eps

    results = {"sweep": {"0.05": {"pgd": {"none": 0.4, "trn": 0.9}}, "0.1": {"pgd": {"none": 0.0, "trn": 0.8}}},
               "adaptive": {"0.1": {"trn": {"worst": 0.1}}}}
    out = plot_accuracy_vs_eps(tmp_path / "new" / "eps.png", results)
    assert out == tmp_path / "new" / "eps.png" and out.read_bytes()[:4] == b"\x89PNG"
