"""Random projections of per-sample gradients, fed block by block through the GradientSink protocol.

A projector is set up once with the ordered parameter shapes, then receives each batch's per-sample
gradient blocks (`begin`, `add` per parameter in any order, `finish`) and returns `(S, dim)` float32
features. Every randomized matrix is derived from (seed, parameter name), never from call order or
device, so features computed on CPU and GPU, in any `add` order, share one matrix. `metadata()` names
everything that defines the matrix; the feature store compares it so that features never mix.

Kinds (registered in `rose_pl.registry.PROJECTORS`): `countsketch` (default, pure torch, never builds a
matrix), `gaussian` (dense JL yardstick), `identity` (exact, no projection), `trak` (TRAK's fast_jl CUDA
kernel or its BasicProjector). To add one, subclass `Projector` and register the class under its `kind`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from typing import Literal

import lightning.pytorch as pl
import torch

from rose_pl.errors import ConfigError
from rose_pl.registry import PROJECTORS

log = logging.getLogger(__name__)

_MAX_TEMP_ELEMENTS = 1 << 26  # bounds the per-block temporary (256 MiB of float32)


def _stable_seed(*parts) -> int:
    """A 63-bit seed from (kind, seed, name, ...): stable across processes, unlike `hash()`."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _cpu_generator(*parts) -> torch.Generator:
    # Tables are always drawn on CPU so that CPU and GPU runs use the same matrix.
    return torch.Generator(device="cpu").manual_seed(_stable_seed(*parts))


def _rng_probe() -> str:
    """Digest of a few draws of torch's CPU generator: a torch release that changed them changes the matrix."""
    g = torch.Generator(device="cpu").manual_seed(12345)
    draws = [torch.randperm(1000, generator=g), torch.randint(0, 2, (64,), generator=g), torch.randn(64, generator=g)]
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in draws)).hexdigest()[:16]


def _canonical_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Projector(ABC):
    """Maps per-sample gradient blocks to `(S, dim)` features; implements the GradientSink protocol."""

    kind: str = ""

    def __init__(self, dim: int | None, seed: int | None):
        problems = []
        if dim is not None and (not isinstance(dim, int) or dim <= 0):
            problems.append(f"{type(self).__name__}: dim must be a positive integer, got {dim!r}")
        if seed is not None and not isinstance(seed, int):
            problems.append(f"{type(self).__name__}: seed must be an integer, got {seed!r}")
        if problems:
            raise ConfigError(problems)
        self._dim, self.seed = dim, seed
        self._shapes: dict[str, torch.Size] | None = None
        self._device: torch.device | None = None
        self._num_samples: int | None = None
        self._pending: set[str] = set()

    # ---- set-up ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Output width."""
        if self._dim is None:
            raise RuntimeError(f"{type(self).__name__}: dim is known only after setup()")
        return self._dim

    @property
    def shapes(self) -> dict[str, torch.Size]:
        if self._shapes is None:
            raise RuntimeError(f"{type(self).__name__}: call setup(shapes, device) first")
        return self._shapes

    @property
    def input_dim(self) -> int:
        return sum(s.numel() for s in self.shapes.values())

    @property
    def is_setup(self) -> bool:
        return self._shapes is not None

    def setup(self, shapes: dict[str, torch.Size], device: torch.device | str) -> None:
        """Prepare for parameters `shapes` (ordered name -> shape) on `device`; repeating it is free."""
        shapes = {str(n): torch.Size(s) for n, s in shapes.items()}
        empty = [n for n, s in shapes.items() if s.numel() == 0]
        if not shapes or empty:
            raise ConfigError(f"{type(self).__name__}.setup: no parameters, or empty ones: {empty}")
        device = _canonical_device(device)
        if self._shapes is not None and list(self._shapes.items()) == list(shapes.items()):
            if device != self._device:
                self._device = device
                self._move(device)
            return
        self._shapes, self._device = shapes, device
        self._setup()

    def layout_hash(self) -> str:
        """Digest of the ordered (name, shape) list: features of different parameter sets never mix."""
        layout = [[n, list(s)] for n, s in self.shapes.items()]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

    def metadata(self) -> dict:
        """Everything that defines the projection matrix (compared by the feature store)."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "input_dim": self.input_dim,
                "num_blocks": len(self.shapes), "layout_hash": self.layout_hash(), **self._extra_metadata()}

    # ---- GradientSink ------------------------------------------------------------------------------
    def begin(self, num_samples: int, device: torch.device | str) -> None:
        """Start a batch of `num_samples` samples whose features accumulate on `device`."""
        self.shapes  # noqa: B018  (raises if not set up)
        device = _canonical_device(device)
        if device != self._device:
            self._device = device
            self._move(device)
        self._num_samples = int(num_samples)
        self._pending = set(self.shapes)
        self._begin(self._num_samples)

    def add(self, name: str, grad: torch.Tensor) -> None:
        """Add parameter `name`'s per-sample gradient `(S, *shape)`; any order, once per batch."""
        if self._num_samples is None:
            raise RuntimeError(f"{type(self).__name__}.add({name!r}) before begin()")
        if name not in self.shapes:
            raise KeyError(f"{type(self).__name__}: unknown parameter {name!r} (not given to setup)")
        if name not in self._pending:
            raise RuntimeError(f"{type(self).__name__}: parameter {name!r} added twice in one batch")
        expected = (self._num_samples, *self.shapes[name])
        if tuple(grad.shape) != expected:
            raise ValueError(f"{type(self).__name__}: gradient of {name!r} has shape {tuple(grad.shape)}, "
                             f"expected {expected}")
        self._pending.discard(name)
        flat = grad.reshape(self._num_samples, -1).to(self._device, torch.float32)
        self._add(name, flat)

    def finish(self) -> torch.Tensor:
        """`(S, dim)` float32 features of the batch; every parameter must have been added."""
        if self._num_samples is None:
            raise RuntimeError(f"{type(self).__name__}.finish() before begin()")
        if self._pending:
            missing = [n for n in self.shapes if n in self._pending]
            raise RuntimeError(f"{type(self).__name__}: {len(missing)} parameters not added, e.g. {missing[:3]}")
        out = self._finish()
        self._num_samples = None
        return out

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Convenience: project `{name: (S, *shape)}` in one call."""
        first = next(iter(grads.values()))
        self.begin(first.shape[0], self._device or first.device)
        for name, g in grads.items():
            self.add(name, g)
        return self.finish()

    # ---- hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def _setup(self) -> None: ...

    def _move(self, device: torch.device) -> None:
        """Move precomputed tables to `device` (default: rebuild them there)."""
        self._setup()

    @abstractmethod
    def _begin(self, num_samples: int) -> None: ...

    @abstractmethod
    def _add(self, name: str, flat: torch.Tensor) -> None: ...

    @abstractmethod
    def _finish(self) -> torch.Tensor: ...

    def _extra_metadata(self) -> dict:
        return {}


class CountSketchProjector(Projector):
    """Balanced CountSketch (sparse JL): each input coordinate goes to one bucket with a random sign.

    Per parameter block of n coordinates, a random permutation of `ceil(n/dim)*dim` slots (from seed and
    the parameter name) places coordinate j in slot perm[j], i.e. bucket perm[j] % dim, so every bucket
    gets at most ceil(n/dim) coordinates of the block. Each column of the matrix has one +-1, hence
    E<Pg,Ph> = <g,h> with no scaling and Var ~ (|g|^2|h|^2 + <g,h>^2)/dim, like a dense Gaussian.
    Very spiky vectors (a few huge coordinates) are sketched worse than by a dense matrix.

    method: how the same matrix is applied. "gather" = one index_select + sign + reshape-sum per block,
    deterministic and atomics-free (the GPU choice). "scatter" = signed scatter_add_ into the buckets:
    deterministic on CPU and there about 1.8x faster than gather (2M dims -> 8192, batch 16, one thread:
    33 vs 59 ms), because scattering into the small output stays in cache while CPU gathers along dim 1
    do not; on GPU it would need atomics. index_add_ was as fast as scatter_add_ on one thread but slowed
    down 10x with threads when the row stride is a power of two. "auto" = scatter on CPU, gather on CUDA.
    The method changes only the float summation order, so it is not part of the metadata.
    """

    kind = "countsketch"

    def __init__(self, dim: int = 8192, seed: int = 0,
                 method: Literal["auto", "gather", "scatter"] = "auto"):
        super().__init__(dim, seed)
        if method not in ("auto", "gather", "scatter"):
            raise ConfigError(f"CountSketchProjector: method must be auto, gather or scatter, got {method!r}")
        self.method = method
        self._tables: dict[str, dict[str, torch.Tensor]] = {}

    def _method_for(self, device: torch.device) -> str:
        if self.method != "auto":
            return self.method
        return "scatter" if device.type == "cpu" else "gather"

    def block_tables(self, name: str, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot of each coordinate, sign of each coordinate) of block `name`, on CPU."""
        g = _cpu_generator("countsketch", self.seed, name)
        slots = -(-numel // self.dim) * self.dim
        perm = torch.randperm(slots, generator=g)[:numel]
        sign = torch.randint(0, 2, (numel,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return perm, sign

    def _setup(self) -> None:
        method = self._method_for(self._device)
        self._tables = {}
        for name, shape in self.shapes.items():
            n = shape.numel()
            perm, sign = self.block_tables(name, n)
            k = -(-n // self.dim)
            if method == "scatter":
                tab = {"bucket": perm % self.dim, "sign": sign}
            else:
                # Slot layout (k, dim): slot p holds coordinate src[p]; empty slots read coordinate 0 times 0.
                index_dtype = torch.int32 if k * self.dim < 2**31 else torch.int64
                src = torch.zeros(k * self.dim, dtype=index_dtype)
                src[perm] = torch.arange(n, dtype=index_dtype)
                slot_sign = torch.zeros(k * self.dim)
                slot_sign[perm] = sign
                tab = {"src": src, "sign": slot_sign}
            self._tables[name] = {key: t.to(self._device) for key, t in tab.items()}
        self._built_for = method

    def _move(self, device: torch.device) -> None:
        if self._method_for(device) != self._built_for:
            self._setup()
        else:
            self._tables = {n: {k: t.to(device) for k, t in tab.items()} for n, tab in self._tables.items()}

    def _begin(self, num_samples: int) -> None:
        self._out = torch.zeros(num_samples, self.dim, device=self._device)

    def _add(self, name: str, flat: torch.Tensor) -> None:
        tab, out, S, d = self._tables[name], self._out, flat.shape[0], self.dim
        if "bucket" in tab:
            step = max(d, _MAX_TEMP_ELEMENTS // S)
            for c0 in range(0, flat.shape[1], step):
                c1 = min(c0 + step, flat.shape[1])
                index = tab["bucket"][c0:c1].expand(S, -1)
                out.scatter_add_(1, index, flat[:, c0:c1] * tab["sign"][c0:c1])
            return
        k = tab["src"].numel() // d
        rows = max(1, _MAX_TEMP_ELEMENTS // (S * d))
        for r0 in range(0, k, rows):
            r1 = min(r0 + rows, k)
            part = flat.index_select(1, tab["src"][r0 * d:r1 * d])
            part.mul_(tab["sign"][r0 * d:r1 * d])
            out.add_(part.view(S, r1 - r0, d).sum(1))

    def _finish(self) -> torch.Tensor:
        out, self._out = self._out, None
        return out

    def _extra_metadata(self) -> dict:
        return {"algorithm": "balanced-countsketch-v1", "rng_probe": _rng_probe()}


class GaussianProjector(Projector):
    """Dense JL with N(0, 1/dim) entries, drawn per (seed, parameter name, chunk of `block_size` rows).

    The yardstick for tests and an exact-matrix option. Chunks are drawn on CPU (device-independent) on
    every batch unless the whole matrix fits in `cache_bytes`, in which case it is kept on the device.
    """

    kind = "gaussian"

    def __init__(self, dim: int = 8192, seed: int = 0, block_size: int = 4096, cache_bytes: int = 1 << 28):
        super().__init__(dim, seed)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"GaussianProjector: block_size must be a positive integer, got {block_size!r}")
        self.block_size, self.cache_bytes = block_size, cache_bytes
        self._cache: dict[tuple[str, int], torch.Tensor] | None = None

    def chunk(self, name: str, index: int, rows: int) -> torch.Tensor:
        """Rows [index*block_size, +rows) of block `name`'s (numel, dim) matrix, on CPU."""
        g = _cpu_generator("gaussian", self.seed, name, index)
        return torch.randn(rows, self.dim, generator=g).div_(math.sqrt(self.dim))

    def _chunks(self, name: str):
        n = self.shapes[name].numel()
        for i, r0 in enumerate(range(0, n, self.block_size)):
            rows = min(self.block_size, n - r0)
            if self._cache is not None:
                yield r0, rows, self._cache[(name, i)]
            else:
                yield r0, rows, self.chunk(name, i, rows).to(self._device)

    def matrix(self) -> torch.Tensor:
        """The whole (input_dim, dim) matrix in setup order (small inputs only: tests, exact references)."""
        return torch.cat([m.cpu() for name in self.shapes for _, _, m in self._chunks(name)])

    def _setup(self) -> None:
        self._cache = None
        if self.input_dim * self.dim * 4 <= self.cache_bytes:
            self._cache = {(name, i): m for name in self.shapes for i, (_, _, m) in enumerate(self._chunks(name))}

    def _move(self, device: torch.device) -> None:
        if self._cache is not None:
            self._cache = {k: m.to(device) for k, m in self._cache.items()}

    def _begin(self, num_samples: int) -> None:
        self._out = torch.zeros(num_samples, self.dim, device=self._device)

    def _add(self, name: str, flat: torch.Tensor) -> None:
        for r0, rows, m in self._chunks(name):
            self._out.addmm_(flat[:, r0:r0 + rows], m)

    def _finish(self) -> torch.Tensor:
        out, self._out = self._out, None
        return out

    def _extra_metadata(self) -> dict:
        return {"block_size": self.block_size, "rng_probe": _rng_probe()}


class IdentityProjector(Projector):
    """No projection: the concatenated gradient in setup order (dim = total gradient size)."""

    kind = "identity"

    def __init__(self):
        super().__init__(None, None)

    def _setup(self) -> None:
        self._dim = self.input_dim
        self._offsets, start = {}, 0
        for name, shape in self.shapes.items():
            self._offsets[name] = (start, start + shape.numel())
            start += shape.numel()

    def _move(self, device: torch.device) -> None:
        pass

    def _begin(self, num_samples: int) -> None:
        self._out = torch.zeros(num_samples, self.dim, device=self._device)

    def _add(self, name: str, flat: torch.Tensor) -> None:
        a, b = self._offsets[name]
        self._out[:, a:b] = flat

    def _finish(self) -> torch.Tensor:
        out, self._out = self._out, None
        return out


_TRAK_INSTALL_HINT = ("to fix: install TRAK's CUDA projector on a CUDA machine with `pip install rose_pl[cuda]` "
                      "(builds fast_jl), or choose kind='countsketch' or TrakProjector(backend='basic')")


class TrakProjector(Projector):
    """Adapter around TRAK's projectors: blocks are buffered, concatenated in setup order, then projected.

    backend "cuda": fast_jl's kernel (CUDA only; inputs are cut into chunks of fewer than 2^32 / max_batch_size
    coordinates, chunk c projected with model_id=c and the results summed). backend "basic": TRAK's
    BasicProjector, which regenerates its matrix in `block_size`-column pieces on every call (slow; its
    random stream depends on the device type, recorded in metadata). Outputs are scaled by 1/sqrt(dim)
    so that, as for the other projectors, E<Pg,Ph> = <g,h>. Never falls back to another projector.
    """

    kind = "trak"

    def __init__(self, dim: int = 8192, seed: int = 0, proj_type: Literal["rademacher", "normal"] = "rademacher",
                 backend: Literal["cuda", "basic"] = "cuda", max_batch_size: int = 16, block_size: int = 100):
        super().__init__(dim, seed)
        problems = []
        if proj_type not in ("rademacher", "normal"):
            problems.append(f"TrakProjector: proj_type must be rademacher or normal, got {proj_type!r}")
        if backend not in ("cuda", "basic"):
            problems.append(f"TrakProjector: backend must be cuda or basic, got {backend!r}")
        if backend == "cuda" and max_batch_size not in (8, 16, 32):
            problems.append(f"TrakProjector: max_batch_size must be 8, 16 or 32, got {max_batch_size!r}")
        if problems:
            raise ConfigError(problems)
        self.proj_type, self.backend = proj_type, backend
        self.max_batch_size, self.block_size = max_batch_size, block_size
        if backend == "cuda":
            self._check_cuda()

    @staticmethod
    def _check_cuda() -> None:
        import importlib.util

        problems = []
        if not torch.cuda.is_available():
            problems.append("TrakProjector(backend='cuda') needs a CUDA device, and none is available")
        if importlib.util.find_spec("fast_jl") is None:
            problems.append("TrakProjector(backend='cuda') needs the fast_jl package, which is not installed")
        if problems:
            raise ConfigError(problems + [_TRAK_INSTALL_HINT])

    def _chunk_bounds(self) -> list[tuple[int, int]]:
        if self.backend == "basic":
            return [[0, self.input_dim]]
        step = (2**32 - 1) // self.max_batch_size - 1
        return [[a, min(a + step, self.input_dim)] for a in range(0, self.input_dim, step)]

    def _setup(self) -> None:
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        if self.backend == "cuda" and self._device.type != "cuda":
            raise ConfigError(f"TrakProjector(backend='cuda') cannot run on {self._device}: " + _TRAK_INSTALL_HINT)
        kind = ProjectionType(self.proj_type)
        self._projectors = []
        for c, (a, b) in enumerate(self._chunk_bounds()):
            if self.backend == "cuda":
                p = CudaProjector(grad_dim=b - a, proj_dim=self.dim, seed=self.seed, proj_type=kind,
                                  device=self._device, max_batch_size=self.max_batch_size)
            else:
                p = BasicProjector(grad_dim=b - a, proj_dim=self.dim, seed=self.seed, proj_type=kind,
                                   device=self._device, block_size=self.block_size, dtype=torch.float32, model_id=c)
            self._projectors.append((c, a, b, p))

    def _begin(self, num_samples: int) -> None:
        self._blocks: dict[str, torch.Tensor] = {}

    def _add(self, name: str, flat: torch.Tensor) -> None:
        self._blocks[name] = flat

    def _finish(self) -> torch.Tensor:
        grads = torch.cat([self._blocks.pop(n) for n in self.shapes], dim=1)
        out = torch.zeros(grads.shape[0], self.dim, device=self._device)
        for c, a, b, p in self._projectors:
            out += p.project(grads[:, a:b].contiguous(), model_id=c).float()
        return out.div_(math.sqrt(self.dim))

    def _extra_metadata(self) -> dict:
        meta = {"proj_type": self.proj_type, "backend": self.backend, "chunks": self._chunk_bounds(),
                "scale": "1/sqrt(dim)"}
        if self.backend == "basic":
            meta.update(block_size=self.block_size, rng_device=self._device.type)
        return meta


for _kind in (CountSketchProjector, GaussianProjector, IdentityProjector, TrakProjector):
    PROJECTORS.register(_kind.kind, _kind)


def build_projector(kind: str = "countsketch", dim: int = 8192, seed: int = 0, **kwargs) -> Projector:
    """A projector by kind (see `rose_pl.registry.PROJECTORS`); `identity` ignores dim and seed."""
    cls = PROJECTORS.get(kind)
    if not (isinstance(cls, type) and issubclass(cls, Projector)):
        raise ConfigError(f"projector {kind!r} is a {type(cls).__name__}, not a Projector subclass")
    if cls is IdentityProjector:
        return cls(**kwargs)
    return cls(dim=dim, seed=seed, **kwargs)


class NormalizingSink:
    """GradientSink that L2-normalizes the projector's features (in float32, before any fp16 cast).

    A zero gradient has no direction: its row stays zero, is counted in `zero_rows` and logged.
    """

    def __init__(self, projector: Projector, normalize: bool = True):
        self.projector, self.normalize = projector, normalize
        self.zero_rows = 0

    def begin(self, num_samples: int, device: torch.device | str) -> None:
        self.projector.begin(num_samples, device)

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.projector.add(name, grad)

    def finish(self) -> torch.Tensor:
        feats = self.projector.finish()
        if not self.normalize:
            return feats
        norms = torch.linalg.vector_norm(feats, dim=1, keepdim=True)
        zero = int((norms == 0).sum())
        if zero:
            if self.zero_rows == 0:
                log.warning("projection: %d all-zero gradient(s) in this batch; their features stay zero", zero)
            self.zero_rows += zero
        return feats / torch.where(norms == 0, torch.ones_like(norms), norms)

    def metadata(self) -> dict:
        return {**self.projector.metadata(), "normalize": self.normalize}


class ProjectionCallback(pl.Callback):
    """Sets up the projector on the module's gradient shapes and installs it as `pl_module.gradient_sink`."""

    def __init__(self, projector: Projector | None = None, kind: str = "countsketch", dim: int = 8192,
                 seed: int = 0, normalize: bool = True):
        """
        Args:
            projector: A ready projector; when given, kind/dim/seed must stay at their defaults.
            kind: countsketch (pure torch), gaussian (dense yardstick), identity (no projection), trak, or any
                kind registered in rose_pl.registry.PROJECTORS.
            dim: Projected dimension.
            seed: Seed of the random matrix (with each parameter's name).
            normalize: L2-normalize each feature row, as LESS and ROSE do.
        """
        if projector is not None and (kind, dim, seed) != ("countsketch", 8192, 0):
            raise ConfigError("ProjectionCallback: pass either projector or kind/dim/seed, not both")
        self.projector = projector if projector is not None else build_projector(kind, dim, seed)
        self.sink = NormalizingSink(self.projector, normalize)

    def prepare(self, pl_module: pl.LightningModule, device: torch.device | str) -> None:
        """Set the projector up on `pl_module.gradient_shapes()` (idempotent; the store needs dim early)."""
        from rose_pl.features.protocols import MODULE_MEMBERS, check_members

        check_members("ProjectionCallback", pl_module,
                      {k: MODULE_MEMBERS[k] for k in ("gradient_shapes", "gradient_sink")})
        self.projector.setup(pl_module.gradient_shapes(), device)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self.prepare(pl_module, trainer.strategy.root_device)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(pl_module, pl_module.device)
        pl_module.gradient_sink = self.sink

    def metadata(self) -> dict:
        """Projector metadata plus `normalize` (set up first: `prepare` or a Trainer hook)."""
        return self.sink.metadata()
