"""Continuous batching as one call: B decoding slots serve a queue of prompts, and a slot whose
row finished takes the next prompt at once (iteration-level scheduling: Orca; vLLM's continuous
batching), so a batch no longer runs until its slowest row is done with the other slots idle.

    queue of prompt ids (first come, first served)
      --prefill: the first B prompts--> DecodeState [B slots]
      repeat:
        --run (jitted lax.while_loop of loop.decode_step): until some row is done (all of them
          once the queue is empty)
        host: harvest the finished rows (tokens, per-row logs); free their slots
        --refill (jitted): prefill the next prompts [R,P] and scatter them into free slots
      --> ContinuousResult (per prompt, in input order)

The scheduler is `Decoder.generate_continuous` (decoding/engine.py); the step is the static
decoder's (decoding/loop.py), so greedy (W = 1, no drafter) and draft-and-verify share it and
are compared like for like. Every prompt gets the tokens it gets alone (greedy decoding's): a
refill overwrites everything of its slot. Drafters must keep per-row state in their state, not
in their variables: HeadDrafter, LookupDrafter, RandomDrafter and RepeatDrafter qualify;
OracleDrafter (per-row references in its variables) does not.

`continuous_generate` builds a fresh Decoder per call (it compiles every call); hold one
`Decoder` to serve several queues.

Letters: B slots (batch), Q queued prompts, R rows refilled at once, P padded prompt length,
W tokens per verify step, M max new tokens. (K is kept for kv heads.)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.inputs import DEFAULT_BUCKET
from gptk_jax.decoding.loop import Drafter
from gptk_jax.decoding.results import ContinuousResult
from gptk_jax.decoding.width import AutoWidth
from gptk_jax.llama.config import LlamaConfig


def continuous_generate(model_config: LlamaConfig, params: dict,
                        prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                        stop_ids: Iterable[int], pad_id: int, *, batch_size: int,
                        drafter: Optional[Drafter] = None, drafter_vars: Any = (),
                        tokens_per_step: Union[int, str, AutoWidth] = 1,
                        padding: str = "left", bucket: int = DEFAULT_BUCKET,
                        on_finished: Optional[Callable[[int], None]] = None,
                        verify_cost: Any = None) -> ContinuousResult:
    """Greedy continuation of every prompt through `batch_size` continuously refilled slots:
    greedy decoding (drafter None, W = 1) or draft-and-verify with `drafter`, W tokens per step
    ("auto": chosen per step by cost from `verify_cost` or a measurement, decoding/width.py).
    Same tokens per prompt as `greedy.greedy_generate`. `on_finished(n)` is called each time n
    more prompts are done (a progress bar's update)."""
    decoder = Decoder(model_config, params, stop_ids=stop_ids, pad_id=pad_id, drafter=drafter,
                      drafter_vars=drafter_vars, tokens_per_step=tokens_per_step,
                      verify_cost=verify_cost)
    return decoder.generate_continuous(prompt_ids, max_new_tokens, batch_size=batch_size,
                                       padding=padding, bucket=bucket, on_finished=on_finished)
