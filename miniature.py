"""
Does structured action conditioning help? The paper's claim (Tables 1, 3, 4: DexAC follows fine finger actions
better than a flat MLP action embedding) tested at miniature scale on the synthetic dataset.

    python miniature.py                                   # every mode x 2 seeds, then the evaluation (~1 h 50 min)
    python miniature.py --seeds 0 --steps 20 --clips 4    # a smoke run of the whole pipeline

Every conditioning mode trains the `tiny` DiT on the pixel tokenizer with the same budget (steps, batch, data
order and initialization seed), a run per (mode, seed), `--jobs` runs at a time with one thread each. Each
trained model is then rolled out by the evaluation protocol (evaluate.py) on the test split, twice: with the
true actions and with another clip's actions (the control: a model that ignores its actions scores the same
on both). The summary gives each metric's mean and spread over seeds, and the true-minus-shuffled gap.
Everything is resumable: finished runs and scored clips are kept, interrupted runs resume.

Outputs under --out: seed<s>/<mode>/ (train.py runs), seed<s>/eval/ (reports), results.json, results.md and
results.png.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
import evaluate as E

MODES = ("mlp", "mlp-flat", "dexac", "dexac-no-local", "dexac-no-global", "dexac-time")
HERE = Path(__file__).resolve().parent


def run_dir(out):
    """The train.py run under `out` (train.py numbers them), or None."""
    runs = sorted(Path(out).glob("[0-9][0-9][0-9]-*"))
    return runs[-1] if runs else None


def train_one(job):
    """One (mode, seed) run as a train.py process; skipped when exported, resumed when interrupted."""
    mode, seed, args = job
    out = Path(args.out) / f"seed{seed}" / mode
    run = run_dir(out)
    if run is not None and (run / "model.safetensors").is_file():
        return run / "model.safetensors"
    cmd = [sys.executable, str(HERE / "train.py"), "--data", args.data, "--action-mode", mode, "--seed", str(seed),
           "--steps", str(args.steps), "--out", str(out), "--preview-every", "0", "--ckpt-every", "50",
           *args.train_args]
    if run is not None and (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd += ["--resume", str(run)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(HERE)}
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    run = run_dir(out)
    if code or run is None or not (run / "model.safetensors").is_file():
        raise RuntimeError(f"training {mode} (seed {seed}) failed; see {out / 'train.log'}")
    print(f"trained {mode} (seed {seed}): {run}")
    return run / "model.safetensors"


def evaluate_seed(seed, checkpoints, args):
    """The protocol on this seed's models (in MODES order), with true and with shuffled actions
    -> {mode: {"true": report, "shuffled": report}}."""
    out = Path(args.out) / f"seed{seed}" / "eval"
    rows = {}
    for shuffled in (False, True):
        argv = ["--checkpoint", *map(str, checkpoints), "--data", args.data, "--horizon", str(args.horizon),
                "--metrics", args.metrics, "--steps", str(args.sample_steps), "--out", str(out),
                "--seed", str(seed), "--figure-clips", "2"]
        argv += ["--clips", str(args.clips)] if args.clips else []
        argv += ["--shuffle-actions"] if shuffled else []
        E.main(argv)
        rows.update(json.loads((out / "report.json").read_text())["rows"])
    return {mode: {kind: rows[E.row_name(c, kind == "shuffled")] for kind in ("true", "shuffled")}
            for mode, c in zip(MODES, checkpoints)}


def summarize(per_seed, metrics):
    """{seed: {mode: {"true", "shuffled": report}}} -> {mode: {metric: (mean, std), metric + ' gap': (mean,
    std)}} over seeds; the gap is true minus shuffled, per seed."""
    stat = lambda v: (float(np.mean(v)), float(np.std(v))) if v else None
    table = {}
    for mode in MODES:
        runs = [rows[mode] for rows in per_seed.values()]
        table[mode] = {}
        for m in metrics:
            scored = [r for r in runs if r["true"].get(m) is not None]
            table[mode][m] = stat([r["true"][m] for r in scored])
            table[mode][m + " gap"] = stat([r["true"][m] - r["shuffled"][m] for r in scored
                                            if r["shuffled"].get(m) is not None])
    return table


def markdown(table, metrics, args):
    fmt = lambda v: "–" if v is None else f"{v[0]:.4g} ± {v[1]:.2g}"
    head = "| mode | " + " | ".join(f"{m} | {m} gap" for m in metrics) + " |"
    lines = [f"{len(args.seeds)} seed(s), {args.steps} steps each, horizon {args.horizon}; mean ± std over "
             "seeds; gap = true actions minus shuffled actions (0: the actions are ignored)", "", head,
             "|---|" + "---|" * (2 * len(metrics))]
    lines += ["| " + mode + " | " + " | ".join(f"{fmt(e[m])} | {fmt(e[m + ' gap'])}" for m in metrics) + " |"
              for mode, e in table.items()]
    return "\n".join(lines) + "\n"


def plot(path, table, metric):
    """Bars of the true-minus-shuffled gap of one metric per mode, with the spread over seeds."""
    W, H, pad = 640, 320, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    gaps = [table[m][metric + " gap"] for m in MODES]
    top = max([abs(g[0]) + g[1] for g in gaps if g] + [1e-9])
    zero, scale, bw = H // 2, (H // 2 - pad) / top, (W - 2 * pad) // len(MODES)
    d.line([(pad, zero), (W - pad, zero)], fill="black")
    for i, (mode, g) in enumerate(zip(MODES, gaps)):
        x = pad + i * bw + bw // 2
        if g:
            y = zero - g[0] * scale
            d.rectangle([x - bw // 3, min(y, zero), x + bw // 3, max(y, zero)], fill=(70, 110, 190))
            d.line([(x, y - g[1] * scale), (x, y + g[1] * scale)], fill="black", width=2)
        d.text((x - bw // 2 + 4, H - pad + 8), mode, fill="black")
    d.text((pad, 8), f"{metric}: true actions minus shuffled actions (mean, bar = std over seeds)", fill="black")
    d.text((4, pad - 6), f"+{top:.2g}", fill="gray")
    d.text((4, H - pad - 6), f"-{top:.2g}", fill="gray")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out", default="runs/miniature", help="output folder")
    p.add_argument("--data", default="data/miniature", help="synthetic dataset (written when absent)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (initialization, data, noise)")
    p.add_argument("--steps", type=int, default=150, help="training steps per run")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--horizon", type=int, default=25, help="evaluation rollout length in frames")
    p.add_argument("--clips", type=int, default=12, help="evaluation clips, evenly spread (0: all)")
    p.add_argument("--sample-steps", type=int, default=6, help="denoising steps per chunk in evaluation")
    p.add_argument("--metrics", default="psnr,ssim,latent_l2,pck", help="evaluate.py --metrics")
    args, args.train_args = p.parse_known_args(argv)  # anything else goes to train.py (--height, --lr, ...)
    root = Path(args.data)
    if not root.exists():
        data.write_synthetic(root, test_episodes=2)
    if not (root / "stats.json").exists():
        (root / "stats.json").write_text(json.dumps(data.compute_stats(root), indent=1))
    jobs = [(mode, seed, args) for seed in args.seeds for mode in MODES]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on train.py processes
        checkpoints = list(pool.map(train_one, jobs))
    per_seed = {seed: evaluate_seed(seed, checkpoints[i * len(MODES):(i + 1) * len(MODES)], args)
                for i, seed in enumerate(args.seeds)}
    metrics = [m for m in ("psnr", "ssim", "lpips", "latent_l2", "pck@5", "pck@10")
               if any(r["true"].get(m) is not None for rows in per_seed.values() for r in rows.values())]
    table = summarize(per_seed, metrics)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"config": {k: v for k, v in vars(args).items()},
                                                  "per_seed": per_seed, "summary": table}, indent=1))
    text = markdown(table, metrics, args)
    (out / "results.md").write_text(text)
    plot(out / "results.png", table, "latent_l2" if "latent_l2" in metrics else metrics[0])
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return table


if __name__ == "__main__":
    main()
