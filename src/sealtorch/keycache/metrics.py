"""Prometheus metrics of dkeycache: local requests, decisions, denials by code, lease state.

A private registry per cache, so tests and several caches in one process do not collide. Labels
carry public codes and operation names only: lease gauges are aggregates, so the metrics page
(on the health listener, reachable by host processes) names no model, peer or key material.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _LeaseCollector(Collector):
    """Reads lease state from the manager's snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Any:
        snap = self._snapshot()
        leases = snap["leases"]
        count = GaugeMetricFamily("dkeycache_leases", "Live leases (model key versions held)")
        count.add_metric([], float(sum(1 for ls in leases if ls["state"] == "active")))
        remaining = GaugeMetricFamily(
            "dkeycache_lease_min_remaining_seconds", "Seconds left on the lease closest to expiry",
        )
        remaining.add_metric([], min((ls["remaining_seconds"] for ls in leases), default=0.0))
        releases = GaugeMetricFamily(
            "dkeycache_lease_releases", "File keys released under the current leases, summed",
        )
        releases.add_metric([], float(sum(ls["releases"] for ls in leases)))
        health = GaugeMetricFamily(
            "dkeycache_health", "1 for the current health state", labels=["state"]
        )
        for state in ("ok", "degraded", "down"):
            health.add_metric([state], 1.0 if snap["state"] == state else 0.0)
        upstream = GaugeMetricFamily("dkeycache_upstream_up", "1 if dkeyserver answered last")
        upstream.add_metric([], 1.0 if snap["upstream"] == "ok" else 0.0)
        yield from (count, remaining, releases, health, upstream)


class CacheMetrics:
    """Counters updated by the local server, plus lease gauges collected on scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dkeycache_local_requests", "Local requests by operation", ["op"],
            registry=self.registry,
        )
        self.denials = Counter(
            "dkeycache_denials", "Local requests denied, by public code", ["code"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "dkeycache_local_decisions", "Local session/file-key decisions, by outcome",
            ["op", "decision"], registry=self.registry,
        )
        self.registry.register(_LeaseCollector(snapshot))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
