"""Tests for the `infobip-relay` command line, run in-process through relay.cli.main."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import relay.cli
from relay.cli import main
from relay.infobip.regions import REGIONS
from relay.passwords import hash_password, verify_password
from relay.spool import SpoolDB

API_KEY = "ib-cli-key-4e8a1f0c93"
PASSWORD_HASH = hash_password("user-password", n=16)
REPO = Path(__file__).resolve().parents[1]
ENV_VARS = (
    "INFOBIP_API_KEY", "INFOBIP_REGION", "INFOBIP_SMTP_HOST", "INFOBIP_SMTP_PORT",
    "RELAY_LISTEN", "RELAY_METRICS_LISTEN", "RELAY_QUEUE_PATH", "RELAY_TRUSTED_NETWORKS",
    "INFOBIP_RELAY_CONFIG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the real environment leaks in; the cwd is a scratch directory."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("infobip-relay: error: ")
    for needle in needles:
        assert needle in lines[0]


# --------------------------------------------------------------------------- help and usage

COMMANDS = [
    [], ["serve"], ["check-config"], ["regions"], ["queue"], ["queue", "list"],
    ["queue", "show"], ["queue", "retry"], ["queue", "delete"], ["rules"], ["rules", "test"],
    ["reload"], ["hash-password"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_exits_zero(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: infobip-relay")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("infobip-relay ")


@pytest.mark.parametrize("command", [[], ["queue"], ["rules"]])
def test_missing_subcommand_prints_usage(capsys: pytest.CaptureFixture[str],
                                         command: list[str]) -> None:
    code, out, _ = run(capsys, *command)
    assert code == 2
    assert "usage:" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- regions


def test_regions_prints_every_host(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "regions")
    assert code == 0
    for host in ("smtp-api.infobip.com", "smtp-api-eu.infobip.com", "smtp-api-gb1.infobip.com",
                 "smtp-api-mum.infobip.com", "smtp-api-id.infobip.com",
                 "smtp-api-ae2.infobip.com", "smtp-api-pk2.infobip.com",
                 "smtp-api-qa1.infobip.com", "smtp-api-tr1.infobip.com",
                 "smtp-api-us.infobip.com"):
        assert host in out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "REGION", "HOST"]
    for region in REGIONS:
        (line,) = [line for line in lines if line.startswith(f"{region.name} ")]
        assert region.host in line
        assert ", ".join(str(port) for port in region.ports) in line


# --------------------------------------------------------------------------- check-config


def test_check_config_from_env(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFOBIP_API_KEY", API_KEY)
    monkeypatch.setenv("INFOBIP_REGION", "us")
    code, out, err = run(capsys, "check-config")
    assert code == 0, err
    assert API_KEY not in out + err
    assert out.startswith("# configuration OK (environment)")
    effective = yaml.safe_load(out)
    assert effective["upstream"]["password"] == "********"
    assert effective["upstream"]["host"] == "smtp-api-us.infobip.com"
    assert effective["listeners"][0]["port"] == 2525


def test_check_config_file_redacts_key_and_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INFOBIP_API_KEY", API_KEY)
    config = write(tmp_path / "relay.yaml", f"""
        listeners: [{{name: pub, address: 0.0.0.0, port: 2525, auth: required}}]
        users: [{{name: app1, password_hash: "{PASSWORD_HASH}"}}]
        upstream: {{region: gb, password: "${{INFOBIP_API_KEY}}"}}
        access: {{max_message_size: 10MiB}}
    """)
    code, out, err = run(capsys, "check-config", "-c", str(config))
    assert code == 0, err
    for secret in (API_KEY, PASSWORD_HASH):
        assert secret not in out
        assert secret not in err
    assert str(config) in out.splitlines()[0]
    effective = yaml.safe_load(out)
    assert effective["upstream"]["password"] == "********"
    assert effective["users"] == [{"name": "app1", "password_hash": "********",
                                   "allowed_senders": []}]
    assert effective["upstream"]["host"] == "smtp-api-gb1.infobip.com"
    assert effective["access"]["max_message_size"] == "10MiB"


def test_check_config_uses_infobip_relay_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "relay.yaml", f"upstream: {{password: {API_KEY}, region: qa}}\n")
    monkeypatch.setenv("INFOBIP_RELAY_CONFIG", str(config))
    code, out, _ = run(capsys, "check-config")
    assert code == 0
    assert "smtp-api-qa1.infobip.com" in out
    assert API_KEY not in out


@pytest.mark.parametrize(("text", "path"), [
    ("upstream: {port: 70000}\n", "upstream.port"),
    ("listeners: [{name: a, tls: maybe}]\n", "listeners[0].tls"),
    ("access: {max_message_size: huge}\n", "access.max_message_size"),
    ("queue: {retry_initial: 1m, retry_max: 30s}\n", "queue.retry_max"),
    ("upstream: {region: atlantis}\n", "upstream.region"),
    ("upstream: {tls: none}\n", "upstream.tls"),
    ("upstream:\n  port: [587\n", "line 3, column 1"),
    ("listeners: [{name: pub, address: 0.0.0.0}]\n", "listeners[0]"),
    ("rules: [{when: {mail_from: '*@x'}, set: {X-IB-Client-Prio: LOW}}]\n",
     'rules[0] ("rule 1").set'),
])
def test_check_config_error_is_one_line_with_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        text: str, path: str) -> None:
    monkeypatch.setenv("INFOBIP_API_KEY", API_KEY)
    config = write(tmp_path / "bad.yaml", text)
    code, out, err = run(capsys, "check-config", "-c", str(config))
    assert code == 1
    assert out == ""
    assert_one_line_error(err, path)
    assert API_KEY not in err


def test_check_config_without_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check-config")
    assert code == 1
    assert out == ""
    assert_one_line_error(err, "upstream.password", "INFOBIP_API_KEY")


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check-config", "-c", str(tmp_path / "absent.yaml"))
    assert code == 1
    assert_one_line_error(err, "absent.yaml")


@pytest.mark.parametrize(("text", "env"), [
    pytest.param(f"access: {{max_message_size: '{'9' * 400}GiB'}}\n", {}, id="huge-size"),
    pytest.param("", {"RELAY_TRUSTED_NETWORKS": "10.0.0.0/33"}, id="trusted-networks-env"),
])
def test_check_config_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], text: str,
                                   env: dict[str, str]) -> None:
    monkeypatch.setenv("INFOBIP_API_KEY", API_KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = write(tmp_path / "bad.yaml", text)
    code, _, err = run(capsys, "check-config", "-c", str(config))
    assert code == 1
    assert_one_line_error(err)


def test_check_config_subprocess_has_no_traceback(tmp_path: Path) -> None:
    config = write(tmp_path / "BAD.yaml", "upstream:\n  port: 99999\n  password: x\n")
    env = {key: value for key, value in os.environ.items() if key not in ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "check-config", "-c", str(config)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "upstream.port" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- hash-password


def test_hash_password_stdin(monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    code, out, _ = run(capsys, "hash-password", "--stdin")
    assert code == 0
    (line,) = out.splitlines()
    assert line.startswith("scrypt$")
    assert verify_password("correct horse", line)
    assert not verify_password("correct horse\n", line)
    assert not verify_password("wrong", line)


def test_hash_password_stdin_empty(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, out, err = run(capsys, "hash-password", "--stdin")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "empty password")


def test_hash_password_prompt_mismatch(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["first", "second"])
    monkeypatch.setattr(relay.cli.getpass, "getpass", lambda prompt="": next(answers))
    code, out, err = run(capsys, "hash-password")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "differ")


def test_hash_password_hash_is_accepted_by_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    _, digest, _ = run(capsys, "hash-password", "--stdin")
    config = write(tmp_path / "relay.yaml", f"""
        upstream: {{password: k}}
        users: [{{name: u, password_hash: "{digest.strip()}"}}]
        listeners: [{{name: a, auth: required}}]
    """)
    code, out, err = run(capsys, "check-config", "-c", str(config))
    assert code == 0, err
    assert digest.strip() not in out


# --------------------------------------------------------------------------- queue


@pytest.fixture
def empty_spool(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    SpoolDB(directory).close()
    return directory


def test_queue_list_empty_spool(capsys: pytest.CaptureFixture[str], empty_spool: Path) -> None:
    code, out, _ = run(capsys, "queue", "list", "--spool", str(empty_spool))
    assert code == 0
    assert out.strip() == "spool is empty"
    code, out, _ = run(capsys, "queue", "list", "--spool", str(empty_spool), "--json")
    assert (code, out.strip()) == (0, "[]")
    code, out, _ = run(capsys, "queue", "list", "--spool", str(empty_spool),
                       "--state", "delivered")
    assert (code, out.strip()) == (0, "no delivered records")


def test_queue_list_spool_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      empty_spool: Path) -> None:
    config = write(tmp_path / "relay.yaml", "upstream: {password: k}\nqueue: {path: spool}\n")
    code, out, _ = run(capsys, "queue", "list", "-c", str(config))
    assert (code, out.strip()) == (0, "spool is empty")


@pytest.mark.parametrize("action", [["list"], ["show", "X1"], ["retry", "X1"], ["delete", "X1"]])
def test_queue_nonexistent_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 action: list[str]) -> None:
    missing = tmp_path / "no-such-spool"
    code, out, err = run(capsys, "queue", *action, "--spool", str(missing))
    assert (code, out) == (1, "")
    assert_one_line_error(err, "no spool", str(missing))
    assert not missing.exists()  # inspecting must not create a spool


@pytest.mark.parametrize("action", ["show", "retry", "delete"])
def test_queue_unknown_id(capsys: pytest.CaptureFixture[str], empty_spool: Path,
                          action: str) -> None:
    code, _, err = run(capsys, "queue", action, "NOSUCHID", "--spool", str(empty_spool))
    assert code == 1
    assert_one_line_error(err, "NOSUCHID")


# --------------------------------------------------------------------------- rules test

RULES_CONFIG = """
upstream: {password: rules-test-key}
rules:
  - name: newsletters are low priority
    when: {mail_from: "*@news.example.com"}
    set: {X-IB-Client-Priority: LOW}
"""
MESSAGE = "From: News <letters@news.example.com>\nTo: bob@example.org\nSubject: Hi\n\nBody\n"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("rules test must not open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("no_network")
def test_rules_test_matching_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "relay.yaml", RULES_CONFIG)
    message = write(tmp_path / "msg.eml", MESSAGE)
    code, out, err = run(capsys, "rules", "test", "-c", str(config), str(message),
                         "--mail-from", "alice@news.example.com", "--rcpt", "bob@example.org",
                         "--rcpt", "carol@example.net")
    assert code == 0, err
    assert "newsletters are low priority: MATCHED" in out
    assert "bob@example.org, carol@example.net" in out
    headers = out.split("Resulting headers:")[1]
    assert "X-IB-Client-Priority: LOW" in headers
    assert "Subject: Hi" in headers
    assert "rules-test-key" not in out


@pytest.mark.usefixtures("no_network")
def test_rules_test_non_matching_sender(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "relay.yaml", RULES_CONFIG)
    message = write(tmp_path / "msg.eml", MESSAGE)
    code, out, _ = run(capsys, "rules", "test", "-c", str(config), str(message),
                       "--mail-from", "alice@example.com", "--rcpt", "bob@example.org")
    assert code == 0
    assert "newsletters are low priority: not matched" in out
    assert "X-IB-Client-Priority" not in out.split("Resulting headers:")[1]


@pytest.mark.usefixtures("no_network")
def test_rules_test_sender_defaults_to_from_header(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "relay.yaml", RULES_CONFIG)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MESSAGE.encode())))
    code, out, _ = run(capsys, "rules", "test", "-c", str(config), "-", "--rcpt", "b@example.org")
    assert code == 0
    assert "mail from:  letters@news.example.com" in out
    assert "X-IB-Client-Priority: LOW" in out


@pytest.mark.parametrize(("extra", "needle"), [
    (["--listener", "nope"], "nope"),
    ([], "cannot read"),
])
def test_rules_test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           extra: list[str], needle: str) -> None:
    config = write(tmp_path / "relay.yaml", RULES_CONFIG)
    message = tmp_path / "msg.eml"
    if extra:
        write(message, MESSAGE)
    code, _, err = run(capsys, "rules", "test", "-c", str(config), str(message), *extra)
    assert code == 1
    assert_one_line_error(err, needle)


def test_rules_test_bad_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "relay.yaml", RULES_CONFIG.replace("mail_from", "mail_frm"))
    message = write(tmp_path / "msg.eml", MESSAGE)
    code, _, err = run(capsys, "rules", "test", "-c", str(config), str(message))
    assert code == 1
    assert_one_line_error(err, "rules[0]", "mail_frm")


# --------------------------------------------------------------------------- reload


class Kills:
    """Stand-in for os.kill: records calls and never signals anything."""

    def __init__(self, error: type[OSError] | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.error = error

    def __call__(self, pid: int, sig: int) -> None:
        self.calls.append((pid, sig))
        if self.error is not None:
            raise self.error


def test_reload_without_running_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kills = Kills()
    monkeypatch.setattr(relay.cli.os, "kill", kills)
    code, out, err = run(capsys, "reload", "--spool", str(tmp_path))
    assert (code, out) == (1, "")
    assert_one_line_error(err, "no running relay", str(tmp_path))
    assert kills.calls == []


def test_reload_without_running_relay_config_spool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.cli.os, "kill", Kills())
    config = write(tmp_path / "relay.yaml", "upstream: {password: k}\nqueue: {path: q}\n")
    code, _, err = run(capsys, "reload", "-c", str(config))
    assert code == 1
    assert_one_line_error(err, "no running relay", str(tmp_path / "q"))


def test_reload_stale_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "relay.pid").write_text("4242\n")
    monkeypatch.setattr(relay.cli.os, "kill", Kills(ProcessLookupError))
    code, _, err = run(capsys, "reload", "--spool", str(tmp_path))
    assert code == 1
    assert_one_line_error(err, "4242", "stale")


def test_reload_signals_the_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "relay.pid").write_text("4242\n")
    kills = Kills()
    monkeypatch.setattr(relay.cli.os, "kill", kills)
    code, out, _ = run(capsys, "reload", "--spool", str(tmp_path))
    assert code == 0
    assert kills.calls == [(4242, signal.SIGHUP)]
    assert "4242" in out


@pytest.mark.parametrize("pid", ["garbage", ""])
def test_reload_unreadable_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, pid: str) -> None:
    (tmp_path / "relay.pid").write_text(pid)
    kills = Kills()
    monkeypatch.setattr(relay.cli.os, "kill", kills)
    code, _, _ = run(capsys, "reload", "--spool", str(tmp_path))
    assert code == 1
    assert kills.calls == []


@pytest.mark.parametrize("pid", ["0", "-1"])
def test_reload_refuses_non_positive_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, pid: str) -> None:
    (tmp_path / "relay.pid").write_text(f"{pid}\n")
    kills = Kills()  # never signals for real
    monkeypatch.setattr(relay.cli.os, "kill", kills)
    code, _, _ = run(capsys, "reload", "--spool", str(tmp_path))
    assert kills.calls == []
    assert code == 1
