"""How long the ``pmod`` command takes to answer ``--help`` and a flag mistake (target: under 1 s each).

Each case runs in a fresh interpreter (``python -m pmod.cli ...``, as the ``pmod`` script does), the cases taking
turns for ``--reps`` rounds so that drift of a shared machine hits them alike; medians, minima and maxima in JSON.

    python benchmarks/bench_cli.py --out benchmarks/results/cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.0
CASES: dict[str, list[str]] = {
    "pmod --help": ["--help"],
    **{f"pmod {c} --help": [c, "--help"] for c in
       ("train", "generate", "flops", "viz", "demo", "arank", "data", "import-llava")},
    "pmod train: unknown flag": ["train", "--model", "m", "--data", "x"],
    "pmod train: bad Trainer value": ["train", "--model", "m", "--learning-rate", "fast"],
    "pmod train: FastV": ["train", "--model", "m", "--method", "fastv"],
    "pmod generate: unknown flag": ["generate", "--model", "m", "--imag", "x.png"],
    "pmod flops: unknown flag": ["flops", "--bogus"],
    "pmod: unknown command": ["trian"],
}  # fmt: skip


def time_once(argv: list[str]) -> tuple[float, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pmod.cli", *argv], capture_output=True, env=env, timeout=120)
    return time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    codes: dict[str, int] = {}
    baseline = []
    for rep in range(args.reps):
        names = list(CASES) if rep % 2 == 0 else list(CASES)[::-1]
        for name in names:
            seconds, codes[name] = time_once(CASES[name])
            samples[name].append(seconds)
        start = time.perf_counter()  # the interpreter alone, for scale
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    cases = {
        name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "exit_code": codes[name],
               "target_met": statistics.median(s) < TARGET_S}  # fmt: skip
        for name, s in samples.items()
    }
    result = {
        "benchmark": "bench_cli",
        "command": "python benchmarks/bench_cli.py " + " ".join(argv or sys.argv[1:]),
        "reps": args.reps,
        "python_startup_median_s": statistics.median(baseline),
        "target": f"median < {TARGET_S} s",
        "all_met": all(c["target_met"] for c in cases.values()),
        "cases": cases,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
