"""The Docker packaging, checked without Docker: docker-compose.yml against the official
Compose Specification schema, every command against the code it runs, the worker's
scalability and shutdown window, and the image's freedom from secrets.

The schema is a vendored copy of ``schema/compose-spec.json`` from the
compose-spec/compose-spec repository, so the test needs no network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from campaigns.cli import _parser as cli_parser
from campaigns.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

# `${VAR}`, `${VAR:-default}`, `${VAR:?message}`: Compose interpolation.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?")


# --- helpers ----------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """docker-compose.yml as Compose reads it."""
    # safe_load resolves the `<<: *anchor` merge keys, as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``services`` mapping."""
    return compose["services"]


def project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    found = {}
    for name, service in services(compose).items():
        build = service.get("build")
        context = build.get("context", ".") if isinstance(build, dict) else build
        if context in (".", "./"):
            found[name] = service
    return found


def argv_of(command: str | list[str]) -> list[str]:
    """A Compose or Dockerfile command as an argument vector."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` as {service: condition}, for both of its forms."""
    depends_on = service.get("depends_on", {})
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends_on.items()}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """``environment`` as a dict, for both of its forms."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container would run them."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            entrypoint, cmd = [], []
        elif keyword in ("CMD", "ENTRYPOINT"):
            # Exec form only: the shell form would make /bin/sh PID 1, and it does not
            # forward SIGTERM, so the worker would never drain.
            try:
                value = json.loads(rest)
            except json.JSONDecodeError:
                value = None
            assert isinstance(value, list), f"{keyword} must use the exec form: {rest}"
            if keyword == "CMD":
                cmd = value
            else:
                entrypoint = value
    return entrypoint + cmd


def check_runs_project_code(argv: list[str]) -> None:
    """Fail unless ``argv`` starts a script, module or console script of this project."""
    assert argv, "empty command"
    if argv[0] in ("python", "python3") and len(argv) >= 2 and argv[1] == "-m":
        module = argv[2]
        path = ROOT.joinpath(*module.split("."))
        assert (path / "__main__.py").is_file() or path.with_suffix(".py").is_file(), (
            f"`python -m {module}`: no such module in the project"
        )
        if module == "simulator":
            check_simulator_flags(argv[3:])
    elif argv[0] in ("python", "python3"):
        assert (ROOT / argv[1]).is_file(), f"`python {argv[1]}`: no such file in the project"
    elif argv[0] == "campaigns":
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert "campaigns" in scripts, "`campaigns` is not a console script in pyproject.toml"
        check_cli_accepts(argv[1:])
    else:
        pytest.fail(f"{argv[0]!r} is not a known entry point of this project")


def check_cli_accepts(args: list[str]) -> None:
    """The CLI's own parser accepts ``args`` (argparse exits on anything it does not)."""
    try:
        parsed = cli_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`campaigns {' '.join(args)}` is rejected by the CLI (exit {exc.code})")
    assert parsed.handler is not None, f"`campaigns {' '.join(args)}` runs no command"


def check_simulator_flags(args: list[str]) -> None:
    """The simulator's parser accepts ``args``; serving is stubbed out."""
    import aiohttp.web

    import simulator.__main__ as simulator_main

    served: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiohttp.web, "run_app", lambda app, **kwargs: served.update(kwargs))
        try:
            simulator_main.main(args)
        except SystemExit as exc:
            pytest.fail(f"`python -m simulator {' '.join(args)}` is rejected (exit {exc.code})")
    # In a container it must listen on every interface, or no other service reaches it.
    assert served.get("host") == "0.0.0.0", served


def fixed_host_port(entry: int | str | dict[str, Any]) -> bool:
    """Whether a ``ports`` entry pins a host port (which only one container can hold)."""
    if isinstance(entry, dict):
        return bool(entry.get("published"))
    if isinstance(entry, int):
        return False
    # [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]; a bare container port is ephemeral.
    parts = entry.split("/")[0].rsplit(":", 2)
    return len(parts) >= 2 and parts[-2] != ""


def duration_seconds(value: str) -> float:
    """A Compose duration such as ``45s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    matches = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert matches and "".join(n + u for n, u in matches) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in matches)


def settings_env_names() -> set[str]:
    """Environment variable names that ``Settings`` reads."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(field_name.upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


# --- the Compose file -------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], validator: Draft7Validator
) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda doc: doc["services"]["worker"].update(replicaz=4), id="unknown-key"),
        pytest.param(
            lambda doc: doc["services"]["worker"]["depends_on"]["migrate"].update(
                condition="service_finished"
            ),
            id="unknown-depends-on-condition",
        ),
        pytest.param(
            lambda doc: doc["services"]["worker"].update(command={"python": "worker.py"}),
            id="command-of-wrong-type",
        ),
        pytest.param(lambda doc: doc.update(servics={}), id="unknown-top-level-key"),
    ],
)
def test_validator_rejects_a_broken_compose_document(
    compose: dict[str, Any], validator: Draft7Validator, breakage: Any
) -> None:
    # Proves the validation above has teeth: the same document, broken once, fails.
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert not validator.is_valid(broken)


def test_every_dependency_is_a_defined_service(compose: dict[str, Any]) -> None:
    defined = set(services(compose))
    for name, service in services(compose).items():
        for target, condition in dependencies(service).items():
            assert target in defined, f"{name} depends on undefined service {target!r}"
            if condition == "service_healthy":
                # Compose refuses to start a dependant of a service with no healthcheck.
                assert "healthcheck" in services(compose)[target], (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )


def test_project_services_run_commands_that_exist(compose: dict[str, Any]) -> None:
    built = project_services(compose)
    assert {"migrate", "simulator", "worker", "api"} <= set(built), sorted(built)
    for service in built.values():
        argv = argv_of(service["command"]) if "command" in service else dockerfile_command()
        check_runs_project_code(argv)


def test_expected_commands(compose: dict[str, Any]) -> None:
    built = project_services(compose)
    assert argv_of(built["worker"]["command"]) == ["python", "worker.py"]
    assert argv_of(built["migrate"]["command"]) == ["campaigns", "db", "migrate"]
    assert argv_of(built["simulator"]["command"])[:3] == ["python", "-m", "simulator"]
    assert built["migrate"].get("restart") == "no"


def test_worker_scales(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    # A fixed container name or host port allows one container: --scale worker=4 would fail.
    assert "container_name" not in worker
    pinned = [port for port in worker.get("ports", []) if fixed_host_port(port)]
    assert not pinned, f"worker publishes fixed host ports {pinned}"


def test_worker_waits_for_what_it_needs(compose: dict[str, Any]) -> None:
    assert dependencies(services(compose)["worker"]) == {
        "migrate": "service_completed_successfully",
        "temporal": "service_healthy",
        "temporal-setup": "service_completed_successfully",
        "simulator": "service_started",
    }


def test_worker_has_time_to_drain_on_stop(compose: dict[str, Any]) -> None:
    # Docker sends SIGKILL after stop_grace_period; the worker needs its whole graceful
    # shutdown window plus time to close its pool and connections.
    grace = duration_seconds(services(compose)["worker"]["stop_grace_period"])
    drain = Settings.model_fields["worker_graceful_shutdown_seconds"].default
    assert grace >= drain + 10, f"stop_grace_period {grace}s leaves no margin over {drain}s"


def test_worker_environment_is_what_the_settings_read(compose: dict[str, Any]) -> None:
    env = environment(services(compose)["worker"])
    required = {
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "DATABASE_URL",
        "PROVIDER_BASE_URL",
        "PROVIDER_API_KEY",
        "LOG_FORMAT",
    }
    assert required <= set(env), f"missing: {sorted(required - set(env))}"
    # A misspelt name would be silently ignored by the settings, not rejected.
    unknown = set(env) - settings_env_names()
    assert not unknown, f"variables no setting reads: {sorted(unknown)}"
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env["PROVIDER_BASE_URL"] == "http://simulator:8025"
    assert env["LOG_FORMAT"] in typing.get_args(Settings.model_fields["log_format"].annotation)
    assert re.match(r"postgresql://[^@]+@app-db:5432/campaigns$", env["DATABASE_URL"])


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    for service, key in (
        ("worker", "PROVIDER_API_KEY"),
        ("simulator", "SIMULATOR_API_KEYS"),
        ("simulator", "SIMULATOR_ADMIN_TOKEN"),
    ):
        value = environment(services(compose)[service])[key]
        assert INTERPOLATION.fullmatch(value), f"{service}.{key} is hard-coded: {value!r}"


def test_the_http_service_runs_with_its_secrets_and_the_simulator_posts_to_it(
    compose: dict[str, Any],
) -> None:
    api = services(compose)["api"]
    assert argv_of(api["command"])[:2] == ["campaigns", "api"]
    assert dependencies(api) == {"migrate": "service_completed_successfully"}
    env = environment(api)
    unknown = set(env) - settings_env_names()
    assert not unknown, f"variables no setting reads: {sorted(unknown)}"
    for key in ("WEBHOOK_SECRET", "UNSUBSCRIBE_SECRET"):
        assert INTERPOLATION.fullmatch(env[key]), f"api.{key} is hard-coded"
        # The worker signs unsubscribe links with the secret the service checks.
    assert (
        environment(services(compose)["worker"])["UNSUBSCRIBE_SECRET"] == env["UNSUBSCRIBE_SECRET"]
    )
    simulator = environment(services(compose)["simulator"])
    assert simulator["SIMULATOR_WEBHOOK_SECRET"] == env["WEBHOOK_SECRET"]
    port = argv_of(api["command"])[argv_of(api["command"]).index("--port") + 1]
    assert simulator["SIMULATOR_WEBHOOK_URL"] == f"http://api:{port}/webhooks/resend"
    assert any(str(p).endswith(f":{port}") for p in api["ports"])
    assert "8090" in COMPOSE_FILE.read_text().split("\nname:", 1)[0]  # documented


def test_simulator_admin_token_is_optional_and_documented(compose: dict[str, Any]) -> None:
    from simulator.app import ADMIN_TOKEN_ENV

    env = environment(services(compose)["simulator"])
    # Only names the simulator reads (python -m simulator), so none is silently ignored.
    assert set(env) <= {
        "SIMULATOR_API_KEYS",
        ADMIN_TOKEN_ENV,
        "SIMULATOR_HOST",
        "SIMULATOR_PORT",
        "SIMULATOR_WEBHOOK_URL",
        "SIMULATOR_WEBHOOK_SECRET",
    }
    # Unset, the admin endpoints are refused: Compose must not stop for want of it, and
    # must not fill in a default token anyone could guess.
    assert env[ADMIN_TOKEN_ENV] == "${SIMULATOR_ADMIN_TOKEN:-}"
    assert ADMIN_TOKEN_ENV in ENV_EXAMPLE.read_text()
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if example.get(ADMIN_TOKEN_ENV):
        keys = {key.strip() for key in example["SIMULATOR_API_KEYS"].split(",")}
        assert example[ADMIN_TOKEN_ENV] not in keys, "the admin token must not be an API key"
    # The header's pointer at the admin API says that it needs the token.
    header = COMPOSE_FILE.read_text().split("\nname:", 1)[0]
    assert "/_sim/" in header and ADMIN_TOKEN_ENV in header and "Authorization: Bearer" in header


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = service.get("image")
        if image is None:
            continue
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned to a tag"


def test_env_example_defines_every_required_variable(compose: dict[str, Any]) -> None:
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    required = set(REQUIRED_VARIABLE.findall(COMPOSE_FILE.read_text()))
    assert {"PROVIDER_API_KEY", "SIMULATOR_API_KEYS"} <= required
    assert required <= set(example), f"not in .env.example: {sorted(required - set(example))}"
    # The example works as is: the simulator accepts the key the workers send.
    accepted = [key.strip() for key in example["SIMULATOR_API_KEYS"].split(",")]
    assert example["PROVIDER_API_KEY"] in accepted


# --- the image --------------------------------------------------------------------------


def test_dockerfile_command_runs_project_code() -> None:
    assert dockerfile_command() == ["python", "worker.py"]
    check_runs_project_code(dockerfile_command())


def test_dockerfile_base_and_user() -> None:
    instructions = dockerfile_instructions()
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert bases and bases[-1].split()[0].startswith("python:3.11-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any(k == "RUN" and "pip install ." in rest for k, rest in instructions)


def test_dockerfile_copies_existing_paths() -> None:
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from" in rest:
            continue
        *sources, _destination = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_image_holds_no_secrets() -> None:
    instructions = dockerfile_instructions()
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            # `ENV A=1 B=2`, or the legacy `ENV A 1`.
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or rest.split()[:1]
            for name in names:
                assert not re.search(r"KEY|PASSWORD|PWD|SECRET|TOKEN", name.upper()), (
                    f"{keyword} {name}: secrets belong in the run-time environment"
                )
    body = "\n".join(rest for _, rest in instructions)
    for name in ("PROVIDER_API_KEY", "SIMULATOR_API_KEYS", "SIMULATOR_ADMIN_TOKEN"):
        assert name not in body, f"the Dockerfile sets {name}"
    example_values = [
        line.split("=", 1)[1].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]
    text = DOCKERFILE.read_text()
    for value in filter(None, example_values):
        assert value not in text, f"the Dockerfile contains the secret value {value!r}"
    # .env would otherwise be sent in the build context and could be copied in.
    ignored = DOCKERIGNORE.read_text().splitlines()
    assert ".env" in ignored


# --- metrics: Prometheus and Grafana -----------------------------------------------------

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "campaigns.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "campaigns.json"
METRIC_NAME = re.compile(r"\b(?:campaigns|temporal)_[a-z0-9_]+")


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts, container path to the repository path they mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_metrics_services_mount_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        mounts = bind_mounts(services(compose)[name])
        assert mounts, f"{name} mounts nothing from deploy/"
        for source in mounts.values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            assert source.startswith("./deploy/"), f"{name} mounts {source} from outside deploy/"
    for path in (PROMETHEUS_CONFIG, GRAFANA_DATASOURCES, GRAFANA_PROVIDERS, DASHBOARD):
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    prometheus = services(compose)["prometheus"]
    config_flag = next(a for a in argv_of(prometheus["command"]) if a.startswith("--config.file="))
    config_target = config_flag.split("=", 1)[1]
    assert bind_mounts(prometheus)[config_target] == "./deploy/prometheus/prometheus.yml"
    grafana = services(compose)["grafana"]
    providers = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"]
    for provider in providers:
        dashboards = bind_mounts(grafana)[provider["options"]["path"]]
        assert (ROOT / dashboards / DASHBOARD.name).is_file()
    assert bind_mounts(grafana)["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


def test_prometheus_scrapes_every_worker_and_the_api_where_they_serve(
    compose: dict[str, Any],
) -> None:
    from campaigns.settings import metrics_address

    jobs = scrape_jobs()
    assert set(jobs) == {"worker", "api"}
    worker_address = metrics_address(
        environment(services(compose)["worker"])["WORKER_METRICS_ADDRESS"]
    )
    host, _, worker_port = worker_address.rpartition(":")
    assert host == "0.0.0.0", "a worker bound to 127.0.0.1 cannot be scraped from another container"
    api_argv = argv_of(services(compose)["api"]["command"])
    api_port = api_argv[api_argv.index("--port") + 1]
    assert Settings.model_fields["api_metrics"].default is True
    for job, service, port in (("worker", "worker", worker_port), ("api", "api", api_port)):
        assert service in services(compose)
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        # DNS discovery: one target per container of a scaled service.
        (discovery,) = jobs[job]["dns_sd_configs"]
        assert discovery["names"] == [service] and discovery.get("type", "SRV") == "A"
        assert str(discovery["port"]) == port, (
            f"{job} scraped on {discovery['port']}, served on {port}"
        )


def test_prometheus_config_is_valid_for_promtool() -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_reads_the_prometheus_service(compose: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in services(compose)["prometheus"]["ports"])
    assert dependencies(services(compose)["grafana"]) == {"prometheus": "service_started"}
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {
        source["uid"]
        for panel in dashboard["panels"]
        for source in [
            panel.get("datasource"),
            *(t.get("datasource") for t in panel.get("targets", [])),
        ]
        if source
    }
    assert uids == {datasource["uid"]}


def test_dashboard_queries_name_only_metrics_the_code_defines() -> None:
    from campaigns import metrics

    queries = dashboard_queries()
    assert queries
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    known = metrics.exported_names() | metrics.SDK_SERIES
    assert used <= known, f"the dashboard reads metrics nothing exports: {sorted(used - known)}"
    # What the dashboard is for: throughput by org, outcomes, latency quantiles, 429s,
    # the webhook path.
    joined = "\n".join(queries)
    assert 'sum by (org) (rate(campaigns_emails_total{outcome="sent"}' in joined
    assert "sum by (outcome) (rate(campaigns_emails_total" in joined
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) "
            "(rate(campaigns_provider_request_duration_seconds_bucket"
        ) in joined
    for name in (
        "campaigns_provider_throttled_total",
        "campaigns_provider_requests_total",
        "campaigns_webhook_events_total",
        "campaigns_webhook_settled_total",
        "campaigns_webhook_refused_total",
        "campaigns_webhook_backlog",
    ):
        assert name in used, f"the dashboard shows no {name}"


def test_dashboard_query_check_has_teeth() -> None:
    from campaigns import metrics

    known = metrics.exported_names() | metrics.SDK_SERIES
    assert not set(METRIC_NAME.findall("rate(campaigns_emails_sent_total[1m])")) <= known


def test_temporal_runs_with_the_dynamic_config_the_campaigns_need(
    compose: dict[str, Any],
) -> None:
    import yaml

    from campaigns.contract import send_task_queue
    from campaigns.search_attributes import dynamic_config_flags

    temporal = services(compose)["temporal"]
    [mount] = [v for v in temporal["volumes"] if "dynamicconfig" in str(v)]
    source, target = str(mount).split(":")[:2]
    assert (ROOT / source).is_file()
    assert target == "/etc/temporal/" + environment(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    config = yaml.safe_load((ROOT / source).read_text())
    # The same values the local stack and the tests pass to the dev server.
    flags = dynamic_config_flags()
    for flag in flags:
        name, value = flag.removeprefix("--dynamic-config-value=").split("=", 1)
        assert config[name][0]["value"] == yaml.safe_load(value), name
    assert config["matching.enableFairness"][0]["value"] is True
    # The partitions only for the send queue of the task queue docker-compose runs.
    task_queue = environment(services(compose)["worker"])["CAMPAIGNS_TASK_QUEUE"]
    assert task_queue == "${CAMPAIGNS_TASK_QUEUE:-campaigns}"
    queue = send_task_queue("campaigns")
    for name in ("matching.numTaskqueueReadPartitions", "matching.numTaskqueueWritePartitions"):
        assert config[name] == [{"value": 1, "constraints": {"taskQueueName": queue}}], name
