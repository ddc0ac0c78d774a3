"""Training CLI, datasets, checkpoint/resume and DDP (tiny models, reference backend, CPU)."""
import csv
import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from sphereops import data as sdata
from sphereops import train as strain
from sphereops.train import TrainConfig, config_from_args, learning_rate, train

# The smallest SphereNet-9 the CLI builds (widths 4, 6, 8; fc6 8) on 16x16 inputs.
TINY = dict(model="spherenet9", width_mult=1 / 32, image_size=16, threads=1, progress=False,
            backend="reference")


# ----------------------------------------------------------------------------- datasets
def _write_cifar(root, name, rng):
    """Files in the real CIFAR python-pickle layout (uint8 [N, 3072] rows, R then G then B)."""
    folder, files, label_key, num_classes = sdata._cifar_layout(name)
    os.makedirs(os.path.join(root, folder))
    written = {}
    for split, names in files.items():
        images, labels = [], []
        for filename in names:
            n = 3 if split == "train" else 4
            batch_images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            batch_labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
            batch = {b"batch_label": b"test batch", label_key: batch_labels, b"data": batch_images,
                     b"filenames": [f"img{i}.png".encode() for i in range(n)]}
            if name == "cifar100":
                batch[b"coarse_labels"] = [v // 5 for v in batch_labels]
            with open(os.path.join(root, folder, filename), "wb") as handle:
                pickle.dump(batch, handle, protocol=2)
            images.append(batch_images)
            labels += batch_labels
        written[split] = (np.concatenate(images), np.array(labels))
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_the_pickle_format(tmp_path, name, _fresh_seed):
    rng = np.random.default_rng(_fresh_seed)
    written = _write_cifar(str(tmp_path), name, rng)
    for split in ("train", "test"):
        ds = sdata.load_dataset(name, split, tmp_path)
        images, labels = written[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 3, 32, 32)
        assert ds.num_classes == (10 if name == "cifar10" else 100)
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
        assert torch.equal(ds.images[0, 1, 2, 3], torch.tensor(images[0, 1024 + 2 * 32 + 3]))
        assert torch.equal(ds.images.reshape(len(labels), -1), torch.from_numpy(images))
    # The folder itself also works as --data-dir.
    folder = sdata._cifar_layout(name)[0]
    assert len(sdata.load_dataset(name, "test", tmp_path / folder)) == len(written["test"][1])


def test_missing_dataset_files_name_what_is_expected(tmp_path):
    with pytest.raises(sdata.DatasetNotFoundError, match="data_batch_1.*data_batch_5"):
        sdata.load_dataset("cifar10", "train", tmp_path)
    with pytest.raises(sdata.DatasetNotFoundError, match="t10k-images-idx3-ubyte"):
        sdata.load_dataset("fashion-mnist", "test", tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        sdata.load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        sdata.load_dataset("digits", "val")


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_loader(tmp_path, suffix, _fresh_seed):
    rng = np.random.default_rng(_fresh_seed)
    arrays = {}
    for split, (img_name, lbl_name) in sdata._IDX_FILES.items():
        images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=5, dtype=np.uint8)
        _write_idx(str(tmp_path / (img_name + suffix)), images)
        _write_idx(str(tmp_path / (lbl_name + suffix)), labels)
        arrays[split] = (images, labels)
    for split in ("train", "test"):
        ds = sdata.load_dataset("mnist", split, tmp_path)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays[split][0]))
        assert torch.equal(ds.labels, torch.from_numpy(arrays[split][1].astype(np.int64)))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        sdata.read_idx(str(bad))


def test_digits_and_synthetic_sets():
    train_set, test_set = sdata.load_dataset("digits", "train"), sdata.load_dataset("digits", "test")
    assert len(train_set) + len(test_set) == 1797 and train_set.images.shape[1:] == (1, 8, 8)
    assert float(train_set.images.max()) == 255.0 and float(train_set.images.min()) == 0.0
    synth = sdata.load_dataset("synthetic", "train", synthetic_size=40, synthetic_image_size=12)
    assert synth.images.shape == (40, 3, 12, 12)


def test_model_input_scaling_and_augmentation(_fresh_seed):
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x = sdata.to_model_input(images, 8)
    assert torch.allclose(x.double(), (images.double() - 127.5) / 128.0, rtol=0, atol=1e-6)
    assert sdata.to_model_input(images, 16).shape == (4, 3, 16, 16)
    a = sdata.augment_crop_flip(x, torch.Generator().manual_seed(_fresh_seed))
    b = sdata.augment_crop_flip(x, torch.Generator().manual_seed(_fresh_seed))
    assert torch.equal(a, b) and a.shape == x.shape
    # Every augmented image is a shifted (and maybe flipped) copy: its values come from x or padding.
    for i in range(4):
        assert set(a[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}


def test_batch_indices_shard_the_global_batch():
    full = sdata.batch_indices(50, 8, seed=3, iteration=7)
    shards = [sdata.batch_indices(50, 8, seed=3, iteration=7, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(shards), full)
    # One epoch (6 batches of 8 from 50 samples) visits distinct samples.
    epoch = torch.cat([sdata.batch_indices(50, 8, seed=3, iteration=i) for i in range(6)])
    assert epoch.unique().numel() == 48
    with pytest.raises(ValueError, match="divisible"):
        sdata.batch_indices(50, 9, seed=0, iteration=0, world_size=2)


# ----------------------------------------------------------------------------- config / CLI
def test_cli_parses_every_option():
    cfg = config_from_args([
        "--model", "sphereresnet32", "--operator", "learnable", "--k", "0.4", "--data", "synthetic",
        "--loss", "softmax", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.8",
        "--weight-decay", "5e-4", "--lr-schedule", "cosine", "--iterations", "7",
        "--batch-size", "16", "--orth", "--amp", "bf16", "--channels-last", "--compile",
        "--seed", "5", "--device", "cpu", "--backend", "reference", "--no-progress",
        "--lr-steps", "0.5,0.75", "--save-output"])
    assert (cfg.model, cfg.operator, cfg.k, cfg.optimizer, cfg.iterations, cfg.orth) == (
        "sphereresnet32", "learnable", 0.4, "sgd", 7, 2e-4)
    assert cfg.amp == "bf16" and cfg.channels_last and cfg.compile and not cfg.progress
    assert cfg.save_output and not config_from_args([]).save_output
    assert cfg.lr_steps == (0.5, 0.75)
    assert config_from_args(["--operator", "none"]).operator is None
    assert config_from_args([]).epochs == 5.0
    with pytest.raises(SystemExit):
        config_from_args(["--epochs", "1", "--iterations", "3"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr must be positive"),
    (dict(margin=0), "margin"),
    (dict(loss="w-softmax", margin=2), "w-softmax"),
    (dict(lr_steps=(1.5,)), "lr_steps"),
    (dict(data="imagenet"), "data must be one of"),
    (dict(operator="tanh"), "operator"),
    (dict(epochs=1.0, iterations=3), "not both"),
    (dict(save_output=True, norm="none"), "save_output needs a norm"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs).validate()


def test_learning_rate_schedules():
    step = TrainConfig(lr=1.0, lr_schedule="step", lr_steps=(0.5, 0.75), iterations=100).validate()
    got = [learning_rate(step, i, 100) for i in (0, 49, 50, 74, 75, 99)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    cosine = TrainConfig(lr=2.0, lr_schedule="cosine", iterations=10).validate()
    assert learning_rate(cosine, 0, 10) == 2.0 and abs(learning_rate(cosine, 5, 10) - 1.0) < 1e-12


# ----------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("operator,save_output", [(None, False), ("cosine", False),
                                                  ("linear", True)])
def test_short_digits_run_lowers_the_loss(tmp_path, operator, save_output):
    result = train(TrainConfig(data="digits", operator=operator, iterations=40, batch_size=64,
                               eval_every=40, log_every=10, out_dir=str(tmp_path), seed=1,
                               lr=3e-3, lr_schedule="constant", save_output=save_output, **TINY))
    losses = [float(r["loss"]) for r in result.rows]
    assert len(losses) == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.final_test_acc > 0.4  # chance is 0.1
    with open(tmp_path / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == list(strain.CSV_COLUMNS)
    assert [r["iteration"] for r in rows] == ["10", "20", "30", "40"]
    assert rows[-1]["test_acc"] != "" and rows[0]["test_acc"] == ""
    assert os.path.exists(tmp_path / "last.pt")


@pytest.mark.parametrize("extra", [dict(operator="learnable", orth=2e-4, augment=True),
                                   dict(operator="sigmoid", optimizer="sgd", amp="bf16")])
def test_resume_continues_exactly(tmp_path, extra):
    base = dict(data="synthetic", iterations=6, batch_size=32, eval_every=3, log_every=1,
                lr_steps=(0.5,), seed=2, **TINY, **extra)
    straight = train(TrainConfig(out_dir=str(tmp_path / "a"), **base))
    interrupted = train(TrainConfig(out_dir=str(tmp_path / "b"), stop_at=4, **base))
    assert interrupted.iterations == 4
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["iteration"] == 4
    # A run killed later logged a row after its last checkpoint: resuming must drop and redo it.
    with open(tmp_path / "b" / "log.csv", "a") as handle:
        handle.write("5,0.312,9.9,0.5,,0.001,99\n")
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    assert resumed.iterations == 6
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    with open(tmp_path / "a" / "log.csv") as fa, open(tmp_path / "b" / "log.csv") as fb:
        assert strip(csv.DictReader(fa)) == strip(csv.DictReader(fb))
    with pytest.raises(ValueError, match="seed"):
        train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **{**base, "seed": 3}))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    strain.save_checkpoint_atomic({"iteration": 1}, path)

    def crash(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(strain.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        strain.save_checkpoint_atomic({"iteration": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_ga_softmax_loss_option(tmp_path):
    try:
        strain._ga_softmax_class()
    except ImportError:
        with pytest.raises(ImportError, match="GASoftmaxLoss"):
            train(TrainConfig(data="synthetic", loss="w-softmax", iterations=1, batch_size=32,
                              out_dir=str(tmp_path), **TINY))
        pytest.skip("sphereops GASoftmaxLoss is not available in this build")
    for loss, margin in (("w-softmax", 1), ("ga-softmax", 2)):
        result = train(TrainConfig(data="digits", loss=loss, margin=margin, operator="cosine",
                                   iterations=40, batch_size=64, eval_every=40, log_every=10,
                                   lr=3e-3, lr_schedule="constant", out_dir=str(tmp_path / loss),
                                   seed=1, **TINY))
        losses = [float(r["loss"]) for r in result.rows]
        assert losses[-1] < 0.8 * losses[0], (loss, losses)
        assert result.final_test_acc > 0.4, (loss, result.final_test_acc)


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """torchrun, 2 ranks on CPU: after 3 SGD steps both ranks hold identical parameters, and the
    averaged gradients equal those of one process on the whole global batch (no BatchNorm, whose
    per-rank statistics would differ on CPU where there is no SyncBatchNorm)."""
    args = ["--data", "synthetic", "--model", "spherenet9", "--width-mult", str(1 / 32),
            "--image-size", "16", "--operator", "sigmoid", "--norm", "none", "--optimizer", "sgd",
            "--lr", "0.05", "--iterations", "3", "--batch-size", "32", "--backend", "reference",
            "--threads", "1", "--no-progress", "--save-rank-state", "--seed", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", "-m", "sphereops.train", *args, "--out-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), f"ranks differ in {key}"
    for key, value in ranks[0]["grads"].items():
        assert torch.equal(value, ranks[1]["grads"][key]), f"rank gradients differ in {key}"

    cfg = config_from_args(args + ["--out-dir", str(tmp_path / "single")])
    train(cfg)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert single["world_size"] == 1
    assert set(single["grads"]) == set(ranks[0]["grads"]) and len(single["grads"]) > 0
    for key, grad in single["grads"].items():
        ddp_grad = ranks[0]["grads"][key]
        scale = grad.abs().max().item()
        assert (ddp_grad - grad).abs().max().item() <= 1e-5 * scale + 1e-8, key
    for key, value in single["params"].items():
        assert torch.allclose(ranks[0]["params"][key], value, rtol=1e-5, atol=1e-7), key


# ----------------------------------------------------------------------------- compare
def test_compare_tables_and_plot(tmp_path):
    from sphereops import compare

    assert compare.iterations_to_reach([(10, 0.5), (20, 0.85), (30, 0.8)], 0.8) == 20
    assert compare.iterations_to_reach([(10, 0.5)], 0.8) is None
    md, png = tmp_path / "docs" / "compare.md", tmp_path / "docs" / "compare.png"
    # A throughput section written earlier survives the redraw of the convergence part.
    compare._write_throughput_section(str(md), "## Training throughput\n\n| a | b |\n")
    assert compare._variant_model_args("cosine+spherenorm") == ("cosine", "sphere")
    assert compare._variant_model_args("cnn") == (None, "batch")
    assert compare.main(["--data", "synthetic", "--variants", "cnn,cosine,cnn+spherenorm", "--seeds", "0,1",
                         "--iterations", "4", "--eval-every", "2", "--batch-size", "32",
                         "--width-mult", str(1 / 32), "--threads", "1", "--no-progress",
                         "--backend", "reference", "--targets", "0.0,1.01",
                         "--runs-dir", str(tmp_path / "runs"), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "| CNN (plain) | 2 | - |" in text and "| cosine | 2 | - |" in text
    assert "| cnn+spherenorm | 2 | - |" in text
    assert text.count("| cnn | ") == 2 and "## Training throughput" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="variants"):
        compare.main(["--variants", "cnn,tanh", "--runs-dir", str(tmp_path / "r2")])
