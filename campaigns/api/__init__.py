"""The HTTP service: provider webhooks and one-click unsubscribe (``create_app``).

Run it with ``campaigns api`` or ``python -m campaigns.api``.
"""

from campaigns.api.app import create_app

__all__ = ["create_app"]
