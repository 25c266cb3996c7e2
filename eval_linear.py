"""Probe any checkpoint of the collection: frozen features -> linear head (lr sweep) + weighted kNN.

    python eval_linear.py --ckpt out/attmask-cifar10/checkpoint.pt            # the data it was trained on
    python eval_linear.py --ckpt out/attmask-cifar10/checkpoint.pt --random_init   # same architecture, untrained
    torchrun --nproc_per_node=8 eval_linear.py --ckpt ... --data imagenet --data_dir /path/to/imagenet

The method is read from the checkpoint (`ckpt["method"]`) and its file's `load_encoder` gives the
features the paper probes. Features are extracted once (rank-sharded) and cached next to the
checkpoint; the linear heads for several learning rates train together on the cached features and
the best test top-1 is reported (the fast protocol of iBOT/DINOv2 sweeps; a full MAE-style LARS run
with augmentation would score somewhat higher). Results are written as JSON next to the checkpoint.
"""
import argparse
import hashlib
import importlib
import json
import os

import torch
import torch.distributed as dist

import common
from common import die

METHODS = ("attmask", "amt", "dtm", "a2mim", "extrema")


def main(argv=None):
    ap = argparse.ArgumentParser(description="linear + kNN probe of a checkpoint")
    ap.add_argument("--ckpt", required=True, help="checkpoint.pt written by one of the method files")
    ap.add_argument("--data", default=None, help="dataset to probe on (default: the one it was trained on)")
    ap.add_argument("--data_dir", default=None, help="its folder (default: the training run's)")
    ap.add_argument("--random_init", action="store_true", help="probe the same architecture, untrained (seed 0)")
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

    if not os.path.isfile(args.ckpt):
        die(f"no checkpoint at {args.ckpt}; pass the checkpoint.pt inside a run's --out_dir")
    try:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{args.ckpt} is not a readable checkpoint ({type(e).__name__}); was it fully written?")
    if not isinstance(ckpt, dict) or ckpt.get("method") not in METHODS or "config" not in ckpt:
        die(f"{args.ckpt} is not a checkpoint of this collection (expected one written by {', '.join(METHODS)})")
    cfg = ckpt["config"]
    data, data_dir = args.data or cfg["data"], args.data_dir or cfg["data_dir"]
    method = importlib.import_module(ckpt["method"])

    if data == "folder":  # its own native size and mean/std, as in training
        if not os.path.isdir(os.path.join(data_dir, "train")):
            die(f"--data folder needs --data_dir with train/ and val/ class folders; {data_dir} has no train/")
        common.describe_folder(data_dir)
    torch.manual_seed(0)  # the random-init baseline is one fixed draw
    encoder = method.load_encoder(ckpt, random_init=args.random_init)
    tag = f"{data}{'_random' if args.random_init else ''}"
    # everything that changes the features: data, its folder, splits, size, which weights (step, file), random init
    st = os.stat(args.ckpt)
    key = [data, os.path.abspath(data_dir), "probe-train/eval", cfg["img_size"], ckpt["step"], st.st_size,
           st.st_mtime_ns, args.random_init]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    cache = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"features_{tag}_step{ckpt['step']}_{digest}.pt")
    res = common.probe(encoder, data, data_dir, cfg["img_size"], device=device, batch_size=args.batch_size,
                       num_workers=args.num_workers, cache=cache, epochs=args.epochs)
    res.update(method=ckpt["method"], step=ckpt["step"], data=data, random_init=args.random_init)
    if rank == 0:
        print(f"{ckpt['method']} step {ckpt['step']} on {data}{' (random init)' if args.random_init else ''}: "
              f"linear top-1 {res['linear_top1']:.2f} (lr {res['linear_lr']}) | kNN top-1 {res['knn_top1']:.2f} "
              f"| {res['n_train']} train / {res['n_test']} test, {res['dim']}-d features")
        with open(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"probe_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
