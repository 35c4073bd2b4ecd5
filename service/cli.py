"""``uqserve serve`` / ``python -m service``: build Settings (env + flags) and run uvicorn on create_app."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pydantic import ValidationError

from service.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags override the matching ``UQSERVE_*`` environment variables."""
    parser.add_argument("--host", help="bind address (UQSERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (UQSERVE_PORT, default 8000)")
    parser.add_argument("--base-model", help="base model name or local HF directory (UQSERVE_BASE_MODEL)")
    parser.add_argument("--bundle-root", help="bundle directory (UQSERVE_BUNDLE_ROOT, default bundles)")
    parser.add_argument("--preload", dest="preload_bundles",
                        help="comma-separated bundle names to load at startup (UQSERVE_PRELOAD_BUNDLES)")
    parser.add_argument("--engine", choices=["torch", "vllm"],
                        help="row-scoring engine (UQSERVE_ENGINE, default torch)")
    parser.add_argument("--device", help="torch device (UQSERVE_DEVICE, default cpu)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {key: getattr(args, key, None) for key in
                                 ("host", "port", "base_model", "bundle_root", "preload_bundles", "device", "engine")}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.server import run_server

    logging.basicConfig(level=args.log_level.upper(), format="[uqserve] %(message)s")
    try:
        settings = settings_from_args(args)
    except ValidationError as err:
        logging.getLogger("uqserve").error("invalid settings:\n%s", err)
        return 2
    # uvicorn stops accepting on SIGTERM/SIGINT, waits for in-flight requests, then the lifespan drains
    # the engine's queue; header/body timeouts and the connection limit: service/server.py.
    run_server(create_app(settings), settings, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
