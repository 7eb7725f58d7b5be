"""Translation helpers of the library: the data-root rule, test sets by name or path (the data
root's files, sacreBLEU's cache, a user's pair), the one stop rule, prompt formats with few-shot
pools, draft vocabularies."""

import re

import pytest

from conftest import DATA, WMT, read_lines
from gptk_jax.data import DataError, Pair, few_shot_from, read_parallel_text
from gptk_jax.data.prompts import hypothesis_text, prompt_format, translation_stop_ids
from gptk_jax.data.root import DEFAULT_DATA_ROOT, resolve_data_root, sacrebleu_cache
from gptk_jax.data.testsets import (load_file_pair, load_sacrebleu_set, load_test_set,
                                    news_commentary)
from gptk_jax.decoding.draft_vocab import build_draft_vocab


class PieceTokenizer:
    """ids 0 'a', 1 'b', 2 '\\n', 3 '.\\n', 4 ' \\n ', 5 an end id that cannot be decoded alone,
    6 ' '; encodes character by character."""
    pieces = ["a", "b", "\n", ".\n", " \n ", None, " "]
    stop_ids = frozenset({5})
    vocab_size = 7

    def decode(self, ids):
        if 5 in ids:
            raise ValueError("id 5 has no text")
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text, bos=False, eos=False):
        return [self.pieces.index(c) for c in text]


# --------------------------------------------------------------------------------------------
# The data root (decided at the edge)
# --------------------------------------------------------------------------------------------

def test_data_root_is_the_flag_else_the_environment_else_beside_the_working_directory(
        tmp_path, monkeypatch):
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("GPTK_DATA", raising=False)
    assert DEFAULT_DATA_ROOT == "../shared/data"
    assert resolve_data_root() == tmp_path / "shared" / "data"
    monkeypatch.setenv("GPTK_DATA", "env-data")
    assert resolve_data_root() == work / "env-data"
    assert resolve_data_root("flag-data") == work / "flag-data"
    assert resolve_data_root(tmp_path / "abs") == tmp_path / "abs"


def test_sacrebleu_cache_is_the_environment_else_the_data_roots(tmp_path, monkeypatch):
    monkeypatch.delenv("SACREBLEU", raising=False)
    assert sacrebleu_cache(tmp_path) is None                  # sacreBLEU's own ~/.sacrebleu
    (tmp_path / "sacrebleu").mkdir()
    assert sacrebleu_cache(tmp_path) == tmp_path / "sacrebleu"
    monkeypatch.setenv("SACREBLEU", str(tmp_path / "elsewhere"))
    assert sacrebleu_cache(tmp_path) == tmp_path / "elsewhere"


# --------------------------------------------------------------------------------------------
# Test sets
# --------------------------------------------------------------------------------------------

def test_file_split_of_the_data_root(wmt_dir):
    test = load_test_set("newstest2013", DATA, max_sentences=2)
    assert [p.src for p in test.pairs] == read_lines(wmt_dir / "newstest2013.de")[:2]
    assert [p.tgt for p in test.pairs] == read_lines(wmt_dir / "newstest2013.en")[:2]
    assert test.describe() == {"name": "newstest2013", "kind": "files",
                               "source": str(WMT / "newstest2013.de"),
                               "reference": str(WMT / "newstest2013.en"), "num_sentences": 2,
                               "src_lang": "de", "tgt_lang": "en", "dropped_empty": 0}
    reverse = load_test_set("newstest2013", DATA, "en", "de", max_sentences=1)
    assert reverse.pairs[0] == Pair(test.pairs[0].tgt, test.pairs[0].src)


def test_sacrebleu_name_loads_through_the_cache(wmt_dir, monkeypatch):
    monkeypatch.delenv("SACREBLEU", raising=False)
    cache = DATA / "sacrebleu"
    test = load_test_set("wmt13", DATA, sacrebleu_cache=cache)
    cached = cache / "wmt13"
    assert len(test) == 3000
    assert test.pairs[0].src == read_lines(cached / "wmt13.de-en.src")[0]
    assert test.pairs[0].tgt == read_lines(cached / "wmt13.de-en.ref")[0]
    assert test.pairs[-1].src == read_lines(cached / "wmt13.de-en.src")[-1]
    assert test.pairs[0].doc_id == read_lines(cached / "wmt13.de-en.docid")[0]
    assert test.describe() == {"name": "wmt13", "kind": "sacrebleu", "sacrebleu": "wmt13",
                               "langpair": "de-en", "sacrebleu_cache": str(cache),
                               "num_sentences": 3000, "src_lang": "de", "tgt_lang": "en",
                               "dropped_empty": 0}
    full = load_sacrebleu_set("wmt14/full", sacrebleu_cache=cache, max_sentences=1)
    assert full.pairs[0].src == read_lines(wmt_dir / "newstest2014.de")[0]


def test_users_file_pair_drops_empty_sides_and_strips_cr(tmp_path):
    src, ref = tmp_path / "in.txt", tmp_path / "refs.txt"
    src.write_bytes("Guten Tag\r\n\nNoch ein Satz \u0085 hier\n".encode("utf-8"))
    ref.write_bytes(b"Good day\nlost\nOne more sentence\n")
    test = load_file_pair(src, ref)
    assert test.pairs == (Pair("Guten Tag", "Good day"),
                          Pair("Noch ein Satz \u0085 hier", "One more sentence"))
    assert test.describe()["dropped_empty"] == 1
    assert test.describe()["kind"] == "pair" and test.name == f"{src} + {ref}"
    assert len(load_file_pair(src, ref, max_sentences=1)) == 1


@pytest.mark.parametrize("load, named", [
    (lambda tmp: load_test_set("wmt99", DATA), "'wmt99'"),
    (lambda tmp: load_test_set("newstest2014", tmp), "wmt14-de-en/newstest2014.de"),
    (lambda tmp: load_test_set("newstest2014", DATA, "de", "fr"), "newstest2014.fr"),
    (lambda tmp: load_test_set("wmt13", DATA, "fr", "de",
                               sacrebleu_cache=DATA / "sacrebleu"), "'wmt13' has no fr-de"),
    (lambda tmp: load_file_pair(tmp / "missing.de", WMT / "newstest2014.en"), "missing.de"),
    (lambda tmp: load_file_pair(WMT / "newstest2014.de", tmp / "missing.en"), "missing.en"),
])
def test_unknown_split_and_missing_files_say_which_in_one_line(tmp_path, load, named):
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_uncached_sacrebleu_set_without_a_network_is_one_line(tmp_path, monkeypatch):
    """An empty cache: sacreBLEU tries to download (no network here, or a refused one)."""
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"'wmt12' \(de-en\) is not in the cache .*empty") as err:
        load_test_set("wmt12", DATA, sacrebleu_cache=tmp_path / "empty")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Stop rule, prompts, draft vocabulary
# --------------------------------------------------------------------------------------------

def test_one_stop_rule_whitespace_newline_tokens_and_the_tokenizers_stops():
    tok = PieceTokenizer()
    # '\n' and ' \n ' stop; '.\n' does not (its '.' belongs to the translation); 5 is a stop id
    assert translation_stop_ids(tok) == [2, 4, 5]
    assert hypothesis_text(tok, [0, 3, 1]) == "a."
    assert hypothesis_text(tok, [6, 0, 1, 6]) == "ab"


def test_prompt_format_takes_its_few_shot_pool_from_a_given_file():
    prefix = news_commentary(DATA)
    fmt = prompt_format("de", "en", shots=2, space_with_target=True, shots_from=prefix)
    expected = few_shot_from(read_parallel_text(prefix).pairs, 2)
    assert fmt.shots == expected and fmt.query_template == "de: {src}; en:"
    assert fmt.prompt_text("x").startswith("Translate from de to en\nde: " + expected[0].src)
    assert prompt_format("de", "en").shots == ()
    with pytest.raises(ValueError, match="few-shot"):
        prompt_format("de", "en", shots=1)


def test_build_draft_vocab_counts_a_given_text_stop_ids_first(tmp_path):
    text = tmp_path / "train.txt"
    text.write_bytes(b"ab\nb\n\nbb\r\n")
    tok = PieceTokenizer()
    # counts: b 4, a 1; with the space that follows 'en:' also ' ' 3
    assert build_draft_vocab(tok, 4, text) == (2, 4, 5, 1)
    assert build_draft_vocab(tok, 5, text, space_with_target=True) == (2, 4, 5, 1, 6)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        build_draft_vocab(tok, 4, tmp_path / "nope.txt")
