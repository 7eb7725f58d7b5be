"""`run_evaluation(cfg) -> report`: greedy vs draft-and-verify decoding of one trunk on one test
set, from an `EvalConfig` to the report dict (gptk_jax.evaluation.report writes it).

Flow: the report folder's writability and the test set (first, so an unwritable folder or a bad
split or path fails before the model loads) -> trunk and heads -> prompt boundary, draft
vocabulary, stop ids -> the prompts (the one BOS rule of gptk_jax.data.prompts, checked against
the embedding; their prompt record compared with the one in heads.json) -> the drafting methods
-> per batch size `runs.decode_batch_size`, each run saved to OUT/runs/ as it finishes and
reused by a rerun with the same settings (`store.RunStore`) -> `report.build_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gptk_jax.data.prompts import (PromptFormat, compare_prompt_records, encode_prompts,
                                   prompt_bos, prompt_format, prompt_record,
                                   translation_stop_ids)
from gptk_jax.data.testsets import TestSet, load_file_pair, load_test_set, news_commentary
from gptk_jax.decoding.engine import SHARED_PREFIX_MIN as MIN_SHARED_PREFIX
from gptk_jax.evaluation.config import EvalConfig
from gptk_jax.evaluation.store import (RunStore, check_output_folder, folder_fingerprint,
                                       sha256_json)
from gptk_jax.llama.prefix import common_prefix_length


def load_eval_set(cfg: EvalConfig) -> TestSet:
    if cfg.source is not None:
        return load_file_pair(cfg.source, cfg.reference, cfg.src_lang, cfg.tgt_lang,
                              max_sentences=cfg.max_sentences)
    return load_test_set(cfg.split, cfg.data_root, cfg.src_lang, cfg.tgt_lang,
                         max_sentences=cfg.max_sentences, sacrebleu_cache=cfg.sacrebleu_cache)


def resolve_space_with_target(given: Optional[bool], heads_metadata: Optional[dict]) -> bool:
    """The prompt boundary to decode with: the flag when given, else what the heads were trained
    with (heads.json records the training config), else False. Prints the choice and warns when
    the flag contradicts the heads (drafts then start from a shifted boundary: low acceptance).
    heads.json's prompt record (`metadata["prompt_format"]`) decides when it is there: its
    target prefix ' ' is space_with_target; older heads: the training config's flag."""
    trained = None
    recorded = (heads_metadata or {}).get("prompt_format")
    if isinstance(recorded, dict) and recorded.get("target_prefix") is not None:
        trained = recorded["target_prefix"] == " "
    elif heads_metadata:
        trained = ((heads_metadata.get("config") or {}).get("data") or {}).get(
            "space_with_target")
    if given is None:
        chosen = bool(trained) if trained is not None else False
        why = "as the heads were trained (heads.json)" if trained is not None else "default"
    else:
        chosen, why = bool(given), "flag"
        if trained is not None and bool(trained) != chosen:
            print(f"warning: --{'' if chosen else 'no-'}space-with-target, but the heads were "
                  f"trained with space_with_target={bool(trained)}", flush=True)
    print(f"prompt: space_with_target={chosen} ({why})", flush=True)
    return chosen


def draft_vocabulary(cfg: EvalConfig, tokenizer, space_with_target: bool, heads=None):
    """-> (ids, where they come from: the text's path or the heads' draft_vocab.json) or
    (None, None). --draft-vocab-size (with --draft-vocab-from) decides when given; else heads
    trained with a softmax over a draft vocabulary (loss.draft_vocab_size, heads.io) draft over
    their own; else the whole vocabulary."""
    if not cfg.draft_vocab_size:
        ids = getattr(heads, "draft_vocab", None)
        if ids is None:
            return None, None
        from gptk_jax.heads.io import VOCAB_FILE
        path = Path(heads.path) / VOCAB_FILE
        record = getattr(heads, "draft_vocab_record", None) or {}
        print(f"draft vocabulary: the heads' own, {len(ids)} ids ({path}, sha256 "
              f"{str(record.get('sha256', '?'))[:12]}; --draft-vocab-size overrides it)",
              flush=True)
        return tuple(ids), path
    from gptk_jax.decoding.draft_vocab import build_draft_vocab
    path = Path(cfg.draft_vocab_from or f"{news_commentary(cfg.data_root)}.{cfg.tgt_lang}")
    ids = build_draft_vocab(tokenizer, cfg.draft_vocab_size, path,
                            space_with_target=space_with_target)
    print(f"draft vocabulary: the {len(ids)} most frequent tokens of {path} (stop ids included)",
          flush=True)
    return ids, path


def drafting_methods(cfg: EvalConfig, decoding, heads, tokens_per_step: int,
                     draft_vocab) -> list:
    """'mtp' (the heads, W = tokens_per_step), 'lookup' and 'heads+lookup' (W =
    cfg.lookup_tokens_per_step, default the same W), as cfg asks (the oracle is apart); each a
    `DecoderSpec` that decoding.factory.make_decoder builds."""
    from gptk_jax.evaluation.decode import heads_method, lookup_method, tree_method
    methods = []
    width = {"choose_width": cfg.choose_width, "verify_cost": cfg.verify_cost,
             "score_bins": cfg.score_bins}
    if heads is not None:
        methods.append(heads_method("mtp", decoding, str(heads.path), tokens_per_step,
                                    draft_vocab, drafter_weights=cfg.drafter_weights, **width))
    if cfg.lookup:
        lookup_w = cfg.lookup_tokens_per_step or tokens_per_step
        methods.append(lookup_method("lookup", lookup_w, cfg.lookup_max_ngram, **width))
        if heads is not None:
            methods.append(lookup_method("heads+lookup", lookup_w, cfg.lookup_max_ngram,
                                         fallback=methods[0], **width))
        if heads is not None and cfg.tree:     # fixed W (choose_width: batches gated)
            methods.append(tree_method("heads+lookup-tree", decoding, methods[0],
                                       cfg.lookup_max_ngram, cfg.lookup_tokens_per_step))
    if cfg.only is not None:                   # built above (fallbacks refer to them), run not
        methods = [m for m in methods if m.name in cfg.only]
    return methods


def build_prompts(cfg: EvalConfig, tokenizer, space_with_target: bool
                  ) -> tuple[PromptFormat, bool, dict]:
    """(the prompt format, whether prompts start with BOS, their prompt record): the format of
    gptk_jax.data.prompts under the one BOS rule (cfg.bos, else the tokenizer's add_bos)."""
    fmt = prompt_format(cfg.src_lang, cfg.tgt_lang, cfg.shots, space_with_target,
                        shots_from=news_commentary(cfg.data_root))
    bos = prompt_bos(tokenizer, cfg.bos)
    return fmt, bos, prompt_record(fmt, tokenizer, bos)


def evaluation_prompts(fmt: PromptFormat, tokenizer, test_set: TestSet, bos: bool) -> list:
    """The prompt ids of every source: what training rows of the same pairs start with."""
    return encode_prompts(fmt, tokenizer, [p.src for p in test_set.pairs], bos)


def check_prompt_record(used: dict, heads) -> None:
    """Prints a warning when the heads were trained on another prompt format."""
    if heads is None:
        return
    warning = compare_prompt_records(used, heads.metadata.get("prompt_format"),
                                     used_by="evaluation", recorded_by=str(heads.path))
    if warning is not None:
        print(warning, flush=True)


def run_settings(cfg: EvalConfig, model, prompts: list, stop_ids: tuple, draft_vocab,
                 record: dict) -> dict:
    """Everything that decides a run's tokens and timing (store.RunStore's "same settings")."""
    import jax

    from gptk_jax.decoding.engine import resolve_matmul
    from gptk_jax.decoding.width import AutoWidth
    device = jax.devices()[0]
    heads = None
    if cfg.heads:
        heads = folder_fingerprint(cfg.heads, ("heads.json",))
    return {"checkpoint": folder_fingerprint(model.path, ("config.json", "conversion.json")),
            "heads": heads, "prompts_sha256": sha256_json(prompts), "num_prompts": len(prompts),
            "prompt_format": record, "stop_ids_sha256": sha256_json(list(stop_ids)),
            "max_new_tokens": cfg.max_new_tokens, "bucket": cfg.bucket,
            "dtype": model.config.dtype, "platform": device.platform,
            "device_kind": getattr(device, "device_kind", None),
            "matmul": resolve_matmul("auto"),      # few-row kernels or XLA's (GPTK_FEW_ROWS)
            "projections": "fused",                # decoders' q|k|v and w1|w3 (engine.Decoder)
            "lookup_max_ngram": cfg.lookup_max_ngram, "choose_width": cfg.choose_width,
            "interleave": cfg.interleave,
            "score_bins": cfg.score_bins,
            "verify_cost": sha256_json(Path(cfg.verify_cost).read_text())
            if cfg.verify_cost else None,
            "draft_vocab_sha256": sha256_json(list(map(int, draft_vocab)))
            if draft_vocab is not None else None,
            # only where not the default, so runs saved before the option stay reusable
            **({"drafter_weights": cfg.drafter_weights}
               if cfg.drafter_weights != "float32" else {}),
            # W chosen per step: its margin (runs timed before it existed are not reused)
            **({"min_gain": AutoWidth().min_gain} if cfg.choose_width else {})}


def draft_vocab_fields(cfg: EvalConfig, draft_vocab, path) -> dict:
    """The report's record of the draft vocabulary (None fields without one)."""
    return {"draft_vocab_size": len(draft_vocab) if draft_vocab else None,
            "draft_vocab_from": str(path) if draft_vocab else None,
            # 'flag': --draft-vocab-size; 'heads': the heads' own (draft_vocab.json)
            "draft_vocab_source": None if not draft_vocab else
            ("flag" if cfg.draft_vocab_size else "heads"),
            "draft_vocab_sha256": sha256_json(list(map(int, draft_vocab)))
            if draft_vocab else None}


def run_evaluation(cfg: EvalConfig) -> dict:
    import jax

    from gptk_jax.evaluation.decode import Decoding
    from gptk_jax.evaluation.report import build_report
    from gptk_jax.evaluation.runs import decode_batch_size
    from gptk_jax.heads.io import load_heads
    from gptk_jax.llama.checkpoint import load_converted

    check_output_folder(cfg.output)
    test_set = load_eval_set(cfg)
    model = load_converted(cfg.checkpoint, dtype=cfg.dtype,
                           verify_digests=None if cfg.verify_weights else False)
    config, tok = model.config, model.tokenizer
    trunk_name = Path(cfg.checkpoint).name
    heads = load_heads(cfg.heads, config, trunk_name) if cfg.heads else None
    k = cfg.tokens_per_step or heads.head_config.k      # W
    space_with_target = resolve_space_with_target(cfg.space_with_target,
                                                  heads.metadata if heads else None)
    fmt, bos, record = build_prompts(cfg, tok, space_with_target)
    check_prompt_record(record, heads)
    prompts = evaluation_prompts(fmt, tok, test_set, bos)
    model.check_token_ids([i for p in prompts for i in p])
    draft_vocab, draft_vocab_path = draft_vocabulary(cfg, tok, space_with_target, heads)
    stop_ids = tuple(translation_stop_ids(tok))
    decoding = Decoding(config, model.params, cfg.max_new_tokens, stop_ids, tok.pad_id,
                        cfg.bucket, heads=heads)
    shared = common_prefix_length(prompts)    # instruction + shots: prefilled once, every batch
    if shared >= MIN_SHARED_PREFIX:           # size (batch 1 cannot see it by itself)
        decoding.greedy.add_shared_prefix(prompts[0][:shared])
    methods = drafting_methods(cfg, decoding, heads, k, draft_vocab)
    platform = jax.devices()[0].platform
    print(f"{trunk_name}: {len(prompts)} sentences of {test_set.name} {cfg.src_lang}->"
          f"{cfg.tgt_lang}, W={k}, {'BOS' if bos else 'no BOS'}, {len(stop_ids)} stop ids, "
          f"{platform}, dtype {config.dtype}", flush=True)
    store = RunStore(cfg.output, run_settings(cfg, model, prompts, stop_ids, draft_vocab, record))

    runs, outputs = {}, {}
    for batch in cfg.batch_sizes:
        batch_runs, batch_outputs = decode_batch_size(
            decoding, methods, prompts, batch, oracle_k=k if cfg.oracle else None,
            continuous=cfg.continuous, interleave=cfg.interleave, progress=cfg.progress,
            store=store, continuous_repeats=cfg.continuous_repeats)
        runs.update(batch_runs)
        outputs.update(batch_outputs)

    header = {"checkpoint": str(cfg.checkpoint), "heads": cfg.heads, "split": cfg.split,
              "k": k, "max_new_tokens": cfg.max_new_tokens, "shots": cfg.shots,
              "space_with_target": space_with_target, "prompt_format": record,
              "choose_width": cfg.choose_width, "verify_cost": cfg.verify_cost,
              **draft_vocab_fields(cfg, draft_vocab, draft_vocab_path),
              "dtype": config.dtype, "platform": platform, "reused_runs": store.reused,
              "command": cfg.command}
    main_method = methods[0].name if methods else "oracle"
    return build_report(header, test_set, tok, runs, outputs, cfg.batch_sizes[0], main_method)
