"""Meta's own Llama 3 reference (llama-models 0.3.0, llama3/model.py) as a test oracle.

    ref = meta_model_module()                  # Meta's model.py, imported as-is
    model = build_reference(params, seed=0)    # its Transformer, tiny random weights, float32
    write_meta_checkpoint(folder, model, params, tied=False, shards=1)

Meta's file imports fairscale's model-parallel layers and `.args`; it is loaded as the submodule
of a stand-in package (so `llama_models/__init__.py` and its extra dependencies are never
imported), and fairscale runs in a one-process gloo group (model-parallel size 1). Shards are cut
the way fairscale's layers hold them: the split axis of each tensor is read off the type of the
reference module that owns it, never off the converter's own table.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from gptk_jax import artifacts

_PACKAGE = "_meta_llama3_reference"


def meta_model_module():
    """Meta's `llama3/model.py`, imported unchanged."""
    if f"{_PACKAGE}.model" in sys.modules:
        return sys.modules[f"{_PACKAGE}.model"]
    folder = artifacts.fetch("llama3_reference_dir")
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    spec.loader.exec_module(package)
    init_model_parallel()
    return importlib.import_module(f"{_PACKAGE}.model")


def meta_args_module():
    meta_model_module()
    return importlib.import_module(f"{_PACKAGE}.args")


def init_model_parallel() -> None:
    """A one-process gloo group and fairscale model-parallel size 1 (what Meta's code expects)."""
    import torch.distributed as dist
    import fairscale.nn.model_parallel.initialize as fs_init

    if not dist.is_initialized():
        folder = tempfile.mkdtemp(prefix="gptk-gloo-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", world_size=1,
                                rank=0)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def model_args(params: dict, *, max_batch_size: int = 4, max_seq_len: int = 512):
    return meta_args_module().ModelArgs(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                        **params)


@torch.no_grad()
def build_reference(params: dict, *, seed: int = 0, tied: bool = False, max_batch_size: int = 4,
                    max_seq_len: int = 512):
    """Meta's Transformer with random float32 weights.

    Meta's layers are built with an identity `init_method` (weights left uninitialised), so they
    are set here: linears ~ N(0, 1/in_features) (activations stay O(1), attention is peaked, so a
    wrong RoPE layout shows in the logits), embeddings ~ N(0, 1), norm scales ~ 1 + N(0, 0.2).
    With `tied`, the output projection is the embedding matrix (what a tied checkpoint means),
    and embeddings ~ N(0, 0.1): at N(0, 1) a token's own embedding dominates the residual stream
    and greedy decoding just repeats the last prompt token.
    """
    ref = meta_model_module()
    model = ref.Transformer(model_args(params, max_batch_size=max_batch_size,
                                       max_seq_len=max_seq_len))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name == "tok_embeddings.weight":
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if tied else 1.0))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    if tied:
        model.output.weight.copy_(model.tok_embeddings.weight)
    return model.eval()


def split_dims(model) -> dict[str, Optional[int]]:
    """state_dict name -> the axis fairscale splits it on across model-parallel ranks (None:
    replicated), from the type of the reference module owning the weight."""
    from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                    VocabParallelEmbedding)
    ref = meta_model_module()
    dims = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        elif isinstance(module, ref.RMSNorm):
            dim = None
        else:
            continue
        dims[f"{module_name}.weight"] = dim
    return dims


def shard_state_dict(state: dict, dims: dict, shards: int) -> list[dict]:
    """Cuts a full state_dict into `shards` model-parallel state_dicts (contiguous chunks, as
    fairscale's `_initialize_affine_weight` and `VocabUtility` assign them to ranks)."""
    out = [{} for _ in range(shards)]
    for name, tensor in state.items():
        dim = dims[name]
        pieces = [tensor] * shards if dim is None else torch.chunk(tensor, shards, dim=dim)
        assert dim is None or all(p.shape[dim] * shards == tensor.shape[dim] for p in pieces)
        for rank, piece in enumerate(pieces):
            out[rank][name] = piece.clone()
    return out


def write_meta_checkpoint(folder: Path, model, params: dict, *, tied: bool = False,
                          shards: int = 1, tokenizer_model: Optional[Path] = None) -> Path:
    """Meta's layout: params.json, consolidated.NN.pth, tokenizer.model (the real Llama 3 one
    unless given). A tied checkpoint has no output.weight."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        del state["output.weight"]
    for rank, shard in enumerate(shard_state_dict(state, split_dims(model), shards)):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    src = tokenizer_model or artifacts.fetch("llama3_tokenizer_model")
    shutil.copyfile(src, folder / "tokenizer.model")
    return folder


@torch.no_grad()
def reference_logits(model, tokens) -> torch.Tensor:
    """[B,T,V] float32 logits of Meta's Transformer for a fresh prompt (start_pos 0)."""
    return model(torch.as_tensor(tokens, dtype=torch.long), 0).float()


@torch.no_grad()
def reference_greedy(model, prompt, steps: int) -> list[list[int]]:
    """Meta's own KV-cache path: prefill at start_pos 0, then one token per call."""
    tokens = torch.as_tensor(prompt, dtype=torch.long)
    logits = model(tokens, 0)[:, -1]
    out = []
    pos = tokens.shape[1]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits = model(nxt[:, None], pos)[:, -1]
        pos += 1
    return torch.stack(out, 1).tolist()
