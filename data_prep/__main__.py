"""Command line: build the synthetic Broden set, download the real one, or verify a Broden directory.

    python -m data_prep synthetic --out data/synthetic_broden [--profile demo|broden-scale|basic]
                                  [--n-images N] [--size 224] [--seed 0] [--workers CPUS]
    python -m data_prep download --size 224 --out data/ [--mirror URL ...]
    python -m data_prep download --size 224 --out data/ --from-zip PATH
    python -m data_prep convert semantic|coco-panoptic SRC --out DIR   (see data_prep/convert)
    python -m data_prep verify DIR
    python -m data_prep train-embedded --data data/synthetic_broden --out data/embedded_model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep import convert as convert_command
from data_prep.broden_download import MIRRORS, SIZES, DownloadError, download, install_zip
from data_prep import broden_like, synthetic_broden
from dissect.embedded_training import EPOCHS, train_embedded
from data_prep.verify_broden import verify
from dissect.broden import BrodenDataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="generate a Broden-format data set with planted truth")
    synthetic.add_argument("--out", type=Path, default=Path("data/synthetic_broden"))
    synthetic.add_argument("--profile", default=broden_like.DEFAULT_PROFILE,
                           help=f"one of {', '.join(broden_like.ALL_PROFILES)} (default {broden_like.DEFAULT_PROFILE}; "
                                "see data_prep/broden_like.py)")
    synthetic.add_argument("--n-images", type=int, default=None,
                           help="default: the profile's size (demo 3000, broden-scale 63305, basic 3000)")
    synthetic.add_argument("--size", type=int, default=224)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    fetch = commands.add_parser("download", help="download, unpack and verify the real Broden data set")
    fetch.add_argument("--size", type=int, choices=SIZES, default=224)
    fetch.add_argument("--out", type=Path, default=Path("data"))
    fetch.add_argument("--mirror", action="append", metavar="URL",
                       help="directory URL holding broden1_<size>.zip (or the zip's URL); repeat for several, "
                            f"tried in order; replaces the default list: {', '.join(MIRRORS)}")
    fetch.add_argument("--from-zip", type=Path, metavar="PATH",
                       help="check, unpack and verify this local Broden zip instead of downloading")
    convert_command.add_parser(commands)
    check = commands.add_parser("verify", help="check every file of a Broden directory")
    check.add_argument("root", type=Path)
    train = commands.add_parser("train-embedded", help="train the embedded default model on the generated set")
    train.add_argument("--data", type=Path, default=Path("data/synthetic_broden"))
    train.add_argument("--out", type=Path, default=Path("data/embedded_model"))
    train.add_argument("--epochs", type=int, default=EPOCHS)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic(args: argparse.Namespace) -> int:
    """The synthetic command: 0 when built or already complete, 2 for a bad argument, 1 when --out is taken."""
    try:
        broden_like.check_arguments(args.profile, args.n_images, args.size, args.workers)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.profile == "basic":
        n_images = args.n_images or 3000
        complete = synthetic_broden.is_complete(args.out, n_images, args.size, args.seed)
        n_labels = len(synthetic_broden.LABELS)
    else:
        n_images = args.n_images or broden_like.PROFILES[args.profile].n_images
        complete = broden_like.is_complete(args.out, args.profile, n_images, args.size, args.seed)
        n_labels = len(broden_like.catalogue(args.profile).labels)
    what = f"profile {args.profile}, {n_images} images, size {args.size}, seed {args.seed}"
    if complete:
        print(f"{args.out} is already complete ({what})")
        return 0
    try:
        if args.profile == "basic":
            root = synthetic_broden.generate(args.out, n_images, args.size, args.seed, args.workers)
        else:
            root = broden_like.generate(args.out, args.profile, n_images, args.size, args.seed, args.workers)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {root}: {what}, {n_labels} labels")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit code (2 for a bad input or an unreachable download, 1 when verify
    finds problems)."""
    args = parse_args(argv)
    if args.command == "convert":
        return convert_command.main(args)
    if args.command == "synthetic":
        return synthetic(args)
    if args.command == "download":
        try:
            if args.from_zip is not None:
                root = install_zip(args.size, args.from_zip, args.out)
            else:
                root = download(args.size, args.out, tuple(args.mirror or MIRRORS))
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"ok: {root}")
        return 0
    if args.command == "train-embedded":
        metrics = train_embedded(args.data, args.out, epochs=args.epochs, lr=args.lr, seed=args.seed)
        print(f"embedded model: held-out accuracy {metrics['held_out_accuracy']:.3f} "
              f"(chance {metrics['chance_accuracy']:.3f}, {metrics['num_classes']} classes, "
              f"{metrics['seconds']:.0f} s); wrote {args.out / 'model.pt'} and {args.out / 'metrics.json'}")
        return 0
    problems = verify(args.root)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    dataset = BrodenDataset(args.root)
    print(f"ok: {len(dataset)} images, {len(dataset.labels)} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
