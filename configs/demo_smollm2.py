"""`make demo`'s heads (python -m gptk_jax.demo): the results protocol (configs/results_smollm2.py:
linear heads, W = 4, the trunk's own argmax as targets, a softmax over a draft vocabulary) cut
to what a demo affords on 2 CPU cores: the trunk's own 2-shot translations of
the first DEMO_ROWS newstest2013 lines (the test set's domain; ../shared/data/distilled), a few
hundred steps, a short validation on held-out newstest2013 lines 2701-2764 at the end.

    python -m gptk_jax.train --config configs/demo_smollm2.py --workdir runs/demo/heads-run

The demo sets only the trunk folder (its --model-dir) and the workdir; everything it trains with
is here. The trunk-feature cache goes under the workdir (None: WORKDIR/feature_cache).
"""

from configs import results_smollm2, smollm2

DEMO_ROWS = 800       # newstest2013 lines 1-800: ~33k target positions, ~90k trunk tokens
DEMO_STEPS = 400      # batch 8: 4 passes over the rows


def get_config():
    config = results_smollm2.get_config("linear")
    data = config.data
    data.train_prefixes = (smollm2.NEWSTEST2013,)
    data.train_target_files = (f"{smollm2.DISTILLED}/newstest2013.2shot.smollm2.en",)
    data.train_line_ranges = ((1, DEMO_ROWS),)
    data.eval_max_sentences = 64                 # newstest2013 2701-2764 (held out)
    data.eval_reference = False                  # the distilled rows only
    config.loss.draft_vocab_size = 2048          # 800 rows hold ~2,600 distinct target tokens
    config.features.cache_dir = None             # WORKDIR/feature_cache
    config.optimizer.learning_rate = 3e-3        # the results protocol's tuned linear lr
    config.optimizer.warmup_steps = 40
    config.training.num_train_steps = DEMO_STEPS
    config.training.eval_every_steps = 0         # validation at the end only
    config.training.eval_at_start = False
    config.training.checkpoint_every_steps = 100
    config.training.log_every_steps = 50
    return config
