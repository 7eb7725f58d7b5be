"""What the SmolLM2-135M configs share (they differ only in the head family and its recipe):
the trunk converted into .cache/models/smollm2-135m by `make demo` or `python -m convert --format
gguf ...`, trained on the trunk's own translations (self-distillation: what verification
accepts) with the prompt format they were made with, the trunk-feature cache on (the trunk runs
once, not every epoch), batches small enough for a few CPU cores.

Data (../shared/data/distilled/README.md): SmolLM2's own greedy 2-shot translations of
  newstest2013 lines 1-2700                 training
  News Commentary first10k lines 3-3840     training (lines 1-2 are the few-shot pairs: empty)
  newstest2013 lines 2701-3000              validation, never trained on: scored against the
                                            reference text (split 'eval') and against the
                                            trunk's own translations (split 'eval_distilled':
                                            per-offset / chain acceptance, tau estimate)
Tune on the validation rows only, never on newstest2014 (the test set).

Prompt format: the one the distillation used and `make results` / `gptk_jax.evaluate` decode
with: instruction 'Translate from de to en', the first 2 News Commentary pairs as shots, query
'de: {src}; en:' with the space going with the target (SmolLM2's byte-level BPE attaches it to
the next word), no BOS (SmolLM2's tokenizer adds none). Prompts are ~250-300 tokens: max_len 512.
"""

from configs import base
from gptk_jax.data.root import resolve_data_root

DISTILLED = f"{resolve_data_root()}/distilled"      # absolute, from the working directory
NEWSTEST2013 = f"{base.WMT}/newstest2013"
NEWS_COMMENTARY = f"{base.WMT}/train/news-commentary.first10k"


def apply(config):
    config.trunk_checkpoint = ".cache/models/smollm2-135m"
    data = config.data
    data.train_prefixes = (NEWSTEST2013, NEWS_COMMENTARY)
    data.train_target_files = (f"{DISTILLED}/newstest2013.2shot.smollm2.en",
                               f"{DISTILLED}/news-commentary.first10k.2shot.smollm2.en")
    data.train_line_ranges = ((1, 2700), (3, 3840))
    data.shots = 2                                  # from data.shots_prefix: News Commentary
    data.shots_prefix = NEWS_COMMENTARY
    data.space_with_target = True
    data.max_len = 512                              # 2-shot prompt + up to 96 target tokens
    data.bucket_lengths = (320, 384, 448, 512)      # rows are ~280-400 tokens: less padding
    data.eval_prefix = NEWSTEST2013
    data.eval_line_range = (2701, 3000)             # held out from training
    data.eval_max_sentences = None                  # all 300
    data.eval_target_file = f"{DISTILLED}/newstest2013.2shot.smollm2.en"
    config.features.cache = True
    config.training.global_batch_size = 16
    config.training.eval_every_steps = 200
    config.training.checkpoint_every_steps = 100
    return config
