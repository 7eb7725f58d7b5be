"""Self-distillation: the trunk's own greedy translations of training sources, the targets heads
train on (entry point: `python -m gptk_jax.distill`).

Files: run (`distill`: one run, from its arguments to the record it returns), record (the output
file's record: plan, fingerprints, resume checks, the reader training uses), generate
(translating sources chunk by chunk with the exact decoder), shards (N runs on other hosts or
devices and their merge).
"""

from gptk_jax.distillation.record import (DistillError, DistillPlan, distillation_status,
                                          read_record, target_lines_check)

__all__ = ["DistillError", "DistillPlan", "distillation_status", "read_record",
           "target_lines_check"]
