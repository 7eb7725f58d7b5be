"""The padding id is always a row of the embedding, and non-finite weights found on load are named
with their rows (issue 27, finding 5).

A model converted with --allow-small-vocab can have a tokenizer whose pad id has no embedding
row: padded rows of a batch then read a row that does not exist and a valid prompt fails with
"non-finite logits" at the default --bucket. Conversion now writes a pad id that has a row (the
eos id) and records the choice; an older folder gets the same choice on load, with a warning."""

import json
import shutil

import jax
import numpy as np
import pytest

from gptk_jax.llama.checkpoint import (DIGESTS_KEY, PROVENANCE_FILE, CheckpointError,
                                       _save_params, check_finite, load_converted,
                                       save_converted)
from gptk_jax.llama.model import init_params
from gptk_jax.training.inputs import _write_byte_tokenizer, tiny_trunk_config

# the byte tokenizer: 259 ids, bos 256, eos 257, pad 258; the embedding: 258 rows (no row for pad)
ROWS = 258


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    config = tiny_trunk_config().replace(vocab_size=ROWS)
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    return save_converted(tmp_path_factory.mktemp("pad") / "model", config, params,
                          write_tokenizer=_write_byte_tokenizer,
                          provenance={"allow_small_vocab": True})


def test_conversion_chooses_a_pad_id_with_a_row(small_vocab_model):
    tok_config = json.loads((small_vocab_model / "tokenizer" / "tokenizer_config.json")
                            .read_text())
    assert tok_config["pad_id"] == 257                       # eos: it has a row
    provenance = json.loads((small_vocab_model / PROVENANCE_FILE).read_text())
    assert provenance["pad_id"]["tokenizer"] == 258 and provenance["pad_id"]["chosen"] == 257
    assert any("pad id 258 has no embedding row" in w for w in provenance["warnings"])
    model = load_converted(small_vocab_model)
    assert model.tokenizer.pad_id == 257 < model.embedding_rows


def _decode_two_prompts(model):
    from gptk_jax.decoding import factory
    decoder = factory.make_decoder(model, factory.GREEDY)
    short, long = [256, 10, 11], [256] + list(range(20, 40))   # padded to one width
    return decoder.generate([short, long], 4)


def test_padding_of_a_batch_decodes(small_vocab_model):
    """Two prompts of different lengths at the default bucket: the short one is padded."""
    result = _decode_two_prompts(load_converted(small_vocab_model))
    assert len(result.tokens) == 2


def test_an_older_folder_gets_a_pad_id_on_load(small_vocab_model, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(small_vocab_model, old)
    tok_file = old / "tokenizer" / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    tok_config["pad_id"] = 258                                # as conversion wrote it before
    tok_file.write_text(json.dumps(tok_config))
    model = load_converted(old)
    assert model.tokenizer.pad_id == 257
    err = capsys.readouterr().err
    assert "pad id 258 has no embedding row" in err and "padding with id 257" in err
    assert len(_decode_two_prompts(model).tokens) == 2


def test_check_finite_names_the_rows():
    params = {"tok_embeddings": {"embedding": np.ones((50, 4), np.float32)},
              "layers": {"w": np.ones((3, 4, 4), np.float32)}}
    params["tok_embeddings"]["embedding"][[7, 31], 2] = np.nan
    params["layers"]["w"][1, 0, 0] = np.inf
    with pytest.raises(CheckpointError) as e:
        check_finite(params, source="x", chunk=16)
    message = str(e.value)
    assert "tensor ['tok_embeddings']['embedding'] has 2 non-finite" in message
    assert "token ids (embedding rows) 7, 31 of axis 0" in message
    assert "tensor ['layers']['w'] has 1 non-finite" in message
    assert "layers 1 of axis 0" in message


def test_nonfinite_weights_of_a_folder_without_digests_are_named_on_load(tmp_path):
    """Without digests (an older folder) the weights are at least checked finite on load,
    naming the tensor and rows and blaming the weights, not the prompts."""
    config = tiny_trunk_config()
    params = jax.tree.map(np.array, jax.device_get(init_params(config, jax.random.PRNGKey(1))))
    out = save_converted(tmp_path / "m", config, params, write_tokenizer=_write_byte_tokenizer)
    params["tok_embeddings"]["embedding"][5, :3] = np.nan
    shutil.rmtree(out / "params")
    _save_params(out / "params", params)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    del provenance[DIGESTS_KEY]
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance))
    with pytest.raises(CheckpointError) as e:
        load_converted(out)
    message = str(e.value)
    assert "tensor ['tok_embeddings']['embedding'] has 3 non-finite" in message
    assert "token ids (embedding rows) 5 of axis 0" in message
    assert "weights are broken (not the prompts)" in message
