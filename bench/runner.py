"""The benchmark run: ceiling, then rounds of relay and Postfix alternating (A B A B ...).

For every system and round: start it fresh (own temp dir and queue), wait until its
listener accepts, measure idle memory, (relay) hold 1,000 idle connections, then run the
cases (2 KiB, 1 MiB, 10 MiB, the realistic mix), each with ``smtp-source`` (one process per
message size, run side by side) plus the latency probe, and wait until the sink has every
message. Stop the system, count what the sink received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from bench import load
from bench.postfix import PostfixConfig, PostfixInstance
from bench.procs import (
    MemorySampler,
    free_port,
    on_exit,
    raise_nofile,
    run_cleanups,
    sample_tree,
)
from bench.relayproc import RelayConfig, RelayProcess
from bench.sink import (
    DEFAULT_API_KEY,
    CaseCount,
    SinkCluster,
    count_case,
    smtp_source_match,
)

SYSTEMS = ("relay", "postfix")


KIB = 1024
MIB = 1024 * 1024

# The realistic mix: (share of the messages, body bytes). 70 % ~4 KiB (notifications), 25 %
# ~150 KiB (a small PDF or image), 5 % 2-10 MiB attachments, split 2.5 % 2 MiB, 1.5 % 5 MiB,
# 1 % 10 MiB (bigger ones are rarer). Mean body ~270 KiB; 1,000 messages ~264 MiB.
MIX: tuple[tuple[float, int], ...] = (
    (0.70, 4 * KIB),
    (0.25, 150 * KIB),
    (0.025, 2 * MIB),
    (0.015, 5 * MIB),
    (0.01, 10 * MIB),
)
MIX_PROBE_SIZE = 4 * KIB  # the mix's probe: small mail sent while the large ones upload


@dataclass(frozen=True)
class Part:
    """``messages`` of ``size`` body bytes, sent by one smtp-source process."""

    messages: int
    size: int


@dataclass(frozen=True)
class Case:
    """One load: its parts run side by side (one smtp-source each); the latency probe sends
    messages of ``probe_size`` bytes (default: the size of a one-part case)."""

    name: str
    parts: tuple[Part, ...]
    probe_size: int = 0

    @classmethod
    def single(cls, name: str, messages: int, size: int) -> Case:
        return cls(name, (Part(messages, size),), size)

    @property
    def messages(self) -> int:
        return sum(part.messages for part in self.parts)

    @property
    def bytes(self) -> int:
        return sum(part.messages * part.size for part in self.parts)

    @property
    def size(self) -> int:
        """The size of a one-part case; the mean body size of a mix."""
        return self.bytes // self.messages if self.messages else 0

    def time_limit(self) -> float:
        """Seconds the case may take: 60 s plus, per message, 1 s per MiB (at least 0.05 s)."""
        return 60.0 + sum(part.messages * max(0.05, part.size / MIB) for part in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{part.messages} x {_size(part.size)}" for part in self.parts)

    def as_dict(self) -> dict[str, Any]:
        """For the JSON ``meta.cases``: ``name``/``messages``/``size`` as before, plus parts."""
        return {"name": self.name, "messages": self.messages, "size": self.size,
                "bytes": self.bytes, "probe_size": self.probe_size,
                "parts": [{"messages": part.messages, "size": part.size}
                          for part in self.parts]}


def split(total: int, weights: list[float], *, minimum: int = 0) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder), then every share
    below ``minimum`` raised to it at the expense of the largest share. The shares add up to
    ``total``, unless ``minimum * len(weights)`` is more than it (then each is ``minimum``)."""
    if minimum * len(weights) >= total:
        return [minimum] * len(weights)
    shares = split_plain(total, weights)
    for index in range(len(shares)):
        while shares[index] < minimum:
            largest = max(range(len(shares)), key=lambda i: shares[i])
            shares[largest] -= 1
            shares[index] += 1
    return shares


def split_plain(total: int, weights: list[float]) -> list[int]:
    whole = sum(weights)
    exact = [total * weight / whole for weight in weights]
    shares = [int(value) for value in exact]
    order = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for index in order[:total - sum(shares)]:
        shares[index] += 1
    return shares


def mix_case(messages: int, name: str = "mix") -> Case:
    """The realistic mix of ``messages`` messages (every size at least once when
    ``messages`` >= the number of sizes)."""
    counts = split(messages, [share for share, _ in MIX],
                   minimum=1 if messages >= len(MIX) else 0)
    parts = tuple(Part(count, size) for count, (_, size) in zip(counts, MIX, strict=True)
                  if count > 0)
    return Case(name, parts, MIX_PROBE_SIZE)


def _size(size: int) -> str:
    for unit, factor in (("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


@dataclass
class Options:
    rounds: int = 3
    messages: int = 5000
    size: int = 2048
    large_messages: int = 100
    large_size: int = MIB
    huge_messages: int = 20
    huge_size: int = 10 * MIB
    mix_messages: int = 1000
    sessions: int = 20
    systems: tuple[str, ...] = SYSTEMS
    connections: int = 8
    sink_workers: int = 1
    probe_interval: float = 0.01
    idle_connections: int = 1000
    postfix_tls_reuse: bool = False
    postfix_process_limit: int = 100  # Postfix's default_process_limit (smtpd sessions)
    relay_log_level: str = "info"  # the relay's default; Postfix logs every message too
    relay_workers: int = 1
    ceiling: bool = True
    keep: bool = False
    quick: bool = False
    settle: float = 2.0
    log: Callable[[str], None] = field(default=lambda text: print(text, flush=True))

    @property
    def cases(self) -> list[Case]:
        cases = []
        if self.messages > 0:
            cases.append(Case.single("small", self.messages, self.size))
        if self.large_messages > 0:
            cases.append(Case.single("large", self.large_messages, self.large_size))
        if self.huge_messages > 0:
            cases.append(Case.single("huge", self.huge_messages, self.huge_size))
        if self.mix_messages > 0:
            cases.append(mix_case(self.mix_messages))
        return cases

    def systems_in_round(self, number: int) -> tuple[str, ...]:
        """A B in odd rounds, B A in even ones: this VM's speed drifts over minutes, and with
        the same system always first the drift favoured it in every pair alike."""
        return self.systems if number % 2 else tuple(reversed(self.systems))

    def sessions_for(self, case: Case) -> list[int]:
        """smtp-source ``-s`` per part: ``sessions`` split in proportion to the messages,
        at least 1 each."""
        return split(self.sessions, [part.messages for part in case.parts], minimum=1)


class System:
    """What the runner needs from one system under test."""

    name: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def diagnostics(self) -> str:
        return ""


class PostfixSystem(System):
    name = "postfix"

    def __init__(self, root: Path, sink: SinkCluster, ca_file: Path, opts: Options) -> None:
        self.instance = PostfixInstance(root, PostfixConfig(
            port=free_port(), sink_port=sink.tls_port, ca_file=ca_file, password=sink.password,
            concurrency=opts.connections, tls_reuse=opts.postfix_tls_reuse,
            process_limit=opts.postfix_process_limit))

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def pids(self) -> list[int]:
        return self.instance.pids()

    @property
    def port(self) -> int:
        return self.instance.config.port

    def diagnostics(self) -> str:
        problems = self.instance.log_problems()
        queued = self.instance.queue_count()
        text = f"queue files left: {queued}"
        return text + ("\n" + "\n".join(problems) if problems else "")


class RelaySystem(System):
    name = "relay"

    def __init__(self, root: Path, sink: SinkCluster, ca_file: Path, opts: Options) -> None:
        self.process = RelayProcess(root, RelayConfig(
            port=free_port(), sink_port=sink.tls_port, metrics_port=free_port(),
            ca_file=ca_file, password=sink.password, connections=opts.connections,
            max_connections_per_client=max(1100, opts.idle_connections + 100),
            max_connections=max(2000, opts.idle_connections + 200),
            extra={"logging": {"level": opts.relay_log_level},
                   "workers": opts.relay_workers}))

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def pids(self) -> list[int]:
        return self.process.pids()

    @property
    def port(self) -> int:
        return self.process.config.port

    def diagnostics(self) -> str:
        return (f"spool files left: {self.process.spool_files()}\n"
                f"log tail:\n{self.process.log_tail(10)}")


def tree_cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the processes plus the reaped-children times (cutime+cstime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(value) for value in fields[11:15])
    return total / ticks


def _rate(count: float, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if seconds and seconds > 0 else None


class Runner:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.log = opts.log
        self.tmp = Path(tempfile.mkdtemp(prefix="infobip-relay-bench-"))
        self.tmp.chmod(0o711)
        if not opts.keep:
            on_exit(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.failures: list[str] = []
        self.sink: SinkCluster | None = None
        self.ca_file = self.tmp / "ca.pem"

    # ---------------------------------------------------------------- setup
    def _tls_material(self) -> tuple[Path, Path]:
        ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = self.tmp / "sink-cert.pem", self.tmp / "sink-key.pem"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        for path in (self.ca_file, cert_file):
            path.chmod(0o644)
        return cert_file, key_file

    def run(self) -> dict[str, Any]:
        opts = self.opts
        started = time.time()
        nofile = raise_nofile(max(65536, opts.idle_connections * 4))
        cert_file, key_file = self._tls_material()
        self.sink = SinkCluster(cert=str(cert_file), key=str(key_file), password=DEFAULT_API_KEY,
                                workers=opts.sink_workers).start()
        results: dict[str, Any] = {
            "meta": self._meta(nofile),
            "ceiling": {},
            "rounds": [],
        }
        try:
            if opts.ceiling:
                results["ceiling"] = self.run_ceiling()
            for number in range(1, opts.rounds + 1):
                entry: dict[str, Any] = {"round": number}
                for name in opts.systems_in_round(number):
                    entry[name] = self.run_system(name, number)
                results["rounds"].append(entry)
        finally:
            self.sink.stop()
        results["meta"]["duration_s"] = round(time.time() - started, 1)
        results["failures"] = self.failures
        results["ok"] = not self.failures
        return results

    def _meta(self, nofile: int) -> dict[str, Any]:
        opts = self.opts
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postfix": _postfix_version(),
            "rounds": opts.rounds,
            "order": [name for number in range(1, opts.rounds + 1)
                      for name in opts.systems_in_round(number)],
            "cases": [case.as_dict() for case in opts.cases],
            "sessions": opts.sessions,
            "upstream_connections": opts.connections,
            "relay_workers": opts.relay_workers,
            "probe_interval_s": opts.probe_interval,
            "idle_connections": opts.idle_connections,
            "postfix_tls_reuse": opts.postfix_tls_reuse,
            "sink_workers": opts.sink_workers,
            "quick": opts.quick,
            "rlimit_nofile": nofile,
            "command": " ".join(sys.argv),
        }

    # ---------------------------------------------------------------- ceiling
    def run_ceiling(self) -> dict[str, Any]:
        assert self.sink is not None
        sink = self.sink
        self.log(f"ceiling: smtp-source -> sink (plaintext port {sink.plain_port})")
        out: dict[str, Any] = {}
        sink.reset()
        for case in self.opts.cases:
            result = self.run_case(case, "ceiling", sink.plain_port, lambda: sink.pids,
                                   require_header=False)
            out[case.name] = result
        return out

    # ---------------------------------------------------------------- one system, one round
    def run_system(self, name: str, number: int) -> dict[str, Any]:
        assert self.sink is not None
        root = self.tmp / f"{name}-{number}"
        system: System = (RelaySystem if name == "relay" else PostfixSystem)(
            root, self.sink, self.ca_file, self.opts)
        self.sink.reset()
        out: dict[str, Any] = {"system": name, "round": number, "cases": {}}
        label = f"{name} round {number}"
        self.log(f"{label}: starting")
        try:
            t0 = time.monotonic()
            system.start()
            out["start_s"] = round(time.monotonic() - t0, 2)
        except Exception as exc:  # report and go on with the other system
            message = f"{label}: did not start: {exc}"
            self.log(f"FAIL {message}")
            self.failures.append(message)
            out["error"] = str(exc)
            with contextlib.suppress(Exception):
                system.stop()
            return out
        try:
            time.sleep(self.opts.settle)
            idle = sample_tree(system.pids())
            out["idle"] = {"rss_kib": idle.rss_kib, "pss_kib": idle.pss_kib,
                           "processes": idle.processes}
            self.log(f"{label}: idle RSS {idle.rss_kib / 1024:.1f} MiB "
                     f"(PSS {idle.pss_kib / 1024:.1f} MiB, {idle.processes} process(es))")
            if name == "relay" and self.opts.idle_connections > 0:
                out["idle_connections"] = self.run_idle_connections(system, label)
            for case in self.opts.cases:
                out["cases"][case.name] = self.run_case(case, label, system.port, system.pids)
                if not out["cases"][case.name]["ok"]:
                    diagnostics = system.diagnostics()
                    out["cases"][case.name]["diagnostics"] = diagnostics
                    self.log(diagnostics)
        finally:
            system.stop()
        return out

    def run_idle_connections(self, system: System, label: str) -> dict[str, Any]:
        count = self.opts.idle_connections
        held: dict[str, Any] = {}

        def measure() -> None:
            sample = sample_tree(system.pids())
            held.update(rss_kib=sample.rss_kib, pss_kib=sample.pss_kib)

        result = asyncio.run(load.hold_idle_connections(
            system.port, count, step_timeout=30.0, hold=1.0, during_hold=measure))
        out = result.as_dict() | held
        ok = result.greeted == count
        out["ok"] = ok
        line = (f"{label}: {count} idle connections: {result.greeted} greeted, "
                f"{result.refused} refused, {result.timed_out} timed out; RSS "
                f"{held.get('rss_kib', 0) / 1024:.1f} MiB")
        if not ok:
            self.failures.append(line)
            line = "FAIL " + line
        self.log(line)
        time.sleep(0.5)
        return out

    def run_case(self, case: Case, label: str, port: int, pids: Callable[[], list[int]],
                 *, require_header: bool = True) -> dict[str, Any]:
        assert self.sink is not None
        sink, opts = self.sink, self.opts
        tag = f"{label.replace(' ', '')}-{case.name}-{int(time.time() * 1000) % 10**8}"
        base = sink.stats()
        cpu0, sink_cpu0 = tree_cpu_seconds(pids()), tree_cpu_seconds(sink.pids)
        limit = case.time_limit()
        sessions = opts.sessions_for(case)
        with MemorySampler(pids, pss_every=5) as sampler:
            sources, probe = asyncio.run(self._load(port, case, sessions, tag, limit))
            target = base["unique"] + case.messages + probe.sent
            stats = sink.wait_unique(target, timeout=limit, stalled=60.0)
        cpu = tree_cpu_seconds(pids()) - cpu0
        sink_cpu = tree_cpu_seconds(sink.pids) - sink_cpu0
        seen = sink.dump()
        counts = [count_case(seen, expected=part.messages, match=smtp_source_match(source.pid),
                             require_header=require_header)
                  for part, source in zip(case.parts, sources, strict=True)]
        counted = CaseCount(expected=sum(c.expected for c in counts),
                            received=sum(c.received for c in counts),
                            unique=sum(c.unique for c in counts),
                            missing_header=sum(c.missing_header for c in counts))
        probe_count = count_case(seen, expected=probe.sent, match=load.probe_match(tag),
                                 require_header=require_header)
        complete = stats["unique"] >= target
        started = min(source.started for source in sources)
        accepted = max(source.started + source.seconds for source in sources) - started
        e2e = (stats["last_unique_ts"] - started
               if complete and stats["last_unique_ts"] else None)
        problems = []
        for part, source in zip(case.parts, sources, strict=True):
            if source.returncode != 0:
                problems.append(f"smtp-source ({_size(part.size)}) exit {source.returncode}"
                                f"{' (timed out)' if source.timed_out else ''}: "
                                f"{source.stderr.strip()[-300:]}")
        if not counted.ok:
            problems.append(_count_problem("messages", counted.as_dict()))
        if not probe_count.ok:
            problems.append(_count_problem("probe messages", probe_count.as_dict()))
        if probe.errors:
            problems.append(f"probe errors: {probe.errors[:3]}")
        mib = case.bytes / MIB
        result: dict[str, Any] = {
            "messages": case.messages,
            "size": case.size,
            "bytes": case.bytes,
            "sessions": sum(sessions),
            "accepted_s": round(accepted, 3),
            "accepted_rate": _rate(case.messages, accepted),
            "accepted_mib_s": _rate(mib, accepted),
            "e2e_s": round(e2e, 3) if e2e is not None else None,
            "e2e_rate": _rate(case.messages, e2e),
            "e2e_mib_s": _rate(mib, e2e),
            "latency": probe.summary() | {"size": case.probe_size},
            "peak_rss_kib": sampler.peak_rss_kib,
            "peak_pss_kib": sampler.peak_pss_kib,
            "peak_processes": sampler.peak_processes,
            "memory_samples": sampler.samples,
            "cpu_s": round(cpu, 2),
            "sink_cpu_s": round(sink_cpu, 2),
            "count": counted.as_dict(),
            "probe_count": probe_count.as_dict(),
            "parts": [{"messages": part.messages, "size": part.size, "sessions": count_sessions,
                       "accepted_s": round(source.seconds, 3), "count": part_count.as_dict(),
                       "smtp_source": _source_dict(source)}
                      for part, count_sessions, source, part_count
                      in zip(case.parts, sessions, sources, counts, strict=True)],
            "problems": problems,
            "ok": not problems,
        }
        if len(sources) == 1:
            result["smtp_source"] = _source_dict(sources[0])
        lat = result["latency"]
        line = (f"{label} {case.name} ({case.describe()}): accepted "
                f"{_fmt(result['accepted_rate'])}/s, end-to-end {_fmt(result['e2e_rate'])}/s "
                f"({_fmt(result['e2e_mib_s'])} MiB/s), latency ({_size(case.probe_size)}) "
                f"p50 {_fmt(lat['p50_ms'])} ms p99 {_fmt(lat['p99_ms'])} ms "
                f"(n={lat['samples']}), peak RSS {sampler.peak_rss_kib / 1024:.0f} MiB "
                f"(PSS {sampler.peak_pss_kib / 1024:.0f}), CPU {cpu:.1f}s (sink {sink_cpu:.1f}s)")
        if problems:
            message = f"{label} {case.name}: " + "; ".join(problems)
            self.failures.append(message)
            line += "\nFAIL " + "; ".join(problems)
        else:
            line += " - ok"
        self.log(line)
        return result

    async def _load(self, port: int, case: Case, sessions: list[int], tag: str,
                    limit: float) -> tuple[list[load.SourceResult], load.ProbeResult]:
        stop = asyncio.Event()
        probe_task = asyncio.create_task(load.run_probe(
            port, tag=tag, size=case.probe_size, stop=stop, interval=self.opts.probe_interval,
            step_timeout=min(60.0, limit)))
        try:
            sources = await asyncio.gather(*(
                load.run_smtp_source(port, messages=part.messages, size=part.size,
                                     sessions=count, time_limit=limit)
                for part, count in zip(case.parts, sessions, strict=True)))
        finally:
            stop.set()
        probe = await probe_task
        return list(sources), probe


def _source_dict(source: load.SourceResult) -> dict[str, Any]:
    return {"pid": source.pid, "returncode": source.returncode,
            "timed_out": source.timed_out, "stderr": source.stderr[-500:]}


def _count_problem(what: str, count: dict[str, Any]) -> str:
    parts = [f"{name} {count[name]}" for name in ("lost", "duplicates", "extra",
                                                   "missing_header") if count[name]]
    return f"{what}: " + ", ".join(parts) + f" (expected {count['expected']}, " \
        f"unique {count['unique']}, received {count['received']})"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _postfix_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    return None


def run_benchmark(opts: Options) -> dict[str, Any]:
    try:
        return Runner(opts).run()
    finally:
        run_cleanups()
