"""Causal signals: word-level annotations "when producing KEY, look at VALUE".

``rules``: programmatic annotation for data whose causal graph is known.
``llm``: an assistant LLM annotates from a few human-written demos (its prompt in
``prompt``, the reading of its replies in ``replies``, secrets kept out in ``secrets``).
``pipeline``: a JSONL file through an annotator, resumably (``output``), and the token
alignment check. The command is ``cattune.commands.annotate``.
"""

from .llm import EndpointError, LLMAnnotator, Outcome, RequestFailed, make_client
from .pipeline import annotate_file, check_alignment
from .prompt import build_messages, load_demos, load_instructions
from .replies import ReplyError, check_annotation, parse_reply
from .rules import RuleAnnotator, load_rules
from .secrets import Redactor

__all__ = [
    "RuleAnnotator", "load_rules",
    "LLMAnnotator", "Outcome", "make_client", "build_messages", "load_demos", "load_instructions",
    "parse_reply", "check_annotation", "ReplyError", "RequestFailed", "EndpointError", "Redactor",
    "annotate_file", "check_alignment",
]
