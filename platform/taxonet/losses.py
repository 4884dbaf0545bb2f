"""Losses: the taxonomy-aware multitask loss of Bjerge et al. 2023 and a differentiable variant.

``HierarchicalLoss(taxonomy, alpha, dependency)(logits, targets)`` returns ``{"loss": total, "ce": Σ_l CE_l,
"ce_<rank>": CE_l, "dependency": term}``; only ``"loss"`` is meant for ``backward()``, the parts are for logging.

    L = α · Σ_l CE(z_l, y_l) + (1 − α) · dependency

Cross-entropy per rank
    Mean over the samples whose label at that rank is specified (``targets[:, l] != UNSPECIFIED``); a sample
    labelled only down to family adds nothing to the species CE. A rank without any specified sample in the
    batch contributes 0 (never NaN), and its head stays in the autograd graph so DDP sees every parameter used.

Dependency term, ``dependency="paper"`` (the default, METHOD.md "Loss", the authors' code)
    For every adjacent pair of ranks (l−1, l), D_{l,i} = 1 when the argmax class at l is not a child of the argmax
    class at l−1, else 0; the term is Σ_{l≥1} mean_i (e^{D_{l,i}} − 1). Built from argmaxes it has no gradient: it
    only changes the loss value, which is what picks the best checkpoint (lowest validation loss).
    The authors' code SUMS over the batch, so the term's weight grows with the batch size; taxonet takes the MEAN
    (as the later B++ reimplementation does), so checkpoint selection does not depend on the batch size or on the
    number of data-parallel workers.

Dependency term, ``dependency="soft"`` (taxonet)
    Differentiable: for each adjacent pair, the probability mass the model puts on parent/child pairs the taxonomy
    forbids, Σ_{a,b} p_{l−1}(a) · p_l(b) · [b is not a child of a] (heads treated as independent), averaged over
    the batch and summed over pairs. Each pair's term lies in [0, 1]; it pushes the heads towards consistent
    distributions instead of only penalising the loss value.

``dependency="none"``: the term is 0 and L = α · Σ_l CE, so the gradients equal those of the paper variant.

Outlier exposure, ``outlier_weight=λ > 0`` (taxonet; off by default, which is the paper's loss)
    A sample labelled down to some rank but unspecified below it (known to family, species unspecified) is read as
    an insect *outside* the lower ranks' class lists — bycatch of a known family that is none of its modelled
    species. For every rank l ≥ 1 at which a sample is such an outlier (label unspecified at l, specified at the top
    rank), the loss adds λ times the cross-entropy from the uniform distribution over rank l's classes,
    −(1/K_l) Σ_k log softmax(z_l)_k, averaged over the outliers of the batch (Hendrycks et al. 2019, "Deep anomaly
    detection with outlier exposure"), summed over ranks:

        L = α · Σ_l CE_l + (1 − α) · dependency + λ · Σ_{l≥1} OE_l

    It teaches each head to spread, and so lower, its logits on insects that belong to none of its classes, which is
    what the per-class max-logit thresholds of ``taxonet.anomaly`` then flag as unsure: on synthetic insects it took
    unseen species of known families from 2-6% to 59-99% "unsure at species", by recipe and seed (docs/evaluation.md).
    The higher ranks' CE still trains on those samples. Use it only when partial labels mean "outside the list",
    not "not identified further": for a known species left unidentified, the term would teach the head to doubt its own class.

Unspecified labels and the dependency term: both variants look only at the predictions, never at the labels, so
they are computed over ALL samples of the batch, including partially labelled ones — an inconsistent prediction
chain is a flaw of the model whatever the sample's label.

Present ranks: ``logits`` may hold only some ranks (a single-task baseline has only the last rank). CE is summed
over the present ranks; the dependency term only over adjacent pairs that are both present (otherwise it is 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from taxonet.config import LossConfig
from taxonet.taxonomy import UNSPECIFIED, Taxonomy


class HierarchicalLoss(nn.Module):
    """α · Σ_l CE_l + (1 − α) · dependency term; see the module docstring for the exact definitions."""

    def __init__(self, taxonomy: Taxonomy, alpha: float = LossConfig.alpha, dependency: str = LossConfig.dependency,
                 outlier_weight: float = LossConfig.outlier_weight) -> None:
        super().__init__()
        settings = LossConfig(alpha=float(alpha), dependency=dependency, outlier_weight=float(outlier_weight))  # checks
        self.taxonomy = taxonomy
        self.alpha = settings.alpha
        self.dependency = settings.dependency
        self.outlier_weight = settings.outlier_weight
        # Buffers follow the module to the GPU with .to(device); not persistent, they are derived from the taxonomy.
        for level in range(1, taxonomy.depth):
            parent = torch.as_tensor(taxonomy.parent_table(level), dtype=torch.long)
            forbidden = torch.as_tensor(~taxonomy.allowed_mask(level), dtype=torch.float32)
            self.register_buffer(f"_parent_{level}", parent, persistent=False)
            self.register_buffer(f"_forbidden_{level}", forbidden, persistent=False)

    def extra_repr(self) -> str:
        text = f"ranks={list(self.taxonomy.ranks)}, alpha={self.alpha}, dependency={self.dependency!r}"
        return text + (f", outlier_weight={self.outlier_weight}" if self.outlier_weight else "")

    def forward(self, logits: Mapping[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits``: {rank: [N, n_rank]} for some or all ranks; ``targets``: int [N, depth], −1 = unspecified."""
        levels = self._check(logits, targets)
        targets = targets.long()
        parts: dict[str, torch.Tensor] = {}
        ce_total = None
        for level, rank in levels:
            ce = _masked_cross_entropy(logits[rank], targets[:, level])
            parts[f"ce_{rank}"] = ce
            ce_total = ce if ce_total is None else ce_total + ce
        dependency = self._dependency_term(logits, dict(levels))
        loss = self.alpha * ce_total + (1.0 - self.alpha) * dependency
        if not self.outlier_weight:
            return {"loss": loss, "ce": ce_total, **parts, "dependency": dependency}
        outlier = self._outlier_term(logits, targets, levels)
        loss = loss + self.outlier_weight * outlier
        return {"loss": loss, "ce": ce_total, **parts, "dependency": dependency, "outlier": outlier}

    # ------------------------------------------------------------------ internals
    def _check(self, logits: Mapping[str, torch.Tensor], targets: torch.Tensor) -> list[tuple[int, str]]:
        """Validate shapes (no device sync) and return the present (level, rank) pairs in taxonomy order."""
        taxonomy = self.taxonomy
        if not logits:
            raise ValueError("logits is empty: expected {rank: tensor} for at least one rank")
        unknown = [r for r in logits if r not in taxonomy.ranks]
        if unknown:
            raise ValueError(f"logits for unknown rank(s) {unknown}; ranks are {list(taxonomy.ranks)}")
        if targets.dim() != 2 or targets.shape[1] != taxonomy.depth:
            raise ValueError(f"targets must be [N, {taxonomy.depth}] (one column per rank {list(taxonomy.ranks)}), "
                             f"got shape {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
        levels = [(level, rank) for level, rank in enumerate(taxonomy.ranks) if rank in logits]
        for level, rank in levels:
            shape = tuple(logits[rank].shape)
            expected = (targets.shape[0], taxonomy.num_classes(level))
            if shape != expected:
                raise ValueError(f"logits[{rank!r}] has shape {shape}, expected {expected} (N, classes at {rank})")
        return levels

    def _outlier_term(self, logits: Mapping[str, torch.Tensor], targets: torch.Tensor,
                      levels: list[tuple[int, str]]) -> torch.Tensor:
        """Σ over ranks l ≥ 1 of the mean CE-to-uniform of rank l's outliers (0 where a batch has none)."""
        reference = logits[levels[0][1]]
        term = reference.new_zeros((), dtype=torch.float32)
        labelled = targets[:, 0] != UNSPECIFIED  # a sample with no label at all is not evidence of anything
        for level, rank in levels:
            if level == 0:
                continue
            outlier = (labelled & (targets[:, level] == UNSPECIFIED)).to(torch.float32)
            to_uniform = -torch.log_softmax(logits[rank].float(), dim=1).mean(dim=1)
            term = term + (to_uniform * outlier).sum() / outlier.sum().clamp(min=1.0)
        return term

    def _dependency_term(self, logits: Mapping[str, torch.Tensor], present: dict[int, str]) -> torch.Tensor:
        reference = next(iter(logits.values()))
        term = reference.new_zeros((), dtype=torch.float32)
        if self.dependency == "none":
            return term
        batch = reference.shape[0]
        for level in range(1, self.taxonomy.depth):
            if level not in present or level - 1 not in present:
                continue
            parent_logits, child_logits = logits[present[level - 1]], logits[present[level]]
            if self.dependency == "paper":
                with torch.no_grad():
                    parent_pred = parent_logits.argmax(dim=1)
                    child_pred = child_logits.argmax(dim=1)
                    # .to() is a no-op when the loss was moved with the model; it makes CPU-held logits (evaluation)
                    # and GPU logits both work whatever device the buffers are on.
                    parent_of = getattr(self, f"_parent_{level}").to(child_pred.device)
                    broken = (parent_of[child_pred] != parent_pred).float()
                    # e^D − 1 is 0 for a consistent pair and e − 1 for a broken one; mean over the batch.
                    term = term + torch.expm1(broken).sum() / max(batch, 1)
            else:  # soft: probability mass on forbidden (parent, child) pairs, in float32 even under autocast
                parent_prob = torch.softmax(parent_logits.float(), dim=1)
                child_prob = torch.softmax(child_logits.float(), dim=1)
                forbidden = getattr(self, f"_forbidden_{level}").to(parent_prob.device, parent_prob.dtype)
                mass = ((parent_prob @ forbidden) * child_prob).sum(dim=1)
                term = term + mass.sum() / max(batch, 1)
        return term


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over samples whose target is specified; 0 (not NaN) when none is, without a host/device sync."""
    summed = F.cross_entropy(logits.float(), target, ignore_index=UNSPECIFIED, reduction="sum")
    count = (target != UNSPECIFIED).sum().clamp(min=1)
    return summed / count


def build_loss(config: LossConfig, taxonomy: Taxonomy) -> HierarchicalLoss:
    """Loss from a ``LossConfig`` (``alpha``, ``dependency``, ``outlier_weight``)."""
    return HierarchicalLoss(taxonomy, alpha=config.alpha, dependency=config.dependency,
                            outlier_weight=config.outlier_weight)
