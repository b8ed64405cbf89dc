"""
Training: `python train.py` (one process, CPU or one GPU) or `torchrun --nproc_per_node=N train.py`.

The DiT (model.py) learns the rectified-flow objective on tokenizer latents of egocentric clips, conditioned
on the first latent frame, the 57-D action chunk (conditioning.py), text and optionally DINOv3 features
(semantic.py). Everything else around the model is here: the distributed setup, the recipe, checkpoints
that never lose work, observability and the export `sample.py` loads.

What it follows:
- pytorch/torchtitan for the parallelism, in ONE function (`parallelize`) and in its order: activation
  checkpointing per block, then FSDP2 `fully_shard` per block, then the root, with
  `MixedPrecisionPolicy(bf16 params, fp32 reduce)` instead of autocast; the optimizer is built after
  sharding; the pretrained backbone is built on the meta device and loaded without a second copy
  (`model.load_dit`); checkpoints go through DCP (`torch.distributed.checkpoint`), which reshards on load.
  Its `train_step`/`train` for the shape of the loop: named stages (`build`, `describe`, `open_run`,
  `train_step`, `log_metrics`, `checkpoint`, `finish`) that share one small `Trainer` state, and the step's
  statistics as a named `StepStats` reduced over the ranks in one all_reduce.
- facebookresearch/DiT and karpathy/nanoGPT for the shape of the script: named presets feeding argparse,
  numbered run directories, a rank-0 progress bar, the lr as a plain function of the step, derived
  quantities (parameters, tokens per step) printed at startup. nanochat for the torchrun-or-plain-python
  setup that falls back to the CPU.

What it deliberately changes:
- one code path for every world size: a plain `python train.py` makes a one-rank process group, so the
  single process runs the same FSDP2 + DCP code as torchrun (the tests compare 1 and 2 ranks).
- the noise of micro-batch m of step s comes from a generator seeded by (seed, s, m), and its text-dropout
  coins from a second one: no RNG state to carry, exact resume by construction. With a micro-batch of 1 clip
  per rank, m is the clip's place in the global batch, so the loss of a step does not depend on the world
  size or the accumulation.
- sigma stays fp32 into the DiT (FSDP's input cast would round it to bf16); only the latents are cast.
- a NaN/inf loss or gradient norm skips the update (and is logged); repeated ones stop the run.
- the EMA decay ramps up as min(decay, (1 + step) / (10 + step)), so short runs get a useful EMA; the
  export holds the EMA, the preview rollouts show the online weights.
- SIGTERM/SIGINT (clusters signal every process of a job) finish the current step on every rank, write a
  checkpoint and exit 0; data loader workers ignore them so that the step can finish.
- no benchmark flag: `python bench.py train` times `train_step` on random latents (tokenizer, text and DINOv3
  excluded), on a model made by the same `build`, with `load=False`.
"""

import argparse
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from PIL import Image, ImageDraw
from tqdm import tqdm

import conditioning
import data
import hub
import irasim
import lora
import model as M
import semantic as sem
import synthetic
import tokenizer as tok

# -----------------------------------------------------------------------------
# the configuration: one dataclass whose fields carry their help and choices, two presets, a flag per field


BACKBONES = ("cosmos", "irasim")  # the paper's Table 1: Cosmos-Predict2.5-2B and IRASim, each +/- DexAC


def opt(default, help, choices=None):
    """A config field with its command-line help and choices beside its default."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    backbone: str = opt("cosmos", "the video DiT: 'cosmos' (Cosmos-Predict2.5, rectified flow, the paper's main "
                        "rows) or 'irasim' (IRASim, Gaussian diffusion on per-frame latents, the paper's second "
                        "backbone; README 'Two backbones')", list(BACKBONES))
    learn_sigma: bool = opt(False, "--backbone irasim: learn the variance too (improved DDPM's learned range: twice "
                            "the output channels, the loss MSE + VLB); the released Frame-Ada configs leave it off")
    model: str = opt("tiny", f"size preset of the backbone: cosmos {sorted(M.PRESETS)}, irasim "
                     f"{sorted(irasim.PRESETS)}", sorted(set(M.PRESETS) | set(irasim.PRESETS)))
    dim: int = opt(0, "override the preset's DiT width (0: keep it); the heads stay, so keep dim / heads >= 12")
    blocks: int = opt(0, "override the preset's number of DiT blocks (0: keep it)")
    action_mode: str = opt("dexac", "action conditioning: none, a conditioning.MODES entry (dexac, dexac-time, "
                           "mlp, ...), or IRASim's own frame-ada", ["none", *conditioning.MODES, "frame-ada"])
    action_norm: str = opt("zscore", "action normalization before conditioning: 'zscore' per dimension (eq. 4), "
                           "or the paper's Table 4 ablations 'none' and 'scale' (x200)", list(conditioning.NORMS))
    semantic: bool = opt(False, "add DINOv3 features of the first frame to the cross-attention context "
                         "(semantic.py)")
    init: str = opt("", "pretrained backbone: a local file or a Hub spec for model.load_dit, or a released IRASim "
                    "checkpoint with --backbone irasim ('' trains from scratch)")
    trainable: str = opt("all", "'all' parameters, only the 'new' modules (action conditioning, semantic "
                         "projector), or 'lora+new': low-rank adapters on the backbone (lora.py) and the new modules "
                         "in full", ["all", "new", "lora+new"])
    lora_rank: int = opt(16, "--trainable lora+new: the adapters' rank r")
    lora_alpha: float = opt(16.0, "--trainable lora+new: the adapters' alpha (their output is scaled by alpha / r)")
    lora_targets: str = opt("attn,mlp", "--trainable lora+new: the layers adapted, comma-separated groups of "
                            f"lora.TARGETS ({', '.join(lora.TARGETS)}: the blocks' attention projections, MLP "
                            "linears)")
    lora_dropout: float = opt(0.0, "--trainable lora+new: dropout on the adapters' input")
    tokenizer: str = opt("pixel", f"video tokenizer, one of {tok.TOKENIZERS} (pixel: weightless, for the CPU)",
                         list(tok.TOKENIZERS))
    tokenizer_weights: str = opt("", "Wan2.1 or SDXL VAE weights: a path or Hub repo id ('' = random, for tests "
                                 "and timing)")
    pixel_compression: int = opt(2, "spatial compression s of the pixel tokenizer (12 s^2 channels per "
                                 "latent pixel; keep 4 x 12 s^2 <= the DiT width, or a 2x2 patch cannot even "
                                 "carry the noise through)")
    pixel_mean: float = opt(-0.05, "pixel tokenizer latents are (pixel - mean) / std, pixels in [-1, 1] "
                            "(defaults: the synthetic data's; set your data's)")
    pixel_std: float = opt(0.17, "see --pixel-mean: unit-variance latents, as the VAE's; raw pixels (std 0.17 "
                           "here) train far slower")
    text: str = opt("none", "text context: 'none' (one fixed embedding) or 'reason1' (cached Cosmos-Reason1 "
                    "embeddings)", ["none", "reason1"])
    text_cache: str = opt("", "directory of cached Cosmos-Reason1 prompt embeddings (text reason1)")
    text_tokens: int = opt(16, "text context length (512 for the released model)")
    text_dropout: float = opt(0.2, "fraction of training clips whose text context is replaced by zeros "
                              "(official: 0.2), which trains the unconditional branch of classifier-free "
                              "guidance; changes nothing with --text none, whose context is zeros already")
    dino: str = opt("", "DINOv3 weights for --semantic: a Hub repo or a local file")
    # (above `data`, which shadows the module from there on)
    test_fraction: float = opt(data.EGOVERSE_TEST_FRACTION, "EgoVerse episodes outside train/ and test/ "
                               "folders: the fraction hashed into `test` (by the SHA-256 of each name)")
    data: str = opt("data/synthetic", "EgoDex / EgoVerse root, or a latent cache directory (`python data.py "
                    "cache`)")
    splits: str = opt("", "training splits, comma-separated (default: EgoDex's part1-part5 and EgoVerse's "
                      "train; EgoDex's `extra`, collected after the splits were frozen, only when named: "
                      "part1,...,part5,extra)")
    stats: str = opt("", "action statistics file (default: DATA/stats.json)")
    synthetic: bool = opt(True, "write the synthetic dataset and its statistics to DATA when they are absent")
    height: int = opt(64, "frame height in pixels (a multiple of 16)")
    width: int = opt(112, "frame width in pixels (a multiple of 16)")
    frames: int = opt(9, "frames per clip: 4k + 1 for cosmos (13 -> 4 latent frames, 12 actions); any >= 2 for "
                      "irasim, whose latents are per frame (16: IRASim's own)")
    cond_frames: int = opt(1, "latent frames given clean as the condition (1: the first frame)")
    workers: int = opt(1, "data loader processes per rank")
    steps: int = opt(200, "optimizer steps in total")
    epochs: float = opt(0.0, "passes over the training clips; when > 0 it sets --steps (the steps of the "
                        "global batch that cover them, rounded up), else --steps decides")
    batch_size: int = opt(4, "global batch in clips per optimizer step (= micro_batch x accumulation x ranks)")
    micro_batch: int = opt(4, "clips per rank per forward pass")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final lr / peak lr of the cosine and linear schedules")
    schedule: str = opt("cosine", "lr after warmup: 'constant', 'cosine' or 'linear' (the official Cosmos "
                        "recipe's)", ["constant", "cosine", "linear"])
    decay_steps: int = opt(0, "the step at which the cosine or linear schedule reaches min_lr_ratio and stays "
                           "(0: --steps; the official linear decay: 400000)")
    warmup: int = opt(20, "linear warmup steps")
    betas: tuple = opt((0.9, 0.99), "AdamW betas (official Cosmos: 0.9 0.999; a beta2 of 0.99 adapts faster in "
                       "short runs)")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only unless --decay-all")
    decay_all: bool = opt(False, "weight decay on every parameter (official Cosmos), not only on matrices "
                          "(norms, biases and other tensors of < 2 dims spared)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    ema: float = opt(0.995, "EMA decay of the trainable weights (the export holds the EMA)")
    shift: float = opt(5.0, "sigma shift of the training noise levels (Cosmos: 5)")
    ac: str = opt("none", "activation checkpointing of the DiT blocks: 'full' recomputes a block's forward in the "
                  "backward (least memory), 'mlp' only its MLP sublayer (the widest activations; the attentions "
                  "keep theirs), 'none' stores everything (fastest)", ["none", "full", "mlp"])
    ac_every: int = opt(1, "with --ac full or mlp: checkpoint every k-th block only (1: all; 2: half of them), "
                        "trading memory for the recompute time")
    compile: bool = opt(False, "torch.compile each DiT block (fullgraph), in torchtitan's order: activation "
                        "checkpointing, compile, FSDP; the first steps pay the compile time")
    seed: int = opt(0, "seed of the initialization, the data order and the noise")
    out: str = opt("runs", "parent directory of the numbered run directories")
    ckpt_every: int = opt(100, "write a DCP checkpoint every N steps (and on SIGTERM/SIGINT, and at the end)")
    export_every: int = opt(0, "also export the EMA weights every N steps, to RUN/exports/step_NNNNNNN.safetensors "
                            "(for evaluation along a run; 0: only RUN/model.safetensors at the end)")
    keep: int = opt(2, "keep the last K checkpoints")
    log_every: int = opt(10, "write a metrics line and update the loss curve every N steps")
    preview_every: int = opt(100, "write a preview rollout every N steps (0: only at the end)")
    preview_steps: int = opt(12, "sampler steps of the preview rollout (UniPC, the official sampler)")
    export_dtype: str = opt("bf16", "dtype of the exported EMA weights: bf16 or fp32", ["bf16", "fp32"])


PRESETS = {
    # the CPU default: tiny DiT with DexAC on synthetic data, a few minutes on 2 cores
    "cpu": TrainConfig(),
    # the paper's run. Sources: [P] the paper (DESIGN.md sections 6-7), [C] the official Cosmos-Predict2.5
    # robot/action-cond config (DESIGN.md section 7), [D] DESIGN.md's other sections, [O] ours.
    "paper": TrainConfig(
        model="cosmos2b", semantic=True,  # [P] Cosmos-Predict2.5-2B with DexAC and the DINOv3 condition (4.5)
        init="base/pre-trained",  # [C] the fixed public recipe (March 2026) starts from base/pre-trained
        tokenizer="wan2.1", tokenizer_weights=tok.HUB_REPO,  # [D] 3: 8x spatial, 4x temporal compression
        text="reason1", text_cache="data/egodex/text_cache", text_tokens=512,  # [D] 5: Cosmos-Reason1
        text_dropout=0.2,  # [C] zeros for 20% of the clips, what makes text guidance > 0 meaningful
        dino=sem.DINO_REPO, synthetic=False,  # [P] DINOv3 ViT-L/16, EgoDex
        # [O] EgoDex as a latent cache with DINOv3 features (PAPER_CACHE): the online VAE and DINOv3 are the
        # recipe's largest costs beside the DiT; --data /path/to/egodex encodes online instead
        data="data/egodex-cache",
        frames=13,  # [P] 5.1: 1 conditioning + 12 predicted frames, 12 actions; 1 + 12 / 4 = 4 latent frames
        height=288, width=512,  # [D] 6: 16:9 egocentric frames, as Cosmos-2.5's 512x288 action models [C]
        epochs=2,  # [P] 2 epochs (about 20 h each on 8 H200); the step count follows from the clip plan
        batch_size=64, micro_batch=8,  # [P] global batch 64 on 8 GPUs; [C] 8 per GPU, so no accumulation
        # lr: [C] is 32e-5, but with PURE bf16 weights and AdamW states: an update under half a bf16 ulp is
        # rounded away (its per-step decay, lr x wd = 3.2e-5 of a weight, always is; so are most steps of
        # weights above ~0.1, norm scales among them), so it moved the weights far less than its lr says.
        # Our fp32 master weights take every update: we keep the earlier official action-conditioned lr
        # 2^-14.5 (4.3e-5; DESIGN.md section 7), 7.4x lower, not a number tuned for another arithmetic.
        lr=2 ** -14.5,
        # [C] 100 warm-up steps, then linear decay toward 0.4x at step 400k, so a shorter run decays little:
        # at step s the lr is 1 - 0.6 (s - 100) / 399900 of the peak (0.98x after the official 16k steps,
        # 0.85x after 100k)
        warmup=100, schedule="linear", min_lr_ratio=0.4, decay_steps=400_000,
        betas=(0.9, 0.999), weight_decay=0.1, decay_all=True,  # [C] (0.9, 0.999), 0.1 on all; [P] AdamW, 0.1
        grad_clip=0.1,  # [C]
        ema=0.9999,  # [O] a plain EMA; [C] is a power EMA, sigma_rel 0.10: decay 1 - 7.9 / step, 0.9995 at 16k
        ac="full",  # [O] activation checkpointing of every block, for memory (`bench.py gpu` times the others)
        workers=8,  # [O] README's decoding benchmark: about 4 workers per GPU keep the paper's pace
        ckpt_every=500, keep=3, preview_every=1000,  # [O]
        preview_steps=35),  # [D] 2: the official 35 sampler steps
    # the paper's second backbone (Table 1's IRASim rows; DESIGN.md section 12): [I] the official IRASim recipe
    # (bytedance/IRASim configs), [O] ours. --action-mode frame-ada for the "IRASim" row, dexac (this preset) for
    # "IRASim + DexAC"
    "irasim": TrainConfig(
        backbone="irasim", model="XL",  # [I] IRASim-XL/2
        tokenizer="sdxl", tokenizer_weights="sdxl",  # [I] the SDXL VAE, per frame, posterior sampled
        data="data/egodex", synthetic=False, frames=16, height=256, width=320,  # [I] 16 frames at 256x320
        lr=1e-4, schedule="constant", grad_clip=0.1, ema=0.9999,  # [I] constant lr 1e-4, clip 0.1, an EMA
        warmup=100,  # [O] main.py's "constant" diffusers schedule has no warm-up; 100 steps as the Cosmos rows
        betas=(0.9, 0.999), weight_decay=0.0,  # [I] main.py: AdamW(lr, weight_decay=0), torch's default betas
        batch_size=64, micro_batch=8, epochs=2,  # [O] the Cosmos rows' batch and epochs: equal budgets
        ac="full", workers=8, ckpt_every=500, keep=3, preview_every=1000,  # [O]
        preview_steps=50),  # [I] 50 sampler steps (PNDM there, DDIM here)
}

# how to make the paper preset's default input, which the message for a missing --data names
PAPER_CACHE = ("torchrun --nproc_per_node=8 data.py cache --data /path/to/egodex --out data/egodex-cache "
               "--epochs 2 --dino facebook/dinov3-vitl16-pretrain-lvd1689m")

# fields that define the model and its inputs: a checkpoint made with others cannot be resumed
MUST_MATCH = ("backbone", "learn_sigma", "model", "action_mode", "action_norm", "semantic", "trainable",
              "lora_rank", "lora_alpha", "lora_targets", "tokenizer", "pixel_compression", "pixel_mean", "pixel_std",
              "text", "text_tokens", "height", "width", "frames", "cond_frames", "seed", "batch_size")


class ConfigError(Exception):
    """A problem with the command line, the checkpoint or the run directory the user must fix."""


def add_config_flags(p):
    """--preset and one flag per TrainConfig field, with the help and choices the field carries."""
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="cpu: the tiny DexAC DiT on synthetic data, minutes on 2 cores; paper: cosmos2b on "
                   "EgoDex, 8 GPUs, batch 64. Flags override the preset")
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.type is tuple:  # of floats, as many as the default holds: --betas 0.9 0.999
            p.add_argument(flag, type=float, nargs=len(f.default), default=None, help=help,
                           metavar=tuple(f"{f.name[:-1].upper()}{i + 1}" for i in range(len(f.default))))
        else:
            p.add_argument(flag, type=f.type, default=None, choices=f.metadata["choices"], help=help)


def config_from_flags(args):
    """The preset, overridden by the flags given. On --resume the run's own configuration (its newest intact
    checkpoint's) takes the preset's place, and each flag that changes it is printed."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}  # argparse's nargs
    if not args.resume:
        return replace(PRESETS[args.preset], **overrides)
    saved = resumed_config(args.resume)
    for k, v in overrides.items():
        if v != getattr(saved, k) and int(os.environ.get("RANK", 0)) == 0:
            print(f"resume: --{k.replace('_', '-')} {v} overrides the run's {getattr(saved, k)}")
    return replace(saved, **overrides)


def resumed_config(path):
    """The TrainConfig a run (or one of its checkpoints) was trained with: its newest readable meta.json's."""
    for ckpt in find_checkpoints(path):
        try:
            saved = json.loads((ckpt / "meta.json").read_text())["train_config"]
        except (OSError, ValueError, KeyError):
            continue  # a damaged checkpoint: open_run says so when it falls back
        names = {f.name for f in fields(TrainConfig)}
        if isinstance(saved.get("ac"), bool):  # runs from before --ac took a mode
            saved["ac"] = "full" if saved["ac"] else "none"
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})
    raise ConfigError(f"no complete checkpoint in {path} (expected {path}/checkpoints/step_NNNNNNN): "
                      f"start a new run without --resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the DexAC-WM world model (DiT on video latents).")
    add_config_flags(p)
    p.add_argument("--resume", default="", help="run directory (or one of its checkpoints) to continue")
    p.add_argument("--exit-after", type=int, default=0, help="checkpoint and stop after N steps of this call")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    return config_from_flags(args), args


# -----------------------------------------------------------------------------
# distributed setup: torchrun or plain python, GPU or CPU


def setup_distributed(device_arg=""):
    """-> (rank, world, device). Under torchrun the env names the rank; a plain run makes a one-rank group."""
    try:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {device_arg}: use cpu or cuda (cuda:N for one GPU)") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"--device {device_arg}: {device.type} is not available here; use cpu"
                          + (" or cuda" if torch.cuda.is_available() else ""))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK, else the one asked for
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        rank, world = 0, 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def noise_seed(seed, step, micro, stream=0):
    """The seed of micro-batch `micro` of step `step`: stream 0 for the noise, 1 for the text-dropout coins
    (2^62 further, beyond any noise seed), so the noise does not depend on --text-dropout."""
    return (seed * 1_000_003 + step) * 1_000_003 + micro + stream * 2 ** 62


# -----------------------------------------------------------------------------
# the model and its frozen companions


def model_config(cfg, latent_channels):
    if cfg.backbone == "irasim":  # one latent frame per frame and one action per predicted frame
        s, T = cfg.pixel_compression if cfg.tokenizer == "pixel" else 8, cfg.frames
        c = irasim.config_from_preset(cfg.model, in_channels=latent_channels, input_size=(cfg.height // s,
                                      cfg.width // s), num_frames=T, mask_frames=cfg.cond_frames,
                                      action_mode=cfg.action_mode, action_dim=conditioning.ACTION_DIM,
                                      action_norm=cfg.action_norm, learn_sigma=cfg.learn_sigma)
        return replace(c, dim=cfg.dim or c.dim, n_blocks=cfg.blocks or c.n_blocks)
    c = M.config_from_preset(cfg.model, action_mode=cfg.action_mode, action_steps=cfg.frames - 1,
                             actions_per_frame=tok.TEMPORAL, action_norm=cfg.action_norm)
    c = replace(c, dim=cfg.dim or c.dim, n_blocks=cfg.blocks or c.n_blocks)
    # a pretrained backbone fixes its latent channels (the official ones 16, one of our exports its own); a new
    # one follows the tokenizer
    if c.in_channels != latent_channels:
        channels = exported_channels(cfg.init) if cfg.init else latent_channels
        if channels != latent_channels:
            raise ConfigError(f"--init loads a DiT with {channels or c.in_channels} latent channels, the "
                              f"{cfg.tokenizer} tokenizer gives {latent_channels}: use the tokenizer it was "
                              f"trained with (--tokenizer wan2.1 for the official weights)")
        c = replace(c, in_channels=latent_channels, out_channels=latent_channels)
    return replace(c, semantic_dim=sem.DINO_PRESETS["vitl16"].dim) if cfg.semantic else c


def exported_channels(spec):
    """The latent channels of an --init that is one of our exports (train.py's, e.g. miniature.py's base),
    from its metadata; None for anything else (the official checkpoints: 16)."""
    path = Path(spec)
    if path.suffix == ".safetensors" and not path.is_file():
        raise ConfigError(f"--init {spec} does not exist: give an exported model or a Hub spec (model.load_dit)")
    if path.suffix != ".safetensors":
        return None
    return hub.export_metadata(path).get("model_config", {}).get("in_channels")


def build_model(cfg, mcfg, device):
    """Meta-device construction, then either the pretrained backbone (new modules initialized by their own
    code) or `to_empty` + the explicit init of every part."""
    if cfg.backbone == "irasim":  # a released checkpoint (irasim.load_irasim), or IRASim's own init
        model = irasim.load_irasim(cfg.init, mcfg) if cfg.init else irasim.IRASim(mcfg)
        return model.to(device, torch.float32)  # fp32 master weights, whatever the checkpoint's dtype
    if cfg.init:
        return M.load_dit(cfg.init, mcfg, device=device, dtype=torch.float32)  # fp32 master weights
    with torch.device("meta"):
        model = M.DiT(mcfg)
    model.to_empty(device=device)
    model.init_weights()
    for part in (model.action_cond, model.semantic):
        if part is not None:
            part.init_weights()
    return model


NEW_MODULES = ("action_cond.", "semantic.", *irasim.FRAME_ADA)  # the action and DINOv3 modules on the backbone


def set_trainable(model, trainable):
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith(NEW_MODULES) or
                         (trainable == "lora+new" and lora.is_lora(name)))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("--trainable new, but the model has no new modules: set --action-mode or --semantic")


def parallelize(model, device, ac="none", ac_every=1, compile=False, bf16=None):
    """torchtitan's order: activation checkpointing per block (ac 'full': the whole block, 'mlp': its MLP
    sublayer; every ac_every-th block), then torch.compile per block (model.compile_blocks; compile: True for
    inductor, or a backend's name), then fully_shard: the fp32 path, each block, the root. bf16 compute with
    fp32 master weights and fp32 gradient reduction on GPUs (bf16: force it on or off); fp32 throughout on the
    CPU. The fp32 path (model.FP32_MODULES, the official fp32 strategy) gets groups of its own, one per parent
    module (a block's three modulations share one), whose parameters stay fp32."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    groups = {}  # named before activation checkpointing renames the blocks' modules
    for name, module in model.fp32_modules():
        groups.setdefault(name.rpartition(".")[0], []).append(module)
    for i, block in enumerate(model.blocks):
        if ac == "none" or i % ac_every:
            continue
        if ac == "full":
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            block.checkpoint_mlp = True
    if compile:
        M.compile_blocks(model, **({"backend": compile} if isinstance(compile, str) else {}))
    bf16 = device.type == "cuda" if bf16 is None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for modules in groups.values():
        fully_shard(modules, mp_policy=fp32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return torch.bfloat16 if bf16 else torch.float32


def build_tokenizer(cfg, device, load=True):
    """The frozen video tokenizer (random VAE weights without `load`: enough for shapes and timing). The IRASim
    backbone takes per-frame latents: the SDXL VAE's, or the pixel tokenizer's with temporal 1."""
    if cfg.tokenizer in ("wan2.1", "sdxl"):
        vae = tok.build_tokenizer(cfg.tokenizer, weights=(cfg.tokenizer_weights or None) if load else None)
        tokenizer = vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    else:
        tokenizer = tok.build_tokenizer(cfg.tokenizer, spatial_compression=cfg.pixel_compression,
                                        mean=cfg.pixel_mean, std=cfg.pixel_std,
                                        temporal=1 if cfg.backbone == "irasim" else tok.TEMPORAL)
    return tokenizer.eval().requires_grad_(False)


def build_context(cfg, mcfg, device):
    """The text embedder and DINOv3: inference mode only, never in the optimizer. (IRASim takes no text: its
    embedder is mode 'none', of any width.)"""
    text = sem.TextEmbedder(cfg.text, cache_dir=cfg.text_cache or None, text_dim=getattr(mcfg, "text_dim", 1024),
                            max_tokens=cfg.text_tokens, dtype=torch.float32 if device.type == "cpu" else
                            torch.bfloat16)
    dino = sem.load_dino(cfg.dino, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None) \
        if cfg.semantic else None
    return text, dino


@torch.inference_mode()
def encode_batch(batch, tokenizer, text, dino, device):
    """Sample dict -> (latents x0 (B, C, T', H', W') fp32, text (B, L, text_dim), actions (B, T_a, N), DINO
    features (B, P, 1024) or None), on device."""
    if "latents" in batch:  # a latent cache (`python data.py cache`): the tokenizer and DINOv3 already ran
        x0, feats = batch["latents"].to(device).float(), batch.get("dino") if dino is not None else None
        if dino is not None and feats is None:
            raise ConfigError("--semantic needs DINOv3 features: this latent cache was made without them")
        feats = feats.to(device) if feats is not None else None
    else:
        video = batch["video"].to(device).float() / 127.5 - 1  # (B, 3, T, H, W) in [-1, 1]
        # IRASim trains on draws from the SDXL VAE's posterior (its main.py), the Cosmos recipe on the Wan mean
        x0 = (tokenizer.encode(video, sample=True) if isinstance(tokenizer, tok.SDXLVAE) else
              tokenizer.encode(video)).float()
        feats = sem.conditioning_features(dino, video) if dino is not None else None
    return x0, text(batch["prompt"]).to(device), batch["actions"].to(device), feats


# -----------------------------------------------------------------------------
# data: the synthetic default, the statistics, an endless resumable stream of micro-batches


def rank0_first(rank, fn):
    """Run fn on rank 0 and share its failure, so that no rank waits at a barrier for one that has died."""
    failure = [None]
    if rank == 0:
        try:
            fn()
        except (ConfigError, data.DataError) as e:
            failure[0] = (isinstance(e, ConfigError), str(e))
    dist.broadcast_object_list(failure)
    if failure[0] is not None:
        raise (ConfigError if failure[0][0] else data.DataError)(failure[0][1])


def prepare_data(cfg, rank):
    """Write the synthetic dataset and its statistics when asked and absent, index the root once (rank 0),
    then check the statistics everywhere. -> the statistics file."""
    root, stats = Path(cfg.data), Path(cfg.stats or Path(cfg.data) / "stats.json")

    def on_rank0():
        if not cfg.synthetic and not root.exists():
            raise ConfigError(f"--data {root} does not exist: give an EgoDex or EgoVerse root (encoded as it "
                              f"trains), or first encode one into a latent cache there (the paper preset's "
                              f"input: the online VAE and DINOv3 cost more than the rest of a step beside the "
                              f"DiT): {PAPER_CACHE.replace('data/egodex-cache', str(root))}")
        if cfg.synthetic and not root.exists():
            print(f"writing the synthetic dataset to {root}")
            synthetic.write_synthetic(root)
        if cfg.synthetic and not stats.exists():
            splits = data.split_names(cfg.splits) or data.TRAIN_SPLITS
            moments = data.compute_stats(root, splits, test_fraction=cfg.test_fraction)
            hub.atomic_write(stats, json.dumps(moments, indent=1))
            print(f"wrote action statistics to {stats}")
        if (root / data.CACHE_MANIFEST).is_file():
            m = json.loads((root / data.CACHE_MANIFEST).read_text())
            if m["tokenizer"] == "pixel":  # the manifest records neither its compression nor its normalization
                raise ConfigError(f"{root} caches pixel-tokenizer latents: train on the raw data instead (the "
                                  f"pixel tokenizer costs nothing to run)")
            want = (cfg.tokenizer, cfg.frames, [cfg.height, cfg.width])
            if (m["tokenizer"], m["clip_len"], m["size"]) != want:
                raise ConfigError(f"the latent cache {root} holds {m['tokenizer']} latents of {m['clip_len']}-"
                                  f"frame clips at {m['size']}: set --tokenizer, --frames, --height, --width")
        else:
            data.load_index(root, test_fraction=cfg.test_fraction)  # ranks > 0 then read the cached index
        data.load_stats(stats)  # a missing file or another layout: one clear error
    rank0_first(rank, on_rank0)
    return stats


def ignore_signals(worker_id):
    """Clusters signal every process of a job: loader workers keep serving while the trainer checkpoints."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def epoch_steps(cfg):
    """--epochs as optimizer steps: passes over one epoch's clip plan (ClipSampler's, as many clips every epoch)
    in steps of the global batch, rounded up. A latent cache made with `data.py cache --epochs k` holds k
    epochs' plans (new clip starts each), so one of our epochs is 1/k of it."""
    _, sampler = data.make_loader(cfg.data, cfg.micro_batch, clip_len=cfg.frames, size=(cfg.height, cfg.width),
                                  num_workers=0, seed=cfg.seed, splits=data.split_names(cfg.splits),
                                  test_fraction=cfg.test_fraction)
    manifest = Path(cfg.data) / data.CACHE_MANIFEST
    cached = json.loads(manifest.read_text())["epochs"] if manifest.is_file() else 1
    if manifest.is_file() and cfg.epochs > cached and int(os.environ.get("RANK", 0)) == 0:
        print(f"notice: --epochs {cfg.epochs:g} over a cache of {cached} epochs' clips: its clips come back "
              f"{cfg.epochs / cached:.2g} times (cache more with `data.py cache --epochs`)")
    return math.ceil(cfg.epochs * len(sampler) / cached / cfg.batch_size)


class Stream:
    """Endless micro-batches over epochs; `state()` is the ClipSampler position after the clips taken."""

    def __init__(self, cfg, rank, world):
        self.loader, self.sampler = data.make_loader(
            cfg.data, cfg.micro_batch, clip_len=cfg.frames, size=(cfg.height, cfg.width),
            num_workers=cfg.workers, seed=cfg.seed, rank=rank, world_size=world,
            splits=data.split_names(cfg.splits), test_fraction=cfg.test_fraction,
            worker_init_fn=ignore_signals if cfg.workers else None)
        self.taken, self.iterator, self.skipped, self.say = 0, None, 0, tqdm.write if rank == 0 else None

    def next(self):
        while True:
            if self.iterator is None:
                self.iterator, self.taken, self.skipped = iter(self.loader), 0, 0
            try:
                batch = next(self.iterator, None)
            except data.DataError as e:  # raised in a worker: the loader made its traceback the message
                raise data.DataError(str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")) from None
            if batch is not None:
                self.taken += len(batch["prompt"])
                self.skipped += int(batch["skipped"].sum()) if "skipped" in batch else 0
                return batch
            if self.say:  # the end-of-epoch summary of episodes that failed to load (their reasons were logged)
                self.say(f"epoch {self.sampler.epoch} done: {self.taken} clips on this rank, {self.skipped} "
                         f"unreadable episode(s) skipped")
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.iterator = None

    def state(self):
        return self.sampler.state_dict(self.taken)

    def close(self):
        """Stop the loader workers now: an error's traceback keeps the iterator alive, and its workers, which
        ignore SIGTERM, would outlive the trainer (or be reported as killed when `hub.run_main` ends them)."""
        if self.iterator is not None and hasattr(self.iterator, "_shutdown_workers"):
            self.iterator._shutdown_workers()
        self.iterator = None

    def load(self, state):
        self.sampler.load_state_dict(state)
        self.iterator = None


# -----------------------------------------------------------------------------
# the recipe: AdamW, warmup then constant, cosine or linear, text dropout, EMA


def group_settings(cfg):
    """AdamW's settings of its two groups, the matrices and the rest (norms, biases, other < 2-D tensors), which
    are decayed only with --decay-all (as the official recipe does)."""
    betas = tuple(cfg.betas)
    return [{"weight_decay": cfg.weight_decay, "betas": betas},
            {"weight_decay": cfg.weight_decay if cfg.decay_all else 0.0, "betas": betas}]


def build_optimizer(model, cfg):
    """The same two groups whatever the settings, so that a checkpoint's optimizer state maps onto any of them.
    AdamW's fused kernel on GPUs (one launch for all parameters), the multi-tensor one on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}]
    groups = [g | s for g, s in zip(groups, group_settings(cfg))]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=1e-8, fused=fused, foreach=not fused)


def lr_at(step, cfg):
    """Linear warmup, then constant, or a cosine or linear decay that reaches min_lr_ratio x lr at decay_steps
    (default: the last step) and stays there. 'linear' is the official LambdaLinearScheduler after its warmup,
    lr (f_min + (1 - f_min) (L - step) / (L - warmup)), clamped at f_min past L."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, (cfg.decay_steps or cfg.steps) - cfg.warmup))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def drop_text(text, rate, generator):
    """Text dropout for classifier-free guidance: each sample's text context (B, L, D) is replaced by zeros with
    probability `rate` (official: 0.2, zeros), the others are returned untouched; the B coins come from
    `generator`."""
    drop = torch.rand(text.shape[0], generator=generator, device=generator.device) < rate  # (B,)
    return torch.where(drop[:, None, None].to(text.device), torch.zeros((), dtype=text.dtype, device=text.device),
                       text)


def clean(name):
    return name.replace("_checkpoint_wrapped_module.", "")


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(ema, model, step, decay):
    """On the local shards (a view each): one fused op instead of one DTensor dispatch per parameter."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(local(ema[clean(n)]), local(p)) for n, p in model.named_parameters() if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)


# -----------------------------------------------------------------------------
# checkpoints: DCP directories step_XXXXXXX with a meta.json, written atomically, the last K kept


def checkpoint_state(model, optimizer, ema):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd, "ema": ema}


def save_checkpoint(run, step, *, model, optimizer, ema, meta, rank, keep, written):
    """A DCP directory step_XXXXXXX (step_XXXXXXX_k when another branch holds that step), its meta.json
    numbered one past the newest written (`seq`: what "latest" means). Pruning removes only this process's
    own checkpoints beyond the last `keep` of `written`: never the one resumed from, nor another branch's."""
    ckpts = run / "checkpoints"
    name = [None]
    if rank == 0:
        name[0], k = f"step_{step:07d}", 1
        while (ckpts / name[0]).exists() and (ckpts / name[0]).resolve() not in written:
            name[0], k = f"step_{step:07d}_{k}", k + 1
    dist.broadcast_object_list(name)
    final, tmp = ckpts / name[0], ckpts / f"{name[0]}.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(checkpoint_state(model, optimizer, ema), checkpoint_id=str(tmp))
    if rank == 0:
        seq = 1 + max((checkpoint_seq(c) for c in checkpoint_dirs(run)), default=0)
        (tmp / "meta.json").write_text(json.dumps(meta | {"seq": seq}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint directory without .tmp is complete
    written.append(final.resolve())
    if rank == 0:
        for old in written[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    del written[:-keep]
    dist.barrier()
    return final


def checkpoint_dirs(run):
    return [c for c in (Path(run) / "checkpoints").glob("step_*") if c.is_dir() and not c.name.endswith(".tmp")]


def checkpoint_seq(ckpt):
    """The write order of a checkpoint (its step for those written before `seq` existed); -1 unreadable."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        return meta.get("seq", meta["step"])
    except (OSError, ValueError, KeyError):
        return -1


def find_checkpoints(path):
    """A checkpoint directory -> [it]; a run directory -> its checkpoints, newest written first (the lineage
    the last run continued, whatever the step numbers of abandoned branches)."""
    path = Path(path)
    if (path / "meta.json").exists():
        return [path]
    return sorted(checkpoint_dirs(path), key=lambda c: (checkpoint_seq(c), c.name), reverse=True)


def load_checkpoint(path, *, cfg, mcfg, model, optimizer, ema):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    meta = json.loads((path / "meta.json").read_text())
    dit = json.loads(json.dumps(asdict(mcfg)))  # tuples as lists, as in the file
    # a setting newer than the checkpoint takes its default, which is what the runs made before it did
    # (--backbone, the --lora-* flags: a run from an older version resumes)
    defaults = json.loads(json.dumps(asdict(type(mcfg)())))
    older = {**asdict(TrainConfig()), **{f"dit.{k}": v for k, v in defaults.items()}}
    saved = {**older, **meta["train_config"], **{f"dit.{k}": v for k, v in meta["model_config"].items()}}
    now = {**asdict(cfg), **{f"dit.{k}": v for k, v in dit.items()}}
    keys = (*MUST_MATCH, *(f"dit.{k}" for k in dit))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"{path} was made with another configuration; resume with the same settings ("
                          + "; ".join(diff) + ")")
    state = checkpoint_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))  # reshards to this run's world size
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, settings in zip(optimizer.param_groups, group_settings(cfg)):
        group.update(settings)  # the loaded state brought the checkpoint's betas and decay: the flags decide
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta


# -----------------------------------------------------------------------------
# export: one safetensors file, EMA weights, with everything sample.py needs in its metadata


def export(path, *, model, ema, cfg, mcfg, stats_path, step, rank, dtype):
    """Gather the full weights (a collective: every rank calls it); rank 0 writes the file."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_ema = {}
    for k, v in ema.items():  # one tensor at a time, so that only rank 0 ever holds the whole model
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        if rank == 0:
            full_ema[k] = v.cpu()
    if rank != 0:
        return None
    base = cfg.init if cfg.trainable in ("new", "lora+new") else ""  # a frozen pretrained backbone: not written again
    out = {}
    for k, v in sd.items():
        if base and k not in full_ema and not k.startswith(NEW_MODULES):
            continue  # sample.py loads it from `base` (or --init)
        v = full_ema.get(k, v)
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    adapters = None
    if cfg.trainable == "lora+new":  # PEFT's keys and config; the new modules are its modules_to_save
        adapters = lora.adapter_config(cfg.lora_rank, cfg.lora_alpha,
                                       sorted({k.rpartition(".lora_")[0] for k in out if lora.is_lora(k)}),
                                       cfg.lora_dropout, base or None,
                                       sorted({k.split(".")[0] for k in out if not lora.is_lora(k)}))
        out = {lora.PREFIX + k: v for k, v in out.items()}
    mean, std = data.load_stats(stats_path)
    meta = {"backbone": cfg.backbone, "model_config": asdict(mcfg), "train_config": asdict(cfg), "step": step,
            "base": base, "action_layout": conditioning.action_layout(),
            "action_stats": {"mean": mean.tolist(), "std": std.tolist()},
            "tokenizer": {"name": cfg.tokenizer, "weights": cfg.tokenizer_weights,
                          "pixel_compression": cfg.pixel_compression, "pixel_mean": cfg.pixel_mean,
                          "pixel_std": cfg.pixel_std, "temporal": 1 if cfg.backbone == "irasim" else tok.TEMPORAL},
            "text": {"mode": cfg.text, "tokens": cfg.text_tokens}}
    if adapters:
        meta["lora"] = adapters
        lora.write_folder(Path(path).with_name(Path(path).stem + "_peft"), out, adapters)  # for peft's users
    meta["sha256"] = hub.tensors_sha256(out)  # model.load_exported refuses a file whose bytes changed since
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    # atomic: a run counts as done once its export exists (miniature.py)
    return hub.atomic_save(path, lambda tmp: save_file(out, tmp, metadata=metadata))


# -----------------------------------------------------------------------------
# observability: the loss curve and the preview contact sheet, with PIL only


def plot_losses(path, steps, losses):
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    steps, losses = [s for s, _ in finite], [v for _, v in finite]
    W, H, pad = 640, 360, 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if len(losses) >= 2:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1
        x = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * pad)
        y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)
        d.line([(x(s), y(v)) for s, v in zip(steps, losses)], fill=(160, 190, 230), width=1)
        k = max(1, len(losses) // 20)  # running mean over ~5% of the curve
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        d.line([(x(s), y(v)) for s, v in zip(steps[k - 1:], smooth)], fill=(20, 60, 160), width=2)
        d.text((4, pad - 12), f"{hi:.4f}", fill="black")
        d.text((4, H - pad - 6), f"{lo:.4f}", fill="black")
        d.text((pad, H - pad + 8), f"step {steps[0]}", fill="black")
        d.text((W - pad - 60, H - pad + 8), f"step {steps[-1]}", fill="black")
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.text((pad, 12), "training loss (light: per step, dark: running mean)", fill="black")
    img.save(path)


def preview_clip(cfg):
    """A fixed clip: the first of the first held-out (test) episode, else of the first training episode, or
    the first clip of a latent cache."""
    if (Path(cfg.data) / data.CACHE_MANIFEST).is_file():
        sample = data.CachedClipDataset(cfg.data)[0]
        return {k: v[None] for k, v in sample.items() if k in ("latents", "actions", "dino")} | \
            {"prompt": [sample["prompt"]]}
    try:
        episodes, _ = data.load_index(cfg.data, data.EVAL_SPLITS, test_fraction=cfg.test_fraction)
    except data.DataError:
        episodes, _ = data.load_index(cfg.data, data.split_names(cfg.splits) or data.TRAIN_SPLITS,
                                      test_fraction=cfg.test_fraction)
    sample = data.ClipDataset(episodes, cfg.frames, (cfg.height, cfg.width))[(0, 0)]
    return {"video": sample["video"][None], "actions": sample["actions"][None], "prompt": [sample["prompt"]]}


@torch.no_grad()
def preview(t, path, clip):
    """Roll the model out from the clip's first frame and actions; the sheet shows truth over prediction.
    Every rank runs the sampler (the sharded forward is a collective); the caller's rank 0 keeps the file."""
    cfg, device = t.cfg, t.device
    x0, text, actions, feats = encode_batch(clip, t.tokenizer, *t.context, device)
    actions = conditioned(t, actions)
    mask = torch.zeros(1, x0.shape[2], device=device)
    mask[:, :cfg.cond_frames] = 1
    g = torch.Generator(device).manual_seed(cfg.seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    if t.diffusion is not None:  # IRASim: DDIM on preview_steps of its 1000 steps
        fn = lambda x, s: t.model(x.to(t.dtype), s, actions).float()
        x = irasim.GaussianDiffusion(use_steps=cfg.preview_steps).sample(fn, noise, x_cond=x0[:, :, :cfg.cond_frames],
                                                                         method="ddim")
    else:
        fn = lambda x, s: t.model(x.to(t.dtype), s, text, mask, actions=actions, image_features=feats).float()
        x = M.sample(fn, noise, M.shifted_sigmas(cfg.preview_steps, cfg.shift), solver="unipc", x_cond=x0,
                     frame_mask=mask)  # the official sampler, on the training shift
    pred = t.tokenizer.decode(x).float()
    truth = clip["video"][0].float() / 127.5 - 1 if "video" in clip else t.tokenizer.decode(x0)[0].float()
    data.contact_sheet(path, [data.to_frames(truth), data.to_frames(pred[0])], ["ground truth", "predicted"])


def flops_per_clip(mcfg, x_shape, text_tokens, n_patches):
    """Training FLOPs of one clip: 3x the forward's, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    if isinstance(mcfg, irasim.IRASimConfig):
        with torch.device("meta"):  # (its fixed position tables are made from numpy: moved to meta too)
            net = irasim.IRASim(replace(mcfg, action_norm="none")).to("meta").eval()
            x, steps = torch.empty(1, *x_shape[1:]), torch.zeros(1, dtype=torch.long)
            n = mcfg.num_frames - mcfg.mask_frames
            actions = torch.empty(1, n, mcfg.action_dim) if mcfg.action_mode != "none" else None
            with FlopCounterMode(display=False) as counter:
                net(x, steps, actions)
        return 3 * counter.get_total_flops()
    with torch.device("meta"):
        net = M.DiT(replace(mcfg, action_norm="none"))  # the statistics check would read a meta tensor
        x, sigma = torch.empty(1, *x_shape[1:]), torch.empty(1)
        text = torch.empty(1, text_tokens, mcfg.text_dim)
        actions = torch.empty(1, mcfg.action_steps, mcfg.action_dim) if net.action_cond is not None else None
        feats = torch.empty(1, n_patches, mcfg.semantic_dim) if mcfg.semantic_dim else None
        with FlopCounterMode(display=False) as counter:
            net(x, sigma, text, actions=actions, image_features=feats)
    return 3 * counter.get_total_flops()


# -----------------------------------------------------------------------------
# the stages of a run: build, describe, open_run, then train_step / log_metrics / checkpoint, and finish


@dataclass
class Trainer:
    """What the stages share: made once by `build`; the stages step its model, optimizer and EMA."""
    cfg: TrainConfig
    mcfg: M.DiTConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # the DiT's compute dtype: bf16 on GPUs, fp32 on the CPU
    accum: int  # micro-batches per rank per optimizer step
    tokenizer: torch.nn.Module
    context: tuple | None  # (text embedder, DINOv3 or None); None when built without `load`
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: dict
    stats_path: Path | None  # the action statistics file; None when built without `load`
    latent: tuple  # (B, C, T', H', W') of one micro-batch
    frame_mask: torch.Tensor  # (B, T'): 1 on the latent frames given clean as the condition
    resumed_from: Path | None = None  # the checkpoint this process continued
    written: list = field(default_factory=list)  # the checkpoints this process wrote and kept, oldest first
    lock: Path | None = None  # the run's lock file, while this process holds it
    stream: "Stream | None" = None  # the training data, once open_run made it
    diffusion: "irasim.GaussianDiffusion | None" = None  # the IRASim backbone's objective (Cosmos: None)

    @property
    def tokens_per_clip(self):
        _, _, T, H, W = self.latent
        patch = getattr(self.mcfg, "patch_spatial", None) or self.mcfg.patch  # Cosmos' name, IRASim's
        return T * (H // patch) * (W // patch)

    @property
    def tokens_per_step(self):
        return self.tokens_per_clip * self.cfg.batch_size

    @property
    def n_patches(self):
        return (self.cfg.height // 16) * (self.cfg.width // 16)  # DINOv3 ViT-L/16 features of one frame

    def log(self, *args):
        if self.rank == 0:
            print(*args)


def check_ranges(cfg):
    """The range of every number a flag sets: one ConfigError naming the first flag outside its range."""
    finite = lambda *v: all(math.isfinite(x) for x in v)
    rules = [  # (field, holds, what it must be)
        ("height", cfg.height > 0 and cfg.height % 16 == 0, "> 0 (frame sizes are multiples of 16)"),
        ("width", cfg.width > 0 and cfg.width % 16 == 0, "> 0 (frame sizes are multiples of 16)"),
        ("frames", cfg.frames >= 5 and (cfg.frames - 1) % tok.TEMPORAL == 0 if cfg.backbone == "cosmos" else
         cfg.frames >= 2, "4k + 1 with k >= 1 (5, 9, 13...)" if cfg.backbone == "cosmos" else ">= 2"),
        ("dim", cfg.dim >= 0, ">= 0 (0 keeps the preset's)"),
        ("blocks", cfg.blocks >= 0, ">= 0 (0 keeps the preset's)"),
        ("pixel_compression", cfg.pixel_compression >= 1, ">= 1"),
        ("pixel_std", finite(cfg.pixel_std, cfg.pixel_mean) and cfg.pixel_std > 0, "finite and > 0"),
        ("text_tokens", cfg.text_tokens >= 1, ">= 1"),
        ("test_fraction", 0 <= cfg.test_fraction <= 1, "in [0, 1]"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("micro_batch", cfg.micro_batch >= 1, ">= 1"),
        ("workers", cfg.workers >= 0, ">= 0"),
        ("warmup", cfg.warmup >= 0, ">= 0"),
        ("ac_every", cfg.ac_every >= 1, ">= 1 (1: every block)"),
        ("lora_rank", cfg.lora_rank >= 1, ">= 1"),
        ("lora_alpha", finite(cfg.lora_alpha) and cfg.lora_alpha > 0, "finite and > 0"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        ("decay_steps", cfg.decay_steps >= 0, ">= 0 (0: --steps)"),
        ("lr", finite(cfg.lr) and cfg.lr > 0, "finite and > 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
        ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "finite and >= 0"),
        ("grad_clip", finite(cfg.grad_clip) and cfg.grad_clip >= 0, "finite and >= 0 (0: off)"),
        ("ema", 0 <= cfg.ema < 1, "in [0, 1)"),
        ("shift", finite(cfg.shift) and cfg.shift > 0, "finite and > 0"),
        ("keep", cfg.keep >= 1, ">= 1"),
        ("ckpt_every", cfg.ckpt_every >= 1, ">= 1"),
        ("export_every", cfg.export_every >= 0, ">= 0 (0: only at the end)"),
        ("log_every", cfg.log_every >= 1, ">= 1"),
        ("preview_every", cfg.preview_every >= 0, ">= 0 (0: only at the end)"),
        ("preview_steps", cfg.preview_steps >= 1, ">= 1"),
    ]
    for name, holds, want in rules:
        if not holds:
            value = " ".join(map(str, cfg.betas)) if name == "betas" else getattr(cfg, name)
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be {want}")


def check_output(out):
    """The parent of the run directories exists (or can be made) and is writable, before any work."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be made ({e.strerror}): choose a writable directory") from None
    if not Path(out).is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not a writable directory: choose another")


def check_backbone(cfg):
    """What each backbone takes: its own size presets, tokenizers and action modes; IRASim has no text, DINOv3
    branch or MLP-only activation checkpointing."""
    irasim_only = {  # what is IRASim's -> (set, what Cosmos has instead)
        "--action-mode frame-ada": (cfg.action_mode == "frame-ada", "an --action-mode of its own"),
        "--tokenizer sdxl": (cfg.tokenizer == "sdxl", "the wan2.1 or pixel --tokenizer"),
        "--learn-sigma": (cfg.learn_sigma, "rectified flow")}
    if cfg.backbone == "cosmos":
        for what, (used, instead) in irasim_only.items():
            if used:
                raise ConfigError(f"{what} belongs to IRASim: add --backbone irasim, or drop it (Cosmos: {instead})")
        if cfg.model not in M.PRESETS:
            raise ConfigError(f"--model {cfg.model} is an IRASim size: the Cosmos sizes are {sorted(M.PRESETS)}")
        return
    steps_error = irasim.sample_steps_error(cfg.preview_steps)
    bad = [(cfg.model not in irasim.PRESETS, f"--model {cfg.model}: the IRASim sizes are {sorted(irasim.PRESETS)}"),
           (cfg.tokenizer == "wan2.1", "--tokenizer wan2.1 compresses time 4x: IRASim takes per-frame latents "
                                       "(--tokenizer sdxl, or pixel)"),
           (cfg.semantic, "--semantic: IRASim has no cross-attention for the DINOv3 features (drop --semantic)"),
           (cfg.text != "none", "--text reason1: IRASim has no text conditioning (use --text none)"),
           (cfg.ac == "mlp", "--ac mlp splits a Cosmos block; IRASim's blocks take --ac full or none"),
           (bool(cfg.init) and Path(cfg.init).suffix not in (".pt", ".pth", ".safetensors"),
            f"--init {cfg.init}: IRASim starts from a checkpoint file (a released .pt, or an IRASim export)"),
           (bool(steps_error), f"--preview-steps: {steps_error}")]
    for wrong, message in bad:
        if wrong:
            raise ConfigError(message)


def check_config(cfg, world):
    """-> micro-batches per rank per step, after the checks of what the flags can get wrong."""
    check_ranges(cfg)
    check_backbone(cfg)
    accum, rest = divmod(cfg.batch_size, cfg.micro_batch * world)
    if rest or not accum:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}"
                          f"x {world} ranks")
    n = cfg.frames - 1 if cfg.backbone == "irasim" else (cfg.frames - 1) // tok.TEMPORAL  # latent frames, less 1
    if not 0 < cfg.cond_frames <= n:
        raise ConfigError(f"--cond-frames {cfg.cond_frames} must lie in [1, {n}] (latent frames {n + 1} for "
                          f"{cfg.frames} frames: at least one must be predicted)")
    if not 0 <= cfg.text_dropout <= 1 or not 0 <= cfg.epochs < math.inf:
        raise ConfigError(f"--text-dropout {cfg.text_dropout} must lie in [0, 1], --epochs {cfg.epochs} be >= 0")
    s = cfg.pixel_compression if cfg.tokenizer == "pixel" else 8
    patch = irasim.PRESETS[cfg.model].patch if cfg.backbone == "irasim" else M.PRESETS[cfg.model].patch_spatial
    if cfg.height % (s * patch) or cfg.width % (s * patch):
        raise ConfigError(f"--height {cfg.height} and --width {cfg.width} must be multiples of {s * patch} (the "
                          f"{cfg.tokenizer} tokenizer's compression {s} x the DiT's patch {patch}): change them "
                          f"or --pixel-compression")
    return accum


def build(cfg, device, *, load=True):
    """The data, tokenizer, sharded model, optimizer, EMA and text/DINOv3 context, in the process group.
    Without `load` nothing is read or downloaded (no data, statistics, weights or --init): random weights
    time the same as pretrained ones (`python bench.py train`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = check_config(cfg, world)
    if load and cfg.trainable == "lora+new" and not cfg.init:  # (a benchmark times random weights)
        raise ConfigError("--trainable lora+new adapts a pretrained backbone: give it with --init")
    torch.manual_seed(cfg.seed)
    cfg = cfg if load else replace(cfg, init="")
    stats_path = prepare_data(cfg, rank) if load else None
    cfg = replace(cfg, steps=epoch_steps(cfg)) if load and cfg.epochs else cfg
    tokenizer = build_tokenizer(cfg, device, load=load)
    mcfg = model_config(cfg, tokenizer.latent_channels)
    model = build_model(cfg, mcfg, device)
    if cfg.trainable == "lora+new":  # on the loaded base, before checkpointing, compile and FSDP wrap its blocks
        lora.inject(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if model.action_cond is not None and load:
        model.action_cond.set_stats(*data.load_stats(stats_path), conditioning.action_layout())
    elif model.action_cond is not None:  # unit statistics: enough for shapes and timing
        model.action_cond.set_stats(torch.zeros(mcfg.action_dim), torch.ones(mcfg.action_dim))
    set_trainable(model, cfg.trainable)
    dtype = parallelize(model, device, cfg.ac, cfg.ac_every, cfg.compile)
    optimizer = build_optimizer(model, cfg)
    ema = {clean(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    context = build_context(cfg, mcfg, device) if load else None
    T, s = 1 + (cfg.frames - 1) // tokenizer.temporal_compression, tokenizer.spatial_compression
    frame_mask = torch.zeros(cfg.micro_batch, T, device=device)  # (B, T')
    frame_mask[:, :cfg.cond_frames] = 1
    return Trainer(cfg=cfg, mcfg=mcfg, rank=rank, world=world, device=device, dtype=dtype, accum=accum,
                   tokenizer=tokenizer, context=context, model=model, optimizer=optimizer, ema=ema,
                   stats_path=stats_path, frame_mask=frame_mask,
                   latent=(cfg.micro_batch, mcfg.in_channels, T, cfg.height // s, cfg.width // s),
                   diffusion=irasim.GaussianDiffusion() if cfg.backbone == "irasim" else None)


def describe(t):
    """The startup print (nanoGPT's): the resolved configs, parameters, shapes, tokens and FLOPs per step."""
    cfg, params = t.cfg, list(t.model.parameters())  # DTensors count their full size
    n_params, n_train = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    flops = flops_per_clip(t.mcfg, t.latent, cfg.text_tokens, t.n_patches) * cfg.batch_size
    t.log(json.dumps({"train": asdict(cfg), "model": asdict(t.mcfg)}, indent=1, default=str))
    t.log(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable), {t.world} rank(s) on "
          f"{t.device.type}, {str(t.dtype).removeprefix('torch.')} compute; latents {t.latent[1:]} per clip, "
          f"{t.tokens_per_clip} tokens per clip, {t.tokens_per_step:,} per step (batch {cfg.batch_size} = "
          f"{cfg.micro_batch} x {t.accum} accum x {t.world} ranks); {flops / 1e12:.3f} TFLOP per step")


def open_run(t, resume):
    """-> (run directory, data stream, first step, metrics history): a new numbered directory (DiT style), or
    the resumed one with the model, optimizer, EMA, data position and RNG of its checkpoint."""
    cfg, step = t.cfg, 0
    stream = t.stream = Stream(cfg, t.rank, t.world)
    if resume:
        t0 = time.perf_counter()
        ckpt, meta = load_newest_intact(t, resume)
        run = ckpt.parent.parent
        lock_run(t, run)
        step = meta["step"]
        stream.load(meta["data"])
        t.resumed_from = ckpt
        t.log(f"resumed from {ckpt} at step {step} (loaded in {time.perf_counter() - t0:.1f} s)")
    else:
        run = [None]
        if t.rank == 0:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            # one past the highest number: a deleted run's number is not given again
            n = 1 + max((int(d[:3]) for d in os.listdir(cfg.out) if d[:3].isdigit()), default=-1)
            name = cfg.model if cfg.backbone == "cosmos" else f"irasim-{cfg.model}"
            while True:
                run[0] = Path(cfg.out) / f"{n:03d}-{name}-{cfg.action_mode}-{cfg.height}x{cfg.width}"
                try:
                    run[0].mkdir()  # exclusive: two runs started at once get two numbers
                    break
                except FileExistsError:
                    n += 1
            Path(run[0], "checkpoints").mkdir()
            run[0] = str(run[0])
        dist.broadcast_object_list(run)
        run = Path(run[0])
        lock_run(t, run)
    metrics = run / "metrics.jsonl"
    history = [json.loads(line) for line in open(metrics)] if metrics.exists() else []
    history = [h for h in history if h["step"] <= step]  # a resumed run rewrites what came after its checkpoint
    if t.rank == 0:
        config = {"train": asdict(cfg), "model": asdict(t.mcfg)}
        hub.atomic_write(run / "config.json", json.dumps(config, indent=1))
        hub.atomic_write(metrics, "".join(json.dumps(h) + "\n" for h in history))
    return run, stream, step, history


def load_newest_intact(t, resume):
    """Load the newest written checkpoint that loads; a damaged one is reported and the one before is tried.
    -> (checkpoint directory, its meta)."""
    found = find_checkpoints(resume)
    if not found:
        raise ConfigError(f"no complete checkpoint in {resume} (expected {resume}/checkpoints/step_NNNNNNN): "
                          f"start a new run without --resume")
    for i, ckpt in enumerate(found):
        try:
            meta = load_checkpoint(ckpt, cfg=t.cfg, mcfg=t.mcfg, model=t.model, optimizer=t.optimizer, ema=t.ema)
            return ckpt, meta
        except ConfigError:
            raise
        # a truncated or half-copied DCP directory (DCP's error is a BaseException), a damaged meta.json
        except (Exception, dcp.api.CheckpointException) as e:
            why = load_failure(e)
            if MISSING in why:  # not damage (an older checkpoint would fail the same way): another model
                raise ConfigError(
                    f"{ckpt} holds no {why.split(MISSING, 1)[1].rstrip('.')}, which this model has: it was written "
                    f"by another version of the model code (a parameter added since), or that parameter had never "
                    f"received a gradient (no optimizer state was saved for it); resume with the code that wrote "
                    f"it") from None
            if i + 1 == len(found):
                raise ConfigError(f"no intact checkpoint in {resume}: the oldest, {ckpt}, is damaged too ({why})")
            t.log(f"checkpoint {ckpt} is damaged ({why}); falling back to {found[i + 1]}")


MISSING = "Missing key in checkpoint state_dict: "  # DCP's words for a tensor the checkpoint does not hold


def load_failure(e):
    """One line for why a checkpoint did not load: DCP's own exception names only the ranks that failed; the
    first rank's error is the reason (a missing file, "Missing key in checkpoint state_dict: ...")."""
    if isinstance(e, dcp.api.CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def lock_run(t, run):
    """An exclusive lock file holding the writer's pid, so that two processes cannot write one run; a dead
    process's lock is taken over. Removed by `unlock_run` when the run ends, however it ends."""
    if t.rank != 0:
        return
    lock = run / "lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                raise ConfigError(f"{run} is being written by process {pid}: wait for it to end, or stop it "
                                  f"(a stale lock of a dead process is taken over)") from None
            t.log(f"taking over the lock of {run} from process {pid or '?'}, which is no longer running")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        t.lock = lock
        return
    raise ConfigError(f"could not lock {run}: another process took its lock file {lock} meanwhile")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def unlock_run(t):
    if t is not None and t.lock is not None:
        t.lock.unlink(missing_ok=True)
        t.lock = None


SIGMA_BINS = 5  # loss per noise level, [0, 0.2), ..., [0.8, 1]


@dataclass
class StepStats:
    """What a step reports, summed over its micro-batches, then over the ranks in ONE all_reduce."""
    loss: torch.Tensor  # () sum of the clips' losses
    bin_loss: torch.Tensor  # (SIGMA_BINS,) sums of the losses per sigma bin
    bin_count: torch.Tensor  # (SIGMA_BINS,) clips per sigma bin
    stop: torch.Tensor  # () > 0 once a rank has been signalled: every rank stops after this step

    @staticmethod
    def zeros(device):
        return StepStats.unpack(torch.zeros(2 + 2 * SIGMA_BINS, device=device))

    def pack(self):
        return torch.cat([self.loss[None], self.bin_loss, self.bin_count, self.stop[None]])

    @staticmethod
    def unpack(v):
        return StepStats(v[0], v[1:1 + SIGMA_BINS], v[1 + SIGMA_BINS:1 + 2 * SIGMA_BINS], v[-1])

    def __add__(self, other):
        return StepStats.unpack(self.pack() + other.pack())

    def all_reduce(self):
        v = self.pack()
        dist.all_reduce(v)
        return StepStats.unpack(v)


class StepResult(NamedTuple):
    ok: bool  # False: the loss or the gradient norm was not finite and the update was skipped
    loss: float  # per clip, over the global batch
    norm: float  # the global gradient norm before clipping
    stats: StepStats  # summed over the ranks


def conditioned(t, actions):
    """The actions the model takes: none with --action-mode none (the backbone alone, e.g. miniature.py's base)."""
    return actions if t.cfg.action_mode != "none" else None


def irasim_loss(t, x0, actions, g, coins):
    """IRASim's objective (irasim.GaussianDiffusion.training_losses: epsilon MSE, + the VLB with learn_sigma):
    uniform steps of 1000, the first cond_frames latent frames clean. Frame-Ada's classifier-free dropout draws
    from `coins`, so that a resumed run repeats it. -> per-clip losses (B,), step / 1000 (B,)."""
    B, m = x0.shape[0], t.cfg.cond_frames
    steps = torch.randint(0, t.diffusion.n_steps, (B,), generator=g, device=t.device)
    noise = torch.randn(x0[:, :, m:].shape, generator=g, device=t.device)
    drop = None
    if t.cfg.action_mode == "frame-ada":
        drop = torch.rand(B, generator=coins, device=t.device) < t.mcfg.action_dropout
    fn = lambda x, s: t.model(x.to(t.dtype), s, actions, drop_actions=drop).float()
    terms = t.diffusion.training_losses(fn, x0, steps, mask_frames=m, noise=noise)
    return terms["loss"], steps.float() / t.diffusion.n_steps


def micro_step(t, inputs, step, micro):
    """Forward and backward of one micro-batch, its loss scaled by 1 / accum so that the gradients add up to
    the step's. inputs: (x0, text, actions, DINOv3 features or None), as `encode_batch` returns them."""
    x0, text, actions, feats = (v.clone() if v is not None else None for v in inputs)  # out of inference mode
    g = torch.Generator(t.device).manual_seed(noise_seed(t.cfg.seed, step, micro))
    coins = torch.Generator(t.device).manual_seed(noise_seed(t.cfg.seed, step, micro, stream=1))
    text = drop_text(text, t.cfg.text_dropout, coins)
    actions = conditioned(t, actions)
    if t.diffusion is not None:  # IRASim: Gaussian mask diffusion, its sigma bins the step's fraction of 1000
        losses, sigma = irasim_loss(t, x0, actions, g, coins)
    else:
        fn = lambda x, sig: t.model(x.to(t.dtype), sig, text, t.frame_mask, actions=actions, image_features=feats)
        # eq. 3: the rectified-flow loss (model.flow_loss)
        losses, sigma = M.flow_loss(fn, x0, t.frame_mask, shift=t.cfg.shift, generator=g)
    (losses.mean() / t.accum).backward()
    losses = losses.detach()
    bins = (sigma * SIGMA_BINS).long().clamp(max=SIGMA_BINS - 1)
    return StepStats(loss=losses.sum().float(),
                     bin_loss=torch.zeros(SIGMA_BINS, device=t.device).index_add_(0, bins, losses.float()),
                     bin_count=torch.bincount(bins, minlength=SIGMA_BINS).float(),
                     stop=torch.zeros((), device=t.device))


def train_step(t, step, next_inputs):
    """One optimizer step: accumulate `accum` micro-batches (next_inputs() gives each one's model inputs),
    reduce the statistics, clip, then update unless the loss or the gradient norm is not finite.
    -> StepResult."""
    cfg = t.cfg
    for g in t.optimizer.param_groups:
        g["lr"] = lr_at(step, cfg)
    stats = StepStats.zeros(t.device)
    for a in range(t.accum):
        t.model.set_requires_gradient_sync(a == t.accum - 1)
        stats = stats + micro_step(t, next_inputs(), step, a * t.world + t.rank)
    stats.stop = torch.tensor(float(STOP["signal"] is not None), device=t.device)
    stats = stats.all_reduce()
    loss = (stats.loss / cfg.batch_size).item()
    norm = torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.requires_grad],
                                          cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    ok = math.isfinite(loss) and math.isfinite(norm)
    if ok:
        t.optimizer.step()
        ema_update(t.ema, t.model, step, cfg.ema)
    t.optimizer.zero_grad(set_to_none=True)
    return StepResult(ok, loss, norm, stats)


def log_metrics(t, run, history, step, window, *, seconds):
    """One metrics line for the StepResults of `window`, taken in `seconds`; rank 0 appends it to metrics.jsonl
    and redraws the loss curve."""
    total = sum((r.stats for r in window), StepStats.zeros(t.device))
    bins = [round((total.bin_loss[i] / n).item(), 6) if n else None for i, n in enumerate(total.bin_count)]
    step_time = seconds / len(window)
    line = {"step": step, "loss": float(np.mean([r.loss for r in window])), "loss_per_sigma_bin": bins,
            "losses": [r.loss for r in window], "grad_norm": window[-1].norm, "lr": lr_at(step - 1, t.cfg),
            "step_time": step_time, "tokens_per_s": t.tokens_per_step / step_time,
            "skipped": sum(not r.ok for r in window)}
    if t.device.type == "cuda":  # this rank's peak since the last line: what the next bigger batch must fit beside
        line["peak_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
        torch.cuda.reset_peak_memory_stats(t.device)
    history.append(line)
    if t.rank == 0:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        losses = [v for h in history for v in h["losses"]]
        plot_losses(run / "loss.png", list(range(step - len(losses) + 1, step + 1)), losses)


def checkpoint(t, run, step, stream):
    """Everything an exact resume needs: weights, optimizer, EMA (DCP), the data position and the RNG."""
    parent = t.written[-1] if t.written else t.resumed_from  # the lineage: which checkpoint this one continues
    meta = {"step": step, "data": stream.state(), "rng": torch.get_rng_state().tolist(),
            "train_config": asdict(t.cfg), "model_config": asdict(t.mcfg), "world_size": t.world,
            "parent": Path(parent).name if parent else None}
    return save_checkpoint(run, step, model=t.model, optimizer=t.optimizer, ema=t.ema, meta=meta, rank=t.rank,
                           keep=t.cfg.keep, written=t.written)


def finish(t, run, step, clip, history):
    """The final preview, the export of the EMA weights, and a summary of where everything is."""
    preview(t, run / "preview.png", clip)
    out = export(run / "model.safetensors", model=t.model, ema=t.ema, cfg=t.cfg, mcfg=t.mcfg,
                 stats_path=t.stats_path, step=step, rank=t.rank, dtype=hub.DTYPES[t.cfg.export_dtype])
    where = {"run directory": run, "exported model": out, "metrics": run / "metrics.jsonl",
             "loss curve": run / "loss.png", "preview": run / "preview.png", "checkpoints": run / "checkpoints",
             "data": Path(t.cfg.data), "statistics": t.stats_path}
    t.log(f"done: {step} steps, final loss {history[-1]['loss']:.4f}"
          + "".join(f"\n  {k:15s}{v}" for k, v in where.items()))


# -----------------------------------------------------------------------------
# the training loop


def train(cfg, args):
    """Build, then run the loop; the run's lock is released however the loop ends. -> the run directory."""
    check_output(cfg.out)
    _, _, device = setup_distributed(args.device)
    t = build(cfg, device)
    try:
        return loop(t, args)
    finally:
        if t.stream is not None:
            t.stream.close()
        unlock_run(t)


def loop(t, args):
    cfg = t.cfg  # --epochs turned into --steps
    describe(t)
    if cfg.epochs:
        t.log(f"{cfg.epochs:g} epochs: {cfg.steps} steps of {cfg.batch_size} clips")
    run, stream, step, history = open_run(t, args.resume)
    catch_signals()
    clip = preview_clip(cfg)
    next_inputs = lambda: encode_batch(stream.next(), t.tokenizer, *t.context, t.device)
    bar = tqdm(total=cfg.steps, initial=step, disable=t.rank != 0, desc="train", dynamic_ncols=True)
    say = bar.write if t.rank == 0 else t.log  # prints above the bar
    bad, window, t_window, first_step = 0, [], time.perf_counter(), step
    while step < cfg.steps:
        t0 = time.perf_counter()
        r = train_step(t, step, next_inputs)
        step += 1
        bar.set_postfix(loss=f"{r.loss:.4f}", clips_s=f"{cfg.batch_size / (time.perf_counter() - t0):.1f}")
        bar.update()
        window.append(r)
        bad = 0 if r.ok else bad + 1
        if not r.ok:
            say(f"step {step}: non-finite loss {r.loss} or gradient norm {r.norm}; update skipped")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_metrics(t, run, history, step, window, seconds=time.perf_counter() - t_window)
            window, t_window = [], time.perf_counter()
        if bad >= 5:
            raise FloatingPointError(f"{bad} non-finite steps in a row at step {step}: lower --lr or check the "
                                     f"data; the last checkpoint in {run}/checkpoints is intact")
        if cfg.preview_every and step % cfg.preview_every == 0 and step < cfg.steps:
            preview(t, run / f"preview_{step:07d}.png", clip)
        if cfg.export_every and step % cfg.export_every == 0 and step < cfg.steps:
            if t.rank == 0:
                (run / "exports").mkdir(exist_ok=True)
            export(run / "exports" / f"step_{step:07d}.safetensors", model=t.model, ema=t.ema, cfg=cfg, mcfg=t.mcfg,
                   stats_path=t.stats_path, step=step, rank=t.rank, dtype=hub.DTYPES[cfg.export_dtype])
        signalled = r.stats.stop.item() > 0
        stop = signalled or (args.exit_after and step - first_step >= args.exit_after)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
            t0 = time.perf_counter()
            path = checkpoint(t, run, step, stream)
            say(f"checkpoint {path} (saved in {time.perf_counter() - t0:.1f} s)")
        if stop:
            bar.close()
            why = f"signal {STOP['signal']}" if signalled else f"--exit-after {args.exit_after}"
            t.log(f"stopped at step {step} ({why}); continue with: python train.py --resume {run}")
            return run
    bar.close()
    finish(t, run, step, clip, history)
    return run


STOP = {"signal": None}


def catch_signals():
    STOP["signal"] = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def on_signal(signum, frame):
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT interrupts at once."""
    if STOP["signal"] is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["signal"] = signal.Signals(signum).name


def main(argv=None):
    """-> the run directory. Errors propagate: `python train.py` ends through `hub.run_main`, which turns them
    into one line and kills the loader workers (they ignore SIGTERM), so that no error path hangs."""
    cfg, args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(cfg, args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    hub.run_main(lambda argv: main(argv) and 0)  # the run directory is for Python callers; the shell gets 0
