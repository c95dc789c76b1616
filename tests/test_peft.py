"""PEFT methods end to end on CPU: stories260K on the Alpaca demo data, 2 processes, real
DeepSpeed (ZeRO 0 or 2), real peft and bitsandbytes (4-bit works on CPU).

One torchrun launch trains every method in turn (this file is also the worker it runs:
`python -m torch.distributed.run --nproc_per_node 2 tests/test_peft.py RUN_DIR ...`), so
the heavy imports are paid once. After each run rank 0 keeps what the tests need: the
trained model's full state dict (base included) and its logits on a fixed probe batch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, STORIES, base_recipe, write_recipe  # noqa: E402

# method -> (ZeRO stage, method settings, train settings); stages 0 and 2 are both covered
METHODS = {
    "lora": (2, {"lora": {"r": 8, "dropout": 0.0}}, {}),
    "qlora": (0, {"lora": {"r": 8, "dropout": 0.0}, "quant": {"compute_dtype": "fp32"}},
              {"optimizer": "paged_adamw_8bit"}),
    "ia3": (2, {}, {"lr": 3e-2}),
    "prompt_tuning": (0, {"prompt": {"num_virtual_tokens": 8, "init": "text", "init_text": "Once upon a time"}},
                      {"lr": 3e-2}),
    "p_tuning": (2, {"prompt": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}, {}),
    "prefix_tuning": (0, {"prompt": {"num_virtual_tokens": 8}}, {"gradient_checkpointing": False, "lr": 3e-2}),
    "adapter": (2, {"adapter": {"bottleneck": 16}}, {}),
}
FULL = {"full-z3": 3, "full-z2": 2}
EXTRA = ("lora-z3", "lora-resume")  # LoRA at ZeRO-3; LoRA with a mid-run checkpoint
MERGEABLE = ("lora", "qlora", "ia3")
STEPS = 3
PROBE = [[1, 403, 261, 378, 275, 40, 269, 296, 418, 379, 263, 58, 13, 2, 1, 82],
         [1, 13, 35, 35, 35, 508, 299, 293, 58, 13, 375, 303, 40, 273, 264, 2]]
CAPTURE = "trained.safetensors"  # rank 0 writes it into each run dir after training


def _recipe(tmp: Path, name: str) -> dict:
    if name in FULL:
        return base_recipe(tmp, name=name, distributed={"zero": FULL[name]},
                           train={"max_steps": STEPS, "lr": 1e-2, "warmup_steps": 0})
    if name == "lora-z3":
        return base_recipe(tmp, name=name, method={"kind": "lora", **METHODS["lora"][1]}, distributed={"zero": 3},
                           train={"max_steps": STEPS, "lr": 1e-2, "warmup_steps": 0})
    if name == "lora-resume":
        stage, method, train = METHODS["lora"]
        return base_recipe(tmp, name=name, method={"kind": "lora", **method}, distributed={"zero": stage},
                           train={"max_steps": 4, "lr": 1e-2, "warmup_steps": 0, **train}, checkpoint={"every": 2})
    stage, method, train = METHODS[name]
    return base_recipe(tmp, name=name, method={"kind": name, **method}, distributed={"zero": stage},
                       train={"max_steps": STEPS, "lr": 1e-2, "warmup_steps": 0, **train})


# ----------------------------------------------------------------------------- the worker
def _worker(run_dirs: list[str]) -> int:
    """Every rank: train each run in turn with the real loop; rank 0 keeps the trained model."""
    import torch
    from safetensors.torch import save_file

    import zerotune.training.run.loop as loop
    kept = {}
    build = loop.build_model

    def build_and_keep(recipe, ds_config):
        kept["model"] = build(recipe, ds_config)
        return kept["model"]
    loop.build_model = build_and_keep
    for i, run_dir in enumerate(run_dirs):
        if i:  # a fresh rendezvous for each run: rank 0 hosts a new store on the next port
            import importlib

            import deepspeed.comm.comm as ds_comm
            import deepspeed.utils.groups as ds_groups
            ds_comm.cdb = None
            importlib.reload(ds_groups)  # forget the previous run's process groups
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
            os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
        rc = loop.train(Path(run_dir))
        if rc != 0:
            return rc
        if os.environ["RANK"] == "0" and Path(run_dir).name in METHODS:
            model = kept["model"].eval()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(PROBE)).logits
            tensors = {"logits": logits, **{"state." + k: v.detach().clone().contiguous()
                                            for k, v in model.state_dict().items()}}
            save_file(tensors, str(Path(run_dir) / CAPTURE))
    return 0


# ----------------------------------------------------------------------------- the runs
def _train_all(tmp: Path, names: list[str]) -> dict[str, Path]:
    from zerotune.launcher.prepare import prepare_run
    dirs = {}
    for name in names:
        recipe = prepare_run(str(write_recipe(tmp, _recipe(tmp, name), f"{name}.yaml")), [], world_size=2)
        dirs[name] = recipe.run_dir
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, *map(str, dirs.values())], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return dirs


_trained: dict[str, dict[str, Path]] = {}  # test_export/test_generate import the fixture: train once


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every PEFT method, two full runs (ZeRO-3 and ZeRO-2), LoRA at ZeRO-3, and a LoRA run with a
    mid-run checkpoint."""
    if "dirs" not in _trained:
        _trained["dirs"] = _train_all(tmp_path_factory.mktemp("peft"), [*METHODS, *FULL, *EXTRA])
    return _trained["dirs"]


def losses(run_dir: Path) -> list[float]:
    """train/loss by step (a resumed run's rows replace those it repeats)."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def captured(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / CAPTURE))


def run_recipe(run_dir: Path):
    from zerotune.core.recipe_load import load_run_recipe
    return load_run_recipe(run_dir)


def fresh_model(recipe):
    """The untrained model a run starts from (same seed, same method), on one CPU process."""
    import torch

    from zerotune.training.model.build import build_model
    torch.manual_seed(recipe.train.seed)
    return build_model(recipe, {})


def load_adapter_model(recipe, folder: Path):
    """Base + exported adapter, loaded the way a user would (PeftModel / zerotune adapters)."""
    from transformers import AutoModelForCausalLM

    from zerotune.training.model import adapters
    from zerotune.training.model.build import DTYPES, keep_4bit_cpu_layout, quantization_config
    base = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=DTYPES[recipe.model.dtype],
                                                quantization_config=quantization_config(recipe))
    keep_4bit_cpu_layout(base)   # as zerotune's own loaders do (training/model/build.py)
    if adapters.is_adapter_folder(folder):
        return adapters.load_adapter(base, folder).eval()
    from peft import PeftModel
    return PeftModel.from_pretrained(base, str(folder)).eval()


def probe_logits(model):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits


# ----------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_trains_and_loss_falls(runs, method):
    curve = losses(runs[method])
    assert len(curve) == STEPS
    assert curve[-1] < curve[0], f"{method}: loss did not fall: {curve}"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_only_adapter_parameters_change(runs, method):
    """Every base tensor is bit-identical after training; the adapter's parameters moved."""
    import torch
    recipe = run_recipe(runs[method])
    fresh = fresh_model(recipe)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    after = {k[len("state."):]: v for k, v in captured(runs[method]).items() if k.startswith("state.")}
    before = fresh.state_dict()
    assert set(before) == set(after)
    frozen = [k for k in before if k not in trainable]
    assert frozen and trainable
    changed_base = [k for k in frozen if not torch.equal(before[k].cpu(), after[k])]
    assert not changed_base, f"{method}: frozen tensors changed: {changed_base[:5]}"
    moved = [k for k in trainable if not torch.equal(before[k].cpu(), after[k])]
    assert moved, f"{method}: no adapter parameter changed"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_holds_only_trainable_parameters(runs, method):
    from zerotune.core.layout import latest_complete
    from zerotune.training.export.write import checkpoint_tensors
    ckpt = latest_complete(runs[method])
    fresh = fresh_model(run_recipe(runs[method]))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    # DeepSpeed drops frozen parameters by their first name only: a tied copy's second name
    # (lm_head.weight of stories260K) stays (DeepSpeed's module_state_dict, 0.19.8)
    # Frozen entries that are not parameters stay too: bitsandbytes' 4-bit quantisation state (absmax, ...)
    first_names = {n for n, _ in fresh.named_parameters()}
    tied_copies = {n for n, _ in fresh.named_parameters(remove_duplicate=False)} - first_names
    not_parameters = set(fresh.state_dict()) - {n for n, _ in fresh.named_parameters(remove_duplicate=False)}
    saved = set(checkpoint_tensors(ckpt, trainable_only=True))
    assert trainable <= saved and saved - trainable <= tied_copies | not_parameters
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    assert size < 3_000_000, f"{ckpt} holds {size} bytes: frozen weights were saved"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["export", "final"])
@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_reloads_and_reproduces_trained_logits(runs, method, source, tmp_path):
    """`zerotune export` (from the checkpoint) and RUN_DIR/final both give an adapter folder
    that loads onto a fresh base and reproduces the trained model's logits."""
    import torch

    from zerotune.core.layout import latest_complete
    from zerotune.training.export.write import export_checkpoint
    recipe = run_recipe(runs[method])
    if source == "export":
        folder = tmp_path / "adapter"
        export_checkpoint(recipe, latest_complete(runs[method]), folder)
    else:
        folder = runs[method] / "final"
    config = "zerotune_adapter.json" if method == "adapter" else "adapter_config.json"
    assert (folder / config).is_file() and (folder / "tokenizer_config.json").is_file()
    assert not (folder / "model.safetensors").exists()
    torch.testing.assert_close(probe_logits(load_adapter_model(recipe, folder)), captured(runs[method])["logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_reproduces_adapter_logits(runs, method, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from zerotune.core.layout import latest_complete
    from zerotune.training.export.write import export_checkpoint
    out = tmp_path / "merged"
    export_checkpoint(run_recipe(runs[method]), latest_complete(runs[method]), out, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not hasattr(merged.config, "quantization_config")
    assert all("lora" not in k and "ia3" not in k for k in merged.state_dict())
    torch.testing.assert_close(probe_logits(merged), captured(runs[method])["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "adapter"])
def test_merge_refuses_methods_that_cannot_merge(runs, method, tmp_path):
    from zerotune.core.layout import latest_complete
    from zerotune.training.export.write import ExportError, export_checkpoint
    with pytest.raises(ExportError, match="cannot be merged"):
        export_checkpoint(run_recipe(runs[method]), latest_complete(runs[method]), tmp_path / "m", merge=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_lora_resume_is_exact(runs, tmp_path):
    """Resuming the LoRA run from its step-2 checkpoint (trainable parameters only) repeats
    steps 3 and 4 exactly. The copy keeps no metrics: every loss compared is the resumed run's own."""
    src = runs["lora-resume"]
    first = losses(src)
    assert len(first) == 4
    # a copy of the run as it was after step 2, without metrics.jsonl (written only by the resumed run)
    run = tmp_path / "runs" / "lora-resume"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("step-000004", "final", "tensorboard", CAPTURE,
                                                            "metrics.jsonl"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "zerotune.training", str(run)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resumed from step-000002" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "train/loss" in r}) == [3, 4]
    # fp32 on CPU: equal to ~1e-7 (not bitwise: gloo's all-reduce and the restored optimizer
    # partitions may sum in another order)
    assert losses(run) == pytest.approx(first[2:], rel=1e-5, abs=0)


def test_recipe_errors_are_one_line(tmp_path):
    from zerotune.core.recipe import RecipeError
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.model.build import build_model
    with pytest.raises(RecipeError, match="gradient_checkpointing: false"):  # caught when the recipe loads
        validate_recipe(base_recipe(tmp_path, method={"kind": "prefix_tuning"}, distributed={"zero": 0},
                                    train={"gradient_checkpointing": True}))
    r = validate_recipe(base_recipe(tmp_path, method={"kind": "prefix_tuning"}, distributed={"zero": 0}))
    assert r.train.gradient_checkpointing is False and r.train.optimizer == "adamw"
    assert validate_recipe(base_recipe(tmp_path, method={"kind": "qlora"}, distributed={"zero": 0})).train.optimizer == "paged_adamw_8bit"
    r = validate_recipe(base_recipe(tmp_path, method={"kind": "prompt_tuning", "prompt": {"init": "text"}},
                                    distributed={"zero": 0}))
    with pytest.raises(RecipeError, match="method.prompt.init_text"):
        build_model(r, {})
    with pytest.raises(RecipeError, match="distributed.zero: 3 is for full, lora and qlora"):
        validate_recipe(base_recipe(tmp_path, method={"kind": "ia3"}, distributed={"zero": 3}))


def test_trainable_report_counts_4bit_weights_at_full_size(tmp_path):
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.model.build import build_model, trainable_report
    lora = build_model(validate_recipe(base_recipe(tmp_path, method={"kind": "lora"}, distributed={"zero": 0})), {})
    qlora = build_model(validate_recipe(base_recipe(tmp_path, method={"kind": "qlora", "quant": {"compute_dtype": "fp32"}},
                                                    distributed={"zero": 0})), {})
    r = validate_recipe(base_recipe(tmp_path, method={"kind": "qlora"}))
    assert trainable_report(qlora, r).split(":")[1] == trainable_report(lora, r).split(":")[1]
    assert "92,480 / 352,512" in trainable_report(lora, r)


RECIPES = ["demo-lora", "demo-qlora", "demo-ia3", "demo-prompt-tuning", "demo-p-tuning", "demo-prefix-tuning",
           "demo-adapter", "llama3-8b-lora", "llama3-8b-qlora"]


@pytest.mark.parametrize("name", RECIPES)
def test_method_recipes_are_valid(name):
    from zerotune.core.recipe_load import load_recipe
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.method.is_peft and recipe.zero_stage() in (0, 1, 2)
    if recipe.method.kind == "prefix_tuning":
        assert not recipe.train.gradient_checkpointing
    if recipe.method.kind == "qlora":
        assert recipe.train.optimizer == "paged_adamw_8bit"


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
