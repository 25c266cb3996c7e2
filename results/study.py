"""The study in one command: every method next to its paper baseline at the same budget, several seeds,
every run probed (linear + kNN) next to its random-init encoder and the raw pixels. Writes
<out_dir>/<name>.md (the table) and <out_dir>/<name>.png (online kNN top-1 on the val split against
epoch, one line per run) and keeps every run's logs under <out_dir>/runs-<name>/ (name: --name, else --data).

    python results/study.py --data fashion-mnist --epochs 10 --seeds 0 1 --parallel 4
    python results/study.py --data fashion-mnist --methods amt dtm --max_steps 200 --seeds 0
    python results/study.py --data synthetic --epochs 1 --seeds 0 --methods amt dtm --probe_epochs 10 \\
        --model vit_pico --batch_size 16 --num_workers 0 --device cpu                # CPU smoke run, minutes

A run is `python <method>.py --data D --data_dir DIR --epochs E [--max_steps S] --seed S --knn_every K
--out_dir <out_dir>/runs-<name>/<run> [baseline switch] [other flags] [--flags of the method]`: flags
this script does not know go to every training run unchanged. Each run lives in its own interpreter
(this file started as a worker) that trains, then probes the checkpoint with eval_linear.py on the
--split (test by default; val for choices) and, for the first run of a method, its random-init encoder.
--parallel K keeps K workers going at once; they share the visible GPUs (CUDA_VISIBLE_DEVICES is passed on
unchanged). A rerun resumes unfinished runs, skips finished ones and probes again (features are cached).
SIGTERM or Ctrl-C to the study reaches every running worker (the runs save a checkpoint and stop, a probe
stops at once), starts no other, and ends the study with exit 1 and no table; a worker whose study is
killed outright gets SIGTERM from the kernel (Linux), so no run trains on unwatched.
Standard library + torch/numpy/PIL.
"""
import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("attmask", "amt", "dtm", "a2mim", "extrema")
NAMES = {"attmask": "AttMask", "amt": "AMT", "dtm": "DTM", "a2mim": "A2MIM", "extrema": "ExtreMA"}
BASELINE = {"attmask": ["--mask_mode", "random"], "amt": ["--amt", "off"], "dtm": ["--morph", "off"],
            "a2mim": ["--freq_weight", "0"], "extrema": ["--num_masks", "1"]}  # the paper's own ablation switch
COLORS = {"attmask": (31, 119, 180), "amt": (255, 127, 14), "dtm": (44, 160, 44), "a2mim": (214, 39, 40),
          "extrema": (148, 103, 189)}


def die(msg):
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------
# Plan: which runs, with which command lines

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 epilog="any other --flag value is passed to every training run")
    ap.add_argument("--data", default="fashion-mnist", help="dataset of every run (see common.DATASETS)")
    ap.add_argument("--data_dir", default="data", help="its folder")
    ap.add_argument("--epochs", type=int, default=10, help="budget: epochs of every run (its schedules' length)")
    ap.add_argument("--max_steps", type=int, default=0, help="budget: stop every run after this many steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed, method and variant")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="subset of the methods")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once (processes sharing the visible GPUs); 0: one by one in this process")
    ap.add_argument("--knn_every", type=int, default=0,
                    help="online kNN every this many epochs (0: epochs / 5, five points a curve)")
    ap.add_argument("--split", default="test", choices=("test", "val"), help="probe split (val: for choices)")
    ap.add_argument("--probe_epochs", type=int, default=100, help="linear-head epochs of eval_linear.py")
    ap.add_argument("--out_dir", default=HERE, help="where <name>.md, <name>.png and runs-<name>/ go")
    ap.add_argument("--flags", nargs=2, action="append", default=[], metavar=("METHOD", "FLAGS"),
                    help='extra training flags of one method, e.g. --flags attmask "--out_dim 1024" (repeatable)')
    ap.add_argument("--name", default="", help="the study's name in those files (default: --data)")
    args, rest = ap.parse_known_args(argv)
    args.name = args.name or args.data
    for m, _ in args.flags:
        if m not in METHODS:
            die(f"--flags {m}: unknown method; choose one of {', '.join(METHODS)}")
    if rest and not rest[0].startswith("--"):
        die(f"unexpected argument {rest[0]!r}; training flags go as --flag value")
    if any(a.split("=")[0] in ("--seed", "--knn_every") for a in rest):
        die("the study sets --seed and --knn_every of every run itself: use --seeds 0 1 ... and its --knn_every")
    if args.parallel < 0 or args.epochs < 1 or args.max_steps < 0 or args.knn_every < 0:
        die("--epochs must be >= 1, --parallel, --max_steps and --knn_every >= 0")
    return args, rest


def shared_flags(rest, name):
    """The value of a passed-through training flag (--name v or --name=v), or None."""
    for i, a in enumerate(rest):
        if a == f"--{name}" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def plan(args, rest):
    """One dict per run: its name, method, variant, seed, folder and the method file's command line."""
    runs_dir = os.path.join(os.path.abspath(args.out_dir), f"runs-{args.name}")
    knn_every = args.knn_every or max(1, args.epochs // 5)
    runs = []
    for m in args.methods:
        for variant, switch in (("paper", []), ("baseline", BASELINE[m])):
            for seed in args.seeds:
                name = f"{m}-{variant}-s{seed}"
                out = os.path.join(runs_dir, name)
                train = ["--data", args.data, "--data_dir", args.data_dir, "--epochs", str(args.epochs),
                         *(["--max_steps", str(args.max_steps)] if args.max_steps else []), "--seed", str(seed),
                         "--knn_every", str(knn_every), "--out_dir", out, *switch, *rest,
                         *[a for mm, flags in args.flags if mm == m for a in shlex.split(flags)]]
                runs.append(dict(name=name, method=m, variant=variant, seed=seed, dir=out, train=train,
                                 switch=" ".join(switch)))
    return runs_dir, runs


def probe_argv(args, rest, ckpt=None, random_init=False, raw_dir=None):
    """eval_linear.py's command line for a checkpoint, its random-init twin, or the raw pixels."""
    common = ["--split", args.split, "--epochs", str(args.probe_epochs)]
    for flag in ("num_workers", "device"):
        v = shared_flags(rest, flag)
        common += [f"--{flag}", v] if v is not None else []
    if raw_dir:
        return ["--raw_pixels", "--data", args.data, "--data_dir", args.data_dir, "--out_dir", raw_dir, *common]
    return ["--ckpt", ckpt, *(["--random_init"] if random_init else []), *common]


# ----------------------------------------------------------------------------
# Workers: one interpreter per run (train, then probe) and one for the raw pixels

def worker(spec):
    """Runs inside a fresh interpreter (or this one with --parallel 0), stdout going to the job's stdout.txt."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import eval_linear
    if spec["kind"] == "run":
        mod = importlib.import_module(spec["method"])
        mod.train(mod.parse_config(spec["train"]))
        if mod._stop_signal:  # SIGTERM: the run saved and stopped early; a rerun resumes it, probes then
            raise SystemExit("error: stopped by SIGTERM before the end; run the same study command to resume")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # probes hold nothing a rerun needs: stop at once
    else:  # raw pixels: the probe, and the online kNN's number on its own bank and queries for the plot
        import torch
        import common
        bank, queries = common.knn_sets(spec["data"], spec["data_dir"], common.DATASETS[spec["data"]][0])
        tf = common.eval_transform(spec["data"], common.DATASETS[spec["data"]][0])
        (bf, by), (qf, qy) = (common.extract(torch.nn.Flatten(), ds, tf, num_workers=0) for ds in (bank, queries))
        os.makedirs(spec["dir"], exist_ok=True)
        with open(os.path.join(spec["dir"], "online_knn.json"), "w") as f:
            json.dump({"knn": common.knn(bf, by, qf, qy), "val": len(qy), "bank": len(by)}, f)
    for argv in spec["probes"]:
        eval_linear.main(argv)


LIVE = set()   # the worker processes running now
STOP = []      # the signal that stops the study, once one came


def on_stop_signal(signum, frame):
    """SIGTERM / SIGINT: pass SIGTERM on to every running worker and start no new one."""
    STOP.append(signum)
    for p in list(LIVE):
        p.send_signal(signal.SIGTERM)


def die_with_parent():
    """First thing in a worker (Linux): SIGTERM when the study's process ends, even by kill -9
    (PR_SET_PDEATHSIG = 1), so the run saves and stops instead of training on unwatched."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        if os.getppid() != int(os.environ.get("STUDY_PID", os.getppid())):  # it ended before the line above
            os.kill(os.getpid(), signal.SIGTERM)


def launch(job):
    """One worker subprocess (job["cmd"], by default this file as a worker of job["spec"]); its stdout and
    stderr go to <dir>/stdout.txt. Returns (job, rc, seconds); rc None: not started, the study is stopping."""
    if STOP:
        return job, None, 0.0
    os.makedirs(job["dir"], exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", STUDY_PID=str(os.getpid()))
    cmd = job.get("cmd") or [sys.executable, os.path.abspath(__file__), "_worker", json.dumps(job["spec"])]
    t0 = time.time()
    with open(os.path.join(job["dir"], "stdout.txt"), "a") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        LIVE.add(p)
        if STOP:  # the signal came while it started
            p.send_signal(signal.SIGTERM)
        rc = p.wait()
        LIVE.discard(p)
    return job, rc, time.time() - t0


def launch_here(job):
    """--parallel 0: the worker in this process (debugging, tests); a one-line error of a run is its failure."""
    os.makedirs(job["dir"], exist_ok=True)
    t0, rc = time.time(), 0
    with open(os.path.join(job["dir"], "stdout.txt"), "a") as out, contextlib.redirect_stdout(out):
        try:
            worker(job["spec"])
        except SystemExit as e:
            print(e.code, flush=True)
            rc = 1
    return job, rc, time.time() - t0


def run_all(jobs, parallel):
    """Runs the workers, `parallel` at once, and prints one line as each ends. Returns the failed ones
    (those a stop signal kept from starting included). With parallel > 0, SIGTERM and SIGINT stop the
    workers (on_stop_signal) while it runs; --parallel 0 leaves them to the run in this process."""
    if parallel and "OMP_NUM_THREADS" not in os.environ:  # K processes x all cores would thrash the CPU
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    failed, t0 = [], time.time()
    STOP.clear()
    before = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)} if parallel else {}
    try:
        with ThreadPoolExecutor(max(1, parallel)) as pool:
            for job, rc, secs in (pool.map(launch, jobs) if parallel else map(launch_here, jobs)):
                status = ("ok" if rc == 0 else "not started (stopping)" if rc is None else
                          f"FAILED (exit {rc}), see {os.path.join(job['dir'], 'stdout.txt')}")
                print(f"[{time.time() - t0:6.0f} s] {job['name']}: {status} ({secs:.0f} s)", flush=True)
                if rc != 0:
                    failed.append(job["name"])
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    return failed


# ----------------------------------------------------------------------------
# Results: read the logs, write the table

def read_run(run, data, split):
    """What the table and the plot need from a run's folder (None where a file is missing)."""
    d, tag = run["dir"], data + ("_val" if split == "val" else "")
    r = dict(run, steps=None, epochs=None, wall=None, img_s=None, knn_s=0.0, curve=[], probe=None, random=None,
             device=None)
    walls, rates = [], []
    if os.path.isfile(os.path.join(d, "log.txt")):
        for line in open(os.path.join(d, "log.txt")):
            dev = re.search(r"device (\S+) x (\d+)", line)
            r["device"] = dev.groups() if dev and line.startswith(run["method"]) else r["device"]
            if line.startswith("summary |"):  # one per session: a resumed run adds its parts
                steps, rate, wall = (re.search(p, line) for p in (r"steps (\d+)", r"([\d.]+) img/s total",
                                                                   r"wall ([\d.]+) s"))
                r["steps"] = int(steps.group(1)) if steps else r["steps"]
                walls.append(float(wall.group(1)) if wall else 0.0)
                rates.append(float(rate.group(1)) if rate else 0.0)
    if walls:
        r["wall"] = sum(walls)
        r["img_s"] = sum(w * v for w, v in zip(walls, rates)) / r["wall"] if r["wall"] else rates[-1]
    if os.path.isfile(os.path.join(d, "metrics.jsonl")):
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
        r["epochs"] = max((row["epoch"] for row in rows if "epoch" in row), default=None)
        knn = {row["step"]: row for row in rows if "knn" in row}  # a rerun may log the same step twice
        r["curve"] = sorted((row["epoch"], row["knn"]) for row in knn.values())
        r["knn_s"] = sum(row["knn_s"] for row in knn.values())
    for key, name in (("probe", f"probe_{tag}.json"), ("random", f"probe_{tag}_random.json")):
        if os.path.isfile(os.path.join(d, name)):
            r[key] = json.load(open(os.path.join(d, name)))
    return r


def fmt_seeds(values):
    """mean (min–max) over seeds; the value alone where they agree; '–' when nothing was measured."""
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    mean = sum(v) / len(v)
    return f"{mean:.1f}" if min(v) == max(v) else f"{mean:.1f} ({min(v):.1f}–{max(v):.1f})"


def num(x, spec=".0f"):
    return "–" if x is None else format(x, spec)


def hardware(results):
    """The device the runs logged, in words."""
    dev = next((r["device"] for r in results if r["device"]), None)
    if dev and dev[0].startswith("cuda"):
        import torch
        return f"{dev[1]} x {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CUDA GPU'}"
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cpu}, {cores} cores)"


def row(*cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def write_table(path, args, argv, results, raw, wall, failed):
    """The Markdown report: set-up, one row per method and variant (mean and range over seeds), the
    random-init and raw-pixel rows, one row per run, and the exact commands."""
    split = "test" if args.split == "test" else "val (held-out part of train)"
    budget = f"{args.epochs} epochs" + (f", at most {args.max_steps} steps" if args.max_steps else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    at_once = f"{args.parallel} at once" if args.parallel else "one after another in one process"
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    top1 = lambda probe, key: probe[key] if probe else None
    last_knn = lambda r: r["curve"][-1][1] if r["curve"] else None
    L = [f"# Study `{args.name}` on {args.data}: each method against its paper baseline", "",
         f"- command: `python {os.path.relpath(os.path.abspath(__file__), ROOT)} {shlex.join(argv)}`",
         f"- date: {date}; hardware: {hardware(results)}; study wall time {wall / 60:.1f} min ({at_once})",
         f"- budget per run: {budget}; seeds {' '.join(map(str, args.seeds))}; everything else is each "
         f"method's `--data {args.data}` preset",
         f"- probe: `eval_linear.py` on the {split} split (linear head sweep, {args.probe_epochs} epochs; "
         "weighted kNN k=20); online kNN: top-1 on the val split during training (bank: at most 10k "
         "images of the train split minus val), its last value in the table",
         "- wall and img/s: the runs' `summary` lines (training, checkpoints and online kNN, all sessions); "
         "kNN share: online kNN seconds / wall", ""]
    if failed:
        L += [f"**Failed runs** (see their stdout.txt): {', '.join(failed)}", ""]
    L += [row("method", "run", "seeds", "epochs", "wall (s)", "img/s", "kNN share", "linear top-1", "kNN top-1",
              "online kNN (val)"), row(*["---"] * 10)]
    for m in args.methods:
        for variant in ("paper", "baseline"):
            rs = [r for r in results if r["method"] == m and r["variant"] == variant]
            share = mean([100 * r["knn_s"] / r["wall"] for r in rs if r["wall"]])
            run_wall, rate = (mean([r[k] for r in rs if r[k] is not None]) for k in ("wall", "img_s"))
            L.append(row(NAMES[m] if variant == "paper" else "",
                         NAMES[m] if variant == "paper" else f"baseline `{rs[0]['switch']}`", len(rs),
                         fmt_seeds([r["epochs"] for r in rs]), num(run_wall), num(rate),
                         "–" if share is None else f"{share:.1f}%",
                         fmt_seeds([top1(r["probe"], "linear_top1") for r in rs]),
                         fmt_seeds([top1(r["probe"], "knn_top1") for r in rs]),
                         fmt_seeds([last_knn(r) for r in rs])))
        rnd = next((r["random"] for r in results if r["method"] == m and r["random"]), None)
        L.append(row("", "random init (same architecture)", "–", 0, "–", "–", "–",
                     num(top1(rnd, "linear_top1"), ".1f"), num(top1(rnd, "knn_top1"), ".1f"), "–"))
    L.append(row("raw pixels", "normalised pixels, flattened", *["–"] * 5,
                 num(top1(raw["probe"], "linear_top1"), ".1f"), num(top1(raw["probe"], "knn_top1"), ".1f"),
                 num(top1(raw["online"], "knn"), ".1f")))
    L += ["", "## Every run", "", row("run", "seed", "steps", "epochs", "wall (s)", "img/s", "linear top-1",
                                      "kNN top-1", "online kNN (val)", "folder"), row(*["---"] * 10)]
    here = os.path.dirname(os.path.abspath(path))
    for r in results:
        L.append(row(r["name"], r["seed"], num(r["steps"], "d"), num(r["epochs"], ".2f"), num(r["wall"]),
                     num(r["img_s"]), num(top1(r["probe"], "linear_top1"), ".2f"),
                     num(top1(r["probe"], "knn_top1"), ".2f"), num(last_knn(r), ".2f"),
                     f"`{os.path.relpath(r['dir'], here)}`"))
    L += ["", "## Commands", "", "Each run as its worker ran it, then `python eval_linear.py --ckpt "
          f"<folder>/checkpoint.pt --split {args.split} --epochs {args.probe_epochs}` (and `--random_init` "
          "for a method's first run):", "", "```"]
    rel = lambda r: [os.path.relpath(a, ROOT) if a == r["dir"] else a for a in r["train"]]  # no machine paths
    L += [f"python {r['method']}.py {shlex.join(rel(r))}" for r in results] + ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


# ----------------------------------------------------------------------------
# Plot: online kNN top-1 against epoch, PIL only

def nice_ticks(lo, hi, n=6):
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 x 10^k."""
    raw = max(hi - lo, 1e-9) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def dashed(draw, pts, color, width, dash=(8, 6)):
    """A polyline drawn in dashes (PIL has no dash style)."""
    on, left = True, dash[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        length, pos = math.hypot(x1 - x0, y1 - y0), 0.0
        while pos < length:
            seg = min(left, length - pos)
            a, b = pos / length, (pos + seg) / length
            if on:
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=color, width=width)
            pos, left = pos + seg, left - seg
            if left <= 0:
                on = not on
                left = dash[0] if on else dash[1]


def draw_plot(path, title, results, raw_knn=None):
    """kNN top-1 (val) against epoch: one line per run, colour = method, solid = paper, dashed = baseline,
    a dot per measurement; a grey dotted line for the raw pixels through the same kNN."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    W, H, left, right, top, bottom = 1160, 620, 80, 360, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for r in results for p in r["curve"]]
    ys = [y for _, y in pts] + ([raw_knn] if raw_knn is not None else [])
    xs = [x for x, _ in pts]
    ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 100.0)
    pad = max(1.0, (yhi - ylo) * 0.08)
    yt = nice_ticks(max(0.0, ylo - pad), min(100.0, yhi + pad))
    xt = nice_ticks(0.0, max(xs) if xs else 1.0, 8)
    (x0, x1), (y0, y1) = (xt[0], xt[-1]), (yt[0], yt[-1])
    X = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * (W - left - right)
    Y = lambda y: H - bottom - (y - y0) / max(y1 - y0, 1e-9) * (H - top - bottom)

    # axes, grid, ticks, labels
    for t in yt:
        d.line([(left, Y(t)), (W - right, Y(t))], fill=(230, 230, 230))
        d.text((left - 8, Y(t)), f"{t:g}", fill="black", font=font, anchor="rm")
    for t in xt:
        d.line([(X(t), H - bottom), (X(t), H - bottom + 5)], fill="black")
        d.text((X(t), H - bottom + 8), f"{t:g}", fill="black", font=font, anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) / 2, H - 22), "epoch", fill="black", font=font, anchor="mm")
    d.text(((left + W - right) / 2, 22), title, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (220, 20), "white")
    ImageDraw.Draw(label).text((110, 10), "kNN top-1 on val (%)", fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, int((top + H - bottom) / 2 - 110)))

    # the runs, then the legend (one entry per method and variant)
    if raw_knn is not None:
        dashed(d, [(left, Y(raw_knn)), (W - right, Y(raw_knn))], (120, 120, 120), 2, dash=(2, 4))
    legend = {}
    for r in results:
        color, p = COLORS[r["method"]], [(X(x), Y(y)) for x, y in r["curve"]]
        if len(p) > 1:
            (d.line(p, fill=color, width=2) if r["variant"] == "paper" else dashed(d, p, color, 2))
        for px, py in p:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        name = NAMES[r["method"]] + ("" if r["variant"] == "paper" else f" baseline ({r['switch']})")
        legend[name] = (color, r["variant"] == "paper")
    if raw_knn is not None:
        legend["raw pixels"] = ((120, 120, 120), None)
    for i, (name, (color, solid)) in enumerate(legend.items()):
        ly, lx = top + 10 + 22 * i, W - right + 15
        if solid is None:
            dashed(d, [(lx, ly), (lx + 30, ly)], color, 2, dash=(2, 4))
        elif solid:
            d.line([(lx, ly), (lx + 30, ly)], fill=color, width=2)
        else:
            dashed(d, [(lx, ly), (lx + 30, ly)], color, 2)
        d.text((lx + 38, ly), name, fill="black", font=font, anchor="lm")
    img.save(path)


# ----------------------------------------------------------------------------
# The study

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parse_args(argv)
    runs_dir, runs = plan(args, rest)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    for r in runs:  # every command line parses before anything starts (a typo is one error, not 20 failed runs)
        importlib.import_module(r["method"]).parse_config(r["train"])
    import common  # the data once, here: K workers downloading the same archive at once would clash
    for split in (True, "probe-train", False):
        common.build_dataset(args.data, args.data_dir, split)
    os.makedirs(runs_dir, exist_ok=True)
    raw_dir = os.path.join(runs_dir, "raw_pixels")
    jobs = []
    for r in runs:
        first = r is next(x for x in runs if x["method"] == r["method"])  # probes the random init too
        ckpt = os.path.join(r["dir"], "checkpoint.pt")
        probes = [probe_argv(args, rest, ckpt)] + [probe_argv(args, rest, ckpt, random_init=True)] * first
        jobs.append(dict(name=r["name"], dir=r["dir"], spec=dict(kind="run", method=r["method"], train=r["train"],
                                                                  probes=probes)))
    jobs.append(dict(name="raw_pixels", dir=raw_dir, spec=dict(kind="raw", data=args.data, data_dir=args.data_dir,
                                                               dir=raw_dir,
                                                               probes=[probe_argv(args, rest, raw_dir=raw_dir)])))
    print(f"study on {args.data}: {len(runs)} runs + raw pixels, {args.parallel or 1} at once; "
          f"logs in {runs_dir}", flush=True)
    t0 = time.time()
    failed = run_all(jobs, args.parallel)
    if STOP:
        print(f"stopped by a signal: the runs saved a checkpoint; run the same command to resume "
              f"({len(failed)} job(s) unfinished)", flush=True)
        return 1
    results = [read_run(r, args.data, args.split) for r in runs]
    tag = args.data + ("_val" if args.split == "val" else "")
    raw = {k: (json.load(open(p)) if os.path.isfile(p) else None)
           for k, p in (("probe", os.path.join(raw_dir, f"probe_{tag}.json")),
                        ("online", os.path.join(raw_dir, "online_knn.json")))}
    md, png = (os.path.join(os.path.abspath(args.out_dir), f"{args.name}.{ext}") for ext in ("md", "png"))
    write_table(md, args, argv, results, raw, time.time() - t0, failed)
    budget = f"{args.epochs} epochs" + (f", <= {args.max_steps} steps" if args.max_steps else "")
    draw_plot(png, f"{args.name}: online kNN top-1 on val during pre-training ({budget})", results,
              raw["online"] and raw["online"]["knn"])
    print(f"wrote {md} and {png}" + (f"; {len(failed)} job(s) failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        die_with_parent()
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
