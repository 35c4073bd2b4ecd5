"""``uqserve train checkpoint-ensemble``: K snapshots of one LoRA run as an ensemble bundle
(:mod:`training.baselines`)."""

from __future__ import annotations

import argparse

from training.baselines_cli import add_checkpoint_arguments, run_baseline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_baseline(args, "checkpoint")
