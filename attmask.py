"""AttMask: hide from the student what the teacher looks at (attention-guided masked image modeling).
Kakogeorgiou, Gidaris, Psomas, Avrithis, Bursuc, Karantzalos, Komodakis. "What to Hide from Your Students:
Attention-Guided Masked Image Modeling", ECCV 2022, arXiv 2203.12719. Official code: gkakogeorgiou/attmask.

iBOT self-distillation: a student ViT sees 2 global crops, some patch embeddings replaced by a learned mask
token, plus unmasked local crops; an EMA teacher sees the unmasked global crops. The student matches the
teacher's centred, sharpened softmax over K prototypes on [CLS] across views (DINO loss) and on each hidden
patch of the same view (iBOT loss). AttMask picks WHICH patches to hide from the teacher's last-block
[CLS]->patch attention, free with the targets: High hides the most attended, Hint (default, the paper's
best) gives a few top ones back as hints, Low hides the least attended (a control).

Differs from the others in:
  - target: an EMA teacher's distributions over K prototypes ([CLS] and patches); multi-crop input;
  - mask from the teacher's attention, one ratio per step, each global crop masked w.p. 0.5, mask token in
    place (no token dropping); --mask_mode random | block is iBOT (the paper's baseline);
  - cosine weight decay and teacher momentum, per-tensor gradient clipping, last layer frozen in epoch 0.

Deviations from the official code:
  - shared ViT (fixed sin-cos positions for any grid, xavier init); bf16 autocast, not fp16 + GradScaler,
    with the head's last layer (logits / 0.04) and the softmaxes in fp32 (official: fp16);
  - the mask ratio r and the hint ratio r' (two independent draws, as official) from (seed, step), not
    Python's global RNG (equal on all ranks and on resume); hints skip an unused torch.rand draw; random /
    block masks made on the device, not in the loader; one teacher-temperature schedule for [CLS] and
    patches (equal in the paper runs); probe: the teacher's last 4 [CLS];
  - zero hints allowed: where floor(N s r') = 0 (8x8 grids with r' < 0.16) nothing is revealed; the
    official Hint code asks torch.multinomial for 0 samples there and stops, so it cannot run on 8x8 grids;
  - per-rank seeds: masks and drop path draw from seed + rank (official: every rank seeded the same, so
    the ranks' torch draws repeat each other); initial weights and r, r' are equal on all ranks in both;
  - fixed: the mask grid follows the input size (official: 224 // patch); the encoder returns features
    only (official eval paths get a (features, attention) pair);
  - ImageNet preset 8 GPUs x 30 = the paper's 240 images per step (4 x 60); --accum_iter is not in the
    official code and is not exactly a bigger batch: the centres move after every micro-batch.
  - in-memory sets (all but ImageNet and large folders): multi-crop in batches on the device (common.py),
    bicubic by grid sampling (cubic a = -0.75, PIL's -0.5), a box larger than its output (local crops of
    big images) bilinear with area averaging; colour ops in float (no uint8 rounding between them); the
    blur a true Gaussian with sigma = DINO's radius (PIL approximates it with box filters);
  - ImageNet and large folders: each image decoded once per step for all 12 crops (CPU: at a reduced JPEG
    scale when every crop allows it; CUDA: nvJPEG), each crop resized on its own (PIL bicubic on the CPU,
    antialiased interpolation on CUDA), then the batched ops above (common.py).

Run:
    python attmask.py                                                      # ~1 min CPU run, synthetic data
    python attmask.py --data cifar10 --mask_mode random                    # iBOT baseline, same recipe
    torchrun --nproc_per_node=8 attmask.py --data imagenet --data_dir /path/to/imagenet
"""
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import die

METHOD = "attmask"

# ----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # >>> shared: config
    data: str = "synthetic"        # dataset, see common.DATASETS; picks the preset below
    data_dir: str = "data"         # where the dataset lives (or downloads to, when online)
    subset: float = 0              # pre-train on the first N (>= 1) or a fraction (< 1) of each class;
                                   # 0 = all
    out_dir: str = ""              # run folder; default out/<method>-<data>
    model: str = ""                # backbone name (see VIT_SIZES); preset picks
    img_size: int = 0              # input resolution in pixels; preset picks
    patch_size: int = 0            # ViT patch size in pixels; preset picks
    epochs: int = 0                # length of the schedules; preset picks
    max_steps: int = 0             # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 0            # images per GPU per micro-batch; preset picks
    accum_iter: int = 1            # micro-batches per optimizer step (MAE): batch x GPUs x this images a step
    blr: float = 0.0               # base learning rate; lr = blr x effective batch / 256 (DTM: sqrt rule)
    weight_decay: float = 0.0      # AdamW weight decay; preset picks
    warmup_epochs: float = 0.0     # linear lr warm-up; preset picks
    num_workers: int = common.default_workers()  # data loader processes per GPU (4, at most the CPU cores)
    seed: int = 0                  # initial weights from seed on every rank; rank r then draws from seed + r
    compile: bool = False          # torch.compile the model (CUDA)
    log_every: int = 20            # steps between log lines
    device: str = "auto"           # auto | cuda | cpu
    vis_every: int = 0             # steps between visualisation PNGs in out_dir, and one at the end (0 = off)
    knn_every: int = 0             # epochs between online kNN top-1 on val (0 = off; small data: epochs / 10)
    save_every_min: float = 30.0   # minutes between mid-epoch checkpoints (0 = off): a kill -9 loses minutes
    peak_tflops: float = 0.0       # GPU dense bf16 peak for the summary's MFU (0 = from the device name)
    benchmark: int = 0             # time N optimizer steps on device-made images, no files (0 = train)
    # <<< shared: config
    # method: AttMask (paper values from the official launch commands)
    mask_mode: str = "attmask_hint"  # attmask_hint | attmask_high | attmask_low | random | block (iBOT)
    pred_ratio: float = 0.3        # mean masking ratio; r ~ U[0.3 - 0.2, 0.3 + 0.2] once per step
    pred_ratio_var: float = 0.2    # half-width of the ratio's range
    masking_prob: float = 0.5      # chance that a global crop is masked at all (per crop; attmask modes)
    show_max: float = 0.1          # Hint: reveal floor(N*0.1*r) tokens drawn from the top floor(N*0.1)
    local_crops: int = 10          # local crops per image (paper: 10; 6 on the 20% subset)
    local_size: int = 96           # local crop size in pixels (paper: 96); scales (0.25, 1) / (0.05, 0.25)
    out_dim: int = 8192            # K prototypes of the shared head (paper: 8192)
    head_hidden: int = 2048        # head MLP width (bottleneck 256)
    freeze_last_layer: int = 1     # epochs during which the last layer gets no update (paper: 1)
    drop_path: float = 0.1         # student stochastic depth (teacher: none)
    teacher_temp: float = 0.07     # teacher temperature ([CLS] and patches) after the warm-up from 0.04
    warmup_teacher_temp_epochs: int = 30  # epochs of that linear warm-up (student temperature: 0.1)
    center_momentum: float = 0.9   # EMA of the two centers
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, cosine to 1 (20% subset: 0.99)
    weight_decay_end: float = 0.4  # weight decay follows a cosine from --weight_decay to this
    clip_grad: float = 3.0         # max grad norm of EACH parameter tensor (0 = off)

def preset(data: str, given: dict) -> dict:
    """Per-dataset recipe: ImageNet = the paper's (ViT-S/16, 240 images per step: 4 GPUs x 60 there, 8 x 30
    here), small data = the spec's scaled one."""
    paper = dict(model="vit_small", img_size=224, patch_size=16, epochs=100, batch_size=30, blr=5e-4,
                 weight_decay=0.04, warmup_epochs=10)
    small = {**paper, "model": "vit_tiny", "img_size": 32, "patch_size": 4, "epochs": 200, "batch_size": 256,
             "local_crops": 6, "local_size": 16, "out_dim": 4096}
    return {
        "imagenet": paper,
        "cifar10": small, "cifar100": small, "fashion-mnist": small,
        "stl10": {**small, "img_size": 96, "patch_size": 8, "local_size": 48},
        "tiny-imagenet": {**small, "img_size": 64, "patch_size": 8, "local_size": 32},
        "folder": {**small, "model": "vit_small", "img_size": 224, "patch_size": 16, "local_size": 96},
        # the bare command: about a minute on 2 CPU cores
        "synthetic": {**small, "model": "vit_micro", "epochs": 2, "batch_size": 32, "blr": 1e-3,
                      "warmup_epochs": 0.5, "local_crops": 2, "out_dim": 1024, "head_hidden": 256,
                      "warmup_teacher_temp_epochs": 1, "vis_every": 50},
    }[data]

def check_config(cfg: Config):
    """Every flag in its range and the combinations this file needs, at parse time:
    one line, nothing written."""
    c = common
    c.check_fields(cfg, {
        "model": c.one_of(*VIT_SIZES), "mask_mode": c.one_of(*MASK_MODES), "pred_ratio": c.fraction(),
        "pred_ratio_var": c.at_least(0), "masking_prob": c.between(0, 1), "show_max": c.between(0, 1),
        "local_crops": c.at_least(0), "local_size": c.above(0), "out_dim": c.at_least(1),
        "head_hidden": c.at_least(1), "freeze_last_layer": c.at_least(0),
        "drop_path": c.between(0, 1, open_hi=True), "teacher_temp": c.above(0),
        "warmup_teacher_temp_epochs": c.at_least(0), "center_momentum": c.between(0, 1),
        "momentum_teacher": c.between(0, 1), "weight_decay_end": c.at_least(0), "clip_grad": c.at_least(0)})
    for name, size in (("img_size", cfg.img_size), ("local_size", cfg.local_size if cfg.local_crops else 0)):
        if size % cfg.patch_size:
            die(f"--{name} {size} is not a multiple of --patch_size {cfg.patch_size}; pick sizes that divide")
    if cfg.pred_ratio - cfg.pred_ratio_var < 0 or cfg.pred_ratio + cfg.pred_ratio_var >= 1:
        die(f"--pred_ratio {cfg.pred_ratio} +- --pred_ratio_var {cfg.pred_ratio_var} leaves [0, 1); "
            "lower --pred_ratio_var")

# >>> shared: parse_config
def parse_config(argv=None) -> Config:
    """`--key value` or `--key=value` for every Config field; bare `--flag` sets a bool. The preset of
    --data fills every field not given; unknown flags and bad types are one-line errors."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    args, given = list(sys.argv[1:] if argv is None else argv), {}
    while args:
        arg = args.pop(0)
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if key not in fields:
            die(f"unknown argument {arg!r}; valid flags: " + " ".join(f"--{k}" for k in fields))
        typ = fields[key]
        if not eq:
            val = ("1" if typ is bool and (not args or args[0].startswith("--"))
                   else (args.pop(0) if args else ""))
        try:
            if typ is bool:
                given[key] = {"1": True, "true": True, "0": False, "false": False}[val.lower()]
            else:
                given[key] = typ(val)
        except (ValueError, KeyError):
            die(f"--{key} expects a {typ.__name__}, got {val!r}")
    data = given.get("data", Config.data)
    if data not in common.DATASETS:
        die(f"unknown --data {data}; choose one of {', '.join(common.DATASETS)}")
    recipe = data
    if data == "folder":  # the recipe of the nearest image size: small images get the small-data one
        folder = given.get("data_dir", Config.data_dir)
        if not os.path.isdir(os.path.join(folder, "train")):
            die(f"--data folder needs --data_dir with a train/ folder of class subfolders; {folder} has none")
        size = common.describe_folder(folder)  # its native size, mean and std
        size = given.get("img_size") or size
        recipe = ("cifar10" if size <= 48 else "tiny-imagenet" if size <= 80 else
                  "stl10" if size <= 160 else "folder")
        if not os.path.isdir(os.path.join(folder, "val")) and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {folder} has no val/ folder: pre-training and --knn_every work (val from train/), "
                  "but eval_linear.py's test split needs val/<class>/<images> (or use its --split val)")
    cfg = Config(**{**preset(recipe, given), **given})
    if "knn_every" not in given and data not in ("synthetic", "imagenet", "folder"):  # small data: online kNN
        cfg.knn_every = max(1, cfg.epochs // 10)  # ten times a run, < 10% of its time
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"{METHOD}-{data}")
    check_config(cfg)  # ranges and combinations: one line and nothing written when a flag is wrong
    return cfg
# <<< shared: parse_config

# ----------------------------------------------------------------------------
# Backbone

# >>> shared: vit
VIT_SIZES = {  # name: (width D, depth L, heads); pico/micro are for tests and CPU smoke runs
    "vit_pico": (32, 2, 2), "vit_micro": (96, 4, 3), "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def sincos_pos_embed(dim, gh, gw, device=None):
    """Fixed 2-D sin-cos positions (MAE layout): first half of the channels encodes the column, second
    half the row; each half is [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                                indexing="ij")

    def enc(p):  # (N,) -> (N, dim/2)
        a = p.flatten().double()[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)
    return torch.cat([enc(cols), enc(rows)], dim=1).float()          # (gh*gw, dim)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn=False):
        B, T, D = x.shape
        # 3 x (B, h, T, hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)                 # (B, h, T, hd)
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))         # (B, T, D)
        if not return_attn:
            return out
        # the first query's attention row ([CLS] -> all tokens), recomputed cheaply in fp32 (autocast off)
        with torch.autocast(x.device.type, enabled=False):
            attn = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * (D // self.heads) ** -0.5
        return out, attn.softmax(-1)[:, :, 0]                         # (B, h, T)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; layer_scale > 0 adds per-channel gains on both branches (CaiT)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0, layer_scale=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale > 0 else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale > 0 else None

    def forward(self, x, return_attn=False):
        a = self.attn(self.norm1(x), return_attn)
        a, attn = a if return_attn else (a, None)
        x = x + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(x))
        x = x + self.drop_path(m if self.gamma2 is None else self.gamma2 * m)
        return (x, attn) if return_attn else x


class ViT(nn.Module):
    """Plain ViT with fixed sin-cos positions. forward() can substitute a mask token (before positions),
    keep only some tokens (token dropping), and return the last block's [CLS] attention row."""

    def __init__(self, img_size, patch_size, dim, depth, heads, mlp_ratio=4.0, drop_path=0.0,
                 layer_scale=0.0, cls_token=True):
        super().__init__()
        if img_size % patch_size:
            die(f"--img_size {img_size} is not a multiple of --patch_size {patch_size}; "
                "pick sizes that divide")
        self.patch_size, self.dim, self.grid = patch_size, dim, img_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.register_buffer("pos", sincos_pos_embed(dim, self.grid, self.grid)[None], persistent=False)
        dpr = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # linear over depth, 0 first
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, p, layer_scale) for p in dpr)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.dim, -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def pos_embed(self, gh, gw):
        same = (gh, gw) == (self.grid, self.grid)
        return self.pos if same else sincos_pos_embed(self.dim, gh, gw, self.pos.device)[None]  # (1, N, D)

    def forward(self, images, mask=None, mask_token=None, keep=None, return_attn=False):
        x = self.patch_embed(images)                                   # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        # the residual stream (and every LayerNorm input) stays fp32 under bf16 autocast, as in the official
        # models, where the fp32 position table promotes it; only the matmuls inside the blocks run in bf16
        x = x.flatten(2).transpose(1, 2).float()                       # (B, N, D)
        if mask is not None:  # substitute the mask token before positions are added
            x = torch.where(mask[..., None], mask_token.float(), x)
        x = x + self.pos_embed(gh, gw)
        if keep is not None:  # token dropping: only these tokens enter the blocks
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).float(), x], dim=1)  # (B, 1+K, D)
        for blk in self.blocks[:-1]:
            x = blk(x)
        x = self.blocks[-1](x, return_attn)
        x, attn = x if return_attn else (x, None)
        x = self.norm(x)
        return (x, attn) if return_attn else x


def build_vit(name, img_size, patch_size, **kw):
    if name not in VIT_SIZES:
        die(f"unknown --model {name}; choose one of {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[name]
    return ViT(img_size, patch_size, dim, depth, heads, **kw)
# <<< shared: vit

# ----------------------------------------------------------------------------
# Masking

MASK_MODES = ("attmask_hint", "attmask_high", "attmask_low", "random", "block")

def attmask(a, ratio, mode, prob, show_max, hint_ratio=None):
    """a: (R, N) teacher [CLS]->patch attention, a row per global crop -> mask (R, N) bool, True = hidden.
    High hides the floor(N r) most attended tokens, Low the least; Hint hides the High set, then reveals
    floor(N s r') tokens drawn uniformly from the top floor(N s), s = show_max, r' = hint_ratio (the
    official loop draws it independently of r; None = r)."""
    R, N = a.shape
    order = a.argsort(dim=1, descending=mode != "attmask_low")         # (R, N) first = first to hide
    mask = torch.zeros(R, N, dtype=torch.bool, device=a.device).scatter_(1, order[:, :int(N * ratio)], True)
    mask &= torch.rand(R, 1, device=a.device) <= prob                  # per crop: else not masked at all
    hint_ratio = ratio if hint_ratio is None else hint_ratio
    # floors; s * r' formed first (spec 3.3b)
    n_hint = int(N * (show_max * hint_ratio))
    if mode == "attmask_hint" and n_hint > 0:
        # (R, N) candidates
        top = torch.zeros(R, N, device=a.device).scatter_(1, order[:, :int(N * show_max)], 1.0)
        # = torch.multinomial(top, n_hint) (same draws), without its two host syncs: top-k of top / Exp(1)
        # (R, n_hint)
        mask.scatter_(1, (top / torch.empty_like(top).exponential_()).topk(n_hint).indices, False)
    return mask

def block_mask(ratios, gh, gw, rounds=50):
    """iBOT 'block' baseline (BEiT), vectorised: each round proposes a rectangle per row (area U[(min(gh,gw)
    //3)^2, left to hide], aspect in [0.3, 1/0.3]), kept if it hides 1..left-to-hide new tokens; a row stops
    after 10 rejections in a row, as the official loop (never over 50 proposals in 20000 trials at 14x14)."""
    R, dev, lo = len(ratios), ratios.device, (min(gh, gw) // 3) ** 2
    rand = lambda: torch.rand(R, device=dev)
    target, fails = ratios * gh * gw, torch.zeros(R, device=dev)  # (R,) not floored, as official
    mask = torch.zeros(R, gh, gw, dtype=torch.bool, device=dev)
    ys, xs = torch.arange(gh, device=dev), torch.arange(gw, device=dev)
    for _ in range(rounds):
        todo = target - mask.sum((1, 2))                               # (R,) r N - count: caps the area
        area, aspect = lo + (todo - lo) * rand(), torch.exp((2 * rand() - 1) * math.log(1 / 0.3))
        h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        top, left = (rand() * (gh - h + 1)).floor(), (rand() * (gw - w + 1)).floor()
        rect = (((ys >= top[:, None]) & (ys < (top + h)[:, None]))[:, :, None]
                & ((xs >= left[:, None]) & (xs < (left + w)[:, None]))[:, None, :])  # (R, gh, gw)
        new = (rect & ~mask).sum((1, 2))                               # (R,)
        ok = (h < gh) & (w < gw) & (new > 0) & (new <= todo) & (fails < 10)
        mask, fails = mask | (rect & ok[:, None, None]), torch.where(ok, 0.0, fails + 1)
    return mask.flatten(1)                                             # (R, N)

def make_mask(cfg, attn, step, gh, gw):
    """Mask (2B, N) of the global crops for --mask_mode. attn: (2B, heads, 1+N) teacher [CLS] rows."""
    lo, hi = cfg.pred_ratio - cfg.pred_ratio_var, cfg.pred_ratio + cfg.pred_ratio_var
    # last block, mean over heads, patch keys, not renormalised (Sec. 3)
    if cfg.mask_mode.startswith("attmask"):
        # one r per step, the same on all ranks and on resume
        rng = random.Random(cfg.seed * 1_000_003 + step)
        # official: get_pred_ratio() twice, mask and hints
        r, r_hint = rng.uniform(lo, hi), rng.uniform(lo, hi)
        return attmask(attn[:, :, 1:].float().mean(1), r, cfg.mask_mode, cfg.masking_prob,
                       cfg.show_max, r_hint)
    ratios = lo + (hi - lo) * torch.rand(attn.shape[0], device=attn.device)  # iBOT: r per crop, all masked
    if cfg.mask_mode == "block":
        return block_mask(ratios, gh, gw)
    rank = torch.rand(len(ratios), gh * gw, device=attn.device).argsort(1).argsort(1)  # (2B, N) random ranks
    return rank < (ratios * gh * gw).floor()[:, None]                  # iBOT 'rand': exactly floor(N r_i)

# ----------------------------------------------------------------------------
# Target

class Head(nn.Module):
    """iBOT head for [CLS] and patches: MLP -> 256-d -> L2-normalise -> weight-normed linear g v/|v| to K."""

    def __init__(self, dim, out_dim, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp[::2]:
            nn.init.trunc_normal_(m.weight, std=0.02), nn.init.zeros_(m.bias)
        self.v = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach())  # nn.Linear init
        self.g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        z = F.normalize(self.mlp(x).float(), dim=-1)                   # (..., 256)
        # fp32 logits: after /0.04, bf16 is 8x fp16's steps
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(z, self.g * F.normalize(self.v, dim=1))    # (..., K) fp32

def teacher_temp(epoch, start, end, warmup_epochs):
    """Per epoch: linspace(start, end, warmup_epochs)[epoch], then end (sharper targets early on)."""
    return start + (end - start) * epoch / max(warmup_epochs - 1, 1) if epoch < warmup_epochs else end

@torch.no_grad()
def ema_update(teacher_params, student_params, m):
    """theta_t <- m theta_t + (1 - m) theta_s, over the parameters both nets have (not the mask token)."""
    torch._foreach_mul_(teacher_params, m)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - m)

# ----------------------------------------------------------------------------
# Model

class Model(nn.Module):
    """Student ViT + mask token + head, EMA teacher ViT + head, 2 centers. crops: [global x 2, local...]."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.mask_mode not in MASK_MODES:
            die(f"unknown --mask_mode {cfg.mask_mode}; choose one of {', '.join(MASK_MODES)}")
        self.cfg = cfg
        self.student = build_vit(cfg.model, cfg.img_size, cfg.patch_size, drop_path=cfg.drop_path)
        self.teacher = build_vit(cfg.model, cfg.img_size, cfg.patch_size)  # no drop path
        D = self.student.dim
        self.head, self.teacher_head = (Head(D, cfg.out_dim, cfg.head_hidden),
                                        Head(D, cfg.out_dim, cfg.head_hidden))
        self.mask_token = nn.Parameter(torch.zeros(1, D))              # official `masked_embed`, zeros
        # teacher starts as student
        for t, s in ((self.teacher, self.student), (self.teacher_head, self.head)):
            t.load_state_dict(s.state_dict()), t.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))      # [CLS] target center
        self.register_buffer("center2", torch.zeros(1, 1, cfg.out_dim))  # patch target center

    def forward(self, crops, step, epoch):
        cfg, p = self.cfg, self.cfg.patch_size
        x = torch.cat(crops[:2])                                       # (2B, 3, H, W) crop-major
        # 1. ONE teacher pass on the unmasked globals gives the targets and the [CLS] attention (Sec. 3)
        with torch.no_grad():
            t_tok, attn = self.teacher(x, return_attn=True)            # (2B, 1+N, D), (2B, heads, 1+N)
            t_out = self.teacher_head(t_tok)                           # (2B, 1+N, K)
        # 2. what to hide from the student; local crops are never masked
        mask = make_mask(cfg, attn, step, x.shape[-2] // p, x.shape[-1] // p)  # (2B, N)
        # 3. student: masked globals ([CLS] + patches), unmasked locals ([CLS] only)
        s_out = self.head(self.student(x, mask=mask, mask_token=self.mask_token))  # (2B, 1+N, K)
        s_cls = s_out[:, 0]                                            # (2B, K)
        if len(crops) > 2:
            s_cls = torch.cat([s_cls, self.head(self.student(torch.cat(crops[2:]))[:, 0])])  # (V*B, K)
        # 4. DINO loss across views + iBOT loss on the hidden patches (weights 1, 1), then the centers
        tau = teacher_temp(epoch, 0.04, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
        l_cls, l_patch = ibot_loss(s_cls, s_out[:, 1:], t_out[:, 0], t_out[:, 1:], mask,
                                   self.center, self.center2, tau, tau, 0.1)
        update_centers(self.center, self.center2, t_out[:, 0], t_out[:, 1:], cfg.center_momentum)
        return l_cls + l_patch, {"cls": l_cls.detach(), "patch": l_patch.detach(),
                                 "masked": mask.float().mean()}

    @torch.no_grad()
    def visualize(self, crops, step, path):
        """Rows: global crop | teacher [CLS] attention | student input (grey = hidden; masked w.p. 1)."""
        cfg, x = self.cfg, crops[0][:8]
        mean, std = (torch.tensor(s, device=x.device)[:, None, None] for s in common.DATASETS[cfg.data][2])
        img, (gh, gw) = (x * std + mean).clamp(0, 1).float(), (s // cfg.patch_size for s in x.shape[-2:])
        attn = self.teacher(x, return_attn=True)[1]                    # (b, heads, 1+N)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # training RNG untouched
            hide = make_mask(dataclasses.replace(cfg, masking_prob=1.0), attn, step, gh, gw).float()  # (b, N)
        a = attn[:, :, 1:].float().mean(1)                             # (b, N)
        a = ((a - a.amin(1, keepdim=True))
             / (a.amax(1, keepdim=True) - a.amin(1, keepdim=True)).clamp(min=1e-12))
        # (b, 3, H, W)
        up = lambda m: F.interpolate(m.view(-1, 1, gh, gw), size=x.shape[-2:]).expand(-1, 3, -1, -1)
        common.save_picture(path, [img, up(a), img * (1 - up(hide)) + 0.5 * up(hide)],
                            ["global crop", "teacher attention", f"hidden ({cfg.mask_mode})"])

# ----------------------------------------------------------------------------
# Loss

def ibot_loss(s_cls, s_patch, t_cls, t_patch, mask, center, center2, tau_t, tau_t2, tau_s):
    """DINO [CLS] loss + iBOT masked-patch loss (iBOT Sec. 3.2), fp32. s_cls (V*B, K): student [CLS], 2 masked
    globals then locals, crop-major; s_patch (2B, N, K); teacher t_cls (2B, K), t_patch (2B, N, K);
    mask (2B, N)."""
    B, V = t_cls.shape[0] // 2, 2 * s_cls.shape[0] // t_cls.shape[0]
    p_t = F.softmax((t_cls.float() - center) / tau_t, dim=-1).view(2, B, -1)  # (2, B, K) centred, sharpened
    logp_s = F.log_softmax(s_cls.float() / tau_s, dim=-1).view(V, B, -1)      # (V, B, K)
    ce = -torch.einsum("qbk,vbk->qv", p_t, logp_s) / B                 # (2, V) batch-mean CE per view pair
    other = 1.0 - torch.eye(2, V, device=ce.device)                    # same-view pairs out: 2(V-1) pairs
    q_t = F.softmax((t_patch.float() - center2) / tau_t2, dim=-1)      # (2B, N, K)
    ce_p = -(q_t * F.log_softmax(s_patch.float() / tau_s, dim=-1)).sum(-1)  # (2B, N) same view only
    per_crop = (ce_p * mask).sum(1) / mask.sum(1).clamp(min=1)         # (2B,) mean over hidden tokens
    return (ce * other).sum() / other.sum(), per_crop.mean()           # unmasked crops count as 0

@torch.no_grad()
def update_centers(center, center2, t_cls, t_patch, momentum):
    """In place: EMA of the teacher's mean [CLS] and patch logits (all tokens), over all ranks' batches."""
    c, c2 = t_cls.float().mean(0, keepdim=True), t_patch.float().mean((0, 1))[None, None]  # (1, K), (1, 1, K)
    if dist.is_available() and dist.is_initialized():
        for t in (c, c2):
            dist.all_reduce(t.div_(dist.get_world_size()))
    center.mul_(momentum).add_(c, alpha=1 - momentum), center2.mul_(momentum).add_(c2, alpha=1 - momentum)

def clip_per_tensor(params, clip):
    """DINO-style: each parameter tensor's gradient is scaled to norm <= clip on its own (no global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, [(clip / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)])

class Encoder(nn.Module):
    """Probe features (B, 4D): the teacher's last 4 [CLS], each through the final norm
    (DINO linear protocol)."""

    def __init__(self, vit):
        super().__init__()
        self.vit, self.outs = vit, []
        for b in vit.blocks[-4:]:
            b.register_forward_hook(lambda m, i, o: self.outs.append(o[:, 0]))

    def forward(self, images):
        self.outs.clear(), self.vit(images)
        return torch.cat([self.vit.norm(o) for o in self.outs], dim=-1)  # (B, 4D)

def load_encoder(ckpt, random_init=False):
    """Checkpoint dict -> frozen teacher encoder giving the probe features;
    random_init: same shape, untrained."""
    model = Model(Config(**ckpt["config"]))
    if not random_init:
        model.load_state_dict(ckpt["model"])
    return Encoder(model.teacher).eval()

# ----------------------------------------------------------------------------
# Training

# >>> shared: runtime
def setup_distributed(device_flag):
    """torchrun env vars -> process group (NCCL on CUDA, gloo on CPU); plain python -> one process."""
    use_cuda = torch.cuda.is_available() and device_flag != "cpu"
    if device_flag == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no CUDA device is visible; use --device cpu")
    if "RANK" in os.environ:
        rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                              int(os.environ["WORLD_SIZE"]))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rank, local, world = 0, 0, 1
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def cosine_schedule(step, total, start, end, warmup=0, warmup_from=0.0):
    """Linear warm-up from `warmup_from` to `start` over `warmup` steps, then cosine from `start` to `end`."""
    if step < warmup:
        return warmup_from + (start - warmup_from) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay, skip=()):
    """AdamW groups: no weight decay on biases, norms and gains (ndim < 2, as timm's add_weight_decay) nor on
    the parameters whose last name part is in `skip`
    (each method passes its official list, e.g. cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.rsplit(".", 1)[-1] in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_states(world):
    """Every rank's RNG state (CPU and CUDA), gathered so that rank 0 can save them all."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    out = [None] * world
    dist.all_gather_object(out, state)
    return out


def save_checkpoint(path, state):
    """Atomic: write a temp file then rename, so a crash never leaves a half-written checkpoint. config.json
    next to it is the config of that checkpoint (a resume that fails never rewrites it)."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    with open(tmp, "w") as f:
        json.dump(state["config"], f, indent=1)
    os.replace(tmp, os.path.join(os.path.dirname(path), "config.json"))


class resuming:
    """`with resuming(path):` around a resume's load_state_dict calls: a checkpoint whose shapes no longer
    fit these settings (another --model, head or decoder size) is one line, and it stays as it was."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, (RuntimeError, ValueError, KeyError)):
            die(f"{self.path} does not fit these settings ({str(err).strip().splitlines()[0][:120]}); "
                "resume with the settings it was saved with (warning above) or pick a new --out_dir")


def nonfinite_error(step, path):
    """The one-line error of a diverged run; it names the checkpoint only if one was written."""
    kept = f"{path} keeps the last good state" if os.path.exists(path) else "no checkpoint was written yet"
    die(f"non-finite loss at step {step}; {kept} (lower --blr, or check the data)")


def load_checkpoint(path):
    """Our checkpoint of this method, or a one-line error that says what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__}); "
            "delete it or choose another --out_dir")
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        die(f"{path} is not a checkpoint of this collection; choose another --out_dir")
    if ckpt["method"] != METHOD:
        die(f"{path} is a {ckpt['method']} checkpoint, not {METHOD}; choose another --out_dir")
    return ckpt


class Logger:
    """Rank 0 prints, appends to out_dir/log.txt and writes out_dir/metrics.jsonl (no files: out_dir "")."""

    def __init__(self, out_dir, master):
        # the folder is made at the first line: none on a failed start
        self.master, self.out_dir = master, out_dir

    def print(self, msg):
        if self.master:
            print(msg, flush=True)
        if self.master and self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def metrics(self, row):
        if self.master and self.out_dir:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


_stop_signal = []  # set by SIGTERM: save and leave after this step
# after a SIGTERM, a run that has not ended by itself within this many seconds is ended hard
STOP_GRACE_S = 60


def _on_sigterm(signum, frame):
    _stop_signal.append(signum)


def _hard_exit(why):
    sys.stderr.write(f"error: {why}; exiting without saving (the last checkpoint is kept)\n")
    common._kill_workers()
    os._exit(143)


def _watch_sigterm(fd):
    """A thread that sees every SIGTERM even while the main thread is stuck in C (a collective whose
    peer died, a hung loader): the interpreter writes the signal number to `fd` as it arrives. The first
    starts the grace timer; one more, 2 s or later
    (torchrun forwards the scheduler's copy at once), ends it."""
    first = None
    while True:
        if signal.SIGTERM not in os.read(fd, 64):
            continue
        if first is None:
            first = time.time()
            timer = threading.Timer(STOP_GRACE_S, _hard_exit,
                                    [f"no clean stop {STOP_GRACE_S} s after SIGTERM"])
            timer.daemon = True
            timer.start()
        elif time.time() - first > 2:
            _hard_exit("a second SIGTERM")


_watcher = []


def handle_sigterm():
    """SIGTERM: the loop saves and leaves after the current step (RunControl); the watcher thread ends a
    stuck run. The watcher starts once per process (tests call train() many times)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not _watcher and threading.current_thread() is threading.main_thread():
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        _watcher.append(threading.Thread(target=_watch_sigterm, args=(r,), daemon=True))
        _watcher[0].start()


class RunControl:
    """Called once per step: (stop, save) = (a SIGTERM arrived, --save_every_min has passed), the same on
    every rank at the same step, with no GPU sync and no blocking collective on the hot path. Under DDP
    each step starts an async MAX all-reduce of this rank's two flags on a CPU (gloo) group and acts on
    the one started the step before, which finished long ago: every rank stops one step later, together."""

    def __init__(self, world, save_every_min):
        self.world, self.every, self.t_save, self.pending = world, save_every_min * 60, time.time(), None
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def mine(self):
        return torch.tensor([float(bool(_stop_signal)), float(0 < self.every < time.time() - self.t_save)])

    def __call__(self):
        if self.world == 1:
            flags = self.mine()
        else:
            flags = torch.zeros(2)
            if self.pending is not None:
                self.pending[0].wait()
                flags = self.pending[1]
        if flags[1] > 0:
            self.t_save = time.time()
        if self.world > 1:  # after the reset above, so one save request is not sent twice
            mine = self.mine()
            self.pending = (dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
                            mine)
        return bool(flags[0] > 0), bool(flags[1] > 0)
# dense bf16 tensor-core peak of one GPU in TFLOP/s (vendor sheets), the first name fragment that matches
PEAK_BF16_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("A100", 312), ("L40S", 362),
                    ("RTX 4090", 165), ("L4", 121)]


def count_flops(modules, loss_fn, ctx):
    """FLOPs of one training step, loss_fn(*copies) -> loss, forward + backward, counted on deep copies of
    `modules` with the RNG streams forked: the real weights, buffers, gradients and streams stay untouched."""
    import copy
    from torch.utils.flop_counter import FlopCounterMode
    copies = copy.deepcopy(modules)
    devices = ([torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized()
               else [])
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        with ctx:
            loss = loss_fn(*copies)
        loss.backward()
    return counter.get_total_flops()


def device_peak(device, peak_tflops=0.0):
    """The GPU's dense bf16 peak in TFLOP/s: --peak_tflops, else from its name; 0 = unknown (and on CPU)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return peak_tflops or next((p for key, p in PEAK_BF16_TFLOPS if key in name), 0)


def flops_summary(flops, steps, seconds, device, peak_tflops=0.0):
    """' | X TFLOP/s' achieved per GPU and, on CUDA, ' | MFU Y%' against the dense bf16 peak."""
    tflops = flops * steps / max(seconds, 1e-9) / 1e12
    out = f" | {tflops:.3g} TFLOP/s"
    if device.type == "cuda":
        peak = device_peak(device, peak_tflops)
        out += (f" | MFU {100 * tflops / peak:.1f}%" if peak else
                f" | MFU unknown for {torch.cuda.get_device_name(device)} (set --peak_tflops)")
    return out
# <<< shared: runtime

def train(cfg: Config):
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same initial weights (and EMA copies) on every rank
    log = Logger("" if cfg.benchmark else cfg.out_dir, master)  # --benchmark writes nothing
    handle_sigterm()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # data: 2 global + L local crops; milder blur at <= 64 px, where it wipes the image out (spec 5.4)
    dataset = (common.build_dataset(cfg.data, cfg.data_dir, True, subset=cfg.subset, img_size=cfg.img_size)
               if not cfg.benchmark else  # --benchmark: random images made on the device
               common.benchmark_images(cfg.batch_size * world * cfg.accum_iter, cfg.img_size, device))
    crops = (cfg.data, cfg.img_size, cfg.local_size, cfg.local_crops)
    blur = (1.0, 0.1, 0.5) if cfg.img_size > 64 else (0.5, 0.1, 0.2)
    loader = common.make_loader(dataset, common.MultiCrop(*crops, blur=blur), cfg.batch_size, True, cfg.seed,
                                rank, world, cfg.num_workers,
                                batched=common.BatchMultiCrop(*crops, blur=blur), device=device)
    eff_batch = cfg.batch_size * world * cfg.accum_iter  # images per optimizer step
    steps_per_epoch = len(dataset) // max(1, eff_batch)  # optimizer steps
    if steps_per_epoch == 0 or cfg.accum_iter < 1:
        die(f"--batch_size {cfg.batch_size} x {world} GPUs x --accum_iter {cfg.accum_iter} must be >= 1 and "
            f"at most the dataset ({len(dataset)} images)")
    total = cfg.epochs * steps_per_epoch
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    # model and optimizer: AdamW, default betas, decay on >= 2-dim tensors
    # (mask token, [CLS] too, as official)
    model = Model(cfg).to(device)
    torch.manual_seed(cfg.seed + rank)  # then one stream per rank: masks, drop path
    lr = cfg.blr * eff_batch / 256
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, fused=device.type == "cuda")
    # EMA pairs, by name order
    teacher_params = [*model.teacher.parameters(), *model.teacher_head.parameters()]
    student_params = [*model.student.parameters(), *model.head.parameters()]

    # resume: the same command continues the run in out_dir
    path, step = os.path.join(cfg.out_dir, "checkpoint.pt"), 0
    if os.path.exists(path) and not cfg.benchmark:  # a benchmark starts afresh and saves nothing
        ckpt = load_checkpoint(path)
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
                   if getattr(cfg, k, v) != v and k not in ("log_every", "num_workers", "vis_every",
                                                            "knn_every", "save_every_min", "device",
                                                            "compile", "peak_tflops")}
        if changed:
            log.print(f"warning: resuming with changed settings (saved, now): {changed}")
        with resuming(path):  # a checkpoint that no longer fits these settings: one line
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if "cuda" in ckpt["rng"][rank] and device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
        log.print(f"resumed from {path} at step {step}")
    if step >= stop:
        log.print(f"run in {cfg.out_dir} already finished at step {step}/{stop}; nothing to do "
                  "(raise --max_steps or --epochs, or pick a new --out_dir)")
        if world > 1:
            dist.destroy_process_group()
        return
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.print(f"{METHOD} | torch {torch.__version__} | device {device} x {world} "
              f"| params {n_params / 1e6:.2f}M")
    log.print("config " + json.dumps(dataclasses.asdict(cfg)))
    log.print(f"effective batch {eff_batch} = {cfg.batch_size} x {world} GPUs x accum {cfg.accum_iter} "
              f"(the paper's ImageNet runs: 240 = 4 GPUs x 60, 800 at 300 epochs)"
              f" | lr {lr:.3e} (blr {cfg.blr:.2e} x {eff_batch}/256)"
              f" | {steps_per_epoch} steps/epoch | {stop} steps")

    if cfg.compile:  # the networks, not the step (it draws Python-side ratios and all-reduces the centers)
        for m in (model.student, model.teacher, model.head, model.teacher_head):
            m.compile(**common.COMPILE)
    fwd = model
    if world > 1:  # the teacher has no trainable parameters: DDP copies rank 0's once and never reduces it
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the centers are all-reduced already

    def checkpoint(epoch):
        state = {"method": METHOD, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": rng_states(world)}
        if master:
            save_checkpoint(path, state)

    def train_step(batch, micro, step, epoch):
        """One micro-batch of the loop (crops, labels): forward and backward; after the last of accum_iter,
        the clipping, optimizer and EMA teacher steps. The loop and --benchmark both run it."""
        crops = [c.to(device, non_blocking=True) for c in batch[0]]
        for g in opt.param_groups:
            g["lr"] = cosine_schedule(step, total, lr, 1e-6, warmup=int(cfg.warmup_epochs * steps_per_epoch))
        wd = cosine_schedule(step, total, cfg.weight_decay, cfg.weight_decay_end)
        opt.param_groups[0]["weight_decay"] = wd
        if world > 1:  # DDP all-reduces the gradients only on the micro-batch that ends an optimizer step
            fwd.require_backward_grad_sync = micro == cfg.accum_iter - 1
        with ctx:
            loss, stats = fwd(crops, step, epoch)
        (loss / cfg.accum_iter).backward()  # MAE: micro-batch gradients add up to the mean over the batch
        if micro == cfg.accum_iter - 1:
            if cfg.clip_grad:
                clip_per_tensor(params, cfg.clip_grad)
            if epoch < cfg.freeze_last_layer:  # the prototypes stay put while the rest settles (DINO)
                model.head.v.grad = model.head.g.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            momentum = cosine_schedule(step, total, cfg.momentum_teacher, 1.0)
            ema_update(teacher_params, student_params, momentum)
        return loss, stats, crops

    if cfg.benchmark:  # the step alone, on accum_iter micro-batches of device-made images
        it = iter(loader)
        batches = [next(it) for _ in range(cfg.accum_iter)]
        res = common.benchmark(
            METHOD, batches, lambda b, micro, i: train_step(b, micro, i, i // steps_per_epoch),
            lambda out: count_flops((model,), lambda m: m(out[2], 0, 0)[0], ctx), cfg.benchmark, eff_batch,
            device, device_peak(device, cfg.peak_tflops), log,
            note=f"{2 + cfg.local_crops} crops: 2 x {cfg.img_size} px + "
                 f"{cfg.local_crops} x {cfg.local_size} px")
        if world > 1:
            dist.destroy_process_group()
        return res

    # the loop
    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, checked on log steps
    control, stop_now = RunControl(world, cfg.save_every_min), False  # SIGTERM / timed save, every step
    t_start, t_log, data_wait, log_steps, step0 = time.time(), time.time(), 0.0, 0, step
    epoch, micro = step // steps_per_epoch, 0  # micro: micro-batches accumulated towards the next step
    while step < stop:
        loader.sampler.set_epoch(epoch, skip=(step % steps_per_epoch) * cfg.accum_iter * cfg.batch_size)
        t_data = time.time()
        for batch in loader:
            data_wait += time.time() - t_data
            loss, stats, crops = train_step(batch, micro, step, epoch)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            micro = (micro + 1) % cfg.accum_iter
            if micro:  # not yet the last micro-batch of this optimizer step
                t_data = time.time()
                continue
            step += 1
            log_steps += 1
            if master and cfg.vis_every and (step % cfg.vis_every == 0 or step == stop):
                model.visualize(crops, step - 1, os.path.join(cfg.out_dir, f"vis_{step:07d}.png"))
            stop_now, save_now = control()
            if (step % cfg.log_every == 0 or step == stop or step % steps_per_epoch == 0
                    or stop_now or save_now):
                flags = torch.stack([bad_step.float(), torch.tensor(float(stop_now), device=device)])
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[0] >= 0:
                    nonfinite_error(int(flags[0]) + 1, path)
                if step % cfg.log_every == 0 or step == stop:
                    dt = time.time() - t_log
                    lr_now = opt.param_groups[0]["lr"]
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 2), "loss": loss.item(),
                           "lr": lr_now, "ms": 1000 * dt / log_steps, "img_s": eff_batch * log_steps / dt,
                           "data": data_wait / dt, **{k: v.item() for k, v in stats.items()}}
                    log.print(f"step {step}/{stop} | ep {row['epoch']:.1f} | loss {row['loss']:.4f} | "
                              f"lr {lr_now:.1e} | {row['ms']:.0f} ms | {row['img_s']:.0f} img/s | "
                              f"data {100 * row['data']:.0f}%"
                              + "".join(f" | {k} {row[k]:.4g}" for k in stats))
                    log.metrics(row)
                    t_log, data_wait, log_steps = time.time(), 0.0, 0
                if stop_now or save_now:  # mid-epoch: the sampler resumes inside the epoch
                    checkpoint(epoch)
                if stop_now:
                    log.print(f"SIGTERM: saved {path} at step {step}; run the same command to resume")
                    break
            if step >= stop or step % steps_per_epoch == 0:  # an epoch's leftover micro-batches: unused
                break
            t_data = time.time()
        if stop_now:
            break
        if step % steps_per_epoch == 0:
            epoch += 1
        checkpoint(epoch)
        # not in the log's img/s
        t_log += common.online_knn(cfg, step, steps_per_epoch, stop, lambda: load_encoder(
            {"config": dataclasses.asdict(cfg), "model": model.state_dict()}), device, log)

    wall = time.time() - t_start
    imgs, peak = (step - step0) * eff_batch, peak_memory_gb(device)
    flops = count_flops((model,), lambda m: m(crops, step - 1, epoch)[0], ctx)  # the last step again, untimed
    log.print(f"summary | {METHOD} | steps {step} | {imgs / wall:.0f} img/s total"
              f" | {imgs / wall / world:.0f} img/s/gpu"
              f" | peak mem {peak:.2f} GB | wall {wall:.0f} s | loss {loss.item():.4f}"
              + flops_summary(flops * cfg.accum_iter, step - step0, wall, device, cfg.peak_tflops))
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    train(parse_config())
