"""Keeping secrets out of what the annotator prints, logs and writes.

Endpoints echo what they were sent (an HTTP 400 that repeats the Authorization header, a
proxy error quoting the URL), so every message built from an error or a reply passes
through a ``Redactor`` holding the API key and the base URL's credentials.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

# Sent when no key is set: local servers ignore it, so it is no secret.
PLACEHOLDER_KEY = "EMPTY"

REDACTED = "***"
# Query parameters that carry credentials: Azure's api-key, Google's key, tokens, signatures.
_SECRET_PARAM = re.compile(r"key|token|secret|passw|sig", re.I)


def _is_secret_param(part: str) -> bool:
    """Whether ``name=value``, one part of a query, holds a credential."""
    name, _, value = part.partition("=")
    return bool(value) and bool(_SECRET_PARAM.search(unquote_plus(name)))


def _secret_params(url: str) -> list[str]:
    """The raw values of ``url``'s query parameters whose name says they are credentials."""
    return [part.partition("=")[2] for part in urlsplit(url).query.split("&") if _is_secret_param(part)]


def redact_url(url: str) -> str:
    """``url`` with the values of credential query parameters and any password replaced."""
    parts = urlsplit(url)
    query = [f"{part.partition('=')[0]}={REDACTED}" if _is_secret_param(part) else part
             for part in parts.query.split("&")]
    netloc = parts.netloc
    if parts.password:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(query)))


class Redactor:
    """Replaces known secrets in text with ``***`` before it is printed, logged or written.

    Every secret counts, however short: a three-letter key of a local server is still
    the key (it mangles words of messages that hold it, which is the lesser harm).
    """

    def __init__(self, secrets: Iterable[str] = ()):
        found: set[str] = set()
        for secret in secrets:
            if isinstance(secret, str) and secret:
                # An echo may carry the key as sent in a URL, or decoded from one, or
                # quoted in JSON text (a report, an error body).
                variants = {secret, quote(secret, safe=""), quote_plus(secret), unquote_plus(secret)}
                found.update(variants | {json.dumps(v, ensure_ascii=a)[1:-1] for v in variants for a in (True, False)})
        self.secrets = sorted((s for s in found if s), key=len, reverse=True)

    @classmethod
    def for_endpoint(cls, api_key: Any, base_url: Any = None, query: dict[str, Any] | None = None) -> "Redactor":
        """The secrets of an endpoint: the API key, and credentials in the base URL or its query."""
        secrets = [api_key] if isinstance(api_key, str) and api_key != PLACEHOLDER_KEY else []
        if base_url:
            base_url = str(base_url)
            secrets += _secret_params(base_url)
            secrets.append(urlsplit(base_url).password or "")
        secrets += [str(v) for k, v in (query or {}).items() if _SECRET_PARAM.search(str(k))]
        return cls(secrets)

    @classmethod
    def for_client(cls, client: Any) -> "Redactor":
        query = getattr(client, "default_query", None)
        return cls.for_endpoint(getattr(client, "api_key", None), getattr(client, "base_url", None),
                                query if isinstance(query, dict) else None)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def url(self, url: str) -> str:
        return self(redact_url(url))

    def values(self, obj: Any) -> Any:
        """``obj`` (a report) with every string value redacted; its keys are ours, and
        redacting JSON text instead would mangle them or its syntax with a short key."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {k: self.values(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.values(v) for v in obj]
        return obj

