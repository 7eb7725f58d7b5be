"""Data: WMT readers on the real files, prompt/mask/shift arithmetic by hand, the grain pipeline."""

import json
import re
import sys

import numpy as np
import pytest

from conftest import DATA, read_lines
from gptk_jax.data import (DataError, Example, Pair, PipelineConfig, PromptFormat,
                           TranslationPipeline, build_sequence, encode_example, few_shot_from,
                           fit_length, read_hf_wmt14, read_parallel_text, read_sacrebleu,
                           read_sgml, read_sgml_segments, shift_targets)


class ByteTokenizer:
    """Deterministic fake: id = byte + 3; 0 pad, 1 bos, 2 eos."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259
    stop_ids = frozenset({2})

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


def ids(text):
    return [b + 3 for b in text.encode("utf-8")]


# --------------------------------------------------------------------------------------------
# Prompt formatting, masks, shifted targets (hand-computed)
# --------------------------------------------------------------------------------------------

def test_prompt_text_matches_research_prompt():
    shots = [Pair(f"s{i}", f"t{i}") for i in range(5)]
    assert PromptFormat().prompt_text("Hallo") == "Translate from de to en\nde: Hallo; en: "
    assert PromptFormat(shots=shots).prompt_text("Hallo") == (
        "Translate from de to en\n" + "".join(f"de: s{i}; en: t{i}\n" for i in range(5))
        + "de: Hallo; en: ")
    assert PromptFormat.for_languages("en", "de").prompt_text("Hi") == (
        "Translate from en to de\nen: Hi; de: ")
    assert PromptFormat.for_languages() == PromptFormat()
    # Braces in the text are data, not template fields.
    assert PromptFormat().prompt_text("{tgt}").endswith("de: {tgt}; en: ")
    with pytest.raises(ValueError, match="query_template"):
        PromptFormat(query_template="{src} {tgt}")


def test_space_with_target_moves_the_space_from_the_prompt_to_the_target():
    shots = [Pair("s0", "t0")]
    fmt = PromptFormat.for_languages(shots=shots, space_with_target=True)
    assert fmt.prompt_text("Hallo") == "Translate from de to en\nde: s0; en: t0\nde: Hallo; en:"
    assert fmt.target_text("Hi there") == " Hi there"
    assert PromptFormat().target_text("Hi") == "Hi"
    ex = encode_example(fmt, ByteTokenizer(), Pair("a", "b"))
    # prompt + target together spell the research format's text exactly
    text = bytes(i - 3 for i in ex.prompt_ids[1:] + ex.target_ids[:-1]).decode()
    assert text == "Translate from de to en\nde: s0; en: t0\nde: a; en: b"


def test_encode_example_and_build_sequence_by_hand():
    fmt = PromptFormat(instruction="I\n", shot_template="{src}={tgt}\n", query_template="{src}=")
    ex = encode_example(fmt, ByteTokenizer(), Pair("a", "b"))
    # prompt "I\na=" with BOS; target "b" + EOS
    assert ex.prompt_ids == (1, 76, 13, 100, 64)
    assert ex.target_ids == (101, 2)
    seq = build_sequence(ex, max_len=8, pad_id=0)
    np.testing.assert_array_equal(seq.tokens, [1, 76, 13, 100, 64, 101, 2, 0])
    np.testing.assert_array_equal(seq.loss_mask, [0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(seq.token_mask, [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(seq.positions, np.arange(8))
    assert seq.tokens.dtype == np.int32 and seq.loss_mask.dtype == bool

    few = fmt.with_shots([Pair("x", "y")])
    ex = encode_example(few, ByteTokenizer(), Pair("a", "b"))
    assert ex.prompt_ids == (1, *ids("I\nx=y\na="))
    unpadded = build_sequence(ex, max_len=64)
    assert unpadded.tokens.tolist() == [1, *ids("I\nx=y\na=b"), 2]
    assert unpadded.loss_mask.tolist() == [False] * 9 + [True, True]


def test_loss_mask_covers_exactly_target_and_eos_default_format():
    tok = ByteTokenizer()
    pair = Pair("Guten Tag", "Good day")
    ex = encode_example(PromptFormat(), tok, pair)
    seq = build_sequence(ex, max_len=80, pad_id=tok.pad_id)
    assert tok.decode(seq.tokens[seq.loss_mask][:-1]) == "Good day"
    assert seq.tokens[seq.loss_mask][-1] == tok.eos_id
    prompt = seq.tokens[seq.token_mask & ~seq.loss_mask]
    assert prompt[0] == tok.bos_id
    assert tok.decode(prompt[1:]) == "Translate from de to en\nde: Guten Tag; en: "


def test_truncation_policies():
    ex = Example(prompt_ids=(1, 10, 11), target_ids=(20, 21, 2))     # 6 tokens
    assert build_sequence(ex, 5, "drop") is None
    with pytest.raises(ValueError, match="exceeds max_len=5"):
        build_sequence(ex, 5, "error")
    cut = build_sequence(ex, 5, "truncate_target", pad_id=0)
    assert cut.tokens.tolist() == [1, 10, 11, 20, 21]                 # EOS lost
    assert cut.loss_mask.tolist() == [False, False, False, True, True]
    assert fit_length(3, 3, 3, "truncate_target").status == "prompt_too_long"
    assert fit_length(3, 3, 6, "drop").status == "ok"
    with pytest.raises(ValueError, match="truncate must be"):
        fit_length(3, 3, 6, "left")


def test_shift_targets_by_hand_at_ends_and_padding():
    tokens = np.array([5, 6, 7, 8, 0])          # last position is padding
    loss_mask = np.array([0, 0, 1, 1, 0], bool)  # target = tokens 7, 8
    targets, mask = shift_targets(tokens, loss_mask, 3, fill_id=-1)
    # row t: [tokens[t+1], tokens[t+2], tokens[t+3]] (fill past the end)
    np.testing.assert_array_equal(targets, [[6, 7, 8], [7, 8, 0], [8, 0, -1], [0, -1, -1],
                                            [-1, -1, -1]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert targets.shape == (5, 3) and targets.dtype == np.int32 and mask.dtype == bool

    # Offsets longer than the row: nothing valid beyond the end, no wrap-around.
    targets, mask = shift_targets(np.array([3, 4]), np.array([0, 1], bool), 4)
    np.testing.assert_array_equal(targets, [[4, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [0, 0, 0, 0]])

    # Batched [B, T]: each row shifted independently.
    batch = np.array([[1, 2, 3, 9], [4, 5, 9, 9]])
    lmask = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], bool)
    targets, mask = shift_targets(batch, lmask, 2, fill_id=9)
    np.testing.assert_array_equal(targets[1], [[5, 9], [9, 9], [9, 9], [9, 9]])
    np.testing.assert_array_equal(mask[0], [[1, 1], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(mask[1], [[1, 0], [0, 0], [0, 0], [0, 0]])


def test_few_shot_from_is_deterministic_and_filtered():
    pairs = [Pair("x" * 300, "long"), Pair("a", "b"), Pair("a", "b"), Pair("c\u2028d", "e"),
             Pair(" f ", "g"), Pair("h", "i")]
    assert few_shot_from(pairs, n=3, max_chars=10) == (Pair("a", "b"), Pair("f", "g"),
                                                       Pair("h", "i"))
    with pytest.raises(ValueError, match="only 3 pairs"):
        few_shot_from(pairs, n=5, max_chars=10)


# --------------------------------------------------------------------------------------------
# Readers on the real WMT14 files
# --------------------------------------------------------------------------------------------

def test_read_newstest_plain(wmt_dir):
    r14 = read_parallel_text(wmt_dir / "newstest2014")
    assert len(r14.pairs) == 3003 and r14.dropped_empty == 0 and r14.stripped_cr == 0
    first_de = read_lines(wmt_dir / "newstest2014.de")[0]
    first_en = read_lines(wmt_dir / "newstest2014.en")[0]
    assert r14.pairs[0] == Pair(first_de, first_en) and first_de and first_en
    assert [p.src for p in r14.pairs] == read_lines(wmt_dir / "newstest2014.de")
    assert len(read_parallel_text(wmt_dir / "newstest2013").pairs) == 3000

    r = read_parallel_text(wmt_dir / "newstest2014", "en", "de", max_pairs=7)
    assert len(r.pairs) == 7 and r.pairs[0] == Pair(r14.pairs[0].tgt, r14.pairs[0].src)


def test_read_news_commentary_drops_empty_and_strips_cr(wmt_dir):
    prefix = wmt_dir / "train" / "news-commentary.first10k"
    raw_de = (prefix.parent / (prefix.name + ".de")).read_bytes().decode().split("\n")[:-1]
    raw_en = (prefix.parent / (prefix.name + ".en")).read_bytes().decode().split("\n")[:-1]
    expected_dropped = sum(not a.strip() or not b.strip() for a, b in zip(raw_de, raw_en))
    r = read_parallel_text(prefix)
    assert r.num_read == 10000
    assert r.dropped_empty == expected_dropped == 31             # README: 20 + 11 blank lines
    assert r.stripped_cr == 28                                   # README: 28 CRLF lines
    assert len(r.pairs) == 10000 - 31
    assert not any("\r" in p.src or "\r" in p.tgt for p in r.pairs)
    assert all(p.src.strip() and p.tgt.strip() for p in r.pairs)
    unstripped = read_parallel_text(prefix, strip=False)
    assert len(unstripped.pairs) == len(r.pairs)
    assert any(p.src != p.src.strip() for p in unstripped.pairs)  # the trailing-whitespace warts


def test_read_europarl_train(wmt_dir):
    r = read_parallel_text(wmt_dir / "train" / "europarl-v7.first20k")
    assert len(r.pairs) == 20000 and r.dropped_empty == 0
    prefix = wmt_dir / "train" / "europarl-v7.first20k"
    assert r.pairs[0] == Pair(read_lines(prefix.with_suffix(".first20k.de"))[0],
                              read_lines(prefix.with_suffix(".first20k.en"))[0])


def test_plain_reader_splits_on_newline_only(tmp_path):
    (tmp_path / "x.de").write_bytes("eins\u2028zwei\x85drei\r\n\n  \nvier\r\n".encode())
    (tmp_path / "x.en").write_bytes("one two three\nnot empty\nalso\nfour\n".encode())
    r = read_parallel_text(tmp_path / "x")
    assert r.pairs == [Pair("eins\u2028zwei\x85drei", "one two three"), Pair("vier", "four")]
    assert (r.num_read, r.dropped_empty, r.stripped_cr) == (4, 2, 2)


def test_plain_reader_line_count_mismatch_names_both_files(tmp_path):
    (tmp_path / "y.de").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "y.en").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_parallel_text(tmp_path / "y")
    msg = str(err.value)
    assert str(tmp_path / "y.de") in msg and str(tmp_path / "y.en") in msg
    assert "3 lines" in msg and "2 lines" in msg


def test_sgml_matches_plain_text(wmt_dir):
    sgm = wmt_dir / "sgm"
    r = read_sgml(sgm / "newstest2014-deen-src.de.sgm", sgm / "newstest2014-deen-ref.en.sgm")
    assert [p.src for p in r.pairs] == read_lines(wmt_dir / "newstest2014.de")
    # The plain English file is sacreBLEU's reference text: whitespace runs collapsed.
    plain_en = read_lines(wmt_dir / "newstest2014.en")
    assert [re.sub(r"\s+", " ", p.tgt) for p in r.pairs] == plain_en
    assert sum(p.tgt != e for p, e in zip(r.pairs, plain_en)) > 0
    assert r.pairs[0].doc_id == "10023-schwarzwaelder-bote.de"
    assert len({p.doc_id for p in r.pairs}) == 164
    segs = read_sgml_segments(sgm / "newstest2014-deen-src.de.sgm")
    assert {s.doc_attrs["genre"] for s in segs} >= {"news"}
    assert {s.doc_attrs["origlang"] for s in segs} >= {"de", "en"}
    rev = read_sgml(sgm / "newstest2014-deen-src.de.sgm", sgm / "newstest2014-deen-ref.en.sgm",
                    reverse=True, max_pairs=3)
    assert rev.pairs[0] == Pair(r.pairs[0].tgt, r.pairs[0].src, r.pairs[0].doc_id)


def test_sgml_parses_entities_and_odd_layout(tmp_path):
    src = tmp_path / "s.sgm"
    ref = tmp_path / "r.sgm"
    src.write_text('<srcset setid="t">\n<DOC docid="d1" genre=news>\n'
                   '<seg id="1">A &amp; B &quot;C&quot; &#39;x&#x27; AT&T R&D &amp</seg>\n'
                   "<seg id='2'>multi\nline </seg></DOC>\n"
                   '<doc docid="d2"><seg id="1"> </seg></doc>\n</srcset>\n', encoding="utf-8")
    ref.write_text('<refset><doc docid="d1"><seg id="1">a</seg>\n<seg id="2">b</seg></doc>\n'
                   '<doc docid="d2"><seg id="1">c</seg></doc></refset>', encoding="utf-8")
    r = read_sgml(src, ref)
    assert r.pairs == [Pair("A & B \"C\" 'x' AT&T R&D &amp", "a", "d1"),
                       Pair("multi\nline", "b", "d1")]
    assert r.dropped_empty == 1
    bad = tmp_path / "bad.sgm"
    bad.write_text('<doc docid="d1"><seg id="1">a</seg><seg id="3">b</seg></doc>'
                   '<doc docid="d2"><seg id="1">c</seg></doc>', encoding="utf-8")
    with pytest.raises(DataError, match="misaligned"):
        read_sgml(src, bad)


@pytest.fixture
def sacrebleu_cache(monkeypatch):
    """Points $SACREBLEU at the shared cache. sacreBLEU reads the variable once at import time;
    the reader re-reads it at call time, so this works whether or not it was imported already."""
    cache = DATA / "sacrebleu"
    monkeypatch.setenv("SACREBLEU", str(cache))
    return cache


def test_sacrebleu_reader_matches_plain_files(wmt_dir, sacrebleu_cache):
    r = read_sacrebleu("wmt14/full")
    assert [p.src for p in r.pairs] == read_lines(wmt_dir / "newstest2014.de")
    assert [p.tgt for p in r.pairs] == read_lines(wmt_dir / "newstest2014.en")
    sgm = wmt_dir / "sgm"
    sgml = read_sgml(sgm / "newstest2014-deen-src.de.sgm", sgm / "newstest2014-deen-ref.en.sgm")
    assert [p.doc_id for p in r.pairs] == [p.doc_id for p in sgml.pairs]

    # en->de from the de-en set; and an explicit cache_dir works the same.
    rev = read_sacrebleu("wmt14/full", "en", "de", langpair="de-en", max_pairs=2,
                         cache_dir=sacrebleu_cache)
    assert rev.pairs[0] == Pair(r.pairs[0].tgt, r.pairs[0].src, r.pairs[0].doc_id)


def test_sacrebleu_wmt13_equals_plain_up_to_whitespace(wmt_dir, sacrebleu_cache):
    r = read_sacrebleu("wmt13")
    plain = read_lines(wmt_dir / "newstest2013.de")
    assert len(r.pairs) == len(plain) == 3000
    # sacreBLEU collapses whitespace runs (NBSP included) to one space; nothing else differs.
    assert [p.src for p in r.pairs] == [re.sub(r"\s+", " ", s.strip()) for s in plain]
    assert sum(p.src != s for p, s in zip(r.pairs, plain)) > 0


def test_sacrebleu_cache_follows_env_after_import(tmp_path, monkeypatch):
    import sacrebleu  # noqa: F401  (imported before the variable changes)
    monkeypatch.setenv("SACREBLEU", str(DATA / "sacrebleu"))
    assert len(read_sacrebleu("wmt14/full", max_pairs=5).pairs) == 5


def test_hf_reader_without_datasets_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="`datasets` package"):
        read_hf_wmt14("test")


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_pairs():
    return read_parallel_text(DATA / "wmt14-de-en" / "train" / "europarl-v7.first20k",
                              max_pairs=120)


def make_pipe(pairs, **overrides):
    process = {k: overrides.pop(k) for k in ("process_index", "process_count") if k in overrides}
    process.setdefault("process_index", 0)
    process.setdefault("process_count", 1)
    config = dict(global_batch_size=8, max_len=256, max_offset=3, seed=0)
    config.update(overrides)
    return TranslationPipeline(pairs, ByteTokenizer(), PromptFormat(), PipelineConfig(**config),
                               **process)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pipeline_batch_contents(train_pairs):
    pipe = make_pipe(train_pairs)
    batch = next(pipe.iterator())
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {"tokens": ((8, 256), np.int32), "positions": ((8, 256), np.int32),
                      "token_mask": ((8, 256), bool), "loss_mask": ((8, 256), bool),
                      "targets": ((8, 256, 3), np.int32), "target_mask": ((8, 256, 3), bool),
                      "example_index": ((8,), np.int32)}
    tok = ByteTokenizer()
    for b, index in enumerate(batch["example_index"]):
        pair = train_pairs.pairs[index]
        expected = build_sequence(encode_example(PromptFormat(), tok, pair), 256, pad_id=0)
        np.testing.assert_array_equal(batch["tokens"][b], expected.tokens)
        np.testing.assert_array_equal(batch["loss_mask"][b], expected.loss_mask)
        np.testing.assert_array_equal(batch["token_mask"][b], expected.token_mask)
        np.testing.assert_array_equal(batch["positions"][b], np.arange(256))
    targets, target_mask = shift_targets(batch["tokens"], batch["loss_mask"], 3)
    np.testing.assert_array_equal(batch["targets"], targets)
    np.testing.assert_array_equal(batch["target_mask"], target_mask)
    assert not (batch["loss_mask"] & ~batch["token_mask"]).any()


def test_pipeline_length_filter_counts(train_pairs):
    tok = ByteTokenizer()
    lengths = [len(encode_example(PromptFormat(), tok, p)) for p in train_pairs.pairs]
    pipe = make_pipe(train_pairs, max_len=200)
    too_long = sum(n > 200 for n in lengths)
    assert 0 < too_long < len(lengths)
    assert pipe.stats.dropped == {"too_long": too_long}
    assert pipe.stats.kept == len(pipe.rows) == len(lengths) - too_long
    assert "too_long" in pipe.stats.summary() and "reader" in pipe.stats.summary()

    cut = make_pipe(train_pairs, max_len=200, truncate="truncate_target")
    prompt_lens = [len(encode_example(PromptFormat(), tok, p).prompt_ids)
                   for p in train_pairs.pairs]
    prompt_too_long = sum(p >= 200 for p in prompt_lens)
    assert cut.stats.truncated == too_long - prompt_too_long
    assert cut.stats.kept == len(lengths) - prompt_too_long
    assert max(len(r.tokens) for r in cut.rows) == 200


def test_pipeline_empty_after_filter_says_why(train_pairs):
    with pytest.raises(ValueError, match=r"no examples left.*120 too_long"):
        make_pipe(train_pairs, max_len=20)
    with pytest.raises(ValueError, match=r"120 prompt_too_long"):
        make_pipe(train_pairs, max_len=20, truncate="truncate_target")


def test_pipeline_is_deterministic_and_seeded(train_pairs):
    a = take(make_pipe(train_pairs).iterator(), 3)
    b = take(make_pipe(train_pairs).iterator(), 3)
    assert_batches_equal(a, b)
    c = take(make_pipe(train_pairs, seed=1).iterator(), 1)
    assert not np.array_equal(a[0]["example_index"], c[0]["example_index"])


def test_pipeline_resume_is_exact(train_pairs):
    pipe = make_pipe(train_pairs, bucket_lengths=(128, 192))
    it = pipe.iterator()
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 2)
    restored = make_pipe(train_pairs, bucket_lengths=(128, 192)).iterator()
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)

    other = make_pipe(train_pairs, seed=5).iterator()
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_pipeline_epochs_reshuffle(train_pairs):
    pipe = make_pipe(train_pairs, num_epochs=2, global_batch_size=1)
    n = len(pipe.rows)
    order = [int(b["example_index"][0]) for b in pipe.iterator()]
    assert len(order) == 2 * n
    kept = sorted(r.index for r in pipe.rows)
    assert sorted(order[:n]) == kept and sorted(order[n:]) == kept
    assert order[:n] != order[n:]


def test_pipeline_final_partial_batch_is_padded(train_pairs):
    pipe = make_pipe(train_pairs, num_epochs=1, drop_remainder=False, global_batch_size=16)
    batches = list(pipe.iterator())
    index = np.concatenate([b["example_index"] for b in batches])
    assert sorted(index[index >= 0]) == sorted(r.index for r in pipe.rows)
    last = batches[-1]
    empty = last["example_index"] < 0
    assert empty.any() == bool(len(pipe.rows) % 16)
    assert not last["token_mask"][empty].any() and not last["target_mask"][empty].any()


def test_pipeline_process_shards_are_disjoint_slices(train_pairs):
    kwargs = dict(global_batch_size=8, bucket_lengths=(160, 192, 224))
    whole = take(make_pipe(train_pairs, **kwargs).iterator(), 3)
    parts = [take(make_pipe(train_pairs, process_index=p, process_count=2, **kwargs).iterator(), 3)
             for p in range(2)]
    for step in range(3):
        first, second = parts[0][step], parts[1][step]
        assert first["tokens"].shape == second["tokens"].shape == (4, whole[step]["tokens"].shape[1])
        assert not set(first["example_index"]) & set(second["example_index"])
        for k in whole[step]:
            np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[step][k])
    with pytest.raises(ValueError, match="not divisible"):
        make_pipe(train_pairs, global_batch_size=9, process_index=0, process_count=2)


def test_pipeline_bucketed_lengths(train_pairs):
    pipe = make_pipe(train_pairs, bucket_lengths=(128, 160, 192, 224))
    seen = set()
    for batch in take(pipe.iterator(), 6):
        length = batch["tokens"].shape[1]
        longest = batch["token_mask"].sum(1).max()
        buckets = pipe.config.row_lengths
        assert length in buckets and longest <= length
        assert buckets.index(length) == 0 or longest > buckets[buckets.index(length) - 1]
        seen.add(length)
    assert len(seen) > 1


# --------------------------------------------------------------------------------------------
# The real Llama 3 tokenizer
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3():
    from gptk_jax import artifacts
    from gptk_jax.tokenizers import Llama3Tokenizer
    return Llama3Tokenizer(artifacts.fetch("llama3_tokenizer_model"))


def test_llama3_examples_and_batch(llama3, wmt_dir, train_pairs):
    shots = few_shot_from(train_pairs.pairs)
    fmt = PromptFormat(shots=shots)
    test = read_parallel_text(wmt_dir / "newstest2014", max_pairs=16)
    ex = encode_example(fmt, llama3, test.pairs[0])
    assert ex.prompt_ids[0] == llama3.bos_id == 128000
    assert ex.target_ids[-1] == llama3.eos_id == 128001          # <|end_of_text|>
    assert llama3.decode(ex.prompt_ids[1:]) == fmt.prompt_text(test.pairs[0].src)
    assert llama3.decode(ex.target_ids[:-1]) == read_lines(wmt_dir / "newstest2014.en")[0]
    assert llama3.encode(fmt.prompt_text(test.pairs[0].src), bos=True) == list(ex.prompt_ids)

    pipe = TranslationPipeline(test, llama3, fmt, PipelineConfig(8, 512, max_offset=4),
                               process_index=0, process_count=1)
    batch = next(pipe.iterator())
    assert (batch["tokens"][:, 0] == 128000).all()
    assert (batch["tokens"][~batch["token_mask"]] == 128009).all()     # <|eot_id|> padding
    for b in range(8):
        target = batch["tokens"][b][batch["loss_mask"][b]]
        pair = test.pairs[batch["example_index"][b]]
        assert target[-1] == 128001 and llama3.decode(target[:-1]) == pair.tgt
