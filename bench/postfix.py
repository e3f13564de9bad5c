"""A private Postfix instance, configured as the same relay as infobip-relay.

Everything lives under one directory: ``etc/`` (main.cf, master.cf, maps), ``queue/``,
``data/`` and ``maillog``. The system's /etc/postfix is only read (postfix-files, as every
Postfix command does); the system instance is neither used nor touched. Needs root and
Debian's ``postfix`` + ``libsasl2-modules`` packages.

Relay setup (mirrors the relay's bench config):

* listener 127.0.0.1:PORT (smtpd), ``mynetworks = 127.0.0.0/8``,
  ``smtpd_relay_restrictions = permit_mynetworks, reject``, no local delivery;
* durable queue: Postfix's cleanup fsyncs every queue file before it answers 250 (default);
* upstream ``relayhost = [127.0.0.1]:SINKPORT`` over implicit TLS
  (``smtp_tls_wrappermode = yes``, ``smtp_tls_security_level = encrypt``) with AUTH PLAIN
  (``smtp_sasl_*``, texthash password map);
* ``check_sender_access`` PREPENDs ``X-IB-Client-Priority: LOW`` for the sender domain;
* ``smtp_destination_concurrency_limit`` = the relay's ``upstream.connections``;
* ``message_size_limit`` = the relay's 20 MiB (Postfix's default is 10,240,000 bytes);
* ``default_process_limit`` 100 (the default; caps the smtpd processes, i.e. concurrent
  client sessions; the burst raises it to its client count + 20).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import on_exit, process_tree, wait_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixConfig:
    port: int
    sink_port: int
    ca_file: Path
    password: str
    username: str = "App"
    sender_domain: str = "bench.example.com"
    header: str = "X-IB-Client-Priority: LOW"
    concurrency: int = 8
    process_limit: int = 100
    tls_reuse: bool = False
    # The relay's limit: its default, and Infobip's EHLO SIZE (20 MiB). Postfix's own default
    # (10,240,000 bytes) would refuse the 10 MiB messages.
    message_size_limit: int = 20 * 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    """``with PostfixInstance(root, config) as pf: ...`` writes, checks, starts and stops."""

    def __init__(self, root: Path, config: PostfixConfig) -> None:
        self.root = root
        self.config = config
        self.etc = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.maillog = root / "maillog"
        self._forget_cleanup: object = None
        self.running = False

    # ---------------------------------------------------------------- files
    def main_cf(self) -> dict[str, str]:
        c = self.config
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "bench-postfix.localdomain",
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:local delivery is disabled",
            "relayhost": f"[127.0.0.1]:{c.sink_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_sender_restrictions": f"check_sender_access texthash:{self.etc}/sender_access",
            "smtp_tls_wrappermode": "yes",
            "smtp_tls_security_level": "encrypt",
            "smtp_tls_CAfile": str(c.ca_file),
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": f"texthash:{self.etc}/sasl_passwd",
            "smtp_sasl_mechanism_filter": "plain",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_destination_concurrency_limit": str(c.concurrency),
            "default_process_limit": str(c.process_limit),
            "message_size_limit": str(c.message_size_limit),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
        }
        if c.tls_reuse:
            settings["smtp_tls_connection_reuse"] = "yes"
            settings["smtp_tls_session_cache_database"] = f"btree:{self.data}/smtp_scache"
        settings.update(c.extra)
        return settings

    def write(self) -> None:
        c = self.config
        self.root.mkdir(parents=True, exist_ok=True)
        # postfix (the mail_owner) must be able to walk to its queue and data directories
        for path in (self.root, *self.root.parents):
            if path == Path("/"):
                break
            mode = path.stat().st_mode
            if mode & 0o001 == 0:
                path.chmod(mode | 0o011)
        self.etc.mkdir(exist_ok=True)
        self.queue.mkdir(mode=0o755, exist_ok=True)  # owned by root, like /var/spool/postfix
        self.data.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        main = "".join(f"{name} = {value}\n" for name, value in self.main_cf().items())
        (self.etc / "main.cf").write_text(main)
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=c.port))
        (self.etc / "sender_access").write_text(f"{c.sender_domain} PREPEND {c.header}\n")
        passwd = self.etc / "sasl_passwd"
        passwd.write_text(f"[127.0.0.1]:{c.sink_port} {c.username}:{c.password}\n")
        passwd.chmod(0o600)

    # ---------------------------------------------------------------- control
    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def check(self) -> None:
        result = self._postfix("check")
        if result.returncode != 0:
            # Postfix writes fatal errors to stderr only when it is a terminal
            detail = result.stderr.strip() or self.log_tail(5) or "see maillog"
            raise PostfixError(f"postfix -c {self.etc} check failed: {detail} "
                               f"(run `script -qc 'postfix -c {self.etc} check'` to see why)")

    def start(self, timeout: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise PostfixError("the Postfix side needs root (postfix start)")
        self.write()
        self.check()
        self._forget_cleanup = on_exit(self.stop)
        result = self._postfix("start")
        if result.returncode != 0:
            raise PostfixError(f"postfix start failed: {result.stderr.strip()}\n"
                               f"{self.log_tail()}")
        self.running = True
        if not wait_port(self.config.port, timeout):
            raise PostfixError(f"Postfix does not accept on 127.0.0.1:{self.config.port}\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        self.running = False
        master = self.master_pid()
        result = self._postfix("stop")
        if result.returncode != 0:
            self._postfix("abort")
        # wait for the whole tree to be gone, then make sure
        deadline = time.monotonic() + timeout
        while master and time.monotonic() < deadline and Path(f"/proc/{master}").exists():
            time.sleep(0.1)
        if master and Path(f"/proc/{master}").exists():
            for pid in process_tree([master]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        """The master and all its children (smtpd, cleanup, qmgr, smtp, trivial-rewrite, ...)."""
        master = self.master_pid()
        return process_tree([master]) if master else []

    def queue_count(self) -> int:
        """Messages still in the incoming/active/deferred/hold queues."""
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            directory = self.queue / name
            if directory.is_dir():
                total += sum(len(files) for _, _, files in os.walk(directory))
        return total

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def log_problems(self, limit: int = 10) -> list[str]:
        """Warnings/errors/deferrals in the maillog (first ``limit``)."""
        found: list[str] = []
        with contextlib.suppress(OSError), self.maillog.open(errors="replace") as log:
            for line in log:
                if any(word in line for word in ("warning:", "fatal:", "error:", "panic:",
                                                 "status=deferred", "status=bounced")):
                    found.append(line.rstrip())
                    if len(found) >= limit:
                        break
        return found

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
