"""train.compile: the compiled decoder layers give the eager loss and gradients (CPU, inductor)."""
from __future__ import annotations

import pytest
import torch

from conftest import base_recipe
from zerotune.core.recipe import RecipeError
from zerotune.core.recipe_load import validate_recipe
from zerotune.training.model.build import build_model

pytestmark = pytest.mark.slow


def _loss_and_grads(model, batch):
    model.train()
    out = model(**batch, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_match_eager(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 32), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.cat([torch.arange(12), torch.arange(20)]).expand(2, 32)}
    recipes = {c: validate_recipe(base_recipe(tmp_path, train={"compile": c, "gradient_checkpointing": False},
                                              distributed={"zero": 0})) for c in (False, True)}
    eager_loss, eager_grads = _loss_and_grads(build_model(recipes[False], {}), batch)
    model = build_model(recipes[True], {})
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    loss, grads = _loss_and_grads(model, batch)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    assert grads.keys() == eager_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], eager_grads[n], rtol=1e-4, atol=1e-6), n


def test_compile_refuses_zero3_and_qlora(tmp_path):
    from zerotune.training.model.build import compile_layers
    with pytest.raises(RecipeError, match=r"^train.compile: true works with method.kind full or lora at "
                                          r"distributed.zero 0-2 \(this run: full, ZeRO-3\)$"):
        compile_layers(torch.nn.Module(), "full", 3)
    qlora = validate_recipe(base_recipe(tmp_path, method={"kind": "qlora"}, train={"compile": True},
                                        distributed={"zero": 0}))
    with pytest.raises(RecipeError, match=r"\(this run: qlora, ZeRO-0\)$"):
        build_model(qlora, {})
