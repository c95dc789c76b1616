"""The recipe schema: good recipes load with defaults filled; bad ones fail naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_recipe, write_recipe, zerotune
from zerotune.core.recipe import RecipeError, apply_override, load_recipe, validate_recipe


def test_demo_and_shipped_recipes_load():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        assert r.name and r.data.train, path


def test_defaults_are_filled_and_run_dir(tmp_path):
    r = validate_recipe(base_recipe(tmp_path))
    assert r.train.max_grad_norm == 1.0 and r.checkpoint.resume == "auto" and r.model.trust_remote_code is False
    assert r.run_dir == Path(tmp_path / "runs" / "t")
    # the written recipe reloads to the same thing
    assert validate_recipe(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["method"].update(kind="qlra"), "method.kind: 'qlra' is not one of full, lora, qlora, ia3, prompt_tuning, p_tuning, prefix_tuning, adapter"),
    (lambda r: r.update(trainn={}), "trainn: unknown key (allowed: name, output_dir, model, method, data, train"),
    (lambda r: r["train"].update(lr="fast"), "train.lr: Input should be a valid number"),
    (lambda r: r["train"].update(lr=-1), "train.lr: Input should be greater than 0"),
    (lambda r: r["model"].update(dtype="bf17"), "model.dtype: 'bf17' is not one of bf16, fp16, fp32"),
    (lambda r: r["distributed"].update(zero=4), "distributed.zero: 4 is not one of 0, 1, 2, 3, auto"),
    (lambda r: r["data"]["train"][0].update(format="csvv"), "data.train.0.format: 'csvv' is not one of alpaca, sharegpt, messages, prompt_completion, text"),
    (lambda r: r["data"].update(train=[]), "data.train: List should have at least 1 item"),
    (lambda r: r["data"]["train"][0].pop("path"), "data.train.0.path: required key is missing"),
    (lambda r: r.pop("model"), "model: required key is missing"),
    (lambda r: r["train"].update(scheduler="cosin"), "train.scheduler: 'cosin' is not one of cosine, linear, constant"),
    (lambda r: r["train"].update(grad_accum=2, global_batch_size=16), "set train.grad_accum or train.global_batch_size, not both"),
    (lambda r: r["distributed"].update(zero=2, offload_params=True), "distributed.offload_params needs zero: 3"),
    (lambda r: r["model"].update(trust_remote=True), "model.trust_remote: unknown key (allowed: path, tokenizer, dtype"),
    (lambda r: r.update(name="my run; rm -rf /"), "name: Value error, 'my run; rm -rf /' must start with a letter or digit"),
    (lambda r: r["cluster"].update(partition="gpu$(reboot)"), "cluster.partition: "),
    (lambda r: r["method"].update(lora={"r": 0}), "method.lora.r: Input should be greater than 0"),
])
def test_bad_recipes_name_the_key(tmp_path, mutate, expected):
    r = base_recipe(tmp_path)
    r.setdefault("cluster", {})
    mutate(r)
    with pytest.raises(RecipeError) as e:
        validate_recipe(r, source="x.yaml")
    assert expected.replace("Value error, ", "") in str(e.value), str(e.value)
    assert str(e.value).startswith("x.yaml: ")


def test_set_overrides_parse_yaml(tmp_path):
    data = base_recipe(tmp_path)
    apply_override(data, "train.lr=1e-4")
    apply_override(data, "data.train=[{path: x.jsonl, format: messages}]")
    apply_override(data, "method.lora.r=8")
    apply_override(data, "data.packing=true")
    r = validate_recipe(data)
    assert r.train.lr == 1e-4 and r.data.train[0].format == "messages" and r.method.lora.r == 8 and r.data.packing
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_override(data, "train.lr")
    with pytest.raises(RecipeError, match="not valid YAML"):
        apply_override(data, "train.lr=[1,")


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodel: {path: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_recipe(p)


def test_cli_errors_are_one_line(tmp_path, recipe_file):
    p = zerotune("train", str(tmp_path / "missing.yaml"), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "recipe file not found" in p.stderr

    bad = write_recipe(tmp_path, {**base_recipe(tmp_path), "optimiser": "adam"}, "bad.yaml")
    p = zerotune("train", str(bad), check=False)
    assert p.returncode == 2 and "optimiser: unknown key" in p.stderr and "Traceback" not in p.stderr

    p = zerotune("train", str(recipe_file()), "--set", "model.path=/nonexistent/model", check=False)
    assert p.returncode == 2 and "model.path: '/nonexistent/model' does not exist" in p.stderr

    p = zerotune("train", str(recipe_file()), "--set", "model.path=no-such-org/no-such-model", check=False,
                 env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "could not be fetched from the hub" in p.stderr and "Traceback" not in p.stderr


def test_help_for_every_command():
    top = zerotune("--help")
    from zerotune.launcher.cli import COMMANDS
    for name in COMMANDS:
        assert name in top.stdout
        sub = zerotune(name, "--help")
        assert "usage: zerotune " + name in sub.stdout and "not built yet" not in sub.stdout


def test_cli_does_not_import_torch():
    """`zerotune --help`, plan and launch run on login nodes: no torch at import time."""
    import subprocess, sys
    code = "import sys, zerotune.launcher.cli; zerotune.launcher.cli.build_parser(); bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
