"""Merging the workers' metric expositions into one, scrape after scrape: totals that never go
down, and each gauge aggregated by what it means. Pure: knows nothing of processes or sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.advice import COMBINE

# Gauges that are not summed across workers. Every counter and histogram is summed: a reload
# counts once per worker, as each worker applies (or rejects) the file on its own.
GAUGE_AGGREGATION = {
    "proxy_upstream_pool_limit": max,  # each worker's pool has this limit
    "proxy_upstream_pool_limit_per_host": max,
    "proxy_upstream_target_up": min,  # up only while every worker's checks say so
    "proxy_upstream_panic": max,
    "proxy_upstream_targets": max,  # each worker discovers on its own: the most any one has
    "proxy_build_info": max,
    "proxy_config_hash": max,
    "proxy_config_last_reload_success_timestamp_seconds": min,  # the oldest config in force
    # The earliest: a worker that failed to load a renewed certificate still serves the old one.
    "proxy_tls_certificate_expiry_timestamp_seconds": min,
}
# Gauges aggregated by the value of one label, the others as above: each worker advises its own
# pool's settings, combined per setting as GET /pools/advice combines them (advice.py).
GAUGE_AGGREGATION_BY_LABEL = {"proxy_upstream_pool_advice": ("setting", COMBINE)}
TOTALS = frozenset({"counter", "histogram", "summary"})  # families whose samples only grow

Labels = tuple[tuple[str, str], ...]  # sorted
Series = tuple[str, Labels]  # sample name, labels
Values = dict[str, dict[Series, float]]  # family name -> series -> value


class Merger:
    """The workers' expositions merged into one, scrape after scrape, with totals that never go
    down: Prometheus reads any decrease as a counter reset and counts the whole new value as
    increase, so a sum that loses one worker's share shows as a false spike in rate().

    Each worker's totals are kept as last seen. A worker that does not answer a scrape (down,
    starting, or slow) counts with them. A worker replaced by a new process (another pid) has
    them folded into `baseline`, which is added from then on. What a worker counted after the
    last scrape before it died is lost, as with one process; the sum still never goes down.
    Gauges come only from the workers that answered: a dead worker has no connections, and a
    slow one's last reading is a guess either way.
    """

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str]] = {}  # name -> (help, type), as last seen
        self.seen: dict[int, tuple[int, Values]] = {}  # worker index -> (pid, its totals)
        self.baseline: Values = {}  # the last totals of the processes replaced

    def merge(self, answers: Sequence[tuple[int, str] | None]) -> list[Metric]:
        """`answers[i]` is worker i's (pid, exposition), or None if it did not answer."""
        gauges: dict[str, dict[Series, list[float]]] = {}
        for index, answer in enumerate(answers):
            if answer is not None:
                self._take(index, *answer, gauges)
        merged = []
        for name, (documentation, kind) in self.families.items():
            if kind in TOTALS:
                values = self._totals(name)
            else:
                values = {
                    series: _aggregation(name, series[1])(found)
                    for series, found in gauges.get(name, {}).items()
                }
            if values:
                metric = Metric(name, documentation, kind)
                for (sample, labels), value in sorted(values.items(), key=_exposition_order):
                    metric.add_sample(sample, dict(labels), value)
                merged.append(metric)
        return merged

    def _take(
        self, index: int, pid: int, text: str, gauges: dict[str, dict[Series, list[float]]]
    ) -> None:
        totals: Values = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = (family.documentation, family.type)
            for sample in family.samples:
                series = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type in TOTALS:
                    totals.setdefault(family.name, {})[series] = sample.value
                else:
                    gauges.setdefault(family.name, {}).setdefault(series, []).append(sample.value)
        last_pid, last = self.seen.get(index, (pid, {}))
        for name, values in last.items():
            now = totals.setdefault(name, {})
            for series, value in values.items():
                # A new process starts from 0. So does a series in the same process that went
                # down: an upstream replaced by a reload has a new pool, counting from 0.
                if pid != last_pid or now.get(series, value) < value:
                    base = self.baseline.setdefault(name, {})
                    base[series] = base.get(series, 0.0) + value
                elif series not in now:
                    now[series] = value  # gone (its upstream removed): it stays where it was
        self.seen[index] = (pid, totals)

    def _totals(self, name: str) -> dict[Series, float]:
        values = dict(self.baseline.get(name, {}))
        for _, totals in self.seen.values():
            for series, value in totals.get(name, {}).items():
                values[series] = values.get(series, 0.0) + value
        return values


def _aggregation(name: str, labels: Labels) -> Callable[[list[float]], float]:
    """How the workers' samples of one gauge series become one."""
    by_label = GAUGE_AGGREGATION_BY_LABEL.get(name)
    if by_label is not None:
        label, hows = by_label
        how = hows.get(dict(labels).get(label, ""))
        if how is not None:
            return how
    return GAUGE_AGGREGATION.get(name, sum)


def _exposition_order(item: tuple[Series, float]) -> tuple[Labels, str, float]:
    """Each label set's samples together, histogram buckets by bound (exposition formats want
    them so), then _count and _sum."""
    (sample, labels), _ = item
    le = dict(labels).get("le")
    return tuple(pair for pair in labels if pair[0] != "le"), sample, float(le or 0)


class Merged(Collector):
    """A registry's view of metrics merged already."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics
