"""Issue 27's planted mistakes, planted again in today's code: does each fail at least one test?

Each mistake is one exact text replacement in a copy of ``src/`` (``git archive HEAD``); the test files named next
to it run against that copy (``PYTHONPATH``), and the failing tests are recorded. The two paper constants (TanhNorm's
scale, gamma-MoD's decode threshold) run twice: with every named file, and without ``tests/test_paper_constants.py``
and the other literal pins, to show that the reference tests themselves fail, not only an assert on a literal.

Two rows of the issue's table changed meaning with issue 22's rewrite and are planted where the code now does the
same thing: a compacted layer hands its attention no ``position_ids`` any more (flash attention would read gathered
ones as packed sequences), so "positions gathered one off" is planted in the RoPE cos/sin gather that now carries
the kept tokens' positions (``routed_layer._gathered_rope``); the M-RoPE multi-axis gather is ``gather_positions``.
Top-k selection now happens in two places (the forward plan's ``select``, which every method's prefill uses, and
``compaction.top_k_mask``, gamma-MoD's), so the tie mistake is planted in each.

Usage (from the repository root; about 10 minutes on 2 cores)::

    python benchmarks/mutation/planted_mistakes.py [--only NAME ...] [--out benchmarks/results/planted_mistakes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "planted_mistakes.json"
#: Tests that pin a paper constant literally: left out of the "reference tests themselves" run.
LITERAL_PINS = ("tests/test_paper_constants.py", "tests/test_mutants_config.py")


@dataclass(frozen=True)
class Mistake:
    name: str
    what: str  # the row
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    constant: bool = False  # a paper constant: also run without the literal pins


MISTAKES = (
    Mistake("tanh_scale", "TanhNorm default scale 0.2 -> 0.25 (NORM_DEFAULTS)", "src/pmod/methods/pmod.py",
            '"tanh": (0.2, 1.0)', '"tanh": (0.25, 1.0)',
            ("tests/test_layer.py", "tests/test_matrix.py", "tests/test_reference_checks.py",
             "tests/test_paper_constants.py"), constant=True),
    Mistake("gamma_decode_threshold", "gamma-MoD decode_threshold default 0.5 -> 0.9", "src/pmod/methods/gamma_mod.py",
            'decode_threshold: float = field(default=0.5,', 'decode_threshold: float = field(default=0.9,',
            ("tests/test_matrix.py", "tests/test_gamma_mod.py", "tests/test_reference_checks.py",
             "tests/test_paper_constants.py"), constant=True),
    Mistake("mrope_axis_gather", "M-RoPE multi-axis gather one position off (compaction.gather_positions)",
            "src/pmod/core/compaction.py",
            "gather_tokens(axis.expand(bsz, *axis.shape[1:]), index) for axis in t]",
            "gather_tokens(axis.expand(bsz, *axis.shape[1:]), (index + 1).clamp(max=axis.shape[1] - 1)) for axis in t]",
            ("tests/test_positions.py", "tests/test_matrix.py", "tests/test_packed_attention.py")),
    Mistake("rope_gather", "kept tokens' positions gathered one off (routed_layer._gathered_rope's cos/sin gather)",
            "src/pmod/core/routed_layer.py",
            "at = where.expand(-1, -1, cos.shape[-1])",
            "at = (where + 1).clamp(max=cos.shape[1] - 1).expand(-1, -1, cos.shape[-1])",
            ("tests/test_positions.py", "tests/test_layer.py", "tests/test_cache.py", "tests/test_matrix.py")),
    Mistake("kept_count_round", "schedules.kept_count floor -> round", "src/pmod/core/schedules.py",
            "    return math.floor(n_vision * ratio)", "    return round(n_vision * ratio)",
            ("tests/test_schedule.py", "tests/test_flops.py", "tests/test_second_checks.py")),
    Mistake("topk_ties_high", "top-k ties broken by the higher position (the plan's selection, every method's path)",
            "src/pmod/core/plan.py",
            "top = ranked.sort(dim=1, descending=True, stable=True).indices[:, :slots]",
            "top = (ranked.shape[1] - 1 - ranked.flip(1).sort(dim=1, descending=True, stable=True).indices)[:, :slots]",
            ("tests/test_layer.py", "tests/test_cache.py", "tests/test_flops.py", "tests/test_second_checks.py")),
    Mistake("topk_ties_high_mask", "top-k ties broken by the higher position (compaction.top_k_mask, gamma-MoD's)",
            "src/pmod/core/compaction.py",
            "order = torch.sort(ranked, dim=1, descending=True, stable=True).indices",
            "order = ranked.shape[1] - 1 - torch.sort(ranked.flip(1), dim=1, descending=True, stable=True).indices",
            ("tests/test_gamma_mod.py", "tests/test_second_checks.py")),
    Mistake("kv_bytes_no_heads", "KV bytes without the heads dimension", "src/pmod/analysis/analytic_flops.py",
            "kv_bytes=2 * b * k * dims.kv_heads * hd * elem_bytes,", "kv_bytes=2 * b * k * hd * elem_bytes,",
            ("tests/test_layer.py", "tests/test_cache.py", "tests/test_flops.py", "tests/test_second_checks.py")),
    Mistake("decode_attn_k", "decode attention over k keys instead of k + 1", "src/pmod/analysis/analytic_flops.py",
            "decode_attn = 2 * (2 * dims.heads * hd * (k + 1))", "decode_attn = 2 * (2 * dims.heads * hd * k)",
            ("tests/test_layer.py", "tests/test_cache.py", "tests/test_flops.py", "tests/test_second_checks.py")),
)


def planted_copy(mistake: Mistake, into: Path) -> None:
    """``src/`` at HEAD in ``into``, with the mistake's one replacement (which must match exactly once)."""
    archive = subprocess.run(["git", "archive", "HEAD", "src"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    path = into / mistake.path
    text = path.read_text()
    if text.count(mistake.old) != 1:
        sys.exit(f"{mistake.name}: {mistake.old!r} occurs {text.count(mistake.old)} times in {mistake.path}, not once")
    path.write_text(text.replace(mistake.old, mistake.new))


def failing_tests(src: Path, tests: tuple[str, ...]) -> tuple[list[str], int, float]:
    """The tests that fail against ``src`` (node ids), pytest's exit code, and the seconds it took."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)
    if run.returncode not in (0, 1):  # 2+: collection or usage error, not a test failure
        sys.exit(f"pytest exited {run.returncode}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return failed, run.returncode, time.perf_counter() - start


def plant(mistake: Mistake) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"planted-{mistake.name}-") as tmp:
        planted_copy(mistake, Path(tmp))
        failed, _, seconds = failing_tests(Path(tmp) / "src", mistake.tests)
        row = {"mistake": mistake.what, "file": mistake.path, "tests": list(mistake.tests),
               "failed": failed, "caught": bool(failed), "seconds": round(seconds, 1)}  # fmt: skip
        if mistake.constant:
            without = tuple(t for t in mistake.tests if t not in LITERAL_PINS)
            failed_ref, _, _ = failing_tests(Path(tmp) / "src", without)
            row["without_literal_pins"] = {"tests": list(without), "failed": failed_ref, "caught": bool(failed_ref)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="mistake names to plant (default: all)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    rows = {}
    for mistake in MISTAKES:
        if args.only and mistake.name not in args.only:
            continue
        rows[mistake.name] = plant(mistake)
        print(f"{mistake.name}: caught={rows[mistake.name]['caught']} by {len(rows[mistake.name]['failed'])} tests",
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"measure": __doc__.split("\n\n")[1].replace("\n", " "), "date": time.strftime("%Y-%m-%d"),
              "commit": commit.strip(), "mistakes": rows, "all_caught": all(r["caught"] for r in rows.values())}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}; every mistake caught: {report['all_caught']}")


if __name__ == "__main__":
    main()
