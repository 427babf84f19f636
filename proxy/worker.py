"""`python -m proxy.worker --config FILE --admin-socket NAME`: one worker process, started by the
supervisor in workers.py (not a command for users). It serves the client port shared with the
other workers (SO_REUSEPORT) and its admin app on Unix socket NAME, for the supervisor only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy.config import ConfigError, load_config
from proxy.loops import run
from proxy.server import StartupError, serve

# The secret the supervisor asks this worker's admin app with: in the environment, which only
# the same user can read (/proc/PID/environ), never on the command line, which `ps` shows.
TOKEN_VARIABLE = "PROXY_WORKER_ADMIN_TOKEN"


def unix_path(name: str) -> str:
    """ "@name" is Linux's abstract socket "\\0name" (as `ss` shows it): a command line cannot
    carry a NUL byte. An abstract socket has no file, so nothing is written to disk."""
    return "\0" + name[1:] if name.startswith("@") else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--admin-socket", required=True, help="a path, or @name (abstract)")
    # After a rollback the file still holds the rolled-back config: a worker started again
    # starts from the supervisor's copy of the restored one; its reloads read --config.
    parser.add_argument("--start-from", help="the config file to start with instead")
    args = parser.parse_args(argv)
    token = os.environ.pop(TOKEN_VARIABLE, None)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s worker {os.getpid()}: %(message)s",
    )
    try:
        config = load_config(args.start_from or args.config)
        run(
            config.event_loop,  # the file's as this worker starts: a restart applies a change
            lambda: serve(
                config,
                args.config,
                admin_socket=unix_path(args.admin_socket),
                admin_token=token,
                reuse_port=True,
                started_from=args.start_from,
            ),
        )
    except (ConfigError, StartupError) as exc:
        print(f"proxy worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
