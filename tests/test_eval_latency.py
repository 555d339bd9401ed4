"""`pmod eval`'s prefill latency in the report: the spread over batches, the per-document ratio against the
reference with its quartiles, and a warning when the timings cannot tell the models apart; checked on fabricated
cost lines against numbers computed by hand."""

import json

import pytest

from pmod.eval.cost import spread, summarize
from pmod.eval.report import write_report
from pmod.eval.runner import ModelSpec

TASK = "t"


def fabricate(out, name, batch_ms, rows=2) -> tuple[ModelSpec, object]:
    """A finished result folder whose document i was asked in one batch of ``rows`` requests (a multiple-choice
    document, one request per option) that took ``batch_ms[i]``; every document scored 1."""
    folder = out / TASK / f"{name}-000000000000"
    (folder / "costs").mkdir(parents=True)
    lines = [{"task": TASK, "doc_id": doc, "kind": "loglikelihood", "n_vision": 4, "n_text": 10, "n_generated": 0,
              "prefill_tflops": 1.0, "dense_prefill_tflops": 1.0, "kv_bytes": 8, "dense_kv_bytes": 8,
              "analytic_kv_bytes": 8, "prefill_ms": ms, "decode_tokens_per_s": None, "batch": f"0-{doc + 1}",
              "rows": rows} for doc, ms in enumerate(batch_ms) for _ in range(rows)]  # fmt: skip
    (folder / "costs" / "requests.rank0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "samples.jsonl").write_text("".join(json.dumps({"task": TASK, "doc_id": d, "acc": 1.0}) + "\n"
                                                  for d in range(len(batch_ms))))  # fmt: skip
    result = {"results": {TASK: {"acc,none": 1.0}}, "higher_is_better": {TASK: {"acc": True}},
              "cost": summarize(lines)}  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result))
    return ModelSpec(f"/models/{name}", {}, name), folder


def report_of(tmp_path, dense_ms, routed_ms) -> tuple[dict, str]:
    dense, dense_dir = fabricate(tmp_path, "dense", dense_ms)
    routed, routed_dir = fabricate(tmp_path, "pmod", routed_ms)
    report = write_report(tmp_path, [dense, routed], [TASK], {("dense", TASK): dense_dir, ("pmod", TASK): routed_dir})
    return report, (tmp_path / "report.md").read_text()


def test_spread_is_min_quartiles_median_max():
    # sorted 1 2 4 8 9: quartiles at positions 1, 2, 3 (inclusive method, as numpy's default percentile)
    assert spread([8, 1, 9, 2, 4]) == {"n": 5, "min": 1, "q1": 2, "median": 4, "q3": 8, "max": 9}
    # sorted 1 2 3 4: positions 0.75, 1.5, 2.25
    assert spread([4, 3, 2, 1]) == pytest.approx({"n": 4, "min": 1, "q1": 1.75, "median": 2.5, "q3": 3.25, "max": 4})
    assert spread([7.0]) == {"n": 1, "min": 7.0, "q1": 7.0, "median": 7.0, "q3": 7.0, "max": 7.0}


def test_a_clear_effect_comes_with_its_spread_and_no_warning(tmp_path):
    # Per document, the batch of its 2 options: dense 20 ms each; p-MoD 8 10 12 10 10 60 (one slow outlier).
    report, md = report_of(tmp_path, [20] * 6, [8, 10, 12, 10, 10, 60])
    ref, row = report["tasks"][TASK]
    assert ref["prefill_ms_per_request"] == 10 and ref["prefill_ms_spread"]["q1"] == ref["prefill_ms_spread"]["q3"]
    # per request (batch / 2): 4 5 6 5 5 30 -> sorted 4 5 5 5 6 30, quartiles at positions 1.25, 2.5, 3.75
    assert row["prefill_ms_spread"] == pytest.approx({"n": 6, "min": 4, "q1": 5, "median": 5, "q3": 5.75, "max": 30})
    # per document ratios 0.4 0.5 0.6 0.5 0.5 3.0 -> sorted .4 .5 .5 .5 .6 3.0
    assert row["latency_ratio"] == pytest.approx(0.5)
    assert row["latency_ratio_spread"] == pytest.approx(
        {"n": 6, "min": 0.4, "q1": 0.5, "median": 0.5, "q3": 0.575, "max": 3.0})  # fmt: skip
    assert row["latency_timings"] == 6 and row["latency_warning"] is None
    assert "| 5.00 [5.00, 5.75] | 50.0% [50.0%, 57.5%] |" in md and "Warning" not in md


def test_noise_larger_than_the_effect_is_a_warning(tmp_path):
    # ratios 0.4 0.8 1.2 0.9 1.1 3.0 -> sorted .4 .8 .9 1.1 1.2 3.0: q1 .825, median 1.0, q3 1.175 (covers 1.0)
    report, md = report_of(tmp_path, [20] * 6, [8, 16, 24, 18, 22, 60])
    row = report["tasks"][TASK][1]
    assert row["latency_ratio_spread"] == pytest.approx(
        {"n": 6, "min": 0.4, "q1": 0.825, "median": 1.0, "q3": 1.175, "max": 3.0})  # fmt: skip
    assert "covers 1.0: the timing noise is larger than the difference" in row["latency_warning"]
    assert f"**Warning** (pmod): {row['latency_warning']}" in md


def test_too_few_timings_is_a_warning(tmp_path):
    report, md = report_of(tmp_path, [20] * 3, [5, 5, 5])
    row = report["tasks"][TASK][1]
    assert row["latency_ratio"] == pytest.approx(0.25) and row["latency_timings"] == 3
    assert row["latency_warning"].startswith("the prefill latency ratio rests on 3 timing(s) per model")
