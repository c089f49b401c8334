"""docker-compose.yml, the production-shaped stack, checked without a Docker engine: the
compose-spec schema, every HERALD_ variable a real setting, every mapped port one a process
listens on, every herald process scraped by Prometheus and health-checked, every value from
.env documented in .env.example and no secret written in the file; and the Dockerfile's shape."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from config.settings import Settings
from herald.cli import build_parser
from tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")
# What the images of the stack's other services listen on, by image name.
IMAGE_PORTS = {
    "postgres": {5432},
    "prom/prometheus": {9090},
    "grafana/grafana": {3000},
    "axllent/mailpit": {1025, 8025},
}
# Values that must come from .env, never from the file: credentials and herald's secrets.
SECRETS = ("PASSWORD", "SECRET", "PRIVATE_KEY")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the `<<` merges
    return doc


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def herald_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if svc.get("image") == "herald:local"}


def long_running() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in herald_services().items() if svc["command"][0] != "migrate"}


def is_setting(name: str) -> bool:
    """``HERALD_A__B`` names a field ``a`` of Settings, and ``b`` of its model (or a librdkafka
    property, or a receiver source)."""
    parts = name.removeprefix("HERALD_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        fields = {alias or key: f for key, f in model.model_fields.items() for alias in (f.alias, key)}
        field = fields.get(part)
        if field is None:
            return False
        if parts[:i] in (["kafka"], ["receiver", "sources"]):
            return True
        annotation = field.annotation
        if i + 1 < len(parts):
            if part == "kafka" or (parts[:i] == ["receiver"] and part == "sources"):
                return True
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_the_file_is_valid_against_the_compose_spec() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_setting_check_itself() -> None:
    assert is_setting("HERALD_API__JWT_SECRET") and is_setting("HERALD_SMTP__FROM")
    assert is_setting("HERALD_KAFKA__SASL_USERNAME") and is_setting("HERALD_LAG_EXPORTER__INTERVAL_S")
    assert not is_setting("HERALD_API__JWT_SECRETS") and not is_setting("HERALD_SMPT__HOST")
    assert not is_setting("HERALD_BATCH_SIZE__X") and not is_setting("HERALD_API_PORT")


def test_every_herald_variable_it_sets_is_a_real_setting() -> None:
    for name, svc in services().items():
        for var in svc.get("environment") or {}:
            if var.startswith("HERALD_"):
                assert is_setting(var), f"{name} sets {var}, which is no herald setting"


def test_every_herald_process_is_in_the_file_with_a_health_check() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]  # noqa: SLF001
    commands = set()
    for name, svc in herald_services().items():
        assert svc["command"][0] in subcommands, f"{name}: unknown command {svc['command']}"
        commands.add(" ".join(svc["command"]))
    assert commands >= {
        "migrate",
        "ingest",
        "deliver --channel email",
        "deliver --channel push",
        "deliver --channel webhook",
        "digest",
        "receiver",
        "api",
        "lag-exporter",
    }
    for name, svc in long_running().items():
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{svc['environment']['HERALD_METRICS_PORT']}/healthz" in probe, name
        assert svc.get("restart") == "unless-stopped", name
    migrate = next(s for s in herald_services().values() if s["command"] == ["migrate"])
    assert migrate["restart"] == "no"


def _container_ports(svc: dict[str, Any]) -> set[int]:
    return {int(str(mapping).rsplit(":", 1)[1]) for mapping in svc.get("ports") or []}


def test_every_port_it_maps_is_one_a_process_listens_on() -> None:
    for name, svc in services().items():
        env = svc.get("environment") or {}
        if name in herald_services():
            listening = {int(env["HERALD_METRICS_PORT"])}
            for own in ("HERALD_RECEIVER__PORT", "HERALD_API__PORT"):
                if own in env:
                    listening.add(int(env[own]))
        elif name == "kafka":
            listening = {int(port) for port in re.findall(r"://[^:,]*:(\d+)", env["KAFKA_LISTENERS"])}
        else:
            image = svc["image"].split(":")[0]
            assert image in IMAGE_PORTS, f"{name}: which ports does {image} listen on?"
            listening = IMAGE_PORTS[image]
        assert _container_ports(svc) <= listening, f"{name} maps {_container_ports(svc) - listening}"
    hosts = [str(m).rsplit(":", 1)[0] for svc in services().values() for m in svc.get("ports") or []]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"


def test_prometheus_scrapes_every_herald_process_and_only_those_in_the_file() -> None:
    doc = yaml.safe_load(SCRAPE.read_text())
    scraped = {}
    for job in doc["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            scraped[host] = (job["job_name"], int(port))
    scraped.pop("localhost", None)  # Prometheus itself
    everything = services()
    for host, (job, port) in scraped.items():
        assert host in everything, f"Prometheus scrapes {host}, which the file does not run"
        assert port == int(everything[host]["environment"]["HERALD_METRICS_PORT"]), host
        assert job == host, f"job {job} scrapes {host}: the alerts name jobs herald-*"
    assert set(long_running()) == set(scraped), "every long-running herald process is scraped"
    volumes = " ".join(everything["prometheus"]["volumes"])
    assert "./deploy/prometheus:/etc/prometheus" in volumes
    assert doc["rule_files"] == ["alerts.yml"]


def test_values_come_from_dot_env_documented_in_the_example_and_secrets_are_never_written() -> None:
    text = COMPOSE.read_text()
    documented = {
        line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z]", line)
    }
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    assert used, "nothing comes from .env"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert documented <= used, f".env.example documents unused {sorted(documented - used)}"
    for m in INTERPOLATION.finditer(text):
        name, kind, default = m.groups()
        if any(word in name for word in SECRETS):
            assert kind != "-" or default == "", f"{name} has a default written in the file"
    for name, svc in services().items():
        for var, value in (svc.get("environment") or {}).items():
            if any(word in var for word in SECRETS):
                assert value is None or "${" in str(value), f"{name}: {var} is written in the file"
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, _, value = line.partition("=")
        if re.match(r"^[A-Z]", line) and any(word in name for word in SECRETS):
            assert value == "", f".env.example gives {name} a value: a secret must be chosen"
    assert (
        ".env" in (ROOT / ".gitignore").read_text().split()
        and ".env" in (ROOT / ".dockerignore").read_text().split()
    )


def test_the_grafana_dashboard_is_provisioned() -> None:
    grafana = services()["grafana"]
    volumes = " ".join(grafana["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in volumes
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards" in volumes
    assert (ROOT / "deploy" / "grafana" / "dashboards" / "herald.json").is_file()


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def test_the_dockerfile_installs_dependencies_in_their_own_layer_and_runs_unprivileged() -> None:
    steps = dockerfile()
    froms = [step for step in steps if step.startswith("FROM ")]
    assert froms and all("-slim" in step for step in froms), froms
    runtime = steps[steps.index(froms[-1]) :]
    build = steps[: steps.index(froms[-1])]
    copies = [i for i, step in enumerate(build) if step.startswith("COPY ")]
    assert build[copies[0]] == "COPY pyproject.toml ./", "the dependencies' layer sees pyproject.toml only"
    whole = build.index("COPY . .")
    assert any("pip install -r" in build[i] for i in range(copies[0], whole)), "dependencies before the code"
    assert any("pip install --no-deps ." in step for step in build[whole:])
    assert not any("embedded" in step or "[dev" in step for step in steps), "no extras in the image"
    user = [step for step in runtime if step.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
