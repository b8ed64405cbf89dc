"""
Does structured action conditioning help? The paper's claim (Tables 1, 3, 4: DexAC follows fine finger actions
better than a flat MLP action embedding) tested at miniature scale on the synthetic dataset, in the paper's
regime: every variant fine-tunes one pretrained backbone.

    python miniature.py                                   # the base, every variant, 1 seed, the evaluation
    python miniature.py --seeds 0 1 2 --modes mlp dexac   # more seeds for chosen variants (the rest is reused)
    python miniature.py --curves mlp dexac                # the gap along fine-tuning of these two only
    python miniature.py --base-steps 20 --steps 20 --eval-every 10 --clips 4   # a smoke run of the whole pipeline

The dataset is the synthetic one seen closer (synthetic.write_synthetic: zoom 2, markers twice as large, fingers
1.5x as thick) with two finger-dominant tasks beside the four wrist-and-head ones, so that hands, finger curls and
keypoint markers stay visible at the 48x80 frames a CPU can train on, and a model must read finger actions to
predict the finger tasks. A base `tiny` DiT
on the pixel tokenizer is pretrained once without actions (--base-steps; it learns what the scene looks like),
then every variant (VARIANTS: a conditioning mode, a normalization ablation, new modules only or LoRA adapters)
fine-tunes it from that base with the same budget (steps, batch, data order, seed), a run per (variant, seed),
`--jobs` runs at a time with one thread each; its new modules start at zero, so step 0 is the base exactly. The
IRASim rows (IRASim as released with Frame-Ada, whose embedding is not zero at step 0, and IRASim + DexAC) do the
same from an IRASim `tiny` base pretrained the same way (base-irasim/). Each fine-tuned model is
rolled out by the evaluation protocol (evaluate.py) on the test split, twice: with the true actions and with
another clip's actions (the control: a model that ignores its actions scores the same on both), and so are
the exports every --eval-every steps, which draw the gap along fine-tuning ("not yet" against "never"). The
summary gives each metric's mean with its standard error over the evaluated clips, the true-minus-shuffled gap
paired clip by clip, PCK per action family, the mean and standard error over seeds (with several), and each
variant minus --reference (dexac), paired clip by clip. Everything is resumable: finished runs and scored clips are
kept, interrupted runs resume; a run is reused only when the train.py flags it records (settings.json) are this
call's, else it is refused with a message (deleting a trained model is left to the user).

Outputs under --out: base/ and base-irasim/ (the pretrained backbones), seed<s>/<variant>/ (train.py runs),
seed<s>/eval-* and seed<s>/curves-* (reports, a folder per evaluation setting: eval-h25-n12-k8 is --horizon 25,
--clips 12, --sample-steps 8), results.json, results.md, results.png (final gaps) and curves.png (gap along
fine-tuning) of the last call.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
import evaluate as E
import hub
import irasim
import sample
import synthetic
import train

# the synthetic dataset (synthetic.write_synthetic): zoomed, markers x2, fingers x1.5 and the two finger-dominant
# tasks, whose curls sweep ~10 px at 48x80 around still wrists; the marker detector finds > 99% of the
# ground-truth keypoints at 48x80 (synthetic.detector_recall), fingertips included
ZOOM, MARKER_SCALE, FINGER_WIDTH, FINGER_TASKS = 2.0, 2.0, 1.5, 2
SIZE = (48, 80)  # training and evaluation frames
# every variant fine-tunes the same base with the same budget; a variant is the train.py flags that make it
VARIANTS = {
    "mlp": ["--action-mode", "mlp"], "mlp-flat": ["--action-mode", "mlp-flat"], "dexac": ["--action-mode", "dexac"],
    "dexac-no-local": ["--action-mode", "dexac-no-local"], "dexac-no-global": ["--action-mode", "dexac-no-global"],
    "dexac-norm-none": ["--action-mode", "dexac", "--action-norm", "none"],  # the paper's Table 4 ablations
    "dexac-x200": ["--action-mode", "dexac", "--action-norm", "scale"],
    "dexac-channel": ["--action-mode", "dexac-channel"], "dexac-time": ["--action-mode", "dexac-time"],
    # lightweight adaptation of the same base (dexac above is the full fine-tune): the new modules only, and
    # LoRA adapters of rank 16 on the frozen backbone with the new modules
    "dexac-new-only": ["--action-mode", "dexac", "--trainable", "new"],
    "dexac-lora16": ["--action-mode", "dexac", "--trainable", "lora+new", "--lora-rank", "16", "--lora-alpha", "16"],
    # the paper's second backbone (its Table 1), from an IRASim base pretrained the same way: as released
    # (Frame-Ada) and with DexAC
    "irasim": ["--backbone", "irasim", "--action-mode", "frame-ada"],
    "irasim-dexac": ["--backbone", "irasim", "--action-mode", "dexac"]}
MODES = tuple(VARIANTS)  # the variants, by name
HERE = Path(__file__).resolve().parent


def run_dir(out):
    """The train.py run under `out` (train.py numbers them), or None."""
    runs = sorted(Path(out).glob("[0-9][0-9][0-9]-*"))
    return runs[-1] if runs else None


def backbone_of(mode):
    """The backbone a variant fine-tunes: its --backbone flag's, else Cosmos."""
    flags = VARIANTS[mode]
    return flags[flags.index("--backbone") + 1] if "--backbone" in flags else "cosmos"


def base_dir(args, backbone="cosmos"):
    return Path(args.out) / ("base" if backbone == "cosmos" else f"base-{backbone}")


def base_export(args, backbone="cosmos"):
    """Where every fine-tuning run finds its base: a fixed name, linked to the base run's export once trained."""
    return base_dir(args, backbone) / "model.safetensors"


def base_argv(args, backbone="cosmos"):
    """The train.py flags of a base: the backbone without actions, pretrained once (seed 0) for every variant
    and seed, exported in fp32 so that fine-tuning starts from its exact weights."""
    return [*([] if backbone == "cosmos" else ["--backbone", backbone]), "--data", str(args.data), "--action-mode",
            "none", "--seed", "0", "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--steps",
            str(args.base_steps), "--out", str(base_dir(args, backbone)), "--preview-every", "0", "--ckpt-every",
            "100", "--export-dtype", "fp32", *args.train_args]


def train_argv(mode, seed, args):
    """The train.py flags of one (variant, seed) run: what its model is, and what settings.json records. With a
    base (--base-steps > 0) the run fine-tunes it, all parameters, at --finetune-lr, exporting every
    --eval-every steps; without one it trains from scratch."""
    out = Path(args.out) / f"seed{seed}" / mode
    start = []
    if getattr(args, "base_steps", 0):
        start = ["--init", str(base_export(args, backbone_of(mode))), "--lr", str(args.finetune_lr)]
    every = ["--export-every", str(args.eval_every)] if getattr(args, "eval_every", 0) else []
    return ["--data", str(args.data), *VARIANTS[mode], "--seed", str(seed), "--height", str(SIZE[0]),
            "--width", str(SIZE[1]), "--steps", str(args.steps), "--out", str(out), "--preview-every", "0",
            "--ckpt-every", "50", *start, *every, *args.train_args]


def check_cached(mode, seed, args, out=None, argv=None):
    """A run folder already under --out must have been trained with these settings (kept in settings.json):
    a model of other settings is never reused, and never deleted; one clear error instead."""
    out = Path(out or Path(args.out) / f"seed{seed}" / mode)
    argv = argv or train_argv(mode, seed, args)
    saved, want = out / "settings.json", {"train_argv": argv}
    if run_dir(out) is None:
        return
    if not saved.is_file():
        raise ValueError(f"{out} holds a run whose settings were not recorded (made by an older miniature.py): "
                         f"delete {out} to retrain it, or choose another --out")
    had = json.loads(saved.read_text())
    if had != want:
        flags = lambda argv: {f: argv[i + 1:i + 2] for i, f in enumerate(argv) if f.startswith("--")}
        old, new = flags(had.get("train_argv", [])), flags(want["train_argv"])
        diff = [f for f in {**old, **new} if old.get(f) != new.get(f)]
        raise ValueError(f"{out} holds a {mode} model (seed {seed}) trained with other settings (differing: "
                         f"{', '.join(dict.fromkeys(diff)) or 'flag order'}; see {saved}): delete {out} to retrain "
                         f"it, or choose another --out")


RUNNING = set()  # the train.py processes now running
STOPPING = threading.Event()  # set by a SIGTERM/SIGINT to miniature.py: no run starts after it


def stop(signum, frame):
    """SIGTERM/SIGINT: every running train.py finishes its step, checkpoints and exits (its time is counted), no
    further run starts, and miniature.py stops; the same command resumes. SIGTERM is passed on to the runs;
    a Ctrl-C's SIGINT already reached them (one process group), and a second one would stop them at once."""
    STOPPING.set()
    if signum == signal.SIGTERM:
        for proc in list(RUNNING):
            proc.send_signal(signum)
    raise KeyboardInterrupt


def train_run(out, argv, what, threads):
    """One train.py process in `out`; skipped when exported, resumed when interrupted -> its export."""
    run = run_dir(out)
    if run is not None and (run / "model.safetensors").is_file():
        return run / "model.safetensors"
    if STOPPING.is_set():
        raise KeyboardInterrupt
    cmd = [sys.executable, str(HERE / "train.py"), *argv]
    if run is not None and (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd += ["--resume", str(run)]
    out.mkdir(parents=True, exist_ok=True)
    hub.atomic_write(out / "settings.json", json.dumps({"train_argv": argv}))
    t0 = time.time()
    with open(out / "train.log", "a") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        RUNNING.add(proc)
        try:
            proc.wait()
        finally:  # interrupted too (`stop`): wait for its checkpoint, and count the time
            code = proc.wait()
            RUNNING.discard(proc)
            seconds = out / "train_seconds.txt"  # wall clock, summed over resumed attempts
            seconds.write_text(f"{float(seconds.read_text() if seconds.exists() else 0) + time.time() - t0:.0f}\n")
    if STOPPING.is_set():
        raise KeyboardInterrupt
    run = run_dir(out)
    if code or run is None or not (run / "model.safetensors").is_file():
        raise RuntimeError(f"training {what} failed; see {out / 'train.log'}")
    print(f"trained {what}: {run}")
    return run / "model.safetensors"


def train_one(job):
    """One (variant, seed) run."""
    mode, seed, args = job
    check_cached(mode, seed, args)
    return train_run(Path(args.out) / f"seed{seed}" / mode, train_argv(mode, seed, args), f"{mode} (seed {seed})",
                     args.threads)


def along(export):
    """A run's exports along training (train.py --export-every), oldest first, then its final one:
    [(step, path)]."""
    steps = sorted((export.parent / "exports").glob("step_*.safetensors"))
    return [(int(p.stem[5:]), p) for p in steps] + [(sample.read_export_meta(str(export))["step"], export)]


def eval_dir(args, seed, kind="eval"):
    """seed<s>/<kind>-h<horizon>-n<clips>-k<sample steps>: the reports of one evaluation setting; another setting
    (more clips, say) gets a folder of its own beside it, and the trained runs are reused."""
    return Path(args.out) / f"seed{seed}" / f"{kind}-h{args.horizon}-n{args.clips or 'all'}-k{args.sample_steps}"


def evaluate_seed(seed, checkpoints, args):
    """The protocol on this seed's models (in args.modes order; a row per variant, named after it: variants of
    one action mode share a run folder name), with true and with shuffled actions -> {mode: {"true": report,
    "shuffled": report, "clips": {"true": [clip record], "shuffled": [...]}}}."""
    out = eval_dir(args, seed)
    rows = {}
    for shuffled in (False, True):
        rows.update(E.protocol(E.EvalConfig(
            checkpoints=tuple(map(str, checkpoints)), names=tuple(args.modes), data=args.data, horizon=args.horizon,
            clips=args.clips or None, metrics=args.metrics, out=str(out), steps=args.sample_steps, seed=seed,
            shuffle_actions=shuffled, figure_clips=0 if shuffled else 2, device=args.device)))  # figure: true actions
    result = {}
    for mode, c in zip(args.modes, checkpoints):
        names = {kind: E.row_name(c, kind == "shuffled", mode) for kind in ("true", "shuffled")}
        result[mode] = {kind: rows[name] for kind, name in names.items()}
        result[mode]["clips"] = {kind: [json.loads(f.read_text())
                                        for f in sorted((out / name / "clips").glob("*.json"))]
                                 for kind, name in names.items()}
    return result


def evaluate_curve(seed, mode, export, args):
    """The action-following gap along fine-tuning: the protocol, true and shuffled actions, on each export
    before the final one (the main table has that) -> [(step, {metric: (true - shuffled mean, its paired
    standard error over clips)})], so that "not yet" and "never" can be told apart."""
    points = along(export)[:-1]
    if not points:
        return []
    out = eval_dir(args, seed, "curves") / mode
    for shuffled in (False, True):
        E.protocol(E.EvalConfig(
            checkpoints=tuple(str(p) for _, p in points), data=args.data, horizon=args.horizon,
            clips=args.clips or None, metrics=args.metrics, out=str(out), steps=args.sample_steps, seed=seed,
            shuffle_actions=shuffled, figure_clips=0, device=args.device))
    curve = []
    for step, path in points:
        clips = {kind: [json.loads(f.read_text()) for f in sorted(
            (out / E.row_name(path, kind == "shuffled") / "clips").glob("*.json"))] for kind in ("true", "shuffled")}
        curve.append((step, clips))
    return curve


def clip_gaps(pairs, metric):
    """True minus shuffled score of each (true, shuffled) clip record pair that both are scored on."""
    return [clip_values(t, metric) - clip_values(c, metric) for t, c in pairs
            if clip_values(t, metric) is not None and clip_values(c, metric) is not None]


def paired(clips, metric):
    """(mean, standard error) over clips of true minus shuffled, matched by clip index; None when unscored."""
    shuffled = {c["index"]: c for c in clips["shuffled"]}
    gaps = clip_gaps([(t, shuffled[t["index"]]) for t in clips["true"] if t["index"] in shuffled], metric)
    return (float(np.mean(gaps)), standard_error(gaps)) if gaps else None


def curves(per_seed, metrics):
    """{seed: {mode: {"curve": [(step, clips)], "clips": final clips, "step": final step}}} -> {mode: {step:
    {metric: (gap, se)}}}, clips pooled over seeds; the final export's point from the main evaluation."""
    table = {}
    for mode in next(iter(per_seed.values())):
        pooled = {}
        for seed, rows in per_seed.items():
            r = rows[mode]
            for step, clips in [*r.get("curve", []), (r["step"], r["clips"])]:
                for kind in ("true", "shuffled"):  # clip indices stay apart across seeds
                    pooled.setdefault(step, {"true": [], "shuffled": []})[kind] += [
                        {**c, "index": (seed, c["index"])} for c in clips[kind]]
        table[mode] = {step: {m: paired(clips, m) for m in metrics} for step, clips in sorted(pooled.items())}
    return table


def clip_values(clip, metric):
    """One clip's score (evaluate.py's per-clip record); PCK in percent of its counted keypoints, None ("no
    keypoints") where none counts or the detector found none of them on the ground-truth frames."""
    if metric.startswith("pck@"):
        k = E.PCK_THRESHOLDS.index(float(metric[4:]))
        counted = clip.get("pck_count") and clip.get("pck_found", clip["pck_count"])
        return 100.0 * clip["pck_hits"][k] / clip["pck_count"] if counted else None
    return clip.get(metric)


def standard_error(values):
    """Standard error of the mean of the values that are not None (0 for fewer than two)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def summarize(per_seed, metrics):
    """{seed: {mode: {"true", "shuffled": report, "clips": {"true", "shuffled": [clip records]}}}} ->
    {mode: {metric: (mean, se), metric + ' gap': (mean, se), "families": {family: (true, shuffled) PCK@10},
    "family gaps": {family: {"clips": n, "psnr" and "pck@10": paired gap (mean, se) over its clips of every seed}}}.
    A metric's mean is the protocol's (the mean over seeds of each report); its standard error is over the
    evaluated clips of every seed. The gap is true minus shuffled actions, paired clip by clip. With two seeds or
    more, metric + ' over seeds' and metric + ' gap over seeds' hold (mean, standard error over the seeds' reports):
    the spread of training, which the clips' standard error leaves out."""
    table = {}
    for mode in next(iter(per_seed.values())):
        runs = [rows[mode] for rows in per_seed.values()]
        table[mode] = {"families": {}, "family gaps": {}}
        clips = [(t, c) for r in runs  # (true, shuffled) records of the same clip, matched by its index
                 for t in r["clips"]["true"] for c in r["clips"]["shuffled"] if c["index"] == t["index"]]
        for m in metrics:
            values = [r["true"].get(m) for r in runs if r["true"].get(m) is not None]
            gaps = [r["true"][m] - r["shuffled"][m] for r in runs
                    if r["true"].get(m) is not None and r["shuffled"].get(m) is not None]
            se = standard_error([clip_values(t, m) for t, _ in clips])
            gap_se = standard_error(clip_gaps(clips, m))
            table[mode][m] = (float(np.mean(values)), se) if values else None
            table[mode][m + " gap"] = (float(np.mean(gaps)), gap_se) if gaps else None
            if len(per_seed) > 1:
                for key, v in ((m + " over seeds", values), (m + " gap over seeds", gaps)):
                    table[mode][key] = (float(np.mean(v)), standard_error(v)) if len(v) == len(runs) else None
        for f in E.FAMILIES:
            pcks = [[r[kind].get("families", {}).get(f, {}).get("pck@10") for r in runs]
                    for kind in ("true", "shuffled")]
            table[mode]["families"][f] = tuple(float(np.mean(v)) if v and None not in v else None for v in pcks)
            pairs = [(t, c) for t, c in clips if t.get("family") == f]  # this family's clips, over every seed
            gaps = {m: clip_gaps(pairs, m) for m in ("psnr", "pck@10") if m in metrics}
            table[mode]["family gaps"][f] = {"clips": len(pairs), **{
                m: (float(np.mean(g)), standard_error(g)) if g else None for m, g in gaps.items()}}
    return table


def versus(per_seed, reference, metrics):
    """Each variant minus the reference, paired clip by clip (the same seed and test clip) -> {mode: {metric:
    (mean, standard error), metric + ' gap': (mean, se)}} over the clips of every seed: the difference in score
    with the true actions, and in the true-minus-shuffled gap. The clips differ far more from one another than the
    models do, so this compares two variants much more finely than their two rows' standard errors can."""
    table = {}
    for mode in next(iter(per_seed.values())):
        if mode == reference:
            continue
        diffs = {}
        for rows in per_seed.values():
            a, b = ({kind: {c["index"]: c for c in rows[m]["clips"][kind]} for kind in ("true", "shuffled")}
                    for m in (mode, reference))
            for i in a["true"].keys() & b["true"].keys():
                for m in metrics:
                    va, vb = clip_values(a["true"][i], m), clip_values(b["true"][i], m)
                    if va is None or vb is None:
                        continue
                    diffs.setdefault(m, []).append(va - vb)
                    sa, sb = (clip_values(x["shuffled"][i], m) if i in x["shuffled"] else None for x in (a, b))
                    if sa is not None and sb is not None:
                        diffs.setdefault(m + " gap", []).append((va - sa) - (vb - sb))
        table[mode] = {k: (float(np.mean(diffs[k])), standard_error(diffs[k])) if k in diffs else None
                       for m in metrics for k in (m, m + " gap")}
    return table


DECIMALS = {"psnr": 2, "ssim": 3, "lpips": 3, "latent_l2": 3}  # pck: 1 (percent)


def signed(v, metric):
    """A difference (mean, standard error) as "+m ± e", one decimal more than the metric's own; "–" for None."""
    k = DECIMALS.get(metric, 1) + 1
    return "–" if v is None else f"{v[0]:+.{k}f} ± {v[1]:.{k}f}"


def markdown(table, metrics, args, train_minutes):
    def fmt(v, m, extra=0):
        k = DECIMALS.get(m, 1) + extra
        return "–" if v is None else f"{v[0]:.{k}f} ± {v[1]:.{k}f}"

    head = "| mode | " + " | ".join(metrics) + " |"
    rule = "|---|" + "---|" * len(metrics)
    lines = [f"{len(args.seeds)} seed(s) ({' '.join(map(str, args.seeds))}), {args.steps} training steps per run; "
             f"evaluation: horizon {args.horizon}, {args.clips or 'all'} test clips, {args.sample_steps} denoising "
             "steps per chunk. Mean (the protocol's report, averaged over seeds) ± standard error over the "
             "evaluated clips of every seed. PCK in percent at the evaluation resolution.", "",
             "With the true actions:", "", head[:-1] + "| training (min) |", rule + "---|"]
    lines += [f"| {mode} | " + " | ".join(fmt(e[m], m) for m in metrics) + f" | {train_minutes.get(mode, '–')} |"
              for mode, e in table.items()]
    lines += ["", "Gap = true minus shuffled actions, paired clip by clip (a model that ignores its actions: 0 "
              "within noise; a model that follows them: > 0 for psnr, ssim and pck, < 0 for lpips and latent_l2):",
              "", head, rule]
    lines += [f"| {mode} | " + " | ".join(fmt(e[m + " gap"], m, 1) for m in metrics) + " |"
              for mode, e in table.items()]
    if len(args.seeds) > 1:
        lines += ["", f"Over seeds: mean ± standard error over the {len(args.seeds)} seeds (each seed's number is its "
                  "clips' mean, so this includes the spread of training). True actions, then the gap:", "", head, rule]
        lines += [f"| {mode} | " + " | ".join(fmt(e[m + " over seeds"], m) for m in metrics) + " |"
                  for mode, e in table.items()]
        lines += ["", head, rule]
        lines += [f"| {mode} | " + " | ".join(fmt(e[m + " gap over seeds"], m, 1) for m in metrics) + " |"
                  for mode, e in table.items()]
    fam = [m for m in ("pck@10", "psnr") if m in metrics]
    if fam and any(g["clips"] for e in table.values() for g in e["family gaps"].values()):
        pct = lambda v: "–" if v is None else f"{v:.1f}"
        lines += ["", "Per action family (a clip's family: its largest normalized actions; clips of every seed): "
                  "PCK@10 with true / shuffled actions (the protocol's), and the gaps paired clip by clip:", "",
                  "| mode | family (clips) | PCK@10 true / shuffled | " + " | ".join(f"{m} gap" for m in fam) + " |",
                  "|---|---|---|" + "---|" * len(fam)]
        lines += [f"| {mode} | {f} ({g['clips']}) | {pct(e['families'][f][0])} / {pct(e['families'][f][1])} | "
                  + " | ".join(signed(g[m], m) for m in fam) + " |"
                  for mode, e in table.items() for f, g in e["family gaps"].items() if g["clips"]]
    return "\n".join(lines) + "\n"


def versus_markdown(table, reference, metrics):
    """The paired comparison against the reference variant: a row per other variant, each metric's difference
    with the true actions and in its gap."""
    cols = [c for m in metrics for c in (m, m + " gap")]
    lines = ["", f"Each variant minus {reference}, paired clip by clip (the same seed and test clip; ± standard "
             "error over those clips): the score with the true actions, and the gap (a positive psnr or pck gap "
             f"difference: follows its actions more than {reference}):", "",
             f"| variant - {reference} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {mode} | " + " | ".join(signed(row[c], c.split()[0]) for c in cols) + " |"
              for mode, row in table.items()]
    return "\n".join(lines) + "\n"


def curve_markdown(table, metrics):
    """The gap along fine-tuning: a table per metric, a row per variant, a column per evaluated step."""
    steps = sorted({step for rows in table.values() for step in rows})
    lines = []
    for m in metrics:
        lines += ["", f"{m} gap (true minus shuffled actions) along fine-tuning, by step:", "",
                  "| variant | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
        lines += [f"| {mode} | " + " | ".join(signed(rows.get(step, {}).get(m), m) for step in steps) + " |"
                  for mode, rows in table.items()]
    return "\n".join(lines) + "\n"


def plot_curves(path, table, metric):
    """The gap of one metric against fine-tuning steps, a line per variant, whiskers +-1 standard error."""
    W, H, pad = 640, 360, 48
    img = Image.new("RGB", (W + 160, H), "white")
    d = ImageDraw.Draw(img)
    points = [(step, v) for rows in table.values() for step, r in rows.items() if (v := r.get(metric))]
    if points:
        steps = [p[0] for p in points]
        lo, hi = min(min(v[0] - v[1] for _, v in points), 0.0), max(max(v[0] + v[1] for _, v in points), 0.0)
        hi = hi if hi > lo else lo + 1
        x = lambda s: pad + (s - min(steps)) / max(1, max(steps) - min(steps)) * (W - 2 * pad)
        y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)
        d.line([(pad, y(0)), (W - pad, y(0))], fill=(150, 150, 150))  # no gap: the actions ignored
        for i, (mode, rows) in enumerate(table.items()):
            color = PALETTE[i % len(PALETTE)]
            line = [(x(step), y(r[metric][0])) for step, r in sorted(rows.items()) if r.get(metric)]
            if len(line) > 1:
                d.line(line, fill=color, width=2)
            for step, r in rows.items():
                if r.get(metric):
                    m, e = r[metric]
                    d.line([(x(step), y(m - e)), (x(step), y(m + e))], fill=color)
            d.text((W + 4, pad + 14 * i), mode, fill=color)
        d.text((4, pad - 12), f"{hi:.3g}", fill="black")
        d.text((4, H - pad - 6), f"{lo:.3g}", fill="black")
        d.text((pad, H - pad + 8), f"step {min(steps)}", fill="black")
        d.text((W - pad - 60, H - pad + 8), f"step {max(steps)}", fill="black")
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.text((pad, 12), f"{metric} gap, true minus shuffled actions, along fine-tuning (whiskers: +-1 s.e.)",
           fill="black")
    img.save(path)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path, table, metrics):
    """One panel per metric: each mode's score with true (blue) and shuffled (grey) actions; whiskers: +-1
    standard error over clips (on the grey bar: of the paired gap). Equal bars: the model ignores its actions."""
    modes = list(table)
    metrics = [m for m in metrics if any(table[mode][m] for mode in modes)]
    W, H, pad = max(300, 56 * len(modes)), 260, 36  # labels on two rows: a long variant name spans two bars
    img = Image.new("RGB", (W * len(metrics), H + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), "true actions (blue) vs shuffled actions (grey); whiskers: +-1 standard error over clips "
           "(grey: of the paired gap)", fill="black")
    for j, m in enumerate(metrics):
        x0, y0 = j * W, 24
        bars = []
        for mode in modes:
            t, g = table[mode][m], table[mode][m + " gap"]
            bars.append((mode, t, (t[0] - g[0], g[1]) if t and g else None))
        vals = [b[0] + b[1] for _, t, s in bars for b in (t, s) if b]
        lo, hi = min(vals + [0.0]), max(vals + [1e-9])
        low = min(b[0] - b[1] for _, t, s in bars for b in (t, s) if b) if vals else 0.0
        if low > hi / 2:  # differences far above 0 (psnr, latent_l2): show the range around them
            lo = low - (hi - low) / 4
        y = lambda v: y0 + H - pad - (v - lo) / (hi - lo or 1) * (H - 2 * pad)
        d.text((x0 + pad, y0 + 4), m, fill="black")
        d.line([(x0 + pad, y(lo)), (x0 + W - 8, y(lo))], fill="black")
        d.text((x0 + 2, y(hi) - 6), f"{hi:.3g}", fill="gray")
        d.text((x0 + 2, y(lo) - 6), f"{lo:.3g}", fill="gray")
        bw = (W - pad - 8) / len(modes)
        for i, (mode, t, s) in enumerate(bars):
            cx = x0 + pad + (i + 0.5) * bw
            for dx, b, color in ((-bw / 5, t, (70, 110, 190)), (bw / 5, s, (170, 170, 170))):
                if b:
                    d.rectangle([cx + dx - bw / 5, y(b[0]), cx + dx + bw / 5, y(lo)], fill=color)
                    d.line([(cx + dx, y(b[0] - b[1])), (cx + dx, y(b[0] + b[1]))], fill="black", width=1)
            d.text((cx - bw / 2 + 2, y0 + H - pad + 4 + 10 * (i % 2)), mode, fill="black")
    img.save(path)


def main(argv=None):
    p = sample.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                epilog="Any other flag goes to every train.py run, the base's included (e.g. "
                                       "--batch-size 8); 48x80 frames unless --height/--width say otherwise.")
    p.add_argument("--out", default="runs/miniature", help="output folder")
    p.add_argument("--data", default="data/miniature-fingers",
                   help=f"synthetic dataset (written when absent: zoom {ZOOM}, markers x{MARKER_SCALE}, fingers "
                        f"x{FINGER_WIDTH}, {FINGER_TASKS} finger-dominant tasks)")
    p.add_argument("--seeds", type=sample.nonnegative_int, nargs="+", default=[0],
                   help="seeds of the fine-tuning runs (the new modules' initialization, data order, noise)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="VARIANT",
                   help="variants to compare: " + ", ".join(f"{k} ({' '.join(v)})" for k, v in VARIANTS.items()))
    p.add_argument("--base-steps", type=sample.nonnegative_int, default=1500,
                   help="steps of the base pretrained without actions, once, that every run fine-tunes (the "
                        "paper's regime); 0: every run trains from scratch")
    p.add_argument("--steps", type=sample.positive_int, default=600, help="training steps per run")
    p.add_argument("--finetune-lr", type=sample.positive_float, default=3e-4, help="peak lr of the fine-tuning runs")
    p.add_argument("--eval-every", type=sample.nonnegative_int, default=150,
                   help="evaluate the gap every N fine-tuning steps too (0: only the final models)")
    p.add_argument("--curves", nargs="*", choices=MODES, metavar="VARIANT",
                   help="variants whose gap along fine-tuning is evaluated (default: every one of --modes; the flag "
                        "alone: none). The exports are written either way; each costs two evaluations")
    p.add_argument("--reference", choices=MODES, metavar="VARIANT",
                   help="the variant every other one is compared with, paired clip by clip (default: dexac when "
                        "among --modes, else the first of them)")
    p.add_argument("--jobs", type=sample.positive_int, default=2, help="runs trained at a time")
    p.add_argument("--threads", type=sample.positive_int, default=1, help="CPU threads per run")
    p.add_argument("--horizon", type=sample.positive_int, default=25, help="evaluation rollout length in frames")
    p.add_argument("--clips", type=sample.nonnegative_int, default=12,
                   help="evaluation clips, evenly spread (0: all)")
    p.add_argument("--sample-steps", type=sample.positive_int, default=8,
                   help="denoising steps per chunk in evaluation")
    p.add_argument("--metrics", default="psnr,ssim,latent_l2,pck", help="evaluate.py --metrics")
    p.add_argument("--device", type=data.device_name,
                   help="cpu or cuda, for training and evaluation alike (default: cuda when available); on a GPU, a "
                        "larger grid is e.g. --device cuda --height 96 --width 160 --batch-size 16")
    args, args.train_args = p.parse_known_args(argv)  # anything else goes to train.py (--height, --lr, ...)
    if args.device:
        args.train_args += ["--device", args.device]
    # every setting is checked before any dataset is written or any run trained
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            train.parse_args(args.train_args)  # a wrong train.py flag stops here
    except SystemExit as e:
        if e.code:
            lines = [line for line in errors.getvalue().splitlines() if "error:" in line]
            p.error(f"train.py flag: {lines[-1].split('error:', 1)[1].strip() if lines else e.code}")
    if args.horizon < 5 or (args.horizon - 1) % 4:
        p.error(f"argument --horizon: {args.horizon}: give 4k + 1 frames (5, 9, ..., 25)")
    ira = [m for m in args.modes if backbone_of(m) == "irasim"]
    if ira and (error := irasim.sample_steps_error(args.sample_steps)):
        p.error(f"argument --sample-steps: {error} (variants {ira})")
    unknown = set(args.metrics.split(",")) - set(E.METRICS) - {"auto", ""}
    if unknown:
        p.error(f"argument --metrics: unknown {sorted(unknown)}; choose from {E.METRICS}")
    args.curves = args.modes if args.curves is None else args.curves
    if stray := [m for m in args.curves if m not in args.modes]:
        p.error(f"argument --curves: {' '.join(stray)} not among --modes")
    if args.reference and args.reference not in args.modes:
        p.error(f"argument --reference: {args.reference} not among --modes")
    args.reference = args.reference or ("dexac" if "dexac" in args.modes else args.modes[0])
    sample.check_out_dir(args.out)
    bases = sorted({backbone_of(mode) for mode in args.modes}) if args.base_steps else []
    for backbone in bases:
        check_cached(f"{backbone} base", 0, args, base_dir(args, backbone), base_argv(args, backbone))
    for seed in args.seeds:  # a cached model of other settings is refused now, not after hours of training
        for mode in args.modes:
            check_cached(mode, seed, args)
    root = Path(args.data)
    if not root.exists():  # hands, fingers and keypoints visible at 48x80
        synthetic.write_synthetic(root, episodes=6, test_episodes=3, zoom=ZOOM, marker_scale=MARKER_SCALE,
                                  finger_width=FINGER_WIDTH, finger_tasks=FINGER_TASKS)
    if not (root / "stats.json").exists():
        (root / "stats.json").write_text(json.dumps(data.compute_stats(root), indent=1))
    for backbone in bases:
        if not base_export(args, backbone).is_file():
            trained = train_run(base_dir(args, backbone), base_argv(args, backbone),
                                f"the {backbone} base (no actions)", args.jobs * args.threads)
            os.link(trained, base_export(args, backbone))  # the same file under the fixed name the runs' flags give
    jobs = [(mode, seed, args) for seed in args.seeds for mode in args.modes]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on train.py processes
        checkpoints = list(pool.map(train_one, jobs))
    n = len(args.modes)
    per_seed = {}
    for i, seed in enumerate(args.seeds):
        per_seed[seed] = evaluate_seed(seed, checkpoints[i * n:(i + 1) * n], args)
        for mode, export in zip(args.modes, checkpoints[i * n:(i + 1) * n]):
            per_seed[seed][mode]["step"] = along(export)[-1][0]
            if mode in args.curves:
                per_seed[seed][mode]["curve"] = evaluate_curve(seed, mode, export, args)
    metrics = [m for m in ("psnr", "ssim", "lpips", "latent_l2", "pck@5", "pck@10", "pck@20")
               if any(r["true"].get(m) is not None for rows in per_seed.values() for r in rows.values())]
    table = summarize(per_seed, metrics)
    along_table = {m: r for m, r in curves(per_seed, metrics).items() if m in args.curves}
    versus_table = versus(per_seed, args.reference, metrics)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"config": {k: v for k, v in vars(args).items()},
                                                  "per_seed": per_seed, "summary": table,
                                                  "versus": {"reference": args.reference, "table": versus_table},
                                                  "curves": {m: {str(k): v for k, v in r.items()}
                                                             for m, r in along_table.items()}}, indent=1))
    train_minutes = {}  # mean over seeds, when every run recorded its time
    for mode in args.modes:
        files = [out / f"seed{s}" / mode / "train_seconds.txt" for s in args.seeds]
        if all(f.exists() for f in files):
            train_minutes[mode] = round(np.mean([float(f.read_text()) for f in files]) / 60, 1)
    key = [m for m in ("psnr", "latent_l2", "pck@10") if m in metrics]
    text = (markdown(table, metrics, args, train_minutes)
            + (versus_markdown(versus_table, args.reference, key) if versus_table else "")
            + (curve_markdown(along_table, key) if along_table else ""))
    (out / "results.md").write_text(text)
    plot(out / "results.png", table, key or metrics[:3])
    written = [out / "results.md", out / "results.json", out / "results.png"]
    if along_table:  # --curves with no variant: none drawn (an older curves.png is not this call's)
        plot_curves(out / "curves.png", along_table, key[0] if key else metrics[0])
        written.append(out / "curves.png")
    elif (out / "curves.png").exists():
        (out / "curves.png").unlink()
    print(text)
    print(f"wrote {', '.join(map(str, written))}")
    return table


def cli(argv=None):
    """The command line: main's table is printed and written; exit code 0. A SIGTERM/SIGINT stops it cleanly
    (`stop`): the same command resumes."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        main(argv)
    except KeyboardInterrupt:
        print("stopped: the same command resumes (the runs from their checkpoints, the evaluation from its "
              "finished clips)", file=sys.stderr)
        raise


if __name__ == "__main__":
    hub.run_main(cli)
