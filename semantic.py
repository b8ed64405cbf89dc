"""Semantic condition: DINOv3 ViT-L/16 patch features and Cosmos-Reason1 text embeddings (paper 4.5).

The DiT's cross-attention context is `[projected text ; projected DINO]` (B, 512 + P, 1024): latent
tokens are queries, both modalities keys and values. This file makes the parts:
1. `DinoV3`, DINOv3 ViT-L/16 (facebookresearch/dinov3; transformers `DINOv3ViTModel`) written out:
   patch embedding, cls + 4 register tokens, 2D RoPE on patch tokens only, LayerScale, final norm.
   Frozen; frames -> dense patch features (B, H/16 * W/16, 1024). Weights from the gated Hub repo
   (transformers layout), the original `.pth` (fused qkv) or a local path, with strict key checks.
2. Text in Cosmos-Predict2.5's layout: Cosmos-Reason1-7B (Qwen2.5-VL, 28 layers x 3584) over a chat
   prompt padded to 512 tokens, each layer normalized per token, concatenated -> (512, 100352).
   The 7B model runs only through optional `transformers` (`TextEncoder`); `TextEmbedder` caches one
   file per distinct prompt, or runs with no text at all.
3. `SemanticProjector`, owned by the DiT: Linear(1024 -> 1024) times the injection weight (0.2).

Deliberate changes: frames come in [-1, 1] (the tensors the video tokenizer takes) and the ImageNet
normalization happens inside; inference only (no mask token, no training-time RoPE coordinate
augmentation, no gradients); the text normalization runs in fp32 whatever the encoder's dtype.

Speed: `python bench.py dino`. Tests: `python -m pytest -q test_all.py -k Semantic`.
"""
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import hub

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
DINO_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------
# DINOv3 ViT

@dataclass
class DinoConfig:
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    n_heads: int = 16  # head_dim 64
    mlp_dim: int = 4096  # plain MLP with exact GELU (the larger DINOv3 models use SwiGLU)
    n_registers: int = 4  # "storage" tokens, after cls and before the patches
    rope_base: float = 100.0
    norm_eps: float = 1e-5


DINO_PRESETS = {"vitl16": DinoConfig(), "tiny": DinoConfig(dim=64, depth=2, n_heads=4, mlp_dim=256)}


def rope_2d(h, w, head_dim, base, device=None):
    """cos, sin (h*w, head_dim) of DINOv3's 2D RoPE in fp32. Patch centres are normalized to [-1, 1]
    per axis (any aspect ratio); head_dim/4 frequencies per axis, laid out [y, x] and tiled twice,
    which pairs channel i with i + head_dim/2 ("rotate half")."""
    periods = base ** (2 * torch.arange(head_dim // 4, device=device, dtype=torch.float32) / (head_dim // 2))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)  # (P, 2)
    angles = 2 * math.pi * coords[:, :, None] / periods  # (P, 2, head_dim/4)
    angles = angles.flatten(1).repeat(1, 2)  # (P, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the last P tokens of x (B, nh, L, hd); the L - P prefix tokens (cls, registers) pass."""
    n_prefix = x.shape[2] - cos.shape[0]
    prefix, patches = x[:, :, :n_prefix], x[:, :, n_prefix:]
    x1, x2 = patches.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([prefix, patches * cos + rotated * sin], dim=2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)  # DINOv3 masks the key bias to zero
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, rope):
        B, L, D = x.shape
        q, k, v = (lin(x).view(B, L, self.n_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3(nn.Module):
    """Frozen DINOv3 ViT: frames (B, 3, H, W) in [-1, 1] -> patch features (B, H/16 * W/16, dim), the
    final LayerNorm of the patch tokens, row-major over the (H/16, W/16) grid. Random weights as
    built (benchmarks, tests); `load_dino` for real ones."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.dim))
        self.register_tokens = nn.Parameter(0.02 * torch.randn(1, cfg.n_registers, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)  # frozen; no layer behaves differently in train mode
        self.eval()

    @torch.no_grad()
    def forward(self, frames):
        p = self.cfg.patch_size
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"DINOv3 expects RGB frames (B, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"DINOv3 expects float frames in [-1, 1], not {frames.dtype} (x / 127.5 - 1)")
        if frames.shape[2] % p or frames.shape[3] % p:
            raise ValueError(f"DINOv3 needs H and W that are multiples of {p}, got {frames.shape[2]}x"
                             f"{frames.shape[3]}: resize or crop the frames first (e.g. 288x512)")
        x = ((frames.float() + 1) / 2 - self.pixel_mean.float()) / self.pixel_std.float()  # ImageNet norm
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(B, -1, -1)
        x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, 1 + R + h*w, D)
        cos, sin = rope_2d(h, w, D // self.cfg.n_heads, self.cfg.rope_base, x.device)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)[:, 1 + self.cfg.n_registers:]  # (B, h*w, D)


# ------------------------------------------------------------------------------------------------
# DINOv3 weights: Hub (transformers layout) or original .pth, explicit key maps, strict checks

# transformers files store blocks as `layer.{i}` (in memory `model.layer.{i}`); {} is the block index
_HUB_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.bias",
    "layer.{}.norm1": "blocks.{}.norm1",
    "layer.{}.attention.q_proj": "blocks.{}.attn.q",
    "layer.{}.attention.k_proj": "blocks.{}.attn.k",
    "layer.{}.attention.v_proj": "blocks.{}.attn.v",
    "layer.{}.attention.o_proj": "blocks.{}.attn.proj",
    "layer.{}.layer_scale1.lambda1": "blocks.{}.ls1.gamma",
    "layer.{}.norm2": "blocks.{}.norm2",
    "layer.{}.mlp.up_proj": "blocks.{}.mlp.fc1",
    "layer.{}.mlp.down_proj": "blocks.{}.mlp.fc2",
    "layer.{}.layer_scale2.lambda1": "blocks.{}.ls2.gamma",
    "norm": "norm",
}
# original dinov3 checkpoint, after `attn.qkv` is split into q, k, v (see _split_qkv)
_ORIGINAL_KEYS = {
    "cls_token": "cls_token",
    "storage_tokens": "register_tokens",
    "patch_embed.proj": "patch_embed",
    **{f"blocks.{{}}.{name}": f"blocks.{{}}.{name}" for name in (
        "norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "ls1.gamma", "norm2", "mlp.fc1", "mlp.fc2",
        "ls2.gamma")},
    "norm": "norm",
}
_IGNORED = ("embeddings.mask_token", "mask_token", "rope_embed.periods")  # unused at inference / recomputed


def _rename(key, key_map):
    """Map one key through a {}-templated prefix map; None when no entry matches."""
    m = re.match(r"(layer|blocks)\.(\d+)\.", key)
    template = key.replace(m.group(0), m.group(1) + ".{}.", 1) if m else key
    for src, dst in key_map.items():
        if template == src or template.startswith(src + "."):
            new = dst + template[len(src):]
            return new.format(m.group(2)) if m else new
    return None


def _split_qkv(sd):
    """Original fused `blocks.{i}.attn.qkv` (3D, D) -> q, k, v. DINOv3 multiplies the qkv bias by a
    `bias_mask` that zeroes the key third, so the key bias is dropped and the mask is not needed."""
    out = {}
    for key, t in sd.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn\.)qkv\.(weight|bias|bias_mask)", key)
        if m is None:
            out[key] = t
        elif m.group(2) != "bias_mask":
            q, k, v = t.chunk(3, dim=0)
            out.update({m.group(1) + "q." + m.group(2): q, m.group(1) + "v." + m.group(2): v})
            if m.group(2) == "weight":
                out[m.group(1) + "k.weight"] = k
    return out


def convert_dino_state_dict(sd):
    """Hub-layout or original-layout state dict -> this file's names (unknown keys kept as they are)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items() if k.removeprefix("model.") not in _IGNORED}
    if any(k.startswith("blocks.") for k in sd):
        sd, key_map = _split_qkv(sd), _ORIGINAL_KEYS
    else:
        key_map = _HUB_KEYS
    return {(_rename(k, key_map) or k): v for k, v in sd.items()}


def resolve_dino_file(source=DINO_REPO, token=None, revision=None):
    """A local file, a folder holding model.safetensors, or a Hub repo id -> local file path (hub.resolve)."""
    return hub.resolve(source, files=(DINO_FILE,), what="DINOv3 weights", revision=revision, token=token,
                       where=f"DINOv3 is gated on the Hub: accept the licence on https://huggingface.co/{DINO_REPO} "
                             f"and log in (`hf auth login`) or set HF_TOKEN; or pass a local path to {DINO_FILE} "
                             f"or the original .pth.")


def load_dino(source=DINO_REPO, preset="vitl16", *, token=None, revision=None, device=None, dtype=None):
    """Build a frozen DinoV3 and load weights from a Hub repo id, a local .safetensors / .pth, or a folder."""
    if isinstance(preset, str) and preset not in DINO_PRESETS:
        raise ValueError(f"unknown DINOv3 preset {preset!r}; choose from {sorted(DINO_PRESETS)}")
    model = DinoV3(DINO_PRESETS[preset] if isinstance(preset, str) else preset)
    path = resolve_dino_file(source, token=token, revision=revision)
    sd = convert_dino_state_dict(hub.read_state_dict(path))
    hub.load_strict(model, sd, source=f"DINOv3 weights in {path}",
                    hint=f" of preset {preset!r} (is it the right preset and file?)")
    return model.to(device=device, dtype=dtype)


@torch.no_grad()
def conditioning_features(encoder, frames, chunk=16, dtype=None):
    """DINOv3 features of the conditioning frames, once per clip (never per denoising step): the data
    cache or the sampler calls this, the DiT only sees the result. frames (B, 3, H, W), or a video
    (B, 3, T, H, W) whose frame 0 conditions, in [-1, 1]; `chunk` frames per pass on the encoder's
    device. -> (B, P, dim), in `dtype` if given (bf16 at 288x512: 576 x 1024 x 2 B = 1.2 MB a clip)."""
    if frames.ndim == 5:
        frames = frames[:, :, 0]
    feats = torch.cat([encoder(f.to(encoder.pixel_mean.device)) for f in frames.split(chunk)])
    return feats if dtype is None else feats.to(dtype)


# ------------------------------------------------------------------------------------------------
# Text: Cosmos-Reason1 embeddings, cached per prompt; or no text at all

REASON1_ID = "nvidia/Cosmos-Reason1-7B"
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
TEXT_TOKENS = 512
TEXT_DIM = 28 * 3584  # 100352: Reason1's 28 layers x width 3584


def aggregate_hidden_states(hidden_states):
    """Cosmos-Reason1 layout from a causal LM's `output_hidden_states`: drop entry 0 (the token
    embeddings), normalize each layer per token `(h - mean) / (std + 1e-8)` over features (unbiased
    std, as torch.std), concatenate. (embeddings, layer_1 .. layer_n), each (B, L, W) -> (B, L, n*W) fp32."""
    if len(hidden_states) < 2:
        raise ValueError("need the embedding output plus at least one layer (output_hidden_states=True)")
    layers = [h.float() for h in hidden_states[1:]]
    return torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in layers], -1)


def prompt_token_ids(tokenizer, prompt, max_tokens=TEXT_TOKENS, system_prompt=SYSTEM_PROMPT):
    """Chat template (system + user, no generation prompt) -> ids right-padded / truncated to max_tokens."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                {"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         add_vision_id=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if tokenizer.pad_token_id is None:
        raise ValueError("the text tokenizer has no pad token; set tokenizer.pad_token")
    return ids + [tokenizer.pad_token_id] * (max_tokens - len(ids))


class TextEncoder:
    """A causal LM (default Cosmos-Reason1-7B) -> text embeddings (B, max_tokens, n_layers * width).

    No attention mask, as in Cosmos: pad tokens attend to the prompt and carry its information."""

    def __init__(self, model, tokenizer, encoder_id, max_tokens=TEXT_TOKENS, system_prompt=SYSTEM_PROMPT):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.encoder_id, self.max_tokens, self.system_prompt = encoder_id, max_tokens, system_prompt

    @classmethod
    def from_pretrained(cls, model_id=REASON1_ID, device=None, dtype=None, token=None, **kwargs):
        try:
            import transformers
        except ImportError as e:
            raise ImportError("computing text embeddings needs `pip install transformers` (and a GPU for "
                              "the 7B model); otherwise fill the cache elsewhere or use "
                              "TextEmbedder(mode='none')") from e
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id, token=token)
        if tokenizer.chat_template is None:  # Qwen2.5-VL may keep its template with the processor only
            processor = transformers.AutoProcessor.from_pretrained(model_id, token=token)
            tokenizer.chat_template = processor.chat_template
        load = dict(token=token, **({"dtype": dtype} if dtype is not None else {}))
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_id, **load)
        except ValueError:  # vision-language models such as Qwen2.5-VL are not registered as causal LMs
            model = transformers.AutoModelForImageTextToText.from_pretrained(model_id, **load)
        return cls(model.to(device), tokenizer, model_id, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts):
        ids = [prompt_token_ids(self.tokenizer, p, self.max_tokens, self.system_prompt) for p in prompts]
        ids = torch.tensor(ids, device=self.model.device)  # (B, max_tokens)
        out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        return aggregate_hidden_states(out.hidden_states)  # (B, max_tokens, n_layers * width)


class TextEmbedder:
    """Prompts -> text context (B, max_tokens, text_dim) for the DiT's `crossattn_proj`.

    mode "reason1": embeddings of `encoder_id`, read from `cache_dir` (one safetensors file per
      distinct prompt, named by a hash of encoder, system prompt, length and prompt), or computed by
      `encoder` (a TextEncoder) and saved there. A miss with no encoder is an error: embeddings are
      never silently replaced.
    mode "none": no text. Every prompt and the null prompt get one fixed embedding, zeros
      (max_tokens, text_dim), which crossattn_proj maps to GELU(bias) per token; text guidance is then
      a no-op (cond == uncond). A tiny DiT may use a small text_dim and max_tokens.
    The null embedding of classifier-free guidance is the empty prompt's "" (sample.py's --negative-prompt
    replaces it, as the official CFG does with its default negative prompt); training's text dropout uses
    zeros, as the official recipe does (train.drop_text).
    Storage is `dtype` (bf16: 512 x 100352 x 2 bytes = 103 MB per prompt), on the CPU."""

    def __init__(self, mode="reason1", *, cache_dir=None, encoder=None, encoder_id=REASON1_ID, text_dim=TEXT_DIM,
                 max_tokens=TEXT_TOKENS, dtype=torch.bfloat16):
        if mode not in ("reason1", "none"):
            raise ValueError(f"unknown text mode {mode!r}; choose 'reason1' or 'none'")
        self.mode, self.cache_dir, self.encoder, self.dtype = mode, cache_dir, encoder, dtype
        self.encoder_id = encoder.encoder_id if encoder is not None else encoder_id
        self.system_prompt = encoder.system_prompt if encoder is not None else SYSTEM_PROMPT
        self.shape = (max_tokens, text_dim)
        self.zeros = torch.zeros(1, *self.shape, dtype=dtype) if mode == "none" else None

    def cache_path(self, prompt):
        key = json.dumps([self.encoder_id, self.system_prompt, self.shape[0], prompt])
        return os.path.join(self.cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def _one(self, prompt):
        path = self.cache_path(prompt) if self.cache_dir else None
        if path and os.path.exists(path):
            emb = load_file(path)["embedding"]
        elif self.encoder is not None:
            emb = self.encoder([prompt])[0].to("cpu", self.dtype).contiguous()  # (max_tokens, text_dim)
            if path:
                os.makedirs(self.cache_dir, exist_ok=True)
                meta = {"prompt": prompt, "encoder": self.encoder_id}  # for people browsing the cache
                # atomic: data workers may race on the same prompt
                hub.atomic_save(path, lambda tmp: save_file({"embedding": emb}, tmp, metadata=meta))
        else:
            raise FileNotFoundError(f"no cached text embedding for {prompt!r} (encoder {self.encoder_id}) in "
                                    f"{self.cache_dir}: pass encoder=TextEncoder.from_pretrained() to "
                                    f"compute it, or use mode='none'")
        if tuple(emb.shape) != self.shape:
            raise ValueError(f"text embedding for {prompt!r} has shape {tuple(emb.shape)}, expected "
                             f"{self.shape} (max_tokens, text_dim = encoder layers x width)")
        return emb

    def __call__(self, prompts):
        """str or list of B prompts -> (B, max_tokens, text_dim)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.mode == "none":
            return self.zeros.expand(len(prompts), -1, -1)  # one buffer, no copy per sample
        return torch.stack([self._one(p) for p in prompts])

    def null(self, batch=1):
        """The unconditional text context for classifier-free guidance: (batch, max_tokens, text_dim)."""
        return self([""] * batch)


# ------------------------------------------------------------------------------------------------
# The trainable projection the DiT owns

class SemanticProjector(nn.Module):
    """DINOv3 patch features (B, P, in_dim) -> context tokens (B, P, out_dim) * injection weight.

    The paper's plain projection, scaled by a fixed weight (0.2; 0.6 in its ablation), appended after
    the projected text tokens. zero_init=True starts the projection at zero; note that even then the
    extra keys still take softmax mass (logit q.0 = 0), so the DiT's output changes at step 0."""

    def __init__(self, in_dim=1024, out_dim=1024, injection_weight=0.2, zero_init=False):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.injection_weight, self.zero_init = injection_weight, zero_init
        self.init_weights()

    def init_weights(self):
        """Explicit init, callable again after meta-device construction + to_empty."""
        if self.zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj.reset_parameters()

    def forward(self, feats):
        if feats.ndim != 3 or feats.shape[-1] != self.proj.in_features:
            raise ValueError(f"expected DINOv3 features (B, P, {self.proj.in_features}), "
                             f"got {tuple(feats.shape)}")
        return self.injection_weight * self.proj(feats.to(self.proj.weight.dtype))
