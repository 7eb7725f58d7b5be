"""Base config of MTP head training; every experiment config overrides fields of this one.

Paths are relative to the repository root (resolved at run time) unless absolute. Run with
    python -m gptk_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value]
"""

import ml_collections
from ml_collections import config_dict

WMT = "../shared/data/wmt14-de-en"


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # 'random-tiny': a tiny random trunk with a byte tokenizer written into
    # WORKDIR/random-tiny-trunk (tests, smoke runs).
    config.trunk_checkpoint = ".cache/models/smollm2-135m"  # converted folder (python -m convert)
    config.trunk_dtype = "float32"          # compute dtype of the frozen trunk
    config.seed = 0                         # head init, dropout and data shuffle

    # The MTP head: the fields of gptk_jax.heads.HeadConfig (see docs/design.md).
    head = config.head = ml_collections.ConfigDict()
    head.kind = "linear"                    # 'lstm' | 'poma' | 'linear'
    head.k = 3                              # tokens per decoding step (trunk + k-1 drafts)
    head.offsets = config_dict.placeholder(tuple)  # trained offsets; None: (2, ..., k)
    head.draft_vocab = config_dict.placeholder(tuple)  # decoding only: draft argmax over these ids
    head.dtype = "float32"                  # head compute dtype
    head.param_dtype = "float32"            # head parameter dtype
    head.lstm_layers = 2                    # LSTM: stacked layers (hidden width = trunk width)
    head.lstm_dropout = 0.1                 # LSTM: dropout between layers (training only)
    head.lstm_vocab_projection = "trunk"    # LSTM: 'trunk' (frozen norm + unembed) | 'own' Dense
    head.lstm_step_inputs = "teacher"       # LSTM: steps 2..k read 'teacher' tokens | 'argmax'
    head.lstm_first_input = "next_token"    # LSTM: step-2 input 'next_token' | 'own_argmax'
    head.poma_max_positions = 2048          # PoMa: rows of each position matrix
    head.poma_position_init = "zeros"       # PoMa: 'zeros' | 'normal'
    head.poma_position_init_std = 0.02      # PoMa: std of 'normal'
    head.poma_norm_init = "trunk"           # PoMa: head norms start as 'trunk' final norm | 'ones'

    data = config.data = ml_collections.ConfigDict()
    data.train_prefixes = (f"{WMT}/train/europarl-v7.first20k",  # PREFIX.{src,tgt}_lang files,
                           f"{WMT}/train/news-commentary.first10k")  # line-aligned, in order
    # Optional, one per prefix: files replacing PREFIX.tgt_lang line by line (the trunk's own
    # translations from `python -m gptk_jax.distill`).
    data.train_target_files = ()            # (): the references
    data.src_lang = "de"                    # source language suffix
    data.tgt_lang = "en"                    # target language suffix
    data.max_train_pairs = config_dict.placeholder(int)  # first N pairs over all prefixes; None: all
    data.max_len = 256                      # longest row in tokens (prompt + target)
    data.truncate = "drop"                  # longer rows: 'drop' | 'truncate_target' | 'error'
    data.bucket_lengths = ()                # row lengths to pad to (fewer pads); (): max_len
    data.shots = 0                          # few-shot pairs in every prompt
    data.shots_prefix = f"{WMT}/train/news-commentary.first10k"  # where few-shot pairs come from
    data.space_with_target = False          # prompt ends 'en:', target ' {tgt}' (byte-level BPE
                                            # models such as SmolLM2); False: 'en: ' + '{tgt}'

    data.eval_prefix = f"{WMT}/newstest2013"  # evaluation set ('' : no evaluation)
    data.eval_max_sentences = 500           # first N evaluation pairs; None: all 3000

    loss = config.loss = ml_collections.ConfigDict()
    loss.targets = "gold"                   # 'gold' reference tokens | 'trunk_argmax' (the trunk's
                                            # own token at each position: self-distillation)
    loss.offset_weights = config_dict.placeholder(tuple)  # one weight per offset; None: all 1
    loss.first_target_tokens_only = False   # True: supervise only the last prompt token, so
                                            # offsets 1..k cover the first k target tokens (seed)
    loss.positions_per_row = config_dict.placeholder(int)  # logits per row; None: from the data
    loss.argmax_chunk = 64                  # positions per chunk for the trunk's argmax (memory)
    loss.position_chunk = 64                # linear/PoMa: pack the supervised positions and project
                                            # this many at a time, skipping padding; 0: per row

    opt = config.optimizer = ml_collections.ConfigDict()
    opt.name = "adamw"                      # 'adamw' (decoupled decay) | 'adam_l2' (seed: coupled)
    opt.learning_rate = 1e-3                # peak learning rate
    opt.schedule = "cosine"                 # 'cosine' (to end fraction) | 'constant'
    opt.warmup_steps = 100                  # linear warm-up from 0
    opt.end_learning_rate_fraction = 0.0    # cosine ends at learning_rate * this
    opt.weight_decay = 0.0                  # decoupled (adamw) or L2 added to grads (adam_l2)
    opt.b1 = 0.9                            # Adam beta1
    opt.b2 = 0.999                          # Adam beta2
    opt.eps = 1e-8                          # Adam epsilon
    opt.grad_clip_norm = 1.0                # global-norm clipping; 0: off

    train = config.training = ml_collections.ConfigDict()
    train.global_batch_size = 16            # rows per step over all devices and processes
    train.num_epochs = 1.0                  # passes over the training rows (if num_train_steps None)
    train.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs
    train.log_every_steps = 10              # console / metrics.jsonl / TensorBoard
    train.eval_every_steps = 500            # 0: evaluate at the end only
    train.eval_at_start = True              # evaluate the untrained heads first (a baseline)
    train.checkpoint_every_steps = 500      # 0: only at the end and on SIGTERM
    train.max_checkpoints_to_keep = 3       # older checkpoints are deleted

    par = config.parallel = ml_collections.ConfigDict()
    par.mode = "mesh"                       # 'mesh' (jit, NamedSharding) | 'pmap'
    par.model_axis_size = 1                 # mesh: trunk sharded over a 'model' axis this size

    feat = config.features = ml_collections.ConfigDict()
    feat.cache = False                      # compute the frozen trunk's features once, memory-map
    feat.cache_dir = config_dict.placeholder(str)  # None: WORKDIR/feature_cache
    feat.dtype = "float32"                  # stored hidden states: 'float32' | 'bfloat16'
    feat.build_batch_size = 16              # rows per trunk call while building
    return config
