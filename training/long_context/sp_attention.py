"""Attention under Ulysses sequence parallelism that keeps packed samples apart.

DeepSpeed's UlyssesSPAttentionHF (deepspeed/runtime/sequence_parallel/ulysses_sp.py) does the
two all-to-alls around the attention kernel: each rank holds S/N tokens of every head before,
and all S tokens of H/N heads inside the kernel. It all-gathers position_ids for the kernel,
but it drops every 4D mask, so what keeps packed samples apart is left to the kernel:
flash-attention-2 finds sample boundaries from position_ids only when the batch size is 1
(transformers' _is_packed_sequence), and sdpa runs one causal block over the whole row, letting
packed samples attend to each other. So the kernel given to DeepSpeed here is `segment_attention`:
sample boundaries ("segments") are computed once per micro-batch on the host from the whole
row's position_ids (before sharding, no device sync) and reach every layer as the forward
keyword `sp_segments`; flash attention gets them as cu_seqlens (varlen, any batch size), sdpa
runs once per segment (one call per row when a row holds one sample).

`register(model, group, impl)` swaps transformers' attention function for `impl` with a
wrapper that runs this only for batches that carry `sp_segments` (sharded training batches);
evaluation and generation batches (no `sp_segments`) run the original kernel unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED = ("sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class Segments:
    """Per row of the (padded, unsharded) micro-batch: [(start, end)] of each packed sample; the
    last sample of a row also covers the row's trailing padding (padding attends to it, harmlessly:
    no real token attends to padding, and padding carries no label)."""
    rows: list[list[tuple[int, int]]]
    length: int                      # the unsharded row length (a multiple of the SP degree)
    cu_seqlens: torch.Tensor | None = None   # flash attention: starts over the flattened batch + total, int32
    max_len: int = 0

    @property
    def one_per_row(self) -> bool:
        return all(len(r) == 1 for r in self.rows)


def row_segments(pos: list[int]) -> list[tuple[int, int]]:
    """Sample spans of one row from its position_ids (0 starts a sample; trailing zeros are padding)."""
    n = len(pos)
    last = max((i for i in range(n) if pos[i] != 0), default=-1)   # last token of the last real sample
    starts = [i for i in range(1, last + 1) if pos[i] == 0]
    bounds = [0] + starts + [n]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def segments_of(position_ids: torch.Tensor, flash: bool, device=None) -> Segments:
    """Segments of a CPU [B, S] position_ids tensor; `flash`: also cu_seqlens on `device`."""
    rows = [row_segments(r) for r in position_ids.tolist()]
    S = position_ids.shape[1]
    seg = Segments(rows, S)
    if flash:
        starts = [b * S + s for b, r in enumerate(rows) for s, _ in r] + [len(rows) * S]
        seg.cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
        seg.max_len = max(e - s for r in rows for s, e in r)
    return seg


def segment_attention(core, impl: str):
    """The kernel DeepSpeed's Ulysses module calls on [B, H/N, S, D] tensors (all S tokens)."""
    flash = impl.startswith("flash")

    def attend(module, query, key, value, attention_mask, *args, sp_segments: Segments, **kwargs):
        if flash:
            cu = sp_segments.cu_seqlens
            return core(module, query, key, value, None, *args, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=sp_segments.max_len, max_length_k=sp_segments.max_len, **kwargs)
        if kwargs.get("sliding_window"):
            raise NotImplementedError("sequence parallelism with sdpa does not apply sliding windows: "
                                      "use model.attn_implementation: flash_attention_2")
        kwargs.pop("position_ids", None)
        if sp_segments.one_per_row:   # one causal block per row: a single call
            return core(module, query, key, value, None, *args, **kwargs)
        rows = []
        for b, spans in enumerate(sp_segments.rows):
            parts = [core(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                          *args, **kwargs)[0] for s, e in spans]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0), None
    return attend


class UlyssesAttention:
    """One DeepSpeed UlyssesSPAttentionHF per micro-batch size (it fixes the batch size)."""

    def __init__(self, model_config, group, core, impl: str):
        self.cfg, self.group, self.core, self.impl = model_config.get_text_config(), group, core, impl
        self.kernel = segment_attention(core, impl)
        self.by_batch: dict[int, object] = {}
        self.calls = 0          # attention calls that went through Ulysses (tests check it)

    def module_for(self, batch_size: int):
        if batch_size not in self.by_batch:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
            c = self.cfg
            self.by_batch[batch_size] = UlyssesSPAttentionHF(
                attn=self.kernel, batch_size=batch_size, attn_head_count=c.num_attention_heads,
                attn_head_size=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                kv_head_count=c.num_key_value_heads, num_hidden_layers=c.num_hidden_layers,
                process_group=self.group, seq_length_is_variable=True)
        return self.by_batch[batch_size]

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get("sp_segments") is None:   # eval / generate: the plain kernel, the mask as built
            kwargs.pop("sp_segments", None)
            return self.core(module, query, key, value, attention_mask, *args, **kwargs)
        self.calls += 1
        # the 4D mask transformers built covers only this rank's shard: meaningless after the
        # all-to-all; the segments replace it
        return self.module_for(query.shape[0])(module, query, key, value, None, *args, **kwargs)


def register(model_config, group, impl: str) -> UlyssesAttention:
    """Route transformers' `impl` attention through Ulysses for batches with `sp_segments`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if impl not in SUPPORTED:
        raise ValueError(f"sequence parallelism runs with model.attn_implementation {' or '.join(SUPPORTED)}, "
                         f"not {impl!r}")
    core = ALL_ATTENTION_FUNCTIONS[impl]
    if isinstance(core, UlyssesAttention):   # registered before (a second engine in one process)
        core = core.core
    wrapper = UlyssesAttention(model_config, group, core, impl)
    ALL_ATTENTION_FUNCTIONS[impl] = wrapper
    return wrapper
