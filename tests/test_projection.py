"""Projectors are tested for properties: determinism, order independence, JL accuracy against a dense
Gaussian yardstick, unbiasedness over seeds, exactness of the identity, TRAK's matrix reproduced."""

import json
import math
import random

import lightning.pytorch as L
import pytest
import torch

from rose_pl.errors import ConfigError
from rose_pl.features.projection import (
    CountSketchProjector,
    IdentityProjector,
    NormalizingSink,
    ProjectionCallback,
    TrakProjector,
    build_projector,
)

# Block sizes deliberately not multiples of the projected dims used below.
SHAPES = {"layers.0.lora_A.weight": torch.Size([7, 13]), "layers.0.bias": torch.Size([300]),
          "layers.1.lora_B.weight": torch.Size([33, 50])}
JL_DIM = 1024
JL_SHAPES = {"a": torch.Size([100, 97]), "b": torch.Size([3001]), "c": torch.Size([7, 1000]), "d": torch.Size([290])}
MSE_RATIO_TO_GAUSSIAN = 1.5  # CountSketch's inner-product MSE may exceed the dense Gaussian's by at most this


def _grads(shapes, num_samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(num_samples, *s, generator=g) for n, s in shapes.items()}


def _flat(grads, shapes):
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in shapes], dim=1)


def _split(flat, shapes):
    out, start = {}, 0
    for n, s in shapes.items():
        out[n] = flat[:, start:start + s.numel()].reshape(flat.shape[0], *s)
        start += s.numel()
    return out


def _make(kind, dim=64, seed=0, shapes=SHAPES, **kw):
    if kind == "trak":
        p = TrakProjector(dim, seed, backend="basic", block_size=16)
    else:
        p = build_projector(kind, dim, seed, **kw)
    p.setup(shapes, "cpu")
    return p


RANDOM_KINDS = ["countsketch", "gaussian", "trak"]


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_output_and_other_seed_other_output(kind):
    grads = _grads(SHAPES, 5)
    a, b, c = (_make(kind, seed=s).project(grads) for s in (3, 3, 4))
    assert a.shape == (5, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", RANDOM_KINDS + ["identity"])
def test_result_does_not_depend_on_add_order(kind):
    grads = _grads(SHAPES, 4)
    p = _make(kind)
    expected = p.project(grads)
    names = list(SHAPES)
    random.Random(0).shuffle(names)
    p.begin(4, "cpu")
    for n in reversed(names):
        p.add(n, grads[n])
    torch.testing.assert_close(p.finish(), expected, rtol=1e-6, atol=1e-5)


def test_matrix_depends_on_parameter_name_not_position():
    """A block keeps its matrix when other blocks are added before it (tables come from seed and name)."""
    grads = _grads(SHAPES, 3)
    name = "layers.0.bias"
    alone = _make("countsketch", shapes={name: SHAPES[name]}).project({name: grads[name]})
    zeros = {n: torch.zeros_like(g) if n != name else g for n, g in grads.items()}
    torch.testing.assert_close(_make("countsketch").project(zeros), alone)


def test_countsketch_gather_and_scatter_apply_the_same_matrix():
    grads = _grads(SHAPES, 6)
    a = _make("countsketch", method="gather").project(grads)
    b = _make("countsketch", method="scatter").project(grads)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_countsketch_sends_each_coordinate_to_one_bucket_with_a_sign_and_balances_buckets():
    dim = 64
    p = _make("countsketch", dim=dim)
    n = p.input_dim
    columns = p.project(_split(torch.eye(n), SHAPES))  # row j = image of coordinate j
    assert torch.equal((columns != 0).sum(1), torch.ones(n, dtype=torch.long))
    assert set(columns[columns != 0].tolist()) <= {-1.0, 1.0}
    start = 0
    for name, shape in SHAPES.items():
        block = columns[start:start + shape.numel()]
        start += shape.numel()
        per_bucket = (block != 0).sum(0)
        assert per_bucket.max() <= math.ceil(shape.numel() / dim), name


@pytest.fixture(scope="module")
def jl_pairs():
    """Pairs (g, h) with cosine about 0.5 in ~20K dims, and their exact inner products and norms."""
    gen = torch.Generator().manual_seed(1)
    n = sum(s.numel() for s in JL_SHAPES.values())
    g = torch.randn(200, n, generator=gen)
    h = 0.5 * g + math.sqrt(0.75) * torch.randn(200, n, generator=gen)
    return g.double(), h.double()


def _ip_errors(kind, g, h, seed=0):
    p = _make(kind, dim=JL_DIM, seed=seed, shapes=JL_SHAPES)
    pg, ph = (p.project(_split(x.float(), JL_SHAPES)).double() for x in (g, h))
    scale = g.norm(dim=1) * h.norm(dim=1)
    ip_err = ((pg * ph).sum(1) - (g * h).sum(1)) / scale
    norm_err = pg.pow(2).sum(1) / g.pow(2).sum(1) - 1
    return ip_err, norm_err


def test_countsketch_preserves_inner_products_as_well_as_dense_gaussian(jl_pairs):
    g, h = jl_pairs
    cs, _ = _ip_errors("countsketch", g, h)
    gauss, _ = _ip_errors("gaussian", g, h)
    # JL: the error relative to |g||h| has variance (1 + cos^2) / d for a dense Gaussian matrix.
    expected_mse = 1.25 / JL_DIM
    assert gauss.pow(2).mean() < 2 * expected_mse
    assert cs.pow(2).mean() < 2 * expected_mse
    assert cs.pow(2).mean() <= MSE_RATIO_TO_GAUSSIAN * gauss.pow(2).mean()
    assert cs.abs().max() < 6 / math.sqrt(JL_DIM)


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_norms_are_preserved(jl_pairs, kind):
    g, h = jl_pairs
    _, norm_err = _ip_errors(kind, g, h)
    assert norm_err.pow(2).mean() < 2 * 2 / JL_DIM  # Var(|Pg|^2/|g|^2) = 2/d for a Gaussian matrix
    assert norm_err.abs().max() < 6 * math.sqrt(2 / JL_DIM)


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_inner_product_is_unbiased_over_seeds(kind):
    shapes = {"x": torch.Size([37, 41]), "y": torch.Size([513])}
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(1, 37 * 41 + 513, generator=gen, dtype=torch.float64)
    h = 0.6 * g + 0.8 * torch.randn(1, g.shape[1], generator=gen, dtype=torch.float64)
    exact, scale = float((g * h).sum()), float(g.norm() * h.norm())
    dim, seeds = 32, 300
    estimates = []
    for seed in range(seeds):
        p = _make(kind, dim=dim, seed=seed, shapes=shapes)
        pg, ph = (p.project(_split(x.float(), shapes)).double() for x in (g, h))
        estimates.append(float((pg * ph).sum()))
    mean = sum(estimates) / seeds
    sigma = scale * math.sqrt((1 + (exact / scale) ** 2) / dim) / math.sqrt(seeds)
    assert abs(mean - exact) < 4 * sigma


def test_identity_projector_is_exact_concatenation_in_setup_order():
    grads = _grads(SHAPES, 3)
    p = _make("identity")
    assert p.dim == p.input_dim == sum(s.numel() for s in SHAPES.values())
    torch.testing.assert_close(p.project(dict(reversed(list(grads.items())))), _flat(grads, SHAPES), rtol=0, atol=0)


def test_gaussian_projector_equals_its_dense_matrix_cached_or_not():
    grads = _grads(SHAPES, 3)
    cached = _make("gaussian", block_size=100)
    streamed = _make("gaussian", block_size=100, cache_bytes=0)
    m = cached.matrix()
    assert m.shape == (cached.input_dim, 64)
    torch.testing.assert_close(cached.project(grads), _flat(grads, SHAPES) @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.project(grads), cached.project(grads), rtol=0, atol=0)


def test_trak_basic_backend_matches_an_independent_dense_computation_of_its_matrix():
    """TRAK's BasicProjector draws Rademacher columns in blocks, block i seeded seed + 1000 i (model_id 0)."""
    dim, block, seed = 40, 16, 5
    grads = _grads(SHAPES, 4)
    p = TrakProjector(dim, seed, backend="basic", block_size=block)
    p.setup(SHAPES, "cpu")
    n = p.input_dim
    columns = []
    for i in range(math.ceil(dim / block)):
        gen = torch.Generator().manual_seed(seed + 1000 * i)
        columns.append(torch.empty(n, block).bernoulli_(0.5, generator=gen) * 2 - 1)
    matrix = torch.cat(columns, dim=1)[:, :dim]
    expected = _flat(grads, SHAPES) @ matrix / math.sqrt(dim)
    torch.testing.assert_close(p.project(dict(reversed(list(grads.items())))), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_trak_cuda_backend_without_cuda_raises_install_hint():
    with pytest.raises(ConfigError, match=r"pip install rose_pl\[cuda\]"):
        TrakProjector(64, 0, backend="cuda")


def test_metadata_separates_kinds_seeds_dims_and_layouts():
    metas = [_make("countsketch").metadata(), _make("countsketch", seed=1).metadata(),
             _make("countsketch", dim=32).metadata(), _make("gaussian").metadata(),
             _make("countsketch", shapes={**SHAPES, "extra": torch.Size([3])}).metadata()]
    assert len({json.dumps(m, sort_keys=True) for m in metas}) == len(metas)
    m = metas[0]
    assert {"kind", "dim", "seed", "input_dim", "layout_hash"} <= set(m)
    assert json.loads(json.dumps(m)) == m
    assert _make("countsketch", method="gather").metadata() == _make("countsketch", method="scatter").metadata()


def test_misuse_is_reported_by_name():
    p = _make("countsketch")
    grads = _grads(SHAPES, 2)
    with pytest.raises(RuntimeError, match="before begin"):
        p.add("layers.0.bias", grads["layers.0.bias"])
    p.begin(2, "cpu")
    with pytest.raises(KeyError, match="nope"):
        p.add("nope", grads["layers.0.bias"])
    with pytest.raises(ValueError, match="expected"):
        p.add("layers.0.bias", grads["layers.0.bias"][:1])
    p.add("layers.0.bias", grads["layers.0.bias"])
    with pytest.raises(RuntimeError, match="added twice"):
        p.add("layers.0.bias", grads["layers.0.bias"])
    with pytest.raises(RuntimeError, match="2 parameters not added"):
        p.finish()
    with pytest.raises(ConfigError):
        build_projector("sparse", 64)
    with pytest.raises(ConfigError, match="dim"):
        CountSketchProjector(dim=0)
    with pytest.raises(RuntimeError, match="after setup"):
        IdentityProjector().dim


def test_normalizing_sink_gives_unit_rows_and_keeps_zero_rows_zero():
    p = _make("countsketch")
    grads = _grads(SHAPES, 4)
    for g in grads.values():
        g[2] = 0
    sink = NormalizingSink(p)
    sink.begin(4, "cpu")
    for n, g in grads.items():
        sink.add(n, g)
    feats = sink.finish()
    norms = feats.norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.ones(3))
    assert torch.equal(feats[2], torch.zeros(64)) and sink.zero_rows == 1
    torch.testing.assert_close(feats[0], p.project(grads)[0] / p.project(grads)[0].norm())
    assert sink.metadata()["normalize"] is True


class _FakeGradientModule(L.LightningModule):
    """Feeds fixed per-sample 'gradients' of index i to the sink, in reverse setup order."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.gradient_sink = None

    def gradient_shapes(self):
        return dict(SHAPES)

    @staticmethod
    def grads_of(index):
        return {n: torch.stack([torch.randn(s, generator=torch.Generator().manual_seed(int(i) * 10 + k))
                                for i in index]) for k, (n, s) in enumerate(SHAPES.items())}

    def predict_step(self, batch, batch_idx):
        index = batch
        grads = self.grads_of(index)
        self.gradient_sink.begin(len(index), self.device)
        for n in reversed(list(SHAPES)):
            self.gradient_sink.add(n, grads[n])
        return {"index": index, "features": self.gradient_sink.finish()}


def test_projection_callback_installs_a_normalizing_sink_during_predict():
    cb = ProjectionCallback(kind="countsketch", dim=64, seed=7)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    loader = torch.utils.data.DataLoader(torch.arange(10), batch_size=4)
    out = trainer.predict(_FakeGradientModule(), loader)
    feats = torch.cat([o["features"] for o in out])
    index = torch.cat([o["index"] for o in out])
    reference = _make("countsketch", seed=7).project(_FakeGradientModule.grads_of(index))
    torch.testing.assert_close(feats, reference / reference.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    meta = cb.metadata()
    assert meta["kind"] == "countsketch" and meta["dim"] == 64 and meta["seed"] == 7 and meta["normalize"]


def test_projection_callback_refuses_projector_and_kind_together():
    with pytest.raises(ConfigError, match="not both"):
        ProjectionCallback(projector=IdentityProjector(), kind="gaussian")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_gpu_projection_equals_cpu(kind):
    grads = _grads(SHAPES, 5)
    cpu = _make(kind).project(grads)
    p = build_projector(kind, 64, 0)
    p.setup(SHAPES, "cuda")
    gpu = p.project({n: g.cuda() for n, g in grads.items()})
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
