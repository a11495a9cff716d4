"""Training losses, selectable and combinable with weights (``[loss]`` in the config).

All terms work on normalised states: the regression on the body slots (transformer) or the
pooled body (MLP); cosine, InfoNCE and the variance hinge on the pooled prediction.

- regression: SmoothL1 or MSE — what the seed used; alone it regresses towards the mean;
- cosine: 1 − cos(pred, target);
- InfoNCE: each prediction must pick its own body among the batch's bodies — the objective
  instance-level retrieval needs (under DDP every rank scores the whole global batch, so the
  negatives are the global batch's, as in one process, in every form); in the pooled space or
  in the evaluate stage's canonical space (``loss.space``);
- with ``loss.lexical_weight``, InfoNCE ranks by the BM25 hybrid's score rather than the
  cosine alone (``codejepa.predict.lexical``);
- with ``loss.probe_weight``, InfoNCE's query is the prediction mixed with the probe view
  (:func:`probe_mix`), as evaluate's ``+probe`` rows use it;
- variance hinge (VICReg / V-JEPA): mean over dimensions of relu(γ − std of predictions over
  the batch — the global batch under DDP), against collapse to a prototype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from codejepa.predict.config import LossConfig
from codejepa.predict.lexical import lexical_offset


def regression(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.regression == "smoothl1":
        e = F.smooth_l1_loss(pred, target, beta=cfg.smoothl1_beta, reduction="none")
    else:
        e = (pred - target) ** 2
    e = e.mean(-1)
    if mask is not None:
        m = mask.to(e.dtype)
        return (e * m).sum() / m.sum().clamp(min=1.0)
    return e.mean()


def infonce(pred: torch.Tensor, target: torch.Tensor, temperature: float, symmetric: bool = False,
            offset: torch.Tensor | None = None) -> torch.Tensor:
    """Prediction i's own body is ``target`` row i. ``offset`` (batch × batch, cosine units) is
    added to the cosines before the softmax: the BM25 term of the hybrid score
    (``loss.lexical_weight``)."""
    cos = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T
    logits = (cos if offset is None else cos + offset) / temperature
    labels = torch.arange(len(pred), device=pred.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:  # each body must also pick its own prediction among the batch's predictions
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def probe_mix(pred: torch.Tensor, view: torch.Tensor, weight: float) -> torch.Tensor:
    """unit((1 − w)·unit(pred) + w·unit(view)) scaled by |pred|: evaluate's ``+probe`` mix
    (``codejepa.evaluate.probe.mix_probe``) in the space InfoNCE scores in. The view is a
    constant: the gradient reaches the prediction only."""
    m = (1.0 - weight) * F.normalize(pred, dim=-1) + weight * F.normalize(view.detach().to(pred.dtype), dim=-1)
    return F.normalize(m, dim=-1) * pred.norm(dim=-1, keepdim=True)


def variance_hinge(pred: torch.Tensor, gamma: float) -> torch.Tensor:
    if len(pred) < 2:
        return pred.sum() * 0.0
    std = torch.sqrt(pred.var(dim=0) + 1e-4)
    return F.relu(gamma - std).mean()


def gathered(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every DDP rank's rows of ``t`` (equal counts), in rank order, with this rank's own rows
    kept in the autograd graph; and the number of ranks. ``t`` itself, 1, outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return t, 1
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts), len(parts)


def ranks_share(term: torch.Tensor, world: int) -> torch.Tensor:
    """A term every rank computes over the whole global batch, its gradient scaled by ``world``
    (its value unchanged): each rank's gradient reaches only its own rows, and DDP averages
    the ranks' gradients, so the sum over ranks must come out whole."""
    return term if world == 1 else term + (world - 1) * (term - term.detach())


def compute_loss(out: dict[str, torch.Tensor], pooled_target: torch.Tensor,
                 slot_target: torch.Tensor | None, cfg: LossConfig,
                 to_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 lexical: tuple[torch.Tensor, torch.Tensor] | None = None, *, gather: bool = False,
                 view: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled terms, and each term (detached) for the log. ``to_score``
    maps pooled vectors into the space InfoNCE ranks in (``loss.space``; the pooled space when
    None): the regression stays in the pooled space, where the prediction lives. ``lexical``
    (the batch's standardised BM25 matrix and the reference bodies, unit rows in the scoring
    space; the BM25 matrix of the whole global batch under DDP) adds ``loss.lexical_weight``'s
    BM25 offset to InfoNCE. ``gather`` (DDP training steps, every rank at once): InfoNCE and
    the variance hinge see every rank's share of the batch, so that N ranks take the step one
    process takes with the whole batch. ``view``: the batch's probe views in the pooled space,
    mixed into InfoNCE's query at ``loss.probe_weight`` (the regression and the other terms read
    the prediction alone)."""
    pred = out["pooled"].float()
    parts: dict[str, torch.Tensor] = {}
    total = pred.new_zeros(())
    if cfg.regression != "none" and cfg.regression_weight:
        if "slots" in out and slot_target is not None and cfg.regression_on == "auto":
            r = regression(out["slots"].float(), slot_target, cfg)
        else:
            r = regression(pred, pooled_target, cfg)
        parts["regression"] = r
        total = total + cfg.regression_weight * r
    if cfg.cosine_weight:
        c = (1 - F.cosine_similarity(pred, pooled_target, dim=-1)).mean()
        parts["cosine"] = c
        total = total + cfg.cosine_weight * c
    if cfg.infonce_weight:
        score = to_score or (lambda x: x)
        sp, st = score(pred), score(pooled_target)
        if view is not None and cfg.probe_weight:
            sp = probe_mix(sp, score(view.float()), cfg.probe_weight)
        world = 1
        if gather:
            (sp, world), (st, _) = gathered(sp), gathered(st)
        offset = None
        if lexical is not None and cfg.lexical_weight:
            offset = lexical_offset(sp, lexical[0], lexical[1], cfg.lexical_weight)
        n = ranks_share(infonce(sp, st, cfg.temperature, cfg.symmetric, offset), world)
        parts["infonce"] = n
        total = total + cfg.infonce_weight * n
    if cfg.variance_weight:
        everyone, world = gathered(pred) if gather else (pred, 1)
        v = ranks_share(variance_hinge(everyone, cfg.variance_gamma), world)
        parts["variance"] = v
        total = total + cfg.variance_weight * v
    return total, {k: v.detach() for k, v in parts.items()}
