"""
IRASim, the second backbone (DESIGN.md section 12): a Latte-style video DiT whose blocks alternate between
attention over the tokens of one frame and attention over the frames of one patch position, trained with
Gaussian "mask" diffusion (improved DDPM's epsilon prediction and learned-range variance), the first latent
frame kept clean as the condition. Follows bytedance/IRASim (`models/irasim.py`, `diffusion/`, `configs/`).

What is here, top to bottom: the layers (their parameter names are the released ones, so a released
checkpoint loads by name), the config presets, the network (`IRASim`) with the official frame-level action
conditioning ("Frame-Ada", `extras: 3`) or a conditioning.py module (the "IRASim + DexAC" rows), the
diffusion with its samplers, and the loader of released checkpoints.

Departures from the official code, all deliberate:
- latents are (B, C, T, H, W) as everywhere in this repository (the official network takes (B, T, C, H, W));
  `pos_embed` and `temp_embed` are persistent buffers (the official code holds frozen Parameters: the same
  state-dict keys and values, but no optimizer entries).
- timm and einops are not used: `PatchEmbed` and `Mlp` are written out (conditioning.Mlp has timm's keys).
- Frame-Ada only in the RT-1 / Bridge layout (`embed_state` = Mlp(N -> 4D -> D)); the Language-Table release
  (`embed_arm_state` Linear(2 -> 4D) then `embed_state` Linear(4D -> D)) is refused by the strict loader.
- the released configs sample with diffusers' PNDM (50 steps); we offer ancestral DDPM (the model's variance)
  and DDIM (eta 0) on any respacing of the 1000 training steps instead (`GaussianDiffusion(use_steps=50)`).
- the released Frame-Ada configs set `learn_sigma: False` (4 output channels, MSE loss only, DDPM with the
  "fixed large" variance); `learn_sigma=True` gives the 8-channel learned-range model with MSE + VLB. Both
  are supported: the diffusion reads which one from the number of output channels.
- sampling does not clip the predicted x0 (latents are not in [-1, 1]); the VLB, as the official, never clips.

`python irasim.py --preset XL` prints a config and its parameter count without allocating memory.
"""

import argparse
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import conditioning
import hub

# -----------------------------------------------------------------------------
# small layers


def modulate(x, shift, scale):
    """x (N, L, D); shift, scale (N, D), one per sequence."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_sinusoid(t, dim=256, max_period=10000.0):
    """(N,) diffusion steps -> (N, dim) fp32, laid out [cos | sin] with freq_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_1d(dim, positions):
    """MAE's fixed embedding, float64: (M,) positions -> (M, dim) laid out [sin | cos], omega_i = 1e4^(-2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, h, w):
    """(h * w, dim) for a row-major h x w grid. As MAE's meshgrid(w, h): the FIRST half encodes the column
    (w) index, the second half the row (h) index."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: Conv2d(C, D, p, stride p) -> (N, L, D) tokens in row-major patch order."""

    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, h*w, D)


class Attention(nn.Module):
    """Fused qkv with bias, no q/k norm, no position encoding inside (it is added to the tokens)."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (N, nh, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(N, L, D))


class Block(nn.Module):
    """DiT's adaLN-Zero block; the same module serves as spatial (L = tokens of a frame) and temporal block
    (L = frames of a patch position): x (N, L, D), c (N, D) -> (N, L, D)."""

    def __init__(self, dim, n_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(dim, n_heads)
        self.mlp = conditioning.Mlp(dim, int(dim * mlp_ratio), dim)  # timm's Mlp: fc1, GELU(tanh), fc2
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        return self.body(x, c)

    def body(self, x, c):
        """The whole block (model.compile_blocks compiles `body`: no FSDP group lives inside an IRASim block)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# -----------------------------------------------------------------------------
# the network


@dataclass
class IRASimConfig:
    in_channels: int = 4  # SDXL VAE latents
    input_size: tuple = (32, 40)  # latent (H, W): 256 x 320 video / 8
    patch: int = 2
    dim: int = 1152
    n_blocks: int = 28  # even: spatial, temporal, spatial, ...
    n_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16  # latent frames (the size of temp_embed)
    mask_frames: int = 1  # clean conditioning frames at the start (official mask_frame_num)
    learn_sigma: bool = False  # the released Frame-Ada configs: False; True doubles the output channels
    # actions: "frame-ada" (official extras 3), "none", or a conditioning.MODES name (DexAC rows)
    action_mode: str = "frame-ada"
    action_dim: int = 7  # N (RT-1 and Bridge: 7); one action per predicted frame, T_a = num_frames - 1
    action_dropout: float = 0.1  # Frame-Ada: training samples whose actions become the mask embedding
    final_frame_ada: bool = False  # False: the released "legacy" final layer sees the timestep only
    action_norm: str = "zscore"  # conditioning modules only (Frame-Ada takes actions as the dataset gives them)
    sat_dim: int = 256  # conditioning modules: SAT token width


PRESETS = {
    "S": IRASimConfig(dim=384, n_blocks=12, n_heads=6),
    "B": IRASimConfig(dim=768, n_blocks=12, n_heads=12),
    "L": IRASimConfig(dim=1024, n_blocks=24, n_heads=16),
    "XL": IRASimConfig(),
    # trains on 2 CPU cores
    "tiny": IRASimConfig(dim=64, n_blocks=4, n_heads=4, input_size=(8, 10), num_frames=5, sat_dim=32),
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown IRASim preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class IRASim(nn.Module):
    """The IRASim DiT. x (B, C, T, H, W), t (B,) integer diffusion steps -> (B, C_out, T, H, W).

    AdaLN inputs: spatial blocks get c_s (B, T, D) = timestep embedding + a per-frame action embedding;
    temporal blocks get the timestep embedding alone; the final layer the timestep alone (final_frame_ada:
    c_s). The action embedding is Frame-Ada's (`embed_state` per action, the learned `mask_emb_fn` row for
    the conditioning frame) or, with an `action_cond` module (conditioning.py interface), its emb_d; such a
    module may also update the tokens x (B, T, H', W', D) after patch and position embedding. Cosmos'
    AdaLN-LoRA input emb_3d has no counterpart in IRASim's blocks: the DexAC built here has no head for it.
    """

    def __init__(self, config, action_cond=None):
        super().__init__()
        c = self.config = config
        if c.n_blocks % 2 or c.dim % c.n_heads or c.dim % 4:
            raise ValueError(f"n_blocks {c.n_blocks} must be even and dim {c.dim} divisible by 4 and by n_heads "
                             f"{c.n_heads}")
        if c.input_size[0] % c.patch or c.input_size[1] % c.patch:
            raise ValueError(f"input_size {c.input_size} must be divisible by the patch {c.patch}")
        self.grid = (c.input_size[0] // c.patch, c.input_size[1] // c.patch)
        self.out_channels = c.in_channels * (2 if c.learn_sigma else 1)
        self.x_embedder = PatchEmbed(c.in_channels, c.dim, c.patch)
        self.t_embedder = TimestepEmbedder(c.dim)
        if c.action_mode == "frame-ada":
            self.embed_state = conditioning.Mlp(c.action_dim, 4 * c.dim, c.dim)
            self.mask_emb_fn = nn.Embedding(1, c.dim)
        elif action_cond is None:
            action_cond = conditioning.build_action_cond(
                c.action_mode, c.dim, c.n_heads, n_dims=c.action_dim, steps=c.num_frames - c.mask_frames,
                norm=c.action_norm, width=c.sat_dim, per_frame=1, emb_3d=False)
        self.action_cond = action_cond
        pos = sincos_2d(c.dim, *self.grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float()[None])  # (1, L, D)
        self.register_buffer("temp_embed", torch.from_numpy(sincos_1d(c.dim, np.arange(c.num_frames))).float()[None])
        self.blocks = nn.ModuleList(Block(c.dim, c.n_heads, c.mlp_ratio) for _ in range(c.n_blocks))
        self.final_layer = FinalLayer(c.dim, c.patch**2 * self.out_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """DiT's: xavier linears (the patch conv as a linear), timestep MLP N(0, 0.02), and every adaLN
        modulation and the output linear zero, so each block is the identity and the output is 0 at step 0."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("action_cond"):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if hasattr(self, "mask_emb_fn"):
            nn.init.normal_(self.mask_emb_fn.weight)  # nn.Embedding's own init, as the official
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def fp32_modules(self):
        """[(name, module)] kept in fp32 under bf16 training (train.parallelize): the parts of a conditioning
        module that make the AdaLN input (its FP32_PARTS), as in the Cosmos DiT, but the `mlp` mode's embed_3d:
        its output (the AdaLN-LoRA term) has no use here, and in one FSDP2 group with embed_d (a module that
        never takes part in the backward beside one that does) the backward failed on a freed parameter, so it
        stays in the root group. The backbone itself has no fp32 path (the official IRASim trains in fp32)."""
        parts = tuple(f"action_cond.{n}" for n in getattr(self.action_cond, "FP32_PARTS", ()) if n != "embed_3d")
        return [(n, m) for n, m in self.named_modules() if n in parts]

    def frame_ada(self, actions, T, drop=None):
        """Frame-Ada's per-frame embedding: actions (B, T - 1, N) -> (B, T, D), frame 0 the mask embedding;
        drop (B,) bool: those samples get the mask embedding at every frame (classifier-free dropout)."""
        B = actions.shape[0]
        if actions.ndim != 3 or actions.shape[1:] != (T - 1, self.config.action_dim):
            raise ValueError(f"Frame-Ada takes one action per frame after the first: (B, {T - 1}, "
                             f"{self.config.action_dim}) for {T} frames, got {tuple(actions.shape)}")
        mask = self.mask_emb_fn.weight[0].expand(B, 1, -1)  # (B, 1, D)
        emb = torch.cat([mask, self.embed_state(actions.to(mask.dtype))], dim=1)  # (B, T, D)
        return emb if drop is None else torch.where(drop[:, None, None], mask, emb)

    def adaln_inputs(self, t, actions, x_tokens, drop=None):
        """-> tokens (B, T, L, D), c_spatial (B, T, D), c_temporal (B, D), c_final (B, T, D)."""
        B, T, L, D = x_tokens.shape
        temb = self.t_embedder(t)  # (B, D)
        if self.config.action_mode == "frame-ada":
            if actions is None:
                raise ValueError("this IRASim is action-conditioned (Frame-Ada): pass actions (B, T - 1, N)")
            if drop is None and self.training and self.config.action_dropout > 0:
                drop = torch.rand(B, device=temb.device) < self.config.action_dropout
            emb = self.frame_ada(actions, T, drop)
        elif self.action_cond is not None:
            if actions is None:
                raise ValueError(f"this IRASim is action-conditioned ({self.config.action_mode}): pass actions")
            frame_mask = torch.zeros(B, T, device=temb.device)
            frame_mask[:, : self.config.mask_frames] = 1
            x, emb, _ = self.action_cond(actions, x_tokens.view(B, T, *self.grid, D), frame_mask)  # emb_3d: None
            x_tokens = x.reshape(B, T, L, D)
        elif actions is not None:
            raise ValueError("actions were given to an IRASim without action conditioning (action_mode 'none')")
        else:
            emb = None
        c_s = temb[:, None].expand(B, T, D) if emb is None else temb[:, None] + emb.to(temb.dtype)
        c_final = c_s if self.config.final_frame_ada else temb[:, None].expand(B, T, D)
        return x_tokens, c_s, temb, c_final

    @staticmethod
    def spatial(block, x, c):
        """x (B, T, L, D), c (B, T, D): attention over the L tokens of each frame."""
        B, T, L, D = x.shape
        return block(x.reshape(B * T, L, D), c.reshape(B * T, D)).view(B, T, L, D)

    @staticmethod
    def temporal(block, x, c):
        """x (B, T, L, D), c (B, D): attention over the T frames of each patch position."""
        B, T, L, D = x.shape
        h = block(x.transpose(1, 2).reshape(B * L, T, D), c.repeat_interleave(L, dim=0))  # (B L, T, D)
        return h.view(B, L, T, D).transpose(1, 2)

    def forward(self, x, t, actions=None, *, drop_actions=None):
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels or tuple(x.shape[3:]) != tuple(c.input_size):
            raise ValueError(f"expected latents (B, {c.in_channels}, T, {c.input_size[0]}, {c.input_size[1]}) "
                             f"(the fixed position embedding sets H, W), got {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        if T > c.num_frames:
            raise ValueError(f"{T} frames exceed the model's num_frames {c.num_frames}")
        h = self.x_embedder(x.transpose(1, 2).reshape(B * T, c.in_channels, H, W))
        h = h + self.pos_embed.to(h.dtype)  # (B T, L, D); the fixed tables are fp32 buffers (FSDP casts parameters)
        h, c_s, c_t, c_final = self.adaln_inputs(t, actions, h.view(B, T, -1, c.dim), drop_actions)
        for i in range(0, len(self.blocks), 2):
            h = self.spatial(self.blocks[i], h, c_s)
            if i == 0:
                h = h + self.temp_embed[:, :T, None].to(h.dtype)  # (1, T, 1, D): before the first temporal block only
            h = self.temporal(self.blocks[i + 1], h, c_t)
        out = self.final_layer(h.reshape(B * T, -1, c.dim), c_final.reshape(B * T, c.dim))  # (B T, L, p p C)
        gh, gw, p = *self.grid, c.patch
        out = out.view(B, T, gh, gw, p, p, self.out_channels).permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, gh, p, gw, p)
        return out.reshape(B, self.out_channels, T, H, W)


# -----------------------------------------------------------------------------
# Gaussian mask diffusion (improved DDPM, as IRASim's `MaskGaussianDiffusion` and `MaskSpacedDiffusion`)


def space_timesteps(n_steps, count):
    """`count` steps of 0..n_steps-1, evenly spaced with both ends kept (improved DDPM's one-section spacing)."""
    if not 1 <= count <= n_steps:
        raise ValueError(f"cannot take {count} sampling steps from {n_steps}")
    stride = (n_steps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


def approx_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(bin of x) for 8-bit data in [-1, 1] (bins 2/255 wide, open at the ends), in nats; the CDF is the
    tanh approximation, as improved DDPM and IRASim."""
    inv = torch.exp(-log_scale)
    cdf_plus = approx_normal_cdf(inv * (x - mean + 1 / 255))
    cdf_min = approx_normal_cdf(inv * (x - mean - 1 / 255))
    log_p = torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                        torch.where(x > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_p


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


SAMPLERS = ("ddim", "ddpm")  # GaussianDiffusion.sample's methods; the first is the default


def sample_steps_error(steps, n_steps=1000):
    """Why a respaced process of `steps` of the n_steps cannot sample, or None: one step is step 0 alone, whose
    noise level is nearly clean (and whose posterior variance is 0), so sampling starts from at least two."""
    if not 2 <= steps <= n_steps:
        return f"an IRASim model samples on 2 to {n_steps} of its diffusion steps, not {steps}"
    return None


class GaussianDiffusion:
    """Linear betas over n_steps, epsilon prediction. use_steps: a respaced process over that many of the
    steps (the model is still called with the original step numbers). Tensors are (B, C, T, ...): channel dim
    1 (a model output with 2C channels carries the learned-range variance values v in [-1, 1]), frame dim 2,
    the first `mask_frames` frames clean."""

    def __init__(self, n_steps=1000, beta_start=1e-4, beta_end=0.02, use_steps=None):
        if use_steps is not None and (error := sample_steps_error(use_steps, n_steps)):
            raise ValueError(error)
        betas = np.linspace(beta_start, beta_end, n_steps, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        self.timestep_map = list(range(n_steps)) if use_steps is None else space_timesteps(n_steps, use_steps)
        abar = abar[self.timestep_map]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])  # the respaced process' own betas
        self.n_steps = len(betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        arrays = dict(betas=betas, abar=abar, abar_prev=abar_prev, post_var=post_var,
                      # log clipped: the posterior variance is 0 at t = 0
                      post_logvar=np.log(np.append(post_var[1], post_var[1:])),
                      coef_x0=betas * np.sqrt(abar_prev) / (1.0 - abar),
                      coef_xt=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
                      large_var=np.append(post_var[1], betas[1:]))
        self.arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}  # float64

    def _at(self, name, t, x):
        """arrays[name][t] as (B, 1, 1, ...) in x's dtype."""
        v = self.arrays[name].to(t.device)[t].to(x.dtype)
        return v.view(-1, *[1] * (x.ndim - 1))

    def q_sample(self, x0, t, noise):
        return self._at("abar", t, x0).sqrt() * x0 + (1 - self._at("abar", t, x0)).sqrt() * noise

    def q_posterior(self, x0, xt, t):
        """q(x_{t-1} | x_t, x_0) -> mean, variance, log variance (clipped at t = 0)."""
        mean = self._at("coef_x0", t, xt) * x0 + self._at("coef_xt", t, xt) * xt
        return mean, self._at("post_var", t, xt), self._at("post_logvar", t, xt)

    def p_mean_variance(self, out, xt, t):
        """Model output (B, C or 2C, ...) at x_t -> dict(mean, log_var, x0, eps) of p(x_{t-1} | x_t)."""
        C = xt.shape[1]
        if out.shape[1] == 2 * C:
            eps, v = out.split(C, dim=1)
            frac = (v + 1) / 2  # v in [-1, 1] spans [posterior variance, beta_t] in log space
            log_var = frac * self._at("betas", t, xt).log() + (1 - frac) * self._at("post_logvar", t, xt)
        elif out.shape[1] == C:
            eps, log_var = out, self._at("large_var", t, xt).log().expand_as(xt)  # official "fixed large"
        else:
            raise ValueError(f"model output has {out.shape[1]} channels for {C}-channel latents (want {C} or {2 * C})")
        x0 = (xt - (1 - self._at("abar", t, xt)).sqrt() * eps) / self._at("abar", t, xt).sqrt()
        mean = self.q_posterior(x0, xt, t)[0]
        return dict(mean=mean, log_var=log_var, x0=x0, eps=eps)

    def vb_terms(self, out, x0, xt, t):
        """The VLB term per sample in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
        t > 0, the discretized decoder NLL of x_0 at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t)
        kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_var"]).flatten(1).mean(1) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, p["mean"], 0.5 * p["log_var"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x0, t, *, mask_frames=1, noise=None):
        """Mask diffusion: only frames mask_frames: are noised and scored; the model sees the clean frames
        beside them at the same t. model_fn(x_t, original_t) -> (B, C or 2C, T, ...). Returns per-sample
        (B,) terms mse, vb (learned variance only; the mean enters it stop-gradient) and loss = mse + vb."""
        m = mask_frames
        noise = torch.randn_like(x0[:, :, m:]) if noise is None else noise
        xt = torch.cat([x0[:, :, :m], self.q_sample(x0[:, :, m:], t, noise)], dim=2)
        out = model_fn(xt, self.original_t(t))
        C = x0.shape[1]
        terms = dict(mse=((noise - out[:, :C, m:]) ** 2).flatten(1).mean(1))
        if out.shape[1] == 2 * C:
            frozen = torch.cat([out[:, :C, m:].detach(), out[:, C:, m:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0[:, :, m:], xt[:, :, m:], t)
        terms["loss"] = terms["mse"] + terms.get("vb", 0)
        return terms

    def original_t(self, t):
        return torch.as_tensor(self.timestep_map, device=t.device)[t]

    @torch.no_grad()
    def sample(self, model_fn, noise, *, x_cond=None, method="ddpm", eta=0.0, generator=None, progress=False):
        """Reverse process from noise (B, C, T, ...). x_cond (B, C, m, ...): the clean first frames, put back
        after every step (as IRASim's pipeline). method: "ddpm" (ancestral, the model's variance) or "ddim"
        (eta 0: deterministic)."""
        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")
        m = 0 if x_cond is None else x_cond.shape[2]
        x = noise if x_cond is None else torch.cat([x_cond, noise[:, :, m:]], dim=2)
        steps = range(self.n_steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"{method} x{self.n_steps}")
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            # the coefficients at t[:1] broadcast over the batch: one gather, not B, per coefficient
            p, t = self.p_mean_variance(model_fn(x, self.original_t(t)), x, t[:1]), t[:1]
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if i > 0 else 0
            if method == "ddpm":
                x = p["mean"] + torch.exp(0.5 * p["log_var"]) * z
            else:
                ab, ab_prev = self._at("abar", t, x), self._at("abar_prev", t, x)
                sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                x = p["x0"] * ab_prev.sqrt() + (1 - ab_prev - sigma**2).sqrt() * p["eps"] + sigma * z
            if m:
                x = torch.cat([x_cond, x[:, :, m:]], dim=2)
        return x


# -----------------------------------------------------------------------------
# released checkpoints


def read_checkpoint(path, *, prefer="ema", trust_pickle=False):
    """A released or trained IRASim file -> {name: tensor}. The training script saves {"model", "ema", "opt",
    "args"} (args: the run's argparse Namespace); its evaluation loads "ema" when present, as we do by default
    (prefer="model" for the raw weights). A plain state dict is taken as it is."""
    if str(path).endswith(".safetensors"):  # one of our exports (train.py --backbone irasim): a backbone to adapt
        return hub.read_state_dict(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if isinstance(e, FileNotFoundError):
            raise hub.WeightsError(f"no IRASim checkpoint at {path}: download it (DESIGN.md section 12)") from e
        raise hub.WeightsError(f"{path} could not be read with weights_only=True ({type(e).__name__}: {e}); if you "
                               f"trust its source, pass trust_pickle=True") from e
    if isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt):
        ckpt = ckpt[prefer] if prefer in ckpt else ckpt["ema" if "ema" in ckpt else "model"]
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise hub.WeightsError(f"{path} holds no IRASim state dict (expected a {{name: tensor}} dict, or one under "
                               f"'ema' / 'model')")
    return ckpt


FRAME_ADA = ("embed_state.", "mask_emb_fn.")  # the released action conditioning's parameters


def load_irasim(path, config, *, prefer="ema", trust_pickle=False, device="cpu"):
    """An IRASim built from config with the weights of a released checkpoint, every key and shape checked
    (one error lists each missing, unexpected and mis-shaped tensor).

    A config whose action conditioning is not Frame-Ada (IRASim + DexAC, or none) takes the released backbone
    and leaves its Frame-Ada weights out, said in one line; its own conditioning module keeps its
    initialization (zero output: the released backbone's behaviour without actions, exactly). A checkpoint
    without action conditioning (an action-free base, e.g. miniature.py's) gives a Frame-Ada config IRASim's
    own Frame-Ada initialization (not zero: its embedding moves the model from the first step, as released)."""
    model = IRASim(config)
    sd = read_checkpoint(path, prefer=prefer, trust_pickle=trust_pickle)
    if config.action_mode != "frame-ada" and any(k.startswith(FRAME_ADA) for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith(FRAME_ADA)}
        print(f"{path}: its Frame-Ada weights ({', '.join(FRAME_ADA)}) left out: this model conditions on actions "
              f"with {config.action_mode!r}")
    hint = (f" (config: {config.n_blocks} blocks, dim {config.dim}, learn_sigma {config.learn_sigma}, input_size "
            f"{config.input_size}, num_frames {config.num_frames}, action_mode {config.action_mode!r})")
    fresh = ("action_cond.", *(FRAME_ADA if not any(k.startswith(FRAME_ADA) for k in sd) else ()))
    return hub.load_strict(model, sd, source=str(path), hint=hint, allow_missing=fresh).to(device)


def load_exported(path, device="cpu", dtype=None, base=None):
    """An IRASim exported by train.py (--backbone irasim) -> (IRASim in eval mode, info: the metadata dict), as
    model.load_exported for the Cosmos DiT. An export of new modules only (--trainable new) names its released
    backbone in info["base"]; `base` (a released checkpoint) overrides it."""
    sd, info = hub.read_export(path)
    if info.get("backbone") != "irasim":
        raise ValueError(f"{path} is not an IRASim export (backbone {info.get('backbone', 'cosmos')!r}): load it "
                         f"with sample.WorldModel")
    c = hub.config_from_json(IRASimConfig, info["model_config"])
    base = base or info.get("base")
    if base:
        model = load_irasim(base, c)
        backbone = tuple(k for k in model.state_dict() if not k.startswith("action_cond."))
        hub.load_strict(model, sd, source=str(path), allow_missing=backbone)
    else:
        model = hub.load_strict(IRASim(c), sd, source=str(path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), info


def main(argv=None):
    p = argparse.ArgumentParser(description="print an IRASim config and its parameter count")
    p.add_argument("--preset", default="XL", choices=sorted(PRESETS), help="size preset")
    p.add_argument("--action-mode", default="frame-ada", help="frame-ada, none, or a conditioning.MODES name")
    args = p.parse_args(argv)
    config = config_from_preset(args.preset, action_mode=args.action_mode)
    with torch.device("meta"):
        model = IRASim(config)
    print(asdict(config))
    print(f"IRASim-{args.preset}: {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.grid[0] * model.grid[1]} tokens per frame x {config.num_frames} frames")


if __name__ == "__main__":
    main()
