"""Shared references for the tokenizer tests: the real files (Meta's Llama 3 tokenizer.model and
reference tokenizer.py, HF's Llama 3.2 tokenizer.json, SmolLM2's GGUF), the tokenizers that
transformers builds from them, a sentencepiece model trained on Europarl, WMT14 text, and small
helpers (tiny GGUF files, tokenizer folders, line-by-line comparison)."""

from __future__ import annotations

import importlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

from gptk_jax import artifacts
from gptk_jax import tokenizers as T

NEWSTEST = ("newstest2014.de", "newstest2014.en")
EUROPARL_DE = "train/europarl-v7.first20k.de"


def _read_lines(path: Path) -> list[str]:
    """WMT files: bytes decoded as UTF-8, split on '\\n' only, trailing '\\r' stripped."""
    lines = path.read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def _mismatches(texts, got, want) -> list[int]:
    assert len(got) == len(want) == len(texts)
    return [i for i in range(len(texts)) if got[i] != want[i]]


def _describe(texts, got, want, bad, limit=3) -> str:
    out = [f"{len(bad)} of {len(texts)} lines differ"]
    for i in bad[:limit]:
        out.append(f"  line {i}: {texts[i][:80]!r}\n"
                   f"    ours {got[i][:24]}\n    ref  {want[i][:24]}")
    return "\n".join(out)


def _assert_same(texts, got, want, what):
    bad = _mismatches(texts, got, want)
    assert not bad, f"{what}: " + _describe(texts, got, want, bad)

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wmt(wmt_dir) -> dict[str, list[str]]:
    data = {name: _read_lines(wmt_dir / name) for name in NEWSTEST + (EUROPARL_DE,)}
    assert [len(data[n]) for n in NEWSTEST] == [3003, 3003]
    assert len(data[EUROPARL_DE]) == 20000
    assert all(data[n][0].strip() for n in NEWSTEST)   # real text, first line not empty
    return data


@pytest.fixture(scope="module")
def newstest(wmt) -> list[str]:
    return wmt["newstest2014.de"] + wmt["newstest2014.en"]

@pytest.fixture(scope="module")
def llama3_model() -> Path:
    return artifacts.fetch("llama3_tokenizer_model")


@pytest.fixture(scope="module")
def meta_tokenizer(tmp_path_factory, llama3_model):
    """Meta's reference Tokenizer, imported from llama_models' own source files.

    `llama3/tokenizer.py` does `from ..tokenizer_utils import load_bpe_file`, so both files are
    laid out as a private package (no other llama_models module is needed; no blobfile).
    `tokenizer.py` comes from the extracted reference folder, `tokenizer_utils.py` from the same
    llama-models wheel.
    """
    ref_dir = artifacts.fetch("llama3_reference_dir")
    requirement = artifacts.ARTIFACTS["llama3_reference_dir"][0]
    root = tmp_path_factory.mktemp("meta_ref")
    pkg = root / "_gptk_meta_ref_llama_models"
    (pkg / "llama3").mkdir(parents=True)
    with zipfile.ZipFile(artifacts._wheel(requirement)) as zf:
        source = ((ref_dir / "tokenizer.py").read_bytes() if (ref_dir / "tokenizer.py").is_file()
                  else zf.read("llama_models/llama3/tokenizer.py"))
        (pkg / "llama3" / "tokenizer.py").write_bytes(source)
        # One level up from llama3/, so not part of the extracted reference folder.
        (pkg / "tokenizer_utils.py").write_bytes(zf.read("llama_models/tokenizer_utils.py"))
    (pkg / "__init__.py").write_text("")
    (pkg / "llama3" / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("_gptk_meta_ref_llama_models.llama3.tokenizer")
    finally:
        sys.path.remove(str(root))
    return module.Tokenizer(llama3_model)


@pytest.fixture(scope="module")
def llama3(llama3_model) -> T.Llama3Tokenizer:
    return T.Llama3Tokenizer(llama3_model)

@pytest.fixture(scope="module")
def hf_llama3_json() -> dict:
    return json.loads(artifacts.fetch("llama3_tokenizer_json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return artifacts.fetch("smollm2_gguf")


@pytest.fixture(scope="module")
def gguf_tok(tmp_path_factory, gguf_path) -> T.HFJsonTokenizer:
    return T.write_gguf_tokenizer(gguf_path, tmp_path_factory.mktemp("gguf_tok"))


@pytest.fixture(scope="module")
def transformers_gguf(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                      gguf_file=gguf_path.name)


def _train_sentencepiece(lines, path: Path, **extra) -> Path:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    # Llama 2's trainer settings, at toy size.
    options = dict(model_type="bpe", vocab_size=1000, byte_fallback=True, split_digits=True,
                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                   add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                   character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   num_threads=1, minloglevel=2)
    options.update(extra)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, wmt_dir) -> Path:
    lines = (_read_lines(wmt_dir / EUROPARL_DE)[:300]
             + _read_lines(wmt_dir / "train/europarl-v7.first20k.en")[:300])
    return _train_sentencepiece(lines, tmp_path_factory.mktemp("sp_src") / "tokenizer.model")

@pytest.fixture(scope="module")
def transformers_llama3():
    """transformers' fast tokenizer on HF's Llama 3.2 tokenizer.json (its post-processor adds
    <|begin_of_text|>)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(artifacts.fetch("llama3_tokenizer_json")))


def _write_gguf(path: Path, *, model="gpt2", pre="smollm", tokens=("a", "b", "ab"),
                types=None, merges=("a b",), bos=0, eos=1, add_bos=None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_types(list(types) if types is not None else [1] * len(tokens))
    if merges is not None:
        w.add_token_merges(list(merges))
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _config(folder: Path, **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


IDS = dict(bos_id=1, eos_id=2, pad_id=2, stop_ids=[2])
