"""Small building blocks shared by every architecture: RMSNorm, SwiGLU MLP, causal short convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def swiglu_hidden(d_model: int, mult: float) -> int:
    """Hidden width of a SwiGLU MLP, rounded up to a multiple of 8."""
    return int(8 * ((mult * d_model + 7) // 8))


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class CausalShortConv(nn.Module):
    """Causal depthwise 1-D convolution of width w over the sequence: y_t = sum_{j<w} c_j * x_{t-j}.

    Per-channel (depthwise), so channels of different heads never mix. The recurrent state is the
    last ``w - 1`` inputs.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.normal_(self.weight, std=width ** -0.5)
        with torch.no_grad():  # start close to identity so memories see their input from step 0
            self.weight[:, 0, -1] += 1.0

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; state: [B, w-1, C] previous inputs (zeros at sequence start)."""
        b, t, c = x.shape
        if state is None:
            state = x.new_zeros(b, self.width - 1, c)
        xs = torch.cat([state, x], dim=1)  # [B, w-1+T, C]
        y = F.conv1d(xs.transpose(1, 2), self.weight, groups=c).transpose(1, 2)
        return y, xs[:, xs.shape[1] - (self.width - 1):]
