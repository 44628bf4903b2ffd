"""A fake OpenAI-compatible endpoint for the ``cattune annotate`` tests.

A real HTTP server on 127.0.0.1, reached through the ``openai`` client as a user's
endpoint is, that answers each record's requests according to a script and records what
it received and served, so that a run's report can be checked against what really
happened. Tests get it from the ``fake_openai`` fixture (conftest.py), which stops every
server it started after the test.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ROUTE = "/v1/chat/completions"
SLOW_S = 2.5  # a "slow" reply comes after the 1 s client timeout that test_annotate gives
USAGE = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}  # of every named 200 reply


def completion(content, model="m", usage=None):
    """A chat completion whose one message carries ``content``."""
    reply = {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    if usage is not None:
        reply["usage"] = usage
    return reply


def as_json(status, obj, headers=None):
    """A reply as a behaviour returns it: (status, content type, body[, headers])."""
    reply = (status, "application/json", json.dumps(obj).encode())
    return reply + (headers,) if headers else reply


def _error(status, message, **fields):
    return as_json(status, {"error": {"message": message, **fields}})


class FakeOpenAI:
    """POST /v1/chat/completions (404 elsewhere); ``url`` is the base URL to give the client.

    ``answers`` maps each record's prompt to the annotation a good reply carries; a request
    belongs to the record whose prompt its last message quotes. ``script[prompt]`` lists
    the behaviours of that record's requests, one per request, then ``"good"``. A behaviour
    is a name (see :meth:`named`) or a function ``(request) -> (status, content type, body
    bytes[, headers dict])``, where ``request`` is ``{"body", "path", "auth"}``.

    Options: ``delay`` seconds before each reply; ``refuse=(status, message)``, the answer to
    every request that carries ``response_format`` json_schema (not counted as a record's
    request); ``gate_after`` (an attribute): requests beyond this many hang until ``gate``
    is set, then get no answer, as if their client had been killed meanwhile.

    What it saw: ``requests`` (prompt -> requests), ``served`` (named behaviour -> replies),
    ``auth`` (Authorization headers), ``paths`` (query included), ``formats`` (each
    request's ``response_format``, in arrival order).
    """

    def __init__(self, answers, script=None, delay=0.0, refuse=None):
        self.answers = answers
        self.script = script or {}
        self.delay = delay
        self.refuse = refuse
        self.requests = Counter()
        self.served = Counter()
        self.auth = set()
        self.paths = set()
        self.formats = []
        self.gate_after = None
        self.gate = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = {"body": body, "path": self.path, "auth": self.headers.get("Authorization", "")}
                fake.auth.add(request["auth"])
                fake.paths.add(self.path)
                try:
                    if urlsplit(self.path).path != ROUTE:
                        reply = _error(404, "no such route")
                    else:
                        reply = fake.respond(request)
                except BrokenPipeError:
                    return  # no answer: the client has left
                status, ctype, data, *headers = reply
                try:
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def respond(self, request):
        body = request["body"]
        fmt = body.get("response_format")
        with self.lock:
            self.formats.append(fmt)
        if self.refuse and fmt and fmt.get("type") == "json_schema":
            status, message = self.refuse
            return _error(status, message, type="invalid_request_error")
        content = body["messages"][-1]["content"]
        prompt = next(p for p in self.answers if json.dumps(p) in content)
        with self.lock:
            n = self.requests[prompt]
            self.requests[prompt] += 1
            total = sum(self.requests.values())
        steps = self.script.get(prompt, [])
        behaviour = steps[n] if n < len(steps) else "good"
        if self.gate_after is not None and total > self.gate_after:
            self.gate.wait()
            raise BrokenPipeError  # the client was killed meanwhile
        if self.delay:
            time.sleep(self.delay)
        if callable(behaviour):
            return behaviour(request)
        return self.named(behaviour, prompt, body["model"])

    def named(self, behaviour, prompt, model):
        """``"429"`` (Retry-After 0); ``"500"``, ``"400"``, ``"401"`` and ``"always-500"`` (an
        error saying "stub says N"); ``"slow"`` (no answer before ``SLOW_S``); else a 200
        completion whose content is ``"good"`` (the annotation as JSON), ``"fenced"`` (in a
        json code block among prose), ``"list"`` (a list of one-key objects among prose),
        ``"garbage"``, ``"empty"`` (``{}``), ``"invalid"`` (two pairs that are not in the
        text) or ``"mixed"`` (the annotation plus two invalid pairs)."""
        if behaviour == "always-500":
            behaviour = "500"
        with self.lock:
            self.served[behaviour] += 1
        if behaviour == "429":
            return _error(429, "rate limited", type="rate_limit") + ({"Retry-After": "0"},)
        if behaviour in ("500", "400", "401"):
            return _error(int(behaviour), f"stub says {behaviour}")
        if behaviour == "slow":
            time.sleep(SLOW_S)
            raise BrokenPipeError
        answer = self.answers[prompt]
        contents = {
            "good": json.dumps(answer),
            "fenced": f"Here you go:\n```json\n{json.dumps(answer, indent=2)}\n```\nAnything else?",
            "list": "Annotation: " + json.dumps([{k: v} for k, v in answer.items()]) + " (end)",
            "garbage": "I am sorry, I cannot do that.",
            "empty": "{}",
            "invalid": json.dumps({"Zed": ["apples"], "Case": ["Answer"]}),
            "mixed": json.dumps({**answer, "Case": ["Answer"], "Bob": ["Zoe"]}),
        }
        return as_json(200, completion(contents[behaviour], model, USAGE))
