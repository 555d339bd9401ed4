"""The main job on a tiny budget: the report holds what the demo promises, and its numbers check out."""

import dataclasses
import json

import pytest
import torch
from conftest import TINY_DEMO

import pmod
from pmod.cli import main
from pmod.core.cache import cache_of
from pmod.experiments.demo import DemoSettings


@pytest.fixture(scope="module")
def demo(quick_demo):
    """`pmod demo --quick` at the tests' size (TINY_DEMO): the README's `pmod demo`, run once for the session."""
    return quick_demo


def test_report_files_and_table(demo):
    out, report = demo
    md = (out / "report.md").read_text()
    assert report["table"] in md
    for name in ["loss.png", "pmod_schedule.png", "pmod_heatmap.png", "pmod_overlay_0.png"]:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in md
    assert set(report["results"]) == {"dense", "pmod"}
    for result in report["results"].values():
        assert result["prefill_ms"] > 0
    assert report["loss"]["dense"][0][0] >= 1 and len(report["loss"]["pmod"]) >= 2
    vision = report["vision_pretraining"]
    assert [step for step, _ in vision["loss"]] == list(range(1, DemoSettings(**TINY_DEMO).vision_pretrain_steps + 1))
    assert f"shape kind on shape patches {vision['accuracy']['shape_on_object']:.3f}" in md
    assert "## How the task was chosen" in md
    held_out = [r for r in json.loads((out / "data" / "test.json").read_text()) if r.get("image")]
    n_test = min(len(held_out), DemoSettings(**TINY_DEMO).eval_samples)
    assert f"the first answer word on {n_test} held-out image questions" in md


def test_accuracy_recomputed_one_question_at_a_time(demo):
    """The report's accuracy (and per question kind) is the share of test questions whose greedy answer starts
    with the right word: recomputed here by ``generate`` on each question alone, unpadded."""
    from pmod.data.synth import question_kind
    from pmod.experiments.demo_runs import question_and_answer, record_image
    from pmod.io.model_folder import build_prompt, load_model

    out, report = demo
    data = out / "data"
    test = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")]
    test = test[: DemoSettings(**TINY_DEMO).eval_samples]
    for name in ("dense", "pmod"):
        model, processor = load_model(out / name, "cpu")
        hits: dict[str, list[bool]] = {}
        for record in test:
            question, truth = question_and_answer(record)
            inputs = processor(text=[build_prompt(processor, question, 1)], images=[record_image(data, record)],
                               return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                         pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
            words = processor.decode(out_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
            hits.setdefault(question_kind(question), []).append(bool(words) and words[0].lower() == truth.lower())
        result = report["results"][name]
        assert result["accuracy"] == pytest.approx(sum(map(sum, hits.values())) / len(test)), name
        assert result["per_question_kind"] == {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}, name


def test_accuracy_counts_the_first_word_by_hand(demo, monkeypatch):
    """The quick run's models answer nothing yet (accuracy 0), so the scoring is also checked on forced answers:
    right, right in other case with more words, a wrong word, the right word second, nothing."""
    from pmod.experiments.demo_runs import evaluate, question_and_answer
    from pmod.recipes import generate

    out, _ = demo
    data = out / "data"
    test = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")][:5]
    truths = [question_and_answer(r)[1] for r in test]
    forced = [truths[0], f"{truths[1].upper()} it is", "zebra", f"maybe {truths[3]}", ""]
    monkeypatch.setattr(generate, "answer", lambda model, processor, prompts, images, **kw: (forced, ""))
    assert evaluate(out / "pmod", data, test, batch_size=5)["accuracy"] == pytest.approx(2 / 5)


def test_data_follows_the_settings(demo):
    """The default task: scenes of 3-8 shapes, each in its own grid cell, asked only the demo's two scene-wide
    kinds, with a patch-local tower, as the report says."""
    from pmod.data import scenes, synth

    out, report = demo
    records = [r for r in json.loads((out / "data" / "train.json").read_text()) if r.get("image")]
    counts = [len(r["meta"]["shapes"]) for r in records]
    assert records and min(counts) >= scenes.MIN_SHAPES and max(counts) <= scenes.MAX_SHAPES
    assert all(len({tuple(s["cell"]) for s in r["meta"]["shapes"]}) == n for r, n in zip(records, counts))
    assert {synth.question_kind(t["value"]) for r in records for t in r["conversations"][::2]} == {"count", "half"}
    md = " ".join((out / "report.md").read_text().split())
    assert "questions about count, half; a patch-local tower" in md
    from pmod.experiments.demo_runs import load_variant
    from pmod.experiments.small_llava import tower_attention_outputs

    for name in ("dense", "pmod"):  # pre-trained and trained, the tower's attention outputs are still zero
        model, _ = load_variant(out / name)
        assert all(bool((m.weight == 0).all()) for m in tower_attention_outputs(model)), name


def test_tower_is_frozen_in_stage_two(demo):
    """Both variants keep the pre-trained tower bit for bit; the decoder trained."""
    from transformers import LlavaForConditionalGeneration

    from pmod.io.model_folder import load_model

    out, _ = demo
    base = LlavaForConditionalGeneration.from_pretrained(out / "base-model").state_dict()
    for name in ("dense", "pmod"):
        model, _ = load_model(out / name, "cpu")
        trained = model.state_dict()
        tower = [k for k in base if ".vision_tower." in k]
        assert tower and all(torch.equal(base[k], trained[k]) for k in tower), name
        assert not torch.equal(base["lm_head.weight"], trained["lm_head.weight"]), name


def test_side_by_side_training_changes_nothing(demo, tmp_path):
    """The demo trains variants in worker processes when cores allow; the same variant trained here, in this
    process, gives the same weights bit for bit."""
    from pmod.experiments.demo_runs import parallel_workers, threads_per_worker, train_variant
    from pmod.io.model_folder import load_model

    out, report = demo
    settings = DemoSettings(**TINY_DEMO)
    workers = parallel_workers(settings)
    assert report["parallel_workers"] == workers
    if workers == 1:
        pytest.skip("one core or a GPU: the demo trained the variants in this process")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(workers))  # what each worker used
    try:
        run = train_variant("dense", out / "base-model", out / "data", tmp_path / "dense", settings)
    finally:
        torch.set_num_threads(threads)
    again = load_model(tmp_path / "dense", "cpu")[0].state_dict()
    first = load_model(out / "dense", "cpu")[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert run["loss"] == [tuple(x) for x in report["loss"]["dense"]]


def test_report_kv_bytes_are_what_the_cache_holds(demo):
    """The analytic KV bytes in the report equal the bytes of a real prefill cache for one test prompt."""
    out, report = demo
    from pmod.experiments.demo_runs import question_and_answer, record_image
    from pmod.io.model_folder import encode, load_model

    data = out / "data"
    record = next(r for r in json.loads((data / "test.json").read_text()) if r.get("image"))
    for name in ("dense", "pmod"):
        model, processor = load_model(out / name, "cpu")
        inputs = encode(processor, model, [question_and_answer(record)[0]], [[record_image(data, record)]])
        with torch.no_grad():
            cache = cache_of(model(**inputs, use_cache=True))
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
    from pmod.experiments.demo_report import prior_baseline

    def rec(q, a):
        return {
            "image": "x.png",
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }

    train = [rec("What color?", "red"), rec("What color?", "red"), rec("What color?", "blue"), rec("How many?", "two")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    test = [rec("What color?", "red"), rec("What color?", "blue"), rec("How many?", "two"), rec("Which shape?", "x")]
    assert prior_baseline(tmp_path, test) == 0.5  # red: hit, blue: miss, two: hit, unseen question: miss


def test_method_flags_set_the_variants(tmp_path, capsys):
    from pmod.experiments.demo import DemoSettings

    settings = DemoSettings(variants=("dense", "pmod", "mod"), method_settings={"pmod": {"beta": "0.4"}})
    assert settings.variant_config("pmod") == pmod.PModConfig(beta=0.4)
    assert settings.variant_config("mod") == pmod.MoDConfig()
    assert settings.variant_config("dense") is None
    assert main(["demo", "--out", str(tmp_path), "--mod-ratio", "0.3"]) == 2  # default variants: dense, pmod
    assert "--mod-ratio sets mod, which no variant" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--pmod-beta", "x"]) == 2
    assert "--pmod-beta" in capsys.readouterr().err


def test_pmod_flops_on_the_demo_models_matches_the_report(demo, capsys):
    """`pmod flops FOLDER` takes vision tokens and dtype from the model itself: the report's numbers come back."""
    out, report = demo
    for name in ("dense", "pmod"):
        result = report["results"][name]
        assert main(["flops", str(out / name), "--text-tokens", str(result["n_text"]), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["n_vision"] == result["n_vision"] and data["bytes_per_element"] == 4  # fp32 weights
        key = "pmod" if name == "pmod" else "dense"
        assert data[f"{key}_tflops"] == result["prefill_tflops"]
        assert data[f"{key}_kv_bytes"] == result["kv_bytes"]


def test_seeds_section_reports_the_gap_with_its_spread():
    """`pmod demo --seeds N`: per-seed accuracies, and the p-MoD - dense gap paired by seed, against numpy."""
    import numpy as np

    from pmod.experiments.demo_report import seeds_section

    def result(acc, position):
        return {"accuracy": acc, "per_question_kind": {"color": 1.0, "position": position}}

    dense = {0: result(1.0, 1.0), 1: result(0.99, 0.98), 2: result(1.0, 1.0)}
    pm = {0: result(0.965, 0.926), 1: result(0.995, 0.989), 2: result(0.95, 0.9)}
    lines, summary = seeds_section({"dense": dense, "pmod": pm}, DemoSettings(seeds=3))
    diffs = 100 * (np.array([pm[s]["accuracy"] for s in range(3)]) - np.array([dense[s]["accuracy"] for s in range(3)]))
    gap = summary["gap_points"]["pmod"]
    assert gap["points"] == pytest.approx(diffs.tolist(), abs=0.01)
    assert gap["mean"] == pytest.approx(diffs.mean(), abs=0.01) and gap["sd"] == pytest.approx(
        diffs.std(ddof=1), abs=0.01
    )
    assert gap["larger_than_spread"] == (abs(diffs.mean()) > diffs.std(ddof=1))
    assert "| pmod | 1 | 0.995 | 1.000 | 0.989 |" in lines
    within = diffs.mean() >= -2.0  # p-MoD at most 2 points below dense
    assert f"the mean is {'within' if within else 'outside'} the 2-point goal" in summary["summary"]


def test_seeds_must_be_positive(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds is 0" in capsys.readouterr().err


def test_output_folder_mistakes(tmp_path, capsys, monkeypatch):
    """An existing file as --out, and a folder another run is writing, get one line each before any work starts
    (the work is replaced by an error here, so that running on would show)."""
    import os

    from pmod.core.files import OutputLock
    from pmod.experiments import demo_runs

    def no_work(*args):
        raise RuntimeError("the demo started working")

    monkeypatch.setattr(demo_runs, "make_data", no_work)
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an existing file, not a folder" in err and len(err.splitlines()) == 1
    with OutputLock(tmp_path / "busy", "pmod demo"):
        assert main(["demo", "--quick", "--out", str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is in use by pmod demo (pid {os.getpid()})" in err and len(err.splitlines()) == 1
    with pytest.raises(RuntimeError, match="started working"):  # free again: the run goes ahead
        main(["demo", "--quick", "--out", str(tmp_path / "busy")])


def test_data_made_again_when_its_settings_change(tmp_path):
    """The demo keeps its data set between runs only while the settings that made it are the same: a rerun into
    the same folder with other --samples (or seed, ...) must not train on the earlier set."""
    import dataclasses

    from pmod.experiments.demo_runs import make_data

    data = tmp_path / "data"

    def count() -> int:
        return sum(len(json.loads((data / f).read_text())) for f in ("train.json", "test.json"))

    small = DemoSettings(samples=20, image_size=32)
    make_data(data, small)
    assert count() == 20
    written = (data / "train.json").stat().st_mtime_ns
    make_data(data, small)
    assert (data / "train.json").stat().st_mtime_ns == written  # the same settings: kept
    make_data(data, dataclasses.replace(small, samples=30))
    assert count() == 30
    first = (data / "train.json").read_bytes()
    make_data(data, dataclasses.replace(small, samples=30, seed=1))
    assert count() == 30 and (data / "train.json").read_bytes() != first


def test_images_of_more_tokens_than_the_default_train(tmp_path):
    """A demo task of 128 px images (256 vision tokens, with the question past 256 tokens) trains: the training's
    length limit follows the image's tokens (it was a fixed 256, which refused every record)."""
    from pmod.experiments.demo_runs import build_base_model, make_data, train_config

    settings = DemoSettings(samples=12, image_size=128, patch_size=8, layers=2, hidden=32, vision_hidden=32,
                            vision_layers=2, steps=2, batch_size=2, eval_samples=2)  # fmt: skip
    model, processor = build_base_model(settings, seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    make_data(tmp_path / "data", settings)
    run = train_config(None, tmp_path / "base", tmp_path / "data", tmp_path / "dense", settings)
    assert [step for step, _ in run["loss"]] == [1, 2]


@pytest.mark.parametrize(("task", "given", "muted"), [("scenes", None, True), ("scenes", False, False),
                                                      ("shapes", None, False), ("shapes", True, True)])  # fmt: skip
def test_the_scenes_task_builds_a_patch_local_tower_unless_told_otherwise(task, given, muted):
    """The scenes task's default tower is patch-local (its attention outputs zero: issue 24's run K), the shapes
    task's mixes; ``vision_patch_local`` overrides either, and the settings read back from JSON as given."""
    from pmod.experiments.demo_runs import build_base_model
    from pmod.experiments.small_llava import tower_attention_outputs

    settings = DemoSettings(task=task, vision_patch_local=given, layers=1, hidden=32, vision_hidden=32,
                            vision_layers=2)  # fmt: skip
    model, _ = build_base_model(settings, seed=0)
    assert [bool((m.weight == 0).all()) for m in tower_attention_outputs(model)] == [muted, muted]
    kinds = {"scenes": ("count", "half"), "shapes": ("color", "position")}[task]
    assert settings.kinds == kinds
    saved = DemoSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert (saved.patch_local, saved.kinds, saved.to_dict()) == (muted, kinds, settings.to_dict())


@pytest.mark.parametrize("stored_tower", ["absent", False])
def test_a_run_saved_before_the_task_defaults_keeps_its_own(stored_tower):
    """Settings saved before TASK_DEFAULTS (no ``vision_patch_local``, or False) resume as they ran: a mixing tower,
    and on the scenes task the generator's default kinds, not the demo's count and half."""
    from pmod.data import scenes

    for task, kinds in (("scenes", scenes.DEFAULT_KINDS), ("shapes", ("color", "position"))):
        saved = json.loads(json.dumps(dataclasses.asdict(DemoSettings(task=task))))
        saved.pop("vision_patch_local") if stored_tower == "absent" else saved.update(vision_patch_local=False)
        settings = DemoSettings.from_dict(saved)
        assert (settings.patch_local, settings.kinds) == (False, kinds)
