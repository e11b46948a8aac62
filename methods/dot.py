"""``kd_dot``: Zhao, Song, Cui, Qiu, Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023, on vanilla KD.

DOT changes the optimiser, not the loss: the task loss (CE) and the distillation loss get momentum buffers of their
own, the distillation's heavier (``momentum + δ``) and the task's lighter (``momentum − δ``), so that SGD follows the
distillation gradient more steadily where the two disagree. Official code megvii-research/mdistiller @ a08d46f:
``mdistiller/engine/dot.py`` (``DistillationOrientedTrainer``, ``dot``), ``mdistiller/engine/trainer.py`` (``DOT``:
``loss_kd.backward(retain_graph=True); step_kd(); loss_ce.backward(); step()``), ``mdistiller/engine/cfg.py``
(``CFG.SOLVER.DOT.DELTA = 0.075``), ``configs/cifar100/dot/*.yaml`` (KD under mdistiller's KD config, δ 0.075 for
every pair).

The update of one parameter p with task gradient g_t and distillation gradient g_k (``dot``), lr and weight decay wd
from the run's optimiser, m = its momentum, m_t = m − δ, m_k = m + δ, m̄ = (m_t + m_k)/2:

- task: d = g_t + wd·p; its buffer starts at d, then b_t ← m_t·b_t + d where p also has a distillation gradient
  this step, else b_t ← m̄·b_t + d; p ← p − lr·b_t;
- distillation: its buffer starts at g_k (no weight decay), then b_k ← m_k·b_k + g_k where p also has a task
  gradient, else b_k ← m̄·b_k + g_k + wd·p; p ← p − lr·b_k.

The task is the ``ce`` term; every other term is distillation. The loss is KD's (``methods/kd.py``: its presets,
official 0.1 CE + 0.9 KD_4 as mdistiller's KD config). Both buffers live in this method's state dict, so a run
resumes with them; the run's own SGD buffers stay unused. DOT's update has no Nesterov form: a recipe with Nesterov
momentum fails the run with that reason. Costs a second backward pass per step (through the graph kept by the first).

On several processes (kdbench.distributed) both gradients, the distillation's and the task's, are averaged over the
processes before DOT's update (``average_gradients``), as mdistiller's DataParallel sums every replica's into both.
"""

from __future__ import annotations

from typing import Any

import torch

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import NON_NEGATIVE
from kdbench.methods.kd import IMAGENET_PAIRS, KD

TASK_TERM = "ce"
DELTA = 0.075  # mdistiller CFG.SOLVER.DOT.DELTA, the same in every CIFAR-100 DOT config
IMAGENET_DELTA = 0.09  # its ImageNet DOT configs


class DistillationOrientedStep:
    """The DOT update (mdistiller ``DistillationOrientedTrainer``) for any host method: put it before the host in
    the bases. Option ``delta``: the momentum gap."""

    # its first backward keeps the graph for the second (retain_graph), which a compiled backward that donated its
    # buffers cannot give (torch._functorch's donated buffers): the second fails
    breaks_compile = ("its two backward passes through one graph (the first with retain_graph) fail in a compiled "
                      "student's backward, which frees its saved buffers after the first")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.task_momentum: dict[int, torch.Tensor] = {}
        self.kd_momentum: dict[int, torch.Tensor] = {}

    def get_extra_state(self) -> Any:
        return {"task": self.task_momentum, "kd": self.kd_momentum}

    def set_extra_state(self, state: Any) -> None:
        """Copies, as ``load_state_dict`` copies parameters: the loaded state is not updated in place."""
        self.task_momentum, self.kd_momentum = ({k: v.clone() for k, v in state[which].items()}
                                                for which in ("task", "kd"))

    def step(self, optimizer: torch.optim.Optimizer, terms: dict[str, torch.Tensor]) -> None:
        task = terms.get(TASK_TERM)
        distill = [value for name, value in terms.items() if name != TASK_TERM]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

        def gradients(loss, retain: bool) -> list[torch.Tensor | None]:
            if loss is None:
                return [None] * len(params)
            return list(torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True))

        kd_grads = dict(zip(map(id, params), gradients(sum(distill) if distill else None, True)))
        task_grads = dict(zip(map(id, params), gradients(task, False)))
        self.average_gradients([*kd_grads.values(), *task_grads.values()])
        index = 0  # a parameter's position in the optimiser: the key of its buffers in the state dict
        with torch.no_grad():
            for group in optimizer.param_groups:
                if group.get("nesterov"):
                    raise KdbenchError(f"{self.name}: DOT's update has no Nesterov form; train it with a recipe "
                                       "without Nesterov momentum")
                momentum, delta = group["momentum"], self.ctx.options["delta"]
                if not 0 <= momentum - delta <= momentum + delta < 1:
                    raise KdbenchError(f"{self.name}: momentum {momentum:g} ± delta {delta:g} leaves [0, 1); "
                                       f"choose a smaller delta")
                rates = (momentum - delta, momentum + delta, momentum)  # task, distillation, one of the two
                trained = [p for p in group["params"] if p.requires_grad]
                self._update(trained, index, [task_grads[id(p)] for p in trained],
                             [kd_grads[id(p)] for p in trained], rates, group["lr"], group["weight_decay"])
                index += len(trained)

    def _update(self, params, first, task_grads, kd_grads, rates, lr: float, weight_decay: float) -> None:
        """``dot``'s two passes over one param group: the task's update of every parameter first, then the
        distillation's, as the official optimiser applies them."""
        m_task, m_kd, m_mean = rates
        for k, (p, grad, other) in enumerate(zip(params, task_grads, kd_grads), first):
            if grad is None:
                continue
            d = grad.add(p, alpha=weight_decay) if weight_decay else grad
            buf = self.task_momentum.get(k)
            if buf is None:
                buf = self.task_momentum[k] = d.clone()
            else:
                buf.mul_(m_task if other is not None else m_mean).add_(d)
            p.add_(buf, alpha=-lr)
        for k, (p, grad, other) in enumerate(zip(params, kd_grads, task_grads), first):
            if grad is None:
                continue
            buf = self.kd_momentum.get(k)
            if buf is None:
                buf = self.kd_momentum[k] = grad.clone()
            elif other is not None:
                buf.mul_(m_kd).add_(grad)
            else:
                buf.mul_(m_mean).add_(grad.add(p, alpha=weight_decay) if weight_decay else grad)
            p.add_(buf, alpha=-lr)


@register_method
class KDDOT(DistillationOrientedStep, KD):
    """Vanilla KD trained by DOT (Zhao et al., ICCV 2023; mdistiller ``engine/dot.py``)."""

    name = "kd_dot"
    defaults = {**KD.defaults, "delta": DELTA}
    ranges = {**KD.ranges, "delta": NON_NEGATIVE}

    @classmethod
    def pair_defaults(cls, teacher, student):
        """KD's ImageNet values, and δ 0.09 there (``configs/imagenet/{r34_r18,r50_mv1}/dot.yaml``)."""
        imagenet = (teacher, student) in IMAGENET_PAIRS
        return {**KD.pair_defaults(teacher, student), **({"delta": IMAGENET_DELTA} if imagenet else {})}
