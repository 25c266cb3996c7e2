"""DTM — Dynamic Token Morphing: feature-distillation masked image modeling with morphed targets.

T. Kim, B. Heo, D. Han, "Morphing Tokens Draw Strong Masked Image Models", ICLR 2025, arXiv 2401.00254
(v1: "Masked Image Modeling via Dynamic Token Morphing"; not LUT, "Learning with Unmasked Tokens...").
Official code: github.com/naver-ai/dtm (BEiT v2 code base + ToMe merging).

A student ViT sees a block-masked image (mask token at hidden patches); one linear head predicts a
feature for EVERY patch. A frozen teacher (CLIP ViT-B/16 in the paper) sees the unmasked image and gives
per-patch targets. Neighbouring teacher tokens of one object disagree, so the target tokens are grouped
by k rounds of ToMe bipartite matching and every token of BOTH maps is replaced by its group mean
("morphing"); n, k random each step, L = 2 morphings averaged; smooth-L1 (beta 2) over all positions.

Differs from the others in: teacher features of all patches as targets; one data-dependent partition
morphs predictions and targets alike; `--morph off` is the paper's token-wise baseline; `--teacher clip`
(the paper's; local OpenAI file), `ema` (momentum copy of the student, per-token LayerNorm'd targets; the
default, needs no weights; not in the paper, which reports an unspecified BYOL variant), `random` (tests).

Deviations from the official code:
- shared ViT: sin-cos positions, not BEiT v2's relative position bias; qkv k-bias; xavier init (head:
  torch's default); bf16 autocast, not fp16 AMP (matching in fp32/TF32); the CLIP tower keeps its
  residual stream fp32 (OpenAI's casts it to the autocast dtype: fp16 there, bf16 would be 8x coarser);
- init: no BEiT rescale of block l's attention-output and second MLP weights by 1/sqrt(2l) (one init for
  all five files; LayerScale 0.1 damps those branches already); mask token normal std 0.02 cut at +-2
  (official: cut at +-1 std, i.e. +-0.02); --data imagenet without --teacher clip is not the paper's recipe
  (the start-up log says so);
- block masks for the whole batch on the device in 30 placement attempts (BEiT's stop after 10 failures
  in a row kept; >99% of images stop by then), topped up to the exact count as in BEiT v2;
- one n_max, k_max for both levels (code defaults n1 = n2, k1 = k2); --accum_iter as MAE's (the official
  one drops the accumulated gradients), not exactly a bigger batch: each micro-batch draws its own block
  masks and (n, k) schedule; a CLIP teacher gets the student's crop and normalisation (ImageNet's at
  --data imagenet, as official), resized to 224 px, tokens average-pooled to the student grid (Sec. 2.3);
- in-memory sets (all but ImageNet and large folders): colour jitter (before the crop, as official) and
  bicubic crops in batches on the device (common.py): grid sampling (cubic a = -0.75, PIL's -0.5), a box
  larger than the output bilinear with area averaging (no batched antialiased bicubic); ImageNet and large
  folders: decoded once per step in the main process (a reduced JPEG scale on the CPU where the crop allows
  it, nvJPEG on CUDA), cropped per image (PIL bicubic / antialiased on CUDA), then jittered: the jitter acts
  on the crop, its contrast toward the whole image's mean grey (equal to jitter-then-crop up to clipping).
Where the paper's text differs the code is followed: even/odd split with token 0 protected (not random),
tokens to remove sampled (not groups left), 0/1 groups divided by size (= the paper's row-normalised
matrices), loss over the N broadcast positions (a group of m counts m times).

Run:
    python dtm.py                                                       # ~1 min CPU run, synthetic data
    python dtm.py --data cifar10 [--morph off]                           # DTM / token-wise baseline
    torchrun --nproc_per_node=8 dtm.py --data imagenet --data_dir /path/to/imagenet \\
        --teacher clip --teacher_ckpt ViT-B-16.pt                        # paper recipe, 300 epochs
"""
import copy
import dataclasses
import hashlib
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
from torchvision.transforms import ColorJitter

import common
from common import die

METHOD = "dtm"


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
    teacher: str = "ema"           # clip (paper: OpenAI CLIP ViT-B/16) | ema (momentum copy) | random (tests)
    teacher_ckpt: str = ""         # --teacher clip: local OpenAI file (ViT-B-16.pt archive or a state dict)
    ema_momentum: float = 0.996    # --teacher ema: momentum at step 0, cosine to 1 (spec Sec. 6.2)
    morph: str = "on"              # on | off (token-wise targets: the paper's no-morphing baseline)
    morph_levels: int = 2          # L morphings per step, losses averaged (code default 2)
    morph_n_max: int = 0           # tokens merged per level ~ U{0..n_max}; 0 = N (code: 196 = N)
    morph_k_max: int = 14          # matching rounds per level ~ U{1..k_max} (code 14; scaled recipe 8)
    mask_ratio: float = 75 / 196   # exactly round(ratio * N) hidden per image (paper 75 of 196)
    min_mask_block: int = 16       # smallest masking block in patches (paper 16; scaled recipe 4)
    layer_scale: float = 0.1       # LayerScale init of the student (paper 0.1 for Small/Base)
    drop_path: float = 0.0         # student stochastic depth; official script default 0.1, but its 300-epoch
                                   # recipe (BEiT v2's, spec 6.1) and the scaled one (6.2) use 0:
                                   # all presets 0
    loss_beta: float = 2.0         # smooth-L1 beta (code default loss)


def preset(data: str, given: dict) -> dict:
    """ImageNet: the code's values, BEiT v2's 300-epoch ones where DTM's template has a placeholder
    (spec Sec. 6.1); small data: the spec's scaled recipe (6.2). lr = blr * sqrt(batch / 256) is the
    paper's 1.5e-3 * sqrt(batch / 2048); drop path 0, AdamW betas (0.9, 0.98), clip 3, min lr 1e-5."""
    small = dict(model="vit_tiny", img_size=32, patch_size=4, epochs=200, batch_size=512,
                 blr=1.5e-3 / 8 ** 0.5, weight_decay=0.05, warmup_epochs=10, mask_ratio=0.4,
                 min_mask_block=4, morph_k_max=8)
    big = dict(small, model="vit_base", img_size=224, patch_size=16, epochs=300, batch_size=256,  # x 8 GPUs
               mask_ratio=75 / 196, min_mask_block=16, morph_k_max=14)
    return {"imagenet": big, "folder": {**big, "model": "vit_small"}, "cifar10": small, "cifar100": small,
            "fashion-mnist": small, "tiny-imagenet": {**small, "img_size": 64, "patch_size": 8},
            "stl10": {**small, "img_size": 96, "patch_size": 8, "min_mask_block": 12, "morph_k_max": 12},
            "synthetic": {**small, "model": "vit_micro", "epochs": 5, "batch_size": 64, "warmup_epochs": 0.5,
                          "vis_every": 50},  # the bare command: about a minute on 2 CPU cores
            }[data]

def check_config(cfg: Config):
    """Every flag in its range and the combinations this file needs, at parse time:
    one line, nothing written."""
    c = common
    c.check_fields(cfg, {
        "model": c.one_of(*VIT_SIZES), "teacher": c.one_of("clip", "ema", "random"),
        "ema_momentum": c.between(0, 1), "morph": c.one_of("on", "off"),
        "mask_ratio": c.fraction(), "min_mask_block": c.at_least(1), "layer_scale": c.at_least(0),
        "loss_beta": c.at_least(0), "drop_path": c.between(0, 1, open_hi=True)})
    if cfg.img_size % cfg.patch_size:
        die(f"--img_size {cfg.img_size} is not a multiple of --patch_size {cfg.patch_size}; "
            "pick sizes that divide")
    N = (cfg.img_size // cfg.patch_size) ** 2
    if not 0 < round(cfg.mask_ratio * N) < N:
        die(f"--mask_ratio {cfg.mask_ratio} hides {round(cfg.mask_ratio * N)} of {N} patches; "
            "it must hide some but not all")
    if cfg.teacher == "clip" and not os.path.isfile(cfg.teacher_ckpt):
        die("--teacher clip needs --teacher_ckpt, a local ViT-B-16.pt file; "
            f"{cfg.teacher_ckpt or '(none)'} is not a file")

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

def block_mask(B, gh, gw, num_masked, min_block=16, device="cpu", attempts=30):
    """BEiT block-wise masking, exactly `num_masked` per image (spec Sec. 3), all images at once: a block
    of area ~ U[min_block, budget left], aspect log-uniform in [0.3, 1/0.3], at a random place, is kept
    if it adds >= 1 new patch within the budget; an image stops after 10 failures in a row; random
    extra patches then make the count exact. -> (B, N) bool, True = hidden."""
    if not 0 < num_masked < gh * gw:
        die(f"--mask_ratio hides {num_masked} of {gh * gw} patches; it must hide some but not all")
    rows, cols = (torch.arange(gh, device=device).view(1, gh, 1),
                  torch.arange(gw, device=device).view(1, 1, gw))
    mask = torch.zeros(B, gh, gw, dtype=torch.bool, device=device)
    fails = torch.zeros(B, 1, 1, dtype=torch.long, device=device)
    for _ in range(attempts):  # a loop over placement attempts, never over images
        budget = num_masked - mask.sum((1, 2), keepdim=True)              # (B, 1, 1)
        u = torch.rand(4, B, 1, 1, device=device)
        area = min_block + u[0] * (budget - min_block)                    # random.uniform(min, budget)
        aspect = torch.exp(math.log(0.3) * (1 - 2 * u[1]))
        h, w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
        top, left = (u[2] * (gh - h + 1)).long(), (u[3] * (gw - w + 1)).long()  # randint(0, gh - h)
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, gh, gw)
        new = (box & ~mask).sum((1, 2), keepdim=True)                     # (B, 1, 1)
        ok = (fails < 10) & (h < gh) & (w < gw) & (new > 0) & (new <= budget)
        mask |= box & ok
        fails = torch.where(ok, 0, fails + 1)
    score = mask.flatten(1) + torch.rand(B, gh * gw, device=device)      # (B, N) masked ones >= 1
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(num_masked, 1).indices, True)


# ----------------------------------------------------------------------------
# Target

class CLIPVisual(nn.Module):
    """OpenAI CLIP image tower from an OpenAI state dict (sizes read from it; 64-d heads): (B, 3, S, S)
    -> ln_post(patch tokens) @ proj, [CLS] dropped, not L2-normalised (spec Sec. 2.2): (B, N, 512) for
    ViT-B/16. CLIP's residual block is torch's pre-norm encoder layer with QuickGELU. fp32 weights."""

    def __init__(self, sd):
        super().__init__()
        width, _, patch, _ = sd["conv1.weight"].shape
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
        self.input_size = patch * math.isqrt(len(sd["positional_embedding"]) - 1)  # 224 for ViT-B/16
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        for k in ("class_embedding", "positional_embedding", "proj"):     # fp32 (OpenAI's file is fp16)
            self.register_parameter(k, nn.Parameter(torch.zeros(sd[k].shape)))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(
            width, width // 64, 4 * width, dropout=0.0, activation=lambda x: x * torch.sigmoid(1.702 * x),
            layer_norm_eps=1e-5, batch_first=True, norm_first=True) for _ in range(depth))  # QuickGELU
        for old, new in [("transformer.resblocks.", "blocks."), (".attn.", ".self_attn."),
                         (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".mlp.c_fc.", ".linear1."),
                         (".mlp.c_proj.", ".linear2.")]:
            sd = {k.replace(old, new): v for k, v in sd.items()}          # OpenAI names -> torch's
        self.load_state_dict(sd)                                           # copied into the fp32 weights

    def forward(self, images):
        # (B, N, W) fp32 stream (see header)
        x = self.conv1(images).flatten(2).transpose(1, 2).float()
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1)   # (B, 1+N, W)
        x = self.ln_pre(x + self.positional_embedding)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_post(x[:, 1:]) @ self.proj.to(x.dtype)              # (B, N, C)


def load_clip_visual(path):
    """CLIP image tower from a local OpenAI file: the TorchScript archive (ViT-B-16.pt) or a state dict
    with OpenAI key names (visual.conv1.weight, ...). Never downloads."""
    if not os.path.isfile(path):
        die(f"--teacher clip needs a local OpenAI CLIP file; --teacher_ckpt {path!r} is not a file "
            "(nothing is downloaded), or use --teacher ema")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()     # OpenAI's release format
        except Exception as e:
            die(f"cannot read --teacher_ckpt {path} ({type(e).__name__}): want ViT-B-16.pt or a state dict")
    sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")} or sd
    if "conv1.weight" not in sd or "proj" not in sd:
        die(f"--teacher_ckpt {path} holds no CLIP image tower (no visual.conv1.weight / visual.proj)")
    tower = CLIPVisual(sd)
    # checkpoints keep this, not weights
    tower.file = {"path": os.path.abspath(path), "sha256": sha256_of(path)}
    return tower


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Model

class Model(nn.Module):
    """Student ViT (layer scale, mask token) + one linear head on all patches (Sec. 2.1; no decoder),
    and the frozen teacher (no gradients, not in the optimizer). targets(images) -> (B, N, C);
    forward(images, targets) -> (loss, stats)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.morph not in ("on", "off"):
            die(f"unknown --morph {cfg.morph}; choose on or off")
        for flag, least in (("morph_levels", 1), ("morph_k_max", 1), ("morph_n_max", 0)):
            if getattr(cfg, flag) < least:
                die(f"--{flag} {getattr(cfg, flag)} is impossible: use >= {least} (no morphing: --morph off)")
        self.cfg = cfg
        self.encoder = build_vit(cfg.model, cfg.img_size, cfg.patch_size, layer_scale=cfg.layer_scale,
                                 drop_path=cfg.drop_path)
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, self.encoder.dim), std=0.02))
        if cfg.teacher == "clip":
            self.teacher = load_clip_visual(cfg.teacher_ckpt)
        elif cfg.teacher == "ema":  # starts as the student, then follows it (ema_update); no drop path
            self.teacher = copy.deepcopy(self.encoder)
            for m in self.teacher.modules():
                if isinstance(m, DropPath):
                    m.p = 0.0
        elif cfg.teacher == "random":
            with torch.random.fork_rng(devices=[]):  # fixed weights; the training RNG stream is untouched
                torch.manual_seed(0)
                self.teacher = build_vit(cfg.model, cfg.img_size, cfg.patch_size)
        else:
            die(f"unknown --teacher {cfg.teacher}; choose clip, ema or random")
        self.teacher.requires_grad_(False)  # no dropout or drop path in it: train/eval mode is moot
        self.head = nn.Linear(self.encoder.dim,
                              self.teacher.proj.shape[1] if cfg.teacher == "clip" else self.encoder.dim)

    def mask_and_schedule(self, B, gh, gw, device):
        """Block mask (B, N) and [(r_l, k_l)] for this step, shared by the batch (Sec. 3, 4.1)."""
        mask = block_mask(B, gh, gw, round(self.cfg.mask_ratio * gh * gw), self.cfg.min_mask_block, device)
        if self.cfg.morph == "off":  # the baseline: token-wise targets
            return mask, [(0, 1)]
        return mask, sample_schedule(self.cfg.morph_levels, self.cfg.morph_n_max or gh * gw,
                                     self.cfg.morph_k_max)

    @torch.no_grad()
    def targets(self, images):
        """Per-patch targets of the unmasked image (the student's crop) on the student grid: (B, N, C)
        fp32. Runs outside DDP: the teacher has no trainable parameters."""
        gh, gw = images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size
        if self.cfg.teacher == "clip":  # ln_post(tokens) @ proj, raw (Sec. 2.2), at the tower's 224 px
            s = self.teacher.input_size
            x = self.teacher(F.interpolate(images, (s, s), mode="bicubic") if images.shape[-1] != s
                             else images)
            g = math.isqrt(x.shape[1])  # grids differ: average-pool the token map (spec Sec. 2.3)
            x = F.adaptive_avg_pool2d(x.transpose(1, 2).unflatten(2, (g, g)), (gh, gw))  # (B, C, gh, gw)
            return x.flatten(2).transpose(1, 2).float()                  # (B, N, C)
        z = self.teacher(images)[:, 1:].float()                          # (B, N, D) final-norm tokens
        return F.layer_norm(z, z.shape[-1:])  # per-token LN keeps self-distilled targets in scale

    def forward(self, images, target):
        gh, gw = images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size
        mask, schedule = self.mask_and_schedule(len(images), gh, gw, images.device)  # (B, N)
        z = self.encoder(images, mask=mask, mask_token=self.mask_token)   # (B, 1+N, D)
        pred = self.head(z[:, 1:])                                        # (B, N, C); [CLS] unused
        loss, groups = dtm_loss(pred, target, schedule, self.cfg.loss_beta)
        # ~0: a collapsed EMA teacher
        return loss, {"groups": groups, "tgt_std": target.std(dim=(0, 1)).mean()}

    @torch.no_grad()
    def ema_update(self, momentum):
        """--teacher ema: teacher <- momentum * teacher + (1 - momentum) * student encoder."""
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.lerp_(s.detach(), 1.0 - momentum)

    def trained_state(self):
        """What a checkpoint keeps: the state without a CLIP tower (frozen, ~344 MB: its file is named)."""
        clip = self.cfg.teacher == "clip"
        return {k: v for k, v in self.state_dict().items() if not (clip and k.startswith("teacher."))}

    def load_trained_state(self, ckpt):
        """Inverse of trained_state: the CLIP tower is the one just read from --teacher_ckpt, which must be
        the file the run started with (same sha256)."""
        saved, now = ckpt.get("teacher_file"), getattr(self.teacher, "file", None)
        if saved and (now is None or now["sha256"] != saved["sha256"]):
            have = (f"--teacher_ckpt {now['path']} differs" if now else
                    f"this command has --teacher {self.cfg.teacher}")
            die(f"this run's CLIP teacher is {saved['path']} (sha256 {saved['sha256'][:12]}...) but {have}: "
                "restore that file and pass it as --teacher_ckpt, or start a new --out_dir")
        if now and not saved:
            die(f"this run was trained with --teacher {ckpt['config']['teacher']}, not clip; "
                "resume with that teacher or start a new --out_dir")
        tower = {k: v for k, v in self.state_dict().items() if k.startswith("teacher.")} if saved else {}
        self.load_state_dict({**ckpt["model"], **tower})

    @torch.no_grad()
    def visualize(self, images, path):
        """Rows: the input; the level-1 morphing groups as coloured regions over it; the mask."""
        x, p = images[:8].float(), self.cfg.patch_size
        n, gh, gw = len(x), x.shape[-2] // p, x.shape[-1] // p
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            mask, [(r, k), *_] = self.mask_and_schedule(n, gh, gw, x.device)
        G = morph_partition(self.targets(x), r, k)                       # (n, groups, N)
        gid = G.argmax(1)                                                 # (n, N) group of every patch
        # (n, N, 3)
        colours = torch.rand(gh * gw, 3, generator=torch.Generator().manual_seed(0)).to(x.device)[gid]
        single = (G.sum(-1).gather(1, gid) == 1).float()                  # (n, N) tokens left alone
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                     for v in common.DATASETS[self.cfg.data][2])
        up = lambda m: F.interpolate(m.reshape(n, -1, gh, gw).float(), scale_factor=p)  # (n, c, N) -> pixels
        shown = (x * std + mean).clamp(0, 1)
        tint = 0.35 * shown + 0.65 * up(colours.transpose(1, 2))          # a colour per group over the image
        tint = torch.lerp(tint, shown, up(single))                         # singletons: the plain image
        rows = [shown, tint, shown * (1 - 0.75 * up(mask))]                # input, groups, masked dark
        common.save_picture(path, rows, ["image", f"groups ({r} merges x {k})", "masked (dark)"])


# ----------------------------------------------------------------------------
# Loss

def per_round_r(n, k, n_max):
    """Tokens merged per round when a level removes n tokens in k rounds (Sec. 4.1): ceil(n / k), or
    floor(n / k) when ceil(n / k) * k would exceed n_max."""
    return n // k if -(-n // k) * k > n_max else -(-n // k)


@torch.compiler.disable  # Python ints that shape the graph: eager under --compile
def sample_schedule(levels, n_max, k_max):
    """Dynamic schedule: n ~ U{0..n_max}, k ~ U{1..k_max} per level -> [(r_l, k_l)] (Sec. 4.1)."""
    n, k = torch.randint(0, n_max + 1, (levels,)).tolist(), torch.randint(1, k_max + 1, (levels,)).tolist()
    return [(per_round_r(a, b, n_max), b) for a, b in zip(n, k)]


def merge_round(sums, source, r):
    """One round of ToMe bipartite soft matching with token 0 protected (Sec. 4.2) on the current
    groups: sums (B, t, C) feature sums, source (B, t, N) 0/1 membership -> t - min(r, (t-1)//2) rows.
    Cosine of a sum = cosine of the size-weighted mean, and merging adds both, as ToMe's merge_wavg."""
    r = min(r, (sums.shape[1] - 1) // 2)  # a round merges at most half of the unprotected tokens
    if r <= 0:
        return sums, source
    m = sums / sums.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, tA, tB) cosine, even (A) vs odd (B) slots
    scores[:, 0] = -math.inf                        # token 0 is never merged (ToMe's [CLS] guard)
    best, best_b = scores.max(dim=-1)               # (B, tA) best B partner of every A token
    order = best.argsort(dim=-1, descending=True)   # (B, tA) the r best-matched A tokens merge away
    src, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # (B, r), (B, tA - r) in original order
    v = torch.cat([sums, source], dim=-1)           # (B, t, C + N) features and membership merge alike
    idx = lambda i: i[..., None].expand(-1, -1, v.shape[-1])
    a, b = v[:, ::2], v[:, 1::2]
    b = b.scatter_add(1, idx(best_b.gather(1, src)), a.gather(1, idx(src)))  # sources into partners
    v = torch.cat([a.gather(1, idx(kept)), b], dim=1)  # (B, t - r, C + N): kept A, then B (re-ordered)
    return v.split([sums.shape[-1], source.shape[-1]], dim=-1)


@torch.no_grad()
def morph_partition(target, r, rounds):
    """Morphing matrix G (B, n, N), 0/1, one 1 per column (row g = the positions of group g), from
    `rounds` rounds on the targets, similarities on the merged features (Sec. 4.3). fp32."""
    with torch.autocast(target.device.type, enabled=False):
        sums = target.float()
        source = torch.eye(sums.shape[1], device=sums.device).expand(len(sums), -1, -1)  # (B, N, N)
        for _ in range(rounds):
            sums, source = merge_round(sums, source, r)
    return source                                                          # (B, n, N)


def morph(G, X):
    """Every token replaced by the mean of its group: G^T diag(1/|g|) G X (Sec. 4.4). (B, N, C)."""
    means = (G @ X) / (G.sum(-1, keepdim=True) + 1e-6)                     # (B, n, C)
    return G.transpose(1, 2) @ means                                       # (B, N, C)


@torch.compiler.disable  # data-dependent partitions: eager under --compile
def dtm_loss(pred, target, schedule, beta=2.0):
    """Mean over levels of smooth-L1(beta) between morphed predictions and morphed targets, over ALL
    positions (Sec. 5); G from the targets only; r = 0 is token-wise. -> (loss, mean #groups), 0-d."""
    with torch.autocast(pred.device.type, enabled=False):
        pred, target, losses, groups = pred.float(), target.float().detach(), [], 0.0
        for r, rounds in schedule:
            G = morph_partition(target, r, rounds)                         # (B, n, N)
            p, t = (morph(G, pred), morph(G, target)) if r else (pred, target)
            losses.append(F.smooth_l1_loss(p, t, beta=beta))
            groups += G.shape[1] / len(schedule)
    return torch.stack(losses).mean(), torch.tensor(groups)  # a tensor: no float specialisation in --compile


class Encoder(nn.Module):
    """What the probe sees: images -> (B, D), the mean of the final-norm patch tokens (the student's
    [CLS] gets no loss in DTM; the paper fine-tunes on mean-pooled tokens too)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit(images)[:, 1:].mean(1)                             # (B, D)


def load_encoder(ckpt, random_init=False):
    """Checkpoint dict -> frozen student encoder (random_init: same shape, untrained). The teacher is
    not rebuilt, so probing a CLIP-teacher run needs no CLIP file."""
    cfg = Config(**ckpt["config"])
    vit = build_vit(cfg.model, cfg.img_size, cfg.patch_size, layer_scale=cfg.layer_scale)
    if not random_init:
        vit.load_state_dict({k[8:]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")})
    return Encoder(vit).eval()


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

    # data: colour jitter 0.4, flip, RandomResizedCrop(scale 0.2-1, bicubic) as BEiT v2 / DTM
    dataset = (common.build_dataset(cfg.data, cfg.data_dir, True, subset=cfg.subset, img_size=cfg.img_size)
               if not cfg.benchmark else  # --benchmark: random images made on the device
               common.benchmark_images(cfg.batch_size * world * cfg.accum_iter, cfg.img_size, device))
    transform = common.mim_transform(cfg.data, cfg.img_size, scale=(0.2, 1.0))
    transform.transforms.insert(0, ColorJitter(0.4, 0.4, 0.4))
    batched = common.BatchCrop(cfg.data, cfg.img_size, scale=(0.2, 1.0), source_jitter=(0.4, 0.4, 0.4, 0.0))
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
    torch.manual_seed(cfg.seed + rank)  # then one stream per rank: masks, drop path
    lr = cfg.blr * math.sqrt(eff_batch / 256)  # DTM scales lr with sqrt(effective batch)
    # BEiT v2: pos_embed, cls_token exempt; mask token decayed
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, skip=("cls_token",)), lr=lr,
                            betas=(0.9, 0.98), fused=device.type == "cuda")

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
            model.load_trained_state(ckpt)  # a CLIP tower: from its file, checked by sha256
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
              f"(the paper's ImageNet run: 2048, BEiT v2's recipe)"
              f" | lr {lr:.3e} (blr {cfg.blr:.2e} x sqrt({eff_batch}/256))"
              f" | {steps_per_epoch} steps/epoch | {stop} steps")
    if cfg.data == "imagenet" and cfg.teacher != "clip":
        log.print("note: the paper's ImageNet recipe distils a CLIP ViT-B/16 teacher "
                  "(--teacher clip --teacher_ckpt ViT-B-16.pt); this run uses the "
                  f"{dict(ema='EMA', random='frozen random')[cfg.teacher]} teacher")

    fwd = torch.compile(model, **common.COMPILE) if cfg.compile else model  # before DDP; we save `model`
    # the teacher's target function is compiled too
    targets = torch.compile(model.targets, **common.COMPILE) if cfg.compile else model.targets
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        state = {"method": METHOD, "config": dataclasses.asdict(cfg), "model": model.trained_state(),
                 "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": rng_states(world)}
        if cfg.teacher == "clip":  # the frozen tower's file path and sha256, not its weights
            state["teacher_file"] = model.teacher.file
        if master:
            save_checkpoint(path, state)

    def train_step(batch, micro, step):
        """One micro-batch of the loop (images, labels): teacher targets, forward and backward; after the last
        of accum_iter, the clipping, optimizer and EMA teacher steps. The loop and --benchmark both run it."""
        images = batch[0].to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = cosine_schedule(step, total, lr, 1e-5, warmup=int(cfg.warmup_epochs * steps_per_epoch))
        if world > 1:  # DDP all-reduces the gradients only on the micro-batch that ends an optimizer step
            fwd.require_backward_grad_sync = micro == cfg.accum_iter - 1
        with ctx:
            target = targets(images)  # the teacher runs outside DDP (no trainable params)
            loss, stats = fwd(images, target)
        (loss / cfg.accum_iter).backward()  # MAE: micro-batch gradients add up to the mean over the batch
        if micro == cfg.accum_iter - 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)  # official clip 3.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cfg.teacher == "ema":  # momentum 0.996 -> 1 (cosine) after every student step
                model.ema_update(cosine_schedule(step, total, cfg.ema_momentum, 1.0))
        return loss, stats, images

    if cfg.benchmark:  # the step alone, on accum_iter micro-batches of device-made images
        it = iter(loader)
        batches = [next(it) for _ in range(cfg.accum_iter)]
        flops_fn = lambda out: count_flops((model,), lambda m: m(out[2], m.targets(out[2]))[0], ctx)
        res = common.benchmark(METHOD, batches, train_step, flops_fn, cfg.benchmark, eff_batch, device,
                               device_peak(device, cfg.peak_tflops), log, note=f"teacher {cfg.teacher}")
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
            loss, stats, images = train_step(batch, micro, step)
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
            {"config": dataclasses.asdict(cfg), "model": model.state_dict()}), device, log)

    wall = time.time() - t_start
    imgs, peak = (step - step0) * eff_batch, peak_memory_gb(device)
    # the last step again, untimed
    flops = count_flops((model,), lambda m: m(images, m.targets(images))[0], ctx)
    log.print(f"summary | {METHOD} | steps {step} | {imgs / wall:.0f} img/s total"
              f" | {imgs / wall / world:.0f} img/s/gpu"
              f" | peak mem {peak:.2f} GB | wall {wall:.0f} s | loss {loss.item():.4f}"
              + flops_summary(flops * cfg.accum_iter, step - step0, wall, device, cfg.peak_tflops))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_config())
