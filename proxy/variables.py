"""`${VAR}` and `${VAR:-default}` in config values, from the environment: applied to the parsed
YAML document (never to its text, so a variable cannot inject YAML structure), before
validation, at load and at every reload. Keys are never substituted, only string values.

A value that is exactly one `${...}` is read as if its text were written there: a YAML scalar
(`limit: ${POOL_LIMIT:-100}` is the integer 100, `true` a boolean); text that YAML would read as
a mapping or a list is refused. Inside a longer string the text is inserted as it is. `$${`
writes a literal `${`. A value is substituted once: `${...}` inside a variable's value stays.
Pure: the environment is passed in. Knows nothing of the proxy's keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from proxy.checks import ConfigError

# `$${` (escape), or `${NAME}` / `${NAME:-default}` (the default may be empty, without `}`),
# or any other `${`: a mistake, refused rather than passed on as text.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")


def substitute(data: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """`data` with every `${...}` in its string values replaced; ConfigError naming the key
    path for a variable that is unset without a default, or a malformed reference."""
    if isinstance(data, dict):
        return {
            name: substitute(value, environ, f"{path}.{name}" if path else str(name))
            for name, value in data.items()
        }
    if isinstance(data, list):
        return [substitute(value, environ, f"{path}[{i}]") for i, value in enumerate(data)]
    if isinstance(data, str) and "${" in data:
        return _value(data, environ, path or "config")
    return data


def _value(text: str, environ: Mapping[str, str], path: str) -> Any:
    whole = _REFERENCE.fullmatch(text)
    if whole is not None and whole[0] != "$${":
        return _scalar(_lookup(whole, environ, path), whole[0], path)
    return _REFERENCE.sub(lambda found: _lookup(found, environ, path), text)


def _lookup(found: re.Match[str], environ: Mapping[str, str], path: str) -> str:
    if found[0] == "$${":
        return "${"
    name, default = found[1], found[2]
    if name is None:
        raise ConfigError(
            f"{path}: '${{' must start ${{NAME}} or ${{NAME:-default}} (write $${{ for a "
            f"literal '${{'), got {found.string!r}"
        )
    value = environ.get(name)
    if value is not None:
        return value
    if default is not None:
        return default
    raise ConfigError(
        f"{path}: environment variable {name} is not set (give a default: ${{{name}:-...}})"
    )


_INTEGER = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")  # "0755" stays text
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_BOOLEANS = {"true": True, "false": False}


def _scalar(text: str, reference: str, path: str) -> Any:
    """A value that is one whole ${...}: a plain decimal number (no leading zero) or
    true/false becomes that number or boolean (so `limit: ${POOL_LIMIT:-100}` is 100); anything
    else stays the string it is. YAML's own reading is not used: it would make "0755"
    octal, "12:30" a number of minutes, cut "a #b" at its comment, and read "{a: 1}" as
    structure."""
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text):
        return float(text)
    return _BOOLEANS.get(text, text)
