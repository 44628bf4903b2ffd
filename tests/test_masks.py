"""Token-level causal structure: alignment by character offsets, truncation, collation."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from cattune.masks import collate, encode_record, find_occurrences
from cattune.records import Record

from conftest import HAVE_RELEASE

# --- find_occurrences -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle, expected",
    [
        ("band and hand", "and", [(5, 8)]),  # not inside a word
        ("33.4 and 3.4", "3.4", [(9, 12)]),  # not inside a longer number
        ("4.5, 3.4, 4", "4", [(10, 11)]),  # not the integer part or the decimals of 4.5 / 3.4
        ("-4 and 4", "4", [(7, 8)]),  # a sign belongs to its number
        ("t: -4.7; x: 4.7", "4.7", [(12, 15)]),  # STG_H's "Water Awareness Score: -4.7"
        ("t: -4.7; x: 4.7", "-4.7", [(3, 7)]),
        ("pages 3-4 or 4", "4", [(13, 14)]),
        ("COVID-19 cases: 19", "19", [(6, 8), (16, 18)]),  # a hyphen after a letter is no sign
        ("4% of 4", "4", [(0, 1), (6, 7)]),
        ("Answer: 80.0", "80.0", [(8, 12)]),
        ("He sold 27. Then 27 more", "27", [(8, 10), (17, 19)]),  # a full stop is no decimal point
        ("x, y. How many?", ". How", [(4, 9)]),  # punctuation at the edge needs no boundary
        ("aaa", "aa", []),
        ("abc", "", []),
        ("Smoking: 8, Smoking: 8", "Smoking: 8", [(0, 10), (12, 22)]),
    ],
)
def test_find_occurrences(text, needle, expected):
    assert find_occurrences(text, needle) == expected
    for s, e in expected:
        assert text[s:e] == needle


# --- a tokenizer whose tokens we can count by hand ---------------------------------------


@pytest.fixture(scope="module")
def word_tok():
    """Whitespace word-level tokenizer with BOS: token i is the i-th word after <s>."""
    words = ["<s>", "</s>", "<pad>", "<unk>", "a", "b", "c", "d", ":", "c:d"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


A, B, C, D, COLON, EOS, BOS = 4, 5, 6, 7, 8, 1, 0

# tokens:  0:<s> 1:a 2:b 3:c 4:a 5:d 6:: | 7:b 8:c 9:</s>
# "b c" occurs at tokens [2,4) and [7,9); "a" at 1 and 4; "c a d" at [3,6).
HAND = Record(prompt="a b c a d :", target="b c", important=[("b c", ["a", "c a d"])])


def test_hand_record_all_columns(word_tok):
    enc = encode_record(word_tok, HAND, span_columns="all")
    assert enc.input_ids == [BOS, A, B, C, A, D, COLON, B, C, EOS]
    assert enc.labels == [-100] * 7 + [B, C, EOS]
    # Key [2,4) predicted by rows 1,2: only a@1 precedes it. Key [7,9) predicted by rows
    # 6,7: a@1, a@4 and c a d@[3,6) all precede it.
    assert set(enc.pairs) == {
        (1, 1), (2, 1),
        (6, 1), (6, 4), (7, 1), (7, 4),
        (6, 3), (6, 5), (7, 3), (7, 5),
    }
    assert enc.rows == [1, 2, 6, 7]
    assert enc.columns(6) == [1, 3, 4, 5] and enc.columns(0) == []
    assert enc.unaligned == [] and enc.n_pairs == 2 and not enc.truncated
    m = enc.causal_mask()
    assert m.shape == (10, 10) and m.dtype == torch.bool
    assert int(m.sum()) == 10 and torch.equal(m, m.tril())
    assert all(m[r, c] for r, c in enc.pairs)


def test_hand_record_last_token_columns(word_tok):
    enc = encode_record(word_tok, HAND, span_columns="last")
    # "c a d" contributes only its last token, 5; "a" is one token anyway.
    assert set(enc.pairs) == {(1, 1), (2, 1), (6, 1), (6, 4), (7, 1), (7, 4), (6, 5), (7, 5)}


def test_hand_record_last_word_columns(word_tok):
    # Word-level tokens: the last word is the last token, as with "last".
    assert encode_record(word_tok, HAND, span_columns="last_word").pairs == \
        encode_record(word_tok, HAND, span_columns="last").pairs


def test_last_word_keeps_every_token_of_a_decimal(tokenizers, annotated_corpus):
    # STG_H values ("41.9%") are several tokens; "last" keeps only the final one.
    tok = tokenizers["bytelevel"]
    record = annotated_corpus["stg_h"][0]
    decoded = {}
    for span_columns in ("last", "last_word"):
        enc = encode_record(tok, record, span_columns=span_columns)
        decoded[span_columns] = tok.decode([enc.input_ids[c] for c in enc.columns(enc.rows[0])])
    values = record.important[0][1]
    assert decoded["last_word"].replace(" ", "").replace(";", "") == "".join(values)
    assert len(decoded["last"]) < len(decoded["last_word"])
    stg_e = annotated_corpus["stg_e"][0]
    assert encode_record(tok, stg_e, span_columns="last_word").pairs == \
        encode_record(tok, stg_e, span_columns="last").pairs


def test_numbers_columns_keep_the_numbers_of_a_phrase(tokenizers, annotated_corpus):
    # Math annotations name phrases ("89 apples"): "last_word" keeps the noun, "numbers"
    # the number; a value without a digit keeps its last word either way.
    tok = tokenizers["bytelevel"]
    record = Record(prompt="Ruth starts with 89 apples. She shares 5 with Peter. How many apples does Ruth end with? "
                    "Answer: ", target="84.0", important=[("84.0", ["89 apples", "5", "Ruth starts with"])])

    def columns(span_columns):
        enc = encode_record(tok, record, span_columns=span_columns)
        return tok.decode([enc.input_ids[c] for c in enc.columns(enc.rows[0])]).replace(" ", "")

    assert columns("numbers") == "with" "89" "5"  # in text order
    assert columns("last_word") == "with" "apples" "5"
    for corpus in ("stg_e", "stg_h"):  # STG's values end in their number: the same columns
        for record in annotated_corpus[corpus][:20]:
            assert encode_record(tok, record, span_columns="numbers").pairs == \
                encode_record(tok, record, span_columns="last_word").pairs


def test_without_eos(word_tok):
    enc = encode_record(word_tok, HAND, add_eos=False, span_columns="all")
    assert enc.input_ids[-1] == C and enc.labels == [-100] * 7 + [B, C]


def test_unaligned_reasons(word_tok):
    record = Record(
        prompt="a b c a d :",
        target="b c",
        important=[("z", ["a"]), ("b c", ["zz"]), ("a", ["d"]), (":", ["b c"])],
    )
    enc = encode_record(word_tok, record, span_columns="all")
    assert enc.unaligned == [
        ("z", "a", "key not found in text"),
        ("b c", "zz", "value not found in text"),
        ("a", "d", "value not before key"),  # both "a" come before the only "d"
    ]
    # ":" at token 6 attends to "b c" at [2,4): row 5, columns 2 and 3.
    assert set(enc.pairs) == {(5, 2), (5, 3)} and enc.n_pairs == 4


def test_value_and_key_in_one_token(word_tok):
    # "c" ends before "d" starts, but "c:d" is a single token: no row can separate them.
    enc = encode_record(word_tok, Record(prompt="c:d a ", target="b", important=[("d", ["c"]), ("b", ["c"])]), span_columns="all")
    assert enc.unaligned == [("d", "c", "value and key share a token")]
    assert enc.pairs == [(2, 1)]  # "b" (token 3) still attends to the token holding "c"


@pytest.mark.parametrize(
    "max_length, ids, labels, pairs, unaligned",
    [
        # 2 prompt tokens cut after BOS: the first "b c" and the first "a" are gone.
        (8, [BOS, C, A, D, COLON, B, C, EOS], [-100] * 5 + [B, C, EOS],
         {(4, 2), (5, 2), (4, 1), (4, 3), (5, 1), (5, 3)}, []),
        # 4 cut: both "a" are gone, "c a d" lost its first two tokens: half a value is none.
        (6, [BOS, D, COLON, B, C, EOS], [-100] * 3 + [B, C, EOS], set(),
         [("b c", "a", "cut by max_length"), ("b c", "c a d", "cut by max_length")]),
        # The whole prompt is not enough: the answer is cut from the right, BOS stays.
        (3, [BOS, B, C], [-100, B, C], set(),
         [("b c", "a", "cut by max_length"), ("b c", "c a d", "cut by max_length")]),
        (2, [BOS, B], [-100, B], set(),
         [("b c", "a", "cut by max_length"), ("b c", "c a d", "cut by max_length")]),
        (1, [BOS], [-100], set(),
         [("b c", "a", "cut by max_length"), ("b c", "c a d", "cut by max_length")]),
        # Exactly long enough: nothing changes.
        (10, [BOS, A, B, C, A, D, COLON, B, C, EOS], [-100] * 7 + [B, C, EOS], None, []),
    ],
)
def test_truncation_cuts_the_prompt_from_the_left(word_tok, max_length, ids, labels, pairs, unaligned):
    enc = encode_record(word_tok, HAND, max_length=max_length, span_columns="all")
    assert enc.input_ids == ids and enc.labels == labels
    assert enc.truncated == (max_length < 10)
    if pairs is None:
        pairs = set(encode_record(word_tok, HAND, span_columns="all").pairs)
    assert set(enc.pairs) == pairs
    assert enc.unaligned == unaligned


def test_slow_tokenizer_is_a_clear_type_error():
    class CharTokenizer(PreTrainedTokenizer):  # a Python ("slow") tokenizer: no offsets
        def __init__(self, **kwargs):
            self.vocab = {chr(i): i for i in range(32, 127)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 32)

        def _convert_id_to_token(self, index):
            return chr(index)

    with pytest.raises(TypeError, match="slow tokenizer.*use_fast=True"):
        encode_record(CharTokenizer(), HAND, span_columns="all")


def test_unknown_span_columns(word_tok):
    with pytest.raises(ValueError, match="span_columns"):
        encode_record(word_tok, HAND, span_columns="first")


# --- every annotation of the real data, two tokenizer families ---------------------------


def tokenize_all(tok, records):
    """(prompt, target) encodings with offsets, one batched call each: the reference below
    gets the same tokens as encode_record without paying for a second tokenizer call."""
    p = tok([r.prompt for r in records], add_special_tokens=True, return_offsets_mapping=True)
    t = tok([r.target for r in records], add_special_tokens=False, return_offsets_mapping=True)
    return [
        (p["input_ids"][i], p["offset_mapping"][i], t["input_ids"][i], t["offset_mapping"][i])
        for i in range(len(records))
    ]


def reference_encode(tok, record, tokens, max_length=None, span_columns="all"):
    """Independent re-derivation of docs/method.md section 2 from the token list.

    Works on token indices (which tokens were dropped) rather than on character ranges,
    and maps characters to tokens by a per-character table instead of a binary search,
    so it shares nothing with masks.py beyond the tokenizer's offsets and
    find_occurrences (tested above).
    """
    p_ids, p_off, t_ids, t_off = tokens
    n_p = len(p_ids)
    shift = len(record.prompt)
    spans = [(s, e) if e > s else None for s, e in p_off]
    spans += [(s + shift, e + shift) if e > s else None for s, e in t_off]
    spans.append(None)
    ids = list(p_ids) + list(t_ids) + [tok.eos_token_id]
    labels = [-100] * n_p + list(t_ids) + [tok.eos_token_id]
    keep = list(range(len(ids)))
    if max_length is not None and len(ids) > max_length:
        bos = 0
        while bos < n_p and spans[bos] is None:
            bos += 1
        drop = min(len(ids) - max_length, n_p - bos)
        keep = keep[:bos] + keep[bos + drop:]
        keep = keep[:max_length]
    new = {old: i for i, old in enumerate(keep)}
    covering = [[] for _ in range(len(record.text))]
    for i, span in enumerate(spans):
        if span:
            for c in range(*span):
                covering[c].append(i)

    def token_span(s, e):
        hit = sorted({i for c in range(s, e) for i in covering[c]})
        if not hit:
            return "uncovered"
        if any(i not in new for i in hit):
            return "cut"
        assert hit == list(range(hit[0], hit[-1] + 1))
        return new[hit[0]], new[hit[-1]] + 1

    text = record.text
    pairs, unaligned = set(), []
    for key, values in record.important:
        for value in values:
            kcs, vcs = find_occurrences(text, key), find_occurrences(text, value)
            if not kcs or not vcs:
                unaligned.append((key, value, ("key" if not kcs else "value") + " not found in text"))
                continue
            ordered = [(kc, vc) for kc in kcs for vc in vcs if vc[1] <= kc[0]]
            if not ordered:
                unaligned.append((key, value, "value not before key"))
                continue
            outcomes = []
            for kc, vc in ordered:
                ks, vs = token_span(*kc), token_span(*vc)
                if isinstance(ks, str) or isinstance(vs, str):
                    outcomes.append("cut" if "cut" in (ks, vs) else "uncovered")
                elif vs[1] > ks[0]:
                    outcomes.append("share")
                else:
                    if span_columns == "last":
                        cols = [vs[1] - 1]
                    elif span_columns == "numbers" and any(c.isdigit() for c in text[vc[0]:vc[1]]):
                        cols, at = set(), vc[0]
                        for c in range(vc[0], vc[1] + 1):  # words: runs of non-space characters
                            if c == vc[1] or text[c].isspace():
                                if any(ch.isdigit() for ch in text[at:c]):
                                    cols.update(range(*token_span(at, c)))
                                at = c + 1
                    elif span_columns in ("last_word", "numbers"):
                        word = text[vc[0]:vc[1]].split()[-1]  # spans are stripped of edge spaces
                        cols = range(*token_span(vc[1] - len(word), vc[1]))
                    else:
                        cols = range(*vs)
                    pairs.update((row, col) for row in range(ks[0] - 1, ks[1] - 1) for col in cols)
                    outcomes.append("placed")
            if "placed" not in outcomes:
                reason = {"cut": "cut by max_length", "uncovered": "no token covers the text",
                          "share": "value and key share a token"}
                unaligned.append((key, value, reason[next(o for o in ("cut", "uncovered", "share") if o in outcomes)]))
    return [ids[i] for i in keep], [labels[i] for i in keep], pairs, unaligned


# STG_E with the "last" columns the trainer uses by default, the others as the paper.
SPAN_COLUMNS = {"svamp": "all", "stg_e": "last", "stg_h": "all"}


@pytest.fixture(scope="module")
def encoded_corpus(tokenizers, annotated_corpus):
    return {
        (kind, corpus): [encode_record(tok, r, span_columns=SPAN_COLUMNS[corpus]) for r in records]
        for kind, tok in tokenizers.items()
        for corpus, records in annotated_corpus.items()
    }


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("corpus", ["svamp", "stg_e", "stg_h"])
def test_every_annotation_of_the_data_is_aligned(tokenizers, annotated_corpus, encoded_corpus, kind, corpus):
    tok = tokenizers[kind]
    records = annotated_corpus[corpus]
    reasons = set()
    for record, enc, tokens in zip(records, encoded_corpus[kind, corpus], tokenize_all(tok, records)):
        ids, labels, pairs, unaligned = reference_encode(tok, record, tokens, span_columns=SPAN_COLUMNS[corpus])
        assert (enc.input_ids, enc.labels, set(enc.pairs), enc.unaligned) == (ids, labels, pairs, unaligned)
        assert len(enc.pairs) == len(set(enc.pairs)) and all(c <= r for r, c in enc.pairs)
        assert enc.n_pairs == sum(len(v) for _, v in record.important)
        text = record.text
        missing = {(k, v) for k, v, _ in enc.unaligned}
        for key, values in record.important:
            kcs = find_occurrences(text, key)
            for value in values:
                vcs = find_occurrences(text, value)
                in_order = any(ve <= ks for ks, _ in kcs for _, ve in vcs)
                # The property the issue asks for: an annotation whose value occurs
                # before its key in the text always becomes matrix entries.
                assert in_order == ((key, value) not in missing), (key, value, enc.unaligned)
        for key, value, reason in enc.unaligned:
            reasons.add(reason)
            kcs, vcs = find_occurrences(text, key), find_occurrences(text, value)
            if reason == "key not found in text":
                assert not kcs
            elif reason == "value not found in text":
                assert kcs and not vcs
            else:
                assert reason == "value not before key"
                assert kcs and vcs and all(ve > ks for ks, _ in kcs for _, ve in vcs)
    if corpus == "svamp":  # the LLM-made annotations do contain all three kinds of miss
        assert reasons == {"key not found in text", "value not found in text", "value not before key"}
    else:  # the programmatic ones never miss
        assert reasons == set()


def squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_aligned_spans_decode_to_the_annotated_text(tokenizers, annotated_corpus, encoded_corpus, kind):
    # A check that does not use offsets at all: the tokens after the supervised rows and
    # the causal columns decode back to the keys' and the values' text.
    tok = tokenizers[kind]

    def runs(enc, positions):
        out = []
        for pos in sorted(positions):
            if out and pos == out[-1][-1] + 1:
                out[-1].append(pos)
            else:
                out.append([pos])
        return [squash(tok.decode([enc.input_ids[i] for i in run])) for run in out]

    for corpus, records in annotated_corpus.items():
        for record, enc in list(zip(records, encoded_corpus[kind, corpus]))[:200]:
            predicted = runs(enc, [r + 1 for r in enc.rows])
            columns = runs(enc, {c for _, c in enc.pairs})
            missing = {(k, v) for k, v, _ in enc.unaligned}
            for key, values in record.important:
                for value in values:
                    if (key, value) in missing:
                        continue
                    # Spaces aside: a sentencepiece-style tokenizer marks the target's
                    # first word, so "Answer: " + "32" decodes as "Answer:  32".
                    assert any(squash(key) in s for s in predicted), (key, predicted)
                    if SPAN_COLUMNS[corpus] == "all":
                        assert any(squash(value) in s for s in columns), (value, columns)
                    else:  # only the value's last token: its number
                        assert any(s.endswith(squash(value)[-1]) for s in columns), (value, columns)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_truncated_real_records_match_the_reference(tokenizers, annotated_corpus, encoded_corpus, kind):
    # Lengths are chosen to cut into the annotated spans of each corpus: SVAMP records
    # are 30-150 tokens, STG_E 55-72, STG_H 140-165 (the causal values come first).
    tok = tokenizers[kind]
    cut_reasons = 0
    for corpus, max_length in (("svamp", 40), ("stg_e", 50), ("stg_h", 110)):
        records = annotated_corpus[corpus][::6]
        full = encoded_corpus[kind, corpus][::6]
        for i, (record, tokens) in enumerate(zip(records, tokenize_all(tok, records))):
            span_columns = ("all", "last", "last_word", "numbers")[i % 4]
            enc = encode_record(tok, record, max_length=max_length, span_columns=span_columns)
            ids, labels, pairs, unaligned = reference_encode(tok, record, tokens, max_length, span_columns)
            assert (enc.input_ids, enc.labels, set(enc.pairs), enc.unaligned) == (ids, labels, pairs, unaligned)
            assert len(enc) <= max_length
            assert enc.truncated == (len(full[i]) > max_length)
            answer = len(tokens[2]) + 1  # the answer and EOS survive
            assert enc.input_ids[-answer:] == full[i].input_ids[-answer:]
            assert enc.labels[-answer:] == full[i].labels[-answer:]
            if kind == "metaspace":
                assert enc.input_ids[0] == tok.bos_token_id
            cut_reasons += sum(u[2] == "cut by max_length" for u in enc.unaligned)
    assert cut_reasons > (100 if HAVE_RELEASE else 2)  # the few records of tests/data cut fewer


# --- collate ----------------------------------------------------------------------------


def check_batch(batch, encoded, padding_side, pad_id):
    L = max(len(e) for e in encoded)
    R = max(len(e.rows) for e in encoded)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (len(encoded), L)
    assert batch.rows.shape == (len(encoded), R) and batch.causal.shape == (len(encoded), R, L)
    for b, e in enumerate(encoded):
        n = len(e)
        off = L - n if padding_side == "left" else 0
        real = slice(off, off + n)
        assert batch.input_ids[b, real].tolist() == e.input_ids
        assert batch.labels[b, real].tolist() == e.labels
        assert batch.attention_mask[b].tolist() == [int(off <= i < off + n) for i in range(L)]
        assert all(batch.input_ids[b, i] == pad_id and batch.labels[b, i] == -100
                   for i in range(L) if not off <= i < off + n)
        m = e.causal_mask()
        for slot in range(R):
            if slot < len(e.rows):
                row = e.rows[slot]
                assert batch.rows[b, slot] == row + off
                expected = torch.zeros(L, dtype=torch.bool)
                expected[real] = m[row]
                assert torch.equal(batch.causal[b, slot], expected)
            else:  # padding slots point at the last position and have no columns
                assert batch.rows[b, slot] == L - 1 and not batch.causal[b, slot].any()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_by_hand(word_tok, padding_side):
    short = Record(prompt="d a :", target="b", important=[("b", ["a"])])  # <s> d a : b </s>
    encoded = [encode_record(word_tok, HAND, span_columns="all"), encode_record(word_tok, short, span_columns="all")]
    batch = collate(encoded, pad_token_id=2, padding_side=padding_side)
    check_batch(batch, encoded, padding_side, 2)
    if padding_side == "right":
        assert batch.rows.tolist() == [[1, 2, 6, 7], [3, 9, 9, 9]]
        assert batch.causal[1, 0].nonzero().flatten().tolist() == [2]
        assert batch.input_ids[1].tolist() == [BOS, D, A, COLON, B, EOS, 2, 2, 2, 2]
    else:
        assert batch.rows.tolist() == [[1, 2, 6, 7], [7, 9, 9, 9]]
        assert batch.causal[1, 0].nonzero().flatten().tolist() == [6]
        assert batch.input_ids[1].tolist() == [2, 2, 2, 2, BOS, D, A, COLON, B, EOS]
    assert batch.causal[0, 2].nonzero().flatten().tolist() == [1, 3, 4, 5]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_real_records(tokenizers, annotated_corpus, padding_side):
    tok = tokenizers["metaspace"]
    records = annotated_corpus["svamp"][:12]
    encoded = [encode_record(tok, r, span_columns="all") for r in records]
    encoded.append(encode_record(tok, Record(prompt="no annotation ", target="1"), span_columns="all"))  # a record with no rows
    batch = collate(encoded, tok.pad_token_id, padding_side)
    check_batch(batch, encoded, padding_side, tok.pad_token_id)
    assert sum(len(e.pairs) for e in encoded) == int(batch.causal.sum())


def test_collate_without_any_supervision_and_empty(word_tok):
    batch = collate([encode_record(word_tok, Record(prompt="a b", target="c"), span_columns="all")], pad_token_id=2)
    assert batch.rows.shape == (1, 0) and batch.causal.shape == (1, 0, 5)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=2)


# --- bounded time and memory (issue 34) ---------------------------------------------------


def test_keys_and_values_named_hundreds_of_times_cost_their_occurrences_not_their_product():
    # "apples" 1700 times, "Ann" and "Bob" 850 times each in 40 KB: every (key, value)
    # occurrence pair was tried one by one, ~1.4M of them (minutes, and 100s of MB).
    import time
    import tracemalloc

    from cattune.tiny import train_tokenizer

    unit = "Ann has 12 apples and gets 3 apples from Bob. "
    record = Record(prompt=unit * 850 + "How many apples? Answer: ", target="15",
                    important=[("apples", ["Ann", "Bob"]), ("15", ["12 apples"])])
    tokenizer = train_tokenizer([unit, "How many apples? Answer: 15"], kind="bytelevel", individual_digits=True)
    tracemalloc.start()
    started = time.monotonic()
    try:
        encoded = encode_record(tokenizer, record, max_length=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 100 * len(record.text)  # 4 MB; the tokenizer's lists of a long record are most of it
    assert encoded.rows and encoded.unaligned == []
