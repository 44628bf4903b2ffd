"""Assistant-LLM annotation: a chat model annotates records from a few human-written demos.

The prompt is a system message (our fixed rules plus the task's instructions), then
each demo as a user turn (the record) and an assistant turn (its annotation as JSON),
then the record to annotate. The model answers ``{KEY: [VALUE, ...]}``.

A reply is never trusted: ``parse_reply`` digs the JSON out of whatever came back and
``check_annotation`` keeps only the pairs that the mask builder can use (KEY and VALUE
occur in ``input + target`` as whole words, with an occurrence of VALUE ending before
an occurrence of KEY), using the same ``find_occurrences`` as ``cattune.masks``.

Any OpenAI-compatible chat endpoint works (OpenAI, vLLM, Ollama, GLM, ...), through the
official ``openai`` client. Its built-in retries are switched off (``max_retries=0``):
``LLMAnnotator`` retries on its own so that every retry is counted in the report, the
backoff base can be made tiny in tests, a 429 pauses every worker thread and not just
the one that saw it, and a stop request interrupts a backoff sleep.

Structured output: by default (``structured="auto"``) every request also carries
``response_format`` of type ``json_schema`` describing ``{KEY: [VALUE, ...]}``, so servers
that constrain decoding to a schema (vLLM, llama.cpp) can only answer in that shape. A
server that refuses the field gets the plain request instead, for the rest of the run;
the reply is parsed the same way either way, as servers may also accept the field and
ignore it (``transformers serve`` does).

Endpoints echo what they were sent (an HTTP 400 that repeats the Authorization header, a
proxy error quoting the URL), so every message built from an error or a reply passes
through a ``Redactor`` holding the API key and the base URL's credentials.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus, urlsplit, urlunsplit

from ..masks import find_occurrences
from ..records import Annotation, Record, RecordError, iter_records

SYSTEM_PROMPT = """\
You annotate training records for Causal Attention Tuning. A record is a prompt \
("input") followed by its answer ("target"); a language model reads the text \
input + target from left to right. For spans of that text (KEYS) you list the earlier \
spans (VALUES) that a careful reader must look at to produce the KEY.

Rules:
- Reply with a single JSON object {"KEY": ["VALUE", ...], ...} and nothing else.
- Copy every KEY and VALUE character for character from input + target: same \
spelling, case, spacing and number format.
- Every VALUE must occur in the text before its KEY.
"""

# Reply fields that wrap the annotation instead of being a KEY of it.
_WRAPPERS = ("important", "annotation", "annotations")

# Endpoint answers that no retry can fix: a wrong key, model or URL. The run stops.
_FATAL_STATUS = (401, 403, 404)

STRUCTURED_MODES = ("auto", "on", "off")

# The reply the prompt asks for. KEYs are free text, so the schema cannot be an OpenAI
# "strict" one (strict needs fixed, required properties and additionalProperties false);
# it is sent with strict false, which OpenAI treats as guidance, while servers that
# compile the schema into a grammar (vLLM, llama.cpp) enforce it regardless.
ANNOTATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"type": "array", "items": {"type": "string"}, "minItems": 1},
}
JSON_SCHEMA_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "cat_annotation",
        "description": "For each KEY span of input + target, the earlier VALUE spans it depends on.",
        "schema": ANNOTATION_SCHEMA,
        "strict": False,
    },
}
# How servers word a refusal of the field: "Unsupported response_format", "json_schema
# is not supported", "structured outputs are not available for this model", ...
_FORMAT_REFUSAL = re.compile(r"response[_ ]?format|json[_ ]?schema|structured[_ ]output", re.I)

# Sent when no key is set: local servers ignore it, so it is no secret.
PLACEHOLDER_KEY = "EMPTY"

# Nothing listens at the base URL (closed port, unknown host): a setup error, so only a
# few quick retries, enough to ride out a server restart, and never the long backoff.
CONNECT_RETRIES = 2
CONNECT_BACKOFF_MAX = 0.5


# --------------------------------------------------------------------------- secrets

REDACTED = "***"
# Query parameters that carry credentials: Azure's api-key, Google's key, tokens, signatures.
_SECRET_PARAM = re.compile(r"key|token|secret|passw|sig", re.I)
# Shorter "secrets" would mangle ordinary words in messages and protect nothing.
_MIN_SECRET = 4


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
    """Replaces known secrets in text with ``***`` before it is printed, logged or written."""

    def __init__(self, secrets: Iterable[str] = ()):
        found: set[str] = set()
        for secret in secrets:
            if isinstance(secret, str) and len(secret) >= _MIN_SECRET:
                # An echo may carry the key as sent in a URL, or decoded from one.
                found.update({secret, quote(secret, safe=""), quote_plus(secret), unquote_plus(secret)})
        self.secrets = sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)

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


# --------------------------------------------------------------------------- files


def resolve_file(spec: str | os.PathLike, kind: str) -> Path:
    """A user's path, or ``builtin:NAME`` for a file shipped with cattune.

    ``kind`` is ``"demos"`` (``NAME_demos.jsonl``) or ``"instructions"``
    (``NAME_instructions.md``).
    """
    spec = str(spec)
    if not spec.startswith("builtin:"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file ({kind})")
        return path
    name = spec[len("builtin:") :]
    suffix = {"demos": "jsonl", "instructions": "md"}[kind]
    shipped = resources.files("cattune") / "resources" / "annotate"
    path = Path(str(shipped / f"{name}_{kind}.{suffix}"))
    if not path.is_file():
        known = sorted(p.name.split("_")[0] for p in Path(str(shipped)).glob(f"*_{kind}.{suffix}"))
        raise FileNotFoundError(f"no shipped {kind} named {name!r}; shipped: {', '.join(known) or 'none'}")
    return path


def load_instructions(spec: str | os.PathLike) -> str:
    text = resolve_file(spec, "instructions").read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{spec}: the instructions file is empty")
    return text


def load_demos(spec: str | os.PathLike) -> list[Record]:
    """Read the human-written demos; every pair must pass ``check_annotation``.

    A demo with a pair the pipeline would drop teaches the model to produce it, so a
    bad demo is an error (file:line and the pair), not a warning.
    """
    path = resolve_file(spec, "demos")
    demos = []
    for lineno, record in read_records(path):
        if not record.important:
            raise RecordError(f"{path}:{lineno}: a demo needs a non-empty 'important'")
        checked = check_annotation(record, record.important)
        if checked.dropped or checked.repaired:
            key, value, reason = (checked.dropped or [("?", "?", "needs repair (spacing or case)")])[0]
            raise RecordError(f"{path}:{lineno}: demo pair {key!r} <- {value!r}: {reason}")
        demos.append(record)
    if not demos:
        raise ValueError(f"{path}: no demos in the file")
    return demos


def read_records(path: str | os.PathLike) -> list[tuple[int, Record]]:
    """``(line number, Record)`` for every non-blank line: ids and messages need the line."""
    return list(iter_records(path, with_lines=True))


# --------------------------------------------------------------------------- prompt


def _as_object(annotation: Annotation) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for key, values in annotation:
        bucket = merged.setdefault(key, [])
        bucket.extend(v for v in values if v not in bucket)
    return merged


def format_record(record: Record) -> str:
    # JSON strings make leading/trailing spaces and quotes in the text unambiguous.
    body = json.dumps({"input": record.prompt, "target": record.target}, ensure_ascii=False)
    return f"Record:\n{body}"


def build_messages(record: Record, demos: list[Record], instructions: str = "") -> list[dict[str, str]]:
    system = SYSTEM_PROMPT if not instructions else f"{SYSTEM_PROMPT}\n{instructions}"
    messages = [{"role": "system", "content": system}]
    for demo in demos:
        messages.append({"role": "user", "content": format_record(demo)})
        messages.append({"role": "assistant", "content": json.dumps(_as_object(demo.important), ensure_ascii=False)})
    messages.append({"role": "user", "content": format_record(record)})
    return messages


# --------------------------------------------------------------------------- replies


class ReplyError(ValueError):
    """The model's reply holds no JSON annotation we can read."""


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def _raw_pairs(obj: Any) -> list[tuple[Any, Any]] | None:
    """The (key, values) items of an accepted reply shape, or None for another shape."""
    if isinstance(obj, dict):
        if len(obj) == 1:
            (name, inner), = obj.items()
            wrapped = isinstance(inner, dict) or (isinstance(inner, list) and inner and isinstance(inner[0], dict))
            if name in _WRAPPERS and wrapped:
                return _raw_pairs(inner)
        return list(obj.items())
    if isinstance(obj, list) and all(isinstance(item, dict) for item in obj):
        return [pair for item in obj for pair in item.items()]
    return None


def _preview(text: Any) -> str:
    return repr(str(text).strip()[:80])


def reply_text(content: Any) -> str | None:
    """The text of a message's ``content``: a string, or the text parts of a list of parts.

    The client does not check the type, so a server can hand back anything here; what
    is not text is a ``ReplyError`` for this record, not a crash of the run.
    """
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        texts = [text for text in texts if isinstance(text, str)]
        if not texts:
            raise ReplyError(f"message content has no text part: {_preview(json.dumps(content, default=str))}")
        return "".join(texts)
    shown = json.dumps(content, default=str)
    raise ReplyError(f"message content is {type(content).__name__}, not text: {_preview(shown)}")


def parse_reply(text: str | list | None) -> list[tuple[Any, Any]]:
    """The (key, values) pairs of a reply, unchecked; ``ReplyError`` when there are none.

    Accepts a bare JSON object, one inside a fenced code block, one with text before or
    after it, a list of one-key objects, and a ``{"important": ...}`` wrapper. Reasoning
    models' ``<think>...</think>`` preambles are skipped. ``text`` may also be a list of
    content parts (``[{"type": "text", "text": ...}, ...]``): their text is the reply.
    """
    text = reply_text(text)
    if text is None or not text.strip():
        raise ReplyError("empty reply")
    text = _THINK.sub("", text)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        candidate = candidate.strip()
        try:
            pairs = _raw_pairs(json.loads(candidate))
        except json.JSONDecodeError:
            pairs = None
        if pairs is not None:
            return pairs
        # Text around the JSON: try each opening bracket until one decodes to a known shape.
        starts = [i for i, c in enumerate(candidate) if c in "{["][:200]
        for i in starts:
            try:
                obj, _ = decoder.raw_decode(candidate, i)
            except json.JSONDecodeError:
                continue
            pairs = _raw_pairs(obj)
            if pairs is not None:
                return pairs
    raise ReplyError(f"no JSON object in the reply: {text.strip()[:80]!r}")


# --------------------------------------------------------------------------- validation

NOT_A_STRING = "not a string"
KEY_NOT_FOUND = "key not found in text"
VALUE_NOT_FOUND = "value not found in text"
NOT_BEFORE = "value not before key"
NO_VALUES = "key without values"


@dataclass
class Checked:
    kept: Annotation
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, reason)
    repaired: int = 0  # spans kept after fixing spacing or case


def _as_text(x: Any) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return repr(x)
    return None


def _locate(text: str, span: str) -> tuple[str, list[tuple[int, int]]] | None:
    """The spelling of ``span`` found in ``text`` and its occurrences, or None.

    Models often add surrounding spaces or change case; those are repaired to the
    text's own spelling, anything else is not guessed at.
    """
    if span and (occ := find_occurrences(text, span)):
        return span, occ
    stripped = span.strip()
    if not stripped:
        return None
    if stripped != span and (occ := find_occurrences(text, stripped)):
        return stripped, occ
    lowered = text.lower()
    if len(lowered) == len(text):  # case folding kept character positions
        for start, end in find_occurrences(lowered, stripped.lower()):
            spelling = text[start:end]
            if occ := find_occurrences(text, spelling):
                return spelling, occ
    return None


def check_annotation(record: Record, pairs: list[tuple[Any, Any]], dedupe: bool = True) -> Checked:
    """Keep the pairs the mask builder can place; report every other one with a reason.

    A pair is kept when KEY and VALUE occur in ``record.text`` (whole words, as in
    ``cattune.masks``) and some occurrence of VALUE ends before some occurrence of KEY
    starts. Repeated keys are merged; a repeated value is kept once unless ``dedupe``
    is False (rules list one value per matched item, even when two items print alike).
    """
    text = record.text
    merged: dict[str, list[str]] = {}
    checked = Checked(kept=[])
    for raw_key, raw_values in pairs:
        values = raw_values if isinstance(raw_values, list) else [raw_values]
        key = _as_text(raw_key)
        shown_values = [v if isinstance(v, str) else json.dumps(v) for v in values] or [""]
        if key is None:
            checked.dropped += [(json.dumps(raw_key), v, NOT_A_STRING) for v in shown_values]
            continue
        if not values:
            checked.dropped.append((key, "", NO_VALUES))
            continue
        found_key = _locate(text, key)
        if found_key is None:
            checked.dropped += [(key, v, KEY_NOT_FOUND) for v in shown_values]
            continue
        if found_key[0] != key:
            checked.repaired += 1
        key, key_occ = found_key
        last_key_start = max(start for start, _ in key_occ)
        for raw_value, shown in zip(values, shown_values):
            value = _as_text(raw_value)
            if value is None:
                checked.dropped.append((key, shown, NOT_A_STRING))
                continue
            found = _locate(text, value)
            if found is None:
                checked.dropped.append((key, value, VALUE_NOT_FOUND))
                continue
            spelling, value_occ = found
            if min(end for _, end in value_occ) > last_key_start:
                checked.dropped.append((key, value, NOT_BEFORE))
                continue
            if spelling != value:
                checked.repaired += 1
            bucket = merged.setdefault(key, [])
            if not dedupe or spelling not in bucket:
                bucket.append(spelling)
    checked.kept = [(k, vs) for k, vs in merged.items() if vs]
    return checked


# --------------------------------------------------------------------------- requests


class EndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, model or URL): stop the run."""


class RequestFailed(RuntimeError):
    """Transient errors (429, 5xx, timeouts) outlasted the retries for one record."""


class Stopped(Exception):
    """The run is being stopped; the record is left for the next run."""


class _Rejected(Exception):
    """The endpoint rejected this one request (e.g. too long); not worth repeating."""


@dataclass
class Outcome:
    """What annotating one record produced; the pipeline sums these into its report."""

    annotation: Annotation = field(default_factory=list)
    empty_reason: str | None = None  # set when the annotation is empty
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # over all replies
    repaired: int = 0
    requests: int = 0  # requests sent, failed ones included
    api_retries: int = 0  # requests repeated after 429/5xx/timeout/connection errors
    bad_replies: int = 0  # replies that were unparseable or had no valid pair
    rejected: bool = False  # the endpoint rejected this record's request (400, 413, 422)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add_usage(self, usage: Any) -> None:
        if usage is None:
            return
        for name in ("prompt_tokens", "completion_tokens"):
            n = getattr(usage, name, None)
            if isinstance(n, int):
                setattr(self, name, (getattr(self, name) or 0) + n)


def _describe(err: Exception, redact: Callable[[str], str] = lambda text: text) -> str:
    """A short description of an error; ``redact`` sees the whole text before it is cut."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIStatusError):
        message = redact(getattr(err, "message", "") or "")
        return f"HTTP {err.status_code}" + (f": {message[:120]}" if message else "")
    return f"{type(err).__name__}: {redact(str(err))[:120]}"


def _refuses_response_format(err: Exception) -> bool:
    """Whether an error answer names the response_format field or json_schema."""
    text = getattr(err, "message", "") or ""
    body = getattr(err, "body", None)
    if body is not None:
        text += " " + (body if isinstance(body, str) else json.dumps(body, default=str))
    return bool(_FORMAT_REFUSAL.search(text))


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from these servers, the backoff will do


def make_client(base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                require_key: bool = False):
    """An ``openai.OpenAI`` client that never retries by itself.

    The key is read from the environment variable ``api_key_env`` only. Local servers
    (vLLM, Ollama) want none, so an unset variable sends a placeholder unless
    ``require_key``. A query in ``base_url`` (``...?api-key=K``, as some gateways want)
    is sent with every request.
    """
    import openai

    if not timeout > 0:
        raise ValueError(f"the timeout must be a positive number of seconds, got {timeout!r}")
    key = os.environ.get(api_key_env)
    if not key:
        if require_key:
            raise ValueError(f"environment variable {api_key_env} is not set (it must hold the API key)")
        key = PLACEHOLDER_KEY
    query = None
    if base_url and urlsplit(base_url).query:
        # The client appends its routes to the base URL as text, which would put them
        # after the query ("/v1?api-key=Kchat/completions"); it takes a query apart.
        parts = urlsplit(base_url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        base_url = urlunsplit(parts._replace(query=""))
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0, default_query=query)


def _cannot_connect(err: Exception) -> str | None:
    """Why no connection could be made ("Connection refused"), or None for other errors.

    The client wraps the transport's ConnectError (httpx's or httpx2's, both named so),
    which wraps the socket's error; a timeout or a connection cut mid-reply is not one.
    """
    import openai

    if not isinstance(err, openai.APIConnectionError) or isinstance(err, openai.APITimeoutError):
        return None
    chain, cause = [], err.__cause__ or err.__context__
    while cause is not None and cause not in chain and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any(type(c).__name__ == "ConnectError" or isinstance(c, (ConnectionRefusedError, socket.gaierror))
               for c in chain):
        return None
    innermost = chain[-1]
    return getattr(innermost, "strerror", None) or str(innermost) or type(innermost).__name__


def _message_content(response: Any, redact: Callable[[str], str]) -> Any:
    """The first choice's message content of a 200 answer, or ``ReplyError`` saying what came instead.

    Whatever the endpoint sent goes through ``redact`` first: messages show the start of
    it, and a cut could leave half a secret where the whole one would have been replaced.
    """
    if isinstance(response, str):  # the client hands back a non-JSON body (text/plain, HTML) as it is
        raise ReplyError(f"reply was not JSON: {_preview(redact(response))}")
    if not hasattr(response, "choices"):  # JSON, but a list or a scalar
        raise ReplyError(f"reply is not a chat completion: {_preview(redact(json.dumps(response, default=str)))}")
    choices = response.choices
    if not isinstance(choices, list) or not choices:
        shown = response.to_dict() if callable(getattr(response, "to_dict", None)) else response
        raise ReplyError(f"reply has no choices: {_preview(redact(json.dumps(shown, default=str)))}")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise ReplyError("reply has no message in its first choice")
    content = getattr(message, "content", None)
    if content is None:
        return None
    if isinstance(content, str):
        return redact(content)
    # Content parts or worse: redacted as JSON text, which a replaced secret keeps valid.
    return json.loads(redact(json.dumps(content, default=str, ensure_ascii=False)))


class _Pause:
    """A moment before which no worker sends a request: one 429 slows every thread."""

    def __init__(self):
        self._until = 0.0
        self._lock = threading.Lock()

    def push(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        while (left := self._until - time.monotonic()) > 0:
            if stop.wait(left):
                raise Stopped()


class LLMAnnotator:
    """Annotates one record at a time; safe to call from several threads at once.

    ``max_retries``: how often a request is repeated after a transient error (429, 5xx,
    408/409, timeout, connection error), waiting ``backoff_base * 2**n`` seconds (with
    jitter, at most ``backoff_max``, at least the server's Retry-After). ``reply_retries``:
    how often a record is asked again when the reply is unparseable or has no valid pair.

    ``structured``: ``"auto"`` sends ``response_format`` json_schema until the endpoint
    refuses it (an error answer naming response_format or json_schema), then drops it for
    the rest of the run; ``"on"`` stops the run on such a refusal (``EndpointError``);
    ``"off"`` never sends it. ``json_mode`` asks for ``json_object`` whenever json_schema
    is not sent. ``log`` receives a one-line note when the fallback happens.

    A closed port or an unknown host stops the run (``EndpointError`` naming the base URL)
    after at most ``CONNECT_RETRIES`` quick retries. The API key and the base URL's
    credentials never appear in what it returns, raises or logs (``redact``).
    """

    def __init__(
        self,
        client: Any,
        model: str,
        demos: list[Record],
        instructions: str = "",
        *,
        temperature: float | None = 0.9,
        top_p: float | None = 0.7,
        max_tokens: int | None = 1024,
        json_mode: bool = False,
        structured: str = "auto",
        reply_retries: int = 2,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        stop: threading.Event | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if reply_retries < 0 or max_retries < 0:
            raise ValueError("retry counts must be >= 0")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff times must be >= 0")
        if structured not in STRUCTURED_MODES:
            raise ValueError(f"structured must be one of {', '.join(STRUCTURED_MODES)}, got {structured!r}")
        self.client = client
        self.model = model
        self.demos = demos
        self.instructions = instructions
        self.reply_retries = reply_retries
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stop = stop or threading.Event()
        self._pause = _Pause()
        self._params: dict[str, Any] = {}
        if temperature is not None:
            self._params["temperature"] = temperature
        if top_p is not None:
            self._params["top_p"] = top_p
        if max_tokens is not None:
            self._params["max_tokens"] = max_tokens
        self.structured = structured
        self.log = log
        self._plain_format = {"type": "json_object"} if json_mode else None
        self._send_schema = structured != "off"
        self._format_lock = threading.Lock()
        self.structured_fallback: str | None = None  # why json_schema was dropped, if it was
        self.redact = Redactor.for_client(client)
        base_url = getattr(client, "base_url", None)
        self.endpoint = self.redact.url(str(base_url).rstrip("/")) if base_url else "the endpoint"

    def response_format(self) -> dict[str, Any] | None:
        """What the next request sends as ``response_format`` (None: the field is left out)."""
        return JSON_SCHEMA_FORMAT if self._send_schema else self._plain_format

    def report_fields(self) -> dict[str, Any]:
        """For the run's report: the response_format sent at the end and any fallback."""
        sent = self.response_format()
        return {"response_format": sent["type"] if sent else None, "structured_fallback": self.structured_fallback}

    def _drop_schema(self, reason: str) -> None:
        reason = self.redact(reason)
        if self.structured == "on":
            raise EndpointError(f"the endpoint refuses response_format json_schema ({reason}); "
                                "use --structured auto to fall back to plain-text replies, or --structured off") from None
        with self._format_lock:
            if not self._send_schema:
                return  # another worker saw the same refusal first
            self._send_schema = False
            self.structured_fallback = reason
        if self.log:
            plain = "response_format json_object" if self._plain_format else "plain-text replies"
            self.log(self.redact(f"note: the endpoint refuses response_format json_schema ({reason}); "
                                 f"using {plain} for the rest of the run"))

    def messages(self, record: Record) -> list[dict[str, str]]:
        return build_messages(record, self.demos, self.instructions)

    def __call__(self, record: Record) -> Outcome:
        return self.annotate(record)

    def annotate(self, record: Record) -> Outcome:
        """Ask until a reply has a valid pair, at most ``1 + reply_retries`` replies.

        Raises ``RequestFailed`` (transient errors outlasted the retries), ``EndpointError``
        (the endpoint refuses everything, or nothing listens at its URL) or ``Stopped``. A
        request the endpoint rejects for this record alone comes back as an empty Outcome
        with ``rejected`` set.
        """
        try:
            outcome = self._annotate(record)
        except (RequestFailed, EndpointError) as e:
            raise type(e)(self.redact(str(e))) from None
        if outcome.empty_reason:
            outcome.empty_reason = self.redact(outcome.empty_reason)
        return outcome

    def _annotate(self, record: Record) -> Outcome:
        messages = self.messages(record)
        outcome = Outcome()
        problem = ""
        for _ in range(1 + self.reply_retries):
            try:
                pairs = parse_reply(self._request(messages, outcome))
            except _Rejected as e:
                outcome.rejected = True
                outcome.empty_reason = f"request rejected: {e}"
                return outcome
            except ReplyError as e:
                outcome.bad_replies += 1
                problem = f"unparseable reply ({e})"
                continue
            checked = check_annotation(record, pairs)
            outcome.dropped += checked.dropped
            if checked.kept:
                outcome.annotation = checked.kept
                outcome.repaired += checked.repaired
                return outcome
            outcome.bad_replies += 1
            if not pairs:
                problem = "the model returned an empty annotation"
            else:
                reasons = sorted({reason for _, _, reason in checked.dropped})
                problem = f"no valid pair ({len(checked.dropped)} dropped: {', '.join(reasons)})"
        outcome.empty_reason = f"{problem}; {outcome.bad_replies} replies"
        return outcome

    def _request(self, messages: list[dict[str, str]], outcome: Outcome) -> Any:
        """The message content of one reply; ``ReplyError`` for an answer that holds none."""
        import openai

        attempt = 0  # transient errors so far; a refused response_format is not one
        while True:
            self._pause.wait(self.stop)
            if self.stop.is_set():
                raise Stopped()
            outcome.requests += 1
            params = dict(self._params)
            if (response_format := self.response_format()) is not None:
                params["response_format"] = response_format
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, **params)
            except openai.APIStatusError as e:
                status = e.status_code
                described = _describe(e, self.redact)
                if status in _FATAL_STATUS:
                    raise EndpointError(f"the endpoint answered {described}; check --base-url, --model and the API key") from None
                # Some servers answer an unknown response_format type with a 500; naming the
                # field makes it a refusal, not a transient error worth backing off for.
                if (status not in (408, 409, 429) and response_format is JSON_SCHEMA_FORMAT
                        and _refuses_response_format(e)):
                    self._drop_schema(described)
                    continue  # the same request at once, without the schema
                if not (status in (408, 409, 429) or status >= 500):
                    raise _Rejected(described) from None
                error = e
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError) as e:
                error = e
            except json.JSONDecodeError as e:
                # A 200 that says JSON but is not (a proxy's page, a cut body): this reply is
                # bad, the endpoint may still be fine.
                raise ReplyError(f"reply was not JSON ({e.msg}): {_preview(self.redact(e.doc))}") from None
            else:
                outcome.add_usage(getattr(response, "usage", None))
                return _message_content(response, self.redact)
            refused = _cannot_connect(error)
            retries = min(self.max_retries, CONNECT_RETRIES) if refused else self.max_retries
            if attempt >= retries:
                if refused:
                    raise EndpointError(f"cannot connect to {self.endpoint}: {refused} ({attempt + 1} attempts); "
                                        "is the server running? Check --base-url")
                raise RequestFailed(f"{_describe(error, self.redact)} after {attempt + 1} requests")
            outcome.api_retries += 1
            delay = min(self.backoff_max, self.backoff_base * 2**attempt)
            if refused:
                delay = min(delay, CONNECT_BACKOFF_MAX)
            delay = delay * (0.5 + 0.5 * random.random())  # spread out threads that failed together
            hinted = _retry_after(error)
            if hinted is not None:
                delay = max(delay, min(hinted, self.backoff_max))
            if isinstance(error, openai.RateLimitError):
                self._pause.push(delay)
            elif self.stop.wait(delay):
                raise Stopped()
            attempt += 1
