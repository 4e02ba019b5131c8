"""The email provider adapter (Resend-compatible batch API)."""

from campaigns.provider._client import (
    MAX_ANSWER_BYTES,
    MAX_ERROR_CHARS,
    MAX_RETRY_AFTER_SECONDS,
    Answer,
    ProviderAuthError,
    ProviderClient,
    ProviderConfigError,
    ProviderReply,
    ReplyKind,
    advertised_rate,
    classify_answer,
    request_key,
)

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_ERROR_CHARS",
    "MAX_RETRY_AFTER_SECONDS",
    "Answer",
    "ProviderAuthError",
    "ProviderClient",
    "ProviderConfigError",
    "ProviderReply",
    "ReplyKind",
    "advertised_rate",
    "classify_answer",
    "request_key",
]
