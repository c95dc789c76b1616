"""Memory options for long sequences (training/model/long_sequence.py): the tiled MLP and offloaded
checkpoints change no value (loss and gradients as without them, also with LoRA dropout), they
run inside real ZeRO-3 engines with sequence parallelism through `zerotune train`, and the
planner counts what they save and turns offloading on only when nothing fits without it."""
from __future__ import annotations

import pytest
import torch

from conftest import base_recipe, train_losses, write_recipe, zerotune
from zerotune.core.memory import Strategy, Workload, estimate_memory
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
             "tie_word_embeddings": False}
GIB = 2 ** 30


def recipe_with(tmp_path, **train):
    return validate_recipe(base_recipe(tmp_path, train={"gradient_checkpointing": True, **train},
                                       data={"max_len": 256, "packing": True}))


def built(recipe):
    from zerotune.training.model.build import build_model
    torch.manual_seed(0)
    model = build_model(recipe, {"zero_optimization": {"stage": 0}})
    model.config.use_cache = False
    model.train()
    return model


def loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 256), generator=g)
    pos = torch.cat([torch.arange(100), torch.arange(156)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, :20] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


@pytest.mark.parametrize("options", [{"tiled_mlp": True}, {"offload_activations": True},
                                     {"tiled_mlp": True, "offload_activations": True}],
                         ids=["tiled", "offload", "both"])
def test_options_change_no_value(tmp_path, options):
    plain = built(recipe_with(tmp_path, tiled_mlp=False, offload_activations=False))
    model = built(recipe_with(tmp_path, **options))
    if options.get("tiled_mlp"):
        assert type(model.model.layers[0].mlp.forward).__name__ == "function"   # patched, 4 tiles of 64 tokens
    batch = packed_batch()
    ref_loss, ref = loss_and_grads(plain, batch)
    loss, got = loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys() and len(ref) > 10
    for n in ref:
        rel = ((got[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-12)).item()
        assert rel < 1e-5, (n, rel)


def test_kept_attention_is_not_recomputed_and_changes_no_value(tmp_path):
    """train.recompute_attention: false: the backward's recompute of a checkpointed layer reuses the
    attention kernel's output from the forward (selective checkpointing); losses and gradients are
    those of the plain recompute."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from zerotune.training.model.long_sequence import ATTENTION_OPS

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func.__name__.split(".")[0] in ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 256), generator=g)
    batch = {"input_ids": ids, "labels": ids}   # causal, no mask: sdpa's fused kernel on CPU too
    runs = {}
    for recompute in (True, False):
        model = built(recipe_with(tmp_path, recompute_attention=recompute))
        with CountAttention() as count:
            runs[recompute] = (*loss_and_grads(model, batch), count.calls)
    layers = model.config.num_hidden_layers
    (ref_loss, ref, ref_calls), (loss, got, calls) = runs[True], runs[False]
    assert (ref_calls, calls) == (2 * layers, layers)   # forward + recompute, forward only
    assert loss == pytest.approx(ref_loss, rel=1e-6) and got.keys() == ref.keys()
    for n in ref:
        assert ((got[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-12)).item() < 1e-5, n


def test_planner_counts_kept_attention():
    w = Workload(model=LLAMA3_8B, seq_len=65536, gpus_per_node=4, fused_loss=True)
    st = Strategy("full", 3, grad_ckpt=True)
    base, kept = estimate_memory(w, st), estimate_memory(Workload(**{**w.__dict__, "keep_attention": True}), st)
    # every checkpointed layer: attention's bf16 output (32 heads x 128) and its fp32 statistics, a token
    assert kept["kept"] - base["kept"] == 32 * (32 * 128 * 2 + 4 * 32) * 65536
    assert kept["total"] - base["total"] == kept["kept"] - base["kept"]


def test_tiled_mlp_recomputes_with_the_dropout_masks_of_its_forward():
    """LoRA dropout inside the MLP: the backward's recompute draws the masks the forward drew
    (same RNG state), so the gradient is the gradient of what the forward computed."""
    from zerotune.training.model.long_sequence import TiledMLP
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 8))
    x = torch.randn(2, 40, 8, requires_grad=True)
    r = torch.randn(2, 40, 8)
    state = torch.get_rng_state()
    y = TiledMLP.apply(x, mlp.forward, 5, mlp)
    (y * r).sum().backward()
    got_x, got_w = x.grad.clone(), mlp[0].weight.grad.clone()
    x.grad = None
    mlp.zero_grad()
    torch.set_rng_state(state)   # the reference: the same tiles, in order, with autograd
    ref = torch.cat([mlp(p) for p in x.tensor_split(5, dim=-2)], dim=-2)
    assert torch.equal(ref, y)
    (ref * r).sum().backward()
    assert torch.allclose(got_x, x.grad, atol=1e-6) and torch.allclose(got_w, mlp[0].weight.grad, atol=1e-6)


def test_offload_needs_checkpointing_and_compile_stays_off(tmp_path):
    with pytest.raises(RecipeError, match="offload_activations: true offloads the inputs"):
        validate_recipe(base_recipe(tmp_path, train={"gradient_checkpointing": False, "offload_activations": True}))
    from zerotune.training.model.build import wants_compile
    from zerotune.training.model.long_sequence import options
    r = recipe_with(tmp_path, tiled_mlp=True)
    assert options(r) == ["tiled MLP"] and not wants_compile("auto", "full", 0, options(r))
    with pytest.raises(RecipeError, match="train.compile: true does not run with tiled MLP"):
        wants_compile(True, "full", 0, options(r))
    long = validate_recipe(base_recipe(tmp_path, data={"max_len": 65536}, distributed={"sequence_parallel": 4}))
    assert long.uses_tiled_mlp() and not validate_recipe(
        base_recipe(tmp_path, data={"max_len": 65536}, distributed={"sequence_parallel": 8})).uses_tiled_mlp()


def test_a_model_without_decoder_layers_is_refused_naming_the_setting_that_needs_them(tmp_path):
    """One finder of the layers (through a PEFT wrapper); each setting that needs them names itself."""
    from peft import LoraConfig, get_peft_model
    from zerotune.training.model.build import compile_layers, whole_layers_as_zero3_leaves
    from zerotune.training.model.long_sequence import checkpoint_first, decoder_layers, enable
    model = built(recipe_with(tmp_path))
    assert decoder_layers(get_peft_model(model, LoraConfig(target_modules=["q_proj"]))) is model.model.layers
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert decoder_layers(flat) is None and whole_layers_as_zero3_leaves(
        flat, {"stage": 3, "stage3_param_persistence_threshold": 10 ** 9}) == 0
    for setting, call in [
        ("train.tiled_mlp", lambda: enable(flat, recipe_with(tmp_path, tiled_mlp=True))),
        ("train.offload_activations", lambda: enable(flat, recipe_with(tmp_path, offload_activations=1))),
        ("train.gradient_checkpointing: 1", lambda: checkpoint_first(flat, recipe_with(tmp_path, gradient_checkpointing=1))),
        ("train.compile", lambda: compile_layers(flat, "full", 0)),
    ]:
        with pytest.raises(RecipeError, match=f"^{setting}: Sequential has no model.layers"):
            call()


# ----------------------------------------------------------------------------- the planner
def test_planner_counts_what_each_option_saves():
    w = Workload(model=LLAMA3_8B, seq_len=65536, gpus_per_node=4, fused_loss=True)
    st = Strategy("full", 3, grad_ckpt=True)
    base = estimate_memory(w, st)
    tiled = estimate_memory(Workload(**{**w.__dict__, "tiled_mlp": True}), st)
    # one layer's MLP intermediates: 4 x 14336 values x 2 bytes per token, kept for one 4096-token tile
    saved = 4 * 14336 * 2 * (65536 - 4096)
    assert base["activations"] - tiled["activations"] == pytest.approx(saved, rel=1e-9)
    # the recomputed layer (with its backward's own gradients) stays the peak, the loss chunk below it
    assert tiled["total"] == pytest.approx(base["total"] - saved, rel=1e-9) and tiled["working"] > tiled["logits"]
    off = estimate_memory(Workload(**{**w.__dict__, "offload_activations": True}), st)
    kept = 32 * 4096 * 2 * 65536            # every layer's input, bf16
    # ... less the one input prefetched back to the GPU for the next recompute (long_sequence.HostCheckpoints)
    assert base["total"] - off["total"] == pytest.approx(kept - kept / 32, rel=1e-9) and off["kept"] == 0
    assert off["cpu_per_node"] - base["cpu_per_node"] == pytest.approx(4 * kept, rel=1e-9)


def test_auto_offloads_activations_only_when_nothing_fits_without(tmp_path):
    import json
    from zerotune.launcher.prepare import resolve
    model = tmp_path / "llama3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))

    def resolved(max_len):
        r = validate_recipe(base_recipe(tmp_path, model={"path": str(model), "dtype": "bf16"},
                                        data={"max_len": max_len, "packing": True},
                                        train={"micro_batch_size": 1, "gradient_checkpointing": "auto"},
                                        distributed={"zero": 3, "sequence_parallel": 4}))
        return resolve(r, world_size=4).train
    assert resolved(65536).offload_activations is False
    t = resolved(524288)   # 128k tokens per GPU: only with the layer inputs on the CPU
    # every layer checkpointed, the inputs of only as many of them on the CPU as the GPU cannot hold
    assert t.gradient_checkpointing is True and type(t.offload_activations) is int and 0 < t.offload_activations < 32


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_zero3_sequence_parallel_with_both_options_trains_like_plain(tmp_path):
    def recipe(name, sp, **train):
        return write_recipe(tmp_path, base_recipe(
            tmp_path, name=name, train={"max_steps": 3, "micro_batch_size": 2, "global_batch_size": 4,
                                        "gradient_checkpointing": True, "warmup_steps": 0, **train},
            data={"max_len": 256, "packing": True}, distributed={"zero": 3, "sequence_parallel": sp}),
            f"{name}.yaml")
    zerotune("train", str(recipe("plain", 1, tiled_mlp=False, offload_activations=False)), "--nproc", "1")
    p = zerotune("train", str(recipe("long", 2, tiled_mlp=True, offload_activations=True)), "--nproc", "2")
    assert "(sequence parallel 2, tiled MLP, checkpointed activations on CPU)" in p.stdout
    ref, got = train_losses(tmp_path / "runs" / "plain"), train_losses(tmp_path / "runs" / "long")
    assert sorted(got) == [1, 2, 3]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
