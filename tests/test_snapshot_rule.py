"""The snapshot rule for runs that keep few snapshots (issue 15, item 5):
pivotal.history.spaced_snapshot_epochs (which epochs feed Algorithm 3) and snapshots_to_keep (the
rolling set a run keeps on disk so that those epochs exist whatever t* turns out to be)."""

import dataclasses

import jax
import numpy as np
import pytest

from pivotal.history import snapshots_to_keep, spaced_snapshot_epochs

# (T epochs, t*, K, every) -> the snapshot epochs.
RULE_CASES = [
    ((120, 10, 5, 20), [30, 50, 70, 90, 110]),  # the paper's grid: a = 109 >= K every
    ((100, 10, 5, 20), [27, 44, 61, 78, 95]),  # a = 89 < 100: spacing floor(89 / 5) = 17
    ((100, 94, 5, 20), [95, 96, 97, 98, 99]),  # a = 5 = K: every epoch after t*
    ((100, 95, 5, 20), [95, 96, 97, 98, 99]),  # a = 4 = K - 1: t* itself and the 4 after it
    ((100, 97, 5, 20), [95, 96, 97, 98, 99]),  # a = 2: the last K epochs, 2 of them before t*
    ((100, 99, 5, 20), [95, 96, 97, 98, 99]),  # t* the last epoch
    ((3, 1, 5, 20), [0, 1, 2]),  # a run shorter than K: every epoch
    ((20, 0, 5, 1), [1, 2, 3, 4, 5]),  # every=1: the K epochs right after t*
    ((20, 3, 1, 20), [19]),  # K = 1: as far from t* as every allows
]


@pytest.mark.parametrize("args, expected", RULE_CASES)
def test_spaced_snapshot_epochs_table(args, expected):
    got = spaced_snapshot_epochs(*args)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("T, K, every", [(t, k, e) for t in (1, 2, 7, 30) for k in (1, 2, 5)
                                         for e in (1, 3, 20)])
def test_k_distinct_snapshots_at_or_after_t_star_when_the_run_allows(T, K, every):
    for best in range(T):
        got = spaced_snapshot_epochs(T, best, K, every)
        assert np.unique(got).size == got.size == min(K, T)
        assert got.min() >= 0 and got.max() <= T - 1
        after = T - 1 - best
        if after >= K:  # K epochs strictly after t*, at most `every` apart
            assert got.min() > best and np.all(np.diff(np.r_[best, got]) <= every)
            assert np.all(np.diff(np.r_[best, got]) == np.diff(np.r_[best, got])[0])
        elif after == K - 1:  # t* and every epoch after it
            np.testing.assert_array_equal(got, np.arange(best, T))
        else:  # the epochs nearest t*: the last K of the run
            np.testing.assert_array_equal(got, np.arange(max(0, T - K), T))


def _simulate(val, K, every):
    """A run keeping the rolling set (save when kept, drop the rest): the snapshots on disk at
    the end, the most on disk at once, and t* (the first maximum, as the trainer keeps it)."""
    T = len(val)
    disk, most, best, best_val = set(), 0, -1, -np.inf
    for epoch, v in enumerate(val):
        if v > best_val:
            best, best_val = epoch, v
        keep = set(snapshots_to_keep(T, best, epoch, K, every).tolist())
        if epoch in keep:
            disk.add(epoch)
        most = max(most, len(disk))
        disk &= keep
    return disk, most, best


@pytest.mark.parametrize("T, K, every", [(30, 5, 20), (100, 5, 20), (12, 3, 2), (8, 5, 3),
                                         (40, 1, 7), (4, 6, 2)])
def test_rolling_set_holds_what_the_rule_asks_for_within_2k(T, K, every):
    rng = np.random.default_rng(T * 100 + K * 10 + every)
    curves = [rng.normal(size=T), np.arange(T, dtype=float), -np.arange(T, dtype=float),
              np.zeros(T), np.cumsum(rng.normal(size=T))]
    curves += [np.round(rng.normal(size=T), 1) for _ in range(40)]  # ties too
    for val in curves:
        disk, most, best = _simulate(val, K, every)
        wanted = set(spaced_snapshot_epochs(T, best, K, every).tolist())
        assert wanted <= disk, (val, best, wanted, disk)
        assert most <= 2 * K
        assert disk <= wanted | set(range(max(0, T - K), T))  # nothing else is left behind


@pytest.mark.parametrize("args, match", [
    ((0, 0, 5, 20), "num_epochs must be a positive integer"),
    ((10, 10, 5, 20), "best_epoch must lie in"),
    ((10, -1, 5, 20), "best_epoch must be an integer >= 0"),
    ((10, 2, 0, 20), "num_snapshots must be a positive integer"),
    ((10, 2, 5, 0), "every must be a positive integer"),
    ((10, 2, 5, 2.0), "every must be a positive integer"),
])
def test_bad_arguments_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        spaced_snapshot_epochs(*args)


def test_keep_needs_epoch_between_best_and_the_end():
    with pytest.raises(ValueError, match="epoch must be an integer >= 4"):
        snapshots_to_keep(10, 4, 3, 5, 2)
    with pytest.raises(ValueError, match="epoch must lie in"):
        snapshots_to_keep(10, 4, 10, 5, 2)


@pytest.mark.slow  # two short trainings: about a minute on 2 busy cores
def test_training_keeps_the_rolling_set_and_selection_uses_the_rule(tmp_path):
    """A warm-up with snapshot_every keeps only the rolling set on disk; RBC's row names the
    rule's epochs; snapshot_every None (the embedded presets) still keeps every epoch."""
    from experiments import pipeline
    from experiments.presets import PRESETS

    cfg = dataclasses.replace(PRESETS["smoke"].config, warmup_epochs=7, epochs=1,
                              num_snapshots=2, snapshot_every=2)
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)
    meta0, warm = pipeline.warmup_run(problem, model, cfg, 0, str(tmp_path / "w"))
    on_disk = sorted(pipeline.load_snapshots(warm))
    wanted = spaced_snapshot_epochs(7, warm.best_epoch, 2, 2).tolist()
    assert set(wanted) <= set(on_disk) <= set(wanted) | {5, 6}
    info = {}
    pipeline.select("rbc", problem, model, warm, meta0, 2, cfg, jax.random.PRNGKey(0), info)
    assert info["snapshot_epochs"] == wanted

    every = dataclasses.replace(cfg, snapshot_every=None, warmup_epochs=3)
    _, warm_all = pipeline.warmup_run(problem, model, every, 0, str(tmp_path / "all"))
    assert sorted(pipeline.load_snapshots(warm_all)) == [0, 1, 2]
