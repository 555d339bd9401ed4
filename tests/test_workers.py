"""The worker processes of `pmod ablate` (and `pmod demo --seeds`) and of `pmod demo` end with their parent: a parent
killed with SIGKILL leaves no worker training on (or idling) in the background."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# The parent: the real entry point that starts the workers, with the work each worker does replaced by a long
# sleep (in a module the spawned workers can import), so that workers stay busy until the parent is killed.
PARENT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import slowwork
from pmod.experiments.demo import DemoSettings
out = Path(sys.argv[3])
if sys.argv[1] == "ablate":
    from pmod.experiments import ablate_runs
    ablate_runs.run_unit = slowwork.work
    units = [ablate_runs.Unit("dense", 0, None), ablate_runs.Unit("dense", 1, None)]
    ablate_runs.run_units(units, ablate_runs.Layout(out), DemoSettings(), [], threads=1, workers=2)
else:
    from pmod.experiments import demo_runs
    demo_runs.train_in_worker = slowwork.work
    demo_runs.parallel_workers = lambda settings: 2
    demo_runs.train_variants(out, out, out, DemoSettings(variants=("dense", "pmod")))
"""
WORK = """
import os, time
from pathlib import Path

def work(*args):
    Path(os.environ["PMOD_TEST_STARTED"], str(os.getpid())).touch()
    time.sleep(300)
"""


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a killed process nobody has reaped yet is a zombie: gone)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("entry", ["ablate", "demo"])
def test_workers_end_with_a_killed_parent(entry: str, tmp_path: Path) -> None:
    (tmp_path / "slowwork.py").write_text(WORK)
    started = tmp_path / "started"
    started.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PMOD_TEST_STARTED": str(started)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, entry, str(tmp_path), str(tmp_path / "out")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    family: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while len(list(started.iterdir())) < 2:
            assert parent.poll() is None, "the parent ended before its workers started"
            assert time.time() < deadline, "no two workers started within two minutes"
            time.sleep(0.1)
        family = psutil.Process(parent.pid).children(recursive=True)
        workers = {int(p.name) for p in started.iterdir()}
        assert workers <= {p.pid for p in family}  # both are busy in the work, children of the parent
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while running(family) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(family), [p.cmdline() for p in running(family)]
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in running(family):
            p.kill()
