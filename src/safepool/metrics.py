"""Pool metrics: OpenTelemetry's database connection-pool metrics, and a Prometheus endpoint.

OpenTelemetry (``pip install 'safepool[otel]'``)::

    from safepool.metrics import instrument

    handle = instrument(pool)  # the global MeterProvider, or meter_provider=...
    ...
    handle.close()  # stop reporting this pool

Prometheus (``pip install 'safepool[prometheus]'``)::

    from safepool.metrics import serve_prometheus

    server = serve_prometheus(9464, [pool])  # http://127.0.0.1:9464/metrics
    ...
    server.close()

``python -m safepool serve --metrics-port 9464`` does the latter for the pool it serves.

What is reported, per pool (attribute/label ``db.client.connection.pool.name``), with the
OpenTelemetry semantic conventions' names (Prometheus: dots become underscores, counters end in
``_total``, histograms in ``_seconds``):

===========================================  ==============  ===================================
``db.client.connection.count``               gauge           items by ``db.client.connection
                                                             .state``: ``idle``, ``used``
``db.client.connection.idle.max``            gauge           most idle items (``max_size``)
``db.client.connection.idle.min``            gauge           ``min_size``
``db.client.connection.max``                 gauge           ``max_size``
``db.client.connection.pending_requests``    gauge           callers waiting for an item
``db.client.connection.timeouts``            counter         acquires that gave up
``db.client.connection.create_time``         histogram (s)   the factory's run time
``db.client.connection.wait_time``           histogram (s)   time to obtain an item
``db.client.connection.use_time``            histogram (s)   time an item was leased
``safepool.connection.reclaimed``            counter         leases taken back from dead holders
``safepool.connection.leaks``                counter         leases held past ``leak_timeout``
``safepool.connection.revoked``              counter         leases an operator revoked
===========================================  ==============  ===================================

Gauges and counters are read from ``pool.stats()`` when metrics are collected, so they work for
every kind of pool: a :class:`~safepool.SafeConnectionPool`, a :class:`~safepool.PoolProxy` (one
round trip to its server per reading), and the pools a server hosts. The histograms come from the
pool's events as they happen (its observer, see :class:`safepool.pool.PoolObserver`), so they are
recorded where the pool lives: for an in-process pool, and in a server for the pools it hosts
(``serve --metrics-port``); not through a proxy.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import _hosted
from ._fastpool import TablePool
from ._hosted import HostedPool
from ._version import __version__
from .pool import SafeConnectionPool
from .stats import PoolStats

__all__ = [
    "BUCKETS",
    "Instrumentation",
    "PrometheusCollector",
    "PrometheusServer",
    "instrument",
    "serve_prometheus",
]

logger = logging.getLogger(__name__)

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
#: Histogram bucket bounds, in seconds (Prometheus; OpenTelemetry gets them as advice).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)  # fmt: skip
_HISTOGRAMS = {
    "create_time": "seconds the factory took to make an item",
    "wait_time": "seconds an acquire took to obtain an item",
    "use_time": "seconds an item was leased",
}
_GAUGES = {  # name -> (description, stats field)
    "idle.max": ("most idle items the pool keeps (its max_size)", "max_size"),
    "idle.min": ("fewest items the pool keeps (its min_size)", "min_size"),
    "max": ("most items the pool may hold (its max_size)", "max_size"),
    "pending_requests": ("callers waiting for an item", "waiting"),
}
_COUNTERS = {  # name -> (description, stats field)
    "db.client.connection.timeouts": ("acquires that gave up waiting", "timeouts"),
    "safepool.connection.reclaimed": ("leases taken back because their holder died", "reclaimed"),
    "safepool.connection.leaks": ("leases held longer than leak_timeout", "leaks"),
    "safepool.connection.revoked": ("leases an operator revoked from their holder", "revoked"),
}


def _require(module: str, extra: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"safepool.metrics needs {package} for this, which is not installed: "
            f"pip install 'safepool[{extra}]'"
        ) from exc


def _check_pool(pool: Any) -> None:
    if not callable(getattr(pool, "stats", None)):
        raise TypeError(
            f"expected a pool (a SafeConnectionPool or a PoolProxy, anything with stats()), "
            f"got {type(pool).__name__}"
        )


def _snapshot(pool: Any) -> PoolStats | None:
    """The pool's stats now; None if they cannot be read (a proxy whose server is gone)."""
    try:
        stats: PoolStats = pool.stats()
    except Exception as exc:
        logger.debug("metrics: cannot read the stats of %r: %s", pool, exc)
        return None
    return stats


# -- the pool's event observer, shared by several consumers ------------------------------------


def _observed(pool: Any) -> Any:
    """The object whose ``_observer`` hears ``pool``'s events; None for a proxy (its events
    happen in its server)."""
    if isinstance(pool, HostedPool):
        return pool._pool
    if isinstance(pool, (SafeConnectionPool, TablePool)):
        return pool
    return None


class _Fanout:
    """Several observers of one pool, as one PoolObserver."""

    __slots__ = ("observers",)

    def __init__(self, observers: tuple[Any, ...]) -> None:
        self.observers = observers

    def created(self, pool: str, seconds: float) -> None:
        for observer in self.observers:
            observer.created(pool, seconds)

    def waited(self, pool: str, seconds: float) -> None:
        for observer in self.observers:
            observer.waited(pool, seconds)

    def used(self, pool: str, seconds: float) -> None:
        for observer in self.observers:
            observer.used(pool, seconds)


# Serialises changes to pools' _observer made here. The pool reads _observer once per event,
# so swapping it is one store, and needs no lock of the pool's.
_observers_lock = threading.Lock()


def _attach(target: Any, observer: Any) -> None:
    with _observers_lock:
        current = target._observer
        if current is None:
            target._observer = observer
        elif isinstance(current, _Fanout):
            target._observer = _Fanout((*current.observers, observer))
        else:
            target._observer = _Fanout((current, observer))


def _detach(target: Any, observer: Any) -> None:
    with _observers_lock:
        current = target._observer
        if current is observer:
            target._observer = None
        elif isinstance(current, _Fanout):
            rest = tuple(o for o in current.observers if o is not observer)
            target._observer = _Fanout(rest) if len(rest) > 1 else (rest[0] if rest else None)


# -- OpenTelemetry --------------------------------------------------------------------------------


class _OtelMeter:
    """The instruments of one meter provider, shared by every pool instrumented with it (an
    instrument is created once per meter); the observable ones read the pools' stats."""

    # _lock guards _pools (weak references to the pools reported).
    def __init__(self, api: Any, provider: Any) -> None:
        self._observation = api.Observation
        self._lock = threading.Lock()
        self._pools: list[weakref.ref[Any]] = []
        meter = provider.get_meter("safepool", __version__)
        self.histograms = {
            kind: _histogram(meter, f"db.client.connection.{kind}", text)
            for kind, text in _HISTOGRAMS.items()
        }
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._count],
            unit="{connection}",
            description="items in the pool, by state (idle, used)",
        )
        for name, (text, field) in _GAUGES.items():
            meter.create_observable_up_down_counter(
                f"db.client.connection.{name}",
                callbacks=[self._reader(field)],
                unit="{request}" if name == "pending_requests" else "{connection}",
                description=text,
            )
        for name, (text, field) in _COUNTERS.items():
            meter.create_observable_counter(
                name, callbacks=[self._reader(field)], unit="{" + field + "}", description=text
            )

    def add(self, pool: Any) -> None:
        with self._lock:
            if any(ref() is pool for ref in self._pools):
                raise ValueError(
                    f"{pool!r} is instrumented with this meter provider already (close the "
                    "first Instrumentation before instrumenting it again)"
                )
            self._pools.append(weakref.ref(pool))

    def remove(self, pool: Any) -> None:
        with self._lock:
            self._pools = [ref for ref in self._pools if ref() not in (None, pool)]

    def _stats(self) -> list[PoolStats]:
        with self._lock:
            pools = [ref() for ref in self._pools]
        return [s for s in map(_snapshot, filter(None, pools)) if s is not None]

    def _count(self, options: Any) -> Iterator[Any]:
        for s in self._stats():
            yield self._observation(s.idle, {POOL_NAME: s.name, STATE: "idle"})
            yield self._observation(s.leased, {POOL_NAME: s.name, STATE: "used"})

    def _reader(self, field: str) -> Callable[[Any], Iterator[Any]]:
        def read(options: Any) -> Iterator[Any]:
            for s in self._stats():
                yield self._observation(getattr(s, field), {POOL_NAME: s.name})

        return read


def _histogram(meter: Any, name: str, text: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=text, explicit_bucket_boundaries_advisory=list(BUCKETS)
        )
    except TypeError:  # opentelemetry-api < 1.23: no bucket advice
        return meter.create_histogram(name, unit="s", description=text)


class _OtelObserver:
    """Records a pool's events into the OpenTelemetry histograms."""

    __slots__ = ("_create", "_use", "_wait")

    def __init__(self, histograms: dict[str, Any]) -> None:
        self._create = histograms["create_time"].record
        self._wait = histograms["wait_time"].record
        self._use = histograms["use_time"].record

    def created(self, pool: str, seconds: float) -> None:
        self._create(seconds, {POOL_NAME: pool})

    def waited(self, pool: str, seconds: float) -> None:
        self._wait(seconds, {POOL_NAME: pool})

    def used(self, pool: str, seconds: float) -> None:
        self._use(seconds, {POOL_NAME: pool})


_meters: dict[int, tuple[Any, _OtelMeter]] = {}  # id(provider) -> (provider, its instruments)
_meters_lock = threading.Lock()


def _meter_for(api: Any, provider: Any) -> _OtelMeter:
    with _meters_lock:
        found = _meters.get(id(provider))
        if found is None or found[0] is not provider:
            found = _meters[id(provider)] = (provider, _OtelMeter(api, provider))
        return found[1]


class Instrumentation:
    """One pool reported to one meter provider; :meth:`close` stops it (idempotent)."""

    def __init__(self, meter: _OtelMeter, pool: Any, target: Any, observer: Any) -> None:
        self._meter = meter
        self._pool = weakref.ref(pool)
        self._target = target
        self._observer = observer

    def close(self) -> None:
        pool = self._pool()
        if pool is not None:
            self._meter.remove(pool)
        if self._target is not None:
            _detach(self._target, self._observer)
            self._target = None

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def instrument(pool: Any, *, meter_provider: Any = None) -> Instrumentation:
    """Report ``pool``'s metrics through OpenTelemetry (the global meter provider, or
    ``meter_provider``). Needs ``opentelemetry-api`` (``pip install 'safepool[otel]'``).

    ``pool``: a :class:`~safepool.SafeConnectionPool` (every metric), or a
    :class:`~safepool.PoolProxy` (gauges and counters, read from the server when collected)."""
    _check_pool(pool)
    api = _require("opentelemetry.metrics", "otel", "opentelemetry-api")
    provider = meter_provider if meter_provider is not None else api.get_meter_provider()
    meter = _meter_for(api, provider)
    meter.add(pool)
    target = _observed(pool)
    observer = _OtelObserver(meter.histograms) if target is not None else None
    if target is not None:
        _attach(target, observer)
    return Instrumentation(meter, pool, target, observer)


# -- Prometheus -----------------------------------------------------------------------------------


class _Histograms:
    """A PoolObserver that keeps Prometheus histograms of the events of the pools it observes."""

    # _lock guards _data: (kind, pool name) -> [count per bucket..., count over the last, sum]
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], list[float]] = {}

    def _record(self, kind: str, pool: str, seconds: float) -> None:
        bucket = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            data = self._data.get((kind, pool))
            if data is None:
                data = self._data[(kind, pool)] = [0] * (len(BUCKETS) + 1) + [0.0]
            data[bucket] += 1
            data[-1] += seconds

    def created(self, pool: str, seconds: float) -> None:
        self._record("create_time", pool, seconds)

    def waited(self, pool: str, seconds: float) -> None:
        self._record("wait_time", pool, seconds)

    def used(self, pool: str, seconds: float) -> None:
        self._record("use_time", pool, seconds)

    def families(self, core: Any) -> Iterator[Any]:
        with self._lock:
            data = {key: list(values) for key, values in self._data.items()}
        for kind, text in _HISTOGRAMS.items():
            family = core.HistogramMetricFamily(
                f"db_client_connection_{kind}_seconds", text, labels=[_label(POOL_NAME)]
            )
            for (k, pool), values in sorted(data.items()):
                if k != kind:
                    continue
                buckets, running = [], 0.0
                for bound, count in zip((*map(str, BUCKETS), "+Inf"), values[:-1], strict=True):
                    running += count
                    buckets.append((bound, running))
                family.add_metric([pool], buckets, sum_value=values[-1])
            yield family


def _label(name: str) -> str:
    return name.replace(".", "_")


class PrometheusCollector:
    """A ``prometheus_client`` collector of pools' metrics (see the module docstring).

    ``pools``: the pools to report (SafeConnectionPools, PoolProxies), or a callable returning
    them when collected, or None for every pool hosted in this process (a server's). Histograms
    are kept for the pools whose events this process sees (not for proxies)."""

    def __init__(self, pools: Iterable[Any] | Callable[[], Iterable[Any]] | None = None) -> None:
        self._core = _require("prometheus_client.core", "prometheus", "prometheus-client")
        if pools is not None and not callable(pools):
            pools = list(pools)
            for pool in pools:
                _check_pool(pool)
        self._pools = pools
        self._histograms = _Histograms()
        # _lock guards _attached (the targets our observer is attached to, held weakly).
        self._lock = threading.Lock()
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False
        if pools is None:  # every hosted pool, from its creation on
            _hosted.on_new_pool.append(self._observe)
        self._resolve()  # observe from now on, not from the first scrape

    def _resolve(self) -> list[Any]:
        if self._pools is None:
            pools: list[Any] = list(_hosted._alive)
        elif callable(self._pools):
            pools = list(self._pools())
        else:
            pools = self._pools
        for pool in pools:
            self._observe(pool)
        return pools

    def _observe(self, pool: Any) -> None:
        target = _observed(pool)
        if target is None:
            return
        with self._lock:
            if not self._closed and target not in self._attached:
                self._attached.add(target)
                _attach(target, self._histograms)

    def describe(self) -> list[Any]:
        return []  # names are not fixed in advance (pools come and go)

    def collect(self) -> Iterator[Any]:
        core = self._core
        stats = [s for s in map(_snapshot, self._resolve()) if s is not None]
        count = core.GaugeMetricFamily(
            "db_client_connection_count",
            "items in the pool, by state (idle, used)",
            labels=[_label(POOL_NAME), _label(STATE)],
        )
        for s in stats:
            count.add_metric([s.name, "idle"], s.idle)
            count.add_metric([s.name, "used"], s.leased)
        yield count
        for name, (text, field) in _GAUGES.items():
            gauge = core.GaugeMetricFamily(
                "db_client_connection_" + name.replace(".", "_"), text, labels=[_label(POOL_NAME)]
            )
            for s in stats:
                gauge.add_metric([s.name], getattr(s, field))
            yield gauge
        for name, (text, field) in _COUNTERS.items():
            counter = core.CounterMetricFamily(_label(name), text, labels=[_label(POOL_NAME)])
            for s in stats:
                counter.add_metric([s.name], getattr(s, field))
            yield counter
        yield from self._histograms.families(core)

    def close(self) -> None:
        """Stop observing the pools' events."""
        with contextlib.suppress(ValueError):
            _hosted.on_new_pool.remove(self._observe)
        with self._lock:
            self._closed = True
            targets = list(self._attached)
            self._attached = weakref.WeakSet()
        for target in targets:
            _detach(target, self._histograms)


class PrometheusServer:
    """The HTTP endpoint :func:`serve_prometheus` started; :meth:`close` stops it."""

    def __init__(self, httpd: Any, thread: threading.Thread, collector: PrometheusCollector):
        self._httpd = httpd
        self._thread = thread
        self.collector = collector
        self.address: tuple[str, int] = httpd.server_address[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host = self.address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
        self.collector.close()


def serve_prometheus(
    port: int,
    pools: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    *,
    addr: str = "127.0.0.1",
) -> PrometheusServer:
    """Serve ``pools``' metrics at ``http://addr:port/metrics`` (port 0: a free port, see
    ``.port``) from a daemon thread. ``pools`` as for :class:`PrometheusCollector`. Loopback by
    default: metrics name your pools and their load. Needs ``prometheus-client``
    (``pip install 'safepool[prometheus]'``)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535 (0: a free port), got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr must be a host address, e.g. 127.0.0.1, got {addr!r}")
    client = _require("prometheus_client", "prometheus", "prometheus-client")
    collector = PrometheusCollector(pools)
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        started = client.start_http_server(port, addr, registry=registry)
    except BaseException:
        collector.close()
        raise
    if not isinstance(started, tuple):  # pragma: no cover - prometheus-client < 0.17
        raise ImportError("safepool.metrics needs prometheus-client>=0.17")
    httpd, thread = started
    return PrometheusServer(httpd, thread, collector)
