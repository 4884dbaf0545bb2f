"""HierarchicalLoss against hand-computed values: CE per rank, the paper's argmax term, the soft term, labels."""

from __future__ import annotations

import math

import pytest
import torch

from taxonet.config import LossConfig
from taxonet.losses import HierarchicalLoss, build_loss
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit

E = math.e


@pytest.fixture(scope="module")
def two_ranks() -> Taxonomy:
    # family 0 = Fa, 1 = Fb; species 0 = sa1 (Fa), 1 = sa2 (Fa), 2 = sb1 (Fb)
    return Taxonomy.from_rows([["Fa", "sa1"], ["Fa", "sa2"], ["Fb", "sb1"]], ranks=["family", "species"])


def hand_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two samples. 1: family argmax Fa, species argmax sa2 (a child of Fa): consistent.
    2: family argmax Fa, species argmax sb1 (a child of Fb): broken."""
    logits = {
        "family": torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True),
        "species": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, math.log(2.0)]], requires_grad=True),
    }
    targets = torch.tensor([[0, 1], [1, 2]])
    return logits, targets


# hand-computed: CE = logsumexp(z) − z[target]
CE_FAMILY = (math.log(1 + E**-2) + math.log(1 + E)) / 2  # sample 1: log(e²+1) − 2; sample 2: log(e+1) − 0
CE_SPECIES_1 = math.log(2 + E) - 1.0  # logsumexp(0, 1, 0) − 1
CE_SPECIES_2 = math.log(4.0) - math.log(2.0)  # logsumexp(0, 0, ln 2) − ln 2
CE_SPECIES = (CE_SPECIES_1 + CE_SPECIES_2) / 2
PAPER_TERM = ((E**0 - 1) + (E**1 - 1)) / 2  # mean of e^D − 1 with D = (0, 1)


def soft_mass(family: list[float], species: list[float]) -> float:
    """Σ_{a,b} p(a) p(b) over forbidden pairs of the two_ranks tree, written out by hand."""
    pf = [math.exp(v) / sum(math.exp(u) for u in family) for v in family]
    ps = [math.exp(v) / sum(math.exp(u) for u in species) for v in species]
    return pf[0] * ps[2] + pf[1] * (ps[0] + ps[1])


def test_paper_loss_matches_the_hand_computed_value(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    out = HierarchicalLoss(two_ranks, alpha=0.5, dependency="paper")(logits, targets)
    assert list(out) == ["loss", "ce", "ce_family", "ce_species", "dependency"]
    assert out["ce_family"].item() == pytest.approx(CE_FAMILY, rel=1e-6)
    assert out["ce_species"].item() == pytest.approx(CE_SPECIES, rel=1e-6)
    assert out["ce"].item() == pytest.approx(CE_FAMILY + CE_SPECIES, rel=1e-6)
    assert out["dependency"].item() == pytest.approx(PAPER_TERM, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * (CE_FAMILY + CE_SPECIES) + 0.5 * PAPER_TERM, rel=1e-6)
    # numbers, so a formula slip shared by test and code would still show
    assert out["loss"].item() == pytest.approx(1.100766, abs=1e-5)  # 0.5·(0.720095 + 0.622296) + 0.5·0.859141


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_weighs_ce_against_the_dependency_term(two_ranks: Taxonomy, alpha: float) -> None:
    logits, targets = hand_batch()
    out = HierarchicalLoss(two_ranks, alpha=alpha)(logits, targets)
    assert out["loss"].item() == pytest.approx(alpha * (CE_FAMILY + CE_SPECIES) + (1 - alpha) * PAPER_TERM, rel=1e-6)


def test_paper_term_has_no_gradient(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    HierarchicalLoss(two_ranks, dependency="paper")(logits, targets)["loss"].backward()
    paper_grads = {rank: t.grad.clone() for rank, t in logits.items()}
    logits, targets = hand_batch()
    out = HierarchicalLoss(two_ranks, dependency="none")(logits, targets)
    assert out["dependency"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.5 * (CE_FAMILY + CE_SPECIES), rel=1e-6)
    out["loss"].backward()
    for rank, t in logits.items():
        assert torch.allclose(t.grad, paper_grads[rank])


def test_paper_term_is_a_batch_mean_not_a_sum(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    loss = HierarchicalLoss(two_ranks)
    once = loss(logits, targets)["loss"].item()
    doubled = {rank: torch.cat([t, t]) for rank, t in logits.items()}
    twice = loss(doubled, torch.cat([targets, targets]))["loss"].item()
    assert twice == pytest.approx(once, rel=1e-6)  # the authors' batch sum would have grown the term


def test_paper_term_sums_over_adjacent_rank_pairs() -> None:
    demo = Taxonomy.demo()
    idx = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    diptera, vespula = demo.index("order", "Diptera"), demo.index("species", "Vespula vulgaris")

    def one_hot(chain: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {rank: torch.nn.functional.one_hot(torch.tensor([c]), n).float() * 5
                for rank, c, n in zip(demo.ranks, chain, demo.sizes)}

    loss = HierarchicalLoss(demo)
    target = torch.tensor([idx])
    assert loss(one_hot(idx), target)["dependency"].item() == 0.0
    assert loss(one_hot((diptera, idx[1], idx[2])), target)["dependency"].item() == pytest.approx(E - 1)
    assert loss(one_hot((idx[0], idx[1], vespula)), target)["dependency"].item() == pytest.approx(E - 1)
    assert loss(one_hot((diptera, idx[1], vespula)), target)["dependency"].item() == pytest.approx(2 * (E - 1))


def test_soft_term_is_the_forbidden_probability_mass_and_differentiable(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    out = HierarchicalLoss(two_ranks, dependency="soft")(logits, targets)
    expected = (soft_mass([2.0, 0.0], [0.0, 1.0, 0.0]) + soft_mass([1.0, 0.0], [0.0, 0.0, math.log(2.0)])) / 2
    assert out["dependency"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * (CE_FAMILY + CE_SPECIES) + 0.5 * expected, rel=1e-6)
    assert out["dependency"].requires_grad
    out["dependency"].backward()
    assert logits["family"].grad.abs().sum() > 0 and logits["species"].grad.abs().sum() > 0
    # gradient descent on the soft term alone makes the heads agree with the tree
    before = out["dependency"].item()
    with torch.no_grad():
        for t in logits.values():
            t -= 1.0 * t.grad
    after = HierarchicalLoss(two_ranks, dependency="soft")(logits, targets)["dependency"].item()
    assert after < before


def test_unspecified_labels_are_left_out_of_their_rank_ce(two_ranks: Taxonomy) -> None:
    logits, _ = hand_batch()
    partial = torch.tensor([[0, 1], [1, -1]])  # sample 2 known only to family
    out = HierarchicalLoss(two_ranks)(logits, partial)
    assert out["ce_family"].item() == pytest.approx(CE_FAMILY, rel=1e-6)
    assert out["ce_species"].item() == pytest.approx(CE_SPECIES_1, rel=1e-6)  # mean over the 1 specified sample
    # the argmax term looks at predictions only, so it is unchanged by missing labels
    assert out["dependency"].item() == pytest.approx(PAPER_TERM, rel=1e-6)


def test_a_rank_without_any_label_contributes_zero_not_nan(two_ranks: Taxonomy) -> None:
    logits, _ = hand_batch()
    out = HierarchicalLoss(two_ranks, dependency="soft")(logits, torch.tensor([[0, -1], [1, -1]]))
    assert out["ce_species"].item() == 0.0
    assert out["ce"].item() == pytest.approx(CE_FAMILY, rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(logits["species"].grad).all()
    nothing = HierarchicalLoss(two_ranks)(hand_batch()[0], torch.full((2, 2), -1))
    assert nothing["ce"].item() == 0.0 and math.isfinite(nothing["loss"].item())


def test_single_task_logits_use_only_the_present_rank(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    out = HierarchicalLoss(two_ranks)({"species": logits["species"]}, targets)
    assert list(out) == ["loss", "ce", "ce_species", "dependency"]
    assert out["ce"].item() == pytest.approx(CE_SPECIES, rel=1e-6)
    assert out["dependency"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.5 * CE_SPECIES, rel=1e-6)


def test_non_adjacent_ranks_give_no_dependency_term() -> None:
    demo = Taxonomy.demo()
    torch.manual_seed(0)
    logits = {"order": torch.randn(4, 4), "species": torch.randn(4, 9)}
    out = HierarchicalLoss(demo, dependency="soft")(logits, torch.zeros(4, 3, dtype=torch.long))
    assert out["dependency"].item() == 0.0


def test_bad_arguments_and_inputs_are_named(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    with pytest.raises(ValueError, match="dependency must be one of"):
        HierarchicalLoss(two_ranks, dependency="hard")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        HierarchicalLoss(two_ranks, alpha=2.0)
    loss = HierarchicalLoss(two_ranks)
    with pytest.raises(ValueError, match=r"unknown rank\(s\) \['genus'\]"):
        loss({**logits, "genus": torch.zeros(2, 1)}, targets)
    with pytest.raises(ValueError, match=r"targets must be \[N, 2\]"):
        loss(logits, targets[:, :1])
    with pytest.raises(ValueError, match=r"logits\['species'\] has shape \(2, 2\), expected \(2, 3\)"):
        loss({**logits, "species": torch.zeros(2, 2)}, targets)
    with pytest.raises(ValueError, match="integer class indices"):
        loss(logits, targets.float())
    with pytest.raises(ValueError, match="logits is empty"):
        loss({}, targets)


@pytest.mark.parametrize("dependency", ["paper", "soft"])
def test_low_precision_logits_give_a_float32_loss_close_to_full_precision(two_ranks: Taxonomy, dependency: str) -> None:
    logits, targets = hand_batch()
    loss = HierarchicalLoss(two_ranks, dependency=dependency)
    full = loss(logits, targets)
    half = loss({rank: t.detach().bfloat16().requires_grad_() for rank, t in logits.items()}, targets)
    assert half["loss"].dtype == torch.float32
    assert half["loss"].item() == pytest.approx(full["loss"].item(), rel=2e-2)
    half["loss"].backward()


def test_build_loss_from_config(two_ranks: Taxonomy) -> None:
    loss = build_loss(LossConfig(alpha=0.3, dependency="soft"), two_ranks)
    assert (loss.alpha, loss.dependency) == (0.3, "soft")


@pytest.mark.parametrize("dependency", ["paper", "soft"])
def test_logits_on_another_device_than_the_loss_buffers(dependency: str) -> None:
    """Training moves logits to the GPU while evaluation hands CPU tensors to the same loss: the taxonomy tables must
    follow the logits (the ``meta`` device stands in for a GPU here; before the fix this raised on an H100)."""
    taxonomy = Taxonomy.demo()
    loss_fn = HierarchicalLoss(taxonomy, dependency=dependency)  # buffers stay on the CPU
    logits = {r: torch.randn(4, taxonomy.num_classes(r), device="meta") for r in taxonomy.ranks}
    parts = loss_fn(logits, torch.zeros(4, taxonomy.depth, dtype=torch.long, device="meta"))
    assert parts["loss"].device.type == "meta" and parts["dependency"].shape == ()


# Outlier exposure. In hand_batch, sample 2's species logits are (0, 0, ln 2): softmax (1/4, 1/4, 1/2), so its
# CE from the uniform distribution is −(1/3)(ln 1/4 + ln 1/4 + ln 1/2) = (5/3)·ln 2.
OE_SAMPLE_2 = 5.0 / 3.0 * math.log(2.0)
OE_SAMPLE_1 = -(1.0 / 3.0) * (2 * (0.0 - math.log(2 + E)) + (1.0 - math.log(2 + E)))  # species logits (0, 1, 0)


def test_outlier_term_is_the_ce_to_uniform_of_family_only_samples(two_ranks: Taxonomy) -> None:
    logits, _ = hand_batch()
    partial = torch.tensor([[0, 1], [1, -1]])  # sample 2: known to family, species outside the list
    plain = HierarchicalLoss(two_ranks)(logits, partial)
    out = HierarchicalLoss(two_ranks, outlier_weight=0.4)(logits, partial)
    assert out["outlier"].item() == pytest.approx(OE_SAMPLE_2, rel=1e-6)
    assert out["outlier"].item() == pytest.approx(1.155245, abs=1e-5)
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.4 * OE_SAMPLE_2, rel=1e-6)
    assert "outlier" not in plain  # off by default: the paper's loss, parts unchanged
    # mean over the outliers of the batch: two outliers average their terms
    both = HierarchicalLoss(two_ranks, outlier_weight=1.0)(logits, torch.tensor([[0, -1], [1, -1]]))
    assert both["outlier"].item() == pytest.approx((OE_SAMPLE_1 + OE_SAMPLE_2) / 2, rel=1e-6)


def test_outlier_term_needs_a_known_higher_rank_and_is_zero_without_outliers(two_ranks: Taxonomy) -> None:
    logits, targets = hand_batch()
    loss_fn = HierarchicalLoss(two_ranks, outlier_weight=1.0)
    assert loss_fn(logits, targets)["outlier"].item() == 0.0  # fully labelled batch
    # a sample with no label at all is not evidence of anything: no outlier term, no NaN
    assert loss_fn(logits, torch.full((2, 2), -1))["outlier"].item() == 0.0


def test_outlier_gradient_flattens_the_head_on_outliers_only(two_ranks: Taxonomy) -> None:
    logits, _ = hand_batch()
    out = HierarchicalLoss(two_ranks, alpha=1.0, dependency="none", outlier_weight=1.0)(
        logits, torch.tensor([[0, 1], [1, -1]]))
    out["loss"].backward()
    grad = logits["species"].grad[1]
    # d/dz of −mean_k log softmax(z)_k = softmax(z) − 1/K: pushes the winner (sb1, p = 1/2) down, the others up
    expected = torch.tensor([0.25, 0.25, 0.5]) - 1.0 / 3.0
    assert torch.allclose(grad, expected, atol=1e-6)


def test_outlier_term_covers_every_rank_below_the_last_known_one() -> None:
    taxonomy = Taxonomy.demo()
    logits = {r: torch.zeros(2, taxonomy.num_classes(r)) for r in taxonomy.ranks}
    logits["species"][0, 0] = 3.0
    loss_fn = HierarchicalLoss(taxonomy, outlier_weight=1.0)
    order_only = loss_fn(logits, torch.tensor([[0, -1, -1], [0, 0, 0]]))
    # uniform logits give the minimum, log K; sample 0 is an outlier at family and at species
    k_family, k_species = taxonomy.num_classes("family"), taxonomy.num_classes("species")
    species_term = torch.logsumexp(logits["species"][0], 0).item() - 3.0 / k_species
    assert order_only["outlier"].item() == pytest.approx(math.log(k_family) + species_term, rel=1e-6)


def test_outlier_weight_is_validated_and_read_from_the_config(two_ranks: Taxonomy) -> None:
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="outlier_weight"):
            HierarchicalLoss(two_ranks, outlier_weight=bad)
    loss = build_loss(LossConfig(outlier_weight=0.25), two_ranks)
    assert loss.outlier_weight == 0.25 and "outlier_weight=0.25" in repr(loss)


def test_training_loop_uses_the_configured_outlier_weight(tmp_path) -> None:
    """The loop builds its loss from the config (for the Ray Train worker as for local runs)."""
    from taxonet.config import load_config
    from tests.support import TensorData, train_locally

    taxonomy = Taxonomy.demo()
    torch.manual_seed(0)
    images = torch.randn(24, 3, 16, 16)
    targets = torch.tensor([list(taxonomy.encode(row)) for row in taxonomy.rows()] * 2
                           + [[0, 0, -1]] * 6)  # 6 samples known to family only
    histories = {}
    for weight in (0.0, 0.5):
        config = load_config("demo", {"data.input_size": 16, "model.backbone": "tiny_cnn", "model.weights": None,
                                      "optim.epochs": 1, "loss.outlier_weight": weight})
        data = TensorData(images, targets, images, targets, batch_size=8, val_batch_size=8)
        histories[weight] = train_locally(config, taxonomy, data, tmp_path / str(weight), device="cpu")[1][0]
    assert "train_outlier" not in histories[0.0]
    assert histories[0.5]["train_outlier"] > 0 and "val_outlier" in histories[0.5]
