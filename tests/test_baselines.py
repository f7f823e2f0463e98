import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi  # test-only dependency: the implementation bm25_scores replaced

from reference import rank_bm25_scores
from rose_pl.selection.baselines import bm25_scores, cosine_scores, random_scores, tokenize
from rose_pl.errors import ConfigError
from rose_pl.selection.select import budget, select

DATA = Path(__file__).resolve().parents[1] / "data"

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


def _demo():
    pool = ["\n".join(m["content"] for m in json.loads(line)["messages"])
            for line in (DATA / "pool.jsonl").read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in (DATA / "validation.jsonl").read_text().splitlines() if line.strip()]
    return pool, [f"{r['prompt']}\n{r['chosen']}" for r in rows], [r["task"] for r in rows]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k indices, highest score first, equal scores by index."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


def test_bm25_equals_rank_bm25_on_the_demo_data():
    pool, val, task_ids = _demo()
    scores, per_task, tasks = bm25_scores(pool, val, task_ids)
    ref_scores, ref_per_task, ref_tasks = rank_bm25_scores(pool, val, task_ids)
    assert tasks == ref_tasks == ["cooking", "python"] and per_task.shape == (160, 2)
    # rank_bm25 sums the vocabulary's idfs one by one for the epsilon floor's mean; bm25_scores uses math.fsum.
    # On the demo data that moves the floored terms (6 words in more than half of the rows) by 4e-14 relative.
    np.testing.assert_allclose(per_task, ref_per_task, rtol=1e-12, atol=0)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=0)
    k = budget(len(pool), fraction=0.05)
    assert k == 8
    np.testing.assert_array_equal(_top(scores, k), _top(ref_scores, k))
    np.testing.assert_array_equal(select(scores, fraction=0.05), select(ref_scores, fraction=0.05))


def test_bm25_without_the_idf_floor_matches_rank_bm25_to_rounding():
    """epsilon=0 floors negative idfs to 0 in both, which removes the one summation-order difference."""
    pool, val, task_ids = _demo()
    _, per_task, _ = bm25_scores(pool, val, task_ids, epsilon=0.0)
    _, ref_per_task, _ = rank_bm25_scores(pool, val, task_ids, epsilon=0.0)
    np.testing.assert_allclose(per_task, ref_per_task, rtol=1e-14, atol=0)


@pytest.mark.parametrize("pool", [
    # "common" is in 5 of 6 documents and "the" in all 6: negative raw idf, floored to epsilon * mean idf > 0
    ["the common cat", "the common dog", "the common common bird", "the rare fish", "the common", "the common ox"],
    # nearly every word is in most documents: the mean idf is negative, and so is the floor
    ["a b", "a b c", "a b", "a c", "b c", "a b c d"],
])
def test_bm25_negative_idf_floor_and_repeated_query_tokens(pool):
    queries = ["common common the rare", "the THE the", "c c a d", "missing words only"]
    _, per_task, tasks = bm25_scores(pool, queries, ["q0", "q1", "q2", "q3"], k1=1.2, b=0.6, epsilon=0.3)
    index = BM25Okapi([tokenize(t) for t in pool], k1=1.2, b=0.6, epsilon=0.3)
    negative = [w for w in index.idf if sum(w in d for d in index.doc_freqs) > len(pool) / 2]
    assert negative and all(index.idf[w] == pytest.approx(0.3 * index.average_idf) for w in negative)
    for j, q in enumerate(queries):
        direct = index.get_scores(tokenize(q))  # repeats are scored each time
        np.testing.assert_allclose(per_task[:, j], direct, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(per_task[:, 3], 0.0)
    # a repeated token counts once per occurrence: "x x" scores twice "x"
    word = negative[0]
    single = bm25_scores(pool, [word], ["t"], epsilon=0.3)[1][:, 0]
    double = bm25_scores(pool, [f"{word} {word}"], ["t"], epsilon=0.3)[1][:, 0]
    np.testing.assert_allclose(double, 2 * single, rtol=1e-15)
    has_word = np.array([word in tokenize(t) for t in pool])
    assert np.all(single[has_word] != 0) and np.all(single[~has_word] == 0)  # not clipped to 0 like bm25s's idf


def test_bm25_streams_strings_or_batches_with_the_same_result():
    pool, val, task_ids = _demo()
    expected = bm25_scores(pool, val, task_ids)
    runs = [
        bm25_scores((t for t in pool), val, task_ids, batch_size=7),  # a one-shot generator of strings
        bm25_scores(iter([pool[:5], tuple(pool[5:90]), np.asarray(pool[90:])]), val, task_ids),  # batches
        bm25_scores([pool[:3], *pool[3:50], pool[50:]], val, task_ids, batch_size=1),  # both, mixed
    ]
    for scores, per_task, tasks in runs:
        assert tasks == expected[2]
        np.testing.assert_array_equal(per_task, expected[1])
        np.testing.assert_array_equal(scores, expected[0])


@pytest.mark.parametrize("block", [1, 50, 997])
def test_bm25_per_task_product_in_blocks_of_postings(monkeypatch, block):
    import rose_pl.selection.baselines as baselines

    pool, val, task_ids = _demo()
    expected = bm25_scores(pool, val, task_ids)[1]
    monkeypatch.setattr(baselines, "_POSTINGS_BLOCK", block)
    np.testing.assert_allclose(bm25_scores(pool, val, task_ids)[1], expected, rtol=1e-14, atol=0)


def test_bm25_input_errors():
    with pytest.raises(ConfigError, match="2 task ids for 1 validation texts"):
        bm25_scores(POOL, ["q"], ["a", "b"])
    with pytest.raises(ConfigError, match="non-empty pool"):
        bm25_scores([], ["q"], ["a"])
    with pytest.raises(ConfigError, match="non-empty pool"):
        bm25_scores(iter([[], []]), ["q"], ["a"])
    with pytest.raises(ConfigError, match="not one string"):
        bm25_scores("a pool of one string", ["q"], ["a"])
    with pytest.raises(ConfigError, match="strings or batches of strings; got int"):
        bm25_scores([["ok", 3]], ["q"], ["a"])
    with pytest.raises(ConfigError, match="got NoneType"):
        bm25_scores(["ok", None], ["q"], ["a"])
    with pytest.raises(ConfigError, match="none of the 2 pool documents has a word token"):
        bm25_scores(["", "?!"], ["q"], ["a"])


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
