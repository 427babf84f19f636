"""The README's first command, `python -m proxy.demo`, with the shipped config.yaml (its ports
moved to free ones): the proxy answers through its demo backends, reloads its config file, and
stops on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from pathlib import Path

from tests.support import REPO, ProxyProcess, free_port


def demo_config(tmp_path: Path) -> tuple[Path, int, int]:
    """config.yaml with every port replaced by a free one: (its path, proxy port, admin port)."""
    text = (REPO / "config.yaml").read_text()
    ports: dict[str, int] = {}
    for old in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", text))):
        ports[old] = free_port()
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{ports[old]}")
    proxy_port, admin_port = free_port(), free_port()
    text = re.sub(r"(?m)^(\s+port:) 8080\b", rf"\1 {proxy_port}", text, count=1)
    text = re.sub(r"(?m)^(\s+port:) 9901\b", rf"\1 {admin_port}", text, count=1)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path, proxy_port, admin_port


def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    # A state change needs X-Proxy-Reload (guard.py: no cross-site form can send it).
    headers = {"X-Proxy-Reload": "1"} if method == "POST" else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


def test_the_demo_answers_reloads_its_config_and_stops_on_ctrl_c(tmp_path):
    path, port, admin = demo_config(tmp_path)
    demo = ProxyProcess(path, admin, module="proxy.demo")
    try:
        demo.wait_ready()
        status, body = fetch(f"http://127.0.0.1:{port}/api/hello")
        assert status == 200 and json.loads(body)["target"] == "/api/hello"
        # The demo serves config.yaml as `python -m proxy` does: a reload reads it again.
        status, body = fetch(f"http://127.0.0.1:{admin}/reload", method="POST")
        assert status == 200, body
        assert fetch(f"http://127.0.0.1:{port}/api/hello")[0] == 200
        demo.signal(signal.SIGINT)
        returncode, stderr = demo.wait(timeout=30)
        assert returncode == 0, stderr
    finally:
        demo.kill()
