"""The Prometheus registry: exact exposition text, escaping, bucket edges, threads."""

from __future__ import annotations

import re
import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from hsmkeys.server.metrics import (
    CONTENT_TYPE,
    DURATION_BUCKETS,
    Metrics,
    escape_label_value,
    process_series,
)

EMPTY = """\
# HELP hsmkeys_requests_total Requests handled, by operation and outcome.
# TYPE hsmkeys_requests_total counter
# HELP hsmkeys_request_duration_seconds Request latency in seconds, by operation.
# TYPE hsmkeys_request_duration_seconds histogram
# HELP hsmkeys_hsm_errors_total HSM faults, by kind.
# TYPE hsmkeys_hsm_errors_total counter
"""


def test_empty_registry_renders_only_help_and_type() -> None:
    assert Metrics().render() == EMPTY


def test_small_example_renders_exactly() -> None:
    metrics = Metrics()
    metrics.observe_request("Encrypt", "Success", 0.0004)
    metrics.observe_request("Encrypt", "Success", 0.003)
    metrics.observe_request("Encrypt", "Success", 7.0)
    metrics.observe_request("Decrypt", "InvalidCiphertextException", 0.001)
    metrics.hsm_error("DeviceError")
    metrics.hsm_error("DeviceError")
    assert (
        metrics.render()
        == """\
# HELP hsmkeys_requests_total Requests handled, by operation and outcome.
# TYPE hsmkeys_requests_total counter
hsmkeys_requests_total{operation="Decrypt",outcome="InvalidCiphertextException"} 1
hsmkeys_requests_total{operation="Encrypt",outcome="Success"} 3
# HELP hsmkeys_request_duration_seconds Request latency in seconds, by operation.
# TYPE hsmkeys_request_duration_seconds histogram
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.0005"} 0
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.001"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.0025"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.005"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.01"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.025"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.05"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.1"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.25"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="0.5"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="1.0"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="2.5"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="5.0"} 1
hsmkeys_request_duration_seconds_bucket{operation="Decrypt",le="+Inf"} 1
hsmkeys_request_duration_seconds_sum{operation="Decrypt"} 0.001
hsmkeys_request_duration_seconds_count{operation="Decrypt"} 1
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.0005"} 1
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.001"} 1
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.0025"} 1
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.005"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.01"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.025"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.05"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.1"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.25"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="0.5"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="1.0"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="2.5"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="5.0"} 2
hsmkeys_request_duration_seconds_bucket{operation="Encrypt",le="+Inf"} 3
hsmkeys_request_duration_seconds_sum{operation="Encrypt"} 7.0034
hsmkeys_request_duration_seconds_count{operation="Encrypt"} 3
# HELP hsmkeys_hsm_errors_total HSM faults, by kind.
# TYPE hsmkeys_hsm_errors_total counter
hsmkeys_hsm_errors_total{kind="DeviceError"} 2
"""
    )


def _bucket_counts(text: str, operation: str) -> dict[str, int]:
    pattern = rf'_bucket\{{operation="{operation}",le="([^"]+)"\}} (\d+)'
    return {le: int(n) for le, n in re.findall(pattern, text)}


def test_observation_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics = Metrics()
    for bound in DURATION_BUCKETS:
        metrics.observe_request("Sign", "Success", bound)
    counts = _bucket_counts(metrics.render(), "Sign")
    assert list(counts.values()) == [*range(1, len(DURATION_BUCKETS) + 1), len(DURATION_BUCKETS)]


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.observe_request('Op"x', "back\\slash\nnewline", 0.01)
    metrics.hsm_error('a"b\\c\nd')
    text = metrics.render()
    assert (
        'hsmkeys_requests_total{operation="Op\\"x",outcome="back\\\\slash\\nnewline"} 1\n' in text
    )
    assert 'hsmkeys_request_duration_seconds_count{operation="Op\\"x"} 1\n' in text
    assert 'hsmkeys_hsm_errors_total{kind="a\\"b\\\\c\\nd"} 1\n' in text


def test_escape_label_value_examples() -> None:
    assert escape_label_value("plain") == "plain"
    assert escape_label_value('\\"\n') == '\\\\\\"\\n'


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


@given(st.text())
def test_escaped_label_value_is_one_quoted_token_that_unescapes_to_the_original(
    value: str,
) -> None:
    escaped = escape_label_value(value)
    assert "\n" not in escaped
    assert re.fullmatch(r'(?:[^"\\]|\\.)*', escaped, flags=re.DOTALL)
    assert _unescape(escaped) == value


def test_every_sample_line_parses_as_exposition_format() -> None:
    metrics = Metrics()
    metrics.observe_request("Encrypt", "Success", 0.002)
    metrics.hsm_error("SessionClosed")
    sample = re.compile(r'[a-z_]+(\{[a-z]+="(?:[^"\\]|\\.)*"(,[a-z]+="(?:[^"\\]|\\.)*")*\})? \S+')
    for line in metrics.render().splitlines():
        assert line.startswith("# ") or sample.fullmatch(line), line


def test_concurrent_observations_are_all_counted() -> None:
    metrics = Metrics()
    per_thread = 5000

    def worker() -> None:
        for _ in range(per_thread):
            metrics.observe_request("Encrypt", "Success", 0.001)
            metrics.hsm_error("DeviceError")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = metrics.render()
    total = 4 * per_thread
    assert f'hsmkeys_requests_total{{operation="Encrypt",outcome="Success"}} {total}\n' in text
    assert f'hsmkeys_request_duration_seconds_count{{operation="Encrypt"}} {total}\n' in text
    assert f'hsmkeys_hsm_errors_total{{kind="DeviceError"}} {total}\n' in text


def test_content_type_names_format_version() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_process_series_reports_this_process_cpu_time_growing() -> None:
    def cpu(text: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith("process_cpu_seconds_total ")]
        return float(line.split()[1])

    first = process_series()
    assert "# TYPE process_cpu_seconds_total counter\n" in first
    deadline = time.process_time() + 0.02
    while time.process_time() < deadline:
        pass
    assert cpu(process_series()) >= cpu(first) + 0.02
