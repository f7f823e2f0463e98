"""Selection baselines that need no gradients: random, BM25 (bm25s), and RDS-style cosine similarity.

Each returns scores with the same "max over validation tasks" shape as `influence.influence_scores`, so the
selection and report code is shared by every method.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator, Sequence

import bm25s
import numpy as np
import torch
from bm25s.tokenization import Tokenized

from rose_pl.errors import ConfigError
from rose_pl.selection.influence import DEFAULT_BLOCK_SIZE, InfluenceResult, influence_scores, task_groups

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
# bm25s sets its logger to DEBUG on import, which would let its per-call debug lines through the app's handlers.
logging.getLogger("bm25s").setLevel(logging.WARNING)

DEFAULT_BM25_BATCH = 4096  # pool texts tokenized per step
_POSTINGS_BLOCK = 1 << 22  # index entries gathered per step of the per-task product (~100 MB of temporaries)


def random_scores(n: int, seed: int) -> np.ndarray:
    """(n,) float64 uniform scores; top-p of them is a uniformly random p% of the pool."""
    if n <= 0:
        raise ConfigError(f"random_scores needs n > 0, got {n}")
    return np.random.default_rng(seed).random(n)


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens (regex \\w+), the tokenizer BM25 uses on both sides."""
    return _WORD.findall(text.lower())


def _text_batches(pool_texts: Iterable[str] | Iterable[Sequence[str]], batch_size: int) -> Iterator[list[str]]:
    """Lists of at most `batch_size` pool texts (a batch given by the caller is passed on whole), in order."""
    if isinstance(pool_texts, (str, bytes)):
        raise ConfigError("bm25 pool_texts must be an iterable of strings (or of batches of strings), not one string")
    buffer: list[str] = []
    for item in pool_texts:
        if isinstance(item, str):
            buffer.append(item)
            if len(buffer) >= batch_size:
                yield buffer
                buffer = []
            continue
        if buffer:
            yield buffer
            buffer = []
        batch = list(item) if isinstance(item, Iterable) and not isinstance(item, bytes) else [item]
        bad = [type(t).__name__ for t in batch if not isinstance(t, str)]
        if bad:
            raise ConfigError(f"bm25 pool_texts items must be strings or batches of strings; got {bad[0]}")
        yield batch
    if buffer:
        yield buffer


class _TokenIdCorpus:
    """The tokenized pool as token ids: one int32 array per batch of documents plus the documents' offsets in it.

    This is what bm25s indexes (it iterates the corpus several times): ~4 bytes per token instead of a Python
    list per document. Iterating yields each document's ids as a list, one batch at a time.
    """

    def __init__(self) -> None:
        # token -> id in order of first occurrence; a missing token gets the next id (map() runs this in C)
        self.vocab: defaultdict[str, int] = defaultdict()
        self.vocab.default_factory = self.vocab.__len__
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (token ids, offsets) per batch
        self.num_docs = 0

    def add(self, texts: list[str]) -> None:
        lookup, findall, ids, offsets = self.vocab.__getitem__, _WORD.findall, [], [0]
        for text in texts:
            ids.extend(map(lookup, findall(text.lower())))
            offsets.append(len(ids))
        self.chunks.append((np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64)))
        self.num_docs += len(texts)

    def __len__(self) -> int:
        return self.num_docs

    def __iter__(self) -> Iterator[list[int]]:
        for ids, offsets in self.chunks:
            flat, bounds = ids.tolist(), offsets.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                yield flat[start:end]


def _okapi_idf(df: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    """rank_bm25.BM25Okapi's idf: log((n - df + .5) / (df + .5)); negative values (terms in more than half of the
    documents) are replaced by epsilon times the mean idf of the whole vocabulary (taken before that floor).

    The mean is an exactly rounded sum (math.fsum); rank_bm25 adds the idfs one by one, which is off by up to
    ~1e-13 relative (4e-14 on the demo data), so floored terms differ from rank_bm25 by that much."""
    idf = np.log(n - df + 0.5) - np.log(df + 0.5)
    floor = epsilon * (math.fsum(idf.tolist()) / len(idf))
    return np.where(idf < 0, floor, idf)


def bm25_scores(
    pool_texts: Iterable[str] | Iterable[Sequence[str]],
    val_texts: Sequence[str],
    task_ids: Sequence[str],
    k1: float = 1.5,
    b: float = 0.75,
    epsilon: float = 0.25,
    batch_size: int = DEFAULT_BM25_BATCH,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """BM25 relevance of each pool document to each validation task; returns (scores, per_task, tasks).

    per_task[:, j] is the mean over task j's validation texts of BM25(query=validation text, docs=pool), with
    rank_bm25.BM25Okapi's scoring (idf floor `epsilon` included, repeated query tokens counted each time); scores
    is its max over tasks (float64). The pool is read once, as an iterable of strings or of batches of strings
    (`batch_size` strings are tokenized at a time), and kept only as int32 token ids, then as bm25s's sparse index
    (12 bytes per distinct (document, token) pair): memory is that index plus O(N) arrays, with a transient peak
    of about 4x the index while bm25s builds it (its COO arrays and the sort into CSC).

    bm25s builds the token x document matrix of (k1 + 1) tf / (tf + k1 (1 - b + b dl / avgdl)) x idf (its "atire"
    term weight). Its idf choices have no epsilon floor ("robertson" clips negative idf to 0), so the index is built
    with the always-positive "bm25+" idf, log((n + 1) / df), and each column used is rescaled to the Okapi idf.
    per_task is then (task weights over the vocabulary) x that matrix, as bincounts over the query tokens' postings.
    """
    if len(val_texts) != len(task_ids):
        raise ConfigError(f"{len(task_ids)} task ids for {len(val_texts)} validation texts")
    if len(val_texts) == 0:
        raise ConfigError("bm25 needs at least one validation text")
    if batch_size < 1:
        raise ConfigError(f"bm25 batch_size must be >= 1, got {batch_size}")
    tasks, inverse = task_groups(task_ids)
    num_tasks = len(tasks)

    corpus = _TokenIdCorpus()
    for batch in _text_batches(pool_texts, batch_size):
        corpus.add(batch)
    n, vocab = corpus.num_docs, corpus.vocab
    if n == 0:
        raise ConfigError("bm25 needs a non-empty pool")
    if not vocab:
        raise ConfigError(f"bm25: none of the {n} pool documents has a word token")

    retriever = bm25s.BM25(k1=k1, b=b, method="atire", idf_method="bm25+", dtype="float64", int_dtype="int32",
                           backend="numpy", csc_backend="numpy")
    retriever.index(Tokenized(ids=corpus, vocab=vocab), create_empty_token=False, show_progress=False)
    del corpus  # the token ids; bm25s keeps the sparse matrix
    index = retriever.scores
    data, docs, indptr = index["data"], index["indices"], index["indptr"]  # CSC of shape (n, |vocab|)
    df = np.diff(indptr).astype(np.float64)  # every (document, token) pair with tf > 0 is one stored entry
    rescale = _okapi_idf(df, n, epsilon) / np.log((n + 1) / df)  # Okapi idf / the "bm25+" idf bm25s used

    # weight[r, t] = occurrences of token cols[r] in task t's queries / number of queries in task t
    sizes = np.bincount(inverse, minlength=num_tasks).astype(np.float64)
    rows: dict[int, np.ndarray] = {}
    for text, t in zip(val_texts, inverse):
        for tok, count in Counter(tokenize(text)).items():
            col = vocab.get(tok)
            if col is not None:  # a token absent from the pool scores 0 in every document
                rows.setdefault(col, np.zeros(num_tasks))[t] += count / sizes[t]
    cols = np.asarray(sorted(rows), dtype=np.int64)
    weight = np.stack([rows[c] for c in cols.tolist()]) if len(cols) else np.zeros((0, num_tasks))
    weight *= rescale[cols][:, None]

    per_task = np.zeros((n, num_tasks), dtype=np.float64)
    starts, lengths = indptr[cols], indptr[cols + 1] - indptr[cols]
    bounds = np.concatenate([[0], np.cumsum(lengths)])  # bounds[r]: postings of cols[:r]
    first = 0
    while first < len(cols):  # column blocks of at most _POSTINGS_BLOCK postings (or one column), in a fixed order
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + _POSTINGS_BLOCK, "right")) - 1)
        lens = lengths[first:last]
        block_col = np.repeat(np.arange(last - first), lens)
        pos = np.repeat(starts[first:last] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        block_docs, block_data = docs[pos], data[pos]
        for t in range(num_tasks):
            per_task[:, t] += np.bincount(block_docs, weights=block_data * weight[first:last, t][block_col],
                                          minlength=n)
        first = last
    log.info("bm25 (bm25s): %d pool documents, %d terms, %d index entries; %d validation texts in %d tasks",
             n, len(vocab), len(data), len(val_texts), num_tasks)
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
