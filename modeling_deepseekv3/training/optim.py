"""AdamW with the moments stored in BF16 and everything else in fp32 (DeepSeek-V3 report §3.3.3).

DeepSeek keeps master weights and gradients in fp32 but tracks AdamW's first and second moments in BF16,
halving the optimizer's memory "without observable performance degradation". torch's own AdamW stores the
moments in the parameter's dtype, so this small optimizer does the same update in fp32 (bias-corrected,
decoupled weight decay, the same operation order as ``torch.optim.AdamW``) and only rounds the moments when
storing them. With ``moment_dtype=torch.float32`` it is torch's AdamW (tested to be bit-equal).
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdamWBF16Moments"]


class AdamWBF16Moments(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moment_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(
                f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=self.moment_dtype, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float()
                exp_avg_sq = state["exp_avg_sq"].float()
                p32 = p.float()
                p32.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p32.addcdiv_(exp_avg, denom, value=-step_size)
                p.copy_(p32)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss
