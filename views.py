"""Augmented views of a task for inference, and ranking the candidates they produce (the ARC winners' recipe).

A view is an `arc_dataset.Augmentation`: one of the 8 rotations/flips, a colour permutation that keeps 0
(the background) and an order of the demonstrations. Every view is invertible, so a grid decoded under a
view maps back to the task's own orientation and colours (`Augmentation.invert`).

`task_views(sample, k, seed)` gives a sample's k views, deterministic from (seed, task id, test index):
  * view 0 is the identity, so one view is plain greedy decoding;
  * view 1 is `second_attempt_view` (the view today's evaluation already used for its second attempt, so
    `--eval-attempts 2` keeps its meaning with more views);
  * views 2..7 use the six rotations/flips not yet used, in a random order, so 8 views cover the whole
    dihedral group once (as the ARChitects' 8 views do); views beyond 8 repeat transforms with new colours.
  Views 1.. each have their own random colour permutation and demonstration order.

`rank_candidates` groups the mapped-back grids and orders them: by votes (how many views produced the grid),
ties broken by the summed teacher-forced log-probability over all views (`score="votes"`), or by that sum
first (`score="product"`: the product of the probabilities over the views, the ARChitects' "augmentation
scoring"; votes break ties there). Attempt 1 and 2 are the first two.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from arc_dataset import Augmentation, Sample

SCORES = ("votes", "product")


def _rng(seed: int, sample: Sample, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, zlib.crc32(sample.task_id.encode()), sample.index, stream])


def second_attempt_view(sample: Sample, seed: int) -> Augmentation:
    """A fixed, non-identity augmentation for a sample's second attempt (same for every evaluation, so
    accuracies from different epochs compare)."""
    rng = np.random.default_rng([seed % 2**32, zlib.crc32(sample.task_id.encode()), sample.index])
    augmentation = Augmentation.random(rng, len(sample.demos))
    if augmentation.transform == 0:
        augmentation = Augmentation(1 + int(rng.integers(7)), augmentation.colours, augmentation.demo_order)
    return augmentation


def task_views(sample: Sample, k: int, seed: int) -> list[Augmentation]:
    """The first `k` views of a sample (see the module docstring); a prefix of any longer list."""
    if k < 1:
        raise ValueError(f"need at least one view, got {k}")
    views = [Augmentation.identity()]
    if k == 1:
        return views
    second = second_attempt_view(sample, seed)
    views.append(second)
    rng = _rng(seed, sample, 1)
    rest = [t for t in range(1, 8) if t != second.transform]
    transforms = [rest[i] for i in rng.permutation(len(rest))]
    while len(views) < k:
        transform = transforms[len(views) - 2] if len(views) < 8 else int(rng.integers(8))
        colours = (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, 10)))
        order = tuple(int(i) for i in rng.permutation(len(sample.demos)))
        views.append(Augmentation(transform, colours, order))
    return views


@dataclass
class Candidate:
    """One distinct grid (in the task's own orientation and colours) and the evidence for it."""
    grid: np.ndarray
    votes: int = 0                       # views whose decoding produced it
    first_view: int = 0                  # the first view that produced it (view 0: the greedy answer)
    log_prob: float | None = None        # summed over all views; None when not scored

    def key(self) -> tuple:
        return grid_key(self.grid)


def grid_key(grid: np.ndarray) -> tuple:
    """A hashable identity of a grid, shape included."""
    grid = np.asarray(grid)
    return grid.shape, grid.tobytes()


def group_candidates(grids: Sequence[np.ndarray | None]) -> list[Candidate]:
    """Identical grids (already mapped back) grouped into candidates, in order of first appearance;
    None (a view whose output was not a grid) is left out."""
    found: dict[tuple, Candidate] = {}
    for view, grid in enumerate(grids):
        if grid is None:
            continue
        grid = np.ascontiguousarray(grid, dtype=np.uint8)
        key = grid_key(grid)
        if key not in found:
            found[key] = Candidate(grid, 0, view)
        found[key].votes += 1
    return list(found.values())


def needs_scores(candidates: Sequence[Candidate], score: str) -> bool:
    """Whether the log-probabilities can change which grids are attempts 1 and 2 (pass@2 does not care which
    of the two is first): only with three or more candidates, and for "votes" only when the second and
    third places are tied in votes."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if len(candidates) < 3:
        return False
    if score == "product":
        return True
    votes = sorted((c.votes for c in candidates), reverse=True)
    return votes[1] == votes[2]


def rank_candidates(candidates: Sequence[Candidate], score: str = "votes") -> list[Candidate]:
    """Candidates best first. "votes": most votes, then higher summed log-probability, then the earlier
    view. "product": higher summed log-probability, then votes, then the earlier view. Unscored
    candidates (log_prob None) count as -inf."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")

    def log_prob(c: Candidate) -> float:
        return -np.inf if c.log_prob is None else c.log_prob

    if score == "votes":
        return sorted(candidates, key=lambda c: (-c.votes, -log_prob(c), c.first_view))
    return sorted(candidates, key=lambda c: (-log_prob(c), -c.votes, c.first_view))
