"""A tiny Prometheus registry (text exposition format 0.0.4), no third-party dependency.

Series:
    hsmkeys_requests_total{operation,outcome}          counter
    hsmkeys_request_duration_seconds{operation,le}     histogram (_bucket/_sum/_count)
    hsmkeys_hsm_errors_total{kind}                     counter
    process_cpu_seconds_total                          counter (process_series: this worker's CPU)

The registry is per process: with several server workers each renders its own
counts, so scrape every worker (or aggregate) to see the whole service.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Final

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "Metrics", "escape_label_value", "process_series"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds, inclusive) of the latency histogram; +Inf is implicit.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

_REQUESTS: Final = "hsmkeys_requests_total"
_DURATION: Final = "hsmkeys_request_duration_seconds"
_HSM_ERRORS: Final = "hsmkeys_hsm_errors_total"


def escape_label_value(value: str) -> str:
    """Escape a label value per the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    # Go-style float text as Prometheus prints it: 1.0, 0.0005, +Inf.
    return "+Inf" if value == float("inf") else repr(float(value))


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative; last = +Inf
        self.count = 0
        self.total = 0.0


class Metrics:
    """Thread-safe counters and a latency histogram; every method is O(1) except ``render``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._hsm_errors: dict[str, int] = {}

    def observe_request(self, operation: str, outcome: str, seconds: float) -> None:
        """Count one request and its latency; ``outcome`` is "Success" or the KMS error name."""
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)  # first bound >= seconds
        key = (operation, outcome)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            histogram = self._durations.get(operation)
            if histogram is None:
                histogram = self._durations[operation] = _Histogram()
            histogram.buckets[index] += 1
            histogram.count += 1
            histogram.total += seconds

    def hsm_error(self, kind: str) -> None:
        """Count one HSM fault of ``kind`` (e.g. the PKCS#11 exception name)."""
        with self._lock:
            self._hsm_errors[kind] = self._hsm_errors.get(kind, 0) + 1

    def render(self) -> str:
        """The whole registry as text exposition format 0.0.4, series sorted by labels."""
        with self._lock:
            requests = sorted(self._requests.items())
            durations = sorted(
                (op, list(h.buckets), h.count, h.total) for op, h in self._durations.items()
            )
            hsm_errors = sorted(self._hsm_errors.items())
        out = [
            f"# HELP {_REQUESTS} Requests handled, by operation and outcome.",
            f"# TYPE {_REQUESTS} counter",
        ]
        for (operation, outcome), value in requests:
            out.append(
                f'{_REQUESTS}{{operation="{escape_label_value(operation)}",'
                f'outcome="{escape_label_value(outcome)}"}} {value}'
            )
        out += [
            f"# HELP {_DURATION} Request latency in seconds, by operation.",
            f"# TYPE {_DURATION} histogram",
        ]
        bounds = [*DURATION_BUCKETS, float("inf")]
        for operation, buckets, count, total in durations:
            label = f'operation="{escape_label_value(operation)}"'
            cumulative = 0
            for bound, in_bucket in zip(bounds, buckets, strict=True):
                cumulative += in_bucket
                out.append(f'{_DURATION}_bucket{{{label},le="{_number(bound)}"}} {cumulative}')
            out.append(f"{_DURATION}_sum{{{label}}} {_number(total)}")
            out.append(f"{_DURATION}_count{{{label}}} {count}")
        out += [
            f"# HELP {_HSM_ERRORS} HSM faults, by kind.",
            f"# TYPE {_HSM_ERRORS} counter",
        ]
        for kind, value in hsm_errors:
            out.append(f'{_HSM_ERRORS}{{kind="{escape_label_value(kind)}"}} {value}')
        return "\n".join(out) + "\n"


def process_series() -> str:
    """This process's CPU time (user + system, all threads), Prometheus' standard series;
    with hsmkeys_requests_total it gives the CPU a worker spends per request."""
    return (
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {_number(time.process_time())}\n"
    )
