"""Optimizers of the head params: AdamW (decoupled weight decay) or the seed's Adam with coupled
L2, each with optional global-norm clipping and a warm-up + cosine or constant schedule.

    adamw:   chain(clip, adamw(lr_schedule, weight_decay))
    adam_l2: chain(clip, add_decayed_weights(wd), adam(lr_schedule))
             = torch.optim.Adam(weight_decay=wd): the decay is added to the gradient before the
             moments (what the original research code ran; faithful configs use it)

The optimizer is built for the head params only (the trunk is an argument of the step, never a
leaf here), so there are no moments for frozen weights.
"""

from __future__ import annotations

import optax

from gptk_jax.training.settings import OptimizerSettings


def learning_rate_schedule(opt: OptimizerSettings, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant or cosine decay to
    `learning_rate * end_learning_rate_fraction` at `num_steps`."""
    lr, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.constant_schedule(lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=lr * opt.end_learning_rate_fraction)


def make_optimizer(opt: OptimizerSettings, num_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, num_steps)
    clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 \
        else optax.identity()
    if opt.name == "adamw":
        return optax.chain(clip, optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                             weight_decay=opt.weight_decay))
    decay = optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay > 0 \
        else optax.identity()
    return optax.chain(clip, decay, optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps))
