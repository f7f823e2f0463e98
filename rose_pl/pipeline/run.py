"""`rose-pl run`: warmup -> gradients per checkpoint -> scores -> selection -> fine-tune -> evaluation, per target.

One output folder per run (`rose_pl.layout`). The warmup and the pool's gradient pass are computed once for
every target; each target's validation gradients, scores, selections, fine-tunes and evaluations are its own
stages, so adding a target later computes only its stages. Gradient methods (ROSE, LESS, any registered
`GradientMethod`) are scored exactly (task-mean validation gradients, one pool pass per checkpoint for all
due targets) or from projected feature stores. Every Lightning stage gets a generated LightningCLI YAML
under `configs/` and runs in this process on one device, or as a `rose-pl` subprocess when the trainer asks
for several devices or nodes. Bookkeeping (skip, resume, stale detection) is in `stages.py`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from rose_pl.config import FitArgs, PreferenceArgs, RunArgs, SelectionArgs, TargetArgs, dataset_spec
from rose_pl.errors import ConfigError, RoseError
from rose_pl.layout import BASE, RunLayout
from rose_pl.selection.select import SELECTION_META_FILE
from rose_pl.pipeline.lightning import run_lightning
from rose_pl.pipeline.records import Records
from rose_pl.pipeline.stages import RunManifest, Stage, run_stages
from rose_pl.selection.methods import (
    FeatureSpec,
    GradientMethod,
    ScoringContext,
    SelectionMethod,
    get_method,
    training_side,
)

log = logging.getLogger(__name__)

PROGRESS_CALLBACK = {"class_path": "rose_pl.progress.ProgressCallback"}
SHARDING = ("fsdp", "deepspeed")
"""Strategies that shard parameters: used for training stages; gradient and evaluation passes use ddp instead."""


class Pipeline:
    """The stage graph of one run, built from its arguments."""

    def __init__(self, args: RunArgs, nodes=None):
        """`nodes`: the NodeGroup when the run spans several nodes (this process is node 0)."""
        self.a = args
        self.nodes = nodes
        self._validation: dict[str, list] = {}
        self.layout = RunLayout(args.output_dir)
        self.targets: dict[str, TargetArgs] = args.all_targets()
        self.methods: dict[str, SelectionMethod] = {}
        for name in args.methods:
            method = get_method(name)
            self.methods[method.name] = method
        self.finetune_methods = [get_method(m).name for m in args.finetune_methods()]
        sides = [m.side for m in self.gradient_methods()]
        if len(set(sides)) != len(sides):
            raise ConfigError(f"methods: gradient methods {[m.name for m in self.gradient_methods()]} share a "
                              f"validation side name ({sides}); give each GradientMethod its own side")
        self.epochs = list(range(1, args.warmup.epochs + 1))
        self.scoring = self._scoring_mode()

    # ---- settings ---------------------------------------------------------------------------------
    def _scoring_mode(self) -> str:
        if self.a.scoring != "auto":
            return self.a.scoring
        # A run keeps the mode it was created with, read from what it has computed; a new run knows its targets now.
        names = list(Records(self.layout.root).all())
        if any("/exact/" in n or "/means/" in n for n in names):
            return "exact"
        if any(n.startswith("features/train/") for n in names):
            return "projected"
        legacy = RunManifest(self.layout.root)
        return legacy.data.get("scoring") or "exact"

    @cached_property
    def digests(self) -> dict[str, str]:
        """Content hash of every input dataset: a changed one changes every stage that reads it."""
        from rose_pl.data.sources import data_fingerprint

        data = [self.a.pool, *(t.validation for t in self.targets.values())]
        data += [t.test for t in self.targets.values() if t.test]
        return {_ref(d): data_fingerprint(d) for d in data}

    def digest(self, data) -> str:
        return self.digests[_ref(data)]

    @cached_property
    def pool(self):
        """The pool as a PoolTable over its token cache (built by the cache/pool stage)."""
        from rose_pl.data.cache import TokenCache
        from rose_pl.data.table import PoolTable

        return PoolTable.from_cache(TokenCache(self.layout.pool_cache))

    def validation(self, target: str):
        """The target's validation pairs as read (once per run)."""
        from rose_pl.data.formats import read_preferences

        if target not in self._validation:
            t, pref = self.targets[target], self.a.preference_of(self.targets[target])
            self._validation[target] = read_preferences(t.validation, t.shots_per_task, pref.all_pairs,
                                                        on_invalid_pair=pref.on_invalid_pair)
        return self._validation[target]

    def gradient_methods(self) -> list[GradientMethod]:
        return [m for m in self.methods.values() if isinstance(m, GradientMethod)]

    def _specs(self) -> tuple[dict[str, FeatureSpec], dict[str, FeatureSpec], dict[str, list[str]]]:
        """Pool specs and validation specs by side, and the sides each method reads."""
        pool, val, sides = {}, {}, {}
        for name, method in self.methods.items():
            sides[name] = []
            if isinstance(method, GradientMethod) and self.scoring == "exact":
                continue  # scored from task means and exact passes, built by the pipeline itself
            for spec in method.feature_specs(self.a.features):
                table = pool if spec.data == "pool" else val
                if spec.side in table and table[spec.side][0] != spec:
                    raise ConfigError(f"methods: {table[spec.side][1]!r} and {name!r} define the {spec.data} features "
                                      f"{spec.side!r} differently; give one of them another side name")
                table[spec.side] = (spec, name)
                sides[name].append(spec.side)
        return {k: v[0] for k, v in pool.items()}, {k: v[0] for k, v in val.items()}, sides

    # ---- Lightning stage configurations ------------------------------------------------------------
    def _trainer(self, stage_dir: Path, predict: bool = False, single: bool = False, **extra) -> dict:
        t = self.a.trainer
        strategy, devices, nodes = t.strategy, t.devices, t.num_nodes
        if predict and str(strategy).split("_")[0] in SHARDING:
            strategy = "ddp"  # gradient passes need the whole model on every rank; training may shard
        if single:  # a few validation rows: one device (Lightning needs a row per rank)
            strategy, devices, nodes = "auto", 1, 1
        elif strategy == "ddp" and t.multi_process():  # its timeout bounds how long a rank waits for a lost peer
            strategy = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                        "init_args": {"timeout": str(timedelta(seconds=t.timeout))}}
        cfg = {
            "accelerator": t.accelerator, "devices": devices, "strategy": strategy, "num_nodes": nodes,
            "precision": t.precision, "default_root_dir": str(stage_dir), "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(stage_dir), "name": "logs"}},
        }
        cfg.update(extra)
        cfg["callbacks"] = [*cfg.get("callbacks", []), PROGRESS_CALLBACK]
        return cfg

    def fit_config(self, out: Path, args: FitArgs, subset_fraction: float | None, save_optimizer: bool,
                   selection: Path | None = None) -> dict:
        return {
            "seed_everything": args.seed,
            "trainer": self._trainer(
                out, max_epochs=args.epochs, accumulate_grad_batches=args.accumulate_grad_batches,
                callbacks=[
                    {"class_path": "rose_pl.training.checkpoints.WarmupCheckpoint",
                     "init_args": {"dirpath": str(out / "checkpoints"), "save_optimizer": save_optimizer}},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"dirpath": str(self.layout.resume_checkpoint(out).parent), "save_last": True,
                                   "save_top_k": 1, "every_n_train_steps": 50}},
                ]),
            "model": {"class_path": "rose_pl.training.model.LoRACausalLM",
                      "init_args": {"model": self.a.model, "lora": asdict(args.lora), "optim": asdict(args.optim),
                                    "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing}},
            "data": {"class_path": "rose_pl.data.datamodule.SFTDataModule",
                     "init_args": {"train_file": _yaml(self.a.pool), "tokenizer": self.a.model,
                                   "batch_size": args.batch_size, "subset_fraction": subset_fraction,
                                   "selection": str(selection) if selection is not None else None,
                                   "subset_seed": args.seed, "shuffle_seed": args.seed,
                                   "cache": str(self.layout.pool_cache), **asdict(self.a.data)}},
        }

    def predict_config(self, name: str, module: dict, checkpoint: Path | None, data: dict, callbacks: list[dict],
                       single: bool = False) -> dict:
        weights = {"checkpoint": str(checkpoint)} if checkpoint is not None else {}
        module = {"class_path": module["class_path"],
                  "init_args": {**module.get("init_args", {}), **weights, "model": self.a.model}}
        # Lightning writes its config.yaml into default_root_dir: the stage's own folder under logs/.
        root = self.layout.stage_log(name).with_suffix("")
        return {
            "trainer": self._trainer(root, predict=True, single=single, inference_mode=False, callbacks=callbacks,
                                     logger=False),
            "model": module,
            "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule", "init_args": data},
            "return_predictions": False,
        }

    def _data(self, spec_kind: str, target: str | None) -> dict:
        """FeatureDataModule arguments for the pool (target None) or a target's validation set."""
        out = {"tokenizer": self.a.model, "kind": spec_kind, "batch_size": self.a.features.batch_size,
               "max_tokens_per_batch": self.a.features.max_tokens_per_batch, **asdict(self.a.data)}
        if target is None:
            return {"data_file": _yaml(self.a.pool), **out, "cache": str(self.layout.pool_cache)}
        t, pref = self.targets[target], self.a.preference_of(self.targets[target])
        out.update(data_file=_yaml(t.validation), shots_per_task=t.shots_per_task, all_pairs=pref.all_pairs,
                   on_invalid_pair=pref.on_invalid_pair, prompt_truncation=pref.prompt_truncation,
                   cache=str(self.layout.target_cache(target, spec_kind)))
        if spec_kind == "preference":
            out.update(preference_format=pref.format, max_prompt_length=pref.max_prompt_length)
        return out

    def _store_callbacks(self, spec: FeatureSpec, out: Path) -> list[dict]:
        f = self.a.features
        callbacks = []
        if spec.projected:
            callbacks.append({"class_path": "rose_pl.features.projection.ProjectionCallback",
                              "init_args": {"kind": f.projector, "dim": f.dim, "seed": f.seed}})
        dtype = f.store_dtype if spec.projected else "float32"
        callbacks.append({"class_path": "rose_pl.features.store.FeatureStoreWriter",
                          "init_args": {"output_dir": str(out), "dtype": dtype}})
        return callbacks

    # ---- stage builders ----------------------------------------------------------------------------
    def _lightning_stage(self, name: str, command: str, config: dict, data_file, outputs: list[Path],
                         depends: list[str], resume: Path | None = None, report=None) -> Stage:
        single = config["trainer"]["devices"] == 1 and config["trainer"]["num_nodes"] == 1
        stage = Stage(name, {"yaml": self._portable(_fingerprinted(config, command)),
                             "data": self.digest(data_file)}, depends=depends,
                      outputs=[self.layout.relative(o) for o in outputs], report=report)
        stage.action = lambda: run_lightning(command, self.recorded(config, [stage]), self.layout.stage_config(name),
                                             subprocess_run=self.a.trainer.multi_process() and not single,
                                             resume=resume, nodes=self.nodes, everywhere=not single, stage=name)
        return stage

    def recorded(self, config: dict, stages: list[Stage]) -> dict:
        """`config` with the StageRecorder that records `stages` when the Lightning run ends (so the YAML also
        counts when it is run by hand)."""
        recorder = {"class_path": "rose_pl.pipeline.records.StageRecorder",
                    "init_args": {"run_dir": str(self.layout.root),
                                  "stages": [{"name": s.name, "fingerprint": s.fingerprint, "outputs": s.outputs}
                                             for s in stages]}}
        trainer = dict(config["trainer"])
        trainer["callbacks"] = [*trainer.get("callbacks", []), recorder]
        return {**config, "trainer": trainer}

    def _portable(self, value):
        """`value` with this run's folder written as "<run>": a run folder moved or copied keeps its fingerprints."""
        root = str(self.layout.root)
        if isinstance(value, str):
            return "<run>" + value[len(root):] if value == root or value.startswith(root + "/") else value
        if isinstance(value, dict):
            return {k: self._portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._portable(v) for v in value]
        return value

    def _feature_stages(self, spec: FeatureSpec, target: str | None) -> list[Stage]:
        epochs = self.epochs if spec.per_checkpoint else [None]
        stages = []
        for epoch in epochs:
            if target is None:
                out, name = self.layout.pool_features(spec.side, epoch), f"features/{spec.side}"
            else:
                out, name = self.layout.target_features(target, spec.side, epoch), f"targets/{target}/features/{spec.side}"
            name += f"/epoch-{epoch}" if epoch else ""
            ckpt = self.layout.checkpoint(epoch or self.epochs[-1])
            data = self._data(spec.kind, target)
            deps = ["warmup", self._cache_name(target, spec.kind)]
            if target is not None and self._needs_reference(spec.module):
                data["reference"] = str(self.layout.reference(target, spec.side))
                deps.append(self._reference_name(target, spec.side))
            config = self.predict_config(name, spec.module, ckpt, data, self._store_callbacks(spec, out),
                                         single=target is not None)
            stages.append(self._lightning_stage(name, "predict", config, data["data_file"], [out], deps,
                                                report=lambda out=out: _store_figures(out)))
        return stages

    def _means_stage(self, target: str, method: GradientMethod, epoch: int) -> Stage:
        out = self.layout.means(target, method.side, epoch)
        data = self._data(method.kind, target)
        deps = ["warmup", self._cache_name(target, method.kind)]
        module = method.validation_module(self.a.features)
        if self._needs_reference(module):
            data["reference"] = str(self.layout.reference(target, method.side))
            deps.append(self._reference_name(target, method.side))
        name = f"targets/{target}/means/{method.side}/epoch-{epoch}"
        callbacks = [{"class_path": "rose_pl.features.exact.TaskMeanWriter",
                      "init_args": {"output_dir": str(out), "side": method.side}}]
        config = self.predict_config(name, module, self.layout.checkpoint(epoch), data, callbacks, single=True)
        return self._lightning_stage(name, "predict", config, data["data_file"], [out], deps,
                                     report=lambda: _means_figures(out))

    # ---- the DPO reference, once per target and side -------------------------------------------------
    @staticmethod
    def _needs_reference(module: dict) -> bool:
        """Whether a validation module's objective is DPO against the adapter-disabled base model."""
        objective = module.get("init_args", {}).get("objective") or {}
        return (str(objective.get("class_path", "")).endswith("DPOObjective")
                and objective.get("init_args", {}).get("reference", "adapter_disabled") == "adapter_disabled")

    @staticmethod
    def _reference_name(target: str, side: str) -> str:
        return f"targets/{target}/reference/{side}"

    def _reference_stage(self, target: str, side: str) -> Stage:
        """The base model's log-probs of the target's pairs: computed once, used at every checkpoint."""
        out = self.layout.reference(target, side)
        data = self._data("preference", target)
        module = {"class_path": "rose_pl.features.reference.ReferenceLogProbs",
                  "init_args": {"dtype": self.a.features.dtype}}
        callbacks = [{"class_path": "rose_pl.features.reference.ReferenceWriter", "init_args": {"output_dir": str(out)}}]
        name = self._reference_name(target, side)
        config = self.predict_config(name, module, None, data, callbacks, single=True)
        return self._lightning_stage(name, "predict", config, data["data_file"], [out],
                                     [self._cache_name(target, "preference")], report=lambda: {"rows": _rows_of(out)})

    def _reference_sides(self, val_specs: dict[str, FeatureSpec]) -> list[str]:
        modules = {spec.side: spec.module for spec in val_specs.values()}
        if self.scoring == "exact":
            modules |= {m.side: m.validation_module(self.a.features) for m in self.gradient_methods()}
        return sorted(side for side, module in modules.items() if self._needs_reference(module))

    def _exact_stages(self, targets: list[str], means: dict[str, dict[int, list[str]]]) -> list[Stage]:
        """One stage per (target, checkpoint); the due ones of a checkpoint run as one pass over the pool."""
        train = training_side(self.a.features)
        stages = []
        for epoch in self.epochs:
            def run_pass(batch: list[Stage], epoch=epoch) -> None:
                names = [s.config["target"] for s in batch]
                entries = [{"output_dir": str(self.layout.exact(t, epoch)),
                            "means": [str(self.layout.means(t, m.side, epoch)) for m in self.gradient_methods()]}
                           for t in names]
                callbacks = [{"class_path": "rose_pl.features.exact.ExactScoreWriter",
                              "init_args": {"targets": entries, "means_dtype": self.a.features.means_dtype}}]
                name = f"exact/{'+'.join(names)}/epoch-{epoch}"
                config = self.predict_config(name, train.module, self.layout.checkpoint(epoch), self._data("sft", None),
                                             callbacks)
                run_lightning("predict", self.recorded(config, batch), self.layout.stage_config(name),
                              subprocess_run=self.a.trainer.multi_process(), nodes=self.nodes, everywhere=True,
                              stage=name)

            for t in targets:
                out = self.layout.exact(t, epoch)
                probe = self.predict_config(f"exact/{t}", train.module, self.layout.checkpoint(epoch),
                                            self._data("sft", None), [])
                probe = _without_batching(probe)
                config = {"target": t, "pool": self.digest(self.a.pool), "module": self._portable(probe["model"]),
                          "data": self._portable(probe["data"]), "means_dtype": self.a.features.means_dtype,
                          "precision": self.a.trainer.precision}
                stages.append(Stage(f"targets/{t}/exact/epoch-{epoch}", config,
                                    depends=["warmup", "cache/pool", *means[t][epoch]],
                                    outputs=[self.layout.relative(out)], group=f"exact/epoch-{epoch}",
                                    group_action=run_pass, report=lambda out=out: _store_figures(out)))
        return stages

    # ---- token caches ------------------------------------------------------------------------------
    @staticmethod
    def _cache_name(target: str | None, kind: str) -> str:
        return "cache/pool" if target is None else f"targets/{target}/cache/{kind}"

    def _cache_stage(self, target: str | None, kind: str) -> Stage:
        """Read, validate and tokenize the pool (or a target's validation set as `kind`) once for the whole run."""
        from rose_pl.data.cache import TokenCache, build_cache
        from rose_pl.data.datamodule import FeatureDataModule

        args = self._data(kind, target)
        folder = Path(args["cache"])
        settings = FeatureDataModule(**args).cache_settings()  # exactly what the stages' DataModules will ask for
        data = self.a.pool if target is None else self.targets[target].validation
        config = {"data": self.digest(data), "model": self.a.model, "settings": asdict(settings)}

        def build() -> None:
            build_cache(data, self.a.model, settings, folder, num_proc=self.a.data.num_proc)

        def figures() -> dict:
            return TokenCache(folder).figures()

        return Stage(self._cache_name(target, kind), config, build, outputs=[self.layout.relative(folder)],
                     report=figures)

    def _validation_kinds(self, val_specs: dict[str, FeatureSpec]) -> list[str]:
        kinds = {spec.kind for spec in val_specs.values()}
        if self.scoring == "exact":
            kinds |= {m.kind for m in self.gradient_methods()}
        return sorted(kinds)

    def stages(self) -> list[Stage]:
        a, L = self.a, self.layout
        pool_specs, val_specs, sides = self._specs()
        needs_warmup = any(m.needs_warmup for m in self.methods.values())
        stages: list[Stage] = [self._cache_stage(None, "sft")]
        stages += [self._cache_stage(t, kind) for t in self.targets for kind in self._validation_kinds(val_specs)]
        stages += [self._reference_stage(t, side) for t in self.targets for side in self._reference_sides(val_specs)]
        if needs_warmup:
            warm = self.fit_config(L.warmup, a.warmup, a.warmup.fraction, save_optimizer=True)
            stages.append(self._lightning_stage("warmup", "fit", warm, a.pool, [L.warmup], ["cache/pool"],
                                                resume=L.resume_checkpoint(L.warmup),
                                                report=lambda: _checkpoint_figures(L.checkpoints)))
        pool_stages = {side: self._feature_stages(spec, None) for side, spec in pool_specs.items()}
        stages += [s for group in pool_stages.values() for s in group]

        val_stages: dict[tuple[str, str], list[Stage]] = {}
        means: dict[str, dict[int, list[str]]] = {}
        for t in self.targets:
            for side, spec in val_specs.items():
                val_stages[t, side] = self._feature_stages(spec, t)
                stages += val_stages[t, side]
            if self.scoring == "exact" and self.gradient_methods():
                means[t] = {e: [] for e in self.epochs}
                for method in self.gradient_methods():
                    for e in self.epochs:
                        stage = self._means_stage(t, method, e)
                        means[t][e].append(stage.name)
                        stages.append(stage)
        exact = self._exact_stages(list(self.targets), means) if means else []
        stages += exact

        for t, target in self.targets.items():
            sel = a.selection_of(target)
            for name, method in self.methods.items():
                deps = ["cache/pool"]
                deps += [s.name for side in sides[name] for s in pool_stages.get(side, []) + val_stages.get((t, side), [])]
                if isinstance(method, GradientMethod) and self.scoring == "exact":
                    deps += [s.name for s in exact if s.config["target"] == t]
                if method.needs_warmup:
                    deps = ["warmup", *deps]
                pref = asdict(a.preference_of(target))
                if not method.needs_warmup:  # a baseline reads the pairs, never tokenizes them
                    pref = {k: pref[k] for k in ("on_invalid_pair", "all_pairs")}
                config = {"method": name, "selection": asdict(sel), "pool": self.digest(a.pool),
                          "validation": self.digest(target.validation), "shots": target.shots_per_task,
                          "preference": pref, "duplicate_ids": a.data.duplicate_ids,
                          "scoring": self.scoring if isinstance(method, GradientMethod) else None}
                out = L.selection(t, name)
                stages.append(Stage(f"targets/{t}/selection/{name}", config,
                                    lambda t=t, name=name: self.select(t, name), depends=deps,
                                    outputs=[L.relative(out)], report=lambda out=out: _selection_figures(out)))
            for name in self.finetune_methods:
                out = L.finetune(t, name)
                cfg = self.fit_config(out, a.finetune, None, save_optimizer=False,
                                      selection=L.selection(t, name) / SELECTION_META_FILE)
                stage = self._lightning_stage(f"targets/{t}/finetune/{name}", "fit", cfg, a.pool, [out],
                                              [f"targets/{t}/selection/{name}"], resume=L.resume_checkpoint(out),
                                              report=lambda t=t, name=name: _checkpoint_figures(L.finetune_checkpoints(t, name)))
                stages.append(stage)  # what it trains on follows from the selection stage it depends on
            if target.test:
                for name in [BASE, *self.finetune_methods]:
                    config = {"eval": asdict(a.evaluation), "test": self.digest(target.test), "model": a.model,
                              "dtype": a.finetune.dtype, "data": asdict(a.data),
                              "preference": asdict(a.preference_of(target)), "shots": target.shots_per_task}
                    out = L.evaluation(t, name)
                    stages.append(Stage(f"targets/{t}/evaluation/{name}", config,
                                        lambda t=t, name=name: self.evaluate(t, name),
                                        depends=[] if name == BASE else [f"targets/{t}/finetune/{name}"],
                                        outputs=[L.relative(out), L.relative(L.judgements(t, name))],
                                        report=lambda out=out: _evaluation_figures(out)))
        stages.append(Stage("compare", {"targets": sorted(self.targets), "methods": list(self.methods)}, self.compare,
                            depends=[s.name for s in stages], outputs=[L.relative(L.compare_md), L.relative(L.compare_json)],
                            derived=True))
        return stages

    # ---- in-process stages -------------------------------------------------------------------------
    def scoring_context(self, target: str, method: str) -> ScoringContext:
        L = self.layout
        pool_specs, val_specs, _ = self._specs()

        def stores(side: str) -> list[Path]:
            spec = pool_specs.get(side) or val_specs.get(side)
            if spec is None:
                raise ConfigError(f"method {method!r} reads features {side!r}, which no method of the run declares")
            epochs = self.epochs if spec.per_checkpoint else [None]
            if spec.data == "pool":
                return [L.pool_features(side, e) for e in epochs]
            return [L.target_features(target, side, e) for e in epochs]

        return ScoringContext(pool=self.pool, validation=self.validation(target),
                              seed=self.a.selection_of(self.targets[target]).seed, scoring=self.scoring,
                              stores=stores, exact_stores=[L.exact(target, e) for e in self.epochs])

    def select(self, target: str, method: str) -> None:
        from rose_pl.selection.influence import save_scores
        from rose_pl.selection.select import select_and_write

        pool = self.pool
        result = self.methods[method].score(self.scoring_context(target, method))
        if result.num_rows != pool.num_rows:
            raise ConfigError(f"{method}: {result.num_rows} scores for a pool of {pool.num_rows} rows ({pool.name})")
        sel: SelectionArgs = self.a.selection_of(self.targets[target])
        save_scores(self.layout.scores(target, method), result, pool.ids, (pool.dataset_codes, pool.dataset_names),
                    meta={"method": method, "target": target, "pool": pool.name})
        dropped = result.info.get("dropped_train_rows", [])
        select_and_write(self.layout.selection(target, method), result, pool, source=pool.name,
                         fraction=None if sel.k else sel.fraction, k=sel.k, seed=sel.seed,
                         title=f"{method.upper()} selection for target {target}",
                         extra={"method": method, "target": target,
                                "validation": dataset_spec(self.targets[target].validation).name,
                                "scoring": self.scoring if isinstance(self.methods[method], GradientMethod) else "-",
                                "pool rows without scores (dropped, never selected)": len(dropped)})

    def evaluate(self, target: str, method: str) -> None:
        from rose_pl.evaluation.evaluate import evaluate_model
        from rose_pl.pipeline.inputs import test_set_reading
        from rose_pl.training.checkpoints import Manifest

        adapter = None
        if method != BASE:
            adapter = str(Manifest.load(self.layout.finetune_checkpoints(target, method)).checkpoints[-1].adapter_dir)
        t, e = self.targets[target], self.a.evaluation
        shots, pref = test_set_reading(t.test, self.a.preference_of(t))
        evaluate_model(self.a.model, adapter, t.test, str(self.layout.evaluation(target, method)), label=method,
                       beta=e.beta, batch_size=e.batch_size, max_seq_length=self.a.data.max_seq_length,
                       chat_template=self.a.data.chat_template, preference=pref, shots_per_task=shots,
                       prompt_format=e.prompt_format, judge=e.judge,
                       judgements=str(self.layout.judgements(target, method)), dtype=self.a.finetune.dtype,
                       cache_root=str(self.layout.path("cache", "tests")))

    def compare(self) -> None:
        from rose_pl.pipeline.compare import write_comparison

        write_comparison(self.a, list(self.methods), self.scoring if self.gradient_methods() else "none")

    def run(self) -> dict[str, str]:
        """Run (or resume) the stages; the caller holds the run's lock."""
        from rose_pl.console import stage_log

        def record(manifest: RunManifest, plan) -> None:
            # Only once the plan is accepted: a refused change must not change what run.json says.
            manifest.data["scoring"] = self.scoring if self.gradient_methods() else None
            manifest.data["targets"] = {n: asdict(t) for n, t in self.targets.items()}

        return run_stages(self.layout.root, self.stages(), on_change=self.a.on_change, before=record,
                          context=lambda stage: stage_log(self.layout.stage_log(stage.name)))


def _fingerprinted(config: dict, command: str) -> dict:
    """What of a Lightning stage's config defines its outputs. A predict stage's outputs do not depend on where it
    runs (tested: DDP equals one process): devices, nodes and strategy are left out, so a run may continue on other
    hardware. A training stage keeps them (they change the batches), less the collectives' timeout."""
    trainer = dict(config["trainer"])
    if command == "predict":
        trainer = {k: v for k, v in trainer.items() if k not in ("accelerator", "devices", "num_nodes", "strategy")}
        return {**_without_batching(config), "trainer": trainer}
    if isinstance(trainer.get("strategy"), dict):
        trainer["strategy"] = trainer["strategy"]["class_path"]
    return {**config, "trainer": trainer}


PREDICT_BATCHING = {"data": ("batch_size", "max_tokens_per_batch", "num_workers", "num_proc"),
                    "model": ("max_tokens_per_pass",)}
"""Settings of a predict stage that change how rows are batched, not its outputs (tested: features do not depend
on the batch size, the token budget or how a batch is split into passes): left out of its fingerprint."""


def _without_batching(config: dict) -> dict:
    out = dict(config)
    for part, keys in PREDICT_BATCHING.items():
        if part in out and isinstance(out[part], dict):
            init = {k: v for k, v in out[part].get("init_args", {}).items() if k not in keys}
            out[part] = {**out[part], "init_args": init}
    return out


# ---- figures recorded in run.json ---------------------------------------------------------------------
def _store_figures(folder: Path) -> dict:
    from rose_pl.features.store import FeatureStore

    store = FeatureStore.open(folder)
    excluded = store.excluded()
    return {"rows": store.num_rows - len(excluded), "dropped": len(excluded),
            "dropped_rows": excluded[:50]}


def _means_figures(folder: Path) -> dict:
    from rose_pl.features.exact import MEANS_META

    meta = json.loads((folder / MEANS_META).read_text())
    return {"rows": int(sum(meta["counts"])), "tasks": len(meta["tasks"]), "empty_tasks": meta["empty_tasks"],
            "zero_gradients": meta["zero_rows"]}


def _checkpoint_figures(folder: Path) -> dict:
    from rose_pl.training.checkpoints import Manifest

    manifest = Manifest.load(folder)
    return {"checkpoints": len(manifest.checkpoints), **manifest.data}


def _selection_figures(folder: Path) -> dict:
    from rose_pl.layout import SELECTED_FILE
    from rose_pl.selection.select import read_selection

    sidecar = read_selection(folder / SELECTED_FILE)
    return {"rows": sidecar["pool_size"], "selected": sidecar["num_selected"],
            "file": str(folder / sidecar.get("file", SELECTED_FILE))}


def _rows_of(folder: Path) -> int:
    from rose_pl.layout import REFERENCE_META

    return int(json.loads((folder / REFERENCE_META).read_text())["rows"])


def _ref(data) -> str:
    """A dataset reference as a dict key: the path as given, or a spec's (or its YAML dict's) fields."""
    if isinstance(data, str):
        return data
    return json.dumps(asdict(data) if not isinstance(data, dict) else data, sort_keys=True)


def _yaml(data):
    """A dataset reference as YAML gives it to a DataModule: the path, or the spec's fields."""
    return data if isinstance(data, str) else asdict(data)


def _evaluation_figures(path: Path) -> dict:
    from rose_pl.evaluation.metrics import EvaluationResult

    metrics = EvaluationResult.read_json(path).metrics
    keys = ("pref_accuracy", "reward_accuracy", "win_rate", "num_pairs", "n")
    return {k: metrics[k] for k in keys if k in metrics}


def run(args: RunArgs) -> dict[str, str]:
    """Check the arguments and every input, lock the output folder, then run (or resume) the stages; returns
    {stage: ran|skipped} (on node 0 of several; {} on the other nodes, which follow node 0's steps)."""
    from rose_pl.pipeline.nodes import NodeGroup, detect_cluster

    problems = args.validate()
    if problems:
        raise ConfigError(problems)
    cluster = detect_cluster(args.trainer.num_nodes)
    if cluster is None:
        return _run_here(args)
    group = NodeGroup(cluster, args.trainer.node_timeout)
    try:
        if cluster.node_rank != 0:
            group.hello(node_facts(args))
            group.check_shared_storage(args.output_dir)
            group.follow()
            return {}
        return _coordinate(args, group)
    finally:
        group.close()


def _run_here(args: RunArgs, nodes=None) -> dict[str, str]:
    from rose_pl.pipeline.inputs import check_output_dir, check_run_inputs
    from rose_pl.pipeline.lock import RunLock
    from rose_pl.pipeline.summary import save_summary

    new_folder = not Path(args.output_dir).exists()
    check_output_dir(args.output_dir, args.output_dir_exists)  # before the lock file is created in it
    with RunLock(args.output_dir) as lock:
        if nodes is not None:
            nodes.check_shared_storage(args.output_dir)
        try:
            check_run_inputs(args)
        except RoseError:
            if new_folder:  # refused before any stage: leave no folder behind that holds only the lock file
                lock.discard()
            raise
        pipeline = Pipeline(args, nodes=nodes)
        done = pipeline.run()
        save_summary(args, done)
    log.info("run complete: %d stages ran, %d skipped", sum(v == "ran" for v in done.values()),
             sum(v == "skipped" for v in done.values()))
    return done


def node_facts(args: RunArgs) -> dict:
    """What a node sees that every node must see alike: the configuration, the input files, the model."""
    from rose_pl.hub import check_model_source
    from rose_pl.pipeline.stages import fingerprint

    data = [args.pool, *(t.validation for t in args.all_targets().values())]
    data += [t.test for t in args.all_targets().values() if t.test]
    try:
        check_model_source(args.model)
        model = None
    except ConfigError as e:
        model = "; ".join(e.problems)
    # The output folder is left out: whether every node sees the same one is the shared-storage check's to say.
    settings = {k: v for k, v in asdict(args).items() if k != "output_dir"}
    return {"config": fingerprint(settings), "model": model,
            "inputs": {_ref(d): _size(d) for d in data}}


def _size(data):
    """A local dataset's size in bytes (files summed for a folder), None when missing; a hub id's own name."""
    path = Path(dataset_spec(data).path).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None if str(dataset_spec(data).path).startswith((".", "/", "~")) else f"hub:{dataset_spec(data).name}"


def _coordinate(args: RunArgs, nodes) -> dict[str, str]:
    """Node 0 of several: check that every node sees the same run, then run it, publishing the multi-node stages."""
    ok, message = False, "node 0 stopped"
    try:
        mine = node_facts(args)
        nodes.hello(mine)
        problems = []
        for rank, theirs in sorted(nodes.gather_hellos().items()):
            where = f"node {rank} ({theirs['host']})"
            if theirs["config"] != mine["config"]:
                problems.append(f"{where} runs another configuration: start every node with the same command and "
                                "config files")
            if theirs["model"]:
                problems.append(f"{where}: model: {theirs['model']}")
            for path, size in mine["inputs"].items():
                if theirs["inputs"].get(path) != size:
                    seen = theirs["inputs"].get(path)
                    problems.append(f"{where}: {path} " + ("does not exist there" if seen is None else
                                                           f"has {seen} bytes there, {size} on node 0"))
        if problems:
            raise ConfigError(problems)
        done = _run_here(args, nodes)
        ok, message = True, ""
        return done
    except BaseException as e:
        message = f"{type(e).__name__}: {str(e).strip()}"[:2000]
        raise
    finally:
        nodes.finish(ok, message)


def verify_run(args: RunArgs) -> str:
    """`run --verify`: what a rerun with `args` would do to the run folder, and why; changes nothing."""
    from rose_pl.pipeline.lock import RunLock
    from rose_pl.pipeline.stages import describe, plan

    problems = args.validate()
    if problems:
        raise ConfigError(problems)
    layout = RunLayout(args.output_dir)
    if not layout.root.is_dir():
        return f"{layout.root}: no such folder; a run would start it from scratch"
    lock = RunLock(layout.root)
    head = [f"{layout.root}: a run is working in it now ({lock.describe_holder()}); what follows may be changing"] \
        if lock.is_held() else []
    the_plan = plan(layout.root, Pipeline(args).stages())
    stale = the_plan.of("stale")
    tail = [f"stale stages need `--on_change redo` (or a new output_dir): {', '.join(stale)}"] if stale else []
    return "\n".join([*head, f"{layout.root}: checked {len(the_plan.stages)} stages against their records",
                      describe(the_plan), *tail])
