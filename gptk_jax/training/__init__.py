"""Training MTP heads on a frozen trunk (entry point: `python -m gptk_jax.train`).

    from gptk_jax.training import train_and_evaluate
    train_and_evaluate(config, workdir)       # config: a ConfigDict from configs/*.py

Files: settings (ConfigDict -> frozen dataclasses), inputs (trunk + data pipelines), step (loss,
train_step, eval_step), optim (optax), state (TrainState + checkpoints), sharding (mesh / pmap),
features (trunk-feature cache), trunk_argmax (the trunk's chunked argmax targets), metrics (host
summaries + writers), trainer (the loop).
"""

from gptk_jax.training.metrics import acceptance_estimate, read_metrics
from gptk_jax.training.settings import ConfigKeyError, RunSettings, TrainingError
from gptk_jax.training.trainer import train_and_evaluate

__all__ = ["train_and_evaluate", "acceptance_estimate", "read_metrics", "RunSettings",
           "TrainingError", "ConfigKeyError"]
