"""trn.registry: register/create/list, docstrings kept, private entries, clear errors; the library's registries."""

from __future__ import annotations

import pytest

from trn.attacks import ATTACKS
from trn.classifiers import CLASSIFIERS
from trn.errors import ConfigError
from trn.model import TRN_VARIANTS
from trn.registry import Registry


def test_register_create_list_and_docstrings() -> None:
    reg: Registry[tuple] = Registry("widget")

    @reg.register("Big-One")
    def big(size: int = 3) -> tuple:
        """A big widget.

        More text that is not the summary.
        """
        return ("big", size)

    @reg.register(public=False)
    def secret() -> tuple:
        return ("secret",)

    assert big() == ("big", 3) and big.__doc__.startswith("A big widget")  # the decorator returns the factory
    assert reg.create("big_one", size=5) == ("big", 5) and reg.create("BIG-ONE") == ("big", 3)  # normalised names
    assert reg.create("secret") == ("secret",)  # private entries can be built by name ...
    assert reg.list() == ["big_one"] and list(reg) == ["big_one"] and len(reg) == 1  # ... but are not listed
    assert reg.list(include_private=True) == ["big_one", "secret"] and "secret" in reg and "nope" not in reg
    assert reg.describe() == {"big_one": "A big widget."}
    with pytest.raises(ConfigError, match=r"^unknown widget 'small'; available: \['big_one'\]$"):
        reg.create("small")
    with pytest.raises(ConfigError, match=r"bad arguments for widget 'big_one'.*colour"):
        reg.create("big_one", colour="red")
    with pytest.raises(ConfigError, match="widget 'big_one' is already registered"):
        reg.add("big-one", big)
    reg.update({"a": lambda: 1, "b": lambda: 2})
    assert reg.list() == ["a", "b", "big_one"]


def test_library_registries() -> None:
    assert {"trn_small_28", "trn_base_32"} <= set(TRN_VARIANTS.list()) and "trn_tiny" not in TRN_VARIANTS.list()
    assert {"small_cnn", "resnet18"} <= set(CLASSIFIERS.list())
    assert {"pgd", "fgsm", "square"} <= set(ATTACKS.list())
    assert all(TRN_VARIANTS.describe().values())  # every public TRN variant has a one-line description
    for reg in (TRN_VARIANTS, CLASSIFIERS, ATTACKS):
        with pytest.raises(ConfigError, match=f"unknown {reg.kind} 'no_such_thing'; available"):
            reg.create("no_such_thing")
