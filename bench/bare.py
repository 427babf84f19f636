"""`python bench/bare.py --config FILE`: the proxy with metrics and access log switched off.

For the benchmark only: the `proxy-bare` target runs this to measure what observability costs
per request. Everything else is the real proxy, started by its real CLI.
"""

import sys

from proxy import server
from proxy.__main__ import main


def _observe_nothing(self: server.ProxyServer, exchange: object) -> None:
    pass


server.ProxyServer._observe = _observe_nothing  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    sys.exit(main())
