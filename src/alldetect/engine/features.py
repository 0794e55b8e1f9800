"""Pre-logit features: the input of a network's final linear layer, collected while it predicts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def classifier_of(model: nn.Module) -> nn.Linear:
    """The layer that turns features into logits: timm's get_classifier(), else the last linear layer."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RuntimeError(f"{type(model).__name__} has no linear classifier to take features from")
    return linears[-1]


class FeatureTap:
    """Within `with FeatureTap(model) as tap:`, every forward call's classifier input is kept; `tap.features(v)`
    averages each batch's `v` consecutive calls (its test-time views) into one row per image."""

    def __init__(self, model: nn.Module):
        self.head = classifier_of(model)
        self.calls: list[torch.Tensor] = []

    def __enter__(self) -> FeatureTap:
        self.handle = self.head.register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self.calls.append(args[0].detach().flatten(1).float().cpu())

    def features(self, views: int = 1) -> np.ndarray:
        if not self.calls:
            return np.zeros((0, self.head.in_features), np.float32)
        grouped = [torch.stack(self.calls[i:i + views]).mean(0) for i in range(0, len(self.calls), views)]
        return torch.cat(grouped).numpy()
