"""Selection baselines that need no gradients: random, BM25 (rank-bm25), and RDS-style cosine similarity.

Each returns scores with the same "max over validation tasks" shape as `influence.influence_scores`, so the
selection and report code is shared by every method.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from rank_bm25 import BM25Okapi

from rose_pl.errors import ConfigError
from rose_pl.selection.influence import DEFAULT_BLOCK_SIZE, InfluenceResult, influence_scores, task_groups

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)


def random_scores(n: int, seed: int) -> np.ndarray:
    """(n,) float64 uniform scores; top-p of them is a uniformly random p% of the pool."""
    if n <= 0:
        raise ConfigError(f"random_scores needs n > 0, got {n}")
    return np.random.default_rng(seed).random(n)


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens (regex \\w+), the tokenizer BM25 uses on both sides."""
    return _WORD.findall(text.lower())


def bm25_index(pool_texts: Sequence[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> BM25Okapi:
    """rank_bm25's BM25Okapi over the tokenized pool (its idf floor and parameters are used as is)."""
    if len(pool_texts) == 0:
        raise ConfigError("bm25 needs a non-empty pool")
    return BM25Okapi([tokenize(t) for t in pool_texts], k1=k1, b=b, epsilon=epsilon)


def _postings(bm25: BM25Okapi, vocab: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """token -> (doc indices, term frequencies) for the query vocabulary only."""
    docs: dict[str, list[int]] = defaultdict(list)
    tfs: dict[str, list[int]] = defaultdict(list)
    for d, freqs in enumerate(bm25.doc_freqs):
        # Iterate the smaller side: most pool documents share few words with the validation set.
        shared = (t for t in vocab if t in freqs) if len(freqs) > len(vocab) else (t for t in freqs if t in vocab)
        for tok in shared:
            docs[tok].append(d)
            tfs[tok].append(freqs[tok])
    return {t: (np.asarray(docs[t], dtype=np.int64), np.asarray(tfs[t], dtype=np.float64)) for t in docs}


def bm25_scores(
    pool_texts: Sequence[str],
    val_texts: Sequence[str],
    task_ids: Sequence[str],
    k1: float = 1.5,
    b: float = 0.75,
    epsilon: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """BM25 relevance of each pool document to each validation task; returns (scores, per_task, tasks).

    per_task[:, j] is the mean over task j's validation texts of BM25(query=validation text, docs=pool);
    scores is its max over tasks (float64). Equals averaging `BM25Okapi.get_scores` per query, but is
    computed from the index's postings: BM25 is a sum over query tokens, so each distinct token is scored
    once against only the documents containing it instead of once per query against every document.
    """
    if len(val_texts) != len(task_ids):
        raise ConfigError(f"{len(task_ids)} task ids for {len(val_texts)} validation texts")
    if len(val_texts) == 0:
        raise ConfigError("bm25 needs at least one validation text")
    tasks, inverse = task_groups(task_ids)
    bm25 = bm25_index(pool_texts, k1=k1, b=b, epsilon=epsilon)
    n, num_tasks = bm25.corpus_size, len(tasks)

    # weight[token][task] = occurrences of token in task's queries / number of queries in the task
    sizes = np.bincount(inverse, minlength=num_tasks).astype(np.float64)
    weight: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(num_tasks))
    for text, t in zip(val_texts, inverse):
        for tok, count in Counter(tokenize(text)).items():
            weight[tok][t] += count / sizes[t]

    doc_len = np.asarray(bm25.doc_len, dtype=np.float64)
    norm = bm25.k1 * (1 - bm25.b + bm25.b * doc_len / bm25.avgdl)
    per_task = np.zeros((n, num_tasks), dtype=np.float64)
    postings = _postings(bm25, set(weight))
    for tok in sorted(postings):  # a fixed summation order: bit-identical scores across runs (hash seeds)
        docs, tf = postings[tok]
        idf = bm25.idf.get(tok) or 0  # same lookup as rank_bm25.get_scores
        contrib = idf * tf * (bm25.k1 + 1) / (tf + norm[docs])
        per_task[docs] += contrib[:, None] * weight[tok][None, :]
    log.info("bm25: %d pool documents x %d validation texts in %d tasks", n, len(val_texts), num_tasks)
    return per_task.max(axis=1), per_task, tasks


class _RowNormalized:
    """Row-L2-normalized view of an N x d array-like, computed per block so large pools stay on disk."""

    def __init__(self, x: Any):
        self.x = x
        self.shape = tuple(x.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        block = np.asarray(self.x[rows], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        zero = int(np.count_nonzero(norms == 0))
        if zero:
            raise ConfigError(f"{zero} embedding rows in {rows} have zero norm; cosine similarity is undefined")
        return block / norms


def cosine_scores(
    train_emb: Any,
    val_emb: Any,
    task_ids: Sequence[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
) -> InfluenceResult:
    """RDS-style scores: mean over each task's validation rows of cos(train, val), max over tasks.

    The mean of cosines equals the inner product with the mean of unit-normalized validation rows, so this
    is `influence_scores` with one "checkpoint" of L2-normalized embeddings and weight 1.
    """
    if isinstance(train_emb, torch.Tensor):
        train_emb = train_emb.detach().float().cpu().numpy()
    if isinstance(val_emb, torch.Tensor):
        val_emb = val_emb.detach().float().cpu().numpy()
    for name, x in (("train_emb", train_emb), ("val_emb", val_emb)):
        if len(np.shape(x)) != 2:
            raise ConfigError(f"{name} must be 2-D (rows x hidden), got shape {np.shape(x)}")
    val_unit = _RowNormalized(val_emb)[0: val_emb.shape[0]]
    return influence_scores([_RowNormalized(train_emb)], [val_unit], task_ids, [1.0],
                            block_size=block_size, device=device)
