"""safepool.metrics, read back for real: through the OpenTelemetry SDK's InMemoryMetricReader,
and by scraping the Prometheus endpoint over HTTP and parsing it with prometheus_client."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

import ops_targets
import remote_targets
import safepool
from helpers import FORK_WARNING, LONG, SHORT, FakeClock, ThreadResult, run_cli, wait_until
from safepool import PoolManager, PoolTimeout, SafeConnectionPool
from safepool.metrics import instrument, serve_prometheus

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


def slow_item() -> object:
    time.sleep(0.002)  # a factory that takes a measurable time (create_time), not a sync
    return object()


def otel_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points, from one collection."""
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def value(points: dict[str, list[Any]], name: str, pool: str, **attrs: str) -> Any:
    wanted = {POOL: pool, **{k.replace("_", "."): v for k, v in attrs.items()}}
    found = [p for p in points.get(name, []) if dict(p.attributes) == wanted]
    assert len(found) == 1, (name, wanted, points.get(name))
    point = found[0]
    return (point.count, point.sum) if hasattr(point, "bucket_counts") else point.value


def provider() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


def test_otel_metrics_of_an_in_process_pool() -> None:
    meters, reader = provider()
    clock = FakeClock()
    name = f"db-{os.getpid()}-{secrets.token_hex(3)}"
    pool = SafeConnectionPool(factory=slow_item, max_size=2, min_size=1, name=name,
                              leak_timeout=10, background=False, clock=clock)  # fmt: skip
    with instrument(pool, meter_provider=meters):
        a, b = pool.acquire(), pool.acquire()  # one idle (min_size), one made
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0)
        waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
        wait_until(lambda: pool.stats().waiting == 1)
        points = otel_points(reader)
        assert (
            value(points, "db.client.connection.count", name, db_client_connection_state="used")
            == 2
        )
        assert (
            value(points, "db.client.connection.count", name, db_client_connection_state="idle")
            == 0
        )
        assert value(points, "db.client.connection.pending_requests", name) == 1
        assert value(points, "db.client.connection.max", name) == 2
        assert value(points, "db.client.connection.idle.max", name) == 2
        assert value(points, "db.client.connection.idle.min", name) == 1
        assert value(points, "db.client.connection.timeouts", name) == 1
        count, total = value(points, "db.client.connection.create_time", name)
        assert count == 1 and total >= 0.002  # b (the min_size item was made before)
        assert value(points, "db.client.connection.wait_time", name)[0] == 2
        clock.advance(11)
        pool.maintain()  # both leases are past leak_timeout now
        clock.advance(1)
        pool.release(a)  # to the waiter
        c = waiter.join()
        pool.release(b)
        pool.release(c)
        points = otel_points(reader)
        assert value(points, "safepool.connection.leaks", name) == 2
        assert value(points, "safepool.connection.reclaimed", name) == 0
        assert value(points, "safepool.connection.revoked", name) == 0
        assert (
            value(points, "db.client.connection.count", name, db_client_connection_state="idle")
            == 2
        )
        assert value(points, "db.client.connection.pending_requests", name) == 0
        uses, used_for = value(points, "db.client.connection.use_time", name)
        assert uses == 3 and used_for >= 24  # a and b: 12 fake seconds each; c: none
        assert value(points, "db.client.connection.wait_time", name)[0] == 3
    # Closed: the pool is no longer reported, and its observer is gone.
    assert pool._observer is None
    assert name not in str(otel_points(reader).get("db.client.connection.max", []))


def test_instrumenting_twice_is_refused_and_two_providers_both_report() -> None:
    (first, r1), (second, r2) = provider(), provider()
    pool = SafeConnectionPool(factory=object, max_size=3, name="twice")
    with instrument(pool, meter_provider=first), instrument(pool, meter_provider=second):
        with pytest.raises(ValueError, match="instrumented with this meter provider already"):
            instrument(pool, meter_provider=first)
        with pool.lease():
            pass
        for reader in (r1, r2):
            points = otel_points(reader)
            assert value(points, "db.client.connection.wait_time", "twice")[0] == 1
            assert value(points, "db.client.connection.max", "twice") == 3
        assert len(pool._observer.observers) == 2  # type: ignore[union-attr]
    assert pool._observer is None
    with pytest.raises(TypeError, match="expected a pool"):
        instrument(object(), meter_provider=first)


def test_otel_metrics_of_a_hosted_pool_through_its_proxy(tmp_path: Path) -> None:
    meters, reader = provider()
    with PoolManager() as manager:
        pool = manager.SafeConnectionPool(factory=ops_targets.LoggedItems(str(tmp_path / "l")),
                                          max_size=2, name="hosted")  # fmt: skip
        with instrument(pool, meter_provider=meters):
            item = pool.acquire()
            (lease,) = pool.leases()
            points = otel_points(reader)
            assert (
                value(
                    points,
                    "db.client.connection.count",
                    "hosted",
                    db_client_connection_state="used",
                )
                == 1
            )
            pool.revoke(lease.lease_id, action="reset")
            with pytest.raises(safepool.LeaseRevoked):
                item.call(ops_targets.use)
            points = otel_points(reader)
            assert value(points, "safepool.connection.revoked", "hosted") == 1
            assert (
                value(
                    points,
                    "db.client.connection.count",
                    "hosted",
                    db_client_connection_state="idle",
                )
                == 1
            )
            assert "db.client.connection.wait_time" not in points  # events happen in the server


def test_prometheus_endpoint_scraped_over_http() -> None:
    pool = SafeConnectionPool(factory=slow_item, max_size=2, name="scraped")
    server = serve_prometheus(0, [pool])
    try:
        assert server.url.startswith("http://127.0.0.1:")
        held = pool.acquire()
        with pool.lease():
            pass
        second = pool.acquire()
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0)
        pool.release(second)
        families = scrape(server.url)
        assert sample(families, "db_client_connection_count", state="used") == 1
        assert sample(families, "db_client_connection_count", state="idle") == 1
        assert sample(families, "db_client_connection_max") == 2
        assert sample(families, "db_client_connection_timeouts_total") == 1
        assert sample(families, "safepool_connection_revoked_total") == 0
        assert sample(families, "db_client_connection_create_time_seconds_count") == 2
        assert sample(families, "db_client_connection_wait_time_seconds_count") == 3
        assert sample(families, "db_client_connection_use_time_seconds_count") == 2
        assert sample(families, "db_client_connection_use_time_seconds_bucket", le="+Inf") == 2
        create_sum = sample(families, "db_client_connection_create_time_seconds_sum")
        assert create_sum >= 2 * 0.002
        pool.release(held)
    finally:
        server.close()
    assert pool._observer is None


def scrape(url: str) -> list[Any]:
    with urllib.request.urlopen(url, timeout=SHORT) as response:
        return list(text_string_to_metric_families(response.read().decode()))


def sample(families: list[Any], name: str, pool: str = "scraped", **labels: str) -> float:
    wanted = {"db_client_connection_pool_name": pool}
    wanted.update({("db_client_connection_state" if k == "state" else k): v
                   for k, v in labels.items()})  # fmt: skip
    found = [
        s.value
        for family in families
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
    ]
    assert len(found) == 1, (name, wanted, found)
    return float(found[0])


def test_serve_with_metrics_port_scraped_over_http(tmp_path: Path) -> None:
    authkey = secrets.token_hex(32)
    with remote_targets.served(
        "--factory", "remote_targets:closing_tokens", "--typeid", "tokens", "--max-size", "3",
        "--metrics-port", "0", env={"SAFEPOOL_AUTHKEY": authkey},
    ) as (address, proc):  # fmt: skip
        line = remote_targets.read_line(proc, LONG)
        assert line.startswith("safepool: metrics at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()
        pool = safepool.connect_pool(address, "tokens", authkey=authkey.encode())
        held = pool.acquire()
        for _ in range(3):
            pool.call(ops_targets.use)
        families = scrape(url)
        assert sample(families, "db_client_connection_count", "tokens", state="used") == 1
        assert sample(families, "db_client_connection_max", "tokens") == 3
        assert sample(families, "db_client_connection_wait_time_seconds_count", "tokens") == 4
        assert sample(families, "db_client_connection_use_time_seconds_count", "tokens") == 3
        pool.release(held)
        families = scrape(url)
        assert sample(families, "db_client_connection_count", "tokens", state="idle") == 2
        assert sample(families, "db_client_connection_count", "tokens", state="used") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--metrics-port", "70000"), "0-65535"),
        (("--metrics-port", "x"), "0-65535"),
    ],
)
def test_serve_refuses_a_bad_metrics_port(args: tuple[str, ...], message: str) -> None:
    done = run_cli("serve", "--factory", "remote_targets:closing_tokens", *args,
                   env={**os.environ, "PYTHONPATH": str(remote_targets.TESTS)})  # fmt: skip
    assert done.returncode == 2 and message in done.stderr


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = SafeConnectionPool(factory=object, name="bare")
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'safepool\[otel\]'"):
        instrument(pool)
    with pytest.raises(ImportError, match=r"pip install 'safepool\[prometheus\]'"):
        serve_prometheus(0, [pool])
    assert pool._observer is None


def test_serve_prometheus_refuses_bad_arguments() -> None:
    for port in (-1, 65536, True, "9464"):
        with pytest.raises(ValueError, match="port"):
            serve_prometheus(port, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="addr"):
        serve_prometheus(0, [], addr="")
    with pytest.raises(TypeError, match="expected a pool"):
        serve_prometheus(0, [object()])


def test_serve_refuses_a_metrics_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--factory", "remote_targets:closing_tokens",
                       "--metrics-port", str(port),
                       env={**os.environ, "PYTHONPATH": str(remote_targets.TESTS)})  # fmt: skip
    assert done.returncode == 2 and "safepool serve:" in done.stderr
    assert "in use" in done.stderr and "serving" not in done.stdout
