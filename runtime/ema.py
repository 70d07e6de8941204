"""Exponential moving average of a model's parameters (fp32 shadow copies, replicated on every rank)."""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay}: must be in [0, 1)")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for n, t in sd.items():
            self.shadow[n].copy_(t)

    def model_state(self, model: torch.nn.Module) -> dict:
        """The model's state dict (buffers included) with the averaged parameters: load it into a fresh copy."""
        sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
              for k, v in model.state_dict().items()}
        return {**sd, **{k: v.cpu() for k, v in self.shadow.items()}}
