"""
Every benchmark and every comparison with diffusers, out of the tutorial files: `python bench.py WHAT -h`.

    python bench.py dit --preset cosmos2b --device cuda --dtype bf16 --compare-diffusers   # the DiT alone
    python bench.py vae --device cuda --dtype bf16 --frames 13 61                         # Wan2.1 VAE
    python bench.py dino --device cuda --dtype bf16 --batch 32                            # DINOv3 ViT-L/16
    python bench.py decode                                                                # EgoDex-like clips
    python bench.py train --preset paper --peak-tflops 989                                # a training step
    python bench.py sample --device cuda --dtype bf16 --compare-diffusers                 # a rollout chunk
    python bench.py costs                                                                 # the paper's Table 6
    python bench.py gpu                                  # all of the above that matter at the paper's shapes
    python bench.py eval                                                                  # metrics, per clip

Speed and memory are measured here, never asserted in tests. Times are per call after untimed warmup, with
CUDA synchronized around the timed region; peak memory is torch's allocator peak on CUDA (on the CPU, the
process's peak resident set where the system can reset it). Random weights time the same as real ones,
so nothing is downloaded unless asked.
"""

import argparse
import copy
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import conditioning as C
import data
import evaluate as E
import hub
import model as M
import sample as S
import semantic as sem
import synthetic
import tokenizer as tok
import train


# -----------------------------------------------------------------------------
# dit: forward and forward+backward of the DiT, against diffusers' CosmosTransformer3DModel


def diffusers_dit(c, state_dict, device="cpu", dtype=None):
    """diffusers' CosmosTransformer3DModel configured like c (no padding-mask channel: diffusers resizes that
    mask with torchvision) holding our weights, for the benchmarks' comparisons. Needs diffusers."""
    from diffusers import CosmosTransformer3DModel
    if c.concat_padding_mask:
        raise ValueError("build the config with concat_padding_mask=False to compare with diffusers")
    with torch.device(device):
        ref = CosmosTransformer3DModel(
            in_channels=c.in_channels + 1, out_channels=c.out_channels, num_attention_heads=c.n_heads,
            attention_head_dim=c.dim // c.n_heads, num_layers=c.n_blocks, mlp_ratio=c.mlp_ratio,
            text_embed_dim=c.context_dim, adaln_lora_dim=c.adaln_lora_dim, max_size=c.max_size,
            patch_size=(c.patch_temporal, c.patch_spatial, c.patch_spatial), rope_scale=c.rope_ratios,
            concat_padding_mask=False, extra_pos_embed_type=None, use_crossattn_projection=True,
            crossattn_proj_in_channels=c.text_dim, encoder_hidden_states_channels=c.context_dim).to(dtype)
    ref.load_state_dict(M.state_dict_as(state_dict, "diffusers", c.n_blocks))
    for m in ref.modules():  # the official q/k RMSNorm eps (diffusers uses 1e-5)
        if getattr(m, "norm_q", None) is not None:
            m.norm_q.eps = m.norm_k.eps = 1e-6
    return ref


def low_precision_errors(model, x, sigma, text):
    """Relative L2 errors of a low-precision DiT against the same weights run in fp64 (inputs of the same
    values): its output, and what the first block's AdaLN receives: emb, the AdaLN-LoRA term, and its
    self-attention shift/scale/gate before their cast to the activation dtype."""
    def run(m, *inputs):
        seen = {}
        hooks = [m.blocks[0].register_forward_pre_hook(lambda _, a: seen.update(emb=a[1], lora=a[2])),
                 m.blocks[0].mod_self_attn.register_forward_hook(lambda _, a, out: seen.update(mod=out))]
        with torch.no_grad():
            out = m(*inputs)
        for h in hooks:
            h.remove()
        return {"output": out, "emb": seen["emb"], "AdaLN-LoRA term": seen["lora"],
                "block-0 shift/scale/gate": seen["mod"].double() + seen["lora"].double()}

    ours = run(model, x, sigma, text)
    exact = run(copy.deepcopy(model).double(), x.double(), sigma.double(), text.double())
    return {k: ((ours[k].double() - exact[k]).norm() / exact[k].norm()).item() for k in ours}


def bench_dit(args):
    device = torch.device(args.device)
    dtype = hub.DTYPES[args.dtype]
    # no padding-mask channel, so that diffusers' model (which resizes that mask with torchvision) runs the
    # same computation without torchvision; it changes the patch embedding's width by 1/18 only
    config = M.config_from_preset(args.preset, concat_padding_mask=not args.compare_diffusers)
    torch.manual_seed(0)
    with torch.device(device):
        model = M.DiT(config)
        for p in model.parameters():  # random everywhere: the zero-initialized layers would make outputs 0
            nn.init.normal_(p, std=0.02)
        model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    T, H, W, B = args.frames, args.height, args.width, args.batch
    x = torch.randn(B, config.in_channels, T, H, W, device=device, dtype=dtype)
    sigma = torch.rand(B, device=device)
    text = torch.randn(B, args.text_tokens, config.text_dim, device=device, dtype=dtype)
    tokens = B * T * H * W // (config.patch_spatial**2 * config.patch_temporal)
    print(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters, {tokens} tokens per forward, "
          f"{args.dtype} on {device}")

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return (time.perf_counter() - t0) / args.iters, peak

    def report(name, fwd, fwd_bwd):
        (t_f, _), (t_fb, peak) = timed(fwd), timed(fwd_bwd)
        print(f"{name}: forward {t_f * 1e3:.1f} ms ({tokens / t_f:,.0f} tokens/s), forward+backward "
              f"{t_fb * 1e3:.1f} ms ({tokens / t_fb:,.0f} tokens/s), peak memory {peak:.2f} GiB")
        return t_fb

    if dtype != torch.float32:
        errors = low_precision_errors(model, x, sigma, text)
        print(f"{args.dtype} against the same weights in fp64, relative L2 error: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    ours = lambda: model(x, sigma, text)
    t_ours = report("ours", torch.no_grad()(ours), lambda: ours().float().square().mean().backward())
    if args.compare_diffusers:
        ref = diffusers_dit(config, model.state_dict(), device, dtype)
        cond = torch.zeros_like(x[:, :1])
        theirs = lambda: ref(x, sigma.to(dtype), text, condition_mask=cond, return_dict=False)[0]
        with torch.no_grad():
            a, b = ours().float(), theirs().float()
            exact = b
            if dtype != torch.float32:  # judge both low-precision outputs against an fp32 run of the same weights
                exact = ref.float()(x.float(), sigma, text.float(), condition_mask=cond.float(), return_dict=False)[0]
                ref.to(dtype)
        err = lambda y: f"{((y - exact).norm() / exact.norm()).item():.2e}"
        diff = (a - b).abs().max().item()
        print(f"outputs, relative L2 error against fp32: ours {err(a)}, diffusers {err(b)}; max |ours - diffusers| "
              f"{diff:.2e} (outputs up to {b.abs().max().item():.2e})")
        t_ref = report("diffusers", torch.no_grad()(theirs), lambda: theirs().float().square().mean().backward())
        print(f"forward+backward time, ours / diffusers = {t_ours / t_ref:.2f}")
        return {"ratio": t_ours / t_ref, "max_abs_diff": diff, "max_abs": b.abs().max().item()}

# -----------------------------------------------------------------------------
# vae: encode and decode frames/s of the video tokenizer


def _memory(device, reset=False):  # (bytes in use, peak bytes since the last reset)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    if not os.path.exists("/proc/self/clear_refs"):
        return 0, 0  # no resettable peak counter on this system: memory reads as 0
    if reset:  # Linux: writing 5 resets the peak resident set size of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def _measure(fn, device):  # (output, seconds, peak bytes, working bytes = peak - before - output)
    before, _ = _memory(device, reset=True)
    t0 = time.perf_counter()
    out = fn()
    _, peak = _memory(device)
    return out, time.perf_counter() - t0, peak, peak - before - out.numel() * out.element_size()




def bench_vae(args):
    """Encode and decode frames/s of the video tokenizer, with peak and working memory."""
    device, dtype = torch.device(args.device), hub.DTYPES[args.dtype]
    if args.tokenizer == "pixel":
        vae = tok.build_tokenizer("pixel")
    else:
        vae = tok.build_tokenizer("wan2.1", config=args.config, weights=args.weights,
                                  tile_size=args.tile_size, tile_overlap=args.tile_overlap)
    vae = vae.to(device, dtype).eval()
    what = "weightless" if args.tokenizer == "pixel" else f"{args.config}, {args.weights or 'random'} weights"
    print(f"{args.tokenizer} ({what}, {sum(t.numel() for t in vae.parameters()) / 1e6:.1f}M parameters), "
          f"{device} {args.dtype}, {args.batch}x{args.height}x{args.width}, "
          f"{torch.get_num_threads()} threads")

    def video(T):
        return (torch.rand(args.batch, 3, T, args.height, args.width, device=device) * 2 - 1).to(dtype)

    for _ in range(args.warmup):
        vae.decode(vae.encode(video(5)))
    rates = {}
    for T in args.frames:
        x, mib = video(T), 2**20
        z, enc_s, enc_peak, enc_work = _measure(lambda: vae.encode(x), device)
        _, dec_s, dec_peak, dec_work = _measure(lambda: vae.decode(z), device)
        print(f"T={T:3d} ({z.shape[2]} latent frames) | encode {args.batch * T / enc_s:7.2f} frames/s, peak "
              f"{enc_peak / mib:6.0f} MiB, working {enc_work / mib:5.0f} MiB | decode "
              f"{args.batch * T / dec_s:7.2f} frames/s, peak {dec_peak / mib:6.0f} MiB, working "
              f"{dec_work / mib:5.0f} MiB")
        rates[T] = {"encode_frames_per_s": args.batch * T / enc_s, "decode_frames_per_s": args.batch * T / dec_s,
                    "encode_peak_gib": enc_peak / 2**30, "decode_peak_gib": dec_peak / 2**30}
    return rates

# -----------------------------------------------------------------------------
# eval: the evaluation's cost per clip, metric by metric


def metric_networks(metrics, device, detector="markers"):
    """Random-weight stand-ins where the architecture is ours (LPIPS, the cookbook I3D: they time the same as the
    real weights), the real files where the network is someone else's (FID's Inception, StyleGAN-V's I3D,
    DreamSim), offline -> ({metric: Evaluator keyword arguments}, {metric: why it was skipped})."""
    nets, skipped = {}, {}
    for m in metrics:
        try:
            if m == "lpips":
                nets[m] = {"lpips": E.LPIPS().to(device).eval()}
            elif m == "fvd":
                nets[m] = {"i3d": E.InceptionI3d().to(device).eval()}
            elif m == "pck":
                nets[m] = {"detector": E.load_detector(detector, device)}
            else:
                kw = E.load_networks((m,), {}, device=device, offline=True)
                nets[m] = {k: v for k, v in kw.items() if v is not None}
        except (E.WeightsError, ImportError) as e:
            skipped[m] = " ".join(str(e).split())[:160]
    return nets, skipped


def bench_eval(args):
    """Seconds per clip of each metric of evaluate.Evaluator on random clips (1 given + predicted frames), the
    set-level ones (FID, FVD) counting their feature extraction; PCK's detector on both videos."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 256, (args.clips, 3, args.frames, args.height, args.width), dtype=torch.uint8, generator=g)
    noise = torch.randint(-20, 21, gt.shape, generator=g)
    pred = (gt.int() + noise).clamp(0, 255).byte()
    kp = torch.rand(args.clips, args.frames, 12, 2, generator=g) * torch.tensor([args.width, args.height])
    valid = torch.ones(args.clips, args.frames, 12, dtype=torch.bool)
    nets, skipped = metric_networks(args.metrics, device, args.detector)
    print(f"{args.clips} clips of {args.frames} frames at {args.height}x{args.width}, {device}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    for m, kw in nets.items():
        ev = E.Evaluator((m,), device=device, **kw)
        for _ in range(args.warmup):
            ev.add(pred[:1], gt[:1], keypoints=kp[:1], keypoint_valid=valid[:1])
        ev.clips, ev.features = [], {f: ([], []) for f in E.FRECHET}
        t0 = time.perf_counter()
        ev.add(pred, gt, keypoints=kp, keypoint_valid=valid)
        if m in E.FRECHET and args.clips > 1:  # the Frechet distance itself (it needs 2 clips)
            ev.report()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[m] = (time.perf_counter() - t0) / args.clips
        print(f"{m:>13}: {results[m]:8.3f} s/clip")
    for m, why in skipped.items():
        print(f"{m:>13}: skipped ({why})")
    return {"seconds_per_clip": results, "skipped": skipped}


# -----------------------------------------------------------------------------
# dino: DINOv3 images/s


def bench_dino(args):
    """DINOv3 images/s and peak memory (random weights time the same as the real ones)."""
    dtype, cuda = hub.DTYPES[args.dtype], args.device == "cuda"
    if args.weights:
        model, what = sem.load_dino(args.weights, args.preset, device=args.device, dtype=dtype), args.weights
    else:
        model, what = sem.DinoV3(sem.DINO_PRESETS[args.preset]).to(args.device, dtype), "RANDOM weights (speed only)"
    print(f"DINOv3 {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {what}, "
          f"{args.device} {args.dtype}, batch {args.batch} x {args.height}x{args.width} "
          f"-> {(args.height // 16) * (args.width // 16)} patch tokens per image")
    frames = torch.rand(args.batch, 3, args.height, args.width, device=args.device) * 2 - 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        model(frames)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        feats = model(frames)
    sync()
    dt = time.perf_counter() - t0
    peak = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else
            f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"features {tuple(feats.shape)}: {args.batch * args.iters / dt:.2f} images/s "
          f"({dt / args.iters * 1000:.0f} ms per batch), {peak}")
    return {"images_per_s": args.batch * args.iters / dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}

# -----------------------------------------------------------------------------
# decode: clips/s per data-loader worker from 1920x1080 H.264 (13-frame clips at 288x512)


def bench_decode(args):
    """Time data.ClipDataset on one 1920x1080 episode: HDF5 poses + an H.264 video of a slowly panning
    textured scene with sensor noise, at about EgoDex's average bitrate (2 TB / 829 h = 5.4 Mbit/s)."""
    clips, frames, gop, size, batch, step_time = args.clips, args.frames, args.gop, data.DEFAULT_SIZE, args.batch, \
        args.step_time
    work = Path(tempfile.mkdtemp(prefix="dexac-bench-"))
    try:
        rng = np.random.default_rng(0)
        t0 = time.time()
        texture = np.asarray(Image.fromarray(rng.integers(0, 255, (270, 480, 3), np.uint8)).resize(
            (2200, 1240), Image.BICUBIC)).astype(np.int16)
        video = (np.clip(texture[4 + i // 2:1084 + i // 2, 3 * i % 280:1920 + 3 * i % 280]
                         + rng.integers(-6, 7, (1080, 1920, 1), np.int16), 0, 255).astype(np.uint8)
                 for i in range(frames))
        d = work / "part1" / "bench"
        d.mkdir(parents=True)
        data.write_video(d / "0.mp4", video, crf=23, gop=gop)
        synthetic.write_egodex_hdf5(d / "0.hdf5", synthetic.synth_track(rng, frames)[0], data.EGODEX_K, {})
        mbit = (d / "0.mp4").stat().st_size * 8 / 1e6 / (frames / 30)
        print(f"made a 1920x1080 H.264 video ({frames} frames, keyframe every {gop}, {mbit:.1f} Mbit/s) "
              f"in {time.time() - t0:.1f} s")
        ds = data.ClipDataset(data.load_index(work)[0], 13, size)
        ds[(0, 0)]  # warm up
        t0 = time.time()
        for s in rng.integers(0, frames - 13, clips):
            ds[(0, s)]
        rate = clips / (time.time() - t0)
    finally:
        shutil.rmtree(work)
    need = batch / step_time
    print(f"one worker (1 decode thread): {rate:.2f} clips/s of 13 frames at {size[0]}x{size[1]}")
    print(f"batch {batch} per GPU at {step_time:.2f} s/step needs {need:.1f} clips/s "
          f"-> {math.ceil(need / rate)} workers per GPU")
    return rate

# -----------------------------------------------------------------------------
# sample: one rollout chunk (encode, 12 actions x N denoising steps, decode), against diffusers' pipeline


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
    import diffusers  # a test dependency: the independent implementation we compare with
    net = diffusers_dit(c, dit_sd, device, dtype)
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


def bench_sample(args):
    """Seconds per chunk (one frame + 12 actions -> 13 frames) of S.WorldModel.rollout on random weights, split
    into VAE encode, denoising and VAE decode. With --compare-diffusers, the same for diffusers'
    Cosmos-Predict2.5 pipeline (Video2World from the same frame) with the same weights, shapes and steps."""
    device, dtype = torch.device(args.device), hub.DTYPES[args.dtype]
    B, K, H, W = args.batch, 12, args.height or 288, args.width or 512
    if args.compare_diffusers and (args.tokenizer != "wan2.1" or B != 1):
        raise SystemExit("error: --compare-diffusers needs --tokenizer wan2.1 (diffusers' pipeline holds the "
                         "Wan2.1 VAE) and --batch 1 (its Video2World mode takes one video per call)")
    if args.compare_diffusers and 0 < args.guidance <= 1:
        raise SystemExit("error: diffusers applies guidance only above 1 (then with our formula, v_c + "
                         "g (v_c - v_u)): choose --guidance 0 or > 1 to time the same work on both sides")
    # no padding-mask channel when comparing: diffusers resizes it with torchvision (as in bench_dit)
    channels = tok.PixelTokenizer().latent_channels if args.tokenizer == "pixel" else 16
    semantic, dino = getattr(args, "semantic", False), None  # the DINOv3 branch: ViT-L/16, tiny for tiny
    if semantic:
        dino = sem.DinoV3(sem.DINO_PRESETS["tiny" if args.preset == "tiny" else "vitl16"])
    config = M.config_from_preset(
        args.preset, action_mode=args.action_mode, action_steps=K, actions_per_frame=tok.TEMPORAL,
        in_channels=channels, out_channels=channels, concat_padding_mask=not args.compare_diffusers,
        semantic_dim=dino.cfg.dim if semantic else 0)
    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        dit = M.DiT(config)
        for p in dit.parameters():  # random everywhere: zero-initialized layers would make outputs trivial
            p.normal_(std=0.02)
    if dit.action_cond is not None:
        dit.action_cond.set_stats(torch.zeros(C.ACTION_DIM), torch.ones(C.ACTION_DIM))
    info = {"tokenizer": {"name": args.tokenizer, "weights": "", "pixel_compression": 8},
            "text": {"mode": "none", "tokens": sem.TEXT_TOKENS},
            "train_config": {"height": H, "width": W, "text_cache": ""}}
    wm = S.WorldModel.from_model(dit, info, device=device, dtype=dtype, dino=dino,
                                 compile=getattr(args, "compile", False))
    frame = np.random.default_rng(0).integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    actions = np.broadcast_to(C.still_actions(K), (B, K, C.ACTION_DIM))
    count = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
    extra = f" ({count(dit.action_cond)} {args.action_mode})" if dit.action_cond is not None else ""
    extra += f", DINOv3 {count(dino)}" if semantic else ""
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
    ours = lambda: wm.rollout(frame, actions, [""] * B, list(range(B)), steps=args.steps, solver=args.sampler,
                              guidance=args.guidance, progress=False)
    if dit.action_cond is not None:
        report(f"ours ({args.action_mode})", ours)
    if args.compare_diffusers or dit.action_cond is None:
        dit.action_cond, wm.dino = None, None  # the backbone alone: what diffusers' pipeline runs
        report("ours (backbone)", ours)
    if not args.compare_diffusers:
        return results

    # the same random inputs through our backbone and VAE encoder now, through diffusers' below: same outputs
    g = torch.Generator().manual_seed(0)
    x, sigma, text = (torch.randn(1, channels, 2, 4, 4, generator=g), torch.rand(1, generator=g),
                      torch.randn(1, 4, config.text_dim, generator=g))
    image = torch.from_numpy(frame[:1]).permute(0, 3, 1, 2)[:, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
    with torch.no_grad():
        probe = {"dit": dit(x.to(device, dtype), sigma.to(device), text.to(device, dtype)).float().cpu(),
                 "vae encode": wm.tokenizer.encode(image.to(device, dtype)).float().cpu()}
    # CPU copies, so that our models are freed (gc: the wrapped methods hold the tokenizer in a cycle)
    dit_sd = {k: v.cpu() for k, v in dit.state_dict().items()}
    vae_sd = {k: v.cpu() for k, v in wm.tokenizer.state_dict().items()}
    wm = dit = ours = None  # freed (a del would leave the lambdas above naming unbound names)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe = diffusers_pipeline(dit_sd, vae_sd, config, device, dtype)
    with torch.no_grad():
        theirs = {"dit": pipe.transformer(x.to(device, dtype), sigma.to(device, dtype), text.to(device, dtype),
                                          condition_mask=torch.zeros_like(x[:, :1]).to(device, dtype),
                                          return_dict=False)[0],
                  "vae encode": (pipe.vae.encode(image.to(device, pipe.vae.dtype)).latent_dist.mode()
                                 - pipe.latents_mean.to(device)) * pipe.latents_std.to(device)}
    results["max_abs_diff"] = {k: (probe[k] - theirs[k].float().cpu()).abs().max().item() for k in probe}
    print("the same inputs, max |ours - diffusers|: " + ", ".join(
        f"{k} {v:.2e} (outputs up to {probe[k].abs().max().item():.2e})" for k, v in results["max_abs_diff"].items()))
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

# -----------------------------------------------------------------------------
# train: train.py's optimizer step on random latents: time, tokens/s, MFU, peak memory


def add_train_args(p):
    """train.py's --preset and config flags, and what the timing needs."""
    train.add_config_flags(p)
    p.set_defaults(resume="")  # config_from_flags asks; a benchmark never resumes
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bench-steps", type=int, default=5, help="timed steps (after 2 warmup)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s per device for MFU "
                   "(H100 SXM bf16: 989)")


def random_inputs(t):
    """The DiT's inputs of one micro-batch at the run's shapes: tokenizer, text and DINOv3 are not timed."""
    cfg, mcfg, device = t.cfg, t.mcfg, t.device
    g = torch.Generator(device).manual_seed(0)
    text = torch.zeros(cfg.micro_batch, cfg.text_tokens, mcfg.text_dim, device=device, dtype=t.dtype)
    feats = torch.randn(cfg.micro_batch, t.n_patches, mcfg.semantic_dim, device=device) if mcfg.semantic_dim \
        else None
    return (torch.randn(t.latent, device=device, generator=g), text,
            torch.randn(cfg.micro_batch, cfg.frames - 1, mcfg.action_dim, device=device), feats)


def bench_train(argv):
    """train.py's optimizer step (`train.train_step`, accumulation, all_reduce, clip, AdamW, EMA) on random
    latents and random weights: time, tokens/s, clips/s, MFU, peak memory. Plain python or torchrun."""
    p = argparse.ArgumentParser(prog="bench.py train", description=bench_train.__doc__)
    add_train_args(p)
    args = p.parse_args(argv)
    cfg = train.config_from_flags(args)
    _, world, device = train.setup_distributed(args.device)
    try:
        t = train.build(cfg, device, load=False)  # no data, no download: random weights time as pretrained ones
        train.describe(t)
        cfg = t.cfg
        flops = train.flops_per_clip(t.mcfg, t.latent, cfg.text_tokens, t.n_patches) * cfg.batch_size
        for step in range(2):
            train.train_step(t, step, lambda: random_inputs(t))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for step in range(args.bench_steps):
            train.train_step(t, 2 + step, lambda: random_inputs(t))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.bench_steps
        mfu = flops / world / dt / (args.peak_tflops * 1e12)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a on the CPU"
        t.log(f"benchmark: {dt * 1e3:.0f} ms/step, {t.tokens_per_step / dt:,.0f} tokens/s, "
              f"{cfg.batch_size / dt:.2f} clips/s, MFU {100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s per device, "
              f"peak memory {peak} (micro-batch {cfg.micro_batch}, activation checkpointing {cfg.ac})")
        return dt
    except train.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# gpu: every speed figure of the paper's shapes in one run (training grid, rollout chunks against diffusers,
# VAE, DINOv3), on random weights: one JSON and one table


# dense bf16 peak TFLOP/s from the vendors' data sheets, matched in order against torch's device name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H20", 148),
                    ("A100", 312), ("L40S", 362), ("L4", 121))


def peak_tflops(device):
    """This GPU's dense bf16 peak, or None (the CPU, an unknown GPU: MFU is then not given)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def hardware_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_point(cfg, device, steps, peak):
    """One training configuration: the first step (the compile's, when compiling), then `steps` timed steps
    after one more warmup. -> its figures; {"oom": True} when it does not fit."""
    try:
        t = train.build(cfg, device, load=False)
        flops = train.flops_per_clip(t.mcfg, t.latent, cfg.text_tokens, t.n_patches) * cfg.batch_size
        inputs = lambda: random_inputs(t)
        _memory(device, reset=True)
        t0 = time.perf_counter()
        train.train_step(t, 0, inputs)
        _memory(device)  # synchronizes
        first = time.perf_counter() - t0
        train.train_step(t, 1, inputs)
        _memory(device, reset=True)
        t0 = time.perf_counter()
        for step in range(steps):
            train.train_step(t, 2 + step, inputs)
        _, peak_bytes = _memory(device)
        dt = (time.perf_counter() - t0) / steps
        return {"trainable_m": sum(p.numel() for p in t.model.parameters() if p.requires_grad) / 1e6,
                "first_step_s": first, "ms_per_step": dt * 1e3, "tokens_per_s": t.tokens_per_step / dt,
                "clips_per_s": cfg.batch_size / dt, "tflop_per_step": flops / 1e12,
                "mfu": flops / dt / (peak * 1e12) if peak else None, "peak_gib": peak_bytes / 2**30}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        t = None
        free(device)


ADAPTATIONS = {  # name -> the train.py settings that make it
    "full": {"trainable": "all"}, "new only": {"trainable": "new"},
    "LoRA r16": {"trainable": "lora+new", "lora_rank": 16, "lora_alpha": 16.0},
    "LoRA r64": {"trainable": "lora+new", "lora_rank": 64, "lora_alpha": 64.0}}


def bench_adapt(args):
    """Fine-tuning a pretrained backbone at the paper's shapes three ways (random weights, train.py's step with
    activation checkpointing): every parameter, the new modules only, LoRA adapters (rank 16 / 64) with the new
    modules. Per way: trainable parameters, step time and peak memory at batch 1 (the process' peak RSS on the
    CPU), and on a GPU the largest per-GPU batch that fits each of --caps GiB (the allocator capped with
    torch.cuda.set_per_process_memory_fraction). Writes --out (JSON) and prints a Markdown table."""
    device = torch.device(args.device)
    H, W = args.height or (64 if args.preset == "tiny" else 288), args.width or (112 if args.preset == "tiny" else 512)
    peak = peak_tflops(device)
    report = {"device": hardware_name(device), "torch": torch.__version__, "preset": args.preset,
              "blocks": args.blocks or None, "size": [H, W], "frames": 13, "ac": args.ac, "rows": []}
    train.setup_distributed(args.device)
    base = replace(train.PRESETS["paper"], model=args.preset, blocks=args.blocks, height=H, width=W, ac=args.ac,
                   micro_batch=1, batch_size=1)
    try:
        for name in args.ways:
            cfg = replace(base, **ADAPTATIONS[name])
            row = {"way": name, **train_point(cfg, device, args.steps, peak)}
            if device.type == "cuda":
                total = torch.cuda.get_device_properties(device).total_memory
                for cap in args.caps:
                    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)
                    fits = 0
                    for b in args.batches:
                        if train_point(replace(cfg, micro_batch=b, batch_size=b), device, 1, peak).get("oom"):
                            break
                        fits = b
                    row[f"max_batch_{cap:g}gib"] = fits
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            report["rows"].append(row)
            print(f"{name}: {row}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    caps = [f"max_batch_{c:g}gib" for c in args.caps] if device.type == "cuda" else []
    depth = f" with {args.blocks} blocks" if args.blocks else ""
    lines = [f"{report['device']}, {args.preset}{depth} at {H}x{W}, 13 frames, batch 1, activation checkpointing "
             f"{args.ac}",
             "", "| way | trainable (M) | ms/step | peak memory (GiB) |" +
             "".join(f" largest batch in {c.split('_')[-1]} |" for c in caps),
             "|---|---|---|---|" + "---|" * len(caps)]
    for r in report["rows"]:
        cells = ["out of memory"] * 2 if r.get("oom") else [f"{r['ms_per_step']:.0f}", f"{r['peak_gib']:.2f}"]
        lines.append(f"| {r['way']} | {r.get('trainable_m', 0):.2f} | {cells[0]} | {cells[1]} |" +
                     "".join(f" {r.get(c, '-')} |" for c in caps))
    print("\n".join(lines))
    if args.out:
        hub.atomic_write(args.out, json.dumps(report, indent=1))
    return report


def bench_gpu(args):
    """Every figure of the speed targets in one run, under a time budget: training (per-GPU batch 1, 2, 4, 8
    until out of memory; activation checkpointing and compile on/off: step time, tokens/s, MFU, peak memory),
    rollout chunks (eager and compiled, guidance 0 and 7, ours against diffusers' Cosmos-Predict2.5 pipeline on
    the same weights), the Wan2.1 VAE's frames/s and DINOv3's images/s. Writes --out (JSON), prints a table."""
    device = torch.device(args.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    H, W = args.height or (64 if args.preset == "tiny" else 288), args.width or (112 if args.preset == "tiny" else 512)
    peak = args.peak_tflops or peak_tflops(device)
    start, report = time.perf_counter(), {
        "device": hardware_name(device), "torch": torch.__version__, "preset": args.preset, "dtype": dtype,
        "size": [H, W], "frames": 13, "peak_tflops": peak, "train": [], "sample": [], "skipped": []}
    over = lambda: time.perf_counter() - start > args.budget

    def attempt(what, fn):
        if over():
            report["skipped"].append(f"{what}: over the {args.budget:g} s budget")
            return None
        try:
            return fn()
        except ImportError as e:  # diffusers, on a machine without it: the rest still runs
            report["skipped"].append(f"{what}: {e}")
            return None

    vae = attempt("vae", lambda: bench_vae(argparse.Namespace(
        tokenizer="wan2.1", config="full", weights=None, device=args.device, dtype=dtype, frames=[13], height=H,
        width=W, batch=1, tile_size=0, tile_overlap=64, warmup=args.warmup)))
    report["vae"] = vae and vae[13]
    free(device)
    report["dino"] = attempt("dino", lambda: bench_dino(argparse.Namespace(
        preset="tiny" if args.preset == "tiny" else "vitl16", weights=None, device=device.type, dtype=dtype,
        height=H, width=W, batch=args.dino_batch, iters=args.iters, warmup=args.warmup)))
    # the backbone's forward+backward against diffusers' on the same weights (a training step's DiT part)
    dit = attempt("dit", lambda: bench_dit(argparse.Namespace(
        preset=args.preset, device=args.device, dtype=dtype, batch=1, frames=4, height=H // 8, width=W // 8,
        text_tokens=512, warmup=args.warmup, iters=args.iters, compare_diffusers=True)))
    report["dit_vs_diffusers"] = dit
    free(device)
    train.setup_distributed(args.device)  # a one-rank group: FSDP2 as train.py runs it
    base = replace(train.PRESETS["paper"], model=args.preset, height=H, width=W)
    try:
        for compile in args.compile:
            for ac in args.ac:
                for b in args.batches:
                    cfg = replace(base, micro_batch=b, batch_size=b, ac=ac, compile=compile)
                    fig = attempt(f"train compile={compile} ac={ac} batch={b}",
                                  lambda: train_point(cfg, device, args.train_steps, peak))
                    if fig is None:
                        break
                    report["train"].append({"compile": compile, "ac": ac, "batch": b, **fig})
                    print(f"train compile={compile} ac={ac} batch {b}: {fig}", flush=True)
                    if fig.get("oom"):
                        break
    finally:
        dist.destroy_process_group()

    def chunk(name, **kw):
        opts = dict(preset=args.preset, action_mode="dexac", tokenizer="wan2.1", steps=args.steps,
                    sampler="unipc", device=args.device, dtype=dtype, height=H, width=W, batch=1,
                    warmup=args.warmup, iters=args.iters, compare_diffusers=False, semantic=True, compile=False)
        out = attempt(name, lambda: bench_sample(argparse.Namespace(**(opts | kw))))
        free(device)
        for what, fig in (out or {}).items():
            if isinstance(fig, dict) and "total" in fig:
                report["sample"].append({"run": name, "model": what, **{k: fig[k] for k in fig if k != "shape"}})
        return out

    for g in args.guidance:
        for compile in args.compile:
            chunk(f"ours guidance={g:g} compile={compile}", guidance=g, compile=compile)
        # diffusers' pipeline holds the backbone only: ours without DexAC and DINOv3 beside it
        out = chunk(f"diffusers guidance={g:g}", guidance=g, action_mode="none", semantic=False,
                    compare_diffusers=True)
        if out and "ratio" in out:
            report["sample"].append({"run": f"diffusers guidance={g:g}", "model": "ours / diffusers",
                                     "total": out["ratio"]})
            report["sample_vs_diffusers"] = out["max_abs_diff"]  # the same inputs through both: DiT, VAE encode
    report["seconds"] = time.perf_counter() - start
    print_gpu_table(report)
    hub.atomic_write(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return report


# -----------------------------------------------------------------------------
# path: the whole user path on one GPU (train, checkpoint, resume, export, sample, evaluate) as its commands


def write_random_weights(out, preset, device):
    """Random weights in the layouts the real files have (no Hub there): the DiT as an official .pt (`net.`
    keys, bf16), the Wan2.1 VAE as Wan2.1_VAE.pth (its original keys), DINOv3 ViT-L/16 as a .safetensors
    (this repository's names, which semantic.load_dino reads beside the Hub's; cosmos2b only: the smoke runs
    without the semantic branch) -> {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"dit": out / "dit.pt", "vae": out / "Wan2.1_VAE.pth"}
    if preset == "cosmos2b":
        paths["dino"] = out / "dinov3.safetensors"
    if all(p.is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    with torch.device(device):
        dit = M.DiT(M.config_from_preset(preset))
    dit.init_weights()
    official = M.state_dict_as(dit.state_dict(), "official", dit.config.n_blocks)
    torch.save({f"net.{k}": v.to("cpu", torch.bfloat16) for k, v in official.items()}, paths["dit"])
    del dit, official
    free(device)
    torch.save(tok.WanVAE().state_dict(), paths["vae"])
    if "dino" in paths:
        from safetensors.torch import save_file
        dino = sem.DinoV3(sem.DINO_PRESETS["vitl16"])
        save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(paths["dino"]))
    return paths


def write_text_cache(root, cache, text_tokens):
    """Random Cosmos-Reason1 embeddings (bf16, the released width) for every prompt of the dataset, in
    semantic.TextEmbedder's cache layout: the paper preset's text path without the 7B encoder."""
    text = sem.TextEmbedder("reason1", cache_dir=str(cache), max_tokens=text_tokens)
    prompts = {data.read_track(e, e.start, e.start + 2).prompt for splits in (data.TRAIN_SPLITS, data.EVAL_SPLITS)
               for e in data.load_index(root, splits)[0]} | {""}
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file
    cache.mkdir(parents=True, exist_ok=True)
    for p in sorted(prompts):
        if not os.path.exists(text.cache_path(p)):
            emb = (torch.randn(text.shape, generator=g) * 0.02).to(torch.bfloat16)
            save_file({"embedding": emb}, text.cache_path(p), metadata={"prompt": p, "encoder": text.encoder_id})
    return len(prompts)


def run_logged(cmd, log, env):
    """One command of the path, its output in `log` -> (seconds, the output)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    text = Path(log).read_text()
    if code:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {code}); its output: {log}\n{text[-2000:]}")
    return time.perf_counter() - t0, text


def file_system(path):
    return os.stat(path).st_dev


def checkpoint_room(out, need, ram=Path("/dev/shm")):
    """Where two checkpoints of `need` bytes go (the resumed one and the last stay): --out's disk, else `ram`,
    else one on each of them when they are two file systems that hold one each -> (the folder runs go to, the
    folder the resumed checkpoint moves to or None), or None. A 2B run's checkpoint is about 31 GiB."""
    places = [p for p in (out, ram) if p.exists()]
    free = {p: shutil.disk_usage(p).free for p in places}
    for p in places:
        if free[p] > 2.2 * need:
            return p, None
    if len(places) == 2 and file_system(out) != file_system(ram) and min(free.values()) > 1.1 * need:
        return out, ram
    return None


def move_checkpoint(ckpt, to):
    """Moves a checkpoint directory to another file system and leaves a link in its place (train.py reads the
    checkpoints through the run's folder): two 2B checkpoints then fit where only one fits per file system."""
    dest = Path(to) / "dexac-path-checkpoints" / ckpt.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(ckpt), str(dest))
    ckpt.symlink_to(dest, target_is_directory=True)
    return dest


def bench_path(args):
    """The whole path a user runs first, on one GPU from random weights in the official layouts (no Hub): the
    paper preset (13 frames at 288x512, DexAC and DINOv3, Reason1 text from a cache, bf16, FSDP2 on one rank)
    trains --steps on synthetic data at that size, checkpoints halfway and stops, resumes, finishes and exports;
    sample.py rolls out two chunks from the export; evaluate.py scores a few clips. Every stage runs as its
    command (train.py, sample.py, evaluate.py), its output in OUT/logs/. Prints and writes (OUT/path.json) the
    step time, tokens/s, MFU, peak memory, checkpoint size, save and load times, sampling time per chunk and
    evaluation time, with the GPU's name. On a GPU machine without PyAV, install its wheel first (the synthetic
    data is MP4)."""
    out, device = Path(args.out), torch.device(args.device)
    gpu = device.type == "cuda"
    H, W = (288, 512) if args.preset == "cosmos2b" else (64, 112)
    t_start, logs = time.perf_counter(), out / "logs"
    report = {"device": hardware_name(device), "torch": torch.__version__, "preset": args.preset, "size": [H, W],
              "steps": args.steps, "stage_seconds": {}}
    logs.mkdir(parents=True, exist_ok=True)
    save_report = lambda: hub.atomic_write(out / "path.json", json.dumps(report, indent=1))

    def stage(name, t0):  # each stage's time, and what ran so far written: a later failure keeps it
        report["stage_seconds"][name] = round(time.perf_counter() - t0, 1)
        save_report()

    t0 = time.perf_counter()
    weights = write_random_weights(out / "weights", args.preset, device)
    stage("weights", t0)
    t0 = time.perf_counter()
    root = out / "data"
    if not (root / "stats.json").is_file():
        synthetic.write_synthetic(root, tasks=2, episodes=2, test_episodes=1, frames=40, size=(H, W), workers=0,
                                  overwrite=True)
        (root / "stats.json").write_text(json.dumps(data.compute_stats(root)))
    if args.preset == "cosmos2b":  # the smoke runs with --text none: no 100 MB embedding per prompt
        report["prompts"] = write_text_cache(root, out / "text_cache", train.PRESETS["paper"].text_tokens)
    stage("data", t0)

    with torch.device("meta"):
        n_params = sum(p.numel() for p in M.DiT(M.config_from_preset(args.preset)).parameters())
    ckpt_bytes = 4 * 4 * n_params  # fp32 weights, two Adam moments and the EMA
    room = checkpoint_room(out, ckpt_bytes)
    if room is None:
        raise RuntimeError(f"no room for two {ckpt_bytes / 2**30:.0f} GiB checkpoints on {out} and /dev/shm")
    where, spill = room
    runs = out / "runs"
    if where != out and not runs.exists():
        (where / "dexac-path-runs").mkdir(exist_ok=True)
        runs.symlink_to(where / "dexac-path-runs")  # the run under OUT/runs, its bytes in RAM
    report["checkpoints_in"] = [str(where)] + ([str(spill)] if spill else [])
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here)}
    flags = ["--preset", "paper", "--data", str(root), "--init", str(weights["dit"]), "--tokenizer-weights",
             str(weights["vae"]), *(["--dino", str(weights["dino"])] if "dino" in weights else []),
             "--text-cache", str(out / "text_cache"),
             "--batch-size", str(args.batch), "--micro-batch", str(args.batch), "--steps", str(args.steps),
             "--epochs", "0",  # --steps decides, not the preset's 2 epochs
             "--ckpt-every", str(args.steps // 2), "--keep", "1", "--preview-every", "0", "--workers", "4",
             "--out", str(runs), "--device", args.device]
    if args.preset != "cosmos2b":  # the CPU smoke: the tiny DiT (its own text width), no DINOv3, small frames
        flags += ["--model", args.preset, "--height", str(H), "--width", str(W), "--text", "none", "--no-semantic"]
    t0 = time.perf_counter()
    first, log1 = run_logged([sys.executable, str(here / "train.py"), *flags, "--exit-after", str(args.steps // 2)],
                             logs / "train_1.log", env)
    run = Path(next(line.split()[-1] for line in log1.splitlines() if "continue with:" in line))
    if spill:  # the halfway checkpoint to the other file system: the last one is written beside it
        t1 = time.perf_counter()
        move_checkpoint(sorted((run / "checkpoints").glob("step_*"))[-1], spill)
        report["checkpoint_move_s"] = round(time.perf_counter() - t1, 1)
    second, log2 = run_logged([sys.executable, str(here / "train.py"), *flags, "--resume", str(run)],
                              logs / "train_2.log", env)
    stage("train", t0)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if x["step"] > 2] or lines  # the first steps pay for allocation and warm-up
    tflop = float(re.search(r"([\d.]+) TFLOP per step", log1).group(1))
    step_time = float(np.median([x["step_time"] for x in timed]))
    peak = peak_tflops(device)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    report["train"] = {
        "ms_per_step": 1e3 * step_time, "tokens_per_s": float(np.median([x["tokens_per_s"] for x in timed])),
        "tflop_per_step": tflop, "mfu": tflop / step_time / peak if peak else None,
        "peak_gib": max((x.get("peak_gib", 0) for x in lines), default=None) if gpu else None,
        "checkpoint_gib": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30,
        "checkpoint_save_s": [float(v) for v in re.findall(r"saved in ([\d.]+) s", log1 + log2)],
        "checkpoint_load_s": float(re.search(r"loaded in ([\d.]+) s", log2).group(1)),
        "export_gib": (run / "model.safetensors").stat().st_size / 2**30, "first_call_s": first,
        "resumed_call_s": second, "final_loss": lines[-1]["loss"]}
    save_report()
    episode = sorted((root / "test").rglob("*.hdf5"))[0]
    t0 = time.perf_counter()
    _, log = run_logged([sys.executable, str(here / "sample.py"), "--checkpoint", str(run / "model.safetensors"),
                         "--episode", str(episode), "--num-actions", "24", "--steps", str(args.sample_steps),
                         "--dtype", "bf16" if gpu else "fp32", "--device", args.device, "--out",
                         str(out / "samples")], logs / "sample.log", env)
    stage("sample", t0)
    rollout = float(re.search(r"actions in ([\d.]+) s", log).group(1))
    report["sample"] = {"chunks": 2, "sampler_steps": args.sample_steps, "rollout_s": rollout,
                        "s_per_chunk": rollout / 2, "call_s": report["stage_seconds"]["sample"]}
    t0 = time.perf_counter()
    run_logged([sys.executable, str(here / "evaluate.py"), "--checkpoint", str(run / "model.safetensors"), "--data",
                str(root), "--horizon", "25", "--clips", "2", "--steps", str(args.sample_steps), "--metrics",
                "psnr,ssim,latent_l2", "--dtype", "bf16" if gpu else "fp32", "--device", args.device, "--out",
                str(out / "eval")], logs / "evaluate.log", env)
    stage("evaluate", t0)
    report["eval"] = json.loads((out / "eval" / "report.json").read_text())["rows"]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    save_report()
    tr = report["train"]
    print(f"{report['device']}: {args.preset} at {H}x{W}, batch {args.batch}, {args.steps} steps")
    print(f"  train: {tr['ms_per_step']:.0f} ms/step, {tr['tokens_per_s']:,.0f} tokens/s, "
          f"{tr['tflop_per_step']:.1f} TFLOP/step, MFU {100 * tr['mfu']:.1f}%" if tr["mfu"] else
          f"  train: {tr['ms_per_step']:.0f} ms/step, {tr['tokens_per_s']:,.0f} tokens/s")
    memory = f"{tr['peak_gib']:.1f} GiB" if tr["peak_gib"] is not None else "n/a on the CPU"
    print(f"  peak memory {memory}; checkpoint {tr['checkpoint_gib']:.1f} GiB, saved in "
          f"{', '.join(f'{v:.1f}' for v in tr['checkpoint_save_s'])} s, loaded in {tr['checkpoint_load_s']:.1f} s; "
          f"export {tr['export_gib']:.1f} GiB")
    print(f"  sample: {report['sample']['s_per_chunk']:.1f} s per chunk ({args.sample_steps} steps); stages "
          f"{report['stage_seconds']}; {report['seconds']:.0f} s in all -> {out / 'path.json'}")
    return report


def print_gpu_table(r):
    num = lambda v, f: "-" if v is None else format(v, f)
    print(f"\n{r['device']}, torch {r['torch']}, preset {r['preset']}, {r['dtype']}, {r['size'][0]}x{r['size'][1]}, "
          f"13 frames, DexAC + DINOv3 branch on")
    print(f"\n{'training':10s} {'ac':>5s} {'batch':>5s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU %':>6s} "
          f"{'peak GiB':>8s} {'1st step s':>10s}")
    for row in r["train"]:
        name = "compiled" if row["compile"] else "eager"
        if row.get("oom"):
            print(f"{name:10s} {row['ac']:>5s} {row['batch']:5d} {'out of memory':>9s}")
            continue
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        print(f"{name:10s} {row['ac']:>5s} {row['batch']:5d} {row['ms_per_step']:9.1f} {row['tokens_per_s']:10,.0f} "
              f"{num(mfu, '6.1f')} {num(row['peak_gib'], '8.2f')} {row['first_step_s']:10.1f}")
    print(f"\n{'rollout chunk (12 actions)':44s} {'s/chunk':>8s} {'encode':>7s} {'denoise':>8s} {'decode':>7s} "
          f"{'peak GiB':>8s}")
    for row in r["sample"]:
        name = f"{row['run']}: {row['model']}"
        if "denoise" not in row:
            print(f"{name:44s} {row['total']:8.2f}  (ratio)")
            continue
        print(f"{name:44s} {row['total']:8.3f} {row['vae_encode']:7.3f} {row['denoise']:8.3f} "
              f"{row['vae_decode']:7.3f} {num(row['peak_gib'], '8.2f')}")
    if r.get("dit_vs_diffusers"):
        print(f"\nthe DiT's forward+backward, ours / diffusers on the same weights: "
              f"{r['dit_vs_diffusers']['ratio']:.2f}")
    if r.get("vae"):
        print(f"\nWan2.1 VAE, 13 frames: encode {r['vae']['encode_frames_per_s']:.1f} frames/s, decode "
              f"{r['vae']['decode_frames_per_s']:.1f} frames/s")
    if r.get("dino"):
        print(f"DINOv3: {r['dino']['images_per_s']:.1f} images/s")
    for s in r["skipped"]:
        print(f"skipped: {s}")


# -----------------------------------------------------------------------------
# costs: parameters and FLOPs per DexAC component beside the paper's Table 6


PAPER_TABLE_6 = {  # component: (parameters, FLOPs) as printed in the paper
    "MLP action embed (mlp-flat)": (22.39e6, 24.64e6), "SAT": (0.512e3, 245.76e3),
    "local attention": (13.65e6, 3.42e9), "global attention": (2.37e6, 126.45e6), "full DexAC": (16.02e6, 3.55e9)}


def measure(module, *inputs):
    """(parameters, multiply-accumulates) of one forward, counted on the meta device (no memory, no compute)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops() // 2


def costs(*, dim=2048, n_heads=16, frames=4, height=288, width=512, steps=12, n_dims=57, sat_dim=256):
    """{component: (params, MACs)} at one sample of latent frames x (height/16) x (width/16) tokens."""
    T, H, W = frames, height // 16, width // 16  # 8x VAE, then 2x2 patches
    with torch.device("meta"):
        x, a = torch.empty(1, T, H, W, dim), torch.empty(1, steps, n_dims)
        mask, tokens = torch.zeros(1, T), torch.empty(1, n_dims, sat_dim)
        sat = C.StructuredActionTokenizer(n_dims, steps, sat_dim, dim_embedding=False)
        full = {m: C.build_action_cond(m, dim, n_heads, n_dims=n_dims, steps=steps, norm="none", width=sat_dim)
                for m in C.MODES}
        return {
            "MLP action embed (mlp-flat)": measure(full["mlp-flat"], a, x, mask),
            "SAT": measure(sat, a),
            "  + per-dimension embedding (ours)": (n_dims * sat_dim, 0),
            "local attention": measure(C.LocalRefinement(sat_dim, dim, n_heads), x.view(1, -1, dim), tokens),
            "global attention": measure(C.GlobalModulation(sat_dim, dim), tokens),
            "full DexAC": measure(full["dexac"], a, x, mask),
            "mlp (Cosmos chunk MLP, ours)": measure(full["mlp"], a, x, mask),
            "dexac-time (ours)": measure(full["dexac-time"], a, x, mask),
            "dexac-channel (ours)": measure(full["dexac-channel"], a, x, mask),
        }


NOTES = {  # one sentence per difference from Table 6, at the defaults (D 2048, 4 x 18 x 32 tokens, 12 x 57)
    "MLP action embed": "same parameters (684*8192 + 8192*2048 + biases); our 22.38M MACs are its two matmuls, "
                        "the paper's 2.26M more we cannot explain (bias adds and GELU are ~10K).",
    "SAT": "the paper counts Linear(1 -> C) only (512), we add the 13-parameter fusion; its 245.76K is "
           "12 * 80 * 256, the entry projection for 80 action dims (Cosmos' default action_dim 10 * 8).",
    "local attention": "ours has 4 D x D matrices (q, k, v, o) + Linear(C -> D), the paper's 13.65M fits "
                       "3 D x D + 2 C x D; its 3.42G is below even one D x D projection over 2304 tokens "
                       "(9.66G), so it was counted on fewer latent tokens than a 288x512 input gives.",
    "global attention": "parameters match (4 C x C attention + query + heads to D and 3D); our MACs are one "
                        "query over 57 tokens plus the heads, the paper's 13x larger figure we cannot reproduce.",
    "full DexAC": "the sum of the rows above in both tables; ours adds the per-dimension embedding (14.6K)."}


def print_costs(args):
    a = args
    rows = costs(dim=a.dim, n_heads=a.heads, frames=a.frames, height=a.height, width=a.width, steps=a.steps,
                 n_dims=a.action_dim, sat_dim=a.sat_dim)
    fmt = lambda n: "-" if n is None else f"{n:.0f}" if n < 1e3 else next(
        f"{n / s:.2f}{u}" for s, u in [(1e9, "G"), (1e6, "M"), (1e3, "K")] if n >= s)
    print(f"DexAC costs per sample: D={a.dim}, {a.frames}x{a.height // 16}x{a.width // 16} latent tokens "
          f"({a.height}x{a.width} input), {a.steps} actions x {a.action_dim} dims, C={a.sat_dim}.")
    print("FLOPs = multiply-accumulates (torch FlopCounterMode's count / 2; the paper's MLP row, 24.64M for a "
          "22.38M-MAC MLP, shows it counts MACs too). Multiply by 2 for floating-point operations.\n")
    print(f"{'component':36s} {'params':>9s} {'paper':>9s} {'FLOPs':>9s} {'paper':>9s}")
    for name, (params, macs) in rows.items():
        paper = PAPER_TABLE_6.get(name, (None, None))
        print(f"{name:36s} {fmt(params):>9s} {fmt(paper[0]):>9s} {fmt(macs):>9s} {fmt(paper[1]):>9s}")
    print("\nThe differences (at the default settings):")
    for name, note in NOTES.items():
        print(f"- {name}: {note}")


# -----------------------------------------------------------------------------
# command line


def one_of(*allowed):
    def parse(v):
        if v not in allowed:
            raise argparse.ArgumentTypeError(f"{v!r}: choose from {', '.join(allowed)}")
        return v
    return parse


def comma_list(parse):
    """A comma-separated flag value -> [parse(item)], each item checked (one clear usage error otherwise)."""
    return lambda v: [parse(item) for item in v.split(",")]


def main(argv=None):
    """-> the benchmark's measurements (for the tests; the shell gets exit code 0)."""
    count = data.int_at_least(1)
    p = argparse.ArgumentParser(description="DexAC-WM benchmarks: speed, memory, and comparisons with diffusers.")
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    q = sub.add_parser("dit", help="the DiT's forward and forward+backward (optionally against diffusers)")
    q.add_argument("--preset", default="tiny", choices=sorted(M.PRESETS), help="model size")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cpu or cuda")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter and activation dtype")
    q.add_argument("--batch", type=count, default=1, help="batch size")
    q.add_argument("--frames", type=count, default=4, help="latent frames")
    q.add_argument("--height", type=data.int_multiple(2), default=36, help="latent height (288 px / 8), even")
    q.add_argument("--width", type=data.int_multiple(2), default=64, help="latent width (512 px / 8), even")
    q.add_argument("--text-tokens", type=count, default=512, help="text context length")
    q.add_argument("--warmup", type=data.int_at_least(0), default=2, help="untimed iterations first")
    q.add_argument("--iters", type=count, default=5, help="timed iterations")
    q.add_argument("--compare-diffusers", action="store_true", help="also time diffusers' model, same config")

    q = sub.add_parser("vae", help="the video tokenizer's encode and decode, with peak memory")
    q.add_argument("--tokenizer", default="wan2.1", choices=tok.TOKENIZERS, help="which tokenizer to time")
    q.add_argument("--config", default="full", choices=sorted(tok.WAN_PRESETS), help="Wan VAE size preset")
    q.add_argument("--weights", help="weights path or Hub repo id (default: random, which times the same)")
    q.add_argument("--device", type=data.device_name, default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and activations dtype")
    q.add_argument("--frames", type=data.clip_length, nargs="+", default=[13],
                   help="clip lengths (4k + 1), e.g. 13 61")
    q.add_argument("--height", type=data.int_multiple(8), default=288, help="frame height in pixels (8k)")
    q.add_argument("--width", type=data.int_multiple(8), default=512, help="frame width in pixels (8k)")
    q.add_argument("--batch", type=count, default=1, help="clips per call")
    q.add_argument("--tile-size", type=data.int_at_least(0), default=0,
                   help="spatial tile size in pixels (0: no tiling)")
    q.add_argument("--tile-overlap", type=data.int_at_least(0), default=64,
                   help="overlap of neighbouring tiles in pixels")
    q.add_argument("--warmup", type=data.int_at_least(0), default=1,
                   help="untimed 5-frame encode/decode runs first")

    q = sub.add_parser("dino", help="DINOv3 images/s and peak memory")
    q.add_argument("--preset", default="vitl16", choices=sorted(sem.DINO_PRESETS), help="DINOv3 size")
    q.add_argument("--weights", help="Hub repo id or local file to load (default: random weights)")
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and activations")
    q.add_argument("--height", type=data.int_multiple(16), default=288, help="frame height, a multiple of 16")
    q.add_argument("--width", type=data.int_multiple(16), default=512, help="frame width, a multiple of 16")
    q.add_argument("--batch", type=count, default=1, help="frames per forward pass")
    q.add_argument("--iters", type=count, default=3, help="timed forward passes")
    q.add_argument("--warmup", type=data.int_at_least(0), default=1, help="untimed forward passes first")

    q = sub.add_parser("decode", help="clips/s per data-loader worker from 1920x1080 H.264, and workers per GPU")
    q.add_argument("--clips", type=count, default=40, help="clips to time")
    q.add_argument("--frames", type=data.int_at_least(14, 300), default=150,
                   help="frames in the generated 1080p video (14 to 300: the pan stays inside its texture)")
    q.add_argument("--gop", type=count, default=30, help="keyframe interval of the generated video")
    q.add_argument("--batch", type=count, default=64, help="clips per GPU per step (paper: 64)")
    q.add_argument("--step-time", type=data.number_above(0), default=6.2,
                   help="seconds per training step; 6.2 is what the paper's 20 h/epoch on 8 GPUs implies "
                        "(829 h * 30 fps / 30 * 2 = 5.97M clips, 10.4 clips/s/GPU, batch 64 per GPU)")

    q = sub.add_parser("sample", help="one rollout chunk of a random-weight model (optionally against diffusers)")
    q.add_argument("--preset", default="tiny", choices=sorted(M.PRESETS), help="DiT size")
    q.add_argument("--action-mode", default="dexac", choices=["none", *C.MODES], help="action conditioning")
    q.add_argument("--tokenizer", default="wan2.1", choices=tok.TOKENIZERS, help="video tokenizer")
    q.add_argument("--steps", type=count, default=35, help="denoising steps per chunk")
    q.add_argument("--sampler", default="unipc", choices=M.SOLVERS, help="ODE solver (the official one: unipc)")
    q.add_argument("--guidance", type=data.number_above(0, inclusive=True), default=0.0,
                   help="classifier-free text guidance g (0: off)")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cpu or cuda")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype")
    q.add_argument("--height", type=data.int_multiple(16), default=None, help="frame height, a multiple of 16 "
                   "(default 288)")
    q.add_argument("--width", type=data.int_multiple(16), default=None, help="frame width, a multiple of 16 "
                   "(default 512)")
    q.add_argument("--batch", type=count, default=1, help="rollouts per call")
    q.add_argument("--warmup", type=data.int_at_least(0), default=1, help="untimed chunks first")
    q.add_argument("--iters", type=count, default=2, help="timed chunks")
    q.add_argument("--compare-diffusers", action="store_true",
                   help="also time diffusers' Cosmos-Predict2.5 pipeline, same weights (--batch 1)")
    q.add_argument("--semantic", action="store_true", help="with the DINOv3 branch (random ViT-L/16; tiny DINOv3 "
                                                          "for --preset tiny)")
    q.add_argument("--compile", action="store_true", help="torch.compile each DiT block (sample.py --compile)")

    sub.add_parser("train", help="training steps on random latents: time, tokens/s, MFU, peak memory "
                                 "(every train.py flag; see python bench.py train -h)", add_help=False)

    q = sub.add_parser("path", help="the whole user path on one GPU from random official-layout weights: train, "
                                    "checkpoint, resume, export, sample, evaluate")
    q.add_argument("--preset", default="cosmos2b", choices=sorted(M.PRESETS), help="DiT size (tiny: a CPU smoke)")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cuda (or cpu, the smoke)")
    q.add_argument("--steps", type=data.int_at_least(2), default=20, help="training steps (a checkpoint halfway)")
    q.add_argument("--batch", type=count, default=8, help="clips per step (the paper's per GPU: 8)")
    q.add_argument("--sample-steps", type=count, default=35, help="sampler steps per chunk (official: 35)")
    q.add_argument("--out", default="runs/gpu-path", help="everything goes under this folder")

    q = sub.add_parser("adapt", help="full fine-tuning, new modules only and LoRA r16/r64: step time, peak memory, "
                                     "largest batch per memory cap (random weights)")
    q.add_argument("--preset", default="cosmos2b", choices=sorted(M.PRESETS), help="DiT size (tiny: the CPU's)")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cpu or cuda")
    q.add_argument("--height", type=data.int_multiple(16), default=None, help="frame height (default: the paper's "
                                                                               "288; tiny: 64)")
    q.add_argument("--width", type=data.int_multiple(16), default=None, help="frame width (512; tiny: 112)")
    q.add_argument("--blocks", type=data.int_at_least(0), default=0,
                   help="override the preset's depth (0: keep it; a few blocks of cosmos2b's width fit a CPU)")
    q.add_argument("--ways", nargs="+", default=list(ADAPTATIONS), choices=list(ADAPTATIONS), metavar="WAY",
                   help=f"what is trained, among {list(ADAPTATIONS)}")
    q.add_argument("--ac", default="full", choices=["none", "full", "mlp"], help="activation checkpointing")
    q.add_argument("--steps", type=count, default=3, help="timed steps per way (after 2 warmup)")
    q.add_argument("--caps", type=float, nargs="+", default=[24, 48, 80], help="GPU memory caps in GiB")
    q.add_argument("--batches", type=count, nargs="+", default=[1, 2, 4, 8, 16], help="batches tried per cap")
    q.add_argument("--out", default="", help="write the figures as JSON here")

    q = sub.add_parser("gpu", help="every speed figure at once: training grid, rollout chunks against diffusers, "
                                   "VAE, DINOv3 (random weights; one JSON, one table)")
    q.add_argument("--preset", default="cosmos2b", choices=sorted(M.PRESETS), help="DiT size (tiny: the CPU smoke)")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cpu or cuda")
    q.add_argument("--height", type=data.int_multiple(16), default=None,
                   help="frame height (default 288; 64 at --preset tiny)")
    q.add_argument("--width", type=data.int_multiple(16), default=None,
                   help="frame width (default 512; 112 at --preset tiny)")
    q.add_argument("--batches", type=comma_list(data.int_at_least(1)), default=[1, 2, 4, 8],
                   help="per-GPU training batches, comma-separated; each setting stops at its first out-of-memory")
    q.add_argument("--ac", type=comma_list(one_of("none", "full", "mlp")), default=["none", "full"],
                   help="activation checkpointing modes to time (train.py --ac: none, full, mlp), comma-separated")
    q.add_argument("--compile", type=comma_list(lambda v: {"off": False, "on": True}[one_of("off", "on")(v)]),
                   default=[False, True], help="compile settings to time: off,on")
    q.add_argument("--guidance", type=comma_list(data.number_above(0, inclusive=True)), default=[0.0, 7.0],
                   help="guidance scales of the rollout chunks, comma-separated")
    q.add_argument("--steps", type=count, default=35, help="denoising steps per chunk (official: 35)")
    q.add_argument("--train-steps", type=count, default=3, help="timed training steps per setting")
    q.add_argument("--warmup", type=data.int_at_least(0), default=1,
                   help="untimed runs before the timed ones (chunks, DiT passes, VAE and DINOv3 calls)")
    q.add_argument("--iters", type=count, default=2, help="timed chunks, DiT passes and DINOv3 batches")
    q.add_argument("--dino-batch", type=count, default=8, help="DINOv3 images per batch")
    q.add_argument("--peak-tflops", type=data.number_above(0), default=None,
                   help="the GPU's dense bf16 peak for MFU (default: from its name, e.g. H100 SXM / H200 989)")
    q.add_argument("--budget", type=data.number_above(0), default=510.0,
                   help="seconds after which the remaining parts are skipped, each named in the output")
    q.add_argument("--out", default="bench-gpu.json", help="the JSON written")

    q = sub.add_parser("costs", help="parameters and FLOPs per DexAC component beside the paper's Table 6")
    q.add_argument("--dim", type=count, default=2048, help="DiT width D (cosmos2b: 2048), a multiple of --heads")
    q.add_argument("--heads", type=count, default=16, help="DiT attention heads, used by local refinement")
    q.add_argument("--frames", type=count, default=4, help="latent frames (13 video frames -> 4)")
    q.add_argument("--height", type=data.int_multiple(16), default=288,
                   help="input height in pixels (8x VAE, 2x patch): a multiple of 16")
    q.add_argument("--width", type=data.int_multiple(16), default=512,
                   help="input width in pixels (8x VAE, 2x patch): a multiple of 16")
    q.add_argument("--steps", type=count, default=12, help="actions per chunk T_a")
    q.add_argument("--action-dim", type=count, default=57, help="action dimensions N")
    q.add_argument("--sat-dim", type=count, default=256, help="SAT token width C")

    q = sub.add_parser("eval", help="evaluate.py's cost per clip, metric by metric (random clips; networks whose "
                                    "architecture is ours on random weights, others from their files, offline)")
    q.add_argument("--metrics", type=lambda v: [m for m in v.split(",") if m], default=list(E.PAPER_METRICS[:5])
                   + ["pck", "dreamsim"], help="comma-separated evaluate.py metrics (latent_l2 needs rollouts)")
    q.add_argument("--clips", type=count, default=4, help="clips scored together")
    q.add_argument("--frames", type=data.int_at_least(2), default=25, help="frames per clip, the given one "
                   "included (the paper: 25); FVD needs at least 9")
    q.add_argument("--height", type=count, default=288, help="frame height")
    q.add_argument("--width", type=count, default=512, help="frame width")
    q.add_argument("--device", type=data.device_name, default=default_device, help="cpu or cuda")
    q.add_argument("--warmup", type=data.int_at_least(0), default=1, help="untimed one-clip runs first")
    q.add_argument("--detector", default="markers", help="PCK's detector, as evaluate.py --detector (e.g. mediapipe)")

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser: every TrainConfig flag, as train.py takes them
        return bench_train(argv[1:])
    args = p.parse_args(argv)
    if args.what == "costs" and args.dim % args.heads:
        p.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if args.what == "eval" and (set(args.metrics) - set(E.METRICS) or "latent_l2" in args.metrics):
        p.error(f"--metrics: from {','.join(m for m in E.METRICS if m != 'latent_l2')}")
    run = {"dit": bench_dit, "vae": bench_vae, "dino": bench_dino, "decode": bench_decode, "sample": bench_sample,
           "costs": print_costs, "eval": bench_eval, "gpu": bench_gpu, "adapt": bench_adapt,
           "path": bench_path}[args.what]
    return run(args)


if __name__ == "__main__":
    hub.run_main(lambda argv: main(argv) and None)  # main returns measurements, not an exit code
