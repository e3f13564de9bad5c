"""Burst of large uploads, infobip-relay beside Postfix: N clients each send one large message
at the same time.

``python -m bench.burst [--clients 100] [--size-mib 19] [--systems relay,postfix]
[--chart FILE.png]``: starts the fake Infobip sink, then each system in turn (fresh, like
``python -m bench run``: the relay from ``--relay-source`` or this checkout, Postfix as a
private instance), opens N sessions, sends one message of the given size on each at the same
time while a probe sends 2 KiB messages one at a time on its own session, waits until the sink
has every message, keeps sampling memory for ``--settle`` seconds, and stops the system.
Printed side by side: peak RSS and PSS of the whole process tree (sampled every 0.2 s), RSS
and PSS ``--settle`` seconds after the last delivery, how long RSS took to fall under
``--rss-target-mib``, time to accept all, time until all were delivered (counted at the sink),
and the probe's acceptance latency (end of DATA -> 250) p50/p99 during the burst.
``--report FILE.json`` re-prints (and with ``--chart`` draws) a saved result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import trustme

from bench import load, relayproc
from bench.load import _expect
from bench.procs import MemorySampler, on_exit, run_cleanups, sample_tree
from bench.report import _fmt
from bench.runner import SYSTEMS, Options, PostfixSystem, RelaySystem, System
from bench.sink import DEFAULT_API_KEY, SinkCluster, count_case

SENDER = "burst@bench.example.com"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "burst.json"
LINE = b"Y" * 76 + b"\r\n"
BLOCK_LINES = 3360  # ~256 KiB written per drain()


@dataclass
class BurstOptions:
    clients: int = 100
    size: int = 19 * 1024 * 1024
    settle: float = 30.0
    rss_target_mib: float = 100.0
    probe_size: int = 2048
    probe_interval: float = 0.1
    systems: tuple[str, ...] = SYSTEMS
    connections: int = 8
    keep: bool = False

    @property
    def postfix_process_limit(self) -> int:
        """Postfix's default_process_limit (100) caps the smtpd processes: with 100 clients
        plus the probe, the 101st session would wait in the listen queue. Room for all."""
        return max(100, self.clients + 20)


def message_head(tag: str, number: int) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <rcpt{number}@example.net>\r\nDate: {formatdate()}\r\n"
            f"Message-Id: <burst.{tag}.{number}@bench>\r\nSubject: burst {number}\r\n\r\n"
            ).encode()


def burst_match(tag: str) -> Callable[[str], bool]:
    prefix = f"<burst.{tag}."
    return lambda key: key.startswith(prefix)


async def send_one(port: int, tag: str, number: int, size: int) -> float:
    """One session, one message of about ``size`` bytes of body, written in ~256 KiB blocks
    as the socket drains (the driver never holds a whole message); returns the seconds from
    the end of DATA to the 250."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, "220", 120)
        writer.write(b"EHLO burst.example.com\r\n")
        await _expect(reader, "250", 120)
        writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<rcpt{number}@example.net>\r\n"
                     f"DATA\r\n".encode())
        for code in ("250", "250", "354"):
            await _expect(reader, code, 120)
        writer.write(message_head(tag, number))
        lines = size // len(LINE)
        block = LINE * BLOCK_LINES
        for _ in range(lines // BLOCK_LINES):
            writer.write(block)
            await writer.drain()
        writer.write(LINE * (lines % BLOCK_LINES))
        await writer.drain()
        began = time.monotonic()
        writer.write(b".\r\n")
        await _expect(reader, "250", 600)
        writer.write(b"QUIT\r\n")
        return time.monotonic() - began
    finally:
        writer.close()


async def burst(port: int, opts: BurstOptions, tag: str) -> dict[str, Any]:
    """All clients at once, the probe alongside until the last large message got its 250."""
    stop = asyncio.Event()
    probe_task = asyncio.create_task(load.run_probe(
        port, tag=tag, size=opts.probe_size, stop=stop, interval=opts.probe_interval,
        step_timeout=120.0))
    started = time.monotonic()
    try:
        large = await asyncio.gather(*(send_one(port, tag, n, opts.size)
                                       for n in range(opts.clients)), return_exceptions=True)
    finally:
        accepted = time.monotonic() - started
        stop.set()
    probe = await probe_task
    finals = [value for value in large if isinstance(value, float)]
    errors = [f"{type(value).__name__}: {value}" for value in large
              if isinstance(value, BaseException)]
    return {"started": started, "accepted_s": round(accepted, 2),
            "large_accepted": len(finals), "large_errors": errors[:5],
            "large_error_count": len(errors),
            "large_final": load.latency_stats(finals),
            "probe": probe.summary(), "probe_sent": probe.sent}


def run_system(name: str, number: int, root: Path, sink: SinkCluster, ca_file: Path,
               opts: BurstOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One system through one burst; the sink is reset first."""
    run_opts = Options(connections=opts.connections, idle_connections=0,
                       postfix_process_limit=opts.postfix_process_limit)
    system: System = (RelaySystem if name == "relay" else PostfixSystem)(
        root, sink, ca_file, run_opts)
    sink.reset()
    tag = f"{name}{number}-{int(time.time() * 1000) % 10**8}"
    out: dict[str, Any] = {"system": name}
    log(f"{name}: starting")
    try:
        system.start()
    except Exception:
        with contextlib.suppress(Exception):
            system.stop()
        raise
    try:
        time.sleep(2)
        idle = sample_tree(system.pids())
        log(f"{name}: idle RSS {idle.rss_kib / 1024:.1f} MiB, PSS {idle.pss_kib / 1024:.1f} MiB;"
            f" burst of {opts.clients} x {opts.size / 2**20:g} MiB")
        with MemorySampler(system.pids, interval=0.2, record=True) as sampler:
            result = asyncio.run(burst(system.port, opts, tag))
            started = result.pop("started")
            expected = opts.clients + result["probe_sent"]
            stats = sink.wait_unique(expected, timeout=600 + opts.clients * 5, stalled=120)
            delivered_at = time.monotonic()
            complete = stats["unique"] >= expected
            log(f"{name}: accepted {result['large_accepted']}/{opts.clients} in "
                f"{result['accepted_s']} s; sink has {stats['unique']}/{expected}; settling "
                f"{opts.settle:g} s")
            time.sleep(opts.settle)
        after = sample_tree(system.pids())
        seen = sink.dump()
        counted = count_case(seen, expected=opts.clients, match=burst_match(tag))
        probe_count = count_case(seen, expected=result["probe_sent"],
                                 match=load.probe_match(tag))
        timeline = [(round(t - started, 2), round(rss / 1024, 1), round(pss / 1024, 1))
                    for t, rss, pss in sampler.timeline]
        # from the moment every upload had its 250 (the burst is over for the clients)
        below = next((t - result["accepted_s"] for t, rss, _ in timeline
                      if t >= result["accepted_s"] and rss < opts.rss_target_mib), None)
        below_pss = next((t - result["accepted_s"] for t, _, pss in timeline
                          if t >= result["accepted_s"] and pss < opts.rss_target_mib), None)
        problems = []
        if result["large_error_count"]:
            problems.append(f"{result['large_error_count']} uploads failed: "
                            f"{result['large_errors'][:2]}")
        if not counted.ok:
            problems.append(f"burst messages: {counted.as_dict()}")
        if not probe_count.ok:
            problems.append(f"probe messages: {probe_count.as_dict()}")
        if result["probe"]["error_count"]:
            problems.append(f"probe errors: {result['probe']['errors'][:2]}")
        out |= {
            "idle_rss_mib": round(idle.rss_kib / 1024, 1),
            "idle_pss_mib": round(idle.pss_kib / 1024, 1),
            "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1),
            "peak_pss_mib": round(sampler.peak_pss_kib / 1024, 1),
            "peak_processes": sampler.peak_processes,
            "after_rss_mib": round(after.rss_kib / 1024, 1),
            "after_pss_mib": round(after.pss_kib / 1024, 1),
            "below_target_s": round(below, 1) if below is not None else None,
            "below_target_pss_s": round(below_pss, 1) if below_pss is not None else None,
            "delivered_s": round(delivered_at - started, 2) if complete else None,
            **result,
            "delivered": counted.unique,
            "count": counted.as_dict(),
            "probe_count": probe_count.as_dict(),
            "timeline": timeline,
            "problems": problems,
            "ok": not problems,
        }
        if problems:
            out["diagnostics"] = system.diagnostics()
            log(f"FAIL {name}: " + "; ".join(problems) + "\n" + out["diagnostics"])
    finally:
        system.stop()
    return out


# (label, key, format) for the side-by-side table
ROWS: tuple[tuple[str, str], ...] = (
    ("idle RSS MiB", "idle_rss_mib"),
    ("peak RSS MiB (all processes)", "peak_rss_mib"),
    ("peak PSS MiB", "peak_pss_mib"),
    ("peak processes", "peak_processes"),
    ("RSS MiB {settle}s after delivery", "after_rss_mib"),
    ("PSS MiB {settle}s after delivery", "after_pss_mib"),
    ("s from accept-all to RSS < {target} MiB", "below_target_s"),
    ("s from accept-all to PSS < {target} MiB", "below_target_pss_s"),
    ("s to accept all", "accepted_s"),
    ("s until all delivered", "delivered_s"),
    ("delivered (sink, unique)", "delivered"),
    ("duplicates", "count.duplicates"),
    ("large: end of DATA->250 p50 ms", "large_final.p50_ms"),
    ("large: end of DATA->250 p99 ms", "large_final.p99_ms"),
    ("{probe} probe p50 ms", "probe.p50_ms"),
    ("{probe} probe p99 ms", "probe.p99_ms"),
    ("{probe} probe max ms", "probe.max_ms"),
    ("{probe} probe messages", "probe.samples"),
)


def _value(data: dict[str, Any], key: str) -> Any:
    value: Any = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    systems = results["systems"]
    names = list(systems)
    lines = [f"burst: {meta['clients']} clients x {meta['size_mib']:g} MiB at once, "
             f"{meta['probe_size']} B probe every {meta['probe_interval']} s "
             f"(Postfix {meta.get('postfix') or ''}, default_process_limit "
             f"{meta['postfix_process_limit']}; relay from {meta['relay_source']})",
             f"{'':<36}" + "".join(f"{name:>14}" for name in names)]
    for label, key in ROWS:
        text = label.format(settle=f"{meta['settle']:g}", target=f"{meta['rss_target_mib']:g}",
                            probe=f"{meta['probe_size'] // 1024} KiB")
        cells = []
        for name in names:
            value = _value(systems[name], key)
            if key == "delivered" and value is not None:
                value = f"{value}/{meta['clients']}"
            elif isinstance(value, float):
                value = _fmt(value)
            cells.append(f"{'-' if value is None else value:>14}")
        lines.append(f"{text:<36}" + "".join(cells))
    failures = [f"{name}: {'; '.join(data.get('problems', [data.get('error', '?')]))}"
                for name, data in systems.items() if not data.get("ok")]
    lines.append(f"(-: not reached within the {meta['settle']:g} s after delivery; RSS counts "
                 f"shared pages once per process, PSS splits them)")
    lines.append("")
    lines.append("FAIL: " + " | ".join(failures) if failures
                 else "PASS: every message delivered once, with the header")
    return "\n".join(lines)


def draw_chart(results: dict[str, Any], path: Path) -> None:
    """Memory over time (RSS, both systems) and bars: memory, seconds, probe latency."""
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from bench.report import COLORS, _bars, save_figure  # noqa: PLC0415

    meta, systems = results["meta"], results["systems"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    for name, data in systems.items():
        timeline = data.get("timeline") or []
        if timeline:
            ax.plot([t for t, _, _ in timeline], [rss for _, rss, _ in timeline],
                    label=f"{name} RSS", color=COLORS.get(name))
            ax.plot([t for t, _, _ in timeline], [pss for _, _, pss in timeline],
                    label=f"{name} PSS", color=COLORS.get(name), linestyle=":")
        for key, style in (("accepted_s", "--"), ("delivered_s", "-.")):
            if data.get(key) is not None:
                ax.axvline(data[key], color=COLORS.get(name), linestyle=style, linewidth=0.8)
    ax.axhline(meta["rss_target_mib"], color="#555555", linewidth=0.6)
    ax.set_title("Memory of all processes during and after the burst (-- all accepted, "
                 "-. all delivered)", fontsize=9)
    ax.set_xlabel("s since the burst began")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    names = list(systems)

    def series(keys: Sequence[str]) -> dict[str, list[float | None]]:
        return {name: [_value(systems[name], key) for key in keys] for name in names}

    settle = f"{meta['settle']:g} s after"
    _bars(axes[0][1], ["idle RSS", "peak RSS", "peak PSS", f"RSS {settle}",
                       f"PSS {settle}"],
          series(["idle_rss_mib", "peak_rss_mib", "peak_pss_mib", "after_rss_mib",
                  "after_pss_mib"]), "Memory, all processes (lower is better)", "MiB")
    _bars(axes[1][0], ["accept all", "all delivered"], series(["accepted_s", "delivered_s"]),
          "Seconds from the start of the burst (lower is better)", "s")
    probe = f"{meta['probe_size'] // 1024} KiB"
    _bars(axes[1][1], [f"{probe} p50", f"{probe} p99", "large p50", "large p99"],
          series(["probe.p50_ms", "probe.p99_ms", "large_final.p50_ms",
                  "large_final.p99_ms"]),
          "Acceptance latency during the burst: end of DATA -> 250 (lower is better)", "ms",
          log=True)
    save_figure(fig, f"Burst: {meta['clients']} clients x {meta['size_mib']:g} MiB at once - "
                     f"infobip-relay vs Postfix {meta.get('postfix') or ''} ({meta['started']})",
                path)


def _tls(tmp: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    for path in (ca_file, cert_file):
        path.chmod(0o644)
    return ca_file, cert_file, key_file


def run_burst(opts: BurstOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from bench.runner import _postfix_version  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix="infobip-relay-burst-"))
    tmp.chmod(0o711)
    if not opts.keep:
        on_exit(lambda: shutil.rmtree(tmp, ignore_errors=True))
    ca_file, cert_file, key_file = _tls(tmp)
    sink = SinkCluster(cert=str(cert_file), key=str(key_file), password=DEFAULT_API_KEY).start()
    results: dict[str, Any] = {"meta": {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "clients": opts.clients,
        "size_mib": round(opts.size / 2**20, 3), "settle": opts.settle,
        "rss_target_mib": opts.rss_target_mib, "probe_size": opts.probe_size,
        "probe_interval": opts.probe_interval, "connections": opts.connections,
        "postfix": _postfix_version() if "postfix" in opts.systems else None,
        "postfix_process_limit": opts.postfix_process_limit,
        "relay_source": str(relayproc.PROJECT_ROOT), "cpus": os.cpu_count(),
        "command": " ".join(sys.argv)}, "systems": {}}
    try:
        for number, name in enumerate(opts.systems, 1):
            try:
                results["systems"][name] = run_system(name, number, tmp / name, sink,
                                                      ca_file, opts, log)
            except Exception as exc:  # report and go on with the other system
                log(f"FAIL {name}: {type(exc).__name__}: {exc}")
                results["systems"][name] = {"system": name, "error": str(exc), "ok": False}
    finally:
        sink.stop()
    results["ok"] = all(data.get("ok") for data in results["systems"].values())
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size-mib", type=float, default=19,
                        help="body of each upload (default 19; both systems take 20 MiB)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to keep sampling memory after the last delivery")
    parser.add_argument("--rss-target-mib", type=float, default=100.0)
    parser.add_argument("--probe-interval", type=float, default=0.1,
                        help="seconds between the 2 KiB probe messages (default 0.1)")
    parser.add_argument("--connections", type=int, default=8,
                        help="upstream connections of both systems (default 8)")
    parser.add_argument("--systems", default="relay,postfix",
                        help="comma-separated, in this order (default relay,postfix)")
    parser.add_argument("--relay-source", type=Path, help="import the relay from this tree")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON (default {DEFAULT_OUT})")
    parser.add_argument("--chart", type=Path, help="also draw a PNG chart here (matplotlib)")
    parser.add_argument("--report", type=Path, metavar="FILE.json",
                        help="re-print a saved result (and draw it with --chart); no run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        results = json.loads(args.report.read_text())
    else:
        systems = tuple(name.strip() for name in args.systems.split(",") if name.strip())
        if any(name not in SYSTEMS for name in systems):
            print(f"unknown system in {systems}; choose from {', '.join(SYSTEMS)}",
                  file=sys.stderr)
            return 2
        if "postfix" in systems and not shutil.which("postfix"):
            print("missing postfix: apt-get install -y postfix libsasl2-modules",
                  file=sys.stderr)
            return 2
        if args.chart:  # fail now rather than after the run
            import matplotlib  # noqa: F401, PLC0415
        if args.relay_source is not None:
            # RelayProcess puts PROJECT_ROOT first on the relay's PYTHONPATH.
            relayproc.PROJECT_ROOT = args.relay_source.resolve()
        opts = BurstOptions(clients=args.clients, size=int(args.size_mib * 2**20),
                            settle=args.settle, rss_target_mib=args.rss_target_mib,
                            probe_interval=args.probe_interval, systems=systems,
                            connections=args.connections, keep=args.keep)
        try:
            results = run_burst(opts, log=lambda text: print(text, flush=True))
        except KeyboardInterrupt:
            print("interrupted; cleaned up", file=sys.stderr)
            return 130
        finally:
            run_cleanups()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print()
    print(format_table(results))
    if args.report is None:
        print(f"results: {args.out}")
    if args.chart:
        draw_chart(results, args.chart)
        print(f"chart: {args.chart}")
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
