"""The shared training loop: list-wise and pair-wise re-rankers, one GPU or many (torchrun/DDP).

The loop knows nothing about a method. It builds the re-ranker through the registry
(``create_reranker(name, pretrained=False)`` or ``checkpoint=...``), which must be a
:class:`~locore_plugin.interface.TrainableReranker`, feeds it lists (a query, its global
shortlist, same-landmark labels) and lets ``training_loss`` decide how a batch becomes a loss
(LoCoRE: every gallery token; AMES/RRT/R2Former: sampled pairs).

Run ``locore-plugin train recipes/train_cpu_smoke.toml`` or
``torchrun --nproc_per_node=8 -m locore_plugin.training recipes/train_locore_base_8gpu.toml``.
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) is the only
process management: the loop joins the process group it describes.

Exact resume: a checkpoint holds the weights (``save_pretrained``, loadable by
``create_reranker(name, checkpoint=<dir>/model)``), the optimizer, scheduler and scaler states,
every rank's RNG states (Python, NumPy, torch, CUDA and the re-ranker's own ``rng`` generator when
it has one) and the data position (epoch, optimizer steps done in it). Lists are drawn by a
seeded ``DistributedSampler`` and shuffled by a generator seeded from (seed, epoch, index), so a
run killed at any step and resumed from its last checkpoint redoes exactly the same steps.
Checkpoints are written to a temporary folder and renamed, so a kill while writing leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from locore_plugin.interface import TrainableReranker
from locore_plugin.io.atomic import atomic_write, set_aside
from locore_plugin.options import read_recipe_file
from locore_plugin.progress import progress
from locore_plugin.registry import create_reranker
from locore_plugin.runtime import resolve_device, resolve_dtype

_PRECISIONS = ("fp32", "bf16", "fp16")
_SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; recipes in ``recipes/`` set these keys (TOML or JSON).

    The global batch (lists per optimizer step) is ``per_device_batch_size x grad_accumulation x
    world size``; ``global_batch_size``, when set, is checked against it so that a recipe cannot
    silently train with another batch on another number of GPUs.
    """

    reranker: str
    output_dir: str
    data: dict
    reranker_options: dict = dataclasses.field(default_factory=dict)
    checkpoint: Optional[str] = None  # initial weights; None = random initialisation (pretrained=False)
    validation: Optional[dict] = None  # options of the held-out evaluation run after every epoch
    # A frozen teacher the model is distilled from: {reranker, checkpoint, weight (10, the official
    # beta), options (its create_reranker options besides query_length / gallery_length, which
    # default to the model's)}.
    distillation: Optional[dict] = None
    epochs: int = 3
    per_device_batch_size: int = 4
    grad_accumulation: int = 4
    global_batch_size: Optional[int] = None
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    find_unused_parameters: bool = False
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    num_threads: Optional[int] = None  # torch intra-op threads (CPU); small models run best on 1 when cores are shared
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 1000  # optimizer steps between checkpoints (and one at every epoch end)
    keep_checkpoints: int = 2
    max_steps: Optional[int] = None  # stop (with a checkpoint) once this many optimizer steps are done
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.data, dict):
            raise TypeError("data must be a table of TrainingLists options")
        for name in ("epochs", "per_device_batch_size", "grad_accumulation", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("save_every, warmup_steps and num_workers must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or unset, got {self.num_threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or unset, got {self.max_steps}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.distillation is not None:
            self.distillation = _distillation_options(self.distillation)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        missing = [n for n in ("reranker", "output_dir", "data") if n not in values]
        if missing:
            raise ValueError(f"the training config lacks {missing}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DISTILLATION_WEIGHT = 10.0  # ELViS conf/train.yaml ``beta``


def _distillation_options(table) -> dict:
    """The ``distillation`` table, checked: ``reranker`` and ``checkpoint`` are required."""
    if not isinstance(table, dict):
        raise TypeError(f"distillation must be a table {{reranker, checkpoint, weight, options}}, got {table!r}")
    unknown = sorted(set(table) - {"reranker", "checkpoint", "weight", "options"})
    missing = [k for k in ("reranker", "checkpoint") if not table.get(k)]
    if unknown or missing:
        raise ValueError(f"distillation: unknown key(s) {unknown}, missing {missing} (keys: reranker, checkpoint, weight, options)")
    weight = float(table.get("weight", DISTILLATION_WEIGHT))
    if not weight > 0:
        raise ValueError(f"distillation.weight must be > 0, got {weight}")
    return {"reranker": table["reranker"], "checkpoint": str(table["checkpoint"]), "weight": weight,
            "options": dict(table.get("options", {}))}


def load_config(path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Read a recipe (``.toml`` or ``.json``) and apply ``key=value`` overrides.

    An override's key may be dotted (``data.list_length=50``); its value follows the options grammar of
    :mod:`locore_plugin.options` (TOML or Python literals, else the text).
    """
    return TrainConfig.from_dict(read_recipe_file(path, overrides, "training config"))


# -- distributed context -------------------------------------------------------------------------


@dataclasses.dataclass
class Distributed:
    """This process's place in the run, read from torchrun's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


# -- sampling ------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle, one shard per rank, incomplete shard dropped) that
    skips the first ``start`` indices of this rank's epoch, which a resumed run has already used."""

    def __init__(self, dataset, ctx: Distributed, seed: int):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def collate_lists(batch: list) -> tuple[list, list, list]:
    """Training lists -> (queries, shortlists, labels), the arguments of ``training_loss``."""
    return [b.query for b in batch], [b.shortlist for b in batch], [b.labels for b in batch]


# -- RNG state -----------------------------------------------------------------------------------


def _rng_state(reranker) -> dict:
    legacy = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    generator = getattr(reranker, "rng", None)
    if isinstance(generator, np.random.Generator):
        state["reranker"] = generator.bit_generator.state
    return state


def _set_rng_state(reranker, state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    if "reranker" in state:
        reranker.rng.bit_generator.state = state["reranker"]


def _seed_everything(seed: int, reranker=None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if reranker is not None and isinstance(getattr(reranker, "rng", None), np.random.Generator):
        reranker.rng = np.random.default_rng(seed)


# -- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """One training run. ``dataset`` yields :class:`~locore_plugin.data.training_lists.TrainingList`
    items and has ``set_epoch(epoch)``; ``validate(reranker) -> {metric: value}`` runs on rank 0
    after every epoch (the first value is the one the best checkpoint is chosen by)."""

    def __init__(self, config: TrainConfig, dataset=None, validate: Optional[Callable] = None):
        self.config = config
        self.ctx = Distributed.from_environment()
        self.output_dir = Path(config.output_dir)
        self.dataset = dataset
        self.validate = validate

    # -- setup --------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, ctx = self.config, self.ctx
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if ctx.enabled and not dist.is_initialized():
            backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.device = resolve_device(cfg.device, local_rank=ctx.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.global_batch = cfg.per_device_batch_size * cfg.grad_accumulation * ctx.world_size
        if cfg.global_batch_size is not None and cfg.global_batch_size != self.global_batch:
            raise ValueError(
                f"global_batch_size is {cfg.global_batch_size}, but per_device_batch_size x grad_accumulation x "
                f"world size = {cfg.per_device_batch_size} x {cfg.grad_accumulation} x {ctx.world_size} = "
                f"{self.global_batch}"
            )
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on CPU")
        if self.dataset is None:
            from locore_plugin.data.training_lists import training_data

            self.dataset = training_data(cfg.data, cfg.seed)
        if self.validate is None and cfg.validation is not None:
            self.validate = build_validation(cfg.validation)
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} training lists do not fill one global batch of {self.global_batch}")
        self.total_steps = self.steps_per_epoch * cfg.epochs

        latest, trainer_state = self._latest_checkpoint()
        _seed_everything(cfg.seed)  # identical initial weights on every rank
        options = dict(cfg.reranker_options, device=str(self.device))
        if latest is not None:
            options["checkpoint"] = str(latest / "model")
        elif cfg.checkpoint is not None:
            options["checkpoint"] = cfg.checkpoint
        else:
            options["pretrained"] = False
        reranker = create_reranker(cfg.reranker, **options)
        if not isinstance(reranker, TrainableReranker):
            raise TypeError(f"{cfg.reranker!r} is a {type(reranker).__name__}, not a TrainableReranker: it cannot be trained")
        self.reranker = reranker
        self.teacher = None if cfg.distillation is None else self._teacher(reranker)
        module = reranker.module
        bad = sorted({str(p.dtype) for p in module.parameters() if p.dtype != torch.float32})
        if bad:
            raise ValueError(f"training keeps float32 master weights; {cfg.reranker!r} was built with {bad} parameters")
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(module, cfg.reranker)
        module.train()
        self.model = module
        if ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.sampler = ResumableSampler(self.dataset, ctx, cfg.seed)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best: Optional[dict] = None
        # every rank draws its own stream (dropout, pair sampling), reproducibly
        _seed_everything(cfg.seed * 1000 + ctx.rank, reranker)
        if latest is not None:
            self._restore(latest, trainer_state)
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    def _teacher(self, student: TrainableReranker) -> TrainableReranker:
        """The frozen teacher of ``distillation``, built through the registry on this device."""
        cfg = self.config
        if not student.supports_distillation:
            raise ValueError(f"{cfg.reranker!r} cannot be trained by distillation (supports_distillation is False)")
        table = cfg.distillation
        options = {"query_length": getattr(student, "query_length", None), "gallery_length": getattr(student, "gallery_length", None)}
        options = {k: v for k, v in options.items() if v is not None}
        teacher = create_reranker(table["reranker"], checkpoint=table["checkpoint"], device=str(self.device),
                                  **{**options, **table["options"]})
        if not isinstance(teacher, TrainableReranker) or not teacher.supports_distillation:
            raise ValueError(f"distillation teacher {table['reranker']!r} does not expose what distillation compares")
        teacher.module.eval().requires_grad_(False)
        return teacher

    def _latest_checkpoint(self) -> tuple[Optional[Path], Optional[dict]]:
        """The checkpoint to resume from and its trainer state: the one ``latest`` names, else
        (that pointer or its folder unreadable, which is then set aside and said) the newest
        readable ``step-*``; (None, None) to start afresh."""
        pointer = self.output_dir / LATEST
        if not pointer.is_file():
            return None, None
        unreadable = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)
        try:
            folder = self.output_dir / pointer.read_text().strip()
            return folder, _read_checkpoint_folder(folder)
        except unreadable as error:
            set_aside(pointer, error)
        for folder in reversed(_step_folders(self.output_dir / CHECKPOINTS)):
            try:
                return folder, _read_checkpoint_folder(folder)
            except unreadable as error:
                set_aside(folder, error)
        return None, None

    def _restore(self, folder: Path, state: dict) -> None:
        if state["world_size"] != self.ctx.world_size or state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{folder} was written by {state['world_size']} process(es) with global batch {state['global_batch']}; "
                f"resume with the same world size and batch (now {self.ctx.world_size}, {self.global_batch})"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best = state["best"]
        _set_rng_state(self.reranker, state["rng"][self.ctx.rank])
        self._log({"event": "resume", "checkpoint": str(folder), "step": self.step, "epoch": self.epoch})

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``epochs`` (or ``max_steps``) are done; returns the last log record."""
        determinism = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            return self._fit()
        finally:  # a process-wide switch: leave it as it was
            torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])

    def _fit(self) -> dict:
        self._setup()
        cfg = self.config
        stop = self.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.total_steps)
        bar = progress(total=stop, initial=min(self.step, stop), desc=f"train {cfg.reranker}", unit="step",
                   disable=not (cfg.progress and self.ctx.is_main))
        record: dict = {"event": "done", "step": self.step, "epoch": self.epoch}  # when nothing is left to do
        saved_at = self.step
        try:
            while self.step < stop:
                micro = self._micro_batches()
                while self.step_in_epoch < self.steps_per_epoch and self.step < stop:
                    started = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    loss = self._optimizer_step(micro)
                    self.step += 1
                    self.step_in_epoch += 1
                    rate = self.global_batch / max(time.perf_counter() - started, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", lists_s=f"{rate:.1f}", refresh=False)  # drawn with the next update
                    record = {"event": "train", "step": self.step, "loss": loss, "lr": lr, "lists_per_s": rate,
                              "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch}
                    if self.step % cfg.log_every == 0 or self.step == stop:
                        self._log(record)
                    # the checkpoint at an epoch's last step is the one _end_epoch writes
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self._save()
                        saved_at = self.step
                if self.step_in_epoch == self.steps_per_epoch:
                    record = self._end_epoch()
                    saved_at = self.step
            if saved_at != self.step:
                self._save()
            if self.step == self.total_steps and self.ctx.is_main:
                _atomic_save_pretrained(self.reranker, self.output_dir / "final")
            self.ctx.barrier()
        finally:
            bar.close()
        return record

    def _micro_batches(self):
        """This rank's micro-batches for the rest of the current epoch."""
        cfg = self.config
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.step_in_epoch * cfg.grad_accumulation * cfg.per_device_batch_size
        self.dataset.set_epoch(self.epoch)  # before the loader starts its workers, which copy the dataset
        # its own generator: starting a loader must not draw from the global RNG, which a resumed run
        # restores from the checkpoint and must find exactly as the uninterrupted run left it
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.epoch)
        loader = DataLoader(self.dataset, batch_size=cfg.per_device_batch_size, sampler=self.sampler,
                            collate_fn=collate_lists, num_workers=cfg.num_workers, drop_last=True,
                            pin_memory=self.device.type == "cuda", generator=generator)
        return iter(loader)

    def _optimizer_step(self, micro) -> float:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        autocast = torch.autocast(self.device.type, dtype=resolve_dtype(cfg.precision), enabled=cfg.precision != "fp32")
        for k in range(cfg.grad_accumulation):
            queries, shortlists, labels = next(micro)
            last = k == cfg.grad_accumulation - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.model.no_sync()
            with sync:
                with autocast:
                    if self.teacher is None:
                        loss = self.reranker.training_loss(queries, shortlists, labels, module=self.model)
                    else:
                        loss = self.reranker.distillation_loss(queries, shortlists, labels, self.teacher,
                                                               cfg.distillation["weight"], module=self.model)
                if loss.ndim != 0:
                    raise ValueError(f"{cfg.reranker}: training_loss must return a scalar, got shape {tuple(loss.shape)}")
                if cfg.precision != "fp16" and not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step + 1} (epoch {self.epoch})")
                self.scaler.scale(loss.float() / cfg.grad_accumulation).backward()
            total += loss.detach().float()
        if cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.reranker.module.parameters(), cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ctx.enabled:
            dist.all_reduce(total)
            total /= self.ctx.world_size
        return total.item() / cfg.grad_accumulation

    def _end_epoch(self) -> dict:
        """Validate (rank 0), keep the best weights, move to the next epoch and checkpoint."""
        record = {"event": "epoch", "step": self.step, "epoch": self.epoch + 1}
        if self.validate is not None:
            if self.ctx.is_main:
                metrics = self._validate()
                record.update(metrics)
                name, value = next(iter(metrics.items()))
                if self.best is None or value > self.best["value"]:
                    self.best = {"metric": name, "value": value, "epoch": self.epoch + 1, "step": self.step}
                    _atomic_save_pretrained(self.reranker, self.output_dir / "best", {"best": self.best})
                record["best"] = self.best
            self.ctx.barrier()
        self.epoch += 1
        self.step_in_epoch = 0
        self._log(record)
        self._save()
        return record

    def _validate(self) -> dict:
        module = self.reranker.module
        module.eval()
        try:
            with torch.inference_mode():
                metrics = self.validate(self.reranker)
        finally:
            module.train()
        if not metrics:
            raise ValueError("validation returned no metric")
        return {k: float(v) for k, v in metrics.items()}

    # -- checkpoints and logs -----------------------------------------------------------------

    def _save(self) -> None:
        """Write a checkpoint (rank 0 writes; every rank contributes its RNG state)."""
        rng = _rng_state(self.reranker)
        if self.ctx.enabled:
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.ctx.is_main:
            name = f"step-{self.step:08d}"
            root = self.output_dir / CHECKPOINTS
            state = {
                "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "world_size": self.ctx.world_size, "global_batch": self.global_batch,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "best": self.best, "rng": states,
            }

            def write(tmp: Path) -> None:
                tmp.mkdir()
                self.reranker.save_pretrained(tmp / "model")
                torch.save(state, tmp / "trainer.pt")

            final = _write_folder(root / name, write)
            atomic_write(self.output_dir / LATEST, f"{CHECKPOINTS}/{name}\n")
            self._prune(root, keep=final)
        self.ctx.barrier()

    def _prune(self, root: Path, keep: Path) -> None:
        done = _step_folders(root)
        for old in done[: max(len(done) - self.config.keep_checkpoints, 0)]:
            if old != keep:
                shutil.rmtree(old)

    def _log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


def _step_folders(root: Path) -> list[Path]:
    """The step checkpoints under ``root``, oldest first (not the ``.corrupt`` ones set aside)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[len("step-"):].isdigit())


def _read_checkpoint_folder(folder: Path) -> dict:
    """The trainer state of a step checkpoint (its model folder is the method's own layout, read
    by its factory); raises when the state is missing or unreadable."""
    if not (folder / "trainer.pt").is_file():
        raise FileNotFoundError(f"{folder} holds no trainer.pt")
    return torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


_CHECKPOINTING = (  # method, keyword: transformers >= 5 names it activation checkpointing
    ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
    ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
)


def _enable_gradient_checkpointing(module: torch.nn.Module, name: str) -> None:
    """Ask the module (or, for a wrapper, its outermost sub-modules that can) to checkpoint
    activations, non-reentrant (which DDP supports)."""

    def able(m):
        return next(((method, kw) for method, kw in _CHECKPOINTING if hasattr(m, method)), None)

    owners = [module] if able(module) else []
    if not owners:
        names: list[str] = []
        for child_name, child in module.named_modules():
            if able(child) and not any(child_name.startswith(f"{o}.") for o in names):
                names.append(child_name)
        owners = [module.get_submodule(n) for n in names]
    if not owners:
        raise ValueError(f"{name!r} does not support gradient checkpointing (its module has no "
                         f"{' or '.join(m for m, _ in _CHECKPOINTING)})")
    for owner in owners:
        method, keyword = able(owner)
        getattr(owner, method)(**{keyword: {"use_reentrant": False}})


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """The folder counterpart of :func:`~locore_plugin.io.atomic.atomic_write`: ``write(tmp)`` fills a
    temporary sibling (``write`` creates it), whose files are fsynced before it is swapped in place of
    ``folder``. A directory cannot replace a non-empty one in a single rename, so the old one is
    first moved aside: a kill between the two renames leaves ``folder`` absent (its previous
    content in ``.{name}.old``), never half written; readers treat it as not yet written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (folder.with_name(f".{folder.name}.{suffix}") for suffix in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)  # what a kill while writing left
    write(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _atomic_save_pretrained(reranker, folder: Path, extra: Optional[dict] = None) -> None:
    """``save_pretrained`` (plus ``training.json`` with ``extra``) swapped in place of ``folder``."""

    def write(tmp: Path) -> None:
        reranker.save_pretrained(tmp)
        if extra is not None:
            (tmp / "training.json").write_text(json.dumps(extra, indent=2))

    _write_folder(folder, write)


def build_validation(options: dict) -> Callable[[TrainableReranker], dict]:
    """The held-out evaluation run after every epoch (the ``[validation]`` table of a recipe).

    Either a dataset in the official layout (``dataset``, ``desc``, ``data_root`` (default
    ``$LOCORE_DATA``), optional ``nn``; a revisited one or a category benchmark), ``synthetic =
    {seed, size}`` (the built-in landmark benchmark, written once under ``directory``) or
    ``synthetic_sop = {seed, size}`` (the synthetic category world, likewise; its test split);
    ``protocols`` (default Medium; for a category dataset e.g. ``["map@r", "r@1"]``), ``junk``
    (default ``remove``, as the LoCoRE evaluation code), ``top_k`` re-ranked images (default
    100), ``num_locals``, ``batch_size``. Returns ``{"<protocol>_mAP": ...}`` in percent (category
    measures by their names: ``R@1``, ``mAP@R``), the first protocol first (the best checkpoint is
    chosen by it), plus the global-only values for reference.
    """
    from locore_plugin.evaluation import DatasetEvaluation, load_dataset, resolve_data_root
    from locore_plugin.evaluation.protocols import measure_name

    options = dict(options)
    protocols = list(options.pop("protocols", ["medium"]))
    junk = options.pop("junk", "remove")
    top_k = int(options.pop("top_k", 100))
    batch_size = int(options.pop("batch_size", 8))
    num_locals = options.pop("num_locals", None)
    nn = options.pop("nn", None)
    synthetic, world = options.pop("synthetic", None), options.pop("synthetic_sop", None)
    if synthetic is not None or world is not None:
        from locore_plugin.data import synthetic as landmarks
        from locore_plugin.data import synthetic_sop

        if synthetic is not None and world is not None:
            raise ValueError("validation takes one of synthetic and synthetic_sop")
        benchmark = landmarks if synthetic is not None else synthetic_sop
        directory = options.pop("directory", None)
        if directory is None:
            raise ValueError("a synthetic validation set needs validation.directory (where it is written)")
        benchmark.write(directory, **(synthetic or world))
        dataset, desc, root = benchmark.DATASET, benchmark.DESCRIPTOR, Path(directory)
    else:
        if "dataset" not in options:
            raise ValueError("validation needs `dataset` (and `desc`, `data_root`) or `synthetic`")
        dataset, desc = options.pop("dataset"), options.pop("desc", "dinov2")
        root = resolve_data_root(options.pop("data_root", None))
    if options:
        raise ValueError(f"unknown validation option(s) {sorted(options)}")
    data = load_dataset(root, dataset, desc, nn=nn, num_locals=num_locals, protocols=protocols, top_k=top_k)
    evaluation = DatasetEvaluation(data, protocols, junk)

    def key(protocol: str) -> str:
        measure = measure_name(protocol)
        return f"{protocol}_mAP" if measure == "mAP" else measure

    baseline = {f"global_{key(p)}": 100 * r["value"] for p, r in evaluation.run(None).items()}

    def validate(reranker) -> dict:
        scores = evaluation.run(reranker, top_k=top_k, batch_size=batch_size, label=f"validation ({reranker.name})")
        return {**{key(p): 100 * r["value"] for p, r in scores.items()}, **baseline}

    return validate


def train(config: TrainConfig, dataset=None, validate: Optional[Callable] = None) -> dict:
    """Run one training job (joining torchrun's process group when there is one)."""
    return Trainer(config, dataset, validate).fit()


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training recipe (.toml or .json), e.g. recipes/train_cpu_smoke.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (dotted for tables: data.list_length=50; VALUE: a TOML or Python "
                        "literal, or plain text); repeatable")
    parser.add_argument("--output-dir", help="where checkpoints and logs go (overrides the recipe)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (with a checkpoint)")


def run_from_args(args) -> int:
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    config = load_config(args.config, tuple(overrides))
    try:
        record = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if Distributed.from_environment().is_main:
        print(json.dumps(record))
    return 0


def add_subcommand(subparsers) -> None:
    """``locore-plugin train``: the same as ``python -m locore_plugin.training``."""
    parser = subparsers.add_parser("train", help="train a re-ranker from a recipe (torchrun for several GPUs)")
    add_arguments(parser)
    parser.set_defaults(run=run_from_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locore_plugin.training", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
