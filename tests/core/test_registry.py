from __future__ import annotations

import pytest

from loupe.core.errors import LoupeError, UnknownNameError
from loupe.core.registry import DOMAINS, LABEL_SETS, MODELS, Registry, discover_domains


def test_register_create_list_and_did_you_mean() -> None:
    reg: Registry = Registry("widget")
    reg.register("small_widget", lambda n=1: ["w"] * n, domain="test")
    reg.register("large_widget", lambda n=1: ["W"] * n, domain="other")
    assert reg.create("small_widget", n=2) == ["w", "w"]
    assert reg.names("*_widget", domain="test") == ["small_widget"]
    with pytest.raises(UnknownNameError) as err:
        reg.get("smal_widget")
    assert "unknown widget 'smal_widget'. Did you mean 'small_widget'" in str(err.value)
    assert err.value.suggestions[0] == "small_widget"


def test_double_registration_is_refused() -> None:
    reg: Registry = Registry("widget")
    reg.register("a", object())
    with pytest.raises(LoupeError, match="already registered"):
        reg.register("a", object())


def test_domains_register_themselves_on_discovery() -> None:
    assert "cxr" in discover_domains()
    assert DOMAINS.entry("cxr").domain == "cxr"
    assert len(LABEL_SETS.get("cxr.nih14")) == 14
    assert "vit_micro_patch8" in MODELS
