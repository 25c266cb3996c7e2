"""Probe any checkpoint of the collection: frozen features -> linear head (lr sweep) + weighted kNN.

    python eval_linear.py --ckpt out/attmask-cifar10/checkpoint.pt               # the data it trained on
    python eval_linear.py --ckpt out/attmask-cifar10/checkpoint.pt --random_init # same net, untrained
    python eval_linear.py --ckpt out/attmask-cifar10/checkpoint.pt --split val   # choices: never test
    python eval_linear.py --raw_pixels --data cifar10                            # the pixels themselves
    torchrun --nproc_per_node=8 eval_linear.py --ckpt ... --data imagenet --data_dir /path/to/imagenet

The method is read from the checkpoint (`ckpt["method"]`) and its file's `load_encoder` gives the
features the paper probes. Features are extracted once (rank-sharded) and cached next to the
checkpoint; the linear heads for several learning rates train together on the cached features and
the best test top-1 is reported (the fast protocol of iBOT/DINOv2 sweeps; a full MAE-style LARS run
with augmentation would score somewhat higher). `--split val` fits on the train split minus its held-out
val part and scores val (common.val_split), so settings can be chosen without the test set. Results are
written as JSON next to the checkpoint.
"""
import argparse
import hashlib
import importlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import common
from common import die

METHODS = ("attmask", "amt", "dtm", "a2mim", "extrema")


def main(argv=None):
    ap = argparse.ArgumentParser(description="linear + kNN probe of a checkpoint")
    ap.add_argument("--ckpt", default=None, help="checkpoint.pt written by one of the method files")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="test: train split -> test split; "
                         "val: rest of the train split -> its held-out val part")
    ap.add_argument("--raw_pixels", action="store_true",
                    help="probe the normalised pixels (no --ckpt; needs --data)")
    ap.add_argument("--out_dir", default=None,
                    help="with --raw_pixels: where results go (default out/raw_pixels-<data>)")
    ap.add_argument("--data", default=None, help="dataset to probe on (default: the one it was trained on)")
    ap.add_argument("--data_dir", default=None, help="its folder (default: the training run's)")
    ap.add_argument("--random_init", action="store_true",
                    help="probe the same architecture, untrained (seed 0)")
    ap.add_argument("--epochs", type=int, default=100, help="linear-head epochs over the cached features")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--num_workers", type=int, default=common.default_workers())
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    args = ap.parse_args(argv)

    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    rank = 0
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"

    if args.raw_pixels:  # the floor every encoder should clear: the eval transform's pixels, flattened
        if args.ckpt or args.random_init or not args.data:
            die("--raw_pixels probes the images themselves: pass --data (and --data_dir), "
                "not --ckpt/--random_init")
        if args.data not in common.DATASETS:
            die(f"unknown --data {args.data}; choose one of {', '.join(common.DATASETS)}")
        ckpt = {"method": "raw_pixels", "step": 0}
        cfg = {"data_dir": "data", "img_size": common.DATASETS[args.data][0]}
        encoder, out = nn.Flatten(), args.out_dir or os.path.join("out", f"raw_pixels-{args.data}")
        if rank == 0:
            os.makedirs(out, exist_ok=True)
    else:
        if not args.ckpt:
            die("pass --ckpt (the checkpoint.pt inside a run's --out_dir), or --raw_pixels --data X")
        if not os.path.isfile(args.ckpt):
            die(f"no checkpoint at {args.ckpt}; pass the checkpoint.pt inside a run's --out_dir")
        try:
            ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            die(f"{args.ckpt} is not a readable checkpoint ({type(e).__name__}); was it fully written?")
        if not isinstance(ckpt, dict) or ckpt.get("method") not in METHODS or "config" not in ckpt:
            die(f"{args.ckpt} is not a checkpoint of this collection "
                f"(expected one written by {', '.join(METHODS)})")
        cfg = ckpt["config"]
        method = importlib.import_module(ckpt["method"])
        torch.manual_seed(0)  # the random-init baseline is one fixed draw
        encoder = method.load_encoder(ckpt, random_init=args.random_init)
        out = os.path.dirname(os.path.abspath(args.ckpt))
    data, data_dir = args.data or cfg["data"], args.data_dir or cfg["data_dir"]

    if data == "folder":  # its own native size and mean/std, as in training
        if not os.path.isdir(os.path.join(data_dir, "train")):
            die("--data folder needs --data_dir with train/ and val/ class folders; "
                f"{data_dir} has no train/")
        common.describe_folder(data_dir)
    tag = f"{data}{'_val' if args.split == 'val' else ''}{'_random' if args.random_init else ''}"
    # the cache key: everything that changes the features (data, its folder, split, size, which weights)
    st = os.stat(args.ckpt) if args.ckpt else None
    key = [ckpt["method"], data, os.path.abspath(data_dir), args.split, cfg["img_size"], ckpt["step"],
           st and st.st_size, st and st.st_mtime_ns, args.random_init]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    cache = os.path.join(out, f"features_{tag}_step{ckpt['step']}_{digest}.pt")
    res = common.probe(encoder, data, data_dir, cfg["img_size"], device=device, batch_size=args.batch_size,
                       num_workers=args.num_workers, cache=cache, epochs=args.epochs, split=args.split)
    res.update(method=ckpt["method"], step=ckpt["step"], data=data, random_init=args.random_init,
               split=args.split)
    if rank == 0:
        print(f"{ckpt['method']} step {ckpt['step']} on {data}"
              f"{' (random init)' if args.random_init else ''}: "
              f"linear top-1 {res['linear_top1']:.2f} (lr {res['linear_lr']}) "
              f"| kNN top-1 {res['knn_top1']:.2f} "
              f"| {res['n_train']} train / {res['n_test']} {args.split}, {res['dim']}-d features")
        with open(os.path.join(out, f"probe_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
