"""Every popular model family trains out of the box: tiny random Llama, Qwen2, Qwen3, Mistral,
Phi-3, Gemma 2, Gemma 3 (text) and two mixtures of experts (Mixtral, Qwen3-MoE), built here from
transformers configs (hidden 32, 2 layers) with stories260K's tokenizer (phi-3's for Phi-3, with
the chat template it ships). Each trains full at ZeRO-3 on 2 CPU ranks, resumes, exports and
generates; and trains LoRA and generates with the adapter. The attention kernel `auto` picks is
recorded in RUN_DIR/recipe.yaml; core/families.py's table is checked against transformers' classes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import MESSAGES, PHI3_TOKENIZER, STORIES, base_recipe, train_losses, write_recipe, zerotune  # noqa: E402
from test_checkpoint import assert_resumed  # noqa: E402

from zerotune.core.families import ATTENTION, MOE_BLOCKS, choose_attention  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, vocab_size=520)   # stories260K's 512 tokens + room for a template's few
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
# model_type: (config class, its extra settings, chat template (None: the tokenizer's own), attention auto picks)
FAMILIES = {
    "llama": ("LlamaConfig", {}, "llama3", "sdpa"),
    "qwen2": ("Qwen2Config", {}, "chatml", "sdpa"),
    "qwen3": ("Qwen3Config", {}, "chatml", "sdpa"),
    "mistral": ("MistralConfig", {}, "chatml", "sdpa"),
    "phi3": ("Phi3Config", dict(vocab_size=32064, pad_token_id=32000, eos_token_id=32000), None, "sdpa"),
    "gemma2": ("Gemma2Config", dict(query_pre_attn_scalar=8), "chatml", "eager"),
    "gemma3_text": ("Gemma3TextConfig", dict(query_pre_attn_scalar=8, sliding_window=16), "chatml", "sdpa"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE), "chatml", "sdpa"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, **MOE), "chatml", "sdpa"),
}


def tiny_model(folder: Path, family: str) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    name, extra, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, name)(**{**SMALL, **extra})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, family: str, **sections) -> Path:
    _, _, template, _ = FAMILIES[family]
    tokenizer = PHI3_TOKENIZER if family == "phi3" else STORIES
    model = {"path": str(tiny_model(tmp_path / family, family)), "tokenizer": str(tokenizer), "dtype": "fp32",
             "chat_template": template}
    data = {"train": [{"path": str(MESSAGES), "format": "messages"}], "max_len": 256}
    r = base_recipe(tmp_path, name=family, model=model, data=data,
                    train={"max_steps": 2, "micro_batch_size": 2}, checkpoint={"every": 1, "keep": 3}, **sections)
    return write_recipe(tmp_path, r, f"{family}-{len(sections)}.yaml")


def cli(*args: str) -> None:
    from zerotune.launcher.cli import main
    assert main(list(args)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_resumes_exports_and_generates(family, tmp_path, capsys):
    # full, ZeRO-3 on 2 ranks: 2 steps, then resumed from step-2 to step 3
    path = recipe(tmp_path, family)
    zerotune("train", str(path), "--nproc", "2")
    run = tmp_path / "runs" / family
    chosen = yaml.safe_load((run / "recipe.yaml").read_text())["model"]["attn_implementation"]
    assert chosen == FAMILIES[family][3]
    resumed = zerotune("train", str(path), "--nproc", "2", "--set", "train.max_steps=3")
    assert_resumed(resumed, run, 2)   # not a run that started over (it too says "saved step-000002")
    assert sorted(train_losses(run)) == [1, 2, 3]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    aux = [r["train/router_aux_loss"] for r in records if "train/router_aux_loss" in r]
    assert (len(aux) > 0) == (family in MOE_BLOCKS)   # the router's loss, logged for MoE only
    assert all(a > 0 for a in aux)
    cli("export", str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "export"))
    assert (tmp_path / "export" / "config.json").is_file()
    cli("generate", str(run), "--prompt", "Hi", "--max-new-tokens", "4")
    # LoRA on 1 rank, generate with the adapter
    lora = recipe(tmp_path, family, method={"kind": "lora", "lora": {"r": 4}}, distributed={"zero": 0})
    zerotune("train", str(lora), "--set", f"name={family}-lora")
    cli("generate", str(tmp_path / "runs" / f"{family}-lora"), "--prompt", "Hi", "--max-new-tokens", "4")
    assert (tmp_path / "runs" / f"{family}-lora" / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("template,end", [("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>\n"), (None, "<|end|>")])
def test_the_families_templates_train_exactly_the_assistant_turns(template, end):
    """The templates the families above train with (None: the one phi-3's tokenizer ships) mask
    every prompt token and train each assistant turn with its end-of-turn token."""
    from test_data_tools import tokenize, trained_runs, with_tokens
    from transformers import AutoTokenizer
    from zerotune.training.data.templates import BUILTIN
    tok = AutoTokenizer.from_pretrained(str(PHI3_TOKENIZER))
    tok = with_tokens(tok, template) if template else tok
    samples, stats = tokenize(tok, MESSAGES, BUILTIN[template] if template else tok.chat_template)
    rows = [json.loads(line) for line in MESSAGES.read_text().splitlines()]
    assert stats["samples"] == len(rows) == len(samples)
    for row, (ids, labels) in zip(rows, samples):
        want = [m["content"] + end for m in row["messages"] if m["role"] == "assistant"]
        got = trained_runs(tok, ids, labels)
        if template is None and got:   # phi-3's template ends the conversation with its eos: trained too
            got[-1] = got[-1].removesuffix(tok.eos_token)
        assert got == want


def test_the_attention_table_matches_transformers():
    """What core/families.py says each family supports is what its *ForCausalLM class says."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
             "flex_attention": "_supports_flex_attn"}
    for model_type, kernels in ATTENTION.items():
        cls = getattr(transformers, CAUSAL[model_type])
        for kernel, flag in flags.items():
            assert (kernel in kernels) == bool(getattr(cls, flag)), f"{model_type} {kernel}"
        assert "eager" in kernels
    for model_type, block in MOE_BLOCKS.items():
        module = sys.modules[getattr(transformers, CAUSAL[model_type]).__module__]
        assert hasattr(module, block), f"{model_type}: no {block}"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_planner_counts_every_expert(family, tmp_path):
    from zerotune.core.flops import num_params
    folder = tiny_model(tmp_path / family, family)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    real = sum(p.numel() for p in model.parameters())
    config = json.loads((folder / "config.json").read_text())
    assert abs(num_params(config) - real) <= 0.01 * real   # (Qwen3's q/k norms are not counted)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llama"])
def test_moe_blocks_are_zero3_leaves_and_the_router_loss_is_on(family, tmp_path):
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM
    from zerotune.training.model import moe
    model = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / family, family))
    names = moe.prepare(model, zero_stage=3)
    leaves = [type(m).__name__ for m in model.modules() if z3_leaf_module(m)]
    if family == "llama":
        assert names == leaves == [] and not getattr(model.config, "output_router_logits", False)
        return
    assert names == [MOE_BLOCKS[family]] and leaves == [MOE_BLOCKS[family]] * 2   # one per layer
    assert model.config.output_router_logits
    targets = moe.lora_targets(model, "all-linear")   # attention only: experts and router frozen
    assert len(targets) == 8 and all(".self_attn." in t and t.endswith("_proj") for t in targets)
    import torch
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and float(out.aux_loss) > 0


def test_auto_picks_per_family_and_refuses_what_a_family_lacks(tmp_path, capsys):
    gemma2 = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}
    assert choose_attention(gemma2, "auto", cuda=True) == "eager"
    assert choose_attention({"model_type": "llama"}, "auto", cuda=False) == "sdpa"
    assert choose_attention({"model_type": "unknown"}, "auto", cuda=False) == "auto"   # transformers decides
    # an explicit kernel Gemma 2 lacks: one line from `zerotune train`, before any rank starts
    from zerotune.launcher.cli import main
    path = recipe(tmp_path, "gemma2")
    r = yaml.safe_load(path.read_text())
    r["model"]["attn_implementation"] = "sdpa"
    path.write_text(yaml.safe_dump(r))
    capsys.readouterr()   # save_pretrained's progress bar
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zerotune: error: model.attn_implementation: sdpa is not supported by Gemma2ForCausalLM "
                   "(gemma2); use auto or one of flash_attention_2, flex_attention, eager"]
    assert not (tmp_path / "runs" / "gemma2").exists()


def tiny_granitemoe(folder: Path) -> Path:
    """A mixture of experts core/families.py has no block for (Granite-MoE: num_local_experts 4)."""
    import torch
    from transformers import AutoModelForCausalLM, GraniteMoeConfig
    torch.manual_seed(0)
    config = GraniteMoeConfig(**{**SMALL, "num_local_experts": 4, **MOE})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_moe_is_read_from_config_json():
    from zerotune.core.families import experts, is_moe, zero3_problem
    assert experts({"model_type": "deepseek_v3", "n_routed_experts": 256}) == 256
    assert experts({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16}}) == 16
    assert experts({"model_type": "x", "text_config": {"num_local_experts": 8}}) == 8
    assert not is_moe({"model_type": "llama", "num_experts": 1}) and zero3_problem({"model_type": "llama"}) is None
    assert zero3_problem({"model_type": "mixtral", "num_local_experts": 8}) is None   # a known block: a ZeRO-3 leaf
    line = zero3_problem({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 64})
    assert "DeepseekV3ForCausalLM (deepseek_v3)" in line and "64 experts" in line and "\n" not in line


def test_moe_refused_where_it_would_train_wrong_before_torchrun(tmp_path):
    """An unknown MoE block at ZeRO-3 (the ranks would hang) and any MoE with sequence parallelism
    (the router's loss would be dropped): one line, exit 2, before torchrun, nothing written."""
    model = {"path": str(tiny_granitemoe(tmp_path / "granitemoe")), "tokenizer": str(STORIES), "dtype": "fp32",
             "chat_template": "chatml"}
    granite = write_recipe(tmp_path, base_recipe(tmp_path, name="granite", model=model, train={"max_steps": 2},
                                                 data={"train": [{"path": str(MESSAGES), "format": "messages"}]}),
                           "granite.yaml")
    for command in (("launch", str(granite), "--dry-run"), ("train", str(granite))):
        r = zerotune(*command, check=False, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "distributed.zero: 3 cannot train GraniteMoeForCausalLM (granitemoe)" in lines[0]
    r = zerotune("launch", str(granite), "--dry-run", "--set", "distributed.zero=2", timeout=300)   # ZeRO-2 runs it
    sp = recipe(tmp_path, "mixtral", distributed={"zero": 3, "sequence_parallel": 2})
    r = zerotune("launch", str(sp), "--dry-run", "--nproc", "2", check=False, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == ("zerotune: error: distributed.sequence_parallel: a mixture of experts (4 experts) does not "
                        "train with sequence parallelism (its router's load-balancing loss would be lost); "
                        "use distributed.sequence_parallel: 1")
    assert not (tmp_path / "runs" / "mixtral").exists()


def test_a_rank_refuses_moe_without_a_leaf_at_zero3(tmp_path, monkeypatch):
    """training/model/moe.py, where the launcher was bypassed (benchmarks) or the block class was
    renamed in transformers: no ZeRO-3 leaf -> a RecipeError, not a hang."""
    from transformers import AutoModelForCausalLM
    from zerotune.core import families
    from zerotune.core.recipe import RecipeError
    from zerotune.training.model import moe
    model = AutoModelForCausalLM.from_pretrained(tiny_granitemoe(tmp_path / "granitemoe"))
    with pytest.raises(RecipeError, match="granitemoe"):
        moe.prepare(model, zero_stage=3)
    assert moe.prepare(model, zero_stage=2) == [] and model.config.output_router_logits
    mixtral = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / "mixtral", "mixtral"))
    monkeypatch.setitem(families.MOE_BLOCKS, "mixtral", "RenamedSparseMoeBlock")
    with pytest.raises(RecipeError, match="no RenamedSparseMoeBlock module"):
        moe.prepare(mixtral, zero_stage=3)
