"""ds_configs/*.json filled from the recipe: no "auto" left, values from the recipe, and
DeepSpeed's own config parser accepts every stage with and without offload."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import STORIES, base_recipe
from zerotune.launcher import ds_config
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe

TEMPLATES = Path(__file__).resolve().parent.parent / "ds_configs"
CASES = [(0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False),
         (3, False, False), (3, True, False), (3, True, True)]


def recipe(tmp_path, zero, opt, params, **train):
    return validate_recipe(base_recipe(
        tmp_path, model={"dtype": "bf16"},
        distributed={"zero": zero, "offload_optimizer": opt, "offload_params": params},
        train={"micro_batch_size": 2, "grad_accum": 3, "lr": 3e-4, "max_grad_norm": 0.5, "weight_decay": 0.1,
               "betas": [0.9, 0.95], **train}))


@pytest.mark.parametrize("zero,opt,params", CASES)
def test_rendered_config_has_no_auto_and_recipe_values(tmp_path, zero, opt, params):
    cfg = ds_config.render(recipe(tmp_path, zero, opt, params), world_size=4)
    assert ds_config.find_auto(cfg) == [] and '"auto"' not in json.dumps(cfg)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 3 * 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    z = cfg["zero_optimization"]
    assert z["stage"] == zero
    assert ("offload_optimizer" in z) == opt and ("offload_param" in z) == params
    if opt:
        assert z["offload_optimizer"]["device"] == "cpu"
    hidden = json.loads((STORIES / "config.json").read_text())["hidden_size"]
    if zero in (1, 2, 3):  # DeepSpeed's default buckets: measured faster than HF's hidden^2 on the H100
        assert z["reduce_bucket_size"] == 500_000_000
    if zero == 3:
        assert z["stage3_prefetch_bucket_size"] == 50_000_000
        assert z["stage3_param_persistence_threshold"] == 10 * hidden


@pytest.mark.parametrize("params", [False, True])
def test_zero3_in_one_process_keeps_every_parameter_whole(tmp_path, params):
    """World size 1: nothing to partition across, so no parameter is gathered before use (issue 29:
    ZeRO-3 on one GPU paid for gathers that save nothing); with offload_params they still live on
    the CPU between uses. Two processes keep the 10 x hidden rule."""
    hidden = json.loads((STORIES / "config.json").read_text())["hidden_size"]
    one = ds_config.render(recipe(tmp_path, 3, params, params), world_size=1)["zero_optimization"]
    two = ds_config.render(recipe(tmp_path, 3, params, params), world_size=2)["zero_optimization"]
    assert one["stage3_param_persistence_threshold"] == (10 * hidden if params else ds_config.ONE_PROCESS_PERSISTENCE)
    assert two["stage3_param_persistence_threshold"] == 10 * hidden


@pytest.mark.parametrize("zero,opt,params", CASES)
def test_deepspeed_accepts_the_config(tmp_path, zero, opt, params):
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = ds_config.render(recipe(tmp_path, zero, opt, params), world_size=1)
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == zero
    assert parsed.train_batch_size == 6
    assert (parsed.zero_config.offload_optimizer is not None) == opt
    assert (parsed.zero_config.offload_param is not None) == params


def test_template_names_and_hand_use():
    """The five templates users may hand to DeepSpeed / HF Trainer as they are (with "auto")."""
    for stage, opt, params in [(1, 0, 0), (2, 0, 0), (3, 0, 0), (3, 1, 0), (3, 1, 1)]:
        name = ds_config.template_name(stage, bool(opt), bool(params))
        cfg = json.loads((TEMPLATES / name).read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == "auto"
    assert ds_config.template_name(3, True, True) == "zero3_offload_all.json"
    assert ds_config.template_name(3, True, False) == "zero3_offload_optimizer.json"


def test_bitsandbytes_optimizer_leaves_the_optimizer_to_the_engine(tmp_path):
    cfg = ds_config.render(recipe(tmp_path, 0, False, False, optimizer="paged_adamw_8bit"), world_size=1)
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True


def test_fp32_and_fp16(tmp_path):
    r = validate_recipe(base_recipe(tmp_path, model={"dtype": "fp16"}))
    cfg = ds_config.render(r, 1)
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    r = validate_recipe(base_recipe(tmp_path, model={"dtype": "fp32"}))
    cfg = ds_config.render(r, 1)
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is False


def test_global_batch_not_divisible(tmp_path):
    r = validate_recipe(base_recipe(tmp_path, train={"micro_batch_size": 4, "global_batch_size": 10}))
    with pytest.raises(RecipeError, match="global_batch_size: 10 is not a multiple"):
        ds_config.render(r, world_size=2)


def test_hub_model_without_local_config_gets_default_buckets(tmp_path):
    r = validate_recipe(base_recipe(tmp_path, model={"path": "org/not-local"}, distributed={"zero": 3}))
    z = ds_config.render(r, 1)["zero_optimization"]
    assert z["reduce_bucket_size"] == 500_000_000 and ds_config.find_auto(z) == []
