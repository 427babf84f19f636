"""The command line: `python -m proxy [rules] --config FILE [--check]`.

The only module that prints for the user or exits; it knows nothing of aiohttp.
"""

from __future__ import annotations

import argparse
import logging
import sys

from proxy import __version__
from proxy.config import ConfigError, load_config, read_config
from proxy.guard import load_policy
from proxy.loops import loop_factory, run
from proxy.reload import describe_changes
from proxy.rollback import describe_watch
from proxy.tls import check_files

EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_ERROR = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="proxy", description="A reverse proxy with one connection pool per upstream."
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "rules"],
        default="serve",
        help="serve (the default), or rules: print Prometheus SLO rules for the routes' slo keys",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")
    parser.add_argument(
        "--check", action="store_true", help="validate FILE, print one line, and exit (0 or 2)"
    )
    parser.add_argument(
        "--diff",
        metavar="RUNNING",
        help="with --check: also print what a reload from config file RUNNING to FILE changes",
    )
    parser.add_argument("--version", action="version", version=f"proxy {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "rules":
        from proxy.slo import print_rules

        return print_rules(args.config)
    if args.diff and not args.check:
        print("proxy: --diff goes with --check", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        config, source = read_config(args.config)
        check_files(config, strict=args.check)  # serving, an expired certificate is a warning
        load_policy(config.admin)  # admin.token_file: readable and not empty
        loop_factory(config.event_loop)  # event_loop: uvloop is installed
        running = load_config(args.diff) if args.diff else None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.check:
        print(f"config OK: {len(config.upstreams)} upstreams, {len(config.routes)} routes")
        if running is not None:
            print("\n".join(describe_changes(running, config)))
            # What a reload with FILE's reload.verify would watch, and roll back if it fails.
            watch = describe_watch(running, config, config.reload.verify)
            if watch is not None:
                print(watch)
        return 0

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    from proxy.server import StartupError, serve  # aiohttp is imported only to serve
    from proxy.workers import supervise

    try:
        if config.workers != 1:
            return supervise(config, args.config, source)
        run(config.event_loop, lambda: serve(config, args.config))
    except StartupError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return EXIT_STARTUP_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
