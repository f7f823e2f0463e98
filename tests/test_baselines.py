import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

from rose_pl.selection.baselines import bm25_scores, cosine_scores, random_scores, tokenize
from rose_pl.errors import ConfigError
from rose_pl.selection.select import select

POOL = [
    "Solve the equation 3x + 5 = 20 for x and show each algebra step.",
    "Write a short poem about autumn leaves falling in the park.",
    "Translate the sentence 'good morning' into French and Spanish.",
    "What is the capital city of Australia? Answer in one word.",
    "Explain how to compute the derivative of x squared using the limit definition.",
    "Give me a recipe for a chocolate cake with frosting.",
    "List three tips for a job interview.",
    "Summarize the plot of Hamlet in two sentences.",
]
MATH, POEM = 0, 1


def test_random_scores_are_uniform_and_seeded():
    a, b = random_scores(1000, seed=3), random_scores(1000, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_scores(1000, seed=4))
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(a.mean() - 0.5) < 0.05
    assert select(a, fraction=0.05).shape == (50,)


def test_tokenize_lowercases_words_and_drops_punctuation():
    assert tokenize("Solve 3x + 5 = 20, for X!") == ["solve", "3x", "5", "20", "for", "x"]


def test_bm25_ranks_on_topic_document_first_for_each_task():
    val = ["Solve for x: 2x + 7 = 15. Show the algebra step by step.",
           "Compute x in the equation 4x = 12.",
           "Write a poem about autumn in the park."]
    scores, per_task, tasks = bm25_scores(POOL, val, ["math", "math", "poetry"])
    assert tasks == ["math", "poetry"]
    assert int(np.argmax(per_task[:, 0])) == MATH
    assert int(np.argmax(per_task[:, 1])) == POEM
    assert per_task[MATH, 0] > per_task[[2, 3, 5, 6, 7], 0].max()
    np.testing.assert_allclose(scores, per_task.max(axis=1))


def test_bm25_one_query_equals_rank_bm25_get_scores():
    query = "How do I solve the equation for x in algebra, step by step?"
    scores, per_task, _ = bm25_scores(POOL, [query], ["t"])
    direct = BM25Okapi([tokenize(t) for t in POOL]).get_scores(tokenize(query))
    np.testing.assert_allclose(per_task[:, 0], direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scores, direct, rtol=1e-12, atol=1e-12)


def test_bm25_task_score_is_mean_over_its_queries_in_shuffled_order():
    rng = np.random.default_rng(0)
    pool = [" ".join(rng.choice(list("abcdefghij"), rng.integers(3, 12))) for _ in range(60)]
    val = [" ".join(rng.choice(list("abcdefghijk"), rng.integers(2, 6))) for _ in range(9)]
    task_ids = ["t1", "t2", "t1", "t3", "t2", "t1", "t1", "t3", "t2"]
    _, per_task, tasks = bm25_scores(pool, val, task_ids)
    index = BM25Okapi([tokenize(t) for t in pool])
    for j, task in enumerate(tasks):
        direct = np.mean([index.get_scores(tokenize(q)) for q, t in zip(val, task_ids) if t == task], axis=0)
        np.testing.assert_allclose(per_task[:, j], direct, rtol=1e-10, atol=1e-10)


def test_bm25_input_errors():
    with pytest.raises(ConfigError, match="2 task ids for 1 validation texts"):
        bm25_scores(POOL, ["q"], ["a", "b"])
    with pytest.raises(ConfigError, match="non-empty pool"):
        bm25_scores([], ["q"], ["a"])


def test_cosine_scores_are_mean_cosine_per_task():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((30, 8)) * rng.uniform(0.1, 10, (30, 1))  # norms vary: cosine must ignore them
    val = rng.standard_normal((7, 8))
    task_ids = ["b", "a", "b", "a", "a", "c", "b"]
    result = cosine_scores(train.astype(np.float32), torch.from_numpy(val), task_ids, block_size=4, device="cpu")
    cos = (train / np.linalg.norm(train, axis=1, keepdims=True)) @ (val / np.linalg.norm(val, axis=1,
                                                                                        keepdims=True)).T
    expected = np.stack([cos[:, [i for i, t in enumerate(task_ids) if t == task]].mean(axis=1)
                         for task in ["a", "b", "c"]], axis=1)
    assert result.tasks == ["a", "b", "c"]
    np.testing.assert_allclose(result.per_task, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(result.scores) <= 1 + 1e-5)


def test_cosine_scores_reject_zero_embeddings():
    train = np.ones((5, 4), dtype=np.float32)
    train[2] = 0
    with pytest.raises(ConfigError, match="1 embedding rows .* zero norm"):
        cosine_scores(train, np.ones((2, 4)), ["a", "a"], device="cpu")
