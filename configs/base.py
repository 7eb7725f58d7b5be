"""Base config of MTP head training; every experiment config overrides fields of this one.

Every field is listed here with its default and what it means. The sections data / loss /
optimizer / training / parallel / features are the settings dataclasses of
gptk_jax/training/settings.py, which validate them; their defaults are the dataclasses' (written
out here so a reader sees them; tests/test_experiment_configs.py checks the two agree), and this
file also sets what those cannot know: the trunk, the head and the data paths.
Relative paths are relative to the working directory (run from the repository root); the data
folder is decided here, once, by gptk_jax.data.root ($GPTK_DATA, else ../shared/data). Run with
    python -m gptk_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value]
"""

import ml_collections
from ml_collections import config_dict

from gptk_jax.data.root import resolve_data_root

WMT = f"{resolve_data_root()}/wmt14-de-en"   # absolute, from the working directory at import


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # 'random-tiny': a tiny random trunk with a byte tokenizer written into
    # WORKDIR/random-tiny-trunk (tests, smoke runs).
    config.trunk_checkpoint = ".cache/models/smollm2-135m"  # converted folder (python -m convert)
    config.trunk_dtype = "float32"          # compute dtype of the frozen trunk
    config.seed = 0                         # head init, dropout and data shuffle

    # The MTP head: the fields of gptk_jax.heads.HeadConfig (see docs/design.md).
    head = config.head = ml_collections.ConfigDict()
    head.kind = "linear"                    # 'lstm' | 'poma' | 'linear' | 'eagle'
    head.k = 3                              # tokens per decoding step (trunk + k-1 drafts)
    head.offsets = config_dict.placeholder(tuple)  # trained offsets; None: (2, ..., k)
    head.dtype = "float32"                  # head compute dtype
    head.param_dtype = "float32"            # head parameter dtype
    head.recipe = "default"                 # 'default' (ours) | 'seed' (the original research
                                            # code's LSTM / PoMa: gptk_jax/heads/config.py)
    head.lstm_layers = 2                    # LSTM: stacked layers (hidden width = trunk width)
    head.lstm_dropout = 0.1                 # LSTM: dropout between layers (training only)
    head.lstm_train_on_drafts = False       # LSTM recipe conditioned: train on its own drafts
    head.lstm_condition_inputs = False      # LSTM recipe conditioned: norm(h_t) in every step input
    head.poma_max_positions = 2048          # PoMa: rows of each position matrix

    # data: gptk_jax/training/settings.py DataSettings (validated there)
    data = config.data = ml_collections.ConfigDict()
    # data.train_prefixes (a path, no default; set below or by the experiment config):
    # PREFIX.{src_lang,tgt_lang}: line-aligned parallel text, read in order
    data.train_target_files = ()  # Optional, one per prefix: files replacing PREFIX.tgt_lang line
                                  # by line (the trunk's own translations from `python -m
                                  # gptk_jax.distill`); (): the references
    data.train_line_ranges = ()  # Optional, one per prefix: (first, last) 1-based line numbers of
                                 # PREFIX.src_lang (and of its target file) to read, inclusive;
                                 # last None: to the end. (): every line. E.g. ((1, 2700), (1,
                                 # None)): newstest2013's lines 1-2700, all of News Commentary
    data.src_lang = 'de'  # source language suffix
    data.tgt_lang = 'en'  # target language suffix
    data.max_train_pairs = config_dict.placeholder(int)  # first N pairs over all prefixes; None:
                                                         # all
    data.max_len = 256  # longest row in tokens (prompt + target)
    data.truncate = 'drop'  # longer rows: 'drop' | 'truncate_target' | 'error'
    data.bucket_lengths = ()  # row lengths to pad to (fewer pads); (): max_len
    data.shots = 0  # few-shot pairs in every prompt
    # data.shots_prefix (a path, no default; set below or by the experiment config): where few-shot
    # pairs come from (PREFIX as above; read only when shots > 0)
    data.space_with_target = False  # prompt ends 'en:', target ' {tgt}' (byte-level BPE models
                                    # such as SmolLM2); False: 'en: ' + '{tgt}'
    # data.eval_prefix (a path, no default; set below or by the experiment config): evaluation set;
    # '': none
    data.eval_max_sentences = 500  # first N evaluation pairs; None: all
    data.eval_line_range = ()  # (first, last) 1-based lines of eval_prefix to evaluate on,
                               # inclusive (last None: to the end), before eval_max_sentences; ():
                               # from the first line. Keep it apart from the training lines when
                               # eval_prefix is also a train prefix
    data.eval_target_file = ''  # The trunk's own translations of eval_prefix's sources (`python
                                # -m gptk_jax.distill`, line-aligned): when set, evaluation also
                                # scores the heads on these rows (same lines, distilled targets):
                                # teacher-forced acceptance per offset, chain acceptance and the
                                # tau estimate (training/draft_metrics.py), split
                                # 'eval_distilled'; '': reference text only
    data.eval_reference = True  # False: no split 'eval' against the reference text (with
                                # eval_target_file: the distilled rows only, one feature-cache
                                # build less)

    # loss: gptk_jax/training/settings.py LossSettings (validated there)
    loss = config.loss = ml_collections.ConfigDict()
    loss.targets = 'gold'  # 'gold' reference tokens | 'trunk_argmax' (the trunk's own token at
                           # each position: self-distillation) | 'trunk_soft' (soft cross-entropy
                           # against the trunk's whole next-token distribution at t+o-1; its
                           # argmax for top-1 and the LSTM's inputs)
    loss.offset_weights = config_dict.placeholder(tuple)  # one loss weight per trained offset;
                                                          # None: all 1
    loss.offset_weight_decay = config_dict.placeholder(float)  # weight decay**(o-1) for offset o
                                                               # (e.g. 0.8);
    loss.first_target_tokens_only = False  # True: supervise only the last prompt token, so
                                           # offsets 1..k cover the first k target tokens (seed)
    loss.positions_per_row = config_dict.placeholder(int)  # logits per row; None: from the data
    loss.argmax_chunk = 64  # positions per chunk for the trunk's argmax (memory)
    loss.position_chunk = 64  # linear/PoMa: pack the supervised positions and project this many
                              # at a time, skipping padding; 0: per row
    loss.draft_vocab_size = config_dict.placeholder(int)  # The heads' softmax over the N most
                                                          # frequent target tokens of the training
                                                          # rows only (EAGLE-3 / FR-Spec;
                                                          # training/vocab.py): targets outside
                                                          # them are left out of the loss and
                                                          # counted (train/eval `oov_*`), and
                                                          # count as misses in top-1 / acceptance.
                                                          # The ids travel with the exported heads
                                                          # (draft_vocab.json). None or 0: the
                                                          # whole vocabulary. Hard targets only
                                                          # ('gold' / 'trunk_argmax').

    # optimizer: gptk_jax/training/settings.py OptimizerSettings (validated there)
    optimizer = config.optimizer = ml_collections.ConfigDict()
    optimizer.name = 'adamw'  # 'adamw' (decoupled decay) | 'adam_l2' (seed: coupled)
    optimizer.learning_rate = 0.001  # peak learning rate
    optimizer.schedule = 'cosine'  # 'cosine' (to end fraction) | 'constant'
    optimizer.warmup_steps = 100  # linear warm-up from 0
    optimizer.end_learning_rate_fraction = 0.0  # cosine ends at learning_rate * this
    optimizer.weight_decay = 0.0  # decoupled (adamw) or L2 added to grads (adam_l2)
    optimizer.b1 = 0.9  # Adam beta1
    optimizer.b2 = 0.999  # Adam beta2
    optimizer.eps = 1e-08  # Adam epsilon
    optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0: off

    # training: gptk_jax/training/settings.py LoopSettings (validated there)
    training = config.training = ml_collections.ConfigDict()
    training.global_batch_size = 16  # rows per step over all devices and processes
    training.num_epochs = 1.0  # passes over the training rows (unless num_train_steps is set)
    training.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs
    training.log_every_steps = 10  # console / metrics.jsonl / TensorBoard
    training.eval_every_steps = 500  # 0: evaluate at the end only
    training.eval_at_start = True  # evaluate the untrained heads first (a baseline)
    training.checkpoint_every_steps = 500  # 0: only at the end and on SIGTERM
    training.max_checkpoints_to_keep = 3  # older checkpoints are deleted
    training.allow_changed_resume = False  # Rerun of a workdir whose checkpoint was trained with
                                           # other optimizer / step-count / loss settings: False
                                           # refuses it (naming the keys); True resumes with the
                                           # new ones and records the change (WORKDIR/run.json
                                           # "resumes", heads.json). Model, head, data never
                                           # change.

    # parallel: gptk_jax/training/settings.py ParallelSettings (validated there)
    parallel = config.parallel = ml_collections.ConfigDict()
    parallel.mode = 'mesh'  # 'mesh' (jit, NamedSharding) | 'pmap'
    parallel.model_axis_size = 1  # mesh: trunk sharded over a 'model' axis this size

    # features: gptk_jax/training/settings.py FeatureSettings (validated there)
    features = config.features = ml_collections.ConfigDict()
    features.cache = False  # compute the frozen trunk's features once, memory-map
    features.cache_dir = config_dict.placeholder(str)  # None: WORKDIR/feature_cache
    features.dtype = 'float32'  # stored hidden states: 'float32' | 'bfloat16'
    features.build_batch_size = 16  # rows per trunk call while building

    # the paths of the data section
    data.train_prefixes = (f"{WMT}/train/europarl-v7.first20k",  # PREFIX.{src,tgt}_lang files,
                           f"{WMT}/train/news-commentary.first10k")  # line-aligned, in order
    data.shots_prefix = f"{WMT}/train/news-commentary.first10k"  # where few-shot pairs come from
    data.eval_prefix = f"{WMT}/newstest2013"  # evaluation set ('' : no evaluation)
    return config
