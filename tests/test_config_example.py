"""config.example.yaml: it loads as shipped, names every key, and its commented blocks load too."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from relay.config import Config, load_config
from relay.errors import ConfigError
from relay.passwords import hash_password
from relay.rules.compile import _RULE_KEYS, _WHEN_KEYS
from relay.rules.sender import _REWRITE_KEYS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
API_KEY = "example-api-key-0123456789"
# Fields that are not keys of the file, or are spelt differently there.
_NOT_KEYS = {"source", "enabled"}  # where the config came from; `metrics: false`
_SPELT = {"bounce_sender": "sender"}  # reports.bounces.sender


def _config_keys(cls: type) -> set[str]:
    """The names of every field of the config dataclasses reachable from ``cls``."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        keys.add(_SPELT.get(field.name, field.name))
        for inner in _dataclasses_in(hints[field.name]):
            keys |= _config_keys(inner)
    return keys - _NOT_KEYS


def _dataclasses_in(hint: object) -> list[type]:
    """Config dataclasses in a field's type (rules are relay.rules', their keys listed apart)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return [hint] if hint.__module__ == Config.__module__ else []
    return [found for arg in typing.get_args(hint) for found in _dataclasses_in(arg)]


def _commented_block(text: str, key: str) -> str:
    """The YAML of the commented top-level block ``# key:``, uncommented."""
    lines = text.splitlines()
    start = lines.index(f"# {key}:")
    block = [lines[start][2:]]
    for line in lines[start + 1:]:
        if not line.startswith("#  "):
            break
        block.append(line[2:])
    return "\n".join(block) + "\n"


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, environ={"INFOBIP_API_KEY": API_KEY, **(env or {})})


def test_the_example_loads_with_check_config_and_shows_no_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "check-config", "-c", str(EXAMPLE)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"INFOBIP_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_the_example_names_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = _config_keys(Config) | set(_RULE_KEYS) | set(_WHEN_KEYS) | set(_REWRITE_KEYS)
    # A key counts when a line (commented or not) sets it: `key:` or `- key:`.
    written = set(re.findall(r"^[#\s-]*([a-z_]+):", text, re.MULTILINE))
    assert sorted(keys - written) == []


def test_the_example_sets_the_defaults_it_claims(tmp_path: Path) -> None:
    shipped = _load(tmp_path, EXAMPLE.read_text())
    defaults = _load(tmp_path, "{}\n")
    assert dataclasses.replace(shipped, source=defaults.source) == defaults


@pytest.mark.parametrize("block", ["users", "upstreams", "rules", "reports"])
def test_each_commented_block_loads(tmp_path: Path, block: str) -> None:
    text = EXAMPLE.read_text()
    uncommented = _commented_block(text, block)
    secret = tmp_path / "marketing_api_key"
    secret.write_text("marketing-key\n")
    secret.chmod(0o600)
    uncommented = uncommented.replace("/run/secrets/marketing_api_key", str(secret))
    # The example's hash is a placeholder to replace; a real one stands in for it here.
    uncommented = uncommented.replace('"scrypt$16384$8$1$..."', repr(hash_password("s3cret")))
    if block == "rules":  # its route names the upstream of the upstreams block
        uncommented += _commented_block(text, "upstreams").replace(
            "/run/secrets/marketing_api_key", str(secret))
    token = {"RELAY_REPORTS_TOKEN": "t0ken-t0ken-t0ken-t0ken"}
    config = _load(tmp_path, text + uncommented, env=token)
    loaded = {"users": config.users, "upstreams": config.upstreams, "rules": config.rules,
              "reports": config.reports.pull and config.reports.webhook}[block]
    assert loaded


def test_the_systemd_unit_points_the_example_at_its_spool_and_credential() -> None:
    unit = (ROOT / "systemd" / "infobip-relay.service").read_text()
    assert "config.example.yaml /etc/infobip-relay/config.yaml" in unit
    assert re.search(r"^Environment=RELAY_QUEUE_PATH=%S/infobip-relay/spool$", unit,
                     re.MULTILINE)
    assert re.search(r"^Environment=INFOBIP_API_KEY_FILE=%d/infobip_api_key$", unit,
                     re.MULTILINE)
    assert yaml.safe_load(EXAMPLE.read_text())["queue"].get("path") is None


def test_the_example_takes_key_and_spool_from_the_units_environment(tmp_path: Path) -> None:
    # What systemd/infobip-relay.service gives it: LoadCredential= + INFOBIP_API_KEY_FILE, and
    # RELAY_QUEUE_PATH; no INFOBIP_API_KEY in the environment at all.
    key = tmp_path / "credentials" / "infobip_api_key"
    key.parent.mkdir()
    key.write_text(API_KEY + "\n")
    env = {"INFOBIP_API_KEY_FILE": str(key), "RELAY_QUEUE_PATH": str(tmp_path / "state")}
    config = load_config(EXAMPLE, environ=env)
    assert config.upstream.password.reveal() == API_KEY
    assert config.upstream.password_file == key
    assert config.queue.path == tmp_path / "state"


def test_a_missing_key_file_from_the_environment_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"upstream.password_file: cannot read .*nope "
                                          r"\(from INFOBIP_API_KEY_FILE\)"):
        load_config(EXAMPLE, environ={"INFOBIP_API_KEY_FILE": str(missing)})
