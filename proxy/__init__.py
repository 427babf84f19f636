"""proxy: a reverse proxy on aiohttp with one connection pool per upstream."""

__version__ = "0.1.0"
