"""``trn eval-downstream`` end to end on tiny models (two classifier formats, an untrained restorer)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from trn.classifiers import create_classifier, save_classifier
from trn.cli import main
from trn.config import load_config
from trn.data import load_dataset
from trn.errors import ConfigError
from trn.eval_downstream import NONE_ROW, DownstreamEvalConfig
from trn.restorer import Restorer


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    mlp = create_classifier("zoo_mlp", hidden=16, depth=1).eval()
    save_classifier(tmp_path / "mlp", mlp, "zoo_mlp", {"hidden": 16, "depth": 1}, {"image_shape": [1, 28, 28]})
    cnn = create_classifier("zoo_cnn", width=4).eval()
    torch.jit.script(cnn).save(str(tmp_path / "cnn.pt"))
    r = Restorer.build(seed=0)
    with torch.no_grad():  # random weights: a freshly initialised TRN may not read its gradient map yet
        for p in r.net.parameters():
            p.normal_(0, 0.2)
    r.save(tmp_path / "r")
    cfg = {"n": 12, "restorers": {"tiny": str(tmp_path / "r")},
           "classifiers": {"mlp": str(tmp_path / "mlp"), "cnn": str(tmp_path / "cnn.pt")},
           "held_out": ["cnn"], "transfer_source": "mlp", "batch_size": 8, "device": "cpu",
           "out_dir": str(tmp_path / "out")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, mlp, cnn


def test_matrix_end_to_end(tiny, capsys):
    d, mlp, cnn = tiny
    assert main(["eval-downstream", "--config", str(d / "cfg.yaml"), "--set", "attacks=[fgsm, pgd, cw]"]) == 0
    md = capsys.readouterr().out
    res = json.loads((d / "out" / "downstream.json").read_text())
    assert res["n"] == 12 and set(res["accuracy"]) == {NONE_ROW, "tiny"}
    test = load_dataset("fashion-mnist", None, "test").subset(12, 0)
    for name, clf in (("mlp", mlp), ("cnn", cnn)):
        want = (clf(test.images).argmax(1) == test.labels).float().mean().item()
        assert res["accuracy"][NONE_ROW][name]["clean"] == pytest.approx(want)
        assert set(res["accuracy"]["tiny"][name]) == {"clean", "fgsm", "pgd", "cw"}
        # undefended PGD-40 cannot beat the clean accuracy of these untrained nets by much; the input is the input
        assert res["fidelity"][NONE_ROW][name]["clean"]["psnr"] == 100.0
        assert res["fidelity"][NONE_ROW][name]["pgd"]["psnr"] < 40
    assert set(res["transfer"]["tiny"]) == {"cnn"}
    assert "cnn (held out)" in md and "## PGD-40" in md and "Transfer: PGD-40 crafted on mlp" in md
    assert (d / "out" / "downstream.md").read_text() == md.rstrip("\n") or "Fidelity" in md
    with Image.open(d / "out" / "downstream_heatmap.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_matrix_map_from_downstream(tiny):
    """A row with ``map_from: downstream`` restores each column's images with that column's classifier's map."""
    d, mlp, cnn = tiny
    r = str(d / "r")
    assert main(["eval-downstream", "--config", str(d / "cfg.yaml"), "--set", "attacks=[fgsm]",
                 "--set", f"restorers={{tiny: {r}, tiny-ds: {r}}}", "--set", "map_from={tiny-ds: downstream}"]) == 0
    res = json.loads((d / "out" / "downstream.json").read_text())
    test = load_dataset("fashion-mnist", None, "test").subset(12, 0)
    restorer = Restorer.load(r)
    for name, clf in (("mlp", mlp), ("cnn", cnn)):
        from trn.fidelity import psnr_per_image

        want = psnr_per_image(restorer.with_map_from(clf).restore(test.images), test.images).mean().item()
        assert res["fidelity"]["tiny-ds"][name]["clean"]["psnr"] == pytest.approx(want, rel=1e-5)
        assert res["fidelity"]["tiny-ds"][name]["clean"]["psnr"] != pytest.approx(
            res["fidelity"]["tiny"][name]["clean"]["psnr"], rel=1e-4)


def test_matrix_bad_config(tiny, capsys):
    d, _, _ = tiny
    with pytest.raises(ConfigError, match="held_out names"):
        load_config(DownstreamEvalConfig, d / "cfg.yaml", ["held_out=[nope]"])
    with pytest.raises(ConfigError, match="transfer_source 'x'"):
        load_config(DownstreamEvalConfig, d / "cfg.yaml", ["transfer_source=x"])
    with pytest.raises(ConfigError, match="map_from maps restorer rows"):
        load_config(DownstreamEvalConfig, d / "cfg.yaml", ["map_from={nope: downstream}"])
    with pytest.raises(ConfigError, match="map_from maps restorer rows"):
        load_config(DownstreamEvalConfig, d / "cfg.yaml", ["map_from={tiny: sideways}"])
    with pytest.raises(ConfigError, match="attacks must be a subset"):
        load_config(DownstreamEvalConfig, d / "cfg.yaml", ["attacks=[square]"])
    (d / "bad.pt").write_bytes(b"\x80\x04junk")
    rc = main(["eval-downstream", "--config", str(d / "cfg.yaml"), "--set", f"classifiers={{bad: {d / 'bad.pt'}}}",
               "--set", "held_out=[]", "--set", "transfer_source=null"])
    assert rc == 2 and "is a pickle file" in capsys.readouterr().err
