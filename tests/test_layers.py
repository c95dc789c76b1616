"""Checkpointing by the layer and offloading only what does not fit (issues 26.2/26.6, 28.1/28.3):
the planner resolves train.gradient_checkpointing to the fewest layers that fit, train.offload_activations
to the fewest layers whose inputs wait in CPU memory, tiles the MLP only when nothing fits untiled, and
RUN_DIR/recipe.yaml records those values (and train.compile's); the model checkpoints exactly the
first N layers and offloads the first M, training the same losses; the planner knows the longest
sequence a GPU (and the host) fits, and a longer one is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import base_recipe
from test_long_sequence import LLAMA3_8B, built, loss_and_grads, packed_batch, recipe_with
from zerotune.core.io import GIB
from zerotune.core.memory import Strategy, Workload
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe
from zerotune.launcher.gpus import GpuMemory


def llama8b(tmp_path, **sections):
    model = tmp_path / "llama3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    r = base_recipe(tmp_path, model={"path": str(model), "dtype": "bf16", **sections.pop("model", {})},
                    method={"kind": "lora"}, distributed={"zero": 0}, **sections)
    if "gradient_checkpointing" not in sections.get("train", {}):
        r["train"].pop("gradient_checkpointing")   # auto, as a user writes it
    return validate_recipe(r)


def resolved(recipe, gpu_gib: float, host_gib: float = 128):
    from zerotune.launcher.prepare import resolve
    data = recipe.model_dump(mode="json")
    data["cluster"]["mem"] = f"{host_gib}GiB"   # the host memory the plan counts offloaded inputs against
    return resolve(validate_recipe(data), 1, 1, GpuMemory(gpu_gib * GIB, "--gpu-memory"))


# ----------------------------------------------------------------------------- the planner
def test_checkpointed_layers_follow_the_gpu_memory_and_recipe_yaml_records_them(tmp_path):
    from zerotune.core.layers import checkpointed_layers
    r = llama8b(tmp_path, data={"max_len": 32768}, train={"micro_batch_size": 1})
    counts = {}
    for gib in (40, 140, 400):
        t = resolved(r, gib).train
        counts[gib] = checkpointed_layers(t, 32)
        saved = yaml.safe_load(resolved(r, gib).to_yaml())["train"]   # what RUN_DIR/recipe.yaml holds
        assert saved["gradient_checkpointing"] == t.gradient_checkpointing != "auto"
    # more memory, fewer layers recomputed: all at 40 GiB (A100 40GB), some at 140 (H200), none at 400
    assert counts[40] == 32 and 0 < counts[140] < 32 and counts[400] == 0, counts
    assert type(resolved(r, 140).train.gradient_checkpointing) is int


def test_offloaded_layers_follow_gpu_and_host_memory(tmp_path):
    from zerotune.launcher.plan import Levers, fit_layers
    w = Workload(model=LLAMA3_8B, seq_len=524288, fused_loss=True, kernels="liger")
    st = Strategy("lora", 0)
    split = {gib: fit_layers(w, st, Levers(True, True, True), gib * GIB, 128 * GIB) for gib in (120, 130, 140)}
    offloaded = {gib: s.offload_activations for gib, s in split.items()}
    assert all(s.tiled_mlp and s.ckpt_layers == 32 for s in split.values())   # every lever before offloading
    assert 32 > offloaded[120] > offloaded[130] > offloaded[140] > 0, offloaded   # more GPU: fewer on the host
    from zerotune.launcher.plan import estimate
    assert estimate(split[120], st, 120 * GIB, 128 * GIB).fits
    assert not estimate(split[120], st, 120 * GIB, 16 * GIB).fits   # the host must hold them too
    # and from the recipe: the count recorded (the first N layers), more GPU memory -> fewer layers
    r = llama8b(tmp_path, data={"max_len": 524288}, train={"micro_batch_size": 1})
    t130, t140 = resolved(r, 130, host_gib=256).train, resolved(r, 140, host_gib=256).train
    assert type(t130.offload_activations) is type(t140.offload_activations) is int
    assert t130.offload_activations > t140.offload_activations > 0 and t140.tiled_mlp is True
    assert resolved(llama8b(tmp_path, data={"max_len": 32768}, train={"micro_batch_size": 1}), 140).train \
        .offload_activations is False   # fits on the GPU: nothing offloaded


def test_tiled_mlp_only_when_untiled_does_not_fit_and_compile_is_resolved(tmp_path, monkeypatch):
    short = resolved(llama8b(tmp_path, data={"max_len": 32768}, train={"micro_batch_size": 1}), 140).train
    assert short.tiled_mlp is False   # 32k tokens fit an H200 untiled (the old rule tiled from 16k)
    long = resolved(llama8b(tmp_path, data={"max_len": 262144}, train={"micro_batch_size": 1}), 140).train
    assert long.tiled_mlp is True
    for t in (short, long):   # concrete values in RUN_DIR/recipe.yaml, nothing left `auto`
        assert "auto" not in (t.compile, t.tiled_mlp, t.gradient_checkpointing, t.offload_activations, t.fused_loss)
    assert short.compile is False   # no GPU seen here (--gpu-memory): planned uncompiled
    data = llama8b(tmp_path, data={"max_len": 2048}, train={"micro_batch_size": 1}).model_dump(mode="json")
    from zerotune.launcher.prepare import resolve
    on_gpus = resolve(validate_recipe(data), 1, 1, GpuMemory(140 * GIB, "nvidia-smi", "gpus")).train
    assert on_gpus.compile is True and on_gpus.tiled_mlp is False   # LoRA at ZeRO-0 on a local GPU
    import importlib.util
    real = importlib.util.find_spec   # liger-kernel installed: its kernels are not compiled (build.py refuses both)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real(n, *a))
    liger = resolve(validate_recipe(data), 1, 1, GpuMemory(140 * GIB, "nvidia-smi", "gpus"))
    assert liger.model.kernels == "liger" and liger.train.compile is False
    slurm = resolve(validate_recipe(data), 1, 1, GpuMemory(140 * GIB, "cluster.gpu_memory", "slurm"))
    assert slurm.model.kernels == "auto" and slurm.train.compile == "auto"   # the ranks choose both


def test_attention_is_kept_where_the_planner_finds_it_faster_and_recipe_yaml_records_it(tmp_path, monkeypatch):
    """train.recompute_attention: auto (LoRA with liger's kernels, as a user on a GPU gets it): at 32k
    tokens on an 80 GB GPU the checkpointed layers keep attention's output (measured 1.07x on an H100,
    core/speed.py KEPT_ATTENTION_SPEED); at 2k tokens, where its share is ~1%, and where compile would
    lose the kept layers (no liger), attention is recomputed; a fixed value stays as written."""
    import importlib.util
    from zerotune.launcher.plan import choose
    from zerotune.launcher.prepare import resolve
    real = importlib.util.find_spec   # liger-kernel installed: model.kernels auto resolves to liger on a GPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real(n, *a))
    h100 = GpuMemory(79.6 * GIB, "nvidia-smi", "gpus")

    def run(**sections):
        return resolve(llama8b(tmp_path, **sections), 1, 1, h100)
    long = run(data={"max_len": 32768}, train={"micro_batch_size": 1})
    assert long.model.kernels == "liger" and long.train.compile is False
    assert long.train.recompute_attention is False and 0 < long.train.gradient_checkpointing < 32
    assert yaml.safe_load(long.to_yaml())["train"]["recompute_attention"] is False   # RUN_DIR/recipe.yaml
    kept = choose(long.model_copy(update={"train": long.train.model_copy(update={
        "recompute_attention": "auto", "gradient_checkpointing": "auto"})}), 1, 1, h100.bytes)
    plain = choose(long.model_copy(update={"train": long.train.model_copy(update={
        "recompute_attention": True, "gradient_checkpointing": "auto"})}), 1, 1, h100.bytes)
    assert kept.kept_attention and kept.label.endswith("+attention kept") and "train.recompute_attention=false" in kept.overrides()
    assert not plain.kept_attention and kept.tokens_per_s > plain.tokens_per_s
    assert kept.settings()["gradient_checkpointing"] == long.train.gradient_checkpointing
    short = run(data={"max_len": 2048}, train={"micro_batch_size": 4, "gradient_checkpointing": True})
    assert short.train.recompute_attention is True   # the attention forward is ~1% of a layer's work at 2k
    fixed = run(data={"max_len": 32768}, train={"micro_batch_size": 1, "recompute_attention": True})
    assert fixed.train.recompute_attention is True
    no_liger = resolve(llama8b(tmp_path, data={"max_len": 32768}, train={"micro_batch_size": 1},
                               model={"kernels": "none"}), 1, 1, h100)
    assert no_liger.train.compile is True and no_liger.train.recompute_attention is True   # compiled layers stay


def test_longest_sequence_per_strategy_and_the_refusal(tmp_path):
    from zerotune.launcher.plan import check_fits, longest_sequence
    w = Workload(model=LLAMA3_8B, fused_loss=True, kernels="liger")
    st = Strategy("lora", 0)
    gpu, host = longest_sequence(w, st, 140 * GIB, 128 * GIB, host=False)[0], \
        longest_sequence(w, st, 140 * GIB, 128 * GIB, host=True)[0]
    assert 131072 < gpu < 524288 <= host   # issue 28: 512K on one H200 needs the host for some checkpoints
    assert longest_sequence(w, st, 140 * GIB, 16 * GIB, host=True)[0] < host   # less host memory, shorter
    r = llama8b(tmp_path, data={"max_len": 2_000_000}, train={"micro_batch_size": 1})
    with pytest.raises(RecipeError) as e:
        resolved(r, 140)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.max_len: 2,000,000 tokens do not fit 1 GPU(s) of 140.0 GiB")
    longest = int(msg.split("--set data.max_len=")[1].split()[0])
    assert f"the longest that fits is {longest:,} tokens" in msg and 262144 < longest < 2_000_000
    data = r.model_dump(mode="json")
    for key, value in (x.split("=") for x in msg.split("--set ")[1:]):   # the --set it names: then it fits
        section, name = key.strip().split(".")
        data[section][name] = yaml.safe_load(value)
    assert resolved(validate_recipe(data), 140).data.max_len == longest
    # a resolved recipe run with its own settings (zerotune train's fit check) is refused the same way
    fixed = llama8b(tmp_path, data={"max_len": 2_000_000},
                    train={"micro_batch_size": 1, "gradient_checkpointing": True, "offload_activations": False,
                           "tiled_mlp": False, "fused_loss": True})
    with pytest.raises(RecipeError, match=r"^data.max_len: 2,000,000 tokens do not fit .* --set data.max_len=\d+ "
                                          r".*--set train.offload_activations=\S+ --set train.tiled_mlp=true"):
        check_fits(fixed, 1, 1, 140 * GIB, 128 * GIB)


# ----------------------------------------------------------------------------- the model
def layer_flags(model) -> list[bool]:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [bool(layer.gradient_checkpointing) for layer in lm.model.layers]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_k_of_n_layers_checkpointed_trains_like_all_and_none(tmp_path, kind):
    batch = packed_batch()
    results = {}
    for gc in (True, 2, False):
        data = recipe_with(tmp_path, tiled_mlp=False, offload_activations=False).model_dump(mode="json")
        data["train"]["gradient_checkpointing"] = gc
        data["method"] = {"kind": kind, "lora": {"r": 4, "dropout": 0.0}} if kind == "lora" else {"kind": kind}
        model = built(validate_recipe(data))
        assert layer_flags(model) == {True: [True] * 5, 2: [True, True, False, False, False], False: [False] * 5}[gc]
        results[gc] = [loss_and_grads(model, batch)]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(2):   # a few steps: the same losses step for step
            opt.step()
            results[gc].append(loss_and_grads(model, batch))
    for gc in (2, False):
        for (loss, grads), (ref_loss, ref) in zip(results[gc], results[True]):
            assert loss == pytest.approx(ref_loss, rel=1e-6)
            assert grads.keys() == ref.keys() and len(ref) > 4
            for n in ref:
                assert torch.allclose(grads[n], ref[n], rtol=1e-5, atol=1e-7), n


def test_offloading_some_layers_trains_like_none_at_a_long_sequence(tmp_path):
    """stories260K at 2,048 tokens a row: the first 3 of 4 checkpointed layers keep their input in
    CPU memory (prefetched when the backward reaches the layer after each), same losses and gradients
    as keeping them all on the device, over a few optimizer steps."""
    from zerotune.training.model import long_sequence
    ids = torch.randint(3, 512, (1, 2048), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids.clone()}
    results, prefetched = {}, []
    take = long_sequence.HostCheckpoints.take
    for offload in (False, 3):
        data = recipe_with(tmp_path, tiled_mlp=False, gradient_checkpointing=4,
                           offload_activations=offload).model_dump(mode="json")
        data["data"]["max_len"] = 2048
        model = built(validate_recipe(data))
        assert layer_flags(model) == [True] * 4 + [False]
        if offload:
            def spy(self, i, device, take=take):
                prefetched.append((i, i in self.ready))
                return take(self, i, device)
            long_sequence.HostCheckpoints.take = spy
        try:
            results[offload] = [loss_and_grads(model, batch)]
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            opt.step()
            results[offload].append(loss_and_grads(model, batch))
        finally:
            long_sequence.HostCheckpoints.take = take
    # layers 2, 1, 0 recomputed in that order (2 steps), each from a copy prefetched before its backward
    assert prefetched == [(2, True), (1, True), (0, True)] * 2
    for (loss, grads), (ref_loss, ref) in zip(results[3], results[False]):
        assert loss == ref_loss
        for n in ref:
            assert torch.equal(grads[n], ref[n]), n


def test_recipe_accepts_layer_counts(tmp_path):
    from zerotune.core.layers import checkpointed_layers, offloaded_layers
    r = recipe_with(tmp_path, gradient_checkpointing=3, offload_activations=2)
    assert (checkpointed_layers(r.train, 5), offloaded_layers(r.train, 5)) == (3, 2)
    assert checkpointed_layers(validate_recipe(base_recipe(tmp_path, train={"gradient_checkpointing": True})).train, 5) == 5
    with pytest.raises(RecipeError, match="gradient_checkpointing 3, offload_activations 4: layer counts are 0 or more, no more layers off"):
        recipe_with(tmp_path, gradient_checkpointing=3, offload_activations=4)
    with pytest.raises(RecipeError, match="gradient_checkpointing -1, offload_activations auto: layer counts are 0 or more"):
        recipe_with(tmp_path, gradient_checkpointing=-1)
