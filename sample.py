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
  text mode "none" every prompt, the negative one included, has the same zero embedding, so `--guidance` is
  refused there (it would double the compute for the unguided video);
- each sample draws its noise from its own generator (seed + sample index, chunk), so a batch gives exactly
  the samples that one-by-one runs give, up to floating-point reordering (which the uint8 step of carry
  "reencode" can turn into one level of difference in a frame that starts a chunk);
- input checks (every flag's range, the device, the output folder, action shape, NaN and float32 overflow,
  image and checkpoint) run before any model is loaded; actions far (> OUTLIER_STDS stds) from the training
  statistics are warned about; a rollout whose latents turn NaN/inf stops with an error naming the chunk and
  the sampler step;
- images: 16-bit ones are scaled from 0-65535, float ones from [0, 1], transparency is composited on black
  (what an empty scene looks like to the tokenizer, as a letterbox does) and the EXIF orientation is applied;
- a model trained with `--trainable new` on a pretrained backbone is exported as its DexAC modules only; it is
  rebuilt on the backbone the file names, or on `--init` (a local file or a Hub spec, model.load_dit); one
  trained with `--trainable lora+new` likewise, with its LoRA adapters (lora.load_exported; `--merge` folds them
  into the base weights first);
- an IRASim export (train.py --backbone irasim) rolls out the same way on per-frame latents (a chunk: one clip's
  frames, one action each), with its own sampler (DDIM, or `--sampler ddpm`), at its training size only (its
  position embedding is fixed) and without guidance (it has no text);
- with the semantic branch, DINOv3 sees each chunk's first frame, as in training: the given image, then the
  last generated frame: with carry "reencode" the quantized frame that is encoded (one decode for both), with
  carry "latent" the last latent frame decoded alone (exact for the pixel tokenizer, close for the VAE).
Outputs: an MP4 and a PNG contact sheet per sample; with ground truth (--episode) a side-by-side video and
the per-frame PSNR.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import conditioning as C
import data
import hub
import irasim
import lora
import model as M
import semantic as sem
import tokenizer as tok

CARRIES = {  # what conditions chunk c + 1 (rollout's `carry`; evaluate.py records the one it used)
    "reencode": "each chunk's last frame decoded, quantized to uint8 and encoded alone (official)",
    "latent": "each chunk's last latent frame carried over as is",
}


DEFAULT_SAMPLER = {"cosmos": "unipc", "irasim": "ddim"}  # Cosmos' official ODE solver; DDIM for IRASim's PNDM


def samplers(backbone):
    """The samplers of a backbone's models: model.SOLVERS (Cosmos' ODE solvers) or irasim.SAMPLERS."""
    return irasim.SAMPLERS if backbone == "irasim" else M.SOLVERS


OUTLIER_STDS = 20  # actions farther than this from the training mean (in its stds) get a warning


class NonFiniteRollout(ValueError):
    """A rollout whose latents turned NaN/inf; `samples` holds the batch indices that did."""

    def __init__(self, message, samples=()):
        super().__init__(message)
        self.samples = tuple(samples)


# -----------------------------------------------------------------------------
# command-line checks, shared with evaluate.py and miniature.py: every flag is checked before any work


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, and exit code 2 (subcommands inherit it)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(cast, what, ok):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
nonnegative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
nonnegative_float = _number(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
fraction = _number(float, "a fraction in [0, 1]", lambda v: 0 <= v <= 1)


def check_device(name):
    """A torch device name that exists here -> its canonical string, or one ValueError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: use cpu, cuda or cuda:N")
    return str(device)


def check_out_dir(path, flag="--out"):
    """Make sure an output folder can be written, before any work: created when absent, probed with a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder: choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror or e}): choose another {flag}") from None
    return path


def read_export_meta(path):
    """An exported model's metadata {key: parsed JSON}, or one error for a missing, truncated or foreign file."""
    meta = hub.export_metadata(path)
    missing = [k for k in ("action_stats", "train_config", "tokenizer", "model_config") if k not in meta]
    if missing:
        raise ValueError(f"{path} carries no action statistics/config ({', '.join(missing)} missing from its "
                         f"metadata): export it with train.py")
    return meta


def frame_unit(meta):
    """Frame sizes must be multiples of this for the export: tokenizer compression x the DiT's patch."""
    t, patch = meta["tokenizer"], meta["model_config"].get("patch", 2)  # IRASim's patch; Cosmos' is 2
    return patch * (t.get("pixel_compression", 8) if t["name"] == "pixel" else 8)


def to_uint8(video):
    """(B, 3, T, H, W) pixels in [-1, 1] -> uint8 (B, T, H, W, 3), clamped and rounded as video files hold them."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1)


def check_actions(a, name="actions"):
    """(K, 57) finite float array, K >= 1, or one clear error."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != C.ACTION_DIM:
        raise ValueError(f"{name} must be (K, {C.ACTION_DIM}) raw actions (layout in data.py), got shape "
                         f"{a.shape}; a single action is (1, {C.ACTION_DIM})")
    if len(a) < 1:
        raise ValueError(f"{name} holds no actions: give at least one (K >= 1)")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} holds {a.dtype} values: give real numbers")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has NaN/inf values (first at step {bad[0]}, dimension {bad[1]} "
                         f"{C.ACTION_NAMES[bad[1]]})")
    with np.errstate(over="ignore"):
        cast = a.astype(np.float32)
    if not np.isfinite(cast).all():  # finite in float64, inf in the model's float32
        bad = np.argwhere(~np.isfinite(cast))[0]
        raise ValueError(f"{name} overflows float32 (|value| > 3.4e38; first at step {bad[0]}, dimension "
                         f"{bad[1]} {C.ACTION_NAMES[bad[1]]}: {a[tuple(bad)]:.3g}): give raw actions in metres "
                         f"and 6D rotations")
    return cast


def warn_outliers(actions, mean, std, limit=OUTLIER_STDS, name="actions"):
    """A warning (stderr) when actions (..., 57) lie more than `limit` stds from the training statistics."""
    a = np.asarray(actions, np.float64).reshape(-1, C.ACTION_DIM)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    z = np.abs(a - mean) / np.maximum(std, 1e-6)  # a constant dimension: any change is far out
    if len(z) and z.max() > limit:
        d = int(z.max(0).argmax())
        print(f"warning: {name} lie up to {z.max():.3g} stds from the training statistics ({(z > limit).sum()} "
              f"values beyond {limit}; the farthest in dimension {d} {C.ACTION_NAMES[d]}): the model never saw "
              f"such actions; check their units (metres, 6D rotations)", file=sys.stderr)
        return True
    return False


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
        img = ImageOps.exif_transpose(img)  # a camera's orientation tag: the frame as it is viewed
    except OSError as e:  # a missing file, or not an image
        raise FileNotFoundError(f"cannot read the image {path}: {e}") from None
    rgb = image_to_rgb(img, path)
    if rgb.shape[:2] != tuple(size):
        print(f"notice: {path} is {rgb.shape[1]}x{rgb.shape[0]}, the model runs at {size[1]}x{size[0]}; "
              f"resizing (center crop to the aspect, antialiased)")
        rgb = data.resize_image(rgb, size)
    return rgb


def image_to_rgb(img, path="image"):
    """A PIL image of any mode -> uint8 (H, W, 3). 16-bit and 32-bit integer images are scaled from 0-65535
    (PNG's 16 bits), float images from [0, 1] (or taken as 0-255 when they exceed 1); transparency is composited
    on black; palettes are expanded."""
    if img.mode == "RGB":
        return np.asarray(img)
    print(f"notice: {path} is {img.mode}, not RGB; converting it to RGB")
    if img.mode.startswith("I") or img.mode == "F":
        x = np.asarray(img).astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"the image {path} has NaN/inf pixels: save it as 8-bit RGB")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if img.mode == "F":
            scale = 255.0 if hi <= 1 else 1.0
            top = 1.0 if hi <= 1 else 255.0
        else:
            scale, top = 255.0 / 65535, 65535.0
        if lo < 0 or hi > top:
            raise ValueError(f"the image {path} ({img.mode}) holds values in [{lo:.4g}, {hi:.4g}], outside "
                             f"[0, {top:g}]: save it as 8-bit RGB")
        gray = np.round(x * scale).astype(np.uint8)
        return np.repeat(gray[..., None], 3, -1) if gray.ndim == 2 else gray[..., :3]
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)  # transparent pixels become black
    return np.asarray(img.convert("RGB"))


def check_finite(x, where):
    """Raise NonFiniteRollout naming the samples (batch indices) of x (B, ...) that hold NaN/inf."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        raise NonFiniteRollout(where, bad.nonzero().flatten().tolist())


# -----------------------------------------------------------------------------
# the world model: an exported DiT, its tokenizer, its text context


def load_model(checkpoint, *, device="cpu", dtype=torch.float32, base=None, merge=False):
    """Any export of train.py -> (network in eval mode, its metadata): a Cosmos DiT (model.load_exported), an
    IRASim (irasim.load_exported), or a LoRA run's adapters on its base (lora.load_exported; merge folds them)."""
    meta = read_export_meta(checkpoint)
    if meta.get("lora"):
        return lora.load_exported(checkpoint, device=device, dtype=dtype, base=base, merged=merge)
    load = irasim.load_exported if meta.get("backbone") == "irasim" else M.load_exported
    return load(checkpoint, device=device, dtype=dtype, base=base)


class WorldModel:
    """Everything a rollout needs, rebuilt from one exported file (train.py's export)."""

    def __init__(self, checkpoint, *, device="cpu", dtype=torch.float32, tokenizer_weights=None, base=None,
                 dino=None, compile=False, merge=False):
        """merge: a LoRA run's adapters folded into the base weights (a plain network, as fast as the base);
        without it they run beside the base layers."""
        dit, info = load_model(checkpoint, device=device, dtype=dtype, base=base, merge=merge)
        self._build(dit, info, device=device, dtype=dtype, tokenizer_weights=tokenizer_weights, dino=dino,
                    compile=compile)

    @classmethod
    def from_model(cls, dit, info, *, device="cpu", dtype=torch.float32, tokenizer_weights=None, dino=None,
                   compile=False):
        """A DiT in memory and an export's metadata dict (keys tokenizer, text, train_config) -> WorldModel."""
        self = cls.__new__(cls)
        self._build(dit.to(device=device, dtype=dtype).eval().requires_grad_(False), info, device=device,
                    dtype=dtype, tokenizer_weights=tokenizer_weights, dino=dino, compile=compile)
        return self

    def _build(self, dit, info, *, device, dtype, tokenizer_weights, dino, compile):
        """compile: torch.compile each DiT block (model.compile_blocks), after every cast and move."""
        self.dit, self.info = M.compile_blocks(dit) if compile else dit, info
        self.device, self.dtype = torch.device(device), dtype
        self.backbone = "irasim" if isinstance(dit, irasim.IRASim) else "cosmos"
        t = self.info["tokenizer"]
        kwargs = ({"weights": tokenizer_weights or t.get("weights") or None} if t["name"] in ("wan2.1", "sdxl") else
                  {"spatial_compression": t.get("pixel_compression", 8), "mean": t.get("pixel_mean", 0.0),
                   "std": t.get("pixel_std", 1.0), "temporal": t.get("temporal", tok.TEMPORAL)})
        self.tokenizer = tok.build_tokenizer(t["name"], **kwargs).to(device, dtype).eval()  # latents in dtype
        c, text = self.dit.config, self.info["text"]
        tc = self.info["train_config"]
        self.text = sem.TextEmbedder(text["mode"], cache_dir=tc.get("text_cache") or None,  # IRASim: none, unused
                                     text_dim=getattr(c, "text_dim", 1024), max_tokens=text["tokens"], dtype=dtype)
        self.size, self.shift = (tc["height"], tc["width"]), tc.get("shift", 5.0)
        self.dino = None
        if isinstance(dino, torch.nn.Module):  # an encoder in memory (bench.py: random weights)
            self.dino = dino.to(device, dtype)
        elif getattr(c, "semantic_dim", 0):  # the DINOv3 branch: the encoder whose width the model was trained with
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
        (2B, L, D), conditional then unconditional, and both branches run in one batch. The cross-attention keys
        and values of the text (and DINOv3 features) are computed here, once for the chunk's steps."""
        actions = actions if self.dit.action_cond is not None else None  # action_mode none: the backbone
        two = lambda t: None if t is None else torch.cat([t, t])
        if guidance:  # built once per chunk, not per step
            frame_mask, actions, feats = two(frame_mask), two(actions), two(feats)

        kv = self.dit.cross_kv(text, feats)  # the text (and image) keys and values: once per chunk, not per step
        step = [0]

        def v(x, sigma):
            if bar is not None:
                bar.update(1)
            step[0] += 1
            if guidance == 0:
                out = self.dit(x, sigma, frame_mask=frame_mask, actions=actions, kv=kv)
            else:
                out = self.dit(two(x), two(sigma), frame_mask=frame_mask, actions=actions, kv=kv)
                out = M.guided(*out.chunk(2), guidance)
            check_finite(out, f"at sampler step {step[0]}")  # one reduction per step: cheap beside the DiT
            return out
        return v

    @property
    def chunk(self):
        """Actions per chunk: those of one training clip (Cosmos: 4 per latent frame; IRASim: 1 per frame)."""
        c = self.dit.config
        return c.num_frames - c.mask_frames if self.backbone == "irasim" else c.action_steps

    def irasim_denoise(self, cond, actions, noise, process, solver):
        """IRASim's chunk: the reverse diffusion of `process` (irasim.GaussianDiffusion respaced to the sampler's
        steps), the first latent frame (cond) held clean, as its pipeline does. -> latents (B, C, 1 + n, h, w)."""
        step = [0]

        def eps(x, t):
            step[0] += 1
            out = self.dit(x, t, actions if self.dit.config.action_mode != "none" else None)
            check_finite(out, f"at sampler step {step[0]}")
            return out
        return process.sample(eps, noise, x_cond=cond, method=solver)

    def check_actions(self, actions):
        """Raw actions (..., 57) against the model's statistics: a warning for far outliers (zscore models)."""
        norm = getattr(self.dit.action_cond, "norm", None)
        if norm is None or norm.mode != "zscore" or not int(norm.has_stats):
            return False
        mean, std = (t.float().cpu().numpy() for t in norm.stats())
        return warn_outliers(actions, mean, std)

    @torch.inference_mode()
    def rollout(self, frame, actions, prompts, seeds, *, steps=35, solver=None, schedule="shifted", shift=None,
                guidance=0.0, negative_prompt=None, carry="reencode", progress=True, return_latents=False):
        """frame uint8 (B, H, W, 3); actions (B, K, 57) raw; prompts [B]; seeds [B] -> uint8 (B, 1 + K, H, W, 3)
        (and the latents (B, C, T', h, w), first frame included, with return_latents: with carry "reencode"
        each chunk's generated latents, which follow its re-encoded first frame). shift: the training run's by
        default. negative_prompt: the unconditional branch's text when guidance > 0 (default: the null
        embedding). carry: what conditions the next chunk, one of CARRIES. solver: one of the backbone's
        samplers (default DEFAULT_SAMPLER's); an IRASim model takes no guidance (it has no text)."""
        solver = solver or DEFAULT_SAMPLER[self.backbone]
        if carry not in CARRIES:
            raise ValueError(f"unknown carry {carry!r}; choose one of {tuple(CARRIES)}")
        if solver not in samplers(self.backbone):
            raise ValueError(f"unknown sampler {solver!r} for {self.backbone}; choose one of {samplers(self.backbone)}")
        if guidance and self.backbone == "irasim":
            raise ValueError("IRASim has no text conditioning, so no text guidance: drop --guidance")
        # IRASim's respaced process, once for every chunk; it refuses a step count it cannot take, before any work
        process = irasim.GaussianDiffusion(use_steps=steps) if self.backbone == "irasim" else None
        B, K = actions.shape[:2]
        chunk = self.chunk  # actions per chunk; chunk / temporal latent frames follow the held one
        n_chunks = math.ceil(K / chunk)
        pad = np.broadcast_to(C.still_actions(n_chunks * chunk - K), (B, n_chunks * chunk - K, C.ACTION_DIM))
        self.check_actions(actions)
        actions = torch.from_numpy(np.concatenate([actions, pad], 1)).to(self.device, self.dtype)
        if not torch.isfinite(actions).all():  # bf16's range ends a little below float32's
            raise ValueError(f"actions overflow the model dtype {self.dtype}: give raw actions in metres and 6D "
                             f"rotations")
        first = torch.from_numpy(np.array(frame)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        first = first.to(self.dtype) / 127.5 - 1  # the frame that starts the chunk, in [-1, 1]
        z = self.tokenizer.encode(first[:, :, None])  # (B, C, 1, h, w)
        text = self.text_context(prompts, guidance=guidance, negative_prompt=negative_prompt)
        shift = self.shift if shift is None else shift
        sigmas = M.shifted_sigmas(steps, shift) if schedule == "shifted" else M.karras_sigmas(steps)
        latents, cond, pieces = [z], z, []  # pieces: carry "reencode", each chunk's frames (B, T, H, W, 3) uint8
        n_new = chunk // self.tokenizer.temporal_compression  # latent frames generated per chunk
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
            a = actions[:, c * chunk:(c + 1) * chunk]
            try:
                if self.backbone == "irasim":
                    x = self.irasim_denoise(cond, a, noise, process, solver)
                    bar.update(steps)
                else:
                    v = self.velocity_fn(text, a, frame_mask, guidance=guidance, feats=feats, bar=bar)
                    x = M.sample(v, noise, sigmas, solver=solver, x_cond=x_cond, frame_mask=frame_mask)
                check_finite(x, "after its last sampler step")
            except NonFiniteRollout as e:
                raise NonFiniteRollout(f"the rollout turned non-finite (NaN/inf latents) in chunk {c + 1} of "
                                       f"{n_chunks} {e} (sample(s) {', '.join(map(str, e.samples))} of the "
                                       f"batch): the model's weights or inputs are damaged", e.samples) from None
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
    p = ArgumentParser(description="Roll out a DexAC world model from one frame and raw 57-D actions.")
    p.add_argument("--checkpoint", help="an exported model (train.py writes RUN/model.safetensors)")
    p.add_argument("--init", default=None, help="the pretrained backbone for a checkpoint that holds only the DexAC "
                                                "modules (train.py --trainable new): a local file or Hub spec "
                                                "(model.load_dit); default: the one the checkpoint names")
    p.add_argument("--merge", action="store_true", help="a LoRA run's export: fold the adapters into the base "
                                                        "weights before sampling (then as fast as the base)")
    p.add_argument("--dino", default=None, help="DINOv3 weights for a model with the semantic branch (default: the "
                                                "training run's)")
    p.add_argument("--actions", help=f"(K, {C.ACTION_DIM}) raw actions .npy, or a directory of them (one batch)")
    p.add_argument("--image", help="first frame (PNG/JPEG); resized to the model's resolution with a notice")
    p.add_argument("--episode", help="an EgoDex .hdf5 (its .mp4 beside it) or an EgoVerse .zarr: first frame, "
                                     "prompt, actions and ground truth from there")
    p.add_argument("--start", type=nonnegative_int, default=0, help="first frame index in --episode")
    p.add_argument("--num-actions", type=positive_int, default=24,
                   help="actions taken from --episode when no --actions")
    p.add_argument("--prompt", default=None, help="task description (default: the episode's, else empty)")
    p.add_argument("--steps", type=positive_int, default=35, help="denoising steps per chunk")
    p.add_argument("--sampler", default=None, help="a Cosmos model's ODE solver, one of " + ", ".join(M.SOLVERS) +
                   " (default unipc, the official one); an IRASim model's sampler, one of " +
                   ", ".join(irasim.SAMPLERS) + " (default ddim)")
    p.add_argument("--schedule", default="shifted", choices=["shifted", "karras"], help="sigma schedule")
    p.add_argument("--shift", type=positive_float, default=None,
                   help="shift of the shifted schedule (default: training's)")
    p.add_argument("--guidance", type=nonnegative_float, default=0.0, help="classifier-free text guidance g (0: off)")
    p.add_argument("--negative-prompt", default=None,
                   help="text of the unconditional branch when --guidance > 0 (the official CFG uses its default "
                        "negative prompt; its embedding must be in the training run's text cache); default: the "
                        "empty prompt's null embedding")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per action file")
    p.add_argument("--carry", default="reencode", choices=list(CARRIES),
                   help="what conditions the next chunk: " + "; ".join(f"{k}: {v}" for k, v in CARRIES.items()))
    p.add_argument("--tokenizer-weights", default=None, help="override the Wan2.1 VAE weights the export names")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is here)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (a one-time compile, then "
                                                          "faster steps; bench.py gpu measures both)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="frame height (default: the training resolution)")
    p.add_argument("--width", type=positive_int, default=None, help="frame width (default: the training resolution)")
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # every input is checked before the model is loaded and before any rollout
    if not args.checkpoint:
        raise SystemExit("error: --checkpoint is required (an exported model; to time random weights: "
                         "python bench.py sample)")
    if (args.image is None) == (args.episode is None):
        raise SystemExit("error: give the first frame with exactly one of --image or --episode")
    if args.image and not args.actions:
        raise SystemExit("error: --image needs --actions")
    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = read_export_meta(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    tc, backbone = meta["train_config"], meta.get("backbone", "cosmos")
    if args.sampler is not None and args.sampler not in samplers(backbone):
        raise SystemExit(f"error: unknown sampler {args.sampler!r} for this {backbone} model; choose one of "
                         f"{samplers(backbone)}")
    if backbone == "irasim" and (error := irasim.sample_steps_error(args.steps)):
        raise SystemExit(f"error: --steps: {error}")
    size = (args.height or tc["height"], args.width or tc["width"])
    unit = frame_unit(meta)  # tokenizer x DiT patch
    if backbone == "irasim" and size != (tc["height"], tc["width"]):
        raise SystemExit(f"error: an IRASim model samples at its training size {tc['height']}x{tc['width']} only "
                         f"(its position embedding is fixed): drop --height/--width")
    if size[0] % unit or size[1] % unit:
        raise SystemExit(f"error: --height/--width must be multiples of {unit} for this model, got "
                         f"{size[0]}x{size[1]}")
    if args.negative_prompt is not None and not args.guidance:
        print("notice: --negative-prompt has no effect without --guidance")
    elif args.guidance and meta.get("text", {}).get("mode") == "none":
        # refused, not warned: every prompt has the same zero embedding, so it would double the compute for
        # exactly the unguided video
        raise SystemExit("error: --guidance needs a model trained with text; this one has text mode none "
                         "(guidance would double the compute and change nothing): drop --guidance")
    if meta.get("base") and not args.init:
        print(f"the checkpoint holds the DexAC modules only; backbone: {meta['base']}")
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
            runs = load_actions(args.actions)
        out = check_out_dir(args.out)
    except (ValueError, FileNotFoundError, data.DataError) as e:
        raise SystemExit(f"error: {e}") from None

    wm = WorldModel(args.checkpoint, device=device, dtype=hub.DTYPES[args.dtype],
                    tokenizer_weights=args.tokenizer_weights, base=args.init, dino=args.dino, compile=args.compile,
                    merge=args.merge)
    names = [f"{name}_s{i}" if args.num_samples > 1 else name for name, _ in runs for i in range(args.num_samples)]
    K = max(len(a) for _, a in runs)
    actions = np.stack([np.concatenate([a, C.still_actions(K - len(a))]) for _, a in runs
                        for _ in range(args.num_samples)])
    lengths = [len(a) for _, a in runs for _ in range(args.num_samples)]
    seeds = [args.seed + i for i in range(len(names))]
    t0 = time.time()
    videos = wm.rollout(np.broadcast_to(frame, (len(names), *frame.shape)), actions, [prompt or ""] * len(names),
                        seeds, steps=args.steps, solver=args.sampler, schedule=args.schedule, shift=args.shift,
                        guidance=args.guidance, negative_prompt=args.negative_prompt, carry=args.carry)
    print(f"{len(names)} rollout(s) of up to {K} actions in {time.time() - t0:.1f} s")
    for name, video, k in zip(names, videos, lengths):
        write_outputs(out, name, video[:1 + k], gt[:1 + k] if gt is not None and len(gt) >= 1 + k else None)
    print(f"wrote {len(names)} video(s) and contact sheet(s) to {out}/")
    return 0


if __name__ == "__main__":
    hub.run_main(main)
