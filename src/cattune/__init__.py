"""cattune: Causal Attention Tuning for Hugging Face causal language models.

Pipeline: records -> annotate -> masks -> attention -> loss -> trainer -> evaluate, with
tasks and experiment above them; the command layer (cattune.commands, cattune.cli) on top.
"""

from .records import Record, RecordError, load_records, save_records
from .masks import EncodedRecord, encode_record, collate
from .loss import re_attention_loss, re_attention_loss_rows
from .attention import AttentionProbe, use_row_probe
from .evaluate import EvalResult, evaluate  # binds the function over the submodule's name
from . import stg

__version__ = "0.1.0"

# The trainer pulls in transformers.Trainer (slow to import): load it on first use.
_LAZY = {
    "CATConfig": ("config", "CATConfig"),
    "CATTrainer": ("trainer", "CATTrainer"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'cattune' has no attribute {name!r}")


__all__ = [
    "Record", "RecordError", "load_records", "save_records",
    "EncodedRecord", "encode_record", "collate",
    "re_attention_loss", "re_attention_loss_rows",
    "AttentionProbe", "use_row_probe", "EvalResult", "evaluate", "stg", *_LAZY,
]
