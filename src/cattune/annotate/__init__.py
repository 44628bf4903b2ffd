"""Causal signals: word-level annotations "when producing KEY, look at VALUE".

``rules``: programmatic annotation for data whose causal graph is known.
``llm``: an assistant LLM annotates from a few human-written demos.
``command``: ``cattune annotate``, the resumable pipeline over a JSONL file, and the
token alignment check.
"""

from .command import annotate_file, check_alignment
from .llm import (
    EndpointError,
    LLMAnnotator,
    Outcome,
    Redactor,
    ReplyError,
    RequestFailed,
    build_messages,
    check_annotation,
    load_demos,
    load_instructions,
    make_client,
    parse_reply,
)
from .rules import RuleAnnotator, load_rules

__all__ = [
    "RuleAnnotator", "load_rules",
    "LLMAnnotator", "Outcome", "make_client", "build_messages", "load_demos", "load_instructions",
    "parse_reply", "check_annotation", "ReplyError", "RequestFailed", "EndpointError", "Redactor",
    "annotate_file", "check_alignment",
]
