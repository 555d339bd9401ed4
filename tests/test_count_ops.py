"""``benchmarks/count_ops.py``: the op and host-sync counter against counts made by hand, one added ``.item()`` or
``.tolist()`` seen as exactly one sync, and the per-routed-layer figures reproducible and consistent with the totals
they are derived from."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def co() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("count_ops")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_counter_against_a_hand_count(co: ModuleType) -> None:
    """Each line's ops and syncs written down by hand; ``tolist`` dispatches no aten op on a CPU and is still one
    sync, a ``repeat_interleave`` given its ``output_size`` is none."""
    a, counts = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1, 2])
    with co.counting() as c:
        x = a + 1  # add
        y = x[x > 0]  # gt, index with a bool mask (sync)
        int(y.sum())  # sum, _local_scalar_dense (sync)
        x.tolist()  # (sync)
        torch.repeat_interleave(counts)  # repeat_interleave.Tensor without output_size (sync)
        torch.repeat_interleave(counts, output_size=3)  # repeat_interleave.Tensor
    assert dict(c.ops) == {
        "aten.add.Tensor": 1, "aten.gt.Scalar": 1, "aten.index.Tensor": 1, "aten.sum.default": 1,
        "aten._local_scalar_dense.default": 1, "aten.repeat_interleave.Tensor": 2,
    }  # fmt: skip
    assert dict(c.syncs) == {
        "aten.index": 1, "aten._local_scalar_dense": 1, "Tensor.tolist": 1, "aten.repeat_interleave": 1,
    }  # fmt: skip
    assert c.to_dict()["ops"] == 7 and c.to_dict()["syncs"] == 4


@pytest.mark.parametrize(("read", "extra_ops"), [("item", 2), ("tolist", 1)])
def test_one_added_host_read_is_one_sync(co: ModuleType, read: str, extra_ops: int) -> None:
    """A hook on layer 3's MLP that reads its output on the host adds exactly one sync to the dense model's prefill
    and decode step, and exactly the ops it dispatches (``sum`` + ``_local_scalar_dense``; ``sum`` alone for
    ``tolist``), in layer 3. The dense model's own syncs are transformers' ``_ignore_causal_mask_sdpa`` reading the
    padding mask: ``padding_mask.all()`` (decode: 1), and in a padded prefill ``padding_mask[:, :q].all()`` too (2)."""
    dense, _, prompt, _ = co.build("pmod", "llama")
    base = co.run_counted(dense, prompt)
    assert [base[p].to_dict()["syncs"] for p in ("prefill", "decode")] == [2, 1]

    def host_read(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        getattr(out.sum(), read)()

    hook = dense.model.layers[3].mlp.register_forward_hook(host_read)
    try:
        more = co.run_counted(dense, prompt)
    finally:
        hook.remove()
    for phase in ("prefill", "decode"):
        b, m = base[phase].to_dict(), more[phase].to_dict()
        assert m["syncs"] == b["syncs"] + 1, phase
        assert m["ops"] == b["ops"] + extra_ops, phase
        assert m["ops_by_place"]["layer 3"] == b["ops_by_place"]["layer 3"] + extra_ops, phase
        assert {k: v for k, v in m["ops_by_place"].items() if k != "layer 3"} == {
            k: v for k, v in b["ops_by_place"].items() if k != "layer 3"
        }


def test_counts_are_reproducible_and_add_up(co: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two runs give the same counts; the per-layer figure is the total difference over the routed layers (to 2
    decimals), and the difference splits exactly into the routed layers, the other layers and outside them."""
    out = tmp_path / "count_ops.json"
    first = co.main(["--methods", "pmod", "fastv", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(first))
    second = co.main(["--methods", "pmod", "fastv"])
    assert first["methods"] == second["methods"]
    assert first["table"] in capsys.readouterr().out and len(first["table"].splitlines()) == 2 + 2 * 2
    for name, result in first["methods"].items():
        assert result["routed_layers"] == [2, 3, 4, 5, 6, 7], name
        for phase in ("prefill", "decode"):
            c = result[phase]
            assert c["ops_diff"] == c["routed"]["ops"] - c["dense"]["ops"]
            assert c["ops_per_routed_layer"] == round(c["ops_diff"] / 6, 2)
            assert c["extra_syncs"] == c["routed"]["syncs"] - c["dense"]["syncs"]
            for side in ("dense", "routed"):
                assert sum(c[side]["ops_by_place"].values()) == c[side]["ops"]
                assert sum(c[side]["sync_ops"].values()) == c[side]["syncs"]
            parts = sum(c["ops_diff_in_routed_layers"].values()) + c["ops_diff_in_other_layers"]
            assert parts + c["ops_diff_outside_layers"] == c["ops_diff"], (name, phase)


@pytest.mark.parametrize("method", ["pmod", "mod", "fastv", "gamma_mod"])
def test_host_work_per_routed_layer_within_issue_22_budget(co: ModuleType, method: str) -> None:
    """The default path (a plain forward, and a decode step on the cache it returned): at most 20 more aten ops than
    the dense model per routed layer in prefill and 3 in decode, and no host sync inside a routed layer: the
    prefill syncs once more than the dense model (the plan reads the per-row counts), the decode step not at all.
    gamma-MoD's decode rule keeps a number of tokens that depends on the data: one sync per routed layer there (its
    prefill runs its shared router on the normalised input, about 30 ops: the op budget is p-MoD's, MoD's, FastV's)."""
    result = co.measure(method)
    prefill, decode = result["prefill"], result["decode"]
    if method != "gamma_mod":
        assert prefill["ops_per_routed_layer"] <= 20, prefill["top_op_differences"]
        assert decode["ops_per_routed_layer"] <= 3, decode["top_op_differences"]
    assert prefill["extra_syncs"] == 1, prefill["routed"]["sync_ops"]
    assert decode["extra_syncs"] == (6 if method == "gamma_mod" else 0), decode["routed"]["sync_ops"]


@pytest.mark.parametrize("method", ["pdrop", "dart"])
def test_pruning_methods_add_no_host_sync(co: ModuleType, method: str) -> None:
    """PyramidDrop and DART rank without reading the device: the prefill syncs once more than the dense model (the
    plan), the decode step not at all and within the decode op budget. Their prefill ranking costs more ops than
    FastV's (three boundary rows; eight pivots' picks): about 55 and 48 per routed layer here, FastV's 19."""
    result = co.measure(method)
    prefill, decode = result["prefill"], result["decode"]
    assert prefill["extra_syncs"] == 1, prefill["routed"]["sync_ops"]
    assert decode["extra_syncs"] == 0, decode["routed"]["sync_ops"]
    assert decode["ops_per_routed_layer"] <= 3, decode["top_op_differences"]


def test_counts_passed_by_the_caller_leave_no_extra_sync(co: ModuleType) -> None:
    """With the per-row vision and real counts given (``vision_counts``, ``real_counts``), the plan reads nothing
    from the device: the p-MoD prefill syncs exactly as often as the dense model's, and its logits are the same."""
    dense, routed, dense_prompt, prompt = co.build("pmod", "llama")
    counts = {"vision_counts": prompt["vision_mask"].sum(1).tolist(),
              "real_counts": prompt["attention_mask"].sum(1).tolist()}  # fmt: skip
    with torch.no_grad():
        with co.counting(dense) as d:
            dense(**dense_prompt)
        with co.counting(routed) as r:
            given = routed(**prompt, **counts).logits
        read = routed(**prompt).logits
    assert r.to_dict()["syncs"] == d.to_dict()["syncs"], dict(r.syncs)
    torch.testing.assert_close(given, read, rtol=0, atol=0)
