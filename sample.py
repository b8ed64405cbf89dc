"""
Autoregressive rollouts of a trained world model: one frame + a task + K raw 57-D actions -> a video.

    python sample.py --checkpoint runs/000/model.safetensors --image frame.png --actions actions.npy
    python sample.py --checkpoint runs/000/model.safetensors --episode data/synthetic/test/open_jar/0.hdf5
    python sample.py --checkpoint dexac.safetensors --init base/post-trained --image frame.png --actions a.npy

The actions are cut into chunks of the model's length (12 for 13-frame training clips: 3 latent frames of 4
actions each); every chunk is denoised with the latent frame it starts from held clean (Cosmos' video2world
conditioning), and its last latent frame conditions the next chunk: the paper's eq. 1-2, a video predicted
from its first frame as a chain of action-conditioned transitions. The last chunk is padded with still
actions (no motion) and trimmed.

Deliberate choices:
- the latent is carried from chunk to chunk (no decode -> re-encode round trip); `--reencode` decodes the
  last frame and encodes it as a fresh first frame instead, which is what the model saw in training (a
  clip's first latent frame holds one frame, later ones four) at the cost of one VAE round trip per chunk;
- each sample draws its noise from its own generator (seed + sample index, chunk), so a batch gives exactly
  the samples that one-by-one runs give, up to floating-point reordering;
- input checks (action shape, NaN, image mode and size, sampler, checkpoint statistics) run before any model
  is loaded;
- a model trained with `--trainable new` on a pretrained backbone is exported as its DexAC modules only; it is
  rebuilt on the backbone the file names, or on `--init` (a local file or a Hub spec, model.load_dit);
- with the semantic branch, DINOv3 sees each chunk's first frame, as in training: the given image, then the
  last generated frame (its latent decoded alone: exact for the pixel tokenizer, close for the VAE).
Outputs: an MP4 and a PNG contact sheet per sample; with ground truth (--episode) a side-by-side video and
the per-frame PSNR.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import conditioning as C
import data
import hub
import model as M
import semantic as sem
import tokenizer as tok

def still_actions(n):
    """(n, 57) actions of no motion: zero translations and displacements, identity 6D rotations."""
    a = np.zeros((n, C.ACTION_DIM), np.float32)
    for block in ("left_wrist", "right_wrist", "head"):
        a[:, C.ACTION_SLICES[block].start + 3:C.ACTION_SLICES[block].stop] = C.IDENTITY_6D
    return a


def check_actions(a, name="actions"):
    """(K, 57) finite float array, K >= 1, or one clear error."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != C.ACTION_DIM:
        raise ValueError(f"{name} must be (K, {C.ACTION_DIM}) raw actions (layout in data.py), got shape "
                         f"{a.shape}; a single action is (1, {C.ACTION_DIM})")
    if len(a) < 1:
        raise ValueError(f"{name} holds no actions: give at least one (K >= 1)")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has NaN/inf values (first at step {bad[0]}, dimension {bad[1]} "
                         f"{C.ACTION_NAMES[bad[1]]})")
    return a.astype(np.float32)


def load_actions(path):
    """A .npy file, or a directory of them -> [(name, (K, 57))]."""
    path = Path(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no action file {path} (a (K, {C.ACTION_DIM}) .npy file or a directory of them)")
    return [(f.stem, check_actions(np.load(f), str(f))) for f in files]


def load_image(path, size):
    """An image file -> uint8 (H, W, 3) at `size`, converted to RGB and resized with a notice when needed."""
    try:
        img = Image.open(path)
        img.load()
    except OSError as e:  # a missing file, or not an image
        raise FileNotFoundError(f"cannot read the image {path}: {e}") from None
    if img.mode != "RGB":
        print(f"notice: {path} is {img.mode}, not RGB; converting it to RGB")
        img = img.convert("RGB")
    rgb = np.asarray(img)
    if rgb.shape[:2] != tuple(size):
        print(f"notice: {path} is {rgb.shape[1]}x{rgb.shape[0]}, the model runs at {size[1]}x{size[0]}; "
              f"resizing (center crop to the aspect, antialiased)")
        rgb = data.resize_image(rgb, size)
    return rgb


# -----------------------------------------------------------------------------
# the world model: an exported DiT, its tokenizer, its text context


class WorldModel:
    """Everything a rollout needs, rebuilt from one exported file (train.py's export)."""

    def __init__(self, checkpoint, *, device="cpu", dtype=torch.float32, tokenizer_weights=None, base=None,
                 dino=None):
        dit, info = M.load_exported(checkpoint, device=device, dtype=dtype, base=base)
        self._build(dit, info, device=device, dtype=dtype, tokenizer_weights=tokenizer_weights, dino=dino)

    @classmethod
    def from_model(cls, dit, info, *, device="cpu", dtype=torch.float32, tokenizer_weights=None, dino=None):
        """A DiT in memory and an export's metadata dict (keys tokenizer, text, train_config) -> WorldModel."""
        self = cls.__new__(cls)
        self._build(dit.to(device=device, dtype=dtype).eval().requires_grad_(False), info, device=device,
                    dtype=dtype, tokenizer_weights=tokenizer_weights, dino=dino)
        return self

    def _build(self, dit, info, *, device, dtype, tokenizer_weights, dino):
        self.dit, self.info = dit, info
        self.device, self.dtype = torch.device(device), dtype
        t = self.info["tokenizer"]
        kwargs = ({"weights": tokenizer_weights or t.get("weights") or None} if t["name"] == "wan2.1" else
                  {"spatial_compression": t.get("pixel_compression", 8), "mean": t.get("pixel_mean", 0.0),
                   "std": t.get("pixel_std", 1.0)})
        self.tokenizer = tok.build_tokenizer(t["name"], **kwargs).to(device, dtype).eval()  # latents in dtype
        c, text = self.dit.config, self.info["text"]
        tc = self.info["train_config"]
        self.text = sem.TextEmbedder(text["mode"], cache_dir=tc.get("text_cache") or None, text_dim=c.text_dim,
                                     max_tokens=text["tokens"], dtype=dtype)
        self.size, self.shift = (tc["height"], tc["width"]), tc.get("shift", 5.0)
        self.dino = None
        if c.semantic_dim:  # the DINOv3 branch: the encoder whose width the model was trained with
            preset = next(k for k, v in sem.DINO_PRESETS.items() if v.dim == c.semantic_dim)
            self.dino = sem.load_dino(dino or tc.get("dino") or sem.DINO_REPO, preset, device=device, dtype=dtype)

    def velocity_fn(self, text, actions, frame_mask, *, guidance, feats=None, bar=None):
        """v(x, sigma) with classifier-free guidance over the text (cond and uncond in one batch)."""
        actions = actions if self.dit.action_cond is not None else None  # action_mode none: the backbone
        two = lambda t: None if t is None else torch.cat([t, t])
        if guidance:  # built once per chunk, not per step (the Reason1 context is 100 MB a sample in bf16)
            text = torch.cat([text, self.text.null(text.shape[0]).to(self.device, self.dtype)])
            frame_mask, actions, feats = two(frame_mask), two(actions), two(feats)

        def v(x, sigma):
            if bar is not None:
                bar.update(1)
            if guidance == 0:
                return self.dit(x, sigma, text, frame_mask=frame_mask, actions=actions, image_features=feats)
            out = self.dit(two(x), two(sigma), text, frame_mask=frame_mask, actions=actions, image_features=feats)
            return M.guided(*out.chunk(2), guidance)
        return v

    @torch.inference_mode()
    def rollout(self, frame, actions, prompts, seeds, *, steps=35, solver="dpm++2m", schedule="shifted", shift=None,
                guidance=0.0, reencode=False, progress=True, return_latents=False):
        """frame uint8 (B, H, W, 3); actions (B, K, 57) raw; prompts [B]; seeds [B] -> uint8 (B, 1 + K, H, W, 3)
        (and the latents (B, C, T', h, w), first frame included, with return_latents). shift: the training
        run's by default."""
        B, K = actions.shape[:2]
        chunk = self.dit.config.action_steps  # actions per chunk; chunk / 4 latent frames follow the held one
        n_chunks = math.ceil(K / chunk)
        pad = np.broadcast_to(still_actions(n_chunks * chunk - K), (B, n_chunks * chunk - K, C.ACTION_DIM))
        actions = torch.from_numpy(np.concatenate([actions, pad], 1)).to(self.device, self.dtype)
        video = torch.from_numpy(np.array(frame)).to(self.device).permute(0, 3, 1, 2)[:, :, None]  # (B, 3, 1, H, W)
        video = video.to(self.dtype) / 127.5 - 1
        z = self.tokenizer.encode(video)  # (B, C, 1, h, w)
        text = self.text(prompts).to(self.device, self.dtype)
        shift = self.shift if shift is None else shift
        sigmas = M.shifted_sigmas(steps, shift) if schedule == "shifted" else M.karras_sigmas(steps)
        latents, cond = [z], z
        n_new = chunk // tok.TEMPORAL  # latent frames generated per chunk
        frame_mask = torch.zeros(B, 1 + n_new, device=self.device)
        frame_mask[:, 0] = 1
        bar = tqdm(total=n_chunks * steps, desc=f"{n_chunks} chunk(s) x {steps} steps", disable=not progress)
        # eq. 1-2: the video is a chain of action-conditioned transitions, one chunk of actions at a time
        for c in range(n_chunks):
            # DINOv3 sees each chunk's first frame, as in training: the image, then the last generated frame
            # (its latent decoded alone; exact for the pixel tokenizer, close for the VAE)
            feats = None
            if self.dino is not None:
                first = video[:, :, 0] if c == 0 else self.tokenizer.decode(cond)[:, :, 0].clamp(-1, 1)
                feats = sem.conditioning_features(self.dino, first).to(self.dtype)
            x_cond = torch.cat([cond, cond.new_zeros(B, cond.shape[1], n_new, *cond.shape[3:])], 2)  # (B, C, 1+n, h, w)
            noise = torch.stack([torch.randn(x_cond.shape[1:], generator=torch.Generator().manual_seed(
                int(s) * 1_000_003 + c)) for s in seeds]).to(self.device, self.dtype)
            v = self.velocity_fn(text, actions[:, c * chunk:(c + 1) * chunk], frame_mask, guidance=guidance,
                                 feats=feats, bar=bar)
            x = M.sample(v, noise, sigmas, solver=solver, x_cond=x_cond, frame_mask=frame_mask)
            latents.append(x[:, :, 1:])
            cond = x[:, :, -1:]
            if reencode:  # decode (causally, so from the start) and encode the last frame alone, as a first frame
                cond = self.tokenizer.encode(self.tokenizer.decode(torch.cat(latents, 2))[:, :, -1:])
        bar.close()
        z = torch.cat(latents, 2)
        out = self.tokenizer.decode(z)[:, :, :1 + K]  # (B, 3, 1 + K, H, W)
        out = ((out.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        return (out, z) if return_latents else out


# -----------------------------------------------------------------------------
# outputs


def psnr_per_frame(video, gt):
    """uint8 (T, H, W, 3) pairs -> (T,) PSNR in dB on [0, 1] pixels: a quick look beside the videos
    (evaluate.py scores rollouts properly, and a test checks this equals its PSNR)."""
    mse = (((video.astype(np.float64) - gt.astype(np.float64)) / 255) ** 2).mean(axis=(1, 2, 3))
    return np.minimum(10 * np.log10(1 / np.maximum(mse, 1e-30)), 100.0)  # 100 dB for identical frames


def write_outputs(out, name, video, gt=None, fps=30):
    out.mkdir(parents=True, exist_ok=True)
    data.write_video(out / f"{name}.mp4", video, fps=fps)
    rows, labels = [video], ["prediction"]
    if gt is not None:
        data.write_video(out / f"{name}_vs_gt.mp4", np.concatenate([video, gt], 2), fps=fps)
        rows, labels = rows + [gt], labels + ["ground truth"]
        values = psnr_per_frame(video, gt)
        print(f"{name}: PSNR per frame (dB) " + " ".join(f"{v:.1f}" for v in values[1:]) +
              f" | mean over predicted frames {values[1:].mean():.2f}")
    picks = sorted(set(range(0, len(video), 4)) | {len(video) - 1})  # every 4th frame and the last
    data.contact_sheet(out / f"{name}.png", [[v[t] for t in picks] for v in rows], labels)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Roll out a DexAC world model from one frame and raw 57-D actions.")
    p.add_argument("--checkpoint", help="an exported model (train.py writes RUN/model.safetensors)")
    p.add_argument("--init", default=None, help="the pretrained backbone for a checkpoint that holds only the DexAC "
                                                "modules (train.py --trainable new): a local file or Hub spec "
                                                "(model.load_dit); default: the one the checkpoint names")
    p.add_argument("--dino", default=None, help="DINOv3 weights for a model with the semantic branch (default: the "
                                                "training run's)")
    p.add_argument("--actions", help=f"(K, {C.ACTION_DIM}) raw actions .npy, or a directory of them (one batch)")
    p.add_argument("--image", help="first frame (PNG/JPEG); resized to the model's resolution with a notice")
    p.add_argument("--episode", help="an EgoDex .hdf5 (its .mp4 beside it) or an EgoVerse .zarr: first frame, "
                                     "prompt, actions and ground truth from there")
    p.add_argument("--start", type=int, default=0, help="first frame index in --episode")
    p.add_argument("--num-actions", type=int, default=24, help="actions taken from --episode when no --actions")
    p.add_argument("--prompt", default=None, help="task description (default: the episode's, else empty)")
    p.add_argument("--steps", type=int, default=35, help="denoising steps per chunk")
    p.add_argument("--sampler", default="dpm++2m", help=f"ODE solver, one of {M.SOLVERS}")
    p.add_argument("--schedule", default="shifted", choices=["shifted", "karras"], help="sigma schedule")
    p.add_argument("--shift", type=float, default=None, help="shift of the shifted schedule (default: training's)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free text guidance g (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--num-samples", type=int, default=1, help="samples per action file")
    p.add_argument("--reencode", action="store_true", help="re-encode the last frame between chunks")
    p.add_argument("--tokenizer-weights", default=None, help="override the Wan2.1 VAE weights the export names")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype")
    p.add_argument("--height", type=int, default=None, help="frame height (default: the training resolution)")
    p.add_argument("--width", type=int, default=None, help="frame width (default: the training resolution)")
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # every input is checked before the model is loaded
    if not args.checkpoint:
        raise SystemExit("error: --checkpoint is required (an exported model; to time random weights: "
                         "python bench.py sample)")
    if args.sampler not in M.SOLVERS:
        raise SystemExit(f"error: unknown sampler {args.sampler!r}; choose one of {M.SOLVERS}")
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint} not found (train.py exports RUN/model.safetensors)")
    from safetensors import safe_open
    with safe_open(args.checkpoint, "pt") as f:
        meta = f.metadata() or {}
    if "action_stats" not in meta or "train_config" not in meta:
        raise SystemExit(f"error: {args.checkpoint} carries no action statistics/config: export it with train.py")
    tc = json.loads(meta["train_config"])
    size = (args.height or tc["height"], args.width or tc["width"])
    t = json.loads(meta["tokenizer"])
    unit = 2 * (8 if t["name"] == "wan2.1" else t.get("pixel_compression", 8))  # tokenizer x DiT patch
    if size[0] % unit or size[1] % unit:
        raise SystemExit(f"error: --height/--width must be multiples of {unit} for this model, got "
                         f"{size[0]}x{size[1]}")
    if json.loads(meta.get("base", '""')) and not args.init:
        print(f"the checkpoint holds the DexAC modules only; backbone: {json.loads(meta['base'])}")
    if (args.image is None) == (args.episode is None):
        raise SystemExit("error: give the first frame with exactly one of --image or --episode")
    try:
        gt, prompt = None, args.prompt
        if args.episode:
            ep, start = data.run_at(args.episode, args.start)
            n = len(load_actions(args.actions)[0][1]) if args.actions else args.num_actions
            clip = data.load_clip(ep, start, min(n + 1, ep.frames - start), size)
            gt = clip["video"].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
            frame, prompt = gt[0], prompt if prompt is not None else clip["prompt"]
            runs = load_actions(args.actions) if args.actions else [(ep.id.replace("/", "_"), clip["actions"].numpy())]
        else:
            frame = load_image(args.image, size)
            if not args.actions:
                raise SystemExit("error: --image needs --actions")
            runs = load_actions(args.actions)
    except (ValueError, FileNotFoundError, data.DataError) as e:
        raise SystemExit(f"error: {e}") from None

    wm = WorldModel(args.checkpoint, device=args.device, dtype=hub.DTYPES[args.dtype],
                    tokenizer_weights=args.tokenizer_weights, base=args.init, dino=args.dino)
    names = [f"{name}_s{i}" if args.num_samples > 1 else name for name, _ in runs for i in range(args.num_samples)]
    K = max(len(a) for _, a in runs)
    actions = np.stack([np.concatenate([a, still_actions(K - len(a))]) for _, a in runs
                        for _ in range(args.num_samples)])
    lengths = [len(a) for _, a in runs for _ in range(args.num_samples)]
    seeds = [args.seed + i for i in range(len(names))]
    t0 = time.time()
    videos = wm.rollout(np.broadcast_to(frame, (len(names), *frame.shape)), actions, [prompt or ""] * len(names),
                        seeds, steps=args.steps, solver=args.sampler, schedule=args.schedule, shift=args.shift,
                        guidance=args.guidance, reencode=args.reencode)
    print(f"{len(names)} rollout(s) of up to {K} actions in {time.time() - t0:.1f} s")
    out = Path(args.out)
    for name, video, k in zip(names, videos, lengths):
        write_outputs(out, name, video[:1 + k], gt[:1 + k] if gt is not None and len(gt) >= 1 + k else None)
    print(f"wrote {len(names)} video(s) and contact sheet(s) to {out}/")


if __name__ == "__main__":
    main()
