"""CATConfig / CATTrainer on the embedded tiny model: real training runs of a few steps."""

import math

import pytest
import torch
from transformers import Trainer

from cattune import stg
from cattune.tiny import build
from cattune.config import CATConfig
from cattune.trainer import CATCollator, CATTrainer, CATTrainingError, encode_dataset
from cattune.reading import Reading

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return stg.generate("E")


def make(data, seed=0, **overrides):
    model, tok = build([r.text for r in data["train_L"]], seed=seed, hidden_size=64, intermediate_size=128)
    return model, tok


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-3,
                max_steps=30, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0, cat_alpha=5.0, cat_gamma_decay=0.0)
    base.update(kw)
    return CATConfig(**base)


def series(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_cat_training_lowers_loss_and_raises_attention_ratio(data, tmp_path):
    model, tok = make(data)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0), train_dataset=data["train_S"][:64],
                         processing_class=tok)
    trainer.train()
    ce, ratio, gamma = series(trainer, "loss_ce"), series(trainer, "attn_ratio"), series(trainer, "gamma")
    assert len(ce) == 6 and gamma[0] == 1.0
    assert ce[-1] < ce[0] * 0.5
    assert ratio[-1] > 2 * ratio[0], ratio
    assert all(math.isfinite(x) for x in series(trainer, "loss_attn"))


def test_loss_on_the_last_layer_only(data, tmp_path):
    model, tok = make(data)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0, cat_layers=[-1]),
                         train_dataset=data["train_S"][:64], processing_class=tok)
    assert trainer.cat_layers == frozenset({1})
    trainer.train()
    ce, ratio = series(trainer, "loss_ce"), series(trainer, "attn_ratio")
    assert ce[-1] < ce[0] * 0.5
    assert ratio[-1] > 2 * ratio[0], ratio
    # The logged ratio is the last layer's: it is not the two-layer average.
    from cattune.evaluate import causal_attention_ratio

    assert causal_attention_ratio(model, tok, data["train_S"][:64]) != pytest.approx(ratio[-1], rel=0.05)


def test_cat_layers_decide_which_layers_the_loss_reaches(data, tmp_path):
    # The attention loss on layer 0 cannot depend on layer 1's queries and keys: their
    # gradients are the CE's alone (the same as with gamma 0). On layer 1 they are not.
    def grads(gamma, layers):
        model, tok = make(data)
        trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=gamma, cat_layers=layers),
                             train_dataset=data["train_S"][:8], processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(model, batch).backward()
        attn = model.model.layers[1].self_attn
        return torch.cat([attn.q_proj.weight.grad.flatten(), attn.k_proj.weight.grad.flatten()])

    plain = grads(0.0, [0])
    assert torch.allclose(grads(1.0, [0]), plain, atol=1e-7)
    assert (grads(1.0, [1]) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("layers, message", [([2], r"out of range: the model has 2 layers"),
                                             ([-3], "out of range"), ([], "empty")])
def test_cat_layers_out_of_range(data, tmp_path, layers, message):
    model, tok = make(data)
    with pytest.raises(ValueError, match=message):
        CATTrainer(model=model, args=config(tmp_path, cat_layers=layers), train_dataset=data["train_S"][:8],
                   processing_class=tok)


def test_cat_layers_config_values(tmp_path):
    assert config(tmp_path, cat_layers=-1).cat_layers == [-1]
    assert config(tmp_path).cat_layers is None
    with pytest.raises(ValueError, match="list of layer indices"):
        config(tmp_path, cat_layers="last")


def test_gamma_zero_is_plain_fine_tuning(data, tmp_path):
    """gamma 0 gives the stock Trainer's loss curve on the same seed and data."""
    records = data["train_S"][:64]
    model, tok = make(data)
    cat = CATTrainer(model=model, args=config(tmp_path, cat_gamma=0.0, max_steps=10, logging_steps=1),
                     train_dataset=records, processing_class=tok)
    cat.train()

    model2, tok2 = make(data)
    encoded, _ = encode_dataset(tok2, records, Reading(span_columns="last", max_length=256))
    collator = CATCollator(tok2.pad_token_id)

    def plain_collate(features):
        batch = collator(features)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    stock_args = config(tmp_path, cat_gamma=0.0, max_steps=10, logging_steps=1)
    stock = Trainer(model=model2, args=stock_args, train_dataset=encoded, data_collator=plain_collate)
    stock.train()
    a, b = series(cat, "loss"), series(stock, "loss")
    assert len(a) == 10 and a == pytest.approx(b, rel=1e-6, abs=1e-7)
    # the baseline still logs where it looks, without it entering the loss
    assert len(series(cat, "attn_ratio")) == 10 and all(r > 0 for r in series(cat, "attn_ratio"))
    assert series(cat, "gamma") == [0.0] * 10


def test_gradient_accumulation_scales_attention_loss_like_ce(data, tmp_path):
    """2 micro-batches x 4 with accumulation == 1 batch of 8: same parameters after one step."""
    records = data["train_S"][:8]
    params = []
    for bs, ga in ((8, 1), (4, 2)):
        model, tok = make(data)
        args = config(tmp_path, cat_gamma=1.0, max_steps=1, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, learning_rate=1e-2, average_tokens_across_devices=False)
        CATTrainer(model=model, args=args, train_dataset=records, processing_class=tok).train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # token-weighted CE differs slightly between one batch and two halves only through
    # the attention loss's per-micro-batch mean; with equal-length STG records they agree
    assert torch.allclose(params[0], params[1], atol=2e-5), (params[0] - params[1]).abs().max()


def test_lora_training(data, tmp_path):
    from cattune.models import lora_model

    model, tok = make(data)
    model = lora_model(model, r=8, alpha=16)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0, learning_rate=1e-2),
                         train_dataset=data["train_S"][:64], processing_class=tok)
    trainer.train()
    ce, ratio = series(trainer, "loss_ce"), series(trainer, "attn_ratio")
    assert ce[-1] < ce[0] and ratio[-1] > ratio[0]


def test_checkpoint_and_resume(data, tmp_path):
    model, tok = make(data)
    args = config(tmp_path, cat_gamma=1.0, max_steps=6, save_strategy="steps", save_steps=3)
    CATTrainer(model=model, args=args, train_dataset=data["train_S"][:32], processing_class=tok).train()
    ckpts = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    model2, tok2 = make(data, seed=1)
    t2 = CATTrainer(model=model2, args=config(tmp_path, cat_gamma=1.0, max_steps=6), train_dataset=data["train_S"][:32],
                    processing_class=tok2)
    t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert t2.state.global_step == 6
    p1 = torch.cat([p.flatten() for p in model.parameters()])
    p2 = torch.cat([p.flatten() for p in model2.parameters()])
    assert torch.allclose(p1, p2, atol=1e-5)


def test_non_finite_loss_stops_with_step(data, tmp_path):
    model, tok = make(data)
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 3 else output

    model.lm_head.register_forward_hook(poison)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0), train_dataset=data["train_S"][:32],
                         processing_class=tok)
    with pytest.raises(CATTrainingError, match="non-finite loss at step 3"):
        trainer.train()


def test_huge_attention_ratio_is_logged_not_fatal(data, tmp_path, monkeypatch):
    # With alpha in the thousands the causal/other ratio can exceed any float: it is a
    # diagnostic, so training goes on and only non-finite losses stop it.
    import cattune.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "attention_ratio", lambda *a: torch.tensor(float("inf")))
    model, tok = make(data)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0, max_steps=3),
                         train_dataset=data["train_S"][:32], processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 3


def test_bad_input(data, tmp_path):
    model, tok = make(data)
    with pytest.raises(ValueError, match="empty"):
        CATTrainer(model=model, args=config(tmp_path), train_dataset=[], processing_class=tok)
    with pytest.raises(ValueError, match="cat_loss"):
        config(tmp_path, cat_loss="nope")
    for name in ("cat_alpha", "cat_gamma", "cat_gamma_decay"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            config(tmp_path, **{name: float("nan")})
    # settings with which Trainer would save an untrained model, or fail only after loading it
    for over, message in [({"num_train_epochs": -1, "max_steps": -1}, "num_train_epochs must be > 0"),
                          ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
                          ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be at least 1")]:
        with pytest.raises(ValueError, match=message):
            config(tmp_path, **over)
    assert config(tmp_path, num_train_epochs=0, max_steps=3).max_steps == 3
    # too long: truncated and counted, never a crash
    trainer = CATTrainer(model=model, args=config(tmp_path, max_length=30, max_steps=2),
                         train_dataset=data["train_S"][:16], processing_class=tok)
    assert trainer.encode_stats["train"]["truncated"] == 16
    trainer.train()
    # no pad token: EOS is used
    tok.pad_token = None
    CATTrainer(model=model, args=config(tmp_path, max_steps=1), train_dataset=data["train_S"][:8],
               processing_class=tok)
    assert tok.pad_token == tok.eos_token


def test_datasets_input(data, tmp_path):
    import datasets

    rows = [r.to_json() for r in data["train_S"][:16]]
    ds = datasets.Dataset.from_list([{"input": r["input"], "target": r["target"], "important": r["important"]}
                                     for r in rows])
    model, tok = make(data)
    trainer = CATTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=ds, processing_class=tok)
    assert trainer.encode_stats["train"]["supervised_rows"] > 0
    trainer.train()


@pytest.mark.parametrize("ga", [1, 2])
def test_answer_logits_only_trains_the_same_model(data, tmp_path, ga):
    """The LM head on answer positions only: the same losses and parameters, with and
    without gradient accumulation."""
    records = data["train_S"][:16]
    runs = []
    for only in (False, True):
        model, tok = make(data)
        args = config(tmp_path, cat_gamma=1.0, max_steps=3, logging_steps=1, per_device_train_batch_size=8 // ga,
                      gradient_accumulation_steps=ga, answer_logits_only=only)
        trainer = CATTrainer(model=model, args=args, train_dataset=records, processing_class=tok)
        trainer.train()
        runs.append((series(trainer, "loss"), series(trainer, "loss_ce"),
                     torch.cat([p.detach().flatten() for p in model.parameters()])))
    (loss_a, ce_a, params_a), (loss_b, ce_b, params_b) = runs
    assert len(loss_a) == 3 and loss_a == pytest.approx(loss_b, rel=1e-5) and ce_a == pytest.approx(ce_b, rel=1e-5)
    assert torch.allclose(params_a, params_b, atol=1e-6), (params_a - params_b).abs().max()


def test_few_supervised_rows_warn_loudly(data, tmp_path, caplog):
    """CAT on records most of which carry no placeable annotation is mostly plain
    fine-tuning: the trainer says so, with the reasons."""
    import logging

    from cattune.records import Record

    model, tok = make(data)
    records = list(data["train_S"][:4]) + [Record(prompt=r.prompt, target=r.target, important=[("zzz", ["8"])])
                                           for r in data["train_S"][4:12]]
    with caplog.at_level(logging.WARNING, logger="cattune.trainer"):
        trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0), train_dataset=records,
                             processing_class=tok)
    stats = trainer.encode_stats["train"]
    assert stats["records_with_supervised_rows"] == 4 and stats["unaligned_reasons"] == {"key not found in text": 8}
    assert "only 4 of 12 records keep a supervised row" in caplog.text and "key not found in text" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cattune.trainer"):
        CATTrainer(model=model, args=config(tmp_path, cat_gamma=0.0), train_dataset=records, processing_class=tok)
    assert "supervised row" not in caplog.text  # the baseline needs none


def test_non_finite_gradient_stops_before_it_is_applied_or_saved(data, tmp_path):
    # A finite loss whose backward pass overflows: the step must not be applied, and the
    # checkpoint of the step before must hold finite weights.
    model, tok = make(data)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] >= 3 else grad

    model.lm_head.weight.register_hook(poison)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0, save_strategy="steps", save_steps=1),
                         train_dataset=data["train_S"][:32], processing_class=tok)
    with pytest.raises(CATTrainingError, match="non-finite gradient at step 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / "model.safetensors").values())


def test_no_supervised_row_is_an_error_unless_allowed(data, tmp_path):
    from cattune.records import Record

    model, tok = make(data)
    plain = [Record(r.prompt, r.target) for r in data["train_S"][:16]]
    with pytest.raises(ValueError, match="no training record keeps a supervised row"):
        CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0), train_dataset=plain, processing_class=tok)
    trainer = CATTrainer(model=model, args=config(tmp_path, cat_gamma=1.0, cat_allow_unsupervised=True),
                         train_dataset=plain, processing_class=tok)
    assert "only 0 of 16 records keep a supervised row" in trainer.cat_warnings[0]
    CATTrainer(model=model, args=config(tmp_path, cat_gamma=0.0), train_dataset=plain, processing_class=tok)


@pytest.mark.parametrize("max_length", [0, 1])
def test_max_length_below_two_is_rejected(tmp_path, max_length):
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        config(tmp_path, max_length=max_length)


def test_saved_model_has_no_hub_token_and_uniform_file_modes(data, tmp_path):
    import os

    model, tok = make(data)
    trainer = CATTrainer(model=model, args=config(tmp_path, max_steps=1, hub_token="hf_secret_value_123"),
                         train_dataset=data["train_S"][:8], processing_class=tok)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert trainer.args.hub_token == "hf_secret_value_123"  # restored for a later push
    assert b"hf_secret_value_123" not in (out / "training_args.bin").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_evaluation_during_training_reports_accuracy_and_cat_terms(data, tmp_path):
    # eval_accuracy by greedy decoding, as `cattune eval` computes it, picks the best
    # checkpoint; eval_attn_ratio is the ratio `cattune eval` reports for the same layers.
    from cattune.evaluate import causal_attention_ratio, evaluate

    model, tok = make(data)
    held_out = data["iid_test"][:24]
    args = config(tmp_path, cat_gamma=1.0, cat_layers=[-1], max_steps=20, eval_strategy="steps", eval_steps=5,
                  save_strategy="steps", save_steps=5, metric_for_best_model="accuracy", load_best_model_at_end=True,
                  per_device_eval_batch_size=8)
    trainer = CATTrainer(model=model, args=args, train_dataset=data["train_S"][:64], eval_dataset=held_out,
                         processing_class=tok)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [5, 10, 15, 20]
    for h in evals:
        assert 0 <= h["eval_accuracy"] <= 1 and math.isfinite(h["eval_loss_attn"]) and h["eval_attn_ratio"] > 0
    best = max(evals, key=lambda h: h["eval_accuracy"])
    assert trainer.state.best_metric == best["eval_accuracy"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    # The loaded best model gives that accuracy again, and the ratio matches `cattune eval`'s.
    final = trainer.evaluate()
    assert final["eval_accuracy"] == pytest.approx(best["eval_accuracy"])
    assert evaluate(trainer.model, tok, held_out, reading=Reading(layers=[-1]), progress=False).accuracy == pytest.approx(
        final["eval_accuracy"])
    ratio = causal_attention_ratio(trainer.model, tok, held_out, reading=Reading(layers=[-1]))
    assert final["eval_attn_ratio"] == pytest.approx(ratio, rel=1e-4)
    # Other records at evaluate() time, given as records; accuracy can be switched off.
    other = trainer.evaluate(data["ood_test"][:8], metric_key_prefix="ood")
    assert "ood_accuracy" in other and "ood_attn_ratio" in other
    trainer.args.eval_accuracy = False
    assert "eval_accuracy" not in trainer.evaluate()
