"""
Autoregressive rollouts of a trained world model: one frame + a task + K raw 57-D actions -> a video.

    python sample.py --checkpoint runs/000/model.safetensors --image frame.png --actions actions.npy
    python sample.py --checkpoint runs/000/model.safetensors --episode data/synthetic/test/open_jar/0.hdf5
    python sample.py --checkpoint dexac.safetensors --init base/post-trained --image frame.png --actions a.npy

The actions are cut into chunks of the model's length (12 for 13-frame training clips: 3 latent frames of 4
actions each); every chunk is denoised with the latent frame it starts from held clean (Cosmos' video2world conditioning), and its last latent frame
conditions the next chunk. The last chunk is padded with still actions (no motion) and trimmed.

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
import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import conditioning
import data
import evaluate as E
import model as M
import semantic as sem
import tokenizer as tok
import train

def still_actions(n):
    """(n, 57) actions of no motion: zero translations and displacements, identity 6D rotations."""
    a = np.zeros((n, data.ACTION_DIM), np.float32)
    for block in ("left_wrist", "right_wrist", "head"):
        a[:, data.ACTION_SLICES[block].start + 3:data.ACTION_SLICES[block].stop] = data.IDENTITY_6D
    return a


def check_actions(a, name="actions"):
    """(K, 57) finite float array, K >= 1, or one clear error."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != data.ACTION_DIM:
        raise ValueError(f"{name} must be (K, {data.ACTION_DIM}) raw actions (layout in data.py), got shape "
                         f"{a.shape}; a single action is (1, {data.ACTION_DIM})")
    if len(a) < 1:
        raise ValueError(f"{name} holds no actions: give at least one (K >= 1)")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has NaN/inf values (first at step {bad[0]}, dimension {bad[1]} "
                         f"{data.ACTION_NAMES[bad[1]]})")
    return a.astype(np.float32)


def load_actions(path):
    """A .npy file, or a directory of them -> [(name, (K, 57))]."""
    path = Path(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no action file {path} (a (K, {data.ACTION_DIM}) .npy file or a directory of them)")
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

    def __init__(self, checkpoint, device="cpu", dtype=torch.float32, tokenizer_weights=None, base=None,
                 dino=None):
        dit, info = M.load_exported(checkpoint, device=device, dtype=dtype, base=base)
        self._build(dit, info, device, dtype, tokenizer_weights, dino)

    @classmethod
    def from_model(cls, dit, info, device="cpu", dtype=torch.float32, tokenizer_weights=None, dino=None):
        """A DiT in memory and an export's metadata dict (keys tokenizer, text, train_config) -> WorldModel."""
        self = cls.__new__(cls)
        self._build(dit.to(device=device, dtype=dtype).eval().requires_grad_(False), info, device, dtype,
                    tokenizer_weights, dino)
        return self

    def _build(self, dit, info, device, dtype, tokenizer_weights, dino):
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

    def velocity_fn(self, text, actions, frame_mask, guidance, feats=None, bar=None):
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
    def rollout(self, frame, actions, prompts, seeds, steps=35, solver="dpm++2m", schedule="shifted", shift=None,
                guidance=0.0, reencode=False, progress=True, return_latents=False):
        """frame uint8 (B, H, W, 3); actions (B, K, 57) raw; prompts [B]; seeds [B] -> uint8 (B, 1 + K, H, W, 3)
        (and the latents (B, C, T', h, w), first frame included, with return_latents). shift: the training
        run's by default."""
        B, K = actions.shape[:2]
        chunk = self.dit.config.action_steps  # actions per chunk; chunk / 4 latent frames follow the held one
        n_chunks = math.ceil(K / chunk)
        pad = np.broadcast_to(still_actions(n_chunks * chunk - K), (B, n_chunks * chunk - K, data.ACTION_DIM))
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
        for c in range(n_chunks):
            # DINOv3 sees each chunk's first frame, as in training: the image, then the last generated frame
            # (its latent decoded alone; exact for the pixel tokenizer, close for the VAE)
            feats = None if self.dino is None else sem.conditioning_features(
                self.dino, video[:, :, 0] if c == 0 else self.tokenizer.decode(cond)[:, :, 0].clamp(-1, 1)).to(self.dtype)
            x_cond = torch.cat([cond, cond.new_zeros(B, cond.shape[1], n_new, *cond.shape[3:])], 2)  # (B, C, 1+n, h, w)
            noise = torch.stack([torch.randn(x_cond.shape[1:], generator=torch.Generator().manual_seed(
                int(s) * 1_000_003 + c)) for s in seeds]).to(self.device, self.dtype)
            v = self.velocity_fn(text, actions[:, c * chunk:(c + 1) * chunk], frame_mask, guidance, feats, bar)
            x = M.sample(v, noise, sigmas, solver, x_cond=x_cond, frame_mask=frame_mask)
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


def write_outputs(out, name, video, gt=None, fps=30):
    out.mkdir(parents=True, exist_ok=True)
    data.write_video(out / f"{name}.mp4", video, fps=fps)
    rows, labels = [video], ["prediction"]
    if gt is not None:
        data.write_video(out / f"{name}_vs_gt.mp4", np.concatenate([video, gt], 2), fps=fps)
        rows, labels = rows + [gt], labels + ["ground truth"]
        values = E.psnr_frames(E.as_unit(video), E.as_unit(gt)).numpy()  # per frame, (T, H, W, 3) uint8
        print(f"{name}: PSNR per frame (dB) " + " ".join(f"{v:.1f}" for v in values[1:]) +
              f" | mean over predicted frames {values[1:].mean():.2f}")
    picks = sorted(set(range(0, len(video), 4)) | {len(video) - 1})  # every 4th frame and the last
    data.contact_sheet(out / f"{name}.png", [[v[t] for t in picks] for v in rows], labels)


# -----------------------------------------------------------------------------
# benchmark: python sample.py --benchmark [--compare-diffusers]


class Stopwatch:
    """Seconds per call of a whole run and of chosen methods inside it, synchronized on CUDA; peak memory."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, obj, method, label):
        """Make obj.method add the time of each call to seconds[label] (an instance attribute shadows it)."""
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
            return out
        setattr(obj, method, timed)

    def run(self, fn, warmup, iters):
        """-> (fn's last output, {"total": s, each wrapped label: s, "peak_gib": GiB or None}), s per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.seconds = {}
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        self.sync()
        times = {"total": time.perf_counter() - t0, **self.seconds}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return out, {**{k: v / iters for k, v in times.items()}, "peak_gib": peak}


class NoGuardrail:
    """Stands in for cosmos_guardrail's safety checker, without which diffusers' Cosmos pipelines refuse to
    run. Given prompt embeddings and no prompt, the pipeline only moves it (`.to`), and it screens videos only
    with the real checker's class: nothing is checked, so no guardrail time is in the figures."""

    def to(self, *args, **kwargs):
        return self


def diffusers_pipeline(dit_sd, vae_sd, c, device, dtype):
    """diffusers' Cosmos2_5_PredictBasePipeline holding our weights: the DiT (config c, in dtype) and the
    Wan2.1 VAE (in the dtype of its state dict vae_sd, as ours ran)."""
    import diffusers
    net = M.diffusers_dit(c, dit_sd, device, dtype)
    with torch.device(device):
        vae = diffusers.AutoencoderKLWan().to(next(iter(vae_sd.values())).dtype)  # defaults: Wan2.1's
    vae.load_state_dict({tok.diffusers_key(k): v for k, v in vae_sd.items()})
    # the scheduler that diffusers' conversion script saves with the Cosmos-Predict2.5 pipelines
    scheduler = diffusers.UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                                  prediction_type="flow_prediction", sigma_max=200.0,
                                                  sigma_min=0.01)
    pipe = diffusers.Cosmos2_5_PredictBasePipeline(text_encoder=None, tokenizer=None, transformer=net.eval(),
                                                   vae=vae.eval(), scheduler=scheduler,
                                                   safety_checker=NoGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def benchmark(args):
    """Seconds per chunk (one frame + 12 actions -> 13 frames) of WorldModel.rollout on random weights, split
    into VAE encode, denoising and VAE decode. With --compare-diffusers, the same for diffusers'
    Cosmos-Predict2.5 pipeline (Video2World from the same frame) with the same weights, shapes and steps."""
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    B, K, H, W = args.batch, 12, args.height or 288, args.width or 512
    if args.compare_diffusers and (args.tokenizer != "wan2.1" or B != 1):
        raise SystemExit("error: --compare-diffusers needs --tokenizer wan2.1 (diffusers' pipeline holds the "
                         "Wan2.1 VAE) and --batch 1 (its Video2World mode takes one video per call)")
    if args.compare_diffusers and 0 < args.guidance <= 1:
        raise SystemExit("error: diffusers applies guidance only above 1 (then with our formula, v_c + "
                         "g (v_c - v_u)): choose --guidance 0 or > 1 to time the same work on both sides")
    # no padding-mask channel when comparing: diffusers resizes it with torchvision (as in model.benchmark)
    channels = tok.PixelTokenizer().latent_channels if args.tokenizer == "pixel" else 16
    config = M.config_from_preset(
        args.preset, action_mode=args.action_mode, action_steps=K, actions_per_frame=tok.TEMPORAL,
        in_channels=channels, out_channels=channels, concat_padding_mask=not args.compare_diffusers)
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        dit = M.DiT(config)
        for p in dit.parameters():  # random everywhere: zero-initialized layers would make outputs trivial
            p.normal_(std=0.02)
    if dit.action_cond is not None:
        dit.action_cond.set_stats(torch.zeros(data.ACTION_DIM), torch.ones(data.ACTION_DIM))
    info = {"tokenizer": {"name": args.tokenizer, "weights": "", "pixel_compression": 8},
            "text": {"mode": "none", "tokens": sem.TEXT_TOKENS},
            "train_config": {"height": H, "width": W, "text_cache": ""}}
    wm = WorldModel.from_model(dit, info, device, dtype)
    frame = np.random.default_rng(0).integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    actions = np.broadcast_to(still_actions(K), (B, K, data.ACTION_DIM))
    count = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
    extra = f" ({count(dit.action_cond)} {args.action_mode})" if dit.action_cond is not None else ""
    print(f"preset {args.preset}: {count(dit)} parameters{extra}, {args.tokenizer} tokenizer | {B}x{H}x{W}, "
          f"1 + {K} frames, {args.steps} steps {args.sampler}, guidance {args.guidance:g}, {args.dtype} on "
          f"{device}")

    watch, results = Stopwatch(device), {}

    def report(name, fn):
        out, t = watch.run(fn, args.warmup, args.iters)
        t["denoise"] = t["total"] - t["vae_encode"] - t["vae_decode"]  # with the small rest: noise, text...
        peak = f", peak {t['peak_gib']:.2f} GiB" if t["peak_gib"] is not None else ""
        print(f"{name}: {t['total']:.3f} s/chunk = VAE encode {t['vae_encode']:.3f} + denoise "
              f"{t['denoise']:.3f} ({t['denoise'] / args.steps * 1e3:.1f} ms/step) + VAE decode "
              f"{t['vae_decode']:.3f}{peak} | output {out.shape} {out.dtype}")
        results[name] = {**t, "shape": tuple(out.shape)}

    watch.wrap(wm.tokenizer, "encode", "vae_encode")
    watch.wrap(wm.tokenizer, "decode", "vae_decode")
    ours = lambda: wm.rollout(frame, actions, [""] * B, list(range(B)), args.steps, args.sampler,
                              guidance=args.guidance, progress=False)
    if dit.action_cond is not None:
        report(f"ours ({args.action_mode})", ours)
    if args.compare_diffusers or dit.action_cond is None:
        dit.action_cond = None  # the backbone alone: what diffusers' pipeline runs
        report("ours (backbone)", ours)
    if not args.compare_diffusers:
        return results

    # CPU copies, so that our models are freed (gc: the wrapped methods hold the tokenizer in a cycle)
    dit_sd = {k: v.cpu() for k, v in dit.state_dict().items()}
    vae_sd = {k: v.cpu() for k, v in wm.tokenizer.state_dict().items()}
    del wm, dit, ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe = diffusers_pipeline(dit_sd, vae_sd, config, device, dtype)
    watch.wrap(pipe.vae, "encode", "vae_encode")
    watch.wrap(pipe.vae, "decode", "vae_decode")
    video = torch.from_numpy(frame).permute(0, 3, 1, 2)[:, :, None] / 127.5 - 1  # (B, 3, 1, H, W)
    text = torch.zeros(B, sem.TEXT_TOKENS, config.text_dim, device=device, dtype=dtype)
    report("diffusers", lambda: pipe(
        video=video, prompt_embeds=text, negative_prompt_embeds=text, height=H, width=W, num_frames=1 + K,
        num_inference_steps=args.steps, guidance_scale=args.guidance, num_latent_conditional_frames=1,
        generator=torch.Generator().manual_seed(0), output_type="np").frames)
    a, b = results["ours (backbone)"], results["diffusers"]
    if a["shape"] != b["shape"]:
        raise RuntimeError(f"ours makes videos {a['shape']}, diffusers {b['shape']}: not the same work")
    results["ratio"] = a["total"] / b["total"]
    print(f"ours / diffusers, backbone to backbone: {results['ratio']:.2f} per chunk (denoise "
          f"{a['denoise'] / b['denoise']:.2f}, VAE encode {a['vae_encode'] / b['vae_encode']:.2f}, "
          f"VAE decode {a['vae_decode'] / b['vae_decode']:.2f})")
    return results


def add_benchmark_args(p):
    """The flags of --benchmark beyond the ones it shares with sampling: --steps, --sampler, --guidance,
    --device, --dtype, and --height/--width (288x512 when not given)."""
    p.add_argument("--benchmark", action="store_true",
                   help="time one chunk of a random-weight model (no checkpoint, nothing written) and exit")
    p.add_argument("--preset", default="tiny", choices=sorted(M.PRESETS), help="DiT size for --benchmark")
    p.add_argument("--action-mode", default="dexac", choices=["none", *conditioning.MODES],
                   help="action conditioning for --benchmark")
    p.add_argument("--tokenizer", default="wan2.1", choices=tok.TOKENIZERS, help="tokenizer for --benchmark")
    p.add_argument("--batch", type=int, default=1, help="rollouts per call for --benchmark")
    p.add_argument("--warmup", type=int, default=1, help="untimed chunks first for --benchmark")
    p.add_argument("--iters", type=int, default=2, help="timed chunks for --benchmark")
    p.add_argument("--compare-diffusers", action="store_true",
                   help="also time diffusers' Cosmos-Predict2.5 pipeline, same weights (--batch 1)")




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
    p.add_argument("--actions", help=f"(K, {data.ACTION_DIM}) raw actions .npy, or a directory of them (one batch)")
    p.add_argument("--image", help="first frame (PNG/JPEG); resized to the model's resolution with a notice")
    p.add_argument("--episode", help="an EgoDex .hdf5 (its .mp4 beside it): first frame, prompt, actions and "
                                     "ground truth from there")
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
    add_benchmark_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        return benchmark(args)
    # every input is checked before the model is loaded
    if not args.checkpoint:
        raise SystemExit("error: --checkpoint is required (an exported model; or --benchmark)")
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
            path = Path(args.episode)
            ep = data.Episode(f"{path.parent.name}/{path.stem}", args.episode,
                              data.probe_episode("egodex", args.episode, args.episode), "egodex")
            n = len(load_actions(args.actions)[0][1]) if args.actions else args.num_actions
            clip = data.load_clip(ep, args.start, min(n + 1, ep.frames - args.start), size)
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

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    wm = WorldModel(args.checkpoint, args.device, dtype, args.tokenizer_weights, args.init, args.dino)
    names = [f"{name}_s{i}" if args.num_samples > 1 else name for name, _ in runs for i in range(args.num_samples)]
    K = max(len(a) for _, a in runs)
    actions = np.stack([np.concatenate([a, still_actions(K - len(a))]) for _, a in runs
                        for _ in range(args.num_samples)])
    lengths = [len(a) for _, a in runs for _ in range(args.num_samples)]
    seeds = [args.seed + i for i in range(len(names))]
    t0 = time.time()
    videos = wm.rollout(np.broadcast_to(frame, (len(names), *frame.shape)), actions, [prompt or ""] * len(names),
                        seeds, args.steps, args.sampler, args.schedule, args.shift, args.guidance, args.reencode)
    print(f"{len(names)} rollout(s) of up to {K} actions in {time.time() - t0:.1f} s")
    out = Path(args.out)
    for name, video, k in zip(names, videos, lengths):
        write_outputs(out, name, video[:1 + k], gt[:1 + k] if gt is not None and len(gt) >= 1 + k else None)
    print(f"wrote {len(names)} video(s) and contact sheet(s) to {out}/")


if __name__ == "__main__":
    main()
