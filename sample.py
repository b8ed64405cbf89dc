"""
Autoregressive rollouts of a trained world model: one frame + a task + K raw 57-D actions -> a video.

    python sample.py --checkpoint runs/000/model.safetensors --image frame.png --actions actions.npy
    python sample.py --checkpoint runs/000/model.safetensors --episode data/synthetic/test/open_jar/0.hdf5
    python sample.py --checkpoint dexac.safetensors --init base/post-trained --image frame.png --actions a.npy

The actions are cut into chunks of the model's length (12 for 13-frame training clips: 3 latent frames of 4
actions each); every chunk is denoised with the latent frame it starts from held clean (Cosmos' video2world
conditioning), and its last frame conditions the next chunk: the paper's eq. 1-2, a video predicted from its
first frame as a chain of action-conditioned transitions. The last chunk is padded with still actions (no
motion) and trimmed.

As the official `action_conditioned.py` does (carry "reencode", the default), each chunk's latents (its
first frame's included) are decoded alone, clamped and quantized to uint8 exactly as the video is written
(round((x + 1) * 127.5)); its last frame, back in [-1, 1], is encoded alone as the next chunk's first latent
frame, which is what the model saw in training (a clip's first latent frame holds one frame, later ones
four). The video is the chunks' decodes, each later chunk without its first frame (the previous chunk's
last). A chunk starts on a first-frame latent, so it is a whole causal clip: decoding it alone is the right
decode, and the cost is one decode of 1 + chunk/4 latent frames and one 1-frame encode per chunk (linear
in the number of chunks; no decode from the start).

Deliberate choices:
- the official code truncates to uint8 where we round, as our video files do: the frame a chunk is given
  is the one written to the file;
- carry "latent" (`--carry latent`) is kept as an option: the last latent frame (four frames' worth) goes on
  as the next chunk's first, no VAE round trip; the whole latent video is decoded once at the end;
- classifier-free guidance: the unconditional branch sees the embedding of `--negative-prompt`, as the
  official code uses its default negative prompt's, else the empty prompt's (the null embedding); with the
  text mode "none" every prompt, the negative one included, has the same zero embedding and text guidance
  changes nothing;
- each sample draws its noise from its own generator (seed + sample index, chunk), so a batch gives exactly
  the samples that one-by-one runs give, up to floating-point reordering (which the uint8 step of carry
  "reencode" can turn into one level of difference in a frame that starts a chunk);
- input checks (action shape, NaN, image mode and size, sampler, checkpoint statistics) run before any model
  is loaded;
- a model trained with `--trainable new` on a pretrained backbone is exported as its DexAC modules only; it is
  rebuilt on the backbone the file names, or on `--init` (a local file or a Hub spec, model.load_dit);
- with the semantic branch, DINOv3 sees each chunk's first frame, as in training: the given image, then the
  last generated frame: with carry "reencode" the quantized frame that is encoded (one decode for both), with
  carry "latent" the last latent frame decoded alone (exact for the pixel tokenizer, close for the VAE).
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

CARRIES = {  # what conditions chunk c + 1 (rollout's `carry`; evaluate.py records the one it used)
    "reencode": "each chunk's last frame decoded, quantized to uint8 and encoded alone (official)",
    "latent": "each chunk's last latent frame carried over as is",
}


def to_uint8(video):
    """(B, 3, T, H, W) pixels in [-1, 1] -> uint8 (B, T, H, W, 3), clamped and rounded as video files hold them."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1)


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

    def text_context(self, prompts, *, guidance=0.0, negative_prompt=None):
        """prompts [B] -> the DiT's text context (B, L, D); with guidance (2B, L, D): the prompts', then the
        unconditional branch's: the negative prompt's embedding (the official CFG), else the null one (the
        empty prompt's). Built once per rollout: the Reason1 context is 100 MB a sample in bf16."""
        text = self.text(prompts)
        if guidance:
            uncond = self.text.null(1) if negative_prompt is None else self.text([negative_prompt])
            text = torch.cat([text, uncond.expand(len(text), -1, -1)])
        return text.to(self.device, self.dtype)

    def velocity_fn(self, text, actions, frame_mask, *, guidance, feats=None, bar=None):
        """v(x, sigma) with classifier-free guidance over the text: with guidance, text is text_context's
        (2B, L, D), conditional then unconditional, and both branches run in one batch."""
        actions = actions if self.dit.action_cond is not None else None  # action_mode none: the backbone
        two = lambda t: None if t is None else torch.cat([t, t])
        if guidance:  # built once per chunk, not per step
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
    def rollout(self, frame, actions, prompts, seeds, *, steps=35, solver="unipc", schedule="shifted", shift=None,
                guidance=0.0, negative_prompt=None, carry="reencode", progress=True, return_latents=False):
        """frame uint8 (B, H, W, 3); actions (B, K, 57) raw; prompts [B]; seeds [B] -> uint8 (B, 1 + K, H, W, 3)
        (and the latents (B, C, T', h, w), first frame included, with return_latents: with carry "reencode"
        each chunk's generated latents, which follow its re-encoded first frame). shift: the training run's by
        default. negative_prompt: the unconditional branch's text when guidance > 0 (default: the null
        embedding). carry: what conditions the next chunk, one of CARRIES."""
        if carry not in CARRIES:
            raise ValueError(f"unknown carry {carry!r}; choose one of {tuple(CARRIES)}")
        B, K = actions.shape[:2]
        chunk = self.dit.config.action_steps  # actions per chunk; chunk / 4 latent frames follow the held one
        n_chunks = math.ceil(K / chunk)
        pad = np.broadcast_to(still_actions(n_chunks * chunk - K), (B, n_chunks * chunk - K, C.ACTION_DIM))
        actions = torch.from_numpy(np.concatenate([actions, pad], 1)).to(self.device, self.dtype)
        first = torch.from_numpy(np.array(frame)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        first = first.to(self.dtype) / 127.5 - 1  # the frame that starts the chunk, in [-1, 1]
        z = self.tokenizer.encode(first[:, :, None])  # (B, C, 1, h, w)
        text = self.text_context(prompts, guidance=guidance, negative_prompt=negative_prompt)
        shift = self.shift if shift is None else shift
        sigmas = M.shifted_sigmas(steps, shift) if schedule == "shifted" else M.karras_sigmas(steps)
        latents, cond, pieces = [z], z, []  # pieces: carry "reencode", each chunk's frames (B, T, H, W, 3) uint8
        n_new = chunk // tok.TEMPORAL  # latent frames generated per chunk
        frame_mask = torch.zeros(B, 1 + n_new, device=self.device)
        frame_mask[:, 0] = 1
        bar = tqdm(total=n_chunks * steps, desc=f"{n_chunks} chunk(s) x {steps} steps", disable=not progress)
        # eq. 1-2: the video is a chain of action-conditioned transitions, one chunk of actions at a time
        for c in range(n_chunks):
            feats = None
            if self.dino is not None:  # DINOv3 sees each chunk's first frame, as in training
                if c and carry == "latent":  # the carried latent decoded alone (exact for the pixel tokenizer)
                    first = self.tokenizer.decode(cond)[:, :, 0].clamp(-1, 1)
                feats = sem.conditioning_features(self.dino, first).to(self.dtype)
            x_cond = torch.cat([cond, cond.new_zeros(B, cond.shape[1], n_new, *cond.shape[3:])], 2)  # (B, C, 1+n, h, w)
            noise = torch.stack([torch.randn(x_cond.shape[1:], generator=torch.Generator().manual_seed(
                int(s) * 1_000_003 + c)) for s in seeds]).to(self.device, self.dtype)
            v = self.velocity_fn(text, actions[:, c * chunk:(c + 1) * chunk], frame_mask, guidance=guidance,
                                 feats=feats, bar=bar)
            x = M.sample(v, noise, sigmas, solver=solver, x_cond=x_cond, frame_mask=frame_mask)
            latents.append(x[:, :, 1:])
            if carry == "latent":
                cond = x[:, :, -1:]
                continue
            # the chunk starts on a first-frame latent, so it is a whole causal clip: decoded alone, as written
            frames = to_uint8(self.tokenizer.decode(x))  # (B, 1 + chunk, H, W, 3)
            pieces.append((frames if c == 0 else frames[:, 1:]).cpu())  # a later chunk's first is the last one
            first = frames[:, -1].permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1  # (B, 3, H, W), as frame 0
            if c + 1 < n_chunks:
                cond = self.tokenizer.encode(first[:, :, None])  # (B, C, 1, h, w): a first-frame latent
        bar.close()
        z = torch.cat(latents, 2)
        if carry == "latent":
            out = to_uint8(self.tokenizer.decode(z)[:, :, :1 + K]).cpu().numpy()  # (B, 1 + K, H, W, 3)
        else:
            out = torch.cat(pieces, 1)[:, :1 + K].numpy()
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
    p.add_argument("--sampler", default="unipc", help=f"ODE solver, one of {M.SOLVERS} (unipc: the official one)")
    p.add_argument("--schedule", default="shifted", choices=["shifted", "karras"], help="sigma schedule")
    p.add_argument("--shift", type=float, default=None, help="shift of the shifted schedule (default: training's)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free text guidance g (0: off)")
    p.add_argument("--negative-prompt", default=None,
                   help="text of the unconditional branch when --guidance > 0 (the official CFG uses its default "
                        "negative prompt; its embedding must be in the training run's text cache); default: the "
                        "empty prompt's null embedding")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--num-samples", type=int, default=1, help="samples per action file")
    p.add_argument("--carry", default="reencode", choices=list(CARRIES),
                   help="what conditions the next chunk: " + "; ".join(f"{k}: {v}" for k, v in CARRIES.items()))
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
    if args.negative_prompt is not None and not args.guidance:
        print("notice: --negative-prompt has no effect without --guidance")
    elif args.guidance and json.loads(meta.get("text", "{}")).get("mode") == "none":
        print("notice: the model was trained without text (text mode none): --guidance changes nothing")
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
                        guidance=args.guidance, negative_prompt=args.negative_prompt, carry=args.carry)
    print(f"{len(names)} rollout(s) of up to {K} actions in {time.time() - t0:.1f} s")
    out = Path(args.out)
    for name, video, k in zip(names, videos, lengths):
        write_outputs(out, name, video[:1 + k], gt[:1 + k] if gt is not None and len(gt) >= 1 + k else None)
    print(f"wrote {len(names)} video(s) and contact sheet(s) to {out}/")


if __name__ == "__main__":
    main()
