"""Run the provider simulator: ``python -m simulator --port 8025``.

The accepted API keys come from ``SIMULATOR_API_KEYS`` (comma-separated); without it
any bearer key is accepted. The admin endpoints (``/_sim/...``) need the token in
``SIMULATOR_ADMIN_TOKEN``, sent as ``Authorization: Bearer <token>``; without it they
are refused.

Webhook events are posted to ``SIMULATOR_WEBHOOK_URL`` when it is set, signed with
the ``whsec_`` secret in ``SIMULATOR_WEBHOOK_SECRET`` (required with the URL, never
printed); rates and address lists are set with ``PUT /_sim/config``.
"""

from __future__ import annotations

import argparse
import os

from aiohttp import web
from pydantic import ValidationError

from simulator.app import ADMIN_TOKEN_ENV, Simulator, SimulatorConfig, validation_message

WEBHOOK_URL_ENV = "SIMULATOR_WEBHOOK_URL"
WEBHOOK_SECRET_ENV = "SIMULATOR_WEBHOOK_SECRET"


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="simulator", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("SIMULATOR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SIMULATOR_PORT", 8025)))
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0)
    parser.add_argument("--error-rate-before", type=float, default=0.0)
    parser.add_argument("--error-rate-after", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--keep-messages", type=int, default=10_000)
    args = parser.parse_args(argv)
    keys = [k.strip() for k in os.environ.get("SIMULATOR_API_KEYS", "").split(",") if k.strip()]
    webhook_url = os.environ.get(WEBHOOK_URL_ENV, "").strip() or None
    webhook_secret = os.environ.get(WEBHOOK_SECRET_ENV, "").strip() or None
    try:
        config = SimulatorConfig.model_validate(
            {
                "api_keys": keys,
                "latency_ms": args.latency_ms,
                "latency_jitter_ms": args.latency_jitter_ms,
                "error_rate_before": args.error_rate_before,
                "error_rate_after": args.error_rate_after,
                "rate_limit_per_second": args.rate_limit,
                "keep_messages": args.keep_messages,
                "webhook_url": webhook_url,
                "webhook_secret": webhook_secret,
            }
        )
    except ValidationError as exc:
        # The message names fields and limits, never the values (the secret is one).
        parser.error(f"{WEBHOOK_URL_ENV}/{WEBHOOK_SECRET_ENV} or flags: {validation_message(exc)}")
    admin_token = os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
    try:
        simulator = Simulator(config, admin_token=admin_token)
    except ValueError as exc:
        parser.error(f"{ADMIN_TOKEN_ENV}: {exc}")
    # Say whether the admin API is on, never what the token is.
    admin = (
        "admin endpoints need the token from " + ADMIN_TOKEN_ENV
        if simulator.admin_enabled
        else f"admin endpoints disabled (set {ADMIN_TOKEN_ENV} to enable them)"
    )
    admin += "; webhooks " + ("on" if config.webhook_url else f"off (set {WEBHOOK_URL_ENV})")
    web.run_app(
        simulator.app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda *_: print(
            f"provider simulator listening on http://{args.host}:{args.port}; {admin}"
        ),
    )


if __name__ == "__main__":
    main()
