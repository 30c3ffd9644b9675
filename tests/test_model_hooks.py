"""Hook names: parsing, canonical order, layer selections, widths, layers needed."""

import pytest

from actex.model import ModelConfig, hook_width, hooks_for_layers, layers_needed, parse_hooks
from actex.model.random_checkpoint import tiny_hf_config


def test_parse_hooks_orders_by_computation_and_dedups():
    names = ["ln_final.hook_normalized", "blocks.2.hook_resid_post", "blocks.0.hook_mlp_out",
             "blocks.2.hook_resid_pre", "hook_embed", "blocks.0.hook_mlp_out"]
    assert parse_hooks(names, 24) == (
        "hook_embed", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre",
        "blocks.2.hook_resid_post", "ln_final.hook_normalized")
    assert parse_hooks("blocks.1.mlp.hook_post, hook_embed", 2) == (
        "hook_embed", "blocks.1.mlp.hook_post")


@pytest.mark.parametrize(
    "names, message",
    [
        (["blocks.3.hook_foo"], "unknown hook 'blocks.3.hook_foo'; expected one of hook_embed"),
        (["resid_post"], "unknown hook 'resid_post'"),
        (["blocks.3.hook_resid_pst"], r"unknown hook 'blocks.3.hook_resid_pst' \(did you mean 'blocks.3.hook_resid_post'\?\)"),
        (["ln_final.hook_normalised"], r"\(did you mean 'ln_final.hook_normalized'\?\)"),
        (["blocks.30.hook_resid_post"], r"layer 30 out of range: model has 24 layers \(0-23\)"),
        ([], "no hooks given"),
    ],
)
def test_parse_hooks_errors(names, message):
    with pytest.raises(ValueError, match=message):
        parse_hooks(names, 24)


def test_hooks_for_layers_selections():
    assert hooks_for_layers("all", "residual", 3) == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert hooks_for_layers("0-2", "mlp", 24) == [
        "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    assert hooks_for_layers("8,0,4", "attn", 24) == [
        "blocks.0.hook_attn_out", "blocks.4.hook_attn_out", "blocks.8.hook_attn_out"]
    assert hooks_for_layers([5], "mlp.hook_post", 24) == ["blocks.5.mlp.hook_post"]
    with pytest.raises(ValueError, match=r"layer 30 out of range: model has 24 layers \(0-23\)"):
        hooks_for_layers("0,30", "residual", 24)
    with pytest.raises(ValueError, match="unknown activation 'logits'"):
        hooks_for_layers("all", "logits", 24)
    with pytest.raises(ValueError, match="bad layer selection"):
        hooks_for_layers("first", "residual", 24)


def test_widths_and_depth():
    config = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=4))
    assert hook_width(config, "blocks.1.mlp.hook_post") == config.d_mlp == 128
    assert hook_width(config, "ln_final.hook_normalized") == config.d_model == 64
    assert layers_needed(("hook_embed", "blocks.0.hook_resid_pre"), 4) == 0
    assert layers_needed(("blocks.2.hook_resid_pre",), 4) == 2
    assert layers_needed(("blocks.2.hook_attn_out",), 4) == 3
    assert layers_needed(("ln_final.hook_normalized",), 4) == 4
