"""Training CLI: ``python -m sphereops.train`` (``make train``), single process or under torchrun.

    python -m sphereops.train --data digits --model spherenet9 --operator cosine --epochs 5
    python -m sphereops.train --data fashion-mnist --operator none --iterations 2000 --width-mult 0.25
    torchrun --nproc_per_node 2 -m sphereops.train --data digits --device cpu      # DDP over gloo

Each run directory (``--out-dir``) gets ``log.csv`` (iteration, epoch, loss, train_acc, test_acc,
lr, time_s) and ``last.pt``, a checkpoint written atomically (temporary file + rename) at every
evaluation and at the end; ``--resume`` continues from it exactly: the sample order and the
augmentation are functions of (seed, iteration), and the optimiser, scaler, RNG and elapsed time
are restored.

Distributed: when ``WORLD_SIZE`` > 1 (torchrun) the process group uses NCCL on CUDA and gloo on
CPU; the global batch ``--batch-size`` is split evenly over the ranks, gradients are averaged by
DistributedDataParallel, and rank 0 writes the log and the checkpoint. On CUDA BatchNorm becomes
SyncBatchNorm; on CPU (where PyTorch has no SyncBatchNorm) each rank normalises with its own
shard's statistics and DDP broadcasts rank 0's running statistics.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sphereops import data as sdata
from sphereops.models import MODEL_NAMES, NORM_CHOICES, build_model, canonical_operator
from sphereops.orthogonality import orthogonality_penalty

LOSSES = ("softmax", "w-softmax", "ga-softmax")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
CSV_COLUMNS = ("iteration", "epoch", "loss", "train_acc", "test_acc", "lr", "time_s")
CHECKPOINT_FORMAT = "sphereops-train-1"
# Settings that may differ between a checkpoint and the run resuming it (they do not change the
# arithmetic of the steps already taken).
RESUMABLE_CHANGES = {"iterations", "epochs", "eval_every", "log_every", "progress", "device",
                     "threads", "out_dir", "resume", "compile", "eval_batch_size", "stop_at",
                     "save_rank_state", "backend"}


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI flags, with ``-`` for ``_``)."""

    model: str = "spherenet9"
    operator: Optional[str] = "cosine"
    k: float = 0.3
    k_init: float = 0.5
    width_mult: float = 1.0
    norm: str = "batch"
    data: str = "digits"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    train_subset: int = 0
    test_subset: int = 0
    augment: Optional[bool] = None
    loss: str = "softmax"
    margin: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_steps: tuple = (34 / 64, 54 / 64)
    lr_gamma: float = 0.1
    epochs: Optional[float] = None
    iterations: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 500
    eval_every: int = 0
    log_every: int = 10
    orth: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    save_output: bool = False
    threads: int = 0
    out_dir: Optional[str] = None
    resume: bool = False
    progress: bool = True
    stop_at: int = 0
    save_rank_state: bool = False

    def validate(self) -> "TrainConfig":
        """Check every option, fill defaults that depend on others; returns self."""
        self.operator = canonical_operator(self.operator)
        choices = {"model": MODEL_NAMES, "norm": NORM_CHOICES, "data": sdata.DATASET_NAMES,
                   "loss": LOSSES, "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
                   "amp": AMP_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("k", "width_mult", "lr", "batch_size", "eval_batch_size", "log_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "orth", "train_subset", "test_subset",
                     "eval_every", "threads", "stop_at"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.margin, int) or self.margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {self.margin!r}")
        if self.loss == "w-softmax" and self.margin != 1:
            raise ValueError("loss='w-softmax' is GA-softmax with margin 1; use loss='ga-softmax' "
                             "for a larger margin")
        if self.save_output and self.norm == "none":
            raise ValueError("save_output needs a norm after each SphereConv (norm='none' puts an "
                             "in-place ReLU on the output the backward would recover c from)")
        if self.epochs is not None and self.iterations is not None:
            raise ValueError("give epochs or iterations, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        if self.iterations is not None and not (isinstance(self.iterations, int) and self.iterations > 0):
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        if self.epochs is None and self.iterations is None:
            self.epochs = 5.0
        self.lr_steps = tuple(float(s) for s in self.lr_steps)
        if any(not 0 < s <= 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps are fractions of the run in (0, 1], got {self.lr_steps!r}")
        if self.image_size is None:
            self.image_size = {"digits": 16, "synthetic": 16}.get(
                self.data, sdata.NATIVE_SIZE.get(self.data, 32))
        if self.augment is None:
            self.augment = self.data in ("cifar10", "cifar100")
        if self.out_dir is None:
            op = self.operator or "cnn"
            self.out_dir = os.path.join("runs", f"{self.model}-{op}-{self.data}-s{self.seed}")
        return self


@dataclass
class TrainResult:
    """What ``train`` returns: the CSV rows (dicts), the final test accuracy, the iterations
    done, and the trained (unwrapped) model and loss head."""

    rows: list
    final_test_acc: float
    iterations: int
    model: nn.Module
    head: Optional[nn.Module] = None
    out_dir: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_kind: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        initialized_here = True
    return _Dist(rank, world_size, local_rank, initialized_here)


def _resolve_device(config: TrainConfig, dist_info: _Dist) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _all_reduce_sum(values, dist_info: _Dist, device) -> list:
    if not dist_info.enabled:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------- model + loss
class _Network(nn.Module):
    """The trained graph: backbone model plus loss head; ``forward(x, y) -> (loss, logits)`` so
    that DDP sees every parameter used in one forward."""

    def __init__(self, model: nn.Module, head: Optional[nn.Module]):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x, y):
        if self.head is None:
            logits = self.model(x)
            return F.cross_entropy(logits.float(), y), logits
        features = self.model(x).float()
        return _head_loss_and_logits(self.head, features, y)


def _ga_softmax_class():
    for module_name in ("sphereops.nn", "sphereops.loss"):
        try:
            module = __import__(module_name, fromlist=["GASoftmaxLoss"])
        except ImportError:
            continue
        if hasattr(module, "GASoftmaxLoss"):
            return module.GASoftmaxLoss
    raise ImportError("loss='w-softmax'/'ga-softmax' needs sphereops.nn.GASoftmaxLoss "
                      "(sphereops/loss.py), which is not available in this build; use --loss softmax")


def _make_head(config: TrainConfig, in_features: int, num_classes: int) -> Optional[nn.Module]:
    if config.loss == "softmax":
        return None
    ga_softmax = _ga_softmax_class()
    operator = "cosine" if config.operator in (None, "learnable") else config.operator
    # A margin above 1 needs SphereFace's annealing (start near W-Softmax, tighten gradually).
    return ga_softmax(in_features, num_classes, margin=config.margin, operator=operator, k=config.k,
                      lambda_schedule="sphereface" if config.margin > 1 else None)


def _head_loss_and_logits(head: nn.Module, features: torch.Tensor, y: torch.Tensor):
    """(loss, logits for prediction) from a GA-softmax head, whatever it returns."""
    out = head(features, y)
    if isinstance(out, tuple):
        return out[0], out[1]
    logits = getattr(head, "last_logits", None)  # GASoftmaxLoss keeps the margin-free logits
    if not isinstance(logits, torch.Tensor) or logits.shape[0] != features.shape[0]:
        logits = _head_logits(head, features)
    return out, logits


def _head_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    for name in ("logits", "predict_logits", "class_logits"):
        if callable(getattr(head, name, None)):
            return getattr(head, name)(features)
    # Without the margin, the largest logit is the class whose normalised weight makes the
    # smallest angle with the feature: the cosine decides the prediction.
    weight = head.weight
    if weight.shape[0] != features.shape[1]:
        weight = weight.t()
    return F.normalize(features, dim=1) @ F.normalize(weight.float(), dim=0)


# ----------------------------------------------------------------------------- schedule
def learning_rate(config: TrainConfig, iteration: int, total: int) -> float:
    """The learning rate of step ``iteration`` (0-based) of ``total``."""
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * iteration / max(total, 1)))
    drops = sum(1 for s in config.lr_steps if iteration >= int(round(s * total)))
    return config.lr * (config.lr_gamma ** drops)


# ----------------------------------------------------------------------------- checkpoint + log
def save_checkpoint_atomic(state: dict, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``: a
    reader (or a crash) sees the old checkpoint or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: str, rows: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _format_row(row: dict) -> dict:
    out = {}
    for key in CSV_COLUMNS:
        value = row.get(key, "")
        if isinstance(value, float):
            value = "" if math.isnan(value) else f"{value:.6g}"
        out[key] = str(value)
    return out


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(network: _Network, dataset: sdata.ImageDataset, config: TrainConfig, device,
             dist_info: _Dist, autocast) -> float:
    """Test accuracy over ``dataset`` (each rank takes a strided share; counts all-reduced)."""
    was_training = network.training
    network.eval()
    correct = total = 0
    indices = torch.arange(len(dataset))[dist_info.rank::dist_info.world_size]
    for start in range(0, len(indices), config.eval_batch_size):
        idx = indices[start:start + config.eval_batch_size]
        x = sdata.to_model_input(dataset.images[idx], config.image_size, device=device)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = dataset.labels[idx].to(device)
        with autocast():
            features = network.model(x)
            logits = features if network.head is None else _head_logits(network.head, features.float())
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    network.train(was_training)
    correct, total = _all_reduce_sum([correct, total], dist_info, device)
    return correct / max(total, 1)


# ----------------------------------------------------------------------------- main loop
def _subset(dataset: sdata.ImageDataset, size: int) -> sdata.ImageDataset:
    if size <= 0 or size >= len(dataset):
        return dataset
    # A fixed (seed-independent) subset, so runs with different seeds see the same data.
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(12345))[:size]
    return sdata.ImageDataset(dataset.name, dataset.split, dataset.images[index],
                              dataset.labels[index], dataset.num_classes)


def _autocast_factory(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return lambda: torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _check_resume_compatible(saved: dict, config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    changed = []
    for key, value in saved.items():
        if key in RESUMABLE_CHANGES or key not in current:
            continue
        now = current[key]
        if isinstance(now, tuple):
            now = list(now)
        if isinstance(value, tuple):
            value = list(value)
        if now != value:
            changed.append(f"{key}: checkpoint {value!r}, now {now!r}")
    if changed:
        raise ValueError("--resume: the checkpoint was written with other settings: " + "; ".join(changed))


def train(config: TrainConfig, *, on_log: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Run one training job as described by ``config`` (see the module docstring)."""
    config = dataclasses.replace(config).validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device_kind = "cuda" if (config.device.startswith("cuda") or
                             (config.device == "auto" and torch.cuda.is_available())) else "cpu"
    dist_info = _setup_distributed(device_kind)
    try:
        return _train(config, dist_info, on_log)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, dist_info: _Dist, on_log) -> TrainResult:
    device = _resolve_device(config, dist_info)
    if config.batch_size % dist_info.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of "
                         f"processes {dist_info.world_size}")
    load_kwargs = dict(synthetic_channels=1, seed=config.seed)
    train_set = _subset(sdata.load_dataset(config.data, "train", config.data_dir, **load_kwargs),
                        config.train_subset)
    test_set = _subset(sdata.load_dataset(config.data, "test", config.data_dir, **load_kwargs),
                       config.test_subset)
    per_epoch = len(train_set) // config.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set "
                         f"({len(train_set)} samples)")
    total = config.iterations if config.iterations is not None else max(1, math.ceil(config.epochs * per_epoch))
    eval_every = config.eval_every or per_epoch

    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=train_set.num_classes,
                        in_channels=train_set.channels, input_size=config.image_size,
                        operator=config.operator, k=config.k, k_init=config.k_init,
                        width_mult=config.width_mult, norm=config.norm, backend=config.backend)
    if config.save_output:
        from sphereops.nn import enable_save_output
        enable_save_output(model)
    head = None
    if config.loss != "softmax":
        model.classifier = nn.Identity()
        head = _make_head(config, model.embedding_dim, train_set.num_classes)
    network = _Network(model, head).to(device)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if dist_info.enabled and device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)

    params = list(network.parameters())
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    autocast = _autocast_factory(config, device)

    out_dir = config.out_dir
    ckpt_path = os.path.join(out_dir, "last.pt")
    csv_path = os.path.join(out_dir, "log.csv")
    start_iteration, elapsed_before, rows = 0, 0.0, []
    if config.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a sphereops training checkpoint")
        _check_resume_compatible(state["config"], config)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())  # map_location moved it; RNG states live on CPU
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start_iteration, elapsed_before = state["iteration"], state["elapsed"]
        # Rows logged after the checkpoint belong to the interrupted tail: drop them.
        rows = [r for r in _read_csv(csv_path) if int(r["iteration"]) <= start_iteration]
        if dist_info.is_main:
            _write_csv(csv_path, rows)
    elif dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(csv_path):
            os.remove(csv_path)

    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        trained = DistributedDataParallel(network, **ddp_kwargs)
    else:
        trained = network
    if config.compile:
        trained = torch.compile(trained)

    def checkpoint(iteration, elapsed):
        if not dist_info.is_main:
            return
        save_checkpoint_atomic({
            "format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config),
            "iteration": iteration, "elapsed": elapsed, "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }, ckpt_path)

    stop = min(total, config.stop_at) if config.stop_at else total
    bar = None
    if config.progress and dist_info.is_main and stop > start_iteration:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start_iteration, desc=os.path.basename(out_dir),
                       dynamic_ncols=True, leave=False)
        except ImportError:
            bar = None

    network.train()
    window_loss = window_correct = window_count = 0.0
    last_test_acc = float("nan")
    started = time.perf_counter()
    iteration = start_iteration
    for iteration in range(start_iteration, stop):
        lr = learning_rate(config, iteration, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sdata.batch_indices(len(train_set), config.batch_size, config.seed, iteration,
                                  dist_info.rank, dist_info.world_size)
        x = sdata.to_model_input(train_set.images[idx], config.image_size, device=device)
        if config.augment:
            generator = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + iteration) * 64 + dist_info.rank)
            x = sdata.augment_crop_flip(x.cpu(), generator).to(device)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = train_set.labels[idx].to(device)

        with autocast():
            loss, logits = trained(x, y)
        total_loss = loss
        if config.orth:
            total_loss = total_loss + orthogonality_penalty(
                network.model, config.orth, layers="conv" if config.operator is None else "sphere")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total_loss).backward()
        scaler.step(optimizer)
        scaler.update()

        window_loss += float(loss.detach()) * y.numel()
        window_correct += float((logits.detach().argmax(1) == y).sum())
        window_count += y.numel()
        done = iteration + 1
        if bar is not None:
            bar.update(1)
        evaluate_now = done % eval_every == 0 or done == total
        if done % config.log_every == 0 or evaluate_now:
            sums = _all_reduce_sum([window_loss, window_correct, window_count], dist_info, device)
            test_acc = float("nan")
            if evaluate_now:
                test_acc = evaluate(network, test_set, config, device, dist_info, autocast)
                last_test_acc = test_acc
            elapsed = elapsed_before + time.perf_counter() - started
            row = _format_row({"iteration": done, "epoch": f"{done / per_epoch:.3f}",
                               "loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
                               "test_acc": test_acc, "lr": lr, "time_s": elapsed})
            rows.append(row)
            if dist_info.is_main:
                _append_csv(csv_path, row)
                if on_log is not None:
                    on_log(row)
            if bar is not None:
                postfix = {"loss": row["loss"], "acc": row["train_acc"]}
                if evaluate_now:
                    postfix["test"] = row["test_acc"]
                bar.set_postfix(postfix, refresh=False)
            window_loss = window_correct = window_count = 0.0
        if evaluate_now or done == stop:
            checkpoint(done, elapsed_before + time.perf_counter() - started)
    if bar is not None:
        bar.close()

    if config.save_rank_state:
        grads = {name: p.grad.detach().cpu().clone() for name, p in network.named_parameters()
                 if p.grad is not None}
        params = {name: t.detach().cpu().clone() for name, t in network.state_dict().items()}
        os.makedirs(out_dir, exist_ok=True)
        torch.save({"params": params, "grads": grads, "world_size": dist_info.world_size},
                   os.path.join(out_dir, f"rank{dist_info.rank}.pt"))
    return TrainResult(rows=rows, final_test_acc=last_test_acc,
                       iterations=max(stop, start_iteration),
                       model=network.model, head=network.head, out_dir=out_dir)


# ----------------------------------------------------------------------------- CLI
def _bool_flag(parser, name, default, help_text):
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m sphereops.train",
                                description="Train a SphereNet (or its plain-CNN baseline).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default=d.model)
    g.add_argument("--operator", default="cosine",
                   choices=["none", "linear", "cosine", "sigmoid", "learnable"],
                   help="SphereConv operator; 'none' = plain CNN baseline")
    g.add_argument("--k", type=float, default=d.k, help="sigmoid operator's k")
    g.add_argument("--k-init", type=float, default=d.k_init, help="learnable operator's initial k")
    g.add_argument("--width-mult", type=float, default=d.width_mult, help="scale every width")
    g.add_argument("--norm", choices=NORM_CHOICES, default=d.norm)
    g.add_argument("--backend", choices=["auto", "reference", "triton"], default=d.backend)
    _bool_flag(g, "save-output", d.save_output,
               "SphereConvs keep their output, not the cosine, for the backward (linear/cosine "
               "operators; see sphereops.nn.enable_save_output)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=sdata.DATASET_NAMES, default=d.data)
    g.add_argument("--data-dir", default=None,
                   help="folder of the IDX / CIFAR files (default: per dataset, see sphereops.data)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    g.add_argument("--train-subset", type=int, default=0, help="train on this many samples (0: all)")
    g.add_argument("--test-subset", type=int, default=0, help="test on this many samples (0: all)")
    _bool_flag(g, "augment", None, "random crop + flip (default: on for CIFAR)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--margin", type=int, default=d.margin, help="GA-softmax margin m")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="step: x lr-gamma at the lr-steps fractions of the run (official 34k, 54k of 64k)")
    g.add_argument("--lr-steps", default=",".join(f"{s:.4g}" for s in d.lr_steps))
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="default 5 when --iterations is absent")
    length.add_argument("--iterations", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all ranks)")
    g.add_argument("--orth", type=float, default=d.orth, nargs="?", const=2e-4,
                   help="orthogonality penalty coefficient (official 2e-4; 0 = off)")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp)
    _bool_flag(g, "channels-last", d.channels_last, "channels_last memory format")
    _bool_flag(g, "compile", d.compile, "torch.compile the network")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=None, help="default runs/<model>-<operator>-<data>-s<seed>")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="iterations (0: each epoch)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    g.add_argument("--stop-at", type=int, default=0,
                   help="stop after this iteration (checkpointed; the schedule still follows the "
                        "full run, so --resume continues it exactly)")
    _bool_flag(g, "progress", d.progress, "tqdm progress bar")
    g.add_argument("--save-rank-state", action="store_true",
                   help="write each rank's final parameters and last gradients to <out-dir>/rank<r>.pt")
    return p


def config_from_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["lr_steps"] = tuple(float(s) for s in values["lr_steps"].split(",") if s.strip())
    return TrainConfig(**values).validate()


def main(argv=None) -> int:
    config = config_from_args(argv)
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.iterations} iterations, test accuracy {result.final_test_acc:.4f}, "
              f"log {os.path.join(result.out_dir, 'log.csv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
