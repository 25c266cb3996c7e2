"""The collection's tests, CPU only: `python -m pytest -q test_all.py` (under 5 minutes on 2 cores).

Foundation (data, crops, probe, CLI/runtime contract, shared-code identity) first, then one section per
method. Speed is not tested here: it is measured with --benchmark N (the step alone) or --max_steps.
"""
import dataclasses
import functools
import gzip
import importlib
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import a2mim
import amt
import attmask as am
import common
import dtm
import extrema as ex

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["attmask", "amt", "dtm", "a2mim", "extrema"]
PRESENT = [m for m in METHODS if os.path.exists(os.path.join(HERE, f"{m}.py"))]
TINY = ["--data", "synthetic", "--model", "vit_pico", "--batch_size", "8", "--num_workers", "0",
        "--log_every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
torch.set_num_threads(1)


def run_script(script, args, out_dir, check=True, timeout=240):
    """`python script args --out_dir out_dir` in a subprocess; returns CompletedProcess (stdout+stderr)."""
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--out_dir", str(out_dir)]
    r = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def run_torchrun(script, args, out_dir, nproc=2, timeout=240):
    """A real multi-process run: torchrun --nproc_per_node=2 with the gloo backend on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, script), *args, "--out_dir", str(out_dir), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def run_inprocess(method, args, out_dir, capsys):
    """Train in this process (no interpreter start-up): returns what it printed."""
    mod = importlib.import_module(method)
    capsys.readouterr()
    mod.train(mod.parse_config([*args, "--out_dir", str(out_dir)]))
    return capsys.readouterr().out


def fit_one_batch(opt, loss_fn, steps, after_backward=None):
    """Optimizer steps on one fixed batch; loss_fn(step) -> loss. Returns the loss of every step."""
    losses = []
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        if after_backward:
            after_backward()
        opt.step()
        losses.append(loss.item())
    return losses


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)


def max_param_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------
# Data

def test_synthetic_is_deterministic_and_class_structured():
    a, b = common.Synthetic(200, 32, seed=0), common.Synthetic(200, 32, seed=0)
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0])) and a[7][1] == 7 % 10
    assert not np.array_equal(np.asarray(a[7][0]), np.asarray(a[17][0]))  # same class, different image
    # raw pixels: a linear probe is well above chance (10%) but far from trivial
    x = torch.tensor(np.stack([np.asarray(a[i][0]) for i in range(200)])).float().flatten(1) / 255
    t = common.Synthetic(100, 32, seed=1)
    xt = torch.tensor(np.stack([np.asarray(t[i][0]) for i in range(100)])).float().flatten(1) / 255
    y, yt = torch.tensor(a.targets), torch.tensor(t.targets)
    acc, _ = common.linear_probe(x, y, xt, yt, epochs=30, batch_size=50)
    assert 35 < acc < 100, acc
    assert common.Synthetic(4, 96)[0][0].size == (96, 96)  # any size


def write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                + arr.tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [3, 1, 4, 1, 5])
    ds = common.build_dataset("fashion-mnist", str(tmp_path), True)
    img, y = ds[2]
    assert len(ds) == 5 and y == 4 and img.size == (32, 32) and img.mode == "RGB"
    a = np.asarray(img)
    assert (np.array_equal(a[2:30, 2:30, 0], imgs[2]) and a[:2].sum() == 0
            and np.array_equal(a[..., 0], a[..., 2]))


def test_imagenet_folder_and_per_class_subset(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            os.makedirs(tmp_path / split / c)
            for i in range(5):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    full = common.build_dataset("imagenet", str(tmp_path), True)
    assert len(full) == 10 and len(common.build_dataset("imagenet", str(tmp_path), False)) == 10
    # AttMask's "first 260 per class"
    first3 = common.build_dataset("imagenet", str(tmp_path), True, subset=3)
    assert [os.path.basename(p) for p, _ in first3.samples] == ["0.png", "1.png", "2.png"] * 2
    assert first3.targets == [0, 0, 0, 1, 1, 1]
    assert len(common.build_dataset("imagenet", str(tmp_path), True, subset=0.4)) == 4
    # in-memory sets (Fashion-MNIST's ArrayImages, CIFAR): the first N of every class in the set's order
    arr = common.ArrayImages(np.arange(12, dtype=np.uint8).repeat(4).reshape(12, 2, 2),
                             [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 2])
    sub = common.per_class_subset(arr, 2)
    assert sub.targets == [0, 1, 2, 0, 1, 2] and sub.images[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    sub = common.per_class_subset(arr, 0.75)                       # int(4 x 0.75) = 3 of every class
    assert sub.images[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] and len(arr) == 12
    mem = common.memory_images(sub)
    assert mem is not None and mem.n == 9 and mem.labels.tolist() == sub.targets


def test_offline_download_is_a_one_line_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: offline())
    with pytest.raises(SystemExit) as e:
        common.build_dataset("cifar10", str(tmp_path), True)
    msg = str(e.value)
    assert "--data_dir" in msg and "--data synthetic" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="--data synthetic"):
        common.build_dataset("imagenet", str(tmp_path / "missing"), True)
    with pytest.raises(SystemExit, match="unknown --data"):
        common.build_dataset("mnist", str(tmp_path), True)


def test_crop_with_box_moves_a_map_with_the_pixels():
    # image = a smooth ramp whose value encodes position; the map of the cropped image must equal
    # crop_map of the source map through the returned box (and flip)
    H = W = 64
    yy, xx = np.mgrid[0:H, 0:W]
    src = np.stack([xx * 4, yy * 4, np.zeros_like(xx)], -1).astype(np.uint8)
    from PIL import Image
    crop = common.CropWithBox("synthetic", 32, scale=(0.2, 0.6))
    src_map = torch.tensor(np.stack([xx, yy]) / 64.0).float()            # (2, H, W): x and y
    for seed in range(6):
        torch.manual_seed(seed)
        out, box = crop.geometry(Image.fromarray(src))
        px = np.asarray(out).astype(np.float64)                          # (32, 32, 3)
        m = common.crop_map(src_map, box[None].expand(2, 5), (32, 32))    # (2, 32, 32)
        assert np.abs(px[..., 0] / 4 / 64 - m[0].numpy()).mean() < 0.02, seed
        assert np.abs(px[..., 1] / 4 / 64 - m[1].numpy()).mean() < 0.02, seed


def test_epoch_sampler_shards_and_resumes():
    full = list(common.EpochSampler(20, seed=3, rank=0, world=1))
    s = common.EpochSampler(20, seed=3)
    s.set_epoch(0, skip=7)
    assert list(s) == full[7:]
    r0, r1 = (common.EpochSampler(20, seed=3, rank=0, world=2),
              common.EpochSampler(20, seed=3, rank=1, world=2))
    assert sorted(list(r0) + list(r1)) == list(range(20))
    s.set_epoch(1)
    assert all(20 <= k < 40 for k in s) and [k - 20 for k in s] != full


def test_seeded_view_is_independent_of_global_rng():
    ds = common.SeededView(common.Synthetic(10, 32), common.mim_transform("synthetic", 32), seed=5)
    torch.manual_seed(0)
    a = ds[3][0]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = ds[3][0]
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state()) and not torch.equal(a, ds[13][0])


# ----------------------------------------------------------------------------
# Batched augmentation (in-memory sets)

def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a)
                  - np.searchsorted(b, grid, "right") / len(b)).max()


@pytest.mark.parametrize("H, W, scale", [(32, 32, (0.2, 1.0)), (24, 48, (0.5, 1.0))])  # 2nd: ~10% fallbacks
def test_batched_crop_law_matches_torchvision_get_params(H, W, scale):
    n = 4000
    top, left, h, w = (t.numpy()
                       for t in common.crop_params(common.Draws(0, torch.arange(n))(22), H, W, scale))
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, H, W), scale, (3 / 4, 4 / 3))
                    for _ in range(n)])
    ours = np.stack([top, left, h, w], 1)
    stats = lambda b: [b[:, 2] * b[:, 3] / (H * W), np.log(b[:, 3] / b[:, 2]),
                       (b[:, 0] + 0.5) / (H - b[:, 2] + 1), (b[:, 1] + 0.5) / (W - b[:, 3] + 1)]
    # area, log ratio, position in the slack
    for s_ours, s_ref in zip(stats(ours), stats(ref)):
        assert _ks(s_ours, s_ref) < 0.045                              # alpha ~ 0.001 at n = m = 4000
    assert ((0 <= top) & (top + h <= H) & (0 <= left) & (left + w <= W) & (h > 0) & (w > 0)).all()
    fb = lambda b: np.mean((b[:, 2] == H) & (b[:, 3] == round(H * 4 / 3)) & (b[:, 0] == 0))
    # the centre-crop fallback, as often
    assert abs(fb(ours) - fb(ref)) < 0.02 and (fb(ref) > 0.03) == (W > H)


@pytest.mark.parametrize("mode, tol", [("bilinear", 1e-5), ("bicubic", 1 / 255)])
def test_batched_crop_of_a_gradient_image_gives_the_expected_pixels(mode, tol):
    # a ramp image (channel 0 = column / 64, channel 1 = row / 64): any interpolation of a box must give
    # the ramp at the output pixel centres (cubic a = -0.75 reproduces a line only to ~1e-3)
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    img = torch.stack([xx, yy, 0 * xx])[None] / 64                          # (1, 3, 32, 32)
    for (t, l, h, w), S in [((4, 6, 8, 12), 16), ((2, 3, 24, 24), 8)]:      # grows, shrinks (averaged)
        out = common.resample(img, *(torch.tensor([v]) for v in (t, l, h, w)), S, mode)[0]
        c = (torch.arange(S) + 0.5) / S
        assert (out[0] - ((l + w * c - 0.5) / 64)[None, :]).abs().max() < tol
        assert (out[1] - ((t + h * c - 0.5) / 64)[:, None]).abs().max() < tol


def test_batched_crop_boxes_and_flips_move_a_map_with_the_pixels():
    """AMT's contract on the batched path: crop_map(source map, box) == what the crop did to the pixels."""
    H = W = 64
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    src = torch.stack([xx, yy, 0 * xx]) / 64                                 # (3, 64, 64): x and y ramps
    out, box = common.BatchCrop("synthetic", 32, scale=(0.2, 0.6), with_box=True)(
        src.expand(16, -1, -1, -1) * 0.25 + 0.5, common.Draws(3, torch.arange(16)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in common.DATASETS["synthetic"][2])
    px = ((out * std + mean) - 0.5) / 0.25                                   # undo normalisation and the 0.25
    m = common.crop_map(src[:2].expand(16, -1, -1, -1).reshape(32, H, W), box.repeat_interleave(2, 0),
                        (32, 32))
    assert (px[:, :2].reshape(32, 32, 32) - m).abs().max() < 3e-3          # bicubic: ~1e-3, a pixel: 1.6e-2
    assert 0 < box[:, 4].sum() < 16 and len(set(box[:, 0].tolist())) > 8    # flips and boxes vary per image


def _fixed_jitter(op, factor, B=4):
    """color_jitter's draws that apply op (0 brightness, 1 contrast, 2 saturation, 3 hue) first at `factor`
    and the others as identities (factor 1, hue 0)."""
    u = torch.full((B, 8), 0.5)
    u[:, :4] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    u[:, op] = 0.1
    u[:, 4 + op] = 0.5 + (factor - (op < 3)) / (2 * [0.4, 0.4, 0.2, 0.1][op])
    return u


def test_batched_colour_ops_equal_torchvision_functional():
    TF = T.functional
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    tf = [(0, 1.3, TF.adjust_brightness), (1, 0.7, TF.adjust_contrast), (2, 1.15, TF.adjust_saturation),
          (3, 0.07, TF.adjust_hue)]
    for op, f, ref in tf:
        got = common.color_jitter(x, _fixed_jitter(op, f), 0.4, 0.4, 0.2, 0.1)
        assert (got - ref(x, f)).abs().max() < 1 / 255, op
    u = torch.rand(4, 8, generator=g)                                      # all four in each image's order
    order, f = u[:, :4].argsort(1), 1 + (2 * u[:, 4:7] - 1) * torch.tensor([0.4, 0.4, 0.2])
    got = common.color_jitter(x, u, 0.4, 0.4, 0.2, 0.1)
    for b in range(4):
        y, ops = x[b], [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in order[b].tolist():
            y = ops[op](y, f[b, op].item() if op < 3 else (2 * u[b, 7] - 1).item() * 0.1)
        assert (got[b] - y).abs().max() < 1 / 255, b
    assert (common.gray(x).expand_as(x) - TF.rgb_to_grayscale(x, 3)).abs().max() < 1e-6
    shift = torch.tensor([0.3, -0.45, 0.0, 0.9])
    assert (common.hue_shift(common.hue_shift(x, shift), -shift) - x).abs().max() < 1e-5   # hue round trip
    blurred = common.gaussian_blur(x, torch.tensor([1.0, 0.6, 1.0, 0.6]), 1.0)
    ref = TF.gaussian_blur(x[:1], 7, 1.0)                                  # reflect padding: compare inside
    assert (blurred[0, :, 3:-3, 3:-3] - ref[0, :, 3:-3, 3:-3]).abs().max() < 1e-5
    assert not torch.allclose(blurred[1], blurred[0])                      # per-image sigma


def test_batched_views_per_image_parameters_and_every_methods_shapes():
    B, x = 16, torch.full((16, 3, 32, 32), 0.5) + torch.linspace(-0.3, 0.3, 32)[None, None, None]
    draws = lambda: common.Draws(1, torch.arange(B))
    col = common.BatchCrop("synthetic", 32, color=True)(x, draws())          # the same image, B views
    assert len({round(v, 4) for v in col.mean((1, 2, 3)).tolist()}) == B
    crops = common.BatchMultiCrop("synthetic", 32, 16, 4, blur=(0.5, 0.1, 0.2))(x, draws())  # AttMask
    assert [tuple(c.shape) for c in crops] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * 4
    img, box = common.BatchCrop("synthetic", 32, with_box=True)(x, draws())   # AMT
    assert img.shape == (B, 3, 32, 32) and box.shape == (B, 5)
    dtm_view = common.BatchCrop("synthetic", 32, source_jitter=(0.4, 0.4, 0.4, 0.0))(x, draws())
    a2mim_view = common.BatchCrop("synthetic", 32, scale=(0.67, 1.0), interpolation="bilinear")(x, draws())
    assert dtm_view.shape == a2mim_view.shape == (B, 3, 32, 32)
    v1, v2 = common.BatchSharedCropTwoColors("synthetic", 32, interpolation="bilinear")(x, draws())  # ExtreMA
    dx = lambda v: (v[..., 1:] - v[..., :-1]).mean((1, 2, 3)).sign()         # flip = sign of the x ramp
    assert torch.equal(dx(v1), dx(v2)) and not torch.allclose(v1, v2)


def test_memory_loader_is_independent_of_batch_rank_and_resume():
    ds = common.Synthetic(40, 16)
    views = common.BatchCrop("synthetic", 16, color=True)
    one = common.make_loader(ds, None, 8, batched=views, with_index=True)
    assert isinstance(one, common.MemoryLoader)
    one.sampler.set_epoch(1)
    ref = {int(k): (v, int(c)) for x, y, i in one for k, v, c in zip(i, x, y)}  # index -> (view, label)
    seen = []
    for rank in range(2):
        two = common.make_loader(ds, None, 4, rank=rank, world=2, batched=views, with_index=True)
        two.sampler.set_epoch(1, skip=4 * rank)                              # rank 1 resumes mid-epoch
        for x, y, i in two:
            for k, v, c in zip(i.tolist(), x, y.tolist()):
                assert torch.allclose(v, ref[k][0], atol=1e-6) and c == ref[k][1] == k % 10
                seen.append(k)
    assert len(seen) == len(set(seen)) == 40 - 4                             # the shards partition the data
    # epoch 1 != epoch 0 (same image?)
    assert not torch.allclose(ref[0][0], next(iter(one))[0][0])


def test_memory_images_rules_and_batched_eval(tmp_path):
    for name, sizes in [("small", [12] * 4), ("big", [120] * 4), ("mixed", [12, 12, 12, 10])]:
        # folder sets: small ones in memory
        for k, size in enumerate(sizes):
            d = tmp_path / name / "train" / "ab"[k % 2]
            os.makedirs(d, exist_ok=True)
            Image.new("RGB", (size, size), (40 * k, 90, 9)).save(d / f"{k}.png")
    folder = lambda name, data="folder": common.memory_images(
        common.build_dataset(data, str(tmp_path / name), True))
    assert folder("small").images.shape == (4, 12, 12, 3) and folder("small").labels.tolist() == [0, 0, 1, 1]
    assert folder("big") is None and folder("mixed") is None and folder("small", "imagenet") is None
    ds = common.Synthetic(6, 32)
    x = common.memory_images(ds).batch(torch.arange(6), "cpu")              # (6, 3, 32, 32) in [0, 1]
    for size, tol in [(32, 1e-6), (24, 0.03)]:                               # native: normalise only; resized
        ref = torch.stack([common.eval_transform("synthetic", size)(ds[i][0]) for i in range(6)])
        assert (common.BatchEval("synthetic", size)(x) - ref).abs().mean() < tol
        # AMT's refresh
        squash = T.Compose([T.Resize((size, size)), T.ToTensor(), common.normalize("synthetic")])
        ref = torch.stack([squash(ds[i][0]) for i in range(6)])
        assert (common.BatchEval("synthetic", size, squash=True)(x) - ref).abs().mean() < tol
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    slow = common.extract(enc, ds, common.eval_transform("synthetic", 32), 4, num_workers=0)
    fast = common.extract(enc, ds, None, 4, batched=common.BatchEval("synthetic", 32))
    assert torch.allclose(slow[0], fast[0], atol=1e-5) and torch.equal(slow[1], fast[1])


def _jpeg_folder(root, n=12, seed=0, val=False):
    """n smooth images of 40-90 px a side in two classes: RGB JPEGs, one grey JPEG, one CMYK JPEG, one PNG."""
    g = np.random.default_rng(seed)
    for split in ["train"] + (["val"] if val else []):
        for i in range(n):
            H, W = g.integers(40, 91, 2)
            yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
            px = np.stack([np.sin(6 * xx + i), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 110 + 128
            im, d = Image.fromarray(px.clip(0, 255).astype(np.uint8)), root / split / f"c{i % 2}"
            os.makedirs(d, exist_ok=True)
            kind = (["RGB", "L", "CMYK", "PNG"] + ["RGB"] * n)[i]
            im.save(d / f"{i}.png") if kind == "PNG" else im.convert(kind).save(d / f"{i}.jpg", quality=90)
    return root


def _file_batch(ds, keys):
    return common._collate_files([common.FileBytes(common.image_files(ds))[k] for k in keys])


def test_image_files_are_decoded_and_cropped_like_pil(tmp_path, monkeypatch):
    """The file path's crops of generated JPEGs (also grey, CMYK, PNG) against PIL (open, RGB, crop, resize):
    bitwise with full decodes; within a few levels with draft decodes (a reduced JPEG scale) and with the
    tensor branch (decode_jpeg + antialiased interpolate: what runs on CUDA, here on the CPU). The eval views
    equal eval_transform and AMT's squash; a broken JPEG is one line naming it."""
    ds = common.build_dataset("folder", str(_jpeg_folder(tmp_path)), True)
    keys, data, hw, _, jpeg = _file_batch(ds, range(12))
    paths = [p for p, _ in ds.samples]
    assert jpeg == [not p.endswith(("2.jpg", "3.png")) for p in paths]                # CMYK, PNG: through PIL
    src = [Image.open(p).convert("RGB") for p in paths]
    assert torch.equal(hw, torch.tensor([im.size[::-1] for im in src]))
    for draft, tensors, worst, mean in [(False, False, 0, 0), (True, False, 12, 1), (False, True, 2, 0.5)]:
        monkeypatch.setattr(common, "JPEG_DRAFT", draft)
        x = common.FileImages(data, hw, paths, torch.device("cpu"), jpeg, tensors=tensors)
        top, left, h, w = common.crop_params(common.Draws(1, keys)(22), x.H, x.W, (0.2, 1.0))
        out = x.crop(top, left, h, w, 24, "bicubic")                                   # (12, 3, 24, 24)
        ref = np.stack([np.asarray(im.crop((j, i, j + ww, i + hh)).resize((24, 24), Image.BICUBIC))
                        for im, i, j, hh, ww in zip(src, top.tolist(), left.tolist(), h.tolist(),
                                                    w.tolist())])
        err = (out * 255 - torch.tensor(ref).permute(0, 3, 1, 2)).abs()
        assert err.max() <= worst + 1e-3 and err.mean() <= mean, (draft, tensors, err.max(), err.mean())
        assert draft == any(s != (1.0, 1.0) for s in getattr(x, "scale", []))        # draft decodes happened
    monkeypatch.setattr(common, "JPEG_DRAFT", False)
    x = common.FileImages(data, hw, paths, torch.device("cpu"), jpeg)
    # + flip and normalise
    view, box = common.BatchCrop("folder", 24, with_box=True)(x, common.Draws(1, keys))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in common.DATASETS["folder"][2])
    for b in range(12):
        H, W = src[b].size[::-1]
        i, j, hh, ww = (round(float(v) * s) for v, s in zip(box[b, :4], (H, W, H, W)))
        ref = T.functional.to_tensor(src[b].crop((j, i, j + ww, i + hh)).resize((24, 24), Image.BICUBIC))
        ref = ref.flip(-1) if box[b, 4] else ref
        assert torch.allclose(view[b] * std + mean, ref, atol=1e-5), b
    dtm_view = common.BatchCrop("folder", 24, source_jitter=(0.4, 0.4, 0.4, 0.0))     # jitter, then crop
    x = common.FileImages(data, hw, paths, torch.device("cpu"), jpeg)
    one = [torch.tensor(np.array(im)).permute(2, 0, 1)[None] / 255 for im in src]     # in memory, one by one
    ref = torch.cat([dtm_view(im, common.Draws(2, keys[b:b + 1])) for b, im in enumerate(one)])
    err = (dtm_view(x, common.Draws(2, keys)) - ref).abs() * std * 255             # the crop jittered instead
    # (crop's mean grey: 1.6, 8)
    assert err.mean() < 0.6 and err.max() < 4, (err.mean(), err.max())
    decodes = []
    monkeypatch.setattr(common, "_pil_decode", lambda *a, f=common._pil_decode: decodes.append(1) or f(*a))
    x = common.FileImages(data, hw, paths, torch.device("cpu"), jpeg)
    views = common.BatchMultiCrop("folder", 24, 12, 4)(x, common.Draws(1, keys))
    assert [v.shape[-1] for v in views] == [24] * 2 + [12] * 4 and len(decodes) == 12   # one decode per image
    enc, stats = torch.nn.Flatten(), common.DATASETS["folder"][2]
    for size, squash, native in [(24, False, 224), (24, True, 224), (24, False, 60)]:   # 60: no crop margin
        monkeypatch.setitem(common.DATASETS, "folder", (native, 0, stats))
        tf = T.Compose([T.Resize((size, size)), T.ToTensor(), common.normalize("folder")]) if squash else \
            common.eval_transform("folder", size)
        slow = common.extract(enc, ds, tf, 5, num_workers=0)
        view = common.BatchEval("folder", size, squash=squash)
        fast = common.extract(enc, ds, None, 5, num_workers=0, batched=view)
        assert torch.allclose(slow[0], fast[0], atol=1e-5) and torch.equal(slow[1], fast[1])
        x = common.FileImages(data, hw, paths, torch.device("cpu"), jpeg, tensors=True)  # the CUDA branch
        err = (view(x).flatten(1) - slow[0]).abs() * std.repeat_interleave(size * size).view(1, -1) * 255
        assert err.max() < 2 and err.mean() < 0.5, (squash, err.max(), err.mean())
    # header intact, data cut
    broken = bytearray(data[5].numpy())[:len(data[5]) // 2]
    x = common.FileImages([torch.tensor(broken)] + data[1:], hw, paths, torch.device("cpu"))
    with pytest.raises(SystemExit,
                       match=rf"^error: cannot decode the image file {re.escape(paths[0])} \(.*\); "
                             "remove or replace it$"):
        x.crop(top, left, h, w, 24, "bicubic")


def test_file_loader_is_independent_of_workers_batch_and_resume(tmp_path):
    """The same view of every key with 0 or 2 workers, batch 4 or 3, and a mid-epoch resume: bitwise."""
    ds = common.build_dataset("folder", str(_jpeg_folder(tmp_path)), True)
    views = common.BatchCrop("folder", 16, color=True)
    one = common.make_loader(ds, None, 4, batched=views, with_index=True, num_workers=0, seed=3)
    assert isinstance(one, common.FileLoader)
    one.sampler.set_epoch(1)
    ref = {int(k): (v, int(c)) for x, y, i in one for k, v, c in zip(i, x, y)}        # index -> (view, label)
    two = common.make_loader(ds, None, 3, batched=views, with_index=True, num_workers=2, seed=3)
    two.sampler.set_epoch(1, skip=3)                                                   # resumed after a batch
    seen = [(k, v, c) for x, y, i in two for k, v, c in zip(i.tolist(), x, y.tolist())]
    assert len(seen) == 9 and all(torch.equal(v, ref[k][0]) and c == ref[k][1] for k, v, c in seen)
    assert len(ref) == 12 and not torch.equal(ref[0][0], next(iter(one))[0][0])        # epoch 1 != epoch 0
    rng = torch.get_rng_state()
    # the global RNG (masks) is not the loader's
    list(one)
    assert torch.equal(rng, torch.get_rng_state())


def test_amt_on_an_image_folder_resumes_exactly(tmp_path, capsys, monkeypatch):
    """AMT on JPEG files (crop boxes for the maps, the refresh extracting through the file path): 5 steps ==
    2 (mid-epoch) + resume + 3, bitwise on CPU, store included."""
    monkeypatch.setitem(common.DATASETS, "folder", common.DATASETS["folder"])
    d = _jpeg_folder(tmp_path / "imgs")
    args = method_args("amt") + ["--data", "folder", "--data_dir", str(d), "--img_size", "32",
                                 "--batch_size", "4", "--epochs", "3", "--amt_start", "0",
                                 "--refresh_every", "1", "--max_steps"]
    run_inprocess("amt", args + ["5"], tmp_path / "a", capsys)
    run_inprocess("amt", args + ["2"], tmp_path / "b", capsys)
    assert "resumed" in run_inprocess("amt", args + ["5"], tmp_path / "b", capsys)
    A, B = load_ckpt(tmp_path / "a"), load_ckpt(tmp_path / "b")
    assert A["step"] == B["step"] == 5 and A["store_epoch"] == B["store_epoch"] == 0
    assert all(torch.equal(A["model"][k], B["model"][k]) for k in A["model"])
    assert torch.equal(A["store"], B["store"])


def test_flop_count_leaves_the_model_and_rng_alone_and_mfu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    x, before = torch.randn(5, 8), [t.clone() for t in model.state_dict().values()]
    rng = torch.get_rng_state()
    flops = amt.count_flops((model,), lambda m: F.dropout(m(x), 0.5).sum(), amt.nullcontext())
    assert flops == 2 * (2 * 5 * 8 * 4)                                    # matmul forward + weight gradient
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))  # BN stats untouched
    assert amt.flops_summary(2e12, 10, 4.0, torch.device("cpu")) == " | 5 TFLOP/s"
    import unittest.mock
    with unittest.mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA H100 PCIe"):
        assert amt.flops_summary(2e12, 10, 4.0, torch.device("cuda")).endswith("| MFU 0.7%")      # 5 / 756
        assert amt.flops_summary(2e12, 10, 4.0, torch.device("cuda"), 50.0).endswith("| MFU 10.0%")

# ----------------------------------------------------------------------------
# Probe

def test_knn_exact_on_hand_made_case():
    train_f = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_f = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]])
    assert common.knn(train_f, train_y, test_f, torch.tensor([0, 1, 0]), k=2) == 100.0
    assert common.knn(train_f, train_y, test_f, torch.tensor([1, 1, 0]), k=2) == pytest.approx(200 / 3)
    # k=4: all neighbours vote; weights exp(sim/T) still favour the nearer class
    assert common.knn(train_f, train_y, test_f, torch.tensor([0, 1, 0]), k=4) == 100.0


def test_linear_probe_well_above_chance_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    y = torch.arange(500) % 5
    f = centers[y] + torch.randn(500, 16, generator=g)
    acc, lr = common.linear_probe(f[:400], y[:400], f[400:], y[400:], epochs=20, batch_size=64)
    assert acc > 90 and lr in (0.01, 0.03, 0.1, 0.3, 1.0)
    shuffled = common.linear_probe(f[:400], y[torch.randperm(400, generator=g)], f[400:], y[400:], epochs=20,
                                   batch_size=64)[0]
    assert shuffled < 50  # labels carry the signal, not the head


def test_probe_end_to_end_and_cache(tmp_path):
    class Pixels(torch.nn.Module):  # raw pixels, average-pooled: a fixed encoder
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 4).flatten(1)
    cache = str(tmp_path / "feats.pt")
    r = common.probe(Pixels(), "synthetic", "", 32, num_workers=0, cache=cache, epochs=20, synthetic_size=400)
    assert r["n_train"] == 400 and r["n_test"] == 100 and r["dim"] == 192
    assert r["linear_top1"] > 30 and r["knn_top1"] > 20
    assert os.path.exists(cache)
    assert common.probe(None, "synthetic", "", 32, cache=cache, epochs=20)["linear_top1"] == r["linear_top1"]


# ----------------------------------------------------------------------------
# Validation split, online kNN, the study

def test_val_split_is_the_train_tail_or_every_tenth_image():
    assert common.val_split("fashion-mnist", 60000) == (list(range(50000)), list(range(50000, 60000)))
    assert common.val_split("cifar100", 50000)[1][0] == 40000
    # small copy: a fifth
    assert common.val_split("fashion-mnist", 100) == (list(range(80)), list(range(80, 100)))
    # as its test split
    assert common.val_split("synthetic", 2000)[1] == list(range(1500, 2000))
    rest, val = common.val_split("imagenet", 25)                                              # class-sorted
    assert val == [9, 19] and sorted(rest + val) == list(range(25))
    with pytest.raises(SystemExit, match="too few"):
        common.val_split("synthetic", 3)
    val, rest = (common.build_dataset("synthetic", "", s, synthetic_size=40) for s in ("val", "probe-rest"))
    assert (len(val) == 10 and len(rest) == 30
            and [val[i][1] for i in range(10)] == [i % 10 for i in range(30, 40)])


@pytest.fixture
def _tiny_synthetic(monkeypatch):
    """Synthetic at 1/50 of its size: 40 train images (5 steps an epoch at batch 8), 10 test;
    a fresh kNN cache."""
    real = common.Synthetic
    monkeypatch.setattr(common, "Synthetic", lambda n, *a, **k: real(n // 50, *a, **k))
    monkeypatch.setattr(common, "_knn_sets", {})


@pytest.mark.parametrize("method", PRESENT)
def test_online_knn_keeps_the_training_stream_and_equals_eval_linear(method, tmp_path, capsys,
                                                                     _tiny_synthetic):
    """--knn_every 1 after epochs 1 and 2: bitwise the same weights and RNG state as without it; `knn` lines
    in log.txt and metrics.jsonl; the number eval_linear.py --split val gives for that checkpoint (the online
    sets are below their cap here, so they are eval_linear's: 30 train images minus val, 10 val)."""
    args = method_args(method) + ["--max_steps", "10"]
    run_inprocess(method, args + ["--knn_every", "1"], tmp_path / "knn", capsys)
    run_inprocess(method, args, tmp_path / "plain", capsys)
    A, B = load_ckpt(tmp_path / "knn"), load_ckpt(tmp_path / "plain")
    for k, v in A.items():
        if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values()):
            assert all(torch.equal(t, B[k][n]) for n, t in v.items()), k
    assert A["step"] == 10 and torch.equal(A["rng"][0]["cpu"], B["rng"][0]["cpu"])
    rows = [json.loads(line) for line in open(tmp_path / "knn" / "metrics.jsonl") if '"knn"' in line]
    assert ([(r["step"], r["epoch"], r["knn_val"], r["knn_bank"]) for r in rows]
            == [(5, 1.0, 10, 30), (10, 2.0, 10, 30)])
    assert len(re.findall(r"^knn [\d.]+ \| step", open(tmp_path / "knn" / "log.txt").read(), re.M)) == 2
    assert '"knn"' not in open(tmp_path / "plain" / "metrics.jsonl").read()
    import eval_linear
    res = eval_linear.main(["--ckpt", str(tmp_path / "knn" / "checkpoint.pt"), "--split", "val",
                            "--epochs", "1", "--num_workers", "0"])
    assert ((res["n_train"], res["n_test"], res["split"]) == (30, 10, "val")
            and res["knn_top1"] == rows[-1]["knn"])


def test_eval_linear_raw_pixels_and_its_errors(tmp_path, capsys):
    import eval_linear
    res = eval_linear.main(["--raw_pixels", "--data", "synthetic", "--epochs", "1", "--num_workers", "0",
                            "--out_dir", str(tmp_path), "--split", "val"])
    assert res["dim"] == 3 * 32 * 32 and (res["n_train"], res["n_test"]) == (1500, 500)
    assert os.path.exists(tmp_path / "probe_synthetic_val.json")
    for argv, hint in [(["--raw_pixels"], "pass --data"), ([], "pass --ckpt")]:
        with pytest.raises(SystemExit, match=hint):
            eval_linear.main(argv)


def test_study_runs_end_to_end_and_writes_the_table_and_the_plot(tmp_path):
    """results/study.py at a tiny budget: AMT and DTM each against its baseline, 2 epochs of 8 steps on a
    64-image Fashion-MNIST copy, pico ViT, the workers in this process (--parallel 0): one row per run, the
    random-init and raw-pixel rows, a PNG with both methods' colours."""
    g = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 20)):
        y = np.arange(n) % 10
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                  g.integers(0, 120, (n, 28, 28)) + y[:, None, None] * 12)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
    import importlib.util
    res, spec = tmp_path / "res", importlib.util.spec_from_file_location(
        "study", os.path.join(HERE, "results", "study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = ["--data", "fashion-mnist", "--data_dir", str(tmp_path), "--epochs", "2", "--seeds", "0",
            "--methods", "amt", "dtm", "--parallel", "0", "--probe_epochs", "2", "--out_dir", str(res),
            "--model", "vit_pico", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
            "--log_every", "4", "--name", "fm", "--flags", "amt", "--dec_depth 1"]
    assert study.main(argv) == 0
    md = open(res / "fm.md").read()
    runs = re.findall(r"^\| (\w+-\w+-s0) \| 0 \| 16 \| 2\.00 \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
                      md.split("## Every run")[1], re.M)
    assert sorted(runs) == ["amt-baseline-s0", "amt-paper-s0", "dtm-baseline-s0", "dtm-paper-s0"], md
    assert (md.count("random init (same architecture)") == 2
            and re.search(r"^\| raw pixels .*\| [\d.]+ \|$", md, re.M))
    assert "baseline `--amt off`" in md and "baseline `--morph off`" in md and shlex.join(argv) in md
    for run in runs:  # logs kept, the online kNN after both epochs; --flags reach one method only
        assert open(res / "runs-fm" / run / "metrics.jsonl").read().count('"knn"') == 2
        config = json.load(open(res / "runs-fm" / run / "config.json"))
        assert config["dec_depth"] == 1 if run.startswith("amt") else "dec_depth" not in config
    png = Image.open(res / "fm.png").convert("RGB")
    colours = set(map(tuple, np.asarray(png).reshape(-1, 3).tolist()))
    assert png.size == (1160, 620) and (255, 127, 14) in colours and (44, 160, 44) in colours
    # a run stopped by SIGTERM saves, is not probed and fails, so that a rerun resumes it
    amt = importlib.import_module("amt")
    out = tmp_path / "stopped"
    train = ["--data", "fashion-mnist", "--data_dir", str(tmp_path), "--epochs", "2", "--model", "vit_pico",
             "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--out_dir", str(out)]
    amt._stop_signal.append(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit, match="stopped by SIGTERM"):
            study.worker(dict(kind="run", method="amt", train=train,
                              probes=[["--ckpt", str(out / "checkpoint.pt")]]))
    finally:
        amt._stop_signal.clear()
    assert load_ckpt(out)["step"] == 1 and not list(out.glob("probe_*"))


# a worker of the study in miniature: marks its start, and its SIGTERM (exit 3), in its folder
_STUDY_WORKER = """import pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *a: (d.joinpath("term").write_text("1"), sys.exit(3)))
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2]); import study; study.die_with_parent()
d.joinpath("started").write_text("1")
time.sleep(60)
"""


def _wait_for(paths, timeout=30):
    t0 = time.time()
    while not all(p.exists() for p in paths):
        assert time.time() - t0 < timeout, f"none of {paths} after {timeout} s"
        time.sleep(0.02)


def test_study_passes_sigterm_to_its_workers_and_starts_no_other(tmp_path):
    """SIGTERM to a study process reaches both running workers, the third never starts, the handler is put
    back; a worker whose study is killed with SIGKILL gets SIGTERM from the kernel. (The study runs in its
    own process: an in-process run of a method file has left its SIGTERM watcher in this one.)"""
    results = os.path.join(HERE, "results")
    dirs = [tmp_path / f"j{i}" for i in range(3)]
    jobs = [dict(name=d.name, dir=str(d), cmd=[sys.executable, "-c", _STUDY_WORKER, str(d)]) for d in dirs]
    study = subprocess.Popen([sys.executable, "-c", (
        f"import json, signal, sys; sys.path.insert(0, {results!r}); import study; "
        f"failed = study.run_all(json.loads({json.dumps(jobs)!r}), 2); "
        "print(json.dumps([failed, study.STOP, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL]))")],
        stdout=subprocess.PIPE, text=True)
    try:
        _wait_for([d / "started" for d in dirs[:2]])
        t0 = time.time()
        study.send_signal(signal.SIGTERM)
        out = study.communicate(timeout=30)[0]
    finally:
        study.kill()
    assert time.time() - t0 < 10, "the workers were not told"
    failed, stop, restored = json.loads(out.strip().splitlines()[-1])
    assert failed == ["j0", "j1", "j2"] and stop == [signal.SIGTERM] and restored
    assert [(d / "term").exists() for d in dirs] == [True, True, False] and not (dirs[2] / "started").exists()
    # the study killed outright: its worker (die_with_parent) is told by the kernel
    d = tmp_path / "orphan"
    d.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time; os.environ['STUDY_PID'] = str(os.getpid()); "
        f"subprocess.Popen([sys.executable, '-c', {_STUDY_WORKER!r}, {str(d)!r}, "
        f"{os.path.join(HERE, 'results')!r}]); time.sleep(60)")])
    try:
        _wait_for([d / "started"])
        parent.kill()
        _wait_for([d / "term"], timeout=10)
    finally:
        parent.kill()


# ----------------------------------------------------------------------------
# The contract every method file keeps (parametrised over the method files present)

# flags a method needs on top of TINY for a 4-step CPU run (e.g. a ViT instead of its default backbone)
EXTRA_ARGS = {}
# full learning rate from step 1, so resume errors would show
FAST = ["--warmup_epochs", "0", "--blr", "0.01"]


def method_args(m):
    return TINY + EXTRA_ARGS.get(m, []) + FAST


SECTIONS = ["Config", "Backbone", "Masking", "Target", "Model", "Loss", "Training"]


def shared_blocks(path):
    src = open(path).read()
    return dict(re.findall(r"# >>> shared: (\w+)\n(.*?)# <<< shared: \1", src, re.S))


def test_shared_code_is_identical_across_method_files():
    blocks = {m: shared_blocks(os.path.join(HERE, f"{m}.py")) for m in PRESENT}
    for m in PRESENT:
        assert set(blocks[m]) == {"config", "parse_config", "vit", "runtime"}, (m, set(blocks[m]))
        for name, text in blocks[m].items():
            assert text == blocks[PRESENT[0]][name], (
                f"shared block '{name}' of {m}.py differs from {PRESENT[0]}.py")


@pytest.mark.parametrize("method", PRESENT)
def test_outline_import_and_cli(method):
    src = open(os.path.join(HERE, f"{method}.py")).read()
    titles = [t for t in re.findall(r"^# ([A-Z]\w*)$", src, re.M) if t in SECTIONS]
    assert titles == SECTIONS, titles
    before = set(os.listdir(HERE))
    mod = importlib.import_module(method)                 # no side effects on import
    assert set(os.listdir(HERE)) == before and not torch.distributed.is_initialized()
    assert mod.METHOD == method and callable(mod.load_encoder) and callable(mod.train)
    cfg = mod.parse_config(["--data=cifar10", "--epochs", "7", "--compile"])
    assert cfg.data == "cifar10" and cfg.epochs == 7 and cfg.compile is True and cfg.img_size == 32
    assert mod.parse_config(["--data", "imagenet"]).img_size == 224
    for bad, hint in [(["--bogus", "1"], "--data_dir"), (["--epochs", "x"], "expects a int"),
                      (["--data", "mnist"], "unknown --data")]:
        with pytest.raises(SystemExit, match=hint):
            mod.parse_config(bad)


@pytest.mark.parametrize("method", PRESENT)
def test_train_resume_finish_probe(method, tmp_path, capsys):
    """N steps == N/2 + resume + N/2 (bitwise on CPU, teacher/store included); a finished run says so;
    the checkpoint loads with weights_only and probes through eval_linear.py."""
    a, s, h = method_args(method), tmp_path / "straight", tmp_path / "halves"
    out = run_inprocess(method, a + ["--max_steps", "4"], s, capsys)
    assert (re.search(r"^summary \| .*img/s.* \| [\d.e+-]+ TFLOP/s$", out, re.M)
            and os.path.exists(s / "metrics.jsonl"))
    pic = Image.open(s / "vis_0000004.png")  # the synthetic preset ends with a picture (common.save_picture)
    assert pic.height % (96 + 2) == 0 and pic.height >= 2 * 98
    run_inprocess(method, a + ["--max_steps", "2"], h, capsys)
    half = load_ckpt(h)
    out = run_inprocess(method, a + ["--max_steps", "4"], h, capsys)
    assert "resumed" in out and "'max_steps': (2, 4)" in out  # a changed stop point is announced
    A, B = load_ckpt(s), load_ckpt(h)
    assert A["method"] == method and A["step"] == B["step"] == 4
    states = [k for k, v in A.items()
              if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]
    assert "model" in states
    for k in states:
        assert max_param_diff(A[k], B[k]) < 1e-6, k
    assert max_param_diff(A["model"], half["model"]) > 1e-4  # training moved the weights
    assert "already finished" in run_inprocess(method, a + ["--max_steps", "4"], h, capsys)
    import eval_linear
    res = eval_linear.main(["--ckpt", str(s / "checkpoint.pt"), "--epochs", "3", "--num_workers", "0"])
    assert re.search(r"linear top-1 [\d.]+ .*kNN top-1 [\d.]+", capsys.readouterr().out)
    assert res["method"] == method and os.path.exists(s / "probe_synthetic.json")


@pytest.mark.parametrize("method", PRESENT)
def test_torchrun_two_processes(method, tmp_path):
    """2 ranks x 2 micro-batches of 4 (gradients all-reduced on the second only). A2MIM runs its ResNet
    (BatchNorm under DDP); its ViT is the same transformer path as the other four."""
    a = (method_args(method) if method != "a2mim" else _a2mim_RES) + ["--max_steps", "3"]
    # a timed checkpoint every step: all ranks must agree on when to save (it gathers their RNG states)
    r = run_torchrun(f"{method}.py",
                     a + ["--batch_size", "4", "--accum_iter", "2", "--save_every_min", "1e-9"],
                     tmp_path / "accum")
    assert "device cpu x 2" in r.stdout and re.search(r"^summary \| .*steps 3", r.stdout, re.M)
    assert ("effective batch 16 = 4 x 2 GPUs x accum 2" in r.stdout
            and load_ckpt(tmp_path / "accum")["step"] == 3)
    if method == "extrema":  # = 2 ranks x 8 (each rank draws its masks row by row from its own stream): ~3e-5
        # apart (Adam's eps on the key biases' rounding-noise gradients), ~7e-3 without the last all-reduce
        run_torchrun(f"{method}.py", a, tmp_path / "big")
        assert max_param_diff(load_ckpt(tmp_path / "accum")["model"],
                              load_ckpt(tmp_path / "big")["model"]) < 2e-4


def test_eval_linear_under_torchrun_matches_one_process(tmp_path, capsys):
    """Rank-sharded extraction gathered in dataset order: 2 gloo processes give the same probe."""
    run_inprocess(PRESENT[0], method_args(PRESENT[0]) + ["--max_steps", "2"], tmp_path, capsys)
    import eval_linear
    one = eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--epochs", "3", "--num_workers", "0"])
    (cache,) = tmp_path.glob("features_*.pt")
    single = torch.load(cache, weights_only=True)
    cache.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "eval_linear.py", "--ckpt", str(tmp_path / "checkpoint.pt"), "--epochs", "3",
           "--num_workers", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.load(open(tmp_path / "probe_synthetic.json"))
    assert ((two["linear_top1"], two["knn_top1"], two["n_train"])
            == (one["linear_top1"], one["knn_top1"], one["n_train"]))
    for a, b in zip(single, torch.load(cache, weights_only=True)):  # same features, same order
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_sigterm_to_the_process_group_saves_and_exits(tmp_path):
    """A scheduler's SIGTERM reaches the main process: the run saves after the current step and exits
    cleanly (in its own process group, as under a scheduler; the handler is the shared runtime block,
    and every method's loop acts on it: test_stop_flag_acts_at_the_next_step_and_timed_checkpoints)."""
    import time
    procs = {}
    for m in [m for m in ("amt",) if m in PRESENT] or PRESENT[:1]:
        cmd = [sys.executable, f"{m}.py", *method_args(m), "--max_steps", "100000", "--num_workers", "1",
               "--out_dir", str(tmp_path / m)]
        procs[m] = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
    deadline = time.time() + 150
    for m, p in procs.items():  # wait until training is under way, then signal the whole group
        log = tmp_path / m / "log.txt"
        while time.time() < deadline and not (log.exists() and "step 2/" in log.read_text()):
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
    for m, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "SIGTERM: saved" in out, (m, err[-1500:])
        assert load_ckpt(tmp_path / m)["step"] >= 2


@pytest.mark.parametrize("method", PRESENT)
def test_bad_input_never_loses_a_checkpoint(method, tmp_path, capsys):
    a = method_args(method) + ["--max_steps", "2"]
    other = next(m for m in METHODS if m != method)
    ck = tmp_path / "checkpoint.pt"
    torch.save({"method": other, "config": {}, "step": 5}, ck)
    before = ck.read_bytes()
    with pytest.raises(SystemExit, match=f"is a {other} checkpoint"):
        run_inprocess(method, a, tmp_path, capsys)
    assert ck.read_bytes() == before
    ck.write_bytes(b"half a file")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        run_inprocess(method, a, tmp_path, capsys)
    assert ck.read_bytes() == b"half a file"
    with pytest.raises(SystemExit, match="--patch_size"):
        run_inprocess(method, a + ["--img_size", "30"], tmp_path / "size", capsys)
    # a diverging run stops with the step number and leaves the last good checkpoint as it was
    good = tmp_path / "good"
    run_inprocess(method, a, good, capsys)
    saved = (good / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"non-finite loss at step \d"):
        run_inprocess(method, a[:-1] + ["6", "--blr", "1e30"], good, capsys)
    assert (good / "checkpoint.pt").read_bytes() == saved
    # an unknown flag: one line (from the command line: test_bad_flags_from_the_command_line_...)
    with pytest.raises(SystemExit, match="^error: unknown argument '--bogus'"):
        importlib.import_module(method).parse_config(["--bogus"])


# ----------------------------------------------------------------------------
# First runs and faults: flag checks, hangs, preemption, misleading state, pictures

# one out-of-range value (+ the flags it needs) for every Config field of every file
BAD_SHARED = {"data": ["mnist"], "model": ["vit_huge"], "img_size": ["0"], "patch_size": ["0"],
              "epochs": ["0"], "max_steps": ["-1"], "batch_size": ["0"], "blr": ["nan"],
              "weight_decay": ["-1"], "warmup_epochs": ["inf"], "num_workers": ["-1"], "seed": ["-1"],
              "compile": ["maybe"], "log_every": ["0"], "device": ["tpu"], "vis_every": ["-1"],
              "save_every_min": ["-5"], "accum_iter": ["0"], "knn_every": ["-1"],
              "peak_tflops": ["-1"], "benchmark": ["-1"],
              "subset": ["260"]}  # synthetic data: no labelled split to subset
BAD_METHOD = {
    "attmask": {"mask_mode": ["middle"], "pred_ratio": ["1.5"], "pred_ratio_var": ["-0.1"],
                "masking_prob": ["2"], "show_max": ["-1"], "local_crops": ["-1"], "local_size": ["18"],
                "out_dim": ["0"], "head_hidden": ["0"], "freeze_last_layer": ["-1"], "drop_path": ["1"],
                "teacher_temp": ["0"], "warmup_teacher_temp_epochs": ["-1"], "center_momentum": ["1.5"],
                "momentum_teacher": ["nan"], "weight_decay_end": ["-1"], "clip_grad": ["-1"]},
    "amt": {"amt": ["maybe"], "mask_ratio": ["0"], "throw_ratio": ["0.6"], "amt_start": ["-2"],
            "refresh_every": ["0"], "dec_dim": ["0"], "dec_depth": ["0"], "dec_heads": ["5"],
            "norm_pix_loss": ["maybe"]},
    "dtm": {"teacher": ["dino"], "teacher_ckpt": ["/nonexistent/ViT-B-16.pt", "--teacher", "clip"],
            "ema_momentum": ["2"], "morph": ["maybe"], "mask_ratio": ["0.001"], "min_mask_block": ["0"],
            "layer_scale": ["-1"], "loss_beta": ["-1"], "drop_path": ["1"]},
    "a2mim": {"mask_patch": ["3"], "mask_ratio": ["0"], "mask_layer": ["4"], "fill": ["noise"],
              "mask_gamma": ["-1"], "spatial_loss": ["l2"], "freq_weight": ["-1"], "unmask_weight": ["inf"],
              "step_epoch": ["-1"], "gate_like_token": ["maybe"]},
    "extrema": {"num_masks": ["8"], "mask_ratio": ["1"], "drop_path": ["1"], "ca_blocks": ["0"],
                "ca_layer_scale": ["-1"], "proj_hidden": ["0"], "proj_dim": ["0"], "ema_momentum": ["-0.1"],
                "color_aug": ["maybe"]},
}
CHECKED_ELSEWHERE = {"data_dir": "a missing folder: the CLI test below",
                     "morph_levels": "0: dtm.Model's morphing check, before anything is written",
                     "morph_k_max": "0: dtm.Model's morphing check, before anything is written",
                     "morph_n_max": "-1: dtm.Model's morphing check, before anything is written"}


@pytest.mark.parametrize("method", PRESENT)
def test_every_flag_out_of_range_is_a_one_line_error_at_parse_time(method, tmp_path):
    mod = importlib.import_module(method)
    fields = [f.name for f in dataclasses.fields(mod.Config)]
    (tmp_path / "taken").write_text("")
    bad = {**BAD_SHARED, **BAD_METHOD[method], "out_dir": [str(tmp_path / "taken")]}  # a file, not a folder
    assert set(fields) == set(bad) | (set(CHECKED_ELSEWHERE) & set(fields)), (
        "a field without an out-of-range case")
    for name, (value, *extra) in bad.items():
        with pytest.raises(SystemExit) as e:
            mod.parse_config([f"--{name}", value, *extra])
        msg = str(e.value)
        assert msg.startswith("error: ") and "\n" not in msg and f"--{name}" in msg, (name, value, msg)


def test_bad_flags_from_the_command_line_exit_nonzero_without_traceback_or_files(tmp_path):
    """The same checks as a user meets them: exit code 1, one line on stderr, nothing written
    (no out/, no data/)."""
    (tmp_path / "taken").write_text("")
    # one case: every parse-time check raises the same one-line SystemExit in-process (the sweep above and
    # test_bad_input_never_loses_a_checkpoint); this one passes parsing and fails on the missing folder
    cases = [("a2mim.py", ["--data", "imagenet", "--data_dir", "missing", "--model", "resnet_micro"],
              "--data_dir")]
    for script, args, flag in cases:
        r = subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=120)
        err = r.stderr.strip()
        assert (r.returncode != 0 and err.startswith("error: ") and "\n" not in err
                and flag in err), (script, err[-800:])
        assert sorted(os.listdir(tmp_path)) == ["taken"], (script, os.listdir(tmp_path))


def _image_folder(root, size=32, n=8, val=False, corrupt=False, seed=0):
    g = np.random.default_rng(seed)
    for split in ["train"] + (["val"] if val else []):
        for c in range(2):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for i in range(n):
                px = g.integers(0, 256, (size, size, 3), dtype=np.uint8) // (2 - c)   # class 1 brighter
                Image.fromarray(px).save(root / split / f"c{c}" / f"{i}.png")
    if corrupt:
        (root / "train" / "c0" / "3.png").write_bytes(b"not a png")
    return root


def test_a_crash_in_the_loop_ends_the_process_and_its_loader_workers(tmp_path):
    """A corrupt image in a folder dataset (not an image; a JPEG cut in half) ends the run with one line
    naming it: the process and its workers (which ignore SIGTERM) must exit, not wait for each other forever.
    Also: a folder without val/ says so at start."""
    # too big to hold: workers
    d = _image_folder(tmp_path / "imgs", size=common.MEMORY_MAX_SIDE + 4, corrupt=True)
    cut = d / "train" / "c1" / "cut.jpg"
    Image.open(d / "train" / "c1" / "0.png").save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    cmd = [sys.executable, os.path.join(HERE, "extrema.py"), "--data", "folder", "--data_dir", str(d),
           "--model", "vit_pico", "--img_size", "32", "--batch_size", "4", "--num_workers", "2",
           "--max_steps", "50", "--out_dir", str(tmp_path / "o")]
    p = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=90)
    finally:
        os.killpg(p.pid, 9) if p.poll() is None else None
    assert p.returncode != 0 and "\n" not in err.strip() and "Traceback" not in err, err[-1500:]
    assert re.fullmatch(rf"error: cannot decode the image file ({d}/train/c0/3.png|{cut}) \(.*\); remove or "
                        "replace it", err.strip()), err
    assert "has no val/ folder" in out
    alive = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert not alive, f"loader workers left behind: {alive}"


def _torchrun_ranks(launcher_pid):
    """{rank: pid} of the processes a torchrun launched, read from /proc."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                       if b"=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(pid)
    return ranks


def _gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _wait_for_log(path, text, timeout=150):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and text in path.read_text()):
        time.sleep(0.2)


def test_torchrun_a_killed_rank_does_not_leave_rank_0_waiting(tmp_path):
    """kill -9 of rank 1: rank 0's next collective fails and it exits with its loader workers, so the launcher
    ends within seconds, not after its 30 s grace and a SIGKILL."""
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "extrema.py"), *method_args("extrema"), "--num_workers", "1",
           "--max_steps", "100000", "--log_every", "1", "--device", "cpu", "--out_dir", str(tmp_path)]
    p = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for_log(tmp_path / "log.txt", "step 2/")
        ranks = _torchrun_ranks(p.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t = time.time()
        p.communicate(timeout=25)
        assert time.time() - t < 20 and _gone(ranks[0])
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    assert p.returncode != 0


def test_a_stuck_run_ends_on_a_second_sigterm(tmp_path):
    """Its only loader worker stopped, the loop waits for data forever and the first SIGTERM (save at the
    next step) cannot act; a second SIGTERM, 2 s later, ends the run at once with one line."""
    import signal
    import time
    # too big to hold in memory: a worker
    d = _image_folder(tmp_path / "imgs", size=common.MEMORY_MAX_SIDE + 4)
    cmd = [sys.executable, os.path.join(HERE, "extrema.py"), *method_args("extrema"), "--data", "folder",
           "--data_dir", str(d), "--img_size", "32", "--num_workers", "1", "--max_steps", "100000",
           "--log_every", "1", "--out_dir", str(tmp_path / "o")]
    p = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for_log(tmp_path / "o" / "log.txt", "step 2/")
        (worker,) = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        os.kill(worker, signal.SIGSTOP)
        n, log = -1, tmp_path / "o" / "log.txt"
        while n != len(log.read_text()):                # until the prefetched batches are used up
            n = len(log.read_text())
            time.sleep(1)
        os.kill(p.pid, signal.SIGTERM)
        time.sleep(2.5)
        assert p.poll() is None                         # stuck: the first SIGTERM cannot act
        os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    assert p.returncode != 0 and "a second SIGTERM" in err and "SIGTERM: saved" not in out, err[-1000:]


def test_loader_workers_die_within_a_second_of_their_parent(tmp_path):
    """kill -9 of the main process: its loader workers follow at once (not at their 5 s watchdog poll)."""
    import signal
    import time
    # too big to hold in memory: workers
    d = _image_folder(tmp_path / "imgs", size=common.MEMORY_MAX_SIDE + 4)
    cmd = [sys.executable, os.path.join(HERE, "amt.py"), *method_args("amt"), "--data", "folder",
           "--data_dir", str(d), "--img_size", "32", "--num_workers", "2", "--max_steps", "100000",
           "--log_every", "1", "--out_dir", str(tmp_path / "o")]
    p = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        _wait_for_log(tmp_path / "o" / "log.txt", "step 2/")
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        time.sleep(1.0)
        assert all(_gone(w) for w in workers), "loader workers outlived their parent"
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None


@pytest.mark.parametrize("method", PRESENT)
def test_stop_flag_acts_at_the_next_step_and_timed_checkpoints(method, tmp_path, capsys, monkeypatch):
    """A SIGTERM is acted on after the step it arrives in (not at the next log step or epoch end), and
    --save_every_min writes mid-epoch checkpoints without changing the run (resume stays exact)."""
    mod = importlib.import_module(method)
    a = method_args(method) + ["--log_every", "1000"]
    monkeypatch.setattr(mod, "_stop_signal", [15])          # as if SIGTERM arrived during step 1
    out = run_inprocess(method, a + ["--max_steps", "20"], tmp_path / "term", capsys)
    assert "SIGTERM: saved" in out and load_ckpt(tmp_path / "term")["step"] == 1
    monkeypatch.setattr(mod, "_stop_signal", [])
    saved = []
    real = mod.save_checkpoint
    monkeypatch.setattr(mod, "save_checkpoint",
                        lambda path, state: (saved.append(state["step"]), real(path, state)))
    run_inprocess(method, a + ["--max_steps", "3", "--save_every_min", "1e-9"], tmp_path / "timed", capsys)
    assert saved[:3] == [1, 2, 3], saved                     # every step is past the (tiny) interval


@pytest.mark.parametrize("method", PRESENT[:1])
def test_no_misleading_state_after_a_failed_start_or_resume(method, tmp_path, capsys, monkeypatch):
    """A fresh run that diverges does not claim a checkpoint; a failed start leaves no empty out_dir or data
    folder; a resume that fails keeps config.json as the checkpoint's; a changed stop point is announced."""
    a = method_args(method)
    with pytest.raises(SystemExit, match=r"non-finite loss at step \d+; no checkpoint was written yet"):
        run_inprocess(method, a + ["--max_steps", "3", "--blr", "1e30", "--log_every", "1"],
                      tmp_path / "nan", capsys)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="cannot load --data imagenet"):
        run_inprocess(method, a + ["--data", "imagenet", "--data_dir", "nowhere"], tmp_path / "fail", capsys)
    assert not (tmp_path / "fail").exists() and not (tmp_path / "nowhere").exists()
    good = tmp_path / "good"
    run_inprocess(method, a + ["--max_steps", "2"], good, capsys)
    before, saved = (good / "config.json").read_text(), (good / "checkpoint.pt").read_bytes()
    assert json.loads(before)["max_steps"] == 2
    # not a traceback
    with pytest.raises(SystemExit, match="does not fit these settings .*pick a new --out_dir$"):
        run_inprocess(method, a + ["--max_steps", "4", "--model", "vit_micro"], good, capsys)
    assert (good / "checkpoint.pt").read_bytes() == saved and (good / "config.json").read_text() == before
    with pytest.raises(SystemExit, match="non-finite loss"):
        run_inprocess(method, a + ["--max_steps", "6", "--blr", "1e30"], good, capsys)
    assert (good / "config.json").read_text() == before
    out = run_inprocess(method, a + ["--max_steps", "3"], good, capsys)
    assert re.search(r"warning: resuming with changed settings .*'max_steps': \(2, 3\)", out)


def test_folder_preset_follows_the_image_size_and_probe_uses_its_stats(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(common.DATASETS, "folder", common.DATASETS["folder"])   # restored afterwards
    small = _image_folder(tmp_path / "small", size=32)
    cfg = am.parse_config(["--data", "folder", "--data_dir", str(small)])
    assert (cfg.img_size, cfg.patch_size, cfg.local_size, cfg.model) == (32, 4, 16, "vit_tiny")
    assert "has no val/ folder" in capsys.readouterr().out
    size, _, (mean, std) = common.DATASETS["folder"]
    # class 0 in [0, 255], class 1 in [0, 127]
    assert size == 32 and 0.3 < mean[0] < 0.4 and 0.2 < std[0] < 0.35
    # no resize to 37
    assert [t.size for t in common.eval_transform("folder", 32).transforms[:2]] == [32, (32, 32)]
    big = _image_folder(tmp_path / "big", size=224, n=2, val=True)
    cfg = am.parse_config(["--data", "folder", "--data_dir", str(big)])
    assert (cfg.img_size, cfg.patch_size, cfg.local_size) == (224, 16, 96)
    assert "no val/" not in capsys.readouterr().out


def test_eval_linear_cache_is_keyed_by_the_data_folder(tmp_path, capsys, monkeypatch):
    """Two folders with different labels: two caches and two different answers (not the first one twice)."""
    import eval_linear
    monkeypatch.setitem(common.DATASETS, "folder", common.DATASETS["folder"])
    run_inprocess("amt", method_args("amt") + ["--max_steps", "1"], tmp_path / "run", capsys)
    a = _image_folder(tmp_path / "a", n=6, val=True, seed=0)
    b = _image_folder(tmp_path / "b", n=6, val=True, seed=1)
    for c in ("c0", "c1"):  # b's val labels are a's swapped: the same features would score 100 - x
        os.rename(b / "val" / c, b / "val" / f"tmp{c}")
    os.rename(b / "val" / "tmpc0", b / "val" / "c1"), os.rename(b / "val" / "tmpc1", b / "val" / "c0")
    ck = str(tmp_path / "run" / "checkpoint.pt")
    args = ["--ckpt", ck, "--data", "folder", "--epochs", "5", "--num_workers", "0"]
    ra = eval_linear.main(args + ["--data_dir", str(a)])
    rb = eval_linear.main(args + ["--data_dir", str(b)])
    assert len(list((tmp_path / "run").glob("features_folder_*.pt"))) == 2
    assert ra["knn_top1"] != rb["knn_top1"] or ra["linear_top1"] != rb["linear_top1"]


def test_picture_layout_and_quiet_defaults(tmp_path):
    """One layout: a column per image, a row per stage, small tiles upscaled (nearest) to >= 96 px, a label
    per row; workers never more than the cores, no pinned memory without CUDA."""
    rows = [torch.rand(3, 3, 32, 32), torch.rand(3, 1, 32, 32)]
    common.save_picture(str(tmp_path / "p.png"), rows, ["first", "second"])
    im = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    # two rows, three 96-px columns
    assert im.shape[0] == 2 * (96 + 2) and (im.shape[1] - 3 * 98) > 10
    margin = im.shape[1] - 3 * 98
    assert (im[:96, :margin] < 128).any() and (im[98:194, :margin] < 128).any()  # text in both row labels
    tile = im[:96, margin:margin + 96]
    assert (tile[::3, ::3] == tile[1::3, 1::3]).all()                            # nearest: 3x3 blocks
    cores = len(os.sched_getaffinity(0))
    assert am.parse_config([]).num_workers <= cores and common.default_workers() <= cores
    if not torch.cuda.is_available():
        assert not common.make_loader(common.Synthetic(16), T.ToTensor(), 4, num_workers=0).pin_memory


def test_readme_quick_start_is_three_commands_that_fit_together():
    """pip install, a bare method run, and a probe of exactly the checkpoint that run writes; every method's
    bare command is a short synthetic run that ends with a picture."""
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```",
                      open(os.path.join(HERE, "README.md")).read(), re.S)[1]
    cmds = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert len(cmds) == 3 and cmds[0] == ["pip", "install", "-r", "requirements.txt"]
    (py, script), (py2, ev, flag, ckpt) = cmds[1], cmds[2]
    assert (py, py2, ev, flag) == ("python", "python", "eval_linear.py", "--ckpt")
    cfg = importlib.import_module(script[:-3]).parse_config([])
    assert ckpt == os.path.join(cfg.out_dir, "checkpoint.pt")
    readme = open(os.path.join(HERE, "README.md")).read()
    for m in PRESENT:
        assert f"](docs/{m}.png)" in readme and os.path.isfile(os.path.join(HERE, "docs", f"{m}.png"))
        cfg = importlib.import_module(m).parse_config([])
        steps = cfg.epochs * (2000 // cfg.batch_size)  # the synthetic set has 2000 images
        assert cfg.data == "synthetic" and steps <= 160 and 0 < cfg.vis_every <= steps, (m, steps)


# ----------------------------------------------------------------------------
# Precision, weight-decay groups and gradient accumulation (all five)

def _stream_dtypes(blocks, run):
    """Run `run()` under CPU bf16 autocast; return the dtypes of every block's tensor inputs and outputs, and
    of the first block's last Linear output (which must be bf16: the matmuls still run in half precision)."""
    seen, lin = set(), []
    def hook(mod, args, out):
        seen.update(t.dtype for t in [*args, *(out if isinstance(out, tuple) else [out])]
                    if torch.is_tensor(t))
    hooks = [b.register_forward_hook(hook) for b in blocks]
    first = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    hooks.append(first.register_forward_hook(lambda m, a, o: lin.append(o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run()
    for h in hooks:
        h.remove()
    return seen, lin[0]


def test_residual_stream_is_fp32_under_bf16_autocast():
    """The official models add an fp32 position table, so their residual stream (and LayerNorm inputs) is fp32
    under autocast: so is ours, in every method's blocks (shared ViT, AMT decoder, ExtreMA class attention,
    A2MIM's token injection, DTM's CLIP tower), while the Linear layers still compute in bf16."""
    torch.manual_seed(0)
    x, B = torch.randn(2, 3, 32, 32), 2
    m = amt.Model(amt.parse_config(TINY))
    cases = {"amt": ([*m.encoder.blocks, *m.decoder], lambda: m(x, torch.ones(B, 64), 28, 26))}
    a = am.Model(_attmask_tiny_cfg("--local_crops", "2", "--local_size", "16"))
    cases["attmask"] = ([*a.student.blocks, *a.teacher.blocks], lambda: a([x, x, x[:, :, :16, :16]], 0, 0))
    d = dtm.Model(_dtm_tiny_cfg())
    cases["dtm"] = (list(d.encoder.blocks), lambda: d(x, d.targets(x)))
    sd = _dtm_openai_state_dict(width=64)
    clip = dtm.CLIPVisual({k[7:]: v for k, v in sd.items() if k.startswith("visual.")})
    cases["dtm clip"] = (list(clip.blocks), lambda: clip(torch.randn(B, 3, 56, 56)))
    v = a2mim.Model(_a2mim_cfg_of("--model", "vit_pico", "--mask_layer", "1"))
    cases["a2mim"] = (list(v.encoder.blocks), lambda: v(x))
    e = ex.Model(_extrema_tiny_cfg(num_masks=2))
    cases["extrema"] = ([*e.encoder.blocks, *e.encoder.blocks_token], lambda: e(x, torch.randn(B, 256)))
    for name, (blocks, run) in cases.items():
        dtypes, linear = _stream_dtypes(blocks, run)
        assert dtypes == {torch.float32} and linear == torch.bfloat16, (name, dtypes, linear)


# no weight decay beyond the 1-d tensors (biases, norms, gains), as each official code's optimizer groups
WD_EXEMPT = {"amt": set(),                             # timm add_weight_decay without a skip list
             "attmask": set(),                         # DINO/iBOT get_params_groups: ndim >= 2 decayed
             "dtm": {"encoder.cls_token"},             # BEiT v2: pos_embed, cls_token (mask token decayed)
             "a2mim": {"encoder.cls_token", "mask_token"},  # ViT config: + pos_embed, mask_token
                                                            # (0.1x lr group)
             "extrema": {"encoder.cls_token"}}         # no_weight_decay() = {pos_embed, cls_token}


@pytest.mark.parametrize("method", PRESENT)
def test_weight_decay_groups_follow_each_official_code(method, tmp_path, monkeypatch):
    """What train() hands to AdamW: the decayed / exempt split by parameter name, against the spec."""
    mod, built, groups = importlib.import_module(method), [], []

    class Recorded(mod.Model):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    def adamw(params, weight_decay=0.01, **kw):
        groups.extend({**g, "weight_decay": g.get("weight_decay", weight_decay)} for g in params)
        raise KeyboardInterrupt  # stop train() right there

    monkeypatch.setattr(mod, "Model", Recorded)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    args = method_args(method) + (["--model", "vit_pico"] if method == "a2mim" else [])
    with pytest.raises(KeyboardInterrupt):
        mod.train(mod.parse_config(args + ["--out_dir", str(tmp_path)]))
    names = {id(p): n for n, p in built[0].named_parameters() if p.requires_grad}
    exempt = [names.pop(id(p)) for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    decayed = [names.pop(id(p)) for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert not names, names                            # every trainable tensor in exactly one group
    model = dict(built[0].named_parameters())
    assert set(exempt) == {n for n in exempt + decayed if model[n].ndim < 2} | WD_EXEMPT[method]
    tokens = {n for n in exempt + decayed if n.endswith("token")}
    assert tokens and tokens - WD_EXEMPT[method] <= set(decayed), tokens


# settings under which an optimizer step over accum_iter micro-batches is exactly one bigger batch: the same
# images and crops (seeded per sample), masks drawn row by row from the same stream (or fixed), no drop path,
# nothing batch-level that sees a micro-batch (AttMask's centres frozen, A2MIM's batch spectrum off); each
# header says what differs outside them
ACCUM_EXACT = {"amt": ["--amt", "off"], "extrema": [], "dtm": ["--morph", "off"],
               "attmask": ["--out_dim", "64", "--head_hidden", "32", "--local_crops", "2", "--drop_path", "0",
                           "--center_momentum", "1", "--mask_mode", "attmask_high", "--masking_prob", "1"],
               "a2mim": ["--model", "vit_pico", "--freq_weight", "0"]}


@pytest.mark.parametrize("method", PRESENT)
def test_accum_iter_equals_a_bigger_batch(method, tmp_path, capsys, monkeypatch):
    """3 optimizer steps of 2 micro-batches x 8 images == 3 steps of 16 images (weights, EMA teachers)."""
    if method == "dtm":  # block masks are drawn per batch, attempt by attempt: one fixed mask for every image
        monkeypatch.setattr(dtm, "block_mask",
                            lambda B, gh, gw, n, *a: (torch.arange(gh * gw) < n).expand(B, -1))
    if method == "a2mim":  # the SimMIM ViT's drop path 0.1 is not a flag
        monkeypatch.setattr(a2mim.DropPath, "forward", lambda self, x: x)

    # gradients that are 0 in exact arithmetic (key biases) are rounding noise, which Adam's 1e-8 eps turns
    # into lr-sized steps: a wider eps here
    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **{**kw, "eps": 1e-3})
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    a = method_args(method) + ACCUM_EXACT[method] + ["--max_steps", "3"]
    out = run_inprocess(method, a + ["--batch_size", "8", "--accum_iter", "2"], tmp_path / "accum", capsys)
    assert ("effective batch 16 = 8 x 1 GPUs x accum 2" in out
            and re.search(r"^summary \| .*steps 3 ", out, re.M))
    run_inprocess(method, a + ["--batch_size", "16"], tmp_path / "big", capsys)
    A, B = load_ckpt(tmp_path / "accum"), load_ckpt(tmp_path / "big")
    states = [k for k, v in A.items()
              if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]
    for k in states:
        assert max_param_diff(A[k], B[k]) < 1e-6, k
    if method == "amt":  # the comparison can fail: half the batch ends far away
        run_inprocess(method, a + ["--batch_size", "8"], tmp_path / "small", capsys)
        assert max_param_diff(A["model"], load_ckpt(tmp_path / "small")["model"]) > 1e-4
    if method in ("amt", "extrema"):  # resume between optimizer steps: the data position counts micro-batches
        acc = ["--batch_size", "8", "--accum_iter", "2"]
        # 1 step, then 2 more
        run_inprocess(method, a[:-1] + ["1"] + acc, tmp_path / "resumed", capsys)
        assert "resumed" in run_inprocess(method, a + acc, tmp_path / "resumed", capsys)
        C = load_ckpt(tmp_path / "resumed")
        assert C["step"] == 3 and all(max_param_diff(A[k], C[k]) < 1e-6 for k in states)


def test_imagenet_presets_give_each_papers_images_per_step_on_8_gpus():
    """batch x 8 GPUs x accum_iter = the paper's images per step (AMT's official 4 x 128 x 8, A2MIM ViT-B
    8 x 128 x 2, AttMask's 4 x 60)."""
    want = {"amt": (4096, 4), "attmask": (240, 1), "dtm": (2048, 1), "a2mim": (2048, 1), "extrema": (2048, 1)}
    for m in PRESENT:
        cfg = importlib.import_module(m).parse_config(["--data", "imagenet"])
        assert (cfg.batch_size * 8 * cfg.accum_iter, cfg.accum_iter) == want[m], m
    vit = a2mim.parse_config(["--data", "imagenet", "--model", "vit_base"])
    assert (vit.batch_size, vit.accum_iter) == (128, 2)


# ----------------------------------------------------------------------------
# Speed: --benchmark times the training step itself; --compile adds no graph after the first steps

BENCH_LINE = (r"^benchmark \| {} \| (\d+) steps \| ([\d.]+) img/s \| ([\d.]+) ms/step \| ([\d.e+-]+) TFLOP/s "
              r"\| MFU n/a \| peak mem [\d.]+ GB")


class _Replay:
    """A loader whose every epoch is its first `n` micro-batches: the tensors --benchmark times, each step."""

    def __init__(self, loader, n):
        self.loader, self.sampler, self.n, self.first = loader, loader.sampler, n, None

    def __iter__(self):
        if self.first is None:
            it = iter(self.loader)
            self.first = [next(it) for _ in range(self.n)]
        return iter(self.first)


def _recording_adamw(monkeypatch):
    """torch.optim.AdamW that keeps every instance and its parameters' initial values."""
    made = []

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.initial = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            made.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    return made


def _params(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("method", PRESENT)
def test_benchmark_times_the_training_step(method, tmp_path, capsys, monkeypatch):
    """--benchmark 3 (after 1 warm-up step) prints the line with its three figures and writes nothing; its 4
    steps leave the same weights as 4 steps of the training loop on the same micro-batches (2 of 4 images).
    AMT: its AMT phase (timed first) against a run in the AMT phase from step 0 with the same stored maps."""
    monkeypatch.setattr(common, "BENCHMARK_WARMUP", 1)
    made, after = _recording_adamw(monkeypatch), []
    timed = common.benchmark
    monkeypatch.setattr(common, "benchmark",
                        lambda *x, **k: (timed(*x, **k), after.append(_params(made[-1])))[0])
    a = method_args(method) + ["--batch_size", "4", "--accum_iter", "2", "--epochs", "10", "--vis_every", "0"]
    a += ["--amt_start", "-1"] if method == "amt" else []
    mod = importlib.import_module(method)
    capsys.readouterr()
    res = mod.train(mod.parse_config(a + ["--benchmark", "3", "--out_dir", str(tmp_path / "bench")]))
    out = capsys.readouterr().out
    m = re.search(BENCH_LINE.format(method), out, re.M)
    assert m and m.group(1) == "3" and all(float(v) > 0 for v in m.groups()[1:]), out[-2000:]
    assert not os.path.exists(tmp_path / "bench")  # no checkpoint, no log
    assert (res["AMT"] if method == "amt" else res)["flops"] > 0
    assert max((p - q).abs().max().item() for p, q in zip(after[0], made[-1].initial)) > 1e-4  # it trained
    # the loop, on the benchmark's images (made on the device) and its first micro-batches every step
    monkeypatch.setattr(common, "build_dataset",
                        lambda *x, **k: common.benchmark_images(8, 32, torch.device("cpu")))
    make_loader = common.make_loader
    monkeypatch.setattr(common, "make_loader", lambda *x, **k: _Replay(make_loader(*x, **k), 2))
    maps = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0))  # the benchmark's random maps
    monkeypatch.setattr(common, "extract", lambda *x, **k: (maps.view(8, 64), None))  # AMT's store refresh
    mod.train(mod.parse_config(a + ["--max_steps", "4", "--out_dir", str(tmp_path / "loop")]))
    assert all(torch.equal(p, q) for p, q in zip(after[0], _params(made[-1]))), method


def test_amt_benchmark_amt_phase_against_mae_without_data(tmp_path, capsys, monkeypatch):
    """AMT's benchmark times the AMT phase and the MAE phase (= --amt off); the AMT step's counted FLOPs are
    < 0.7x MAE's (encoder on 1+10 vs 1+16 tokens, decoder on 1+38 vs 1+64); --data imagenet needs no files."""
    monkeypatch.setattr(common, "BENCHMARK_WARMUP", 1)
    a = ["--data", "imagenet", "--data_dir", str(tmp_path / "missing"), "--model", "vit_pico",
         "--img_size", "32", "--patch_size", "4", "--batch_size", "4", "--accum_iter", "1", "--dec_dim", "32",
         "--dec_depth", "1", "--dec_heads", "2", "--benchmark", "2", "--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    res = amt.train(amt.parse_config(a))
    out = capsys.readouterr().out
    lines = re.findall(BENCH_LINE.format("amt") + r" \| (\w+) phase", out, re.M)
    assert [x[-1] for x in lines] == ["AMT", "MAE"], out[-2000:]
    assert res["AMT"]["flops"] < 0.7 * res["MAE"]["flops"], (res["AMT"]["flops"], res["MAE"]["flops"])
    assert re.search(r"^benchmark \| amt \| AMT / MAE: time [\d.]+x \| FLOPs 0\.\d\dx$", out, re.M)
    assert not os.path.exists(tmp_path / "missing") and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("method", PRESENT)
def test_compile_adds_no_graph_after_the_second_step(method, tmp_path, capsys, monkeypatch):
    """--compile (dynamo with the eager backend: no C++ compiler) on the step the loop runs: the graphs and
    frames compiled stay the same from step 2 on, in each of AMT's phases too."""
    from torch._dynamo.utils import counters
    monkeypatch.setitem(common.COMPILE, "backend", "eager")
    monkeypatch.setattr(common, "BENCHMARK_WARMUP", 2)
    if method == "dtm":  # 3 block-placement attempts, not 30: the same graph, a tenth of it to trace
        monkeypatch.setattr(dtm, "block_mask", functools.partial(dtm.block_mask, attempts=3))
    seen = []

    class AdamW(torch.optim.AdamW):
        def step(self, *args, **kw):
            seen.append((counters["stats"]["unique_graphs"], counters["frames"]["total"]))
            return super().step(*args, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    torch._dynamo.reset()
    counters.clear()
    try:
        run_inprocess(method, method_args(method) + ["--batch_size", "4", "--compile", "--benchmark", "2"],
                      tmp_path, capsys)
    finally:
        torch._dynamo.reset()  # no compiled code left for the other tests
    assert len(seen) == (8 if method == "amt" else 4) and seen[0][0] > 0, seen
    for phase in range(0, len(seen), 4):
        assert seen[phase + 1] == seen[phase + 3], (phase, seen)


# ----------------------------------------------------------------------------
# Method: AttMask (attmask.py)

def _attmask_tiny_cfg(*args):
    return am.parse_config(TINY + ["--out_dim", "64", "--head_hidden", "32", *args])


def _attmask_distinct_attention(R, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (R, N) no ties
    return torch.stack([torch.randperm(N, generator=g) for _ in range(R)]).float() / N + 0.01


@pytest.mark.parametrize("N,r,high,hint", [(196, 0.1, 19, 18), (196, 0.3, 58, 53), (196, 0.5, 98, 89),
                                           (64, 0.3, 19, 18)])
def test_attmask_high_low_hint_on_hand_made_attention(N, r, high, hint):
    a = _attmask_distinct_attention(16, N)
    rank = a.argsort(1, descending=True).argsort(1)                     # 0 = most attended
    hi = am.attmask(a, r, "attmask_high", 1.0, 0.1)
    assert hi.dtype == torch.bool and hi.shape == (16, N)
    assert torch.equal(hi, rank < high)                                 # exactly the top floor(N r)
    assert torch.equal(am.attmask(a, r, "attmask_low", 1.0, 0.1), rank >= N - high)  # the bottom floor(N r)
    h = am.attmask(a, r, "attmask_hint", 1.0, 0.1)
    assert (h.sum(1) == hint).all() and not (h & ~hi).any()            # spec Sec. 9 counts; subset of High
    revealed = hi & ~h
    # only from the top 10%
    assert (revealed.sum(1) == high - hint).all() and (rank[revealed] < int(N * 0.1)).all()


def test_attmask_hints_are_uniform_over_the_top_tokens():
    torch.manual_seed(0)
    a = _attmask_distinct_attention(1, 196).expand(4000, -1)
    revealed = am.attmask(a, 0.3, "attmask_high", 1.0, 0.1) & ~am.attmask(a, 0.3, "attmask_hint", 1.0, 0.1)
    top = a[0].argsort(descending=True)[:19]
    freq = revealed.float().mean(0)                                     # 5 of 19 candidates per row
    assert freq.sum().item() == pytest.approx(5) and (freq[top] - 5 / 19).abs().max() < 0.04
    # the same draws as the official torch.multinomial(top, k) after the per-crop drop draw
    a, hi = a[:8], am.attmask(a[:8], 0.3, "attmask_high", 1.0, 0.1)
    cand = torch.zeros(8, 196).scatter_(1, a.argsort(1, descending=True)[:, :19], 1.0)
    torch.manual_seed(1)
    h = am.attmask(a, 0.3, "attmask_hint", 1.0, 0.1)
    torch.manual_seed(1)
    torch.rand(8, 1)
    assert torch.equal(h, hi.scatter(1, torch.multinomial(cand, 5), False))


def test_attmask_mask_dropped_per_crop_with_probability_1_minus_p():
    torch.manual_seed(0)
    B, N = 3000, 64
    m = am.attmask(torch.rand(2 * B, N), 0.3, "attmask_high", 0.5, 0.1)
    kept = m.any(1)
    assert set(m.sum(1).tolist()) == {0, 19}                            # a crop is masked fully or not at all
    assert abs(kept.float().mean().item() - 0.5) < 0.03
    # the two crops of one image: independent
    both = (kept[:B] & kept[B:]).float().mean().item()
    assert abs(both - 0.25) < 0.03


def test_attmask_ratio_per_step_and_ibot_baselines():
    cfg = _attmask_tiny_cfg("--mask_mode", "attmask_high", "--masking_prob", "1")
    attn = torch.rand(6, 2, 197)
    counts = [am.make_mask(cfg, attn, s, 14, 14).sum(1) for s in range(600)]
    assert all((c == c[0]).all() for c in counts)                       # one ratio for the whole batch
    n = torch.stack([c[0] for c in counts]).float()
    # floor(196 r), r ~ U[0.1, 0.5]
    assert n.min() >= 19 and n.max() <= 98 and abs(n.mean() / 196 - 0.3) < 0.01
    # same r for a step on any rank / resume
    torch.manual_seed(1)
    assert torch.equal(am.make_mask(cfg, attn, 7, 14, 14), am.make_mask(cfg, attn, 7, 14, 14))
    attn = torch.rand(2000, 2, 197)
    torch.manual_seed(0)
    # the per-crop ratios make_mask will draw
    ratios = 0.1 + 0.4 * torch.rand(2000)
    torch.manual_seed(0)
    rnd = am.make_mask(_attmask_tiny_cfg("--mask_mode", "random"), attn, 0, 14, 14)
    assert torch.equal(rnd.sum(1), (ratios * 196).floor().long())      # iBOT rand: exact count per crop
    blk = am.block_mask(ratios, 14, 14).view(-1, 14, 14)
    target = (ratios * 196).floor()
    assert (blk.flatten(1).sum(1) <= target).all() and blk.sum() / target.sum() > 0.97

    def neighbours(m):  # masked right/down neighbours per masked token: blocks are compact, random is not
        pairs = (m[:, 1:] & m[:, :-1]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()
        return (pairs / m.sum()).item()
    assert neighbours(blk) > 1.5 * neighbours(rnd.view(-1, 14, 14))


def test_attmask_hint_count_from_a_second_independent_ratio_draw():
    # official: get_pred_ratio() is called twice per step, once for the mask, once for the hints (spec 3.3b)
    high_cfg = _attmask_tiny_cfg("--mask_mode", "attmask_high", "--masking_prob", "1")
    hint_cfg = _attmask_tiny_cfg("--mask_mode", "attmask_hint", "--masking_prob", "1")
    attn, steps = torch.rand(2, 2, 197), range(1500)
    torch.manual_seed(0)
    high = torch.stack([am.make_mask(high_cfg, attn, s, 14, 14) for s in steps])   # (S, 2, N)
    hint = torch.stack([am.make_mask(hint_cfg, attn, s, 14, 14) for s in steps])
    assert not (hint & ~high).any()
    n_high, shown = high.sum(2).float(), (high & ~hint).sum(2).float()        # (S, 2)
    rngs = [__import__("random").Random(s) for s in steps]                     # seed 0: (seed, step) -> step
    r2 = torch.tensor([(g.uniform(0.1, 0.5), g.uniform(0.1, 0.5))[1] for g in rngs])
    # floor(N s r'), r' the 2nd draw
    assert torch.equal(shown, (196 * (0.1 * r2)).floor()[:, None].expand(-1, 2))
    share = (shown / n_high)[:, 0]
    assert share.max() > 0.35 and (share > 0.1).float().mean() > 0.15         # official: up to ~47%
    assert abs(torch.corrcoef(torch.stack([n_high[:, 0], shown[:, 0]]))[0, 1]) < 0.1  # independent of r
    # equal draws (r' = r) give today's masks: at most 10% of the High set revealed
    a = _attmask_distinct_attention(4, 196)
    for r in torch.linspace(0.1, 0.5, 41).tolist():
        torch.manual_seed(2)
        same = am.attmask(a, r, "attmask_hint", 1.0, 0.1, r)
        torch.manual_seed(2)
        assert torch.equal(same, am.attmask(a, r, "attmask_hint", 1.0, 0.1))
        hi = am.attmask(a, r, "attmask_high", 1.0, 0.1)
        assert (((hi & ~same).sum(1) == int(196 * (0.1 * r))).all()
                and int(196 * (0.1 * r)) <= 0.1 * hi.sum(1)[0])


def _pieces(m):
    """(R, h, w) bool -> (R,) number of 4-connected pieces: every cell takes the smallest label around it
    until nothing changes, then a piece is a cell that kept its own label."""
    R, h, w = m.shape
    own = torch.arange(h * w).view(1, h, w)
    lab = torch.where(m, own, h * w)
    while True:
        p = F.pad(lab, (1, 1, 1, 1), value=h * w)
        near = torch.stack([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1],
                            p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amin(0)              # self and 4 neighbours
        new = torch.where(m, near, h * w)
        if torch.equal(new, lab):
            return (m & (lab == own)).sum((1, 2))
        lab = new


def test_attmask_block_masks_fragment_like_the_official_generator():
    hand = torch.zeros(1, 5, 5, dtype=torch.bool)
    hand[0, 0, :3] = hand[0, 1, 2] = hand[0, 3, 0] = hand[0, 2:, 4] = True       # an L, a dot, a bar
    assert _pieces(hand).tolist() == [3]
    # official iBOT loader: block area ~ U[16, r N - count], r N not floored; with the floored cap the
    # end of a mask fills up with 1-patch blocks (1.43 pieces per crop). The official generator gives 1.32
    # (1.336 +- 0.008 over 4000 of its masks): 3000 masks have a standard error of ~0.01, so 0.04 is 4 SE
    torch.manual_seed(0)
    ratios = 0.1 + 0.4 * torch.rand(3000)
    m = am.block_mask(ratios, 14, 14).view(-1, 14, 14)
    assert abs(_pieces(m).float().mean().item() - 1.32) < 0.04
    assert (m.flatten(1).sum(1) <= (ratios * 196).floor()).all()                # never over floor(r N)


def test_attmask_head_logits_and_softmaxes_in_fp32_under_autocast():
    torch.manual_seed(0)
    head, x = am.Head(32, 64, 32), torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, z = head(x), head.mlp(x)                                           # z: the bf16 bottleneck
    assert z.dtype == torch.bfloat16 and out.dtype == torch.float32
    ref = F.normalize(z.float(), dim=-1) @ (head.g * F.normalize(head.v, dim=1)).T  # the last layer in fp32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    model = am.Model(_attmask_tiny_cfg("--masking_prob", "1"))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_out = model.teacher_head(model.teacher(torch.cat(crops[:2])))
        loss = model(crops, 0, 0)[0]
    assert t_out.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_attmask_one_teacher_pass_gives_targets_and_the_attention(monkeypatch):
    torch.manual_seed(0)
    cfg = _attmask_tiny_cfg("--mask_mode", "attmask_high", "--masking_prob", "1", "--local_crops", "2")
    model = am.Model(cfg)
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 16, 16)]
    calls, student_masks, seen = [], [], {}
    model.teacher.register_forward_hook(lambda m, a, kw, out: calls.append(out), with_kwargs=True)
    model.student.register_forward_hook(lambda m, a, kw, out: student_masks.append(kw.get("mask")),
                                        with_kwargs=True)
    make_mask = am.make_mask
    monkeypatch.setattr(am, "make_mask", lambda cfg, attn, *a: seen.setdefault("m", make_mask(cfg, attn, *a)))
    model(crops, 0, 0)
    assert len(calls) == 1                                              # one teacher forward per step
    t_tok, attn = calls[0]
    assert t_tok.shape == (6, 65, 32) and attn.shape == (6, 2, 65)     # unmasked globals, crop-major
    with torch.no_grad():
        ref = model.teacher(torch.cat(crops[:2]), return_attn=True)[1]  # (2B, nh, 1+N)
    a = ref[:, :, 1:].mean(1)                                           # head-mean [CLS] -> patches
    M = int(seen["m"][0].sum())
    top = a.argsort(1, descending=True)[:, :M]                          # High: the top M of the teacher's map
    assert 6 <= M <= 32 and torch.equal(seen["m"],
                                        torch.zeros(6, 64, dtype=torch.bool).scatter_(1, top, True))
    assert torch.equal(student_masks[0], seen["m"]) and student_masks[1] is None  # local crops never masked


def _attmask_reference_losses(s_cls, s_patch, t_cls, t_patch, mask, c, c2, tt, ts):
    B, V = t_cls.shape[0] // 2, s_cls.shape[0] // (t_cls.shape[0] // 2)
    total, pairs = 0.0, 0
    for q in range(2):
        p = F.softmax((t_cls[q * B:(q + 1) * B] - c) / tt, -1)
        for v in range(V):
            if v != q:
                total += (-(p * F.log_softmax(s_cls[v * B:(v + 1) * B] / ts, -1)).sum(-1)).mean()
                pairs += 1
    per = []
    for i in range(2 * B):
        ce = -(F.softmax((t_patch[i] - c2[0]) / tt, -1) * F.log_softmax(s_patch[i] / ts, -1)).sum(-1)
        per.append((ce * mask[i]).sum() / max(1, mask[i].sum().item()))
    return total / pairs, torch.stack(per).mean()


def test_attmask_losses_match_dino_and_ibot_formulas_and_centers_move():
    torch.manual_seed(0)
    B, V, N, K = 3, 4, 5, 7
    s_cls, t_cls = torch.randn(V * B, K), torch.randn(2 * B, K)
    s_patch, t_patch = torch.randn(2 * B, N, K), torch.randn(2 * B, N, K)
    mask = torch.rand(2 * B, N) < 0.5
    mask[1] = False                                                     # an unmasked crop: counts as 0
    c, c2 = torch.randn(1, K), torch.randn(1, 1, K)
    l_cls, l_patch = am.ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, c, c2, 0.04, 0.04, 0.1)
    r_cls, r_patch = _attmask_reference_losses(s_cls, s_patch, t_cls, t_patch, mask, c, c2, 0.04, 0.1)
    torch.testing.assert_close(l_cls, r_cls, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(l_patch, r_patch, atol=1e-5, rtol=1e-6)
    c_new, c2_new = c.clone(), c2.clone()
    am.update_centers(c_new, c2_new, t_cls, t_patch, 0.9)
    torch.testing.assert_close(c_new, 0.9 * c + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(c2_new, 0.9 * c2 + 0.1 * t_patch.mean((0, 1))[None, None])  # all tokens


def test_attmask_schedules_and_per_tensor_clipping():
    temps = [am.teacher_temp(e, 0.04, 0.07, 30) for e in (0, 15, 29, 30, 50)]
    assert temps == pytest.approx([0.04, 0.04 + 0.03 * 15 / 29, 0.07, 0.07, 0.07])
    wd = [am.cosine_schedule(s, 1000, 0.04, 0.4) for s in (0, 500, 1000)]      # weight decay, per step
    assert (wd == pytest.approx([0.04, 0.22, 0.4])
            and am.cosine_schedule(0, 1000, 0.996, 1.0) == pytest.approx(0.996))
    big, small = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3, 3))
    big.grad, small.grad = torch.full((10,), 5.0), torch.full((3, 3), 0.1)
    am.clip_per_tensor([big, small], 3.0)
    assert (big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
            and torch.equal(small.grad, torch.full((3, 3), 0.1)))
    t = [torch.ones(3), torch.full((2,), 2.0)]
    # theta_t <- m theta_t + (1 - m) theta_s
    am.ema_update(t, [torch.zeros(3), torch.zeros(2)], 0.9)
    assert torch.allclose(t[0], torch.full((3,), 0.9)) and torch.allclose(t[1], torch.full((2,), 1.8))


def test_attmask_fixed_batch_student_learns_to_match_fixed_targets():
    # teacher and centers frozen (momentum 1): the targets are fixed, so the loss must fall
    torch.manual_seed(0)
    cfg = _attmask_tiny_cfg("--momentum_teacher", "1", "--center_momentum", "1", "--drop_path", "0",
                            "--masking_prob", "1")
    model = am.Model(cfg)
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = fit_one_batch(opt, lambda step: model(crops, step, 0)[0], 25,
                           lambda: am.clip_per_tensor(params, 3.0))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.3, losses
    assert model.mask_token.abs().sum() > 0                             # the mask token is learned


def test_attmask_last_layer_frozen_in_epoch_0_and_ema_teacher(tmp_path, capsys):
    args = TINY + ["--out_dim", "64", "--head_hidden", "32", "--warmup_epochs", "0", "--blr", "0.01",
                   "--max_steps", "2"]
    run_inprocess("attmask", args + ["--vis_every", "2"], tmp_path / "frozen", capsys)
    m = load_ckpt(tmp_path / "frozen")["model"]
    assert (tmp_path / "frozen" / "vis_0000002.png").exists()
    # the student's last layer never moved, so the EMA left the teacher's copy equal to it; the rest moved
    # both halves of the weight-normed layer
    for k in ("v", "g"):
        torch.testing.assert_close(m[f"head.{k}"], m[f"teacher_head.{k}"], atol=1e-7, rtol=0)
    assert (m["head.mlp.0.weight"] - m["teacher_head.mlp.0.weight"]).abs().max() > 1e-5
    run_inprocess("attmask", args + ["--freeze_last_layer", "0"], tmp_path / "free", capsys)
    m = load_ckpt(tmp_path / "free")["model"]
    assert all((m[f"head.{k}"] - m[f"teacher_head.{k}"]).abs().max() > 1e-5 for k in ("v", "g"))


def test_attmask_probe_encoder_is_teacher_last_blocks_cls_and_bad_mode_errors():
    torch.manual_seed(0)
    cfg = _attmask_tiny_cfg()                                                    # depth 2: both blocks' [CLS]
    model = am.Model(cfg)
    model.teacher.blocks[0].attn.proj.bias.data += 1.0                   # teacher differs from student
    enc = am.load_encoder({"config": dataclasses.asdict(cfg), "model": model.state_dict()})
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for b in model.teacher.blocks:
        b.register_forward_hook(lambda m, i, o: outs.append(o[:, 0]))
    model.teacher(x)
    ref = torch.cat([model.teacher.norm(o) for o in outs], -1)          # (B, 2D) last 2 blocks' [CLS]
    torch.testing.assert_close(enc(x), ref)
    assert enc(x).shape == (2, 64) and not enc.training
    with pytest.raises(SystemExit, match="unknown --mask_mode"):
        am.Model(_attmask_tiny_cfg("--mask_mode", "attmask_top"))


# ----------------------------------------------------------------------------
# Method: AMT (amt.py)

torch.set_num_threads(1)
# a 16 px, 4x4-patch model: N = 16 patches -> 7 masked, 6 thrown, 3 visible at 0.45 / 0.40
_amt_PICO = ["--data", "synthetic", "--model", "vit_pico", "--img_size", "16", "--patch_size", "4",
             "--batch_size", "8", "--num_workers", "0", "--log_every", "1", "--dec_dim", "32",
             "--dec_depth", "1", "--dec_heads", "2", "--warmup_epochs", "0", "--blr", "0.01"]


def _amt_tiny_model(*extra):
    torch.manual_seed(0)
    return amt.Model(amt.parse_config(_amt_PICO + list(extra)))


def test_amt_counts_partition_and_order():
    for n, rm, rt, want in [(196, 0.45, 0.40, (88, 78)), (196, 0.75, 0.0, (147, 0)),
                            (64, 0.45, 0.40, (28, 26)), (144, 0.45, 0.40, (64, 58)),
                            (256, 0.45, 0.40, (115, 102))]:
        assert amt.mask_counts(n, rm, rt) == want  # spec 3.4 / 9 (int truncation of the float sum)
    torch.manual_seed(0)
    w = torch.rand(32, 64) * (torch.rand(32, 64) > 0.2)                    # hand-made maps with zeros
    order = amt.draw_order(w)
    assert torch.equal(order.sort(1).values, torch.arange(64).expand(32, -1))  # a permutation per image
    mask, throw, vis, keep = amt.split_order(order, 28, 26)
    assert (mask.sum(1) == 28).all() and (throw.sum(1) == 26).all() and vis.shape == (32, 10)
    assert not (mask & throw).any()
    seen = torch.zeros_like(mask).scatter(1, vis, True)
    assert (mask.int() + throw.int() + seen.int() == 1).all()               # disjoint and covering
    assert torch.equal(keep, (~throw).nonzero()[:, 1].view(32, 38))        # non-thrown, raster order
    # first drawn = masked
    assert mask.gather(1, order[:, :28]).all() and throw.gather(1, order[:, 28:54]).all()


def test_amt_draw_is_weighted_sampling_without_replacement():
    w = torch.rand(4, 196) + 0.01
    torch.manual_seed(3)
    ref = torch.multinomial(w, 196)                                        # the official draw
    torch.manual_seed(3)
    assert torch.equal(amt.draw_order(w), ref)                             # bitwise on CPU (spec 9)
    torch.manual_seed(0)
    heavy = torch.ones(4000, 64)
    heavy[:, 5] = 1000.0
    mask, *_ = amt.split_order(amt.draw_order(heavy), 28, 26)
    # a dominant patch is almost always masked
    assert mask[:, 5].float().mean() > 0.99
    freq = mask[:, torch.arange(64) != 5].float().mean(0)                  # others: 27 of 63 slots, evenly
    assert (freq - 27 / 63).abs().max() < 0.05
    mask, *_ = amt.split_order(amt.draw_order(torch.ones(4000, 64)), 28, 26)
    assert (mask.float().mean(0) - 28 / 64).abs().max() < 0.05             # all-ones map: uniform marginals


def test_amt_zero_weights_come_last():
    torch.manual_seed(0)
    w = torch.rand(500, 64) + 0.1
    w[:, 40:] = 0                                                          # 24 zero-weight patches
    mask, throw, vis, _ = amt.split_order(amt.draw_order(w), 28, 26)
    # never masked while positives remain
    assert not mask[:, 40:].any()
    assert throw[:, :40].sum(1).eq(12).all() and (vis >= 40).all()         # positives all drawn before zeros
    # no positive weight: uniform, valid
    order = amt.draw_order(torch.zeros(3, 64))
    assert torch.equal(order.sort(1).values, torch.arange(64).expand(3, -1))


def test_amt_map_follows_crop_and_flip():
    g, p = 8, 4
    rows, cols = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    # linear: bilinear sampling is exact
    maps = (10 * rows + cols)[None].repeat(2, 1, 1)
    box = torch.tensor([[0.2, 0.3, 0.5, 0.4, 0.0], [0.2, 0.3, 0.5, 0.4, 1.0]])  # (top, left, h, w, flip)
    got = amt.patch_weights(maps, box, p)                                  # (2, 64)
    c = (torch.arange(g * p) + 0.5) / (g * p)                              # output pixel centres in [0, 1]
    y = 0.2 + 0.5 * c
    for b, flip in enumerate([False, True]):
        x = 0.3 + 0.4 * (1 - c if flip else c)                             # the flip mirrors the crop
        pix = 10 * (y[:, None] * g - 0.5) + (x[None, :] * g - 0.5)         # map value at each pixel
        want = pix.view(g, p, g, p).sum((1, 3)).flatten()
        assert torch.allclose(got[b], want, atol=1e-3), (got[b] - want).abs().max()
    assert not torch.allclose(got[0], got[1])


def test_amt_thrown_tokens_leave_encoder_decoder_and_loss():
    model = _amt_tiny_model()
    seq = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seq.__setitem__("enc", i[0].shape[1]))
    model.decoder[0].register_forward_hook(lambda m, i, o: seq.__setitem__("dec", i[0].shape[1]))
    x, w = torch.randn(4, 3, 16, 16), torch.rand(4, 16) + 0.1
    torch.manual_seed(1)
    loss, stats, (pred, mask, throw, keep) = model(x, w, 7, 6)
    assert seq == {"enc": 1 + 3, "dec": 1 + 16 - 6} and pred.shape == (4, 10, 48)
    # patch -> pixels
    pix = lambda m: m.view(4, 1, 4, 1, 4, 1).expand(-1, 3, -1, 4, -1, 4).reshape(4, 3, 16, 16)
    torch.manual_seed(1)
    assert model(torch.where(pix(throw), 9.0, x), w, 7, 6)[0] == loss     # thrown pixels: no effect at all
    torch.manual_seed(1)
    assert model(torch.where(pix(mask), 9.0, x), w, 7, 6)[0] != loss      # masked pixels: they are the target
    assert torch.isfinite(stats["w_mask/vis"])


def test_amt_loss_masked_patches_only_and_norm_pix():
    torch.manual_seed(0)
    pred, target, mask = torch.randn(3, 10, 48), torch.randn(3, 10, 48) * 2 + 1, torch.rand(3, 10) > 0.4
    for norm in (False, True):
        loss = amt.amt_loss(pred, target, mask, norm)
        t2 = torch.where(mask[..., None], target, torch.randn_like(target))  # change unmasked targets only
        assert torch.allclose(amt.amt_loss(pred, t2, mask, norm), loss)
    mu = target.mean(-1, keepdim=True)
    var = ((target - mu) ** 2).sum(-1, keepdim=True) / 47                  # UNBIASED variance, eps 1e-6
    per = ((pred - (target - mu) / (var + 1e-6) ** 0.5) ** 2).mean(-1)
    assert torch.allclose(amt.amt_loss(pred, target, mask, True), per[mask].mean(), atol=1e-6)
    assert torch.allclose(amt.amt_loss(pred, target, mask, False),
                          ((pred - target) ** 2).mean(-1)[mask].mean())


def test_amt_store_weights_from_attention():
    attn = torch.tensor([[[0.9, 0.1, 0.2, 0.3, 0.2], [0.0, 0.1, 0.1, 0.1, 0.1]]])  # (1, 2 heads, 1 + 4)
    # [CLS] key dropped, min-max, head mean
    w = amt.attention_to_weights(attn)
    assert torch.allclose(w, torch.tensor([[0.0, 0.25, 0.5, 0.25]]))       # constant head -> 0, not NaN
    attn2 = torch.rand(5, 3, 17).softmax(-1)
    w2, a = amt.attention_to_weights(attn2), attn2[:, :, 1:]
    ref = ((a - a.amin(-1, keepdim=True)) / (a.amax(-1, keepdim=True) - a.amin(-1, keepdim=True))).mean(1)
    assert torch.allclose(w2, ref, atol=1e-6) and w2.amin() >= 0 and w2.amax() <= 1
    # the row the store is made from: LAST block, norm1(x) input
    vit, x, h = _amt_tiny_model().encoder.eval(), torch.randn(3, 3, 16, 16), {}
    vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: h.__setitem__("z", o))
    attn = vit(x, return_attn=True)[1]                                       # (3, heads, 1 + N)
    q, k = vit.blocks[-1].attn.qkv(h["z"]).view(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[:2]
    # [CLS] query, scale hd^-1/2, softmax
    want = (q[:, :, :1] @ k.transpose(-2, -1) / 4).softmax(-1)[:, :, 0]
    assert attn.shape == (3, 2, 17) and torch.allclose(attn, want, atol=1e-5)


class _amt_RecordIdx:
    """A training loader that records each batch's dataset indices."""

    def __init__(self, loader, out):
        self.loader, self.sampler, self.out = loader, loader.sampler, out

    def __iter__(self):
        for batch in self.loader:
            self.out.append(batch[-1].clone())
            yield batch


def _amt_synthetic_small(monkeypatch, n):
    monkeypatch.setattr(common, "build_dataset", lambda *a, **k: common.Synthetic(n, 16))


def test_amt_phases_resume_and_store(tmp_path, monkeypatch):
    """Plain MAE in epoch 0, a store refreshed at the start of epochs 1, 2; N == N/2 + resume + N/2 with the
    store in the checkpoint; a checkpoint without a store is refreshed on resume; probe features load."""
    _amt_synthetic_small(monkeypatch, 48)                                       # 6 steps per epoch
    args = _amt_PICO + ["--amt_start", "0", "--refresh_every", "1", "--epochs", "4"]
    run = lambda out, steps: amt.train(
        amt.parse_config(args + ["--max_steps", str(steps), "--out_dir", str(out)]))
    got_maps, got_idx, real_pw, real_loader = [], [], amt.patch_weights, common.make_loader
    monkeypatch.setattr(amt, "patch_weights",
                        lambda m, box, p: got_maps.append(m.clone()) or real_pw(m, box, p))
    monkeypatch.setattr(common, "make_loader", lambda *a, **k: _amt_RecordIdx(real_loader(*a, **k), got_idx))
    run(tmp_path / "a", 14)
    maps_a, idx_a = got_maps[:], got_idx[:]                                # run a only
    run(tmp_path / "b", 7)
    run(tmp_path / "b", 14)
    A, B = load_ckpt(tmp_path / "a"), load_ckpt(tmp_path / "b")
    assert A["step"] == B["step"] == 14 and A["store_epoch"] == B["store_epoch"] == 1
    assert max_param_diff(A["model"], B["model"]) < 1e-5 and torch.equal(A["store"], B["store"])
    assert A["store"].shape == (48, 4, 4) and A["store"].dtype == torch.float16
    # maps used from step 7 (epoch 1) on
    assert len(maps_a) == 8 and len(idx_a) >= 14
    # steps 13, 14 use the final store: each image gets ITS OWN map
    for m, i in zip(maps_a[-2:], idx_a[12:14]):
        assert torch.equal(m.cpu(), A["store"][i])
    assert 0 <= A["store"].min() and A["store"].max() <= 1 and A["store"].min() < 0.5
    log = open(tmp_path / "a" / "log.txt").read()
    assert log.count("attention store: 48 maps") == 2
    ratios = [float(r) for r in re.findall(r"w_mask/vis ([\d.]+)", log)]
    # uniform first, then attention-driven
    assert ratios[0] == 1.0 and all(r > 1.0 for r in ratios[6:])
    ckpt = load_ckpt(tmp_path / "b")
    ckpt["store"], ckpt["store_epoch"] = None, None
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    run(tmp_path / "b", 15)
    assert ("attention store: 48 maps after epoch 1"
            in open(tmp_path / "b" / "log.txt").read().split("resumed")[-1])
    enc, x = amt.load_encoder(A), torch.randn(2, 3, 16, 16)
    assert enc(x).shape == (2, 32) and not torch.allclose(enc(x), amt.load_encoder(A, random_init=True)(x))


def test_amt_overfits_one_batch():
    model = _amt_tiny_model()
    torch.manual_seed(0)
    x, w = torch.randn(8, 3, 16, 16), torch.rand(8, 16) + 0.05
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn(step):
        torch.manual_seed(1)                                               # the same masks every step
        return model(x, w, 7, 6)[0]
    losses = fit_one_batch(opt, loss_fn, 60)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
    assert losses[-1] < 0.8  # predicting zeros gives ~0.98 on normalised pixels: it memorised the batch


def test_amt_bad_ratios_are_a_one_line_error():
    for bad, hint in [(["--mask_ratio", "0.7", "--throw_ratio", "0.4"], "0 visible"),
                      (["--amt", "yes"], "--amt"), (["--mask_ratio", "0.01"], "0 masked")]:
        with pytest.raises(SystemExit, match=hint):
            amt.train(amt.parse_config(_amt_PICO + bad))


def _amt_torchrun(script, args, out_dir):
    """test_all.run_torchrun, but on a free port: `--master_port 0` can hang in the c10d store
    on a busy host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), *args, "--out_dir", str(out_dir), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_amt_torchrun_gathers_the_store(tmp_path):
    """2 processes (gloo): each computes half of the maps from the initial weights (amt_start -1), the
    gathered store equals a single-process computation in dataset order."""
    script = tmp_path / "run_amt.py"
    script.write_text(f"import sys; sys.path.insert(0, {os.path.dirname(amt.__file__)!r})\n"
                      "import common, amt\ncommon.build_dataset = lambda *a, **k: common.Synthetic(40, 16)\n"
                      "amt.train(amt.parse_config())\n")
    r = _amt_torchrun(script, _amt_PICO + ["--batch_size", "4", "--amt_start", "-1", "--max_steps", "5"],
                      tmp_path)
    assert "device cpu x 2" in r.stdout and re.search(r"^summary \| .*steps 5", r.stdout, re.M)
    ckpt = load_ckpt(tmp_path)
    assert ckpt["store_epoch"] == -1
    cfg = amt.Config(**ckpt["config"])
    # rank 0's initial weights (DDP broadcast)
    torch.manual_seed(cfg.seed)
    enc = amt.Encoder(amt.Model(cfg).encoder, attention=True).eval()
    ds = common.Synthetic(40, 16)
    # 16 px already: the resize is identity
    tf = T.Compose([T.ToTensor(), common.normalize("synthetic")])
    with torch.no_grad():
        want = enc(torch.stack([tf(ds[i][0]) for i in range(40)])).view(40, 4, 4)
    assert torch.allclose(ckpt["store"].float(), want, atol=2e-3)


# ----------------------------------------------------------------------------
# Method: DTM (dtm.py)

torch.set_num_threads(1)


def _dtm_spec_inputs():
    """Spec Sec. 10: T (targets) and P (predictions), B = 2, N = 196 (14 x 14), D = 64."""
    b = torch.arange(2.0).view(2, 1, 1)
    i = torch.arange(196.0).view(1, 196, 1)
    c = torch.arange(64.0).view(1, 1, 64)
    row, col = i.div(14).floor(), i % 14
    T = (torch.sin(0.31 * row * (c + 1) / 7 + 0.5 * b) + torch.cos(0.23 * col * (c + 2) / 5 - 0.3 * b)
         + 0.05 * torch.sin(1.7 * i + 0.9 * c))
    P = torch.cos(0.11 * (i + 1) + 0.07 * (c + 1) * (b + 1)) + 0.5 * torch.sin(0.013 * i * c)
    return P, T


def _dtm_groups_of(G, b):
    """Partition of image b as a set of frozensets of positions."""
    return {frozenset(G[b, g].nonzero().flatten().tolist()) for g in range(G.shape[1])}


def _dtm_remaining(N, r, k):
    """Groups left after k rounds removing min(r, (t-1)//2) tokens each (spec Sec. 4.1-4.2)."""
    t = N
    for _ in range(k):
        t -= max(0, min(r, (t - 1) // 2))
    return t


# ----------------------------------------------------------------------------
# Spec Sec. 10 reference values (official bm/merge.py + engine arithmetic, fp32)

@pytest.mark.parametrize("r,k,n_groups,largest,sl1,mse,l1,cos", [
    (14, 7, 98, 19, 0.275567, 1.112662, 0.870553, 0.953193),
    (50, 1, 146, 5, 0.333379, 1.353897, 0.946343, 0.939952),
    (3, 14, 154, 15, 0.338301, 1.375163, 0.960212, 0.946356),
    (97, 1, 99, 9, 0.281385, 1.136827, 0.872391, 0.926331)])
def test_dtm_reference_values(r, k, n_groups, largest, sl1, mse, l1, cos):
    P, T = _dtm_spec_inputs()
    G = dtm.morph_partition(T, r, k)
    assert G.shape == (2, n_groups, 196) and G.sum(-1).max() == largest
    Pm, Tm = dtm.morph(G, P), dtm.morph(G, T)
    assert dtm.dtm_loss(P, T, [(r, k)])[0].item() == pytest.approx(sl1, abs=2e-6)
    assert F.mse_loss(Pm, Tm).item() == pytest.approx(mse, abs=2e-6)
    assert F.l1_loss(Pm, Tm).item() == pytest.approx(l1, abs=2e-6)
    assert 1 - F.cosine_similarity(Pm, Tm, dim=-1, eps=1e-6).mean().item() == pytest.approx(cos, abs=2e-6)
    assert all(frozenset([0]) in _dtm_groups_of(G, b) for b in range(2))  # top-left patch: always a singleton


def test_dtm_reference_groups_and_two_level_average():
    P, T = _dtm_spec_inputs()
    G = dtm.morph_partition(T, 14, 7)
    sizes0, sizes1 = (G[b].sum(-1).sort(descending=True).values for b in range(2))
    assert sizes0[:8].tolist() == [19, 15, 10, 8, 8, 7, 7, 6] and (sizes0 == 1).sum() == 79
    assert sizes1[:8].tolist() == [8, 7, 5, 3, 3, 3, 3, 3] and (sizes1 == 1).sum() == 29
    g14 = {14, 15, 16, 17, 18, 19, 22, 28, 42, 56, 70, 84, 98, 112, 126, 140, 154, 168, 182}
    assert frozenset(g14) in _dtm_groups_of(G, 0)
    assert frozenset({14, 15, 28}) in _dtm_groups_of(dtm.morph_partition(T, 50, 1), 0)
    assert dtm.dtm_loss(P, T, [(0, 1)])[0].item() == pytest.approx(0.382084, abs=2e-6)  # identity
    loss, groups = dtm.dtm_loss(P, T, [(14, 7), (50, 1)])
    assert loss.item() == pytest.approx(0.304473, abs=2e-6) and groups.item() == (98 + 146) / 2


# ----------------------------------------------------------------------------
# Morphing invariants, checked against a literal per-image ToMe round written from spec Sec. 4.2

def _dtm_tome_round(x, size, members, r):
    """One image, plain Python: x list of feature tensors, size list, members list of position lists."""
    t = len(x)
    r = min(r, (t - 1) // 2)
    if r <= 0:
        return x, size, members
    A, B = list(range(0, t, 2)), list(range(1, t, 2))
    best = []
    for a in A:
        s = torch.stack([F.cosine_similarity(x[a], x[b], dim=0, eps=0) for b in B])
        best.append((-math.inf, 0) if a == 0 else (s.max().item(), B[s.argmax().item()]))
    order = sorted(range(len(A)), key=lambda j: -best[j][0])
    src, kept = order[:r], sorted(order[r:])
    nx, ns, nm = {b: x[b] * size[b] for b in B}, {b: size[b] for b in B}, {b: list(members[b]) for b in B}
    for j in src:
        a, b = A[j], best[j][1]
        nx[b], ns[b], nm[b] = nx[b] + x[a] * size[a], ns[b] + size[a], nm[b] + members[a]
    keep = [A[j] for j in kept]
    return ([x[a] for a in keep] + [nx[b] / ns[b] for b in B], [size[a] for a in keep] + [ns[b] for b in B],
            [members[a] for a in keep] + [nm[b] for b in B])


@pytest.mark.parametrize("r,k", [(5, 3), (12, 1), (2, 8), (30, 2)])
def test_dtm_partition_matches_literal_tome_and_group_means(r, k):
    X = torch.randn(3, 36, 8, generator=torch.Generator().manual_seed(r * 100 + k)).double()
    G = dtm.morph_partition(X, r, k)                                      # fp32 inside
    assert set(G.unique().tolist()) == {0.0, 1.0} and (G.sum(1) == 1).all()  # one 1 per column
    assert G.shape[1] == _dtm_remaining(36, r, k)
    for b in range(3):
        x, size, members = list(X[b].float()), [1.0] * 36, [[i] for i in range(36)]
        for _ in range(k):
            x, size, members = _dtm_tome_round(x, size, members, r)
        assert (_dtm_groups_of(G, b) == {frozenset(m) for m in members}
                and frozenset([0]) in _dtm_groups_of(G, b))
        # morphing = the size-weighted merged features, broadcast back to every member position
        morphed = dtm.morph(G[b:b + 1], X[b:b + 1].float())[0]
        for feat, m in zip(x, members):
            assert torch.allclose(morphed[m], feat.expand(len(m), -1), atol=1e-5)


def test_dtm_no_merging_is_the_identity():
    X = torch.randn(2, 16, 4)
    for r, k in [(0, 5), (0, 1)]:
        assert torch.equal(dtm.morph_partition(X, r, k), torch.eye(16).expand(2, 16, 16))
    P = torch.randn(2, 16, 4)
    assert torch.allclose(dtm.dtm_loss(P, X, [(0, 1)])[0], F.smooth_l1_loss(P, X, beta=2.0))
    assert dtm.merge_round(X[:, :3], torch.eye(3).expand(2, 3, 3), 5)[0].shape[1] == 2  # (3-1)//2 = 1
    assert dtm.merge_round(X[:, :2], torch.eye(2).expand(2, 2, 2), 5)[0].shape[1] == 2    # nothing to merge


def test_dtm_schedule_rounding_exhaustive():
    left = {(n, k): _dtm_remaining(196, dtm.per_round_r(n, k, 196), k)
            for n in range(197) for k in range(1, 15)}
    for (n, k), g in [((196, 1), 99), ((196, 2), 50), ((196, 7), 15), ((196, 14), 8), ((150, 3), 49),
                      ((100, 14), 84), ((10, 14), 182), ((1, 1), 195), ((0, 9), 196)]:
        assert left[n, k] == g, (n, k)
    vals = list(left.values())
    assert min(vals) == 8 and max(vals) == 196 and statistics.median(vals) == 99
    assert abs(statistics.mean(vals) - 98.5) < 0.5
    assert 0.80 < sum(v != 196 - n for (n, k), v in left.items()) / len(left) < 0.86  # "83% of pairs"
    assert dtm.per_round_r(195, 2, 196) == 98 and dtm.per_round_r(196, 3, 196) == 65  # ceil unless > n_max
    for (n, k) in [(196, 7), (100, 14), (10, 14)]:  # the arithmetic agrees with the real matching
        r = dtm.per_round_r(n, k, 196)
        assert dtm.morph_partition(torch.randn(1, 196, 8), r, k).shape[1] == left[n, k]
    torch.manual_seed(0)
    for _ in range(50):
        s = dtm.sample_schedule(2, 196, 14)
        assert len(s) == 2 and all(0 <= r <= 196 and 1 <= k <= 14 and r * k <= 196 for r, k in s)
    assert {r for r, _ in dtm.sample_schedule(400, 10, 1)} == set(range(11))  # k = 1: r = n, all of 0..n_max
    assert {k for _, k in dtm.sample_schedule(400, 196, 14)} == set(range(1, 15))  # all of 1..k_max


# ----------------------------------------------------------------------------
# The same G on both sides; gradients

def test_dtm_same_partition_both_sides_and_gradients():
    torch.manual_seed(0)
    T = torch.randn(3, 64, 16, requires_grad=True)
    P = torch.randn(3, 64, 16, requires_grad=True)
    # same G on both sides: predictions equal to the targets give exactly zero loss for any schedule
    assert dtm.dtm_loss(T.clone(), T, [(10, 3), (40, 1)])[0].item() == 0.0
    G = dtm.morph_partition(T, 10, 3)
    manual = F.smooth_l1_loss(dtm.morph(G, P), dtm.morph(G, T), beta=2.0)
    assert torch.allclose(dtm.dtm_loss(P, T, [(10, 3)])[0], manual)
    Gp = dtm.morph_partition(P, 10, 3)  # a partition from the predictions would give another loss
    assert not torch.allclose(F.smooth_l1_loss(dtm.morph(Gp, P), dtm.morph(Gp, T), beta=2.0), manual)
    loss, _ = dtm.dtm_loss(P, T, [(10, 3), (40, 1)])
    loss.backward()
    assert (P.grad.abs().sum(-1) > 0).all() and T.grad is None  # every student position; never the targets


def _dtm_tiny_cfg(*extra):
    return dtm.parse_config(TINY + ["--out_dir", "/nonexistent"] + list(extra))


def test_dtm_model_gradients_reach_student_only():
    torch.manual_seed(0)
    model = dtm.Model(_dtm_tiny_cfg())                                          # ema teacher (default)
    x = torch.randn(4, 3, 32, 32)
    model.teacher.norm.bias.data.fill_(3.0)                                # as if the EMA had drifted
    target = model.targets(x)
    assert target.shape == (4, 64, 32) and not target.requires_grad
    assert torch.allclose(target.mean(-1), torch.zeros(4, 64), atol=1e-5)  # per-token LayerNorm of targets
    loss, stats = model(x, target)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.mask_token.grad.abs().sum() > 0 and model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.head.weight.shape == (32, 32) and set(stats) == {"groups", "tgt_std"}
    before = [p.clone() for p in model.teacher.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.ema_update(0.9)
    for b, t, s in zip(before, model.teacher.parameters(), model.encoder.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)


def test_dtm_morph_off_is_token_wise():
    model = dtm.Model(_dtm_tiny_cfg("--morph", "off", "--teacher", "random"))
    mask, schedule = model.mask_and_schedule(4, 8, 8, "cpu")
    assert schedule == [(0, 1)]
    torch.manual_seed(0)
    model_on = dtm.Model(_dtm_tiny_cfg("--teacher", "random"))
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), model_on.teacher.parameters()))
    assert len(model_on.mask_and_schedule(4, 8, 8, "cpu")[1]) == 2
    x = torch.randn(4, 3, 32, 32)  # the step replayed by hand: mask token at the mask, loss on ALL positions
    for m, plain in ((model, True), (model_on, False)):
        target = m.targets(x)
        with torch.random.fork_rng(devices=[]):
            mask, schedule = m.mask_and_schedule(4, 8, 8, "cpu")
        pred = m.head(m.encoder(x, mask=mask, mask_token=m.mask_token)[:, 1:])  # (4, 64, 32)
        want = F.smooth_l1_loss(pred, target, beta=2.0) if plain else dtm.dtm_loss(pred, target, schedule)[0]
        assert (mask.sum(1) == 26).all() and torch.allclose(m(x, target)[0], want)


# ----------------------------------------------------------------------------
# Masking

@pytest.mark.parametrize("g,M,min_block", [(14, 75, 16), (8, 26, 4)])
def test_dtm_block_mask_exact_count_and_blocks(g, M, min_block):
    torch.manual_seed(0)
    mask = dtm.block_mask(512, g, g, M, min_block)
    assert mask.dtype == torch.bool and mask.shape == (512, g * g) and (mask.sum(1) == M).all()
    m = mask.view(512, g, g).float()
    pad = F.pad(m, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    clustered = ((neighbours >= 2) & (m > 0)).sum() / m.sum()             # masked with >= 2 masked neighbours
    rand = torch.rand(512, g * g).argsort(1) < M
    rp = F.pad(rand.view(512, g, g).float(), (1, 1, 1, 1))
    rand_cl = (((rp[:, :-2, 1:-1] + rp[:, 2:, 1:-1] + rp[:, 1:-1, :-2] + rp[:, 1:-1, 2:]) >= 2)
               & rand.view(512, g, g)).sum() / rand.sum()
    assert clustered > 0.8 and rand_cl < 0.6, (clustered, rand_cl)
    assert not torch.equal(mask[0], mask[1])
    with pytest.raises(SystemExit, match="--mask_ratio"):
        dtm.block_mask(2, g, g, g * g, min_block)


# ----------------------------------------------------------------------------
# Teachers

def _dtm_openai_state_dict(width=128, layers=2, patch=4, grid=14, out=512, seed=0):
    """Random weights under OpenAI CLIP's key names (visual tower + one text key), fp16 like the release."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
          "visual.positional_embedding": r(grid * grid + 1, width), "visual.proj": r(width, out),
          "transformer.resblocks.0.ln_1.weight": r(8), "token_embedding.weight": r(10, 8)}
    for n in ("ln_pre", "ln_post"):
        sd[f"visual.{n}.weight"], sd[f"visual.{n}.bias"] = 1 + r(width), r(width)
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd |= {p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
               p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
               p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
               p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
               p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
               p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)}
    return {k: v.half() for k, v in sd.items()}


def _dtm_clip_reference(sd, images, heads):
    """OpenAI CLIP's visual forward written out from the state dict; targets = ln_post(patches) @ proj."""
    sd = {k[7:]: v.float() for k, v in sd.items() if k.startswith("visual.")}
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], 1e-5)
    p = sd["conv1.weight"].shape[-1]
    x = F.conv2d(images, sd["conv1.weight"], stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(len(x), 1, -1), x], 1) + sd["positional_embedding"]
    x = ln(x, "ln_pre")
    B, T, W = x.shape
    for i in range(sum(k.endswith("attn.in_proj_weight") for k in sd)):
        q = f"transformer.resblocks.{i}."
        y = ln(x, q + "ln_1") @ sd[q + "attn.in_proj_weight"].T + sd[q + "attn.in_proj_bias"]
        qh, kh, vh = (t.view(B, T, heads, -1).transpose(1, 2) for t in y.chunk(3, -1))
        a = ((qh @ kh.transpose(-1, -2)) / math.sqrt(W // heads)).softmax(-1) @ vh
        x = (x + a.transpose(1, 2).reshape(B, T, W) @ sd[q + "attn.out_proj.weight"].T
             + sd[q + "attn.out_proj.bias"])
        h = ln(x, q + "ln_2") @ sd[q + "mlp.c_fc.weight"].T + sd[q + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ sd[q + "mlp.c_proj.weight"].T + sd[q + "mlp.c_proj.bias"]
    return ln(x[:, 1:], "ln_post") @ sd["proj"]


def _dtm_save_torchscript(sd, path):
    """An OpenAI-style TorchScript archive: a scripted module whose parameters carry OpenAI's names."""
    class Archive(torch.nn.Module):
        def forward(self, x):
            return x
    root = Archive()
    for key, v in sd.items():
        m = root
        for name in key.split(".")[:-1]:
            m = (getattr(m, name) if hasattr(m, name)
                 else m.add_module(name, torch.nn.Module()) or getattr(m, name))
        m.register_parameter(key.split(".")[-1], torch.nn.Parameter(v, requires_grad=False))
    torch.jit.save(torch.jit.script(root), path)


def test_dtm_clip_teacher_loads_openai_names_and_pools_to_grid(tmp_path):
    sd = _dtm_openai_state_dict()
    torch.save(sd, tmp_path / "clip.pt")
    _dtm_save_torchscript(sd, str(tmp_path / "ViT-B-16.pt"))
    x56 = torch.randn(2, 3, 56, 56)
    for name in ("ViT-B-16.pt", "clip.pt"):                               # both OpenAI formats
        model = dtm.Model(_dtm_tiny_cfg("--teacher", "clip", "--teacher_ckpt", str(tmp_path / name)))
        assert model.teacher.input_size == 56 and model.head.out_features == 512
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.teacher.parameters())
        assert torch.allclose(model.teacher(x56), _dtm_clip_reference(sd, x56, heads=2), atol=1e-4), name
    x = torch.randn(2, 3, 32, 32)                                          # student: 8 x 8 patches of 4 px
    target = model.targets(x)                                              # teacher: 14 x 14 at 56 px
    assert target.shape == (2, 64, 512) and target.dtype == torch.float32
    full = _dtm_clip_reference(sd, F.interpolate(x, (56, 56), mode="bicubic"), heads=2)  # (2, 196, 512)
    cell = full.view(2, 14, 14, 512)[:, 0:2, 0:2].mean((1, 2))            # adaptive pool: patch (0,0) <- 2x2
    assert torch.allclose(target[:, 0], cell, atol=1e-4)
    loss, _ = model(x, target)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters()) and torch.isfinite(loss)


def test_dtm_teacher_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--teacher_ckpt"):
        dtm.Model(_dtm_tiny_cfg("--teacher", "clip"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read --teacher_ckpt"):
        dtm.Model(_dtm_tiny_cfg("--teacher", "clip", "--teacher_ckpt", str(tmp_path / "junk.pt")))
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="no CLIP image tower"):
        dtm.Model(_dtm_tiny_cfg("--teacher", "clip", "--teacher_ckpt", str(tmp_path / "other.pt")))
    for flags, hint in [(["--teacher", "dino"], "choose one of clip, ema, random"),
                        (["--morph", "maybe"], "one of on, off")]:
        with pytest.raises(SystemExit, match=hint):
            dtm.Model(_dtm_tiny_cfg(*flags))


def test_dtm_impossible_morph_settings_are_one_line_errors(tmp_path):
    # through train(), as a user meets it
    with pytest.raises(SystemExit, match=r"^error: --morph_k_max 0 [^\n]*$"):
        dtm.train(dtm.parse_config(TINY + ["--morph_k_max", "0", "--max_steps", "1",
                                           "--out_dir", str(tmp_path)]))
    assert not os.listdir(tmp_path)                                         # nothing written
    for flag, bad in (("morph_levels", "0"), ("morph_n_max", "-1")):           # the same check on the model
        with pytest.raises(SystemExit, match=f"--{flag} {bad} is impossible: use >= ") as e:
            dtm.Model(_dtm_tiny_cfg(f"--{flag}", bad))
        assert "\n" not in str(e.value)


def test_dtm_drop_path_in_the_student_only_and_zero_in_the_presets():
    assert ([dtm.parse_config(["--data", d]).drop_path for d in ("imagenet", "cifar10", "synthetic")]
            == [0, 0, 0])
    torch.manual_seed(0)
    # ema teacher: a copy of the student
    model = dtm.Model(_dtm_tiny_cfg("--drop_path", "0.2"))
    assert [b.drop_path.p for b in model.encoder.blocks] == [0.0, 0.2]         # linear over depth, 0 first
    assert [b.drop_path.p for b in model.teacher.blocks] == [0.0, 0.0]
    x = torch.randn(16, 3, 32, 32)
    assert not torch.equal(model.encoder(x), model.encoder(x))                # train mode: random depth
    assert torch.equal(model.targets(x), model.targets(x))


def _dtm_imagenet_folder(root):
    for c in ("n01", "n02"):
        os.makedirs(root / "train" / c)
        for i in range(4):
            pixels = np.random.RandomState(i + 10 * len(c)).randint(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{i}.png")
    return ["--data", "imagenet", "--data_dir", str(root), "--model", "vit_pico", "--img_size", "32",
            "--patch_size", "4", "--batch_size", "4", "--num_workers", "0", "--min_mask_block", "4",
            "--morph_k_max", "8", "--log_every", "1", "--warmup_epochs", "0"]


def test_dtm_clip_checkpoint_names_the_tower_file_and_imagenet_says_which_teacher(tmp_path, capsys):
    import hashlib
    args = _dtm_imagenet_folder(tmp_path / "imagenet")
    clip = tmp_path / "clip.pt"
    torch.save(_dtm_openai_state_dict(), clip)
    sha = hashlib.sha256(clip.read_bytes()).hexdigest()
    c_args = args + ["--teacher", "clip", "--teacher_ckpt", str(clip)]
    out = run_inprocess("dtm", c_args + ["--max_steps", "3"], tmp_path / "straight", capsys)
    # the paper's teacher: nothing to say
    assert "note:" not in out
    run_inprocess("dtm", c_args + ["--max_steps", "2"], tmp_path / "halves", capsys)
    ckpt = load_ckpt(tmp_path / "halves")
    # the frozen tower is not saved...
    assert not any(k.startswith("teacher.") for k in ckpt["model"])
    # ...its file is named instead
    assert ckpt["teacher_file"] == {"path": str(clip.resolve()), "sha256": sha}
    assert "resumed" in run_inprocess("dtm", c_args + ["--max_steps", "3"], tmp_path / "halves", capsys)
    assert max_param_diff(load_ckpt(tmp_path / "straight")["model"],
                          load_ckpt(tmp_path / "halves")["model"]) < 1e-6
    torch.save(_dtm_openai_state_dict(seed=1), clip)                         # the file changed
    with pytest.raises(SystemExit, match="sha256") as e:
        run_inprocess("dtm", c_args + ["--max_steps", "4"], tmp_path / "halves", capsys)
    clip.unlink()                                                             # the file is gone
    with pytest.raises(SystemExit, match="is not a file") as e2:
        run_inprocess("dtm", c_args + ["--max_steps", "4"], tmp_path / "halves", capsys)
    assert "\n" not in str(e.value) + str(e2.value) and load_ckpt(tmp_path / "halves")["step"] == 3
    # --data imagenet with the EMA teacher: one start-up line says it is not the paper's recipe
    out = run_inprocess("dtm", args + ["--max_steps", "1"], tmp_path / "ema", capsys)
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "CLIP" in note[0] and "EMA teacher" in note[0], out
    torch.save(_dtm_openai_state_dict(), clip)
    with pytest.raises(SystemExit, match="trained with --teacher ema"):     # a CLIP resume of an EMA run
        run_inprocess("dtm", c_args + ["--max_steps", "2"], tmp_path / "ema", capsys)


# ----------------------------------------------------------------------------
# Learning

def test_dtm_overfits_one_batch():
    torch.manual_seed(0)
    model = dtm.Model(_dtm_tiny_cfg("--teacher", "random"))                     # fixed targets
    x = torch.randn(8, 3, 32, 32)
    target = model.targets(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = fit_one_batch(opt, lambda step: model(x, target)[0], 40)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


def test_dtm_ema_teacher_does_not_collapse_and_probe_features(tmp_path):
    # in-process: no start-up cost
    dtm.train(dtm.parse_config(TINY + ["--max_steps", "24", "--blr", "0.01", "--warmup_epochs", "0",
                                       "--vis_every", "24", "--out_dir", str(tmp_path)]))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 12 and all(r["tgt_std"] > 0.3 for r in rows), [r["tgt_std"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"] and (tmp_path / "vis_0000024.png").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    moved = [(ckpt["model"]["teacher." + k] - v).abs().max()
             for k, v in dtm.Model(_dtm_tiny_cfg()).teacher.state_dict().items()]
    assert max(moved) > 1e-4  # the EMA teacher followed the student
    enc, rnd = dtm.load_encoder(ckpt), dtm.load_encoder(ckpt, random_init=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = enc(x)
        vit = dtm.build_vit("vit_pico", 32, 4, layer_scale=0.1)
        vit.load_state_dict({k[8:]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")})
        assert f.shape == (3, 32) and torch.allclose(f, vit(x)[:, 1:].mean(1))  # mean-pooled student tokens
        assert not torch.allclose(f, rnd(x))


# ----------------------------------------------------------------------------
# Method: A2MIM (a2mim.py)

_a2mim_RES = ["--data", "synthetic", "--model", "resnet_micro", "--batch_size", "8", "--num_workers", "0",
       "--log_every", "2", "--warmup_epochs", "0", "--blr", "0.01"]


def _a2mim_cfg_of(*args):
    return a2mim.parse_config(["--data", "synthetic", *args])


def test_a2mim_cell_mask_exact_count_alignment_and_official_seed():
    torch.manual_seed(0)
    for cells, n in [(49, 30), (64, 39), (16, 10)]:
        m = a2mim.cell_mask(torch.rand(6, cells), math.ceil(cells * 0.6))
        assert m.dtype == torch.bool and m.shape == (6, cells) and (m.sum(1) == n).all()
    # same draw as the official generator (np.random.seed(0); permutation(49)[:30]), spec Sec. 9
    np.random.seed(0)
    perm = torch.tensor(np.random.permutation(49))
    noise = torch.empty(49).scatter_(0, perm, torch.arange(49.0))[None]   # rank of each cell
    got = set(a2mim.cell_mask(noise, 30)[0].nonzero().flatten().tolist())
    assert got == {2, 4, 5, 7, 8, 10, 11, 13, 15, 16, 17, 18, 20, 22, *range(25, 35), 37, 40, 41, 42, 46, 48}
    pix = a2mim.expand_mask(m, 4)                                          # (6, 16, 16): aligned 4x4 blocks
    assert (torch.equal(pix[:, ::4, ::4].flatten(1), m)
            and torch.equal(pix, pix[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)))


def test_a2mim_fill_is_per_image_channel_mean_in_hidden_cells_only():
    x = torch.randn(3, 3, 32, 32) + torch.arange(3.0).view(1, 3, 1, 1)
    m = a2mim.cell_mask(torch.rand(3, 64), 39)
    pix = a2mim.expand_mask(m, 4)[:, None].expand_as(x)
    for fill, value in [("mean", x.mean((2, 3), keepdim=True).expand_as(x)), ("zero", torch.zeros_like(x))]:
        y = a2mim.fill_cells(x, m, fill)
        assert torch.equal(y[~pix], x[~pix]) and torch.allclose(y[pix], value[pix])


@pytest.mark.parametrize("model,extra,feat_hw,r", [
    ("resnet_micro", [], 8, 1),  # CIFAR stem, stride 4
    ("resnet_micro", ["--img_size", "128", "--mask_patch", "32"], 8, 2),
    ("resnet_micro", ["--mask_layer", "0"], 32, 4),
    ("vit_pico", ["--patch_size", "2"], 16, 2)])
def test_a2mim_the_cell_mask_reaches_the_injection_grid(model, extra, feat_hw, r, monkeypatch):
    seen = {}
    add, enc = a2mim.add_mask_token, a2mim.vit_encode

    def spy_add(feat, mm, *a):
        seen.update(hw=feat.shape[-1], mm=mm)
        return add(feat, mm, *a)

    def spy_vit(vit, x, mm, *a):
        seen.update(hw=vit.patch_embed(x).shape[-1], mm=mm)
        return enc(vit, x, mm, *a)
    monkeypatch.setattr(a2mim, "add_mask_token", spy_add)
    monkeypatch.setattr(a2mim, "vit_encode", spy_vit)
    model = a2mim.Model(_a2mim_cfg_of("--model", model, *extra))
    x, pred, mask = model.reconstruct(torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size))
    assert pred.shape == x.shape and model.rep == r and seen["hw"] == feat_hw
    assert torch.equal(seen["mm"], a2mim.expand_mask(mask, r)) and seen["mm"].shape[-1] == feat_hw


def _a2mim_anchor():
    """The spec's deterministic loss case (Sec. 9): target x, prediction y, 2x2 cell masks of 16 px."""
    b, c, h, w = (torch.arange(n, dtype=torch.float64).view(*s) for n, s in
                  [(2, (2, 1, 1, 1)), (3, (1, 3, 1, 1)), (32, (1, 1, 32, 1)), (32, (1, 1, 1, 32))])
    x = torch.sin(0.1 * (h + 1) * (c + 1)) + torch.cos(0.07 * (w + 1) * (b + 1))
    y = 0.5 * x + 0.1 * torch.cos(0.05 * (h + 2 * w + 1) * (c + 1))
    return x, y, torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]]).bool()


@pytest.mark.parametrize("setting,ref", [
    (("focal_l1", 0.5, 1e-3), (0.0815465579, 0.0252130380, -0.0526547156, 0.2365661163)),   # ResNet head
    (("l1", 0.1, 0.0), (0.4213021839, 0.4100401185, -0.1263548334, 1.0286423957))])         # ViT head
def test_a2mim_loss_matches_the_official_values(setting, ref):
    x, y, cells = _a2mim_anchor()
    y = y.float().requires_grad_()
    loss, spa, freq = a2mim.a2mim_loss(y, x.float(), a2mim.expand_mask(cells, 16)[:, None], *setting)
    loss.backward()
    got = (loss.item(), spa.item(), y.grad.sum().item(), y.grad.abs().sum().item())
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-7)
    assert a2mim.focal_frequency_loss(y.detach(), x.float()).item() == pytest.approx(0.1674219365, rel=1e-5)


def test_a2mim_focal_l1_values_and_baseline_switch(monkeypatch):
    for e, ref in [(0.5, 0.0249792), (1.0, 0.0996680), (3.0, 0.8739378)]:
        pred, mask = torch.full((1, 3, 1, 1), e), torch.ones(1, 1, 1, 1, dtype=torch.bool)
        assert (a2mim.a2mim_loss(pred, torch.zeros_like(pred), mask, "focal_l1", 0.0)[0].item()
                == pytest.approx(ref, rel=2e-5))
    x, y, cells = _a2mim_anchor()
    full = a2mim.a2mim_loss(y, x, a2mim.expand_mask(cells, 16)[:, None], "l1", 0.1)
    monkeypatch.setattr(a2mim, "focal_frequency_loss",
                        lambda *a: pytest.fail("FFT computed at --freq_weight 0"))
    loss, spa, freq = a2mim.a2mim_loss(y, x, a2mim.expand_mask(cells, 16)[:, None], "l1", 0.0)
    assert loss == spa == full[1] and freq == 0  # --freq_weight 0: spatial loss only, no FFT, logged as 0


def test_a2mim_mask_token_is_added_not_substituted():
    f, mm = torch.randn(2, 6, 4, 4), torch.rand(2, 4, 4) < 0.5
    t, g = torch.randn(1, 6, 1, 1), torch.rand(1, 6, 1, 1)
    # identity gate
    assert torch.equal(a2mim.add_mask_token(f, mm, torch.zeros_like(t), torch.ones_like(g)), f)
    assert torch.equal(a2mim.add_mask_token(f, mm, torch.zeros_like(t)), f)                     # no gate
    out, m = a2mim.add_mask_token(f, mm, t, g), mm[:, None].float()
    assert torch.allclose(out, f * (1 - m) + g * f * m + t * m) and torch.equal(out * (1 - m), f * (1 - m))
    # ViT: the token reaches block `layer` as + token on hidden patch tokens only ([CLS] untouched)
    torch.manual_seed(0)
    vit = a2mim.build_vit("vit_pico", 16, 4)
    img, mm, tok = torch.randn(2, 3, 16, 16), torch.rand(2, 4, 4) < 0.5, torch.randn(1, 1, 32)
    assert torch.allclose(a2mim.vit_encode(vit, img, mm, torch.zeros_like(tok), 0), vit(img), atol=1e-6)
    got = []
    vit.blocks[1].register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
    a2mim.vit_encode(vit, img, mm, tok, 1), a2mim.vit_encode(vit, img, mm, torch.zeros_like(tok), 1)
    diff = got[0] - got[1]                                                 # (B, 1+N, D)
    assert (diff[:, 0].abs().max() == 0
            and torch.allclose(diff[:, 1:], mm.flatten(1)[..., None] * tok, atol=1e-6))
    # baseline --fill zero --mask_layer 0 == SimMIM's substitution by a learnable token (bias + token)
    zero = a2mim.fill_cells(img, mm.flatten(1), "zero")
    simmim = vit(zero, mask=mm.flatten(1), mask_token=vit.patch_embed.bias + tok)
    assert torch.allclose(a2mim.vit_encode(vit, zero, mm, tok, 0), simmim, atol=1e-5)


def test_a2mim_presets_pick_the_backbone_recipe():
    r = a2mim.parse_config(["--data", "imagenet"])
    v = a2mim.parse_config(["--data", "imagenet", "--model", "vit_base"])
    assert ((r.model, r.img_size, r.mask_patch, r.mask_layer, r.spatial_loss, r.freq_weight, r.unmask_weight,
             r.mask_gamma, r.epochs, r.step_epoch)
            == ("resnet50", 224, 32, 3, "focal_l1", 0.5, 1e-3, 1e-6, 300, 0))
    assert (v.patch_size, v.mask_layer, v.spatial_loss, v.freq_weight, v.unmask_weight, v.mask_gamma,
            v.epochs, v.step_epoch) == (16, 0, "l1", 0.1, 0.0, 0.0, 800, 700)
    assert r.blr * 2048 / 256 == pytest.approx(1.2e-3) and v.blr * 2048 / 256 == pytest.approx(4e-4)
    c = a2mim.parse_config(["--data", "cifar10"])
    assert ((c.model, c.img_size, c.mask_patch, c.blr * 512 / 256)
            == ("resnet18", 32, 4, pytest.approx(1.2e-3)))
    t = a2mim.parse_config(["--data", "cifar10", "--model", "vit_tiny", "--freq_weight", "0"])
    assert (t.freq_weight, t.spatial_loss, t.blr * 512 / 256) == (0, "l1", pytest.approx(5e-4))


@pytest.mark.parametrize("model,dim", [("resnet_micro", 256), ("vit_pico", 32)])
def test_a2mim_overfits_one_fixed_batch(model, dim):
    torch.manual_seed(0)
    net = a2mim.Model(_a2mim_cfg_of("--model", model))
    tf, ds = common.eval_transform("synthetic", 32), common.Synthetic(8, 32)
    images, noise = torch.stack([tf(ds[i][0]) for i in range(8)]), torch.rand(8, 64)  # one batch, one mask
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = fit_one_batch(opt, lambda step: net(images, noise)[0], 12)
    stats = net(images, noise)[1]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses
    assert set(stats) == {"spatial", "freq"}
    assert torch.nn.Sequential(net.encoder, a2mim.Pool()).eval()(images).shape == (8, dim)


def test_a2mim_resnet_resume_groups_and_probe(tmp_path, capsys):
    s, h = tmp_path / "straight", tmp_path / "halves"
    run_inprocess("a2mim", _a2mim_RES + ["--max_steps", "4"], s, capsys)
    run_inprocess("a2mim", _a2mim_RES + ["--max_steps", "2"], h, capsys)
    assert "resumed" in run_inprocess("a2mim", _a2mim_RES + ["--max_steps", "4"], h, capsys)
    A, B = load_ckpt(s), load_ckpt(h)
    assert (max_param_diff(A["model"], B["model"]) < 1e-6
            and torch.equal(A["model"]["encoder.stem.1.running_var"],
                            B["model"]["encoder.stem.1.running_var"]))
    # mask token + gate (small recipes, as the 100-epoch config): their own group, 0.1x lr, no weight decay
    groups, state = A["optimizer"]["param_groups"], A["optimizer"]["state"]
    tok = [g for g in groups if "lr_scale" in g]
    assert len(tok) == 1 and tok[0]["lr_scale"] == 0.1 and tok[0]["weight_decay"] == 0.0
    assert [state[i]["exp_avg"].shape for i in tok[0]["params"]] == [(1, 128, 1, 1)] * 2
    cfg, lr = a2mim.Config(**A["config"]), 0.01 * 8 / 256                     # the last step was step 3
    total = cfg.epochs * (2000 // 8)
    # own cosine to 1e-5
    assert tok[0]["lr"] == pytest.approx(a2mim.lr_at(cfg, 3, total, 0.1 * lr, 0, 250), rel=1e-9)
    assert groups[0]["lr"] == pytest.approx(a2mim.lr_at(cfg, 3, total, lr, 0, 250), rel=1e-9)
    enc = a2mim.load_encoder(A)
    assert isinstance(enc[0], a2mim.ResNet) and not enc.training
    res = common.probe(enc, "synthetic", "", 32, num_workers=0, epochs=3, synthetic_size=200)
    assert res["dim"] == 256 and 0 <= res["linear_top1"] <= 100


def test_a2mim_300_epoch_gate_group_and_the_1e5_floor_of_every_group(tmp_path, capsys):
    assert not a2mim.parse_config(["--data", "imagenet"]).gate_like_token          # 300-epoch R50 config
    assert a2mim.parse_config(["--data", "cifar10"]).gate_like_token               # 100-epoch config's choice
    run_inprocess("a2mim", _a2mim_RES + ["--max_steps", "1", "--gate_like_token", "0"], tmp_path, capsys)
    groups, state = (load_ckpt(tmp_path)["optimizer"][k] for k in ("param_groups", "state"))
    shapes = [[tuple(state[i]["exp_avg"].shape) for i in g["params"]] for g in groups]
    # the token's group, the gate's
    single = [g for g, sh in zip(groups, shapes) if sh == [(1, 128, 1, 1)]]
    (tok,), (gate,) = [g for g in single if "lr_scale" in g], [g for g in single if "lr_scale" not in g]
    assert (tok["lr_scale"], tok["weight_decay"]) == (0.1, 0.0) and "lr_scale" not in gate
    assert gate["weight_decay"] == 0.05 and gate["lr"] == groups[0]["lr"]       # base lr, decayed
    # official (mmcv) cosine: min_lr 1e-5 is absolute, so the 0.1x group ends at 1e-5 too, not at 1e-6
    cfg = a2mim.parse_config(["--data", "imagenet"])
    ends = [a2mim.lr_at(cfg, s, 1000, base, 100, 10) for base in (1.2e-3, 1.2e-4) for s in (50, 550, 1000)]
    assert ends == pytest.approx([6e-4, (1.2e-3 + 1e-5) / 2, 1e-5, 6e-5, (1.2e-4 + 1e-5) / 2, 1e-5], rel=1e-9)
    # step x0.1 at epoch 700 of 800
    vit = a2mim.parse_config(["--data", "imagenet", "--model", "vit_base"])
    assert ([a2mim.lr_at(vit, s, 8000, 4e-4, 100, 10) for s in (6999, 7000, 8000)]
            == pytest.approx([4e-4, 4e-5, 4e-5]))


def test_a2mim_bad_inputs_are_one_line_errors():
    for args, hint in [(["--model", "resnet_micro", "--mask_patch", "6"], "--mask_patch"),
                       (["--model", "resnet_micro", "--mask_layer", "4"], "--mask_layer"),
                       (["--model", "vit_pico", "--patch_size", "8"], "--mask_patch"),
                       (["--model", "resnet_micro", "--fill", "noise"], "--fill"),
                       (["--model", "resnet7"], "unknown --model")]:
        with pytest.raises(SystemExit, match=hint):
            a2mim.Model(_a2mim_cfg_of(*args))


# ----------------------------------------------------------------------------
# Method: ExtreMA (extrema.py)

def _extrema_tiny_cfg(**kw):
    return ex.parse_config(TINY + [a for k, v in kw.items() for a in (f"--{k}", str(v))])


def test_extrema_masks_disjoint_exact_uniform_and_the_fit_error():
    # spec Sec. 3 (floor)
    assert [ex.check_masks(196, 1, r) for r in (0.75, 0.8, 0.85, 0.9)] == [49, 39, 29, 19]
    torch.manual_seed(0)
    B, N, K = 4000, 64, 5
    noise = torch.rand(B, N)
    keep = ex.multi_mask(noise, K, 0.8)                                     # (K*B, 12)
    assert keep.shape == (K * B, 12) and keep.dtype == torch.long
    per_image = keep.view(K, B, 12).transpose(0, 1).reshape(B, K * 12)       # the K masks of each image
    assert (per_image.sort(1).values.diff(dim=1) > 0).all()                  # disjoint: 60 distinct tokens
    # the official rule: mask k = slice k of the argsort of the same noise (spec check #2)
    assert torch.equal(keep.view(K, B, 12)[2], noise.argsort(1)[:, 24:36])
    # uniform: every token is visible in every mask with probability 12/64
    freq = torch.zeros(K, N).scatter_add_(1, keep.view(K, B * 12), torch.ones(K, B * 12)) / B
    assert (freq - 12 / N).abs().max() < 5 * math.sqrt(12 / N * (1 - 12 / N) / B)
    with pytest.raises(SystemExit, match="--num_masks 6 .* 12 visible .* 64 patches"):
        ex.multi_mask(noise[:2], 6, 0.8)                                      # 72 > 64
    with pytest.raises(SystemExit, match="--num_masks"):
        ex.check_masks(64, 1, 0.99)                                           # no visible token at all


def test_extrema_encoder_attends_only_to_visible_tokens_and_pools_with_the_class_token():
    torch.manual_seed(0)
    cfg = _extrema_tiny_cfg(proj_hidden=64, proj_dim=16)
    enc = ex.ExtremaEncoder(cfg, drop_path=0.0)
    lens, queries, first = [], [], []
    enc.blocks[0].register_forward_hook(lambda m, inp, out: lens.append(inp[0].shape) or first.append(inp[0]))
    enc.blocks_token[1].attn.q.register_forward_hook(lambda m, inp, out: queries.append(inp[0].shape))
    x = torch.randn(3, 3, 32, 32)
    keep = ex.multi_mask(torch.rand(3, 64), 5, 0.8)
    out = enc(x, keep)
    # K*B sequences of 12 tokens, no cls
    assert lens[-1] == (15, 12, 32) and out.shape == (15, 32)
    # positions before gather
    tokens = enc.patch_embed(x).flatten(2).transpose(1, 2) + ex.sincos_pos_embed(32, 8, 8)
    # row k*B + b
    torch.testing.assert_close(first[-1], torch.stack([tokens[r % 3, keep[r]] for r in range(15)]))
    # the class token is the only query
    assert queries[-1] == (15, 1, 32)
    enc(x)
    assert lens[-1] == (3, 64, 32)                                            # the target view: all tokens
    # reference: trunk tokens stay fixed, each CA block = explicit softmax with the class token as only query
    trunk = []
    enc.blocks[-1].register_forward_hook(lambda m, inp, out: trunk.append(out))
    out = enc(x, keep)
    t, cls = trunk[-1], enc.cls_token.expand(15, 1, 32)
    for blk in enc.blocks_token:
        u = blk.norm1(torch.cat([cls, t], 1))
        q, k, v = (f(u).view(15, -1, 2, 16).transpose(1, 2) for f in (blk.attn.q, blk.attn.k, blk.attn.v))
        a = (q[:, :, :1] @ k.transpose(-1, -2) / 4).softmax(-1) @ v           # (15, h, 1, 16)
        cls = cls + blk.gamma_1 * blk.attn.proj(a.transpose(1, 2).reshape(15, 1, 32))
        cls = cls + blk.gamma_2 * blk.mlp(blk.norm2(cls))
    torch.testing.assert_close(out, enc.norm(cls[:, 0]), atol=1e-5, rtol=1e-5)
    # order of the visible tokens does not matter (spec check #4); a different mask does
    torch.testing.assert_close(enc(x, keep.flip(1)), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(enc(x, keep.roll(1, 0)), out, atol=1e-3)
    assert torch.allclose(enc.blocks_token[0].gamma_1, torch.full((32,), 0.1))


def test_extrema_loss_target_gradient_ema_and_schedules():
    torch.manual_seed(0)
    z = torch.randn(4, 8)
    q = torch.randn(3 * 4, 8)
    ref = torch.stack([(F.normalize(q[k * 4:(k + 1) * 4], dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
                       for k in range(3)]).mean()                             # mean over masks of batch means
    torch.testing.assert_close(ex.extrema_loss(q, z), ref)
    torch.testing.assert_close(ex.extrema_loss(q, z), (2 - 2 * F.cosine_similarity(q, z.repeat(3, 1))).mean())
    assert ex.extrema_loss(z.repeat(2, 1), z).item() < 1e-6 and abs(ex.extrema_loss(-z, z).item() - 4) < 1e-5
    # the target gets no gradient; the online branch does
    cfg = _extrema_tiny_cfg(proj_hidden=64, proj_dim=16)
    model = ex.Model(cfg)
    target = ex.make_target(cfg, model.encoder)
    x = torch.randn(2, 3, 32, 32)
    zt = target.head(target(x))
    loss, stats = model(x, zt)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in model.parameters()) and set(stats) == {"mask_cos", "z_std"}
    # collapse stat: 0 for a constant target, about 1/sqrt(C) for spread-out targets;
    # no mask_cos with one mask
    one = ex.Model(_extrema_tiny_cfg(proj_hidden=64, proj_dim=16, num_masks=1))
    assert set(one(x, zt)[1]) == {"z_std"} and one(x, zt[:1].repeat(2, 1))[1]["z_std"] < 1e-6
    assert abs(model(torch.randn(256, 3, 32, 32), torch.randn(256, 16))[1]["z_std"] - 16 ** -0.5) < 0.01
    assert all(d.p == 0 for d in target.modules() if isinstance(d, ex.DropPath))
    # EMA: t <- m t + (1 - m) o, parameter by parameter
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ex.ema_update(target, model.encoder, 0.9)
    online = model.encoder.state_dict()
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * online[k])
    # momentum: cosine 0.996 -> 1 over the run
    ms = [ex.ema_momentum(s, 1000, 0.996) for s in (0, 500, 1000)]
    assert ms[0] == pytest.approx(0.996) and ms[1] == pytest.approx(0.998) and ms[2] == pytest.approx(1.0)
    # weight decay split of ViT-S + 3-layer projector + 2-layer predictor: 66 decay / 135 not (spec check #10)
    big = ex.Model(ex.parse_config(["--model", "vit_small", "--proj_hidden", "32"]))
    decay, no_decay = (len(g["params"]) for g in ex.param_groups(big, 0.1, skip=("cls_token",)))
    assert (decay, no_decay) == (66, 135)


def test_extrema_views_share_crop_and_flip_but_not_colour():
    rng = np.random.default_rng(0)
    tex = np.kron(rng.uniform(0.35, 0.6, (16, 16)), np.ones((4, 4)))         # blocky grey texture, 64 px
    img = Image.fromarray((np.stack([tex] * 3, -1) * 255).astype(np.uint8))
    tf = common.SharedCropTwoColors("synthetic", 32)
    corr_same, corr_indep, differ = [], [], 0
    for seed in range(12):
        torch.manual_seed(seed)
        v1, v2 = tf(img)
        corr_same.append(np.corrcoef(v1[0].flatten(), v2[0].flatten())[0, 1])
        differ += not torch.allclose(v1, v2, atol=1e-3)
        # two separate crops, for contrast
        w1, w2 = tf(img)[0], tf(img)[0]
        corr_indep.append(np.corrcoef(w1[0].flatten(), w2[0].flatten())[0, 1])
    assert min(corr_same) > 0.95 and np.median(corr_indep) < 0.6              # same geometry, unlike 2 crops
    assert differ >= 8                                                         # colours drawn per view


def test_extrema_overfits_one_fixed_batch():
    torch.manual_seed(0)
    cfg = _extrema_tiny_cfg(proj_hidden=128, ema_momentum=0.9)
    model = ex.Model(cfg)
    target = ex.make_target(cfg, model.encoder)
    opt = torch.optim.AdamW(ex.param_groups(model, 0.05), lr=2e-3, betas=(0.9, 0.95))
    x = torch.randn(8, 3, 32, 32)

    def loss_fn(step):
        ex.ema_update(target, model.encoder, ex.ema_momentum(step, 30, cfg.ema_momentum))
        with torch.no_grad():
            z = target.head(target(x))
        return model(x, z)[0]
    losses = fit_one_batch(opt, loss_fn, 30)
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses


@pytest.fixture(scope="module")
def _extrema_resumed(tmp_path_factory):
    """4 steps straight vs 2 + resume + 2, in this process (the subprocess contract is tested generically)."""
    a, b = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("halves")
    # the default path runs in the shared tests; here one tensor feeds both branches
    ex.train(_extrema_tiny_cfg(max_steps=4, out_dir=a, vis_every=4, color_aug=0))
    ex.train(_extrema_tiny_cfg(max_steps=2, out_dir=b, color_aug=0))
    ex.train(_extrema_tiny_cfg(max_steps=4, out_dir=b, color_aug=0))
    return a, b


def test_extrema_resume_is_equivalent(_extrema_resumed):
    a, b = (load_ckpt(d) for d in _extrema_resumed)
    assert a["step"] == b["step"] == 4 and a["method"] == "extrema"
    assert max_param_diff(a["model"], b["model"]) < 1e-5 and max_param_diff(a["target"], b["target"]) < 1e-5
    online = {k[len("encoder."):]: v for k, v in a["model"].items() if k.startswith("encoder.")}
    # the target really is a lagging copy
    assert max_param_diff(a["target"], online) > 0
    assert os.path.exists(os.path.join(_extrema_resumed[0], "vis_0000004.png"))
    assert "resumed from" in open(os.path.join(_extrema_resumed[1], "log.txt")).read()


def test_extrema_load_encoder_gives_the_ema_pooled_vector_and_probes(_extrema_resumed):
    ckpt = load_ckpt(_extrema_resumed[0])
    enc = ex.load_encoder(ckpt)
    x = torch.randn(5, 3, 32, 32)
    full = ex.ExtremaEncoder(ex.Config(**ckpt["config"]), 0.0)
    full.load_state_dict(ckpt["target"])
    with torch.no_grad():
        f = enc(x)
        # final LN removed: re-applying the target's LN to the feature gives the target's output
        torch.testing.assert_close(F.layer_norm(f, (32,), full.norm.weight, full.norm.bias, 1e-6), full(x))
    assert f.shape == (5, 32) and not enc.training
    res = common.probe(enc, "synthetic", "data", 32, num_workers=0, epochs=5, synthetic_size=200)
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100 and res["dim"] == 32


def test_extrema_bad_mask_setting_is_a_one_line_error_before_any_output(tmp_path):
    with pytest.raises(SystemExit) as e:
        ex.train(_extrema_tiny_cfg(num_masks=6, max_steps=2, out_dir=tmp_path / "run"))
    assert "--num_masks" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")
