"""TrainingData's lengths without encoding: exactly the encoded epoch's, so batch plans are unchanged, and
planning every epoch of a run encodes none."""
from __future__ import annotations

import numpy as np
import pytest

import arc_dataset as ad

MAX_LENGTH = 400


def grid(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    g = rng.integers(0, 10, size=(height, width)).astype(np.uint8)
    g.setflags(write=False)
    return g


def varied_tasks() -> list[ad.Task]:
    """Non-square grids of many shapes (a transpose changes their token counts), tasks of 1 to 7 pairs,
    and one task over MANY_DEMOS pairs: at MAX_LENGTH some samples drop demonstrations, some are skipped."""
    rng = np.random.default_rng(1234)
    tasks = []
    for t in range(24):
        pairs = []
        for _ in range(1 + t % 7):
            h, w = int(rng.integers(1, 17)), int(rng.integers(1, 6))
            shape = (h, w) if rng.random() < 0.5 else (w, h)
            pairs.append((grid(rng, *shape), grid(rng, shape[1], shape[0]) if t % 3 else grid(rng, *shape)))
        tasks.append(ad.Task(f"t{t}", pairs, []))
    many = [(grid(rng, int(rng.integers(1, 3)), int(rng.integers(1, 7))),
             grid(rng, int(rng.integers(1, 7)), int(rng.integers(1, 3)))) for _ in range(ad.MANY_DEMOS + 6)]
    many[3] = (grid(rng, 1, 30), grid(rng, 12, 30))  # the query of sample 3 cannot fit in any orientation
    tasks.append(ad.Task("many", many, []))
    return tasks


class Encoding(ad.TrainingData):
    """The reference: lengths and skipped samples read off the real encoding (the old implementation)."""

    def lengths(self, epoch: int) -> np.ndarray:
        return np.fromiter((len(e.input_ids) for e in self.encoded(epoch)), dtype=np.int64)

    def skipped(self, epoch: int) -> list[tuple[str, int]]:
        self.encoded(epoch)
        return self._epoch[2]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.batch_plan(epoch))


@pytest.fixture(scope="module")
def samples() -> list[ad.Sample]:
    return ad.training_samples(varied_tasks())


SETTINGS = {
    "single": dict(),
    "grouped": dict(batch_size=3),
    "packed": dict(tokens_per_batch=3 * MAX_LENGTH),
    "plain": dict(augment=False, batch_size=2),
}


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("mode", sorted(SETTINGS))
def test_lengths_match_the_encoding(samples: list[ad.Sample], seed: int, mode: str) -> None:
    settings = ad.DataSettings(max_length=MAX_LENGTH, seed=seed, **SETTINGS[mode])
    fast, slow = ad.TrainingData(samples, settings), Encoding(samples, settings)
    dropped = skipped = many_dropped = 0
    seen_lengths = set()
    for epoch in range(21):
        assert fast.num_batches(epoch) == slow.num_batches(epoch)
        assert np.array_equal(fast.lengths(epoch), slow.lengths(epoch))
        assert fast.skipped(epoch) == slow.skipped(epoch)
        assert fast.batch_plan(epoch) == slow.batch_plan(epoch)
        assert fast.computed_tokens(epoch) == slow.computed_tokens(epoch)
        encoded = slow.encoded(epoch)
        dropped += sum(e.demos_dropped > 0 for e in encoded if e.task_id != "many")
        many_dropped += sum(e.demos_dropped > 0 for e in encoded if e.task_id == "many")
        skipped += len(slow.skipped(epoch))
        seen_lengths.add(tuple(slow.lengths(epoch).tolist()))
    assert dropped and skipped and many_dropped  # every branch of the length rule was taken
    assert len(seen_lengths) == (1 if mode == "plain" else 21)  # transforms changed the lengths
    assert [fast.num_batches(e) for e in range(21)] == [slow.num_batches(e) for e in range(21)]


def test_planning_encodes_nothing_and_training_each_epoch_once(samples: list[ad.Sample],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    encode = ad.TrainingData._encode_epoch
    monkeypatch.setattr(ad.TrainingData, "_encode_epoch",
                        lambda self, epoch: calls.append(epoch) or encode(self, epoch))
    for settings in (ad.DataSettings(max_length=MAX_LENGTH), ad.DataSettings(max_length=MAX_LENGTH, batch_size=4),
                     ad.DataSettings(max_length=MAX_LENGTH, tokens_per_batch=2 * MAX_LENGTH)):
        data = ad.TrainingData(samples, settings)
        counts = [data.num_batches(e) for e in range(50)]
        assert [data.num_batches(e) for e in range(50)] == counts
        data.skipped(3), data.lengths(4), data.computed_tokens(5)
        assert calls == []
        for epoch in range(3):
            assert sum(1 for _ in data.batches(epoch)) == counts[epoch]
        assert calls == [0, 1, 2]
        calls.clear()
