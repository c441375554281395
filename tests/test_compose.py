"""docker-compose.yml, Dockerfile and .dockerignore, checked without Docker.

The compose file cannot be run here, so these tests pin what would otherwise only fail at deploy time:
the services and their wiring, that every variable handed to the app is a real setting of
`speakerflow.streams.settings.Settings`, and that kafka-init creates exactly the topics the code uses (its
script is run against a stub `kafka-topics.sh`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import GALLERY

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # anchors and `<<` merges resolved
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

APP_IMAGE = COMPOSE["x-app"]["image"]
APP_SERVICES = sorted(name for name, svc in SERVICES.items() if svc.get("image") == APP_IMAGE)
ONE_SHOT = {"kafka-init", "migrate"}
SETTING_ENV_NAMES = {f.metadata["env"] for f in fields(Settings)}

# --- compose-style interpolation -----------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[_A-Za-z][_A-Za-z0-9]*)"
    r"|\{(?P<braced>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<invalid>))"
)


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """What `docker compose` makes of a value, with `env` as the shell/.env variables (default: none)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise ValueError(f"invalid interpolation in {value!r} at {m.start()}")
        name = m["named"] or m["braced"]
        op, arg = m["op"], m["arg"]
        unset = name not in env or (op is not None and op.startswith(":") and env[name] == "")
        if op and op.endswith("-") and unset:
            return arg
        if op and op.endswith("?") and unset:
            raise ValueError(f"{name} is required: {arg}")
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value)


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: use the mapping form of `environment` (anchors merge it)"
    return {k: str(v) for k, v in interpolate(env).items()}


# --- topics the code knows about ------------------------------------------------------------------


def expected_topics() -> dict[str, dict[str, str]]:
    """Topic name (without prefix) -> configs it must be created with."""
    try:
        from speakerflow.streams.topology import TOPIC_SPECS
    except ImportError:
        # streams/topology.py (or confluent_kafka) is not importable: the list from the design instead.
        return {
            "audio": {"retention.ms": str(24 * 3600 * 1000)},
            "segments.diarized": {},
            "segments.identified": {},
            "enrollment.requests": {},
            "enrollment.results": {},
            "gallery": {"cleanup.policy": "compact"},
            "verification.requests": {},
            "verification.results": {},
            "deadletter": {},
        }
    return {spec.name: dict(spec.configs) for spec in TOPIC_SPECS}


def run_kafka_init(tmp_path: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    """Runs kafka-init's script with a stub kafka-topics.sh; returns the argv of each call."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    command = interpolate(SERVICES["kafka-init"]["command"], env)
    assert command[:2] == ["bash", "-c"], command
    script = command[2]
    assert "/opt/kafka/bin/kafka-topics.sh" in script
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    stub = bindir / "kafka-topics.sh"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$CALLS"\necho >> "$CALLS"\n')
    stub.chmod(0o755)
    service_env = {k: str(v) for k, v in interpolate(SERVICES["kafka-init"]["environment"], env).items()}
    subprocess.run(
        [bash, "-c", script.replace("/opt/kafka/bin/", f"{bindir}/")],
        env={"PATH": os.environ["PATH"], "CALLS": str(log), **service_env},
        check=True,
        timeout=30,
    )
    calls = []
    for line in log.read_text().split("\n"):
        if line:
            calls.append(line.rstrip("\0").split("\0"))
    return calls


def created_topics(calls: list[list[str]]) -> dict[str, dict[str, Any]]:
    topics: dict[str, dict[str, Any]] = {}
    for argv in calls:
        if "--create" not in argv:
            continue
        opts: dict[str, Any] = {"configs": {}, "flags": set()}
        it = iter(argv)
        for arg in it:
            if arg == "--config":
                key, _, value = next(it).partition("=")
                opts["configs"][key] = value
            elif arg in {"--topic", "--partitions", "--replication-factor", "--bootstrap-server"}:
                opts[arg] = next(it)
            else:
                opts["flags"].add(arg)
        assert opts["--topic"] not in topics, f"{opts['--topic']} created twice"
        topics[opts["--topic"]] = opts
    return topics


# --- services -------------------------------------------------------------------------------------


def test_required_services_exist() -> None:
    for name in ["kafka", "kafka-init", "postgres", "migrate", "worker", "worker-gpu", "api"]:
        assert name in SERVICES, name
    assert {"migrate", "worker", "worker-gpu", "api"} <= set(APP_SERVICES)
    assert not any("zookeeper" in name for name in SERVICES)


def test_whole_file_interpolates_with_defaults() -> None:
    """A stray `$` (e.g. `$1` in a script instead of `$$1`) makes `docker compose` refuse the file."""
    interpolate(COMPOSE)


def test_kafka_is_official_image_in_kraft_mode() -> None:
    kafka = SERVICES["kafka"]
    repo, _, tag = kafka["image"].partition(":")
    assert repo == "apache/kafka"
    assert tuple(int(p) for p in tag.split(".")[:2]) >= (3, 9), tag
    assert SERVICES["kafka-init"]["image"] == kafka["image"]
    env = environment("kafka")
    assert not any("ZOOKEEPER" in k for k in env)
    assert {"broker", "controller"} <= set(env["KAFKA_PROCESS_ROLES"].split(","))
    node_id = env["KAFKA_NODE_ID"]
    assert f"{node_id}@kafka:9093" in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert set(env["KAFKA_LISTENERS"].split(",")) == {"PLAINTEXT://:9092", "CONTROLLER://:9093"}
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert len(env["CLUSTER_ID"]) == 22
    # The data lives on a named volume at the image's log dir.
    volume, _, target = kafka["volumes"][0].partition(":")
    assert volume in COMPOSE["volumes"]
    assert target == env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def test_postgres_16_with_volume() -> None:
    pg = SERVICES["postgres"]
    repo, _, tag = pg["image"].partition(":")
    assert repo == "postgres"
    assert tag.split(".")[0].split("-")[0] == "16"
    env = environment("postgres")
    assert {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(env)
    volume, _, target = pg["volumes"][0].partition(":")
    assert volume in COMPOSE["volumes"]
    assert target == "/var/lib/postgresql/data"


def test_healthchecks() -> None:
    kafka = " ".join(SERVICES["kafka"]["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server localhost:9092" in kafka
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    for name, svc in SERVICES.items():
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_depends_on_conditions() -> None:
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs the long form with conditions"
        for dep, spec in deps.items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}, which has no healthcheck"
    assert SERVICES["kafka-init"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ["worker", "worker-gpu", "api"]:
        assert set(SERVICES[name]["depends_on"]) == ONE_SHOT, name


def test_restart_policies_are_strings() -> None:
    # YAML reads a bare `no` as False, which compose rejects.
    for name, svc in SERVICES.items():
        assert svc.get("restart", "no") in {"no", "always", "on-failure", "unless-stopped"}, name
    for name in ONE_SHOT:
        assert SERVICES[name]["restart"] == "no"


def test_environment_values_are_scalars() -> None:
    # Compose rejects booleans in `environment` (quote "false").
    for name, svc in SERVICES.items():
        for key, value in (svc.get("environment") or {}).items():
            assert isinstance(value, str | int | float) and not isinstance(value, bool), (name, key)


# --- the app --------------------------------------------------------------------------------------


def test_app_services_use_kafka_and_postgres() -> None:
    pg = environment("postgres")
    for name in APP_SERVICES:
        svc = SERVICES[name]
        assert svc["build"]["context"] == "."
        env = environment(name)
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["SPEAKERFLOW_BROKER_PROFILE"] == "kafka", name  # never `embedded` in production
        assert env["DATABASE_URL"] == (
            f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
        ), name
        # ...and with a password set in .env, the app and postgres still agree.
        with_secret = {"POSTGRES_PASSWORD": "s3cret"}
        url = interpolate(svc["environment"]["DATABASE_URL"], with_secret)
        assert interpolate(SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"], with_secret) == "s3cret"
        assert ":s3cret@postgres:" in url, name


def test_app_environment_names_are_settings() -> None:
    """Every variable handed to the app is a field of Settings, so the two cannot drift apart."""
    for name in APP_SERVICES:
        unknown = set(SERVICES[name]["environment"]) - SETTING_ENV_NAMES
        assert not unknown, f"{name}: {sorted(unknown)} are not in streams.settings.Settings"
    # kafka-init reads the same topic variables as the app.
    assert set(SERVICES["kafka-init"]["environment"]) <= SETTING_ENV_NAMES
    # Settings the Dockerfile bakes in as ENV, too.
    baked = set(re.findall(r"\b(SPEAKERFLOW_[A-Z0-9_]+)=", DOCKERFILE))
    assert baked <= SETTING_ENV_NAMES, baked - SETTING_ENV_NAMES


def test_app_commands() -> None:
    assert SERVICES["migrate"]["command"] == ["db", "migrate"]
    assert SERVICES["worker"]["command"] == ["worker"]
    assert SERVICES["worker-gpu"]["command"] == ["worker"]
    assert SERVICES["api"]["command"] == ["api", "--host", "0.0.0.0", "--port", "8000"]


def test_cpu_worker_scales() -> None:
    worker = SERVICES["worker"]
    env = environment("worker")
    assert env["SPEAKERFLOW_DEVICE"] == "cpu"
    assert env["SPEAKERFLOW_EMBEDDER"] == "campplus"
    assert worker["deploy"]["replicas"] == 1
    assert "profiles" not in worker
    # A fixed container name or host port would break `--scale worker=N`.
    assert "container_name" not in worker
    assert "ports" not in worker


def test_gpu_worker() -> None:
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    env = environment("worker-gpu")
    assert env["SPEAKERFLOW_DEVICE"] == "cuda:0"
    assert env["SPEAKERFLOW_EMBEDDER"] == "campplus"  # the CPU workers' model: one gallery for both
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The merge overrode only what differs from the CPU worker.
    cpu = environment("worker")
    assert {k: v for k, v in env.items() if cpu.get(k) != v} == {"SPEAKERFLOW_DEVICE": "cuda:0"}


def test_api_profile() -> None:
    api = SERVICES["api"]
    assert api["profiles"] == ["api"]
    assert "8000:8000" in api["ports"]
    assert "healthcheck" in api


# --- kafka-init -----------------------------------------------------------------------------------


def test_kafka_init_creates_every_topic_of_the_code(tmp_path: Path) -> None:
    created = created_topics(run_kafka_init(tmp_path))
    prefix = Settings().topic_prefix
    expected = expected_topics()
    assert set(created) == {f"{prefix}.{name}" for name in expected}
    for name, configs in expected.items():
        topic = created[f"{prefix}.{name}"]
        assert "--if-not-exists" in topic["flags"], name
        assert topic["--bootstrap-server"] == "kafka:9092"
        assert topic["--partitions"] == "12", name
        assert topic["--replication-factor"] == "1", name
        for key, value in configs.items():
            assert topic["configs"].get(key) == value, (name, key, topic["configs"])
    gallery = created[f"{prefix}.gallery"]["configs"]
    assert gallery["cleanup.policy"] == "compact"
    assert {"min.cleanable.dirty.ratio", "segment.ms"} <= set(gallery)
    assert int(created[f"{prefix}.audio"]["configs"]["retention.ms"]) == 24 * 3600 * 1000
    assert int(created[f"{prefix}.deadletter"]["configs"]["retention.ms"]) >= 7 * 24 * 3600 * 1000


def test_kafka_init_follows_the_settings(tmp_path: Path) -> None:
    env = {
        "SPEAKERFLOW_TOPIC_PREFIX": "acme",
        "SPEAKERFLOW_PARTITIONS": "48",
        "SPEAKERFLOW_REPLICATION_FACTOR": "3",
    }
    created = created_topics(run_kafka_init(tmp_path, env))
    assert set(created) == {f"acme.{name}" for name in expected_topics()}
    assert {t["--partitions"] for t in created.values()} == {"48"}
    assert {t["--replication-factor"] for t in created.values()} == {"3"}
    # The app sees the same values.
    app = {k: str(v) for k, v in interpolate(SERVICES["worker"]["environment"], env).items()}
    settings = Settings.from_env(app)
    assert settings.topic(GALLERY) == "acme.gallery"
    assert (settings.partitions, settings.replication_factor) == (48, 3)


def test_kafka_init_mentions_min_insync_replicas() -> None:
    assert "min.insync.replicas" in SERVICES["kafka-init"]["command"][2]


# --- Dockerfile and .dockerignore -----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.partition("=")[::2] for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert bases and all(
        re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], b) == "python:3.11-slim-bookworm" for b in bases
    )
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    apt = next(r for r in runs if "ffmpeg" in r)
    assert {"ffmpeg", "libsndfile1"} <= set(shlex.split(apt))
    assert any(kw == "COPY" and rest.split()[0] == "requirements.lock" for kw, rest in instructions)
    lock_install = next(
        i for i, r in enumerate(runs) if "pip install --no-cache-dir -r requirements.lock" in r
    )
    project_install = next(i for i, r in enumerate(runs) if re.search(r"pip install .*--no-deps.* \.$", r))
    assert lock_install < project_install
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert ("ENTRYPOINT", '["speakerflow"]') in instructions
    assert ("CMD", '["worker"]') in instructions


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory counts."""
    ignored = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/"))
        regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def _package_folder(package: str, package_dir: dict[str, str]) -> str:
    """The folder of `package` under pyproject's package-dir mapping (a.b.c -> folder_of_a_b/c)."""
    root = max((name for name in package_dir if package == name or package.startswith(name + ".")), key=len)
    return "/".join([package_dir[root], *package[len(root) + 1 :].split(".")]).rstrip("/")


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = ["pyproject.toml", "requirements.lock"]
    needed += [f"{_package_folder(p, setuptools['package-dir'])}/__init__.py" for p in setuptools["packages"]]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "streams" / "migrations").glob("*.sql")]
    for path in needed:
        assert not _dockerignored(path, patterns), path
    for path in [".venv/bin/python", ".git/HEAD", ".data/pg/base", "streams/__pycache__/x.pyc", "tests/x.py"]:
        assert _dockerignored(path, patterns), path
