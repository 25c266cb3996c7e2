"""AMT — MAE with attention-driven masking and throwing.

Liu, Gui, Luo, "Good helper is around you: Attention-driven Masked Image Modeling", AAAI 2023
(arXiv 2211.15362). Official code: github.com/guijiejie/AMT (mae-AMT/, a fork of facebookresearch/mae).

Idea: MAE (encoder on visible patches only, a light decoder reconstructs the masked ones, MSE on normalised
pixels) where the model's own attention decides what is hidden. Every `refresh_every` epochs the encoder sees
each whole training image and its last block's [CLS] -> patch attention (per-head min-max, head mean) is
stored. In training the map follows the image's crop and flip, and patches are drawn in random order with
probability proportional to it: the first 45 % are masked (reconstructed), the next 40 % thrown (in neither
encoder, decoder nor loss), the rest (mostly background) visible. Until then (`amt_start`): MAE, 75 % random.

Differs from the others in: a per-image attention store (fp16, on the device) refreshed over the train set; a
weighted draw without replacement; a third kind of token, thrown: fewer tokens in encoder AND decoder (31/50,
119/197).

Deviations from the official code:
- the map is cropped with the image's own crop box (the intent); the released loader divides the box by the
  image size, so every crop used the top-left 2x2..3x3 cells of its map (a bug, not reproduced here);
- norm_pix_loss on (MAE's recommended target); the released command does not pass it and trains on raw
  pixels: `--norm_pix_loss 0` matches it; mask / throw 0.45 / 0.40 (the model's defaults; the released CLI
  defaults 0.75 / 0 throw nothing);
- warm-up = 10 % of --epochs (40 at the paper's 400, the official value); AMT start and refresh interval are
  flags, also 10 % of the run (official: a literal 40 and the warm-up length); the maps are made when an
  epoch needing them starts (= after the previous one), checkpointed, remade only if missing;
- the draw sorts w / Exp(1) keys (bitwise what torch.multinomial does on CPU); a map with no positive
  weight is drawn uniformly and a constant head gives zeros, where the official code fails or gives NaN;
- bf16 autocast on CUDA, not fp16 + GradScaler; the refresh batch is --batch_size; --accum_iter is MAE's
  (ImageNet preset 8 GPUs x 128 x 4 = the official 4096), exactly a bigger batch: masks are drawn per image
  and the loss averages a fixed count of masked patches per image.
- in-memory sets (all but ImageNet and large folders) are cropped in batches on the device (common.py):
  bicubic by grid sampling (cubic a = -0.75, PIL's -0.5), a box larger than the output bilinear with area
  averaging (no batched antialiased bicubic); the refresh resize is antialiased bilinear on the batch;
  ImageNet and large folders are decoded once per step in the main process (a reduced JPEG scale on the CPU
  where the box allows it, nvJPEG on CUDA), each crop and refresh resize per image (PIL on the CPU, bitwise
  the old transforms without the reduced scale; antialiased interpolation on CUDA).

Run:
    python amt.py                                                    # ~1 min CPU run, AMT from epoch 1
    torchrun --nproc_per_node=8 amt.py --data imagenet --data_dir /path/to/imagenet
    python amt.py --data cifar10 --amt off                           # the MAE baseline, same recipe
    python amt.py --data cifar10 --mask_ratio 0.75 --throw_ratio 0   # attention-driven masking only
    python amt.py --data imagenet --benchmark 20                     # AMT vs MAE step alone, no data
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
from torchvision import transforms as T

import common
from common import die

METHOD = "amt"


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
    amt: str = "on"                # on: AMT after epoch amt_start; off: plain MAE throughout
                                   # (the paper's baseline)
    mask_ratio: float = 0.45       # AMT: fraction of patches masked = reconstructed (official 0.45)
    throw_ratio: float = 0.40      # AMT: fraction thrown away (official 0.40; 0 = the masking-only ablation)
    amt_start: int = 0             # last plain-MAE epoch (0-indexed; -1: none, maps of the initial weights)
                                   # (paper 40)
    refresh_every: int = 1         # epochs between attention refreshes, the first after epoch amt_start
                                   # (paper 40)
    dec_dim: int = 512             # decoder width (paper 512)
    dec_depth: int = 8             # decoder blocks (paper 8)
    dec_heads: int = 16            # decoder heads (paper 16)
    norm_pix_loss: bool = True     # per-patch normalised pixel targets (MAE's recommended setting)


def preset(data: str, given: dict) -> dict:
    """ImageNet: the official MAE-AMT recipe (README); small data: the same mechanisms, scaled. Warm-up, AMT
    start and refresh interval are 10 % of --epochs (40 of 400), whatever --epochs is."""
    small = dict(model="vit_tiny", img_size=32, patch_size=4, epochs=400, batch_size=512, blr=1.5e-4,
                 weight_decay=0.05, dec_dim=128, dec_depth=4, dec_heads=4)
    p = {"imagenet": {**small, "model": "vit_base", "img_size": 224, "patch_size": 16, "batch_size": 128,
                      "accum_iter": 4, "dec_dim": 512, "dec_depth": 8, "dec_heads": 16},  # 8 x 128 x 4 = the
         # official 4096 images per step (4 GPUs x 128 x accum 8)
         "cifar10": small, "cifar100": small, "fashion-mnist": small,
         "stl10": {**small, "img_size": 96, "patch_size": 8, "batch_size": 256},
         "tiny-imagenet": {**small, "img_size": 64, "patch_size": 8},
         "folder": {**small, "img_size": 224, "patch_size": 16, "model": "vit_small", "batch_size": 128},
         # the bare command: about a minute on 2 CPU cores
         "synthetic": {**small, "model": "vit_micro", "epochs": 5, "batch_size": 64, "blr": 1e-3,
                       "dec_dim": 64, "dec_depth": 2, "warmup_epochs": 0.5, "amt_start": 0,
                       "refresh_every": 2, "vis_every": 50}}[data]
    tenth = max(1, given.get("epochs", p["epochs"]) // 10)
    return {"warmup_epochs": tenth, "amt_start": tenth, "refresh_every": tenth, **p}

def check_config(cfg: Config):
    """Every flag in its range and the combinations this file needs, at parse time:
    one line, nothing written."""
    c = common
    c.check_fields(cfg, {
        "model": c.one_of(*VIT_SIZES), "amt": c.one_of("on", "off"), "mask_ratio": c.fraction(),
        "throw_ratio": c.between(0, 1, open_hi=True), "amt_start": c.at_least(-1),
        "refresh_every": c.at_least(1), "dec_dim": c.at_least(1), "dec_depth": c.at_least(1),
        "dec_heads": c.at_least(1)})
    if cfg.img_size % cfg.patch_size:
        die(f"--img_size {cfg.img_size} is not a multiple of --patch_size {cfg.patch_size}; "
            "pick sizes that divide")
    if cfg.dec_dim % cfg.dec_heads:
        die(f"--dec_dim {cfg.dec_dim} is not a multiple of --dec_heads {cfg.dec_heads}")
    N = (cfg.img_size // cfg.patch_size) ** 2
    n_mask, n_throw = mask_counts(N, cfg.mask_ratio, cfg.throw_ratio)
    if not (0 < n_mask and n_mask + n_throw < N):
        die(f"--mask_ratio {cfg.mask_ratio} --throw_ratio {cfg.throw_ratio} leave {n_mask} masked and "
            f"{max(0, N - n_mask - n_throw)} visible of {N} patches; "
            "both need at least one (e.g. 0.45 and 0.40)")

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

def mask_counts(n, mask_ratio, throw_ratio):
    """Counts as official amt_masking_throwing: int(N r_m) and int(N (r_m + r_t)) (the float sum matters:
    0.45 + 0.40 = 0.8500000000000001, so 196 patches -> 88 masked, 78 thrown, 30 visible)."""
    n_mask = int(n * mask_ratio)
    return n_mask, int(n * (mask_ratio + throw_ratio)) - n_mask


def draw_order(weights):
    """(B, N) weights >= 0 -> (B, N) patch indices in the order of successive draws without replacement, each
    taking a remaining patch with probability w_i / sum(remaining w): sorting w_i / E_i, E_i ~ Exp(1), has
    that law (torch.multinomial does it on CPU).
    Zero weights come last; an all-zero row is drawn uniformly."""
    w = torch.where(weights.sum(1, keepdim=True) > 0, weights.float(), 1.0)
    return (w / torch.empty_like(w).exponential_()).argsort(dim=1, descending=True)  # (B, N)


def split_order(order, n_mask, n_throw):
    """Official amt_masking_throwing: the first n_mask drawn are masked, the next n_throw thrown, the rest
    visible -> mask, throw (B, N) bool; vis (B, K) visible indices;
    keep (B, N - n_throw) non-thrown, raster."""
    head = n_mask + n_throw
    pos = order.argsort(1)                                             # (B, N) draw position of each patch
    keep = torch.cat([order[:, :n_mask], order[:, head:]], 1).sort(1).values  # (B, N - n_throw)
    return pos < n_mask, (pos >= n_mask) & (pos < head), order[:, head:], keep


def patch_weights(maps, box, patch_size):
    """Official amtdatasets.py + patchify_map: stored maps (B, gh, gw) of the whole image follow the image
    through its crop box and flip (bilinear, pixel resolution),
    summed per patch -> (B, N) sampling weights."""
    B, gh, gw = maps.shape
    m = common.crop_map(maps, box, (gh * patch_size, gw * patch_size))  # (B, H, W)
    return m.view(B, gh, patch_size, gw, patch_size).sum((2, 4)).flatten(1)  # (B, N)


def attention_to_weights(attn):
    """Official update_mask: last block's [CLS] -> all-keys attention (B, heads, 1 + N) -> (B, N) in [0, 1]:
    drop the [CLS] key (no renormalisation), min-max each head over the patches, average the heads."""
    a = attn[:, :, 1:].float()                                         # (B, heads, N)
    a = a - a.amin(-1, keepdim=True)
    return (a / a.amax(-1, keepdim=True).clamp_min(1e-12)).mean(1)    # (B, N)


# ----------------------------------------------------------------------------
# Target

def patchify(images, p):
    """(B, 3, H, W) -> (B, N, p*p*3), patches in raster order, channel fastest inside a patch (MAE)."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


# ----------------------------------------------------------------------------
# Model

class Model(nn.Module):
    """MAE (ViT encoder on visible tokens, light decoder) whose hidden set is drawn from attention weights.
    forward(images, weights (B, N), n_mask, n_throw) -> (loss, stats, (pred, mask, throw, keep))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_vit(cfg.model, cfg.img_size, cfg.patch_size)
        D, Dd, g = self.encoder.dim, cfg.dec_dim, self.encoder.grid
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))        # starts every masked and thrown slot
        self.decoder = nn.ModuleList(Block(Dd, cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.decoder_norm, self.decoder_pred = (nn.LayerNorm(Dd, eps=1e-6),
                                                nn.Linear(Dd, cfg.patch_size ** 2 * 3))
        self.register_buffer("dec_pos", sincos_pos_embed(Dd, g, g)[None], persistent=False)  # (1, N, Dd)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder.modules()]:
            if isinstance(m, nn.Linear):  # MAE init: xavier-uniform linears, zero biases
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def decode(self, latent, vis, keep):
        """Official forward_decoder: all N slots start as the mask token, visible ones get their encoder
        outputs, positions are added, THEN thrown slots are deleted: 1 + N - n_throw tokens, [CLS] first."""
        x = self.decoder_embed(latent).float()  # (B, 1 + K, Dd) fp32 residual stream, as the encoder's
        B, N, Dd = x.shape[0], self.dec_pos.shape[1], x.shape[2]
        full = self.mask_token.expand(B, N, Dd).scatter(1, vis[..., None].expand(-1, -1, Dd), x[:, 1:])
        full = (full + self.dec_pos).gather(1, keep[..., None].expand(-1, -1, Dd))  # (B, N - T, Dd)
        x = torch.cat([x[:, :1], full], 1)                             # (B, 1 + N - T, Dd)
        for blk in self.decoder:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]         # (B, N - T, P)

    def forward(self, images, weights, n_mask, n_throw):
        mask, throw, vis, keep = split_order(draw_order(weights), n_mask, n_throw)
        pred = self.decode(self.encoder(images, keep=vis), vis, keep)  # (B, N - T, P), encoder on 1 + K
        # (B, N - T, P)
        target = patchify(images, self.cfg.patch_size).gather(1, keep[..., None].expand_as(pred))
        loss = amt_loss(pred, target, mask.gather(1, keep), self.cfg.norm_pix_loss)
        seen = (~(mask | throw)).float()  # stat: how much more attention the masked patches carry
        ratio = (weights * mask).sum() / mask.sum() / ((weights * seen).sum() / seen.sum()).clamp_min(1e-12)
        return loss, {"w_mask/vis": ratio}, (pred.detach(), mask, throw, keep)


@torch.no_grad()
def visualize(cfg, images, weights, out, path):
    """Rows: image | attention weights after the crop | masked (white) / thrown (grey) / visible (black) |
    the masked patches' reconstruction pasted into the visible ones (thrown: black)."""
    n, p, g = min(8, len(images)), cfg.patch_size, cfg.img_size // cfg.patch_size
    pred, mask, throw, keep = (t[:n].float() if t.is_floating_point() else t[:n] for t in out)
    mean, std = (torch.tensor(s, device=images.device).view(1, 3, 1, 1) for s in common.DATASETS[cfg.data][2])
    # (n, 3, H, W)
    up = lambda v: F.interpolate(v.view(n, 1, g, g).float(), scale_factor=p).expand(-1, 3, -1, -1)
    t = patchify(images[:n].float(), p)                                # (n, N, P)
    full = t.scatter(1, keep[..., None].expand_as(pred), pred)         # (n, N, P) predictions, raster order
    if cfg.norm_pix_loss:  # undo the target normalisation with the true patch statistics
        full = full * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
    full = torch.where(mask[..., None], full, t)                      # masked: predicted, others: the input
    full = full.view(n, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, g * p, g * p)  # unpatchify
    recon = torch.where(up(throw) > 0, 0.0, full * std + mean)
    rows = [images[:n].float() * std + mean, up(weights[:n] / weights[:n].amax(1, keepdim=True)),
            up(mask + throw / 2)]
    common.save_picture(path, rows + [recon], ["image", "attention", "masked/thrown", "reconstruction"])


# ----------------------------------------------------------------------------
# Loss

def amt_loss(pred, target, mask, norm_pix_loss):
    """Official forward_loss: per-patch MSE averaged over MASKED patches only;
    pred, target (B, M, P), mask (B, M) bool.
    Visible patches are in the sequence but not in the loss, thrown ones not even in the sequence.
    norm_pix_loss: each target patch standardised with its mean and UNBIASED variance, eps 1e-6 (MAE)."""
    target = target.float()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)                # (B, M)
    return (per_patch * mask).sum() / mask.sum()


class Encoder(nn.Module):
    """images -> (B, D) final-norm [CLS] (the official probe's feature);
    attention=True: the store's maps (B, N)."""

    def __init__(self, vit, attention=False):
        super().__init__()
        self.vit, self.attention = vit, attention

    def forward(self, images):
        if self.attention:
            return attention_to_weights(self.vit(images, return_attn=True)[1])  # (B, N)
        return self.vit(images)[:, 0]                                  # (B, D)


def load_encoder(ckpt, random_init=False):
    """Checkpoint dict -> frozen encoder module giving the probe features;
    random_init: same shape, untrained."""
    model = Model(Config(**ckpt["config"]))
    if not random_init:
        model.load_state_dict(ckpt["model"])
    return Encoder(model.encoder).eval()


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


def store_due(cfg, epoch):
    """The epoch after which the maps used in `epoch` are made (-1: the initial weights),
    or None (plain MAE)."""
    if cfg.amt == "on" and epoch > cfg.amt_start:
        return cfg.amt_start + (epoch - 1 - cfg.amt_start) // cfg.refresh_every * cfg.refresh_every


def train(cfg: Config):
    N = (cfg.img_size // max(1, cfg.patch_size)) ** 2
    n_mask, n_throw = mask_counts(N, cfg.mask_ratio, cfg.throw_ratio)
    if cfg.amt not in ("on", "off") or cfg.refresh_every < 1:
        die(f"--amt takes on or off (got {cfg.amt}), "
            f"--refresh_every a number of epochs >= 1 (got {cfg.refresh_every})")
    if not (0 < n_mask and 0 <= n_throw and n_mask + n_throw < N):
        die(f"--mask_ratio {cfg.mask_ratio} --throw_ratio {cfg.throw_ratio} leave {n_mask} masked and "
            f"{max(0, N - n_mask - n_throw)} visible of {N} patches; "
            "both need at least one (e.g. 0.45 and 0.40)")
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same initial weights (and EMA copies) on every rank
    log = Logger("" if cfg.benchmark else cfg.out_dir, master)  # --benchmark writes nothing
    handle_sigterm()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # data: the crop also returns its box so that the stored map can follow the image
    dataset = (common.build_dataset(cfg.data, cfg.data_dir, True, subset=cfg.subset, img_size=cfg.img_size)
               if not cfg.benchmark else  # --benchmark: random images made on the device
               common.benchmark_images(cfg.batch_size * world * cfg.accum_iter, cfg.img_size, device))
    transform = common.CropWithBox(cfg.data, cfg.img_size, scale=(0.2, 1.0))
    loader = common.make_loader(dataset, transform, cfg.batch_size, True, cfg.seed, rank, world,
                                cfg.num_workers, with_index=True,
                                batched=common.BatchCrop(cfg.data, cfg.img_size, with_box=True),
                                device=device)
    # refresh pass: the whole image squashed to a square, bilinear
    # (official update_mask loader: Resize((224, 224)))
    squash = T.Compose([T.Resize((cfg.img_size,) * 2), T.ToTensor(), common.normalize(cfg.data)])
    squash_batched = common.BatchEval(cfg.data, cfg.img_size, squash=True)  # the same, for in-memory sets
    eff_batch = cfg.batch_size * world * cfg.accum_iter  # images per optimizer step
    steps_per_epoch = len(dataset) // max(1, eff_batch)  # optimizer steps
    if steps_per_epoch == 0 or cfg.accum_iter < 1:
        die(f"--batch_size {cfg.batch_size} x {world} GPUs x --accum_iter {cfg.accum_iter} must be >= 1 and "
            f"at most the dataset ({len(dataset)} images)")
    total = cfg.epochs * steps_per_epoch
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    # model and optimizer; the attention store lives on the training device (0.5 GB fp16 at ImageNet), so the
    # per-step gather never waits for a copy from pageable host memory
    model = Model(cfg).to(device)
    torch.manual_seed(cfg.seed + rank)  # then one stream per rank: masks, drop path
    lr = cfg.blr * eff_batch / 256
    # timm add_weight_decay: [CLS] and mask token decayed (official)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    store, store_epoch = None, None  # (n_images, gh, gw) fp16 maps, and the epoch after which they were made

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
        step, store, store_epoch = ckpt["step"], ckpt.get("store"), ckpt.get("store_epoch")
        store = None if store is None else store.to(device)
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
              f"(the paper's ImageNet run: 4096 = 4 GPUs x 128 x accum 8)"
              f" | lr {lr:.3e} (blr {cfg.blr:.2e} x {eff_batch}/256)"
              f" | {steps_per_epoch} steps/epoch | {stop} steps | "
              + ("--amt off: plain MAE" if cfg.amt == "off" else
                 f"AMT after epoch {cfg.amt_start}: {n_mask} masked / {n_throw} thrown / "
                 f"{N - n_mask - n_throw} visible"))

    fwd = torch.compile(model, **common.COMPILE) if cfg.compile else model  # before DDP; we save `model`
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        state = {"method": METHOD, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": rng_states(world),
                 "store": None if store is None else store.cpu(), "store_epoch": store_epoch}
        if master:
            save_checkpoint(path, state)

    def train_step(batch, micro, step, amt_phase):
        """One micro-batch of the loop ((images, crop boxes), labels, indices): the masks' weights,
        forward and backward; after the last of accum_iter, the optimizer step.
        The loop and --benchmark both run it."""
        (images, box), _, idx = batch
        images = images.to(device, non_blocking=True)
        weights = patch_weights(store[idx.to(device, non_blocking=True)], box.to(device, non_blocking=True),
                                cfg.patch_size) if amt_phase else torch.ones(len(images), N, device=device)
        # weights (B, N): the stored maps of the images' crops in the AMT phase, uniform in the MAE phase
        counts = (n_mask, n_throw) if amt_phase else (N - int(N * 0.25), 0)  # MAE's 75 %, keeps int(N/4)
        for g in opt.param_groups:
            g["lr"] = cosine_schedule(step, total, lr, 0.0, warmup=int(cfg.warmup_epochs * steps_per_epoch))
        if world > 1:  # DDP all-reduces the gradients only on the micro-batch that ends an optimizer step
            fwd.require_backward_grad_sync = micro == cfg.accum_iter - 1
        with ctx:
            loss, stats, out = fwd(images, weights, *counts)
        (loss / cfg.accum_iter).backward()  # MAE: micro-batch gradients add up to the mean over the batch
        if micro == cfg.accum_iter - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss, stats, (images, weights, *counts), out

    if cfg.benchmark:  # the step alone on accum_iter micro-batches of device-made images and random maps
        it, gen = iter(loader), torch.Generator(device).manual_seed(cfg.seed)
        batches = [next(it) for _ in range(cfg.accum_iter)]
        store = torch.rand(len(dataset), *(model.encoder.grid,) * 2, device=device, generator=gen).half()
        res = {}
        for phase in (["AMT", "MAE"] if cfg.amt == "on" else ["MAE"]):  # MAE: the warm-up phase = --amt off
            n_m, n_t = (n_mask, n_throw) if phase == "AMT" else (N - int(N * 0.25), 0)
            res[phase] = common.benchmark(
                METHOD, batches, lambda b, micro, i, amt=phase == "AMT": train_step(b, micro, i, amt),
                lambda out: count_flops((model,), lambda m: m(*out[2])[0], ctx), cfg.benchmark, eff_batch,
                device, device_peak(device, cfg.peak_tflops), log,
                note=f"{phase} phase: {n_m} masked, {n_t} thrown, encoder on {N - n_m - n_t} of {N} patches")
        if len(res) == 2:  # the paper's token arithmetic: AMT's step against MAE's at the same size
            log.print(f"benchmark | {METHOD} | AMT / MAE: time {res['AMT']['ms'] / res['MAE']['ms']:.2f}x | "
                      f"FLOPs {res['AMT']['flops'] / res['MAE']['flops']:.2f}x")
        if world > 1:
            dist.destroy_process_group()
        return res

    # the loop
    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, checked on log steps
    control, stop_now = RunControl(world, cfg.save_every_min), False  # SIGTERM / timed save, every step
    t_start, t_log, data_wait, log_steps, step0 = time.time(), time.time(), 0.0, 0, step
    epoch, micro = step // steps_per_epoch, 0  # micro: micro-batches accumulated towards the next step
    while step < stop:
        due = store_due(cfg, epoch)
        if due is not None and store_epoch != due:  # fresh maps from the current encoder
            t0 = time.time()
            # (n_images, N), dataset order; rank-sharded and gathered
            w, _ = common.extract(Encoder(model.encoder, attention=True), dataset, squash, cfg.batch_size,
                                  device, cfg.num_workers, batched=squash_batched)
            # fp16
            store, store_epoch = w.half().view(len(dataset), *(model.encoder.grid,) * 2).to(device), due
            model.train()
            log.print(f"attention store: {len(dataset)} maps after epoch {due} in {time.time() - t0:.1f} s")
            # the log's ms and img/s are training steps only; the summary counts all
            t_log += time.time() - t0
        loader.sampler.set_epoch(epoch, skip=(step % steps_per_epoch) * cfg.accum_iter * cfg.batch_size)
        t_data = time.time()
        for batch in loader:
            data_wait += time.time() - t_data
            loss, stats, inputs, out = train_step(batch, micro, step, due is not None)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            micro = (micro + 1) % cfg.accum_iter
            if micro:  # not yet the last micro-batch of this optimizer step
                t_data = time.time()
                continue
            step += 1
            log_steps += 1
            # uses this step's masks: no RNG
            if master and cfg.vis_every and (step % cfg.vis_every == 0 or step == stop):
                visualize(cfg, *inputs[:2], out, os.path.join(cfg.out_dir, f"vis_{step:07d}.png"))
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
    flops = count_flops((model,), lambda m: m(*inputs)[0], ctx)  # the last step again, untimed
    log.print(f"summary | {METHOD} | steps {step} | {imgs / wall:.0f} img/s total"
              f" | {imgs / wall / world:.0f} img/s/gpu"
              f" | peak mem {peak:.2f} GB | wall {wall:.0f} s | loss {loss.item():.4f}"
              + flops_summary(flops * cfg.accum_iter, step - step0, wall, device, cfg.peak_tflops))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_config())
