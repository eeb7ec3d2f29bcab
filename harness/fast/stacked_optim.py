"""torch's SGD, Adam/AdamW and RMSprop updates on stacked parameters, one learning rate per member.

Every member of a stack takes the same steps in the same order, so each step is torch's own
single-tensor code on the whole stack, with the scalars it would use; only the learning rate is a
per-member vector. Where torch multiplies by a scalar learning rate inside one kernel, the stack
uses the op that rounds the same way (``addcmul`` for ``add(alpha=-lr)``, ``add((v * a) / d)`` for
``addcdiv(value=v)``). That equivalence is a property of the kernels, not a promise of torch's: so
``agrees`` checks it against torch's own optimizer on this machine before a stack relies on it, and
``harness.fast.batched`` steps each member's torch optimizer instead where it does not hold.
"""
from __future__ import annotations

import torch

from ..registry import build_optimizer

KINDS = ("sgd", "adam", "adamw", "rmsprop")
# torch's options this code follows; any other value (amsgrad, nesterov, ...) is not stacked.
FOLLOWED = {"sgd": {"dampening": 0, "nesterov": False, "maximize": False},
            "adam": {"amsgrad": False, "maximize": False}, "adamw": {"amsgrad": False, "maximize": False},
            "rmsprop": {"centered": False, "maximize": False}}


class StackedOptimizer:
    def __init__(self, kind: str, params: list[torch.Tensor], lrs: list[float], weight_decay: float = 0.0,
                 momentum: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"no stacked {kind}; stacked optimizers: {', '.join(KINDS)}")
        # The settings torch's optimizer takes for this config, its defaults included (AdamW's
        # weight decay is 0.01 unless one is given, as harness.registry builds it).
        defaults = build_optimizer(kind, [torch.zeros(1, requires_grad=True)], 1.0, weight_decay, momentum).defaults
        if any(defaults.get(key) != value for key, value in FOLLOWED[kind].items()):
            raise ValueError(f"stacked {kind} follows torch's {FOLLOWED[kind]} only")
        self.kind, self.params = kind, params
        self.weight_decay, self.momentum = defaults["weight_decay"], defaults.get("momentum", 0)
        self.betas, self.eps, self.alpha = defaults.get("betas"), defaults.get("eps"), defaults.get("alpha")
        self.lrs = list(lrs)
        self.steps = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]

    def _per_member(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        # A Python float becomes the parameter's dtype inside torch's kernels: the same cast here.
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """One step; ``grads`` for parameters that are views of a larger stack (else their .grad)."""
        self.steps += 1
        for param, grad, state in zip(self.params, grads or [p.grad for p in self.params], self.state):
            if grad is None:
                continue
            if self.kind == "sgd":
                self._sgd(param, grad, state)
            elif self.kind == "rmsprop":
                self._rmsprop(param, grad, state)
            else:
                self._adam(param, grad, state)

    def _sgd(self, param, grad, state) -> None:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad, alpha=1)
            grad = buf
        param.addcmul_(grad, self._per_member(self.lrs, param), value=-1)  # as add_(grad, alpha=-lr)

    def _adam(self, param, grad, state) -> None:
        beta1, beta2 = self.betas
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            # torch counts steps in a float32 tensor and reads it back: the same float here.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        if self.weight_decay != 0:
            if self.kind == "adamw":
                param.mul_(self._per_member([1 - lr * self.weight_decay for lr in self.lrs], param))
            else:
                grad = grad.add(param, alpha=self.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        step_size = self._per_member([-(lr / bias_correction1) for lr in self.lrs], param)
        param.add_((step_size * exp_avg) / denom)  # as addcdiv_(exp_avg, denom, value=-step_size)

    def _rmsprop(self, param, grad, state) -> None:
        if not state:
            state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if self.momentum > 0:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        square_avg = state["square_avg"]
        square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
        avg = square_avg.sqrt().add_(self.eps)
        if self.momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(self.momentum).addcdiv_(grad, avg)
            param.addcmul_(buf, self._per_member(self.lrs, param), value=-1)  # as add_(buf, alpha=-lr)
        else:
            param.add_((self._per_member([-lr for lr in self.lrs], param) * grad) / avg)  # as addcdiv_(value=-lr)

    def keep(self, rows: list[int], params: list[torch.Tensor]) -> None:
        """Only the members at ``rows`` go on; ``params`` are the stack's new (smaller) parameters."""
        index = torch.tensor(rows, dtype=torch.long)
        self.params = params
        self.lrs = [self.lrs[r] for r in rows]
        for state in self.state:
            for key, value in state.items():
                if key != "step":
                    state[key] = value.index_select(0, index.to(value.device))


def agrees(kind: str, shapes: list[torch.Size], lrs: list[float], weight_decay: float, momentum: float,
           device: str = "cpu", steps: int = 3) -> bool:
    """Whether the stacked update gives, on this machine, exactly what torch's optimizer gives each
    member alone: random parameters and gradients shaped like the stack's, a few steps."""
    generator = torch.Generator().manual_seed(0)
    k = len(lrs)
    stacked = [(torch.randn(k, *s, generator=generator) * 3).to(device) for s in shapes]
    alone = [[p[i].clone().requires_grad_() for p in stacked] for i in range(k)]
    optimizers = [build_optimizer(kind, member, lr, weight_decay, momentum) for member, lr in zip(alone, lrs)]
    stack = StackedOptimizer(kind, stacked, lrs, weight_decay, momentum)
    for _ in range(steps):
        grads = [(torch.randn(k, *s, generator=generator) * 0.1).to(device) for s in shapes]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        stack.step()
        for i, (member, optimizer) in enumerate(zip(alone, optimizers)):
            for p, g in zip(member, grads):
                p.grad = g[i].clone()
            optimizer.step()
    return all(torch.equal(stacked[j][i], alone[i][j]) for i in range(k) for j in range(len(shapes)))
