"""Special tokens in text, the BOS rule and chat templates, against independent references.

- Llama 3 chat-formatted newstest2014 (`<|start_header_id|>user<|end_header_id|>\n\n…<|eot_id|>`):
  Meta's `tokenizer.py` with `allowed_special`, HF `tokenizers` and transformers with the Llama 3.2
  `tokenizer.json`.
- SmolLM2's GGUF: transformers' GGUF tokenizer, its `chat_template` and `apply_chat_template`.
- add_bos: what transformers does with the same files (SmolLM2 GGUF: no BOS; Llama 3
  tokenizer.json: BOS), Meta's `encode(bos=True)`, and llama.cpp's rule for GGUF files without
  `tokenizer.ggml.add_bos_token`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tokenizer_refs import (  # noqa: F401  (fixtures, used by name)
    _assert_same, _config, _write_gguf, gguf_path, gguf_tok, hf_llama3_json, llama3,
    llama3_model, meta_tokenizer, newstest, sp_model, transformers_gguf, transformers_llama3, wmt)

from gptk_jax import artifacts
from gptk_jax import tokenizers as T


# --------------------------------------------------------------------------------------------
# (f) special tokens in text, when allowed
# --------------------------------------------------------------------------------------------

def _llama3_chat(user: str, assistant: str) -> str:
    """Llama 3 chat format, as Meta's ChatFormat lays out a dialog (header, "\\n\\n", eot)."""
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nTranslate.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{assistant}<|eot_id|>")


@pytest.fixture(scope="module")
def llama3_chats(wmt) -> list[str]:
    de, en = wmt["newstest2014.de"][:300], wmt["newstest2014.en"][:300]
    return [_llama3_chat(d, e) for d, e in zip(de, en)] + [
        "<|start_header_id|>user<|end_header_id|>\n\nHallo<|eot_id|>",
        "<|eot_id|><|eot_id|>x<|eom_id|> <|python_tag|>\n<|end_of_text|>",
        "<|reserved_special_token_5|><|reserved_special_token_50|> <|finetune_right_pad_id|>",
        "<|eot_id", "<|eot_id|>|>", "", "plain text only"]


def test_llama3_allowed_special_matches_meta(llama3, meta_tokenizer, llama3_chats):
    for allowed in ("all", {"<|eot_id|>"}, {"<|eot_id|>", "<|start_header_id|>"}, set()):
        got = llama3.encode_batch(llama3_chats, allowed_special=allowed)
        want = [meta_tokenizer.encode(t, bos=False, eos=False, allowed_special=allowed)
                for t in llama3_chats]
        _assert_same(llama3_chats, got, want, f"Llama 3 allowed_special={allowed} vs Meta")
    text = "<|start_header_id|>user<|end_header_id|>\n\nHallo<|eot_id|>"
    assert llama3.encode(text, bos=True, allowed_special="all") == meta_tokenizer.encode(
        text, bos=True, eos=False, allowed_special="all") == [
        128000, 128006, 882, 128007, 271, 79178, 128009]
    # Meta's <|image|> sits at 128011 (HF's tokenizer.json puts it at 128256).
    assert llama3.encode("<|image|>", allowed_special="all") == meta_tokenizer.encode(
        "<|image|>", bos=False, eos=False, allowed_special="all") == [128011]
    assert 128009 not in llama3.encode(text)                  # the default is unchanged


def test_llama3_allowed_special_matches_hf_tokenizer_json(llama3, hf_llama3_json,
                                                          transformers_llama3, llama3_chats):
    from tokenizers import Tokenizer as HFTokenizer

    # Meta and HF number the reserved tokens differently (Meta's <|image|> is base+11).
    chats = [t for t in llama3_chats if "reserved" not in t]
    assert len(chats) == len(llama3_chats) - 1
    fixed = dict(hf_llama3_json, model=dict(hf_llama3_json["model"], ignore_merges=True))
    hf = HFTokenizer.from_str(json.dumps(fixed))       # parses added tokens in text by default
    got = llama3.encode_batch(chats, allowed_special="all")
    want = [e.ids for e in hf.encode_batch(chats, add_special_tokens=False)]
    _assert_same(chats, got, want, "Llama 3 allowed_special='all' vs HF tokenizer.json")
    want = transformers_llama3(chats, add_special_tokens=False)["input_ids"]
    _assert_same(chats, got, want, "Llama 3 allowed_special='all' vs transformers")


def _smollm2_conversations(wmt) -> list[list[dict]]:
    de, en = wmt["newstest2014.de"], wmt["newstest2014.en"]
    chats = [[{"role": "user", "content": f"Übersetze ins Englische: {de[i]}"},
              {"role": "assistant", "content": en[i]},
              {"role": "user", "content": de[i + 1]}] for i in range(0, 200, 2)]
    chats.append([{"role": "system", "content": "Du bist ein Übersetzer."},
                  {"role": "user", "content": "Hallo <|im_end|> Welt"}])
    return chats


@pytest.mark.slow   # transformers' GGUF tokenizer
def test_gguf_chat_template_and_specials_match_transformers(gguf_tok, transformers_gguf, wmt):
    ref = transformers_gguf
    assert gguf_tok.chat_template == ref.chat_template
    assert "<|im_start|>" in gguf_tok.chat_template
    for chat in _smollm2_conversations(wmt):
        for gen in (False, True):
            text = gguf_tok.render_chat(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False,
                                                   add_generation_prompt=gen)
            want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            want = want["input_ids"] if "input_ids" in want else want
            assert gguf_tok.encode(text, allowed_special="all") == want, text[:200]
            assert T.encode_prompt(gguf_tok, text, allowed_special="all") == want
    text = "<|im_start|>user\nHallo<|im_end|>\n<|endoftext|>"
    assert gguf_tok.encode(text, allowed_special="all") == ref(
        text, add_special_tokens=False)["input_ids"] == [1, 4093, 198, 36549, 95, 2, 198, 0]
    # Only the allowed ones become ids; the others stay text (as ids transformers gives text).
    plain = ref("<|im_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert gguf_tok.encode(text, allowed_special={"<|im_end|>"}) == (
        plain + ref("user\nHallo", add_special_tokens=False)["input_ids"] + [2, 198]
        + ref("<|endoftext|>", add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert len(plain) > 1 and 1 not in plain


def test_sentencepiece_allowed_special_as_llama2_chat(sp_model):
    """Meta's Llama 2 chat_completion encodes each turn on its own, BOS + turn + EOS; text with
    "<s>"/"</s>" allowed is split the same way (each stretch gets sentencepiece's dummy prefix;
    transformers' Metaspace(prepend_scheme="first") does not, so it is no reference here)."""
    import sentencepiece as spm

    tok = T.SentencePieceTokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    turns = ["[INST] Hallo Welt [/INST] Hello world ", "[INST] Danke [/INST]"]
    text = "<s>" + turns[0] + "</s><s>" + turns[1]
    assert tok.encode(text, allowed_special="all") == (
        [1] + sp.encode(turns[0]) + [2, 1] + sp.encode(turns[1]))
    assert tok.encode(text, allowed_special={"<s>"}) == (
        [1] + sp.encode(turns[0] + "</s>") + [1] + sp.encode(turns[1]))
    assert tok.encode(text) == sp.encode(text)


def test_allowed_special_errors(llama3, gguf_tok):
    with pytest.raises(T.TokenizerError, match=r"\['<\|im_end\|>'\] in allowed_special are not "
                                               r"special tokens"):
        llama3.encode("x", allowed_special={"<|im_end|>"})
    with pytest.raises(TypeError, match=r"allowed_special is 'all' or a set"):
        gguf_tok.encode("<|im_end|>", allowed_special="<|im_end|>")
    with pytest.raises(T.TokenizerError, match=r"no chat template"):
        llama3.render_chat([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------
# (g) one BOS rule: add_bos, encode_prompt
# --------------------------------------------------------------------------------------------

def test_add_bos_matches_transformers(llama3, meta_tokenizer, transformers_llama3, gguf_tok,
                                      transformers_gguf, newstest):
    texts = newstest[:200] + newstest[3003:3203]
    assert gguf_tok.add_bos is False
    want = transformers_gguf(texts)["input_ids"]                  # add_special_tokens=True
    _assert_same(texts, [T.encode_prompt(gguf_tok, t) for t in texts], want,
                 "SmolLM2 encode_prompt vs transformers (no BOS)")
    assert llama3.add_bos is True
    got = [T.encode_prompt(llama3, t) for t in texts]
    want = transformers_llama3(texts)["input_ids"]
    assert all(ids[0] == 128000 for ids in want)
    _assert_same(texts, got, want, "Llama 3 encode_prompt vs transformers (BOS)")
    _assert_same(texts, got, [meta_tokenizer.encode(t, bos=True, eos=False) for t in texts],
                 "Llama 3 encode_prompt vs Meta")
    assert T.encode_prompt(llama3, texts[0], bos=False) == want[0][1:]
    assert T.encode_prompt(gguf_tok, texts[0], bos=True) == [1] + transformers_gguf(
        texts[0])["input_ids"]


def _without_add_bos(src: Path, folder: Path) -> Path:
    """A copy of a converted tokenizer folder whose config predates the add_bos field."""
    folder.mkdir(parents=True)
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["add_bos"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_add_bos_fallback_without_the_field(tmp_path, llama3_model, sp_model, gguf_path,
                                            transformers_gguf, transformers_llama3):
    for name, write, src in (("l3", T.write_llama3_tokenizer, llama3_model),
                             ("sp", T.write_sentencepiece_tokenizer, sp_model)):
        write(src, tmp_path / name)
        assert T.load_tokenizer(_without_add_bos(tmp_path / name, tmp_path / f"{name}_old")).add_bos
    T.write_gguf_tokenizer(gguf_path, tmp_path / "gguf")
    smol = T.load_tokenizer(_without_add_bos(tmp_path / "gguf", tmp_path / "gguf_old"))
    assert smol.add_bos is False and transformers_gguf("Hallo")["input_ids"][0] != smol.bos_id
    # HF's Llama 3 tokenizer.json: its post-processor adds <|begin_of_text|>, as transformers does.
    _config(tmp_path / "hf", kind="hf_json", bos_id=128000, eos_id=128001, pad_id=128009,
            stop_ids=[128001, 128009])
    (tmp_path / "hf" / "tokenizer.json").write_bytes(
        artifacts.fetch("llama3_tokenizer_json").read_bytes())
    hf = T.load_tokenizer(tmp_path / "hf")
    assert hf.add_bos is True
    assert T.encode_prompt(hf, "Hallo Welt") == transformers_llama3("Hallo Welt")["input_ids"]
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos="yes")))
    with pytest.raises(T.TokenizerError, match=r"add_bos must be true or false, got 'yes'"):
        T.load_tokenizer(tmp_path / "hf")


def test_hf_folder_add_bos_token_recorded_for_tokenizer_model(tmp_path, sp_model, newstest):
    """An HF folder with a sentencepiece tokenizer.model: tokenizer_config.json's add_bos_token
    is recorded at conversion, and encode_prompt then matches transformers' LlamaTokenizer on
    the same folder. (Without the key transformers 5 adds no BOS; we keep Meta's Llama 2 rule.)"""
    from transformers import LlamaTokenizer

    from convert import hf as convert_hf

    texts = newstest[:50]
    for add_bos in (True, False):
        src = tmp_path / f"hf_{add_bos}"
        src.mkdir()
        (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
        (src / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos}))
        write, kind, _ = convert_hf.tokenizer_writer(src, {})
        write(tmp_path / f"out_{add_bos}")
        tok = T.load_tokenizer(tmp_path / f"out_{add_bos}")
        assert kind == "sentencepiece" and tok.add_bos is add_bos
        want = LlamaTokenizer.from_pretrained(str(src))(texts)["input_ids"]
        assert all((ids[0] == 1) is add_bos for ids in want)
        _assert_same(texts, [T.encode_prompt(tok, t) for t in texts], want,
                     f"sentencepiece add_bos_token={add_bos} vs transformers")


def test_gguf_add_bos_rule(tmp_path):
    """`tokenizer.ggml.add_bos_token` decides (transformers reads it too); without it llama.cpp
    (llama-vocab.cpp) adds BOS only for the Llama 3 pre types. The built tokenizer.json carries
    the rule as its post-processor, so transformers loading it agrees."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cases = [("smollm", None, False), ("smollm", True, True), ("llama-bpe", False, False),
             ("llama-bpe", None, True)]
    for i, (pre, key, want) in enumerate(cases):
        path = _write_gguf(tmp_path / f"t{i}.gguf", pre=pre, tokens=("a", "b", "ab", "<s>"),
                           types=(1, 1, 1, 3), bos=3, eos=3, add_bos=key)
        tok = T.write_gguf_tokenizer(path, tmp_path / f"out{i}")
        assert tok.add_bos is want, (pre, key)
        assert T.encode_prompt(tok, "ab") == ([3, 2] if want else [2])
        built = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / f"out{i}" / "tokenizer.json"))
        assert built("ab")["input_ids"] == T.encode_prompt(tok, "ab")
        if key is not None:
            ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
            assert ref("ab")["input_ids"] == T.encode_prompt(tok, "ab"), (pre, key)


# --------------------------------------------------------------------------------------------
# (h) chat templates recorded in converted folders
# --------------------------------------------------------------------------------------------

# Exercises what transformers' renderer adds to jinja2: trim/lstrip blocks, loop controls,
# `tojson` keeping non-ASCII, `raise_exception`, the special-token variables.
_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "  {% if message['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "  {% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}\n"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}{% if message.meta is defined %} {{ message.meta | tojson }}"
    "{% endif %}<|eot_id|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_chat_template_from_hf_folder_renders_like_transformers(tmp_path, llama3_model,
                                                                transformers_llama3):
    from convert import hf as convert_hf

    src = tmp_path / "hf"
    src.mkdir()
    (src / "tokenizer.json").write_bytes(artifacts.fetch("llama3_tokenizer_json").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": _TEMPLATE}))
    write, kind, _ = convert_hf.tokenizer_writer(src, {"eos_token_id": [128001, 128009],
                                                       "bos_token_id": 128000})
    write(tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == _TEMPLATE
    tok = T.load_tokenizer(tmp_path / "out")
    assert kind == "hf_json" and tok.chat_template == _TEMPLATE and tok.add_bos

    ref = transformers_llama3
    ref.bos_token, ref.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    chat = [{"role": "system", "content": " Übersetze. "},
            {"role": "user", "content": "Hallo Welt", "meta": {"quelle": "Straße"}},
            {"role": "system", "content": "skipped"},
            {"role": "assistant", "content": "Hello world"}]
    for gen in (False, True):
        text = tok.render_chat(chat, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,
                                               chat_template=_TEMPLATE)
        assert '{"quelle": "Straße"}' in text and "skipped" not in text
        want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                       chat_template=_TEMPLATE)
        want = want["input_ids"] if "input_ids" in want else want
        assert T.encode_prompt(tok, text, bos=False, allowed_special="all") == want
    with pytest.raises(T.TokenizerError, match=r"unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])

    # The same template for Meta's tokenizer.model in an HF folder (e.g. original/).
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(llama3_model.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": _TEMPLATE}]}))
    write, kind, _ = convert_hf.tokenizer_writer(src, {})
    write(tmp_path / "out_l3")
    l3 = T.load_tokenizer(tmp_path / "out_l3")
    assert kind == "llama3_tiktoken" and l3.add_bos and l3.chat_template == _TEMPLATE
    assert l3.render_chat(chat) == tok.render_chat(chat)


def test_chat_template_folder_round_trip(tmp_path, gguf_tok, gguf_path, llama3_model):
    import gguf

    folder = gguf_tok.path.parent
    assert (folder / "chat_template.jinja").read_text() == gguf.GGUFReader(
        str(gguf_path)).fields["tokenizer.chat_template"].contents()
    copy = T.save_tokenizer_files(T.load_tokenizer(folder), tmp_path / "copy")
    assert T.load_tokenizer(copy).chat_template == gguf_tok.chat_template
    T.write_llama3_tokenizer(llama3_model, tmp_path / "l3")       # Meta ships no template
    assert not (tmp_path / "l3" / "chat_template.jinja").exists()
    assert T.load_tokenizer(tmp_path / "l3").chat_template is None
