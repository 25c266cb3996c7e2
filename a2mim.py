"""A²MIM — Architecture-Agnostic Masked Image Modeling, from ViT back to CNN. Li, Wu, Wu, Zang, Li,
ICML 2023 (arXiv 2205.13943). Official code: Westlake-AI/A2MIM (configs) + Westlake-AI/openmixup (method).

SimMIM-style pixel regression that works alike for CNNs and ViTs: 60% of aligned square cells are hidden by
filling them with the image's own mean colour (nothing artificial for a CNN); a learnable mask token is ADDED
to the hidden positions' features at one depth (input of ResNet stage 4 / after ViT block l); a 1x1 conv +
PixelShuffle maps the last feature map to pixels, regressed on hidden pixels with an L1-type loss plus a focal
frequency loss on batch-averaged 2-D DFT spectra.
Differs from the others in: ResNet AND ViT backbones (--model; SyncBN for the ResNet); mean-filled input and
a mid-network additive token instead of input substitution; a Fourier-domain loss; no token dropping.

Deviations from the official code:
  - ViT: the shared ViT (fixed sin-cos positions, xavier init), not SimMIM's learnable positions + relative
    position bias (layer scale 0.1, drop path 0.1 kept). "vit_small" is DeiT-S, NOT openmixup's 768-d/8-block
    "ViT-S". --mask_layer counts blocks before the token: official l >= 1 is our l - 1 (official 0 and 1 are
    the same function, as token and positions are both added). ViT-B: 8 GPUs x 128 x --accum_iter 2, as the
    config (openmixup accumulates the same way: a loss per micro-batch, divided, summed gradients).
  - Masks are drawn per batch on the device with torch's RNG, not NumPy in loader workers (same distribution,
    no identical mask streams in forked workers: spec pitfall 14). The PIL-branch fill bug is not ported.
  - bf16 autocast on CUDA (R50 configs: fp32), losses in fp32. SyncBN on CUDA only (PyTorch has no CPU one).
    The ResNet gate: base lr and decay at ImageNet (300 epochs, as the 300-epoch config); the small recipes
    keep the 100-epoch config's 0.1x lr, no decay (--gate_like_token). The small-image recipes (resnet18
    with CIFAR stem, vit_tiny/4, 4-px cells) are the spec's proposal, not the paper's.
  - The frequency loss compares batch-MEAN spectra over each GPU's micro-batch (and a ResNet's BatchNorm
    sees one micro-batch), so it depends on the per-GPU batch, not only on the effective one, and
    --accum_iter is not exactly a bigger batch: the ViT-B preset averages the official 128 images (x accum 2);
    256 per GPU would average 256 (more errors cancel in the mean: typically a smaller loss):
    not the same loss.
  - Crops resize bilinear as official; in-memory sets (all but ImageNet and large folders) are cropped in
    batches on the device (common.py: roi_align, area-averaged when a box shrinks, like PIL's antialiasing);
    ImageNet and large folders are decoded once per step in the main process (a reduced JPEG scale on the CPU
    where the crop allows it, nvJPEG on CUDA) and cropped per image (PIL on the CPU, antialiased on CUDA).
Run: python a2mim.py (~1 min CPU run, synthetic data) | python a2mim.py --data cifar10 [--model vit_tiny]
     torchrun --nproc_per_node=8 a2mim.py --data imagenet --data_dir /path/to/imagenet [--model vit_base]
SimMIM-like baseline: --freq_weight 0, and for a ViT also --mask_layer 0 --fill zero."""
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

METHOD = "a2mim"


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
    mask_patch: int = 32           # cell side in pixels (32 at 224 px; 4 at 32 px); defaults: ResNet recipe
    mask_ratio: float = 0.6        # ceil(ratio * cells) cells hidden per image
    mask_layer: int = 3            # ResNet: token at the input of stage k+1 (3 = layer4); ViT: after l blocks
    fill: str = "mean"             # hidden pixels: "mean" (per-image channel mean) or "zero" (baseline)
    mask_gamma: float = 1e-6       # ResNet per-channel gate on hidden features, initial value (0 = none)
    gate_like_token: bool = True   # ResNet gate as the token: 0.1x lr, no decay (100-epoch config);
                                   # False: base lr, decayed (300-epoch config, the ImageNet preset)
    spatial_loss: str = "focal_l1" # "focal_l1" (ResNet: e*tanh(0.1e)) or "l1" (ViT)
    freq_weight: float = 0.5       # lambda of the frequency loss (ResNet 0.5, ViT 0.1; 0 = baseline)
    unmask_weight: float = 1e-3    # live-prediction share of visible pixels in the FFT input (ResNet 1e-3)
    step_epoch: float = 0.0        # >0: constant lr, x0.1 at this epoch (ViT ImageNet: 700 of 800);
                                   # 0 = cosine


def preset(data: str, given: dict) -> dict:
    """ResNet or ViT recipe by --model. ImageNet: the released configs (lr 1.2e-3 / 4e-4 at 2048 = 8 x 256 or,
    ViT-B, 8 x 128 x accum 2); small data: the spec's scaled recipe (lr 1.2e-3 / 5e-4 at 512);
    synthetic: CPU smoke."""
    vit = given.get("model", "") in VIT_SIZES
    fam = (dict(spatial_loss="l1", freq_weight=0.1, unmask_weight=0.0, mask_layer=0, mask_gamma=0.0) if vit
           else {})
    small = dict(fam, model="vit_tiny" if vit else "resnet18", img_size=32, patch_size=4, mask_patch=4,
                 epochs=200, batch_size=512, blr=2.5e-4 if vit else 6e-4, weight_decay=0.05, warmup_epochs=10)
    big = (dict(model="vit_base", epochs=800, blr=5e-5, step_epoch=700.0, batch_size=128, accum_iter=2)
           if vit else  # the 300-epoch config;
           dict(model="resnet50", epochs=300, blr=1.5e-4, batch_size=256, gate_like_token=False))
    imnet = dict(small, img_size=224, patch_size=16, mask_patch=32, **big)  # both 2048 a step on 8 GPUs
    return {"imagenet": imnet, "folder": {**imnet, "model": "vit_small" if vit else "resnet50"},
            "cifar10": small, "cifar100": small, "fashion-mnist": small,
            "stl10": {**small, "img_size": 96, "patch_size": 8, "mask_patch": 16},
            "tiny-imagenet": {**small, "img_size": 64, "patch_size": 8, "mask_patch": 8},
            # bare command: ~1 min
            "synthetic": {**small, "model": "vit_micro" if vit else "resnet_micro", "epochs": 5,
                          "batch_size": 64, "blr": 1e-3, "warmup_epochs": 0.5, "vis_every": 50}}[data]

def check_config(cfg: Config):
    """Every flag in its range and the combinations this file needs, at parse time:
    one line, nothing written."""
    c = common
    c.check_fields(cfg, {
        "model": c.one_of(*RESNETS, *VIT_SIZES), "mask_patch": c.at_least(1), "mask_ratio": c.fraction(),
        "mask_layer": c.at_least(0), "fill": c.one_of("mean", "zero"), "mask_gamma": c.at_least(0),
        "spatial_loss": c.one_of("focal_l1", "l1"), "freq_weight": c.at_least(0),
        "unmask_weight": c.at_least(0), "step_epoch": c.at_least(0)})
    if cfg.model in VIT_SIZES:
        if cfg.img_size % cfg.patch_size:
            die(f"--img_size {cfg.img_size} is not a multiple of --patch_size {cfg.patch_size}; "
                "pick sizes that divide")
        depth, inj = VIT_SIZES[cfg.model][1], cfg.patch_size
    else:
        with torch.device("meta"):  # the stage strides of this stem, no memory
            depth, inj = 4, ResNet(cfg.model, cfg.img_size).strides[cfg.mask_layer % 4]
    p, L = cfg.mask_patch, cfg.mask_layer
    if cfg.img_size % p or p % inj or L not in range(depth):  # as Model checks it
        die(f"--img_size {cfg.img_size} must be a multiple of --mask_patch {p}, that of the stride {inj} at "
            f"--mask_layer {L}, and that in 0..{depth - 1} (ResNet: stage, ViT: blocks before the token)")

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


RESNETS = {"resnet_micro": (False, (1, 1, 1, 1), 32),  # micro: tests, smoke
           "resnet18": (False, (2, 2, 2, 2), 64),
           "resnet50": (True, (3, 4, 6, 3), 64)}  # name: (bottleneck?, blocks per stage, stem width)


def res_block(cin, width, stride, bottleneck):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 to 4x) block: relu(branch + shortcut)."""
    cout = width * (4 if bottleneck else 1)
    convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)] if bottleneck else \
        [(cin, width, 3, stride), (width, cout, 3, 1)]
    layers = sum([[nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
                  for a, b, k, s in convs], [])
    nn.init.zeros_(layers[-2].weight)  # the branch starts at zero (mmcls zero_init_residual)
    short = ([] if stride == 1 and cin == cout
             else [nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)])
    return nn.ModuleDict({"branch": nn.Sequential(*layers[:-1]), "shortcut": nn.Sequential(*short)})


class ResNet(nn.Module):
    """mmcls-style ResNet, ImageNet stem (7x7/2 + pool) or CIFAR stem (3x3/1) at <= 64 px;
    inject() at stage `at`."""

    def __init__(self, name, img_size):
        super().__init__()
        bottleneck, layers, w = RESNETS[name] if name in RESNETS else die(
            f"unknown --model {name}; choose one of {', '.join([*RESNETS, *VIT_SIZES])}")
        c, e = img_size <= 64, 4 if bottleneck else 1                    # CIFAR stem?, channel expansion
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3 if c else 7, 1 if c else 2, 1 if c else 3, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU(), *([] if c else [nn.MaxPool2d(3, 2, 1)]))
        # at each stage input; output
        self.strides, self.stride = ([1, 1, 2, 4], 8) if c else ([4, 4, 8, 16], 32)
        self.dims, self.dim = [w, w * e, 2 * w * e, 4 * w * e], 8 * w * e  # channels likewise; 512 / 2048
        self.stages = nn.ModuleList(
            nn.ModuleList(res_block(self.dims[i] if j == 0 else w * 2 ** i * e, w * 2 ** i,
                                    2 if i > 0 and j == 0 else 1, bottleneck) for j in range(n))
            for i, n in enumerate(layers))
        self.apply(lambda m: (nn.init.kaiming_normal_(m.weight, mode="fan_out") if isinstance(m, nn.Conv2d)
                              else None))

    def forward(self, x, inject=None, at=3):
        x = self.stem(x)                                                   # (B, w, H/s, W/s)
        for k, stage in enumerate(self.stages):
            x = inject(x) if inject is not None and k == at else x
            for blk in stage:  # the first block of stages 1-3 halves the resolution
                x = F.relu(blk["branch"](x) + blk["shortcut"](x))
        return x                                                           # (B, dim, H/stride, W/stride)


# ----------------------------------------------------------------------------
# Masking

def cell_mask(noise, n_mask):
    """Exactly n_mask random cells per image (Sec. 3):
    the n_mask lowest noise (B, cells) -> (B, cells) bool."""
    # (B, cells)
    return torch.zeros_like(noise, dtype=torch.bool).scatter(1, noise.argsort(1)[:, :n_mask], True)


def expand_mask(mask, r):
    """The cell map on a stage / token / pixel grid by integer repetition, never interpolation (pitfall 4)."""
    G = math.isqrt(mask.shape[1])
    return mask.view(-1, G, G).repeat_interleave(r, 1).repeat_interleave(r, 2)  # (B, G*r, G*r)


# ----------------------------------------------------------------------------
# Target

def fill_cells(images, mask, fill="mean"):
    """The input: hidden cells take each image's per-channel mean over ALL its pixels (pitfall 5), or 0
    (baseline). The targets are the untouched normalized image and its spectrum (no per-patch norm)."""
    pix = expand_mask(mask, images.shape[-1] // math.isqrt(mask.shape[1]))[:, None]  # (B, 1, H, W)
    value = (images.mean(dim=(2, 3), keepdim=True) if fill == "mean"
             else torch.zeros_like(images[:, :, :1, :1]))
    return torch.where(pix, value, images)                                 # (B, 3, H, W)


# ----------------------------------------------------------------------------
# Model

def add_mask_token(feat, mask_map, token, gamma=None):
    """Sec. 2.2: hidden x <- gamma * x + token ("init" configs) or x + token (no gate); visible x unchanged.
    feat (B, C, h, w), mask_map (B, h, w) bool, token and gamma (1, C, 1, 1)."""
    m = mask_map[:, None].to(feat.dtype)                                   # (B, 1, h, w)
    feat = feat if gamma is None else feat * (1 - m) + feat * m * gamma.to(feat.dtype)
    return feat + token.to(feat.dtype) * m


def vit_encode(vit, images, mask_map, token, layer):
    """The shared ViT's forward, with the token ADDED to hidden patch tokens after `layer` blocks (0 = on the
    patch embeddings, Sec. 2.3); [CLS] untouched. mask_map (B, gh, gw) bool -> (B, 1+N, D)."""
    x = vit.patch_embed(images).flatten(2).transpose(1, 2).float()         # (B, N, D) fp32 stream, as the ViT
    add = mask_map.flatten(1)[..., None].float() * token.float()           # (B, N, D)
    x = (x + add if layer == 0 else x) + vit.pos_embed(*mask_map.shape[1:])
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1).float(), x], dim=1)  # (B, 1+N, D)
    for i, blk in enumerate(vit.blocks):
        x = blk(x + F.pad(add, (0, 0, 1, 0)) if 0 < layer == i else x)   # zero row for [CLS]
    return vit.norm(x)


class Model(nn.Module):
    """Backbone on mean-filled images + additive mask token, 1x1 conv + PixelShuffle decoder (Sec. 2.1)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.resnet, p, L = cfg, cfg.model not in VIT_SIZES, cfg.mask_patch, cfg.mask_layer
        if cfg.fill not in ("mean", "zero") or cfg.spatial_loss not in ("l1", "focal_l1"):
            die(f"--fill takes mean|zero, --spatial_loss l1|focal_l1; got {cfg.fill}, {cfg.spatial_loss}")
        if self.resnet:
            self.encoder = enc = ResNet(cfg.model, cfg.img_size)
            depth, shape, inj, dim, stride = (4, (1, enc.dims[L % 4], 1, 1), enc.strides[L % 4],
                                              enc.dim, enc.stride)
        else:  # SimMIM's ViT: layer scale 0.1, drop path 0.1 (Sec. 2.3)
            self.encoder = enc = build_vit(cfg.model, cfg.img_size, cfg.patch_size, drop_path=0.1,
                                           layer_scale=0.1)
            depth, shape, inj, dim, stride = (len(enc.blocks), (1, 1, enc.dim), cfg.patch_size,
                                              enc.dim, cfg.patch_size)
        if p <= 0 or cfg.img_size % p or p % inj or L not in range(depth):
            die(f"--img_size {cfg.img_size} must be a multiple of --mask_patch {p}, "
                f"that of the stride {inj} at --mask_layer {L}, "
                f"and that in 0..{depth - 1} (ResNet: stage, ViT: blocks before the token)")
        self.rep = p // inj                                                # map positions per cell side
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(shape), std=0.02))
        self.mask_gamma = (nn.Parameter(torch.full(shape, cfg.mask_gamma)) if self.resnet and cfg.mask_gamma
                           else None)
        self.decoder = nn.Sequential(nn.Conv2d(dim, stride ** 2 * 3, 1), nn.PixelShuffle(stride))  # Sec. 2.4
        nn.init.trunc_normal_(self.decoder[0].weight, std=0.02), nn.init.zeros_(self.decoder[0].bias)

    def reconstruct(self, images, noise=None):
        cfg, G = self.cfg, images.shape[-1] // self.cfg.mask_patch
        noise = torch.rand(len(images), G * G, device=images.device) if noise is None else noise
        mask = cell_mask(noise, math.ceil(G * G * cfg.mask_ratio))         # (B, G*G), Sec. 3
        x = fill_cells(images, mask, cfg.fill)                             # (B, 3, H, W)
        mm = expand_mask(mask, self.rep)                                   # (B, h, w) grid at the injection
        if self.resnet:
            feat = self.encoder(x, lambda f: add_mask_token(f, mm, self.mask_token, self.mask_gamma),
                                cfg.mask_layer)
        else:
            z = vit_encode(self.encoder, x, mm, self.mask_token, cfg.mask_layer)[:, 1:]  # (B, N, D)
            feat = z.transpose(1, 2).unflatten(2, mm.shape[1:])            # (B, D, gh, gw)
        return x, self.decoder(feat), mask                                 # filled input, pred (B, 3, H, W)

    def forward(self, images, noise=None):
        cfg, (_, pred, mask) = self.cfg, self.reconstruct(images, noise)
        pix = expand_mask(mask, cfg.mask_patch)[:, None]                   # (B, 1, H, W) loss region
        loss, l_spa, l_freq = a2mim_loss(pred, images, pix, cfg.spatial_loss, cfg.freq_weight,
                                         cfg.unmask_weight)
        return loss, {"spatial": l_spa.detach(), "freq": l_freq.detach()}

    @torch.no_grad()
    def visualize(self, images, path):
        """Rows: original, mean-filled input, prediction,
        centred log-amplitude spectra of prediction and target."""
        mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1)
                     for v in common.DATASETS[self.cfg.data][2])
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            x, pred, _ = self.eval().reconstruct(images[:8].float())
        rows = [(t.float() * std + mean).clamp(0, 1) for t in (images[:8], x, pred)]
        for t in (pred, images[:8]):  # log(1 + |F|), DC centred, scaled to [0, 1] per image
            a = torch.fft.fftshift(torch.fft.fft2(t.float()).abs().log1p().mean(1, keepdim=True), dim=(2, 3))
            rows.append((a / a.amax((2, 3), True)).expand(-1, 3, -1, -1))
        common.save_picture(path, rows, ["image", "masked input", "prediction", "spectrum (pred)",
                                         "spectrum (image)"])
        self.train()


# ----------------------------------------------------------------------------
# Loss

def focal_frequency_loss(pred, target):
    """Sec. 4 steps 2-6: batch-averaged orthonormal 2-D spectra (pitfall 8; the DFT is linear: one FFT of
    the batch mean), squared complex distance weighted by log(1 + |D|) / its max, clipped to [0, 1], detached.
    -> scalar"""
    D = torch.fft.fft2((pred - target).mean(0), norm="ortho")             # (C, H, W) complex
    dist = D.real ** 2 + D.imag ** 2                                       # (C, H, W)
    w = dist.sqrt().log1p().detach()
    return (torch.nan_to_num(w / w.max(), nan=0.0).clamp(0, 1) * dist).mean()


def a2mim_loss(pred, target, pix_mask, spatial="l1", freq_weight=0.1, unmask_weight=0.0):
    """Sec. 4. pred, target (B, 3, H, W) normalized; pix_mask (B, 1, H, W), True = hidden
    -> fp32 (loss, spa, freq)"""
    pred, target, m = pred.float(), target.float(), pix_mask.float()  # fp32 even under autocast (pitfall 13)
    # ResNet "focal L1": e (2 sigmoid(0.2 e) - 1) = e tanh(0.1 e) ~ 0.1 e^2 (pitfall 7)
    e = (pred - target).abs()
    err = e * torch.tanh(0.1 * e) if spatial == "focal_l1" else e
    l_spa = (err * m).sum() / (m.sum() + 1e-5) / pred.shape[1]             # mean over hidden pixels x 3
    if not freq_weight:  # baseline --freq_weight 0: the frequency term is not computed (logged as 0)
        return l_spa, l_spa, torch.zeros_like(l_spa)
    # FFT input: live pred (hidden), (sg(pred) + target) / 2 (visible), pitfall 9
    m2 = m + (1 - m) * unmask_weight
    l_freq = focal_frequency_loss(pred * m2 + (0.5 * pred.detach() + 0.5 * target) * (1 - m2), target)
    return l_spa + freq_weight * l_freq, l_spa, l_freq


class Pool(nn.Module):
    """Probe features: ResNet global average pool (2048 / 512-d), ViT mean of final-LN patch tokens."""
    def forward(self, f):                                                  # (B, dim, h, w) or (B, 1+N, D)
        return f.mean((2, 3)) if f.ndim == 4 else f[:, 1:].mean(1)         # (B, D)


def load_encoder(ckpt, random_init=False):
    """Checkpoint dict -> frozen encoder module giving the probe features;
    random_init: same shape, untrained."""
    model = Model(Config(**ckpt["config"]))
    if not random_init:
        model.load_state_dict(ckpt["model"])
    return nn.Sequential(model.encoder, Pool()).eval()


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

def lr_at(cfg, step, total, base, warm, steps_per_epoch):
    """One group's lr: warm-up from 0 to `base`, then cosine to 1e-5, the floor of EVERY group (mmcv's
    min_lr is absolute: the 0.1x token group ends at 1e-5 too); ViT ImageNet: constant, x0.1 at step_epoch."""
    if cfg.step_epoch:
        return (cosine_schedule(step, total, base, base, warm)
                * 0.1 ** (step >= cfg.step_epoch * steps_per_epoch))
    return cosine_schedule(step, total, base, 1e-5, warm)


def train(cfg: Config):
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    log = Logger("" if cfg.benchmark else cfg.out_dir, master)  # --benchmark writes nothing
    handle_sigterm()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # data: one RandomResizedCrop + flip view (scale from 0.67 for a ViT, 0.8 for a ResNet; Sec. 5)
    dataset = (common.build_dataset(cfg.data, cfg.data_dir, True, subset=cfg.subset, img_size=cfg.img_size)
               if not cfg.benchmark else  # --benchmark: random images made on the device
               common.benchmark_images(cfg.batch_size * world * cfg.accum_iter, cfg.img_size, device))
    # crops resize bilinear (official)
    scale = (0.67 if cfg.model in VIT_SIZES else 0.8, 1.0)
    transform = common.mim_transform(cfg.data, cfg.img_size, scale=scale, interpolation="bilinear")
    batched = common.BatchCrop(cfg.data, cfg.img_size, scale=scale, interpolation="bilinear")
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
    if model.resnet and device.type == "cuda":  # SyncBN (PyTorch has none on CPU), NHWC convolutions
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device, memory_format=torch.channels_last)
    lr = cfg.blr * eff_batch / 256
    groups = param_groups(nn.ModuleList([model.encoder, model.decoder]), cfg.weight_decay,
                          skip=("cls_token",))
    gate = [model.mask_gamma] if model.mask_gamma is not None else []
    groups.append({"params": [model.mask_token] + (gate if cfg.gate_like_token else []),  # Sec. 5.1
                   "weight_decay": 0.0, "lr_scale": 0.1 if model.resnet else 1.0})
    if gate and not cfg.gate_like_token:  # the 300-epoch config does not list the gate: base lr, decayed
        groups.append({"params": gate, "weight_decay": cfg.weight_decay})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")

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
              f"(the paper's ImageNet runs: 2048 = 8 GPUs x 256, ViT-B 8 x 128 x accum 2)"
              f" | lr {lr:.3e} (blr {cfg.blr:.2e} x {eff_batch}/256)"
              f" | {steps_per_epoch} steps/epoch | {stop} steps")

    fwd = torch.compile(model, **common.COMPILE) if cfg.compile else model  # before DDP; we save `model`
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        state = {"method": METHOD, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": rng_states(world)}
        if master:
            save_checkpoint(path, state)

    def train_step(batch, micro, step):
        """One micro-batch of the loop (images, labels): forward and backward; after the last of accum_iter,
        the clipping and optimizer steps. The loop and --benchmark both run it."""
        images = batch[0].to(device, non_blocking=True)
        warm = int(cfg.warmup_epochs * steps_per_epoch)  # then cosine to 1e-5, or constant with a x0.1 step
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, total, lr * g.get("lr_scale", 1.0), warm, steps_per_epoch)
        if world > 1:  # DDP all-reduces the gradients only on the micro-batch that ends an optimizer step
            fwd.require_backward_grad_sync = micro == cfg.accum_iter - 1
        with ctx:
            loss, stats = fwd(images)
        (loss / cfg.accum_iter).backward()  # MAE: micro-batch gradients add up to the mean over the batch
        if micro == cfg.accum_iter - 1:
            if not model.resnet:  # the ViT recipes clip gradients at 5, the ResNet ones do not (Sec. 5)
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss, stats, images

    if cfg.benchmark:  # the step alone, on accum_iter micro-batches of device-made images
        it = iter(loader)
        batches = [next(it) for _ in range(cfg.accum_iter)]
        flops_fn = lambda out: count_flops((model,), lambda m: m(out[2])[0], ctx)
        res = common.benchmark(METHOD, batches, train_step, flops_fn, cfg.benchmark, eff_batch, device,
                               device_peak(device, cfg.peak_tflops), log,
                               note=f"{cfg.model}, {cfg.mask_ratio:.0%} of {cfg.mask_patch} px cells hidden")
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
                    lr_now = opt.param_groups[0]["lr"]  # the base lr (the mask token's group may be x0.1)
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
    flops = count_flops((model,), lambda m: m(images)[0], ctx)  # the last step again, untimed
    log.print(f"summary | {METHOD} | steps {step} | {imgs / wall:.0f} img/s total"
              f" | {imgs / wall / world:.0f} img/s/gpu"
              f" | peak mem {peak:.2f} GB | wall {wall:.0f} s | loss {loss.item():.4f}"
              + flops_summary(flops * cfg.accum_iter, step - step0, wall, device, cfg.peak_tflops))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_config())
