"""logging.profile_start: a profile window through `zerotune train` writes rank 0's trace and a
summary of where the time went, by category; the categories of real kernel and op names."""
from __future__ import annotations

import json

import pytest

from conftest import base_recipe, write_recipe, zerotune
from zerotune.training.monitoring.profile import category


@pytest.mark.parametrize("name,cat", [
    ("ncclDevKernel_AllGather_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "communication"),
    ("c10d::allreduce_", "communication"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::cross_entropy_loss", "loss"),
    ("multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
    ("aten::mul", "other"),
])
def test_categories_of_real_names(name, cat):
    assert category(name) == cat


@pytest.mark.slow
def test_a_profile_window_through_zerotune_train(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, train={"max_steps": 3},   # the window ends with the run
                                                logging={"progress": False, "profile_start": 2, "profile_steps": 5}))
    out = zerotune("train", str(recipe), "--nproc", "2").stdout
    run = tmp_path / "runs" / "t"
    summary = (run / "profile" / "summary.txt").read_text()
    assert summary.startswith("profile: steps 2-3, ") and summary in out
    for cat in ("attention", "matmul", "communication"):   # ZeRO-3 on 2 ranks gathers parameters
        assert f"  {cat} " in summary, summary
    shares = [float(line.split()[-1].rstrip("%")) for line in summary.splitlines()[1:] if line.endswith("%")]
    assert sum(shares) == pytest.approx(100, abs=0.5)
    trace = json.loads((run / "profile" / "trace-rank0.json").read_text())
    assert trace["traceEvents"] and not (run / "profile" / "trace-rank1.json").exists()
