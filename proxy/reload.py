"""What a reload changes: the routes and upstreams added, removed and changed between two
configs, key by key, and the settings that only a restart applies.

Pure functions over `Config`; `--check --diff` prints them, `ProxyServer.reload()` logs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from proxy.config import Config, show


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """The last reload: what the status page shows beside the config hash."""

    result: str  # "success", "failure" or "rolled_back" (proxy_config_reloads_total's label)
    time: float  # wall clock
    message: str  # what changed, or why it was refused or rolled back


# Top-level keys a running proxy cannot apply (its listeners, threads and processes exist).
RESTART_KEYS = ("listen", "admin", "access_log", "shutdown", "workers", "event_loop")


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        found = []
        for field in dataclasses.fields(old):
            child = f"{path}.{field.name}" if path else field.name
            found += _differences(getattr(old, field.name), getattr(new, field.name), child)
        return found
    if old == new:
        return []
    return [f"{path} {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name}: {_show(getattr(value, f.name))}"
                          for f in dataclasses.fields(value))  # fmt: skip
        return "{" + inner + "}"
    return show(value)


def describe_changes(old: Config, new: Config, also: Iterable[str] = ()) -> list[str]:
    """One line per change, e.g. "upstream api changed: pool.limit 100 -> 200"; `also`: lines
    for what changed beside the config (an upstream's TLS files), in the same order."""
    lines = []
    for kind, old_items, new_items in (
        ("upstream", dict(old.upstreams), dict(new.upstreams)),
        ("route", {r.name: r for r in old.routes}, {r.name: r for r in new.routes}),
    ):
        for name in new_items.keys() - old_items.keys():
            lines.append(f"{kind} {name} added")
        for name in old_items.keys() - new_items.keys():
            lines.append(f"{kind} {name} removed")
        for name in old_items.keys() & new_items.keys():
            changed = _differences(old_items[name], new_items[name], "")
            if changed:
                lines.append(f"{kind} {name} changed: " + "; ".join(changed))
    if [r.name for r in old.routes] != [r.name for r in new.routes] and not any(
        line.startswith("route ") and (" added" in line or " removed" in line) for line in lines
    ):
        lines.append("routes reordered: " + ", ".join(r.name for r in new.routes))
    for key in RESTART_KEYS:
        before, after = getattr(old, key), getattr(new, key)
        if key == "listen" and old.listen.tls is not None and new.listen.tls is not None:
            # A reload applies these to new handshakes (certificates.py); turning TLS on or
            # off is left to a restart, with the rest of `listen`.
            tls = _differences(old.listen.tls, new.listen.tls, "listen.tls")
            lines += ["listen.tls changed: " + "; ".join(tls)] if tls else []
            before = dataclasses.replace(before, tls=None)
            after = dataclasses.replace(after, tls=None)
        if key == "admin":
            # The token file and allowed_hosts guard the very next admin request (guard.py).
            listener = {"host": "", "port": 0}
            guard = _differences(dataclasses.replace(before, **listener),
                                 dataclasses.replace(after, **listener), "admin")  # fmt: skip
            lines += ["admin changed: " + "; ".join(guard)] if guard else []
            before = dataclasses.replace(before, token_file=None, allowed_hosts=())
            after = dataclasses.replace(after, token_file=None, allowed_hosts=())
        changed = _differences(before, after, key)
        if changed:
            lines.append(f"{key} changed (applied at the next restart): " + "; ".join(changed))
    # How this very reload is verified (rollback.py): applied by it, not at a restart.
    verify = _differences(old.reload, new.reload, "reload")
    lines += ["reload changed: " + "; ".join(verify)] if verify else []
    lines += also
    return sorted(lines, key=lambda line: (line.split(" ")[0], line)) or ["no changes"]
