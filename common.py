"""Data and evaluation shared by the five method files: datasets, MIM augmentations, resumable
distributed loaders, and the frozen-feature probe (linear head sweep + weighted kNN).

Nothing here knows about a method; each method file imports only this module.

Image files (ImageNet, large folders) are decoded once per step in the main process and cropped per image,
then augmented by the same batched ops as the in-memory sets.
Where that differs from per-image PIL transforms:
- CPU, JPEG: PIL's draft mode decodes at 1/2..1/8 scale when every box of the image keeps at least its output
  resolution there; the DCT-scaled decode differs from a full decode + resize by about 1/255 on average
  (a few levels at sharp edges). `JPEG_DRAFT = False` turns it off (then the crops are PIL's, bitwise).
- CUDA: nvJPEG decodes (not libjpeg: the pixels may differ by a level), and crops resize with antialiased
  F.interpolate (within about 1/255 of PIL's filter, not bitwise), one small op per crop; the boxes are drawn
  on the host from the same counter-based numbers, so no step waits on a device-to-host copy for them.
- Flip, colour jitter, grey, blur, solarize run on the cropped batch as floats (torchvision's laws, not
  PIL's uint8 rounding). DTM's jitter of the whole image before its crop is applied to the crop instead, the
  contrast blending toward the whole image's mean grey (exact without clipping: the other ops are per pixel).
- A file that cannot be decoded ends the run with one line naming it (nothing is skipped silently).
"""
import atexit
import ctypes
import dataclasses
import gzip
import io
import math
import multiprocessing
import os
import signal
import struct
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, UnidentifiedImageError
from torchvision import datasets, transforms as T

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name -> (native image size, classes, (mean, std))
DATASETS = {
    "synthetic": (32, 10, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
    "fashion-mnist": (32, 10, ((0.286,) * 3, (0.353,) * 3)),
    "cifar10": (32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": (32, 100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "stl10": (96, 10, IMAGENET_STATS),
    "tiny-imagenet": (64, 200, IMAGENET_STATS),
    "imagenet": (224, 1000, IMAGENET_STATS),
    "folder": (224, 0, IMAGENET_STATS),
}


def die(msg):
    """A one-line error for the user instead of a traceback."""
    raise SystemExit(f"error: {msg}")


def default_workers():
    """Loader processes per GPU: 4, but never more than the CPU cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


# ----------------------------------------------------------------------------
# Flag checks: every Config field gets a rule, applied by parse_config before anything runs

def at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


def above(lo):
    return lambda v: v > lo, f"> {lo}"


def between(lo, hi, open_hi=False):
    ok = (lambda v: lo <= v < hi) if open_hi else (lambda v: lo <= v <= hi)
    return ok, f"in [{lo}, {hi}{')' if open_hi else ']'}"


def fraction():
    return lambda v: 0 < v < 1, "strictly between 0 and 1"


def one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


SHARED_RULES = {"img_size": above(0), "patch_size": above(0), "epochs": at_least(1), "max_steps": at_least(0),
                "batch_size": at_least(1), "blr": above(0), "weight_decay": at_least(0),
                "warmup_epochs": at_least(0), "num_workers": at_least(0), "seed": at_least(0),
                "log_every": at_least(1), "device": one_of("auto", "cuda", "cpu"), "vis_every": at_least(0),
                "save_every_min": at_least(0), "accum_iter": at_least(1), "knn_every": at_least(0),
                "peak_tflops": at_least(0), "benchmark": at_least(0), "subset": at_least(0)}


def check_fields(cfg, rules):
    """Every number finite, every field with a rule inside it, out_dir a folder (or new): a one-line error
    naming the flag otherwise.
    (A missing data folder is reported by build_dataset, before anything is written.)"""
    for name, v in dataclasses.asdict(cfg).items():
        if isinstance(v, float) and not math.isfinite(v):
            die(f"--{name} {v} is not a finite number")
        ok, want = {**SHARED_RULES, **rules}.get(name, (None, ""))
        if ok is not None and not ok(v):
            die(f"unknown --{name} {v}; choose {want}" if isinstance(v, str) else
                f"--{name} {v} is out of range: expected {want}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"--out_dir {cfg.out_dir} is a file; pass a folder")
    if getattr(cfg, "subset", 0) and cfg.data in ("synthetic", "stl10"):
        die(f"--subset needs a labelled pre-training split, which --data {cfg.data} does not have; "
            "drop --subset")


# ----------------------------------------------------------------------------
# Datasets

class Synthetic(torch.utils.data.Dataset):
    """Procedural class-structured images, deterministic from (seed, index), nothing on disk.
    A class fixes a shape family, an orientation and a hue range; position, scale, colours and noise
    vary per image, so raw pixels carry the class but not trivially."""

    def __init__(self, n=2000, img_size=32, num_classes=10, seed=0):
        self.n, self.size, self.C, self.seed = n, img_size, num_classes, seed
        self.targets = [i % num_classes for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        c, s = self.targets[i], min(self.size, 64)  # drawn at <= 64 px, then upsampled (fast at 224)
        g = np.random.default_rng([self.seed, i])
        yy, xx = np.mgrid[0:s, 0:s] / s - 0.5                     # (s, s) in [-0.5, 0.5)
        cy, cx = g.uniform(-0.2, 0.2, 2)
        r = g.uniform(0.15, 0.35)
        ang = math.pi * (c % 5) / 5 + g.normal(0, 0.1)           # class-dependent orientation
        u = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)
        v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
        kind = c % 5
        if kind == 0:   shape = (u ** 2 + v ** 2) < r ** 2                        # disc
        elif kind == 1: shape = (abs(u) < r) & (abs(v) < r * 0.5)                # bar
        elif kind == 2: shape = abs(np.sqrt(u ** 2 + v ** 2) - r) < 0.06          # ring
        elif kind == 3: shape = (np.sin(u * 40 / (1 + r)) > 0) & (abs(v) < r)    # grating
        else:           shape = (abs(u) < 0.05) | (abs(v) < 0.05)                 # cross
        shape = shape & ((u ** 2 + v ** 2) < 0.2) if kind == 4 else shape
        hue = (c // 5) / max(1, (self.C + 4) // 5) + g.uniform(-0.08, 0.08)      # class-dependent hue
        fg = 0.5 + 0.45 * np.cos(2 * math.pi * (hue + np.array([0, 1 / 3, 2 / 3])))
        bg = g.uniform(0, 1, 3) * 0.5
        img = np.where(shape[..., None], fg, bg) + g.normal(0, 0.08, (s, s, 3))  # (s, s, 3)
        img = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        return (img.resize((self.size, self.size), Image.BICUBIC) if self.size > s else img), c


_SYNTHETIC = Synthetic  # the class itself, for memory_images (tests may wrap the name)


class ArrayImages(torch.utils.data.Dataset):
    """uint8 images (n, H, W) or (n, H, W, 3) + labels as a dataset of RGB PIL images."""

    def __init__(self, images, labels):
        self.images, self.targets = images, [int(y) for y in labels]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        im = Image.fromarray(self.images[i])
        return im.convert("RGB"), self.targets[i]


def read_idx(path):
    """Reads an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        die(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root, train):
    """Fashion-MNIST from its IDX .gz files; grey -> 3 channels, 28 -> 32 px by zero padding."""
    prefix = "train" if train else "t10k"
    for d in [root, os.path.join(root, "fashion-mnist"), FASHION_MNIST_SYSTEM_DIR]:
        for ext in (".gz", ""):
            img, lab = (os.path.join(d, f"{prefix}-{k}-idx{n}-ubyte{ext}")
                        for k, n in (("images", 3), ("labels", 1)))
            if os.path.isfile(img) and os.path.isfile(lab):
                x = np.pad(read_idx(img), ((0, 0), (2, 2), (2, 2)))   # (n, 32, 32)
                return ArrayImages(x, read_idx(lab))
    die(f"no Fashion-MNIST IDX files in --data_dir {root} or {FASHION_MNIST_SYSTEM_DIR}; "
        "install Debian's dataset-fashion-mnist or use --data synthetic")


def tiny_imagenet_val(root):
    """Tiny-ImageNet's val/ keeps all images in one folder plus an annotations file."""
    classes = sorted(os.listdir(os.path.join(root, "train")))
    idx = {c: i for i, c in enumerate(classes)}
    with open(os.path.join(root, "val", "val_annotations.txt")) as f:
        rows = [line.split("\t")[:2] for line in f if line.strip()]
    ds = datasets.ImageFolder(os.path.join(root, "train"))   # for its loader only
    ds.samples = [(os.path.join(root, "val", "images", name), idx[c]) for name, c in rows]
    ds.targets = [y for _, y in ds.samples]
    return ds


def describe_folder(data_dir, n=64):
    """An ImageFolder's own native size (median shorter side of n train images spread over its classes) and
    mean/std (over them), installed as the `folder` entry of DATASETS so presets, normalisation and the
    probe use them. Lists only the class folders it samples: cheap on an ImageNet-sized tree."""
    root = os.path.join(data_dir, "train")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes[:: max(1, len(classes) // n)][:n]
    per, pick = max(1, n // max(1, len(classes))), []
    for c in classes:
        files = sorted(f for f in os.listdir(os.path.join(root, c))
                       if os.path.isfile(os.path.join(root, c, f)))
        pick += [os.path.join(root, c, f) for f in files[:: max(1, len(files) // per)][:per]]
    sides, pix = [], []
    for f in pick:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                sides.append(min(im.size))
                pix.append(np.asarray(im.resize((32, 32)), np.float32).reshape(-1, 3) / 255)
        except Exception:  # not an image (or a broken one): the loader reports it if training meets it
            continue
    if not sides:
        die(f"--data folder: no readable images under {root}; it needs train/<class>/<image files>")
    x = np.concatenate(pix)
    size = int(np.median(sides))
    DATASETS["folder"] = (size, 0, (tuple(x.mean(0).round(4).tolist()), tuple(x.std(0).round(4).tolist())))
    return size


def per_class_subset(ds, subset):
    """Keep the first images of every class in the set's order: a fraction (< 1) or a count (>= 1;
    AttMask's "20%" ImageNet runs keep the first 260 of every class; the CPU study a few hundred of
    Fashion-MNIST's). Folders, Fashion-MNIST and CIFAR; the others have no labelled pre-training split."""
    if not isinstance(ds, (datasets.ImageFolder, ArrayImages, datasets.CIFAR10)):
        die("--subset needs a labelled pre-training split (fashion-mnist, cifar10/100, tiny-imagenet, "
            "imagenet, folder); drop --subset")
    by_class = {}
    for i, y in enumerate(ds.targets):
        by_class.setdefault(y, []).append(i)
    per = lambda ids: ids[:int(subset)] if subset >= 1 else ids[:max(1, int(len(ids) * subset))]
    keep = sorted(i for ids in by_class.values() for i in per(ids))
    if isinstance(ds, ArrayImages):
        return ArrayImages(ds.images[keep], [ds.targets[i] for i in keep])
    if isinstance(ds, datasets.CIFAR10):
        ds.data = ds.data[keep]
    else:
        ds.samples = [ds.samples[i] for i in keep]
    ds.targets = [ds.targets[i] for i in keep]
    return ds


# validation split carved from the labelled train split: the last k images where the train order is
# shuffled (k = the test split's size), every 10th image where it is sorted by class (folders, STL-10)
VAL_TAIL = {"fashion-mnist": 10000, "cifar10": 10000, "cifar100": 10000}


def val_split(name, n):
    """(rest, val) index lists of a labelled train split of n images. Fashion-MNIST / CIFAR: val = the
    last 10k (as large as their test sets; at most a fifth of a smaller copy); synthetic: the last
    quarter (its test split's ratio); class-sorted sets: every 10th image, so every class keeps its share."""
    k = n // 4 if name == "synthetic" else min(VAL_TAIL[name], n // 5) if name in VAL_TAIL else None
    if k is None:
        return [i for i in range(n) if i % 10 != 9], list(range(9, n, 10))
    if not 0 < k < n:
        die(f"--data {name} has {n} train images, too few to hold out a validation split of {k}")
    return list(range(n - k)), list(range(n - k, n))


def build_dataset(name, data_dir, train, subset=0, synthetic_size=2000, img_size=32):
    """Raw dataset of (PIL image, label). `train`: True = the pre-training split (STL-10:
    train+unlabeled); 'probe-train' = the labelled train split; 'val' = its held-out part (val_split)
    and 'probe-rest' = the rest of it; False = the evaluation (test) split. `memory_key` names the set
    for memory_images' cache."""
    ds = _build_dataset(name, data_dir, train, subset, synthetic_size, img_size)
    ds.memory_key = (name, os.path.abspath(data_dir), str(train), subset, synthetic_size, img_size, len(ds))
    return ds


def _build_dataset(name, data_dir, train, subset, synthetic_size, img_size):
    if name not in DATASETS:
        die(f"unknown --data {name}; choose one of {', '.join(DATASETS)}")
    if train in ("val", "probe-rest"):
        full = build_dataset(name, data_dir, "probe-train", 0, synthetic_size, img_size)
        rest, val = val_split(name, len(full))
        return torch.utils.data.Subset(full, val if train == "val" else rest)
    ds = _load(name, data_dir, train, synthetic_size, img_size)
    return per_class_subset(ds, subset) if subset and train is True else ds  # pre-training only


def _load(name, data_dir, train, synthetic_size, img_size):
    existed = os.path.isdir(data_dir)
    try:
        if name == "synthetic":
            return Synthetic(synthetic_size if train else synthetic_size // 4, img_size,
                             seed=0 if train else 1)
        if name == "fashion-mnist":
            return fashion_mnist(data_dir, bool(train))
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cls(data_dir, train=bool(train), download=True)
        if name == "stl10":
            split = ("train+unlabeled" if train is True else "train") if train else "test"
            return datasets.STL10(data_dir, split=split, download=True)
        if name == "tiny-imagenet":
            return (datasets.ImageFolder(os.path.join(data_dir, "train")) if train
                    else tiny_imagenet_val(data_dir))
        return datasets.ImageFolder(os.path.join(data_dir, "train" if train else "val"))
    except Exception as e:  # offline download, missing folder, empty folder
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)  # a failed download leaves no empty folder behind
        die(f"cannot load --data {name} from --data_dir {data_dir} ({type(e).__name__}: {str(e)[:120]}); "
            "put the files there (see README) or use --data synthetic")


# ----------------------------------------------------------------------------
# In-memory datasets: the whole set as one uint8 tensor, augmented in batches (see Batched augmentation)

MEMORY_MAX_SIDE, MEMORY_MAX_BYTES = 96, 4 * 2**30  # a `folder` set is held in memory when it is this small
_MEMORY = {}  # memory_key -> MemoryImages: a process loads each dataset once


class MemoryImages:
    """A dataset as ONE uint8 tensor (n, H, W, C), C = 1 (grey, expanded per batch) or 3, and labels (n,).
    to(cuda) puts it on the GPU when it takes under a quarter of the free memory,
    else in pinned host memory."""

    def __init__(self, images, labels):
        images = images if torch.is_tensor(images) else torch.as_tensor(np.ascontiguousarray(images))
        self.images = (images if images.ndim == 4 else images[..., None]).contiguous()   # (n, H, W, C)
        self.labels = (labels if torch.is_tensor(labels)
                       else torch.as_tensor(np.asarray(labels, dtype=np.int64)))
        self.n, self.H, self.W = self.images.shape[:3]

    def __len__(self):
        return self.n

    def to(self, device):
        if device.type == "cuda" and self.images.device.type == "cpu":
            fits = self.images.nbytes < torch.cuda.mem_get_info(device)[0] / 4
            self.images = self.images.to(device) if fits else self.images.pin_memory()
            self.labels = self.labels.to(self.images.device)
        return self

    def batch(self, idx, device):
        """Images idx (B,) (on the images' device) as floats in [0, 1] on `device`: (B, 3, H, W)."""
        x = self.images[idx].to(device, non_blocking=True).permute(0, 3, 1, 2)   # (B, C, H, W) uint8
        return x.expand(-1, 3, -1, -1).float().div_(255)                           # (B, 3, H, W)


def memory_images(ds):
    """`ds` (from build_dataset) as MemoryImages, or None where it is read as image files: ImageNet, and
    `folder` sets whose first image is over MEMORY_MAX_SIDE px a side, whose images differ in size, or that
    would take over MEMORY_MAX_BYTES. Built once per process and dataset."""
    if isinstance(ds, MemoryImages):                      # already one (--benchmark's device-made images)
        return ds
    key = getattr(ds, "memory_key", None)
    if key in _MEMORY:
        return _MEMORY[key]
    if key and key[0] == "imagenet":
        return None
    if isinstance(ds, ArrayImages):                       # Fashion-MNIST
        mem = MemoryImages(ds.images, ds.targets)
    elif isinstance(ds, datasets.CIFAR10):                # CIFAR-100 is a subclass
        mem = MemoryImages(ds.data, ds.targets)           # (n, 32, 32, 3)
    elif isinstance(ds, datasets.STL10):
        mem = MemoryImages(ds.data.transpose(0, 2, 3, 1), ds.labels)  # (n, 3, 96, 96) -> (n, 96, 96, 3)
    elif isinstance(ds, _SYNTHETIC):                      # generated once, image by image
        mem = MemoryImages(np.stack([np.asarray(ds[i][0]) for i in range(len(ds))]), ds.targets)
    elif isinstance(ds, datasets.ImageFolder):            # tiny-imagenet, folder
        mem = _small_folder(ds)
    elif isinstance(ds, torch.utils.data.Subset):         # the val split and the rest
        full = memory_images(ds.dataset)
        idx = torch.as_tensor(ds.indices, device=full.images.device) if full is not None else None
        mem = MemoryImages(full.images[idx], full.labels[idx]) if full is not None else None
    else:
        return None
    if key:
        _MEMORY[key] = mem  # None too: a set that does not fit is not decoded again
    return mem


def _small_folder(ds):
    """Decodes an ImageFolder into memory if its images are small and all the same size (else None)."""
    if not len(ds.samples):
        return None
    W, H = ds.loader(ds.samples[0][0]).size
    if max(H, W) > MEMORY_MAX_SIDE or len(ds.samples) * H * W * 3 > MEMORY_MAX_BYTES:
        return None
    out = np.empty((len(ds.samples), H, W, 3), np.uint8)
    for i, (path, _) in enumerate(ds.samples):
        img = ds.loader(path).convert("RGB")
        if img.size != (W, H):
            return None
        out[i] = np.asarray(img)
    return MemoryImages(out, ds.targets)


# ----------------------------------------------------------------------------
# Augmentations: per-image PIL transforms, the reference the batched views are tested against (and the
# path of a dataset that is neither in memory nor an ImageFolder: none of --data's)

class Blur:
    """Gaussian blur with a random radius on a PIL image (PIL's filter: much faster than on tensors)."""

    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        r = self.radius[0] + (self.radius[1] - self.radius[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(r))


def normalize(data):
    return T.Normalize(*DATASETS[data][2])


def mim_transform(data, img_size, scale=(0.2, 1.0), color=False, interpolation="bicubic"):
    """One RandomResizedCrop (bicubic by default, as MAE) + flip view; optional colour jitter."""
    aug = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode(interpolation)),
           T.RandomHorizontalFlip()]
    if color:
        aug += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    return T.Compose(aug + [T.ToTensor(), normalize(data)])


def eval_resize(data, img_size):
    """eval_transform's shorter side before the centre crop: img_size for small images (no crop margin),
    else the 256/224 ratio."""
    native = DATASETS[data][0]
    whole = (img_size == native and native <= 64) or (data == "folder" and native <= 96)
    return img_size if whole else int(round(img_size * 256 / 224))


def eval_transform(data, img_size):
    """Resize + centre crop (ratio 224/256 at ImageNet-like sizes, identity at native size)."""
    resize = eval_resize(data, img_size)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), normalize(data)])


class MultiCrop:
    """DINO/iBOT multi-crop: 2 global crops + n_local local crops, colour jitter, grayscale, blur
    (p 1.0 / 0.1 / 0.5 local) and solarize on the second global crop. Returns a list of tensors."""

    def __init__(self, data, global_size, local_size, n_local, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), blur=(1.0, 0.1, 0.5)):
        flip_color = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                      T.RandomGrayscale(0.2)]
        norm = [T.ToTensor(), normalize(data)]
        rad = (0.1 * global_size / 224, 2.0 * global_size / 224)  # DINO's radius range at 224 px, scaled

        crop = lambda size, sc: T.RandomResizedCrop(size, scale=sc, interpolation=T.InterpolationMode.BICUBIC)
        self.g1 = T.Compose([crop(global_size, global_scale), *flip_color, Blur(blur[0], rad), *norm])
        self.g2 = T.Compose([crop(global_size, global_scale), *flip_color, Blur(blur[1], rad),
                             T.RandomSolarize(128, p=0.2), *norm])
        self.loc = T.Compose([crop(local_size, local_scale), *flip_color, Blur(blur[2], rad), *norm])
        self.n_local = n_local

    def __call__(self, img):
        return [self.g1(img), self.g2(img)] + [self.loc(img) for _ in range(self.n_local)]


class CropWithBox:
    """RandomResizedCrop + flip that also returns where the crop came from, so a per-image map can
    follow the image: box = (top, left, height, width) as fractions of the source image, flip in {0, 1}."""

    def __init__(self, data, img_size, scale=(0.2, 1.0), color=False, interpolation="bicubic"):
        self.rrc = T.RandomResizedCrop(img_size, scale=scale,
                                       interpolation=T.InterpolationMode(interpolation))
        self.resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
        self.color = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                T.RandomGrayscale(0.2)]) if color else None
        self.post = T.Compose([T.ToTensor(), normalize(data)])

    def geometry(self, img):
        W, H = img.size
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.rrc.scale, self.rrc.ratio)
        flip = bool(torch.rand(()) < 0.5)
        out = img.resize((self.rrc.size[1], self.rrc.size[0]), self.resample, box=(j, i, j + w, i + h))
        out = out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out
        return out, torch.tensor([i / H, j / W, h / H, w / W, float(flip)])

    def __call__(self, img):
        out, box = self.geometry(img)
        return self.post(self.color(out) if self.color else out), box


class SharedCropTwoColors(CropWithBox):
    """One crop + flip shared by two views, colour jitter drawn independently per view (ExtreMA)."""

    def __init__(self, data, img_size, scale=(0.2, 1.0), interpolation="bicubic"):
        super().__init__(data, img_size, scale, color=True, interpolation=interpolation)

    def __call__(self, img):
        out, _ = self.geometry(img)
        return self.post(self.color(out)), self.post(self.color(out))


def crop_map(maps, box, out_hw):
    """Moves per-image maps (B, h, w) through crop boxes (B, 5) from CropWithBox: bilinear resampling of
    the box region onto an out_hw grid, then the flip. Exact inverse of what the crop did to the pixels."""
    B = maps.shape[0]
    top, left, h, w, flip = box.unbind(1)
    gh, gw = out_hw
    ys = (torch.arange(gh, device=maps.device) + 0.5) / gh                  # (gh,) cell centres in [0, 1]
    xs = (torch.arange(gw, device=maps.device) + 0.5) / gw
    xs = torch.where(flip[:, None] > 0.5, 1 - xs, xs)                      # (B, gw)
    sy = (top[:, None] + h[:, None] * ys) * 2 - 1                          # (B, gh) in [-1, 1]
    sx = (left[:, None] + w[:, None] * xs) * 2 - 1                         # (B, gw)
    grid = torch.stack(torch.broadcast_tensors(sx[:, None, :], sy[:, :, None]), -1)  # (B, gh, gw, 2)
    return F.grid_sample(maps[:, None].float(), grid.float(), mode="bilinear", align_corners=False,
                         padding_mode="border")[:, 0]                       # (B, gh, gw)


# ----------------------------------------------------------------------------
# Batched augmentation: the views above for a whole batch of in-memory images at once, on their device.
# Every op draws per-image parameters from Draws, so image `key` gets the same view whatever batch, rank or
# machine it lands on. Images are floats in [0, 1], (B, 3, H, W), until normalisation.

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) in int64 tensor arithmetic: x < 2^32 and the
    multiplier < 2^27 keep every product below 2^63."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


class Draws:
    """Counter-based uniforms in [0, 1): number d of image `key` is a hash of (seed, key, d). Each call
    hands every image its next draws: draws(k) -> (B, k)."""

    def __init__(self, seed, keys):
        s = _mix32(torch.full_like(keys, seed & _M32))
        self.base = _mix32(_mix32(s ^ (keys >> 32)) ^ (keys & _M32))         # (B,)
        self.used = 0

    def __call__(self, k):
        return self.at(self.skip(k), k)

    def skip(self, k):
        """Hands out the next k numbers without computing them; returns where they start."""
        self.used += k
        return self.used - k

    def at(self, start, k):
        """Numbers start .. start + k - 1 of every image: (B, k)."""
        d = torch.arange(start, start + k, device=self.base.device)
        x = _mix32(self.base[:, None] ^ _mix32(d + 0x9E3779B9 & _M32))      # (B, k)
        return (x >> 8).float() / 2**24                                     # 24 bits: exact in float32


def crop_params(u, H, W, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for a batch, from u (B, 22): 10 tries of an area scale
    ~ U(scale) and a log aspect ratio ~ U(log ratio); the first box that fits wins; if none does, the centre
    crop with the ratio clamped; the position is uniform over the integer places the box fits.
    H, W: ints (one size for all) or (B,) tensors (image files of different sizes).
    Returns top, left, h, w: (B,) int64."""
    u = u.double()
    H, W = (torch.as_tensor(v, dtype=torch.float64, device=u.device).expand(len(u)) for v in (H, W))  # (B,)
    log_r = math.log(ratio[0]), math.log(ratio[1])
    area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :10])  # (B, 10)
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 10:20])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])         # (B, 10)
    first = fits.int().argmax(1, keepdim=True)                               # the first try that fits
    found = fits.any(1)
    narrow, wide = W / H < min(ratio), W / H > max(ratio)                    # the fallback box
    fw = torch.where(wide, torch.round(H * max(ratio)), W)
    fh = torch.where(narrow, torch.round(W / min(ratio)), H)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)                     # (B,)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    top = torch.where(found, torch.floor(u[:, 20] * (H - h + 1)), torch.floor((H - h) / 2))
    left = torch.where(found, torch.floor(u[:, 21] * (W - w + 1)), torch.floor((W - w) / 2))
    return top.long(), left.long(), h.long(), w.long()


def resample(x, top, left, h, w, size, mode="bilinear"):
    """Boxes (B,) of x (B, 3, H, W) resized to (B, 3, size, size).
    bilinear: roi_align with adaptive sampling: bilinear interpolation at the output pixel centres, averaged
      over ceil(box / size)^2 points per pixel when a box shrinks (antialiased, like PIL's bilinear resize).
    bicubic: grid_sample's bicubic (Keys a = -0.75; PIL uses -0.5) where a box grows or keeps its size;
      where it shrinks, the antialiased bilinear result (PIL's antialiased bicubic has no batched op)."""
    from torchvision.ops import roi_align
    B, _, H, W = x.shape
    boxes = torch.stack([torch.arange(B, device=x.device), left, top, left + w, top + h], 1).to(x.dtype)
    shrinks = max(H, W) > size
    out = roi_align(x, boxes, size, 1.0, -1, aligned=True) if mode == "bilinear" or shrinks else None
    if mode == "bicubic":
        c = (torch.arange(size, device=x.device) + 0.5) / size                # (S,) output pixel centres
        gy = (top[:, None] + h[:, None] * c) / H * 2 - 1                       # (B, S) in [-1, 1]
        gx = (left[:, None] + w[:, None] * c) / W * 2 - 1
        # (B, S, S, 2)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1).to(x.dtype)
        cubic = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
        out = cubic if out is None else torch.where(((h > size) | (w > size))[:, None, None, None],
                                                    out, cubic)
    return out                                                                  # (B, 3, size, size)


def flip(x, u, p=0.5):
    """Horizontal flip of the images whose u (B,) < p; returns them and the flags (B,) bool."""
    f = u < p
    return torch.where(f[:, None, None, None], x.flip(-1), x), f


def random_crop(x, draws, size, scale, mode):
    """RandomResizedCrop + horizontal flip (23 draws). Returns the views (B, 3, size, size) and the boxes
    (B, 5) in CropWithBox's format: (top, left, height, width) as fractions of the source, flip."""
    if isinstance(x, FileImages):  # files of their own sizes: boxes drawn on the host, where they are cut
        top, left, h, w = crop_params((x.host_draws or draws).at(draws.skip(22), 22), x.H, x.W, scale)
        out, f = flip(x.crop(top, left, h, w, size, mode), draws(1)[:, 0])
        box = (torch.stack([top / x.H, left / x.W, h / x.H, w / x.W], 1).float()
               .to(f.device, non_blocking=True))
        return out, torch.cat([box, f.float()[:, None]], 1)
    H, W = x.shape[-2:]
    top, left, h, w = crop_params(draws(22), H, W, scale)
    out, f = flip(resample(x, top, left, h, w, size, mode), draws(1)[:, 0])
    box = torch.stack([top / H, left / W, h / H, w / W, f.float()], 1).float()
    return out, box


def gray(x):
    """ITU-R 601 luma as torchvision's rgb_to_grayscale: (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def hue_shift(x, shift):
    """Adds shift (B,) to every pixel's hue (a fraction of the colour circle), saturation and value kept:
    torchvision's adjust_hue, through HSV written for a batch."""
    v, vi = x.max(1)                                                         # (B, H, W) value, argmax channel
    c = v - x.min(1).values                                                  # chroma
    r, g, b = x.unbind(1)
    d = torch.where(vi == 0, g - b, torch.where(vi == 1, b - r, r - g))     # hue sector offset x chroma
    h6 = d / torch.where(c > 0, c, 1.0) + 2 * vi + 6 * shift[:, None, None]  # (B, H, W) new hue, a turn = 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)     # the r, g, b phases
    k = torch.remainder(n + h6[:, None], 6)                                  # (B, 3, H, W)
    return v[:, None] - c[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(x, u, brightness, contrast, saturation, hue, mean_scale=None):
    """torchvision's ColorJitter with per-image factors and order, from u (B, 8): the order of the four ops
    is a random permutation per image (argsort of 4 uniforms), factors ~ U(1 -+ a), hue shift ~ U(-+ hue).
    Brightness, contrast and saturation blend towards black, the mean grey level, the grey image. The costly
    hue op runs once: first every image's blends that come before its hue, then the hue, then the rest.
    mean_scale (B,): contrast's grey level is the image's mean times it
    (a crop standing in for its source)."""
    order = u[:, :4].argsort(1)                                               # (B, 4)
    hue_at = (order == 3).int().argmax(1)                                     # (B,) the hue op's place
    amp = torch.tensor([brightness, contrast, saturation], device=x.device)
    factor = 1 + (2 * u[:, 4:7] - 1) * amp                                    # (B, 3)
    for before in (True, False):
        for stage in range(3) if before else range(1, 4):
            op = order[:, stage]                                              # (B,)
            now = (op < 3) & ((stage < hue_at) if before else (stage > hue_at))
            f = torch.where(now, factor.gather(1, op[:, None].clamp(max=2))[:, 0], 1.0).view(-1, 1, 1, 1)
            is_c, is_s = ((op == k).to(x.dtype).view(-1, 1, 1, 1) for k in (1, 2))
            g = gray(x)                                                       # (B, 1, H, W)
            m = g.mean((1, 2, 3), keepdim=True) * (1 if mean_scale is None else mean_scale.view(-1, 1, 1, 1))
            toward = torch.addcmul(m * is_c, g, is_s)                         # black / mean grey / grey
            # f x + (1 - f) toward; x at f = 1
            x = torch.lerp(toward, x, f).clamp_(0, 1)
        if before and hue:
            x = hue_shift(x, (2 * u[:, 7] - 1) * hue)
    return x


def gaussian_blur(x, sigma, max_sigma):
    """Gaussian blur with a per-image sigma (B,) in pixels, edges replicated: two grouped 1-D convolutions
    over all B x 3 channels at once, with taps out to 3 max_sigma."""
    B, C, H, W = x.shape
    r = max(1, math.ceil(3 * max_sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)                          # (B, 2r + 1)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)                  # (B C, 2r + 1)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")     # (1, B C, H + 2r, W + 2r)
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)                        # along W
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)                        # along H
    return y.view(B, C, H, W)


def where_p(u, p, new, old):
    """Per image: `new` where u (B,) < p, else `old`."""
    return torch.where((u < p)[:, None, None, None], new, old)


def color_gray(x, draws, jitter=(0.4, 0.4, 0.2, 0.1), p=0.8, p_gray=0.2):
    """RandomApply(ColorJitter, p) then RandomGrayscale(p_gray) (10 draws)."""
    u = draws(10)
    x = where_p(u[:, 8], p, color_jitter(x, u[:, :8], *jitter), x)
    return where_p(u[:, 9], p_gray, gray(x).expand_as(x), x)


def normalize_batch(x, data):
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in DATASETS[data][2])
    return (x - mean) / std


class BatchCrop:
    """Batched mim_transform (`color`: jitter + grey) or CropWithBox (`with_box`: also the boxes (B, 5)).
    `source_jitter` (brightness, contrast, saturation, hue):
    a colour jitter of the whole image first (DTM)."""

    def __init__(self, data, img_size, scale=(0.2, 1.0), color=False, with_box=False, source_jitter=None,
                 interpolation="bicubic"):
        self.data, self.size, self.scale, self.color, self.with_box = data, img_size, scale, color, with_box
        self.source_jitter, self.mode = source_jitter, interpolation

    def __call__(self, x, draws):
        files = isinstance(x, FileImages)
        u = draws(8) if self.source_jitter else None
        if self.source_jitter and not files:
            x = color_jitter(x, u, *self.source_jitter)
        src, (x, box) = x, random_crop(x, draws, self.size, self.scale, self.mode)
        if self.source_jitter and files:  # the crop jittered instead, contrast toward the whole image's grey
            scale = src.mean_gray() / gray(x).mean((1, 2, 3)).clamp(min=1e-6)           # (B,)
            x = color_jitter(x, u, *self.source_jitter, mean_scale=scale)
        x = normalize_batch(color_gray(x, draws) if self.color else x, self.data)
        return (x, box) if self.with_box else x


class BatchSharedCropTwoColors(BatchCrop):
    """Batched SharedCropTwoColors: one crop + flip, two independent colourings [view 1, view 2] (ExtreMA)."""

    def __call__(self, x, draws):
        x, _ = random_crop(x, draws, self.size, self.scale, self.mode)
        return [normalize_batch(color_gray(x, draws), self.data) for _ in range(2)]


class BatchMultiCrop:
    """Batched MultiCrop: 2 global + n_local local views, jitter, grey, blur (per-view probability, sigma =
    PIL's radius), solarize on the second global view. Returns a list of 2 + n_local (B, 3, s, s)."""

    def __init__(self, data, global_size, local_size, n_local, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), blur=(1.0, 0.1, 0.5), interpolation="bicubic"):
        self.data, self.mode, self.blur = data, interpolation, blur
        self.kinds = [(global_size, global_scale, blur[0], 0.0), (global_size, global_scale, blur[1], 0.2)]
        # (size, scale, p blur, p solarize)
        self.kinds += [(local_size, local_scale, blur[2], 0.0)] * n_local
        # DINO's radius at 224 px, scaled
        self.sigma = (0.1 * global_size / 224, 2.0 * global_size / 224)

    def __call__(self, x, draws):
        # image files: announce every view's box first, so one decode serves all
        if isinstance(x, FileImages):
            start = draws.used                                              # a view takes 36 draws: crop 22,
            for j, (size, scale, *_) in enumerate(self.kinds):              # flip 1, colour 10, blur 3
                _, _, h, w = crop_params((x.host_draws or draws).at(start + 36 * j, 22), x.H, x.W, scale)
                x.expect(h, w, size, size)
        views = []
        for size, scale, p_blur, p_solar in self.kinds:
            v, _ = random_crop(x, draws, size, scale, self.mode)
            v = color_gray(v, draws)
            u = draws(3)
            sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 1]
            v = where_p(u[:, 0], p_blur, gaussian_blur(v, sigma, self.sigma[1]), v)
            if p_solar:
                v = where_p(u[:, 2], p_solar, torch.where(v >= 128 / 255, 1 - v, v), v)
            views.append(normalize_batch(v, self.data))
        return views


class BatchEval:
    """Batched eval_transform (`squash`: AMT's refresh, the whole image resized to a square, bilinear);
    deterministic. At the native size (eval_transform's identity) it only normalises."""

    def __init__(self, data, img_size, squash=False):
        self.data, self.size, self.squash = data, img_size, squash

    def __call__(self, x, draws=None):
        if isinstance(x, FileImages):
            return self.files(x)
        (H, W), s = x.shape[-2:], self.size
        if self.squash:
            if (H, W) != (s, s):
                x = F.interpolate(x, (s, s), mode="bilinear", antialias=True, align_corners=False)
            return normalize_batch(x, self.data)
        r = eval_resize(self.data, s)                                              # eval_transform's Resize
        hw = (r, int(r * W / H)) if H <= W else (int(r * H / W), r)               # shorter side -> r
        if hw != (H, W):
            x = F.interpolate(x, hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        t, l = int(round((hw[0] - s) / 2)), int(round((hw[1] - s) / 2))            # CenterCrop(s)
        return normalize_batch(x[..., t:t + s, l:l + s], self.data)

    def files(self, x):
        """The same for image files of their own sizes, each resized and cropped on its own (FileImages)."""
        s = self.size
        r = eval_resize(self.data, s)
        H, W = x.hw.double().unbind(1)                                              # (B,) header sizes
        wide = H <= W
        hw = torch.stack([torch.where(wide, r, (r * H / W).long()),
                          torch.where(wide, (r * W / H).long(), r)], 1)             # (B, 2) shorter side r
        tl = torch.round((hw - s) / 2).long()                                       # (B, 2) CenterCrop(s)
        return normalize_batch(x.resize_crop(hw, tl, s, self.squash), self.data)


# ----------------------------------------------------------------------------
# Image files (ImageNet, large folders): loader workers only read each file's bytes and its header size; the
# main process draws the crop boxes (Draws, as above), decodes every image once per step (nvJPEG in batches on
# CUDA; PIL in threads on the CPU, at a reduced JPEG scale when every box allows it), crops and resizes each
# box (one op per image), and the batched view does the rest (flip, colour, blur, solarize, normalise).

JPEG_DRAFT = True  # CPU: let PIL decode a JPEG at 1/2..1/8 scale when no box then falls below its output size
_THREADS = []      # the decode thread pool, made on first use


class FileBytes(torch.utils.data.Dataset):
    """Worker side of the file path: key -> (key, bytes (n,) uint8, (H, W) from the header, label, whether it
    is an RGB or grey JPEG (nvJPEG's)). A file PIL cannot identify gets size (0, 0); the main process then
    tries to decode it and reports it."""

    def __init__(self, samples):
        self.samples = samples  # [(path, label)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        path, y = self.samples[key % len(self.samples)]
        with open(path, "rb") as f:
            data = f.read()
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                (W, H), jpeg = im.size, im.format == "JPEG" and im.mode in ("RGB", "L")
        except Exception:
            H = W = jpeg = 0
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0).byte()
        return key, data, (H, W), y, jpeg


def _collate_files(items):
    keys, data, hw, labels, jpeg = zip(*items)
    return torch.tensor(keys), list(data), torch.tensor(hw), torch.tensor(labels), list(jpeg)


def image_files(ds):
    """[(path, label)] of an ImageFolder (or a Subset of one), else None."""
    if isinstance(ds, torch.utils.data.Subset):
        full = image_files(ds.dataset)
        return None if full is None else [full[i] for i in ds.indices]
    return list(ds.samples) if isinstance(ds, datasets.ImageFolder) else None


def _pil_decode(data, req=None):
    """uint8 bytes -> RGB PIL image, at a reduced JPEG scale when req (w, h) allows it, and its scale (sx, sy)
    against the header size. Raises what PIL raises for a broken file."""
    im = Image.open(io.BytesIO(data.numpy()))
    W, H = im.size
    if req is not None and JPEG_DRAFT and im.format == "JPEG":
        im.draft(im.mode, req)              # picks the smallest scale 1/k whose size is still >= req
    im = im.convert("RGB")                  # loads: grey and CMYK become RGB
    return im, (im.size[0] / W, im.size[1] / H)


class FileImages:
    """One batch of image files: the compressed bytes, header sizes hw (B, 2), and the decoded images (made
    once, on the first crop). The views call random_crop / BatchEval on it as on an image tensor; `expect`
    announces later boxes so that one decode serves them all (multi-crop). host_draws: the batch's Draws on
    the host, for the boxes (so that a CUDA step never waits for the device to cut them)."""

    def __init__(self, data, hw, paths, device, jpeg=None, tensors=None, host_draws=None):
        self.data, self.hw, self.paths, self.device, self.host_draws = data, hw, paths, device, host_draws
        self.jpeg = jpeg or [False] * len(data)                             # RGB / grey JPEGs: for nvJPEG
        self.tensors = device.type == "cuda" if tensors is None else tensors  # decode and crop as tensors
        self.H, self.W = hw[:, 0], hw[:, 1]                                 # (B,) on the host
        # (B, 2) decode size needed, (w, h)
        self.need = torch.zeros(len(data), 2, dtype=torch.float64)
        self.images = None
        for b in (hw.min(1).values == 0).nonzero()[:, 0].tolist():          # header unreadable: say why
            self.decode_one(b)

    def fail(self, b, e):
        why = f"{type(e).__name__}: {e}"
        why = "not an image format PIL reads" if isinstance(e, UnidentifiedImageError) else why
        die(f"cannot decode the image file {self.paths[b]} ({why[:100]}); remove or replace it")

    def decode_one(self, b, req=None):
        r = self._try(b, req)
        if isinstance(r, Exception):
            self.fail(b, r)
        return r

    def expect(self, h, w, out_h, out_w):
        """Boxes h, w (B,) of source pixels will be resized to out_h x out_w: decode at least that finely."""
        hw = self.hw.double()
        need = torch.stack([hw[:, 1] * out_w / w.double(), hw[:, 0] * out_h / h.double()], 1)      # (B, 2)
        self.need = torch.maximum(self.need, need.ceil())

    def decode(self):
        """CUDA: JPEGs in one nvJPEG batch (torchvision.io.decode_jpeg), anything else with PIL, as (3, H, W)
        uint8 tensors on the device.
        CPU: RGB PIL images decoded in threads, each at the scale `need` allows."""
        if self.images is not None:
            return
        B = len(self.data)
        if self.tensors:
            self.images = [None] * B
            jpeg = [b for b in range(B) if self.jpeg[b]]
            try:
                import warnings
                from torchvision.io import ImageReadMode, decode_jpeg
                # torchvision 0.29 points to TorchCodec, not a dependency here
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    out = decode_jpeg([self.data[b] for b in jpeg], mode=ImageReadMode.RGB,
                                      device=self.device)
                for b, t in zip(jpeg, out):
                    self.images[b] = t                                      # (3, H, W) uint8, grey expanded
            except Exception:  # a broken JPEG in the batch: PIL decodes them all, and names the broken one
                pass
            for b in range(B):
                if self.images[b] is None:
                    im, _ = self.decode_one(b)
                    self.images[b] = torch.from_numpy(np.array(im)).permute(2, 0, 1).to(self.device)
            self.scale = [(1.0, 1.0)] * B
            return
        if not _THREADS:
            from concurrent.futures import ThreadPoolExecutor
            _THREADS.append(ThreadPoolExecutor(min(4, default_workers())))
        req = [tuple(int(v) for v in n) if n.min() > 0 else None for n in self.need]
        out = list(_THREADS[0].map(lambda b: self._try(b, req[b]), range(B)))
        for b, r in enumerate(out):
            if isinstance(r, Exception):
                self.fail(b, r)
        self.images, self.scale = [r[0] for r in out], [r[1] for r in out]

    def _try(self, b, req):
        try:
            return _pil_decode(self.data[b], req)
        except Exception as e:
            return e

    def _stack(self, fn):
        """fn(b) -> output b, a PIL image (CPU) or floats (1, 3, s, s) in [0, 255] (tensors) -> (B, 3, s, s)
        floats in [0, 1]."""
        if self.tensors:
            return torch.cat([fn(b) for b in range(len(self.data))]).div_(255).clamp_(0, 1)
        arrays = list(_THREADS[0].map(lambda b: np.asarray(fn(b)), range(len(self.data))))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)           # (B, 3, s, s) uint8
        return x.float().div_(255)

    def crop(self, top, left, h, w, size, mode):
        """Boxes (B,) of source pixels resized to (B, 3, size, size) floats in [0, 1] on the device: PIL's
        filter on the CPU (crop, then resize: RandomResizedCrop), antialiased interpolation on CUDA."""
        self.expect(h, w, size, size)
        self.decode()
        t, l, hh, ww = (v.tolist() for v in (top, left, h, w))
        if self.tensors:
            return self._stack(lambda b: F.interpolate(
                self.images[b][None, :, t[b]:t[b] + hh[b], l[b]:l[b] + ww[b]].float(), (size, size),
                mode=mode, antialias=True, align_corners=False))
        resample = Image.BICUBIC if mode == "bicubic" else Image.BILINEAR

        def one(b):
            (sx, sy), im = self.scale[b], self.images[b]
            if (sx, sy) == (1.0, 1.0):
                return im.crop((l[b], t[b], l[b] + ww[b], t[b] + hh[b])).resize((size, size), resample)
            box = (l[b] * sx, t[b] * sy, (l[b] + ww[b]) * sx, (t[b] + hh[b]) * sy)
            return im.resize((size, size), resample, box=box)
        return self._stack(one)

    def resize_crop(self, hw, tl, size, squash):
        """eval_transform for each image: resize to hw (B, 2) (bicubic), then the size x size crop at tl
        (B, 2); squash: the whole image to size x size (bilinear, AMT's refresh)."""
        if squash:
            hw, tl = torch.full_like(self.hw, size), torch.zeros_like(self.hw)
        self.need = torch.maximum(self.need, hw.flip(1).double())
        self.decode()
        mode = "bilinear" if squash else "bicubic"
        (rh, rw), (t, l) = hw.T.tolist(), tl.T.tolist()
        if self.tensors:
            return self._stack(lambda b: F.interpolate(self.images[b][None].float(), (rh[b], rw[b]),
                                                       mode=mode, antialias=True, align_corners=False)
                               [..., t[b]:t[b] + size, l[b]:l[b] + size])
        resample = Image.BILINEAR if squash else Image.BICUBIC
        return self._stack(lambda b: self.images[b].resize((rw[b], rh[b]), resample)
                           .crop((l[b], t[b], l[b] + size, t[b] + size)))

    def mean_gray(self):
        """(B,) mean grey level in [0, 1] of each whole decoded image (DTM's jitter before the crop)."""
        self.decode()
        if self.tensors:
            return torch.stack([gray(im[None].float()).mean() / 255 for im in self.images])
        g = [np.asarray(im.convert("L"), np.float32).mean() / 255 for im in self.images]
        return torch.tensor(g, device=self.device)


class FileLoader:
    """Batches of an image-file set (FileImages) made by a batched view on `device`: the same (views, labels)
    or (views, labels, index) tuples as MemoryLoader, with the same per-key augmentation (Draws(seed, key)),
    so a batch does not depend on the worker count, the batch it is in, the rank or a resume."""

    def __init__(self, samples, batched, batch_size, sampler, seed, device, with_index=False, drop_last=True,
                 num_workers=None):
        num_workers = default_workers() if num_workers is None else num_workers
        self.samples, self.batched, self.sampler, self.seed = samples, batched, sampler, seed
        self.device, self.with_index = device, with_index
        self.loader = torch.utils.data.DataLoader(
            FileBytes(samples), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
            collate_fn=_collate_files, drop_last=drop_last, persistent_workers=num_workers > 0,
            worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed))  # own RNG: the global
        # one (masks, drop path) must not see the workers' base seed drawn at every epoch's start (resume)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for keys, data, hw, labels, jpeg in self.loader:
            idx = keys % len(self.samples)
            x = FileImages(data, hw, [self.samples[i][0] for i in idx.tolist()], self.device, jpeg,
                           host_draws=Draws(self.seed, keys))
            x = self.batched(x, Draws(self.seed, keys.to(self.device)))
            y = labels.to(self.device, non_blocking=True)
            yield (x, y, idx) if self.with_index else (x, y)


# ----------------------------------------------------------------------------
# Loaders

class SeededView(torch.utils.data.Dataset):
    """Applies the transform with an RNG seeded by (seed, key): the augmentation of sample i in epoch e
    is the same whatever the worker count, the rank or a resume. Keys come from EpochSampler."""

    def __init__(self, ds, transform, seed=None, with_index=False):
        self.ds, self.transform, self.seed, self.with_index = ds, transform, seed, with_index

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i = key % len(self.ds)
        img, y = self.ds[i]
        if self.seed is None:  # deterministic transform (evaluation)
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + key)
                x = self.transform(img)
        return (x, y, i) if self.with_index else (x, y)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (or ordered) indices for one rank, reproducible from (seed, epoch); set_epoch(e, skip)
    starts after `skip` samples of this rank, for exact mid-epoch resume. Yields epoch*n + i keys."""

    def __init__(self, n, shuffle=True, seed=0, rank=0, world=1, drop_last=True):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.per_rank = n // world if drop_last else math.ceil(n / world)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def keys(self):
        """This rank's keys for the epoch, (len(self),) int64."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        idx = (torch.cat([idx, idx[: self.per_rank * self.world - self.n]])
               if len(idx) < self.per_rank * self.world else idx)
        mine = idx[self.rank: self.per_rank * self.world: self.world][self.skip:]
        return mine + self.epoch * self.n

    def __iter__(self):
        return iter(self.keys().tolist())

    def __len__(self):
        return self.per_rank - self.skip


def _kill_workers():
    """At exit (also after a crash): loader workers ignore SIGTERM, so multiprocessing's own exit handler,
    which sends SIGTERM and then waits for them, would wait forever. SIGKILL them first."""
    try:  # torch's SIGCHLD handler would raise on these deaths and leave the rest alive
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread: the SIGTERM watcher, which exits at once anyway
        pass
    children = multiprocessing.active_children()
    for p in children:
        p.kill()
    for p in children:
        p.join(1)


def _worker_init(worker_id):
    """Loader workers leave SIGTERM to the main process, which saves a checkpoint before exiting
    (a scheduler's SIGTERM reaches the whole process group), and die at once with their parent
    (Linux PR_SET_PDEATHSIG = 1: SIGKILL when the parent exits, even by kill -9)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)


atexit.register(_kill_workers)  # registered after multiprocessing's handler, so it runs before it


def make_loader(ds, transform, batch_size, train=True, seed=0, rank=0, world=1, num_workers=None,
                with_index=False, pin=True, batched=None, device="cpu"):
    """Pre-training (train=True: shuffle, drop_last) or extraction loader. With a `batched` view (BatchCrop,
    ...): a MemoryLoader on `device` for a dataset that memory_images holds, a FileLoader for an ImageFolder
    (ImageNet, large folders). Else (no batched view, or a dataset that is neither: none of --data's) the
    per-image PIL `transform` in a DataLoader over SeededView(ds, transform) with worker processes."""
    sampler = EpochSampler(len(ds), shuffle=train, seed=seed, rank=rank, world=world, drop_last=train)
    mem = memory_images(ds) if batched is not None else None
    if mem is not None:
        return MemoryLoader(mem, batched, batch_size, sampler, seed, torch.device(device), with_index, train)
    files = image_files(ds) if batched is not None else None
    if files is not None:
        return FileLoader(files, batched, batch_size, sampler, seed, torch.device(device), with_index, train,
                          num_workers)
    num_workers = default_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        SeededView(ds, transform, seed, with_index), batch_size=batch_size, sampler=sampler,
        num_workers=num_workers, pin_memory=pin and torch.cuda.is_available(), drop_last=train,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init)


# ----------------------------------------------------------------------------
# Pictures

def save_picture(path, rows, labels, min_tile=96, pad=2):
    """The one picture layout of every method's --vis_every PNG: a column per image, a row per stage, the
    stage's name on the left. rows: (n, C, h, w) tensors in [0, 1] (C = 1 or 3, the same n, h, w);
    small tiles are upscaled (nearest, so patches stay sharp) to at least min_tile pixels."""
    from PIL import ImageDraw
    n, (h, w) = rows[0].shape[0], rows[0].shape[-2:]
    s = max(1, math.ceil(min_tile / min(h, w)))
    tiles = [F.interpolate(r.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1), scale_factor=s,
                           mode="nearest")
             for r in rows]                                             # (n, 3, s*h, s*w) each
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 8 + max(int(draw.textlength(label)) for label in labels)
    canvas = Image.new("RGB", (margin + n * (s * w + pad), len(rows) * (s * h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (t, label) in enumerate(zip(tiles, labels)):
        top = i * (s * h + pad)
        draw.text((4, top + s * h // 2 - 5), label, fill="black")
        for j, tile in enumerate((t * 255).round().byte().permute(0, 2, 3, 1).numpy()):
            canvas.paste(Image.fromarray(tile), (margin + j * (s * w + pad), top))
    canvas.save(path)


class FixedKeys:
    """The sampler interface MemoryLoader reads, for a fixed list of keys (B,) int64."""

    def __init__(self, keys):
        self.fixed = keys

    def keys(self):
        return self.fixed

    def __iter__(self):
        return iter(self.fixed.tolist())

    def __len__(self):
        return len(self.fixed)


class MemoryLoader:
    """Batches of an in-memory set made by a batched view on `device`, no workers: the same (views, labels)
    or (views, labels, index) tuples as make_loader's DataLoader; views and labels on the device, the index
    (B,) on the CPU like a DataLoader's. The augmentation of key k (from the EpochSampler) is
    batched(images, Draws(seed, k)): independent of the batch it is in, of the rank and of a resume."""

    def __init__(self, mem, batched, batch_size, sampler, seed, device, with_index=False, drop_last=True):
        self.mem, self.batched, self.batch_size, self.sampler = mem.to(device), batched, batch_size, sampler
        self.seed, self.device, self.with_index, self.drop_last = seed, device, with_index, drop_last

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        keys = self.sampler.keys()                                           # (n_rank,) on the CPU
        at_images, at_device = keys.to(self.mem.images.device), keys.to(self.device)
        for s in range(0, len(self) * self.batch_size, self.batch_size):
            k = at_device[s:s + self.batch_size]
            i = at_images[s:s + self.batch_size] % self.mem.n
            x = self.batched(self.mem.batch(i, self.device), Draws(self.seed, k))
            y = self.mem.labels[i].to(self.device, non_blocking=True)
            yield (x, y, keys[s:s + self.batch_size] % self.mem.n) if self.with_index else (x, y)


# ----------------------------------------------------------------------------
# Probe: frozen features -> linear head sweep + kNN

def world_info():
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


@torch.no_grad()
def extract(encoder, ds, transform, batch_size=256, device="cpu", num_workers=None, desc="features",
            batched=None):
    """Features (n, D) float32 and labels (n,) of the whole dataset, each rank a strided shard,
    gathered on every rank. A progress bar on rank 0 when stderr is a terminal. With a `batched` view
    (BatchEval) an in-memory set is read in batches on the device, an ImageFolder by a FileLoader; else
    through `transform` in workers."""
    from tqdm import tqdm
    rank, world = world_info()
    per = math.ceil(len(ds) / world)
    mem = memory_images(ds) if batched is not None else None
    if mem is not None:
        shard = FixedKeys(torch.arange(rank, len(ds), world))
        loader = MemoryLoader(mem, batched, batch_size, shard, 0, torch.device(device), drop_last=False)
    elif batched is not None and image_files(ds) is not None:
        shard = FixedKeys(torch.arange(rank, len(ds), world))
        loader = FileLoader(image_files(ds), batched, batch_size, shard, 0, torch.device(device),
                            drop_last=False, num_workers=num_workers)
    else:
        loader = torch.utils.data.DataLoader(
            SeededView(ds, transform), batch_size=batch_size,
            num_workers=default_workers() if num_workers is None else num_workers,
            sampler=list(range(rank, len(ds), world)), pin_memory=str(device).startswith("cuda"),
            worker_init_fn=_worker_init)
    encoder.eval().to(device)
    amp = (torch.autocast("cuda", torch.bfloat16) if str(device).startswith("cuda")
           else torch.autocast("cpu", enabled=False))
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=rank != 0 or not sys.stderr.isatty(), leave=False):
        with amp:
            feats.append(encoder(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    f, y = torch.cat(feats), torch.cat(labels)                          # (n_rank, D), (n_rank,)
    if world > 1:  # pad to equal length, gather, then undo the striding
        pad = per - len(y)
        f, y = torch.cat([f, f[:pad]]), torch.cat([y, y[:pad] * 0 - 1])
        fs, ys = [torch.empty_like(f) for _ in range(world)], [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(fs, f.contiguous())
        dist.all_gather(ys, y.contiguous())
        f, y = torch.stack(fs, 1).flatten(0, 1), torch.stack(ys, 1).flatten(0, 1)  # interleave ranks
        f, y = f[: len(ds)], y[: len(ds)]
    return f.cpu(), y.cpu()


def knn(train_f, train_y, test_f, test_y, k=20, T=0.07, num_classes=None, chunk=1024):
    """Weighted kNN top-1 (DINO protocol): cosine similarity, votes exp(sim / T) of the k nearest."""
    C = num_classes or int(train_y.max()) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_y))
    correct = 0
    for s in range(0, len(test_y), chunk):
        sim, nn_idx = (test_f[s:s + chunk] @ train_f.T).topk(k, dim=1)          # (c, k)
        votes = torch.zeros(len(sim), C).scatter_add_(1, train_y[nn_idx], (sim / T).exp())
        correct += (votes.argmax(1) == test_y[s:s + chunk]).sum().item()
    return 100.0 * correct / len(test_y)


def linear_probe(train_f, train_y, test_f, test_y, lrs=(0.01, 0.03, 0.1, 0.3, 1.0), epochs=100,
                 batch_size=256, num_classes=None, seed=0):
    """BatchNorm (no affine) + Linear on cached features, one head per learning rate trained at once
    (SGD momentum 0.9, cosine). Returns the best top-1 on the test split and the lr that gave it.
    The L heads are one (L, D, C) weight updated by hand (torch.optim.SGD's update: buf = 0.9 buf + grad,
    w -= lr buf) so that a step is a few batched ops, not L small ones: seconds on a CPU, not minutes."""
    C = num_classes or int(train_y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    n, D = train_f.shape
    bn = nn.BatchNorm1d(D, affine=False)
    w = torch.stack([torch.randn(D, C, generator=g) * 0.01 for _ in lrs]).requires_grad_()     # (L, D, C)
    bias = torch.zeros(len(lrs), 1, C, requires_grad=True)                                   # (L, 1, C)
    lr0 = torch.tensor(lrs, dtype=torch.float32).view(-1, 1, 1)
    bufs = [torch.zeros_like(w), torch.zeros_like(bias)]
    threads = torch.get_num_threads()
    if D <= 1024:  # ops this small gain nothing from threads, and on a busy CPU threads spin (40x slower)
        torch.set_num_threads(1)
    try:
        _sgd_heads(train_f, train_y, bn, w, bias, lr0, bufs, epochs, batch_size, g)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        z = bn.eval()(test_f)
        pred = torch.baddbmm(bias, z.expand(len(lrs), -1, -1), w).argmax(2)                  # (L, n_test)
        acc = (100.0 * (pred == test_y).float().mean(1)).tolist()
    best = max(range(len(lrs)), key=lambda i: acc[i])
    return acc[best], lrs[best]


def _sgd_heads(train_f, train_y, bn, w, bias, lr0, bufs, epochs, batch_size, g):
    """linear_probe's training loop: epochs of shuffled batches, the cosine schedule per step."""
    n, L = len(train_f), len(lr0)
    steps, step = epochs * max(1, n // batch_size), 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            b = perm[s:s + batch_size]
            z = bn.train()(train_f[b])                                    # (B, D) shared, parameter-free
            logits = torch.baddbmm(bias, z.expand(L, -1, -1), w)          # (L, B, C)
            y = train_y[b].repeat(L)                                      # (L * B,)
            loss = F.cross_entropy(logits.flatten(0, 1), y, reduction="sum") / len(b)  # sum of the L means
            gw, gb = torch.autograd.grad(loss, (w, bias))
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))      # cosine, per step
            with torch.no_grad():
                for p, buf, grad in ((w, bufs[0], gw), (bias, bufs[1], gb)):
                    buf.mul_(0.9).add_(grad)
                    p.sub_(lr * buf)
            step += 1


def probe(encoder, data, data_dir, img_size, device="cpu", batch_size=256, num_workers=None,
          cache=None, epochs=100, synthetic_size=2000, split="test"):
    """Frozen-feature evaluation of `encoder(images) -> (B, D)`: linear top-1 (best of the lr sweep)
    and kNN top-1 (k=20, T=0.07). split 'test': train on the labelled train split, score the test split;
    'val': train on the rest of the train split, score its held-out val part (for choices).
    Features are cached in `cache` (a .pt path) when given."""
    if split not in ("test", "val"):
        die(f"unknown split {split!r}; choose test or val")
    if cache and os.path.isfile(cache):
        tr_f, tr_y, te_f, te_y = torch.load(cache, weights_only=True)
    else:
        tf = eval_transform(data, img_size)
        kw = dict(batch_size=batch_size, device=device, num_workers=num_workers,
                  batched=BatchEval(data, img_size))
        fit, score = ("probe-train", False) if split == "test" else ("probe-rest", "val")
        tr_f, tr_y = extract(encoder, build_dataset(data, data_dir, fit, synthetic_size=synthetic_size,
                                                    img_size=img_size), tf, **kw)
        te_f, te_y = extract(encoder, build_dataset(data, data_dir, score, synthetic_size=synthetic_size,
                                                    img_size=img_size), tf, **kw)
        if cache and world_info()[0] == 0:  # written whole or not at all: a kill mid-save leaves no cache
            torch.save((tr_f, tr_y, te_f, te_y), cache + ".tmp")
            os.replace(cache + ".tmp", cache)
    C = DATASETS[data][1] or int(tr_y.max()) + 1
    lin, lr = linear_probe(tr_f, tr_y, te_f, te_y, epochs=epochs, num_classes=C)
    return {"linear_top1": lin, "linear_lr": lr, "knn_top1": knn(tr_f, tr_y, te_f, te_y, num_classes=C),
            "n_train": len(tr_y), "n_test": len(te_y), "dim": tr_f.shape[1]}


# ----------------------------------------------------------------------------
# Online kNN during pre-training

KNN_BANK = 10000  # online kNN: at most this many bank images (train minus val) and val queries, evenly spaced
_knn_sets = {}    # (data, data_dir, img_size) -> (bank, queries): built once per process


def knn_sets(data, data_dir, img_size):
    """The online kNN's fixed bank (an evenly spaced subset of the train split minus val) and its
    queries (the val split, subsampled the same way past KNN_BANK images)."""
    key = (data, data_dir, img_size)
    if key not in _knn_sets:
        full = build_dataset(data, data_dir, "probe-train", img_size=img_size)
        rest, val = val_split(data, len(full))
        even = lambda idx: idx[::max(1, len(idx) // KNN_BANK)][:KNN_BANK]
        _knn_sets.clear()
        _knn_sets[key] = (torch.utils.data.Subset(full, even(rest)), torch.utils.data.Subset(full, even(val)))
    return _knn_sets[key]


def online_knn(cfg, step, steps_per_epoch, stop, build_encoder, device, log):
    """At the end of every cfg.knn_every-th epoch and of the run: weighted kNN top-1 on the val split
    of the encoder build_encoder() gives (the module load_encoder would give for the live weights),
    logged as `knn <top-1>` in log.txt and metrics.jsonl. Under a forked RNG with its own loaders, so
    the training stream (weights, masks, augmentations, loader order) is the one without it; every
    rank extracts its shard, rank 0 scores. Returns the seconds it took (0 when not due)."""
    if not cfg.knn_every or (step < stop and step % (cfg.knn_every * steps_per_epoch)):
        return 0.0
    t0 = time.time()
    bank, queries = knn_sets(cfg.data, cfg.data_dir, cfg.img_size)
    tf = eval_transform(cfg.data, cfg.img_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        encoder = build_encoder()                      # a copy: the live modules keep their train mode
        kw = dict(batch_size=256, device=str(device), num_workers=cfg.num_workers, desc="knn",
                  batched=BatchEval(cfg.data, cfg.img_size))  # batches on the device (in memory or files)
        bank_f, bank_y = extract(encoder, bank, tf, **kw)
        val_f, val_y = extract(encoder, queries, tf, **kw)
        del encoder
    if world_info()[0] == 0:
        top1 = knn(bank_f, bank_y, val_f, val_y, num_classes=DATASETS[cfg.data][1] or None)
        secs = time.time() - t0
        log.print(f"knn {top1:.2f} | step {step} | ep {step / steps_per_epoch:.1f} | val {len(queries)} "
                  f"vs bank {len(bank)} | {secs:.1f} s")
        log.metrics({"step": step, "epoch": round(step / steps_per_epoch, 2), "knn": top1, "knn_s": secs,
                     "knn_val": len(queries), "knn_bank": len(bank)})
    return time.time() - t0


# ----------------------------------------------------------------------------
# Benchmark: the model step alone (--benchmark N), apart from the input pipeline

BENCHMARK_WARMUP = 3   # untimed steps first: compilation, allocator and optimizer-state set-up
COMPILE = {"dynamic": False}  # --compile's torch.compile options: one static graph per input shape (a phase,
# a crop size), never one per step; the tests add backend="eager" (no C++ compiler)


def benchmark_images(n, size, device, seed=0):
    """--benchmark's training set: n random uint8 images (n, size, size, 3) made on `device` and held as an
    in-memory set, so make_loader augments them there with the method's own batched view:
    no files, no workers."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device, generator=g)
    return MemoryImages(images, torch.zeros(n, dtype=torch.long, device=device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(label, batches, micro_step, flops_fn, steps, images_per_step, device,
              peak_tflops, log, note=""):
    """Times `steps` optimizer steps after BENCHMARK_WARMUP untimed ones, with a device synchronisation at the
    two ends only. Step i is micro_step(batch, micro, i) over the fixed micro-batches `batches` (the training
    loop's own step function). flops_fn(out): FLOPs of one micro-batch from the last micro_step output,
    counted after the timing. peak_tflops: the GPU's dense peak (0 = unknown: MFU n/a). Prints one line,
    `benchmark | label | n steps | img/s | ms/step | TFLOP/s | MFU | peak mem` (+ note);
    returns the figures."""
    def step(i):
        for micro, batch in enumerate(batches):
            out = micro_step(batch, micro, i)
        return out

    for i in range(BENCHMARK_WARMUP):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steady step's peak, not compilation's
    t0 = time.perf_counter()
    for i in range(BENCHMARK_WARMUP, BENCHMARK_WARMUP + steps):
        out = step(i)
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB)
    flops = flops_fn(out) * len(batches)
    r = {"label": label, "steps": steps, "img_s": images_per_step * steps / seconds,
         "ms": 1000 * seconds / steps, "flops": flops, "tflops": flops * steps / seconds / 1e12,
         "peak_mem_gb": peak_mem}
    r["mfu"] = 100 * r["tflops"] / peak_tflops if peak_tflops else None
    log.print(f"benchmark | {label} | {steps} steps | {r['img_s']:.1f} img/s | {r['ms']:.1f} ms/step | "
              f"{r['tflops']:.3g} TFLOP/s | MFU " + (f"{r['mfu']:.1f}%" if peak_tflops else "n/a")
              + f" | peak mem {peak_mem:.2f} GB" + (f" | {note}" if note else ""))
    return r
