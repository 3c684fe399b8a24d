"""``trn fit``: a restorer fitted to a tiny classifier raises that classifier's robust accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trn.attacks import create_attack
from trn.classifiers import create_classifier
from trn.cli import main
from trn.data import load_dataset, save_npz
from trn.errors import ConfigError, DataError, ShapeError
from trn.fit import FitConfig, fit, load_fit_data
from trn.restorer import Restorer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """2,000 Fashion-MNIST training images (npz), a tiny MLP trained on them (TorchScript), an identity restorer."""
    d = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    ds = load_dataset("fashion-mnist", None, "train").subset(2000, 0)
    save_npz(d / "data.npz", ds)
    m = create_classifier("zoo_mlp", hidden=32, depth=1)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(ds), 100):
            loss = F.cross_entropy(m(ds.images[i : i + 100]), ds.labels[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    torch.jit.script(m).save(str(d / "clf.pt"))
    Restorer.build(seed=0).save(d / "start")  # trn_tiny; its head starts at zero: the identity
    return d, m


def _robust(r: Restorer, clf, x, y) -> float:
    x_adv = create_attack("pgd", eps=0.1, steps=10, seed=3)(clf, x, y)
    return (clf(r.restore(x_adv)).argmax(1) == y).float().mean().item()


def test_fit_raises_robust_accuracy(setup):
    d, clf = setup
    torch.set_num_threads(1)
    cfg = FitConfig(classifier=str(d / "clf.pt"), data=str(d / "data.npz"), restorer=str(d / "start"),
                    out=str(d / "fitted"), images=768, batch_size=64, val_size=150, lr=3e-3, device="cpu")
    fitted = fit(cfg)
    test = load_dataset("fashion-mnist", None, "test").subset(200, 5)  # images fit never saw
    start = Restorer.load(d / "start")
    before, after = _robust(start, clf, test.images, test.labels), _robust(fitted, clf, test.images, test.labels)
    assert after > before + 0.05, (before, after)
    hist = fitted.metadata["history"]
    assert [h["epoch"] for h in hist] == [0, 1] and fitted.metadata["selected_epoch"] == 1
    assert Restorer.load(d / "fitted").metadata["init_from"]["path"] == str(d / "start")


def test_fit_widened_restorer_starts_where_the_narrow_one_was(setup, tmp_path):
    """``widen_to``: the fit trains a wider copy of the restorer whose epoch-0 validation equals the narrow net's."""
    d, _ = setup
    torch.set_num_threads(1)
    kw = {"classifier": str(d / "clf.pt"), "data": str(d / "data.npz"), "restorer": str(d / "start"), "images": 128,
          "batch_size": 64, "val_size": 150, "lr": 3e-3, "device": "cpu", "attacks": ["pgd", "fgsm"], "attack_steps": 3}
    narrow = fit(FitConfig(**kw, out=str(tmp_path / "narrow")))
    trained_with = Restorer.load(tmp_path / "narrow").metadata["config"]  # the attack options reach the training
    assert (trained_with["attacks"], trained_with["attack_steps"]) == (["pgd", "fgsm"], 3)
    wide = fit(FitConfig(**kw, out=str(tmp_path / "wide"), widen_to=8))
    assert Restorer.load(tmp_path / "wide").net.cfg.width == 8 and narrow.net.cfg.width == 4
    h0n, h0w = narrow.metadata["history"][0], wide.metadata["history"][0]
    assert (h0w["clean_restored"], h0w["pgd_restored"]) == (h0n["clean_restored"], h0n["pgd_restored"])
    assert h0w["psnr_clean"] == pytest.approx(h0n["psnr_clean"], abs=1e-3)


def test_fit_cli_errors(setup, tmp_path, capsys):
    d, _ = setup
    (tmp_path / "x.txt").write_text("no")
    rc = main(["fit", "--classifier", str(tmp_path / "x.txt"), "--data", str(d / "data.npz"),
               "--restorer", str(d / "start"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "is not a classifier file" in capsys.readouterr().err
    rc = main(["fit", "--classifier", str(d / "clf.pt"), "--data", str(d / "data.npz"),
               "--restorer", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "restorer checkpoint not found" in capsys.readouterr().err


def test_fit_bad_inputs(setup, tmp_path):
    d, _ = setup
    with pytest.raises(DataError, match="expected an image folder or an .npz file"):
        (tmp_path / "f.csv").write_text("1")
        load_fit_data(str(tmp_path / "f.csv"))
    with pytest.raises(DataError, match="not found"):
        load_fit_data(str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="images must be >= 1"):
        FitConfig(classifier="c", images=0)
    with pytest.raises(ConfigError, match=r"attacks must be a non-empty subset"):  # before any data is loaded
        fit(FitConfig(classifier=str(tmp_path / "missing.pt"), data=str(tmp_path / "missing"), attacks=["nope"]))
    with pytest.raises(ConfigError, match="eps_min <= eps_max"):
        fit(FitConfig(classifier=str(tmp_path / "missing.pt"), eps_min=0.2, eps_max=0.1))
    rgb = load_dataset("fashion-mnist", None, "test").subset(300, 0)
    rgb.images = rgb.images.repeat(1, 3, 1, 1)
    save_npz(tmp_path / "rgb.npz", rgb)
    with pytest.raises(ShapeError, match=r"the data's images are \(3, 28, 28\)"):
        fit(FitConfig(classifier=str(d / "clf.pt"), data=str(tmp_path / "rgb.npz"), restorer=str(d / "start"),
                      out=str(tmp_path / "o"), val_size=10))


def test_zoo_batch_and_loss():
    import random

    from trn.train_agnostic import AgnosticTrainConfig, agnostic_loss, make_zoo_batch, split_train_val

    torch.manual_seed(0)
    zoo = [create_classifier("zoo_mlp", hidden=8, depth=1).eval(), create_classifier("zoo_cnn", width=2).eval()]
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    for target in ("random", "ensemble"):
        cfg = AgnosticTrainConfig(chunks=4, clean_chunks=1, eps_max=0.05, attacks=["pgd", "fgsm"],
                                  attack_target=target)
        x_in, is_clean, tags, sources = make_zoo_batch(zoo, x, y, cfg, random.Random(0))
        assert sources[0] == -1 and all((j == 2) == (target == "ensemble") for j in sources[1:])
        assert is_clean.tolist() == [True] * 4 + [False] * 12 and tags[0] == "clean" and len(tags) == 4
        assert torch.equal(x_in[:4], x[:4]) and (x_in - x).abs().max() <= 0.05 + 1e-6
        assert not torch.equal(x_in[4:], x[4:])
        assert all(("/ens" in t) == (target == "ensemble") for t in tags[1:])
    cfg = AgnosticTrainConfig(chunks=16, clean_chunks=0, eps_max=0.05, attacks=["fgsm"], attack_target="mixed")
    tags = make_zoo_batch(zoo, x, y, cfg, random.Random(0))[2]
    assert {t.split("/")[1] for t in tags} == {"m0", "m1", "ens"}  # mixed: members and the ensemble both drawn
    noise_cfg = AgnosticTrainConfig(chunks=4, clean_chunks=1, eps_min=0.05, eps_max=0.05, attacks=["random_sign"])
    x_mid = 0.25 + 0.5 * x  # nothing clipped: every attacked pixel moves by exactly eps
    x_in_n, _, tags_n, _ = make_zoo_batch(zoo, x_mid, y, noise_cfg, random.Random(0))
    assert all(t.startswith("random_sign@0.050") for t in tags_n[1:])
    torch.testing.assert_close((x_in_n[4:] - x_mid[4:]).abs(), torch.full_like(x_mid[4:], 0.05))
    logp = [F.log_softmax(m(x), 1) for m in zoo]
    loss, parts = agnostic_loss(x.clone(), x, is_clean, zoo, logp, cfg)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and parts["kl"] == pytest.approx(0.0, abs=1e-6)
    loss2, _ = agnostic_loss(x_in, x, is_clean, zoo, logp, cfg)
    assert loss2.item() > 0
    feat_cfg = AgnosticTrainConfig(chunks=4, clean_chunks=1, attacks=["fgsm"], feature_weight=2.0)
    feats = [m.forward_features(x) for m in zoo]
    loss0, parts0 = agnostic_loss(x.clone(), x, is_clean, zoo, logp, feat_cfg, feats)
    assert parts0["feat"] == pytest.approx(0.0, abs=1e-6) and loss0.item() == pytest.approx(0.0, abs=1e-6)
    loss3, parts3 = agnostic_loss(x_in, x, is_clean, zoo, logp, feat_cfg, feats)
    assert parts3["feat"] > 0 and loss3.item() == pytest.approx(loss2.item() + 2.0 * parts3["feat"], rel=1e-5)
    assert parts3["kl"] == pytest.approx(agnostic_loss(x_in, x, is_clean, zoo, logp, cfg)[1]["kl"], rel=1e-5)
    from trn.data import ImageDataset

    ds = ImageDataset(torch.arange(100.0).div(100).view(100, 1, 1, 1).expand(100, 1, 28, 28).contiguous(),
                      torch.arange(100) % 10, tuple("abcdefghij"))
    tr, va = split_train_val(ds, 20, 0)
    ids = lambda d: set(torch.round(d.images[:, 0, 0, 0] * 100).long().tolist())
    assert len(va) == 20 and ids(tr) | ids(va) == set(range(100)) and not ids(tr) & ids(va)
    assert ids(split_train_val(ds, 20, 0)[1]) == ids(va) != ids(split_train_val(ds, 20, 1)[1])  # seeded
    with pytest.raises(ConfigError, match="zoo needs at least one classifier"):
        AgnosticTrainConfig(zoo=[])
    with pytest.raises(ConfigError, match="val_size 100 leaves no training images"):
        split_train_val(ds, 100, 0)


def test_validation_scores_restored_noise_when_asked():
    """``val_noise``: selection adds the zoo's accuracy on restored random-sign noise to the score (a restorer that
    breaks on noise ranks lower); without it the score is clean + PGD as before."""
    from trn.restorer import Restorer
    from trn.train_agnostic import validate_restorer

    torch.manual_seed(0)
    r = Restorer.build(arch="trn_tiny", seed=0)
    zoo = [create_classifier("zoo_mlp", hidden=8, depth=1).eval(), create_classifier("zoo_cnn", width=2).eval()]
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        y = zoo[0](x).argmax(1)
    plain = validate_restorer(r, zoo, x, y, steps=2)
    noisy = validate_restorer(r, zoo, x, y, steps=2, noise=True)
    assert "noise_restored" not in plain and 0.0 <= noisy["noise_restored"] <= 1.0
    assert plain["score"] == pytest.approx(plain["clean_restored"] + plain["pgd_restored"])
    assert noisy["score"] == pytest.approx(noisy["clean_restored"] + noisy["pgd_restored"] + noisy["noise_restored"])


def test_agnostic_train_state_round_trips(tmp_path):
    """What a stop of ``trn train-agnostic`` saves is what a resume loads: weights, optimizer state, epoch, RNG."""
    from trn.train_agnostic import AgnosticTrainConfig, _load_state, _save_state

    cfg = AgnosticTrainConfig(out=str(tmp_path / "agnostic"))
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.rand(3, 4)).sum().backward()
    opt.step()
    _save_state(cfg, net, opt, 2, [{"epoch": 2}])
    expected = torch.rand(1)  # the first draw after the stop
    torch.manual_seed(123)  # the RNG must come back to where the stop left it
    other = torch.nn.Linear(4, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    epoch, history = _load_state(cfg, other, other_opt, torch.device("cpu"))
    assert (epoch, history) == (2, [{"epoch": 2}])
    torch.testing.assert_close(torch.rand(1), expected)
    for a, b in zip(net.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


def test_map_from_attacked_member_and_with_map_from():
    """``map_from: attacked`` restores each chunk with the map of the member it was attacked on (clean chunks: some
    member's, never the guard's); ``guard`` uses the guard; ``Restorer.with_map_from`` swaps the map's classifier only."""
    import random

    from trn.restorer import Restorer
    from trn.train_agnostic import AgnosticTrainConfig, make_zoo_batch, restore_zoo_batch

    torch.manual_seed(0)
    r = Restorer.build(arch="trn_tiny", seed=0)
    with torch.no_grad():  # random weights everywhere: an initialised TRN may not read its map at all yet
        for p in r.net.parameters():
            p.normal_(0, 0.2)
    zoo = [create_classifier("zoo_mlp", hidden=8, depth=1).eval(), create_classifier("zoo_cnn", width=2).eval()]
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    with_map = lambda xs, m: r.net(xs, r.estimator(xs, m))
    cfg = AgnosticTrainConfig(chunks=3, clean_chunks=1, eps_max=0.05, attacks=["fgsm"], map_from="attacked")
    x_in, _, _, sources = make_zoo_batch(zoo, x, y, cfg, random.Random(3))
    out = restore_zoo_batch(r, zoo, x_in, sources, cfg, random.Random(0))
    for s, j in zip((slice(0, 4), slice(4, 8), slice(8, 12)), sources, strict=True):
        candidates = [zoo[j]] if j in (0, 1) else zoo
        assert any(torch.allclose(out[s], with_map(x_in[s], m), atol=1e-6) for m in candidates)
        assert not torch.allclose(out[s], with_map(x_in[s], r.guard), atol=1e-4)
    guard_cfg = AgnosticTrainConfig(chunks=3, clean_chunks=1, map_from="guard")
    assert torch.allclose(restore_zoo_batch(r, zoo, x_in, sources, guard_cfg, random.Random(0)), r(x_in), atol=1e-6)
    r.net.train()
    swapped = r.with_map_from(zoo[1])
    assert r.net.training and swapped.net is r.net and swapped.guard is zoo[1] and r.guard is not zoo[1]
    r.net.eval()
    assert torch.allclose(swapped(x), with_map(x, zoo[1]), atol=1e-6)
    assert not torch.allclose(swapped(x), r(x), atol=1e-4)


def test_shipped_agnostic_restorer_protects_a_held_out_classifier():
    """``Restorer.pretrained("fashion-mnist")`` (the agnostic net) against PGD-10 crafted on the held-out residual net (a
    family it never trained on): most images come back right, whether the map comes from its guard or from the
    residual net itself; undefended, almost none do."""
    from trn.attacks import create_attack
    from trn.data import load_dataset
    from trn.downstream import load_downstream
    from trn.restorer import Restorer

    test = load_dataset("fashion-mnist", None, "test").subset(64, 3)
    x, y = test.images, test.labels
    resnet = load_downstream("checkpoints/zoo_fmnist_resnet")
    r = Restorer.pretrained("fashion-mnist")
    x_adv = create_attack("pgd", eps=0.1, steps=10, seed=0)(resnet, x, y)
    acc = lambda z: (resnet(z).argmax(1) == y).float().mean().item()
    with torch.no_grad():
        assert acc(x_adv) < 0.1
        assert acc(r.restore(x_adv)) > 0.6
        assert acc(r.with_map_from(resnet).restore(x_adv)) > 0.6
        assert acc(r.restore(x)) > 0.8


def test_agnostic_select_last_keeps_the_last_epoch(setup, tmp_path):
    """``select: score`` keeps the best validation epoch (here the start, since lr 1.0 wrecks the net); ``select:
    last`` keeps the last epoch whatever its score (the fidelity ablations)."""
    from trn.train_agnostic import AgnosticTrainConfig, train_agnostic

    d, clf = setup
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", None, "train").subset(160, 1)
    kept = {}
    for select in ("score", "last"):
        cfg = AgnosticTrainConfig(zoo=["passed below"], init_from=str(d / "start"), attacks=["fgsm"], epochs=2,
                                  epoch_images=64, batch_size=32, val_size=64, val_attack_steps=1, lr=1.0,
                                  select_min_psnr=0.0, select=select, device="cpu", out=str(tmp_path / select))
        r = train_agnostic(cfg, data=ds, zoo=[clf])
        hist = r.metadata["history"]
        assert [h["epoch"] for h in hist] == [0, 1, 2]
        assert max(h["score"] for h in hist[1:]) < hist[0]["score"], hist  # the wrecked epochs score lower
        kept[select] = r.metadata["selected_epoch"]
    assert kept == {"score": 0, "last": 2}
    with pytest.raises(ConfigError, match="select must be 'score' or 'last'"):
        AgnosticTrainConfig(select="best")
