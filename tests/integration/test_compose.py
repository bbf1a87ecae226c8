"""docker-compose.yml, the Dockerfile and .env.example, checked statically.

No container engine runs here (docker is only a client), so the files are read with PyYAML
and compared with what the README promises, with the CLI and Celery app they call, and with
the settings ampsync knows.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from support import ROOT

from tasks.settings import Settings
from tasks.worker.process import worker_command

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
README = (ROOT / "README.md").read_text()
OUR_IMAGE = ("init", "worker", "beat", "flower", "metrics", "emulator")
# Variables compose itself reads (profiles, interpolation into the SQL Server and Flower
# commands); they are not ampsync settings and are never passed to ampsync's containers.
COMPOSE_ONLY = {
    "COMPOSE_PROFILES",
    "MSSQL_SA_PASSWORD",
    "MSSQL_PID",
    "FLOWER_BASIC_AUTH",
    "REDIS_PASSWORD",
    "AMPSYNC_WORKER_PASSWORD",
    "AMPSYNC_INIT_DATABASE_URL",
    "AMPSYNC_WORKER_MEMORY_LIMIT",
}
# The secrets, and the only services that may hold each (README, "Security").
SECRETS = {
    "AMPLITUDE_API_KEY": {"worker"},
    "AMPSYNC_WORKER_PASSWORD": {"init", "worker", "beat", "metrics"},
    "MSSQL_SA_PASSWORD": {"sqlserver", "init"},
    "REDIS_PASSWORD": {"redis", "worker", "beat", "flower"},
    "FLOWER_BASIC_AUTH": {"flower"},
}
SETTING_NAMES = {field.alias for field in Settings.model_fields.values()}
CONDITIONS = {
    "healthy": "service_healthy",
    "completed": "service_completed_successfully",
    "started": "service_started",
}


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def shown(service: str) -> str:
    """The command as the README's table shows it: a `sh -c` script as its script."""
    args = command(service)
    return args[2] if args[:2] == ["sh", "-c"] else " ".join(args)


def ampsync_commands(service: str) -> list[list[str]]:
    """Each command the service runs: one, or each step of a `sh -c 'a && b'` script."""
    args = command(service)
    if args[:2] != ["sh", "-c"]:
        return [args]
    steps = [shlex.split(step) for step in args[2].split("&&")]
    assert len(args) == 3 and all(steps), args  # nothing but commands joined by &&
    return steps


def readme_services() -> dict[str, tuple[str, dict[str, str]]]:
    """The README's service table: service → (first code span of `runs`, {dependency: condition})."""
    section = README.split("## Run it with Docker Compose", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, dict[str, str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        runs = re.search(r"`([^`]+)`", cells[1]).group(1)
        waits = {
            name: CONDITIONS[word]
            for name, word in re.findall(r"`(\w+)` (healthy|completed|started)", cells[2])
        }
        table[cells[0].strip("`")] = (runs, waits)
    return table


def env_example() -> dict[str, tuple[str, bool]]:
    """.env.example: NAME → (value, commented out)."""
    found: dict[str, tuple[str, bool]] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]+)=(.*)$", line)
        if match and match.group(2) not in found:
            found[match.group(2)] = (match.group(3), bool(match.group(1)))
    return found


def test_the_services_are_the_ones_the_readme_lists_with_their_images_and_commands():
    # given the README's table of services
    documented = readme_services()
    # then the compose file has exactly those services
    assert set(SERVICES) == set(documented)
    # and each runs what the README says
    assert SERVICES["sqlserver"]["image"].startswith("mcr.microsoft.com/mssql/server:2022-")
    assert documented["sqlserver"][0] == SERVICES["sqlserver"]["image"]
    assert SERVICES["redis"]["image"].startswith("redis:")
    for name in ("redis", *OUR_IMAGE):
        runs = shown(name)
        if name == "redis":  # the README shows the server's options, not the shell around them
            runs = runs.removeprefix("exec ").replace(' --requirepass "$$REDISCLI_AUTH"', "")
        assert runs == documented[name][0], name
    # and ampsync's own services share one image built from this folder
    assert {SERVICES[name]["build"] for name in OUR_IMAGE} == {"."}
    assert len({SERVICES[name]["image"] for name in OUR_IMAGE}) == 1


def test_services_start_in_the_order_the_readme_gives():
    # given the README's "waits for" column
    for name, (_, waits) in readme_services().items():
        # then depends_on names the same services with the same conditions
        depends = SERVICES[name].get("depends_on", {})
        assert {dep: spec["condition"] for dep, spec in depends.items()} == waits, name
    # and the dependencies that only exist in a profile are optional
    assert SERVICES["init"]["depends_on"]["sqlserver"]["required"] is False
    assert SERVICES["worker"]["depends_on"]["emulator"]["required"] is False
    assert SERVICES["sqlserver"]["profiles"] == ["sqlserver"]
    assert SERVICES["emulator"]["profiles"] == ["trial"]


def test_health_checks_redis_durability_and_the_one_shot_init():
    health = " ".join(SERVICES["sqlserver"]["healthcheck"]["test"])
    assert "/opt/mssql-tools18/bin/sqlcmd -C" in health and "SELECT 1" in health
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Redis keeps every message on disk and never evicts one to make room
    redis_args = shlex.split(command("redis")[2])
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in SERVICES["redis"]["volumes"]
    # init runs once and is not restarted; the long-running services are
    assert SERVICES["init"]["restart"] == "no"
    assert all(
        SERVICES[name]["restart"] == "unless-stopped"
        for name in ("sqlserver", "redis", "worker", "beat", "flower", "metrics")
    )
    assert all("healthcheck" in SERVICES[name] for name in ("worker", "beat", "flower", "metrics"))


def test_workers_scale_beat_is_one_and_flower_requires_basic_auth():
    worker, beat, flower = SERVICES["worker"], SERVICES["beat"], SERVICES["flower"]
    # workers scale with --scale worker=N: no fixed name, no host port
    assert "container_name" not in worker and "ports" not in worker
    assert "replicas" not in worker.get("deploy", {})
    assert "--scale worker=" in README
    # exactly one beat
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    runs_beat = [n for n, s in SERVICES.items() if {"beat", "-B"} & set(s.get("command", []))]
    assert runs_beat == ["beat"]
    # the worker runs what `ampsync run` and the tests run, less the interpreter
    assert command("worker") == worker_command()[2:]
    # Flower refuses to start without FLOWER_BASIC_AUTH (compose's `:?` interpolation), and
    # reads it from its environment: no password on its command line
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert not any("auth" in arg for arg in command("flower"))
    # and it starts through the check that refuses the example login and guards /metrics
    assert command("flower")[:2] == ["python", "deploy/run_flower.py"]
    # and it is published on the loopback interface only
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def _help(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


@pytest.mark.parametrize("service", ["init", "emulator", "metrics"])
def test_every_ampsync_command_in_the_file_exists(service):
    # given each `ampsync <subcommand> <options>` as the compose file runs it
    for args in ampsync_commands(service):
        assert args[0] == "ampsync"
        # when its help is asked for, then the subcommand exists and lists every option used
        text = _help([sys.executable, "-m", "tasks.cli", args[1], "--help"])
        for option in _options(args[2:]):
            assert option in text, (service, option)


def test_init_creates_the_tables_then_runs_the_check():
    # given the one-shot init service
    steps = ampsync_commands("init")
    # then it creates the database and tables first, and checks them after, only if that worked
    assert [args[:2] for args in steps] == [
        ["ampsync", "init-db"],
        ["ampsync", "create-login"],
        ["ampsync", "check"],
    ]
    assert steps[1][2:] == ["ampsync"]
    assert "--create-database" in steps[0]
    assert " && " in command("init")[2]
    # and a failed check keeps the workers and beat from starting
    for name in ("worker", "beat"):
        assert SERVICES[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_every_celery_command_in_the_file_exists(service):
    args = command(service)
    assert args[:3] == ["celery", "-A", "tasks"]
    # celery's own options (`--quiet`) come before the subcommand
    at = next(i for i, a in enumerate(args) if i >= 3 and not a.startswith("-"))
    celery_help = _help([sys.executable, "-m", "celery", "--help"])
    assert all(option in celery_help for option in _options(args[3:at]))
    text = _help([sys.executable, "-m", "celery", "-A", "tasks", args[at], "--help"])
    for option in _options(args[at + 1 :]):
        assert option in text, (service, option)


def test_every_flower_option_in_the_file_exists():
    # Flower's options are tornado options, which `celery flower --help` does not list
    from flower.options import options

    args = command("flower")
    assert args[:2] == ["python", "deploy/run_flower.py"]
    assert (ROOT / args[1]).is_file()
    for option in _options(args[2:]):
        assert option.removeprefix("--") in options._options, option


def test_the_queues_and_tasks_the_file_names_exist_in_the_celery_app():
    from tasks import app

    args = command("worker")
    queues = set(args[args.index("-Q") + 1].split(","))
    assert queues == {q.name for q in app.conf.task_queues}
    assert {"ampsync.sync", "ampsync.send_batch"} <= set(app.tasks)
    assert {entry["task"] for entry in app.conf.beat_schedule.values()} <= set(app.tasks)
    health = " ".join(SERVICES["worker"]["healthcheck"]["test"])
    assert "celery -A tasks inspect ping" in health


def test_every_variable_passed_to_ampsync_is_a_known_setting():
    # given what compose passes to ampsync's containers: no env_file, only what each needs
    passed_through = {"AMPSYNC_WORKER_PASSWORD", "FLOWER_BASIC_AUTH"}
    for name in OUR_IMAGE:
        service = SERVICES[name]
        assert "env_file" not in service, name
        # then each variable is a setting of tasks/settings.py (or the one its command reads)
        assert set(service.get("environment", {})) - passed_through <= SETTING_NAMES, name
    # and the services that read ampsync's settings get every one that is not a secret
    shared = set(COMPOSE["x-settings"])
    assert shared == SETTING_NAMES - {
        "AMPLITUDE_API_KEY",
        "AMPSYNC_DATABASE_URL",
        "CELERY_BROKER_URL",
    }
    for name in ("init", "worker", "beat", "metrics"):
        assert shared <= set(SERVICES[name]["environment"]), name
    # and every variable compose interpolates is documented in .env.example
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))
    assert interpolated <= set(env_example()), interpolated - set(env_example())


def test_env_example_documents_each_setting_with_its_default():
    documented = env_example()
    # every setting is there, and nothing else but compose's own variables
    assert set(documented) >= SETTING_NAMES, SETTING_NAMES - set(documented)
    assert set(documented) - SETTING_NAMES == COMPOSE_ONLY
    # a commented-out line shows the default
    for field_name, field in Settings.model_fields.items():
        value, commented = documented[field.alias]
        if commented and field.default is not None:
            shown = Settings.model_validate({field.alias: value})
            assert getattr(shown, field_name) == field.default, field.alias
    # the values set are valid settings; the secrets compose requires are left for the user
    active = {n: v for n, (v, commented) in documented.items() if not commented and v}
    Settings.model_validate({k: v for k, v in active.items() if k in SETTING_NAMES})
    assert documented["REDIS_PASSWORD"] == ("", False)
    assert documented["AMPSYNC_WORKER_PASSWORD"] == ("", False)
    assert active["COMPOSE_PROFILES"] == "sqlserver"
    assert re.fullmatch(r"[^:]+:.+", active["FLOWER_BASIC_AUTH"])


def test_dockerfile_installs_the_package_and_runs_as_a_non_root_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    copied = " ".join(line for line in instructions if line.startswith("COPY"))
    # everything `pip install .` needs is copied: the project file, README, modules
    for needed in ("pyproject.toml", "README.md", "beat_schedule.py", "tasks", "ampsync_emulator"):
        assert needed in copied
    install = next(i for i, line in enumerate(instructions) if "pip install ." in line)
    users = [i for i, line in enumerate(instructions) if line.startswith("USER ")]
    assert users and users[-1] > install
    assert instructions[users[-1]].split()[1] not in ("root", "0")
    # the image never carries local settings or secrets
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".git" in ignored


def _holders(variable: str) -> set[str]:
    """The services whose environment mentions `variable` (interpolated or by name)."""
    return {
        name
        for name, service in SERVICES.items()
        if any(variable in f"{k}={v}" for k, v in service.get("environment", {}).items())
    }


def test_each_secret_reaches_only_the_services_that_need_it():
    # given the secrets in .env: each reaches only the services named for it
    for variable, allowed in SECRETS.items():
        assert _holders(variable) <= allowed, (variable, _holders(variable) - allowed)
    # and `sa` is init's alone: the workers, beat and metrics log in as the workers' login
    assert "sa:" in SERVICES["init"]["environment"]["AMPSYNC_DATABASE_URL"]
    for name in ("worker", "beat", "metrics"):
        url = SERVICES[name]["environment"]["AMPSYNC_DATABASE_URL"]
        assert "//ampsync:${AMPSYNC_WORKER_PASSWORD}@" in url and "MSSQL_SA" not in url, name
    # and the SQL Server health check reads its password from the environment
    health = " ".join(SERVICES["sqlserver"]["healthcheck"]["test"])
    assert " -P " not in health and "PASSWORD" not in health
    assert SERVICES["sqlserver"]["environment"]["SQLCMDPASSWORD"] == "${MSSQL_SA_PASSWORD}"


def test_redis_has_a_password_and_a_network_of_its_own():
    # given Redis started with a password from its environment, none on the command line
    script = command("redis")[2]
    assert '--requirepass "$$REDISCLI_AUTH"' in script
    assert SERVICES["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    # then every broker URL carries that password
    for name in ("worker", "beat", "flower"):
        url = SERVICES[name]["environment"]["CELERY_BROKER_URL"]
        assert url == "redis://:${REDIS_PASSWORD}@redis:6379/0", name
    # and Redis sits on an internal network with only the services that talk to it
    assert SERVICES["redis"]["networks"] == ["broker"]
    assert COMPOSE["networks"]["broker"]["internal"] is True
    on_broker = {n for n, s in SERVICES.items() if "broker" in s.get("networks", [])}
    assert on_broker == {"redis", "worker", "beat", "flower"}
    # and publishes no port
    assert "ports" not in SERVICES["redis"]


def test_published_ports_listen_on_loopback_only_and_images_are_pinned():
    # every port a service publishes is bound to 127.0.0.1 (README: a TLS proxy to go further)
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # and every image is a fixed release: no `latest`, no bare major version
    for name, service in SERVICES.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and not tag.endswith("-latest"), (name, image)
        assert name in OUR_IMAGE or re.search(r"\d+\.\d+|CU\d+", tag), (name, image)
    base = next(
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("FROM ")
    )
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base


def test_beat_has_a_health_check_and_feeds_are_mounted_read_only():
    # beat is unhealthy once its schedule file stops being saved
    health = " ".join(SERVICES["beat"]["healthcheck"]["test"])
    assert "celerybeat-schedule" in health and "-mmin" in health
    assert "--schedule /tmp/celerybeat-schedule" in " ".join(command("beat"))
    # the feeds folder is mounted where the default feeds file is read, in the processes that
    # schedule (beat) and run (worker) feeds
    for name in ("worker", "beat"):
        assert "./feeds:/app/feeds:ro" in SERVICES[name]["volumes"], name
    assert COMPOSE["x-settings"]["AMPSYNC_FEEDS_FILE"].endswith(":-feeds/ampsync-feeds.toml}")


def test_the_metrics_service_serves_ampsync_metrics_as_the_workers_login():
    args = command("metrics")
    assert args[:2] == ["ampsync", "metrics"]
    assert args[args.index("--port") + 1] == "9808"
    assert SERVICES["metrics"]["ports"] == ["127.0.0.1:9808:9808"]
    assert "CELERY_BROKER_URL" not in SERVICES["metrics"]["environment"]
    assert "AMPLITUDE_API_KEY" not in SERVICES["metrics"]["environment"]


def test_every_long_running_service_has_a_memory_ceiling():
    # a row too big or a leak takes down its container, not the machine: the worker's ceiling
    # is a setting (its pool processes are replaced at AMPSYNC_WORKER_MAX_MEMORY_MB each)
    assert SERVICES["worker"]["mem_limit"] == "${AMPSYNC_WORKER_MEMORY_LIMIT:-2g}"
    for name in ("beat", "flower", "metrics"):
        assert SERVICES[name]["mem_limit"] == "512m", name
