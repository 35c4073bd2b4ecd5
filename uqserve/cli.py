"""``uqserve`` command: ``train {ensemble,laplace,uq4ct,checkpoint-ensemble,mc-dropout}``, ``eval``, ``report``,
``calibrate``, ``serve``, ``log``, ``ask``, ``keys``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so serving never imports training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_TRAIN = {
    "ensemble": ("training.ensemble_cli", "LoRA ensemble (M members; M=1 is the MAP baseline)"),
    "laplace": ("training.laplace_cli", "Laplace-LoRA: KFAC posterior over a MAP LoRA"),
    "uq4ct": ("training.uq4ct_cli", "UQ4CT: mixture of LoRA experts with a calibration loss"),
    "checkpoint-ensemble": ("training.checkpoint_ensemble_cli",
                            "checkpoint ensemble: K snapshots of one LoRA run as members (Laplace-LoRA's baseline)"),
    "mc-dropout": ("training.mc_dropout_cli",
                   "MC dropout: a LoRA trained with dropout, S fixed tied masks folded into members"),
}
_TOP = {
    "eval": ("training.eval_cli", "evaluate a bundle on a dataset split (metrics JSON + plots)"),
    "report": ("training.report_cli", "compare bundles on the same questions (one HTML page, cached scores)"),
    "calibrate": ("training.calibrate_cli", "re-choose a bundle's served abstention rule on labelled questions"),
    "serve": ("service.cli", "run the HTTP service"),
    "log": ("service.predlog.export", "the prediction log: export answers and labels, upgrade, purge"),
    "ask": ("uqserve.ask_cli", "ask a running server a question (typed client)"),
    "keys": ("service.keys_cli", "make a client API key and its server entry (hash)"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.set_defaults(_module=module)
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as err:
        parser.set_defaults(_missing=str(err))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uqserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a bundle").add_subparsers(dest="method", required=True)
    # Only import the module of the subcommand being run (argparse needs its arguments).
    wanted = argv[:2]
    for name, (module, help_text) in _TRAIN.items():
        if wanted[:1] == ["train"] and wanted[1:2] == [name]:
            _add(train, name, module, help_text)
        else:
            train.add_parser(name, help=help_text, add_help=False)
    for name, (module, help_text) in _TOP.items():
        if wanted[:1] == [name]:
            _add(sub, name, module, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    args._argv = list(argv)  # the exact command line, for subcommands that record it
    if getattr(args, "_missing", None):
        print(f"uqserve: this subcommand is unavailable ({args._missing}); install the matching extra",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
