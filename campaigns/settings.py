"""Process settings, read from the environment.

When a variable is not set and the local stack is running, its value comes from the
stack's files in the data directory, so ``campaigns`` commands work against
``campaigns stack up`` without exporting anything:

* ``stack.env`` (mode 0600, dotenv format): the settings that hold secrets, such as
  ``DATABASE_URL``, ``PROVIDER_API_KEY`` and ``SIMULATOR_ADMIN_TOKEN``;
* ``stack.json``: addresses only, never a secret.

The environment wins over both. Secrets are ``SecretStr``: they print as
``**********`` and are only unwrapped where a request is made.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_TASK_QUEUE = "campaigns"
STACK_FILE_NAME = "stack.json"
STACK_ENV_FILE_NAME = "stack.env"
METRICS_OFF = "off"
DEFAULT_WORKER_METRICS_ADDRESS = "127.0.0.1:9464"


def data_dir() -> Path:
    """The project data directory: ``CAMPAIGNS_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("CAMPAIGNS_DATA_DIR", "data")).resolve()


class Settings(BaseSettings):
    """Where Temporal, PostgreSQL and the email provider are, and how to log."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_ui_url: str = "http://localhost:8233"
    task_queue: str = Field(
        default=DEFAULT_TASK_QUEUE,
        validation_alias=AliasChoices("CAMPAIGNS_TASK_QUEUE", "task_queue"),
    )
    database_url: str | None = None
    provider_base_url: str | None = None
    provider_api_key: SecretStr | None = None
    simulator_admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the provider simulator's /_sim/ admin endpoints.",
    )
    provider_timeout_seconds: float = 30.0
    provider_max_connections: int = 32
    shared_sending_domain: str = "mail.campaigns.example"
    shared_tracking_host: str = "click.campaigns.example"
    worker_queues: str = Field(
        default="campaigns,maintenance",
        description="Comma-separated: 'campaigns' (sending), 'maintenance' (scheduled jobs).",
    )
    worker_max_concurrent_activities: int = 64
    worker_graceful_shutdown_seconds: float = 30.0
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="The provider's webhook signing secret (whsec_...), for POST /webhooks/resend.",
    )
    unsubscribe_base_url: str | None = Field(
        default=None,
        description="Public base URL of the HTTP service's /u/{token} unsubscribe endpoint.",
    )
    unsubscribe_secret: SecretStr | None = Field(
        default=None, description="Signs unsubscribe tokens (at least 32 characters)."
    )
    unsubscribe_previous_secrets: SecretStr | None = Field(
        default=None,
        description="Comma-separated earlier unsubscribe secrets: tokens they signed still work.",
    )
    unsubscribe_mailto: str | None = Field(
        default=None, description="Address for the mailto: form of List-Unsubscribe."
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8090, ge=1, le=65535)
    api_processes: int = Field(
        default=1, ge=1, le=64, description="HTTP service processes sharing the port."
    )
    soft_bounce_limit: int = Field(
        default=3, ge=1, le=100, description="Soft bounces in a row that suppress an address."
    )
    worker_metrics_address: str = Field(
        default=DEFAULT_WORKER_METRICS_ADDRESS,
        description="ip:port of the worker's Prometheus endpoint (/metrics), or 'off'.",
    )
    api_metrics: bool = Field(
        default=True, description="Whether the HTTP service serves GET /metrics."
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @field_validator("worker_metrics_address")
    @classmethod
    def _metrics_address(cls, value: str) -> str:
        return metrics_address(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the running local stack's ``stack.env`` and ``stack.json``."""
        stack_file = data_dir() / STACK_FILE_NAME
        env_file = data_dir() / STACK_ENV_FILE_NAME
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if stack_file.is_file():  # both files describe a running stack; stack.json says so
            if env_file.is_file():
                sources.append(DotEnvSettingsSource(settings_cls, env_file=env_file))
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=stack_file))
        return tuple(sources)

    @cached_property
    def ui_namespace_url(self) -> str:
        """Web UI address of this namespace."""
        return f"{self.temporal_ui_url.rstrip('/')}/namespaces/{self.temporal_namespace}"

    def workflow_url(self, workflow_id: str) -> str:
        """Web UI link to one workflow."""
        return f"{self.ui_namespace_url}/workflows/{workflow_id}"

    def require_database_url(self) -> str:
        """The database URL, or a clear error saying how to provide one."""
        if not self.database_url:
            raise RuntimeError(
                "DATABASE_URL is not set and no local stack is running "
                "(start one with `campaigns stack up` or export DATABASE_URL)"
            )
        return self.database_url


def metrics_address(value: str) -> str:
    """``value`` as a metrics bind address: ``ip:port`` (``[::1]:9464`` for IPv6), or
    ``off`` (also for an empty value).

    Raises:
        ValueError: naming ``WORKER_METRICS_ADDRESS`` and the expected form.
    """
    value = value.strip()
    if value.lower() in ("", METRICS_OFF):
        return METRICS_OFF
    expected = (
        f"WORKER_METRICS_ADDRESS must be ip:port (such as {DEFAULT_WORKER_METRICS_ADDRESS}, "
        f"0.0.0.0:9464 or [::]:9464, port 1-65535) or '{METRICS_OFF}', not {value[:80]!r}"
    )
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or len(value) > 64:
        raise ValueError(expected)
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        raise ValueError(expected) from None
    if ":" in host and not host.startswith("["):
        raise ValueError(expected)  # an IPv6 address needs its brackets before the port
    return f"{host}:{int(port)}"
