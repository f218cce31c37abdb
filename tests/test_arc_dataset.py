"""Tests for arc_dataset.py: loading every format, validation, samples, tokens, augmentation, batches, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arc_dataset as ad

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "examples"


@pytest.fixture(scope="module")
def arc2() -> ad.TaskSet:
    return ad.load_tasks("arc-agi-2")


@pytest.fixture(scope="module")
def arc2_samples(arc2: ad.TaskSet) -> list[ad.Sample]:
    return ad.training_samples(arc2)


def as_json(grid: np.ndarray) -> list[list[int]]:
    return grid.tolist()


def task_json(task: ad.Task, with_test_outputs: bool = True) -> dict:
    test = [{"input": as_json(i), **({"output": as_json(o)} if with_test_outputs else {})} for i, o in task.test]
    return {"train": [{"input": as_json(i), "output": as_json(o)} for i, o in task.train], "test": test}


def same_tasks(a: list[ad.Task], b: list[ad.Task]) -> bool:
    if [t.task_id for t in a] != [t.task_id for t in b]:
        return False
    for x, y in zip(a, b):
        pairs_x, pairs_y = x.train + x.test, y.train + y.test
        if len(pairs_x) != len(pairs_y):
            return False
        for (i1, o1), (i2, o2) in zip(pairs_x, pairs_y):
            if not np.array_equal(i1, i2) or not np.array_equal(o1, o2):
                return False
    return True


def one_grid_task(**override) -> dict:
    task = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]},
                      {"input": [[0, 5]], "output": [[5, 0]]}],
            "test": [{"input": [[7]], "output": [[7]]}]}
    task.update(override)
    return task


# ---- loading ----------------------------------------------------------------------------------------

def test_arc_agi_2_counts(arc2: ad.TaskSet, arc2_samples: list[ad.Sample]) -> None:
    assert len(arc2.tasks) == 1000 and arc2.skipped == []
    assert len(arc2_samples) == 3232
    assert len(ad.evaluation_samples(arc2)) == 1076
    assert "ARC-AGI-2 training" in arc2.description
    grid = arc2.tasks[0].train[0][0]
    assert grid.dtype == np.uint8 and grid.ndim == 2 and not grid.flags.writeable
    data = ad.TrainingData(arc2_samples, ad.DataSettings())
    assert data.num_batches(0) == 3232 and data.skipped(0) == []


def test_other_builtin_sets() -> None:
    assert len(ad.load_tasks("arc-agi-1").tasks) == 400
    evaluation = ad.load_tasks("arc-agi-2:evaluation")
    assert len(evaluation.tasks) == 120 and len(ad.evaluation_samples(evaluation)) == 167


def test_default_source_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ad, "DEFAULT_DATA_FILE", tmp_path / "training.json")
    assert "default: no --data and no data/training.json" in ad.load_tasks().description
    (tmp_path / "training.json").write_text((EXAMPLES / "tasks.json").read_text())
    taskset = ad.load_tasks()
    assert len(taskset.tasks) == 3 and "data/training.json exists" in taskset.description


def test_every_format_loads_the_same_tasks(arc2: ad.TaskSet, tmp_path: Path) -> None:
    subset = arc2.tasks[:6]
    (tmp_path / "tasks.json").write_text(json.dumps({t.task_id: task_json(t) for t in subset}))
    folder = tmp_path / "folder"
    folder.mkdir()
    for t in subset:
        (folder / f"{t.task_id}.json").write_text(json.dumps(task_json(t)))
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    (kaggle / "arc-agi_training_challenges.json").write_text(
        json.dumps({t.task_id: task_json(t, with_test_outputs=False) for t in subset}))
    solutions = {t.task_id: [as_json(o) for _, o in t.test] for t in subset}
    (kaggle / "arc-agi_training_solutions.json").write_text(json.dumps(solutions))
    elsewhere = tmp_path / "answers.json"
    elsewhere.write_text(json.dumps(solutions))
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "x_challenges.json").write_text(
        json.dumps({t.task_id: task_json(t, with_test_outputs=False) for t in subset}))

    loaded = [ad.load_tasks(str(tmp_path / "tasks.json")),
              ad.load_tasks(str(folder)),
              ad.load_tasks(str(kaggle / "arc-agi_training_challenges.json")),
              ad.load_tasks(str(tmp_path / "solo" / "x_challenges.json"), solutions=str(elsewhere))]
    for taskset in loaded:
        assert same_tasks(taskset.tasks, subset), taskset.description
    unsolved = ad.load_tasks(str(tmp_path / "solo" / "x_challenges.json"))
    assert all(o is None for t in unsolved.tasks for _, o in t.test) and "unknown" in unsolved.description


def test_hand_written_examples_agree() -> None:
    sets = [ad.load_tasks(str(EXAMPLES / "tasks.json")), ad.load_tasks(str(EXAMPLES / "tasks")),
            ad.load_tasks(str(EXAMPLES / "kaggle" / "example_challenges.json"))]
    by_id = [sorted(s.tasks, key=lambda t: t.task_id) for s in sets]
    assert same_tasks(by_id[0], by_id[1]) and same_tasks(by_id[0], by_id[2])
    one_pair = sets[0].get("one_pair")
    samples = ad.training_samples([one_pair])
    assert len(samples) == 1 and samples[0].demos == ()
    encoded = ad.encode_sample(samples[0], 8192)
    assert encoded is not None and encoded.demos_used == 0


# ---- validation -------------------------------------------------------------------------------------

BAD_TASKS = {
    "ragged": (one_grid_task(train=[{"input": [[1, 2], [3]], "output": [[1]]}]),
               ["train pair 0 input", "row 1 has 1 cells", "rectangular"]),
    "too_big": (one_grid_task(test=[{"input": [[0] * 31 for _ in range(31)]}]),
                ["test pair 0 input", "31x31"]),
    "colour_10": (one_grid_task(train=[{"input": [[1]], "output": [[1]]}, {"input": [[1]], "output": [[2, 10]]}]),
                  ["train pair 1 output", "is 10", "0-9"]),
    "no_train": (one_grid_task(train=[]), ["no train pairs"]),
    "float_cell": (one_grid_task(train=[{"input": [[1.5]], "output": [[1]]}]), ["train pair 0 input", "1.5"]),
    "string_cell": (one_grid_task(train=[{"input": [["1"]], "output": [[1]]}]), ["integers 0-9"]),
    "empty_grid": (one_grid_task(train=[{"input": [], "output": [[1]]}]), ["non-empty list of rows"]),
    "no_output": (one_grid_task(train=[{"input": [[1]]}]), ["train pair 0", "'output'"]),
    "not_object": ([1, 2, 3], ["expected an object"]),
}


@pytest.mark.parametrize("name", sorted(BAD_TASKS))
def test_bad_task_is_named_and_skipped_or_stops(name: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    raw, expected = BAD_TASKS[name]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"good": one_grid_task(), name: raw}))
    with pytest.raises(ad.DataError) as err:
        ad.load_tasks(str(path), strict=True)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"task {name}" in message
    for part in expected:
        assert part in message, message
    taskset = ad.load_tasks(str(path))
    assert [t.task_id for t in taskset.tasks] == ["good"] and len(taskset.skipped) == 1
    assert "1 invalid task(s) skipped" in capsys.readouterr().err


def test_bad_solutions_are_named(tmp_path: Path) -> None:
    challenges = tmp_path / "a_challenges.json"
    challenges.write_text(json.dumps({"t1": one_grid_task(test=[{"input": [[1]]}])}))
    (tmp_path / "a_solutions.json").write_text(json.dumps({"t1": [[[1]], [[2]]]}))
    with pytest.raises(ad.DataError, match=r"a_solutions.json: task t1: 2 solutions for 1 test inputs"):
        ad.load_tasks(str(challenges), strict=True)


BAD_FILES = {
    "malformed": (b'{"t": {"train": [}', "not valid JSON at line 1"),
    "truncated": (json.dumps({"t": one_grid_task()}).encode()[:-7], "looks truncated"),
    "deeply_nested": (b"[" * 200_000 + b"]" * 200_000, "nested far too deeply"),
    "binary": (bytes(range(256)) * 4, "not a JSON text file"),
    "empty": (b"  \n", "empty"),
    "list_top": (b"[1, 2]", "expected a JSON object mapping task ids"),
    "no_tasks": (b"{}", "no tasks"),
    "huge_int": (b'{"t": ' + b"9" * 5000 + b"}", "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_untrusted_file_ends_in_one_line(name: str, tmp_path: Path) -> None:
    content, expected = BAD_FILES[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(content)
    with pytest.raises(ad.DataError) as err:
        ad.load_tasks(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_huge_file_and_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"t": one_grid_task()}))
    monkeypatch.setattr(ad, "MAX_FILE_BYTES", 64)
    with pytest.raises(ad.DataError, match="larger than"):
        ad.load_tasks(str(path))
    with pytest.raises(ad.DataError, match="no such file or folder"):
        ad.load_tasks(str(tmp_path / "missing.json"))


def test_source_without_valid_task_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"a": one_grid_task(train=[]), "b": one_grid_task(train=[])}))
    with pytest.raises(ad.DataError, match="no valid task"):
        ad.load_tasks(str(path))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(one_grid_task()))
    (folder / "broken.json").write_bytes(b"\x00\xff\xfe")
    taskset = ad.load_tasks(str(folder))
    assert [t.task_id for t in taskset.tasks] == ["good"] and "broken.json" in taskset.skipped[0]
    with pytest.raises(ad.DataError, match="broken.json"):
        ad.load_tasks(str(folder), strict=True)


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"[" * 100_000)
    result = subprocess.run([sys.executable, str(ROOT / "arc_dataset.py"), "--data", str(path), "--stats"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---- tokens -----------------------------------------------------------------------------------------

def test_encode_layout_labels_and_decode(arc2_samples: list[ad.Sample]) -> None:
    sample = next(s for s in arc2_samples if len(s.demos) == 2)
    encoded = ad.encode_sample(sample, 8192)
    ids = encoded.input_ids
    assert ids.dtype == np.uint8 and ids[0] == ad.BOS and ids[-1] == ad.EOS
    assert (ids == ad.INPUT).sum() == 3 and (ids == ad.OUTPUT).sum() == 3
    assert ids[encoded.target_start - 1] == ad.OUTPUT
    h, w = sample.target.shape
    assert len(ids) - encoded.target_start == h * (w + 1) + 1
    labels = encoded.labels()
    assert (labels[: encoded.target_start] == ad.IGNORE_INDEX).all()
    assert np.array_equal(labels[encoded.target_start:], ids[encoded.target_start:])
    assert np.array_equal(ad.decode_grid(ids[encoded.target_start:]), sample.target)
    assert np.array_equal(ad.decode_grid(torch.from_numpy(ids[encoded.target_start:])), sample.target)
    first_demo = ids[2: 2 + sample.demos[0][0].size + sample.demos[0][0].shape[0]]
    assert np.array_equal(ad.decode_grid(first_demo), sample.demos[0][0])
    prompt = ad.encode_prompt(sample, 8192)
    assert prompt[-1] == ad.OUTPUT and np.array_equal(prompt, ids[: encoded.target_start])


@pytest.mark.parametrize("tokens, problem", [
    ([], "empty"), ([ad.EOS, 1, ad.ROW_END], "empty"),
    ([1, 2, ad.ROW_END, 3, ad.ROW_END], "different"),
    ([1, ad.INPUT, ad.ROW_END], "unexpected symbol I"),
    ([1, 2, ad.ROW_END, 3, 4], "row end"),
    ([ad.ROW_END], "zero"),
    ([1] * 31 + [ad.ROW_END], "31"),
])
def test_decode_reports_malformed_output(tokens: list[int], problem: str) -> None:
    with pytest.raises(ad.DecodeError, match=problem):
        ad.decode_grid(tokens)


def test_decode_stops_at_eos() -> None:
    grid = ad.decode_grid([1, 2, ad.ROW_END, 3, 4, ad.ROW_END, ad.EOS, 9, ad.PAD])
    assert grid.tolist() == [[1, 2], [3, 4]]


def test_max_length_drops_farthest_demonstrations() -> None:
    demos = tuple((np.full((2, 2), k, np.uint8), np.full((2, 2), k, np.uint8)) for k in (1, 2, 3))
    sample = ad.Sample("t", 0, demos, np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8))
    full = ad.encode_sample(sample, 8192)
    demo_len, fixed = 2 + 6 + 6, 1 + 1 + 6 + 1 + 6 + 1
    assert len(full.input_ids) == fixed + 3 * demo_len and full.demos_dropped == 0
    shortened = ad.encode_sample(sample, fixed + 2 * demo_len)
    assert shortened.demos_used == 2 and shortened.demos_dropped == 1
    assert len(shortened.input_ids) == fixed + 2 * demo_len
    kept_colours = set(shortened.input_ids[: shortened.target_start].tolist())
    assert 1 not in kept_colours and {2, 3} <= kept_colours  # the first (farthest) demonstration went
    assert ad.encode_sample(sample, fixed + demo_len).demos_used == 1
    assert ad.encode_sample(sample, fixed + demo_len - 1) is None  # never fewer than one demonstration
    alone = ad.Sample("t", 0, (), sample.query, sample.target)
    assert ad.encode_sample(alone, fixed).demos_used == 0 and ad.encode_sample(alone, fixed - 1) is None
    data = ad.TrainingData([sample, alone], ad.DataSettings(max_length=fixed + demo_len - 1, augment=False))
    assert len(data.encoded(0)) == 1 and data.skipped(0) == [("t", 0)]


# ---- augmentation -----------------------------------------------------------------------------------

def test_augmentations_are_invertible_and_keep_background() -> None:
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 10, size=(3, 5)).astype(np.uint8)
    seen = set()
    for transform in range(8):
        aug = ad.Augmentation(transform, (0, *rng.permutation(np.arange(1, 10)).tolist()))
        out = aug.apply(grid)
        assert np.array_equal(aug.invert(out), grid)
        assert np.array_equal(out == 0, ad._dihedral(grid == 0, transform))  # 0 stays 0
        seen.add(ad.Augmentation(transform).apply(grid).tobytes() + bytes(out.shape))
    assert len(seen) == 8
    for _ in range(20):
        aug = ad.Augmentation.random(rng, 4)
        assert aug.colours[0] == 0 and sorted(aug.demo_order) == [0, 1, 2, 3]


def test_epoch_encoding_matches_augment_then_encode(arc2_samples: list[ad.Sample]) -> None:
    samples = arc2_samples[:300]
    data = ad.TrainingData(samples, ad.DataSettings(seed=3))
    encoded = data.encoded(2)
    assert len({e.augmentation.transform for e in encoded}) == 8
    for sample, fast in zip(samples[::37], encoded[::37]):
        slow = ad.encode_sample(ad.augment_sample(sample, fast.augmentation), 8192)
        assert np.array_equal(fast.input_ids, slow.input_ids) and fast.target_start == slow.target_start
        predicted = ad.decode_grid(fast.input_ids[fast.target_start:])
        assert np.array_equal(fast.augmentation.invert(predicted), sample.target)


def test_augmentation_is_deterministic_by_seed_and_epoch(arc2_samples: list[ad.Sample]) -> None:
    samples = arc2_samples[:200]
    ids = lambda data, epoch: [e.input_ids for e in data.encoded(epoch)]  # noqa: E731
    a, b = ad.TrainingData(samples, ad.DataSettings(seed=5)), ad.TrainingData(samples, ad.DataSettings(seed=5))
    assert all(np.array_equal(x, y) for x, y in zip(ids(a, 1), ids(b, 1)))
    assert a.batch_plan(1) == b.batch_plan(1)
    c = ad.TrainingData(samples, ad.DataSettings(seed=6))
    assert not all(np.array_equal(x, y) for x, y in zip(ids(a, 1), ids(c, 1)))
    assert not all(np.array_equal(x, y) for x, y in zip(ids(a, 1), ids(a, 2)))
    plain = ad.TrainingData(samples, ad.DataSettings(augment=False))
    assert all(np.array_equal(x, ad.encode_sample(s, 8192).input_ids) for x, s in zip(ids(plain, 4), samples))


# ---- batches ----------------------------------------------------------------------------------------

def test_batch_size_one_and_resume(arc2_samples: list[ad.Sample]) -> None:
    data = ad.TrainingData(arc2_samples[:50], ad.DataSettings())
    batches = list(data.batches(0))
    assert len(batches) == data.num_batches(0) == 50
    assert all(b.attention_mask is None and b.segment_ids is None and b.input_ids.shape[0] == 1 for b in batches)
    assert sorted(s for b in batches for s in b.samples) == sorted((s.task_id, s.index) for s in arc2_samples[:50])
    resumed = next(data.batches(0, start=7))
    assert torch.equal(resumed.input_ids, batches[7].input_ids)
    b = batches[0]
    assert b.num_tokens == b.input_ids.numel() and b.num_target_tokens == int((b.labels != ad.IGNORE_INDEX).sum())
    assert torch.equal(b.position_ids[0], torch.arange(b.input_ids.shape[1]))


def test_length_grouped_batches_pad_little(arc2_samples: list[ad.Sample]) -> None:
    data = ad.TrainingData(arc2_samples, ad.DataSettings(batch_size=8))
    plan = data.batch_plan(0)
    assert len(plan) == data.num_batches(0) == math.ceil(3232 / 8)
    assert sorted(i for batch in plan for i in batch) == list(range(3232))
    fresh = ad.TrainingData(arc2_samples, ad.DataSettings(batch_size=8))
    assert fresh.num_batches(0) == len(plan)
    real = padded = 0
    for k, batch in enumerate(data.batches(0)):
        real += batch.num_tokens
        padded += batch.input_ids.numel()
        if batch.attention_mask is not None:
            pad = batch.attention_mask == 0
            assert (batch.input_ids[pad] == ad.PAD).all() and (batch.labels[pad] == ad.IGNORE_INDEX).all()
            assert int(batch.attention_mask.sum()) == batch.num_tokens
        if k > 60:
            break
    assert 1 - real / padded < 0.10


def test_packed_rows_respect_budget_and_segments(arc2_samples: list[ad.Sample]) -> None:
    budget = 8192
    data = ad.TrainingData(arc2_samples, ad.DataSettings(tokens_per_batch=budget))
    plan = data.batch_plan(0)
    lengths = data.lengths(0)
    assert sorted(i for row in plan for i in row) == list(range(3232))
    assert max(lengths[row].sum() for row in plan) <= budget
    assert len(plan) <= math.ceil(lengths.sum() / budget) * 1.05  # first-fit-decreasing packs tightly
    for k, batch in enumerate(data.batches(0)):
        segments, ids, labels = batch.segment_ids[0], batch.input_ids[0], batch.labels[0]
        assert batch.input_ids.shape[0] == 1 and ids.numel() <= budget and batch.attention_mask is None
        starts = torch.nonzero(batch.position_ids[0] == 0).flatten()
        assert torch.equal(ids[starts], torch.full_like(starts, ad.BOS))
        assert (labels[starts] == ad.IGNORE_INDEX).all()  # no loss term predicts across a boundary
        assert segments[0] == 1 and int(segments.max()) == len(batch.samples) == len(starts)
        assert torch.equal(segments[starts], torch.arange(1, len(starts) + 1))
        for s in range(1, len(starts) + 1):
            in_segment = segments == s
            labelled = labels[in_segment] != ad.IGNORE_INDEX
            assert labels[in_segment][-1] == ad.EOS and labelled.sum() > 0
            assert torch.equal(labels[in_segment][labelled], ids[in_segment][labelled])
        if k > 40:
            break


@pytest.mark.parametrize("settings", [ad.DataSettings(), ad.DataSettings(batch_size=8),
                                      ad.DataSettings(tokens_per_batch=8192)], ids=["single", "grouped", "packed"])
def test_computed_tokens_are_the_collated_batches_sizes(arc2_samples: list[ad.Sample], settings) -> None:
    data = ad.TrainingData(arc2_samples[:400], settings)
    assert data.computed_tokens(0) == [batch.input_ids.numel() for batch in data.batches(0)]


def test_settings_are_checked() -> None:
    with pytest.raises(ad.DataError, match="tokens_per_batch"):
        ad.DataSettings(max_length=8192, tokens_per_batch=4096)
    with pytest.raises(ad.DataError, match="exclude"):
        ad.DataSettings(batch_size=4, tokens_per_batch=8192)


# ---- command line -----------------------------------------------------------------------------------

def test_cli_stats_json_on_arc_agi_2() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "arc_dataset.py"), "--data", "arc-agi-2", "--stats",
                             "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    stats = json.loads(result.stdout)
    assert stats["tasks"] == 1000 and stats["samples"] == 3232 and stats["eval_samples"] == 1076
    assert stats["skipped"] == 0 and stats["length_max"] <= 8192
    assert stats["length_p50"] <= stats["length_p99"] <= stats["length_max"]
    assert stats["build_seconds"] > 0 and stats["tokens_total"] > 3232 * 500


def test_cli_stats_max_length_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert ad.main(["--data", str(EXAMPLES / "tasks.json"), "--max-length", "40", "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tasks"] == 3 and stats["samples"] + stats["skipped"] == 6 and stats["length_max"] <= 40
    assert ad.main(["--data", str(EXAMPLES / "tasks"), "--show", "flip_rows", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "train pair 0: input 3x3 -> output 3x3" in out and "  1 0 0   ->   0 0 3" in out
    with pytest.raises(ad.DataError, match="not in"):
        ad.main(["--data", str(EXAMPLES / "tasks"), "--show", "nope"])


# ---- huge tasks: leave-one-out in linear time -------------------------------------------------------

def numbered_task(n: int) -> ad.Task:
    """A task whose pair k has input [[digits of k]] and output the digits reversed: each demonstration in
    a sample can be read back to the pair it came from."""
    def grid(digits: list[int]) -> np.ndarray:
        g = np.array([digits], dtype=np.uint8)
        g.setflags(write=False)
        return g
    pairs = [(grid([k // 10000 % 10, k // 1000 % 10, k // 100 % 10, k // 10 % 10, k % 10]),
              grid([k % 10, k // 10 % 10, k // 100 % 10, k // 1000 % 10, k // 10000 % 10])) for k in range(n)]
    return ad.Task("numbered", pairs, [])


def demo_pairs(encoded: ad.EncodedSample) -> list[int]:
    """The pair numbers of a sample's demonstrations, in sequence order, undoing its augmentation."""
    ids = encoded.input_ids[: encoded.target_start].tolist()
    starts = [i for i, t in enumerate(ids) if t == ad.INPUT][:-1]  # the last INPUT is the query's
    numbers = []
    for start in starts:
        end = ids.index(ad.OUTPUT, start)
        grid = ad.decode_grid(ids[start + 1: end])
        if encoded.augmentation is not None:
            grid = encoded.augmentation.invert(grid)
        numbers.append(int("".join(str(c) for c in grid.ravel())))
    return numbers


@pytest.mark.parametrize("augment", [False, True])
def test_huge_task_keeps_the_length_rule(augment: bool) -> None:
    task = numbered_task(300)
    samples = ad.training_samples([task])
    assert len(samples[5].demos) == 299 and samples[5].demos[5] is task.train[6]
    data = ad.TrainingData(samples, ad.DataSettings(max_length=600, augment=augment))
    encoded = data.encoded(0)
    assert len(encoded) == 300 and all(len(e) <= 600 for e in encoded)
    for e in encoded[::29]:
        kept = demo_pairs(e)
        assert len(kept) == e.demos_used == len(set(kept)) and e.index not in kept
        assert e.demos_used + e.demos_dropped == 299 and e.demos_used > 0
        assert 600 - len(e) < 2 + 2 * 6  # as full as the rule allows: one more demonstration would not fit
        if not augment:  # the nearest demonstrations, in task order, exactly as encode_sample builds them
            assert np.array_equal(e.input_ids, ad.encode_sample(samples[e.index], 600).input_ids)
    if augment:
        assert len({tuple(demo_pairs(e)) for e in encoded[:20]}) == 20  # drawn, not always the same


def test_20000_pair_task_builds_in_seconds() -> None:
    """Each sample used to copy and tokenise all the other pairs: a 6000-pair task took 2 min 17 s and
    2.6 GB. Linear now (1.1 s / 3.1 s for 20,000 pairs at 1024 tokens on the 2-core CI machine); the
    bound is generous but far below what the quadratic cost would take."""
    import time
    task = numbered_task(20_000)
    start = time.perf_counter()
    samples = ad.training_samples([task])
    for augment in (False, True):
        data = ad.TrainingData(samples, ad.DataSettings(max_length=1024, augment=augment))
        assert len(data.encoded(0)) == 20_000
    assert time.perf_counter() - start < 30
