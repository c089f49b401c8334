"""``herald dev``: the whole pipeline on an embedded broker and PostgreSQL.

Start-up order: PostgreSQL, broker, migrations, topics, the herald processes (ingest,
one deliverer per channel, the digest process, the API, and the webhook receiver on a
free port; ``--demo`` gives digests 10 s windows unless set); only when
all of them are ready is ``.herald/dev.env`` written. Email goes to a loopback SMTP catcher
(aiosmtpd, in this process) that keeps every message in a Maildir under the dev folder,
unless ``HERALD_SMTP__HOST`` names a relay; push is signed with VAPID keys generated for the
run unless ``HERALD_PUSH__VAPID_PRIVATE_KEY`` is set; both go to dev.env. With no receiver source configured,
the receiver gets a ``dev`` source (standard-webhooks) with a secret generated for this
run, written to dev.env so that ``herald produce --to-receiver "$HERALD_RECEIVER_URL"
--source dev`` can sign for it. ``--no-processes`` starts only the broker, PostgreSQL,
migrations and topics. Shutdown (Ctrl-C
or SIGTERM) runs in reverse: SIGTERM to the processes (each finishes its batch
and commits), then the broker and PostgreSQL, then dev.env is removed.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import yaml
from pydantic import SecretStr

from api.auth import mint
from config.settings import Settings, SourceSettings
from consumers.loop import Stopper
from core.webhooks import new_secret
from herald.embedded import EmbeddedStack, free_port
from herald.inspect import wait_group_stable
from herald.processes import DIGEST_GROUP, INGEST_GROUP, PROVIDERS, deliver_group, herald_command
from producers.topics import Topics, ensure_topics
from storage.migrate import migrate

log = logging.getLogger(__name__)

DEV_SOURCE = "dev"
# Whose inbox the printed notification center URL opens.
DEV_USER = "dev-user"
# The demo's digest windows: short enough that its report shows the digests it caused.
DEMO_DIGEST = {"HERALD_POLICY__DIGEST_SECONDS": "10", "HERALD_DIGEST__GRACE_S": "2"}
# The dev stack's lag exporter samples often (unless set): a developer watches it move.
DEV_LAG = {"HERALD_LAG_EXPORTER__INTERVAL_S": "5"}
# The alert rules in a checkout (an installed wheel has none: the scrape config goes without).
ALERT_RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


class Child:
    """One herald process under ``herald dev``, with its log file and metrics port."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path, url: str = "") -> None:
        self.name = name
        self.args = args
        self.env = env
        self.url = url  # where it serves (the receiver), if anywhere
        self.log_path = logdir / f"{name}.log"
        self.metrics_port = 0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.metrics_port = free_port()
        env = {**self.env, "HERALD_METRICS_PORT": str(self.metrics_port), "HERALD_METRICS_HOST": "127.0.0.1"}
        with open(self.log_path, "ab") as out:
            return subprocess.Popen(herald_command(*self.args), env=env, stdout=out, stderr=subprocess.STDOUT)

    def restart(self) -> None:
        """Start it again (after it was killed or stopped): same arguments, settings and log,
        a new metrics port."""
        if self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is still running (pid {self.proc.pid})")
        self.proc = self._spawn()

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback http)
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()


class MailCatcher:
    """A loopback SMTP server that keeps every message in a Maildir (``folder/new``)."""

    def __init__(self, folder: Path) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.handlers import Mailbox

        self.folder = folder
        self.port = free_port()
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every connection
        self._controller = Controller(Mailbox(folder), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> MailCatcher:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
        self._controller.loop.close()

    def count(self) -> int:
        return sum(1 for _ in (self.folder / "new").iterdir()) if (self.folder / "new").is_dir() else 0


def with_channels(settings: Settings, catcher: MailCatcher | None) -> Settings:
    """Email to the catcher (unless a relay is configured) and VAPID keys for push (unless set)."""
    from channels.push import generate_keys

    smtp = settings.smtp
    if smtp.host is None and catcher is not None:
        smtp = smtp.model_copy(
            update={"host": "127.0.0.1", "port": catcher.port, "tls": "none", "from_": "herald@localhost"}
        )
    elif smtp.from_ is None:
        smtp = smtp.model_copy(update={"from_": "herald@localhost"})
    push = settings.push
    if push.vapid_private_key is None:
        push = push.model_copy(update={"vapid_private_key": SecretStr(generate_keys()[0])})
    if push.vapid_subject is None:
        push = push.model_copy(update={"vapid_subject": "mailto:herald@localhost"})
    return settings.model_copy(update={"smtp": smtp, "push": push})


def dev_env_lines(settings: Settings, receiver_url: str | None = None) -> str:
    """What dev.env holds; every value is shell-safe unquoted (``set -a; . dev.env``)."""
    lines = (
        f"HERALD_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}\n"
        f"HERALD_DATABASE_URL={settings.database_url.get_secret_value()}\n"
        f"HERALD_TOPIC_PREFIX={settings.topic_prefix}\n"
    )
    # The API's secrets, so `herald token USER` and the unsubscribe links work from any shell.
    if settings.api.jwt_secret is not None:
        lines += f"HERALD_API__JWT_SECRET={settings.api.jwt_secret.get_secret_value()}\n"
        lines += f"HERALD_API__AUDIENCE={settings.api.audience}\n"
    if settings.unsubscribe_secret is not None:
        lines += f"HERALD_UNSUBSCRIBE_SECRET={settings.unsubscribe_secret.get_secret_value()}\n"
    if settings.public_url is not None:
        lines += f"HERALD_PUBLIC_URL={settings.public_url}\n"
    # The channels' dev settings: the mail catcher (never a configured relay's password) and
    # the VAPID key, so `herald deliver --channel email|push` runs from a dev.env shell.
    smtp = settings.smtp
    if smtp.host is not None and smtp.password is None:
        lines += (
            f"HERALD_SMTP__HOST={smtp.host}\nHERALD_SMTP__PORT={smtp.port}\nHERALD_SMTP__TLS={smtp.tls}\n"
        )
    if smtp.from_ is not None and " " not in smtp.from_:
        lines += f"HERALD_SMTP__FROM={smtp.from_}\n"
    if settings.push.vapid_private_key is not None:
        lines += f"HERALD_PUSH__VAPID_PRIVATE_KEY={settings.push.vapid_private_key.get_secret_value()}\n"
    if settings.push.vapid_subject is not None:
        lines += f"HERALD_PUSH__VAPID_SUBJECT={settings.push.vapid_subject}\n"
    if receiver_url:
        lines += f"HERALD_RECEIVER_URL={receiver_url}\n"
    return lines


def with_api(settings: Settings, port: int) -> Settings:
    """The dev stack's API: on loopback at ``port``, with a JWT secret and an unsubscribe secret
    generated for this run unless the environment (or --config file) already set them."""
    url = f"http://127.0.0.1:{port}"
    api = settings.api.model_copy(
        update={
            "host": "127.0.0.1",
            "port": port,
            "jwt_secret": settings.api.jwt_secret or SecretStr(secrets.token_urlsafe(48)),
        }
    )
    return settings.model_copy(
        update={
            "api": api,
            "unsubscribe_secret": settings.unsubscribe_secret or SecretStr(secrets.token_urlsafe(32)),
            "public_url": settings.public_url or url,
        }
    )


def api_url(settings: Settings) -> str:
    return f"http://{settings.api.host}:{settings.api.port}"


def center_url(settings: Settings) -> str:
    """The notification center as ``DEV_USER``. The token rides in the fragment, which a
    browser never sends, so it reaches no server log; the page moves it to sessionStorage."""
    return f"{api_url(settings)}/#token={mint(settings.api, DEV_USER, ttl_s=12 * 3600)}"


def dev_source(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """Without any configured source, a ``dev`` one (standard-webhooks, a secret generated for
    this run), so the receiver under ``herald dev`` accepts signed requests at once.

    Returns the settings with it, and its variables for the receiver and for dev.env: one
    setting per variable and the secret as a plain string, since JSON would need quotes
    that ``. dev.env`` strips. A source the operator configured is never written out."""
    if settings.receiver.sources:
        return settings, {}
    secret = new_secret()
    source = SourceSettings(scheme="standard-webhooks", secrets=(SecretStr(secret),))
    receiver = settings.receiver.model_copy(update={"sources": {DEV_SOURCE: source}})
    prefix = f"HERALD_RECEIVER__SOURCES__{DEV_SOURCE.upper()}"
    env = {f"{prefix}__SCHEME": "standard-webhooks", f"{prefix}__SECRETS": secret}
    return settings.model_copy(update={"receiver": receiver}), env


def wait_healthy(children: Sequence[Child], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        while not child.healthy() or child.proc.poll() is not None:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not healthy after {timeout}s; see {child.log_path}")
            time.sleep(0.2)


def wait_answering(url: str, child: Child, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200: a child's /metrics may be up before its own server listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback http)
                if resp.status == 200:
                    return
        except OSError:
            pass
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not answering {url} after {timeout}s; see {child.log_path}")
        time.sleep(0.2)


def run_dev(
    settings: Settings,
    *,
    folder: str,
    demo: bool = False,
    ingest_processes: int = 1,
    config_file: str | None = None,
    processes: bool = True,
) -> int:
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env_file = root / "dev.env"
    env_file.unlink(missing_ok=True)
    stopper = Stopper()
    stopper.install()
    print(f"herald dev: starting PostgreSQL and the broker under {root} ...", flush=True)
    with ExitStack() as stack:
        embedded = stack.enter_context(EmbeddedStack(root))
        dev = settings.model_copy(
            update={
                "kafka_bootstrap": embedded.broker.bootstrap,
                "database_url": SecretStr(embedded.postgres.url),
            }
        )
        dev, source_env = dev_source(dev)
        topics = provision(dev)
        logdir = root / "logs"
        logdir.mkdir(exist_ok=True)
        catcher = None if settings.smtp.host else stack.enter_context(MailCatcher(root / "mail"))
        dev = with_channels(with_api(dev, free_port()), catcher)
        child_env = child_environment(os.environ, dev, config_file)
        if demo:
            child_env = {**DEMO_DIGEST, **child_env}  # unless the caller set them
        children: list[Child] = []
        receiver_url: str | None = None
        if processes:
            children, receiver_url = start_processes(dev, child_env, source_env, logdir, ingest_processes)
        for child in reversed(children):
            stack.callback(child.stop)
        wait_healthy(children)
        env_lines = dev_env_lines(dev, receiver_url) + "".join(f"{k}={v}\n" for k, v in source_env.items())
        if processes:
            wait_answering(f"{api_url(dev)}/healthz", next(c for c in children if c.name == "api"))
            # Ready means consuming: every group has joined and owns its partitions.
            for group in (INGEST_GROUP, *map(deliver_group, PROVIDERS), DIGEST_GROUP):
                wait_group_stable(dev, group, timeout=dev.session_timeout_ms / 1000 + 60)
            env_lines += f"HERALD_API_URL={api_url(dev)}\n"
        env_file.touch(mode=0o600)  # it holds the dev secrets: never readable by others
        env_file.write_text(env_lines)
        stack.callback(env_file.unlink, missing_ok=True)
        scrape = write_prometheus_config(root, children) if children else None
        _print_ready(dev, env_file, children, topics, catcher, scrape)
        if demo:
            from herald.demo import run_demo, send_center_samples

            run_demo(dev, receiver_url=receiver_url, mail=catcher.count if catcher else None)
            send_center_samples(dev, DEV_USER)
            print("\nherald dev keeps running; Ctrl-C stops it.", flush=True)
        while not stopper.event.wait(1.0):
            for child in children:
                if child.proc.poll() is not None:
                    print(f"herald dev: {child.name} exited ({child.proc.returncode}); see {child.log_path}")
                    return 1
        print("herald dev: stopping ...", flush=True)
    print("herald dev: stopped.", flush=True)
    return 0


def provision(settings: Settings) -> Topics:
    """Migrations and every topic the processes use (``herald dev``, ``herald chaos``)."""
    migrate(settings.database_url.get_secret_value())
    topics = Topics(settings.topic_prefix)
    channel_topics = [t for c in PROVIDERS for t in topics.channel_topics(c, settings.delivery.retry_tiers)]
    dlqs = [topics.deliveries_dlq(c) for c in PROVIDERS]
    ensure_topics(settings, [*topics.ingest_topics(), *channel_topics, *dlqs])
    return topics


def start_processes(
    dev: Settings,
    child_env: dict[str, str],
    source_env: Mapping[str, str],
    logdir: Path,
    ingest_processes: int = 1,
) -> tuple[list[Child], str]:
    """Every herald process of the dev stack (``herald chaos`` runs the same set): ingest,
    one deliverer per channel, the digest process, the webhook receiver on a free port, the
    API on ``dev.api.port`` and the lag exporter. Returns them and the receiver's URL."""
    children = [Child(f"ingest-{i + 1}", ["ingest"], child_env, logdir) for i in range(ingest_processes)]
    # Dev is loopback: its webhook receivers and push service (the demo's) live on 127.0.0.1.
    deliver_env = {
        **child_env,
        "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS": "true",
        "HERALD_PUSH__ALLOW_PRIVATE_TARGETS": "true",
    }
    children += [Child(f"deliver-{c}", ["deliver", "--channel", c], deliver_env, logdir) for c in PROVIDERS]
    children.append(Child("digest", ["digest"], child_env, logdir))
    receiver_port = free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    receiver_env = {
        **child_env,
        **source_env,
        "HERALD_RECEIVER__HOST": "127.0.0.1",
        "HERALD_RECEIVER__PORT": str(receiver_port),
    }
    children.append(Child("receiver", ["receiver"], receiver_env, logdir, url=receiver_url))
    # Only the API child gets the port: `herald api` from a dev.env shell must not collide.
    children.append(Child("api", ["api"], {**child_env, "HERALD_API__PORT": str(dev.api.port)}, logdir))
    children.append(Child("lag-exporter", ["lag-exporter"], {**DEV_LAG, **child_env}, logdir))
    return children, receiver_url


def job_name(child: str) -> str:
    """The Prometheus job of a dev child: ``herald-`` and its name without an ingest number
    (``ingest-2`` -> ``herald-ingest``), as in the compose stack's scrape config."""
    base, _, number = child.rpartition("-")
    return f"herald-{base if number.isdigit() else child}"


def prometheus_config(children: Sequence[tuple[str, int]], rules: Path | None) -> str:
    """A scrape config for every (child, metrics port), with the alert rules when given."""
    jobs: dict[str, list[str]] = {}
    for name, port in children:
        jobs.setdefault(job_name(name), []).append(f"127.0.0.1:{port}")
    doc: dict[str, object] = {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}}
    if rules is not None:
        doc["rule_files"] = [str(rules)]
    doc["scrape_configs"] = [
        {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()
    ]
    header = (
        "# Written by `herald dev` for the processes it runs; rewritten at each start.\n"
        "# prometheus --config.file=<this file>, then http://localhost:9090/alerts\n"
    )
    return header + str(yaml.safe_dump(doc, sort_keys=False))


def write_prometheus_config(root: Path, children: Sequence[Child]) -> Path:
    """``root/prometheus.yml``: every child's /metrics and, from a checkout, the alert rules
    (copied beside it, so the file works wherever Prometheus runs from)."""
    rules = None
    if ALERT_RULES.is_file():
        rules = root / "alerts.yml"
        shutil.copyfile(ALERT_RULES, rules)
    path = root / "prometheus.yml"
    path.write_text(prometheus_config([(c.name, c.metrics_port) for c in children], rules))
    return path


def child_environment(base: Mapping[str, str], settings: Settings, config_file: str | None) -> dict[str, str]:
    """What every child process runs with: ``base``, the file given with ``--config``,
    and the dev stack's addresses, which win over the file (env beats TOML)."""
    env = dict(base)
    if config_file is not None:
        # Absolute: a relative path would be read against the child's folder, not the caller's.
        env["HERALD_CONFIG_FILE"] = str(Path(config_file).resolve())
    env.update(_env_pairs(settings))
    return env


def _env_pairs(settings: Settings) -> dict[str, str]:
    return dict(line.split("=", 1) for line in dev_env_lines(settings).splitlines())


def _print_ready(
    settings: Settings,
    env_file: Path,
    children: list[Child],
    topics: Topics,
    catcher: MailCatcher | None,
    scrape: Path | None,
) -> None:
    url = settings.database_url.get_secret_value()
    print(
        "\nherald dev is ready.\n"
        f"  broker      {settings.kafka_bootstrap}\n"
        f"  postgres    psql '{url}'\n"
        f'  events      {topics.events}  (herald produce \'{{"id":"1","type":"t","title":"Hi",'
        f'"user_id":"u1"}}\')\n'
        f"  env         set -a; . {env_file}; set +a\n"
        f'  api         {api_url(settings)}  (curl -H "Authorization: Bearer $(herald token alice)" '
        f"{api_url(settings)}/v1/notifications)\n",
        flush=True,
    )
    if any(child.name == "api" for child in children):
        print(f"  center      {center_url(settings)}  ({DEV_USER}'s inbox, live)\n", flush=True)
    if catcher is not None:
        print(
            f"  mail        smtp://127.0.0.1:{catcher.port} keeps every email in {catcher.folder}/new"
            " (a Maildir: one file per message)\n",
            flush=True,
        )
    if scrape is not None:
        print(f"  prometheus  prometheus --config.file={_shown(scrape)}  (every /metrics below, alerts)\n")
    for child in children:
        if child.url:
            print(f"  {child.name:<16} {child.url}/webhooks/<source>")
        print(f"  {child.name:<16} http://127.0.0.1:{child.metrics_port}/metrics   log {child.log_path}")
    if DEV_SOURCE in settings.receiver.sources:
        print(
            f'  {"":<16} herald produce --to-receiver "$HERALD_RECEIVER_URL" --source {DEV_SOURCE} '
            '\'{"id":"2","type":"t","title":"Hi","user_id":"u1"}\''
        )
    print(flush=True)


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when under it (``.herald/prometheus.yml``)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
