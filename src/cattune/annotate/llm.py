"""Assistant-LLM annotation: a chat model annotates records from a few human-written demos.

The prompt (``prompt``), the reading of replies (``replies``) and the redaction of
secrets (``secrets``) have modules of their own; this one sends the requests.

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
import math
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..fields import check_number
from ..records import Annotation, Record
from .prompt import build_messages
from .replies import NESTED_TOO_DEEPLY, ReplyError, check_annotation, dumps, parse_reply, preview
from .secrets import PLACEHOLDER_KEY, Redactor

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


# The longest wait between retries a user may set, and the longest Retry-After honoured:
# a server asking for more (a daily quota, or a hostile 1e12) fails the record now.
MAX_WAIT_S = 3600.0
MAX_RETRIES = 100


# Nothing listens at the base URL (closed port, unknown host): a setup error, so only a
# few quick retries, enough to ride out a server restart, and never the long backoff.
CONNECT_RETRIES = 2
CONNECT_BACKOFF_MAX = 0.5

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
    bad_usage: int = 0  # replies whose token counts were not counts (negative, text, ...): not summed

    def add_usage(self, usage: Any) -> None:
        if usage is None:
            return
        counts = [getattr(usage, name, None) for name in ("prompt_tokens", "completion_tokens")]
        if not all(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 0) for n in counts):
            self.bad_usage += 1
            return
        for name, n in zip(("prompt_tokens", "completion_tokens"), counts):
            if n is not None:
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
        try:
            text += " " + (body if isinstance(body, str) else dumps(body))
        except ReplyError:  # an error body nested too deeply to be a refusal worth reading
            pass
    return bool(_FORMAT_REFUSAL.search(text))


def _retry_after(err: Exception) -> float | None:
    """The seconds a Retry-After header asks for; None without one, or for "nan"."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from these servers, the backoff will do
    return max(0.0, seconds) if seconds is not None and not math.isnan(seconds) else None


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
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")  # what the client would read itself
    if base_url:
        parts = urlsplit(base_url)
        if "@" in parts.netloc:
            # The client would send them as Basic auth in place of the key, and servers echo that header.
            raise ValueError("the base URL holds credentials before its host (user:password@host): remove them, "
                             "put the key in an environment variable and name it with --api-key-env")
        if parts.scheme not in ("http", "https") or not parts.netloc:  # else each request times out on its own
            raise ValueError(f"the base URL must start with http:// or https:// and name a host, e.g. "
                             f"http://127.0.0.1:8000/v1; got {Redactor.for_endpoint(None, base_url).url(base_url)}")
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

    Messages show the start of what the endpoint sent, redacted before the cut: a cut
    could leave half a secret where the whole one would have been replaced. The content
    itself comes back as sent (``parse_reply`` redacts what it shows of it): redacting it
    here would break annotations where a short key is part of a word.
    """
    if isinstance(response, str):  # the client hands back a non-JSON body (text/plain, HTML) as it is
        raise ReplyError(f"reply was not JSON: {preview(redact(response))}")
    if not hasattr(response, "choices"):  # JSON, but a list or a scalar
        raise ReplyError(f"reply is not a chat completion: {preview(redact(dumps(response)))}")
    choices = response.choices
    if not isinstance(choices, list) or not choices:
        # warnings=False: pydantic's warning about the wrong type quotes the value raw on stderr.
        shown = response.to_dict(warnings=False) if callable(getattr(response, "to_dict", None)) else response
        raise ReplyError(f"reply has no choices: {preview(redact(dumps(shown)))}")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise ReplyError("reply has no message in its first choice")
    return getattr(message, "content", None)


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
        check_number("reply_retries", reply_retries, 0, MAX_RETRIES, integer=True)
        check_number("max_retries", max_retries, 0, MAX_RETRIES, integer=True)
        check_number("backoff_base", backoff_base, 0, MAX_WAIT_S, unit=" of seconds")
        check_number("backoff_max", backoff_max, 0, MAX_WAIT_S, unit=" of seconds")
        if temperature is not None:
            check_number("temperature", temperature, 0, 2)
        if top_p is not None:
            check_number("top_p", top_p, 0, 1)
        if max_tokens is not None:
            check_number("max_tokens", max_tokens, 0, integer=True, above=True)
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
                pairs = parse_reply(self._request(messages, outcome), self.redact)
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
                raise ReplyError(f"reply was not JSON ({e.msg}): {preview(self.redact(e.doc))}") from None
            except RecursionError:  # a body of 100k nested brackets: the decoder gives up
                raise ReplyError(f"reply {NESTED_TOO_DEEPLY}") from None
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
            hinted = _retry_after(error)
            if hinted is not None and hinted > MAX_WAIT_S:
                raise RequestFailed(f"{_describe(error, self.redact)}; the endpoint asks to wait {hinted:g} s "
                                    f"(Retry-After), longer than cattune waits ({MAX_WAIT_S:g} s)")
            outcome.api_retries += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 60))
            if refused:
                delay = min(delay, CONNECT_BACKOFF_MAX)
            delay = delay * (0.5 + 0.5 * random.random())  # spread out threads that failed together
            if hinted is not None:  # the server's wait, in full, even beyond --backoff-max
                delay = max(delay, hinted)
            if isinstance(error, openai.RateLimitError):
                self._pause.push(delay)
            elif self.stop.wait(delay):
                raise Stopped()
            attempt += 1
