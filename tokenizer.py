"""
The video tokenizer: the Wan2.1 causal 3D VAE, and a weightless pixel tokenizer with the same frame layout;
also the SDXL image VAE run per frame (IRASim's tokenizer, `SDXLVAE` / `load_sdxl_vae`; not a DiT tokenizer).

Cosmos-Predict2.5 denoises in the latent space of the Wan2.1 VAE (Cosmos calls it the "tokenizer"):
8x spatial and 4x temporal compression, 16 channels, causal in time so that frame 0 gets a latent frame of
its own: T = 4k + 1 frames become 1 + k latent frames (13 -> 4). We follow the public Wan2.1 code
(`wan/modules/vae.py`) and its diffusers port (`AutoencoderKLWan`) layer for layer. Parameter names are the
original checkpoint's, so `Wan2.1_VAE.pth` (= Cosmos' `tokenizer.pth`) loads as is; diffusers safetensors
load through one explicit key map.

Time is the subtle part. Every temporal conv is causal, and the model runs chunk by chunk: encoding sees
frame 0 alone, then 4 frames at a time; decoding one latent frame at a time. Each causal conv carries the
last 2 frames of its input over to the next chunk, and the temporal resamplers skip their conv on the
first chunk. That is how the weights were trained; the original's cacheless forward over a whole clip
skips temporal resampling and is wrong.

What we deliberately change:
- the state carried between chunks is an explicit `ChunkCache` (layer -> frames, plus a first-chunk flag),
  not a list walked by a running index with a "Rep" sentinel;
- `chunked=False` runs a whole clip in one pass with the same causal semantics (same result, more memory);
- encode returns the normalized posterior mean (no sampling); encode/decode run without autograd (frozen);
- a clip whose length is not 4k + 1 is an error (the original drops the extra frames), unless `pad=True`;
- RMS normalization runs in fp32 for bf16/fp16 inputs (as in diffusers);
- spatial tiling is a weighted average with linear ramps over the overlaps (diffusers blends, then crops).

Speed and memory: `python bench.py vae --device cuda --dtype bf16 --frames 13 61`.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub

TEMPORAL = 4  # pixel frames per latent frame, after the first
CACHE_T = 2  # frames of its input each causal conv carries to the next chunk (its time kernel is 3)

# per-channel mean and std of Wan2.1 posterior means: latents are z = (mu - mean) / std
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

HUB_REPO, HUB_FILE = "nvidia/Cosmos-Predict2.5-2B", "tokenizer.pth"
KNOWN_FILES = ("tokenizer.pth", "Wan2.1_VAE.pth", "diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors")
WHERE_TO_GET = (
    f"The Wan2.1 VAE is `{HUB_FILE}` in the Hub repo {HUB_REPO} (the same file as Wan2.1_VAE.pth): "
    f"`hf download {HUB_REPO} {HUB_FILE}` (accept the license on the model page and set HF_TOKEN if asked), "
    "or `vae/diffusion_pytorch_model.safetensors` in Wan-AI/Wan2.1-T2V-1.3B-Diffusers. Pass the local "
    f"path, or the repo id (weights='{HUB_REPO}') to download it through the Hub cache."
)


def latent_frames(frames: int, pad: bool = False) -> int:
    """Latent frames for a clip of T pixel frames: 1 + (T - 1) / 4. With pad, T rounds up to 4k + 1."""
    if frames < 1 or ((frames - 1) % TEMPORAL and not pad):
        raise ValueError(f"clips must have 4k + 1 frames (1, 5, 9, 13, ...), got {frames}; trim the clip, "
                         "or pass pad=True to repeat its last frame up to the next 4k + 1")
    return 1 + -(-(frames - 1) // TEMPORAL)


def check_video(video, spatial: int, pad: bool, per_frame: bool = False) -> torch.Tensor:
    """Validate a (B, 3, T, H, W) video in [-1, 1]; with pad, repeat its last frame up to 4k + 1 frames.
    per_frame: any number of frames (an image VAE sees each frame alone)."""
    if not torch.is_tensor(video) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"expected a video (B, 3, T, H, W), got {shape}; images are (B, 3, 1, H, W)")
    if not video.is_floating_point():
        raise TypeError(f"expected a float video in [-1, 1], got {video.dtype}; use uint8 / 127.5 - 1")
    T, H, W = video.shape[2:]
    if H % spatial or W % spatial:
        raise ValueError(f"height and width must be multiples of {spatial}, got {H}x{W}")
    if video.numel() and max(-v for v in torch.aminmax(video)) > 1.5:  # catches 0..255 floats
        raise ValueError("video values must lie in [-1, 1] (from uint8 pixels: video / 127.5 - 1)")
    if per_frame:
        return video
    missing = 1 + TEMPORAL * (latent_frames(T, pad) - 1) - T
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, missing, -1, -1)], 2) if missing else video


def check_latents(latents, channels: int) -> None:
    if not torch.is_tensor(latents) or latents.dim() != 5 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"expected latents (B, {channels}, T', H', W'), got {shape}")


# ---------------------------------------------------------------------------------------------------------
# layers


class ChunkCache:
    """What a causal pass carries from one time chunk to the next."""

    def __init__(self, first: bool = True):
        self.first = first  # on the first chunk the temporal resamplers skip their conv
        self.frames = {}  # layer -> the last frames of its input


class CausalConv3d(nn.Conv3d):
    """A 3D conv padded in time on the past side only (2 * p_t frames): frame t never sees t + 1."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__(c_in, c_out, kernel, stride)
        p_t, p_h, p_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_pad = (p_w, p_w, p_h, p_h, 2 * p_t, 0)  # F.pad order: W, H, T

    def forward(self, x, cache=None):  # (B, C, T, H, W) -> (B, C', T', H, W)
        pad = list(self.causal_pad)
        if cache is not None and pad[4] > 0:
            past = cache.frames.get(self)
            if past is not None:  # the previous chunk's frames replace (some of) the zero padding
                x = torch.cat([past, x], 2)
                pad[4] -= past.shape[2]
            cache.frames[self] = x[:, :, -CACHE_T:].clone()  # a view would keep the whole chunk alive
        return super().forward(F.pad(x, pad) if any(pad) else x)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalize over channels, times sqrt(C) and a learned gain."""

    def __init__(self, dim, images=False):  # gamma (C, 1, 1, 1) for video, (C, 1, 1) for frames
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x):
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


# In both blocks below the branch comes first in the final sum, as in the original: the sum takes that
# operand's memory layout, and the next conv's rounding depends on it (we match diffusers bit for bit).


class ResidualBlock(nn.Module):
    """[norm, SiLU, conv3, norm, SiLU, dropout, conv3] plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(c_out, c_out, 3, padding=1))
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cache=None):
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (nothing mixes across time)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C, H, W)
        qkv = self.to_qkv(h).reshape(B * T, 1, 3 * C, H * W).transpose(2, 3).contiguous()  # (B*T, 1, HW, 3C)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (B*T, 1, HW, C)
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return h.reshape(B, T, C, H, W).transpose(1, 2) + x


class Upsample2x(nn.Module):
    def forward(self, x):  # nearest-exact in fp32, as the original does
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """2x spatial down/upsampling of every frame; the '3d' modes add a 2x causal temporal step."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):  # nearest 2x, then a conv that halves the width
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right and bottom, then a stride-2 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # 2 * dim channels per frame, read as 2 frames
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # windows of 3 frames, stride 2, unpadded: the cache supplies the past
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache=None):
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        B, C, T, H, W = x.shape
        x = self.resample(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C', H', W')
        x = x.reshape(B, T, *x.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')
        return self._halve_frames(x, cache) if self.mode == "downsample3d" else x

    def _double_frames(self, x, cache):  # (B, C, T, H, W) -> (B, C, 2T, H, W), but the first chunk passes
        if cache is None:  # whole clip: frame 0 alone, then the rest as one chunk with no past
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self._double_frames(x[:, :, 1:], ChunkCache(first=False))], 2)
        if cache.first:
            return x
        B, C, T, H, W = x.shape
        x = self.time_conv(x, cache).reshape(B, 2, C, T, H, W)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frames t_a, t_b, (t+1)_a, ...

    def _halve_frames(self, x, cache):  # (B, C, T, H, W) -> (B, C, 1 + (T - 1) / 2, H, W)
        if cache is None:  # whole clip: frame 0 kept, then windows (0, 1, 2), (2, 3, 4), ...
            return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], 2)
        past = cache.frames.get(self)
        cache.frames[self] = x[:, :, -1:].clone()
        return x if cache.first else self.time_conv(torch.cat([past, x], 2))


def _run(layers, x, cache):
    """Apply layers in order, handing the chunk cache to those that carry state across time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


# ---------------------------------------------------------------------------------------------------------
# the VAE


@dataclass
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)  # per encoder stage; the decoder uses it reversed
    dropout: float = 0.0
    latents_mean: tuple | None = None  # None: Wan2.1's statistics when z_dim == 16, else zeros
    latents_std: tuple | None = None  # None: Wan2.1's statistics when z_dim == 16, else ones


WAN_PRESETS = {"full": WanVAEConfig(), "tiny": WanVAEConfig(base_dim=8, z_dim=4)}


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]  # 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                layers.append(Resample(c_out, mode))
        self.downsamples = nn.ModuleList(layers)
        self.middle = nn.ModuleList([ResidualBlock(c_out, c_out), AttentionBlock(c_out),
                                     ResidualBlock(c_out, c_out)])
        self.head = nn.ModuleList([RMSNorm(c_out), nn.SiLU(),
                                   CausalConv3d(c_out, 2 * cfg.z_dim, 3, padding=1)])

    def forward(self, x, cache=None):  # (B, 3, T, H, W) -> (B, 2z, 1 + (T - 1) / 4, H / 8, W / 8)
        x = self.conv1(x, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _run(layers, x, cache)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]  # 384, 384, 384, 192, 96
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        layers, temporal = [], cfg.temporal_downsample[::-1]
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            c_in = c_in // 2 if i > 0 else c_in  # the upsampler before this stage halved the width
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(c_out, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.ModuleList([RMSNorm(c_out), nn.SiLU(), CausalConv3d(c_out, 3, 3, padding=1)])

    def forward(self, x, cache=None):  # (B, z, T', h, w) -> (B, 3, 1 + 4 (T' - 1), 8h, 8w)
        x = self.conv1(x, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _run(layers, x, cache)
        return x


# Our names (= the original Wan2.1 names) -> diffusers' AutoencoderKLWan names, applied in order. The
# decoder's flat `upsamples` list becomes stages of resnets and one upsampler: see diffusers_key.
_TO_DIFFUSERS = [
    (r"^conv1\.", "quant_conv."), (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."), (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."), (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."), (r"\.residual\.6\.", ".conv2."), (r"\.shortcut\.", ".conv_shortcut."),
]


def diffusers_key(key: str, num_res_blocks: int = 2) -> str:
    """Our state-dict key -> the key of the same tensor in diffusers' AutoencoderKLWan."""
    for pattern, replacement in _TO_DIFFUSERS:
        key = re.sub(pattern, replacement, key)
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:  # stage s holds num_res_blocks + 1 resnets, then its upsampler
        s, r = divmod(int(m[1]), num_res_blocks + 2)
        part = f"resnets.{r}" if r <= num_res_blocks else "upsamplers.0"
        key = f"decoder.up_blocks.{s}.{part}.{m[2]}"
    return key


def resolve_weights(weights: str, filename=None, revision=None, token=None) -> str:
    """A local file, a local directory holding a known file, or a Hub repo id ('org/name'; its file
    `filename`, default tokenizer.pth, fetched by huggingface_hub: cache, token, HF_HUB_OFFLINE) -> a path."""
    return hub.resolve(weights, files=(filename,) if filename else KNOWN_FILES,
                       what="Wan2.1 VAE weights", where=WHERE_TO_GET, revision=revision, token=token)


def _tile_starts(size, tile, overlap):
    return [0] if size <= tile else [*range(0, size - tile, tile - overlap), size - tile]


def _ramp(n, o, first, last, device):  # (n,) weights rising over the first o entries, falling over the last o
    w, o = torch.ones(n, device=device), min(o, n)
    up = torch.arange(1, o + 1, device=device) / (o + 1)
    if o and not first:
        w[:o] = up
    if o and not last:
        w[-o:] = torch.minimum(w[-o:], up.flip(0))
    return w


def tiled_apply(fn, x, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply fn to overlapping spatial tiles of x (B, C, T, H, W) and blend the outputs: a weighted average
    whose weights ramp linearly across each overlap. fn maps (B, C, T, h, w) to (B, C', T', h * scale,
    w * scale); tile and overlap are in x's units and make whole outputs (scale 1/8 encodes, 8 decodes)."""
    H, W = x.shape[-2:]
    out = weight = None
    for top in _tile_starts(H, tile, overlap):
        for left in _tile_starts(W, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile])  # (B, C', T', h', w')
            if out is None:
                out = y.new_zeros(*y.shape[:3], round(H * scale), round(W * scale), dtype=torch.float32)
                weight = y.new_zeros(out.shape[-2:], dtype=torch.float32)
            i, j, o = round(top * scale), round(left * scale), round(overlap * scale)  # in output units
            w = (_ramp(y.shape[-2], o, top == 0, top + tile >= H, y.device)[:, None]
                 * _ramp(y.shape[-1], o, left == 0, left + tile >= W, y.device)[None, :])  # (h', w')
            out[..., i:i + y.shape[-2], j:j + y.shape[-1]] += y.float() * w
            weight[i:i + y.shape[-2], j:j + y.shape[-1]] += w
    return (out / weight).to(y.dtype)


class WanVAE(nn.Module):
    """The Wan2.1 VAE: (B, 3, T, H, W) in [-1, 1] <-> normalized latents (B, 16, 1 + (T - 1) / 4, H / 8,
    W / 8). Without load_weights it is randomly initialized (tests, timing)."""

    def __init__(self, config: WanVAEConfig | str = "full", tile_size: int = 0, tile_overlap: int = 64):
        super().__init__()
        if isinstance(config, str):
            if config not in WAN_PRESETS:
                raise ValueError(f"unknown Wan VAE preset {config!r}; choose from {sorted(WAN_PRESETS)}")
            config = WAN_PRESETS[config]
        self.config, z = config, config.z_dim
        self.latent_channels, self.temporal_compression = z, 2 ** sum(config.temporal_downsample)
        self.spatial_compression = 2 ** (len(config.dim_mult) - 1)
        if self.temporal_compression != TEMPORAL:
            raise ValueError(f"the chunked causal path needs 4x temporal compression, got {config}")
        self.tile_size, self.tile_overlap = tile_size, tile_overlap  # pixels; tile_size 0 turns tiling off
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # -> posterior (mu, log_var)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(config)
        mean = config.latents_mean or (WAN21_MEAN if z == 16 else (0.0,) * z)
        std = config.latents_std or (WAN21_STD if z == 16 else (1.0,) * z)
        if len(mean) != z or len(std) != z:
            raise ValueError(f"latents_mean and latents_std need {z} values each")
        # multiply by 1/std to normalize and divide by it to undo, bit for bit as the official code does
        self.register_buffer("mean", torch.tensor(mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, z, 1, 1, 1), persistent=False)

    def load_weights(self, weights: str, filename=None, revision=None, token=None) -> "WanVAE":
        """Load the original layout (Wan2.1_VAE.pth, Cosmos tokenizer.pth) or diffusers' safetensors,
        strictly: one error lists every missing key, unexpected key and bad shape, in the file's names."""
        path = resolve_weights(weights, filename, revision, token)
        sd, ours = hub.read_state_dict(path), self.state_dict()
        diffusers = any(k.startswith(("quant_conv.", "encoder.down_blocks.")) for k in sd)
        name = {k: diffusers_key(k, self.config.num_res_blocks) if diffusers else k for k in ours}
        hub.check_state_dict({name[k]: v for k, v in ours.items()}, sd, source=path, target=f"the Wan VAE "
                             f"{self.config}", hint=f" ({'diffusers' if diffusers else 'original'} layout)")
        self.load_state_dict({k: sd[name[k]] for k in ours})
        return self

    def _tiling(self, size):  # (tile, overlap) in pixels when a frame side exceeds a tile, else None
        s, tile, overlap = self.spatial_compression, self.tile_size, self.tile_overlap
        if not tile or size <= tile:
            return None
        if tile % s or overlap % s or not 0 <= 2 * overlap <= tile:
            raise ValueError(f"tile_size and tile_overlap must be multiples of {s} with 2 * overlap <= tile")
        return tile, overlap

    @torch.no_grad()
    def encode(self, video, *, pad=False, chunked=True, out_device=None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, z, 1 + (T - 1) / 4, H / 8, W / 8). The video moves to the model
        one chunk at a time and latents come back on out_device (default: the video's), so a long video can
        stay on the CPU. chunked=False runs the whole clip in one pass (same result, memory grows with T)."""
        video = check_video(video, self.spatial_compression, pad)
        tiling = self._tiling(max(video.shape[-2:]))
        run = lambda v: self._encode(v, chunked, out_device or video.device)  # noqa: E731
        return tiled_apply(run, video, *tiling, 1 / self.spatial_compression) if tiling else run(video)

    @torch.no_grad()
    def decode(self, latents, *, chunked=True, out_device=None) -> torch.Tensor:
        """(B, z, T', h, w) normalized latents -> (B, 3, 1 + 4 (T' - 1), 8h, 8w) pixels in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        s, tiling = self.spatial_compression, self._tiling(max(latents.shape[-2:]) * self.spatial_compression)
        run = lambda z: self._decode(z, chunked, out_device or latents.device)  # noqa: E731
        return tiled_apply(run, latents, tiling[0] // s, tiling[1] // s, s) if tiling else run(latents)

    def _stream(self, net, x, step, chunked):
        """Run the encoder or decoder over x (B, C, T, H, W) in time chunks, frame 0 alone and then `step`
        frames at a time, carrying the cache; yield each chunk's output."""
        w, cache = self.conv1.weight, ChunkCache() if chunked else None
        bounds = [0, *range(1, x.shape[2] + 1, step)] if chunked else [0, x.shape[2]]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield net(x[:, :, start:stop].to(w.device, w.dtype), cache)
            if cache is not None:
                cache.first = False

    def _encode(self, video, chunked, out_device):
        h = torch.cat(list(self._stream(self.encoder, video, TEMPORAL, chunked)), 2)  # (B, 2z, T', h, w)
        # the 1x1x1 conv sees all latent frames at once, as in the original: the same rounding, bit for bit
        mu = self.conv1(h)[:, :self.latent_channels]  # posterior mean
        return ((mu - self.mean) * self.inv_std).to(out_device)

    def _decode(self, latents, chunked, out_device):
        B, _, n, h, w = latents.shape
        s, wt = self.spatial_compression, self.conv2.weight
        out = torch.empty(B, 3, 1 + TEMPORAL * (n - 1), h * s, w * s, device=out_device, dtype=wt.dtype)
        z = self.conv2(latents.to(wt.device, wt.dtype) / self.inv_std + self.mean)  # (B, z, T', h, w)
        t = 0
        for x in self._stream(self.decoder, z, 1, chunked):  # one latent frame at a time
            out[:, :, t:t + x.shape[2]] = x.clamp_(-1, 1)  # (B, 3, 1 or 4, 8h, 8w)
            t += x.shape[2]
        return out


# ---------------------------------------------------------------------------------------------------------
# the SDXL VAE: IRASim's per-frame image tokenizer (DESIGN section 12)
#
# diffusers' AutoencoderKL with SDXL's config: 2D convs, GroupNorm and one single-head attention in the middle.
# Module names are those of the Hub file (vae/diffusion_pytorch_model.safetensors), so it loads with no key map;
# the few one-element lists (`downsamplers.0`, `attentions.0`, `to_out.0`) exist only to keep those names.

SDXL_REPO, SDXL_FILE = "stabilityai/stable-diffusion-xl-base-1.0", "vae/diffusion_pytorch_model.safetensors"
SDXL_NAMES = {"sdxl": (SDXL_REPO, SDXL_FILE)}  # short name -> (Hub repo, file in it)
SDXL_WHERE = (f"The SDXL VAE is `{SDXL_FILE}` in the Hub repo {SDXL_REPO}: `hf download {SDXL_REPO} {SDXL_FILE}`, "
              "then pass the local path (or its folder), or pass 'sdxl' to fetch it through the Hub cache.")


@dataclass
class SDXLVAEConfig:
    channels: tuple = (128, 256, 512, 512)  # block_out_channels: one resolution per entry, 2x between them
    layers: int = 2  # resnets per encoder resolution; the decoder has one more
    latent_channels: int = 4
    groups: int = 32  # GroupNorm groups; must divide every width
    eps: float = 1e-6  # GroupNorm eps
    scaling_factor: float = 0.13025  # latents = posterior * scaling_factor (SDXL has no shift)


SDXL_PRESETS = {"sdxl": SDXLVAEConfig(), "tiny": SDXLVAEConfig(channels=(16, 32, 32, 32), layers=1, groups=8)}


class SDXLResBlock(nn.Module):
    """[GroupNorm, SiLU, conv3, GroupNorm, SiLU, conv3] plus a 1x1 conv shortcut when the width changes."""

    def __init__(self, c_in, c_out, cfg: SDXLVAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.groups, c_in, eps=cfg.eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.groups, c_out, eps=cfg.eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):  # (N, C, H, W) -> (N, C', H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class SDXLAttention(nn.Module):
    """Single-head self-attention over the H*W positions of one image, GroupNorm in front, residual around."""

    def __init__(self, dim, cfg: SDXLVAEConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.groups, dim, eps=cfg.eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (f(h).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C): one head
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C)
        # branch first: the sum takes its (channels-last) memory layout, on which the next conv's rounding depends
        return self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W) + x


class SDXLResample(nn.Module):
    """2x down: pad right and bottom by one, then a stride-2 conv. 2x up: nearest neighbour, then a conv."""

    def __init__(self, dim, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(dim, dim, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class SDXLStage(nn.Module):
    """One resolution: n resnets, then (resample 'down' or 'up') a 2x resampler, as `{down,up}samplers.0`."""

    def __init__(self, c_in, c_out, n, cfg: SDXLVAEConfig, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(SDXLResBlock(c_in if i == 0 else c_out, c_out, cfg) for i in range(n))
        self.resample = resample
        if resample:
            setattr(self, f"{resample}samplers", nn.ModuleList([SDXLResample(c_out, up=resample == "up")]))

    def forward(self, x):
        for block in self.resnets:
            x = block(x)
        return getattr(self, f"{self.resample}samplers")[0](x) if self.resample else x


class SDXLMidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, dim, cfg: SDXLVAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([SDXLResBlock(dim, dim, cfg), SDXLResBlock(dim, dim, cfg)])
        self.attentions = nn.ModuleList([SDXLAttention(dim, cfg)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class SDXLEncoder(nn.Module):
    def __init__(self, cfg: SDXLVAEConfig):
        super().__init__()
        ch, last = cfg.channels, len(cfg.channels) - 1
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(SDXLStage(c_in, c_out, cfg.layers, cfg, "down" if i < last else None)
                                         for i, (c_in, c_out) in enumerate(zip((ch[0], *ch[:-1]), ch)))
        self.mid_block = SDXLMidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # (N, 3, H, W) -> (N, 2z, H/8, W/8): posterior mean and log-variance
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class SDXLDecoder(nn.Module):
    def __init__(self, cfg: SDXLVAEConfig):
        super().__init__()
        ch, last = cfg.channels[::-1], len(cfg.channels) - 1  # 512, 512, 256, 128
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = SDXLMidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList(SDXLStage(c_in, c_out, cfg.layers + 1, cfg, "up" if i < last else None)
                                       for i, (c_in, c_out) in enumerate(zip((ch[0], *ch[:-1]), ch)))
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z):  # (N, z, h, w) -> (N, 3, 8h, 8w)
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# the mid-block attention's names in files saved before diffusers 0.14 (its loader renames them the same way)
SDXL_OLD_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def sdxl_key(name):
    """A key of an SDXL VAE file in the current diffusers layout, from either attention naming."""
    head, _, tail = name.rpartition("attentions.0.")
    for old, new in SDXL_OLD_ATTENTION.items():
        if head and tail.startswith(old):
            return head + "attentions.0." + new + tail[len(old):]
    return name


class SDXLVAE(nn.Module):
    """The SDXL VAE applied to each frame of a video: (B, 3, T, H, W) in [-1, 1] <-> scaled latents
    (B, 4, T, H / 8, W / 8), any T (no temporal compression). Frames of all clips are flattened and run
    chunk_frames at a time, which bounds activation memory. Without load_weights it is randomly initialized.
    Run it in fp32 or bf16: in fp16 the SDXL VAE overflows (diffusers upcasts it, `force_upcast`)."""

    def __init__(self, config: SDXLVAEConfig | str = "sdxl", chunk_frames: int = 8):
        super().__init__()
        if isinstance(config, str):
            if config not in SDXL_PRESETS:
                raise ValueError(f"unknown SDXL VAE preset {config!r}; choose from {sorted(SDXL_PRESETS)}")
            config = SDXL_PRESETS[config]
        if any(c % config.groups for c in config.channels):
            raise ValueError(f"groups={config.groups} must divide every width in channels={config.channels}")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        z = config.latent_channels
        self.config, self.chunk_frames, self.scaling_factor = config, chunk_frames, config.scaling_factor
        self.latent_channels, self.temporal_compression = z, 1
        self.spatial_compression = 2 ** (len(config.channels) - 1)
        self.encoder = SDXLEncoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = SDXLDecoder(config)

    def load_weights(self, weights: str = "sdxl", revision=None, token=None) -> "SDXLVAE":
        """Load diffusers' AutoencoderKL layout (the Hub file) strictly: one error lists every missing key,
        unexpected key and bad shape. weights: a file, a folder holding it (the repo or its vae/), 'sdxl',
        or a Hub repo id."""
        path = hub.resolve(weights, files=(SDXL_FILE, "diffusion_pytorch_model.safetensors"), names=SDXL_NAMES,
                           what="SDXL VAE weights", where=SDXL_WHERE, revision=revision, token=token)
        layout = f"diffusers' AutoencoderKL layout, as in {SDXL_REPO}/{SDXL_FILE}"
        sd = {sdxl_key(k): v for k, v in hub.read_state_dict(path).items()}
        hub.load_strict(self, sd, source=path, hint=f" {self.config} (expected {layout})")
        return self

    def _per_frame(self, fn, x, out_device):
        """fn over the B*T frames of x (B, C, T, H, W), chunk_frames at a time (a chunk may span clips) ->
        (B, C', T, H', W') on out_device. Only one chunk is ever on the model's device."""
        B, _, T = x.shape[:3]
        w, out = self.quant_conv.weight, None
        for start in range(0, B * T, self.chunk_frames):
            ids = [divmod(i, T) for i in range(start, min(start + self.chunk_frames, B * T))]  # (clip, frame)
            y = fn(torch.stack([x[b, :, t] for b, t in ids]).to(w.device, w.dtype))  # (n, C', H', W')
            if out is None:
                out = y.new_empty(B, y.shape[1], T, *y.shape[2:], device=out_device)
            for (b, t), frame in zip(ids, y):
                out[b, :, t] = frame
        return out

    @torch.no_grad()
    def encode(self, video, *, sample=False, generator=None, out_device=None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H / 8, W / 8): the posterior mean times scaling_factor, or
        with sample=True a draw mean + std * noise (as IRASim trains; noise from generator, one draw per chunk,
        so that one chunk of B * T frames draws what diffusers' latent_dist.sample(generator) draws)."""
        video = check_video(video, self.spatial_compression, pad=False, per_frame=True)

        def encode_frames(x):  # (N, 3, H, W) -> (N, z, h, w)
            mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # (N, z, h, w) each
            if sample:
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
                device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
                mean = mean + std * noise.to(mean.device)
            return mean * self.scaling_factor

        return self._per_frame(encode_frames, video, out_device or video.device)

    @torch.no_grad()
    def decode(self, latents, *, out_device=None) -> torch.Tensor:
        """(B, 4, T, h, w) scaled latents -> (B, 3, T, 8h, 8w) pixels, clamped to [-1, 1]."""
        check_latents(latents, self.latent_channels)

        def decode_frames(z):  # (N, z, h, w) -> (N, 3, 8h, 8w); divided, not multiplied by 1 / s, as pipelines do
            return self.decoder(self.post_quant_conv(z / self.scaling_factor)).clamp_(-1, 1)

        return self._per_frame(decode_frames, latents, out_device or latents.device)


def load_sdxl_vae(spec: str = "sdxl", config: SDXLVAEConfig | str = "sdxl", chunk_frames: int = 8,
                  revision=None, token=None) -> SDXLVAE:
    """The SDXL VAE with weights from spec ('sdxl' = SDXL_REPO/SDXL_FILE through the Hub cache, a local file
    or folder, or a Hub repo id), in eval mode."""
    vae = SDXLVAE(config, chunk_frames).load_weights(spec, revision=revision, token=token).eval()
    print(f"SDXL VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters, "
          f"{vae.spatial_compression}x spatial, per frame, scaling factor {vae.scaling_factor}")
    return vae


# ---------------------------------------------------------------------------------------------------------
# the pixel tokenizer


class PixelTokenizer(nn.Module):
    """Weightless, exactly invertible space-to-depth with the VAE's latent frame structure.

    temporal 4 (the Wan VAE's structure, the Cosmos backbone): latent frame 0 holds pixel frame 0; latent frame
    k >= 1 holds frames 4k - 3 .. 4k. Each latent frame is 4 time slots x s x s pixels x 3 colours = 12 s^2
    channels, ordered (colour, slot, row, column). Frame 0 is copied into all 4 slots of latent frame 0, so that
    every latent frame looks alike; decode reads the last slot. temporal 1 (an image VAE's structure, the SDXL
    VAE's for IRASim): one latent frame per frame, 3 s^2 channels. Latent values are (pixel - mean) / std for
    pixels in [-1, 1]: as the VAE normalizes its latents, so that the data is not drowned in the unit-variance
    noise of the flow (mean 0, std 1: the pixels themselves, and the round trip is exact)."""

    def __init__(self, spatial_compression: int = 8, mean: float = 0.0, std: float = 1.0, temporal: int = TEMPORAL):
        super().__init__()
        if spatial_compression < 1:
            raise ValueError(f"spatial_compression must be >= 1, got {spatial_compression}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        if temporal not in (1, TEMPORAL):
            raise ValueError(f"temporal must be 1 (per frame) or {TEMPORAL} (the video VAE's), got {temporal}")
        self.spatial_compression, self.temporal_compression = spatial_compression, temporal
        self.latent_channels = 3 * temporal * spatial_compression**2
        self.mean, self.std = float(mean), float(std)

    def encode(self, video, *, pad=False) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 3 n s^2, T', H/s, W/s)
        s, n = self.spatial_compression, self.temporal_compression
        video = check_video(video, s, pad, per_frame=n == 1)
        B, _, _, H, W = video.shape
        first = video[:, :, :1].expand(-1, -1, n, -1, -1)  # frame 0 in all n slots
        x = torch.cat([first, video[:, :, 1:]], 2)  # (B, 3, n T', H, W)
        x = x.reshape(B, 3, -1, n, H // s, s, W // s, s)  # (B, 3, T', n, h, s, w, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, 3, n, s, s, T', h, w)
        x = x.reshape(B, self.latent_channels, -1, H // s, W // s)
        return x if (self.mean, self.std) == (0.0, 1.0) else (x - self.mean) / self.std

    def decode(self, latents) -> torch.Tensor:  # (B, 3 n s^2, T', h, w) -> (B, 3, 1 + n (T' - 1), sh, sw)
        check_latents(latents, self.latent_channels)
        s, n, (B, _, T, h, w) = self.spatial_compression, self.temporal_compression, latents.shape
        latents = latents if (self.mean, self.std) == (0.0, 1.0) else latents * self.std + self.mean
        x = latents.reshape(B, 3, n, s, s, T, h, w)  # (B, 3, n, s, s, T', h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, 3, T', n, h, s, w, s)
        x = x.reshape(B, 3, n * T, h * s, w * s)
        return torch.cat([x[:, :, n - 1:n], x[:, :, n:]], 2).clamp(-1, 1)


TOKENIZERS = ("wan2.1", "sdxl", "pixel")


def build_tokenizer(name: str, **kwargs) -> nn.Module:
    """'wan2.1': WanVAE(config='full'|'tiny'|WanVAEConfig, tile_size=0, tile_overlap=64), loaded from
    `weights` (a path or Hub repo id, with filename, revision, token) when given, else random.
    'sdxl': SDXLVAE(config='sdxl'|'tiny'|SDXLVAEConfig, chunk_frames=8), the same way (IRASim's).
    'pixel': PixelTokenizer(spatial_compression=8, mean=0.0, std=1.0, temporal=4)."""
    if name == "pixel":
        return PixelTokenizer(**kwargs)
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {TOKENIZERS}")
    weights = kwargs.pop("weights", None)
    load = {k: kwargs.pop(k) for k in ("filename", "revision", "token") if k in kwargs}
    if name == "sdxl":
        vae = SDXLVAE(**kwargs)
        return vae.load_weights(weights, **{k: v for k, v in load.items() if k != "filename"}) if weights else vae
    vae = WanVAE(**kwargs)
    return vae.load_weights(weights, **load) if weights else vae
