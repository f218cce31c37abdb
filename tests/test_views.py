"""Augmented views: exact inversion, determinism, coverage of the 8 rotations/flips; grouping and ranking of
candidates on fixed inputs (no model)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from arc_dataset import Augmentation, Sample, Task, augment_sample, evaluation_samples
from views import (Candidate, group_candidates, needs_scores, rank_candidates, second_attempt_view, task_views)


def _sample(task_id: str = "t", demos: int = 3, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    pairs = [(rng.integers(0, 10, (2, 3)).astype(np.uint8), rng.integers(0, 10, (3, 4)).astype(np.uint8))
             for _ in range(demos + 1)]
    return evaluation_samples([Task(task_id, pairs[:demos], [pairs[demos]])])[0]


def test_every_transform_and_colour_permutation_round_trips():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 10, (3, 5)).astype(np.uint8)   # not square: a wrong inverse changes the shape
    perms = [tuple(range(10))] + [(0, *map(int, rng.permutation(np.arange(1, 10)))) for _ in range(5)]
    for transform, colours in itertools.product(range(8), perms):
        view = Augmentation(transform, colours)
        seen = view.apply(grid)
        assert np.array_equal(view.invert(seen), grid), (transform, colours)
        assert seen.shape == (grid.shape if transform in (0, 2, 5, 7) else grid.shape[::-1])


def test_views_are_deterministic_start_with_the_identity_and_cover_the_dihedral_group():
    sample = _sample()
    views = task_views(sample, 8, seed=3)
    assert views == task_views(sample, 8, seed=3)
    assert views[0].is_identity and views[1] == second_attempt_view(sample, 3)
    assert sorted(v.transform for v in views) == list(range(8))
    assert all(v.colours[0] == 0 for v in views) and len({v.colours for v in views}) == 8
    assert all(sorted(v.demo_order) == [0, 1, 2] for v in views[1:])
    assert task_views(sample, 3, seed=3) == views[:3] and task_views(sample, 1, seed=3) == [Augmentation()]
    assert task_views(sample, 12, seed=3)[:8] == views
    assert task_views(sample, 8, seed=4) != views
    with pytest.raises(ValueError):
        task_views(sample, 0, seed=0)


def test_a_right_answer_under_any_view_maps_back_to_the_answer():
    sample = _sample(seed=5)
    answer = np.rot90(sample.query).copy()      # any grid of the task's own frame
    for view in task_views(sample, 8, seed=0):
        seen = augment_sample(sample, view)      # what the model sees
        assert np.array_equal(view.invert(view.apply(answer)), answer)
        assert np.array_equal(view.invert(seen.query), sample.query)


def _g(*rows):
    return np.array(rows, dtype=np.uint8)


def test_identical_grids_are_grouped_and_malformed_ones_dropped():
    a, b = _g([1, 2]), _g([2, 1])
    candidates = group_candidates([a, None, b, a.copy(), _g([1], [2]), a])
    assert [(c.votes, c.first_view) for c in candidates] == [(3, 0), (1, 2), (1, 4)]
    assert np.array_equal(candidates[0].grid, a) and candidates[2].grid.shape == (2, 1)
    assert group_candidates([None, None]) == []


def test_votes_rank_first_log_probability_breaks_ties():
    c = [Candidate(_g([k]), votes=v, first_view=k, log_prob=lp)
         for k, (v, lp) in enumerate([(1, -1.0), (3, -9.0), (1, -0.5), (2, -7.0)])]
    assert [x.first_view for x in rank_candidates(c, "votes")] == [1, 3, 2, 0]
    assert [x.first_view for x in rank_candidates(c, "product")] == [2, 0, 3, 1]
    unscored = [Candidate(_g([k]), votes=1, first_view=k) for k in (2, 0, 1)]
    assert [x.first_view for x in rank_candidates(unscored, "votes")] == [0, 1, 2]   # the earlier view wins
    with pytest.raises(ValueError):
        rank_candidates(c, "sum")


def test_scores_are_needed_only_when_they_can_change_the_two_attempts():
    def cands(*votes):
        return [Candidate(_g([k]), votes=v, first_view=k) for k, v in enumerate(votes)]
    assert not needs_scores(cands(4, 4), "votes") and not needs_scores(cands(4, 4), "product")
    assert not needs_scores(cands(5, 2, 1), "votes")
    assert needs_scores(cands(5, 2, 2), "votes") and needs_scores(cands(2, 2, 2, 2), "votes")
    assert needs_scores(cands(5, 2, 1), "product")
    assert not needs_scores(cands(8), "product")
