"""The package as others depend on it: the public API in ``trn.__all__``, a light ``import trn`` that never brings in
Ray, and a pyproject whose explicit package list ships every sub-package, the Ray layer and the weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import trn

ROOT = Path(__file__).resolve().parents[1]


def test_all_lists_the_public_api_and_every_name_resolves() -> None:
    assert set(trn.__all__) == set(trn._EXPORTS) | {"__version__"}
    for name in ("Restorer", "create_trn", "PGD", "create_attack", "GradientMapEstimator", "build_defense_stack",
                 "DefenseStack", "resolve_checkpoint", "Registry"):
        assert name in trn.__all__
    for name in trn.__all__:
        assert getattr(trn, name) is not None, name
    assert trn.create_trn is __import__("trn.model", fromlist=["create_trn"]).create_trn
    assert set(trn.__all__) <= set(dir(trn))
    with pytest.raises(AttributeError, match="module 'trn' has no attribute 'nope'"):
        trn.nope  # noqa: B018


def _run(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_import_trn_is_light() -> None:
    _run("import sys, trn; heavy = {'torch', 'ray', 'numpy'} & set(sys.modules); "
         "assert not heavy, f'import trn loaded {heavy}'; assert 'Restorer' in trn.__all__")


@pytest.mark.slow
def test_no_library_module_imports_ray() -> None:
    """Every module under trn/ imported in a fresh interpreter: none brings in Ray (the Ray layer is trn_workers)."""
    _run("import sys, pkgutil, importlib, trn; "
         "[importlib.import_module(m.name) for m in pkgutil.walk_packages(trn.__path__, 'trn.')]; "
         "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
         "assert not bad, f'the library imported Ray: {bad[:3]}'")


def test_pyproject_ships_every_subpackage_the_ray_layer_and_the_weights() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(conf["packages"]), conf["package-dir"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "trn").rglob("__init__.py")}
    assert on_disk <= packages, f"sub-packages missing from pyproject's packages: {sorted(on_disk - packages)}"
    assert dirs["trn_workers"] == "workers" and "trn_workers" in packages
    assert dirs["trn._weights"] == "checkpoints" and "trn._weights" in packages
    assert conf["package-data"]["trn._weights"] == ["*.safetensors", "*.json"]
    assert "py.typed" in conf["package-data"]["trn"]
