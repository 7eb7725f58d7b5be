"""Training MTP heads on a frozen trunk (entry point: `python -m gptk_jax.train`).

    from gptk_jax.training import train_and_evaluate
    train_and_evaluate(config, workdir)       # config: a ConfigDict from configs/*.py

Files: settings (ConfigDict -> frozen dataclasses), inputs (trunk + data pipelines), step (loss,
train_step, eval_step), chunked_loss / soft_targets / vocab (the losses and the draft
vocabulary), draft_metrics (validation on held-out distilled rows), optim (optax), state
(TrainState + checkpoints), sharding (mesh / pmap), metrics (host summaries + writers),
run_record (resume refuses a changed run), loop + trainer (the loop). The trunk-feature cache is
gptk_jax/features/, the distilled targets come from gptk_jax/distillation/.
"""

from gptk_jax.training.metrics import acceptance_estimate, read_metrics
from gptk_jax.training.settings import ConfigKeyError, RunSettings, TrainingError
from gptk_jax.training.trainer import train_and_evaluate

__all__ = ["train_and_evaluate", "acceptance_estimate", "read_metrics", "RunSettings",
           "TrainingError", "ConfigKeyError"]
