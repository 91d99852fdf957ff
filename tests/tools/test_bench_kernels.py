"""The kernel benchmark's forward A/B variants: they name real settings and are undone after use."""
import importlib

import pytest

from nsa_tools import bench_kernels as B


@pytest.mark.parametrize("name", sorted(B.AB_VARIANTS))
def test_variants_name_existing_settings(name):
    for mod_name, attr, _ in B.AB_VARIANTS[name]:
        assert hasattr(importlib.import_module(f"nsa_kernels.{mod_name}"), attr), (name, attr)


def test_with_settings_applies_then_restores_even_on_error():
    from nsa_kernels import selection

    before = selection.TILE_OVERRIDE
    seen = B.with_settings(B.AB_VARIANTS["scores_fp16"], lambda: selection.TILE_OVERRIDE)
    assert seen == {"split": False}
    assert selection.TILE_OVERRIDE is before

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        B.with_settings(B.AB_VARIANTS["scores_split"], fail)
    assert selection.TILE_OVERRIDE is before
