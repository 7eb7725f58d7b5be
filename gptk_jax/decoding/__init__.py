"""Decoding: one engine for greedy, draft-and-verify and continuous batching.

    inputs.py   prompt padding / bucketing, stop ids (host), `is_stop` (the one stop check)
    loop.py     the jitted state machine: `prefill_state`, `decode_step`, `run`, `refill`;
                the `Drafter` interface and `NoDrafter` (greedy = W 1, no drafts)
    engine.py   `Decoder`: device params, stop ids, drafter, its own compiled executables;
                `generate` (a static batch) and `generate_continuous` (refilled slots)
    results.py  GenerationResult / MTPResult / ContinuousResult, built in one place
    heads.py    trained heads as a drafter (`head_drafter`, `HeadDrafter`), draft vocabulary
    lookup.py, oracle.py   prompt-lookup drafting; oracle / random / repeat bounds
    acceptance.py          which drafts are accepted; τ and per-offset statistics
    greedy.py, mtp.py, continuous.py   one-call functions over a fresh Decoder
"""

from gptk_jax.decoding.engine import Decoder, DecodingError
from gptk_jax.decoding.heads import HeadDrafter, head_drafter
from gptk_jax.decoding.inputs import PromptBatch, pad_prompts, stop_id_array
from gptk_jax.decoding.loop import Drafter, NoDrafter
from gptk_jax.decoding.results import ContinuousResult, GenerationResult, MTPResult

__all__ = ["ContinuousResult", "Decoder", "DecodingError", "Drafter", "GenerationResult",
           "HeadDrafter", "MTPResult", "NoDrafter", "PromptBatch", "head_drafter", "pad_prompts",
           "stop_id_array"]
