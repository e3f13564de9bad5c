"""``python -m bench [run] [--quick] [--out FILE] [--chart FILE.png]``: benchmark infobip-relay
against Postfix on this machine (see bench/README.md). Other commands: ``report FILE``
(print the table of a saved result, optionally ``--chart``), ``sink`` (run the sink alone)."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the benchmark (default)")
    run.add_argument("--quick", action="store_true",
                     help="short smoke run: 2 rounds, 300 x 2 KiB, 10 x 1 MiB, 4 x 10 MiB, "
                          "a mix of 100")
    run.add_argument("--rounds", type=_positive, help="A/B rounds (default 3; --quick 2)")
    run.add_argument("--messages", type=_positive,
                     help="2 KiB messages per round (default 5000; --quick 300)")
    run.add_argument("--size", type=_positive, default=2048, help="small message body bytes")
    run.add_argument("--large-messages", type=_positive,
                     help="1 MiB messages per round (default 100; --quick 10; 0 skips)")
    run.add_argument("--large-size", type=_positive, default=1024 * 1024)
    run.add_argument("--huge-messages", type=_positive,
                     help="10 MiB messages per round (default 20; --quick 4; 0 skips)")
    run.add_argument("--huge-size", type=_positive, default=10 * 1024 * 1024)
    run.add_argument("--mix-messages", type=_positive,
                     help="messages of the realistic mix per round: 70%% 4 KiB, 25%% 150 KiB, "
                          "2.5%% 2 MiB, 1.5%% 5 MiB, 1%% 10 MiB (default 1000; --quick 100; "
                          "0 skips)")
    run.add_argument("--sessions", type=_positive, default=20, help="smtp-source -s")
    run.add_argument("--systems", default="relay,postfix",
                     help="comma-separated, in A/B order (default relay,postfix)")
    run.add_argument("--connections", type=_positive, default=8,
                     help="upstream connections: relay upstream.connections and Postfix "
                          "smtp_destination_concurrency_limit (default 8)")
    run.add_argument("--idle-connections", type=_positive, default=1000,
                     help="idle client connections held open against the relay (0 skips)")
    run.add_argument("--probe-interval", type=float, default=0.01,
                     help="seconds between latency probe messages (default 0.01)")
    run.add_argument("--sink-workers", type=_positive, default=1,
                     help="sink processes sharing the port via SO_REUSEPORT")
    run.add_argument("--postfix-tls-reuse", action="store_true",
                     help="let Postfix reuse TLS connections (smtp_tls_connection_reuse, "
                          "not the packaged default)")
    run.add_argument("--relay-log-level", default="info",
                     choices=("debug", "info", "warning", "error"),
                     help="the relay's logging.level (default info, the relay's own default: "
                          "a line per message queued and delivered, as Postfix's maillog has)")
    run.add_argument("--relay-workers", type=_positive, default=1,
                     help="the relay's `workers:` (processes sharing the port; each has "
                          "--connections upstream connections)")
    run.add_argument("--no-ceiling", action="store_true", help="skip the smtp-source -> sink run")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default {DEFAULT_OUT})")
    run.add_argument("--chart", type=Path, help="also draw a PNG bar chart here (matplotlib)")
    run.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    report = commands.add_parser("report", help="print the table of a saved JSON result")
    report.add_argument("file", type=Path, nargs="?", default=DEFAULT_OUT)
    report.add_argument("--chart", type=Path)
    commands.add_parser("sink", help="run the sink alone (see python -m bench.sink --help)",
                        add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sink"]:
        from bench import sink  # noqa: PLC0415

        return sink.main(argv[1:])
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    return _run(args)


def _report(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from bench import report  # noqa: PLC0415

    results = json.loads(args.file.read_text())
    results["summary"] = report.summarize(results)
    print(report.format_table(results))
    if args.chart:
        report.draw_chart(results, args.chart)
        print(f"chart: {args.chart}")
    return 0 if results.get("ok") else 1


def _run(args: argparse.Namespace) -> int:
    from bench import report  # noqa: PLC0415
    from bench.runner import SYSTEMS, Options, run_benchmark  # noqa: PLC0415

    systems = tuple(name.strip() for name in args.systems.split(",") if name.strip())
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown:
        print(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    missing = [tool for tool in ("smtp-source", "postfix") if not shutil.which(tool)]
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install -y postfix libsasl2-modules",
              file=sys.stderr)
        return 2
    quick = args.quick
    opts = Options(
        rounds=args.rounds if args.rounds is not None else (2 if quick else 3),
        messages=args.messages if args.messages is not None else (300 if quick else 5000),
        size=args.size,
        large_messages=(args.large_messages if args.large_messages is not None
                        else (10 if quick else 100)),
        large_size=args.large_size,
        huge_messages=(args.huge_messages if args.huge_messages is not None
                       else (4 if quick else 20)),
        huge_size=args.huge_size,
        mix_messages=(args.mix_messages if args.mix_messages is not None
                      else (100 if quick else 1000)),
        sessions=args.sessions,
        systems=systems,
        connections=args.connections,
        sink_workers=max(1, args.sink_workers),
        probe_interval=args.probe_interval,
        idle_connections=args.idle_connections,
        postfix_tls_reuse=args.postfix_tls_reuse,
        relay_log_level=args.relay_log_level,
        relay_workers=args.relay_workers,
        ceiling=not args.no_ceiling,
        keep=args.keep,
        quick=quick,
    )
    if args.chart:  # fail now rather than after the run
        import matplotlib  # noqa: F401, PLC0415
    try:
        results = run_benchmark(opts)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    results["summary"] = report.summarize(results)
    report.write_json(results, args.out)
    print()
    print(report.format_table(results))
    print(f"results: {args.out}")
    if args.chart:
        report.draw_chart(results, args.chart)
        print(f"chart: {args.chart}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
