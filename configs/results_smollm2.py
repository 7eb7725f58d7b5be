"""The protocol of `make results` (docs/results.md): every drafter family on SmolLM2-135M trained
the same way on the trunk's own 2-shot translations (configs/smollm2.py: newstest2013 lines
1-2700 + News Commentary, validation on newstest2013 lines 2701-3000), W = 4 tokens per verify
step. Pick the family after a colon:

    python -m gptk_jax.train --config configs/results_smollm2.py:linear --workdir runs/results/linear
    python -m gptk_jax.train --config configs/results_smollm2.py:lstm   --workdir runs/results/lstm
    python -m gptk_jax.train --config configs/results_smollm2.py:poma   --workdir runs/results/poma

`bench/results.py` runs these, evaluates each on newstest2014 and writes the tables; it owns no
training setting. Every family shares one trunk-feature cache (same rows and fields: linear and
the conditioned LSTM read `hidden_normed`; PoMa reads `hidden` and gets its own).
"""

from configs import lstm_conditioned_smollm2_wmt14, poma_smollm2_wmt14
from configs import linear_smollm2_wmt14

FAMILIES = {
    "linear": linear_smollm2_wmt14,            # one projection per offset, frozen unembedding
    "lstm": lstm_conditioned_smollm2_wmt14,    # LSTM conditioned on the trunk's state
    "poma": poma_smollm2_wmt14,                # positional matrices (this project's recipe)
}


def get_config(family: str = "linear"):
    if family not in FAMILIES:
        raise ValueError(f"results_smollm2.py:{family}: unknown family; choose one of "
                         f"{sorted(FAMILIES)}")
    config = FAMILIES[family].get_config()
    config.head.k = 4                             # W: the trunk's token + 3 drafts
    config.head.offsets = (2, 3, 4)               # every draft offset trained
    if family == "poma":
        config.head.recipe = "default"            # frozen LM head (not the seed's recipe)
    config.loss.first_target_tokens_only = False  # every target position supervised
    config.loss.targets = "trunk_argmax"          # the trunk's own token: what verify accepts
    config.optimizer.warmup_steps = 30            # (lr, schedule, decay: the family config's)
    config.training.global_batch_size = 8         # rows per step (~40 target positions each)
    config.training.num_train_steps = 300         # 2,400 rows (~100k positions): what fits a
                                                  # 2-core CPU session beside the evaluation
    config.training.eval_every_steps = 100        # validation: newstest2013 2701-3000
    config.training.eval_at_start = False
    config.training.checkpoint_every_steps = 50
    config.features.cache_dir = "runs/results/feature_cache"   # shared by the families
    return config
