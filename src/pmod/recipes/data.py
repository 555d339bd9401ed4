"""``pmod data``: ``synth`` writes a synthetic VQA set, ``check`` reports broken records of a LLaVA-format file."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmod.core.errors import UserError
from pmod.data.scenes import DEFAULT_KINDS as SCENE_DEFAULT_KINDS
from pmod.data.scenes import QUESTION_KINDS as SCENE_KINDS
from pmod.data.synth import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``synth`` and ``check`` actions to the ``pmod data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    synth = sub.add_parser(
        "synth",
        help="write a synthetic VQA set (coloured shapes) in LLaVA format",
        description="Write train.json, test.json and images/*.png: coloured shapes on plain backgrounds with "
        "one-word questions about colour, shape, count and position. The same seed gives identical files.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (also the image folder)")
    synth.add_argument("--n", type=int, required=True, help="number of samples (train + test)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64, at least 32)")
    synth.add_argument("--test-fraction", type=float, default=0.1, help="share of samples in test.json (default 0.1)")
    synth.add_argument("--task", choices=TASKS, default="shapes", help="shapes: 1-3 shapes per image (the easy "
                       "task); scenes: 3-8 shapes among clutter, questions whose answers need many vision "
                       "tokens")  # fmt: skip
    synth.add_argument("--max-shapes", type=int, default=3, help="most shapes per image, 1-3 (default 3; shapes only)")
    synth.add_argument(
        "--questions",
        default=None,
        help="comma-separated question kinds; shapes: color,count,exists,position,shape (default: all); scenes: "
        f"{','.join(SCENE_KINDS)} (default: {','.join(SCENE_DEFAULT_KINDS)})",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace a data set already in --out (train.json, "
                       "test.json, images/; other files there are kept)")  # fmt: skip

    check = sub.add_parser(
        "check",
        help="report broken records of a LLaVA-format JSON/JSONL file",
        description="Check every record: JSON syntax (JSONL), structure, roles alternating human/gpt, a gpt turn, "
        "<image> count vs images, image files present and readable. Exit code 0: clean, 1: problems found.",
    )
    check.add_argument("file", type=Path, help="JSON list or JSONL file of records")
    check.add_argument("--image-folder", type=Path, default=None, help="folder of image paths (default: the file's)")
    check.add_argument("--no-decode", action="store_true", help="check image headers only, do not decode pixels")
    check.add_argument("--max-problems", type=int, default=None, help="print at most this many problems")


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``pmod data`` action; returns the exit code."""
    if args.data_command == "synth":
        return _synth(args)
    if args.data_command == "check":
        return _check(args)
    raise UserError("choose an action: 'pmod data synth --out DIR --n N' or 'pmod data check FILE'")


def _synth(args: argparse.Namespace) -> int:
    from pmod.data import synth

    try:
        train, test = synth.generate(
            args.out,
            args.n,
            args.seed,
            image_size=args.image_size,
            test_fraction=args.test_fraction,
            overwrite=args.overwrite,
            max_shapes=args.max_shapes,
            question_kinds=None if args.questions is None else [q.strip() for q in args.questions.split(",")],
            task=args.task,
        )
    except FileExistsError as err:
        raise UserError(f"{err}; pass --overwrite to replace it or choose another --out") from err
    except ValueError as err:
        raise UserError(str(err)) from err
    n_test = round(args.n * args.test_fraction)
    print(f"wrote {args.n - n_test} samples to {train} and {n_test} to {test} (images in {args.out / 'images'})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pmod.data.llava_format import LlavaFormatError, check_records

    if args.image_folder is not None and not args.image_folder.is_dir():
        raise UserError(f"--image-folder {args.image_folder} is not a folder")
    try:
        report = check_records(args.file, args.image_folder, decode_images=not args.no_decode)
    except LlavaFormatError as err:
        raise UserError(f"{err}; give a JSON list of records or a JSONL file") from err
    print(report.format(args.max_problems))
    return 0 if report.ok else 1
