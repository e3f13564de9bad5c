"""Summaries of a benchmark result: medians, relay/Postfix ratios per A/B pair, the printed
table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.load import percentile

# metric name -> (path inside a case result, label, unit, higher is better)
METRICS: dict[str, tuple[tuple[str, ...], str, str, bool]] = {
    "accepted_rate": (("accepted_rate",), "accepted", "msg/s", True),
    "e2e_rate": (("e2e_rate",), "end-to-end", "msg/s", True),
    "p50_ms": (("latency", "p50_ms"), "p50 accept", "ms", False),
    "p99_ms": (("latency", "p99_ms"), "p99 accept", "ms", False),
    "peak_rss_mib": (("peak_rss_kib",), "peak RSS", "MiB", False),
    "peak_pss_mib": (("peak_pss_kib",), "peak PSS", "MiB", False),
    "cpu_s": (("cpu_s",), "CPU", "s", False),
    "e2e_mib_s": (("e2e_mib_s",), "end-to-end", "MiB/s", True),  # absent before the mix
}


def _get(case: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = case
    for part in path:
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    if path[-1].endswith("_kib"):
        return round(float(value) / 1024, 1)
    return float(value)


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per system and case, ratios relay/Postfix per round and their median."""
    rounds = results.get("rounds", [])
    systems = [name for name in ("relay", "postfix") if any(name in r for r in rounds)]
    case_names: list[str] = [case["name"] for case in results.get("meta", {}).get("cases", [])]
    summary: dict[str, Any] = {"systems": {}, "ratios": {}, "ceiling": {}, "idle": {},
                               "pooled": {}}
    for system in systems:
        per_case: dict[str, Any] = {}
        for case in case_names:
            cases = [r[system]["cases"].get(case) for r in rounds
                     if system in r and r[system].get("cases", {}).get(case)]
            good = [c for c in cases if c and c.get("ok")]  # failed rounds do not count
            per_case[case] = {metric: _median([_get(c, path) for c in good])
                              for metric, (path, *_) in METRICS.items()}
            summary["pooled"].setdefault(case, {})[system] = pooled_latency(good)
            per_case[case]["rounds"] = sum(1 for r in rounds if system in r)
            per_case[case]["rounds_ok"] = len(good)
            per_case[case]["ok"] = len(good) == per_case[case]["rounds"] > 0
        summary["systems"][system] = per_case
        idle = [r[system].get("idle", {}) for r in rounds if system in r]
        held = [r[system].get("idle_connections", {}) for r in rounds if system in r]
        summary["idle"][system] = {
            "rss_mib": _median([i["rss_kib"] / 1024 if "rss_kib" in i else None for i in idle]),
            "pss_mib": _median([i["pss_kib"] / 1024 if "pss_kib" in i else None for i in idle]),
            "conns_rss_mib": _median([h["rss_kib"] / 1024 if "rss_kib" in h else None
                                      for h in held]),
            "conns_greeted": min((h["greeted"] for h in held if "greeted" in h), default=None),
            "conns_refused": max((h["refused"] + h["timed_out"] for h in held
                                  if "refused" in h), default=None),
        }
    if "relay" in systems and "postfix" in systems:
        for case in case_names:
            per_metric: dict[str, Any] = {}
            for metric, (path, *_) in METRICS.items():
                pairs: list[float | None] = []
                for r in rounds:
                    relay = r.get("relay", {}).get("cases", {}).get(case)
                    postfix = r.get("postfix", {}).get("cases", {}).get(case)
                    if not (relay and relay.get("ok") and postfix and postfix.get("ok")):
                        pairs.append(None)  # a failed run has no meaningful ratio
                        continue
                    a = _get(relay, path) if relay else None
                    b = _get(postfix, path) if postfix else None
                    pairs.append(round(a / b, 3) if a is not None and b else None)
                per_metric[metric] = {"per_round": pairs, "median": _median(pairs)}
            summary["ratios"][case] = per_metric
    for case, data in results.get("ceiling", {}).items():
        # the ceiling has no system under test: rates and latency only
        summary["ceiling"][case] = {metric: _get(data, path)
                                    for metric, (path, *_) in METRICS.items()
                                    if metric in ("accepted_rate", "e2e_rate", "p50_ms",
                                                  "p99_ms")}
    return summary


def pooled_latency(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p99 over the probe samples of all the given rounds together (None for results
    saved before the samples were kept). A 10 MiB case that ends in a second probes a
    handful of messages per round, so each round's p99 is its slowest one; pooled, the p50
    rests on every sample, and the p99 (nearest rank) is still the slowest of all below 100
    samples, which the count shown beside it makes plain."""
    samples = [value for case in cases
               for value in (case.get("latency") or {}).get("latencies_ms") or []]
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "samples": 0}
    return {"p50_ms": percentile(samples, 0.50), "p99_ms": percentile(samples, 0.99),
            "samples": len(samples)}


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(results: dict[str, Any]) -> str:
    summary = results.get("summary") or summarize(results)
    lines: list[str] = []
    meta = results.get("meta", {})
    lines.append(f"infobip-relay vs Postfix {meta.get('postfix') or ''} - {meta.get('rounds')} "
                 f"round(s), order {' '.join(meta.get('order', []))}, "
                 f"{meta.get('sessions')} smtp-source sessions, "
                 f"{meta.get('upstream_connections')} upstream connections"
                 f" (per relay worker; relay workers: {meta.get('relay_workers', 1)})")
    shown = ("accepted_rate", "e2e_rate", "p50_ms", "p99_ms", "peak_rss_mib", "peak_pss_mib",
             "cpu_s")
    header = f"{'case':<7}{'system':<18}" + "".join(
        f"{METRICS[m][1] + ' ' + METRICS[m][2]:>17}" for m in shown)
    for described in meta.get("cases", []):
        case = described["name"]
        lines.append("")
        lines.append(f"{case}: {describe_case(described)} (medians over the rounds that "
                     f"passed)")
        lines.append(header)
        rows: list[tuple[str, dict[str, Any]]] = []
        for system, per_case in summary["systems"].items():
            if case in per_case:
                rows.append((system, per_case[case]))
        if case in summary["ceiling"]:
            rows.append(("ceiling (sink)", summary["ceiling"][case]))
        for name, data in rows:
            note = ""
            if "rounds_ok" in data and data["rounds_ok"] != data["rounds"]:
                note = f"  ({data['rounds_ok']}/{data['rounds']} rounds ok)"
            lines.append(f"{case:<7}{name:<18}" + "".join(f"{_fmt(data.get(m)):>17}"
                                                           for m in shown) + note)
        ratios = summary["ratios"].get(case)
        if ratios:
            lines.append(f"{case:<7}{'relay/postfix':<18}" + "".join(
                f"{_fmt(ratios[m]['median'], 'x'):>17}" for m in shown))
            per_round = "  ".join(
                f"r{i + 1}: " + "/".join(_fmt(ratios[m]["per_round"][i], "x")
                                         for m in ("accepted_rate", "e2e_rate"))
                for i in range(len(ratios["accepted_rate"]["per_round"])))
            lines.append(f"{'':<7}per round (accepted/e2e): {per_round}")
        pooled = summary.get("pooled", {}).get(case, {})
        if any(data.get("samples") for data in pooled.values()):
            lines.append(f"{'':<7}accept latency, all rounds pooled: " + "  ".join(
                f"{system} p50 {_fmt(data['p50_ms'])} / p99 {_fmt(data['p99_ms'])} ms "
                f"(n={data['samples']})" for system, data in pooled.items()))
    idle = summary.get("idle", {})
    if idle:
        lines.append("")
        for system, data in idle.items():
            text = (f"idle {system}: RSS {_fmt(data['rss_mib'])} MiB, "
                    f"PSS {_fmt(data['pss_mib'])} MiB")
            if data.get("conns_greeted") is not None:
                count = meta.get("idle_connections")
                text += (f"; with {count} idle connections: RSS {_fmt(data['conns_rss_mib'])} "
                         f"MiB, {data['conns_greeted']} greeted, "
                         f"{data['conns_refused']} refused/timed out")
            lines.append(text)
    lines.append("")
    failures = results.get("failures", [])
    if failures:
        lines.append(f"FAIL: {len(failures)} problem(s):")
        lines.extend(f"  - {failure}" for failure in failures)
    else:
        lines.append("PASS: no message lost or duplicated, every message carried the header")
    lines.append(f"duration {meta.get('duration_s')} s")
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def describe_case(case: dict[str, Any]) -> str:
    """``meta.cases`` entry -> "100 messages x 1 MiB" or, for a mix, its parts and probe."""
    parts = case.get("parts") or [{"messages": case["messages"], "size": case["size"]}]
    if len(parts) == 1:
        return f"{parts[0]['messages']} messages x {_size(parts[0]['size'])}"
    text = " + ".join(f"{part['messages']} x {_size(part['size'])}" for part in parts)
    return (f"{case['messages']} messages: {text} ({case.get('bytes', 0) / 1024 / 1024:.0f} MiB;"
            f" probe {_size(case.get('probe_size') or 0)})")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def _bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], title: str,
          unit: str, *, log: bool = False) -> None:
    """Grouped bars, one colour per series, each bar labelled with its value."""
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        xs = [g + index * width - 0.4 + width / 2 for g in range(len(groups))]
        heights = [v or 0 for v in values]
        drawn = ax.bar(xs, heights, width, label=name, color=COLORS.get(name))
        for rect, value in zip(drawn, values, strict=True):
            if value is not None:
                ax.annotate(_fmt(value), (rect.get_x() + rect.get_width() / 2,
                                          rect.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


COLORS = {"relay": "#e4572e", "postfix": "#2e86ab", "ceiling": "#999999",
          "relay PSS": "#f2a58e", "postfix PSS": "#92c5de"}


def draw_chart(results: dict[str, Any], path: Path) -> None:
    """Bar chart, one row per figure: throughput (accepted, end to end), acceptance latency
    (p50, p99) and memory (idle, peak per case), relay beside Postfix (medians) and the
    ceiling, for every case of the run."""
    import matplotlib  # noqa: PLC0415 - optional dependency, only for --chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    summary = results.get("summary") or summarize(results)
    meta = results.get("meta", {})
    systems = list(summary["systems"])
    described = meta.get("cases", [])
    cases = [c["name"] for c in described]
    probe = {c["name"]: _size(c.get("probe_size") or c["size"]) for c in described}
    fig, axes = plt.subplots(3, 1, figsize=(max(10.0, 2.6 * len(cases) + 4), 13))

    def series_of(metrics: tuple[str, str], *, ceiling: bool = True
                  ) -> dict[str, list[float | None]]:
        out: dict[str, list[float | None]] = {}
        for system in [*systems, *(["ceiling"] if ceiling else [])]:
            source = summary["ceiling"] if system == "ceiling" else summary["systems"][system]
            if source:
                out[system] = [source.get(case, {}).get(metric) for case in cases
                               for metric in metrics]
        return out

    def ratio_label(case: str, metric: str) -> str:
        median = summary["ratios"].get(case, {}).get(metric, {}).get("median")
        return f"\nrelay {_fmt(median, 'x')}" if median is not None else ""

    groups = [f"{case} {kind}{ratio_label(case, metric)}" for case in cases
              for kind, metric in (("accepted", "accepted_rate"), ("e2e", "e2e_rate"))]
    _bars(axes[0], groups, series_of(("accepted_rate", "e2e_rate")),
          "Throughput (higher is better; relay/Postfix ratio under each group)",
          "messages/s", log=True)

    groups = [f"{case} {kind} ({probe[case]}){ratio_label(case, metric)}" for case in cases
              for kind, metric in (("p50", "p50_ms"), ("p99", "p99_ms"))]
    _bars(axes[1], groups, series_of(("p50_ms", "p99_ms")),
          "Acceptance latency of the probe's messages: end of DATA -> 250 (lower is better)",
          "ms", log=True)

    groups = ["idle", *[f"peak {case}" for case in cases]]
    series: dict[str, list[float | None]] = {}
    for system in systems:
        idle = summary["idle"].get(system, {})
        per_case = summary["systems"][system]
        series[system] = [idle.get("rss_mib"),
                          *[per_case.get(case, {}).get("peak_rss_mib") for case in cases]]
        series[f"{system} PSS"] = [idle.get("pss_mib"),
                                   *[per_case.get(case, {}).get("peak_pss_mib")
                                     for case in cases]]
    if any(data.get("conns_rss_mib") is not None for data in summary["idle"].values()):
        groups.insert(1, f"{meta.get('idle_connections')} idle conns")
        for system in systems:
            series[system].insert(1, summary["idle"].get(system, {}).get("conns_rss_mib"))
            series[f"{system} PSS"].insert(1, None)
    _bars(axes[2], groups, series, "Memory summed over all processes: RSS, and PSS (shared "
          "pages split between processes; lower is better)", "MiB")
    save_figure(fig, f"infobip-relay vs Postfix {meta.get('postfix') or ''} "
                     f"({meta.get('rounds')} rounds, medians; {meta.get('started', '')})", path)


def save_figure(fig: Any, title: str, path: Path) -> None:
    """Title, lay out and write a chart, then free it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
