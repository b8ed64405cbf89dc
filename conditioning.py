"""
The 57-D dexterous action (paper section 4.3) and DexAC, the structured conditioning of the Cosmos-Predict2.5
DiT on it (section 4.4), with the MLP baselines it replaces.

The action, from poses (our reading where the paper is silent, DESIGN.md section 6): layout
`[left wrist 9 | left fingers 15 | right wrist 9 | right fingers 15 | head 9]`; wrist/head = `inv(P_t) @
P_{t+1}` as translation 3 + rotation 6D; 6D = the first two COLUMNS of R, `[R00, R10, R20, R01, R11, R21]`;
fingers = the 5 fingertips expressed in their own wrist frame at t and t+1, difference (3 each, thumb..little).
Actions are raw (metres, unitless 6D); the model normalizes them per dimension (eq. 4) with `stats.json`.

An action chunk `(B, T_a, N)` (12 steps of the 57-D dexterous action) becomes conditioning for a DiT
whose tokens are `(B, T, H, W, D)` right after patch embedding. Every mode returns `(x, emb_d, emb_3d)`:
the tokens (possibly refined), a `(B, T, D)` term the DiT adds to the raw timestep sinusoid before its
RMSNorm, and a `(B, T, 3D)` term it adds to the AdaLN-LoRA term: exactly where Cosmos' action models
inject actions. Conditional latent frames (frame_mask 1) receive nothing, in every mode.

What follows the paper (sections 4.3-4.4, reconstructed in DESIGN.md section 4):
- dimension-wise z-score normalization (eq. 4), with the ablations `none` and `scale` (x200);
- the Structured Action Tokenizer, SAT (eq. 5-6): one shared Linear(1 -> C) per scalar entry, a learnable
  linear fusion over the T_a steps, GELU: one token per action dimension, C = 256;
- local action refinement (eq. 7): the tokens are projected to the DiT width and every latent token
  queries them by cross-attention, right after patch embedding;
- global action modulation (eq. 8-9): a learnable query attends over the tokens; the context feeds the
  AdaLN inputs of every block (the sinusoid term and the AdaLN-LoRA term), zero on conditional frames;
- baselines: `mlp`, Cosmos-Predict2.5's `ActionChunkConditionedMinimalV1LVGDiT` embedder (4 actions per
  latent frame, loads the released `robot/action-cond` weights), and `mlp-flat`, the paper's 22.39M MLP.

Our decisions (the paper is silent or lost):
- a learned per-dimension embedding `(N, C)` is added to the SAT tokens (switchable): cross-attention is
  permutation invariant, and the paper's tokens carry no sign of WHICH dimension they come from;
- every output layer that touches the DiT is zero-initialized (the `mlp` baselines too), so adding any
  mode to a pretrained backbone changes nothing at step 0;
- two time-aware SATs beside the faithful one, whose tokens are rank one in time (each a function of one
  weighted sum of its dimension's series, so two trajectories with equal sums condition identically):
  `dexac-channel` reads eq. 6's fusion per channel, weights (T_a, C), so channel c of a token is its own
  weighted sum (one token per dimension still, up to min(T_a, C) functionals of the trajectory);
  `dexac-time` gives each dimension one token per latent frame, from a Linear(k -> C) over the k = 4 actions
  of that frame, and every latent frame attends to (and is modulated by) its own actions only, as in Cosmos'
  chunk MLP;
- the normalization statistics live in the module's state as the bit patterns of fp32 values (int32
  buffers): they travel with every state dict, and casting the model to bf16 cannot round them (a 6D
  rotation entry near 1 with a std of 1e-4 would otherwise normalize to garbage);
- the parts that produce the AdaLN terms emb_d / emb_3d (each mode's `FP32_PARTS`: the MLP embedders, DexAC's
  tokenizer and global modulation) belong to the DiT's fp32 path (model.py, `FP32_MODULES`): fp32 parameters
  whatever dtype the model is cast to, fp32 compute with autocast off, as the official code computes the AdaLN
  inputs. (The official action embedders run before its fp32 region, in the model's dtype; only their sums
  with the timestep terms are fp32.) Local refinement keeps the activation dtype: it works on every latent
  token, like the DiT's own attention, and its update joins the residual stream in that dtype.
Costs: `python bench.py costs` prints parameters and FLOPs per component beside the paper's Table 6.
"""

import contextlib
import hashlib
import itertools
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = {
    "mlp": "Cosmos-Predict2.5 chunk MLP, 4 actions per latent frame (loads robot/action-cond)",
    "mlp-flat": "the paper's flat MLP baseline: Mlp(T_a * N -> 4D -> D), broadcast over latent frames",
    "dexac": "the paper: SAT tokens, local refinement and global modulation",
    "dexac-no-local": "DexAC without local refinement", "dexac-no-global": "DexAC without global modulation",
    "dexac-time": "DexAC with the time-aware SAT: tokens per action dimension and latent frame",
    "dexac-channel": "DexAC with the per-channel temporal fusion (weights T_a x C): one token per dimension that "
                     "keeps the timing"}
NORMS = ("zscore", "none", "scale")


# -----------------------------------------------------------------------------
# The 57-D action (paper section 4.3): its layout, the one place every other file takes it from

ACTION_DIM = 57
HANDS = ("left", "right")
FINGERS = ("Thumb", "IndexFinger", "MiddleFinger", "RingFinger", "LittleFinger")  # EgoDex names
ACTION_LAYOUT = (("left_wrist", 9), ("left_fingers", 15), ("right_wrist", 9), ("right_fingers", 15),
                 ("head", 9))
_ends = tuple(itertools.accumulate(size for _, size in ACTION_LAYOUT))
ACTION_SLICES = {name: slice(end - size, end) for (name, size), end in zip(ACTION_LAYOUT, _ends)}
assert _ends[-1] == ACTION_DIM


def _span(*blocks):
    return tuple(i for b in blocks for i in range(ACTION_SLICES[b].start, ACTION_SLICES[b].stop))


WRIST_IDX = _span("left_wrist", "right_wrist")
FINGER_IDX = _span("left_fingers", "right_fingers")
HEAD_IDX = _span("head")
ACTION_FAMILIES = {"wrist": WRIST_IDX, "finger": FINGER_IDX, "head": HEAD_IDX}
ROT6D = "first two columns of R: [R00, R10, R20, R01, R11, R21]"
IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_POSE9 = ("tx", "ty", "tz", "r00", "r10", "r20", "r01", "r11", "r21")
ACTION_NAMES = tuple([n for s in HANDS for n in [f"{s}_wrist.{c}" for c in _POSE9]
                      + [f"{s}_{f.lower()}.d{c}" for f in FINGERS for c in "xyz"]]
                     + [f"head.{c}" for c in _POSE9])


def still_actions(n):
    """(n, 57) actions of no motion: zero translations and fingertip displacements, identity 6D rotations."""
    a = np.zeros((n, ACTION_DIM), np.float32)
    for block in ("left_wrist", "right_wrist", "head"):
        a[:, ACTION_SLICES[block].start + 3:ACTION_SLICES[block].stop] = IDENTITY_6D
    return a


def action_layout():
    """The layout as plain data, written into stats.json and checked when stats are loaded."""
    return {"dim": ACTION_DIM, "blocks": [[n, s.start, s.stop] for n, s in ACTION_SLICES.items()],
            "families": {k: list(v) for k, v in ACTION_FAMILIES.items()}, "rot6d": ROT6D,
            "names": list(ACTION_NAMES)}



# -----------------------------------------------------------------------------
# Poses -> actions (paper section 4.3, action representation): relative rigid motion in 6D

def rot6d_from_matrix(R):
    """(..., 3, 3) -> (..., 6): the first two columns of R, column by column."""
    return R[..., :, :2].swapaxes(-1, -2).reshape(R.shape[:-2] + (6,))


def matrix_from_rot6d(x):
    """(..., 6) -> (..., 3, 3) by Gram-Schmidt on the two stored columns (Zhou et al. 2019)."""
    lib = torch if isinstance(x, torch.Tensor) else np

    def unit(v):
        return v / (v * v).sum(-1)[..., None] ** 0.5

    c1 = unit(x[..., :3])
    c2 = unit(x[..., 3:] - (c1 * x[..., 3:]).sum(-1)[..., None] * c1)
    c3 = lib.stack([c1[..., 1] * c2[..., 2] - c1[..., 2] * c2[..., 1],
                    c1[..., 2] * c2[..., 0] - c1[..., 0] * c2[..., 2],
                    c1[..., 0] * c2[..., 1] - c1[..., 1] * c2[..., 0]], -1)
    return lib.stack([c1, c2, c3], -1)  # stacked as columns


def se3_inverse(T):
    """(..., 4, 4) rigid transforms -> their inverses, in closed form."""
    out = np.zeros_like(T)
    Rt = T[..., :3, :3].swapaxes(-1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -(Rt @ T[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1
    return out


def relative_pose9(T):
    """(T, 4, 4) poses -> (T-1, 9): inv(P_t) @ P_{t+1} as translation + 6D, in the frame of P_t."""
    rel = se3_inverse(T[:-1]) @ T[1:]
    return np.concatenate([rel[:, :3, 3], rot6d_from_matrix(rel[:, :3, :3])], -1)


def to_frame(T, p):
    """Points p (T, K, 3) in world -> in the frame of poses T (T, 4, 4): R^T (p - t)."""
    return np.einsum("tji,tkj->tki", T[:, :3, :3], p - T[:, None, :3, 3])


def compute_actions(track):
    """track: {camera, left_wrist, right_wrist: (T, 4, 4); left_tips, right_tips: (T, 5, 3)} in
    one world frame -> actions (T-1, 57) float32, laid out as ACTION_LAYOUT."""
    parts = []
    for side in HANDS:
        W = track[f"{side}_wrist"]
        local = to_frame(W, track[f"{side}_tips"])  # (T, 5, 3) tips in their own wrist frame
        parts += [relative_pose9(W), (local[1:] - local[:-1]).reshape(len(W) - 1, 15)]
    parts.append(relative_pose9(track["camera"]))
    return np.concatenate(parts, -1).astype(np.float32)


def layout_fingerprint(layout):
    """A stable 60-bit fingerprint of an action layout (any JSON-able value, e.g. data.action_layout())."""
    return int(hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:15], 16)


def load_stats_file(path):
    """stats.json written by `python data.py stats` -> (mean (N,), std (N,), layout or None), checked.
    Refused: a file that is not such JSON, means and stds of different lengths, a non-finite value, a std < 0,
    and a std of 0 on a dimension that varies. A dimension the file records as constant (min == max) has std 0
    legitimately: it gets std 1, so normalizing subtracts its mean and never divides by ~0 (ActionNorm's eps)."""
    redo = f"recompute it with `python data.py stats --data ROOT --out {path}`"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"action statistics file {path} not found: make it with "
                                f"`python data.py stats --data ROOT --out {path}`")
    try:
        with open(path) as f:
            stats = json.load(f)
        mean, std = (np.asarray(stats[k], np.float64) for k in ("mean", "std"))
        lo, hi = (np.asarray(stats.get(k, np.nan), np.float64) for k in ("min", "max"))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, not a dict, a key or number missing
        raise ValueError(f"{path} is not an action statistics file ({type(e).__name__}: {e}); {redo}") from None
    if mean.ndim != 1 or not len(mean) or mean.shape != std.shape:
        raise ValueError(f"{path} holds {mean.size} means and {std.size} stds, not one of each per action "
                         f"dimension; {redo}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise ValueError(f"{path} holds a non-finite mean or std, or a negative std; {redo}")
    constant = (lo == hi) if lo.shape == hi.shape == std.shape else np.zeros_like(std, bool)
    varying = (std == 0) & ~constant
    if varying.any():
        raise ValueError(f"{path} has std 0 on {varying.sum()} dimension(s) that vary or whose min and max it does "
                         f"not record (first: {int(np.flatnonzero(varying)[0])}): normalizing would blow them up; "
                         f"{redo}")
    std = np.where(std == 0, 1.0, std)
    layout = stats.get("layout")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), layout


# the released robot/action-cond recipe: the six xyz/rpy deltas x20, the absolute gripper state x1
ROBOT_ACTION_SCALE = (20.0,) * 6 + (1.0,)


def default_action_scale(mode, n_dims, scale=None):
    """The factor of action_norm="scale" when none is given: the released robot model's for its 7-D actions
    (mode mlp), else x200 (our ablation)."""
    if scale is not None:
        return scale
    return ROBOT_ACTION_SCALE if (mode, n_dims) == ("mlp", len(ROBOT_ACTION_SCALE)) else 200.0


class ActionNorm(nn.Module):
    """(B, T_a, N) raw actions -> (B, T_a, N) fp32: z-score per dimension (eq. 4), nothing, or x scale (a
    number, or one factor per dimension)."""

    def __init__(self, n_dims, mode="zscore", scale=200.0, eps=1e-6):
        super().__init__()
        if mode not in NORMS:
            raise ValueError(f"unknown action normalization {mode!r}; choose one of {NORMS}")
        scale = tuple(float(s) for s in scale) if isinstance(scale, (list, tuple)) else float(scale)
        if isinstance(scale, tuple) and len(scale) != n_dims:
            raise ValueError(f"action_scale has {len(scale)} factors for {n_dims} action dimensions: give one "
                             f"number or {n_dims}")
        self.n_dims, self.mode, self.scale, self.eps = n_dims, mode, scale, eps
        # fp32 bit patterns in int32 buffers: saved with the state dict, untouched by model.to(bf16)
        self.register_buffer("mean_bits", torch.empty(n_dims, dtype=torch.int32))
        self.register_buffer("std_bits", torch.empty(n_dims, dtype=torch.int32))
        self.register_buffer("has_stats", torch.empty((), dtype=torch.int32))
        self.register_buffer("layout_id", torch.empty((), dtype=torch.int64))  # 0: unknown
        # has_stats as seen from Python, so that forward reads no device tensor once stats were there (no host
        # synchronization per call, nothing for torch.compile to break on); a state-dict load asks again
        self.ready = False
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "ready", False))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """No statistics yet (a zscore model refuses to run until `set_stats`)."""
        zeros = torch.zeros(self.n_dims, device=self.mean_bits.device)
        self.mean_bits.copy_(zeros.view(torch.int32))
        self.std_bits.copy_((zeros + 1).view(torch.int32))
        self.has_stats.zero_()
        self.layout_id.zero_()
        self.ready = False

    def stats(self):
        """(mean (N,), std (N,)) in fp32."""
        return self.mean_bits.view(torch.float32), self.std_bits.view(torch.float32)

    @torch.no_grad()
    def set_stats(self, mean, std, layout=None):
        """Per-dimension mean and std (N,) over the training set; layout: the description they were made for."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.n_dims or std.numel() != self.n_dims:
            raise ValueError(f"action statistics have {mean.numel()} means and {std.numel()} stds, the model "
                             f"takes {self.n_dims} action dimensions (config action_dim)")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("action statistics must be finite with std > 0 (a dimension that is constant in the "
                             "data: std 1, as load_stats_file gives it): recompute them with `python data.py stats`")
        self.mean_bits.copy_(mean.to(self.mean_bits.device).view(torch.int32))
        self.std_bits.copy_(std.to(self.std_bits.device).view(torch.int32))
        self.has_stats.fill_(1)
        self.layout_id.fill_(0 if layout is None else layout_fingerprint(layout))
        self.ready = True

    def check_layout(self, layout):
        """Refuse actions computed with another layout than the statistics were made for."""
        if int(self.layout_id) not in (0, layout_fingerprint(layout)):
            raise ValueError("this model's action statistics were computed for another action layout than the "
                             "actions given; recompute the statistics (`python data.py stats`) and retrain")

    def forward(self, a):
        a = a.float()
        if self.mode == "none":
            return a
        if self.mode == "scale":
            return a * torch.as_tensor(self.scale, dtype=torch.float32, device=a.device)
        if not self.ready and not int(self.has_stats):  # asked once (after init or a load), not per call
            raise ValueError("this model normalizes actions per dimension (action_norm='zscore') but holds "
                             "no statistics: compute them with `python data.py stats --data ROOT --out "
                             "stats.json` and pass them (`load_dit(..., action_stats='stats.json')` or "
                             "`model.action_cond.set_stats(mean, std)`), or load a checkpoint that has them")
        self.ready = True
        mean, std = self.stats()
        return (a - mean) / (std + self.eps)  # eq. 4: dimension-wise normalization


# -----------------------------------------------------------------------------
# layers


def no_autocast(device):
    """Autocast off: the fp32 path computes in its parameters' dtype inside a caller's bf16 autocast too."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # the meta device (bench.py costs) has no autocast


class Mlp(nn.Module):
    """fc1 (bias), GELU(tanh), fc2 (bias): timm's Mlp as Cosmos uses it; the output layer starts at zero."""

    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.xavier_uniform_(self.fc1.weight)
        for t in (self.fc1.bias, self.fc2.weight, self.fc2.bias):
            nn.init.zeros_(t)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttention(nn.Module):
    """Queries (B, L, D) attend over a context (B, M, D); q, k, v, o projections with biases."""

    def __init__(self, dim, n_heads):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"attention width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for m in (self.q, self.k, self.v, self.o):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, context):
        B, L, D = x.shape
        h = lambda t: t.view(B, t.shape[1], self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, nh, ., hd)
        y = F.scaled_dot_product_attention(h(self.q(x)), h(self.k(context)), h(self.v(context)))
        return self.o(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class ChannelFusion(nn.Module):
    """The per-channel reading of eq. 6's temporal fusion: (..., C, T_a) -> (..., C, 1), channel c fused over
    time with its own weights (weight (C, T_a)), where the faithful nn.Linear(T_a, 1) shares one set."""

    def __init__(self, steps, width):
        super().__init__()
        self.in_features = steps
        self.weight = nn.Parameter(torch.empty(width, steps))
        self.bias = nn.Parameter(torch.empty(width))

    def forward(self, h):
        return ((h * self.weight).sum(-1) + self.bias)[..., None]


class StructuredActionTokenizer(nn.Module):
    """SAT (eq. 5-6): (B, T_a, N) -> (B, 1, N, C), one token per action dimension.

    Every scalar entry goes through one shared Linear(1 -> C); a learnable linear fusion over the T_a steps
    (one set of weights, or one per channel: per_channel) and a GELU give the token. Initialized fan-in
    (LeCun) so unit-scale actions give unit-scale tokens.
    """

    def __init__(self, n_dims, steps, width, dim_embedding=True, per_channel=False):
        super().__init__()
        self.entry = nn.Linear(1, width)  # 2C = 512 parameters at C = 256, as in the paper's Table 6
        self.fuse = ChannelFusion(steps, width) if per_channel else nn.Linear(steps, 1)  # the temporal fusion
        self.dim_embed = nn.Parameter(torch.empty(n_dims, width)) if dim_embedding else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.entry.weight, std=1.0)
        nn.init.normal_(self.fuse.weight, std=self.fuse.in_features**-0.5)
        for b in (self.entry.bias, self.fuse.bias):
            nn.init.zeros_(b)
        if self.dim_embed is not None:
            nn.init.normal_(self.dim_embed, std=1.0)

    def forward(self, a):
        h = self.entry(a[..., None])  # eq. 5: every entry a[t, n] -> C features, (B, T_a, N, C)
        tokens = F.gelu(self.fuse(h.permute(0, 2, 3, 1)).squeeze(-1))  # eq. 6: fuse over T_a, GELU -> (B, N, C)
        return (tokens if self.dim_embed is None else tokens + self.dim_embed)[:, None]  # (B, 1, N, C)


class FrameActionTokenizer(nn.Module):
    """Time-aware SAT: (B, T_a, N) -> (B, F, N, C), one token per action dimension and latent frame.

    The k actions of latent frame f (F = T_a / k) go, per dimension, through one shared Linear(k -> C) and
    a GELU: full rank in time, so a token knows when within its frame a dimension moved.
    """

    def __init__(self, n_dims, per_frame, width, dim_embedding=True):
        super().__init__()
        self.per_frame = per_frame
        self.window = nn.Linear(per_frame, width)
        self.dim_embed = nn.Parameter(torch.empty(n_dims, width)) if dim_embedding else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.window.weight, std=self.per_frame**-0.5)
        nn.init.zeros_(self.window.bias)
        if self.dim_embed is not None:
            nn.init.normal_(self.dim_embed, std=1.0)

    def forward(self, a):
        B, T_a, N = a.shape
        windows = a.view(B, T_a // self.per_frame, self.per_frame, N).transpose(2, 3)  # (B, F, N, k)
        tokens = F.gelu(self.window(windows))  # (B, F, N, C)
        return tokens if self.dim_embed is None else tokens + self.dim_embed


class LocalRefinement(nn.Module):
    """Eq. 7: latent tokens (B', L, D) query the projected action tokens (B', N, C) -> update (B', L, D)."""

    def __init__(self, width, dim, n_heads):
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.attn = CrossAttention(dim, n_heads)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.attn.init_weights()
        nn.init.zeros_(self.attn.o.weight)  # the update starts at exactly zero
        nn.init.zeros_(self.attn.o.bias)

    def forward(self, x, tokens):
        q = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        return self.attn(q, self.proj(tokens))  # eq. 7's update: CrossAttn(q = norm(x), kv = W tokens)


class GlobalModulation(nn.Module):
    """Eq. 8-9: a learnable query (1, C) attends over tokens (B', N, C) -> g (B', C) -> (B', D), (B', 3D).
    emb_3d=False: no 3D head, the second output is None (a backbone without AdaLN-LoRA, IRASim: a head that
    never gets a gradient would only be dead weight, and an optimizer state that never appears)."""

    def __init__(self, width, dim, n_heads=4, emb_3d=True):
        super().__init__()
        self.query = nn.Parameter(torch.empty(1, 1, width))
        self.attn = CrossAttention(width, n_heads)
        self.to_d = nn.Linear(width, dim)
        self.to_3d = nn.Linear(width, 3 * dim) if emb_3d else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.query, std=1.0)
        self.attn.init_weights()
        for head in (self.to_d, self.to_3d):
            if head is not None:
                nn.init.zeros_(head.weight)  # the AdaLN inputs start unchanged
                nn.init.zeros_(head.bias)

    def forward(self, tokens):
        g = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens)[:, 0]  # eq. 8: global context (B', C)
        # eq. 9: g -> the DiT's two AdaLN inputs (model.DiT.forward adds them where Cosmos adds actions)
        return self.to_d(g), None if self.to_3d is None else self.to_3d(g)


# -----------------------------------------------------------------------------
# the conditioning modules: forward(actions (B, T_a, N), x (B, T, H, W, D), frame_mask (B, T))
#                           -> (x, emb_d (B, T, D) or None, emb_3d (B, T, 3D) or None)


class ActionConditioning(nn.Module):
    """What every mode shares: the action normalization, the input checks, the statistics."""

    def __init__(self, mode, n_dims, steps, *, norm, scale, per_frame, framewise):
        super().__init__()
        if framewise and steps % per_frame:
            raise ValueError(f"mode {mode!r} groups {per_frame} actions per latent frame: action_steps "
                             f"{steps} must be a multiple of {per_frame}")
        self.mode, self.n_dims, self.steps = mode, n_dims, steps
        self.per_frame, self.framewise = per_frame, framewise
        self.norm = ActionNorm(n_dims, norm, scale)

    def set_stats(self, mean, std, layout=None):
        self.norm.set_stats(mean, std, layout)

    def prepare(self, actions, x):
        """Check the actions against the model, then normalize them: (B, T_a, N) fp32."""
        if actions.ndim != 3:
            raise ValueError(f"actions must be (B, T_a, N), got shape {tuple(actions.shape)}")
        B, T_a, N = actions.shape
        if N != self.n_dims:
            raise ValueError(f"actions have {N} dimensions per step, this model was built for {self.n_dims} "
                             f"(config action_dim); compute them with the same action layout, or build the "
                             f"model with action_dim={N}")
        if T_a != self.steps:
            raise ValueError(f"actions have {T_a} steps, this model takes chunks of {self.steps} "
                             f"(config action_steps); split the sequence into chunks of {self.steps}")
        if B != x.shape[0]:
            raise ValueError(f"{B} action chunks for a batch of {x.shape[0]} videos")
        if self.framewise and x.shape[1] != 1 + T_a // self.per_frame:
            raise ValueError(f"mode {self.mode!r} gives {self.per_frame} actions to each latent frame after the "
                             f"first: {T_a} actions need {1 + T_a // self.per_frame} latent frames, got {x.shape[1]}")
        return self.norm(actions)


def first_frame_zero(e):
    """(B, F, E) per predicted latent frame -> (B, 1 + F, E) with a zero embedding for frame 0 (as Cosmos)."""
    return torch.cat([torch.zeros_like(e[:, :1]), e], dim=1)


class ChunkMLP(ActionConditioning):
    """`mlp`: Cosmos-Predict2.5's action embedder. k actions per latent frame -> (B, T-1, kN) -> two MLPs."""
    FP32_PARTS = ("embed_d", "embed_3d")  # the DiT's fp32 path (model.FP32_MODULES)

    def __init__(self, n_dims, steps, dim, *, norm="zscore", scale=200.0, per_frame=4):
        super().__init__("mlp", n_dims, steps, norm=norm, scale=scale, per_frame=per_frame, framewise=True)
        self.embed_d = Mlp(per_frame * n_dims, 4 * dim, dim)  # official action_embedder_B_D
        self.embed_3d = Mlp(per_frame * n_dims, 4 * dim, 3 * dim)  # official action_embedder_B_3D

    def init_weights(self):
        for m in (self.norm, self.embed_d, self.embed_3d):
            m.init_weights()

    def forward(self, actions, x, frame_mask):
        a = self.prepare(actions, x)
        a = a.reshape(a.shape[0], -1, self.per_frame * self.n_dims)  # (B, T-1, kN), step-major as Cosmos
        a = a.to(self.embed_d.fc1.weight.dtype)
        keep = (1 - frame_mask)[..., None]  # (B, T, 1)
        with no_autocast(a.device):
            d, d3 = self.embed_d(a), self.embed_3d(a)  # (B, T-1, D), (B, T-1, 3D)
        return x, first_frame_zero(d) * keep, first_frame_zero(d3) * keep


class FlatMLP(ActionConditioning):
    """`mlp-flat`: the whole chunk flattened, Mlp(T_a * N -> 4D -> D), the same embedding for every frame."""
    FP32_PARTS = ("embed_d",)

    def __init__(self, n_dims, steps, dim, *, norm="zscore", scale=200.0):
        super().__init__("mlp-flat", n_dims, steps, norm=norm, scale=scale, per_frame=1, framewise=False)
        self.embed_d = Mlp(steps * n_dims, 4 * dim, dim)

    def init_weights(self):
        for m in (self.norm, self.embed_d):
            m.init_weights()

    def forward(self, actions, x, frame_mask):
        a = self.prepare(actions, x).flatten(1).to(self.embed_d.fc1.weight.dtype)  # (B, T_a * N)
        with no_autocast(a.device):
            d = self.embed_d(a)  # (B, D)
        return x, d[:, None] * (1 - frame_mask)[..., None], None


class DexAC(ActionConditioning):
    """`dexac` and variants: SAT tokens -> local refinement of x, global modulation of the AdaLN inputs."""
    FP32_PARTS = ("tokenizer", "glob")  # the AdaLN path; local refinement keeps the activation dtype

    def __init__(self, mode, n_dims, steps, dim, n_heads, *, width=256, norm="zscore", scale=200.0,
                 dim_embedding=True, per_frame=4, global_heads=4, emb_3d=True):
        framewise = mode == "dexac-time"
        super().__init__(mode, n_dims, steps, norm=norm, scale=scale, per_frame=per_frame, framewise=framewise)
        self.tokenizer = (FrameActionTokenizer(n_dims, per_frame, width, dim_embedding) if framewise
                          else StructuredActionTokenizer(n_dims, steps, width, dim_embedding,
                                                         per_channel=mode == "dexac-channel"))
        self.local = None if mode == "dexac-no-local" else LocalRefinement(width, dim, n_heads)
        self.glob = None if mode == "dexac-no-global" else GlobalModulation(width, dim, global_heads, emb_3d)

    def init_weights(self):
        for m in (self.norm, self.tokenizer, self.local, self.glob):
            if m is not None:
                m.init_weights()

    def forward(self, actions, x, frame_mask):
        a = self.prepare(actions, x).to(next(self.tokenizer.parameters()).dtype)
        with no_autocast(a.device):
            tokens = self.tokenizer(a)  # (B, S, N, C): S = 1 (faithful) or one per predicted latent frame
        B, S, N, C = tokens.shape
        _, T, H, W, D = x.shape
        keep = (1 - frame_mask).to(x.dtype)  # (B, T)
        emb_d = emb_3d = None
        if self.local is not None:
            # faithful: every latent token sees all N tokens; time-aware: frame f + 1 sees the tokens of frame f
            q = x[:, 1:].reshape(B * S, -1, D) if self.framewise else x.reshape(B, -1, D)  # (B S, L', D)
            update = self.local(q, tokens.reshape(B * S, N, C).to(x.dtype)).view(B, -1, H, W, D)
            if self.framewise:
                update = first_frame_zero(update.flatten(2)).view(B, T, H, W, D)
            x = x + update * keep[:, :, None, None, None]  # eq. 7: x + CrossAttn(norm(x), tokens)
        if self.glob is not None:
            with no_autocast(tokens.device):
                d, d3 = self.glob(tokens.reshape(B * S, N, C))  # (B S, D), (B S, 3D)
            d = d.view(B, S, D)
            emb_d = (first_frame_zero(d) if self.framewise else d) * keep[..., None]  # (B, T, D)
            if d3 is not None:
                d3 = d3.view(B, S, 3 * D)
                emb_3d = (first_frame_zero(d3) if self.framewise else d3) * keep[..., None]  # (B, T, 3D)
        return x, emb_d, emb_3d


def build_action_cond(mode, dim, n_heads, *, n_dims=57, steps=12, norm="zscore", scale=None, width=256,
                      dim_embedding=True, per_frame=4, emb_3d=True):
    """The conditioning module for a mode name (None for "none"). dim, n_heads: the DiT's width and heads;
    scale: the factor(s) of norm "scale" (None: default_action_scale); emb_3d=False: DexAC's global modulation
    has no AdaLN-LoRA head (a backbone without AdaLN-LoRA)."""
    if mode == "none":
        return None
    scale = default_action_scale(mode, n_dims, scale)
    if mode not in MODES:
        listing = "".join(f"\n  {k}: {v}" for k, v in MODES.items())
        raise ValueError(f"unknown action mode {mode!r}; choose one of {', '.join(['none', *MODES])}{listing}")
    if mode == "mlp":
        return ChunkMLP(n_dims, steps, dim, norm=norm, scale=scale, per_frame=per_frame)
    if mode == "mlp-flat":
        return FlatMLP(n_dims, steps, dim, norm=norm, scale=scale)
    return DexAC(mode, n_dims, steps, dim, n_heads, width=width, norm=norm, scale=scale, dim_embedding=dim_embedding,
                 per_frame=per_frame, emb_3d=emb_3d)
