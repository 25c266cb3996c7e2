"""Data and evaluation shared by the five method files: datasets, MIM augmentations, resumable
distributed loaders, and the frozen-feature probe (linear head sweep + weighted kNN).

Nothing here knows about a method; each method file imports only this module.
"""
import atexit
import ctypes
import dataclasses
import gzip
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
from PIL import Image, ImageFilter
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
                "batch_size": at_least(1), "blr": above(0), "weight_decay": at_least(0), "warmup_epochs": at_least(0),
                "num_workers": at_least(0), "seed": at_least(0), "log_every": at_least(1),
                "device": one_of("auto", "cuda", "cpu"), "vis_every": at_least(0), "save_every_min": at_least(0),
                "accum_iter": at_least(1), "knn_every": at_least(0)}


def check_fields(cfg, rules):
    """Every number finite, every field with a rule inside it, out_dir a folder (or new): a one-line error
    naming the flag otherwise. (A missing data folder is reported by build_dataset, before anything is written.)"""
    for name, v in dataclasses.asdict(cfg).items():
        if isinstance(v, float) and not math.isfinite(v):
            die(f"--{name} {v} is not a finite number")
        ok, want = {**SHARED_RULES, **rules}.get(name, (None, ""))
        if ok is not None and not ok(v):
            die(f"unknown --{name} {v}; choose {want}" if isinstance(v, str) else
                f"--{name} {v} is out of range: expected {want}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"--out_dir {cfg.out_dir} is a file; pass a folder")


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
            img, lab = (os.path.join(d, f"{prefix}-{k}-idx{n}-ubyte{ext}") for k, n in (("images", 3), ("labels", 1)))
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
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if os.path.isfile(os.path.join(root, c, f)))
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
    """Keep the first images of every class in ImageFolder order: a fraction (< 1) or a count (>= 1;
    AttMask's "20%" ImageNet runs keep the first 260 of every class)."""
    by_class = {}
    for i, y in enumerate(ds.targets):
        by_class.setdefault(y, []).append(i)
    keep = sorted(i for ids in by_class.values() for i in ids[:int(subset) if subset >= 1 else max(1, int(len(ids) * subset))])
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
    and 'probe-rest' = the rest of it; False = the evaluation (test) split."""
    if name not in DATASETS:
        die(f"unknown --data {name}; choose one of {', '.join(DATASETS)}")
    if train in ("val", "probe-rest"):
        full = build_dataset(name, data_dir, "probe-train", subset, synthetic_size, img_size)
        rest, val = val_split(name, len(full))
        return torch.utils.data.Subset(full, val if train == "val" else rest)
    pretrain = train is True
    existed = os.path.isdir(data_dir)
    try:
        if name == "synthetic":
            return Synthetic(synthetic_size if train else synthetic_size // 4, img_size, seed=0 if train else 1)
        if name == "fashion-mnist":
            return fashion_mnist(data_dir, bool(train))
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cls(data_dir, train=bool(train), download=True)
        if name == "stl10":
            split = ("train+unlabeled" if pretrain else "train") if train else "test"
            return datasets.STL10(data_dir, split=split, download=True)
        if name == "tiny-imagenet":
            return datasets.ImageFolder(os.path.join(data_dir, "train")) if train else tiny_imagenet_val(data_dir)
        ds = datasets.ImageFolder(os.path.join(data_dir, "train" if train else "val"))
        return per_class_subset(ds, subset) if subset and train else ds
    except SystemExit:
        raise
    except Exception as e:  # offline download, missing folder, empty folder
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)  # a failed download leaves no empty folder behind
        die(f"cannot load --data {name} from --data_dir {data_dir} ({type(e).__name__}: {str(e)[:120]}); "
            "put the files there (see README) or use --data synthetic")


# ----------------------------------------------------------------------------
# Augmentations

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


def mim_transform(data, img_size, scale=(0.2, 1.0), color=False):
    """One RandomResizedCrop (bicubic) + flip view, the MAE recipe; optional colour jitter."""
    aug = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip()]
    if color:
        aug += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    return T.Compose(aug + [T.ToTensor(), normalize(data)])


def eval_transform(data, img_size):
    """Resize + centre crop (ratio 224/256 at ImageNet-like sizes, identity at native size)."""
    native = DATASETS[data][0]
    whole = (img_size == native and native <= 64) or (data == "folder" and native <= 96)  # small: no crop margin
    resize = img_size if whole else int(round(img_size * 256 / 224))
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

    def __init__(self, data, img_size, scale=(0.2, 1.0), color=False):
        self.rrc = T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
        self.color = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                T.RandomGrayscale(0.2)]) if color else None
        self.post = T.Compose([T.ToTensor(), normalize(data)])

    def geometry(self, img):
        W, H = img.size
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.rrc.scale, self.rrc.ratio)
        flip = bool(torch.rand(()) < 0.5)
        out = img.resize((self.rrc.size[1], self.rrc.size[0]), Image.BICUBIC, box=(j, i, j + w, i + h))
        out = out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out
        return out, torch.tensor([i / H, j / W, h / H, w / W, float(flip)])

    def __call__(self, img):
        out, box = self.geometry(img)
        return self.post(self.color(out) if self.color else out), box


class SharedCropTwoColors(CropWithBox):
    """One crop + flip shared by two views, colour jitter drawn independently per view (ExtreMA)."""

    def __init__(self, data, img_size, scale=(0.2, 1.0)):
        super().__init__(data, img_size, scale, color=True)

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

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        idx = torch.cat([idx, idx[: self.per_rank * self.world - self.n]]) if len(idx) < self.per_rank * self.world else idx
        mine = idx[self.rank: self.per_rank * self.world: self.world][self.skip:]
        return iter((mine + self.epoch * self.n).tolist())

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
                with_index=False, pin=True):
    """Pre-training (train=True: shuffle, drop_last) or extraction loader over SeededView(ds)."""
    sampler = EpochSampler(len(ds), shuffle=train, seed=seed, rank=rank, world=world, drop_last=train)
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
    tiles = [F.interpolate(r.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1), scale_factor=s, mode="nearest")
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


# ----------------------------------------------------------------------------
# Probe: frozen features -> linear head sweep + kNN

def world_info():
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


@torch.no_grad()
def extract(encoder, ds, transform, batch_size=256, device="cpu", num_workers=None, desc="features"):
    """Features (n, D) float32 and labels (n,) of the whole dataset, each rank a strided shard,
    gathered on every rank. A progress bar on rank 0 when stderr is a terminal."""
    from tqdm import tqdm
    rank, world = world_info()
    per = math.ceil(len(ds) / world)
    loader = torch.utils.data.DataLoader(
        SeededView(ds, transform), batch_size=batch_size,
        num_workers=default_workers() if num_workers is None else num_workers,
        sampler=list(range(rank, len(ds), world)), pin_memory=str(device).startswith("cuda"),
        worker_init_fn=_worker_init)
    encoder.eval().to(device)
    amp = torch.autocast("cuda", torch.bfloat16) if str(device).startswith("cuda") else torch.autocast("cpu", enabled=False)
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
    (SGD momentum 0.9, cosine). Returns the best top-1 on the test split and the lr that gave it."""
    C = num_classes or int(train_y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    n, D = train_f.shape
    bn = nn.BatchNorm1d(D, affine=False)
    heads = nn.ModuleList(nn.Linear(D, C) for _ in lrs)
    for h in heads:
        nn.init.normal_(h.weight, std=0.01, generator=g), nn.init.zeros_(h.bias)
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, lrs)], momentum=0.9)
    steps = epochs * max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            b = perm[s:s + batch_size]
            z = bn.train()(train_f[b])                                    # shared, parameter-free
            loss = sum(F.cross_entropy(h(z), train_y[b]) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        z = bn.eval()(test_f)
        acc = [100.0 * (h(z).argmax(1) == test_y).float().mean().item() for h in heads]
    best = max(range(len(lrs)), key=lambda i: acc[i])
    return acc[best], lrs[best]


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
        kw = dict(batch_size=batch_size, device=device, num_workers=num_workers)
        fit, score = ("probe-train", False) if split == "test" else ("probe-rest", "val")
        tr_f, tr_y = extract(encoder, build_dataset(data, data_dir, fit, synthetic_size=synthetic_size,
                                                    img_size=img_size), tf, **kw)
        te_f, te_y = extract(encoder, build_dataset(data, data_dir, score, synthetic_size=synthetic_size,
                                                    img_size=img_size), tf, **kw)
        if cache and world_info()[0] == 0:
            torch.save((tr_f, tr_y, te_f, te_y), cache)
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
        kw = dict(batch_size=256, device=str(device), num_workers=cfg.num_workers, desc="knn")
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
