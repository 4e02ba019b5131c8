"""The email provider adapter (Resend-compatible batch API)."""

from campaigns.provider._client import (
    ProviderAuthError,
    ProviderClient,
    ProviderConfigError,
    ProviderReply,
    ReplyKind,
    request_key,
)

__all__ = [
    "ProviderAuthError",
    "ProviderClient",
    "ProviderConfigError",
    "ProviderReply",
    "ReplyKind",
    "request_key",
]
