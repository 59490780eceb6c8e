"""Command line: ``pivotal-clean start | next | finish`` (issue 16); see ``--help``.

The steps themselves are :mod:`experiments.cleaning`'s :func:`~experiments.cleaning.start`,
:func:`~experiments.cleaning.next_round` and :func:`~experiments.cleaning.finish`; this
module parses flags, and prints a refused step as one ``error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from experiments.lock import FolderInUse

EXAMPLE = """\
Clean your own data: label a few examples the model picks, get the suspect labels.

Worked example (an image folder root/<class name>/*.png, 40 labels in all):

  pivotal-clean start --data photos/ --work clean/ --budget 40 --warmup 20 --rounds 1
      # writes clean/round-0/to_label.csv (+ to_label.png): 20 random examples.
      # Fill in the 'label' column (a class name, or its id) and save the file.
  pivotal-clean next --work clean/ --labels clean/round-0/to_label.csv
      # trains (warm-up meta re-weighting), selects the next 20 with --method rbc and
      # writes clean/round-1/to_label.csv. Label those too, then:
  pivotal-clean finish --work clean/ --labels clean/round-1/to_label.csv
      # final meta re-weighting on all 40: clean/weights.csv, clean/suspects.csv (most
      # likely mislabelled first), clean/report.md and its plots, clean/model/.

Data: an image folder (folder names are the given labels), an .npz with x, y (and
optional ids, class_names), or a CSV of numeric features with a label column
(--label-column). --val / --test: the same formats with trusted labels (model selection;
test accuracy in the report). A killed step can be rerun: it resumes to the same result.
"""


def _start_parser(sub) -> None:
    p = sub.add_parser("start", help="read the data, write round-0/to_label.csv",
                       description="Reads the data, records its hash, draws the --warmup random "
                                   "examples and writes DIR/round-0/to_label.csv.")
    p.add_argument("--data", required=True, help="image folder, .npz or .csv with the noisy "
                                                 "labels")
    p.add_argument("--work", required=True, help="the work folder DIR (new or empty)")
    p.add_argument("--budget", required=True, type=int, help="examples you label in all")
    p.add_argument("--warmup", required=True, type=int,
                   help="of those, drawn at random for the warm-up (round 0)")
    p.add_argument("--val", help="trusted validation data (chooses the best epoch)")
    p.add_argument("--test", help="trusted test data (test accuracy in the report)")
    p.add_argument("--method", default="rbc", help="selection method (default rbc)")
    p.add_argument("--model", default="auto", help="auto | mlp | lenet5 | resnet34 (auto: "
                   "LeNet-5 for grey images, ResNet-34 for colour, an MLP for features)")
    p.add_argument("--rounds", default=1, type=int, help="selection rounds after the warm-up")
    p.add_argument("--seed", default=0, type=int, help="random seed (default 0)")
    p.add_argument("--label-column", help="the label column of a CSV (default: label)")
    p.add_argument("--image-size", help="resize every image to HxW, e.g. 32x32")
    p.add_argument("--epochs", default=20, type=int, help="epochs of each training (20)")
    p.add_argument("--lr", default=0.1, type=float, help="SGD learning rate (0.1)")
    p.add_argument("--batch-size", default=256, type=int, help="batch size (256)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pivotal-clean", description=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True, metavar="{start,next,finish}")
    _start_parser(sub)
    n = sub.add_parser("next", help="read the labels, train, write the next round's file",
                       description="Reads the latest round's labels, trains with meta "
                                   "re-weighting and writes the next round's to_label.csv.")
    f = sub.add_parser("finish", help="read the last labels, train, write the outputs",
                       description="Reads the last round's labels, runs the final meta "
                                   "re-weighting, writes weights.csv, suspects.csv, report.md "
                                   "and the model.")
    for q in (n, f):
        q.add_argument("--work", required=True, help="the work folder DIR")
        q.add_argument("--labels", required=True, help="the round's to_label.csv with its "
                                                       "'label' column filled in (or id,label)")
    f.add_argument("--base", action="store_true",
                   help="also train plainly on the given labels and report its test accuracy")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> str:
    """Runs the step; returns what to tell the person next."""
    from experiments import cleaning

    if args.step == "start":
        state = cleaning.start(args.data, args.work, budget=args.budget, warmup=args.warmup,
                               val=args.val, test=args.test, method=args.method,
                               model=args.model, rounds=args.rounds, seed=args.seed,
                               label_column=args.label_column, image_size=args.image_size,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
        return _next_hint(args.work, state, 0)
    if args.step == "next":
        state = cleaning.next_round(args.work, args.labels)
        return _next_hint(args.work, state, len(state["labels"]))
    summary = cleaning.finish(args.work, args.labels, base=args.base)
    test = summary["test_accuracy"]
    return (f"done: {os.path.join(args.work, 'report.md')}, suspects.csv, weights.csv"
            + ("" if test is None else f"; test accuracy {100 * test:.2f}%"))


def _next_hint(work: str, state: dict, r: int) -> str:
    csv = os.path.join(work, f"round-{r}", "to_label.csv")
    step = "finish" if r == state["rounds"] else "next"
    return (f"label the {len(state['requested'][r])} examples of {csv} (fill in 'label'), "
            f"then: pivotal-clean {step} --work {work} --labels {csv}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        print(_run(args), flush=True)
    except (ValueError, FolderInUse) as err:  # CleaningError, UserDataError, FolderInUse
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
