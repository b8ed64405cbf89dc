"""
Evaluation for DexAC-WM: hand-written video metrics, and (with sample.py) the paper's rollout protocol.

The paper (section 5.1, Tables 1-5, 7) reports PSNR, SSIM, LPIPS, FID, FVD (Cosmos-Cookbook protocol),
PCK@10/20 overall and per action family, and latent L2. Every metric compares predicted frames with the
ground truth: floats in [0, 1] (uint8 is divided by 255), videos `(B, C, T, H, W)`. The first `n_cond`
frames (default 1) are conditioning frames copied from the ground truth and are never scored.

Protocols (DESIGN.md section 8), with the choices we make where the references differ:
- PSNR per frame with data range 1, then the mean over frames and clips. Identical frames would give
  inf; every frame is capped at PSNR_CAP = 100 dB (MSE floored at 1e-10), so means stay finite.
- SSIM: Gaussian window of 11 taps, sigma 1.5, K1 0.01, K2 0.03, data range 1, population variances,
  float64; per RGB channel, then the mean. Valid window positions only, no padding: scikit-image's
  numbers (`gaussian_weights=True, use_sample_covariance=False`: it reflects, filters, crops 5 px) and
  torchmetrics'. IRASim scores grayscale with skimage defaults: not comparable.
- LPIPS v0.1, AlexNet written out: torchvision's `alexnet-owt-7be5be79.pth` cut after its five ReLUs,
  activations unit-normalized over channels, squared differences weighted by lpips' v0.1 linear heads
  (`alex.pth`), averaged over space, summed over layers. Inputs in [-1, 1], lpips' input scaling first.
- FID: InceptionV3 pool3 (2048-d) of the TorchScript file `inception-2015-12-05.pt` (the TF Inception of
  the original FID, as shipped by StyleGAN2-ADA and used by clean-fid). That file wants floats in
  0..255 (it computes (x - 128) / 128 itself): we resize each frame to 299x299 (bilinear, antialiased;
  the file's own plain resize then does nothing) and multiply by 255. The Cosmos cookbook's FID script
  feeds 0-255 floats to a network that expects [0, 1] (a bug we do not copy): our FID is therefore not
  comparable with the paper's FID figures, and the table says so.
- FVD (`fvd`), the Cosmos cookbook's protocol (what the paper names): pytorch-i3d's InceptionI3d(400) with
  the state dict `i3d_pretrained_400.pt` (VideoGPT/TATS weights, what the cookbook's cd-fvd loads), written
  here in plain PyTorch (pytorch-i3d itself cannot be TorchScripted). Every frame, the conditioning one
  included, resized to 224x224 (bilinear, no antialias), truncated to uint8 as cd-fvd does, mapped to
  2x/255 - 1; the 400 logits averaged over time; clips of at least 9 frames; covariances as cd-fvd computes
  them (divided by N). `fvd_stylegan`: StyleGAN-V's TorchScript `i3d_torchscript.pt` (the TF-Hub I3D of
  the FVD paper, another weight set: not comparable), on the predicted frames.
- DreamSim (`dreamsim`, the paper's Tables 6-7): the `dreamsim` package's ensemble model, per frame, with
  its own preprocessing; its checkpoint goes to the weights cache folder.
- Network files (NETWORKS): given by path, URL or Hub file, else fetched by hub.fetch into one cache folder
  (hub.download_dir()), sha256-checked where known, found in place where another package ships them (the
  LPIPS heads inside `lpips`); offline (HF_HUB_OFFLINE=1, --offline) one error lists every missing file.
  `python evaluate.py fetch-weights` gets them all.
- Frechet distance |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) in float64; the last trace sums
  the square roots of the eigenvalues of the symmetric sqrt(S_r) S_f sqrt(S_r) (the same spectrum), tiny
  negatives clamped to 0: no complex parts to discard, fine for singular covariances.
- latent L2: MSE between predicted and ground-truth VAE latents over the predicted latent frames (the
  ground truth encoded from the clip's first frame on; with --carry reencode a later chunk's predicted
  latents follow its own re-encoded first frame, as in training).
- PCK@k, k = 2.5/5/10/20 px at the evaluation frames' resolution (in the report; DexWM uses 224x392):
  the ground truth is the dataset's annotation, the 12 keypoints (data.KEYPOINT_NAMES) projected from its
  poses (data.load_clip: `keypoints`, counted where `keypoint_valid`); a detector finds them on the predicted
  frames, and a keypoint is a hit when found within k px; pooled over all counted keypoints, in percent
  (`pck@k`). Beside it `pck_gt@k`: the same detector on the ground-truth frames, its own ceiling. Where the
  detector finds none of the counted keypoints on the ground-truth frames (or none counts), PCK is None, "no
  keypoints", never 0. Without annotations (compare) the detector on the ground-truth frames stands in for
  them and there is no ceiling. A detector is any callable with MarkerDetector's interface (--detector):
  the synthetic data's colour markers (refused on episodes synthetic.py did not write), MediaPipe Hands
  (the optional extra `hands`), a TorchScript model (KeypointModel), or your own `module:function`.
- action families (Table 4): a clip is wrist-, finger- or head-dominant by the largest RMS of its
  z-scored actions ((a - mean) / (std + 1e-6), stats.json) over the family's dimensions and all steps.

    python evaluate.py --checkpoint runs/000-tiny-dexac-64x112/model.safetensors --data data/synthetic --horizon 25
    python evaluate.py compare --pred runs/pred --gt runs/gt --metrics psnr,ssim,pck --detector markers
"""

import importlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import conditioning
import data
import hub
import irasim
import sample
import synthetic
import tokenizer as tok
from hub import WeightsError  # missing or wrong weights: the one error class of every loader

METRICS = ("psnr", "ssim", "lpips", "dreamsim", "fid", "fvd", "fvd_stylegan", "latent_l2", "pck")
PAPER_METRICS = ("psnr", "ssim", "lpips", "fid", "fvd", "latent_l2", "pck")  # --metrics paper: Table 1 and latent L2
FRECHET = ("fid", "fvd", "fvd_stylegan")  # the set-level metrics, from features kept per clip
PSNR_CAP = 100.0  # dB, the value for identical frames
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
FID_SIZE, FVD_SIZE = (299, 299), (224, 224)
PCK_THRESHOLDS = (2.5, 5.0, 10.0, 20.0)
FAMILIES = tuple(conditioning.ACTION_FAMILIES)  # wrist, finger, head

# ------------------------------------------------------------------------------------------------
# Feature-network weights: a local path, a URL or a Hub file (hub.resolve); never random

NETWORKS = {  # kind -> the file, where it comes from, its sha256 and size where published (hub.fetch)
    "alexnet": hub.Network(
        "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        sha256="7be5be79", what="torchvision's ImageNet AlexNet, the LPIPS backbone"),  # torchvision's name prefix
    "lpips": hub.Network(
        "alex.pth", "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
        sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", size=6_009,
        what="the LPIPS v0.1 linear heads for AlexNet",
        found_in=(hub.package_file("lpips", "weights/v0.1/alex.pth"),
                  hub.package_file("torchmetrics", "functional/image/lpips_models/alex.pth"))),
    "inception": hub.Network(  # sha256 as k-diffusion checks it for this URL
        "inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        sha256="f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
        what="the FID InceptionV3 as TorchScript"),
    "i3d": hub.Network(  # where cd-fvd downloads it (no published hash); cd-fvd keeps its copy in its package
        "i3d_pretrained_400.pt", "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt",
        what="pytorch-i3d's InceptionI3d(400) state dict (VideoGPT/TATS), the cookbook's FVD network",
        found_in=(hub.package_file("cdfvd", "third_party/i3d/i3d_pretrained_400.pt"),)),
    "i3d_stylegan": hub.Network(
        "i3d_torchscript.pt", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
        sha256="bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2", size=51_235_320,
        what="StyleGAN-V's I3D Kinetics-400 as TorchScript"),
    "keypoints": hub.Network("keypoints.pt", "", what="a hand-keypoint detector as TorchScript, with the "
                                                      "interface of evaluate.KeypointModel"),
    # MediaPipe Hands' models (MediaPipeHands): inside the mediapipe 0.10.21 wheel, no URL; hashes of that wheel
    "hand_landmark": hub.Network(
        "hand_landmark_full.tflite", "", size=5_478_917, what="MediaPipe's hand landmark model",
        sha256="11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
        found_in=(hub.package_file("mediapipe", "modules/hand_landmark/hand_landmark_full.tflite"),)),
    "palm_detection": hub.Network(
        "palm_detection_full.tflite", "", size=2_339_846, what="MediaPipe's palm detection model",
        sha256="1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
        found_in=(hub.package_file("mediapipe", "modules/palm_detection/palm_detection_full.tflite"),)),
}
WEIGHT_FLAGS = {"alexnet": "alexnet", "lpips": "lpips_heads", "inception": "inception", "i3d": "i3d",
                "i3d_stylegan": "i3d_stylegan"}  # kind -> flag
NEEDS = {"lpips": ("alexnet", "lpips"), "fid": ("inception",), "fvd": ("i3d",),
         "fvd_stylegan": ("i3d_stylegan",)}  # metric -> network kinds


def weights_dir():
    """Where files without a given path are looked for, and where URLs are downloaded ($TORCH_HOME)."""
    return hub.download_dir()


def resolve_weights(kind, spec=None, offline=None):
    """One of NETWORKS -> a local path. spec: a local file or folder, an http(s) URL or a Hub file ('org/repo' for
    the standard file name, or 'org/repo/path/in/repo') (hub.resolve); None: the verified copy in weights_dir()
    or another package, else downloaded there when online (hub.fetch). Anything missing raises one WeightsError
    naming the file and where to get it."""
    n = NETWORKS[kind]
    where = f"Get it from {n.url or 'its author'}, then pass its path (or the URL) or put it in {weights_dir()}."
    if spec is not None:
        return hub.resolve(spec, files=(n.file,), what=f"{n.file} ({n.what})", where=where)
    if not n.url:
        raise WeightsError(f"{n.file} ({n.what}): pass its path")
    return hub.fetch(n, offline=offline)


def _needs(kind):
    return f"{kind} needs {NETWORKS[kind].file} ({NETWORKS[kind].what}), from {NETWORKS[kind].url}"


def load_torchscript(kind, spec=None, device="cpu", offline=None):
    path = resolve_weights(kind, spec, offline)
    try:
        return torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} is not a TorchScript file; {_needs(kind)}") from e


def _state_dict(kind, spec, offline=None):
    path = resolve_weights(kind, spec, offline)
    try:
        return path, hub.read_state_dict(path)
    except WeightsError as e:
        raise WeightsError(f"{e}; {_needs(kind)}") from None


# ------------------------------------------------------------------------------------------------
# Pixel metrics: PSNR, SSIM (per frame, (N, 3, H, W) in [0, 1] -> (N,))

def as_unit(video, name="video"):
    """uint8 or float in [0, 1] -> float tensor; floats outside [0, 1] are the classic range bug."""
    video = torch.as_tensor(video)
    if video.dtype == torch.uint8:
        return video.float() / 255
    if video.is_floating_point() and not torch.isfinite(video).all():  # NaN compares false: never scored
        raise ValueError(f"{name} holds NaN/inf values: a damaged prediction cannot be scored")
    lo, hi = video.min().item(), video.max().item()
    if not video.is_floating_point() or lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} holds {video.dtype} values in [{lo:.3g}, {hi:.3g}]; metrics take uint8 or "
                         f"floats in [0, 1] (map [-1, 1] with (v + 1) / 2, 0-255 floats with v / 255)")
    return video


def psnr_frames(x, y):
    mse = ((x.double() - y.double()) ** 2).mean((1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(10 ** (-PSNR_CAP / 10)))


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_frames(x, y):
    N, C, H, W = x.shape
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {H}x{W}")
    x, y = x.double().reshape(N * C, 1, H, W), y.double().reshape(N * C, 1, H, W)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)  # (N*C, 5, H, W)
    g = gaussian_window().to(x.device)
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)  # separable, valid
    mx, my, mxx, myy, mxy = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5).unbind(1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2)).view(N, C).mean(1)


# ------------------------------------------------------------------------------------------------
# LPIPS v0.1, AlexNet

ALEX_CHANNELS = (64, 192, 384, 256, 256)
ALEX_TAPS = (1, 4, 7, 9, 11)  # the ReLUs in torchvision's alexnet().features whose outputs LPIPS compares


class LPIPS(nn.Module):
    """(N, 3, H, W) pairs in [-1, 1] -> (N,) distances."""

    def __init__(self):
        super().__init__()
        # torchvision's alexnet().features up to its last ReLU, indices kept: official keys load as they are
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in ALEX_CHANNELS)
        # lpips' fixed input scaling: ImageNet statistics expressed for [-1, 1] inputs
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in ALEX_TAPS:  # unit length over channels at every position
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        n = len(x)
        x = torch.cat([x, y]).to(self.shift.dtype)  # both images in one pass
        feats = self.taps((x - self.shift) / self.scale)
        return sum(head((f[:n] - f[n:]) ** 2).mean((1, 2, 3)) for head, f in zip(self.heads, feats))


def load_lpips(alexnet=None, heads=None, device="cpu", offline=None):
    """LPIPS from torchvision's alexnet-owt-7be5be79.pth and lpips' v0.1 alex.pth (see resolve_weights)."""
    (alex_path, backbone), (heads_path, lins) = (_state_dict("alexnet", alexnet, offline),
                                                 _state_dict("lpips", heads, offline))
    net = LPIPS()
    sd = {k: v for k, v in backbone.items() if k.startswith("features.")}  # the classifier is unused
    sd.update({f"heads.{i}.weight": lins[f"lin{i}.model.1.weight"] for i in range(5)
               if f"lin{i}.model.1.weight" in lins})  # lpips' NetLinLayer: Sequential(Dropout, Conv2d)
    try:
        hub.check_state_dict(net.state_dict(), sd, source=f"{alex_path} + {heads_path}", target="LPIPS/AlexNet",
                             hint=f" (expected {NETWORKS['alexnet'].file} and {NETWORKS['lpips'].file})")
    except ValueError as e:
        raise WeightsError(str(e)) from e
    net.load_state_dict(sd)  # not hub.load_strict's assign=True: copying keeps float32 whatever the files hold
    return net.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# FID / FVD features and the Frechet distance

def _accepts(net, arg):
    schema = getattr(net.forward, "schema", None)  # TorchScript methods carry a schema, not a signature
    names = [a.name for a in schema.arguments] if schema else inspect.signature(net.forward).parameters
    return arg in names


@torch.no_grad()
def inception_features(frames, net, batch=64):
    """(N, 3, H, W) in [0, 1] -> (N, D) float64 pool3 features of inception-2015-12-05.pt."""
    out = []
    for x in frames.split(batch):
        x = F.interpolate(x.float(), FID_SIZE, mode="bilinear", antialias=True, align_corners=False)
        out.append(net(x * 255, return_features=True).double().cpu())  # this file wants 0..255
    return torch.cat(out).numpy()


@torch.no_grad()
def i3d_features(videos, net, batch=8):
    """(B, 3, T, H, W) in [0, 1] -> (B, 400) float64 I3D logits averaged over time."""
    kw = dict(rescale=False, resize=False, return_features=True) if _accepts(net, "return_features") else {}
    out = []
    for v in videos.split(batch):
        B, C, T = v.shape[:3]
        x = v.transpose(1, 2).flatten(0, 1).float()  # (B*T, C, H, W)
        x = F.interpolate(x, FVD_SIZE, mode="bilinear", align_corners=False)
        x = x.view(B, T, C, *FVD_SIZE).transpose(1, 2) * 2 - 1  # (B, C, T, 224, 224) in [-1, 1]
        out.append(net(x, **kw).double().cpu())
    return torch.cat(out).numpy()


# the cookbook's FVD network: pytorch-i3d's InceptionI3d(400), rebuilt with its parameter names

I3D_MIN_FRAMES = 9  # fewer leave one temporal position before the (2, 7, 7) average pool, which then fails

# name -> (input channels, [1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool proj]) of each Inception block
MIXED = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]), "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]), "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]), "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]), "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


def same_pad(x, kernel, stride):
    """TensorFlow's 'SAME' padding, recomputed for each input size as pytorch-i3d does: per dim (T, H, W) the total
    is max(k - s, 0) if n % s == 0 else max(k - n % s, 0), the odd one at the END. Zeros, before max pooling too
    (harmless there: every pooled tensor follows a ReLU)."""
    pad = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad wants W first
        total = max(k - (s if n % s == 0 else n % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


def max_pool(x, kernel, stride):
    return F.max_pool3d(same_pad(x, kernel, stride), kernel, stride)


class Unit3D(nn.Module):
    """'same'-padded Conv3d, then BatchNorm (eps 1e-5) and ReLU; the logits layer has a bias and neither."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), head=False):
        super().__init__()
        self.kernel, self.stride, self.head = kernel, stride, head
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001)

    def forward(self, x):
        x = self.conv3d(same_pad(x, self.kernel, self.stride))
        return x if self.head else F.relu(self.bn(x))


class Mixed(nn.Module):
    """Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated on channels."""

    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3b = Unit3D(cin, c[5])  # b3a is the parameter-free pool

    def forward(self, x):
        pooled = max_pool(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1)


class InceptionI3d(nn.Module):
    """pytorch-i3d's InceptionI3d(400) for inference (eval mode; its dropout before the logits is left out).
    Parameter names and shapes are pytorch-i3d's, so `i3d_pretrained_400.pt` loads strictly."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, (cin, c) in MIXED.items():
            self.add_module(name, Mixed(cin, c))
        self.logits = Unit3D(1024, num_classes, head=True)

    def forward(self, x):
        """(B, 3, T, 224, 224) float in [-1, 1], T >= 9 -> (B, num_classes) logits averaged over time."""
        if x.shape[2] < I3D_MIN_FRAMES or tuple(x.shape[3:]) != FVD_SIZE:
            raise ValueError(f"I3D takes (B, 3, T >= {I3D_MIN_FRAMES}, 224, 224) clips, got {tuple(x.shape)}")
        x = max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))  # (B, 64, T/2, 56, 56)
        x = max_pool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))  # (B, 192, T/2, 28, 28)
        x = max_pool(self.Mixed_3c(self.Mixed_3b(x)), (3, 3, 3), (2, 2, 2))  # (B, 480, T/4, 14, 14)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool(x, (2, 2, 2), (2, 2, 2))  # (B, 832, T/8, 7, 7)
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, 1, 1): a sliding window over time
        return self.logits(x).flatten(2).mean(2)  # logits, not softmax, averaged over those positions


@torch.no_grad()
def cookbook_i3d_input(videos):
    """(B, 3, T, H, W) uint8, or float in [0, 1] -> (B, 3, T, 224, 224) float in [-1, 1], built as the cookbook does.

    Every frame is kept (the cookbook reads all frames of each file, conditioning frame included). The cookbook
    resizes the uint8 frames as floats to 224x224 (F.interpolate bilinear, align_corners=False, no antialias) and
    divides by 255; cd-fvd multiplies by 255 and casts with `.byte()`, which TRUNCATES (not rounds) the resized
    values; cd-fvd's own preprocess_i3d then resizes again (224 -> 224: the identity) and maps to 2x/255 - 1.
    Float input stands for the uint8 video file the cookbook would read: it is rounded to uint8 first.
    """
    v = torch.as_tensor(videos)
    if v.dtype != torch.uint8:
        if not v.is_floating_point() or not torch.isfinite(v).all() or v.min() < -1e-3 or v.max() > 1 + 1e-3:
            raise ValueError(f"videos must be uint8 or floats in [0, 1], got {v.dtype}")
        v = (v.clamp(0, 1) * 255).round().to(torch.uint8)
    B, C, T = v.shape[:3]
    x = v.transpose(1, 2).flatten(0, 1).float()  # (B*T, 3, H, W) in 0..255
    x = F.interpolate(x, FVD_SIZE, mode="bilinear", align_corners=False)
    x = (x / 255.0 * 255).to(torch.uint8).float()  # the cookbook's /255, then cd-fvd's *255 and .byte()
    x = x.view(B, T, C, *FVD_SIZE).transpose(1, 2)
    return 2.0 * x / 255.0 - 1


def load_i3d(spec=None, device="cpu", offline=None):
    """`i3d_pretrained_400.pt` (pytorch-i3d's InceptionI3d(400) state dict; spec as resolve_weights) -> the
    cookbook's FVD network in eval mode."""
    path = resolve_weights("i3d", spec, offline)
    sd = hub.read_state_dict(path)
    net = InceptionI3d()
    for k in net.state_dict():  # BatchNorm's step counter: older saves lack it, and eval never reads it
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.tensor(0)
    hub.load_strict(net, sd, source=str(path), hint=f" (want pytorch-i3d's InceptionI3d(400) state dict "
                                                   f"i3d_pretrained_400.pt, from {NETWORKS['i3d'].url})")
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def cookbook_i3d_features(videos, net, batch=8):
    """(B, 3, T >= 9, H, W) uint8 or [0, 1], every frame -> (B, 400) float64: the cookbook's FVD features."""
    return torch.cat([net(cookbook_i3d_input(v).to(next(net.parameters()).device)).double().cpu()
                      for v in torch.as_tensor(videos).split(batch)]).numpy()


def feature_stats(features, biased=False):
    """(N, D) -> mean, covariance (divided by N - 1, or by N when biased, as cd-fvd's FeatureStats)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False, bias=biased)


def _sqrt_psd(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^1/2) for Gaussians given by means and covariances, float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1  # symmetric PSD, same eigenvalues as s1 @ s2
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    d = mu1 - mu2
    return max(float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt), 0.0)  # >= 0 up to rounding


def frechet_from_features(a, b, biased=False):
    return frechet_distance(*feature_stats(a, biased), *feature_stats(b, biased))


def frechet_of(metric, a, b):
    """FID / FVD / FVD (StyleGAN-V) of two feature sets; `fvd` with cd-fvd's covariances (the cookbook's)."""
    return frechet_from_features(a, b, biased=metric == "fvd")


# ------------------------------------------------------------------------------------------------
# DreamSim (the paper's Tables 6-7), through its package

DREAMSIM = hub.Network(  # the package's default and best model; it downloads and unzips this itself
    "dreamsim_ensemble_checkpoint.zip",
    "https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/"
    "dreamsim_ensemble_checkpoint.zip",
    what="DreamSim's ensemble checkpoint (DINO, CLIP, OpenCLIP ViT-B/16 and LoRA), unzipped by `dreamsim`")
DREAMSIM_FILES = ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
                  "ensemble_lora")  # what the package checks for in its cache folder


class DreamSim:
    """DreamSim (Fu et al. 2023) as its package computes it (pip install dreamsim): the ensemble model's distance
    per frame pair, each frame through the package's own preprocessing (PIL bicubic to 224x224, [0, 1]). Its
    files live in weights_dir()/dreamsim; offline (HF_HUB_OFFLINE=1, offline=True) without them: one error at
    once, before the package would try to download."""

    def __init__(self, device="cpu", offline=None):
        try:
            from dreamsim import dreamsim
        except ImportError:
            raise ImportError("the dreamsim metric needs its package: pip install dreamsim") from None
        folder = weights_dir() / "dreamsim"
        missing = [f for f in DREAMSIM_FILES if not (folder / f).exists()]
        if missing and hub.is_offline(offline):
            raise WeightsError(f"dreamsim: {', '.join(missing)} not in {folder}, and downloads are off "
                               f"(HF_HUB_OFFLINE=1 or --offline): download {DREAMSIM.url} and unzip it there, or "
                               f"run `python evaluate.py fetch-weights --metrics dreamsim` once with network access")
        folder.mkdir(parents=True, exist_ok=True)
        self.model, self.preprocess = dreamsim(pretrained=True, device=device, cache_dir=str(folder),
                                               dreamsim_type="ensemble")
        self.device = device

    @torch.no_grad()
    def __call__(self, a, b):
        """(N, 3, H, W) in [0, 1] twice -> (N,) distances."""
        prep = lambda v: torch.cat([self.preprocess(Image.fromarray(f)) for f in
                                    (v.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()]).to(self.device)
        return self.model(prep(a), prep(b)).reshape(len(a)).float().cpu()


def latent_l2(pred, gt, n_cond=1):
    """(B, C, T', H', W') latents -> (B,) MSE over the predicted latent frames [n_cond:]."""
    return ((pred[:, :, n_cond:].double() - gt[:, :, n_cond:].double()) ** 2).mean((1, 2, 3, 4))


# ------------------------------------------------------------------------------------------------
# PCK: keypoint detectors, hits per threshold, action families

class MarkerDetector:
    """The synthetic data's exact detector: the centroid of each coloured marker (synthetic.detect_keypoints);
    only for episodes synthetic.py wrote (the protocol refuses it on others: real video has no markers).
    Interface of every detector: detector(frames) with frames uint8 (N, H, W, 3) RGB -> (N, 12, 2) float pixels
    (u, v) at the frames' resolution, pixel centres at integers, in data.KEYPOINT_NAMES order (left wrist, left
    thumb to little fingertip, then the right hand), NaN where a keypoint is not found. A detector that also
    takes the keyword `reference` is given the annotated keypoints of the same frames ((N, 12, 2), NaN where not
    annotated; None without annotations), e.g. to tell left from right (MediaPipeHands)."""

    def __call__(self, frames):
        return np.stack([synthetic.detect_keypoints(f) for f in frames])


class KeypointModel:
    """A real hand-keypoint detector exported as TorchScript (e.g. 2D keypoints of HaMeR or WiLoR): the file
    maps float (N, 3, H, W) RGB in [0, 1] to (N, 12, 3) = pixel u, v at the input resolution in
    data.KEYPOINT_NAMES order and a confidence in [0, 1]; below min_confidence counts as not found."""

    def __init__(self, spec, min_confidence=0.5, device="cpu"):
        self.net = load_torchscript("keypoints", spec, device)
        self.min_confidence, self.device = min_confidence, device

    @torch.no_grad()
    def __call__(self, frames):
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255
        out = self.net(x).double().cpu().numpy()
        if out.shape != (len(frames), len(data.KEYPOINT_NAMES), 3):
            raise ValueError(f"the keypoint model returned {out.shape}, not (N, 12, 3): u, v, confidence")
        kp = out[..., :2].copy()
        kp[out[..., 2] < self.min_confidence] = np.nan
        return kp


WRISTS = [data.KEYPOINT_NAMES.index(f"{s}_wrist") for s in conditioning.HANDS]  # (left, right)
PER_HAND = len(data.KEYPOINT_NAMES) // len(WRISTS)  # a hand's wrist and 5 fingertips, contiguous


def match_hands(wrists, reference):
    """wrists (n, 2) of the detected hands, reference (2, 2) the annotated left and right wrists (NaN: unknown)
    -> (left, right) indices of the detected hands (None: no hand there), or None where no annotated wrist is
    known. The assignment chosen places the most hands on known wrists, then the most hands, then lies nearest
    (the distances to the known wrists summed)."""
    known = np.isfinite(reference).all(-1)
    if not known.any():
        return None
    options = [p for p in itertools.permutations([*range(len(wrists)), None, None], 2) if None in p or p[0] != p[1]]

    def cost(p):
        on_known = [(s, i) for s, i in enumerate(p) if i is not None and known[s]]
        return (-len(on_known), -sum(i is not None for i in p),
                sum(np.linalg.norm(wrists[i] - reference[s]) for s, i in on_known))
    return min(options, key=cost)


class MediaPipeHands:
    """Google's MediaPipe Hands through its legacy API `mediapipe.solutions.hands`, offline. The optional extra
    `hands` (pip install 'dexac-wm[hands]') pins mediapipe 0.10.21: the last version whose wheel bundles the hand
    models (palm_detection_full.tflite, hand_landmark_full.tflite) and still has the legacy API; later ones ship
    no model, and their Tasks API downloads hand_landmarker.task. It supports Python 3.9-3.12 only and pins
    numpy<2 (installing it downgrades numpy). Each frame alone (static_image_mode): 21 landmarks per hand, x and y
    normalized to [0, 1] by the width and height; ours are landmarks 0, 4, 8, 12, 16, 20 (wrist, thumb to
    little fingertip). Left and right come from matching the detected wrists to the annotated ones
    (`reference`, match_hands), not from MediaPipe's label: the legacy and the Tasks API document opposite
    handedness conventions. Without a reference the legacy documentation's convention is used (it assumes a
    mirrored selfie image: "Left" is the right hand of an unmirrored egocentric frame)."""

    LANDMARKS = (0, 4, 8, 12, 16, 20)  # of MediaPipe's 21 per hand, in data.KEYPOINT_NAMES' order

    def __init__(self, min_detection_confidence=0.5, model_complexity=1):
        try:
            import mediapipe
        except ImportError:
            raise ImportError("--detector mediapipe needs the optional mediapipe 0.10.21 (Python 3.9-3.12; it "
                              "pins numpy<2): pip install 'dexac-wm[hands]'") from None
        for kind in ("hand_landmark", "palm_detection"):  # the models its wheel bundles, checked like any network
            if hub.locate(NETWORKS[kind]) is None:
                raise WeightsError(f"{NETWORKS[kind].file} ({NETWORKS[kind].what}) is missing from mediapipe "
                                   f"{getattr(mediapipe, '__version__', '?')} or is another model: pip install "
                                   f"'dexac-wm[hands]' (mediapipe 0.10.21)")
        self.hands = mediapipe.solutions.hands.Hands(static_image_mode=True, max_num_hands=2,
                                                     model_complexity=model_complexity,
                                                     min_detection_confidence=min_detection_confidence)

    def __call__(self, frames, reference=None):
        N, H, W = frames.shape[:3]
        out = np.full((N, len(data.KEYPOINT_NAMES), 2), np.nan)
        for n in range(N):
            res = self.hands.process(np.ascontiguousarray(frames[n]))
            # normalized image coordinates (0: the left edge) -> pixel centres at integers, as data.load_clip's
            hands = np.array([[(h.landmark[j].x * W - 0.5, h.landmark[j].y * H - 0.5) for j in self.LANDMARKS]
                              for h in res.multi_hand_landmarks or []]).reshape(-1, PER_HAND, 2)
            slots = None if reference is None else match_hands(hands[:, 0], np.asarray(reference[n])[WRISTS])
            if slots is None:  # the label, read as the legacy docs say: swapped on unmirrored frames
                labels = [h.classification[0].label for h in res.multi_handedness or []]
                slots = [labels.index(mirrored) if mirrored in labels else None for mirrored in ("Right", "Left")]
            for s, i in enumerate(slots):
                if i is not None:
                    out[n, s * PER_HAND:(s + 1) * PER_HAND] = hands[i]
        return out


NEED_DETECTOR = ("PCK needs a detector, --detector: markers (synthetic.py's data only), mediapipe (pip install "
                 "'dexac-wm[hands]'), module:function or path/to/file.py:function (your callable, the interface "
                 "of evaluate.MarkerDetector; a class is instantiated without arguments), or a TorchScript file "
                 "(evaluate.KeypointModel)")
REAL_VIDEO = ("PCK on real video needs a hand detector: --detector mediapipe (pip install 'dexac-wm[hands]') or "
              "--detector module:function (your callable, the interface of evaluate.MarkerDetector)")


def load_detector(spec, device="cpu"):
    """--detector -> a detector (MarkerDetector's interface): 'markers', 'mediapipe', 'module:function' or
    'path/to/file.py:function' (a callable; a class is instantiated without arguments), else a TorchScript file,
    URL or Hub file (KeypointModel)."""
    if spec is None:
        raise ValueError(NEED_DETECTOR)
    if spec == "markers":
        return MarkerDetector()
    if spec == "mediapipe":
        return MediaPipeHands()
    if ":" not in spec or "://" in spec:
        return KeypointModel(spec, device=device)
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ImportError(f"no file {where}")
            found = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        obj = getattr(module, name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--detector {spec}: {e} (a module on the Python path, or a .py file, and the name of a "
                         f"callable in it)") from e
    obj = obj() if inspect.isclass(obj) else obj
    if not callable(obj):
        raise ValueError(f"--detector {spec}: {name} is not callable")
    return obj


def detect(detector, frames, reference=None):
    """uint8 (N, H, W, 3) frames -> the detector's (N, 12, 2) float64 pixels; the annotated keypoints go to a
    detector that takes `reference`."""
    try:
        takes = "reference" in inspect.signature(detector).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        takes = False
    out = np.asarray(detector(frames, reference=reference) if takes else detector(frames), np.float64)
    if out.shape != (len(frames), len(data.KEYPOINT_NAMES), 2):
        raise ValueError(f"the PCK detector {detector!r} returned {out.shape} for {len(frames)} frames, not "
                         f"(N, 12, 2) pixels (u, v) in data.KEYPOINT_NAMES order (see MarkerDetector)")
    return out


def pck_detector(spec, episodes, real=None):
    """The protocol's detector for these episodes (data.Episode): None -> 'markers' when synthetic.py wrote every
    one (synthetic.is_synthetic), else an error naming --detector; 'markers' on any other episode is the same
    error (real video has no markers); any other spec as given. real: instead of episodes, what is known not to
    be synthetic.py's ('' when all are)."""
    if spec not in (None, "markers"):
        return spec
    if real is None:
        ids = sorted({e.id for e in episodes if not synthetic.is_synthetic(e.path)})
        real = f"{len(ids)} evaluated episode(s) ({', '.join(ids[:3])}) are not synthetic.py's" if ids else ""
    if real:
        raise ValueError(f"{REAL_VIDEO}. {real}: the colour-marker detector would score noise there (synthetic "
                         f"data written before its files were marked: write it again)")
    return "markers"


def detector_or_leave_out(choose, spec, metrics_spec, metrics, left_out):
    """PCK's detector, choose() (pck_detector's rules), when pck is among metrics -> (detector, metrics, left_out).
    Under --metrics auto without --detector, no detector for this data leaves pck out, named; else the error
    stands."""
    if "pck" not in metrics:
        return spec, metrics, left_out
    try:
        return choose(), metrics, left_out
    except ValueError as e:  # 'auto' leaves out what it lacks; asked for, it is an error
        if metrics_spec != "auto" or spec is not None:
            raise
        print(f"metrics left out (no detector for this data; name one with --detector):\n  pck: {e}")
        return spec, tuple(m for m in metrics if m != "pck"), {**left_out, "pck": " ".join(str(e).split())}


def pck(pred_kp, gt_kp, valid=None, thresholds=PCK_THRESHOLDS):
    """(..., K, 2) pixels, NaN where not found -> (hits per threshold (len(thresholds),), keypoints counted).
    A GT keypoint counts when found (and valid); a missing prediction is a miss."""
    pred_kp, gt_kp = np.asarray(pred_kp, np.float64), np.asarray(gt_kp, np.float64)
    counted = np.isfinite(gt_kp).all(-1) & (True if valid is None else np.asarray(valid, bool))
    dist = np.linalg.norm(pred_kp - gt_kp, axis=-1)[counted]  # NaN <= k is False
    return np.array([int((dist <= k).sum()) for k in thresholds]), int(counted.sum())


def action_family(actions, mean, std):
    """(T_a, 57) raw actions -> 'wrist' | 'finger' | 'head': the family with the largest RMS z-score over its
    dimensions and all steps (ties go to the first of wrist, finger, head)."""
    z = (np.asarray(actions, np.float64) - mean) / (np.asarray(std, np.float64) + 1e-6)
    rms = [np.sqrt((z[:, list(idx)] ** 2).mean()) for idx in conditioning.ACTION_FAMILIES.values()]
    return FAMILIES[int(np.argmax(rms))]


# ------------------------------------------------------------------------------------------------
# Per-clip metrics and the report

def _pck_summary(clips, thresholds, ceiling=False):
    """pck@k pooled over the clips' counted keypoints (percent), and with ceiling pck_gt@k; both None ("no
    keypoints") where none counts or the detector found none of them on the ground-truth frames."""
    scored = [c for c in clips if "pck_count" in c]
    count = sum(c["pck_count"] for c in scored)
    found = sum(c.get("pck_found", c["pck_count"]) for c in scored)
    out = {}
    for name, key in (("pck", "pck_hits"), ("pck_gt", "pck_gt_hits"))[:1 + ceiling]:
        hits = sum(np.asarray(c[key]) for c in scored)
        out.update({f"{name}@{k:g}": (100.0 * hits[i] / count if count and found else None)
                    for i, k in enumerate(thresholds)})
    return out


def aggregate(clips, frechet=None, thresholds=PCK_THRESHOLDS, resolution=None):
    """Per-clip metric dicts -> the report: means over clips of psnr/ssim/lpips/dreamsim/latent_l2, the set-level
    metrics as given (frechet: {fid / fvd / fvd_stylegan: value}), PCK pooled over keypoints (percent; pck_gt:
    the detector's ceiling, where clips were annotated), and PCK per action family. pck_against says what the
    predicted keypoints were compared with."""
    out = {"clips": len(clips)}
    for m in ("psnr", "ssim", "lpips", "dreamsim", "latent_l2"):
        values = [c[m] for c in clips if m in c]
        if values:
            out[m] = float(np.mean(values))
    out.update({k: v for k, v in (frechet or {}).items() if v is not None})
    if any("pck_count" in c for c in clips):
        ceiling = any("pck_gt_hits" in c for c in clips)
        out.update(_pck_summary(clips, thresholds, ceiling), pck_resolution=resolution,
                   pck_against="annotations" if ceiling else "the detector on the ground-truth frames")
        if any("family" in c for c in clips):
            out["families"] = {f: {"clips": sum(c.get("family") == f for c in clips),
                                   **_pck_summary([c for c in clips if c.get("family") == f], thresholds, ceiling)}
                               for f in FAMILIES}
    return out


class Evaluator:
    """Accumulates per-clip metrics (and FID/FVD features) batch by batch; report() -> aggregate(...).
    Networks come loaded (load_lpips, load_torchscript); a metric whose network is missing is an error. The PCK
    detector (load_detector) defaults to the synthetic data's MarkerDetector."""

    def __init__(self, metrics=("psnr", "ssim"), *, n_cond=1, lpips=None, dreamsim=None, inception=None, i3d=None,
                 i3d_stylegan=None, detector=None, stats=None, device="cpu", chunk=16):
        if set(metrics) - set(METRICS):
            raise ValueError(f"unknown metrics {sorted(set(metrics) - set(METRICS))}; choose from {METRICS}")
        for m, arg, net in (("lpips", "lpips", lpips), ("dreamsim", "dreamsim", dreamsim),
                            ("fid", "inception", inception), ("fvd", "i3d", i3d),
                            ("fvd_stylegan", "i3d_stylegan", i3d_stylegan)):
            if m in metrics and net is None:
                raise ValueError(f"{m} needs its network: pass {arg}= (load_networks)")
        self.metrics, self.n_cond, self.device, self.chunk = tuple(metrics), n_cond, device, chunk
        self.lpips, self.dreamsim, self.inception, self.i3d, self.i3d_stylegan = (lpips, dreamsim, inception, i3d,
                                                                                 i3d_stylegan)
        self.detector = detector or MarkerDetector()
        self.stats = stats  # (mean, std) from data.load_stats, for the action families
        self.clips, self.features, self.resolution = [], {m: ([], []) for m in FRECHET}, None

    def _per_frame(self, fn, p, g):  # (B, C, T, H, W) pair -> (B, T), frames in chunks
        B, C, T, H, W = p.shape
        x, y = (v.transpose(1, 2).reshape(B * T, C, H, W) for v in (p, g))
        with torch.no_grad():
            return torch.cat([fn(a, b) for a, b in zip(x.split(self.chunk), y.split(self.chunk))]).view(B, T)

    def add(self, pred, gt, *, actions=None, keypoints=None, keypoint_valid=None, pred_latents=None,
            gt_latents=None):
        """pred, gt (B, 3, T, H, W) uint8 or [0, 1]; actions (B, T-1, 57) raw; keypoints (B, T, 12, 2) the
        annotated pixels and keypoint_valid (B, T, 12) (data.load_clip's); latents (B, C, T', H', W') -> the
        per-clip metric dicts of this batch (also kept for report()). PCK per clip: pck_hits (per threshold) of
        pck_count keypoints, pck_found of them found on the ground-truth frames, and with keypoints pck_gt_hits;
        without keypoints the detector on the ground-truth frames is the reference."""
        p, g = as_unit(pred, "pred").to(self.device), as_unit(gt, "gt").to(self.device)
        if p.shape != g.shape or p.ndim != 5 or p.shape[1] != 3 or p.shape[2] <= self.n_cond:
            raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} must be equal (B, 3, T, H, W) "
                             f"videos with more than n_cond={self.n_cond} frames")
        whole = (p, g)  # the cookbook's FVD scores every frame, the conditioning one included
        p, g = p[:, :, self.n_cond:], g[:, :, self.n_cond:]  # predicted frames only
        B, _, T, H, W = p.shape
        self.resolution = [H, W]
        per = {}
        if "psnr" in self.metrics:
            per["psnr"] = self._per_frame(psnr_frames, p, g).mean(1)
        if "ssim" in self.metrics:
            per["ssim"] = self._per_frame(ssim_frames, p, g).mean(1)
        if "lpips" in self.metrics:
            per["lpips"] = self._per_frame(lambda a, b: self.lpips(a * 2 - 1, b * 2 - 1), p, g).mean(1)
        if "dreamsim" in self.metrics:
            per["dreamsim"] = self._per_frame(self.dreamsim, p, g).mean(1)
        if "latent_l2" in self.metrics:
            if pred_latents is None or gt_latents is None:
                raise ValueError("latent_l2 needs pred_latents and gt_latents")
            per["latent_l2"] = latent_l2(torch.as_tensor(pred_latents), torch.as_tensor(gt_latents),
                                         self.n_cond)
        if "fid" in self.metrics:  # features are kept for report()
            for store, v in zip(self.features["fid"], (p, g)):
                store.append(inception_features(v.transpose(1, 2).flatten(0, 1), self.inception))
        if "fvd" in self.metrics:
            for store, v in zip(self.features["fvd"], whole):
                store.append(cookbook_i3d_features(v, self.i3d))
        if "fvd_stylegan" in self.metrics:
            for store, v in zip(self.features["fvd_stylegan"], (p, g)):
                store.append(i3d_features(v, self.i3d_stylegan))
        clips = [{k: float(v[b]) for k, v in per.items()} for b in range(B)]
        if "pck" in self.metrics:
            to_u8 = lambda v: (v.permute(0, 2, 3, 4, 1) * 255).round().byte().cpu().numpy()  # (B, T, H, W, 3)
            pu8, gu8 = to_u8(p), to_u8(g)
            for b, clip in enumerate(clips):
                valid = None if keypoint_valid is None else np.asarray(keypoint_valid[b], bool)[self.n_cond:]
                if keypoints is None:
                    hits, count = pck(detect(self.detector, pu8[b]), detect(self.detector, gu8[b]), valid)
                    clip.update(pck_hits=hits.tolist(), pck_count=count, pck_found=count)
                    continue
                truth = np.asarray(keypoints[b], np.float64)[self.n_cond:]  # (T, 12, 2)
                if valid is not None:
                    truth = np.where(valid[..., None], truth, np.nan)  # not counted, and no reference
                on_gt = detect(self.detector, gu8[b], truth)
                hits, count = pck(detect(self.detector, pu8[b], truth), truth)
                found = int((np.isfinite(truth).all(-1) & np.isfinite(on_gt).all(-1)).sum())
                clip.update(pck_hits=hits.tolist(), pck_count=count, pck_found=found,
                            pck_gt_hits=pck(on_gt, truth)[0].tolist())
        if actions is not None and self.stats is not None:
            for b, clip in enumerate(clips):
                clip["family"] = action_family(np.asarray(actions[b]), *self.stats)
        self.clips += clips
        return clips

    def report(self):
        fd = {m: frechet_of(m, np.concatenate(f[0]), np.concatenate(f[1])) for m, f in self.features.items() if f[0]}
        return aggregate(self.clips, fd, resolution=self.resolution)


# ------------------------------------------------------------------------------------------------
# Command line: compare two sets of videos (the rollout protocol is below)

def read_video(path):
    """.npy ((T, H, W, 3) or (N, T, H, W, 3), uint8 or [0, 1]) or a video file -> (N, 3, T, H, W)."""
    path = Path(path)
    if path.suffix == ".npy":
        v = torch.from_numpy(np.load(path))
    else:
        v = torch.from_numpy(data.decode_frames(path, 0, data.video_frame_count(path))[0])
    v = v[None] if v.ndim == 4 else v
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"{path}: expected (T, H, W, 3) or (N, T, H, W, 3) frames, got {tuple(v.shape)}")
    return v.permute(0, 4, 1, 2, 3)


def list_videos(path):
    """A video file, or a folder of them -> {name: path}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is neither a video file nor a folder of videos")
    files = [path] if path.is_file() else sorted(path.iterdir())
    return {f.stem: f for f in files if f.suffix in (".npy", ".mp4", ".avi", ".mkv")}


def fetch_networks(metrics, weights, offline=None):
    """The registry files these metrics need and were not given a path for (weights: {kind: spec or None}):
    found or downloaded (hub.fetch_all); offline, one WeightsError lists every missing one at once."""
    kinds = dict.fromkeys(k for m in metrics for k in NEEDS.get(m, ()) if weights.get(k) is None)
    return hub.fetch_all([NETWORKS[k] for k in kinds], offline=offline)


def load_networks(metrics, weights, detector=None, device="cpu", offline=None):
    """The networks these metrics need, as Evaluator's keyword arguments. weights: {kind: path, URL, Hub file or
    None} (WEIGHT_FLAGS; None: the registry's file, fetched); detector: --detector (load_detector), for pck."""
    fetch_networks(metrics, weights, offline)  # offline: every missing file named in one message, up front
    w = weights.get
    return {"lpips": load_lpips(w("alexnet"), w("lpips"), device, offline) if "lpips" in metrics else None,
            "dreamsim": DreamSim(device, offline) if "dreamsim" in metrics else None,
            "inception": load_torchscript("inception", w("inception"), device, offline) if "fid" in metrics
            else None,
            "i3d": load_i3d(w("i3d"), device, offline) if "fvd" in metrics else None,
            "i3d_stylegan": load_torchscript("i3d_stylegan", w("i3d_stylegan"), device, offline)
            if "fvd_stylegan" in metrics else None,
            "detector": load_detector(detector, device) if "pck" in metrics else None}


def compare(pred, gt, *, metrics="psnr,ssim", cond_frames=1, weights=None, detector=None, device="cpu",
            out=None, offline=None):
    """Score the videos in pred against those of the same names in gt (or one file against one) -> the report,
    printed (and written to out). Videos carry no annotations: PCK compares the detector (which pck needs named:
    these files cannot tell synthetic data from real video) on pred with the same on gt."""
    preds, gts = list_videos(pred), list_videos(gt)
    if not preds or preds.keys() != gts.keys() and not len(preds) == len(gts) == 1:
        raise ValueError(f"{pred} and {gt} must hold videos with the same names; only in pred: "
                         f"{sorted(set(preds) - set(gts))[:5]}, only in gt: {sorted(set(gts) - set(preds))[:5]}")
    named = metrics not in ("paper", "auto")
    metrics, _ = protocol_metrics(metrics, weights or {}, offline)
    if named and "latent_l2" in metrics:
        raise ValueError("latent_l2 needs latents; it runs in the rollout protocol, not in compare")
    metrics = tuple(m for m in metrics if m != "latent_l2")  # paper / auto: videos carry no latents
    ev = Evaluator(metrics, n_cond=cond_frames, device=device,
                   **load_networks(metrics, weights or {}, detector, device, offline))
    for p, g in tqdm(list(zip(preds.values(), gts.values())), desc="compare"):
        ev.add(read_video(p), read_video(g))
    report = ev.report()
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
    print("; ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
    return report


# ------------------------------------------------------------------------------------------------
# The rollout protocol: python evaluate.py --checkpoint A.safetensors B.safetensors --data ROOT --horizon 25
#
# Evaluation clips: starts 0, H, 2H, ... of every test-split episode (H = horizon frames: 1 given + H - 1
# predicted from H - 1 actions), in order; --clips N keeps N of them, evenly spread. Clip i is rolled out
# with seed (seed + i), so results do not depend on ranks or batching. Rank r of W takes clips r, r + W, ...
# Each clip's scores go to OUT/<row>/clips/<i>.json as soon as they exist (FID/FVD features beside it), so
# a restarted job skips what is done. Rank 0 then writes report.json, table.md and figure.png.
# Chunks are chained as the official code does (--carry reencode: each chunk's last frame decoded, quantized
# to uint8, encoded alone); the carry is in each row's settings.json, report.json's config and table.md.

TABLE1 = (("psnr", "PSNR", 1), ("ssim", "SSIM", 1), ("lpips", "LPIPS", -1), ("fid", "FID", -1),
          ("fvd", "FVD", -1), ("pck@10", "PCK@10", 1), ("pck@20", "PCK@20", 1))  # key, title, better sign


def eval_plan(root, horizon, max_clips=None, *, splits=data.EVAL_SPLITS,
              test_fraction=data.EGOVERSE_TEST_FRACTION):
    """-> (the splits' usable runs, (N, 2) int64 (run index, start) of the evaluation clips): every clip lies
    within one usable run, so no invalid frame or time gap is ever scored."""
    episodes, _ = data.load_index(root, splits, test_fraction=test_fraction)
    plan = data.ClipSampler([e.frames for e in episodes], horizon, train=False).plan()
    if not len(plan):
        raise ValueError(f"no usable run of the {'/'.join(splits)} episodes in {root} holds a {horizon}-frame "
                         f"clip")
    if max_clips and max_clips < len(plan):
        plan = plan[np.linspace(0, len(plan) - 1, max_clips).round().astype(int)]
    return episodes, plan


@dataclass(frozen=True)
class EvalConfig:
    """The protocol's settings: main() builds one from the command line (its flags, same names and defaults);
    miniature.py builds its own."""
    checkpoints: tuple = ()  # exported models, a table row each
    names: tuple = None  # a row name per checkpoint (its folder under out); None: each run's folder name
    splits: str = ",".join(data.EVAL_SPLITS)  # (above `data`, which shadows the module from here on)
    test_fraction: float = data.EGOVERSE_TEST_FRACTION
    data: str = None
    horizon: int = 25
    clips: int = None  # None: all
    metrics: str = "auto"
    out: str = "evals"
    steps: int = 35
    sampler: str = None  # None: each backbone's default (sample.DEFAULT_SAMPLER: Cosmos' official UniPC; DDIM)
    schedule: str = "shifted"
    shift: float = None  # None: the training run's
    guidance: float = 0.0
    negative_prompt: str = None  # the unconditional branch's text with guidance; None: the null embedding
    carry: str = "reencode"  # what conditions the next chunk (sample.CARRIES): the official re-encoded frame
    seed: int = 0
    batch: int = 4
    shuffle_actions: bool = False
    figure_clips: int = 4
    init: str = None
    merge: bool = False  # LoRA exports: adapters folded into the base weights (the same function, faster)
    height: int = None  # None: the first checkpoint's training size
    width: int = None
    dtype: str = "fp32"
    device: str = None  # None: this rank's GPU, else cpu
    compile: bool = False  # torch.compile each DiT block (sample.py --compile)
    alexnet: str = None  # feature-network weights (WEIGHT_FLAGS); None: the registry's (NETWORKS), fetched
    lpips_heads: str = None
    inception: str = None
    i3d: str = None
    i3d_stylegan: str = None
    offline: bool = False  # never download (as HF_HUB_OFFLINE=1): one error lists every missing network file
    detector: str = None  # PCK's (load_detector); None: markers on synthetic.py's data, else an error


def protocol_metrics(spec, weights, offline=None):
    """--metrics -> (metrics, left out {metric: why}). 'paper': PAPER_METRICS, and any network missing is an
    error (one message for all, offline); 'auto': those of PAPER_METRICS whose networks are at hand or can be
    downloaded, the rest left out and named (the report and table.md carry the list); a comma-separated list:
    those, each an error when its network is missing. dreamsim and fvd_stylegan run only when named."""
    if spec not in ("auto", "paper"):
        metrics = tuple(m for m in spec.split(",") if m)
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}, or paper / auto")
        return metrics, {}
    if spec == "paper":
        return PAPER_METRICS, {}
    metrics, left_out = [], {}
    for m in PAPER_METRICS:
        try:
            for kind in NEEDS.get(m, ()):
                resolve_weights(kind, weights.get(kind), offline)
            metrics.append(m)
        except WeightsError as e:
            left_out[m] = " ".join(str(e).split())  # one line
    if left_out:
        print("metrics left out (no network; `python evaluate.py fetch-weights`, or name them with --metrics to "
              "make this an error):\n  " + "\n  ".join(f"{m}: {why}" for m, why in left_out.items()))
    return tuple(metrics), left_out


def row_name(checkpoint, shuffled, name=None):
    """runs/003-tiny-dexac-64x112/model.safetensors -> 003-tiny-dexac-64x112 (+ shuffled actions); name, when
    given (--names), stands for the folder's."""
    path = Path(checkpoint)
    name = name or (path.parent.name if path.stem == "model" and path.parent.name else path.stem)
    return name + (" (shuffled actions)" if shuffled else "")


def shuffled_actions(episodes, plan, i, horizon):
    """The control: clip i gets the actions of clip (i + N // 2) mod N, another clip of the same length."""
    e, s = plan[(i + len(plan) // 2) % len(plan)]
    track = data.read_track(episodes[e], int(s), int(s) + horizon).track
    return conditioning.compute_actions(track)


def _save_json(path, payload):
    hub.atomic_write(path, json.dumps(payload))  # whole or not at all: a restarted job trusts what it finds


def evaluate_checkpoint(cfg, checkpoint, row, *, size, episodes, plan, metrics, nets, rank, world, device):
    """Roll out and score this rank's clips that are not done yet, a batch at a time."""
    d = Path(cfg.out) / row / "clips"
    d.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in ("data", "splits", "test_fraction", "horizon", "clips", "steps",
                                             "sampler", "schedule", "shift", "guidance", "negative_prompt",
                                             "carry", "seed", "shuffle_actions", "height", "width", "dtype",
                                             "detector")}
    backbone = sample.read_export_meta(str(checkpoint)).get("backbone", "cosmos")
    settings.update(checkpoint=str(checkpoint), metrics=list(metrics),
                    sampler=cfg.sampler or sample.DEFAULT_SAMPLER[backbone])  # the one used, default or not
    saved = d.parent / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:  # kept clips must be these clips
        raise ValueError(f"{d.parent} holds results made with other settings ({saved}): choose another --out "
                         f"or delete it")
    if rank == 0:
        _save_json(saved, settings)
    todo = [i for i in range(rank, len(plan), world) if not (d / f"{i:05d}.json").exists()]
    if not todo:
        return
    dtype = hub.DTYPES[cfg.dtype]
    wm = sample.WorldModel(checkpoint, device=device, dtype=dtype, base=cfg.init, compile=cfg.compile,
                           merge=cfg.merge)
    stats = tuple(np.asarray(wm.info["action_stats"][k], np.float64) for k in ("mean", "std"))
    ev = Evaluator(metrics, device=device, stats=stats, **nets)
    for b in tqdm(range(0, len(todo), cfg.batch), desc=row, disable=rank != 0):
        batch, clips = [], []
        for i in todo[b:b + cfg.batch]:
            e, s = plan[i]
            try:
                clip = data.load_clip(episodes[e], int(s), cfg.horizon, size)  # one size for every row
                if cfg.shuffle_actions:
                    clip["rollout_actions"] = torch.from_numpy(shuffled_actions(episodes, plan, i, cfg.horizon))
            except data.DataError as err:  # a corrupt episode is skipped, with its reason, never fatal
                _save_json(d / f"{i:05d}.json", {"index": i, "episode": episodes[e].id, "start": int(s),
                                                 "skipped": str(err)})
                print(f"skipping clip {i} ({episodes[e].id} @ {s}): {err}")
                continue
            batch.append(i)
            clips.append(clip)
        if not clips:
            continue
        gt = torch.stack([c["video"] for c in clips])  # (B, 3, T, H, W) uint8
        actions = torch.stack([c["actions"] for c in clips])  # the true ones: they define the family
        given = torch.stack([c.get("rollout_actions", c["actions"]) for c in clips])
        try:
            pred, z = wm.rollout(gt[:, :, 0].permute(0, 2, 3, 1).numpy(), given.numpy(),
                                 [c["prompt"] for c in clips], [cfg.seed + i for i in batch], steps=cfg.steps,
                                 solver=cfg.sampler, schedule=cfg.schedule, shift=cfg.shift, guidance=cfg.guidance,
                                 negative_prompt=cfg.negative_prompt, carry=cfg.carry, progress=False,
                                 return_latents=True)
        except sample.NonFiniteRollout as err:  # never scored: black frames would pass for a (bad) result
            named = [f"clip {batch[k]} ({clips[k]['episode']} @ {clips[k]['start']})" for k in err.samples]
            raise sample.NonFiniteRollout(f"{row}: {', '.join(named) or 'a clip'}: {err}", err.samples) from None
        pred = torch.from_numpy(pred).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
        with torch.inference_mode():
            z_gt = wm.tokenizer.encode(gt.to(device, dtype) / 127.5 - 1).float().cpu()
        scores = ev.add(pred, gt, actions=actions, keypoints=torch.stack([c["keypoints"] for c in clips]),
                        keypoint_valid=torch.stack([c["keypoint_valid"] for c in clips]),
                        pred_latents=z[:, :, :z_gt.shape[2]].float().cpu(), gt_latents=z_gt)
        feats = {f"{m}_{side}": store[0].reshape(len(batch), -1, store[0].shape[-1])  # a slice per clip
                 for m in FRECHET for side, store in zip(("pred", "gt"), ev.features[m]) if store}
        for k, (i, score, clip) in enumerate(zip(batch, scores, clips)):
            if feats:
                np.savez(d / f"{i:05d}.npz", **{name: f[k] for name, f in feats.items()})
            if i < cfg.figure_clips:
                np.save(d / f"{i:05d}.npy", pred[k].permute(1, 2, 3, 0).numpy())  # for the figure
            _save_json(d / f"{i:05d}.json", {"index": i, "episode": clip["episode"], "start": clip["start"],
                                             "seed": cfg.seed + i, **score})
        ev.features = {m: ([], []) for m in FRECHET}  # on disk now; each batch starts empty


def collect(clip_dir, n_clips, resolution):
    """Rank 0: the per-clip files of one row -> its report (FID/FVD from the saved features)."""
    clips = [json.loads((clip_dir / f"{i:05d}.json").read_text()) for i in range(n_clips)]
    scored = [c for c in clips if "skipped" not in c]
    fd = {}
    files = [clip_dir / f"{c['index']:05d}.npz" for c in scored]
    loaded = [np.load(f) for f in files] if scored and all(f.is_file() for f in files) else []
    for m in FRECHET:
        if loaded and f"{m}_pred" in loaded[0]:
            fd[m] = frechet_of(m, *(np.concatenate([x[f"{m}_{side}"] for x in loaded]) for side in ("pred", "gt")))
    report = aggregate(scored, fd, resolution=list(resolution))
    report["skipped"] = [f"{c['episode']} @ {c['start']}: {c['skipped']}" for c in clips if "skipped" in c]
    return report


def _cell(value, ref=None, digits=2):
    if value is None:
        return "–"
    if value == NO_KEYPOINTS:
        return value
    text = f"{value:.{digits}f}"
    if ref is not None and ref != value and ref != 0:  # the paper's relative change against the first row
        text += f" ({(value - ref) / abs(ref) * 100:+.2f}%)"
    return text


NO_KEYPOINTS = "no keypoints"  # the cell of a PCK that counted nothing (None in the report)
CEILING_ROW = "ground truth (the detector's ceiling)"


def _pck_value(r, key):
    """A report's PCK for a table cell: NO_KEYPOINTS where the report holds None (PCK ran and counted nothing),
    None where it holds nothing (not run, or an action family without clips)."""
    counted_nothing = key.startswith("pck") and key in r and r[key] is None and r.get("clips", 1)
    return NO_KEYPOINTS if counted_nothing else r.get(key)


FID_NOTE = ("FID: not comparable with the paper's FID figures (the Cosmos cookbook's FID script feeds 0-255 floats "
            "where [0, 1] is expected; we feed what the network expects)")


def markdown_tables(reports, horizon, carry="reencode", left_out=None):
    """Table 1's layout (PSNR SSIM LPIPS FID FVD PCK@10 PCK@20, relative change against the first row), then
    latent L2, the finer PCK thresholds and PCK@10 per action family (Table 4). PCK against annotations adds a
    last row: the detector on the ground-truth frames (pck_gt, the same for every model). carry: the rollouts'
    (sample.CARRIES; None: not our rollouts), named in the header line. left_out {metric: why}: the metrics
    --metrics auto could not run, listed first; a FID column carries FID_NOTE; DreamSim and fvd_stylegan, when
    scored, get a column in the second table."""
    first = next(iter(reports.values()))
    res = first.get("pck_resolution")
    digits = {"ssim": 3, "lpips": 3}
    ceiling = {CEILING_ROW: {"clips": first["clips"], **{k.replace("pck_gt@", "pck@"): v for k, v in first.items()
                                                         if k.startswith("pck_gt@")},
                             "families": {f: {"clips": fam["clips"], "pck@10": fam.get("pck_gt@10")}
                                          for f, fam in first.get("families", {}).items()}}}
    ceiling = ceiling if any(k.startswith("pck_gt@") for k in first) else {}
    notes = ["Left out (no network at hand; `python evaluate.py fetch-weights`): "
             + "; ".join(f"{m}: {why}" for m, why in left_out.items()), ""] if left_out else []
    notes += [FID_NOTE, ""] if any("fid" in r for r in reports.values()) else []
    lines = notes + [f"Horizon {horizon} frames (1 given, {horizon - 1} predicted); {first['clips']} clips"
             + (f"; PCK in pixels at {res[0]}x{res[1]} against the {first.get('pck_against')}" if res else "")
             + (f"; chunks chained by carry {carry}: {sample.CARRIES[carry]}" if carry else "; videos made by other "
                "means, scored on an export's clips (compare --manifest)"), "",
             "| Model | " + " | ".join(t + (" ↑" if s > 0 else " ↓") for _, t, s in TABLE1) + " |",
             "|---|" + "---|" * len(TABLE1)]
    for name, r in {**reports, **ceiling}.items():
        lines.append(f"| {name} | " + " | ".join(
            _cell(_pck_value(r, k), first.get(k) if r is not first and name != CEILING_ROW else None,
                  digits.get(k, 2)) for k, _, _ in TABLE1) + " |")
    families = " | ".join(f"PCK@10 {f} ↑" for f in FAMILIES)
    titles = {"dreamsim": "DreamSim ↓", "fvd_stylegan": "FVD (StyleGAN-V I3D) ↓"}  # when scored
    extra = [k for k in titles if any(k in r for r in reports.values())]
    lines += ["", f"| Model | latent L2 ↓ | PCK@2.5 ↑ | PCK@5 ↑ | {families} |" + "".join(f" {titles[k]} |"
                                                                                      for k in extra),
              "|---|" + "---|" * (3 + len(FAMILIES) + len(extra))]
    for name, r in {**reports, **ceiling}.items():
        fams = [r.get("families", {}).get(f, {}) for f in FAMILIES]
        cells = [_cell(r.get("latent_l2"), digits=4), _cell(_pck_value(r, "pck@2.5")),
                 _cell(_pck_value(r, "pck@5"))]
        cells += [_cell(_pck_value(fam, "pck@10")) + f" (n={fam.get('clips', 0)})" for fam in fams]
        cells += [_cell(r.get(k), digits=3) for k in extra]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def short_labels(names, width=18):
    """Row names without the parts every row shares ('000-tiny-', '-48x80'), cut at '-', to fit the sheet."""
    tag = " (shuffled actions)"
    bases = [n.removesuffix(tag) for n in names]
    pre = os.path.commonprefix(bases) if len(names) > 1 else ""
    pre = pre[:pre.rfind("-") + 1]
    suf = os.path.commonprefix([b[::-1] for b in bases])[::-1] if len(names) > 1 else ""
    suf = suf[suf.find("-"):] if "-" in suf else ""
    short = [(b[len(pre):len(b) - len(suf)] or b) for b in bases]
    return [(b + (" (shuffled)" if n.endswith(tag) else ""))[:width] for b, n in zip(short, names)]


def figure(cfg, path, *, rows, size, episodes, plan):
    """Ground truth over each row's prediction for the first few clips: every 4th frame and the last."""
    names = dict(zip(rows, short_labels(list(rows))))
    sheet_rows, labels = [], []
    for i in range(min(cfg.figure_clips, len(plan))):
        preds = [(r, Path(cfg.out) / r / "clips" / f"{i:05d}.npy") for r in rows]
        preds = [(r, np.load(f)) for r, f in preds if f.is_file()]
        if not preds:
            continue
        e, s = plan[i]
        gt = data.load_clip(episodes[e], int(s), cfg.horizon, size)["video"].permute(1, 2, 3, 0).numpy()
        picks = sorted(set(range(0, len(gt), 4)) | {len(gt) - 1})
        sheet_rows.append([gt[t] for t in picks])
        labels.append(f"clip {i}: truth")
        for r, v in preds:
            sheet_rows.append([v[t] for t in picks])
            labels.append(names[r])
    if sheet_rows:
        data.contact_sheet(path, sheet_rows, labels)


def check_config(cfg):
    """Every setting of cfg checked before any work (miniature.py builds its own EvalConfig, not from flags)
    -> {checkpoint: its export metadata}. One ValueError/FileNotFoundError naming the flag."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)
    need(isinstance(cfg.horizon, int) and cfg.horizon >= 5 and (cfg.horizon - 1) % tok.TEMPORAL == 0,
         f"--horizon {cfg.horizon}: give 4k + 1 frames (5, 9, ..., 25, 65): the given frame and whole latent "
         f"frames of {tok.TEMPORAL}, as the latent L2 encodes the ground truth")
    need(cfg.steps is not None and cfg.steps >= 1, f"--steps {cfg.steps}: give at least 1 denoising step")
    need(cfg.batch >= 1, f"--batch {cfg.batch}: give at least 1 clip per batch")
    need(cfg.clips is None or cfg.clips >= 1, f"--clips {cfg.clips}: give at least 1 (or leave it out: all)")
    need(cfg.seed >= 0, f"--seed {cfg.seed}: give a seed >= 0")
    need(cfg.figure_clips >= 0, f"--figure-clips {cfg.figure_clips}: give 0 or more")
    need(math.isfinite(cfg.guidance) and cfg.guidance >= 0, f"--guidance {cfg.guidance}: give a finite g >= 0")
    need(cfg.shift is None or (math.isfinite(cfg.shift) and cfg.shift > 0), f"--shift {cfg.shift}: give a "
         f"finite shift > 0")
    need(0 <= cfg.test_fraction <= 1, f"--test-fraction {cfg.test_fraction}: give a fraction in [0, 1]")
    for flag in ("height", "width"):
        need(getattr(cfg, flag) is None or getattr(cfg, flag) > 0, f"--{flag} {getattr(cfg, flag)}: give a "
             f"positive size")
    need(cfg.schedule in ("shifted", "karras"), f"unknown schedule {cfg.schedule!r}; choose shifted or karras")
    need(cfg.carry in sample.CARRIES, f"unknown carry {cfg.carry!r}; choose one of {tuple(sample.CARRIES)}")
    need(cfg.dtype in ("fp32", "bf16"), f"unknown dtype {cfg.dtype!r}; choose fp32 or bf16")
    if not cfg.checkpoints:
        raise ValueError("--checkpoint: no model to evaluate (train.py exports RUN/model.safetensors)")
    if not cfg.data:
        raise ValueError("--data: the dataset root whose test split is evaluated")
    if cfg.names is not None:
        need(len(cfg.names) == len(cfg.checkpoints), f"--names: {len(cfg.names)} name(s) for "
             f"{len(cfg.checkpoints)} checkpoint(s); give one per --checkpoint, in its order")
        need(len(set(cfg.names)) == len(cfg.names), f"--names {list(cfg.names)}: give each row its own name")
        bad = [n for n in cfg.names if not n or n != n.strip() or any(c in n for c in '/\\:*?"<>|')]
        need(not bad, f"--names {bad}: a row name is a folder name under --out; leave out / \\ : * ? \" < > | and "
                      f"outer spaces")
    if cfg.device is not None:
        sample.check_device(cfg.device)
    metas = {c: sample.read_export_meta(c) for c in cfg.checkpoints}
    tc = metas[cfg.checkpoints[0]]["train_config"]
    size = (cfg.height or tc["height"], cfg.width or tc["width"])
    for c, meta in metas.items():
        backbone = meta.get("backbone", "cosmos")
        need(cfg.sampler is None or cfg.sampler in sample.samplers(backbone), f"--sampler {cfg.sampler} does not "
             f"sample the {backbone} model {c}: choose one of {sample.samplers(backbone)}, or leave it out (each "
             f"backbone's default)")
        steps_error = irasim.sample_steps_error(cfg.steps) if backbone == "irasim" else None
        need(not steps_error, f"--steps {cfg.steps} cannot sample the IRASim model {c}: {steps_error}")
        need(backbone != "irasim" or size == (meta["train_config"]["height"], meta["train_config"]["width"]),
             f"{c} is an IRASim model: it samples at its training size only, "
             f"{meta['train_config']['height']}x{meta['train_config']['width']} (its position embedding is fixed)")
        unit = sample.frame_unit(meta)
        need(not (size[0] % unit or size[1] % unit), f"--height/--width must be multiples of {unit} for {c}, "
             f"got {size[0]}x{size[1]}")
        need(not (cfg.guidance and meta.get("text", {}).get("mode") == "none"),
             f"--guidance needs models trained with text; {c} has text mode none (guidance would double the "
             f"compute and change nothing): drop --guidance")
    sample.check_out_dir(cfg.out)
    return metas


def protocol(cfg):
    """Every checkpoint of cfg rolled out and scored on the test clips (this rank's share of them); rank 0 then
    writes report.json, table.md and figure.png under cfg.out and returns {row: report} (other ranks: None)."""
    metas = check_config(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu") \
        if cfg.device is None else cfg.device
    weights = {kind: getattr(cfg, flag) for kind, flag in WEIGHT_FLAGS.items()}
    offline = cfg.offline or None  # None: HF_HUB_OFFLINE decides
    metrics, left_out = protocol_metrics(cfg.metrics, weights, offline)
    episodes, plan = eval_plan(cfg.data, cfg.horizon, cfg.clips, splits=data.split_names(cfg.splits),
                               test_fraction=cfg.test_fraction)
    used = [episodes[e] for e in np.unique(plan[:, 0])]
    detector, metrics, left_out = detector_or_leave_out(lambda: pck_detector(cfg.detector, used), cfg.detector,
                                                        cfg.metrics, metrics, left_out)
    cfg = replace(cfg, detector=detector)
    nets = load_networks(metrics, weights, cfg.detector, device, offline)
    if cfg.shuffle_actions and len(plan) < 2:  # clip i takes clip (i + N // 2) mod N's: itself when N = 1
        raise ValueError(f"--shuffle-actions needs at least 2 clips (each takes another clip's actions); the plan "
                         f"holds {len(plan)}")
    tc = metas[cfg.checkpoints[0]]["train_config"]  # one frame size for every row: as given, else the first's
    size = (cfg.height or tc["height"], cfg.width or tc["width"])
    rows = {}
    for c, name in zip(cfg.checkpoints, cfg.names or [None] * len(cfg.checkpoints)):
        row = row_name(c, cfg.shuffle_actions, name)
        if row in rows.values():
            raise ValueError(f"two checkpoints give the row name {row!r}: name the rows with --names, or put them "
                             f"in differently named folders")
        rows[c] = row
    if rank == 0:
        print(f"{len(plan)} clips of {cfg.horizon} frames from {len(episodes)} test episode(s), metrics "
              f"{','.join(metrics)}, {len(rows)} model(s), {world} rank(s) -> {cfg.out}")
    for c, row in rows.items():
        evaluate_checkpoint(cfg, c, row, size=size, episodes=episodes, plan=plan, metrics=metrics, nets=nets,
                            rank=rank, world=world, device=device)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    out = Path(cfg.out)
    reports = {row: collect(out / row / "clips", len(plan), size) for row in rows.values()}
    _save_json(out / "report.json", {"config": {**asdict(cfg), "size": list(size)}, "metrics": list(metrics),
                                     "left_out": left_out, "rows": reports})
    table = markdown_tables(reports, cfg.horizon, cfg.carry, left_out)
    (out / "table.md").write_text(table)
    figure(cfg, out / "figure.png", rows=list(rows.values()), size=size, episodes=episodes, plan=plan)
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'table.md'} and {out / 'figure.png'}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return reports


# ------------------------------------------------------------------------------------------------
# Other models' videos: `export` writes the evaluation clips, `compare --manifest` scores what a model made of them
#
# export: the protocol's plan (eval_plan: the same clips, in the same order) at the protocol's frame size, each clip
# as data.load_clip gives it to the rollout: DIR/<name>/ holds first.png (the given frame), actions.npy (raw,
# (T-1, 57) float32), prompt.txt, video.npy (the ground truth, lossless: uint8 (T, H, W, 3)), keypoints.npy
# ((T, 12, 2) float32 pixels) and keypoint_valid.npy ((T, 12) bool); clip.json, written last, marks it done, so a
# rerun does only what is missing. DIR/manifest.json lists every clip (name = the protocol's index, 00000, ...) with
# its episode, start frame, action family (action_family with the statistics it also holds) and prompt.
# compare --manifest: one video per clip, DIR's clip name + .npy or .mp4 (read_video), T frames with the given one
# first (it is not scored), scored as evaluate_checkpoint scores a rollout; latent_l2 needs the model's latents and
# is not available.

EXPORT_VERSION = 1
EXPORT_FILES = {"first": "first.png", "actions": "actions.npy", "prompt": "prompt.txt", "video": "video.npy",
                "keypoints": "keypoints.npy", "keypoint_valid": "keypoint_valid.npy"}
RESIZE_FILTER = "bicubic, antialiased (torch.nn.functional.interpolate, antialias=True), clamped to [0, 1]"
NO_LATENTS = "latent_l2 needs the model's latents: only the rollout protocol (--checkpoint) has them"


def _save_npy(path, array):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    hub.atomic_write(path, buf.getvalue())


def _save_png(path, frame):
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="png")
    hub.atomic_write(path, buf.getvalue())


def export_stats(spec, root):
    """--stats -> (mean, std) float64 (57,) and where they came from: a stats.json, or an exported model (the
    statistics the protocol uses for its families); None: ROOT/stats.json."""
    path = Path(spec) if spec else Path(root) / "stats.json"
    if path.suffix == ".safetensors":
        s = sample.read_export_meta(str(path))["action_stats"]
        return np.asarray(s["mean"], np.float64), np.asarray(s["std"], np.float64), str(path)
    if not path.is_file():
        raise ValueError(f"the action families need the action statistics, and {path} does not exist: pass --stats "
                         f"(a stats.json, or the exported model whose families you compare with), or make it with "
                         f"`python data.py stats --data {root} --out {path}`")
    mean, std = data.load_stats(path)
    return mean.astype(np.float64), std.astype(np.float64), str(path)


def export_clips(root, out, *, horizon=25, clips=None, splits=data.EVAL_SPLITS,
                 test_fraction=data.EGOVERSE_TEST_FRACTION, size=data.DEFAULT_SIZE, stats=None):
    """The protocol's evaluation clips (eval_plan, data.load_clip at `size`) written into out -> the manifest.
    Done clips are kept (an interrupted export resumes); a corrupt episode's clips are recorded as skipped."""
    if horizon < 2:
        raise ValueError(f"--horizon {horizon}: give at least 2 frames (the given one and one to predict)")
    size = tuple(int(x) for x in size)
    mean, std, stats_source = export_stats(stats, root)
    episodes, plan = eval_plan(root, horizon, clips, splits=tuple(splits), test_fraction=test_fraction)
    out = sample.check_out_dir(out)
    settings = {"version": EXPORT_VERSION, "data": str(Path(root).resolve()), "splits": list(splits),
                "test_fraction": test_fraction, "horizon": horizon, "clips": clips, "size": list(size),
                "cond_frames": 1, "action_stats": {"source": stats_source, "mean": mean.tolist(), "std": std.tolist()}}
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:  # kept clips must be these clips
        raise ValueError(f"{out} holds an export made with other settings ({saved}): choose another --out or "
                         f"delete it")
    _save_json(saved, settings)
    entries, done = [], 0
    for i, (e, s) in enumerate(tqdm(plan, desc="export")):
        name, ep = f"{i:05d}", episodes[e]
        d, marker = out / f"{i:05d}", out / f"{i:05d}" / "clip.json"
        if marker.is_file():
            entries.append(json.loads(marker.read_text()))
            done += 1
            continue
        d.mkdir(exist_ok=True)
        try:
            clip = data.load_clip(ep, int(s), horizon, size)
        except data.DataError as err:  # a corrupt episode is skipped, with its reason, never fatal
            entry = {"index": i, "name": name, "episode": ep.id, "start": ep.start + int(s), "skipped": str(err)}
            print(f"skipping clip {i} ({ep.id} @ {ep.start + int(s)}): {err}")
        else:
            video = clip["video"].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3) uint8
            _save_png(d / EXPORT_FILES["first"], video[0])
            _save_npy(d / EXPORT_FILES["video"], video)
            _save_npy(d / EXPORT_FILES["actions"], clip["actions"].numpy())  # (T-1, 57) float32, raw
            _save_npy(d / EXPORT_FILES["keypoints"], clip["keypoints"].numpy())  # (T, 12, 2) float32
            _save_npy(d / EXPORT_FILES["keypoint_valid"], clip["keypoint_valid"].numpy())  # (T, 12) bool
            hub.atomic_write(d / EXPORT_FILES["prompt"], clip["prompt"])
            entry = {"index": i, "name": name, "episode": clip["episode"], "start": clip["start"],
                     "family": action_family(clip["actions"].numpy(), mean, std), "prompt": clip["prompt"],
                     "files": {k: f"{name}/{f}" for k, f in EXPORT_FILES.items()}}
        _save_json(marker, entry)  # last: the clip is done
        entries.append(entry)
    used = sorted({int(e) for e in plan[:, 0]})
    manifest = {"format": "dexac-wm evaluation clips", **settings, "frames": horizon,
                "synthetic": all(synthetic.is_synthetic(episodes[e].path) for e in used),
                "episodes": len(used), "clips": entries}
    hub.atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
    skipped = sum("skipped" in c for c in entries)
    print(f"exported {len(entries) - skipped} clips of {horizon} frames at {size[0]}x{size[1]} from {len(used)} "
          f"episode(s) ({done} already there, {skipped} skipped) -> {out / 'manifest.json'}")
    return manifest


def read_manifest(path):
    """An export folder (or its manifest.json) -> the manifest, with `dir` (the folder) added; one clear error for
    a missing, unfinished or newer export."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        unfinished = (file.parent / "settings.json").is_file()
        raise ValueError(f"--manifest {path}: no manifest.json there" + (
            " (the export did not finish: run the same `evaluate.py export` again)" if unfinished else
            " (write one with `python evaluate.py export --data ROOT --out DIR`)"))
    manifest = json.loads(file.read_text())
    if manifest.get("version") != EXPORT_VERSION:
        raise ValueError(f"{file} has export format version {manifest.get('version')}; this evaluate.py reads "
                         f"version {EXPORT_VERSION}: export the clips again")
    return {**manifest, "dir": str(file.parent)}


def manifest_metrics(spec, weights, offline=None):
    """--metrics for compare --manifest -> (metrics, left out {metric: why}) as protocol_metrics, where latent_l2 is
    always left out (NO_LATENTS); naming it is an error."""
    metrics, left_out = protocol_metrics(spec, weights, offline)
    if "latent_l2" in metrics and spec not in ("auto", "paper"):
        raise ValueError(f"--metrics latent_l2: {NO_LATENTS}; leave it out")
    return tuple(m for m in metrics if m != "latent_l2"), {"latent_l2": NO_LATENTS, **left_out}


def video_shape(path):
    """A predicted video's (videos, frames, height, width), read from its header (npy or video file)."""
    path = Path(path)
    if path.suffix == ".npy":
        shape = np.load(path, mmap_mode="r").shape
        return (1, *shape[:3]) if len(shape) == 4 else tuple(shape[:4])
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            h, w = s.codec_context.height, s.codec_context.width
    except (av.FFmpegError, OSError, IndexError) as e:
        raise ValueError(f"{path}: unreadable video ({e})") from None
    return 1, data.video_frame_count(path), h, w


def check_prediction(name, path, shape, *, frames, size, resize=False, trim=False):
    """One predicted video's shape against the manifest -> None, or what is wrong and the flag that fixes it."""
    n, t, h, w = shape
    if n != 1:
        return f"clip {name}: {path} holds {n} videos; give one video per clip"
    if t < frames:
        return (f"clip {name}: {path} has {t} frames, expected {frames} (the given first frame, {name}/first.png, "
                f"then {frames - 1} predicted): a model that outputs only the predicted frames needs first.png "
                f"put in front")
    if t > frames and not trim:
        return f"clip {name}: {path} has {t} frames, expected {frames}: pass --trim to score its first {frames}"
    if (h, w) != tuple(size) and not resize:
        return (f"clip {name}: {path} is {h}x{w}, expected the manifest's {size[0]}x{size[1]}: pass --resize "
                f"(stretched to {size[0]}x{size[1]}, {RESIZE_FILTER}) or generate at that size")
    return None


def resize_video(video, size):
    """(N, 3, T, h, w) uint8 or [0, 1] -> (N, 3, T, H, W) float in [0, 1], each frame stretched to size."""
    v = as_unit(video, "pred")
    N, C, T = v.shape[:3]
    x = v.transpose(1, 2).flatten(0, 1).float()  # (N*T, 3, h, w)
    x = F.interpolate(x, tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x.view(N, T, C, *size).transpose(1, 2)


def read_prediction(name, path, *, frames, size, resize=False, trim=False):
    """A predicted video -> (1, 3, T, H, W) as the manifest's ground truth: trimmed to T frames with trim,
    stretched to size with resize; any other mismatch is check_prediction's error."""
    v = read_video(path)
    problem = check_prediction(name, path, (v.shape[0], v.shape[2], *v.shape[3:]), frames=frames, size=size,
                               resize=resize, trim=trim)
    if problem:
        raise ValueError(problem)
    v = v[:, :, :frames]
    return resize_video(v, size) if tuple(v.shape[3:]) != tuple(size) else v


def find_predictions(manifest, pred, *, resize=False, trim=False):
    """{clip name: predicted video path} for the manifest's scored clips, every shape checked before any work:
    one error listing the missing names, one listing the mismatches."""
    videos = list_videos(pred)
    if Path(pred).is_file():
        raise ValueError(f"--pred {pred}: with --manifest give a folder of videos named by the clips (00000.mp4, ...)")
    wanted = [c["name"] for c in manifest["clips"] if "skipped" not in c]
    missing = [n for n in wanted if n not in videos]
    if missing:
        raise ValueError(f"{pred} lacks the predicted videos of {len(missing)} of the manifest's {len(wanted)} clips: "
                         f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (one .npy or .mp4 per clip, "
                         f"named as in {manifest['dir']}); every clip is scored, so that rows stay comparable")
    extra = sorted(set(videos) - set(wanted))
    if extra:
        print(f"{pred}: {len(extra)} video(s) not in the manifest, not scored: {', '.join(extra[:5])}")
    problems = [check_prediction(n, videos[n], video_shape(videos[n]), frames=manifest["frames"],
                                 size=manifest["size"], resize=resize, trim=trim) for n in wanted]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return {n: videos[n] for n in wanted}


def score_predictions(manifest, videos, clip_dir, *, metrics, nets, resize=False, trim=False, device="cpu"):
    """Score each clip's predicted video against the manifest's ground truth as evaluate_checkpoint scores a
    rollout: per-clip files in clip_dir (features beside them), then collect's report."""
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    for f in list(clip_dir.glob("[0-9]*.json")) + list(clip_dir.glob("[0-9]*.npz")):  # no stale clip survives
        f.unlink()
    root, size = Path(manifest["dir"]), manifest["size"]
    ev = Evaluator(metrics, n_cond=manifest["cond_frames"], device=device, **nets)
    for c in tqdm(manifest["clips"], desc=clip_dir.parent.name):
        head = {"index": c["index"], "episode": c["episode"], "start": c["start"]}
        if "skipped" in c:
            _save_json(clip_dir / f"{c['index']:05d}.json", {**head, "skipped": c["skipped"]})
            continue
        load = lambda k: np.load(root / c["files"][k])
        gt = torch.from_numpy(load("video")).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W) uint8
        pred = read_prediction(c["name"], videos[c["name"]], frames=manifest["frames"], size=size, resize=resize,
                               trim=trim)
        (score,) = ev.add(pred, gt, keypoints=torch.from_numpy(load("keypoints"))[None],
                          keypoint_valid=torch.from_numpy(load("keypoint_valid"))[None])
        score["family"] = c["family"]
        feats = {f"{m}_{side}": store[0] for m, stores in ev.features.items()
                 for side, store in zip(("pred", "gt"), stores) if store}
        if feats:
            np.savez(clip_dir / f"{c['index']:05d}.npz", **feats)
        _save_json(clip_dir / f"{c['index']:05d}.json", {**head, **score})
        ev.features = {m: ([], []) for m in ev.features}  # on disk now
    return collect(clip_dir, len(manifest["clips"]), size)


def compare_manifest(manifest, preds, out, *, metrics="auto", weights=None, detector=None, device="cpu",
                     resize=False, trim=False, offline=None):
    """Score folders of predicted videos (a table row each, named by the folder) on an export's clips -> {row:
    report}; writes out/report.json, out/table.md and out/<row>/clips/ as the protocol does."""
    manifest = read_manifest(manifest)
    preds = [Path(p) for p in preds]
    rows = {p.resolve().name: p for p in preds}
    if len(rows) != len(preds):
        raise ValueError(f"--pred: two folders share a name ({', '.join(p.name for p in preds)}); the names are the "
                         f"table's rows: rename one")
    weights = weights or {}
    spec = metrics
    metrics, left_out = manifest_metrics(spec, weights, offline)
    real = "" if manifest["synthetic"] else (f"the clips of {manifest['dir']} come from episodes synthetic.py did "
                                             f"not write")
    detector, metrics, left_out = detector_or_leave_out(lambda: pck_detector(detector, (), real), detector, spec,
                                                        metrics, left_out)
    videos = {row: find_predictions(manifest, p, resize=resize, trim=trim) for row, p in rows.items()}
    out = sample.check_out_dir(out)
    nets = load_networks(metrics, weights, detector, device, offline)
    print(f"{len(manifest['clips'])} clips of {manifest['frames']} frames from {manifest['dir']}, metrics "
          f"{','.join(metrics)}, {len(rows)} row(s) -> {out}")
    reports = {row: score_predictions(manifest, videos[row], out / row / "clips", metrics=metrics, nets=nets,
                                      resize=resize, trim=trim, device=device) for row in rows}
    config = {"manifest": manifest["dir"], "pred": {row: str(p) for row, p in rows.items()}, "data": manifest["data"],
              "splits": manifest["splits"], "horizon": manifest["frames"], "size": manifest["size"],
              "detector": detector, "resize": RESIZE_FILTER if resize else False, "trim": trim}
    _save_json(out / "report.json", {"config": config, "metrics": list(metrics), "left_out": left_out,
                                     "rows": reports})
    table = markdown_tables(reports, manifest["frames"], carry=None, left_out=left_out)  # made by other means
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out / 'report.json'} and {out / 'table.md'}")
    return reports



def weight_flags(p):
    for kind, flag in WEIGHT_FLAGS.items():
        n = NETWORKS[kind]
        p.add_argument("--" + flag.replace("_", "-"),
                       help=f"{n.what}: path, URL or Hub file (default: {n.file}, fetched from {n.url})")
    p.add_argument("--offline", action="store_true",
                   help="never download (as HF_HUB_OFFLINE=1): one error lists every missing network file")
    p.add_argument("--detector",
                   help="PCK's keypoint detector: 'markers' (synthetic.py's data only; there the protocol's "
                        "default), 'mediapipe' (pip install 'dexac-wm[hands]'), module:function or "
                        "path/to/file.py:function (a callable with the interface of evaluate.MarkerDetector; a class "
                        "is instantiated), or a TorchScript file (evaluate.KeypointModel)")


def main(argv=None):
    p = sample.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0] + " Rollout protocol: python evaluate.py --checkpoint "
        "RUN/model.safetensors [...] --data ROOT --horizon 25 (torchrun shards the clips over ranks).")
    p.add_argument("--checkpoint", dest="checkpoints", metavar="CHECKPOINT", nargs="+",
                   help="exported models (train.py), a table row each")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="a row name per --checkpoint, in order (default: each run's folder name, e.g. "
                        "003-tiny-dexac-64x112): needed when two runs share a folder name")
    p.add_argument("--data", help="dataset root; its test split is evaluated")
    p.add_argument("--splits", help="comma-separated splits to evaluate (default: test)")
    p.add_argument("--test-fraction", type=sample.fraction,
                   help="EgoVerse episodes outside train/ and test/ folders: the fraction hashed into `test` (as "
                        "in training)")
    p.add_argument("--horizon", type=sample.positive_int,
                   help="frames per rollout, the given first one included (the paper: 25 and 65)")
    p.add_argument("--clips", type=sample.positive_int, help="evaluate N clips, evenly spread (default: all)")
    p.add_argument("--metrics", help=f"comma-separated from {','.join(METRICS)}; 'paper': "
                                     f"{','.join(PAPER_METRICS)} (a missing network is an error); 'auto' (the "
                                     f"default): those of 'paper' whose networks are at hand or downloadable, the "
                                     f"rest named at the top of the report")
    p.add_argument("--out", help="output folder (report.json, table.md, figure.png, per clip)")
    p.add_argument("--steps", type=sample.positive_int, help="denoising steps per chunk")
    p.add_argument("--sampler", choices=sorted({*sample.samplers("cosmos"), *sample.samplers("irasim")}),
                   help="the sampler of every model (default: each backbone's, sample.DEFAULT_SAMPLER: unipc for "
                        "Cosmos, ddim for IRASim)")
    p.add_argument("--schedule", choices=["shifted", "karras"], help="sigma schedule")
    p.add_argument("--shift", type=sample.positive_float, help="schedule shift (default: the training run's)")
    p.add_argument("--guidance", type=sample.nonnegative_float, help="classifier-free text guidance (0: off)")
    p.add_argument("--negative-prompt", help="text of the unconditional branch with --guidance (its embedding "
                                             "in the text cache); default: the empty prompt's null embedding")
    p.add_argument("--carry", choices=list(sample.CARRIES),
                   help="what conditions the next chunk (default reencode, the official): "
                        + "; ".join(f"{k}: {v}" for k, v in sample.CARRIES.items()))
    p.add_argument("--seed", type=sample.nonnegative_int, help="clip i is rolled out with seed + i")
    p.add_argument("--batch", type=sample.positive_int, help="clips rolled out together")
    p.add_argument("--shuffle-actions", action="store_true",
                   help="the control: every clip gets another clip's actions (rows are named accordingly)")
    p.add_argument("--figure-clips", type=sample.nonnegative_int, help="clips shown in figure.png")
    p.add_argument("--init", help="backbone for checkpoints holding only the DexAC modules (or LoRA adapters)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA exports: fold the adapters into the base weights before the rollouts")
    p.add_argument("--height", type=sample.positive_int,
                   help="evaluation height, one for every row (default: the first checkpoint's training height)")
    p.add_argument("--width", type=sample.positive_int, help="evaluation width (default: the first checkpoint's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="model dtype")
    p.add_argument("--device", help="torch device (default: this rank's GPU, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (a one-time compile, then "
                                                          "faster sampler steps)")
    weight_flags(p)
    p.set_defaults(**asdict(EvalConfig()))  # the defaults are EvalConfig's
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("compare", help="score predicted videos against ground-truth videos, or against the clips "
                                       "of an export (--manifest)")
    c.add_argument("--pred", required=True, nargs="+",
                   help="predicted video (.npy/.mp4) or a folder of them; with --manifest one or more folders, a "
                        "table row each (named by the folder), one video per clip named as the manifest's clips")
    c.add_argument("--gt", help="ground-truth video(s), same names as --pred (or --manifest)")
    c.add_argument("--manifest", help="an `evaluate.py export` folder: score against its clips' ground truth and "
                                      "annotations, and write the protocol's report.json and table.md into --out")
    c.add_argument("--metrics",
                   help=f"comma-separated, from {','.join(m for m in METRICS if m != 'latent_l2')}; or paper / auto "
                        f"(default psnr,ssim; with --manifest auto, as the protocol; latent_l2 needs latents)")
    c.add_argument("--resize", action="store_true",
                   help=f"with --manifest: stretch predicted frames of another size to the manifest's "
                        f"({RESIZE_FILTER}); without it another size is an error")
    c.add_argument("--trim", action="store_true",
                   help="with --manifest: score the first T frames of longer predicted videos; without it another "
                        "frame count is an error")
    c.add_argument("--cond-frames", type=sample.nonnegative_int, default=1,
                   help="leading conditioning frames, not scored")
    weight_flags(c)
    c.add_argument("--device", default="cpu", help="torch device for the feature networks")
    c.add_argument("--out", help="also write the JSON report here (with --manifest: the output folder, required)")
    x = sub.add_parser("export", help="write the protocol's evaluation clips (first frame, actions, prompt, ground "
                                      "truth, keypoints) for another model to continue, with manifest.json")
    x.add_argument("--data", required=True, help="dataset root; its --splits are exported")
    x.add_argument("--out", required=True, help="output folder (a rerun there finishes what is missing)")
    x.add_argument("--horizon", type=sample.positive_int, default=EvalConfig.horizon,
                   help="frames per clip, the given first one included (the protocol's --horizon)")
    x.add_argument("--clips", type=sample.positive_int, help="export N clips, evenly spread (the protocol's --clips)")
    x.add_argument("--splits", default=EvalConfig.splits, help="comma-separated splits (default: test)")
    x.add_argument("--test-fraction", type=sample.fraction, default=EvalConfig.test_fraction,
                   help="EgoVerse episodes outside train/ and test/ folders: the fraction hashed into `test`")
    x.add_argument("--height", type=sample.positive_int, default=data.DEFAULT_SIZE[0],
                   help=f"frame height (default {data.DEFAULT_SIZE[0]}); to match a protocol run, its size: the "
                        f"checkpoint's training height unless --height was given")
    x.add_argument("--width", type=sample.positive_int, default=data.DEFAULT_SIZE[1],
                   help=f"frame width (default {data.DEFAULT_SIZE[1]})")
    x.add_argument("--stats", help="action statistics for the clips' families: a stats.json, or an exported model "
                                   "(the statistics the protocol uses with it); default DATA/stats.json")
    f = sub.add_parser("fetch-weights", help="download (and verify) every network file the metrics need into the "
                                             "cache folder, then exit")
    f.add_argument("--metrics", default="paper", help="comma-separated metrics, or paper (default) / all")
    args = p.parse_args(argv)
    if args.command == "export":
        export_clips(args.data, args.out, horizon=args.horizon, clips=args.clips, splits=data.split_names(args.splits),
                     test_fraction=args.test_fraction, size=(args.height, args.width), stats=args.stats)
        return 0
    if args.command == "fetch-weights":
        metrics = METRICS if args.metrics == "all" else protocol_metrics(args.metrics, {})[0]
        for path in fetch_networks(metrics, {}):
            print(path)
        if "dreamsim" in metrics:
            DreamSim()  # the package downloads its checkpoint into weights_dir()/dreamsim
        print(f"network files for {','.join(metrics)} are in place (cache folder {weights_dir()})")
        return 0
    if args.command == "compare":
        sample.check_device(args.device)
        weights = {kind: getattr(args, flag) for kind, flag in WEIGHT_FLAGS.items()}
        if args.manifest:
            if args.gt:
                raise ValueError("--gt and --manifest: give one (the manifest holds the ground truth)")
            if not args.out:
                raise ValueError("--out: with --manifest name the folder for report.json, table.md and the per-clip "
                                 "scores")
            compare_manifest(args.manifest, args.pred, args.out, metrics=args.metrics or "auto", weights=weights,
                             detector=args.detector, device=args.device, resize=args.resize, trim=args.trim,
                             offline=args.offline or None)
            return 0
        if not args.gt or len(args.pred) != 1 or args.resize or args.trim:
            raise ValueError("compare: give --gt and one --pred (or --manifest DIR; --resize and --trim need it)")
        if args.out and Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder: name the JSON report's file")
        compare(args.pred[0], args.gt, metrics=args.metrics or "psnr,ssim", cond_frames=args.cond_frames,
                device=args.device, weights=weights, detector=args.detector, out=args.out,
                offline=args.offline or None)
        return 0
    if not args.checkpoints:
        p.print_help()
        return 1
    protocol(EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)}))
    return 0


if __name__ == "__main__":
    hub.run_main(main)
