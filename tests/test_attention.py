"""Row-probe attention against eager attention maps, on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from cattune.attention import ATTN_IMPLEMENTATION, AttentionProbe, ProbeError, use_row_probe

B, L, PAD = 2, 20, 5
COMMON = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=64,
    # Random weights at the usual 0.02 give near-uniform attention, where a wrong row or a
    # wrong mask barely moves the numbers; 0.2 gives peaked, row-specific maps.
    initializer_range=0.2,
)
CONFIGS = {
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **COMMON)),
    "qwen2_gqa": lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, **COMMON)),
    # Layers 1 and 2 see only the last 8 positions (window < L), layer 0 everything.
    "qwen2_sliding": lambda: Qwen2ForCausalLM(
        Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON)
    ),
}


def build(name):
    torch.manual_seed(0)
    model = CONFIGS[name]().float().eval()
    return model


def batch(padding):
    torch.manual_seed(1)
    input_ids = torch.randint(3, 64, (B, L))
    attention_mask = torch.ones(B, L, dtype=torch.long)
    if padding == "left":
        attention_mask[1, :PAD] = 0
    elif padding == "right":
        attention_mask[1, L - PAD:] = 0
    input_ids[attention_mask == 0] = 0
    # Real rows only: the first real token (it sees only itself), a middle one, the last;
    # for the sliding model the later rows reach past the window.
    if padding == "left":
        rows = torch.tensor([[0, 6, 13, L - 1], [PAD, PAD + 1, 12, L - 1]])
    elif padding == "right":
        rows = torch.tensor([[0, 6, 13, L - 1], [0, 3, 9, L - PAD - 1]])
    else:
        rows = torch.tensor([[0, 6, 13, L - 1], [1, 2, 9, 17]])
    return input_ids, attention_mask, rows


def set_impl(model, impl):
    if impl == ATTN_IMPLEMENTATION:
        use_row_probe(model)
    else:
        model.set_attn_implementation(impl)


def eager_rows(model, input_ids, attention_mask, rows):
    """The same rows from eager attention's full maps, averaged over heads and layers."""
    set_impl(model, "eager")
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    averaged = torch.stack(out.attentions).mean(dim=(0, 2))  # [B, L, L]
    return averaged.gather(1, rows.unsqueeze(-1).expand(-1, -1, L)), out.logits


def probe_rows(model, input_ids, attention_mask, rows, **probe_kwargs):
    set_impl(model, ATTN_IMPLEMENTATION)
    probe = AttentionProbe(rows, **probe_kwargs)
    out = model(input_ids=input_ids, attention_mask=attention_mask, cat_probe=probe, use_cache=False)
    probe.close()
    return probe.result(), out.logits


def loss_on_rows(attn_rows):
    # A fixed random weighting: every column of every row gets its own gradient.
    weights = torch.randn(attn_rows.shape, generator=torch.Generator().manual_seed(2))
    return (attn_rows * weights).sum()


def param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_grads_close(ours, reference, rtol=1e-5):
    scale = max(g.abs().max().item() for g in reference)
    assert scale > 0
    for g, r in zip(ours, reference):
        assert (g - r).abs().max().item() <= rtol * scale


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_probe_equals_eager_attention(name, padding):
    model = build(name)
    if name == "qwen2_sliding":
        assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    input_ids, attention_mask, rows = batch(padding)

    ref, _ = eager_rows(model, input_ids, attention_mask, rows)
    ref_grads = param_grads(model, loss_on_rows(ref))
    set_impl(model, "sdpa")
    sdpa_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    got, logits = probe_rows(model, input_ids, attention_mask, rows)

    assert got.shape == (B, rows.shape[1], L) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-6
    assert torch.allclose(got.sum(-1), torch.ones(B, rows.shape[1]), atol=1e-5)
    real = attention_mask.bool()
    assert (logits - sdpa_logits)[real].abs().max().item() <= 1e-6  # the model's output is SDPA's
    assert_grads_close(param_grads(model, loss_on_rows(got)), ref_grads)

    # Structure the comparison above relies on, checked directly:
    for b in range(B):
        for slot, row in enumerate(rows[b].tolist()):
            assert not got[b, slot, row + 1:].any()  # causal: nothing after the row
            if padding == "left" and b == 1:
                assert not got[b, slot, :PAD].any()  # padding gets exactly zero
    assert got[0, 0, 0].item() == pytest.approx(1.0)  # the first token sees only itself
    if padding == "left":
        assert got[1, 0, PAD].item() == pytest.approx(1.0)


def test_sliding_window_is_applied():
    # The same weights without the window: rows whose window covers every earlier column
    # agree, rows past the window differ, so the eager match above is not vacuous.
    input_ids, attention_mask, rows = batch("none")
    windowed, _ = probe_rows(build("qwen2_sliding"), input_ids, attention_mask, rows)
    torch.manual_seed(0)
    full_model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, **COMMON)).float().eval()
    assert full_model.config.layer_types == ["full_attention"] * 3
    full, _ = probe_rows(full_model, input_ids, attention_mask, rows)
    assert (windowed[:, :2] - full[:, :2]).abs().max().item() <= 1e-6  # rows 0..6
    assert (windowed[0, 3] - full[0, 3]).abs().max().item() > 1e-3  # row 19
    # Row 19 in the two sliding layers sees only columns 12..19: the columns before get
    # at most the full layer's third of the average.
    assert 0 < windowed[0, 3, :12].sum().item() <= 1 / 3 + 1e-6


def test_probe_rows_can_repeat_and_come_in_any_order():
    model = build("llama_gqa")
    input_ids, attention_mask, _ = batch("none")
    rows = torch.tensor([[19, 3, 3, 0], [7, 19, 2, 7]])
    ref, _ = eager_rows(model, input_ids, attention_mask, rows)
    got, _ = probe_rows(model, input_ids, attention_mask, rows)
    assert (got - ref).abs().max().item() <= 1e-6


def enable_checkpointing(model, use_reentrant):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def test_reentrant_checkpointing_is_refused():
    # It runs the forward under no_grad: the probe would hold detached rows and the
    # Re-Attention loss would train nothing, silently.
    model = build("llama_gqa").train()
    enable_checkpointing(model, use_reentrant=True)
    input_ids, attention_mask, rows = batch("left")
    with pytest.raises(ProbeError, match="use_reentrant"):
        probe_rows(model, input_ids, attention_mask, rows)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_sliding"])
def test_non_reentrant_checkpointing_gives_the_same_values_and_gradients(name):
    input_ids, attention_mask, rows = batch("left")
    model = build(name).train()
    plain, _ = probe_rows(model, input_ids, attention_mask, rows)
    plain_grads = param_grads(model, loss_on_rows(plain))

    model = build(name).train()
    enable_checkpointing(model, use_reentrant=False)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    set_impl(model, ATTN_IMPLEMENTATION)
    probe = AttentionProbe(rows)
    model(input_ids=input_ids, attention_mask=attention_mask, cat_probe=probe, use_cache=False)
    probe.close()  # the backward's recomputation must not add its rows a second time
    checkpointed = probe.result()
    grads = param_grads(model, loss_on_rows(checkpointed))
    assert probe.layers == model.config.num_hidden_layers
    assert (checkpointed - plain).abs().max().item() <= 1e-6
    assert_grads_close(grads, plain_grads)


def test_probe_in_an_evaluation_forward_without_gradients():
    model = build("llama_gqa")
    input_ids, attention_mask, rows = batch("left")
    ref, _ = eager_rows(model, input_ids, attention_mask, rows)
    probe = AttentionProbe(rows)  # made with gradients on, used under no_grad in eval mode
    set_impl(model, ATTN_IMPLEMENTATION)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, cat_probe=probe)
    got = probe.result()
    assert not got.requires_grad and (got - ref).abs().max().item() <= 1e-6


def test_detached_probe_observes_without_a_graph():
    model = build("llama_gqa").train()
    input_ids, attention_mask, rows = batch("none")
    attached, _ = probe_rows(model, input_ids, attention_mask, rows)
    detached, logits = probe_rows(model, input_ids, attention_mask, rows, detach=True)
    assert attached.requires_grad and not detached.requires_grad and logits.requires_grad
    assert (attached - detached).abs().max().item() == 0.0


def test_model_without_the_row_probe_is_a_clear_error():
    model = build("llama_gqa")
    input_ids, attention_mask, rows = batch("none")
    set_impl(model, "sdpa")  # plain SDPA ignores the cat_probe keyword
    probe = AttentionProbe(rows)
    model(input_ids=input_ids, attention_mask=attention_mask, cat_probe=probe)
    with pytest.raises(ProbeError, match="use_row_probe"):
        probe.result()


def test_probe_refuses_a_kv_cache():
    model = build("llama_gqa")
    input_ids, attention_mask, _ = batch("none")
    set_impl(model, ATTN_IMPLEMENTATION)
    past = model(input_ids=input_ids[:, :10], use_cache=True).past_key_values
    probe = AttentionProbe(torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ProbeError, match="KV cache"):
        model(input_ids=input_ids[:, 10:12], past_key_values=past, cat_probe=probe, use_cache=True)


def test_use_row_probe_sets_the_implementation_and_keeps_generation_working():
    model = build("qwen2_gqa")
    use_row_probe(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    input_ids, attention_mask, _ = batch("none")
    with torch.no_grad():
        ours = model.generate(input_ids=input_ids[:, :6], max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        plain = model.generate(input_ids=input_ids[:, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("layers", [frozenset({1}), frozenset({0, 2})])
def test_probe_averages_only_the_chosen_layers(layers):
    # cat_layers: the chosen layers' maps from eager attention, averaged over heads and
    # those layers only (the sliding model has a full layer 0 and windowed 1 and 2).
    model = build("qwen2_sliding")
    input_ids, attention_mask, rows = batch("left")
    set_impl(model, "eager")
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    chosen = torch.stack([out.attentions[i] for i in sorted(layers)]).mean(dim=(0, 2))
    ref = chosen.gather(1, rows.unsqueeze(-1).expand(-1, -1, L))
    got, _ = probe_rows(model, input_ids, attention_mask, rows, layers=layers)
    everything, _ = probe_rows(model, input_ids, attention_mask, rows)
    assert (got - ref).abs().max().item() <= 1e-6
    assert (got - everything).abs().max().item() > 1e-3


def test_probe_with_layers_the_model_does_not_have():
    model = build("llama_gqa")
    input_ids, attention_mask, rows = batch("none")
    with pytest.raises(ProbeError, match=r"saw 2 attention layer\(s\) but none of the chosen layers \[5\]"):
        probe_rows(model, input_ids, attention_mask, rows, layers=frozenset({5}))
    set_impl(model, "sdpa")  # no row probe at all: the usual hint, whatever the layers
    probe = AttentionProbe(rows, layers=frozenset({1}))
    model(input_ids=input_ids, attention_mask=attention_mask, cat_probe=probe)
    with pytest.raises(ProbeError, match="use_row_probe"):
        probe.result()
