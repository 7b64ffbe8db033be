"""What a network's output head means: each maps (x_t, head, ab) to the noise eps and the clean x_0.

With x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, one of eps and x_0 gives the other. The networks
return their raw heads and know nothing of this.
"""
from __future__ import annotations

import torch

from diffusion.schedules import expand


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


class Parameterisation:
    """Base: ``eps(x_t, head, ab)``; ``ab`` is alpha-bar already shaped like ``x_t``."""

    name = ""

    def eps(self, x_t: torch.Tensor, head, ab: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a parameterisation defines eps()")


class SigmoidAB(Parameterisation):
    """Stage B's A/B head (released decoder): eps = (x_t - a) / (sigmoid(b) (1 - 2 margin) + margin)."""

    name = "sigmoid_ab"

    def __init__(self, margin: float = 1e-3):
        self.margin = margin

    def eps(self, x_t, head, ab):
        a, b = head
        return (x_t - a) / (b.sigmoid() * (1 - 2 * self.margin) + self.margin)


class AbsAB(Parameterisation):
    """Stage C's A/B head (paper Sec. 3.2): eps = (x_t - A) / (|1 - B| + 1e-5)."""

    name = "abs_ab"

    def eps(self, x_t, head, ab):
        a, b = head
        return (x_t - a) / ((1 - b).abs() + 1e-5)


class Eps(Parameterisation):
    """The head is eps itself."""

    name = "eps"

    def eps(self, x_t, head, ab):
        return head


class V(Parameterisation):
    """The head is v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022): eps = sqrt(1 - ab) x_t + sqrt(ab) v.

    Near t = 1 eps is then x_t up to a small correction, so a network error costs little in x_0
    (a direct eps head amplifies it by sqrt((1 - ab) / ab), 100x at t = 1).
    """

    name = "v"

    def eps(self, x_t, head, ab):
        return (1 - ab).sqrt() * x_t + ab.sqrt() * head


class X0(Parameterisation):
    """The head is the clean sample x_0."""

    name = "x0"

    def eps(self, x_t, head, ab):
        return eps_from_x0(x_t, head, ab)


PARAMETERISATIONS = {p.name: p for p in (SigmoidAB, AbsAB, Eps, V, X0)}


def parameterisation(name: str) -> Parameterisation:
    if name not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {name!r} (known: {sorted(PARAMETERISATIONS)})")
    return PARAMETERISATIONS[name]()


__all__ = ["Parameterisation", "SigmoidAB", "AbsAB", "Eps", "V", "X0", "PARAMETERISATIONS", "parameterisation",
           "x0_from_eps", "eps_from_x0", "expand"]
