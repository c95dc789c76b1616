"""ZeRO-3 in one process keeps every parameter whole (launcher/ds_config.py), so each decoder layer
becomes one ZeRO-3 leaf module (training/model/build.py whole_layers_as_zero3_leaves): DeepSpeed's
hooks on the layer only, not on its linears and norms, and bitwise the same training. Where
parameters are partitioned (several processes) or below ZeRO-3 nothing changes. LoRA's adapters
join their layer's leaf. A real DeepSpeed
engine in this process (gloo, one rank)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from zerotune.training.model.build import leaf_inputs_need_grad, whole_layers_as_zero3_leaves

WHOLE = 10 ** 12    # launcher/ds_config.py ONE_PROCESS_PERSISTENCE


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """One gloo rank for the module: DeepSpeed keeps the groups of the first engine it builds."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
            mp.setenv(name, value)   # DeepSpeed's engine reads them
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'pg'}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def train(zero: dict, leaves: bool, gc: bool = False, kind: str = "full"):
    import deepspeed
    model = tiny()
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    made = whole_layers_as_zero3_leaves(model, zero, kind) if leaves else 0
    if kind == "lora":   # as build_model: the adapters come after the leaves, then the inputs' grads
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        assert leaf_inputs_need_grad(model) == leaves
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero, "zero_allow_untested_optimizer": True})
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):   # the same batch: the loss falls
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    layer = model.get_base_model().model.layers[0] if kind == "lora" else model.model.layers[0]
    hooked = {"layer": len(layer._forward_pre_hooks) > 0, "q_proj": len(layer.self_attn.q_proj._forward_pre_hooks) > 0}
    return made, losses, hooked


@pytest.mark.parametrize("gc", [False, True])
def test_one_process_zero3_gathers_by_the_layer_and_trains_bitwise_the_same(one_rank, gc):
    zero = {"stage": 3, "stage3_param_persistence_threshold": WHOLE}
    made, losses, hooked = train(zero, leaves=True, gc=gc)
    plain_made, plain_losses, plain_hooked = train(zero, leaves=False, gc=gc)
    assert made == 3 and hooked == {"layer": True, "q_proj": False}
    assert plain_made == 0 and plain_hooked == {"layer": True, "q_proj": True}
    assert losses == plain_losses and losses[-1] < losses[0]


@pytest.mark.parametrize("gc", [False, True])
def test_lora_layers_are_leaves_too_their_gradients_reduced_after_the_layers_backward(one_rank, gc):
    """LoRA's adapters join their layer's leaf. Without checkpointing the first layer's input (the
    frozen embeddings' output) needed no grad, so DeepSpeed's leaf hook ran before the layer's
    backward and reduced adapter gradients that did not exist yet (CI 2026-12-07): the inputs now
    require grad, and training is bitwise that of per-module gathering."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": WHOLE}
    made, losses, hooked = train(zero, leaves=True, gc=gc, kind="lora")
    plain_made, plain_losses, _ = train(zero, leaves=False, gc=gc, kind="lora")
    assert made == 3 and plain_made == 0 and hooked == {"layer": True, "q_proj": False}
    assert losses == plain_losses and losses[-1] < losses[0]


def test_partitioned_parameters_or_zero_below_3_keep_per_module_gathering():
    # 10 x hidden: the linears (32 x 32 and up) are partitioned, as with several processes
    assert whole_layers_as_zero3_leaves(tiny(), {"stage": 3, "stage3_param_persistence_threshold": 320}) == 0
    assert whole_layers_as_zero3_leaves(tiny(), {"stage": 2}) == 0
    assert whole_layers_as_zero3_leaves(tiny(), {"stage": 3, "stage3_param_persistence_threshold": "auto"}) == 0
    # other adapters keep DeepSpeed's per-module gathering (only full and LoRA were measured)
    assert whole_layers_as_zero3_leaves(tiny(), {"stage": 3, "stage3_param_persistence_threshold": WHOLE}, "ia3") == 0
    model = tiny()
    assert whole_layers_as_zero3_leaves(model, {"stage": 3, "stage3_param_persistence_threshold": WHOLE}) == 3
    from deepspeed.utils import z3_leaf_module
    assert [type(m).__name__ for m in model.modules() if z3_leaf_module(m)] == ["LlamaDecoderLayer"] * 3
    assert not leaf_inputs_need_grad(model)   # full: the embeddings train, their output already requires grad
