"""The main job on a tiny budget: the report holds what the demo promises, and its numbers check out."""

import json

import pytest
import torch

import pmod
from pmod.cli import main
from pmod.demo import DemoSettings, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(
        samples=160, layers=4, hidden=32, vision_hidden=32, steps=4, batch_size=8, eval_samples=16,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return out, run_demo(out, settings)


def test_report_files_and_table(demo):
    out, report = demo
    assert json.loads((out / "report.json").read_text())["table"] == report["table"]
    md = (out / "report.md").read_text()
    assert report["table"] in md
    for name in ["loss.png", "pmod_schedule.png", "pmod_heatmap.png", "pmod_overlay_0.png"]:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in md
    assert set(report["results"]) == {"dense", "pmod"}
    for result in report["results"].values():
        assert 0.0 <= result["accuracy"] <= 1.0
        assert result["prefill_ms"] > 0
    assert report["loss"]["dense"][0][0] >= 1 and len(report["loss"]["pmod"]) >= 2


def test_report_kv_bytes_are_what_the_cache_holds(demo):
    """The analytic KV bytes in the report equal the bytes of a real prefill cache for one test prompt."""
    out, report = demo
    from pmod.demo import _image, _question
    from pmod.generate import encode, load_model

    data = out / "data"
    record = next(r for r in json.loads((data / "test.json").read_text()) if r.get("image"))
    for name in ("dense", "pmod"):
        model, processor = load_model(out / name, "cpu")
        inputs = encode(processor, model, [_question(record)[0]], [[_image(data, record)]])
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        assert pmod.kv_cache_bytes(cache).total_bytes == report["results"][name]["kv_bytes"], name
    pm = report["results"]["pmod"]
    assert pm["mean_retention"] == pytest.approx(
        sum(1.0 if r is None else r for r in pm["layer_ratios"]) / len(pm["layer_ratios"])
    )


def test_shape_concentration_rows(demo):
    _, report = demo
    rows = report["shape_concentration"]["pmod"]
    ratios = report["results"]["pmod"]["layer_ratios"]
    assert sorted(int(k) for k in rows) == [i for i, r in enumerate(ratios) if r is not None]
    base = {row["base_rate"] for row in rows.values()}
    assert len(base) == 1 and 0 < base.pop() < 1  # the same images for every layer; shapes are a minority


def test_variants_must_include_dense(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--variants", "pmod"]) == 2
    assert "must include 'dense'" in capsys.readouterr().err


def test_prior_baseline_by_hand(tmp_path):
    from pmod.demo import prior_baseline

    def rec(q, a):
        return {
            "image": "x.png",
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }

    train = [rec("What color?", "red"), rec("What color?", "red"), rec("What color?", "blue"), rec("How many?", "two")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    test = [rec("What color?", "red"), rec("What color?", "blue"), rec("How many?", "two"), rec("Which shape?", "x")]
    assert prior_baseline(tmp_path, test) == 0.5  # red: hit, blue: miss, two: hit, unseen question: miss
