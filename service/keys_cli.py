"""``uqserve keys new NAME``: make a client API key and the line the server stores (never the key itself).

The key is printed once, to give to the client; the ``NAME:sha256`` line goes into ``UQSERVE_API_KEYS``
(comma-separated) or a line of ``UQSERVE_API_KEYS_FILE``. ``uqserve keys hash NAME`` hashes a key read
from standard input instead (to rotate in a key made elsewhere).
"""

from __future__ import annotations

import argparse
import re
import sys

from service.access import hash_key, new_key

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["new", "hash"], help="new: make a key; hash: hash a key from stdin")
    parser.add_argument("name", help="the client's name (letters, digits, '_', '-', '.'): budgets and logs use it")


def run(args: argparse.Namespace) -> int:
    if not _NAME.fullmatch(args.name):
        print(f"uqserve keys: invalid name {args.name!r}", file=sys.stderr)
        return 2
    if args.action == "new":
        key = new_key()
        print(f"key (give it to the client; it is not stored): {key}")
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print("uqserve keys hash: no key on standard input", file=sys.stderr)
            return 2
    print(f"server entry (UQSERVE_API_KEYS or UQSERVE_API_KEYS_FILE): {args.name}:{hash_key(key)}")
    return 0
