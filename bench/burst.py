"""Burst of large uploads: relay RSS while N clients each send one large message at once.

``python -m bench.burst --clients 40 --size-mib 18 [--relay-source DIR]``: starts the fake
Infobip sink and the relay (from ``--relay-source``, e.g. an exported older tree, else this
checkout), opens N sessions, sends one message of the given size on each at the same time,
waits until the sink has every message, and prints peak RSS (whole relay process tree, sampled
every 100 ms), the time to accept all, and RSS ``--settle`` seconds after the burst. Also the
acceptance latency of 2 KiB messages sent one at a time during the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import trustme

from bench import relayproc
from bench.load import _expect
from bench.procs import MemorySampler, free_port, on_exit, sample_tree
from bench.relayproc import RelayConfig, RelayProcess
from bench.sink import DEFAULT_API_KEY, SinkCluster

SENDER = "burst@bench.example.com"


def message(number: int, size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <rcpt{number}@example.net>\r\nDate: {formatdate()}\r\n"
            f"Message-Id: <burst.{number}@bench>\r\nSubject: burst {number}\r\n\r\n").encode()
    line = b"Y" * 76 + b"\r\n"
    return head + line * (size // len(line))


async def send_one(port: int, data: bytes, rcpt: str) -> float:
    """One session, one message; the seconds from the end of DATA to the 250."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, "220", 120)
        writer.write(b"EHLO burst.example.com\r\n")
        await _expect(reader, "250", 120)
        writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        for code in ("250", "250", "354"):
            await _expect(reader, code, 120)
        view = memoryview(data)
        for start in range(0, len(view), 256 * 1024):
            writer.write(view[start:start + 256 * 1024])
            await writer.drain()
        began = time.monotonic()
        writer.write(b".\r\n")
        await _expect(reader, "250", 600)
        writer.write(b"QUIT\r\n")
        return time.monotonic() - began
    finally:
        writer.close()


async def burst(port: int, clients: int, size: int) -> dict[str, Any]:
    stop = asyncio.Event()

    async def small_probe() -> list[float]:
        latencies, number = [], 0
        while not stop.is_set():
            number += 1
            latencies.append(await send_one(port, message(10_000 + number, 2048),
                                            f"probe{number}@example.net"))
            await asyncio.sleep(0.2)
        return latencies

    started = time.monotonic()
    probe = asyncio.create_task(small_probe())
    large = await asyncio.gather(*(send_one(port, message(n, size), f"rcpt{n}@example.net")
                                   for n in range(clients)))
    accepted = time.monotonic() - started
    stop.set()
    small = await probe
    return {"accepted_s": round(accepted, 2), "large_final_p50_s": sorted(large)[len(large) // 2],
            "small_probe_count": len(small),
            "small_p50_ms": round(1000 * sorted(small)[len(small) // 2], 1) if small else None,
            "small_max_ms": round(1000 * max(small), 1) if small else None}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--size-mib", type=float, default=18)
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--relay-source", type=Path, help="import the relay from this tree")
    args = parser.parse_args()
    if args.relay_source is not None:
        # RelayProcess puts PROJECT_ROOT first on the relay's PYTHONPATH.
        relayproc.PROJECT_ROOT = args.relay_source.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="infobip-relay-burst-"))
    tmp.chmod(0o711)
    on_exit(lambda: shutil.rmtree(tmp, ignore_errors=True))
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    sink = SinkCluster(cert=str(cert_file), key=str(key_file), password=DEFAULT_API_KEY).start()
    relay = RelayProcess(tmp / "relay", RelayConfig(
        port=free_port(), sink_port=sink.tls_port, metrics_port=free_port(), ca_file=ca_file,
        password=sink.password))
    relay.start()
    time.sleep(2)
    idle = sample_tree(relay.pids(), pss=False).rss_kib
    size = int(args.size_mib * 1024 * 1024)
    with MemorySampler(relay.pids) as sampler:
        began = time.monotonic()
        result = asyncio.run(burst(relay.config.port, args.clients, size))
        expected = args.clients + result["small_probe_count"]
        stats = sink.wait_unique(expected, timeout=600, stalled=120)
        delivered = time.monotonic() - began
    time.sleep(args.settle)
    after = sample_tree(relay.pids(), pss=False).rss_kib
    report = {"clients": args.clients, "size_mib": args.size_mib,
              "relay_source": str(relayproc.PROJECT_ROOT), "idle_rss_mib": idle // 1024,
              "peak_rss_mib": sampler.peak_rss_kib // 1024,
              f"rss_{int(args.settle)}s_after_mib": after // 1024,
              "expected": expected, "delivered_unique": stats["unique"],
              "all_delivered_s": round(delivered, 2), **result}
    print(json.dumps(report, indent=2))
    relay.stop()
    sink.stop()
    return 0 if stats["unique"] >= expected else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
