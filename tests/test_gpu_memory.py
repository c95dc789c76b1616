"""Issue 20: every `auto` is planned for the GPU the run gets (launcher/gpus.py reads nvidia-smi,
faked here by a script on PATH), `zerotune train` runs the fit check before torchrun starts, and
RUN_DIR/recipe.yaml records the GPU memory planned for."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import base_recipe, write_recipe, zerotune
from test_plan import LLAMA_1B, LLAMA_8B
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe
from zerotune.launcher.gpus import local_gpus, planned_gpu_memory
from zerotune.launcher.prepare import resolve


def fake_smi(tmp_path, *mib: int, caps: tuple[str, ...] | None = None) -> str:
    """A directory holding an `nvidia-smi` that prints `index, uuid, MiB, compute_cap` of these GPUs,
    one a line (the query launcher/gpus.py asks); without `caps`, a driver that knows no compute_cap
    (it refuses that query, as old drivers do, and answers `index, uuid, MiB`). Returns a PATH."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    smi = d / "nvidia-smi"
    rows = [f"{i}, GPU-{i}a{i}b-0000, {m}" + (f", {caps[i]}" if caps else "") for i, m in enumerate(mib)]
    refuse = "" if caps else 'case "$*" in *compute_cap*) echo "Field compute_cap is not valid" >&2; exit 2;; esac\n'
    smi.write_text("#!/bin/sh\n" + refuse + "".join(f"echo '{r}'\n" for r in rows))
    smi.chmod(0o755)
    return f"{d}{os.pathsep}{os.environ['PATH']}"


def model_dir(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def peft_8b(tmp_path, kind="lora", **train):
    return validate_recipe(base_recipe(
        tmp_path, model={"path": model_dir(tmp_path, "m8b", LLAMA_8B), "dtype": "bf16"}, method={"kind": kind},
        data={"train": base_recipe(tmp_path)["data"]["train"], "max_len": 2048},
        train={"max_steps": 4, "micro_batch_size": 4, "gradient_checkpointing": "auto", **train},
        distributed={"zero": "auto"}))


def test_nvidia_smi_is_read_smallest_gpu_counts(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", fake_smi(tmp_path, 143771, 81920))
    assert local_gpus() == (2, 81920 * 2 ** 20, None)   # a driver without compute_cap: asked again without it
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert local_gpus() == (0, None, None)
    gpu = planned_gpu_memory(peft_8b(tmp_path))
    assert not gpu.known and gpu.describe().startswith("a CPU run") and "80 GiB" in gpu.describe()
    assert planned_gpu_memory(peft_8b(tmp_path), slurm=True).describe().startswith("80 GiB per GPU (assumed")


def test_cuda_visible_devices_picks_the_gpus_counted(tmp_path, monkeypatch):
    """One nvidia-smi query gives the count, the memory and the compute capability, as CUDA sees
    them: indices or UUID prefixes, in order, up to the first that names no GPU; set but empty: none."""
    monkeypatch.setenv("PATH", fake_smi(tmp_path, 143771, 81920, 40960, caps=("9.0", "9.0", "8.0")))
    for visible, want in (("0", (1, 143771, (9, 0))), ("2,0", (2, 40960, (8, 0))), ("GPU-1a1b", (1, 81920, (9, 0))),
                          ("0,7,1", (1, 143771, (9, 0))), ("", (0, None, None)), ("-1", (0, None, None))):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        count, size, cap = local_gpus()
        assert (count, size and size / 2 ** 20, cap) == want, visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")   # the GPU that runs decides train.precision: auto
    assert planned_gpu_memory(peft_8b(tmp_path)).capability == (9, 0)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_the_planner_chooses_for_the_gpu_it_reads(tmp_path, monkeypatch, kind):
    """24 GB: LoRA 8B at mbs 4 x 2048 fits no strategy, QLoRA only with checkpointing (most layers); 80 GB:
    LoRA checkpoints some layers, QLoRA none; H200: off."""
    recipe = peft_8b(tmp_path, kind)
    chosen = {}
    for mib in (24576, 81920, 143771):
        monkeypatch.setenv("PATH", fake_smi(tmp_path, mib))
        gpu = planned_gpu_memory(recipe)
        assert gpu.source == "nvidia-smi"
        try:
            r = resolve(recipe, 1, 1, gpu)
            chosen[mib] = r.train.gradient_checkpointing
            assert r.cluster.gpu_memory == f"{mib / 1024:.1f}GiB"
        except RecipeError as e:
            chosen[mib] = "refused"
            assert "24.0 GiB" in str(e) and "\n" not in str(e)
    # 80 GB: LoRA checkpoints by the layer, the fewest of the 32 that fit; QLoRA's 4-bit base leaves room
    # for every layer's activations since LoRA's dropout is drawn again, not kept (training/model/lora_fused.py)
    partial = chosen[81920] is True or (type(chosen[81920]) is int and 0 < chosen[81920] < 32)
    assert partial if kind == "lora" else chosen[81920] is False, chosen
    if kind == "qlora":   # 24 GB: all or nearly all layers checkpointed
        assert chosen[24576] is True or (type(chosen[24576]) is int and 24 <= chosen[24576] < 32), chosen
    assert chosen == {24576: "refused" if kind == "lora" else chosen[24576], 81920: chosen[81920], 143771: False}


def test_slurm_plans_for_cluster_gpu_memory_not_the_login_node(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path, 24576))
    recipe = peft_8b(tmp_path).model_copy(update={"cluster": peft_8b(tmp_path).cluster.model_copy(
        update={"gpu_memory": "141GB"})})
    assert planned_gpu_memory(recipe, slurm=True).bytes == 141 * 2 ** 30
    assert planned_gpu_memory(recipe).bytes == 24576 * 2 ** 20
    assert planned_gpu_memory(recipe, flag="40GB").source == "--gpu-memory"


def test_micro_batch_auto_keeps_the_global_batch(tmp_path):
    from zerotune.launcher.gpus import GpuMemory
    r = validate_recipe(base_recipe(
        tmp_path, model={"path": model_dir(tmp_path, "m1b", LLAMA_1B), "dtype": "bf16"},
        data={"train": base_recipe(tmp_path)["data"]["train"], "max_len": 2048},
        train={"max_steps": 4, "micro_batch_size": "auto", "global_batch_size": 64}, distributed={"zero": "auto"}))
    picked = {}
    for gib in (24, 80, 140):
        t = resolve(r, 1, 1, GpuMemory(gib * 2 ** 30, "--gpu-memory")).train
        assert t.micro_batch_size * t.accumulation(1) == 64
        picked[gib] = t.micro_batch_size
    assert picked[24] < picked[80] < picked[140]
    with pytest.raises(Exception, match="micro_batch_size: auto needs train.global_batch_size"):
        validate_recipe(base_recipe(tmp_path, train={"max_steps": 4, "micro_batch_size": "auto"}))


def test_train_refuses_what_cannot_fit_before_torchrun(tmp_path):
    """stories260K at a micro-batch that fits 24 GiB only with checkpointing, asked for without:
    one line naming the --set that fits; nothing written, torchrun never started."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, distributed={"zero": "auto"},
                                                train={"max_steps": 1, "micro_batch_size": 20000}))
    r = zerotune("train", str(recipe), check=False, timeout=300, env={"PATH": fake_smi(tmp_path, 24576)})
    lines = r.stderr.strip().splitlines()   # the data's own warnings (prompts longer than max_len) may come first
    errors = [ln for ln in lines if ln.startswith("zerotune: error:")]
    assert r.returncode == 2 and errors == lines[-1:], r.stderr
    assert all(ln.startswith("zerotune: warning: data.") for ln in lines[:-1]), r.stderr
    # checkpointing by the layer: the fewest of the 5 layers that fit (4), the rest as they are
    assert "24.0 GiB" in errors[0] and "--set train.gradient_checkpointing=4 --set train.offload_activations=false " \
        "--set train.tiled_mlp=false fits" in errors[0]
    # RUN_DIR untouched; only the tokenized cache the plan read its lengths from (kept for the retry)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".zerotune-cache"]


def test_train_records_the_memory_planned_for(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, distributed={"zero": "auto"},
                                                train={"max_steps": 1, "micro_batch_size": 2}))
    r = zerotune("launch", str(recipe), "--dry-run", env={"PATH": fake_smi(tmp_path, 143771)})
    assert "planned for 140.4 GiB per GPU (nvidia-smi)" in r.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())
    assert saved["cluster"]["gpu_memory"] == "140.4GiB" and saved["train"]["gradient_checkpointing"] is False
    r = zerotune("launch", str(recipe), "--dry-run", env={"PATH": str(tmp_path / "nowhere") + os.pathsep + "/usr/bin:/bin"})
    assert "planned for a CPU run (no GPU seen here; auto chosen as for 80 GiB GPUs)" in r.stderr


def test_slurm_leaves_attention_auto_to_the_ranks(tmp_path):
    """A Slurm job's attention auto is not decided on the login node (no GPU there: it would be
    sdpa): RUN_DIR/recipe.yaml keeps auto, as for model.kernels; a local run with a GPU and
    flash_attn decides it at once (the GPU count from nvidia-smi, not torch)."""
    fake = tmp_path / "site"
    (fake / "flash_attn").mkdir(parents=True)
    (fake / "flash_attn" / "__init__.py").write_text("")
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, train={"max_steps": 1, "micro_batch_size": 2}))
    env = {"PATH": fake_smi(tmp_path, 143771), "PYTHONPATH": str(fake)}
    r = zerotune("launch", str(recipe), "--slurm", "--dry-run", "--gpu-memory", "80GB", env=env)
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())
    assert saved["model"]["attn_implementation"] == "auto", r.stderr
    assert "attention auto (each rank decides), kernels auto (each rank decides)" in r.stderr
    zerotune("launch", str(recipe), "--dry-run", env=env)
    saved = yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())
    assert saved["model"]["attn_implementation"] == "flash_attention_2"


def test_a_rank_decides_attention_auto_on_its_gpu(tmp_path, monkeypatch):
    """training/model/build.py: attention auto on a rank: flash_attention_2 where the rank has a
    CUDA GPU and flash_attn, else sdpa; an explicit kernel as given; kernels_report says it."""
    import types
    import torch
    from transformers import LlamaConfig
    from zerotune.training.model.build import attention, kernels_report
    fake = tmp_path / "site"
    (fake / "flash_attn").mkdir(parents=True)
    (fake / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake))
    recipe = validate_recipe(base_recipe(tmp_path))
    assert recipe.model.attn_implementation == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention(recipe, LlamaConfig()) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention(recipe, LlamaConfig()) == "sdpa"
    eager = recipe.model_copy(update={"model": recipe.model.model_copy(update={"attn_implementation": "eager"})})
    assert attention(eager, LlamaConfig()) == "eager"
    built = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"),
                                  _zerotune_kernels="liger")
    assert kernels_report(built) == "attention flash_attention_2, kernels liger"
