"""``uqserve train mc-dropout``: a MAP LoRA trained with LoRA dropout, exported as S fixed dropout masks
folded into members (:mod:`training.baselines`)."""

from __future__ import annotations

import argparse

from training.baselines_cli import add_mc_dropout_arguments, run_baseline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mc_dropout_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_baseline(args, "mc_dropout")
