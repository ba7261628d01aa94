"""CLI for the offline asset cache: `python -m study.assets fetch|list`.

A thin shell over trainables.assets so `make assets` and users get progress lines and a
one-line error (exit 2) instead of a traceback when the registry is unreachable.
"""

from __future__ import annotations

import argparse
import sys
import time

from trainables.assets import ASSET_NAMES, AssetError, cache_dir, fetch, size_on_disk, verify


def _print_table() -> None:
    """One line per asset: name, folder, size on disk, full-hash verification."""
    print(f"cache: {cache_dir()}")
    for name in ASSET_NAMES:
        size_mb = size_on_disk(name) / 1e6
        ok = "yes" if verify(name) else "no"
        print(f"  {name:<13} verified: {ok:<3} {size_mb:8.1f} MB  {cache_dir() / name}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, map AssetError to `error: ...` and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m study.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download, convert and verify assets (skips verified ones)")
    p_fetch.add_argument("--force", action="store_true", help="re-download and rebuild even if verified")
    p_fetch.add_argument("--only", nargs="+", choices=ASSET_NAMES, metavar="NAME", help="subset of assets")
    sub.add_parser("list", help="show the cache and whether each asset verifies")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            start = time.perf_counter()
            fetch(args.only, force=args.force, log=lambda msg: print(msg, flush=True))
            print(f"done in {time.perf_counter() - start:.1f} s")
        _print_table()
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
