"""ExtreMA: extreme masking for learning instance and distributed visual representations.
Zhirong Wu, Zihang Lai, Xiao Sun, Stephen Lin. TMLR 2023, arXiv 2206.04667. Official code: microsoft/ExtreMA.

BYOL with random token masking as the augmentation. The online ViT sees a small random subset of the patch
tokens (20% at 80% masking): its self-attention blocks run on those tokens alone, with no class token, and
two CaiT class-attention blocks pool them into one instance vector (a learned class token is the only
query). Projector + predictor map it to 256-d; the target is an EMA copy of encoder + projector that sees the
whole unmasked image (same crop and flip, its own colour jitter). Loss 2 - 2 cos(prediction, target), not
symmetrised. Each image gets K disjoint masks (slices of one permutation), encoded as one batch of K*B short
sequences: K training signals for about the cost of one full-image forward.

Differs from the others in:
  - no pixel or token targets: one instance-level target per image, shared by its K masks (tokens dropped);
  - the class token lives only in the class-attention pooling blocks, never in the self-attention trunk;
  - the probe reads the EMA encoder's pooled class vector without its final LayerNorm (the README's probe).

Deviations from the official code:
  - N comes from image and patch size (the official mask code hard-codes 196); masks that cannot be disjoint
    (num_masks * visible > N) are a one-line error instead of a crash inside a concatenation;
  - bf16 autocast instead of fp16 + GradScaler; crops resize bilinear as official; in-memory sets (all but
    ImageNet and large folders) are cropped and coloured in batches on the device (common.py: roi_align,
    area-averaged when a box shrinks, like PIL's antialiasing; colour ops in float, no uint8 rounding);
    ImageNet and large folders are decoded once per step in the main process (a reduced JPEG scale on the
    CPU where the crop allows it, nvJPEG on CUDA), cropped per image (PIL on the CPU, antialiased on CUDA);
  - the EMA update runs at the top of the training step, not inside forward: same order, same values;
    with --accum_iter (not in the official code) once per optimizer step: exactly a bigger batch;
  - the sin-cos table is a non-persistent buffer, not a frozen parameter; the patch embedding is
    `patch_embed.weight` (official `patch_embed.proj.weight`); the other parameter names match;
  - the probe is common.py's fast protocol (cached features, lr sweep, kNN), not the 90-epoch SGD run;
    fine-tuning, detection and the broken `infonce` loss are left out.

Run:
    python extrema.py                                                     # ~1 min CPU run, synthetic data
    python extrema.py --data cifar10 --num_masks 1                        # ablation: one mask per image
    torchrun --nproc_per_node=8 extrema.py --data imagenet --data_dir /path/to/imagenet
    python eval_linear.py --ckpt out/extrema-cifar10/checkpoint.pt        # linear + kNN probe (EMA encoder)
"""
import dataclasses
import json
import math
import os
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

METHOD = "extrema"


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
    num_masks: int = 5             # K disjoint masks per image, one batch of K*B in the encoder
                                   # (paper 5; 8 at 90%)
    mask_ratio: float = 0.8        # hidden fraction per mask; visible = floor(N * (1 - ratio))
                                   # (paper 0.8; 0.9)
    drop_path: float = 0.1         # stochastic depth of the online trunk; the target has none (paper 0.1)
    ca_blocks: int = 2             # class-attention pooling blocks (paper 2)
    ca_layer_scale: float = 0.1    # LayerScale init, class-attention blocks only (paper 0.1)
    proj_hidden: int = 4096        # hidden width of projector and predictor (paper 4096)
    proj_dim: int = 256            # output width of projector and predictor (paper 256)
    ema_momentum: float = 0.996    # EMA momentum at step 0, cosine to 1 at the last step (paper 0.996)
    color_aug: bool = True         # shared crop/flip, independent colour jitter per branch
                                   # (paper's best recipe)


def preset(data: str, given: dict) -> dict:
    """ImageNet = the README recipe (8 GPUs x 256 = 2048 images, lr 1.2e-3); small data = the spec's CIFAR
    proposal (ViT-T/4, 2048-wide heads, no drop path for ViT-T, 10% warm-up);
    synthetic = a CPU smoke config."""
    small = dict(model="vit_tiny", img_size=32, patch_size=4, epochs=200, batch_size=512, blr=1.5e-4,
                 weight_decay=0.1, warmup_epochs=20, drop_path=0.0, proj_hidden=2048)
    return {
        "imagenet": dict(model="vit_base", img_size=224, patch_size=16, epochs=300, batch_size=256,
                         blr=1.5e-4, weight_decay=0.1, warmup_epochs=40),
        "cifar10": small, "cifar100": small, "fashion-mnist": small,
        "stl10": {**small, "img_size": 96, "patch_size": 8},
        "tiny-imagenet": {**small, "img_size": 64, "patch_size": 8},
        "folder": {**small, "img_size": 224, "patch_size": 16, "model": "vit_small", "batch_size": 256,
                   "drop_path": 0.1, "proj_hidden": 4096},
        # bare command: ~1 min on 2 cores
        "synthetic": {**small, "model": "vit_micro", "epochs": 5, "batch_size": 64, "blr": 5e-4,
                      "warmup_epochs": 0.5, "proj_hidden": 512, "ema_momentum": 0.99, "vis_every": 50},
    }[data]

def check_config(cfg: Config):
    """Every flag in its range and the combinations this file needs, at parse time:
    one line, nothing written."""
    c = common
    c.check_fields(cfg, {
        "model": c.one_of(*VIT_SIZES), "num_masks": c.at_least(1), "mask_ratio": c.fraction(),
        "drop_path": c.between(0, 1, open_hi=True), "ca_blocks": c.at_least(1),
        "ca_layer_scale": c.at_least(0), "proj_hidden": c.at_least(1), "proj_dim": c.at_least(1),
        "ema_momentum": c.between(0, 1)})
    if cfg.img_size % cfg.patch_size:
        die(f"--img_size {cfg.img_size} is not a multiple of --patch_size {cfg.patch_size}; "
            "pick sizes that divide")
    check_masks((cfg.img_size // cfg.patch_size) ** 2, cfg.num_masks, cfg.mask_ratio)

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


class ClassAttentionBlock(nn.Module):
    """CaiT class attention: the class token is the only query, keys/values are [cls, patch tokens], and only
    the class token is written. LayerScale 0.1, no drop path (official); q, k, v are separate Linears."""

    def __init__(self, dim, heads, mlp_ratio=4.0, layer_scale=0.1):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({k: nn.Linear(dim, dim) for k in ("q", "k", "v", "proj")})
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1, self.gamma_2 = (nn.Parameter(torch.full((dim,), layer_scale)) for _ in range(2))

    def forward(self, x, cls):                                             # x: (B, n, D), cls: (B, 1, D)
        u = self.norm1(torch.cat([cls, x], dim=1))                         # (B, 1+n, D): cls also sees itself
        B, T, D = u.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, T', hd)
        a = self.attn
        # (B, h, 1, hd)
        out = F.scaled_dot_product_attention(split(a.q(u[:, :1])), split(a.k(u)), split(a.v(u)))
        cls = cls + self.gamma_1 * a.proj(out.transpose(1, 2).reshape(B, 1, D))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))             # (B, 1, D)


def mlp_head(in_dim, hidden, out_dim, layers):
    """Projector (3 layers) / predictor (2 layers): [Linear-LayerNorm-GELU] x (layers - 1), then Linear.
    LayerNorm, not BatchNorm, with PyTorch's eps 1e-5 (official)."""
    mods = []
    for i in range(layers - 1):
        mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.GELU()]
    head = nn.Sequential(*mods, nn.Linear(hidden, out_dim))
    for m in head[::3]:                                                    # the Linears: xavier, zero bias
        nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
    return head


class ExtremaEncoder(ViT):
    """The shared ViT without a class token in its trunk, + class-attention pooling + the final LayerNorm
    (the ViT's own `norm`, applied to the pooled vector only); `head` is the projector, part of the target."""

    def __init__(self, cfg, drop_path):
        if cfg.model not in VIT_SIZES:
            die(f"unknown --model {cfg.model}; choose one of {', '.join(VIT_SIZES)}")
        dim, depth, heads = VIT_SIZES[cfg.model]
        super().__init__(cfg.img_size, cfg.patch_size, dim, depth, heads, drop_path=drop_path,
                         cls_token=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))             # the pooling query, shared by all
        self.blocks_token = nn.ModuleList(ClassAttentionBlock(dim, heads, layer_scale=cfg.ca_layer_scale)
                                          for _ in range(cfg.ca_blocks))
        self.head = mlp_head(dim, cfg.proj_hidden, cfg.proj_dim, layers=3)
        # xavier Linear, LN 1/0, cls N(0, .02)
        self.init_weights()

    def forward(self, images, keep=None):
        """keep: (K*B, n) visible indices, row k*B + b from image b, or None (whole image)
        -> (K*B or B, D)."""
        B = images.shape[0]
        x = self.patch_embed(images)                                       # (B, D, gh, gw)
        # (B, N, D) fp32 stream, as the ViT
        x = x.flatten(2).transpose(1, 2).float() + self.pos_embed(*x.shape[-2:])
        # token dropping: visible tokens only
        if keep is not None:
            img = torch.arange(keep.shape[0], device=keep.device) % B     # (K*B,) source image of each row
            x = x[img[:, None], keep]                                      # (K*B, n, D)
        for blk in self.blocks:                                            # no class token in the trunk
            x = blk(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).float()           # (B', 1, D)
        for blk in self.blocks_token:                                      # patch tokens are never updated
            cls = blk(x, cls)
        return self.norm(cls[:, 0])                                        # (B', D)


# ----------------------------------------------------------------------------
# Masking

def check_masks(n_patches, num_masks, mask_ratio):
    """Visible tokens per mask, floored as the official code (196 * (1 - 0.8) = 39.2 -> 39); the K masks are
    disjoint slices of one permutation, so K * n_vis must fit in N."""
    n_vis = int(n_patches * (1 - mask_ratio))
    if n_vis < 1 or num_masks < 1 or num_masks * n_vis > n_patches:
        die(f"--num_masks {num_masks} disjoint masks of {n_vis} visible tokens (--mask_ratio {mask_ratio}) "
            f"do not fit in {n_patches} patches; lower --num_masks or raise --mask_ratio "
            "(1 <= masks x visible <= patches)")
    return n_vis


def multi_mask(noise, num_masks, mask_ratio):
    """Disjoint multi-masking: one random permutation per image (argsort of uniform noise (B, N)), cut into
    num_masks consecutive slices of n_vis tokens. Returns keep (K*B, n_vis) long, mask-major (row k*B + b =
    mask k of image b), in random order like the official code (attention pooling ignores order)."""
    B, N = noise.shape
    n_vis = check_masks(N, num_masks, mask_ratio)
    perm = noise.argsort(dim=1)                                            # (B, N) a permutation per image
    keep = perm[:, :num_masks * n_vis].view(B, num_masks, n_vis)           # (B, K, n_vis)
    return keep.transpose(0, 1).reshape(num_masks * B, n_vis)              # (K*B, n_vis)


# ----------------------------------------------------------------------------
# Target

def make_target(cfg, online):
    """The momentum encoder + projector: no drop path, weights copied, no gradients, kept out of DDP."""
    target = ExtremaEncoder(cfg, drop_path=0.0)
    target.load_state_dict(online.state_dict())
    return target.requires_grad_(False)


def ema_momentum(step, total, m0):
    """Cosine from m0 at step 0 to 1 at the end of the run, per step: 1 - (1 - m0)(1 + cos(pi t / T)) / 2."""
    return 1 - (1 - m0) * (1 + math.cos(math.pi * min(1.0, step / total))) / 2


@torch.no_grad()
def ema_update(target, online, m):
    """theta_t <- m theta_t + (1 - m) theta_o for every parameter, in order (the predictor has no copy)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)  # one fused pass


# ----------------------------------------------------------------------------
# Model

class Model(nn.Module):
    """Online branch: encoder (projector = its head) + predictor; z = the target's projection, given."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = ExtremaEncoder(cfg, drop_path=cfg.drop_path)
        self.predictor = mlp_head(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, layers=2)

    def forward(self, images, z):
        B, N = images.shape[0], self.encoder.grid ** 2
        keep = multi_mask(torch.rand(B, N, device=images.device), self.cfg.num_masks, self.cfg.mask_ratio)
        q = self.predictor(self.encoder.head(self.encoder(images, keep)))  # (K*B, C)
        # collapse checks: z_std = per-dim std of z/|z| over the batch (1/sqrt(C) if spread
        # evenly, ~0.2/sqrt(C) at init, 0 collapsed); mask_cos: two masks of one image (K > 1)
        with torch.no_grad():
            qn = F.normalize(q.float(), dim=-1).view(-1, B, q.shape[-1])
            stats = {"z_std": F.normalize(z.float(), dim=-1).std(0).mean()}
            stats.update({"mask_cos": (qn[0] * qn[-1]).sum(-1).mean()} if len(qn) > 1 else {})
        return extrema_loss(q, z), stats

    @torch.no_grad()
    def visualize(self, images, path):
        """Rows: the online view, then the visible tokens of each of the K masks on it."""
        K, g, p, B = self.cfg.num_masks, self.encoder.grid, self.cfg.patch_size, min(8, len(images))
        x = images[:B].float()                                             # (B, 3, H, W)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            keep = multi_mask(torch.rand(B, g * g, device=x.device), K, self.cfg.mask_ratio)
        mean, std = (torch.tensor(s, device=x.device).view(1, 3, 1, 1)
                     for s in common.DATASETS[self.cfg.data][2])
        x = (x * std + mean).clamp(0, 1)
        vis = torch.zeros(K * B, g * g, dtype=torch.bool, device=x.device).scatter_(1, keep, True)  # (K*B, N)
        vis = vis.view(K * B, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)  # (K*B, 1, H, W)
        panels = torch.where(vis, x.repeat(K, 1, 1, 1), 0.85)              # hidden patches light grey
        labels = ["view"] + [f"mask {k + 1} visible" for k in range(K)]
        common.save_picture(path, [x, *panels.view(K, *x.shape)], labels)   # rows: view, then a mask each


# ----------------------------------------------------------------------------
# Loss

def extrema_loss(q, z):
    """BYOL loss |q/|q| - z/|z||^2 = 2 - 2 cos(q, z): mean over the batch for each mask, then over the K
    masks. q (K*B, C) mask-major predictions, z (B, C) target projections (no gradient). Not symmetrised."""
    B = z.shape[0]
    q = F.normalize(q.float(), dim=-1).view(-1, B, q.shape[-1])          # (K, B, C)
    z = F.normalize(z.float().detach(), dim=-1)                           # (B, C)
    return (2 - 2 * (q * z).sum(-1)).mean(1).mean(0)


def load_encoder(ckpt, random_init=False):
    """Checkpoint dict -> the frozen EMA encoder; forward(images) -> pooled class vector (B, D) without the
    final LayerNorm and without the projector (the README's probe). random_init: same shape, untrained."""
    target = ExtremaEncoder(Config(**ckpt["config"]), drop_path=0.0)
    if not random_init:
        target.load_state_dict(ckpt["target"])
    target.norm, target.head = nn.Identity(), None
    return target.eval()


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

    # data: one crop + flip for both branches; colour jitter drawn per branch, or one tensor for both
    check_masks((cfg.img_size // cfg.patch_size) ** 2, cfg.num_masks, cfg.mask_ratio)  # fail before any work
    dataset = (common.build_dataset(cfg.data, cfg.data_dir, True, subset=cfg.subset, img_size=cfg.img_size)
               if not cfg.benchmark else  # --benchmark: random images made on the device
               common.benchmark_images(cfg.batch_size * world * cfg.accum_iter, cfg.img_size, device))
    crop = dict(scale=(0.2, 1.0), interpolation="bilinear")                # bilinear crops, as official
    transform = (common.SharedCropTwoColors(cfg.data, cfg.img_size, **crop) if cfg.color_aug
                 else common.mim_transform(cfg.data, cfg.img_size, **crop))
    batched = (common.BatchSharedCropTwoColors(cfg.data, cfg.img_size, **crop) if cfg.color_aug
               else common.BatchCrop(cfg.data, cfg.img_size, **crop))
    loader = common.make_loader(dataset, transform, cfg.batch_size, True, cfg.seed, rank, world,
                                cfg.num_workers, batched=batched, device=device)
    eff_batch = cfg.batch_size * world * cfg.accum_iter  # images per optimizer step
    steps_per_epoch = len(dataset) // max(1, eff_batch)  # optimizer steps
    if steps_per_epoch == 0 or cfg.accum_iter < 1:
        die(f"--batch_size {cfg.batch_size} x {world} GPUs x --accum_iter {cfg.accum_iter} must be >= 1 and "
            f"at most the dataset ({len(dataset)} images)")
    total = cfg.epochs * steps_per_epoch
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    # model and optimizer
    model = Model(cfg).to(device)
    target = make_target(cfg, model.encoder).to(device)                # EMA encoder + projector, outside DDP
    torch.manual_seed(cfg.seed + rank)  # then one stream per rank: masks, drop path
    lr = cfg.blr * eff_batch / 256
    # timm add_weight_decay with no_weight_decay()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, skip=("cls_token",)), lr=lr,
                            betas=(0.9, 0.95), fused=device.type == "cuda")

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
            target.load_state_dict(ckpt["target"])
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
              f"(the paper's ImageNet run: 2048 = 8 GPUs x 256)"
              f" | lr {lr:.3e} (blr {cfg.blr:.2e} x {eff_batch}/256)"
              f" | {steps_per_epoch} steps/epoch | {stop} steps")

    # compile before DDP
    fwd, tgt = (torch.compile(m, **common.COMPILE) if cfg.compile else m for m in (model, target))
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        state = {"method": METHOD, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                 "target": target.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": rng_states(world)}
        if master:
            save_checkpoint(path, state)

    def train_step(batch, micro, step):
        """One micro-batch of the loop (views, labels): the EMA update (before the first micro-batch), target
        and online forward, backward; after the last of accum_iter, the optimizer step. The loop and
        --benchmark both run it."""
        views = [v.to(device, non_blocking=True) for v in (batch[0] if cfg.color_aug else [batch[0]])]
        images, images_t = views if cfg.color_aug else views * 2  # online, target (no colour aug: one copy)
        for g in opt.param_groups:
            g["lr"] = cosine_schedule(step, total, lr, 0.0, warmup=int(cfg.warmup_epochs * steps_per_epoch))
        m = ema_momentum(step, total, cfg.ema_momentum)
        if micro == 0:  # once per optimizer step, from the last step's online weights (no-op at step 0)
            ema_update(target, model.encoder, m)
        if world > 1:  # DDP all-reduces the gradients only on the micro-batch that ends an optimizer step
            fwd.require_backward_grad_sync = micro == cfg.accum_iter - 1
        with ctx:
            with torch.no_grad():
                z = target.head(tgt(images_t))                      # (B, C) whole image, never masked
            loss, stats = fwd(images, z)
        stats["ema"] = torch.tensor(m)
        (loss / cfg.accum_iter).backward()  # MAE: micro-batch gradients add up to the mean over the batch
        if micro == cfg.accum_iter - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss, stats, (images, images_t)

    if cfg.benchmark:  # the step alone, on accum_iter micro-batches of device-made images
        it = iter(loader)
        batches = [next(it) for _ in range(cfg.accum_iter)]

        def flops_fn(out):
            images, images_t = out[2]
            return count_flops((model, target), lambda m, t: m(images, t.head(t(images_t)).detach())[0], ctx)
        N = (cfg.img_size // cfg.patch_size) ** 2
        n_vis = check_masks(N, cfg.num_masks, cfg.mask_ratio)
        res = common.benchmark(METHOD, batches, train_step, flops_fn, cfg.benchmark, eff_batch, device,
                               device_peak(device, cfg.peak_tflops), log,
                               note=f"{cfg.num_masks} masks x {n_vis} visible of {N} patches; "
                                    f"target on all {N}")
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
            loss, stats, (images, images_t) = train_step(batch, micro, step)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            micro = (micro + 1) % cfg.accum_iter
            if micro:  # not yet the last micro-batch of this optimizer step
                t_data = time.time()
                continue
            step += 1
            log_steps += 1
            if master and cfg.vis_every and (step % cfg.vis_every == 0 or step == stop):
                model.visualize(images, os.path.join(cfg.out_dir, f"vis_{step:07d}.png"))
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
            {"config": dataclasses.asdict(cfg), "target": target.state_dict()}), device, log)

    wall = time.time() - t_start
    imgs, peak = (step - step0) * eff_batch, peak_memory_gb(device)
    # untimed
    flops = count_flops((model, target), lambda m, t: m(images, t.head(t(images_t)).detach())[0], ctx)
    log.print(f"summary | {METHOD} | steps {step} | {imgs / wall:.0f} img/s total"
              f" | {imgs / wall / world:.0f} img/s/gpu"
              f" | peak mem {peak:.2f} GB | wall {wall:.0f} s | loss {loss.item():.4f}"
              + flops_summary(flops * cfg.accum_iter, step - step0, wall, device, cfg.peak_tflops))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_config())
