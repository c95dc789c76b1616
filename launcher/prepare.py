"""Recipe -> RUN_DIR: validate everything that can be checked before any GPU time is spent,
then write RUN_DIR/recipe.yaml (resolved) and RUN_DIR/ds_config.json."""
from __future__ import annotations

import json
from pathlib import Path

from zerotune.core.recipe import Recipe, RecipeError, load_recipe, validate_recipe

from zerotune.core.io import atomic_write
from zerotune.core.layout import DS_CONFIG_FILE, RECIPE_FILE, check_fresh_start

from . import ds_config


def check_model_path(recipe: Recipe) -> None:
    """A local folder must hold config.json; anything else must look like a hub id and be reachable."""
    for key, value in (("model.path", recipe.model.path), ("model.tokenizer", recipe.model.tokenizer)):
        if value is None:
            continue
        p = Path(value).expanduser()
        if p.exists():
            if key == "model.path" and not (p / "config.json").is_file():
                raise RecipeError(f"{key}: {value!r} is a folder without config.json (not a Hugging Face model)")
            continue
        looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
        if looks_local:
            raise RecipeError(f"{key}: {value!r} does not exist")
        try:
            from huggingface_hub import hf_hub_download
            hf_hub_download(value, "config.json" if key == "model.path" else "tokenizer_config.json")
        except Exception as e:  # offline, private, misspelt: one line, no traceback
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise RecipeError(f"{key}: {value!r} is not a local folder and could not be fetched from the hub ({reason})") from None


def check_data_paths(recipe: Recipe) -> None:
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, section)):
            p = Path(src.path).expanduser()
            if not p.exists() and (src.path.startswith((".", "/", "~")) or Path(src.path).suffix):
                raise RecipeError(f"data.{section}[{i}].path: {src.path!r} does not exist")


def resolve(recipe: Recipe, world_size: int, nodes: int = 1) -> Recipe:
    """Fill choices left to zerotune so RUN_DIR/recipe.yaml says what ran: `zero: auto` becomes
    the planner's fastest strategy that fits (launcher/plan.py), offload flags included."""
    data = recipe.model_dump(mode="json")
    if recipe.distributed.zero == "auto":
        from .plan import choose
        per_node = max(1, world_size // max(1, nodes))
        best = choose(recipe, gpus_per_node=per_node, nodes=nodes)
        data["distributed"].update(zero=best.zero, offload_optimizer=best.offload_optimizer,
                                   offload_params=best.offload_params)
    return validate_recipe(data, source="resolved recipe")


def prepare_run(recipe_path: str, overrides: list[str], world_size: int, nodes: int = 1) -> Recipe:
    recipe = load_recipe(recipe_path, overrides)
    check_model_path(recipe)
    check_data_paths(recipe)
    recipe = resolve(recipe, world_size, nodes)
    run_dir = recipe.run_dir
    check_fresh_start(run_dir, recipe.checkpoint.resume, recipe.checkpoint.overwrite)  # before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = ds_config.render(recipe, world_size)
    atomic_write(run_dir / RECIPE_FILE, recipe.to_yaml())
    atomic_write(run_dir / DS_CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    return recipe
