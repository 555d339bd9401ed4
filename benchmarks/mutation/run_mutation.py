"""Mutation score of pmod's core, methods and FLOPs/KV accounting, with mutmut 3.8.1.

What it measures: mutmut (https://github.com/boxed/mutmut) plants one small change at a time (a ``+`` for a ``-``,
``<`` for ``<=``, ``True`` for ``False``, a number plus one, an argument dropped or set to ``None``, an assignment set
to ``None``, a string changed) in every function and method of the modules below, runs the tests that call that
function, and counts the change as *detected* when a test fails (or the tests hang or crash). The score is detected
/ checked mutants. Why mutmut and not cosmic-ray: mutmut forks one warmed-up process per mutant and runs only the
tests that reach the mutated function (recorded once), so a mutant costs the first failing test, not a fresh
interpreter importing torch and the whole test command (cosmic-ray's model); on 2 shared cores that is the
difference between an evening and days.

Scope (``MUTATE``): ``src/pmod/core/*``, ``src/pmod/methods/*``, ``src/pmod/analysis/analytic_flops.py``,
``src/pmod/analysis/dims.py`` and ``src/pmod/analysis/budget.py``. mutmut 3 mutates only code inside functions and
methods: module-level constants, class attributes and dataclass fields (the config defaults) are not mutated
(``tests/test_paper_constants.py`` pins those literally), and neither are functions with a decorator other than
``@staticmethod``/``@classmethod`` (``@property`` ones included).

Tests (``TESTS``): the test files that exercise these modules in-process, minus ``DESELECTED``: the tests that run
pmod in a subprocess (a subprocess imports the unmutated package, so it could never kill a mutant and only costs
time) and one order-dependent test. mutmut records which test calls which function and runs, per mutant, only the
tests that reach the mutated function, fastest first, stopping at the first failure (``pytest -x``). The baseline
run takes the suite as it is, the files of ``MUTANT_TESTS`` written so far included (the others are empty
placeholders): its score is the suite's before the tests written for that run's survivors.

Not mutated, on purpose (both listed in the JSON report):

* ``EXCLUDED_CODE``: code that cannot run on a CPU (the varlen flash-attention branch of
  ``core/packed_attention.py``), marked ``# pragma: no mutate`` in the work copy only. Its mutants would survive
  every CPU test without being equivalent; the GPU check that runs that code is named next to each range.
* ``MESSAGE_PATTERNS``: the error and log messages (the whole ``raise X(...)`` call, ``logger.*(...)``). A mutant
  there only changes the wording of a message: it cannot change a result, and the one-line-error tests match the
  message's key words, not every character.

Commands (from the repository root, in a venv with ``mutmut==3.8.1`` and pmod's test extra; 2 workers)::

    python benchmarks/mutation/run_mutation.py --work /tmp/pmod-mutation --max-children 2 [--only GLOB ...]
    python benchmarks/mutation/run_mutation.py --work /tmp/pmod-mutation --max-children 2 --resume --only GLOB ...
    python benchmarks/mutation/run_mutation.py --work /tmp/pmod-mutation --max-children 2 --confirm

The first copies ``src/``, ``tests/``, ``recipes/`` and ``pyproject.toml`` into ``--work`` (adding the
``[tool.mutmut]`` table there, so the repository's ``pyproject.toml`` needs none) and runs ``mutmut run`` on the
mutants named by ``--only`` (globs such as ``'pmod.core.schedules.*'``; all by default); ``--resume`` runs more of
them in the same copy (mutmut runs every named mutant again, finished or not: to resume, name the ones not run
yet). ``--confirm`` runs every mutant the baseline left alive against ``MUTANT_TESTS`` alone (in
``<work>-confirm``): a mutant those tests kill counts as *killed by new test*. Each run writes
``benchmarks/results/mutation.json`` (``--out``): the baseline and final scores per module and overall, and every
mutant the baseline did not detect, with its diff and its verdict: killed by new test, or from
``benchmarks/mutation/verdicts.json`` (by name or glob: equivalent, not detectable on a CPU, unreachable on the
installed versions, each with why), or recognised from the diff (a change of device only; a letter-case change of
``float("inf")``), else ``open``. ``--report-only`` rewrites the JSON from the work copies. ``--previous DIR ...``
(older work copies) fills in the mutants not run in ``--work`` from them, for the functions whose source is the same
now as there; mutants of changed functions are listed as stale, never counted (``functions.py``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from functions import ROOT, function_of, function_source, gap_summary, module_of, names_before, short_args

VERDICTS = Path(__file__).with_name("verdicts.json")
RESULT = ROOT / "benchmarks" / "results" / "mutation.json"

MUTATE = [
    "src/pmod/core/*",
    "src/pmod/methods/*",
    "src/pmod/analysis/analytic_flops.py",
    "src/pmod/analysis/dims.py",
    "src/pmod/analysis/budget.py",
]

#: The tests written to kill survivors. Named up front (an empty placeholder in the work copy until they exist):
#: mutmut resets every result when its test selection changes, so adding them later must not change it.
MUTANT_TESTS = [
    f"tests/test_mutants_{name}.py"
    for name in ("core", "layer", "methods", "accounting", "config", "io", "plan", "rules")
]

TESTS = [
    f"tests/test_{name}.py"
    for name in (
        "schedule layer cache methods gamma_mod fastv packed_attention flops paper_constants positions second_checks "
        "reference_checks convert backbones files train train_faults cli_methods generate import_llava static_compile "
        "count_ops pdrop dart budget"
    ).split()
] + MUTANT_TESTS

#: Tests left out, and why. A subprocess imports the original package, never the mutant, so those tests could never
#: kill one and only cost time; an order-dependent test would "kill" mutants by the order mutmut runs tests in.
DESELECTED = {
    **dict.fromkeys(
        [
            "tests/test_files.py::test_second_writer_is_refused_while_the_first_holds_the_lock",
            "tests/test_files.py::test_lock_of_a_killed_process_does_not_block",
            "tests/test_train.py::test_torchrun_two_processes_match_single",
            "tests/test_train_faults.py::test_a_second_run_into_a_busy_output_dir_gets_one_line",
            "tests/test_train_faults.py::test_torchrun_into_a_busy_output_dir_stops_every_rank",
            "tests/test_cli_methods.py::test_the_command_line_says_so_in_one_line",
        ],
        "runs pmod in a subprocess",
    ),
    **dict.fromkeys(
        [
            "tests/test_static_compile.py::test_prefill_compiles_without_graph_breaks_given_the_counts",
            "tests/test_static_compile.py::test_static_decode_compiles_once_without_graph_breaks",
        ],
        "fails in mutmut's stats run (which records which test reaches which function): torch.compile(fullgraph=True) "
        "cannot trace the trampolines' ContextVar.get (a graph break, torch 2.13); outside that run it passes",
    ),
    "tests/test_cli_methods.py::test_settings_that_route_no_layer_run_dense_everywhere": "order-dependent: fails "
    "when run alone (transformers' once-per-process past_key_values deprecation warning joins the expected log)",
}

#: Lines whose expressions are messages only: a mutant there changes wording, never a result.
MESSAGE_PATTERNS = [r"^\s*raise \w+\(", r"\blogger\.\w+\("]

#: (file, first line's text, last line's text, why, which GPU check runs it): ranges marked ``# pragma: no mutate``
#: in the work copy only. Each text must occur exactly once in its file.
EXCLUDED_CODE = [
    (
        "src/pmod/core/packed_attention.py",
        "params = _varlen_takes()",
        "out = _varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)",
        "packed_causal_attention's varlen flash branch: runs only on CUDA in fp16/bf16 (varlen_flash_available), "
        "never on a CPU",
        "benchmarks/gpu_check.py (gpu_correctness.run_all: every method's routed layers in bf16 on the packed "
        "path against the references, and the 'mixed anyres' prefill packed vs padded)",
    ),
]


def mutmut_table(mutate: list[str], tests: list[str]) -> str:
    """The ``[tool.mutmut]`` table written into the work copy's pyproject.toml."""
    selection = [*tests, *(f"--deselect={t}" for t in DESELECTED if t.split("::")[0] in tests)]
    table = {
        "source_paths": ["src"],
        "only_mutate": mutate,
        "do_not_mutate_patterns": MESSAGE_PATTERNS,
        "also_copy": ["recipes/", "benchmarks/"],
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": selection,
        "use_git_change_detection": False,
    }
    return "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


def mark_excluded(work: Path) -> None:
    """Append ``# pragma: no mutate`` to every code line of each ``EXCLUDED_CODE`` range in the work copy."""
    for rel, first, last, _, _ in EXCLUDED_CODE:
        path = work / rel
        lines = path.read_text().splitlines()
        found = [[i for i, line in enumerate(lines) if text in line] for text in (first, last)]
        if any(len(f) != 1 for f in found):
            sys.exit(f"{rel}: the excluded range's first/last line ({first!r}, {last!r}) is not found exactly once")
        for i in range(found[0][0], found[1][0] + 1):
            if lines[i].strip() and not lines[i].strip().startswith("#"):
                lines[i] += "  # pragma: no mutate"  # inside an existing comment it still counts (mutmut reads it)
        path.write_text("\n".join(lines) + "\n")


def prepare(work: Path, mutate: list[str], tests: list[str]) -> None:
    """A fresh copy of the sources, tests and config in ``work``; ``MUTANT_TESTS`` not in ``tests`` are empty."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in ("src", "tests", "recipes"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "benchmarks").mkdir()
    for script in (ROOT / "benchmarks").glob("*.py"):  # tests/test_count_ops.py imports count_ops.py and common.py
        shutil.copy2(script, work / "benchmarks" / script.name)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_table(mutate, tests))
    mark_excluded(work)
    for rel in MUTANT_TESTS:
        if rel not in tests or not (ROOT / rel).exists():
            (work / rel).write_text('"""Placeholder: a file of tests for mutants, empty in this run."""\n')


def confirm_dir(work: Path) -> Path:
    return work.with_name(work.name + "-confirm")


def short_diff(name: str, path: str) -> list[str]:
    """The changed lines of a mutant (``-`` original, ``+`` mutant)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    return [line.rstrip() for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def statuses(work: Path) -> dict[str, tuple[str, str]]:
    """Every mutant's mutmut status and the source file it is in, read from ``work/mutants``."""
    from mutmut.stats import status_by_exit_code

    found = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            found[name] = (status_by_exit_code[code], source)
    return found


#: mutmut statuses that count as detected: a test failed, or the mutant hung or crashed the test run.
DETECTED = ("killed", "timeout", "segfault")


def tally(status_by_name: dict[str, str]) -> dict[str, dict]:
    """Counts per module and overall; the score is detected / checked (``not checked``: not run yet)."""
    groups: dict[str, dict[str, int]] = {}
    for name, status in status_by_name.items():
        for group in (module_of(name), "overall"):
            counts = groups.setdefault(group, {})
            counts[status] = counts.get(status, 0) + 1
    for counts in groups.values():
        checked = sum(n for status, n in counts.items() if status != "not checked")
        detected = sum(counts.get(status, 0) for status in DETECTED)
        counts["total"] = sum(counts.values())
        counts["score_percent"] = round(100.0 * detected / checked, 1) if checked else None
    return dict(sorted(groups.items()))


_DEVICE_ARG = re.compile(r",?\s*device=[\w.]*|\.to\([\w.]*device\)|\.to\(None\)")


def _no_device(line: str) -> str:
    return re.sub(r",\s*\)", ")", _DEVICE_ARG.sub("", line))


def automatic_verdict(diff: list[str]) -> dict[str, str] | None:
    """The two kinds of survivor recognised from the diff alone (documented in the report)."""
    old = [line[1:] for line in diff if line.startswith("-")]
    new = [line[1:] for line in diff if line.startswith("+")]
    if len(old) != 1 or len(new) != 1:
        return None
    if old[0] != new[0] and _no_device(old[0]) == _no_device(new[0]):
        why = (
            "changes only the device a tensor is made on or moved to: the CPU tests run on one device (the GPU "
            "check runs these paths on CUDA; where a path also runs on the meta device, a test there kills such "
            "a mutant, see tests/test_mutants_plan.py and test_mutants_layer.py)"
        )
        return {"verdict": "not detectable on a CPU", "why": why}
    if 'float("' in old[0] and old[0] != new[0] and old[0].lower() == new[0].lower():
        return {"verdict": "equivalent", "why": "float() reads 'inf'/'nan' in any letter case"}
    return None


def verdict_for(name: str, diff: list[str], verdicts: dict[str, dict]) -> dict[str, str]:
    """``verdicts.json`` by exact name, then by glob (first match), then :func:`automatic_verdict`, else open."""
    if name in verdicts:
        return verdicts[name]
    for pattern, verdict in verdicts.items():
        if fnmatch.fnmatchcase(name, pattern):
            return verdict
    return automatic_verdict(diff) or {"verdict": "open"}


#: Verdicts that take a mutant out of the final score's denominator (with the reason in the report).
SET_APART = ("equivalent", "not detectable on a CPU", "unreachable on the installed versions")


def _copy_results(work: Path) -> tuple[dict, dict, dict]:
    """A work copy's current statuses, baseline and confirmation statuses."""
    now = statuses(work)
    base_file = work / "baseline.json"
    baseline = json.loads(base_file.read_text()) if base_file.exists() else {n: s for n, (s, _) in now.items()}
    confirmed = statuses(confirm_dir(work)) if (confirm_dir(work) / "mutants").exists() else {}
    return now, baseline, confirmed


def merged_results(work: Path, previous: list[Path]) -> tuple[dict, dict[str, list[str]]]:
    """Per mutant of the current code: (baseline status, confirmed status, source file, work copy it was run in,
    its name there). A mutant not checked in ``work`` is taken from the first ``previous`` copy that checked it
    (under its module's name there: ``functions.RENAMED``), if its function's source there equals the current one;
    else it stays not checked, listed as stale (its function changed since it was measured) or unmeasured."""
    now, baseline, confirmed = _copy_results(work)
    older = [(p, *_copy_results(p)) for p in previous]
    cache: dict = {}
    merged, gaps = {}, {"stale": [], "unmeasured": []}
    for name, (_, source) in now.items():
        status = baseline.get(name, "not checked")
        if status != "not checked":
            merged[name] = (status, confirmed.get(name, ("",))[0], source, work, name)
            continue
        function = function_of(name)
        current = function_source(ROOT, source, cache).get(function)
        stale, found = False, None
        for root, _, old_base, old_confirmed in older:
            for old_name, old_source in names_before(name, source):
                if old_base.get(old_name, "not checked") == "not checked":
                    continue
                if function_source(root, old_source, cache).get(function) == current:
                    found = (old_base[old_name], old_confirmed.get(old_name, ("",))[0], old_source, root, old_name)
                else:
                    stale = True
                break
            if found:
                break
        merged[name] = found or ("not checked", "", source, work, name)
        if not found:
            gaps["stale" if stale else "unmeasured"].append(name)
    return merged, gaps


def report(work: Path, previous: list[Path] | None = None) -> dict:
    """The JSON report: the baseline score (the suite before the tests for mutants), the final score (with them),
    per module and overall, and every mutant the baseline did not detect, with its verdict. Mutants not run in
    ``work`` come from ``previous`` work copies where their function is unchanged (see :func:`merged_results`)."""
    import torch
    import transformers

    merged, gaps = merged_results(work, previous or [])
    baseline = {n: b for n, (b, *_) in merged.items()}
    verdicts = json.loads(VERDICTS.read_text()) if VERDICTS.exists() else {}
    final = dict(baseline)
    survivors = {}
    for name, (status, confirmed, source, root, name_there) in sorted(merged.items()):
        if status in DETECTED or status == "not checked":
            continue
        os.chdir(root)  # mutmut's diff reads its own files relative to the work copy
        diff = short_diff(name_there, source)
        entry = {"baseline": status, "diff": diff}
        if confirmed in DETECTED:
            final[name] = "killed"
            entry.update({"verdict": "killed by new test", **verdicts.get(name, {})})
            entry["verdict"] = "killed by new test"
        else:
            entry.update(verdict_for(name, diff, verdicts))
        survivors[name] = entry
    os.chdir(ROOT)
    set_apart = {n: e["verdict"] for n, e in survivors.items() if e["verdict"] in SET_APART}
    final_set_apart = {n: set_apart.get(n, s) for n, s in final.items()}
    by_verdict: dict[str, int] = {}
    for entry in survivors.values():
        by_verdict[entry["verdict"]] = by_verdict.get(entry["verdict"], 0) + 1
    return {
        "measure": "mutation score: detected mutants / checked mutants (mutmut 3: one small change per mutant, "
        "detected = a test failed, or the tests hung or crashed)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": [run for w in (*(previous or []), work) for run in _runs(w)],
        "work_copies": [str(w) for w in (*(previous or []), work)],
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), no GPU",
        "versions": {
            "python": platform.python_version(),
            "mutmut": version("mutmut"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "scope": MUTATE,
        "tests": TESTS,
        "tests_for_mutants": [t for t in MUTANT_TESTS if (ROOT / t).exists()],
        "deselected_tests": DESELECTED,
        "not_mutated": {
            "messages (lines matching these patterns; wording only)": MESSAGE_PATTERNS,
            "cpu_unreachable": [
                {"file": f, "from": a, "to": b, "why": why, "gpu_check": gpu} for f, a, b, why, gpu in EXCLUDED_CODE
            ],
        },
        "target": "score >= 90%; every survivor killed by a new test or listed as equivalent with why",
        "baseline": tally(baseline),
        "final": tally(final),
        "final_with_set_apart_excluded": tally({n: s for n, s in final_set_apart.items() if s not in SET_APART}),
        "survivors_by_verdict": by_verdict,
        "not_measured_on_current_code": {
            "stale (function changed since it was measured; mutants per function)": gap_summary(gaps["stale"]),
            "unmeasured (never run; mutants per function)": gap_summary(gaps["unmeasured"]),
        },
        "survivors": survivors,
    }


def _runs(work: Path) -> list[dict]:
    return json.loads((work / "runs.json").read_text()) if (work / "runs.json").exists() else []


def run_mutmut(args: argparse.Namespace, work: Path, names: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    start = datetime.now(timezone.utc)
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *names]
    done = subprocess.run(cmd, cwd=work, env=env)
    seconds = round((datetime.now(timezone.utc) - start).total_seconds())
    print(f"mutmut exited {done.returncode} after {seconds} s")
    runs_file = args.work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    command = " ".join(["python", "benchmarks/mutation/run_mutation.py", *short_args(sys.argv[1:])])
    runs.append({"command": command, "started": start.strftime("%Y-%m-%d %H:%M UTC"), "seconds": seconds})
    runs_file.write_text(json.dumps(runs, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pmod-mutation"))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[], help="mutant names or globs to (re-)run")
    parser.add_argument("--resume", action="store_true", help="keep --work and its results; run what is left")
    parser.add_argument("--confirm", action="store_true", help="run the survivors against the tests for mutants")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--mutate", nargs="*", default=MUTATE, help="file globs to mutate (a fresh run only)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument(
        "--previous",
        type=Path,
        nargs="*",
        default=[],
        help="older work copies: their results for the functions "
        "not run in --work and unchanged since (the report only)",
    )
    args = parser.parse_args()
    if not args.report_only:
        if args.confirm:  # the mutants the suite left alive, against the tests written for them alone
            alive = [n for n, (s, _) in statuses(args.work).items() if s not in DETECTED and s != "not checked"]
            alive = [n for n in alive if not args.only or any(fnmatch.fnmatchcase(n, g) for g in args.only)]
            written = [t for t in MUTANT_TESTS if (ROOT / t).exists()]
            if args.resume and confirm_dir(args.work).exists():  # keep earlier confirmations, take the new tests
                for rel in written:
                    shutil.copy2(ROOT / rel, confirm_dir(args.work) / rel)
            else:
                prepare(confirm_dir(args.work), args.mutate, written)
            run_mutmut(args, confirm_dir(args.work), alive)
        else:
            if not args.resume:
                prepare(args.work, args.mutate, TESTS)
            run_mutmut(args, args.work, args.only)
            found = statuses(args.work)  # the baseline: what the suite without the tests for mutants detects
            (args.work / "baseline.json").write_text(json.dumps({n: s for n, (s, _) in found.items()}, indent=0))
    result = report(args.work, args.previous)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"baseline": result["baseline"]["overall"], "final": result["final"]["overall"]}, indent=1))
    print(f"{len(result['survivors'])} not detected by the baseline; written to {args.out}")


if __name__ == "__main__":
    main()
