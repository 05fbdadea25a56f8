"""Selectivity metrics: known values, a plain-Python reference, and batch/DDP aggregation (one process and two)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnprune.selectivity import (
    EffectiveShare,
    Gini,
    HeadAgreement,
    MaxWeight,
    NormalizedEntropy,
    RankStability,
    TopKMass,
    functional,
)

CONCENTRATION = {
    "normalized_entropy": (functional.normalized_entropy, NormalizedEntropy),
    "gini": (functional.gini, Gini),
    "topk_mass": (functional.topk_mass, TopKMass),
    "effective_share": (functional.effective_share, EffectiveShare),
    "max_weight": (functional.max_weight, MaxWeight),
}


def uniform_and_one_hot(n: int) -> dict[str, tuple[torch.Tensor, dict[str, float]]]:
    """[3, n] uniform and one-hot rows (the hot token at different places) with their expected values."""
    k = math.ceil(round(0.1 * n, 6))
    uniform = torch.full((3, n), 1.0 / n, dtype=torch.float64)
    one_hot = torch.zeros(3, n, dtype=torch.float64)
    one_hot[0, 0] = one_hot[1, n // 2] = one_hot[2, n - 1] = 1.0
    return {
        "uniform": (
            uniform,
            {"normalized_entropy": 1.0, "gini": 0.0, "effective_share": 1.0, "topk_mass": k / n, "max_weight": 1 / n},
        ),
        "one_hot": (
            one_hot,
            {"normalized_entropy": 0, "gini": (n - 1) / n, "effective_share": 1 / n, "topk_mass": 1, "max_weight": 1},
        ),
    }


@pytest.mark.parametrize("n", [2, 10, 30, 197])
@pytest.mark.parametrize("case", ["uniform", "one_hot"])
@pytest.mark.parametrize("name", sorted(CONCENTRATION))
def test_concentration_known_values(name, case, n):
    fn, cls = CONCENTRATION[name]
    attn, expected = uniform_and_one_hot(n)[case]
    value = expected[name]
    torch.testing.assert_close(fn(attn), torch.full((3,), float(value), dtype=torch.float64))
    metric = cls()
    metric.update(attn[:1])
    metric.update(attn[1:])
    torch.testing.assert_close(metric.compute(), torch.tensor(float(value)))  # float32 states


def test_topk_mass_counts_ceil_of_fraction():
    # 0.1 * 30 is 3.0000000000000004 in floating point: still 3 tokens, not 4
    assert functional.topk_mass(torch.full((30,), 1 / 30), 0.1).item() == pytest.approx(3 / 30)
    assert functional.topk_mass(torch.full((25,), 1 / 25), 0.1).item() == pytest.approx(3 / 25)
    attn = torch.tensor([0.5, 0.2, 0.2, 0.1])
    assert functional.topk_mass(attn, 0.5).item() == pytest.approx(0.7)
    assert functional.topk_mass(attn, 0.01).item() == pytest.approx(0.5)  # at least one token
    with pytest.raises(ValueError):
        functional.topk_mass(attn, 0.0)
    with pytest.raises(ValueError):
        TopKMass(fraction=1.5)


def test_single_token_rows():
    attn = torch.ones(4, 1)
    assert functional.normalized_entropy(attn).tolist() == [0.0] * 4
    assert functional.gini(attn).tolist() == [0.0] * 4
    assert functional.effective_share(attn).tolist() == [1.0] * 4


def _reference_entropy(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def _reference_gini(row: list[float]) -> float:
    # mean absolute difference over twice the mean: an independent formula from the sorted one
    n = len(row)
    return sum(abs(x - y) for x in row for y in row) / (2 * n * n * (sum(row) / n))


def _reference_average_ranks(row: list[float]) -> list[float]:
    return [sum(y < x for y in row) + (sum(y == x for y in row) - 1) / 2 for x in row]


def _reference_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _reference_average_ranks(a), _reference_average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_concentration_matches_reference():
    attn = torch.randn(6, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64).mul(3).softmax(-1)
    attn[0, :5] = 0  # exact zeros: 0 * log 0 = 0
    attn[0] /= attn[0].sum()
    rows = attn.tolist()
    entropy = torch.tensor([_reference_entropy(r) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(functional.normalized_entropy(attn), entropy / math.log(17))
    torch.testing.assert_close(functional.effective_share(attn), entropy.exp() / 17)
    torch.testing.assert_close(functional.gini(attn), torch.tensor([_reference_gini(r) for r in rows]).double())
    torch.testing.assert_close(functional.max_weight(attn), torch.tensor([max(r) for r in rows]).double())
    top2 = torch.tensor([sum(sorted(r)[-2:]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(functional.topk_mass(attn, 0.1), top2)  # ceil(1.7) = 2 tokens


def test_spearman_hand_computed():
    # a = [1, 2, 3, 4, 5] ranks (0-based) to [0, 1, 2, 3, 4]; b = [5, 6, 7, 8, 7] to [0, 1, 2.5, 4, 2.5]
    # (the two 7s share ranks 2 and 3). Centred: da = [-2, -1, 0, 1, 2], db = [-2, -1, 0.5, 2, 0.5].
    # sum da*db = 4 + 1 + 0 + 2 + 1 = 8; sum da^2 = 10; sum db^2 = 4 + 1 + 0.25 + 4 + 0.25 = 9.5
    # rho = 8 / sqrt(10 * 9.5) = 8 / sqrt(95) = 0.820782681668...
    a = torch.tensor([1.0, 2, 3, 4, 5])
    b = torch.tensor([5.0, 6, 7, 8, 7])
    assert functional.average_rank(b).tolist() == [0, 1, 2.5, 4, 2.5]
    assert functional.spearman(a, b).item() == pytest.approx(8 / math.sqrt(95), abs=1e-6)
    assert functional.spearman(a, a).item() == pytest.approx(1.0)
    assert functional.spearman(a, -a).item() == pytest.approx(-1.0)
    assert functional.spearman(a, a.exp()).item() == pytest.approx(1.0)  # only the order counts
    assert functional.rank_stability(a[None], b[None]).tolist() == pytest.approx([8 / math.sqrt(95)], abs=1e-6)
    # a constant row has no ranking: defined as 0, not NaN
    assert functional.spearman(a, torch.ones(5)).item() == 0.0


def test_spearman_matches_reference_batched():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (4, 3, 12), generator=g).double()  # many ties
    b = torch.randn(4, 3, 12, generator=g, dtype=torch.float64)
    rows = zip(a.flatten(0, 1).tolist(), b.flatten(0, 1).tolist(), strict=True)
    expected = torch.tensor([_reference_spearman(x, y) for x, y in rows], dtype=torch.float64).view(4, 3)
    torch.testing.assert_close(functional.spearman(a, b), expected)
    torch.testing.assert_close(functional.rank_stability(a, b), expected)


def test_topk_overlap_hand_computed():
    a = torch.tensor([5.0, 4, 3, 2, 1, 0])  # top 3: tokens {0, 1, 2}
    b = torch.tensor([0.0, 4, 5, 1, 3, 2])  # top 3: tokens {2, 1, 4}
    assert functional.topk_overlap(a, b, 3).item() == pytest.approx(2 / 3)
    assert functional.topk_overlap(a, b, 1).item() == 0.0  # token 0 against token 2
    assert functional.topk_overlap(a, b, 6).item() == 1.0
    assert functional.topk_overlap(torch.stack([a, b]), torch.stack([b, b]), 3).tolist() == pytest.approx([2 / 3, 1])
    with pytest.raises(ValueError):
        functional.topk_overlap(a, b, 7)


def test_head_agreement():
    g = torch.Generator().manual_seed(2)
    one = torch.randn(5, 1, 20, generator=g)
    identical = one.expand(5, 4, 20)
    torch.testing.assert_close(functional.head_agreement(identical), torch.ones(5))
    torch.testing.assert_close(functional.head_agreement(identical, per_head=True), torch.ones(5, 4))
    # two heads in one order and two in the reverse: 2 of the 6 pairs agree (+1), 4 disagree (-1)
    mixed = torch.cat([one, one, -one, -one], dim=1)
    torch.testing.assert_close(functional.head_agreement(mixed), torch.full((5,), -1 / 3))
    # against a reference: the mean of the pairwise Spearman correlations
    heads = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = [sum(_reference_spearman(h[i], h[j]) for i, j in pairs) / 3 for h in heads.tolist()]
    torch.testing.assert_close(functional.head_agreement(heads), torch.tensor(expected).double())
    per_head = functional.head_agreement(heads, per_head=True)
    torch.testing.assert_close(per_head.mean(-1), functional.head_agreement(heads))
    with pytest.raises(ValueError):
        functional.head_agreement(torch.rand(2, 1, 9))


def test_per_head_mode():
    n = 16
    uniform = torch.full((n,), 1.0 / n)
    one_hot = torch.zeros(n)
    one_hot[3] = 1
    attn = torch.stack([uniform, one_hot, uniform]).expand(5, 3, n)  # [B=5, H=3, N]
    for name, cls, expected in [
        ("normalized_entropy", NormalizedEntropy, [1, 0, 1]),
        ("gini", Gini, [0, (n - 1) / n, 0]),
        ("topk_mass", TopKMass, [2 / n, 1, 2 / n]),
        ("effective_share", EffectiveShare, [1, 1 / n, 1]),
        ("max_weight", MaxWeight, [1 / n, 1, 1 / n]),
    ]:
        metric = cls(num_heads=3)
        metric.update(attn[:2])
        metric.update(attn[2:])
        value = metric.compute()
        assert value.shape == (3,), name
        torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float32), msg=name)

    g = torch.Generator().manual_seed(3)
    heads = torch.randn(6, 3, 10, generator=g)
    agreement = HeadAgreement(num_heads=3)
    agreement.update(heads)
    torch.testing.assert_close(agreement.compute(), functional.head_agreement(heads, per_head=True).mean(0))
    noisy = heads + 0.3 * torch.randn(6, 3, 10, generator=g)
    stability = RankStability(num_heads=3)
    stability.update(heads[:4], noisy[:4])
    stability.update(heads[4:], noisy[4:])
    torch.testing.assert_close(stability.compute(), functional.rank_stability(heads, noisy).mean(0))

    with pytest.raises(ValueError):
        Gini(num_heads=3).update(torch.rand(5, 4, n))
    with pytest.raises(ValueError):
        Gini(num_heads=3).update(torch.rand(3))


def test_metric_flags():
    for cls in [NormalizedEntropy, Gini, TopKMass, EffectiveShare, MaxWeight, HeadAgreement, RankStability]:
        assert cls.is_differentiable is False and cls.full_state_update is False
        assert isinstance(cls.higher_is_better, bool)
    assert NormalizedEntropy.higher_is_better is False and Gini.higher_is_better is True


# ---------------------------------------------------------------- aggregation: batches, merge_state, DDP (gloo)

BATCH, HEADS, TOKENS = 8, 3, 12
SPLIT = 3  # rank 0 sees rows [0, 3), rank 1 rows [3, 8): unequal halves, so a mean of means would be wrong


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    attn = torch.randn(BATCH, HEADS, TOKENS, generator=g).mul(2).softmax(-1)
    return attn, attn + 0.05 * torch.randn(BATCH, HEADS, TOKENS, generator=g)


def _metrics() -> dict[str, object]:
    metrics = {}
    for per_head in (None, HEADS):
        tag = "heads" if per_head else "all"
        for cls in [NormalizedEntropy, Gini, EffectiveShare, MaxWeight, HeadAgreement, RankStability]:
            metrics[f"{cls.__name__}/{tag}"] = cls(num_heads=per_head)
        metrics[f"TopKMass/{tag}"] = TopKMass(fraction=0.25, num_heads=per_head)
    return metrics


def _update(metrics: dict[str, object], attn: torch.Tensor, perturbed: torch.Tensor) -> None:
    for name, metric in metrics.items():
        if name.startswith("HeadAgreement"):
            metric.update(attn)
        elif name.startswith("RankStability"):
            metric.update(attn, perturbed)
        else:
            metric.update(attn)


def _single_process() -> dict[str, torch.Tensor]:
    attn, perturbed = _data()
    metrics = _metrics()
    _update(metrics, attn, perturbed)
    return {name: m.compute() for name, m in metrics.items()}


def test_single_instance_equals_functional_mean():
    attn, perturbed = _data()
    values = _single_process()
    torch.testing.assert_close(values["Gini/all"], functional.gini(attn).mean())
    torch.testing.assert_close(values["Gini/heads"], functional.gini(attn).mean(0))
    torch.testing.assert_close(values["TopKMass/all"], functional.topk_mass(attn, 0.25).mean())
    torch.testing.assert_close(values["HeadAgreement/all"], functional.head_agreement(attn).mean())
    torch.testing.assert_close(values["RankStability/all"], functional.rank_stability(attn, perturbed).mean())


def test_merged_halves_equal_one_instance():
    attn, perturbed = _data()
    first, second = _metrics(), _metrics()
    _update(first, attn[:SPLIT], perturbed[:SPLIT])
    _update(second, attn[SPLIT:], perturbed[SPLIT:])
    expected = _single_process()
    for name, metric in first.items():
        assert not torch.allclose(metric.compute(), expected[name]), name  # differs; also caches a compute()
        metric.merge_state(second[name])
        torch.testing.assert_close(metric.compute(), expected[name], msg=name)
    # the same by hand: summing states is what dist_reduce_fx="sum" does across ranks
    first, second = _metrics(), _metrics()
    _update(first, attn[:SPLIT], perturbed[:SPLIT])
    _update(second, attn[SPLIT:], perturbed[SPLIT:])
    for name in first:
        summed = (first[name].total + second[name].total) / (first[name].count + second[name].count)
        torch.testing.assert_close(summed, expected[name], msg=name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        attn, perturbed = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, BATCH)
        metrics = _metrics()
        _update(metrics, attn[rows], perturbed[rows])
        values = {name: m.compute() for name, m in metrics.items()}  # compute() syncs across ranks
        torch.save(values, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _single_process()
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt")
        assert values.keys() == expected.keys()
        for name, value in values.items():
            torch.testing.assert_close(value, expected[name], msg=f"rank {rank}: {name}")
