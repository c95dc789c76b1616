"""The recipe schema: good recipes load with defaults filled; bad ones fail naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_recipe, write_recipe, zerotune
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import apply_override, load_recipe, validate_recipe


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


# ----------------------------------------------------------------------------- precise messages (issue 11)
def test_null_says_null_not_missing(tmp_path):
    for key, message in (("output_dir", "output_dir: must not be null (leave the key out for the default, 'runs')"),
                         ("name", "name: must not be null (a required key)"),
                         ("train", "train: must not be null (leave the key out for the default)")):
        p = write_recipe(tmp_path, {**base_recipe(tmp_path), key: None}, "null.yaml")
        with pytest.raises(RecipeError) as e:
            load_recipe(p)
        assert str(e.value) == f"{p}: {message}"


def test_set_errors_name_the_set_not_the_file(tmp_path):
    from zerotune.core.recipe import Recipe, TrainConfig
    p = write_recipe(tmp_path, base_recipe(tmp_path))
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["train.lrr=1"])
    assert str(e.value) == f"--set train.lrr: unknown key (allowed: {', '.join(TrainConfig.model_fields)})"
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["trian.lr=1"])
    assert str(e.value) == f"--set trian.lr: trian: unknown key (allowed: {', '.join(Recipe.model_fields)})"
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["train.lr=fast"])
    assert str(e.value) == "--set train.lr: Input should be a valid number, unable to parse string as a number"
    with pytest.raises(RecipeError) as e:   # a file error stays the file's
        load_recipe(write_recipe(tmp_path, {**base_recipe(tmp_path), "optimiser": "adam"}, "bad.yaml"), ["train.lr=1"])
    assert str(e.value).startswith(f"{tmp_path / 'bad.yaml'}: optimiser: unknown key")


def test_yaml_booleans_where_text_is_expected(tmp_path):
    p = write_recipe(tmp_path, base_recipe(tmp_path))
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["name=off"])
    assert str(e.value) == "--set name: expects text, but YAML reads off as the boolean false; quote it: --set \"name='off'\""
    assert load_recipe(p, ["name='off'"]).name == "off"
    (tmp_path / "off.yaml").write_text(p.read_text().replace("name: t", "name: off"))
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "off.yaml")
    assert str(e.value) == (f"{tmp_path / 'off.yaml'}: name: expects text, but YAML read the value as the boolean "
                            "false (unquoted yes/no/on/off are booleans in YAML); quote it")


def test_set_indexes_lists(tmp_path):
    p = write_recipe(tmp_path, base_recipe(tmp_path))
    r = load_recipe(p, [f"data.train.0.path={ROOT / 'examples/data/sharegpt/dummy_conversation.json'}",
                        "data.train.0.format=sharegpt"])
    assert r.data.train[0].format == "sharegpt" and r.data.train[0].path.endswith("dummy_conversation.json")
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["data.train.3.path=x.json"])
    assert str(e.value) == "--set data.train.3.path: data.train has 1 item(s); '3' is not one of their indexes (0-0)"


# ----------------------------------------------------------------------------- relative paths (issue 10 item 6)
def test_relative_paths_resolve_against_the_recipe_folder_then_the_working_directory(tmp_path, monkeypatch):
    import shutil
    home, cwd = tmp_path / "recipes", tmp_path / "work"
    for folder in (home, cwd):
        (folder / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "examples" / "stories260K", home / "model")
    shutil.copy(ROOT / "examples/data/alpaca/alpaca_en_demo.json", cwd / "data" / "a.json")
    shutil.copy(ROOT / "examples/data/alpaca/alpaca_en_demo.json", home / "data" / "b.json")
    (home / "data" / "a.json").write_text("[]")             # also beside the recipe: the recipe's folder wins
    (home / "t.jinja").write_text("{{ messages }}")
    recipe = base_recipe(tmp_path, model={"path": "model", "chat_template": "./t.jinja"},
                         data={"train": [{"path": "data/a.json", "format": "alpaca"},
                                         {"path": "data/b.json", "format": "alpaca"}]})
    p = write_recipe(home, recipe)
    monkeypatch.chdir(cwd)
    r = load_recipe(p)
    assert r.model.path == str(home / "model") and r.model.chat_template == "{{ messages }}"
    assert [s.path for s in r.data.train] == [str(home / "data" / "a.json"), str(home / "data" / "b.json")]
    # a --set value is typed relative to the working directory: it looks there first
    assert load_recipe(p, ["data.train.0.path=data/a.json"]).data.train[0].path == str(cwd / "data" / "a.json")
    # what exists in neither place, and cannot be a hub id, is one line naming both places
    for override, key, value in (("model.path=./models/x", "model.path", "./models/x"),
                                 ("data.train.1.path=data/c.jsonl", "data.train.1.path", "data/c.jsonl")):
        with pytest.raises(RecipeError) as e:
            load_recipe(p, [override])
        assert str(e.value) == f"--set {key}: '{value}' does not exist (tried {cwd / value}, {home / value})".replace(
            "/./", "/")
    (home / "t.jinja").unlink()
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}: model.chat_template: './t.jinja' does not exist (tried {home / 't.jinja'}, {cwd / 't.jinja'})"


def test_hub_ids_stay_and_finished_runs_load_without_their_data(tmp_path):
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, model={"path": "meta-llama/Llama-3.1-8B"})))
    assert r.model.path == "meta-llama/Llama-3.1-8B"
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    gone = base_recipe(tmp_path, data={"train": [{"path": str(tmp_path / "deleted.jsonl"), "format": "alpaca"}]})
    write_recipe(run_dir, gone)
    from zerotune.core.recipe_load import load_run_recipe
    assert load_run_recipe(run_dir).data.train[0].path == str(tmp_path / "deleted.jsonl")
