"""The README and docs/ say what the code does: generated settings tables, set-up commands, versions, links, and
every ``pmod`` command shown parses with the command's own parser, and every command of the README runs."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import TINY_DEMO
from PIL import Image

from pmod.cli import SUBCOMMANDS, main
from pmod.core.backbone import backbone_for_model_type, supported_model_types
from pmod.core.config import method_class, method_names
from pmod.recipes.parsing import CommandParser, dashed

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "DEVELOPERS.md", ROOT / "BENCHMARKS.md", *DOCS]


def settings_tables():
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "docs" / "settings_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_lines(path: Path) -> list[str]:
    """The logical lines of the page's code blocks (fenced or indented), continuations joined."""
    lines, fenced = [], False
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            fenced = not fenced
            continue
        if fenced or raw.startswith("    "):
            line = raw.strip()
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + line
            elif line:
                lines.append(line)
    return lines


def pmod_commands(path: Path) -> list[list[str]]:
    """Every ``pmod ...`` command in the page's code blocks as argv (``torchrun -m pmod.recipes.train`` counts as
    ``pmod train``); comments dropped."""
    commands = []
    for line in code_lines(path):
        if not (line.startswith("pmod ") or "pmod.recipes.train" in line):
            continue
        words = shlex.split(line, comments=True)
        if words[:1] == ["pmod"]:
            commands.append(words[1:])
        elif "pmod.recipes.train" in words and words[words.index("pmod.recipes.train") - 1] == "-m":
            commands.append(["train", *words[words.index("pmod.recipes.train") + 1 :]])
    return commands


def parse(argv: list[str]) -> None:
    """Parse ``pmod <argv>`` as ``pmod.cli.main`` does, without running it."""
    name = argv[0]
    assert name in SUBCOMMANDS, argv
    parser = CommandParser(prog=f"pmod {name}", allow_abbrev=False)
    importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
    parser.parse_args([dashed(token) for token in argv[1:]])


def test_settings_tables_are_generated_from_the_configs() -> None:
    """docs/METHODS.md holds one table per registered method, each equal to the generated one."""
    module = settings_tables()
    text = (ROOT / "docs" / "METHODS.md").read_text()
    assert module.blocks(text) == method_names()
    assert module.render(text) == text, "docs/METHODS.md is out of date: run python docs/settings_tables.py"


def test_settings_table_names_each_field_and_the_commands_that_take_it() -> None:
    """FastV's new fields are rows, with their flags; its flags belong to flops, generate and viz, not to train."""
    table = settings_tables().settings_table("fastv")
    assert '| `ranking` | `--fastv-ranking` | `"attention"` | attention (FastV) or random' in table
    assert "| `seed` | `--fastv-seed` | `0` | seed of ranking=random |" in table
    assert "Flags of `pmod flops`, `pmod generate`, `pmod viz`; keys `fastv_<field>` of `pmod eval`" in table
    assert "Flags of `pmod demo`, `pmod flops`, `pmod train`;" in settings_tables().settings_table("pmod")


def test_setup_commands_are_what_ci_runs() -> None:
    """The README's two commands install exactly what .ci/run installs and run its test command."""
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    install = re.search(r"^(python3 -m venv \.venv &&.*?\"\.\[test,eval\]\")", ci, re.M).group(1)
    install = " ".join(install.split())
    assert f"{install} && .venv/bin/python -m pytest -q" in " ".join(ci.split())
    lines = code_lines(README)
    assert f"{install} && .venv/bin/pmod demo" in lines
    assert f"{install} && .venv/bin/python -m pytest -q" in lines


def test_stated_versions_are_pyprojects() -> None:
    """The requirements the README and docs/VERSIONS.md state are pyproject's."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme, versions = README.read_text(), (ROOT / "docs" / "VERSIONS.md").read_text()
    for name in ("torch", "transformers"):
        pin = re.search(rf'^\s*"({name}[<>=][^"]*)"', pyproject, re.M).group(1)
        assert f"`{pin}`" in readme and f"`{pin}`" in versions, pin
    python = re.search(r'^requires-python = "([^"]+)"', pyproject, re.M).group(1)
    assert f"Python {python.replace('>=', '>= ')}" in readme, python


def test_quick_is_described_alike() -> None:
    """`--quick` of demo and ablate: the same words in their --help, the README and docs/DEMO.md."""
    phrase = "smoke run of about a minute"
    for name in ("demo", "ablate"):
        parser = CommandParser(prog=f"pmod {name}")
        importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
        quick = next(a for a in parser._actions if "--quick" in a.option_strings)
        assert phrase in quick.help, quick.help
    for page in (README, ROOT / "docs" / "DEMO.md"):
        text = " ".join(page.read_text().split())
        assert phrase in text and "2-minute" not in text and "30 seconds" not in text, page


def test_support_table_has_every_family_and_method() -> None:
    text = README.read_text()
    table = text[text.index("| family (`model_type`) |") :].split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[1:] == [method_class(m).display_name for m in method_names()]
    types = [t for row in table[2:] for t in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert sorted(types) == sorted(supported_model_types())
    for row in table[2:]:  # a method acting before the decoder needs the family's vision-token path; others: all
        adapters = [backbone_for_model_type(t) for t in re.findall(r"`(\w+)`", row.split("|")[1])]
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        expected = ["✓" if method_class(m).routes_layers or all(a.vision_token_path for a in adapters) else "—"
                    for m in method_names()]  # fmt: skip
        assert cells == expected, row


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_command_parses(page: Path) -> None:
    """Each `pmod` command in the page's code blocks is accepted by its command's parser (flags that exist,
    values of the right kind)."""
    for argv in pmod_commands(page):
        try:
            parse(argv)
        except SystemExit as stop:
            pytest.fail(f"{page.name}: `pmod {shlex.join(argv)}` does not parse (exit {stop.code})")


#: What the tests add to a README command to bound its size (the command's own flags for that): the demo and the
#: ablation at their ``--quick`` size, shrunk further to the tests' tiny task and model (tests/conftest.py); a
#: training run of 2 steps; an evaluation of 8 documents per task. Nothing else is changed; ``--resume`` continues
#: the run it names.
SIZE_BOUNDS = {"demo": ["--quick"], "ablate": ["--quick"], "train": ["--max-steps", "2"], "eval": ["--limit", "8"]}
#: README commands the session's fixtures run (tests/conftest.py: `quick_demo`, `quick_ablation`), as the tests
#: of those reports use them.
SHARED = {"demo": "quick_demo", "ablate": "quick_ablation"}


def bounded(argv: list[str]) -> list[str]:
    """``argv`` with its size bound (nothing for a ``--resume``, which runs the settings it finds)."""
    return argv if "--resume" in argv else [*argv, *SIZE_BOUNDS.get(argv[0], [])]


def readme_placeholders() -> None:
    """The folders and files the README's commands name, as tiny stand-ins in the current folder."""
    from pmod import PModConfig
    from pmod.testing import tiny_llava_folder

    tiny_llava_folder("DIR", num_layers=4, method_config=PModConfig())
    tiny_llava_folder("dense-dir", num_layers=4)
    Path("path/to").mkdir(parents=True)
    Path("path/to/model").symlink_to(Path.cwd() / "DIR")
    Image.new("RGB", (32, 32), (10, 10, 200)).save("cat.png")
    Path("questions.jsonl").write_text('{"image": "cat.png", "prompt": "What color is the shape ?"}\n')


def test_every_readme_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Every `pmod` command of the README, in the README's order, on tiny stand-ins for DIR / dense-dir /
    path/to/model, with only its size bounded (SIZE_BOUNDS): each exits 0 and leaves what it promises. The
    demo and ablation commands run each in its own folder; plain `pmod demo` and `pmod ablate` are the session's
    runs (SHARED), and ``--resume`` continues a copy of the ablation's."""
    import json
    import shutil

    from pmod import load
    from pmod.core.convert import get_method_config
    from pmod.experiments.ablate import AblateSettings
    from pmod.experiments.demo import DemoSettings

    # the session's runs are made (if this test is the first to need them) before this test's patches
    shared = {command: request.getfixturevalue(name)[0].parent for command, name in SHARED.items()}
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # in this process: worker start-up costs more than these runs
    monkeypatch.setattr(DemoSettings, "quick", classmethod(lambda cls: cls(**TINY_DEMO)))
    monkeypatch.setattr(AblateSettings, "quick_settings",
                        classmethod(lambda cls: cls(task=DemoSettings(**TINY_DEMO, seeds=1), quick=True)))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    readme_placeholders()
    commands = pmod_commands(README)
    # the training and eval commands read what data synth writes
    assert [c[:2] for c in commands].index(["data", "synth"]) < [c[0] for c in commands].index("train")
    runs = {}  # demo and ablate write ./pmod-demo, ./pmod-ablate: each command runs in its own folder
    for i, argv in enumerate(commands):
        command = shlex.join(argv)
        if command in SHARED:
            runs[command] = shared[command]
            continue
        if argv[0] in ("demo", "ablate") and "--resume" not in argv:
            runs[command] = tmp_path / f"run{i}"
            runs[command].mkdir()
        if "--resume" in argv:
            shutil.copytree(runs["ablate"] / "pmod-ablate", tmp_path / "resumed" / "pmod-ablate")
            runs[command] = tmp_path / "resumed"
        monkeypatch.chdir(runs.get(command, tmp_path))
        assert main(bounded(argv)) == 0, argv
    monkeypatch.chdir(tmp_path)
    assert get_method_config(load("pmod-dir")).method == "pmod" and get_method_config(load("mod-dir")).method == "mod"
    resumed = json.loads((tmp_path / "resumed" / "pmod-ablate" / "report.json").read_text())
    some = json.loads((runs["ablate --variants mod,pmod --seeds 5"] / "pmod-ablate" / "report.json").read_text())
    assert resumed["resumed"] and resumed["settings"]["task"]["seeds"] == request.getfixturevalue(
        "quick_ablation")[1]["settings"]["task"]["seeds"]  # fmt: skip
    assert some["settings"]["variants"] == ["dense", "mod", "pmod"] and some["settings"]["task"]["seeds"] == 5
    assert some["settings"]["task"]["layers"] == TINY_DEMO["layers"]
    assert json.loads((runs["demo --seeds 5"] / "pmod-demo" / "report.json").read_text())["settings"]["seeds"] == 5
    assert any(Path("plots").iterdir()) and any(Path("eval-out").iterdir())


def test_examples_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `examples/quickstart.py`: its own checks hold (cached decoding equals recomputation, the reloaded
    model's logits are identical) and it prints what it promises."""
    import runpy

    import torch

    with torch.random.fork_rng():  # the script seeds torch; leave the other tests' generator as it was
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "reloaded model gives identical logits: True" in out
    assert "KV cache after prefill: p-MoD" in out


def test_every_ablation_row_is_documented() -> None:
    """docs/DEMO.md's table of `pmod ablate` rows names every variant `--variants` accepts, and no other."""
    from pmod.experiments.ablate_variants import VARIANTS

    text = (ROOT / "docs" / "DEMO.md").read_text()
    table = text[text.index("| row (`--variants` name) |") :].split("\n\n")[0].splitlines()[2:]
    assert [re.search(r"\(`(\w+)`\) \|", row).group(1) for row in table] == list(VARIANTS)
