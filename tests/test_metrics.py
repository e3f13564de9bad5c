"""relay.metrics: children remembered per label values, and forgotten when removed."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.render().decode()
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def test_the_same_label_values_give_the_same_child_and_count_once_each() -> None:
    metrics = Metrics()
    first = metrics.accepted.labels(listener="smtp")
    assert metrics.accepted.labels(listener="smtp") is first
    assert metrics.accepted.labels("smtp") is first  # prometheus_client's own child
    first.inc()
    metrics.accepted.labels(listener="smtp").inc()
    metrics.accepted.labels(listener="submission").inc()
    assert samples(metrics, "relay_messages_accepted_total") == {
        (("listener", "smtp"),): 2.0, (("listener", "submission"),): 1.0}


def test_a_removed_upstream_gets_a_fresh_series_when_it_comes_back() -> None:
    metrics = Metrics()
    metrics.add_upstream("eu")
    metrics.upstream_up.labels(upstream="eu").set(1)
    metrics.remove_upstream("eu")
    assert samples(metrics, "relay_upstream_up") == {}
    metrics.add_upstream("eu")  # a reload brings it back: exported again, from 0
    assert samples(metrics, "relay_upstream_up") == {(("upstream", "eu"),): 0.0}
    metrics.upstream_up.labels(upstream="eu").set(1)
    assert samples(metrics, "relay_upstream_up") == {(("upstream", "eu"),): 1.0}


def test_clear_forgets_every_child() -> None:
    metrics = Metrics()
    metrics.rejected.labels(listener="smtp", reason="relay").inc()
    metrics.rejected.clear()
    metrics.rejected.labels(listener="smtp", reason="relay").inc()
    assert samples(metrics, "relay_messages_rejected_total") == {
        (("listener", "smtp"), ("reason", "relay")): 1.0}
