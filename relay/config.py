"""Configuration: YAML + environment -> frozen, validated objects.

This is the only module that reads the config file or environment variables for settings.
Every error names the exact key (``upstream.port: ...``) so that a user can fix it at once.
Sections are read with ``relay.settings`` (paths, converters, "did you mean", defaults taken
from the dataclass fields below), as the ``rules`` list is by ``relay.rules``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml

from relay.address import ascii_mailbox
from relay.envelope import DEFAULT_UPSTREAM
from relay.errors import ConfigError
from relay.infobip.regions import Region, find_region, region_names
from relay.netaddr import IPNetwork, network_of
from relay.pacing import DEFAULT_THROTTLE_PATTERNS, ThrottleClassifier
from relay.passwords import check_hash_format
from relay.rules import CLIENT_HEADER_POLICIES, Rule, compile_rules, rule_path
from relay.settings import (
    Section,
    boolean,
    choice,
    describe,
    did_you_mean,
    item_path,
    join,
    networks,
    path_in,
    positive_int,
    string_list,
)
from relay.tlsconfig import client_context, server_context
from relay.units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

ListenerTLS = Literal["none", "starttls", "implicit"]
ListenerAuth = Literal["none", "optional", "required"]
UpstreamTLS = Literal["starttls", "implicit"]
NullSender = Literal["refuse", "rewrite"]
LogFormat = Literal["text", "json"]
# Whether the upstream sessions run in a process of their own (relay.upstreamproc).
UpstreamProcessMode = Literal["auto", "on", "off"]

# Infobip advertises SIZE 20971520; accepting more would only move the refusal to the upstream,
# after the client was told 250.
DEFAULT_MAX_MESSAGE_SIZE = 20 * 1024 * 1024
DEFAULT_LISTEN = ("127.0.0.1", 2525)
DEFAULT_METRICS = ("127.0.0.1", 9465)
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
_LOOPBACK = networks(LOOPBACK_NETWORKS)
CONFIG_ENV = "INFOBIP_RELAY_CONFIG"


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    address: str
    port: int
    tls: ListenerTLS = "none"
    certificate: Path | None = None
    private_key: Path | None = None
    auth: ListenerAuth = "none"
    client_headers: str = "fix"
    allowed_senders: tuple[str, ...] = ()
    # Every connection starts with a PROXY v1/v2 header from one of access.trusted_proxies.
    proxy_protocol: bool = False

    @property
    def is_loopback(self) -> bool:
        return _is_loopback_address(self.address)


@dataclass(frozen=True, slots=True)
class UserConfig:
    name: str
    password_hash: Secret
    allowed_senders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessConfig:
    trusted_networks: tuple[IPNetwork, ...] = _LOOPBACK
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = 100
    max_connections: int = 2000
    max_connections_per_client: int = 500
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    allow_open_relay: bool = False
    # MAIL FROM:<> (bounces, delivery notices): Infobip needs a sender, so either refuse it or
    # send it as null_sender_address.
    null_sender: NullSender = "refuse"
    null_sender_address: str | None = None
    # Peers allowed to send PROXY headers on proxy_protocol listeners (and only those).
    trusted_proxies: tuple[IPNetwork, ...] = ()

    def is_trusted(self, ip: str) -> bool:
        return network_of(ip, self.trusted_networks) is not None

    def is_trusted_proxy(self, ip: str) -> bool:
        return network_of(ip, self.trusted_proxies) is not None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    host: str
    port: int
    tls: UpstreamTLS
    username: str
    password: Secret
    region: str | None = "europe"
    auth_mechanism: Literal["auto", "PLAIN", "LOGIN"] = "auto"
    connections: int = 8
    ca_file: Path | None = None
    timeout: float = 60.0
    # An idle TLS session keeps about 0.8 MiB of OpenSSL's buffers once it has sent large mail:
    # 8 of them kept the relay's RSS 6-7 MiB up for a minute after a burst. Postfix's
    # connection cache lets an idle session go after 2 s; 20 s still carries bursty traffic.
    idle_timeout: float = 20.0
    # The wait for the reply to the final dot only (RFC 5321 4.5.3.2: 10 minutes). Giving up
    # sooner leaves the outcome unknown and a retry may duplicate the message.
    data_timeout: float = 600.0
    password_file: Path | None = None  # where password came from, for permission_warnings()
    # Messages per second to this upstream (None: unlimited), split across the worker
    # processes; the pace drops below it while the upstream answers with throttling replies.
    rate: float | None = None
    # Regular expressions (case-insensitive; a plain word matches as a substring) that make a
    # 421/450/451/454 reply a throttling one (relay.pacing).
    throttle_patterns: tuple[str, ...] = DEFAULT_THROTTLE_PATTERNS
    # ``default`` for the top-level ``upstream``, the key under ``upstreams`` for the others:
    # what rules `route` to, the metrics label and the name in logs and /readyz.
    name: str = DEFAULT_UPSTREAM

    def ssl_context(self) -> ssl.SSLContext:
        return client_context(self.ca_file)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    path: Path
    max_age: float = 5 * 86400.0
    retry_initial: float = 30.0
    retry_max: float = 1800.0
    keep_delivered: float = 86400.0
    auth_retry: float = 300.0
    # New mail is refused (452) below this much free space on the spool's file system, so that
    # outcomes of mail already accepted can always be recorded. Default: 1.5 x the largest
    # message, as Postfix's smtpd requires.
    min_free_space: int = 0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: str = DEFAULT_METRICS[0]
    port: int = DEFAULT_METRICS[1]
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class PullConfig:
    """Poll Infobip's one-time reports API (works behind NAT: no inbound port)."""

    base_url: str
    api_key: Secret
    interval: float = 30.0
    ca_file: Path | None = None
    api_key_file: Path | None = None  # where api_key came from, for permission_warnings()

    def ssl_context(self) -> ssl.SSLContext:
        return client_context(self.ca_file)


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Receive Infobip's report and tracking POSTs."""

    token: Secret
    address: str = "127.0.0.1"
    port: int = 9470
    path: str = "/infobip/reports"
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    pull: PullConfig | None = None
    webhook: WebhookConfig | None = None
    # X-IB-Callback-Data for messages without one ({queue_id} is replaced); None: leave it.
    callback_data: str | None = "{queue_id}"
    # Envelope and From: of RFC 3464 DSNs; None: no DSNs.
    bounce_sender: str | None = None

    @property
    def enabled(self) -> bool:
        return self.pull is not None or self.webhook is not None

    def notify_url(self) -> str | None:
        """X-IB-Notify-Url for messages without one: the public URL with the token in it."""
        if self.webhook is None or self.webhook.public_url is None:
            return None
        separator = "&" if "?" in self.webhook.public_url else "?"
        return f"{self.webhook.public_url}{separator}token={self.webhook.token.reveal()}"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    access: AccessConfig
    upstream: UpstreamConfig
    queue: QueueConfig
    rules: tuple[Rule, ...] = ()
    users: tuple[UserConfig, ...] = ()
    # The named upstreams besides ``upstream`` (which is ``default``), in the file's order.
    upstreams: tuple[UpstreamConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    hostname: str = "localhost"
    grace_period: float = 30.0
    workers: int = 1
    # auto: on when the relay may use more CPUs than it has workers.
    upstream_process: UpstreamProcessMode = "auto"
    source: str = "environment"

    def user(self, name: str) -> UserConfig | None:
        for user in self.users:
            if user.name == name:
                return user
        return None

    @property
    def all_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """``upstream`` (named ``default``) first, then the named ``upstreams``."""
        return (self.upstream, *self.upstreams)

    def upstream_named(self, name: str) -> UpstreamConfig | None:
        for upstream in self.all_upstreams:
            if upstream.name == name:
                return upstream
        return None


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration; with no path, configure from the environment alone.

    Raises ConfigError with a precise message on any problem.
    """
    env = dict(os.environ if environ is None else environ)
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    if path is None:
        return _build({}, env, source="environment")
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {file_path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {file_path} is not UTF-8 text") from None
    raw = _parse_yaml(text, file_path)
    try:
        raw = _expand_env(raw, env, "")
    except RecursionError:
        raise ConfigError("", f"{file_path}: recursive YAML alias") from None
    return _build(raw, env, source=str(file_path), base_dir=file_path.parent)


def _parse_yaml(text: str, file_path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{file_path}{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{file_path}: the top level must be a mapping of settings")
    return raw


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the parsed YAML."""
    if isinstance(value, dict):
        return {key: _expand_env(item, env, join(path, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_env(item, env, _item_path(path, index, item, env))
                for index, item in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set")

        return _ENV_REF.sub(substitute, value)
    return value


def _item_path(path: str, index: int, item: Any, env: Mapping[str, str]) -> str:
    """``listeners[0]``; a rule's path also names it, exactly as the rules compiler does."""
    if path != "rules":
        return item_path(path, index)
    name = item.get("name") if isinstance(item, dict) else None
    return rule_path(path, index, _expand_env(name, env, f"{item_path(path, index)}.name"))


def _build(raw: dict[str, Any], env: Mapping[str, str], *, source: str,
           base_dir: Path | None = None) -> Config:
    top = Section(raw, "", model=Config, env=env)
    access = _build_access(top.get("access"), env)
    listeners = _build_listeners(top.get("listeners"), env, base_dir)
    users = _build_users(top.get("users"))
    upstream = _build_upstream(top.get("upstream"), env, base_dir)
    upstreams = _build_named_upstreams(top.get("upstreams"), base_dir)
    queue = _build_queue(top.get("queue"), env, base_dir, access.max_message_size)
    metrics = _build_metrics(top.get("metrics"), env)
    logging_config = _build_logging(top.get("logging"))
    reports = _build_reports(top.get("reports"), env, base_dir, upstream.password)
    rules = compile_rules(top.get("rules"), "rules")
    _check_routes(rules, (upstream, *upstreams))
    hostname = top.convert("hostname", _hostname, socket.gethostname() or top.default("hostname"))
    grace = top.convert("grace_period", parse_duration)
    workers = top.convert("workers", _workers, var="RELAY_WORKERS")
    upstream_process = top.convert("upstream_process", _upstream_process,
                                   var="RELAY_UPSTREAM_PROCESS")
    top.finish()
    config = Config(
        listeners=listeners, access=access, upstream=upstream, queue=queue, rules=rules,
        users=users, metrics=metrics, logging=logging_config, reports=reports, hostname=hostname,
        grace_period=grace, workers=workers, upstream_process=upstream_process, source=source,
        upstreams=upstreams,
    )
    _check_relay_policy(config)
    _check_proxy_protocol(config)
    return config


def _workers(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, 64))
    count = positive_int(value)
    if count > 64:
        raise ValueError("at most 64 workers")
    return count


def _upstream_process(value: object) -> UpstreamProcessMode:
    """auto | on | off; YAML's true/false (and the environment's) mean on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    word = str(value).strip().lower()
    word = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off",
            "0": "off"}.get(word, word)
    if word not in get_args(UpstreamProcessMode):
        raise ValueError("must be auto, on or off")
    return cast(UpstreamProcessMode, word)


def _hostname(value: object) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", text):
        raise ValueError(f"not a valid host name: {text!r}")
    return text


def _host_port(value: str, what: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not match:
        raise ConfigError(what, f"expected host:port, got {value!r}")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    try:
        return host, _port(match.group(2) or match.group(4), allow_zero=True)
    except ValueError as exc:
        raise ConfigError(what, str(exc)) from None


def _port(value: object, *, allow_zero: bool = False) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        port = int(str(value))
    except ValueError:
        raise ValueError(f"expected a port number, got {value!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


_listen_port = partial(_port, allow_zero=True)


def _build_access(raw: object, env: Mapping[str, str]) -> AccessConfig:
    section = Section(raw, "access", model=AccessConfig, env=env)
    access = AccessConfig(
        trusted_networks=section.convert("trusted_networks", networks,
                                         var="RELAY_TRUSTED_NETWORKS"),
        max_message_size=section.convert("max_message_size", parse_size),
        max_recipients=section.convert("max_recipients", positive_int),
        max_connections=section.convert("max_connections", positive_int),
        max_connections_per_client=section.convert("max_connections_per_client", positive_int),
        command_timeout=section.convert("command_timeout", parse_duration),
        data_timeout=section.convert("data_timeout", parse_duration),
        allow_open_relay=section.convert("allow_open_relay", boolean),
        trusted_proxies=section.convert("trusted_proxies", networks),
        **_null_sender_policy(section),
    )
    section.finish()
    if access.max_message_size < 1024:
        raise ConfigError("access.max_message_size", "must be at least 1KiB")
    return access


def _null_sender_policy(section: Section) -> dict[str, Any]:
    address = section.convert("null_sender_address", _mailbox)
    policy = section.convert("null_sender", choice(*get_args(NullSender)),
                             "rewrite" if address else section.default("null_sender"))
    if policy == "rewrite" and not address:
        raise ConfigError(section.at("null_sender_address"),
                          "required when null_sender is rewrite (e.g. postmaster@example.com)")
    return {"null_sender": policy, "null_sender_address": address}


def _mailbox(value: Any) -> str:
    return ascii_mailbox(str(value).strip())


def _build_listeners(raw: object, env: Mapping[str, str],
                     base_dir: Path | None) -> tuple[ListenerConfig, ...]:
    if raw is None:
        address, port = DEFAULT_LISTEN
        if env.get("RELAY_LISTEN"):
            address, port = _host_port(env["RELAY_LISTEN"], "RELAY_LISTEN")
        return (ListenerConfig(name="local", address=address, port=port),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("listeners", "expected a non-empty list of listeners")
    listeners = tuple(_build_listener(item, item_path("listeners", index), base_dir)
                      for index, item in enumerate(raw))
    seen: set[str] = set()
    for index, listener in enumerate(listeners):
        if listener.name in seen:
            raise ConfigError(f"{item_path('listeners', index)}.name",
                              f"duplicate listener name {listener.name!r}")
        seen.add(listener.name)
    return listeners


def _build_listener(raw: object, path: str, base_dir: Path | None) -> ListenerConfig:
    section = Section(raw, path, model=ListenerConfig)
    default_name = f"listener{path[path.index('[') + 1:-1]}"
    name = str(section.get("name", default_name))
    address = str(section.get("address", DEFAULT_LISTEN[0]))
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if address != "localhost":
            raise ConfigError(section.at("address"),
                              f"expected an IP address to bind (0.0.0.0, ::, 127.0.0.1), "
                              f"got {address!r}") from None
    port = section.convert("port", _listen_port, DEFAULT_LISTEN[1])
    tls = cast(ListenerTLS, section.convert("tls", choice(*get_args(ListenerTLS))))
    certificate = section.convert("certificate", path_in(base_dir))
    private_key = section.convert("private_key", path_in(base_dir))
    auth = cast(ListenerAuth, section.convert("auth", choice(*get_args(ListenerAuth))))
    client_headers = section.convert("client_headers", choice(*CLIENT_HEADER_POLICIES))
    allowed = section.convert("allowed_senders", string_list)
    proxy_protocol = section.convert("proxy_protocol", boolean)
    section.finish()
    if tls != "none":
        _check_certificate(certificate, private_key, path)
    elif certificate or private_key:
        raise ConfigError(section.at("certificate"), "given but tls is none: set tls: starttls "
                                                     "or tls: implicit")
    return ListenerConfig(name=name, address=address, port=port, tls=tls, certificate=certificate,
                          private_key=private_key, auth=auth, client_headers=client_headers,
                          allowed_senders=allowed, proxy_protocol=proxy_protocol)


def _check_certificate(certificate: Path | None, private_key: Path | None, path: str) -> None:
    if certificate is None:
        raise ConfigError(f"{path}.certificate", "required when tls is starttls or implicit")
    if private_key is None:
        raise ConfigError(f"{path}.private_key", "required when tls is starttls or implicit")
    for key, file in (("certificate", certificate), ("private_key", private_key)):
        if not file.is_file():
            raise ConfigError(f"{path}.{key}", f"file not found: {file}")
    try:
        server_context(certificate, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}.certificate", f"file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{path}.certificate",
                          f"cannot load certificate/private key: {exc}") from None


def _build_users(raw: object) -> tuple[UserConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("users", "expected a list of {name, password_hash, allowed_senders}")
    users = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        section = Section(item, item_path("users", index), model=UserConfig)
        name = section.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(section.at("name"), "required: the user name clients log in with")
        if name in seen:
            raise ConfigError(section.at("name"), f"duplicate user name {name!r}")
        seen.add(name)
        password_hash = str(section.get("password_hash", ""))
        try:
            check_hash_format(password_hash)
        except ValueError as exc:
            raise ConfigError(section.at("password_hash"), str(exc)) from None
        allowed = section.convert("allowed_senders", string_list)
        section.finish()
        users.append(UserConfig(name=name, password_hash=Secret(password_hash),
                                allowed_senders=allowed))
    return tuple(users)


def _build_upstream(raw: object, env: Mapping[str, str], base_dir: Path | None, *,
                    path: str = "upstream", name: str = DEFAULT_UPSTREAM) -> UpstreamConfig:
    section = Section(raw, path, model=UpstreamConfig, env=env)
    region = section.convert("region", _region, _region(section.default("region")),
                             var="INFOBIP_REGION")
    host = str(section.get("host") or env.get("INFOBIP_SMTP_HOST") or region.host)
    port = section.convert("port", _port, 587, var="INFOBIP_SMTP_PORT")
    tls_choice = section.convert("tls", choice("auto", "starttls", "implicit", "none"), "auto",
                                 var="INFOBIP_SMTP_TLS")
    tls = _upstream_tls(tls_choice, port, section)
    host_overridden = section.has("host") or bool(env.get("INFOBIP_SMTP_HOST"))
    if not host_overridden and port not in region.ports:
        offered = " and ".join(str(p) for p in region.ports)
        raise ConfigError(section.at("port"),
                          f"region {region.name} ({region.host}) offers port {offered} only, "
                          f"not {port}")
    username = str(section.get("username", "App"))
    password, password_file = _upstream_password(section, env, base_dir)
    mechanism = section.convert("auth_mechanism", _auth_mechanism)
    connections = section.convert("connections", positive_int)
    ca_file = section.convert("ca_file", path_in(base_dir))
    timeout = section.convert("timeout", parse_duration)
    idle_timeout = section.convert("idle_timeout", parse_duration)
    data_timeout = section.convert("data_timeout", parse_duration)
    rate = section.convert("rate", parse_rate)
    throttle_patterns = section.convert("throttle_patterns", _throttle_patterns)
    section.finish()
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(section.at("ca_file"), f"file not found: {ca_file}")
    if connections > 256:
        raise ConfigError(section.at("connections"), "at most 256 connections")
    return UpstreamConfig(
        host=host, port=port, tls=tls, username=username, password=password,
        region=region.name, auth_mechanism=mechanism,
        connections=connections, ca_file=ca_file, timeout=timeout, idle_timeout=idle_timeout,
        data_timeout=data_timeout,
        password_file=password_file, rate=rate, throttle_patterns=throttle_patterns, name=name,
    )


def _throttle_patterns(value: object) -> tuple[str, ...]:
    patterns = string_list(value)
    ThrottleClassifier(patterns)  # refuses what does not compile, or matches every reply
    return patterns


_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _build_named_upstreams(raw: object, base_dir: Path | None) -> tuple[UpstreamConfig, ...]:
    """``upstreams: {name: {same keys as upstream}}``.

    The environment's INFOBIP_* defaults belong to ``upstream`` alone: another account's key
    or region must be written down, never inherited from the default one.
    """
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("upstreams", f"must be a mapping of name: upstream settings, got "
                                       f"{describe(raw)}")
    named = []
    for name, settings in raw.items():
        path = join("upstreams", str(name))
        if not isinstance(name, str) or not _UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(path, "an upstream name is 1-64 letters, digits, '.', '_' or '-'"
                                    " (it is a metrics label)")
        if name == DEFAULT_UPSTREAM:
            raise ConfigError(path, f"{DEFAULT_UPSTREAM!r} is the name of the top-level "
                                    "upstream: configure it there")
        named.append(_build_upstream(settings, {}, base_dir, path=path, name=name))
    return tuple(named)


def _check_routes(rules: tuple[Rule, ...], upstreams: tuple[UpstreamConfig, ...]) -> None:
    """Every ``route`` names a configured upstream."""
    names = [upstream.name for upstream in upstreams]
    for rule in rules:
        if rule.route is not None and rule.route not in names:
            hint = did_you_mean(rule.route, names)
            raise ConfigError(f"{rule_path('rules', rule.index, rule.name)}.route",
                              f"unknown upstream {rule.route!r}{hint} (configured: "
                              f"{', '.join(names)})")


def _auth_mechanism(value: Any) -> Literal["auto", "PLAIN", "LOGIN"]:
    text = str(value).strip().upper()
    if text not in ("AUTO", "PLAIN", "LOGIN"):
        raise ValueError(f"must be one of auto, PLAIN, LOGIN, got {value!r}")
    return "auto" if text == "AUTO" else cast(Literal["PLAIN", "LOGIN"], text)


def _region(value: Any) -> Region:
    region = find_region(str(value))
    if region is None:
        hint = did_you_mean(str(value), region_names())
        raise ValueError(f"unknown region {value!r}{hint}; valid: {', '.join(region_names())} "
                         f"(see `infobip-relay regions`)")
    return region


def _upstream_tls(tls: str, port: int, section: Section) -> UpstreamTLS:
    if tls == "none":
        raise ConfigError(section.at("tls"),
                          "TLS to Infobip is mandatory: use auto, starttls or implicit")
    if tls != "auto":
        return cast(UpstreamTLS, tls)
    if port == 465:
        return "implicit"
    if port == 587:
        return "starttls"
    raise ConfigError(section.at("tls"),
                      f"port {port} is neither 587 (STARTTLS) nor 465 (implicit TLS): "
                      f"set tls: starttls or tls: implicit")


def _upstream_password(section: Section, env: Mapping[str, str],
                       base_dir: Path | None) -> tuple[Secret, Path | None]:
    """The API key and the file it came from, if any.

    In order: the file's password or password_file, then $INFOBIP_API_KEY, then the file named
    by $INFOBIP_API_KEY_FILE (Docker secrets, systemd's LoadCredential=: no key in the
    environment of the process).
    """
    password = section.get("password")
    password_file = section.convert("password_file", path_in(base_dir))
    if password is not None and password_file is not None:
        raise ConfigError(section.at("password_file"), "give password or password_file, not both")
    source = ""
    if password is None and password_file is None and not env.get("INFOBIP_API_KEY") and \
            env.get("INFOBIP_API_KEY_FILE"):
        # Taken as given (from the working directory), as the environment's other paths.
        password_file = Path(env["INFOBIP_API_KEY_FILE"])
        source = " (from INFOBIP_API_KEY_FILE)"
    if password_file is not None:
        return _secret_file(password_file, section.at("password_file"), source), password_file
    if password is None:
        password = env.get("INFOBIP_API_KEY")
    if not password:
        where = "INFOBIP_API_KEY (or INFOBIP_API_KEY_FILE), " if section.path == "upstream" \
            else ""
        raise ConfigError(section.at("password"),
                          f"no API key: set {where}{section.at('password')} or "
                          f"{section.at('password_file')}")
    return Secret(str(password)), None


def _secret_file(path: Path, key: str, source: str = "") -> Secret:
    """The secret in ``path`` (surrounding whitespace dropped); ConfigError at ``key``."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}{source}: {exc.strerror}") from None
    if not text:
        raise ConfigError(key, f"{path}{source} is empty")
    return Secret(text)


def _build_queue(raw: object, env: Mapping[str, str], base_dir: Path | None,
                 max_message_size: int) -> QueueConfig:
    section = Section(raw, "queue", model=QueueConfig)
    # The environment's path is taken as given (from the working directory), the file's from
    # the file's directory.
    default_path = Path(env.get("RELAY_QUEUE_PATH") or "./spool")
    queue = QueueConfig(
        path=section.convert("path", path_in(base_dir), default_path),
        max_age=section.convert("max_age", parse_duration),
        retry_initial=section.convert("retry_initial", parse_duration),
        retry_max=section.convert("retry_max", parse_duration),
        keep_delivered=section.convert("keep_delivered", parse_duration),
        auth_retry=section.convert("auth_retry", parse_duration),
        min_free_space=section.convert("min_free_space", parse_size, max_message_size * 3 // 2),
    )
    section.finish()
    if queue.retry_initial <= 0:
        raise ConfigError("queue.retry_initial", "must be greater than 0")
    if queue.retry_max < queue.retry_initial:
        raise ConfigError("queue.retry_max", "must not be less than queue.retry_initial")
    return queue


def _build_metrics(raw: object, env: Mapping[str, str]) -> MetricsConfig:
    if raw is False:
        return MetricsConfig(enabled=False)
    section = Section(raw, "metrics", model=MetricsConfig)
    address, port = section.default("address"), section.default("port")
    if env.get("RELAY_METRICS_LISTEN"):
        address, port = _host_port(env["RELAY_METRICS_LISTEN"], "RELAY_METRICS_LISTEN")
    metrics = MetricsConfig(
        address=str(section.get("address", address)),
        port=section.convert("port", _listen_port, port),
        enabled=section.convert("enabled", boolean),
    )
    section.finish()
    return metrics


def _build_logging(raw: object) -> LoggingConfig:
    section = Section(raw, "logging", model=LoggingConfig)
    config = LoggingConfig(
        level=section.convert("level", choice("debug", "info", "warning", "error")),
        format=section.convert("format", choice(*get_args(LogFormat))),
    )
    section.finish()
    return config


def _build_reports(raw: object, env: Mapping[str, str], base_dir: Path | None,
                   upstream_key: Secret) -> ReportsConfig:
    section = Section(raw, "reports", model=ReportsConfig,
                      keys=("pull", "webhook", "callback_data", "bounces"))
    pull = _build_pull(section.get("pull"), base_dir, upstream_key) \
        if section.has("pull") else None
    webhook = _build_webhook(section.get("webhook"), env) if section.has("webhook") else None
    # Written as null, callback_data leaves the header alone; left out, it takes the default.
    callback_data = section.convert("callback_data", _callback_template, None) \
        if "callback_data" in section.raw else section.default("callback_data")
    bounces = Section(section.get("bounces"), section.at("bounces"), keys=("sender",))
    sender = bounces.convert("sender", _mailbox, None)
    bounces.finish()
    section.finish()
    return ReportsConfig(pull=pull, webhook=webhook, callback_data=callback_data,
                         bounce_sender=sender)


def _callback_template(value: Any) -> str:
    text = str(value)
    try:
        text.format(queue_id="")
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"only {{queue_id}} may be replaced in {text!r}") from None
    if not text or len(text.format(queue_id="X" * 23)) > 4000:
        raise ValueError("must be 1 to 4000 characters (Infobip's limit)")
    return text


def _build_pull(raw: object, base_dir: Path | None, upstream_key: Secret) -> PullConfig:
    section = Section(raw, "reports.pull", model=PullConfig)
    base_url = section.convert("base_url", _https_base_url, None)
    if base_url is None:
        raise ConfigError(section.at("base_url"), "required: the account's API base URL, e.g. "
                          "https://xxxxx.api.infobip.com (not the SMTP host)")
    interval = section.convert("interval", parse_duration)
    if interval < 1:
        raise ConfigError(section.at("interval"), "must be at least 1s")
    ca_file = section.convert("ca_file", path_in(base_dir))
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(section.at("ca_file"), f"file not found: {ca_file}")
    key_file = section.convert("api_key_file", path_in(base_dir))
    api_key = _pull_api_key(section, key_file, upstream_key)
    section.finish()
    return PullConfig(base_url=base_url, api_key=api_key, interval=interval, ca_file=ca_file,
                      api_key_file=key_file)


def _pull_api_key(section: Section, key_file: Path | None, upstream_key: Secret) -> Secret:
    """reports.pull.api_key or api_key_file; by default the upstream password (same key)."""
    given = section.get("api_key")
    if given is not None and key_file is not None:
        raise ConfigError(section.at("api_key_file"), "give api_key or api_key_file, not both")
    if key_file is not None:
        return _secret_file(key_file, section.at("api_key_file"))
    if given is not None:
        if not str(given).strip():
            raise ConfigError(section.at("api_key"), "is empty")
        return Secret(str(given).strip())
    return upstream_key


def _https_base_url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    match = re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d{1,5})?", text)
    if not match:
        raise ValueError(f"expected https://host[:port] with no path, got {text!r}; TLS is "
                         "mandatory")
    return text


def _build_webhook(raw: object, env: Mapping[str, str]) -> WebhookConfig:
    section = Section(raw, "reports.webhook", model=WebhookConfig, env=env)
    token = str(section.get("token") or "").strip()
    if not token:
        raise ConfigError(section.at("token"), "required when the webhook is on (Infobip sends "
                          "it back as ?token=...): e.g. token: ${RELAY_REPORTS_TOKEN}")
    if len(token) < 16:
        raise ConfigError(section.at("token"), "must be at least 16 characters")
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise ConfigError(section.at("token"),
                          "only letters, digits and . _ ~ - (it goes into a URL as it is)")
    path = str(section.get("path", section.default("path")))
    if not path.startswith("/") or "?" in path or " " in path:
        raise ConfigError(section.at("path"), f"expected a URL path such as /infobip/reports, "
                          f"got {path!r}")
    webhook = WebhookConfig(
        token=Secret(token),
        address=str(section.get("address", section.default("address"))),
        port=section.convert("port", _listen_port),
        path=path,
        public_url=section.convert("public_url", _public_url, None),
    )
    section.finish()
    return webhook


def _public_url(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?(\?[^\s#]*)?", text):
        raise ValueError(f"expected an absolute http(s) URL, got {text!r}")
    if re.search(r"[?&]token=", text):
        raise ValueError("leave the token out: the relay adds ?token=... itself")
    return text


def _check_relay_policy(config: Config) -> None:
    """Refuse configurations that would make an open relay or lock every client out."""
    too_wide = overly_public_networks(config.access.trusted_networks)
    for index, listener in enumerate(config.listeners):
        path = item_path("listeners", index)
        if listener.auth != "none" and not config.users:
            raise ConfigError(f"{path}.auth", f"auth: {listener.auth} needs at least one entry "
                                              "in users:")
        if listener.is_loopback or listener.auth == "required":
            continue
        if too_wide and not config.access.allow_open_relay:
            names = ", ".join(str(network) for network in too_wide)
            raise ConfigError("access.trusted_networks",
                              f"{names} together trust more than a /8 of public IPv4 or a /16 of "
                              f"public IPv6 addresses on listener {listener.name!r} "
                              f"({listener.address}): that is an open relay. Narrow it, require "
                              "auth, or set access.allow_open_relay: true")
        remote_trusted = [n for n in config.access.trusted_networks if not n.is_loopback]
        if not remote_trusted and listener.auth == "none" and not config.access.allow_open_relay:
            raise ConfigError(path, f"listener {listener.name!r} binds {listener.address} but only "
                                    "loopback clients are trusted and auth is none: set "
                                    "access.trusted_networks (e.g. 10.0.0.0/8) or auth: required")


def _check_proxy_protocol(config: Config) -> None:
    """A PROXY listener with no trusted proxy would refuse every connection: say so at load."""
    if config.access.trusted_proxies:
        return
    for index, listener in enumerate(config.listeners):
        if listener.proxy_protocol:
            raise ConfigError(f"{item_path('listeners', index)}.proxy_protocol",
                              f"listener {listener.name!r} expects PROXY headers, but "
                              "access.trusted_proxies is empty: list the addresses of the "
                              "proxies (e.g. [10.0.5.10/32]), or set proxy_protocol: false")


# IANA special-purpose IPv4 ranges (RFC 6890 and successors): no public client comes from them.
_NON_PUBLIC_V4 = tuple(ipaddress.IPv4Network(network) for network in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
# Global unicast; ULA, link-local, multicast and IPv4-mapped space lie outside it.
_PUBLIC_V6 = ipaddress.IPv6Network("2000::/3")
# A trusted union larger than this can only be a mistake: the largest single allocations are
# /8s, and nobody trusts all of one to relay. 0.0.0.0/1 + 128.0.0.0/1 is as open as /0.
_MAX_PUBLIC = {4: 2 ** 24, 6: 2 ** 112}


def public_addresses(network: IPNetwork) -> int:
    """How many addresses of ``network`` are public (routable on the internet)."""
    if isinstance(network, ipaddress.IPv4Network):
        return network.num_addresses - sum(_overlap(network, private)
                                           for private in _NON_PUBLIC_V4)
    return _overlap(network, _PUBLIC_V6)


def _overlap(a: IPNetwork, b: IPNetwork) -> int:
    # Two CIDR networks are nested or disjoint, so the overlap is the smaller one or nothing.
    if a.version != b.version:
        return 0
    if a.subnet_of(b):  # type: ignore[arg-type]
        return a.num_addresses
    if b.subnet_of(a):  # type: ignore[arg-type]
        return b.num_addresses
    return 0


def overly_public_networks(networks: tuple[IPNetwork, ...]) -> list[IPNetwork]:
    """The entries that make the union of ``networks`` cover too much public space, or []."""
    offending: list[IPNetwork] = []
    for version, limit in _MAX_PUBLIC.items():
        mine = [network for network in networks if network.version == version]
        union = ipaddress.collapse_addresses(mine)  # type: ignore[type-var]
        if sum(public_addresses(network) for network in union) > limit:
            offending += sorted((n for n in mine if public_addresses(n)),
                                key=lambda n: n.num_addresses, reverse=True)
    return offending


def _is_loopback_address(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- reporting


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets replaced, for `check-config`."""
    return cast(dict[str, Any], _plain(config))


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return "********" if value else ""
    if isinstance(value, Rule):
        return value.name
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_field(f.name, getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


_SIZE_FIELDS = {"max_message_size", "min_free_space"}
_DURATION_FIELDS = {"interval", "max_age", "retry_initial", "retry_max", "keep_delivered",
                    "auth_retry", "command_timeout", "data_timeout", "timeout", "idle_timeout",
                    "grace_period"}


def _plain_field(name: str, value: Any) -> Any:
    if name == "rate":
        return "unlimited" if value is None else format_rate(value)
    if name in _SIZE_FIELDS and isinstance(value, int):
        return format_size(value)
    if name in _DURATION_FIELDS and isinstance(value, float):
        return format_duration(value)
    return _plain(value)


def iter_secret_values(config: Config) -> Iterator[str]:
    """Every secret in the config, so that tests and log filters can check none leaks."""
    for upstream in config.all_upstreams:
        yield upstream.password.reveal()
    if config.reports.pull is not None:
        yield config.reports.pull.api_key.reveal()
    if config.reports.webhook is not None:
        yield config.reports.webhook.token.reveal()
    for user in config.users:
        yield user.password_hash.reveal()


def permission_warnings(config: Config) -> list[str]:
    """Secret files that other users can read or change: one line each, never the secret."""
    files = [("upstream.password_file" if upstream.name == DEFAULT_UPSTREAM else
               f"upstreams.{upstream.name}.password_file", upstream.password_file)
             for upstream in config.all_upstreams]
    if config.reports.pull is not None:
        files.append(("reports.pull.api_key_file", config.reports.pull.api_key_file))
    files += [(f"{item_path('listeners', index)}.private_key", listener.private_key)
              for index, listener in enumerate(config.listeners)]
    warnings = []
    for key, path in files:
        if path is None:
            continue
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue  # loading the config already reported a file it could not read
        if mode & 0o077:
            warnings.append(f"{key}: {path} is accessible by group or others (mode {mode:04o}); "
                            f"make it private: chmod 600 {path}")
    return warnings
