"""WMT readers, translation prompts and MTP training batches (see each module's docstring)."""

from gptk_jax.data.pipeline import (BatchIterator, FilterStats, PipelineConfig, TranslationPipeline,
                                    prepare_rows)
from gptk_jax.data.prompts import (TRUNCATE_POLICIES, Example, LengthDecision, PromptFormat,
                                   TokenSequence, build_sequence, encode_example, encode_examples,
                                   few_shot_from, fit_length, shift_targets)
from gptk_jax.data.wmt import (DataError, Pair, ReadResult, SgmlSegment, read_hf_wmt14,
                               read_parallel_text, read_sacrebleu, read_sgml, read_sgml_segments,
                               read_text_lines)
