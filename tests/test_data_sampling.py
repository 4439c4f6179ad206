"""Task weighting and samplers: the masses each mode promises, locality, ranks."""
import bisect
import collections

import pytest

from mmbench2_lab.data.sampling import BlockSampler, make_sampler, rank_partition, targeted_task_names, task_weights
from mmbench2_lab.data.windows import Block

# cup-catch is SEEN (targeted); cheetah-run and walker-walk are not.
STARTS = {"cheetah-run": 6000, "walker-walk": 3000, "cup-catch": 1000}


def test_valid_starts_weights_are_proportional_to_starts():
    assert task_weights(STARTS, "valid_starts") == pytest.approx({"cheetah-run": 0.6, "walker-walk": 0.3,
                                                                  "cup-catch": 0.1})


def test_uniform_weights_give_every_task_equal_mass():
    assert task_weights(STARTS, "uniform") == pytest.approx({t: 1 / 3 for t in STARTS})
    assert task_weights({**STARTS, "hopper-hop": 0}, "uniform")["hopper-hop"] == 0.0


def test_targeted_weights_put_alpha_on_seen_and_unseen_tasks():
    w = task_weights(STARTS, "targeted", alpha=0.7)
    assert w == pytest.approx({"cup-catch": 0.7, "cheetah-run": 0.15, "walker-walk": 0.15})
    assert {"cup-catch", "og-point-var1"} <= targeted_task_names() and len(targeted_task_names()) == 20


def test_targeted_alpha_collapses_when_one_side_is_empty():
    assert task_weights({"cheetah-run": 5, "walker-walk": 5}, "targeted", alpha=0.7) == pytest.approx(
        {"cheetah-run": 0.5, "walker-walk": 0.5})
    assert task_weights({"cup-catch": 5}, "targeted", alpha=0.2) == pytest.approx({"cup-catch": 1.0})
    with pytest.raises(ValueError, match="alpha must be in"):
        task_weights(STARTS, "targeted", alpha=1.5)
    with pytest.raises(ValueError, match="unknown task weighting 'frames'"):
        task_weights(STARTS, "frames")


class _Windows:
    """Just the ``blocks`` a sampler reads: two shards of cheetah-run, one each of the others."""
    blocks = [Block("cheetah-run", 0, 4000), Block("cheetah-run", 4000, 2000), Block("walker-walk", 6000, 3000),
              Block("cup-catch", 9000, 1000)]

    starts_per_task = STARTS

    def __len__(self):
        return 10000


def _task_of(i):
    return _Windows.blocks[bisect.bisect_right([b.first for b in _Windows.blocks], i) - 1].task


@pytest.mark.parametrize("mode,expected", [
    ("valid_starts", {"cheetah-run": 0.6, "walker-walk": 0.3, "cup-catch": 0.1}),
    ("uniform", {"cheetah-run": 1 / 3, "walker-walk": 1 / 3, "cup-catch": 1 / 3}),
    ("targeted", {"cheetah-run": 0.25, "walker-walk": 0.25, "cup-catch": 0.5}),
])
def test_sampler_draws_tasks_with_the_promised_mass(mode, expected):
    n = 40_000
    counts = collections.Counter(_task_of(i) for i in make_sampler(_Windows(), mode, num_samples=n, seed=1))
    for task, p in expected.items():
        assert counts[task] / n == pytest.approx(p, abs=0.012)


def test_within_a_task_windows_stay_proportional_to_block_sizes():
    n = 40_000
    idx = list(make_sampler(_Windows(), "uniform", num_samples=n, seed=2))
    first_shard = sum(i < 4000 for i in idx) / n
    assert first_shard == pytest.approx((1 / 3) * 4000 / 6000, abs=0.012)


def test_samples_per_shard_draws_runs_from_one_block():
    idx = list(make_sampler(_Windows(), "uniform", num_samples=64, samples_per_shard=16, seed=3))
    blocks = [next(j for j, b in enumerate(_Windows.blocks) if b.first <= i < b.first + b.count) for i in idx]
    assert all(len(set(blocks[k:k + 16])) == 1 for k in range(0, 64, 16))


def test_sampler_streams_are_reproducible_and_differ_by_rank_and_epoch():
    a = make_sampler(_Windows(), num_samples=50, seed=4)
    assert list(a) == list(make_sampler(_Windows(), num_samples=50, seed=4))
    assert list(a) != list(make_sampler(_Windows(), num_samples=50, seed=4, rank=1))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and len(a) == 50


def test_zero_weight_excludes_a_task_and_missing_weights_are_errors():
    idx = BlockSampler(_Windows.blocks, {"cheetah-run": 0.0, "walker-walk": 1.0, "cup-catch": 0.0}, 500)
    assert {_task_of(i) for i in idx} == {"walker-walk"}
    with pytest.raises(ValueError, match="no weight for tasks"):
        BlockSampler(_Windows.blocks, {"cheetah-run": 1.0}, 10)


def test_rank_partition_strides_items_across_ranks():
    tasks = [f"t{i}" for i in range(7)]
    parts = [rank_partition(tasks, r, 3) for r in range(3)]
    assert parts == [["t0", "t3", "t6"], ["t1", "t4"], ["t2", "t5"]]
    assert rank_partition(tasks[:2], 2, 3) == tasks[:2]
    with pytest.raises(ValueError, match="rank 3 is not in"):
        rank_partition(tasks, 3, 3)
