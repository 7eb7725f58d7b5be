"""Translation prompts and the token-level index arithmetic of MTP training.

Text -> ids -> one training row:

    fmt = PromptFormat.for_languages("de", "en", shots=few_shot_from(train_pairs))
    example = encode_example(fmt, tokenizer, pair)        # prompt ids (BOS ...), target ids (... EOS)
    seq = build_sequence(example, max_len=256, truncate="drop", pad_id=tokenizer.pad_id)
    targets, target_mask = shift_targets(seq.tokens, seq.loss_mask, max_offset=4)

The prompt is the research code's: an instruction line, zero or all few-shot lines
`"de: {src}; en: {tgt}\\n"`, then the query `"de: {src}; en: "` (`prompt_format` reads the
few-shot pool from a training file). A translation is one line: decoding stops at
`translation_stop_ids` (the one stop rule) and `hypothesis_text` keeps the first line.

The prompt is encoded as one string, with BOS exactly when the tokenizer's `add_bos` says
(`prompt_bos`, the one BOS rule; `encode_prompts` for decoding); the target separately with EOS appended
(`<|end_of_text|>` for Llama 3), so the loss covers exactly the target tokens and the EOS. Rows
are right-padded with `pad_id`.

Shapes: T row length (max_len or a bucket), J = max_offset (offsets 1..J).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from gptk_jax.data.wmt import DataError, Pair, PathLike, read_parallel_text

TRUNCATE_POLICIES = ("error", "drop", "truncate_target")


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Prompt format
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """Instruction line, few-shot lines and the query line of a translation prompt.

    `shots` are pairs in the prompt's own direction; the research code used a fixed pool of five
    or none (`few_shot_from` picks such a pool deterministically from a training file).
    """
    instruction: str = "Translate from de to en\n"
    shot_template: str = "de: {src}; en: {tgt}\n"
    query_template: str = "de: {src}; en: "
    shots: tuple = ()
    target_prefix: str = ""   # put before the target text when it is encoded (see for_languages)

    def __post_init__(self):
        object.__setattr__(self, "shots", tuple(Pair(*s) if not isinstance(s, Pair) else s
                                                for s in self.shots))
        _check_template("shot_template", self.shot_template, {"src", "tgt"})
        _check_template("query_template", self.query_template, {"src"})
        for i, shot in enumerate(self.shots):
            if not (isinstance(shot.src, str) and isinstance(shot.tgt, str)):
                raise TypeError(f"shot {i} must hold two strings, got {shot!r}")

    @classmethod
    def for_languages(cls, src_lang: str = "de", tgt_lang: str = "en",
                      shots: Iterable[Pair] = (), space_with_target: bool = False
                      ) -> "PromptFormat":
        """The research format. `space_with_target`: the prompt ends at `en:` and the space goes
        with the target (` {tgt}`), as byte-level BPE tokenizers (GPT-2 style, SmolLM2) split
        text: they attach a space to the word after it, so a prompt ending in a bare space is an
        unusual boundary after which such models mostly emit a newline. Tiktoken's Llama 3
        pattern also attaches spaces to words; the research code used the trailing space."""
        query = f"{src_lang}: {{src}}; {tgt_lang}:" + ("" if space_with_target else " ")
        return cls(instruction=f"Translate from {src_lang} to {tgt_lang}\n",
                   shot_template=f"{src_lang}: {{src}}; {tgt_lang}: {{tgt}}\n",
                   query_template=query, shots=tuple(shots),
                   target_prefix=" " if space_with_target else "")

    def with_shots(self, shots: Iterable[Pair]) -> "PromptFormat":
        return dataclasses.replace(self, shots=tuple(shots))

    @property
    def num_shots(self) -> int:
        return len(self.shots)

    def prompt_text(self, src: str) -> str:
        """The whole prompt for source `src` (the target follows it directly)."""
        shot_lines = "".join(self.shot_template.format(src=s.src, tgt=s.tgt) for s in self.shots)
        return self.instruction + shot_lines + self.query_template.format(src=src)

    def target_text(self, tgt: str) -> str:
        """What is encoded as the target after the prompt."""
        return self.target_prefix + tgt


def _check_template(name: str, template: str, fields: set) -> None:
    import string
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if used != fields:
        raise DataError(f"{name} {template!r} must use exactly the fields {sorted(fields)}, "
                        f"uses {sorted(used)}")


def few_shot_from(pairs: Iterable[Pair], n: int = 5, *, max_chars: int = 160,
                  min_chars: int = 1) -> tuple[Pair, ...]:
    """The first `n` distinct pairs whose sides both have `min_chars..max_chars` characters.

    Deterministic for a given file, so the pool is fixed without copying WMT text into the
    repository; pairs holding a line break are skipped (they would break the line format).
    """
    chosen: list[Pair] = []
    seen = set()
    for pair in pairs:
        src, tgt = pair.src.strip(), pair.tgt.strip()
        if any(c in src + tgt for c in "\n\r\x85\u2028\u2029"):
            continue
        if not all(min_chars <= len(s) <= max_chars for s in (src, tgt)):
            continue
        if (src, tgt) in seen:
            continue
        seen.add((src, tgt))
        chosen.append(Pair(src, tgt))
        if len(chosen) == n:
            return tuple(chosen)
    raise DataError(f"only {len(chosen)} pairs have both sides within {min_chars}..{max_chars} "
                    f"characters; {n} few-shot pairs were asked for")


def prompt_format(src_lang: str = "de", tgt_lang: str = "en", shots: int = 0,
                  space_with_target: bool = False,
                  shots_from: Optional[PathLike] = None) -> PromptFormat:
    """The research format with `shots` few-shot lines picked by `few_shot_from` from the
    training pairs at PREFIX `shots_from` (PREFIX.{src_lang} / PREFIX.{tgt_lang}; needed only
    when shots > 0; gptk_jax.data.testsets.news_commentary(data_root) is the usual pool)."""
    pool = ()
    if shots:
        if shots_from is None:
            raise DataError(f"{shots} few-shot lines need a training file to take them from "
                            f"(shots_from=PREFIX)")
        pool = few_shot_from(read_parallel_text(shots_from, src_lang, tgt_lang).pairs, shots)
    return PromptFormat.for_languages(src_lang, tgt_lang, shots=pool,
                                      space_with_target=space_with_target)


# --------------------------------------------------------------------------------------------
# One prompt format per run: what distillation, training, evaluation and the demo record
# --------------------------------------------------------------------------------------------

PROMPT_RECORD_KEYS = ("instruction", "shot_template", "query_template", "target_prefix",
                      "shots", "shots_sha256", "bos", "stop")
STOP_RULE = "stop ids + whitespace-only newline tokens; first line kept"


def prompt_bos(tokenizer, bos: Optional[bool] = None) -> bool:
    """The one BOS rule: `bos` when given (a CLI's --bos/--no-bos), else the tokenizer's own
    `add_bos` (GGUF add_bos_token, HF tokenizer_config.json, Llama 3: always)."""
    return bool(getattr(tokenizer, "add_bos", True) if bos is None else bos)


def encode_prompts(fmt: PromptFormat, tokenizer, sources: Sequence[str],
                   bos: Optional[bool] = None) -> list[list[int]]:
    """The prompt ids of each source under `fmt` and the one BOS rule (`prompt_bos`): what
    training rows start with, and what distillation, evaluation and the demo decode from."""
    texts = [fmt.prompt_text(s) for s in sources]
    add = prompt_bos(tokenizer, bos)
    if hasattr(tokenizer, "encode_batch"):
        return [list(ids) for ids in tokenizer.encode_batch(texts, bos=add)]
    return [list(tokenizer.encode(t, bos=add)) for t in texts]


def prompt_record(fmt: PromptFormat, tokenizer=None, bos: Optional[bool] = None) -> dict:
    """What identifies a prompt format (template, shots, BOS, stop rule) as a JSON object;
    distillation, training (heads.json), evaluation and the demo record it, and
    `compare_prompt_records` names what differs between two runs. The shots are recorded by
    count and a sha256 of their text (no WMT text is copied into records)."""
    import hashlib
    shots_text = "".join(f"{s.src}\t{s.tgt}\n" for s in fmt.shots)
    return {"instruction": fmt.instruction, "shot_template": fmt.shot_template,
            "query_template": fmt.query_template, "target_prefix": fmt.target_prefix,
            "shots": fmt.num_shots,
            "shots_sha256": hashlib.sha256(shots_text.encode("utf-8")).hexdigest()[:16],
            "bos": prompt_bos(tokenizer, bos) if tokenizer is not None or bos is not None
            else None,
            "stop": STOP_RULE}


def describe_prompt_record(record: dict) -> str:
    """One line: '2 shots (sha 1a2b...), no BOS, query 'de: {src}; en:', target prefix ' ''."""
    bos = {True: "BOS", False: "no BOS", None: "BOS unknown"}[record.get("bos")]
    return (f"{record.get('shots')} shots (sha {record.get('shots_sha256')}), {bos}, "
            f"query {record.get('query_template')!r}, target prefix "
            f"{record.get('target_prefix')!r}")


def compare_prompt_records(used: dict, recorded: Optional[dict], *, used_by: str,
                           recorded_by: str) -> Optional[str]:
    """None when `recorded` is missing or agrees with `used` on every key; else a warning that
    names both formats and the keys that differ (drafts trained on one prompt format and
    decoded with another start from text the drafter never saw: low acceptance)."""
    if not recorded:
        return None
    differ = [k for k in PROMPT_RECORD_KEYS
              if k in recorded and recorded[k] is not None and used.get(k) is not None
              and recorded[k] != used.get(k)]
    if not differ:
        return None
    return (f"warning: prompt format differs in {', '.join(differ)}: {used_by} uses "
            f"[{describe_prompt_record(used)}], {recorded_by} recorded "
            f"[{describe_prompt_record(recorded)}]")


# --------------------------------------------------------------------------------------------
# Where a translation ends
# --------------------------------------------------------------------------------------------

def translation_stop_ids(tokenizer) -> list[int]:
    """The one stop rule of translation: the tokenizer's stop ids plus every token that is only
    whitespace holding a newline (the end of the `de: ...; en: ...` line). A token with text
    before its newline (".\\n") does not stop: decoders leave the stop token out of their output,
    so that text would be lost; `hypothesis_text` cuts at the newline instead."""
    newline = set()
    for i in range(tokenizer.vocab_size):
        try:
            text = tokenizer.decode([i])
        except Exception:  # special or unused ids some tokenizers cannot decode alone
            continue
        if "\n" in text and not text.strip():
            newline.add(i)
    return sorted(set(tokenizer.stop_ids) | newline)


def hypothesis_text(tokenizer, ids: Sequence[int]) -> str:
    """The translation in generated ids: their first line, stripped."""
    return tokenizer.decode(list(ids)).split("\n")[0].strip()


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized pair: `prompt_ids` (BOS first iff `prompt_bos`), `target_ids` end with EOS."""
    prompt_ids: tuple
    target_ids: tuple
    pair: Optional[Pair] = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def encode_example(fmt: PromptFormat, tokenizer: TokenizerLike, pair: Pair) -> Example:
    prompt_ids = tokenizer.encode(fmt.prompt_text(pair.src), bos=prompt_bos(tokenizer))
    target_ids = tokenizer.encode(fmt.target_text(pair.tgt), eos=True)
    return Example(tuple(prompt_ids), tuple(target_ids), pair)


def encode_examples(fmt: PromptFormat, tokenizer: TokenizerLike,
                    pairs: Sequence[Pair]) -> list[Example]:
    """`encode_example` over many pairs, through `tokenizer.encode_batch` where it exists."""
    if not hasattr(tokenizer, "encode_batch"):
        return [encode_example(fmt, tokenizer, p) for p in pairs]
    prompts = encode_prompts(fmt, tokenizer, [p.src for p in pairs])
    targets = tokenizer.encode_batch([fmt.target_text(p.tgt) for p in pairs], eos=True)
    return [Example(tuple(a), tuple(b), p) for a, b, p in zip(prompts, targets, pairs)]


class LengthDecision(NamedTuple):
    """`status`: 'ok', 'truncated' (target cut, EOS lost), 'too_long' or 'prompt_too_long'."""
    status: str
    target_len: int          # target tokens kept (0 when dropped)


def fit_length(prompt_len: int, target_len: int, max_len: int, truncate: str) -> LengthDecision:
    """What `truncate` does with a row of `prompt_len + target_len` tokens when `max_len` is the limit."""
    if truncate not in TRUNCATE_POLICIES:
        raise DataError(f"truncate must be one of {TRUNCATE_POLICIES}, got {truncate!r}")
    if prompt_len + target_len <= max_len:
        return LengthDecision("ok", target_len)
    if truncate == "error":
        raise DataError(f"example of {prompt_len} prompt + {target_len} target tokens exceeds "
                        f"max_len={max_len}")
    if truncate == "drop":
        return LengthDecision("too_long", 0)
    if prompt_len >= max_len:             # not even one target token would fit
        return LengthDecision("prompt_too_long", 0)
    return LengthDecision("truncated", max_len - prompt_len)


class TokenSequence(NamedTuple):
    """One row: tokens [T] int32, loss_mask [T] bool (target tokens incl. EOS), positions [T]
    int32 (0..T-1, pads included: they are masked), token_mask [T] bool (real tokens)."""
    tokens: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    token_mask: np.ndarray


def build_sequence(example: Example, max_len: int, truncate: str = "error",
                   pad_id: Optional[int] = None) -> Optional[TokenSequence]:
    """Prompt + target as one row of at most `max_len` tokens (right-padded to `max_len` with
    `pad_id` when given). Returns None when `truncate` drops the example."""
    decision = fit_length(len(example.prompt_ids), len(example.target_ids), max_len, truncate)
    if decision.status in ("too_long", "prompt_too_long"):
        return None
    ids = example.prompt_ids + example.target_ids[:decision.target_len]
    length = len(ids) if pad_id is None else max_len
    tokens = np.full((length,), 0 if pad_id is None else pad_id, np.int32)
    tokens[:len(ids)] = ids
    loss_mask = np.zeros((length,), bool)
    loss_mask[len(example.prompt_ids):len(ids)] = True
    token_mask = np.zeros((length,), bool)
    token_mask[:len(ids)] = True
    return TokenSequence(tokens, loss_mask, np.arange(length, dtype=np.int32), token_mask)


def shift_targets(tokens, loss_mask, max_offset: int, fill_id: int = 0):
    """Targets of every offset k = 1..max_offset for every predicting position t.

    tokens, loss_mask [..., T] -> targets [..., T, J] int32, target_mask [..., T, J] bool with
    targets[..., t, k-1] = tokens[..., t+k] and target_mask[..., t, k-1] = (t+k < T and
    loss_mask[..., t+k]); positions past the end hold `fill_id`.
    """
    tokens = np.asarray(tokens)
    loss_mask = np.asarray(loss_mask, bool)
    if tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} differ")
    if max_offset < 1:
        raise ValueError(f"max_offset must be >= 1, got {max_offset}")
    length = tokens.shape[-1]
    targets = np.full(tokens.shape + (max_offset,), fill_id, np.int32)
    target_mask = np.zeros(tokens.shape + (max_offset,), bool)
    for k in range(1, min(max_offset, length - 1) + 1):
        targets[..., :length - k, k - 1] = tokens[..., k:]
        target_mask[..., :length - k, k - 1] = loss_mask[..., k:]
    return targets, target_mask
