"""
The Cosmos-Predict2.5 video diffusion transformer, its rectified-flow objective and samplers, and the
loader for the official weights.

The network is NVIDIA's `MinimalV1LVGDiT` (parent `MiniTrainDIT`) as released in Cosmos-Predict2.5-2B,
written out small-layers-first: AdaLN-LoRA blocks (self-attention, cross-attention, MLP), a timestep
path whose AdaLN input is `RMSNorm(raw sinusoid)` while an MLP of the same sinusoid gives the LoRA
term, per-head RMSNorm on q and k, 3D RoPE with NTK-scaled frequencies, condition-mask and
padding-mask input channels, and an output unpatchify whose patch layout differs from the input's.
See DESIGN.md sections 1-2 for every number used here.

Departures from the official code, all deliberate:
- our own, shorter module names; `KEY_MAPS` below maps the official `.pt` and the diffusers names.
- the conditional-frame mask is passed per latent frame `(B, T)` and broadcast to the input channel.
- training sigmas are continuous (the official code snaps them to a 1/1000 grid).
- the official sampler is UniPC (order 2, bh2); `sample` offers it as "unipc" beside "euler" and
  "dpm++2m" (DPM-Solver++(2M), second order to the end, where UniPC takes a first-order last step).
- two extension points the official network lacks: `action_cond` (DexAC, see conditioning.py) and
  `semantic` (extra cross-attention context tokens, see semantic.py). Both default to None; the config's
  `action_mode` builds the first (`mlp` loads the released `robot/action-cond` embedders).

Numerics follow the official fp32 strategy (`use_wan_fp32_strategy`): the timestep MLP and its RMSNorm, every
block's AdaLN modulation, the final layer (modulation, LayerNorm and linear) and the action conditioning's
AdaLN heads (conditioning.py's `FP32_PARTS`) form the fp32 path, `FP32_MODULES`. It computes in fp32 with
autocast off; the blocks cast shift/scale/gate to the activation dtype, in which the modulation, attention and
MLP then run (RoPE is applied in fp32). Where we differ: the official code stores these weights in the model's
dtype and upcasts them per op (an fp32 autocast region); ours KEEP fp32 parameters whatever dtype the model is
cast to (`DiT._apply`, exact for bf16 checkpoints; train.py's `parallelize` gives them fp32 FSDP groups); the
official action embedders run in the model's dtype, ours in fp32; the official final layer returns fp32, ours
casts its output to the activation dtype, in which the samplers step.

`python model.py --preset cosmos2b` prints a config and its parameter count without allocating memory;
`python bench.py dit` measures speed and memory, and compares with diffusers.
"""

import argparse
import fnmatch
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import conditioning
import hub
import semantic as sem

# -----------------------------------------------------------------------------
# small layers


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_sinusoid(t, dim):
    """(...) float -> (..., dim) in fp32, laid out [cos | sin] with freq_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_angles(T, H, W, head_dim, *, ratios, device):
    """Angles of the 3D RoPE for a (T, H, W) token grid -> (T*H*W, head_dim) in fp32.

    head_dim splits as t | h | w with dim_h = dim_w = head_dim // 6 * 2; each axis uses NTK-scaled
    theta = 10000 * ratio ** (dim / (dim - 2)). The per-token layout is [t, h, w, t, h, w] so that the
    half-split rotation pairs channel i with channel i + head_dim / 2.
    """
    dim_h = dim_w = head_dim // 6 * 2
    dim_t = head_dim - dim_h - dim_w

    def axis(n, dim, ratio):
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        return torch.outer(torch.arange(n, device=device, dtype=torch.float32), freqs)  # (n, dim/2)

    t = axis(T, dim_t, ratios[0])[:, None, None, :].expand(T, H, W, -1)
    h = axis(H, dim_h, ratios[1])[None, :, None, :].expand(T, H, W, -1)
    w = axis(W, dim_w, ratios[2])[None, None, :, :].expand(T, H, W, -1)
    angles = torch.cat([t, h, w], dim=-1).reshape(T * H * W, head_dim // 2)
    return torch.cat([angles, angles], dim=-1)  # (L, head_dim)


def apply_rope(x, cos, sin):
    """Half-split ("rotate half") rotation in fp32. x (B, L, nh, hd), cos/sin (L, 1, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q and k; RoPE only when angles are given."""

    def __init__(self, dim, context_dim, n_heads, eps=1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.eps = n_heads, dim // n_heads, eps
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def kv(self, context):
        """context (B, M, context_dim) -> its keys (normed) and values, (B, M, nh, hd) each."""
        B, M, _ = context.shape
        k = self.k_norm(self.k(context).view(B, M, self.n_heads, self.head_dim))
        return k, self.v(context).view(B, M, self.n_heads, self.head_dim)

    def forward(self, x, context=None, rope=None, kv=None):
        """kv: this attention's (keys, values) of the context, computed beforehand (a rollout's text context is
        the same at every denoising step: DiT.cross_kv); else from context, or x (self-attention)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q(x).view(B, L, self.n_heads, self.head_dim))  # (B, L, nh, hd)
        k, v = self.kv(x if context is None else context) if kv is None else kv
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D -> r) -> Linear(r -> n*D), no biases; the AdaLN-LoRA term is added by the caller."""

    def __init__(self, dim, lora_dim, n):
        super().__init__()
        self.down = nn.Linear(dim, lora_dim, bias=False)
        self.up = nn.Linear(lora_dim, n * dim, bias=False)

    def forward(self, emb):
        with conditioning.no_autocast(emb.device):  # the fp32 path: computes in its (fp32) weights' dtype
            return self.up(self.down(F.silu(emb.to(self.down.weight.dtype))))


class Block(nn.Module):
    """Self-attention, cross-attention, MLP, each wrapped as x + gate * f(LN(x) * (1 + scale) + shift).

    forward runs the block's part of the fp32 path (its three AdaLN modulations: own FSDP groups in training),
    then `body`, the rest: one graph when compiled (compile_blocks), with no FSDP hook inside it.
    checkpoint_mlp: recompute the MLP sublayer (its norm, modulation and 4x-wide hidden activations, the
    block's largest) in the backward instead of storing it (train.py --ac mlp); the attentions keep theirs."""

    checkpoint_mlp = False

    def __init__(self, dim, context_dim, n_heads, mlp_ratio, lora_dim):
        super().__init__()
        self.self_attn = Attention(dim, dim, n_heads)
        self.cross_attn = Attention(dim, context_dim, n_heads)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio), bias=False)
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim, bias=False)
        self.mod_self_attn = AdaLNModulation(dim, lora_dim, 3)
        self.mod_cross_attn = AdaLNModulation(dim, lora_dim, 3)
        self.mod_mlp = AdaLNModulation(dim, lora_dim, 3)

    def forward(self, x, emb, adaln_lora, context, rope, kv=None):
        # x (B, T, HW, D); emb (B, T, D) and adaln_lora (B, T, 3D) are per latent frame, so they
        # broadcast over the HW tokens of their frame. As the official fp32 strategy: shift/scale/gate are
        # computed in fp32 and cast to the activation dtype, in which the rest of the block runs.
        mods = [m(emb) + adaln_lora for m in (self.mod_self_attn, self.mod_cross_attn, self.mod_mlp)]
        return self.body(x, mods, context, rope, kv)

    def body(self, x, mods, context, rope, kv=None):
        """The three sublayers, given their fp32 shift/scale/gate (B, T, 3D) each."""
        B, T, S, D = x.shape

        def sublayer(mod, f, x):
            shift, scale, gate = mod.type_as(x)[:, :, None].chunk(3, dim=-1)
            h = modulate(F.layer_norm(x, (D,), eps=1e-6), shift, scale)  # eq. 10: AdaLN
            return x + gate * f(h)

        attend = lambda h: self.self_attn(h.view(B, T * S, D), rope=rope).view(B, T, S, D)
        cross = lambda h: self.cross_attn(h.view(B, T * S, D), context, kv=kv).view(B, T, S, D)
        mlp = lambda h: self.fc2(F.gelu(self.fc1(h)))
        x = sublayer(mods[0], attend, x)
        x = sublayer(mods[1], cross, x)
        if self.checkpoint_mlp and torch.is_grad_enabled():
            return checkpoint(sublayer, mods[2], mlp, x, use_reentrant=False, preserve_rng_state=False)
        return sublayer(mods[2], mlp, x)


class FinalLayer(nn.Module):
    """LayerNorm, AdaLN modulation, Linear(D -> patch * C), all in fp32 (the fp32 path, as the official final
    layer); the output is cast to the activation dtype."""

    def __init__(self, dim, lora_dim, out_dim):
        super().__init__()
        self.mod = AdaLNModulation(dim, lora_dim, 2)
        self.linear = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x, emb, adaln_lora):
        D = x.shape[-1]
        with conditioning.no_autocast(x.device):
            shift, scale = (self.mod(emb) + adaln_lora[..., : 2 * D])[:, :, None].chunk(2, dim=-1)
            h = modulate(F.layer_norm(x.to(self.linear.weight.dtype), (D,), eps=1e-6), shift, scale)
            return self.linear(h).type_as(x)


# -----------------------------------------------------------------------------
# the DiT


@dataclass
class DiTConfig:
    in_channels: int = 16  # latent channels (16 for the Wan2.1 VAE; more for the pixel tokenizer)
    out_channels: int = 16
    dim: int = 2048
    n_blocks: int = 28
    n_heads: int = 16
    mlp_ratio: float = 4.0
    patch_spatial: int = 2
    patch_temporal: int = 1
    adaln_lora_dim: int = 256
    text_dim: int = 100352  # Cosmos-Reason1 embeddings: 28 layers x 3584
    context_dim: int = 1024  # cross-attention context width after the text projection
    max_size: tuple = (128, 240, 240)  # largest latent (T, H, W) the RoPE tables of the release cover
    rope_ratios: tuple = (1.0, 3.0, 3.0)  # NTK extrapolation ratios for (t, h, w)
    timestep_scale: float = 0.001  # the net sees t = sigma * 1000 * timestep_scale
    concat_padding_mask: bool = True
    # action conditioning (conditioning.py); "none" keeps exactly the official network
    action_mode: str = "none"  # "none" or one of conditioning.MODES
    action_dim: int = 57  # N, the width of one action (7 for the released robot/action-cond model)
    action_steps: int = 12  # T_a, actions per chunk
    action_norm: str = "zscore"  # zscore (statistics travel in the state dict), none, or scale
    action_scale: object = None  # norm "scale": a number or one per dimension (None: conditioning's default)
    actions_per_frame: int = 4  # actions per latent frame (the VAE's temporal compression): mlp, dexac-time
    sat_dim: int = 256  # C, the SAT token width
    action_dim_embedding: bool = True  # learned per-dimension embedding on the SAT tokens (our addition)
    # semantic condition (semantic.py): DINOv3 patch features appended to the cross-attention context
    semantic_dim: int = 0  # width of the image features (1024 for DINOv3 ViT-L/16); 0 turns the branch off
    semantic_weight: float = 0.2  # injection weight (the paper's default; 0.6 in its ablation)


PRESETS = {
    "cosmos2b": DiTConfig(),
    # a few million parameters: trains on 2 CPU cores (head_dim 64 keeps every RoPE axis > 2 channels)
    "tiny": DiTConfig(dim=256, n_blocks=6, n_heads=4, adaln_lora_dim=64, text_dim=64, context_dim=128,
                      max_size=(64, 128, 128)),
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# the fp32 path (the official fp32 strategy): these modules keep fp32 parameters whatever dtype the DiT is
# cast to, and compute in fp32; the action conditioning adds its own (its FP32_PARTS)
FP32_MODULES = ("t_linear_1", "t_linear_2", "t_norm", "blocks.*.mod_self_attn", "blocks.*.mod_cross_attn",
                "blocks.*.mod_mlp", "final")


class DiT(nn.Module):
    """Cosmos-Predict2.5 DiT. Optional extension points:

    action_cond(actions (B, T_a, N), x (B, T, H, W, D), frame_mask (B, T)) -> (x, emb_d, emb_3d), where
        emb_d (B, T, D) is added to the raw timestep sinusoid before `t_norm` and emb_3d (B, T, 3D) to the
        AdaLN-LoRA term (either may be None): exactly where Cosmos' action models inject actions.
    semantic(image_features (B, P, C_img)) -> (B, P, context_dim) tokens appended to the text context.
    Without modules passed in, the config builds them: action_mode (conditioning.build_action_cond) and
    semantic_dim > 0 (semantic.SemanticProjector). An action_cond module names the submodules that make
    emb_d / emb_3d in `FP32_PARTS`; they join the fp32 path.
    """

    def __init__(self, config, action_cond=None, semantic=None):
        super().__init__()
        c = self.config = config
        if c.dim % c.n_heads or (c.dim // c.n_heads) // 6 * 2 <= 2:
            raise ValueError(f"dim {c.dim} / n_heads {c.n_heads} must give a head_dim of at least 12")
        n_in = c.in_channels + 1 + int(c.concat_padding_mask)  # latents, condition mask, padding mask
        self.patch_embed = nn.Linear(n_in * c.patch_temporal * c.patch_spatial**2, c.dim, bias=False)
        self.t_linear_1 = nn.Linear(c.dim, c.dim, bias=False)
        self.t_linear_2 = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.t_norm = nn.RMSNorm(c.dim, eps=1e-6)
        self.text_proj = nn.Linear(c.text_dim, c.context_dim)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.context_dim, c.n_heads, c.mlp_ratio, c.adaln_lora_dim) for _ in range(c.n_blocks))
        self.final = FinalLayer(c.dim, c.adaln_lora_dim, c.patch_temporal * c.patch_spatial**2 * c.out_channels)
        if action_cond is None:
            action_cond = conditioning.build_action_cond(
                c.action_mode, c.dim, c.n_heads, n_dims=c.action_dim, steps=c.action_steps, norm=c.action_norm,
                scale=c.action_scale, width=c.sat_dim, dim_embedding=c.action_dim_embedding,
                per_frame=c.actions_per_frame)
        self.action_cond = action_cond
        if semantic is None and c.semantic_dim:
            semantic = sem.SemanticProjector(c.semantic_dim, c.context_dim, c.semantic_weight)
        self.semantic = semantic
        self._rope = {}  # (Tp, Hp, Wp, device) -> RoPE cos, sin (self.rope)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialization for training from scratch (a pretrained load overwrites it).

        xavier-uniform linears; the AdaLN modulations, the AdaLN-LoRA MLP output and the output layer are
        zero, so every block starts as the identity (DiT's adaLN-Zero). Extension modules own their init.
        """
        for name, m in self.named_modules():
            if name.startswith(("action_cond", "semantic")):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.t_linear_1.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, AdaLNModulation):
                nn.init.zeros_(m.up.weight)
        nn.init.zeros_(self.t_linear_2.weight)
        nn.init.zeros_(self.final.linear.weight)

    def fp32_modules(self):
        """[(name, module)] of the fp32 path: FP32_MODULES and the action conditioning's FP32_PARTS."""
        names = FP32_MODULES + tuple(f"action_cond.{n}" for n in getattr(self.action_cond, "FP32_PARTS", ()))
        return [(n, m) for n, m in self.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in names)]

    def _apply(self, fn, recurse=True):
        """Every cast and move (`to`, `bfloat16`, `half`, `to_empty`) comes through here: the fp32 path never
        drops below fp32. A lower target is redone from the original tensor, so fp32 weights are not rounded
        on the way (a bf16 checkpoint's weights are upcast exactly)."""
        keep = {id(t) for _, m in self.fp32_modules() for p in m.parameters() for t in (p, p.grad)
                if t is not None}

        def at_least_fp32(t):
            out = fn(t)
            if id(t) not in keep or not out.is_floating_point() or out.dtype.itemsize >= 4:
                return out
            return out.float() if t.is_meta or t.dtype.itemsize < 4 else t.to(out.device, torch.float32)
        return super()._apply(at_least_fp32, recurse)

    def check_input(self, x):
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"expected latents (B, {c.in_channels}, T, H, W), got shape {tuple(x.shape)}")
        _, _, T, H, W = x.shape
        if H % c.patch_spatial or W % c.patch_spatial or T % c.patch_temporal:
            raise ValueError(f"latent size (T, H, W) = {(T, H, W)} must be divisible by the patch size "
                             f"({c.patch_temporal}, {c.patch_spatial}, {c.patch_spatial})")
        if any(n > m for n, m in zip((T, H, W), c.max_size)):
            raise ValueError(f"latent size {(T, H, W)} exceeds the model's max_size {c.max_size}")

    def context(self, text, image_features=None, dtype=None):
        """The cross-attention context: the projected text (B, L, context_dim), then the image features' tokens;
        text cast to dtype (the activations'; default the weights')."""
        context = F.gelu(self.text_proj(text.to(dtype or self.patch_embed.weight.dtype)))
        if self.semantic is not None and image_features is not None:
            context = torch.cat([context, self.semantic(image_features).to(context.dtype)], dim=1)
        return context

    @torch.no_grad()
    def cross_kv(self, text, image_features=None):
        """Every block's cross-attention keys and values for this text (and image features): the same at every
        denoising step of a rollout chunk, so sampling computes them once per chunk (forward(..., kv=...))
        instead of once per step (the text projection alone is 100352 x 1024 per token at cosmos2b)."""
        context = self.context(text, image_features)
        return [block.cross_attn.kv(context) for block in self.blocks]

    def rope(self, Tp, Hp, Wp, device):
        """cos, sin of the 3D RoPE for a latent token grid, built once per grid size and device."""
        key = (Tp, Hp, Wp, str(device))
        if key not in self._rope:
            angles = rope_angles(Tp, Hp, Wp, self.config.dim // self.config.n_heads, ratios=self.config.rope_ratios,
                                 device=device)[:, None]  # (L, 1, hd)
            self._rope[key] = (angles.cos(), angles.sin())
        return self._rope[key]

    def forward(self, x, sigma, text=None, frame_mask=None, *, padding_mask=None, actions=None, image_features=None,
                kv=None):
        """Predict the flow velocity eps - x0.

        x (B, C, T, H, W) latents with conditional frames already clean; sigma (B,) or (B, T) noise level in
        [0, 1]; text (B, L, text_dim); frame_mask (B, T), 1 on conditional latent frames; padding_mask
        (B, 1, H', W') of any size, resized (nearest) to the latent grid, zeros when None. kv: cross_kv(text,
        image_features), given instead of text and image_features (a rollout chunk's steps share them).
        Returns (B, out_channels, T, H, W).
        """
        self.check_input(x)
        c = self.config
        B, _, T, H, W = x.shape
        pt, ps = c.patch_temporal, c.patch_spatial
        Tp, Hp, Wp = T // pt, H // ps, W // ps
        frame_mask = x.new_zeros(B, T) if frame_mask is None else frame_mask.to(x.dtype)
        channels = [x, frame_mask[:, None, :, None, None].expand(B, 1, T, H, W)]
        if c.concat_padding_mask:
            pm = x.new_zeros(B, 1, H, W) if padding_mask is None else \
                F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")
            channels.append(pm[:, :, None].expand(B, 1, T, H, W))
        x = torch.cat(channels, dim=1)  # (B, C_in, T, H, W)

        # patchify with channel as the OUTER index of each patch: (c, pt, ph, pw)
        x = x.view(B, -1, Tp, pt, Hp, ps, Wp, ps).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)
        x = self.patch_embed(x)  # (B, Tp, Hp, Wp, D)

        emb_d = emb_3d = None
        if self.action_cond is not None:
            if actions is None:
                raise ValueError("this model is action-conditioned: pass actions (B, T_a, N)")
            x, emb_d, emb_3d = self.action_cond(actions, x, frame_mask[:, ::pt])  # eq. 5-8 (and 7 on x)
        elif actions is not None:
            raise ValueError("actions were given to a model without action conditioning (config action_mode "
                             f"{c.action_mode!r}); build it with an action_mode from {sorted(conditioning.MODES)}")

        # the AdaLN inputs, on the fp32 path: per latent frame, sinusoid of t = sigma * 1000 * timestep_scale
        sigma = sigma.reshape(B, -1).expand(B, T)[:, ::pt]  # (B, Tp)
        with conditioning.no_autocast(x.device):
            sinusoid = timestep_sinusoid(sigma * 1000 * c.timestep_scale, c.dim).to(self.t_norm.weight.dtype)
            adaln_lora = self.t_linear_2(F.silu(self.t_linear_1(sinusoid)))  # (B, Tp, 3D)
            # eq. 9: the global action context enters the AdaLN inputs where Cosmos' action models add them
            sinusoid = sinusoid if emb_d is None else sinusoid + emb_d  # (B, Tp, D)
            adaln_lora = adaln_lora if emb_3d is None else adaln_lora + emb_3d
            emb = self.t_norm(sinusoid)  # (B, Tp, D), fp32 like adaln_lora

        if (kv is None) == (text is None):
            raise ValueError("give the DiT text (B, L, text_dim) or its precomputed kv (DiT.cross_kv), one of them")
        kvs = kv if kv is not None else [None] * len(self.blocks)
        context = self.context(text, image_features, x.dtype) if kv is None else None
        rope = self.rope(Tp, Hp, Wp, x.device)
        x = x.view(B, Tp, Hp * Wp, c.dim)
        for block, block_kv in zip(self.blocks, kvs):  # eq. 11: every block's AdaLN sees the action context
            x = block(x, emb, adaln_lora, context, rope, block_kv)
        x = self.final(x, emb, adaln_lora)  # (B, Tp, Hp*Wp, pt*ps*ps*C)

        # unpatchify with channel as the INNER index: (ph, pw, pt, c)
        x = x.view(B, Tp, Hp, Wp, ps, ps, pt, c.out_channels)
        return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(B, c.out_channels, T, H, W)


def compile_blocks(model, backend="inductor"):
    """torch.compile each block's body (Block.body: all of it but its fp32 AdaLN modulations, which FSDP
    shards as groups of their own, so their hooks stay outside the graph) -> model, changed in place. One
    graph per body, fullgraph (a graph break is an error, not a silent slowdown); parameter names unchanged.
    Call it after activation checkpointing wraps the blocks and before FSDP shards them (torchtitan's order)."""
    for block in model.blocks:
        block = getattr(block, "_checkpoint_wrapped_module", block)
        block.body = torch.compile(block.body, fullgraph=True, backend=backend)
    return model


# -----------------------------------------------------------------------------
# rectified flow: x_sigma = sigma * eps + (1 - sigma) * x0, the net predicts v = eps - x0


def shift_sigma(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def flow_loss(model_fn, x0, frame_mask=None, *, shift=5.0, cond_sigma=None, generator=None):
    """Per-sample rectified-flow loss (B,) and the training sigmas (B,).

    model_fn(x_in, sigma (B, T)) -> velocity. Sigma is logit-normal, shifted; conditional latent frames
    (frame_mask 1) enter clean, can get their own noise level cond_sigma (the released post-trained model
    uses 0.1), and are excluded from the loss by overwriting their prediction with the target.
    """
    B, _, T = x0.shape[:3]
    u = torch.sigmoid(torch.randn(B, device=x0.device, generator=generator))
    sigma = shift_sigma(u, shift)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    s = sigma.view(B, 1, 1, 1, 1).to(x0.dtype)
    x_sigma = s * eps + (1 - s) * x0  # eq. 3's interpolant between data and noise
    mask = x0.new_zeros(B, T) if frame_mask is None else frame_mask.to(x0.dtype)
    m = mask[:, None, :, None, None]
    x_in = m * x0 + (1 - m) * x_sigma
    sigma_frames = sigma[:, None].expand(B, T)
    if cond_sigma is not None:
        sigma_frames = torch.where(mask.bool(), torch.full_like(sigma_frames, cond_sigma), sigma_frames)
    target = eps - x0
    v = model_fn(x_in, sigma_frames)
    v = m * target + (1 - m) * v
    return ((v.float() - target.float()) ** 2).mean(dim=(1, 2, 3, 4)), sigma  # eq. 3: || v - (eps - x0) ||^2


def shifted_sigmas(n_steps, shift=5.0, sigma_max=0.999):
    """The official schedule: linspace(sigma_max, 0, n+1)[:-1], shifted, then a final 0. (n_steps + 1,)"""
    s = torch.linspace(sigma_max, 0, n_steps + 1)[:-1]
    return torch.cat([shift_sigma(s, shift), torch.zeros(1)])


def karras_sigmas(n_steps, sigma_max=200.0, sigma_min=0.01, rho=7.0):
    """Karras et al. schedule in EDM sigma, mapped to flow sigma by s / (1 + s), then a final 0. (n + 2,)

    as in the official base/post-trained inference: n_steps + 1 points (ramp arange(n + 1) / n), so the
    sampler makes n_steps + 1 network calls (diffusers' Karras schedule has n points, n calls).
    """
    ramp = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s / (1 + s), torch.zeros(1, dtype=torch.float64)]).float()


def guided(v_cond, v_uncond, guidance):
    """Classifier-free guidance as Cosmos defines it: v_c + g (v_c - v_u); g = 0 is the conditional one."""
    return v_cond + guidance * (v_cond - v_uncond)


SOLVERS = ("euler", "dpm++2m", "unipc")


def _unipc_update(x, points, s_to, x0_new=None):
    """One UniPC-bh2 step in data prediction (Zhao et al. 2023; diffusers' UniPCMultistepScheduler) from x
    at sigma points[0][0] to s_to. points: [(sigma, x0 prediction)], newest first, one (order 1) or two
    (order 2). Given x0_new, the prediction made at s_to, it is the corrector UniC, else the predictor UniP.
    """
    lam = lambda s: math.inf if s == 0 else math.log((1 - s) / s)  # log(alpha / sigma), alpha = 1 - s
    s, x0 = points[0]
    h = lam(s_to) - lam(s)
    phi = math.expm1(-h)  # B(h) of bh2; -1 at s_to = 0, where the update returns x0 plus its correction
    if len(points) == 2:
        r = (lam(points[1][0]) - lam(s)) / h  # < 0: the older point lies behind
        d = (points[1][1] - x0) / r
    if x0_new is None:
        res = 0.5 * d if len(points) == 2 else 0  # diffusers fixes rho = 1/2 for the order-2 predictor
    elif len(points) == 1:
        res = 0.5 * (x0_new - x0)
    else:  # rho solves [[1, 1], [r, 1]] rho = (b1, b2), the bh2 order conditions
        b1 = (phi / -h - 1) / phi
        b2 = 2 * ((phi / -h - 1) / -h - 0.5) / phi
        rho = (b1 - b2) / (1 - r)
        res = rho * d + (b1 - rho) * (x0_new - x0)
    return (s_to / s) * x - (1 - s_to) * phi * (x0 + res)


@torch.no_grad()
def sample(velocity_fn, noise, sigmas, *, solver="dpm++2m", x_cond=None, frame_mask=None, cond_sigma=None,
           return_trajectory=False):
    """Integrate the flow ODE from sigmas[0] to sigmas[-1] = 0.

    velocity_fn(x, sigma (B, T)) -> v; noise (B, C, T, H, W); sigmas (n + 1,) decreasing: n network calls.
    Conditional frames (frame_mask 1) are held at x_cond throughout and seen at cond_sigma when it is given.
    "euler": x <- x + (s' - s) v. The multistep solvers work in data prediction x0 = x - s v with log-SNR
    lambda = log((1 - s) / s) and take a first-order first step. "dpm++2m": DPM-Solver++(2M); lambda is
    infinite at s = 0, so its last step is a variable-step Adams-Bashforth-2 step in sigma. "unipc": the
    official sampler, UniPC-bh2 of order 2, whose predictor is the dpm++2m step and whose corrector UniC
    reuses each new v (no extra call); as diffusers' lower_order_final, the last step is first order, i.e.
    it returns the x0 predicted at the last sigma > 0. It equals diffusers' UniPCMultistepScheduler (flow
    sigmas, flow_prediction, bh2) on the same sigmas. Distance to the exact ODE solution (SciPy, test_all.py) at
    35 steps on a Gaussian mixture: Euler 0.071, unipc 0.031 (its first-order last step costs the most), dpm++2m
    0.016; at 10 steps or fewer the shifted schedule's large final jump makes all about equally wrong. Both
    multistep solvers are second order, but show it late (dpm++2m from about 1000 steps): the schedule's last
    steps stay about log 2 apart in lambda at any step count.
    The trajectory holds x at each sigma, where v was taken (unipc: before its correction).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    B, _, T = noise.shape[:3]
    mask = noise.new_zeros(B, T) if frame_mask is None else frame_mask.to(noise.dtype)
    m = mask[:, None, :, None, None]
    hold = (lambda x: x) if x_cond is None else (lambda x: m * x_cond + (1 - m) * x)
    sigmas = sigmas.tolist()
    x = hold(noise * sigmas[0])  # the flow's prior at sigma ~ 1 is (1 - sigma) * x0 + sigma * eps ~ eps
    trajectory, x0_prev, h_prev, v_prev, s_prev = [x], None, None, None, None
    points, used, x_last = [], None, None  # unipc: newest (sigma, x0) pairs, the last step's pairs and x
    lam = lambda s: math.log((1 - s) / s)
    n = len(sigmas) - 1
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        sig = torch.full((B, T), s, device=x.device, dtype=x.dtype)
        if cond_sigma is not None:
            sig = torch.where(mask.bool(), torch.full_like(sig, cond_sigma), sig)
        v = velocity_fn(x, sig)
        if solver == "euler":
            x = x + (s_next - s) * v
        elif solver == "unipc":
            points = [(s, x - s * v)] + points[:1]
            if i > 0:  # UniC: redo the last step with the x0 predicted at its end (v was taken before this)
                x = _unipc_update(x_last, used, s, points[0][1])
            used = points[: 1 if i in (0, n - 1) else 2]  # order 1 to warm up and last (lower_order_final)
            x_last, x = x, _unipc_update(x, used, s_next)
        else:
            x0 = x - s * v
            if s_next == 0 and v_prev is not None:
                # lambda = inf at s = 0: finish with a variable-step Adams-Bashforth-2 step in sigma
                k = (s_next - s) / (s - s_prev)
                x = x + (s_next - s) * ((1 + k / 2) * v - (k / 2) * v_prev)
            elif s_next == 0:
                x = x0
            else:
                h = lam(s_next) - lam(s)
                d = x0
                if x0_prev is not None:
                    r = h_prev / h
                    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
                x = (s_next / s) * x - (1 - s_next) * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
            v_prev, s_prev = v, s
        x = hold(x)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


# -----------------------------------------------------------------------------
# official weights: the Cosmos `.pt` (keys "net.<official name>") and the diffusers safetensors

# our name -> (official name, diffusers name); "{i}" is the block index
KEY_MAPS = {
    "patch_embed.weight": ("x_embedder.proj.1.weight", "patch_embed.proj.weight"),
    "t_linear_1.weight": ("t_embedder.1.linear_1.weight", "time_embed.t_embedder.linear_1.weight"),
    "t_linear_2.weight": ("t_embedder.1.linear_2.weight", "time_embed.t_embedder.linear_2.weight"),
    "t_norm.weight": ("t_embedding_norm.weight", "time_embed.norm.weight"),
    "text_proj.weight": ("crossattn_proj.0.weight", "crossattn_proj.0.weight"),
    "text_proj.bias": ("crossattn_proj.0.bias", "crossattn_proj.0.bias"),
    "final.mod.down.weight": ("final_layer.adaln_modulation.1.weight", "norm_out.linear_1.weight"),
    "final.mod.up.weight": ("final_layer.adaln_modulation.2.weight", "norm_out.linear_2.weight"),
    "final.linear.weight": ("final_layer.linear.weight", "proj_out.weight"),
    "blocks.{i}.fc1.weight": ("blocks.{i}.mlp.layer1.weight", "transformer_blocks.{i}.ff.net.0.proj.weight"),
    "blocks.{i}.fc2.weight": ("blocks.{i}.mlp.layer2.weight", "transformer_blocks.{i}.ff.net.2.weight"),
}
for ours, official, diffusers in [("self_attn", "self_attn", "attn1"), ("cross_attn", "cross_attn", "attn2")]:
    for a, b, d in [("q", "q_proj", "to_q"), ("k", "k_proj", "to_k"), ("v", "v_proj", "to_v"),
                    ("o", "output_proj", "to_out.0"), ("q_norm", "q_norm", "norm_q"), ("k_norm", "k_norm", "norm_k")]:
        KEY_MAPS[f"blocks.{{i}}.{ours}.{a}.weight"] = (f"blocks.{{i}}.{official}.{b}.weight",
                                                       f"transformer_blocks.{{i}}.{diffusers}.{d}.weight")
for ours, official, n in [("mod_self_attn", "adaln_modulation_self_attn", 1),
                          ("mod_cross_attn", "adaln_modulation_cross_attn", 2), ("mod_mlp", "adaln_modulation_mlp", 3)]:
    for a, b in [("down", 1), ("up", 2)]:
        KEY_MAPS[f"blocks.{{i}}.{ours}.{a}.weight"] = (f"blocks.{{i}}.{official}.{b}.weight",
                                                       f"transformer_blocks.{{i}}.norm{n}.linear_{b}.weight")

# the released action-conditioned model (robot/action-cond): our `mlp` mode <-> official names; diffusers has none
ACTION_KEY_MAP = {f"action_cond.embed_{ours}.fc{i}.{p}": f"action_embedder_B_{theirs}.fc{i}.{p}"
                  for ours, theirs in [("d", "D"), ("3d", "3D")] for i in (1, 2) for p in ("weight", "bias")}

IGNORED = ("pos_embedder.", "accum_", "_extra_state")  # buffers and counters in the official .pt

# short names for the files of DESIGN.md section 9
HUB_REPO = "nvidia/Cosmos-Predict2.5-2B"
HUB_FILES = {
    "base/post-trained": "base/post-trained/81edfebe-bd6a-4039-8c1d-737df1a790bf_ema_bf16.pt",
    "base/pre-trained": "base/pre-trained/d20b7120-df3e-4911-919d-db6e08bad31c_ema_bf16.pt",
    "robot/action-cond": "robot/action-cond/38c6c645-7d41-4560-8eeb-6f4ddc0e6574_ema_bf16.pt",
}


def resolve_file(spec, revision=None, token=None):
    """A local path (.pt, .safetensors, sharded folder or index .json), a short name from HUB_FILES, or
    "org/repo/path/in/repo" -> a local file path, through hub.resolve (huggingface_hub's cache, HF_TOKEN,
    HF_HUB_OFFLINE)."""
    if os.path.isdir(spec):  # a sharded diffusers checkpoint: hub.read_state_dict reads the folder
        return spec
    return hub.resolve(spec, names={k: (HUB_REPO, v) for k, v in HUB_FILES.items()}, what="DiT weights",
                       where=f"The short names are files of {HUB_REPO}.", revision=revision, token=token)


def convert_state_dict(sd, n_blocks):
    """Official (`net.` prefix optional) or diffusers keys -> our keys. Unknown keys are kept as they are,
    so the strict check (hub.load_strict) names them."""
    sd = {k.removeprefix("net."): v for k, v in sd.items() if not any(s in k for s in IGNORED)}
    fmt = 1 if any(k.startswith("transformer_blocks.") for k in sd) else 0
    rename = {} if fmt else {official: ours for ours, official in ACTION_KEY_MAP.items()}
    for ours, names in KEY_MAPS.items():
        for i in range(n_blocks) if "{i}" in ours else [None]:
            rename[names[fmt].format(i=i)] = ours.format(i=i)
    return {rename.get(k, k): v for k, v in sd.items()}


def state_dict_as(sd, layout, n_blocks):
    """Our keys -> the "official" (without the `net.` prefix) or the "diffusers" layout. Backbone keys only,
    plus the `mlp` action embedders in the official layout."""
    fmt = {"official": 0, "diffusers": 1}[layout]
    out = {} if fmt else {official: sd[ours] for ours, official in ACTION_KEY_MAP.items() if ours in sd}
    for ours, names in KEY_MAPS.items():
        for i in range(n_blocks) if "{i}" in ours else [None]:
            out[names[fmt].format(i=i)] = sd[ours.format(i=i)]
    return out


def materialize(module, device, name):
    """Give every part of module that the checkpoint did not hold (still on the meta device) real memory on
    `device` and its own initialization (`to_empty` + `init_weights`). A part must be missing whole."""
    tensors = list(module.parameters()) + list(module.buffers())
    if not any(t.is_meta for t in tensors):
        return
    if all(t.is_meta for t in tensors) and hasattr(module, "init_weights"):
        module.to_empty(device=device)
        module.init_weights()
        return
    own = [n for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
           if t.is_meta]
    if own:
        raise ValueError(f"the checkpoint holds only part of {name}: missing {', '.join(own)}")
    for child_name, child in module.named_children():
        materialize(child, device, f"{name}.{child_name}")


def load_dit(spec, config=None, *, revision=None, token=None, device="cpu", dtype=None, action_cond=None,
             semantic=None, action_stats=None):
    """Build the DiT on the meta device and load official weights into it (no second full copy).

    spec: local path (.pt, .safetensors, sharded folder or index .json), a short name from HUB_FILES, or
    "org/repo/path". The config's action conditioning is loaded from the checkpoint when it holds it (our
    checkpoints; the `mlp` embedders of robot/action-cond), otherwise initialized on `device`, zero-output.
    action_stats: a stats.json (`python data.py stats`) to set the action normalization from. Extension
    modules passed in keep their own initialization, on `device`.
    """
    path = resolve_file(spec, revision, token)
    config = config or PRESETS["cosmos2b"]
    if action_cond is not None and config.action_mode != "none":
        raise ValueError(f"pass either an action_cond module or a config action_mode, not both "
                         f"(action_mode is {config.action_mode!r})")
    if semantic is not None and config.semantic_dim:
        raise ValueError(f"pass either a semantic module or a config semantic_dim, not both "
                         f"(semantic_dim is {config.semantic_dim})")
    with torch.device("meta"):
        model = DiT(config)
    sd = convert_state_dict(hub.read_state_dict(path), config.n_blocks)
    if model.action_cond is None and any(k.startswith("action_cond.") for k in sd):
        raise ValueError(f"{path} holds action-conditioning weights: set the config's action_mode (the released "
                         f"robot/action-cond model: action_mode='mlp', action_dim=7)")
    hub.load_strict(model, sd, source=path, allow_missing=("action_cond.", "semantic."))
    for name in ("action_cond", "semantic"):
        if getattr(model, name) is not None:
            materialize(getattr(model, name), device, name)
    model.to(device=device, dtype=dtype)
    if action_cond is not None:
        model.action_cond = action_cond
    if semantic is not None:
        model.semantic = semantic
    if action_stats is not None:
        if model.action_cond is None:
            raise ValueError("action_stats given for a model without action conditioning (config action_mode)")
        model.action_cond.set_stats(*conditioning.load_stats_file(action_stats))
    return model


def load_exported(path, device="cpu", dtype=None, base=None):
    """A model exported by train.py (one safetensors file: EMA weights, the config and what sampling needs in
    its metadata) -> (DiT in eval mode, info: the metadata dict). Action statistics travel in the weights.

    An export of a run that trained only the new modules on a pretrained backbone (`--trainable new`) holds
    just those and names the backbone in info["base"]; `base` (a load_dit spec) overrides where it comes from.
    """
    sd, info = hub.read_export(path)
    if info.get("backbone", "cosmos") != "cosmos":
        raise ValueError(f"{path} is an export of the {info['backbone']} backbone, not a Cosmos DiT: load it with "
                         f"sample.WorldModel (sample.py and evaluate.py read the backbone from the file)")
    c = hub.config_from_json(DiTConfig, info["model_config"])
    base = base or info.get("base")
    if base:
        model = load_dit(base, c, device=device)
        backbone = tuple(k for k in model.state_dict() if not k.startswith(("action_cond.", "semantic.")))
        hub.load_strict(model, sd, source=str(path), allow_missing=backbone)
    else:
        with torch.device("meta"):
            model = DiT(c)
        hub.load_strict(model, sd, source=str(path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), info


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Print a DiT preset's config and parameter count (built on the meta "
                                            "device: no memory). Speed and memory: python bench.py dit.")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    with torch.device("meta"):
        m = DiT(config_from_preset(p.parse_args().preset))
    print(asdict(m.config))
    print(f"{sum(p.numel() for p in m.parameters()):,} parameters")
