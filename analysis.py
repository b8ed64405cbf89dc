"""
The paper's analysis figures for one trained checkpoint, on real data (an EgoDex / EgoVerse root or a latent
cache) or on the synthetic dataset:

    python analysis.py --checkpoint RUN/model.safetensors --data ROOT --out figures/ [--runs RUN_A RUN_B ...]
                       [--clips N]

What it draws (PNG, with the numbers behind each in numbers.json and a list of what was written in figures.md):
- Figure 2, action magnitudes: per action dimension, |raw action - still action| over the training clips, on a
  log scale and coloured by family (conditioning.ACTION_FAMILIES), beside the same per family. The still action
  is conditioning.still_actions: zero translations and finger displacements, identity 6D rotations.
- Figure 3, training loss per action mode: loss vs step of train.py run directories (metrics.jsonl), each line
  labelled with the run's action_mode (config.json), raw faint and a running mean on top.
- Figure 7, the action embedding before AdaLN: emb_d (B, T, D), the term model.DiT.forward adds to the timestep
  sinusoid (DexAC: GlobalModulation's output; mlp / mlp-flat: their embedder's), averaged over the predicted
  latent frames; clips (sorted by the family of their largest normalized action, then task) x the K channels
  that vary most across clips.
- Figures 8-9, PCA and t-SNE of the SAT tokens (B, S, N, C) (DexAC modes only): every token a point coloured by
  its dimension's family, and every clip a point (its tokens flattened) coloured by its task.

With --along, for each --runs run and each of its exports along training (train.py --export-every), on the
same probe clips at noise level 0.5: how much the predicted velocity moves when one action family comes from
another clip (0: that family is ignored), and each conditioning part's gradient norm relative to its weights
(a part whose gradient stays 0 never learns): fig_action_use.png, the tool for "why does a mode ignore its
actions". The zero-initialized output layers pass no gradient upstream at step 0, so early in training only
they learn.

Our decisions (the paper shows the figures, not how they were made):
- the clips are consecutive clip-length windows of every training run (--clips spreads N of them evenly), the
  clip length the checkpoint was trained with; a latent cache gives its own clips (it holds their actions);
- a clip's task is its EgoDex task folder; EgoVerse ids carry none, so its prompt stands in;
- a clip's family is the family of the dimension whose z-scored action (the checkpoint's statistics) is largest;
- PCA is a plain SVD of the centred points; t-SNE (scikit-learn) sees at most MAX_TSNE points, evenly spread.
matplotlib and scikit-learn are imported where they are used: `pip install -e ".[analysis]"`.
"""

import argparse
import importlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import conditioning as C
import data
import hub
import irasim
import sample as S
import tokenizer as tok

INSTALL = 'pip install -e ".[analysis]"'
FAMILY_OF = [next(f for f, idx in C.ACTION_FAMILIES.items() if d in idx) for d in range(C.ACTION_DIM)]
FAMILY_COLORS = {"wrist": "tab:blue", "finger": "tab:orange", "head": "tab:green"}
FLOOR = 1e-8  # exact zeros (a still head) cannot sit on a log axis: they are drawn at this floor
MAX_TSNE = 2000  # t-SNE is quadratic in the points; more than this only costs time


class AnalysisError(Exception):
    pass


def need(module):
    """Import an optional dependency, or one error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AnalysisError(f"the analysis figures need {module.split('.')[0]}: {INSTALL}") from None


def new_figure(**kw):
    # a bare Figure, not pyplot: no GUI backend, no global state between figures
    return need("matplotlib.figure").Figure(**kw)


# -----------------------------------------------------------------------------
# the clips: raw actions (n, T_a, 57) of the training data, with each clip's task


class Clips(NamedTuple):
    actions: np.ndarray  # (n, T_a, 57) raw float32
    tasks: list          # n task names
    episodes: list       # n episode ids
    starts: list         # n first frames in their episode


def task_of(episode, prompt):
    parts = episode.split("/")  # EgoDex "part1/<task>/<k>"; EgoVerse "<split>/<hash>" has no task
    return parts[1] if len(parts) == 3 else (prompt or "unknown")


def clip_plan(frames, clip_len, n_clips=None):
    """[(run, start)]: consecutive clip_len windows of every run, then n_clips of them evenly spread."""
    plan = [(i, s) for i, f in enumerate(frames) for s in range(0, f - clip_len + 1, clip_len)]
    if n_clips and n_clips < len(plan):
        plan = [plan[k] for k in np.linspace(0, len(plan) - 1, n_clips).round().astype(int)]
    return plan


def load_clips(root, clip_len, n_clips=None):
    """The training clips of a dataset root or a latent cache -> Clips."""
    root = Path(root)
    if not root.exists():
        raise AnalysisError(f"--data {root} does not exist: give an EgoDex / EgoVerse root or a latent cache")
    rows = []
    if (root / data.CACHE_MANIFEST).is_file():
        cache = data.CachedClipDataset(root)
        if cache.manifest["clip_len"] != clip_len:
            raise AnalysisError(f"the cache {root} holds {cache.manifest['clip_len']}-frame clips, the checkpoint "
                                f"was trained on {clip_len}-frame clips: give a cache made for it, or the raw root")
        for i, _ in tqdm(clip_plan([clip_len] * len(cache), clip_len, n_clips), desc="clips"):
            c = cache[i]
            rows.append((c["actions"].numpy(), task_of(c["episode"], c["prompt"]), c["episode"], c["start"]))
    else:
        episodes, _ = data.load_index(root, data.TRAIN_SPLITS)
        for i, s in tqdm(clip_plan([e.frames for e in episodes], clip_len, n_clips), desc="clips"):
            ep = episodes[i]
            try:
                r = data.read_track(ep, s, s + clip_len)
            except data.EpisodeError as e:
                tqdm.write(f"skipping {ep.id}: {e.reason}")
                continue
            rows.append((C.compute_actions(r.track), task_of(ep.id, r.prompt), ep.id, ep.start + s))
    if not rows:
        raise AnalysisError(f"no training clip of {clip_len} frames in {root}")
    actions, tasks, episodes, starts = zip(*rows)
    return Clips(np.stack(actions).astype(np.float32), list(tasks), list(episodes), list(starts))


def clip_families(actions, mean, std):
    """(n, T_a, 57) raw -> n family names: the family of each clip's largest z-scored action."""
    z = np.abs((actions - np.asarray(mean)) / np.where(np.asarray(std) > 0, std, 1.0))  # (n, T_a, 57)
    return [FAMILY_OF[d] for d in z.max(1).argmax(1)]


# -----------------------------------------------------------------------------
# Figure 2: action magnitudes per dimension and family


def magnitudes(actions):
    """(n, T_a, 57) raw -> (|a - still| (n T_a, 57), numbers: the median per dimension and per family)."""
    a = np.asarray(actions, np.float64).reshape(-1, C.ACTION_DIM)
    mag = np.abs(a - C.still_actions(1).astype(np.float64))  # (n T_a, 57)
    numbers = {"names": list(C.ACTION_NAMES), "families": FAMILY_OF, "clips": len(actions),
               "median": np.median(mag, 0).tolist(),
               "family_median": {f: float(np.median(mag[:, list(i)])) for f, i in C.ACTION_FAMILIES.items()}}
    return mag, numbers


def plot_magnitudes(mag, path):
    fig = new_figure(figsize=(18, 5), layout="constrained")
    ax, fam_ax = fig.subplots(1, 2, width_ratios=[8, 1], sharey=True)
    shown = np.maximum(mag, FLOOR)
    boxes = ax.boxplot(list(shown.T), patch_artist=True, showfliers=False, whis=(5, 95))
    for box, f in zip(boxes["boxes"], FAMILY_OF):
        box.set_facecolor(FAMILY_COLORS[f])
    ax.set_xticks(range(1, C.ACTION_DIM + 1), C.ACTION_NAMES, rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("|action - still action| (m; 6D unitless)")
    ax.set_title("action magnitude per dimension (whiskers 5-95%)")
    fams = list(C.ACTION_FAMILIES)
    boxes = fam_ax.boxplot([shown[:, list(C.ACTION_FAMILIES[f])].ravel() for f in fams], patch_artist=True,
                           showfliers=False, whis=(5, 95))
    for box, f in zip(boxes["boxes"], fams):
        box.set_facecolor(FAMILY_COLORS[f])
    fam_ax.set_xticks(range(1, len(fams) + 1), fams)
    fam_ax.set_title("per family")
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# Figure 3: training loss per action mode


def read_run(run):
    """A train.py run directory -> (action mode, steps, losses) of its finite logged losses."""
    run = Path(run)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise AnalysisError(f"--runs {run} is not a train.py run directory (no metrics.jsonl): give the "
                            f"numbered folders train.py writes under its --out")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines = [h for h in lines if h.get("loss") is not None and np.isfinite(h["loss"])]
    if not lines:
        raise AnalysisError(f"{metrics} holds no logged loss yet: let the run log a step first")
    config = run / "config.json"
    mode = json.loads(config.read_text())["train"]["action_mode"] if config.is_file() else "unknown mode"
    return mode, np.array([h["step"] for h in lines]), np.array([h["loss"] for h in lines], np.float64)


def running_mean(y, k):
    """The trailing mean of the last k values (fewer at the start), as long as y."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo = np.maximum(0, i - k + 1)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


def short_names(paths):
    """Each path's shortest end that no other path in the list shares (a miniature grid's runs share their folder
    names: dexac/000-tiny-dexac-48x80, dexac-x200/000-tiny-dexac-48x80); a path given twice keeps its whole."""
    paths = [Path(p).resolve() for p in paths]
    def end(path):
        for k in range(1, len(path.parts)):
            if sum(q.parts[-k:] == path.parts[-k:] for q in paths) == 1:
                return "/".join(path.parts[-k:])
        return str(path)
    return [end(path) for path in paths]


def loss_curves(runs):
    """Run directories -> {label: {run, mode, step, loss, smooth}}; a label is the run's action mode, plus,
    when runs share a mode, the shortest end of their paths that tells them apart (a miniature grid's runs
    share their folder names: "dexac (dexac-x200/000-tiny-dexac-48x80)")."""
    read = [(Path(r), *read_run(r)) for r in runs]
    modes = [m for _, m, _, _ in read]
    curves = {}
    for run, mode, steps, losses in read:
        label = mode
        if modes.count(mode) > 1:
            same = [r for r, m, _, _ in read if m == mode]
            label = f"{mode} ({short_names(same)[same.index(run)]})"
        label = label if label not in curves else f"{label} [{len(curves) + 1}]"  # one run given twice
        smooth = running_mean(losses, max(1, len(losses) // 20))  # over ~5% of the curve, as train.py's loss.png
        curves[label] = {"run": str(run), "mode": mode, "step": steps.tolist(), "loss": losses.tolist(),
                         "smooth": smooth.tolist()}
    return curves


def plot_losses(curves, path):
    fig = new_figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for k, (label, c) in enumerate(curves.items()):
        color = f"C{k}"
        ax.plot(c["step"], c["loss"], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(c["step"], c["smooth"], color=color, linewidth=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (flow matching)")
    ax.set_title("training loss per action mode (faint: logged, bold: running mean)")
    ax.legend()
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# Figure 7: the action context emb_d that enters the AdaLN


def probe(dit, info, n):
    """Latents (n, T', 1, 1, D) and the frame mask (n, T') of the checkpoint's clips. The conditioning's emb_d
    and tokens never read the latents: one token per latent frame keeps the shape checks and costs nothing."""
    tc, c = info["train_config"], dit.config
    per_frame = isinstance(dit, irasim.IRASim)  # IRASim: a latent frame per frame
    T = tc["frames"] if per_frame else tok.latent_frames(tc["frames"]) // c.patch_temporal
    device = next(dit.parameters()).device
    mask = torch.zeros(n, T, device=device)
    mask[:, :tc.get("cond_frames", 1)] = 1
    return torch.zeros(n, T, 1, 1, c.dim, device=device), mask


@torch.no_grad()
def action_context(dit, info, actions, batch=64):
    """Raw actions (n, T_a, 57) -> emb_d (n, T', D) fp32 numpy, or None when the mode has no such term."""
    out = []
    for a in torch.as_tensor(actions).float().split(batch):
        x, mask = probe(dit, info, len(a))
        _, emb_d, _ = dit.action_cond(a.to(x.device), x, mask)
        if emb_d is None:
            return None
        out.append(emb_d.float().cpu())
    return torch.cat(out).numpy()


def embeddings(dit, info, clips, top_k=64):
    """The Figure 7 numbers: emb_d (n, T', D), its mean over the predicted frames per clip (n, D), the clip order
    (family, then task), the top_k channels by variance across clips and the heatmap (n, top_k) in that order;
    None when the mode has no emb_d."""
    emb = action_context(dit, info, clips.actions)
    if emb is None:
        return None
    _, mask = probe(dit, info, 1)
    predicted = mask[0].cpu().numpy() == 0
    per_clip = emb[:, predicted].mean(1)  # (n, D)
    stats = info["action_stats"]
    families = clip_families(clips.actions, stats["mean"], stats["std"])
    fams = list(C.ACTION_FAMILIES)
    order = sorted(range(len(per_clip)), key=lambda i: (fams.index(families[i]), clips.tasks[i], i))
    channels = np.argsort(-per_clip.var(0), kind="stable")[:top_k]
    return {"emb_d": emb, "per_clip": per_clip, "order": order, "channels": channels, "families": families,
            "heat": per_clip[order][:, channels]}


def plot_heatmap(e, tasks, path):
    heat = e["heat"]
    fig = new_figure(figsize=(10, max(4, 0.12 * len(heat) + 2)), layout="constrained")
    ax = fig.subplots()
    v = float(np.abs(heat).max()) or 1.0
    im = ax.imshow(heat, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
    groups = [(e["families"][i], tasks[i]) for i in e["order"]]
    starts = [k for k in range(len(groups)) if k == 0 or groups[k] != groups[k - 1]]
    ends = starts[1:] + [len(groups)]
    ax.set_yticks([(a + b - 1) / 2 for a, b in zip(starts, ends)], [f"{groups[a][0]} / {groups[a][1]}"
                                                                     for a in starts], fontsize=7)
    for a in starts[1:]:
        ax.axhline(a - 0.5, color="black", linewidth=0.5)
    ax.set_xticks(range(len(e["channels"])), e["channels"], rotation=90, fontsize=5)
    ax.set_xlabel(f"channel of emb_d (top {len(e['channels'])} by variance across clips)")
    untrained = "; all zero: the zero-initialized output has not moved yet" if not np.abs(heat).max() else ""
    ax.set_title(f"action context before AdaLN (emb_d, mean over predicted latent frames{untrained})")
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# Figures 8-9: PCA and t-SNE of the SAT tokens


@torch.no_grad()
def sat_tokens(dit, info, actions, batch=64):
    """Raw actions (n, T_a, 57) -> the tokenizer's tokens (n, S, N, C) fp32 numpy (DexAC modes only)."""
    ac, out = dit.action_cond, []
    for a in torch.as_tensor(actions).float().split(batch):
        x, _ = probe(dit, info, len(a))
        a = ac.prepare(a.to(x.device), x).to(next(ac.tokenizer.parameters()).dtype)  # z-scored as in training
        out.append(ac.tokenizer(a).float().cpu())
    return torch.cat(out).numpy()


def pca(X, k=2):
    """(P, F) -> (P, k) coordinates on the top-k principal axes, and the fraction of variance each explains."""
    X = torch.as_tensor(X, dtype=torch.float64)
    X = X - X.mean(0)
    _, s, Vh = torch.linalg.svd(X, full_matrices=False)
    return (X @ Vh[:k].T).numpy(), (s[:k] ** 2 / (s ** 2).sum().clamp_min(1e-300)).numpy()


def tsne(X, seed=0):
    """(P, F) -> (P, 2) t-SNE coordinates (scikit-learn), with a perplexity the number of points allows."""
    TSNE = need("sklearn.manifold").TSNE
    perplexity = max(1.0, min(30.0, (len(X) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(np.asarray(X, np.float64))


def token_points(tokens, tasks):
    """tokens (n, S, N, C) -> the two point sets: every token (n S N, C) with its dimension and family, and
    every clip (n, S N C) with its task."""
    n, S_, N, C_ = tokens.shape
    dims = np.tile(np.arange(N), n * S_)  # the token (b, s, d) sits at row (b S + s) N + d
    return {"tokens": tokens.reshape(-1, C_), "dims": dims, "token_families": [FAMILY_OF[d] for d in dims],
            "clips": tokens.reshape(n, -1), "tasks": list(tasks)}


def spread(n, most):
    """Indices of at most `most` of n points, evenly spread."""
    return np.arange(n) if n <= most else np.linspace(0, n - 1, most).round().astype(int)


def projections(points, seed=0):
    """PCA of both point sets, and t-SNE of those with at least 3 points (at most MAX_TSNE of them)."""
    out = {}
    for name in ("tokens", "clips"):
        X = points[name]
        out[f"pca_{name}"], out[f"pca_{name}_explained"] = pca(X)
        keep = spread(len(X), MAX_TSNE)
        out[f"tsne_{name}_index"] = keep
        out[f"tsne_{name}"] = tsne(X[keep], seed) if len(keep) >= 3 else None
    return out


def plot_projection(points, xy_tokens, xy_clips, kind, path, tok_index=None):
    fig = new_figure(figsize=(13, 6), layout="constrained")
    a, b = fig.subplots(1, 2)
    fams = np.array(points["token_families"] if tok_index is None else
                    [points["token_families"][k] for k in tok_index])
    for f, color in FAMILY_COLORS.items():
        sel = fams == f
        a.scatter(xy_tokens[sel, 0], xy_tokens[sel, 1], s=4, alpha=0.6, color=color, label=f)
    a.set_title(f"{kind} of the SAT tokens (a token per clip and dimension), by action family")
    a.legend(markerscale=3)
    tasks = np.array(points["tasks"])
    for k, t in enumerate(sorted(set(tasks))):
        sel = tasks == t
        b.scatter(xy_clips[sel, 0], xy_clips[sel, 1], s=14, color=f"C{k % 10}", label=t)
    b.set_title(f"{kind} of the clips (their tokens flattened), by task")
    b.legend(fontsize=7)
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# the command


# -----------------------------------------------------------------------------
# why a model ignores its actions: output sensitivity per action family and gradient norms per conditioning
# part, at each export along a run (train.py --export-every)


def probe_batch(wm, root, clips, size, seed=0):
    """Fixed training clips of the run's length at its size, encoded once: (x0, actions, text, frame mask,
    noise, sigma), the same for every export of a run (same seed)."""
    cfg = wm.info["train_config"]
    episodes, _ = data.load_index(root, data.split_names(cfg.get("splits", "")) or data.TRAIN_SPLITS)
    plan = clip_plan([e.frames for e in episodes], cfg["frames"], clips)  # as the figures' clips are chosen
    batch = []
    for e, s in plan:
        try:
            batch.append(data.load_clip(episodes[e], int(s), cfg["frames"], size))
        except data.DataError as err:  # a broken episode (DESIGN.md section 11) costs its clip, not the run
            tqdm.write(f"skipping {episodes[e].id} @ {s} in the probe: {err}")
    if len(batch) < 2:
        raise AnalysisError(f"--along needs at least 2 readable training clips in {root}, found {len(batch)}")
    video = torch.stack([b["video"] for b in batch]).float() / 127.5 - 1
    with torch.no_grad():
        x0 = wm.tokenizer.encode(video.to(wm.device, wm.dtype)).float()
    actions = torch.stack([b["actions"] for b in batch]).to(wm.device)
    mask = torch.zeros(len(batch), x0.shape[2], device=wm.device)
    mask[:, :cfg.get("cond_frames", 1)] = 1
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(wm.device)
    sigma = torch.full((len(batch),), 0.5, device=wm.device)  # mid-trajectory, where actions decide the motion
    return x0, actions, wm.text_context([""] * len(batch)).float(), mask, noise, sigma


def noised(x0, mask, noise, sigma):
    """The DiT's input at noise level sigma: x_sigma = sigma eps + (1 - sigma) x0, the conditioning frames clean."""
    m, s = mask[:, None, :, None, None], sigma[:, None, None, None, None]
    return m * x0 + (1 - m) * (s * noise + (1 - s) * x0)


def sensitivities(dit, x0, actions, text, mask, noise, sigma):
    """{family: ||v(a) - v(a with that family's dims from the next clip)|| / ||v(a)||, "all": every dim}: how
    much the predicted velocity depends on each action family (0: ignored)."""
    x = noised(x0, mask, noise, sigma)
    other = actions.roll(1, 0)
    groups = {**{f: list(idx) for f, idx in C.ACTION_FAMILIES.items()},
              "all": list(range(actions.shape[-1]))}
    with torch.no_grad():
        ref = dit(x, sigma, text, mask, actions=actions)
        out = {}
        for name, idx in groups.items():
            a = actions.clone()
            a[..., idx] = other[..., idx]
            out[name] = ((dit(x, sigma, text, mask, actions=a) - ref).norm() / ref.norm()).item()
    return out


def grad_norms(dit, x0, actions, text, mask, noise, sigma):
    """{conditioning part: gradient norm of the flow loss on this batch / its parameters' norm} for each
    submodule of dit.action_cond with parameters (a part that does not learn: 0)."""
    m = mask[:, None, :, None, None]
    x = noised(x0, mask, noise, sigma)
    dit.zero_grad(set_to_none=True)
    with torch.enable_grad():
        dit.requires_grad_(True)
        v = dit(x, sigma, text, mask, actions=actions)
        (((v - (noise - x0)) ** 2) * (1 - m)).mean().backward()
    parts = {}
    for name, p in dit.action_cond.named_parameters():
        part = name.rsplit(".", 1)[0]
        g, w = parts.get(part, (0.0, 0.0))
        grad = p.grad.float().norm() ** 2 if p.grad is not None else 0.0
        parts[part] = (g + grad, w + p.detach().float().norm() ** 2)
    dit.requires_grad_(False)
    return {k: float(g ** 0.5) / max(float(w ** 0.5), 1e-12) for k, (g, w) in parts.items()}


def plot_action_use(result, path):
    """Sensitivity of the velocity to each action family, and the gradient of each conditioning part, against
    the step, one panel row per run."""
    plt = need("matplotlib.pyplot")
    runs = [r for r, rows in result.items() if rows]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for (ax_s, ax_g), run in zip(axes, runs):
        rows = result[run]
        steps = [r["step"] for r in rows]
        for name in rows[0]["sensitivity"]:
            ax_s.plot(steps, [r["sensitivity"][name] for r in rows], marker="o", label=name,
                      color=FAMILY_COLORS.get(name, "black"))
        for i, name in enumerate(rows[0]["grad"]):  # more parts than colours: the style tells them apart
            ax_g.plot(steps, [max(r["grad"][name], FLOOR) for r in rows], marker=".", label=name,
                      linestyle=("-", "--", ":")[i // 10 % 3])
        ax_s.set_title(f"{run}\n|v(a) - v(a, family from another clip)| / |v(a)|", fontsize=9)
        ax_g.set_title(f"{run}\n|grad| / |weights| per conditioning part", fontsize=9)
        ax_s.set(xlabel="step")
        ax_g.set(xlabel="step", yscale="log")
        ax_s.legend(fontsize=7)
        ax_g.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnose(runs, root, clips=8, size=None):
    """For each run (a train.py run directory) and each of its exports along training: sensitivities and
    grad_norms on the same probe batch -> {run (short_names): [{"step", "sensitivity": {...}, "grad": {...}}]}."""
    result = {}
    for run, name in zip(map(Path, runs), short_names(runs)):
        exports = sorted((run / "exports").glob("step_*.safetensors")) + [run / "model.safetensors"]
        rows, probe = [], None
        for path in tqdm(exports, desc=f"diagnose {run.name}"):
            wm = S.WorldModel(path)
            if wm.dit.action_cond is None or wm.backbone != "cosmos":  # the probe reads a flow's velocity
                break
            cfg = wm.info["train_config"]
            probe = probe or probe_batch(wm, root, clips, size or (cfg["height"], cfg["width"]))
            step = wm.info["step"]
            rows.append({"step": step, "sensitivity": sensitivities(wm.dit, *probe),
                         "grad": grad_norms(wm.dit, *probe)})
        result[name] = rows
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Draw the paper's analysis figures (2, 3, 7, 8-9) for a trained "
                                            "checkpoint, on real or synthetic data.")
    p.add_argument("--checkpoint", required=True, help="an export of train.py (RUN/model.safetensors)")
    p.add_argument("--data", required=True, help="EgoDex / EgoVerse root or latent cache: the clips to analyse")
    p.add_argument("--out", required=True, help="folder for the figures, numbers.json and figures.md")
    p.add_argument("--runs", nargs="+", default=None,
                   help="train.py run directories for the loss curves (default: the checkpoint's own run)")
    p.add_argument("--clips", type=data.int_at_least(1), default=256,
                   help="training clips to analyse, evenly spread over the data")
    p.add_argument("--top-k", type=data.int_at_least(1), default=64,
                   help="channels of emb_d shown in the heatmap (most variable across clips)")
    p.add_argument("--along", action="store_true",
                   help="also, at each export along each --runs run (train.py --export-every): how much the "
                        "predicted velocity depends on each action family, and each conditioning part's gradient "
                        "(why a model ignores its actions)")
    p.add_argument("--probe-clips", type=data.int_at_least(2), default=8, help="training clips of that probe")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed")
    p.add_argument("--device", default="cpu", help="device for the action conditioning (cpu, cuda, cuda:N)")
    return p.parse_args(argv)


def default_runs(checkpoint, given):
    """The runs for Figure 3, and why there are none: the ones given, else the checkpoint's run directory."""
    if given:
        return given, None
    run = Path(checkpoint).parent
    if (run / "metrics.jsonl").is_file():
        return [run], None
    return [], f"no --runs given and {run} (the checkpoint's folder) holds no metrics.jsonl"


def main(argv=None):
    args = parse_args(argv)
    need("matplotlib.figure")  # before any work
    device = S.check_device(args.device)
    if not Path(args.data).exists():
        raise AnalysisError(f"--data {args.data} does not exist: give an EgoDex / EgoVerse root or a latent cache")
    runs, no_runs = default_runs(args.checkpoint, args.runs)
    curves = loss_curves(runs) if runs else None  # a bad run directory fails here, before the slow part
    out = S.check_out_dir(args.out)
    dit, info = S.load_model(args.checkpoint, device=device, dtype=torch.float32)  # either backbone, LoRA too
    mode = info["model_config"]["action_mode"]
    print(f"checkpoint {args.checkpoint}: action mode {mode}, step {info.get('step')}")
    clips = load_clips(args.data, info["train_config"]["frames"], args.clips)
    written, skipped, numbers = {}, {}, {"checkpoint": str(args.checkpoint), "mode": mode, "data": str(args.data)}

    mag, numbers["magnitudes"] = magnitudes(clips.actions)
    plot_magnitudes(mag, out / "fig2_action_magnitudes.png")
    written["fig2_action_magnitudes.png"] = "Figure 2: |action - still action| per dimension and family"

    if curves:
        plot_losses(curves, out / "fig3_loss_curves.png")
        written["fig3_loss_curves.png"] = f"Figure 3: training loss of {len(curves)} run(s) by action mode"
        numbers["losses"] = {k: {"run": c["run"], "final_smooth": c["smooth"][-1]} for k, c in curves.items()}
    else:
        skipped["fig3_loss_curves.png"] = no_runs

    e = embeddings(dit, info, clips, args.top_k) if dit.action_cond is not None else None
    if e is not None:
        plot_heatmap(e, clips.tasks, out / "fig7_action_embedding.png")
        written["fig7_action_embedding.png"] = "Figure 7: emb_d before AdaLN, clips x most variable channels"
        numbers["embedding"] = {"channels": e["channels"].tolist(), "variance": e["per_clip"].var(0)[
            e["channels"]].tolist()}
    else:
        skipped["fig7_action_embedding.png"] = f"action mode {mode!r} adds no action term to the sinusoid (emb_d)"

    if isinstance(dit.action_cond, C.DexAC):
        points = token_points(sat_tokens(dit, info, clips.actions), clips.tasks)
        proj = projections(points, args.seed)
        plot_projection(points, proj["pca_tokens"], proj["pca_clips"], "PCA", out / "fig8_sat_pca.png")
        written["fig8_sat_pca.png"] = "Figure 8: PCA of the SAT tokens (by family) and of the clips (by task)"
        numbers["pca_explained"] = {k: proj[f"pca_{k}_explained"].tolist() for k in ("tokens", "clips")}
        if proj["tsne_clips"] is not None:
            plot_projection(points, proj["tsne_tokens"], proj["tsne_clips"], "t-SNE",
                            out / "fig9_sat_tsne.png", proj["tsne_tokens_index"])
            written["fig9_sat_tsne.png"] = "Figure 9: t-SNE of the SAT tokens and of the clips"
        else:
            skipped["fig9_sat_tsne.png"] = f"t-SNE needs at least 3 clips, got {len(clips.actions)}"
    else:
        for name in ("fig8_sat_pca.png", "fig9_sat_tsne.png"):
            skipped[name] = f"action mode {mode!r} has no SAT tokens (DexAC modes only)"

    if args.along:
        use = diagnose(runs, args.data, args.probe_clips)
        if any(use.values()):
            plot_action_use(use, out / "fig_action_use.png")
            written["fig_action_use.png"] = "action-family sensitivity and conditioning gradients along training"
            numbers["action_use"] = use
        else:
            skipped["fig_action_use.png"] = "no --runs run is a Cosmos run with action conditioning (the probe " \
                                            "reads the rectified flow's velocity)"

    hub.atomic_write(out / "numbers.json", json.dumps(numbers, indent=1))
    written["numbers.json"] = "the numbers behind the figures (medians per dimension and family, ...)"
    index = ["# Analysis figures", "", f"checkpoint `{args.checkpoint}` ({mode}), data `{args.data}`, "
             f"{len(clips.actions)} clips", ""] + [f"- `{k}`: {v}" for k, v in written.items()] + \
            [f"- skipped `{k}`: {v}" for k, v in skipped.items()]
    hub.atomic_write(out / "figures.md", "\n".join(index) + "\n")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"analysis: {len(clips.actions)} clips, {len(written) - 1} figures, numbers.json and figures.md in {out}")


if __name__ == "__main__":
    hub.run_main(main)
