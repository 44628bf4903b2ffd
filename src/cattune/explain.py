"""Where a model looks when it produces an answer.

- :func:`explain_record` / :func:`plot_explanation`: a heatmap of the attention of the
  answer-producing rows (the positions that predict each answer token) over the prompt
  tokens, averaged over heads and over all layers or the chosen ones (``cattune.attention.AttentionProbe``), the
  record's causal spans marked (placed with ``cattune.masks.encode_record``), token
  labels on the x axis and a bar strip of the mean attention per prompt token.
- :func:`plot_ratio_curve`: the causal/non-causal attention ratio (``attn_ratio``) over
  training steps, from a trainer's ``log_history``, a ``train_report.json`` of
  ``cattune train`` or a ``logs/RUN.json`` of ``cattune experiment``.

Both write PNGs with matplotlib's Agg canvas (no display needed), atomically. The
command is ``cattune explain`` (``cattune.commands.explain``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_write_bytes
from .reading import Reading
from .records import Record
from .text import format_ratio

CAUSAL_COLOR = "#d62728"
OTHER_ANNOTATED_COLOR = "#ff9896"
PLAIN_COLOR = "#7f7f7f"


@dataclass
class Explanation:
    prompt_tokens: list[str]  # labels of the prompt tokens (the heatmap's columns)
    answer_tokens: list[str]  # the answer tokens each row predicts (the heatmap's rows)
    weights: list[list[float]]  # [answer rows][prompt tokens], mean over layers and heads
    causal_columns: list[int]  # prompt tokens the answer rows must attend to (annotation)
    annotated_columns: list[int]  # other annotated value tokens (keys inside the prompt)
    special_columns: list[int]  # BOS and other special tokens
    target: str
    prediction: str | None
    answer_source: str  # "target" or "prediction": which answer the rows produce
    record_index: int | None = None
    unaligned: list = field(default_factory=list)
    layers: list[int] | None = None  # the layers averaged (None: all of them)
    # The record's attn_ratio: the number training logs, `cattune eval` and experiment
    # summaries report (mean over the rows producing annotated keys of each row's a1/a0,
    # cattune.loss.attention_ratio), for this one record. None without annotation.
    attn_ratio: float | None = None
    truncated: int = 0  # prompt tokens training cut from this record (max_length): not shown

    @property
    def heatmap_ratio(self) -> float | None:
        """Mean attention on causal columns / mean on the other prompt columns over this
        heatmap's cells (every answer row, special tokens included): a ratio of means that
        describes the picture. It is not ``attn_ratio``, which is what training optimises."""
        import numpy as np

        w = np.asarray(self.weights)
        if not self.causal_columns or w.size == 0:
            return None
        mask = np.zeros(w.shape[1], dtype=bool)
        mask[self.causal_columns] = True
        if mask.all():
            return None
        return float(w[:, mask].mean() / max(w[:, ~mask].mean(), 1e-12))

    def to_json(self) -> dict:
        return {**asdict(self), "heatmap_ratio": self.heatmap_ratio}


def _label(text: str) -> str:
    if not text:
        return "∅"
    if not text.strip():
        return "␣" * len(text) if len(text) <= 3 else f"␣x{len(text)}"
    return text.replace("\n", "⏎").strip()


def explain_record(model, tokenizer, record: Record, use_prediction: bool = False, reading: Reading | None = None,
                   max_new_tokens: int | None = None, record_index: int | None = None) -> Explanation:
    """Attention of the rows producing ``record``'s answer over its prompt tokens.

    ``reading`` (``cattune.reading.Reading``; default: plain prompt, all layers, no length
    limit): the record as the model was trained on it. Its ``layers`` are averaged (0 =
    first, -1 = last); with its ``chat_template`` the prompt tokens are the rendered
    conversation's; a record longer than its ``max_length`` is shown with the prompt
    tokens training cut (from the left) left out.

    The answer is the record's target (teacher forcing), or with ``use_prediction`` the
    model's own greedy answer (what it looked at when it answered, right or wrong; on a
    record cut by max_length, the prompt shown is training's cut, while generation cut a
    few more tokens to leave room for the answer, as ``cattune eval`` does).
    """
    import torch

    from .attention import AttentionProbe, resolve_layers, use_row_probe
    from .evaluate import causal_attention_ratio, default_max_new_tokens, generate_answers
    from .masks import left_cut, render_prompt
    from .models import prepare_tokenizer

    reading = reading or Reading()
    prepare_tokenizer(tokenizer)
    use_row_probe(model)
    was_training = model.training
    model.eval()
    try:
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(tokenizer, [record])
        # The answer as `cattune eval` gets it; a target too long to leave room for a prompt
        # under max_length (training cuts it from the right) is generated from the whole prompt.
        room = reading.max_length is None or reading.max_length > max_new_tokens
        prediction = generate_answers(model, tokenizer, [record.prompt], batch_size=1, max_new_tokens=max_new_tokens,
                                      progress=False, reading=reading if room else replace(reading, max_length=None))[0]
        answer, source = record.target, "target"
        if use_prediction and prediction:
            # generate_answers strips the decoded text; keep the separator the target had
            lead = record.target[: len(record.target) - len(record.target.lstrip())]
            answer, source = lead + prediction, "prediction"
        # Causal columns come from the record as training encoded it; the prompt's tokens
        # are the same whatever answer follows (prompt and answer are tokenized separately),
        # and a long record loses the same prompt tokens: training's cut, found on the record.
        annotated = reading.encode(tokenizer, record)
        whole = replace(reading, max_length=None)
        shown = whole.encode(tokenizer, Record(prompt=record.prompt, target=answer), add_eos=False)
        n_prompt = sum(1 for x in shown.labels if x == -100)
        prompt_text = render_prompt(tokenizer, record.prompt, reading.chat_template)
        enc = tokenizer(prompt_text, add_special_tokens=not reading.chat_template, return_offsets_mapping=True)
        prompt_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if prompt_ids != shown.input_ids[:n_prompt]:  # pragma: no cover - guards a tokenizer surprise
            raise RuntimeError("prompt tokens differ between encodings")
        cut_at, cut = left_cut(offsets, n_prompt, len(whole.encode(tokenizer, record).input_ids), reading.max_length)
        if cut:  # the same prompt tokens out
            kept = len(shown.input_ids) - cut
            if cut == n_prompt - cut_at:  # the answer alone is longer than training kept: cut from the right
                kept = min(kept, reading.max_length)
            shown = replace(reading, max_length=kept).encode(tokenizer, Record(prompt=record.prompt, target=answer),
                                                             add_eos=False)
            del prompt_ids[cut_at:cut_at + cut], offsets[cut_at:cut_at + cut]
            n_prompt -= cut
        rows = [j - 1 for j in range(1, len(shown.input_ids)) if shown.labels[j] != -100]
        if not rows:
            raise ValueError("the answer has no tokens to explain (empty target)")
        ids = torch.tensor([shown.input_ids], device=next(model.parameters()).device)
        probe = AttentionProbe(torch.tensor([rows], device=ids.device), detach=True,
                               layers=resolve_layers(model, reading.layer_list))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), cat_probe=probe, use_cache=False)
        attn = probe.result()[0, :, :n_prompt].float().cpu()
        # In eval mode too (no dropout): the number `cattune eval` gives for this record.
        ratio = causal_attention_ratio(model, tokenizer, [record], reading=reading)
    finally:
        model.train(was_training)

    special_ids = set(tokenizer.all_special_ids)
    labels, special = [], []
    for i, (tid, (s, e)) in enumerate(zip(prompt_ids, offsets)):
        if e > s and tid not in special_ids:
            labels.append(_label(prompt_text[s:e]))
        else:
            labels.append(tokenizer.convert_ids_to_tokens(tid))
            special.append(i)
    answer_rows = set(rows)
    causal = sorted({c for r, c in annotated.pairs if r in answer_rows and c < n_prompt})
    others = sorted({c for r, c in annotated.pairs if c < n_prompt} - set(causal))
    answer_ids = [shown.input_ids[r + 1] for r in rows]
    answer_tokens = [_label(tokenizer.decode([t])) for t in answer_ids]
    return Explanation(prompt_tokens=labels, answer_tokens=answer_tokens, weights=attn.tolist(),
                       causal_columns=causal, annotated_columns=others, special_columns=special,
                       target=record.target, prediction=prediction, answer_source=source,
                       record_index=record_index, unaligned=[list(u) for u in annotated.unaligned],
                       layers=reading.layer_list, attn_ratio=ratio, truncated=cut)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG and write it atomically (temp file + rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_explanation(expl: Explanation, out_png: str | os.PathLike, title: str | None = None,
                     show_special: bool = False) -> Path:
    """Heatmap (answer rows x prompt tokens) with causal columns in red, plus a bar strip
    of the mean attention per prompt token. Special tokens (BOS: usually an attention
    sink that flattens the colour scale) are left out unless ``show_special``."""
    import numpy as np

    w = np.asarray(expl.weights, dtype=float)
    cols = [i for i in range(w.shape[1]) if show_special or i not in set(expl.special_columns)]
    if not cols:
        raise ValueError("the prompt has no tokens to show")
    w = w[:, cols]
    labels = [expl.prompt_tokens[i] for i in cols]
    causal, annotated = set(expl.causal_columns), set(expl.annotated_columns)
    colors = [CAUSAL_COLOR if i in causal else OTHER_ANNOTATED_COLOR if i in annotated else PLAIN_COLOR
              for i in cols]
    n, r = len(cols), w.shape[0]
    per_token = 0.16 if n <= 150 else 0.11
    width = min(max(6.0, 1.5 + per_token * n), 48.0)
    font = 8 if n <= 150 else 6
    height = 2.6 + 0.3 * r + 0.06 * max(len(s) for s in labels)
    fig = _figure(width, min(height, 20.0))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, max(1.2, 0.35 * r)], width_ratios=[40, 1], hspace=0.05,
                            wspace=0.02)
    bar_ax = fig.add_subplot(grid[0, 0])
    ax = fig.add_subplot(grid[1, 0], sharex=bar_ax)
    cax = fig.add_subplot(grid[1, 1])
    x = np.arange(n)
    bar_ax.bar(x, w.mean(axis=0), color=colors, width=0.85)
    bar_ax.set_ylabel("mean", fontsize=font)
    bar_ax.tick_params(axis="x", labelbottom=False)
    bar_ax.tick_params(axis="y", labelsize=font)
    bar_ax.set_xlim(-0.5, n - 0.5)
    im = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=font)
    j = 0
    while j < n:  # outline each run of adjacent causal columns
        if cols[j] in causal:
            k = j
            while k + 1 < n and cols[k + 1] in causal:
                k += 1
            ax.add_patch(_rect(j - 0.5, -0.5, k - j + 1, r, CAUSAL_COLOR))
            j = k
        j += 1
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=font)
    for tick, c in zip(ax.get_xticklabels(), colors):
        tick.set_color(c)
        if c == CAUSAL_COLOR:
            tick.set_fontweight("bold")
    ax.set_yticks(np.arange(r))
    ax.set_yticklabels([f"→ {t}" for t in expl.answer_tokens], fontsize=font)
    ax.set_ylabel(f"answer rows ({expl.answer_source})", fontsize=font)
    if title is None:
        idx = "" if expl.record_index is None else f"record {expl.record_index}: "
        ratio = expl.attn_ratio
        title = (f"{idx}target {expl.target!r}, model answers {expl.prediction!r}"
                 + (f"; attn_ratio {format_ratio(ratio)}" if ratio is not None else "; no causal columns"))
    averaged = "layers and heads" if expl.layers is None else f"heads of layer(s) {', '.join(map(str, expl.layers))}"
    bar_ax.set_title(title + "\n(red: causal spans of the answer; pink: other annotated values; "
                     f"attention averaged over {averaged})", fontsize=font + 1)
    fig.subplots_adjust(left=min(0.25, 1.2 / width), right=0.97, top=0.9, bottom=0.2)
    return save_png(fig, out_png)


def plot_record(model, tokenizer, record: Record, out_png: str | os.PathLike, title: str,
                reading: Reading | None = None, record_index: int | None = None) -> Path:
    """:func:`explain_record` then :func:`plot_explanation`, the title followed by the
    target and the model's answer: the heatmap the demo and the experiment runner embed."""
    expl = explain_record(model, tokenizer, record, reading=reading, record_index=record_index)
    return plot_explanation(expl, out_png, title=f"{title}: target {expl.target.strip()!r}, "
                                                 f"answer {expl.prediction!r}")


def _rect(x, y, w, h, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.0)


# --------------------------------------------------------------------------- ratio curve


def read_log_history(source: Any) -> list[dict]:
    """A log history from a list of dicts, a trainer, or a JSON file holding a list or an
    object with ``log_history`` (``train_report.json``, ``cattune experiment`` logs)."""
    if hasattr(source, "state") and hasattr(source.state, "log_history"):
        return list(source.state.log_history)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such log file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            if "log_history" not in data:
                raise ValueError(f"{path}: no 'log_history' in the file (expected train_report.json or a "
                                 "cattune experiment log)")
            data = data["log_history"]
        source = data
    if not isinstance(source, list) or not all(isinstance(h, dict) for h in source):
        raise ValueError("a log history is a list of dicts (trainer.state.log_history)")
    return source


def ratio_points(history: list[dict]) -> tuple[list[float], list[float]]:
    pts = [(h.get("step", i), h["attn_ratio"]) for i, h in enumerate(history) if "attn_ratio" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_ratio_curve(source: Any, out_png: str | os.PathLike, alpha: float | None = None,
                     title: str | None = None) -> Path:
    """The causal/non-causal attention ratio over training steps.

    ``source``: a log history, a trainer, a path to ``train_report.json`` (or an
    experiment's ``logs/RUN.json``), or a mapping ``{label: source}`` for several curves
    (e.g. the cat and placebo arms of one seed). ``alpha``: draw the target ratio.
    """
    if isinstance(source, Mapping):
        curves = {str(k): read_log_history(v) for k, v in source.items()}
    else:
        label = Path(source).stem if isinstance(source, (str, os.PathLike)) else "attn_ratio"
        curves = {label: read_log_history(source)}
    series = {k: ratio_points(h) for k, h in curves.items()}
    empty = [k for k, (xs, _) in series.items() if not xs]
    if empty:
        raise ValueError(f"no attn_ratio entries in the log of {', '.join(empty)}: was it trained with CATTrainer "
                         "on annotated records (the ratio is logged every logging_steps)?")
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.axhline(1.0, color=PLAIN_COLOR, linestyle=":", linewidth=1, label="no preference (1)")
    if alpha is not None:
        ax.axhline(alpha, color=CAUSAL_COLOR, linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    values = [y for _, ys in series.values() for y in ys if y > 0] + ([alpha] if alpha else []) + [1.0]
    if max(values) / min(values) > 100:  # a layer that looks only at the causes drives a0 towards 0
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("causal / other attention (a1/a0)")
    ax.set_title(title or "Attention on causal tokens during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out_png)
