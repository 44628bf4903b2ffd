"""Choose the demo's defaults on validation data (STG_E or STG_H generated with seed 7), never on a test set.

    python experiments/tune_stg.py --gamma 1 --alpha 50 --epochs 30 ... | grep '^{"' >> experiments/tune_log.jsonl
Each call trains one configuration on STG_E train_M (seed 42) and prints one JSON line with
accuracy on the seed-7 IID and OOD *validation* sets (the grep drops the Trainer's own
log lines, which it prints to stdout when progress bars are off).
"""
import argparse, json, time

import torch

from cattune import stg
from cattune.commands.common import parse_layers
from cattune.evaluate import evaluate
from cattune.tiny import build
from cattune.config import CATConfig
from cattune.trainer import CATTrainer

p = argparse.ArgumentParser()
p.add_argument("--gamma", type=float, default=1.0)
p.add_argument("--alpha", type=float, default=2.0)
p.add_argument("--span", default="last_word")
p.add_argument("--loss", default="div")
p.add_argument("--decay", type=float, default=0.0)
p.add_argument("--epochs", type=float, default=30)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--wd", type=float, default=0.0)
p.add_argument("--bs", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--inter", type=int, default=2, help="MLP width as a multiple of hidden")
p.add_argument("--warmup", type=float, default=0.1)
p.add_argument("--sched", default="cosine")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--variant", default="E", choices=["E", "H"])
p.add_argument("--split", default=None, help="training split (default: train_M for E, train for H)")
p.add_argument("--val-limit", type=int, default=None, help="evaluate on the first N validation records")
p.add_argument("--digits", action="store_true", help="one token per digit")
p.add_argument("--spaced", action="store_true", help="numbers keep their leading space (' 8' one token)")
p.add_argument("--cat-layers", default="all", help="layers the loss averages: all (the paper) or e.g. -1")
p.add_argument("--prompt-loss", action="store_true", help="next-token loss on the prompt's tokens too")
p.add_argument("--label-smoothing", type=float, default=0.0)
p.add_argument("--max-grad-norm", type=float, default=1.0)
p.add_argument("--untie", action="store_true", help="separate input and output embeddings")
p.add_argument("--prompt-weight", type=float, default=0.0, help="add W * mean next-token CE over prompt tokens")
a = p.parse_args()
torch.set_num_threads(a.threads)
data = stg.generate(a.variant)
val = stg.generate(a.variant, seed=7)
a.split = a.split or ("train_M" if a.variant == "E" else "train")
checker = "exact" if a.variant == "E" else "numeric"
model, tok = build([r.text for r in data["train_L" if a.variant == "E" else "train"]], seed=a.seed, num_hidden_layers=a.layers,
                   hidden_size=a.hidden, individual_digits=a.digits, split_numbers=not a.spaced, intermediate_size=a.inter * a.hidden, attention_dropout=a.dropout,
                   num_attention_heads=a.heads, num_key_value_heads=a.heads, tie_word_embeddings=not a.untie)
args = CATConfig(output_dir="/tmp/tune", cat_gamma=a.gamma, cat_alpha=a.alpha, cat_span_columns=a.span, cat_loss=a.loss,
                 cat_gamma_decay=a.decay, cat_layers=parse_layers(a.cat_layers), num_train_epochs=a.epochs, per_device_train_batch_size=a.bs,
                 learning_rate=a.lr, weight_decay=a.wd, warmup_steps=a.warmup, lr_scheduler_type=a.sched,
                 label_smoothing_factor=a.label_smoothing, max_grad_norm=a.max_grad_norm,
                 save_strategy="no", logging_steps=50, report_to=[], disable_tqdm=True, use_cpu=True, seed=a.seed)


# The two options that are not CATConfig fields, through CATTrainer's own methods.
class Trainer(CATTrainer):
    def _encode(self, name, tokenizer, records, args):
        data = super()._encode(name, tokenizer, records, args)
        if a.prompt_loss:  # next-token loss on the prompt's tokens too: every position gets its label
            for e in data.items:
                e.labels = [i if l == -100 else l for i, l in zip(e.input_ids, e.labels)]
        return data

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and a.prompt_weight:  # add W * mean next-token CE over prompt tokens
            ids, am, lab = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            tgt, m = ids[:, 1:], am[:, 1:].bool() & lab[:, 1:].eq(-100)
            lp = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), tgt.flatten(),
                                                   reduction="none").view_as(tgt)
            total = total + a.prompt_weight * (lp * m).sum() / m.sum().clamp(min=1)
        return (total, out) if return_outputs else total


t = time.time()
Trainer(model=model, args=args, train_dataset=data[a.split], processing_class=tok).train()
out = dict(vars(a), train_s=round(time.time() - t, 1))
for name, recs in [("train", data[a.split][:400]), ("val_iid", val["iid_test"][: a.val_limit]),
                   ("val_ood", val["ood_test"][: a.val_limit])]:
    out[name] = evaluate(model, tok, recs, checker=checker, progress=False).accuracy
print(json.dumps(out), flush=True)
