"""Profile the proxy under load with py-spy; print its top frames as Markdown.

    python bench/profile.py                            # the proxy, 10 s, 50 clients, GET /small
    python bench/profile.py --target minimal --output minimal.md
    python bench/profile.py --config my.yaml --url http://127.0.0.1:8080/some/path

Starts the target as bench/run.py does (same generated config, nginx backend, pinned to one core,
wrk on the other), drives it with wrk, samples it with `py-spy record --format raw --function`
and prints the 15 frames with the most self time (the function was running) and the most total
time (the function was on the stack), as a percentage of the event-loop thread's busy samples
(py-spy leaves out idle ones: the loop waiting in epoll). Frames that are in (nearly) every busy
sample, the event loop's own scaffolding, are named once instead of filling the total-time
table. Other threads (the access log's) are summarised by the CPU time /proc gives them, because
py-spy counts a thread blocked on a queue or a sleep as busy; --all-threads puts their samples in
the tables too. With --config, runs `python -m proxy --config FILE` pinned the same way
and drives --url instead. Needs py-spy (pip install py-spy), wrk and nginx, and ptrace rights
(root, or kernel.yama.ptrace_scope 0). Stops everything it started, by PID, when done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from run import (  # bench/run.py, beside this script
    CLK_TCK,
    LOAD_CORE,
    MINIMAL_VARIANTS,
    PROXY_CORE,
    PROXY_VARIANTS,
    REPO,
    Bench,
    bench_dir,
    cpu_seconds,
    wrk,
)

TARGETS = [*(v for v in PROXY_VARIANTS if v not in ("baseline", "proxy-2w")), *MINIMAL_VARIANTS]
PATHS = {"small": "/small", "16KiB": "/large", "1GiB": "/huge"}  # 1GiB: with --clients 1
TOP = 15
SCAFFOLDING = 0.995  # frames in at least this share of busy samples


def wait_port(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    """Wait until the host and port of `url` accept connections (any answer will do)."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:].strip()
            raise SystemExit(f"profile: the proxy exited with code {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"profile: nothing listens on {address[0]}:{address[1]} after {timeout} s")


def parse_frame(frame: str) -> tuple[str, str]:
    """'handle (proxy/forward.py:120)' -> ('handle', 'proxy/forward.py:120')."""
    name, _, where = frame.rpartition(" (")
    if not name or not where.endswith(")"):
        return frame, ""
    return name, where[:-1]


def read_samples(raw: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) format with --threads: 'thread (TID): NAME;outer;...;inner COUNT'
    per line; the thread is the first frame."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, by TID."""
    cpu = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            cpu[int(tid)] = cpu_seconds_of(Path(f"/proc/{pid}/task/{tid}/stat"))
    return cpu


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_line(stacks: Counter[tuple[str, ...]], cpu: dict[int, float]) -> str:
    """'MainThread (TID 12): 4.1 CPU s, 990 samples; ...', busiest first."""
    samples: Counter[str] = Counter()
    for stack, count in stacks.items():
        samples[stack[0]] += count
    names: dict[int, str] = {}
    for thread in samples:  # "thread (TID): NAME"
        number, _, name = thread.removeprefix("thread (").partition("): ")
        if number.isdigit():
            names[int(number)] = name
    parts = []
    for tid, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        name = names.get(tid, "?")
        count = samples.get(f"thread ({tid}): {name}", 0)
        parts.append(f"{name} (TID {tid}): {seconds:.2f} CPU s, {count:,} py-spy samples")
    return "Threads while sampled: " + "; ".join(parts) + "."


# Where a sample's time goes, by the first rule one of its frames meets (function names as
# py-spy gives them; a subclass's "GuardedResponseHandler.data_received" meets a suffix rule).
PHASES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("socket writes (send), to the client and upstream", lambda f: f.endswith("Transport.write")),
    ("aiohttp after the handler (finish_response)", lambda f: f.endswith(".finish_response")),
    ("the request handler, its sends left out (routing, the upstream exchange, the response)",
     lambda f: f == "RequestHandler._handle_request"),
    ("aiohttp's connection loop between handlers (RequestHandler.start)",
     lambda f: f.endswith("Handler.start")),
    ("upstream bytes in: response parser (ResponseHandler.data_received)",
     lambda f: f.endswith("ResponseHandler.data_received")),
    ("client bytes in: request parser (RequestHandler.data_received)",
     lambda f: f.endswith("Handler.data_received")),
    ("socket reads and the transport around them (recv)", lambda f: "._read_ready" in f),
)  # fmt: skip
LOOP_PHASE = "the event loop itself (select, callbacks, timers)"


def phases(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    """Samples per phase (PHASES, else the event loop's own)."""
    counts: Counter[str] = Counter()
    for stack, count in stacks.items():
        names = [parse_frame(frame)[0] for frame in stack]
        counts[next((phase for phase, meets in PHASES if any(map(meets, names))), LOOP_PHASE)] += (
            count
        )
    return counts


def report(stacks: Counter[tuple[str, ...]], heading: str, facts: list[str]) -> str:
    samples = sum(stacks.values())
    if not samples:
        return f"{heading}\n\npy-spy recorded no busy samples: was the process under load?\n"
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[stack[-1]] += count
        for frame in set(stack):  # a recursive function counts once per sample
            total[frame] += count
    scaffolding = [f for f, n in total.most_common() if n >= SCAFFOLDING * samples]

    def rows(ranked: list[tuple[str, int]], first: Counter[str], second: Counter[str]) -> str:
        lines = []
        for rank, (frame, _) in enumerate(ranked, 1):
            name, where = parse_frame(frame)
            lines.append(
                f"| {rank} | `{name}` | {where} | {100 * first[frame] / samples:.1f} "
                f"| {100 * second[frame] / samples:.1f} |"
            )
        return "\n".join(lines)

    by_total = [(f, n) for f, n in total.most_common() if f not in scaffolding][:TOP]
    by_phase = phases(stacks)
    parts = [
        heading,
        "",
        *facts,
        f"{samples:,} busy samples (idle ones left out); percentages are of those.",
        "",
        "### Where the time goes",
        "",
        "| phase | % |",
        "|---|---|",
        *(
            f"| {phase} | {100 * by_phase[phase] / samples:.1f} |"
            for phase in [*(p for p, _ in PHASES), LOOP_PHASE]
        ),
        "",
        f"### Top {TOP} by self time",
        "",
        "| # | function | file:line | self % | total % |",
        "|---|---|---|---|---|",
        rows(own.most_common(TOP), own, total),
        "",
        f"### Top {TOP} by total (inclusive) time",
        "",
        "| # | function | file:line | total % | self % |",
        "|---|---|---|---|---|",
        rows(by_total, total, own),
    ]
    if scaffolding:
        names = ", ".join(f"`{parse_frame(f)[0]}` ({parse_frame(f)[1]})" for f in scaffolding)
        parts += ["", f"Left out of the total table, on the stack in every busy sample: {names}."]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of sampling")
    parser.add_argument("--clients", type=int, default=50, help="wrk connections")
    parser.add_argument("--target", choices=TARGETS, default="proxy", help="as in bench/run.py")
    parser.add_argument("--body", choices=list(PATHS), default="small", help="response body")
    parser.add_argument("--pool-limit", type=int, default=100, help="pool.limit, as run.py's")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--lines", action="store_true", help="one frame per line of code, not per function"
    )
    parser.add_argument(
        "--all-threads", action="store_true", help="tables over every thread, not the loop's"
    )
    parser.add_argument("--config", type=Path, help="profile `python -m proxy --config FILE`")
    parser.add_argument("--url", help="with --config: the URL that wrk requests")
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw samples here")
    args = parser.parse_args()
    if bool(args.config) != bool(args.url):
        parser.error("--config and --url go together")
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    for tool in ("wrk", "taskset", *(() if args.config else ("nginx",))):
        if shutil.which(tool) is None:
            print(f"profile: {tool} is not installed", file=sys.stderr)
            return 2

    with bench_dir() as root:
        bench: Bench | None = None
        proc: subprocess.Popen[bytes] | None = None
        spy: subprocess.Popen[bytes] | None = None
        try:
            if args.config:
                log = root / "proxy.stderr"
                with open(log, "wb") as stderr:
                    proc = subprocess.Popen(
                        [
                            *("taskset", "-c", PROXY_CORE, sys.executable, "-m", "proxy"),
                            *("--config", str(args.config.resolve())),
                        ],
                        cwd=REPO,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                        env={**os.environ, "PYTHONPATH": str(REPO)},
                    )
                url, pid, what = args.url, proc.pid, f"proxy with {args.config}"
                wait_port(url, proc, log)
            else:
                bench = Bench(root, args.pool_limit, None)
                bench.start([args.target])
                url = bench.url(args.target, PATHS[args.body])
                pid, what = bench.targets[args.target][1][0], args.target
            print(f"profile: warming up {what} at {url}", file=sys.stderr, flush=True)
            wrk(url, args.clients, 1)
            raw = root / "py-spy.txt"
            print(
                f"profile: {args.seconds:.0f} s of wrk ({args.clients} clients) and py-spy "
                f"({args.rate} Hz) on PID {pid}",
                file=sys.stderr,
                flush=True,
            )
            spy = subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(pid), "--format", "raw", "--threads"),
                    *([] if args.lines else ["--function"]),
                    *("--rate", str(args.rate), "--duration", str(max(1, round(args.seconds)))),
                    *("--output", str(raw), *(["--native"] if args.native else [])),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            cpu_before, threads_before = cpu_seconds(pid), thread_cpu(pid)
            # wrk runs a little longer than py-spy samples, so every sample is under load.
            rps, p50, p99, requests, errors = wrk(url, args.clients, args.seconds + 1)
            cpu = cpu_seconds(pid) - cpu_before
            threads = {
                tid: seconds - threads_before.get(tid, 0.0)
                for tid, seconds in thread_cpu(pid).items()
            }
            _, spy_err = spy.communicate(timeout=60)
            if spy.returncode != 0 or not raw.exists():
                print(
                    f"profile: py-spy failed:\n{spy_err.decode(errors='replace')}", file=sys.stderr
                )
                return 1
            stacks = read_samples(raw)
            if args.raw:
                shutil.copyfile(raw, args.raw)
            loop_thread = f"thread ({pid}): MainThread"  # the event loop runs in the main thread
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
                spy.wait()
            if bench is not None:
                bench.stop()
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    command = "python bench/profile.py " + " ".join(sys.argv[1:])
    shown: Counter[tuple[str, ...]] = Counter()
    for stack, count in stacks.items():
        if args.all_threads or stack[0] == loop_thread:
            shown[stack[1:]] += count
    text = report(
        shown,
        f"## py-spy profile: {what}, GET {urlsplit(url).path}, {args.clients} clients, "
        f"{args.seconds:.0f} s",
        [
            f"`{command.strip()}`: proxy on core {PROXY_CORE}, wrk on core {LOAD_CORE}.",
            f"While sampled: {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, {errors} "
            f"errors, {cpu / requests * 1e6 if requests else float('nan'):.0f} CPU µs/request "
            f"(py-spy pauses the process {args.rate} times a second: slower than unprofiled).",
            threads_line(stacks, threads),
            "Tables: every thread's samples."
            if args.all_threads
            else "Tables: the event-loop thread's samples (MainThread).",
        ],
    )
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
