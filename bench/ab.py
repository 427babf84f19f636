"""A/B of CPU per request with both sides loaded at once, so the machine's drift hits both.

    python bench/ab.py --baseline REV                  # this checkout's proxy against REV's
    python bench/ab.py --a proxy --b minimal           # any two bench/run.py targets
    python bench/ab.py --baseline REV --rounds 8 --duration 4

bench/run.py measures its targets one after another. On a shared machine the speed of the
core moves by 20-40% from one minute to the next (bench/minimal.py alone measured 208-304 µs
per request in one run), which buries a 3% change. Here both targets run pinned to the same
core, each driven by its own wrk at the same time (both on the other core): whatever slows the
core slows both, and the scheduler shares it between them. Each round gives one ratio,
A's CPU µs per request over B's; the median of the rounds, with their range, is the figure.
The absolute µs are higher than run.py's (two processes share one core) and not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading

from run import PROXY_VARIANTS, Bench, bench_dir, cpu_seconds, wrk  # bench/run.py, beside
from worktree import checkout  # bench/worktree.py, beside this script

CASES = (("small", "/small", 50), ("small", "/small", 200), ("16KiB", "/large", 50),
         ("16KiB", "/large", 200))  # fmt: skip


def measure_pair(bench: Bench, a: str, b: str, path: str, clients: int, duration: float) -> float:
    """One round: A's and B's CPU µs per request under simultaneous load; returns A over B."""
    results: dict[str, tuple[float, float, float, int, int]] = {}

    def load(target: str) -> None:
        results[target] = wrk(bench.url(target, path), clients, duration)

    pids = {t: bench.targets[t][1] for t in (a, b)}
    before = {t: sum(cpu_seconds(p) for p in pids[t]) for t in (a, b)}
    threads = [threading.Thread(target=load, args=(t,)) for t in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_request = {}
    for t in (a, b):
        requests, errors = results[t][3], results[t][4]
        if errors or not requests:
            raise SystemExit(f"ab: {t} had {errors} errors in {requests} requests")
        per_request[t] = (sum(cpu_seconds(p) for p in pids[t]) - before[t]) / requests * 1e6
    return per_request[a] / per_request[b]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="B is the proxy at git revision REV")
    parser.add_argument("--a", default="proxy", help="target A (default: proxy)")
    parser.add_argument("--b", help="target B (default: baseline, with --baseline)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per round")
    args = parser.parse_args()
    b = args.b or ("baseline" if args.baseline else None)
    if b is None:
        parser.error("say what to compare with: --baseline REV or --b TARGET")
    if b == "baseline" and not args.baseline:
        parser.error("--b baseline needs --baseline REV")
    for target in (args.a, b):
        if target not in PROXY_VARIANTS and target not in ("minimal", "minimal-raw", "nginx"):
            parser.error(f"unknown target {target!r}")
    ratios: dict[tuple[str, int], list[float]] = {}
    total, done = len(CASES) * args.rounds, 0
    with bench_dir() as root, contextlib.ExitStack() as stack:
        baseline = None
        if args.baseline:
            baseline = stack.enter_context(checkout(args.baseline, root / "baseline-src"))
        bench = Bench(root, 100, baseline)
        try:
            bench.start([args.a, b])
            for target in (args.a, b):  # warm up pools and caches
                wrk(bench.url(target, "/small"), 50, 1)
            for round_ in range(args.rounds):
                for body, path, clients in CASES:
                    done += 1
                    ratio = measure_pair(bench, args.a, b, path, clients, args.duration)
                    ratios.setdefault((body, clients), []).append(ratio)
                    print(f"[{done}/{total}] round {round_ + 1}: {body:5} {clients:3} clients: "
                          f"{args.a} / {b} = {ratio:.3f}", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            bench.stop()
    print(f"\nCPU µs per request, {args.a} over {b}, both loaded at once on one core; "
          f"{args.rounds} rounds of {args.duration:.0f} s, median (range):\n")  # fmt: skip
    print("| body | clients | ratio | range |\n|---|---|---|---|")
    for (body, clients), values in ratios.items():
        print(f"| {body} | {clients} | {statistics.median(values):.3f} | "
              f"{min(values):.3f}-{max(values):.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
