"""The collection's tests, CPU only: `python -m pytest -q test_all.py` (under 5 minutes on 2 cores).

Foundation (data, crops, probe, CLI/runtime contract, shared-code identity) first, then one section per
method. Speed is not tested here: it is measured by running a method with --max_steps.
"""
import gzip
import importlib
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import common

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["attmask", "amt", "dtm", "a2mim", "extrema"]
PRESENT = [m for m in METHODS if os.path.exists(os.path.join(HERE, f"{m}.py"))]
TINY = ["--data", "synthetic", "--model", "vit_pico", "--batch_size", "8", "--num_workers", "0", "--log_every", "2"]
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
        f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [3, 1, 4, 1, 5])
    ds = common.build_dataset("fashion-mnist", str(tmp_path), True)
    img, y = ds[2]
    assert len(ds) == 5 and y == 4 and img.size == (32, 32) and img.mode == "RGB"
    a = np.asarray(img)
    assert np.array_equal(a[2:30, 2:30, 0], imgs[2]) and a[:2].sum() == 0 and np.array_equal(a[..., 0], a[..., 2])


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
    r0, r1 = common.EpochSampler(20, seed=3, rank=0, world=2), common.EpochSampler(20, seed=3, rank=1, world=2)
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
# The contract every method file keeps (parametrised over the method files present)

# flags a method needs on top of TINY for a 4-step CPU run (e.g. a ViT instead of its default backbone)
EXTRA_ARGS = {}
FAST = ["--warmup_epochs", "0", "--blr", "0.01"]  # full learning rate from step 1, so resume errors would show


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
            assert text == blocks[PRESENT[0]][name], f"shared block '{name}' of {m}.py differs from {PRESENT[0]}.py"


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
    assert re.search(r"^summary \| .*img/s", out, re.M) and os.path.exists(s / "metrics.jsonl")
    run_inprocess(method, a + ["--max_steps", "2"], h, capsys)
    half = load_ckpt(h)
    assert "resumed" in run_inprocess(method, a + ["--max_steps", "4"], h, capsys)
    A, B = load_ckpt(s), load_ckpt(h)
    assert A["method"] == method and A["step"] == B["step"] == 4
    states = [k for k, v in A.items() if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]
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
    r = run_torchrun(f"{method}.py", method_args(method) + ["--max_steps", "3"], tmp_path)
    assert "device cpu x 2" in r.stdout and re.search(r"^summary \| .*steps 3", r.stdout, re.M)
    assert load_ckpt(tmp_path)["step"] == 3


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
    # the same one-line errors from the command line, without a traceback
    r = run_script(f"{method}.py", ["--bogus"], tmp_path / "cli", check=False)
    assert r.returncode != 0 and r.stderr.strip().startswith("error: unknown argument") and "Traceback" not in r.stderr
