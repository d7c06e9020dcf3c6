"""Scrubs secrets out of text before it reaches an exception message or a log line."""

from __future__ import annotations

import re

_REDACTED = "<redacted>"

# Ordered: PEM blocks and whole connection strings first, so their AccountKey/SAS parts are not left half-masked.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL), _REDACTED),
    (re.compile(r"DefaultEndpointsProtocol=[^\s'\"]*", re.IGNORECASE), _REDACTED),
    (re.compile(r"(AccountKey|SharedAccessSignature|SharedAccessKey)=[^;\s'\"]*", re.IGNORECASE), rf"\1={_REDACTED}"),
    (re.compile(r"\b(sig|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|"
                r"Signature|AWSAccessKeyId|access_token|token)=[^&\s'\"]*", re.IGNORECASE), rf"\1={_REDACTED}"),
    (re.compile(r"(Authorization|x-amz-security-token|x-ms-copy-source-authorization)(['\"]?\s*[:=]\s*['\"]?)"
                r"(Bearer |Basic |AWS4-HMAC-SHA256 |SharedKey )?[^'\"\r\n,}]*", re.IGNORECASE), rf"\1\2{_REDACTED}"),
    (re.compile(r"(aws_secret_access_key|secret_access_key|private_key|client_secret|password)(['\"]?\s*[:=]\s*['\"]?)"
                r"[^'\"\s,}]*", re.IGNORECASE), rf"\1\2{_REDACTED}"),
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), f"{_REDACTED}@"),
)


def redact(text: str) -> str:
    """Returns text with credentials, signatures, SAS tokens and connection strings masked."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
