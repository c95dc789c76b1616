"""`zerotune generate`: a run folder (its adapter and chat template), several adapters switched
by name next to the base, bottleneck adapters, a full run's final model. Runs come from
test_peft.py's session fixture; the CLI runs in-process (launcher.cli.main) to save imports."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import STORIES  # noqa: E402
from test_peft import load_adapter_model, run_recipe, runs  # noqa: E402,F401  (the session fixture)

PROMPT = "Write a story about a cat."
TOKENS = 12


def cli(capsys, *args) -> list[str]:
    from zerotune.launcher.cli import main
    assert main(["generate", *args, "--max-new-tokens", str(TOKENS)]) == 0
    return capsys.readouterr().out.strip().splitlines()


def expected(model, tokenizer) -> str:
    """Greedy continuation of PROMPT under the Alpaca template, computed directly."""
    import torch

    from zerotune.training.data.templates import BUILTIN
    from zerotune.training.data.tokenize import render
    text = render(tokenizer, BUILTIN["alpaca"], [{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(STORIES))


@pytest.mark.slow
def test_run_folder_uses_its_adapter_and_chat_template(runs, capsys):
    out = cli(capsys, str(runs["lora"]), "--prompt", PROMPT)
    model = load_adapter_model(run_recipe(runs["lora"]), runs["lora"] / "final")
    assert out == [expected(model, tokenizer())]


@pytest.mark.slow
def test_several_adapters_switch_by_name(runs, capsys):
    from transformers import AutoModelForCausalLM
    out = cli(capsys, str(STORIES), "--chat-template", "alpaca", "--base",
              "--adapter", f"lora={runs['lora'] / 'final'}", "--adapter", f"qlora={runs['qlora'] / 'final'}",
              "--prompt", PROMPT)
    tok = tokenizer()
    want = [f"[base] {expected(AutoModelForCausalLM.from_pretrained(str(STORIES)).eval(), tok)}",
            f"[lora] {expected(load_adapter_model(run_recipe(runs['lora']), runs['lora'] / 'final'), tok)}",
            f"[qlora] {expected(load_adapter_model(run_recipe(runs['lora']), runs['qlora'] / 'final'), tok)}"]
    assert out == want
    assert len({line.split('] ', 1)[1] for line in out}) > 1, "adapters made no difference"


@pytest.mark.slow
def test_bottleneck_adapter_and_full_run(runs, capsys):
    out = cli(capsys, str(runs["adapter"]), "--prompt", PROMPT)
    assert out == [expected(load_adapter_model(run_recipe(runs["adapter"]), runs["adapter"] / "final"), tokenizer())]
    from transformers import AutoModelForCausalLM
    out = cli(capsys, str(runs["full-z2"]), "--prompt", PROMPT)
    assert out == [expected(AutoModelForCausalLM.from_pretrained(str(runs["full-z2"] / "final")).eval(), tokenizer())]


def test_errors_are_one_line(tmp_path, capsys):
    from zerotune.launcher.cli import main
    assert main(["generate", str(STORIES), "--prompt", "hi"]) == 2  # stories260K has no chat template
    assert "--chat-template" in capsys.readouterr().err
    assert main(["generate", str(STORIES), "--adapter", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_adapters_of_different_peft_types_are_refused(runs, capsys):
    from zerotune.launcher.cli import main
    assert main(["generate", str(STORIES), "--chat-template", "alpaca", "--adapter", str(runs["lora"] / "final"),
                 "--adapter", f"b={runs['ia3'] / 'final'}", "--prompt", "hi"]) == 2
    assert "different peft types" in capsys.readouterr().err


def test_a_missing_model_or_run_is_one_line(tmp_path, capsys, monkeypatch):
    """Before any model code runs (it used to be a 36-line traceback); offline, a hub id that is not
    in the local cache fails at once."""
    from zerotune.launcher.cli import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {
        str(tmp_path / "nope"): "does not exist (not a run folder, a model folder or a hub id)",
        "runs/nope": "no such folder, and no model of that name could be fetched from the hub (HF_HUB_OFFLINE=1 "
                     "and it is not in the local Hugging Face cache)",
        str(tmp_path / "empty"): "neither a run folder (no recipe.yaml) nor a model folder (no config.json)",
        str(tmp_path / "file.txt"): "is a file, not a run folder, a model folder or a hub id",
    }
    for target, message in cases.items():
        assert main(["generate", target, "--prompt", "hi"]) == 2
        assert capsys.readouterr().err == f"zerotune: error: {target}: {message}\n"
