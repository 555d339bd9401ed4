"""Every position path of a routed layer, reached whatever the installed transformers: the RoPE cos/sin and position
ids gathered at the kept tokens (both M-RoPE layouts: one table per axis [3, B, T, d], as transformers up to ~5.15
hands the layers, and the merged [B, T, d] of later releases), packed per axis, and the RoPE tables that reach each
layer's attention module. (A routed layer hands its attention no position ids: flash attention would read the
compacted ones as packed sequences.)"""

from __future__ import annotations

import pytest
import torch

import pmod
from pmod import PModConfig
from pmod.core.compaction import gather_positions
from pmod.core.packed_attention import pack_slots, packed_slot_index
from pmod.testing import randomize_routers, routed_batch, tiny_llama
from pmod.testing.multimodal import tiny_qwen_vl

B, T, K = 3, 11, 6


def random_index(seed: int = 0) -> torch.Tensor:
    """[B, K] distinct positions per row in original order (what compaction gathers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(B)])


def by_hand(t: torch.Tensor, index: torch.Tensor, axes: bool) -> torch.Tensor:
    """``t`` ([A,] 1 or B, T[, d]) at ``index`` [B, K], element by element."""
    out = []
    for a in range(t.shape[0]) if axes else [None]:
        table = t[a] if axes else t
        rows = [[table[b if table.shape[0] > 1 else 0, int(index[b, j])] for j in range(K)] for b in range(B)]
        out.append(torch.stack([torch.stack(r) for r in rows]))
    return torch.stack(out) if axes else out[0]


@pytest.mark.parametrize(
    "shape, per_token_dims, axes",
    [
        ((1, T, 8), 1, False),  # cos/sin shared by the batch
        ((B, T, 8), 1, False),  # per-row cos/sin (merged M-RoPE)
        ((3, 1, T, 8), 1, True),  # M-RoPE, one table per axis
        ((3, B, T, 8), 1, True),
        ((1, T), 0, False),  # position ids
        ((B, T), 0, False),
        ((3, B, T), 0, True),  # M-RoPE's t/h/w ids
        ((4, 1, T), 0, True),  # text ids + t/h/w
    ],
)
def test_gather_positions_every_layout(shape, per_token_dims, axes) -> None:
    t = torch.randn(shape) if per_token_dims else torch.randint(0, 1000, shape)
    index = random_index()
    got = gather_positions(t, index, per_token_dims)
    torch.testing.assert_close(got, by_hand(t, index, axes), rtol=0, atol=0)


@pytest.mark.parametrize("shape, per_token_dims", [((3, B, K, 8), 1), ((B, K, 8), 1), ((4, B, K), 0), ((B, K), 0)])
def test_pack_slots_every_layout(shape, per_token_dims) -> None:
    """The packed path lays the valid slots of all rows end to end, per M-RoPE axis."""
    t = torch.randn(shape) if per_token_dims else torch.randint(0, 1000, shape)
    valid = torch.arange(K)[None] < torch.tensor([[4], [6], [1]])
    got = pack_slots(t, packed_slot_index(valid, int(valid.sum())), per_token_dims)
    slots = [(b, j) for b in range(B) for j in range(K) if valid[b, j]]
    axes = t.dim() == 3 + per_token_dims
    want = torch.stack([torch.stack([t[a, b, j] for b, j in slots]) for a in range(t.shape[0])]) if axes else (
        torch.stack([t[b, j] for b, j in slots]))  # fmt: skip
    assert got.shape == ((t.shape[0], 1) if axes else (1,)) + want.shape[axes:]
    torch.testing.assert_close(got.squeeze(int(axes)), want, rtol=0, atol=0)


def test_both_m_rope_layouts_gather_to_the_kept_tokens_rotation() -> None:
    """Built directly from 3-axis position ids: the per-axis tables [3, B, T, d] gathered and then merged (the
    attention of transformers <= ~5.15 merges them), the merged table gathered, and the installed rotary embedding
    of the gathered ids (whichever layout it returns) are one and the same."""
    model = tiny_qwen_vl("qwen2_vl", num_layers=2)
    rotary = model.model.language_model.rotary_emb
    section = model.config.text_config.rope_parameters["mrope_section"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, B, T), generator=g)  # t, h, w ids; text tokens would have three equal ones
    x = torch.zeros(1, dtype=torch.float32)
    freqs = ids[..., None].float() * rotary.inv_freq
    per_axis = torch.cat([freqs, freqs], dim=-1)  # [3, B, T, d]: one cos/sin table per axis
    index = random_index(2)

    def merge(table: torch.Tensor) -> torch.Tensor:  # transformers <= ~5.15's apply_multimodal_rotary_pos_emb
        return torch.cat([m[i % 3] for i, m in enumerate(table.split(section * 2, dim=-1))], dim=-1)

    def installed(position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:  # merged, whatever the release returns
        return tuple(merge(t) if t.dim() == 4 else t for t in rotary(x, position_ids))

    of_gathered_ids = installed(gather_positions(ids, index, 0))
    for fn, table, want in zip((torch.cos, torch.sin), rotary(x, ids), of_gathered_ids):
        from_axes = merge(gather_positions(fn(per_axis), index, 1))
        torch.testing.assert_close(from_axes, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(by_hand(merge(fn(per_axis)), index, False), want, atol=1e-6, rtol=0)
        gathered = gather_positions(table, index, 1)  # the layout the installed release hands the layers
        torch.testing.assert_close(merge(gathered) if table.dim() == 4 else gathered, want, atol=1e-6, rtol=0)


def record_rope(model: torch.nn.Module) -> tuple[dict[int, torch.Tensor], list]:
    """The RoPE cos table each layer's attention module receives, recorded by forward pre-hooks."""
    seen: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(module, args, kwargs):
            seen[index] = kwargs["position_embeddings"][0].clone()

        return record

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]  # fmt: skip
    return seen, handles


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_attention_reads_the_kept_tokens_original_positions(path: str) -> None:
    """Every layer's attention gets RoPE at its tokens' own positions: a routed layer the rows of its kept tokens,
    computed here from the positions by the model's rotary embedding, not gathered."""
    ratios = [None, 0.5, 0.25, 0.75]
    model = pmod.convert(tiny_llama(num_layers=4), PModConfig(schedule="explicit", ratios=ratios))
    randomize_routers(model, scale=3.0)
    pmod.set_attention_path(model, path)
    ids, am, vm = routed_batch([(5, 17, False), (9, 8, True), (4, 12, False)], "left", seed=5)
    positions = (am.cumsum(1) - 1).clamp(min=0) * 3 + 7  # as generate() numbers left-padded rows, spread apart
    seen, handles = record_rope(model)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm, position_ids=positions)
    for handle in handles:
        handle.remove()
    x = torch.zeros(1, 1, model.config.hidden_size)

    def cos_at(pos: list[int]) -> torch.Tensor:
        return model.model.rotary_emb(x, torch.tensor([pos]))[0][0]

    for layer, ratio in enumerate(ratios):
        got = seen[layer]
        if ratio is None:
            torch.testing.assert_close(got, model.model.rotary_emb(x, positions)[0], rtol=0, atol=0)
            continue
        kept = [[int(positions[b, t]) for t in range(ids.shape[1]) if rec.processed[layer][0][b, t]] for b in range(3)]
        if path == "packed":  # the rows end to end
            torch.testing.assert_close(got[0], cos_at(sum(kept, [])), rtol=0, atol=1e-6)
        else:  # each row's kept tokens first, filler slots after them
            for row, k in zip(got, kept, strict=True):
                torch.testing.assert_close(row[: len(k)], cos_at(k), rtol=0, atol=1e-6)
        assert any(len(k) < int(am[b].sum()) for b, k in enumerate(kept))  # routing really dropped tokens
