"""The lmms-eval plugin (``--model pmod``) on tiny models and a local 16-item shapes task, offline: registry, the
lmms-eval CLI against ``pmod generate``, batch sizes, and two processes under ``accelerate launch`` (gloo)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import pmod  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.data import synth  # noqa: E402
from pmod.eval.tasks import TASKS_DIR  # noqa: E402
from pmod.testing import tiny_llava_folder  # noqa: E402

DOCS = 16
MAX_NEW_TOKENS = 8  # pmod_shapes.yaml's


def cli_env(data: Path) -> dict[str, str]:
    return {**os.environ, "PMOD_SHAPES_DIR": str(data), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lmms_eval_cli(folder, data, out, launcher=()) -> tuple[dict, dict, list[dict]]:
    """Run pmod_shapes through ``python -m lmms_eval``; (doc id -> logged sample, results, cost lines)."""
    cmd = [*(launcher or [sys.executable]), "-m", "lmms_eval", "--model", "pmod", "--model_args",
           f"pretrained={folder},cost_dir={out / 'costs'}", "--tasks", "pmod_shapes", "--include_path", str(TASKS_DIR),
           "--batch_size", "4", "--output_path", str(out / "lmms"), "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, env=cli_env(data), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = next((out / "lmms").rglob("*_samples_pmod_shapes.jsonl"))
    results = json.loads(next((out / "lmms").rglob("*_results.json")).read_text())
    docs = {s["doc_id"]: s for s in map(json.loads, samples.read_text().splitlines())}
    costs = [json.loads(line) for p in sorted((out / "costs").glob("*.jsonl")) for line in p.read_text().splitlines()]
    return docs, results["results"]["pmod_shapes"], costs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny p-MoD folder; 16 image questions; ``pmod generate``'s answers to them, with every other target
    rewritten to the model's first answer word (a random model rarely says the right colour); and the task run once
    through the lmms-eval CLI."""
    root = tmp_path_factory.mktemp("eval")
    folder = tiny_llava_folder(str(root / "model"), method_config=pmod.PModConfig())
    data = root / "data"
    synth.generate(data, 120, seed=0, image_size=32, test_fraction=0.2, question_kinds=("color", "position"))
    records = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")][:DOCS]
    batch = root / "questions.jsonl"
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    batch.write_text("\n".join(json.dumps({"image": str(data / r["image"]), "prompt": q})
                               for r, q in zip(records, questions)))  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["generate", "--model", folder, "--batch-file", str(batch), "--batch-size", "16",
                   "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    answers = [json.loads(line)["answer"] for line in stdout.getvalue().splitlines()]
    for i, (record, answer) in enumerate(zip(records, answers)):
        if i % 2 == 0 and answer.split():
            record["conversations"][1]["value"] = answer.split()[0]
    (data / "test.json").write_text(json.dumps(records))
    return folder, data, records, answers, lmms_eval_cli(folder, data, root / "single")


def test_registry_resolves_pmod_to_the_plugin_class():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from pmod.eval.lmms_model import RoutedLMM

    assert get_model("pmod") is RoutedLMM
    assert MODEL_REGISTRY_V2.resolve("pmod").model_type == "simple"


def test_cli_task_gives_pmod_generate_answers_and_score(setup):
    folder, data, records, answers, (docs, result, costs) = setup
    assert sorted(docs) == list(range(DOCS))
    assert [docs[i]["filtered_resps"].strip() for i in range(DOCS)] == answers
    truths = [r["conversations"][1]["value"] for r in records]
    by_hand = [float(bool(a.split()) and a.split()[0].lower() == t.lower()) for a, t in zip(answers, truths)]
    assert 0 < sum(by_hand) < DOCS
    assert [docs[i]["exact_match"] for i in range(DOCS)] == by_hand
    assert result["exact_match,none"] == pytest.approx(sum(by_hand) / DOCS)
    assert sorted(c["doc_id"] for c in costs) == list(range(DOCS))


def test_two_processes_give_the_union_of_one_process_results(setup, tmp_path):
    folder, data, records, answers, (single_docs, single_result, single_costs) = setup
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29517"]  # fmt: skip
    docs, result, costs = lmms_eval_cli(folder, data, tmp_path, launcher)
    assert sorted((tmp_path / "costs").glob("requests.rank*.jsonl")) == [
        tmp_path / "costs" / "requests.rank0.jsonl", tmp_path / "costs" / "requests.rank1.jsonl"]  # fmt: skip
    assert {k: v["filtered_resps"] for k, v in docs.items()} == {k: v["filtered_resps"] for k, v in single_docs.items()}
    assert result["exact_match,none"] == single_result["exact_match,none"]
    keys = ("doc_id", "n_vision", "n_text", "n_generated", "prefill_tflops", "kv_bytes")
    assert sorted(tuple(c[k] for k in keys) for c in costs) == sorted(tuple(c[k] for k in keys) for c in single_costs)


def test_batch_size_4_equals_batch_size_1(setup, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate

    from pmod.eval.lmms_model import RoutedLMM
    from pmod.eval.runner import task_manager

    folder, data = setup[:2]
    monkeypatch.setenv("PMOD_SHAPES_DIR", str(data))
    manager = task_manager([], ["pmod_shapes", "pmod_shapes_mc"])
    lm = RoutedLMM(pretrained=folder, batch_size=1, cost_dir=tmp_path / "b1", device="cpu")
    lm.keep_model = True
    runs = {}
    for size in (1, 4):
        lm.batch_size_per_device = size
        lm.set_cost_dir(tmp_path / f"b{size}")
        out = simple_evaluate(model=lm, tasks=["pmod_shapes", "pmod_shapes_mc"], limit=5, task_manager=manager,
                              log_samples=True, verbosity="WARNING")  # fmt: skip
        costs = [json.loads(x) for x in (tmp_path / f"b{size}" / "requests.rank0.jsonl").read_text().splitlines()]
        runs[size] = out["samples"], costs
    (gen1, mc1), (gen4, mc4) = ([s["pmod_shapes"], s["pmod_shapes_mc"]] for s, _ in (runs[1], runs[4]))
    assert [s["filtered_resps"] for s in gen1] == [s["filtered_resps"] for s in gen4]
    for a, b in zip(mc1, mc4):  # (negative log-likelihood, greedy) of every option
        assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=1e-4)
        assert a["acc"] == b["acc"]
    assert len({len(json.dumps(s["filtered_resps"])) for s in mc1}) > 1  # options differ: not a trivial check
    keys = ("task", "doc_id", "n_vision", "n_text", "prefill_tflops", "kv_bytes")
    per_request = [sorted(tuple(c[k] for k in keys) for c in runs[size][1]) for size in (1, 4)]
    assert per_request[0] == per_request[1]
    assert {c["rows"] for c in runs[4][1]} >= {4}
    # the measured KV cache after prefill is the analytic one of `pmod flops`, request by request
    assert all(c["kv_bytes"] == c["analytic_kv_bytes"] < c["dense_kv_bytes"] for c in runs[4][1])
