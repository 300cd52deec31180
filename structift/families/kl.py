"""KL divergence between structift families, registered with ``torch.distributions``.

``torch.distributions.kl_divergence(p, q)`` for two `structift.ExpFamily` instances on
the same sample space returns the Bregman form

    KL(p ‖ q) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩,

differentiable in both θ_p and θ_q. Torch's generic exponential-family KL detaches p's
parameters; this registration is more specific, so it takes precedence for our families.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions.kl import register_kl

from structift.families.base import ExpFamily

__all__: list[str] = []


@register_kl(ExpFamily, ExpFamily)
def _kl_expfamily_expfamily(p: ExpFamily, q: ExpFamily) -> Tensor:
    return p.kl(q)
