"""
Data for DexAC-WM: EgoDex / EgoVerse readers, the 57-D dexterous action, clip sampling, action
statistics and a synthetic egocentric dataset in the EgoDex format.

Follows the paper's sections 4.3 (action representation) and 5.1 (clip protocol) and the public
EgoDex layout (`<split>/<task>/<k>.hdf5` + `<k>.mp4`, ARKit camera-to-world poses, OpenCV camera
frame). What this file decides where the paper is silent (DESIGN.md section 6):
- action layout `[left wrist 9 | left fingers 15 | right wrist 9 | right fingers 15 | head 9]`;
  wrist/head = `inv(P_t) @ P_{t+1}` as translation 3 + rotation 6D; 6D = the first two COLUMNS
  of R, `[R00, R10, R20, R01, R11, R21]`; fingers = the 5 fingertips expressed in their own wrist
  frame at t and t+1, difference (3 each, thumb..little). Actions are raw (metres, unitless 6D);
  per-dimension normalization with `stats.json` happens in the model.
- a whole episode is skipped (reason logged) if any pose it needs is NaN/inf, or if its video is
  shorter than its poses; a clip that fails at load time is replaced by a clip of the next
  episode and counted in the sample's `skipped` field, so a run never dies on one bad file.
- frames are center-cropped to the target aspect, then resized with an antialiasing filter;
  intrinsics follow the crop and scale with pixel centres at integers (u' = (u + .5) s - .5).
- missing `camera/intrinsic` falls back to the EgoDex constant (it is the same in every file).
- EgoVerse assumptions (not verifiable without the data): keypoints are in the same world frame
  as the wrist poses, and the head pose is camera-to-world in the OpenCV camera frame.

Use: `make_loader(root, batch_size)` -> (DataLoader, ClipSampler); the sample dict is described
in ClipDataset. Commands: `python data.py {index,stats,synth,cache,benchmark} -h`, `python data.py --benchmark`.
"""
import argparse
import hashlib
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import av
import h5py
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger("dexac.data")

# ------------------------------------------------------------------------------------------------
# The 57-D action layout: the one place every other file takes it from

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
# 12 evaluation keypoints (DexWM/PCK): wrist + 5 fingertips per hand, and their synthetic colours
KEYPOINT_NAMES = tuple(f"{s}_{k}" for s in HANDS for k in ("wrist",) + tuple(map(str.lower, FINGERS)))
KEYPOINT_COLORS = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 255, 128), (255, 0, 128), (0, 128, 255), (128, 255, 0)],
    np.uint8)
DEFAULT_SIZE = (288, 512)  # (H, W) training resolution
EGODEX_K = np.array([[736.6339, 0, 960], [0, 736.6339, 540], [0, 0, 1]])
TRAIN_SPLITS = ("part1", "part2", "part3", "part4", "part5", "extra")
EVAL_SPLITS = ("test",)


def action_layout():
    """The layout as plain data, written into stats.json and checked when stats are loaded."""
    return {"dim": ACTION_DIM, "blocks": [[n, s.start, s.stop] for n, s in ACTION_SLICES.items()],
            "families": {k: list(v) for k, v in ACTION_FAMILIES.items()}, "rot6d": ROT6D,
            "names": list(ACTION_NAMES)}


class DataError(Exception):
    """A problem the user must fix (wrong root, missing file, bad stats file)."""


class EpisodeError(DataError):
    """One episode is unusable; long jobs skip it with this reason, direct access raises it."""

    def __init__(self, episode, reason):
        self.episode, self.reason = str(episode), reason
        super().__init__(f"episode {episode}: {reason}. Remove or repair the file, then rebuild the "
                         f"index with `python data.py index --data ROOT --rebuild`.")


# ------------------------------------------------------------------------------------------------
# Geometry: 6D rotations (numpy or torch), relative poses, the action, keypoint projection

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


def project_keypoints(track, K):
    """-> pixels (T, 12, 2) in KEYPOINT_NAMES order, and (T, 12) True where in front of the camera.
    The camera pose is camera-to-world, its frame OpenCV (x right, y down, z forward)."""
    pts = np.concatenate([np.concatenate([track[f"{s}_wrist"][:, None, :3, 3], track[f"{s}_tips"]], 1)
                          for s in HANDS], 1)  # (T, 12, 3) world
    cam = to_frame(track["camera"], pts)
    z = cam[..., 2:]
    uv = (cam @ np.asarray(K, np.float64).T)[..., :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)
    return uv, z[..., 0] > 1e-6


# ------------------------------------------------------------------------------------------------
# EgoDex reading: prompt rule, poses, intrinsics, confidences; all checks raise EpisodeError

POSE_JOINTS = ("camera", "leftHand", "rightHand") + tuple(f"{s}{f}Tip" for s in HANDS for f in FINGERS)
KEYPOINT_JOINTS = tuple(j for s in HANDS for j in (f"{s}Hand",) + tuple(f"{s}{f}Tip" for f in FINGERS))


def _text(v):
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return "" if v is None else str(v).strip()


def egodex_prompt(attrs, task=""):
    """The official prompt choice: reversible tasks pick llm_description ('1') or llm_description2,
    others use llm_description; old files only have `description`; last resort the task name."""
    get = lambda key: _text(attrs.get(key))  # noqa: E731
    if get("llm_type") == "reversible":
        text = get("llm_description") if get("which_llm_description") == "1" else get("llm_description2")
    else:
        text = get("llm_description")
    return text or get("description") or (get("task") or task).replace("_", " ")


def _track_from_joints(j):
    """{EgoDex joint name: (T, 4, 4)} -> the track dict compute_actions takes."""
    track = {"camera": j["camera"]}
    for s in HANDS:
        track[f"{s}_wrist"] = j[f"{s}Hand"]
        track[f"{s}_tips"] = np.stack([j[f"{s}{f}Tip"][:, :3, 3] for f in FINGERS], 1)
    return track


def read_egodex(path, start=0, stop=None, episode=None):
    """-> (track, K (3, 3), prompt, confidence (T, 12), total frames) for pose rows [start, stop)."""
    episode = episode or path
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EpisodeError(episode, f"corrupt or unreadable HDF5 ({e})") from None
    try:
        with f:
            lengths = {}
            for name in POSE_JOINTS:
                ds = f.get(f"transforms/{name}")
                if ds is None:
                    raise EpisodeError(episode, f"missing pose dataset transforms/{name}")
                if ds.ndim != 3 or ds.shape[1:] != (4, 4):
                    raise EpisodeError(episode, f"transforms/{name} has shape {ds.shape}, not (N, 4, 4)")
                lengths[name] = ds.shape[0]
            if len(set(lengths.values())) > 1:
                raise EpisodeError(episode, f"frame-count mismatch between pose datasets {lengths}")
            n = lengths["camera"]
            stop = n if stop is None else stop
            if not 0 <= start < stop <= n:
                raise EpisodeError(episode, f"frames [{start}, {stop}) outside the {n} pose frames")
            joints = {k: f[f"transforms/{k}"][start:stop].astype(np.float64) for k in POSE_JOINTS}
            for k, v in joints.items():
                if not np.isfinite(v).all():
                    raise EpisodeError(episode, f"NaN/inf in transforms/{k}")
            K = f["camera/intrinsic"][()].astype(np.float64) if "camera/intrinsic" in f else EGODEX_K
            conf = np.ones((stop - start, len(KEYPOINT_JOINTS)), np.float32)
            for i, k in enumerate(KEYPOINT_JOINTS):
                if f"confidences/{k}" in f:
                    conf[:, i] = f[f"confidences/{k}"][start:stop]
            prompt = egodex_prompt(f.attrs, task=Path(path).parent.name)
    except (OSError, KeyError, ValueError) as e:  # h5py raises these on truncated data
        raise EpisodeError(episode, f"corrupt HDF5 ({type(e).__name__}: {e})") from None
    return _track_from_joints(joints), K, prompt, conf, n


def video_frame_count(path, episode=None):
    if not Path(path).is_file():
        raise EpisodeError(episode or path, f"missing video {path}")
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            if s.frames:
                return s.frames
            return int(round(float(s.duration * s.time_base * s.average_rate)))
    except (av.FFmpegError, OSError, IndexError, TypeError) as e:
        raise EpisodeError(episode or path, f"unreadable video ({e})") from None


# ------------------------------------------------------------------------------------------------
# Video: seek + decode only the needed frames, antialiased resize, intrinsics that follow

def fit_geometry(src_hw, size):
    """Scale to cover `size` keeping the aspect, then center-crop: -> (scaled (h, w), crop (y0, x0))."""
    (h, w), (H, W) = src_hw, size
    s = max(H / h, W / w)
    sh, sw = max(H, round(h * s)), max(W, round(w * s))
    return (sh, sw), ((sh - H) // 2, (sw - W) // 2)


def scale_intrinsics(K, src_hw, size):
    """K for frames resized from src_hw to size by fit_geometry (pixel centres at integers)."""
    (sh, sw), (y0, x0) = fit_geometry(src_hw, size)
    sx, sy = sw / src_hw[1], sh / src_hw[0]
    K = np.array(K, np.float64)
    return np.array([[K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] + 0.5) * sx - 0.5 - x0],
                     [0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5 - y0], [0, 0, 1]])


def resize_frame(frame, size):
    """av.VideoFrame -> uint8 (H, W, 3) RGB; swscale's area filter antialiases when shrinking."""
    (sh, sw), (y0, x0) = fit_geometry((frame.height, frame.width), size)
    interp = "AREA" if sh <= frame.height else "BICUBIC"
    rgb = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation=interp)
    return rgb[y0:y0 + size[0], x0:x0 + size[1]]


def resize_image(img, size):
    """uint8 (h, w, 3) -> (H, W, 3), same geometry as resize_frame (PIL's filters antialias)."""
    (sh, sw), (y0, x0) = fit_geometry(img.shape[:2], size)
    out = np.asarray(Image.fromarray(img).resize((sw, sh), Image.BICUBIC, reducing_gap=None))
    return out[y0:y0 + size[0], x0:x0 + size[1]]


def decode_frames(path, start, count, size=None, threads=1, episode=None):
    """Frames [start, start+count) of a video -> uint8 (count, H, W, 3), and the source (h, w).
    Seeks to the keyframe before `start` and decodes forward; frame index = pts * fps."""
    if not Path(path).is_file():
        raise EpisodeError(episode or path, f"missing video {path}")
    frames = []
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = threads
            fps, tb, t0 = s.average_rate, s.time_base, s.start_time or 0
            c.seek(t0 + int(start / fps / tb), stream=s, backward=True, any_frame=False)
            for frame in c.decode(s):
                idx = round(float((frame.pts - t0) * tb * fps))
                if idx < start:
                    continue
                if idx != start + len(frames):
                    raise EpisodeError(episode or path, f"frame {start + len(frames)} missing in the video")
                src_hw = (frame.height, frame.width)
                frames.append(resize_frame(frame, size) if size else frame.to_ndarray(format="rgb24"))
                if len(frames) == count:
                    return np.stack(frames), src_hw
    except (av.FFmpegError, OSError, IndexError) as e:
        raise EpisodeError(episode or path, f"unreadable video ({e})") from None
    raise EpisodeError(episode or path, f"video ended after {start + len(frames)} frames, "
                                        f"needed {start + count}")


# ------------------------------------------------------------------------------------------------
# EgoVerse (Zarr v3): the same track dict and sample dict

MANO_TIPS = (4, 8, 12, 16, 20)  # thumb, index, middle, ring, little: same order as FINGERS


def _zarr_group(path, episode):
    try:
        import zarr
    except ImportError:
        raise DataError("reading EgoVerse needs the optional zarr package: pip install 'zarr>=3' "
                        "(or the project's `egoverse` extra)") from None
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several unrelated types for a broken store
        raise EpisodeError(episode, f"unreadable Zarr group ({e})") from None


def _zarr_array(g, key, episode):
    for k in (key, key.replace(".", "/")):
        try:
            return g[k]
        except KeyError:
            continue
    raise EpisodeError(episode, f"missing EgoVerse array {key}")


def quat_pose(a):
    """(T, 7) xyz + quaternion wxyz -> (T, 4, 4)."""
    w, x, y, z = (a[:, 3:] / np.linalg.norm(a[:, 3:], axis=-1, keepdims=True)).T
    T = np.zeros((len(a), 4, 4))
    R = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
         2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
         2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    T[:, :3, :3] = np.stack(R, -1).reshape(-1, 3, 3)
    T[:, :3, 3], T[:, 3, 3] = a[:, :3], 1
    return T


def read_egoverse(path, start=0, stop=None, episode=None):
    """-> (track, K, prompt, confidence, total frames), as read_egodex; 1e9 marks missing values."""
    episode = episode or path
    g = _zarr_group(path, episode)
    n = int(g.attrs.get("total_frames") or _zarr_array(g, "obs_head_pose", episode).shape[0])
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise EpisodeError(episode, f"frames [{start}, {stop}) outside the {n} frames")

    def rows(key, width):
        a = np.asarray(_zarr_array(g, key, episode)[start:stop], np.float64)
        if a.shape != (stop - start, width) or not np.isfinite(a).all() or (np.abs(a) >= 1e8).any():
            raise EpisodeError(episode, f"{key} has missing (1e9/NaN) or truncated rows in [{start}, {stop})")
        return a

    track = {"camera": quat_pose(rows("obs_head_pose", 7))}
    for s in HANDS:
        track[f"{s}_wrist"] = quat_pose(rows(f"{s}.obs_wrist_pose", 7))
        track[f"{s}_tips"] = rows(f"{s}.obs_keypoints", 63).reshape(-1, 21, 3)[:, MANO_TIPS]
    K = np.asarray(g.attrs.get("intrinsics", {}).get("front_1", EGODEX_K), np.float64)[:3, :3]
    prompt = _text(g.attrs.get("task_description"))
    return track, K, prompt, np.ones((stop - start, len(KEYPOINT_NAMES)), np.float32), n


def decode_jpegs(path, start, count, size=None, episode=None):
    g = _zarr_group(path, episode or path)
    images = _zarr_array(g, "images.front_1", episode or path)[start:start + count]
    frames = []
    for b in images:
        try:
            img = np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB"))
        except OSError as e:
            raise EpisodeError(episode or path, f"unreadable JPEG ({e})") from None
        frames.append(resize_image(img, size) if size else img)
    if len(frames) < count:
        raise EpisodeError(episode or path, f"only {len(frames)} images for {count} frames")
    return np.stack(frames), img.shape[:2]


# ------------------------------------------------------------------------------------------------
# Frames to pictures: the contact sheets of train.py's previews, sample.py and evaluate.py's figure

def to_frames(video):
    """(3, T, H, W) in [-1, 1] -> list of T uint8 (H, W, 3) arrays."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    return list(v)


def contact_sheet(path, rows, labels):
    """rows: lists of equally sized frames -> one PNG, a labelled row each."""
    h, w = rows[0][0].shape[:2]
    n, label_w = max(len(r) for r in rows), 110
    sheet = Image.new("RGB", (label_w + n * w, len(rows) * h), "white")
    d = ImageDraw.Draw(sheet)
    for i, (row, label) in enumerate(zip(rows, labels)):
        d.text((4, i * h + h // 2 - 6), label, fill="black")
        for j, frame in enumerate(row):
            sheet.paste(Image.fromarray(frame), (label_w + j * w, i * h))
    sheet.save(path)


# ------------------------------------------------------------------------------------------------
# Episodes and the cached index

class Episode(NamedTuple):
    id: str      # "part1/<task>/<k>" (EgoDex) or "<split>/<hash>" (EgoVerse, split "egoverse" at root)
    path: str    # the .hdf5 file or the .zarr directory
    frames: int  # usable frames (poses and video agree)
    kind: str    # "egodex" or "egoverse"

    @property
    def split(self):
        return self.id.split("/")[0]


def read_track(ep, start=0, stop=None):
    reader = read_egodex if ep.kind == "egodex" else read_egoverse
    return reader(ep.path, start, stop, episode=ep.id)


def probe_episode(kind, path, episode):
    """Check one episode fully -> usable frame count; raises EpisodeError with the reason."""
    if kind == "egoverse":
        n = read_egoverse(path, episode=episode)[-1]
        g = _zarr_group(path, episode)
        if _zarr_array(g, "images.front_1", episode).shape[0] < n:
            raise EpisodeError(episode, "fewer images than poses")
        return n
    n = read_egodex(path, episode=episode)[-1]
    v = video_frame_count(Path(path).with_suffix(".mp4"), episode)
    if v < n:
        raise EpisodeError(episode, f"video has {v} frames but poses have {n}")
    return n


def _probe(args):
    kind, path, episode = args
    try:
        return episode, probe_episode(kind, path, episode), None
    except EpisodeError as e:
        return episode, None, e.reason


def _groups(root):
    """{group dir relative to root: kind}: EgoDex task dirs, or dirs holding EgoVerse *.zarr groups."""
    groups = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.suffix == ".zarr":
            groups["."] = "egoverse"
            continue
        for t in sorted(p for p in d.iterdir() if p.is_dir()):
            if t.suffix == ".zarr":
                groups[d.name] = "egoverse"
                break
            groups[f"{d.name}/{t.name}"] = "egodex"
    return groups


def _members(root, group, kind):
    pattern = "*.zarr" if kind == "egoverse" else "*.hdf5"
    files = sorted((root / group).glob(pattern), key=lambda p: (len(p.stem), p.stem))
    split = "egoverse" if group == "." else group
    return [(kind, str(p), f"{split}/{p.stem}") for p in files]


def _signature(root, group):
    """What tells a group changed: the directory mtime; the root itself (EgoVerse episodes lying
    directly in it) also holds the index file, so there the list of names is compared instead."""
    if group != ".":
        return (root / group).stat().st_mtime_ns
    return hashlib.sha1("\n".join(sorted(p.name for p in root.glob("*.zarr"))).encode()).hexdigest()


def _write_atomic(path, payload):
    """Write bytes so that readers see the old file or the new one, never half of one."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def load_index(root, splits=None, workers=0, rebuild=False, cache=None):
    """Index a dataset root once; later calls re-probe only directories whose mtime changed.
    -> (episodes: list[Episode], skipped: {episode id: reason}) restricted to `splits`."""
    root = Path(root).expanduser().resolve()
    expected = ("expected an EgoDex root (<root>/<split>/<task>/<k>.hdf5 + <k>.mp4) or an EgoVerse root "
                "(<root>/[<split>/]<hash>.zarr); make a synthetic one with `python data.py synth --out DIR`")
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: {expected}")
    cache = Path(cache) if cache else root / ".dexac_index.json"
    if cache == root / ".dexac_index.json" and not os.access(root, os.W_OK):
        cache = Path.home() / ".cache" / "dexac" / f"index-{hashlib.sha1(bytes(root)).hexdigest()[:12]}.json"
    old = {}
    if cache.is_file() and not rebuild:
        old = json.loads(cache.read_text()).get("groups", {})
    index, todo = {}, []
    for group, kind in _groups(root).items():
        mtime = _signature(root, group)
        if old.get(group, {}).get("mtime") == mtime:
            index[group] = old[group]
        else:
            index[group] = {"mtime": mtime, "kind": kind, "episodes": [], "skipped": []}
            todo += [(group, m) for m in _members(root, group, kind)]
    if todo:
        results = _imap(_probe, [m for _, m in todo], workers)
        for (group, _), (eid, n, reason) in zip(todo, tqdm(results, total=len(todo), desc="indexing")):
            if reason is None:
                index[group]["episodes"].append([eid, n])
            else:
                log.warning("skipping %s: %s", eid, reason)
                index[group]["skipped"].append([eid, reason])
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache, json.dumps({"root": str(root), "groups": index}).encode())
    episodes, skipped = [], {}
    for group, entry in sorted(index.items()):
        for eid, n in entry["episodes"]:
            suffix = ".zarr" if entry["kind"] == "egoverse" else ".hdf5"
            path = root / group / (eid.split("/")[-1] + suffix)
            episodes.append(Episode(eid, str(path), n, entry["kind"]))
        skipped.update(dict(entry["skipped"]))
    available = sorted({e.split for e in episodes})
    if splits is not None:
        episodes = [e for e in episodes if e.split in splits]
        skipped = {k: v for k, v in skipped.items() if k.split("/")[0] in splits}
    if not episodes:
        raise DataError(f"no usable episodes under {root} for splits {splits} (splits with usable "
                        f"episodes: {available}; {len(skipped)} skipped): {expected}")
    log.info("index: %d episodes (%d frames), %d skipped", len(episodes),
             sum(e.frames for e in episodes), len(skipped))
    return episodes, skipped


def _imap(fn, items, workers, chunksize=4):
    """map(fn, items) over `workers` processes (0: in this one), results in order."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize)


# ------------------------------------------------------------------------------------------------
# Clips: one sample, the sharded resumable sampler, the Dataset

def load_clip(ep, start, length, size=DEFAULT_SIZE, threads=1):
    """One clip of `length` frames -> the sample dict (see ClipDataset)."""
    track, K, prompt, conf, _ = read_track(ep, start, start + length)
    if ep.kind == "egodex":
        video, src_hw = decode_frames(Path(ep.path).with_suffix(".mp4"), start, length, size, threads, ep.id)
    else:
        video, src_hw = decode_jpegs(ep.path, start, length, size, ep.id)
    K = scale_intrinsics(K, src_hw, size) if size else K
    H, W = video.shape[1:3]
    uv, front = project_keypoints(track, K)
    inside = front & (uv >= -0.5).all(-1) & (uv[..., 0] < W - 0.5) & (uv[..., 1] < H - 0.5)
    return {"video": torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(),  # (3, T, H, W) uint8
            "actions": torch.from_numpy(compute_actions(track)),               # (T-1, 57) float32
            "prompt": prompt,
            "intrinsics": torch.tensor(K, dtype=torch.float32),                # (3, 3) at (H, W)
            "keypoints": torch.tensor(uv, dtype=torch.float32),                # (T, 12, 2) pixels
            "keypoint_valid": torch.from_numpy(inside),                       # (T, 12) bool
            "keypoint_confidence": torch.from_numpy(conf),                    # (T, 12)
            "episode": ep.id, "start": start, "skipped": 0}


class ClipSampler(torch.utils.data.Sampler):
    """Yields (episode index, start frame) for this rank.

    train: every episode is cut into non-overlapping `window`-frame windows (a tail window counts
    if it holds a clip); each window gives `starts` distinct random clip starts; the whole list is
    shuffled with (seed, epoch), identical on every rank, truncated to a multiple of world_size
    and dealt round-robin, so shards are disjoint and equally long.
    eval: starts 0, L, 2L, ... of every episode, in order, dealt round-robin (not truncated).
    Resume: `state_dict(consumed)` records the global position, so a run restarts exactly there,
    even with another world size."""

    def __init__(self, frames, clip_len=13, train=True, window=30, starts=2, seed=0, rank=0,
                 world_size=1, max_per_episode=None):
        self.frames = np.asarray(frames, np.int64)
        self.clip_len, self.train, self.window, self.starts = clip_len, train, window, starts
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_per_episode = max_per_episode
        self.epoch, self.position = 0, 0  # position: global clips already consumed this epoch
        self._cached = (None, None)
        short = int((self.frames < clip_len).sum())
        if short:
            log.info("%d episodes are shorter than one %d-frame clip and are not used", short, clip_len)

    def plan(self):
        """-> (M, 2) int64 global list of (episode, start) for the current epoch."""
        if not self.train:
            per = np.maximum(self.frames // self.clip_len, 0)
            if self.max_per_episode:
                per = np.minimum(per, self.max_per_episode)
            ep = np.repeat(np.arange(len(per)), per)
            first = np.repeat(np.cumsum(per) - per, per)
            return np.stack([ep, (np.arange(len(ep)) - first) * self.clip_len], 1)
        rng = np.random.default_rng([self.seed, self.epoch])
        nwin = -(-self.frames // self.window)
        ep = np.repeat(np.arange(len(nwin)), nwin)
        w0 = (np.arange(len(ep)) - np.repeat(np.cumsum(nwin) - nwin, nwin)) * self.window
        room = np.minimum(self.window, self.frames[ep] - w0) - self.clip_len + 1  # starts per window
        keep = room > 0
        ep, w0, room = ep[keep], w0[keep], room[keep]
        picks = []  # distinct offsets: draw among the room - j left, then step over those taken
        for j in range(self.starts):
            off = (rng.random(len(room)) * np.maximum(room - j, 1)).astype(np.int64)
            taken = np.sort(np.stack(picks, 1), 1) if picks else np.zeros((len(room), 0), np.int64)
            for prev in taken.T:  # ascending, so one pass suffices
                off += off >= prev
            picks.append(off)
        clips = np.concatenate([np.stack([ep, w0 + off], 1)[room > j] for j, off in enumerate(picks)])
        return clips[rng.permutation(len(clips))]

    def _mine(self):
        if self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.plan())
        plan = self._cached[1]
        if self.train:
            plan = plan[:len(plan) - len(plan) % self.world_size]
        return plan[self.position + self.rank::self.world_size]

    def __iter__(self):
        for ep, start in self._mine():
            yield int(ep), int(start)

    def __len__(self):
        return len(self._mine())

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, consumed):
        """consumed: clips this rank's training loop has taken since this epoch's iteration began
        (steps * per-rank batch). Prefetching workers run ahead, so the sampler cannot know it."""
        return {"epoch": self.epoch, "position": self.position + consumed * self.world_size,
                "seed": self.seed}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise DataError(f"the resume state was made with seed {state['seed']}, this run has {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by the (episode, start) pairs ClipSampler yields.

    Sample: video uint8 (3, T, H, W) RGB (scale with `v / 127.5 - 1` on the device); actions
    float32 (T-1, 57) raw; prompt str; intrinsics (3, 3) at (H, W); keypoints (T, 12, 2) pixels in
    KEYPOINT_NAMES order, keypoint_valid (T, 12), keypoint_confidence (T, 12); episode id; start;
    skipped = episodes that failed while producing this sample (sum it for the epoch summary)."""

    def __init__(self, episodes, clip_len=13, size=DEFAULT_SIZE, threads=1):
        self.episodes, self.clip_len, self.size, self.threads = list(episodes), clip_len, size, threads
        self._bad = set()  # per worker process

    def __getitem__(self, item):
        i, start = int(item[0]), int(item[1])
        failures = 0
        for _ in range(len(self.episodes)):
            ep = self.episodes[i]
            if ep.frames >= self.clip_len and ep.id not in self._bad:
                try:
                    sample = load_clip(ep, min(start, ep.frames - self.clip_len), self.clip_len,
                                       self.size, self.threads)
                    sample["skipped"] = failures
                    return sample
                except EpisodeError as e:
                    log.warning("skipping %s: %s", ep.id, e.reason)
                    self._bad.add(ep.id)
                    failures += 1
            i = (i + 1) % len(self.episodes)
        raise DataError("no episode could be loaded; see the warnings above")


def make_loader(data, batch_size, train=True, splits=None, clip_len=13, size=DEFAULT_SIZE,
                num_workers=4, seed=0, rank=0, world_size=1, **loader_kw):
    """-> (DataLoader, ClipSampler) over a dataset root, or over a latent cache directory (`python data.py
    cache`; then clip_len and size come from the cache). Call sampler.set_epoch(e) each epoch; save
    sampler.state_dict(consumed) with checkpoints and load it before iterating on resume.
    Under torchrun, index once beforehand (`python data.py index`) so ranks only read the cache."""
    if (Path(data) / CACHE_MANIFEST).is_file():  # a latent cache: every clip is a one-clip episode
        dataset = CachedClipDataset(data)
        frames = [dataset.manifest["clip_len"]] * len(dataset)
        clip_len = dataset.manifest["clip_len"]
    else:
        episodes, _ = load_index(data, splits or (TRAIN_SPLITS if train else EVAL_SPLITS))
        dataset, frames = ClipDataset(episodes, clip_len, size), [e.frames for e in episodes]
    sampler = ClipSampler(frames, clip_len, train, seed=seed, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         sampler=sampler, num_workers=num_workers, drop_last=train,
                                         persistent_workers=num_workers > 0, **loader_kw)
    return loader, sampler


# ------------------------------------------------------------------------------------------------
# Latent cache: clips encoded once (`python data.py cache`), read back through the same loader.
# A cache directory holds manifest.json (the clip plan, written first) and shard-NNNNN.safetensors files:
# latents (n, C, T', h, w), actions (n, T-1, 57) float32 and optionally dino (n, P, D), with each clip's
# episode, start and prompt in the shard's metadata. Each cached clip is a one-clip "episode", so
# ClipSampler shards, shuffles and resumes it exactly as it does raw episodes.

CACHE_MANIFEST = "manifest.json"


def cache_clips(data, out, tokenizer, tokenizer_name, clip_len=13, size=DEFAULT_SIZE, train=True, splits=None,
                seed=0, epochs=1, shard_size=256, batch=8, workers=2, device="cpu", dtype=torch.bfloat16,
                dino=None, rank=0, world_size=1):
    """Encode the clips of `epochs` epochs of the clip plan into shards under `out`.

    tokenizer: an object with encode(video (B, 3, T, H, W) in [-1, 1]); dino: None or a callable frames
    (B, 3, H, W) in [-1, 1] -> features (B, P, D). Rank r writes shards r, r + world_size, ...; shards that
    exist are kept, so an interrupted job resumes where it stopped. -> list of shards this rank wrote."""
    episodes, _ = load_index(data, splits or (TRAIN_SPLITS if train else EVAL_SPLITS))
    sampler = ClipSampler([e.frames for e in episodes], clip_len, train, seed=seed)
    plan = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        plan.append(sampler.plan())
    plan = np.concatenate(plan)
    n_shards = -(-len(plan) // shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"data": str(data), "tokenizer": tokenizer_name, "latent_channels": tokenizer.latent_channels,
                "clip_len": clip_len, "size": list(size), "train": train, "seed": seed, "epochs": epochs,
                "clips": len(plan), "shard_size": shard_size, "dino": dino is not None, "layout": action_layout()}
    if (out / CACHE_MANIFEST).is_file():
        old = json.loads((out / CACHE_MANIFEST).read_text())
        if old != manifest:
            changed = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise DataError(f"{out} holds a cache made with other settings ({', '.join(changed)}): "
                            f"choose another --out or delete it")
    elif rank == 0:
        _write_atomic(out / CACHE_MANIFEST, json.dumps(manifest, indent=1).encode())
    from safetensors.torch import save_file
    dataset = ClipDataset(episodes, clip_len, size)
    written = []
    mine = [k for k in range(rank, n_shards, world_size) if not (out / f"shard-{k:05d}.safetensors").is_file()]
    for k in tqdm(mine, desc=f"cache (rank {rank})", disable=not mine):
        clips = plan[k * shard_size:(k + 1) * shard_size]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=[tuple(c) for c in clips],
                                             num_workers=workers)
        tensors, meta = {"latents": [], "actions": [], "dino": []}, {"episodes": [], "starts": [], "prompts": []}
        for b in loader:
            video = b["video"].to(device).float() / 127.5 - 1  # (B, 3, T, H, W) in [-1, 1]
            with torch.inference_mode():
                tensors["latents"].append(tokenizer.encode(video).to("cpu", dtype))
                if dino is not None:
                    tensors["dino"].append(dino(video[:, :, 0]).to("cpu", dtype))
            tensors["actions"].append(b["actions"])
            meta["episodes"] += list(b["episode"])
            meta["starts"] += b["start"].tolist()
            meta["prompts"] += list(b["prompt"])
        tensors = {name: torch.cat(t).contiguous() for name, t in tensors.items() if t}
        path = out / f"shard-{k:05d}.safetensors"
        save_file(tensors, str(path) + ".tmp", metadata={"clips": json.dumps(meta)})
        os.replace(str(path) + ".tmp", path)  # atomic: a killed job never leaves half a shard
        written.append(path)
    return written


class CachedClipDataset(torch.utils.data.Dataset):
    """Clips of a `python data.py cache` directory, indexed like ClipDataset by (clip, 0) pairs.

    Sample: latents (C, T', h, w) in the cache dtype; actions float32 (T-1, 57); dino (P, D) when cached;
    prompt; episode; start; skipped (always 0: bad episodes were skipped when the cache was made)."""

    def __init__(self, root):
        root = Path(root)
        if not (root / CACHE_MANIFEST).is_file():
            raise DataError(f"{root} is not a latent cache (no {CACHE_MANIFEST}); make one with "
                            f"`python data.py cache --data ROOT --out {root}`")
        self.root, self.manifest = root, json.loads((root / CACHE_MANIFEST).read_text())
        if self.manifest["layout"] != action_layout():
            raise DataError(f"{root} was cached with another action layout; rebuild it")
        n_shards = -(-self.manifest["clips"] // self.manifest["shard_size"])
        missing = [k for k in range(n_shards) if not (root / f"shard-{k:05d}.safetensors").is_file()]
        if missing:
            raise DataError(f"the cache {root} is incomplete ({len(missing)} of {n_shards} shards missing, e.g. "
                            f"shard {missing[0]}): rerun `python data.py cache` with the same settings to finish it")
        self._open = (None, None)  # (shard index, (tensors, meta)): the last shard read, per worker

    def __len__(self):
        return self.manifest["clips"]

    def _shard(self, k):
        if self._open[0] != k:
            from safetensors import safe_open
            with safe_open(str(self.root / f"shard-{k:05d}.safetensors"), "pt") as f:
                self._open = (k, ({name: f.get_tensor(name) for name in f.keys()},
                                  json.loads(f.metadata()["clips"])))
        return self._open[1]

    def __getitem__(self, item):
        i = int(item[0]) if isinstance(item, (tuple, list)) else int(item)
        tensors, meta = self._shard(i // self.manifest["shard_size"])
        j = i % self.manifest["shard_size"]
        sample = {name: t[j] for name, t in tensors.items()}
        sample.update(prompt=meta["prompts"][j], episode=meta["episodes"][j], start=meta["starts"][j], skipped=0)
        return sample


# ------------------------------------------------------------------------------------------------
# Statistics: streaming per-dimension mean/std (two-pass per episode, Chan et al. merge)

def action_moments(actions):
    """(N, 57) -> (count, mean, M2, min, max) in float64."""
    a = np.asarray(actions, np.float64)
    mean = a.mean(0)
    return len(a), mean, ((a - mean) ** 2).sum(0), a.min(0), a.max(0)


def merge_moments(x, y):
    """Combine two action_moments tuples (Chan et al.); x may be None (nothing seen yet)."""
    if x is None:
        return y
    n = x[0] + y[0]
    d = y[1] - x[1]
    return (n, x[1] + d * y[0] / n, x[2] + y[2] + d * d * x[0] * y[0] / n,
            np.minimum(x[3], y[3]), np.maximum(x[4], y[4]))


def _episode_moments(ep):
    try:
        track = read_track(ep)[0]
        return ep.id, action_moments(compute_actions(track)), None
    except EpisodeError as e:
        return ep.id, None, e.reason


def compute_stats(data, splits=TRAIN_SPLITS, workers=0, max_episodes=None, seed=0):
    """Per-dimension action statistics over every consecutive frame pair of the split."""
    episodes, skipped = load_index(data, splits, workers)
    episodes = [e for e in episodes if e.frames >= 2]
    if max_episodes and max_episodes < len(episodes):
        pick = np.random.default_rng(seed).choice(len(episodes), max_episodes, replace=False)
        episodes = [episodes[i] for i in sorted(pick)]
    total, used = None, 0
    for eid, m, reason in tqdm(_imap(_episode_moments, episodes, workers), total=len(episodes), desc="stats"):
        if m is None:
            log.warning("skipping %s: %s", eid, reason)
            skipped[eid] = reason
        else:
            total, used = merge_moments(total, m), used + 1
    if total is None:
        raise DataError(f"no readable episodes for statistics in {data}")
    n, mean, m2, mn, mx = total
    return {"layout": action_layout(), "count": int(n), "episodes": used,
            "mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist(), "min": mn.tolist(),
            "max": mx.tolist(), "data": str(data), "splits": list(splits), "skipped": skipped}


def load_stats(path):
    """stats.json -> (mean, std) float32 (57,); refuses a file made for another action layout."""
    if not Path(path).is_file():
        raise DataError(f"stats file {path} not found: make it with "
                        f"`python data.py stats --data ROOT --out {path}`")
    stats = json.loads(Path(path).read_text())
    if stats.get("layout") != action_layout():
        raise DataError(f"{path} was computed for another action layout; recompute it with "
                        f"`python data.py stats --data ROOT --out {path}`")
    return np.array(stats["mean"], np.float32), np.array(stats["std"], np.float32)


# ------------------------------------------------------------------------------------------------
# Synthetic egocentric data in the EgoDex format (the embedded default; no download)
# World: ARKit-like, y up, table top at y = 0.8 m. Each hand is a wrist SE(3) plus 5 fingers of
# 3 flexing segments; the head camera looks at the table from 0.65 m above it and sways.

SYNTH_TASKS = (  # task, llm_type, which, llm_description, llm_description2, description, object RGB,
    # motion scale (left wrist, right wrist, fingers); None = attribute absent (old-style file)
    ("pick_place_cube", "", "", "Pick up the cube and place it next to the bowl.", "", "pick place",
     (120, 80, 70), (0.4, 1.0, 1.0)),
    ("open_jar", "reversible", "1", "Open the jar by twisting its lid.", "Close the jar by twisting its lid.",
     "jar", (70, 100, 130), (1.0, 1.0, 1.5)),
    ("close_box", "reversible", "2", "Open the box lid.", "Close the box lid.", "box", (110, 110, 60),
     (1.0, 0.5, 0.7)),
    ("wipe_table", None, None, None, None, "Wipe the table with a cloth.", (90, 120, 90), (0.3, 1.3, 0.5)),
)
_KNUCKLE = np.array([[-0.030, 0.030, 0], [-0.032, 0.085, 0], [-0.011, 0.092, 0], [0.011, 0.088, 0],
                     [0.031, 0.078, 0]])  # right hand, wrist frame (x lateral, y along fingers, z back)
_FAN = np.array([-0.95, -0.32, -0.08, 0.16, 0.42])  # finger directions in the palm plane (rad)
_SEGMENTS = np.array([[0.035, 0.030, 0.025]] + [[0.042, 0.026, 0.021]] * 4)


def _rot(axis, a):
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = np.zeros(np.shape(a) + (3, 3))
    R[..., axis, axis], R[..., i, i], R[..., j, j], R[..., i, j], R[..., j, i] = 1, c, c, -s, s
    return R


def _pose(R, t):
    T = np.zeros(R.shape[:-2] + (4, 4))
    T[..., :3, :3], T[..., :3, 3], T[..., 3, 3] = R, t, 1
    return T


def synth_track(rng, n, fps=30, motion=(1.0, 1.0, 1.0)):
    """-> ({EgoDex joint: (n, 4, 4)}, track): large wrist/head motion, small slow finger flexion;
    motion scales the left wrist, right wrist and finger amplitudes (the task's style)."""
    t = np.arange(n) / fps

    def wave(amp, hz):  # (n, len(amp)) sinusoids with a random phase and +-20% frequency per column
        return amp * np.sin(2 * np.pi * hz * rng.uniform(0.8, 1.2, len(amp)) * t[:, None]
                            + rng.uniform(0, 2 * np.pi, len(amp)))

    eye = np.array([0, 1.45, 0.05]) + wave(np.array([0.05, 0.015, 0.03]), 0.3)
    target = np.array([0, 0.8, -0.42]) + wave(np.array([0.12, 0.0, 0.06]), 0.25)
    fwd = (target - eye) / np.linalg.norm(target - eye, axis=-1, keepdims=True)
    right = np.cross(fwd, [0, 1, 0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    joints = {"camera": _pose(np.stack([right, np.cross(fwd, right), fwd], -1), eye)}  # OpenCV axes
    base = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # fingers along -z world, back of hand up
    for side, sign, scale in (("left", -1, motion[0]), ("right", 1, motion[1])):
        ang = wave(np.array([0.35, 0.25, 0.3]) * scale, 0.45)
        R = _rot(2, ang[:, 0] * sign) @ _rot(0, ang[:, 1]) @ _rot(1, ang[:, 2] * sign) @ base
        pos = np.array([0.13 * sign, 1.1, -0.16]) + wave(np.array([0.07, 0.04, 0.05]) * scale, 0.5)
        joints[f"{side}Hand"] = W = _pose(R, pos)
        flex = 0.3 + wave(np.full(5, 0.1 * motion[2]), 0.25)  # (n, 5) per-finger joint angle
        mirror = np.array([sign, 1, 1])
        for f, finger in enumerate(FINGERS):
            d = np.array([np.sin(_FAN[f]), np.cos(_FAN[f]), 0]) * mirror
            p = np.repeat((_KNUCKLE[f] * mirror)[None], n, 0)
            for k, name in enumerate(("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")):
                if k:
                    theta = flex[:, f:f + 1] * k  # cumulative curl towards the palm (-z)
                    p = p + _SEGMENTS[f, k - 1] * (np.cos(theta) * d - np.sin(theta) * np.array([0, 0, 1]))
                world = np.einsum("tij,tj->ti", W[:, :3, :3], p) + W[:, :3, 3]
                joints[f"{side}{finger}{name}"] = _pose(R, world)  # joint rotation = wrist's (synthetic)
    return joints, _track_from_joints(joints)


def _segment(img, a, b, r, color):
    """Draw a thick segment a -> b (pixels, (u, v)) with radius r."""
    lo = np.floor(np.minimum(a, b) - r).astype(int).clip(0, [img.shape[1], img.shape[0]])
    hi = np.ceil(np.maximum(a, b) + r + 1).astype(int).clip(0, [img.shape[1], img.shape[0]])
    if (hi <= lo).any():
        return
    v, u = np.arange(lo[1], hi[1])[:, None], np.arange(lo[0], hi[0])[None]
    ab = b - a
    s = np.clip(((u - a[0]) * ab[0] + (v - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
    mask = (u - a[0] - s * ab[0]) ** 2 + (v - a[1] - s * ab[1]) ** 2 <= r * r
    img[lo[1]:hi[1], lo[0]:hi[0]][mask] = color


def render_frame(joints, i, K, hw, obj_color, marker_scale=1.0):
    """The frame seen by camera pose joints['camera'][i]: checkered table, an object, two hands;
    wrist and fingertip markers in KEYPOINT_COLORS (radius 3 * marker_scale px at 320 wide), drawn last
    so they are never occluded."""
    H, W = hw
    cam = joints["camera"][i]
    v, u = np.mgrid[:H, :W].astype(np.float32)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    rays = rays @ cam[:3, :3].T  # (H, W, 3) viewing rays in the world
    down = rays[..., 1] < -1e-6
    hit = cam[:3, 3] + rays * ((0.8 - cam[1, 3]) / np.where(down, rays[..., 1], -1))[..., None]
    checker = (np.floor(hit[..., 0] / 0.08) + np.floor(hit[..., 2] / 0.08)) % 2
    img = np.where(checker[..., None] > 0, [150, 140, 125], [105, 100, 95]).astype(np.uint8)
    img[np.hypot(hit[..., 0], hit[..., 2] + 0.45) < 0.07] = obj_color
    img[~down] = (185, 190, 200)  # wall
    world2cam = se3_inverse(cam)

    def px(p):
        c = world2cam[:3, :3] @ p + world2cam[:3, 3]
        return (K @ c)[:2] / c[2], c[2]

    markers = []
    for side in HANDS:
        wrist, z = px(joints[f"{side}Hand"][i, :3, 3])
        markers.append(wrist)
        for finger in FINGERS:
            chain = [px(joints[f"{side}{finger}{n}"][i, :3, 3])[0] for n in
                     ("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")]
            _segment(img, wrist, chain[0], 0.022 * K[0, 0] / z, (205, 160, 135))  # palm
            for a, b in zip(chain[:-1], chain[1:]):
                _segment(img, a, b, 0.008 * K[0, 0] / z, (220, 175, 150))
            markers.append(chain[-1])
    for m, color in zip(markers, KEYPOINT_COLORS):
        _segment(img, m, m, 3.0 * marker_scale * W / 320, color)
    return img


def detect_keypoints(frame, tol=60):
    """uint8 (H, W, 3) -> (12, 2) centroids of each KEYPOINT_COLORS marker, NaN where absent.
    Video codecs blend neighbouring colours into stray look-alike pixels at edges, so only the
    pixels near the median of the matches count."""
    out = np.full((len(KEYPOINT_COLORS), 2), np.nan)
    diff = np.abs(frame[:, :, None].astype(np.int16) - KEYPOINT_COLORS.astype(np.int16)).max(-1)  # (H,W,12)
    radius = 6.0 * frame.shape[1] / 320  # twice the marker radius at this width
    for k in range(len(KEYPOINT_COLORS)):
        v, u = np.nonzero(diff[..., k] < tol)
        near = (u - np.median(u)) ** 2 + (v - np.median(v)) ** 2 <= radius ** 2 if len(u) >= 3 else []
        if np.any(near):
            out[k] = u[near].mean(), v[near].mean()
    return out


def write_video(path, frames, fps=30, crf=12, gop=30, preset="veryfast"):
    """Iterable of uint8 (H, W, 3) frames -> H.264 MP4 (yuv420p) with PyAV."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = first.shape[:2]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": str(crf), "preset": preset, "g": str(gop)}
        for img in itertools.chain([first], frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        c.mux(s.encode())


def write_egodex_hdf5(path, joints, K, attrs, confidence=None):
    with h5py.File(path, "w") as f:
        for name, T in joints.items():
            f[f"transforms/{name}"] = T.astype(np.float32)
        for name, c in (confidence or {}).items():
            f[f"confidences/{name}"] = c.astype(np.float32)
        f["camera/intrinsic"] = np.asarray(K, np.float32)
        for k, v in attrs.items():
            if v is not None:
                f.attrs[k] = v


def _synth_episode(job):
    out, split, t, k, frames, size, seed, zoom, marker_scale = job
    task, llm_type, which, llm1, llm2, desc, color, motion = SYNTH_TASKS[t]
    rng = np.random.default_rng([seed, t, k, split == "test"])
    H, W = size
    f = 736.6339 * zoom * W / 1920
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    joints, _ = synth_track(rng, frames, motion=motion)
    d = Path(out) / split / task
    d.mkdir(parents=True, exist_ok=True)
    conf = {j: rng.uniform(0.6, 1.0, frames) for j in KEYPOINT_JOINTS}
    attrs = {"task": task, "description": desc, "llm_type": llm_type, "which_llm_description": which,
             "llm_description": llm1, "llm_description2": llm2}
    write_egodex_hdf5(d / f"{k}.hdf5", joints, K, attrs, conf)
    write_video(d / f"{k}.mp4", (render_frame(joints, i, K, size, color, marker_scale) for i in range(frames)))


def write_synthetic(out, tasks=4, episodes=3, test_episodes=1, frames=90, size=(180, 320), seed=0,
                    workers=2, zoom=1.0, marker_scale=1.0):
    """Write `out/part1/<task>/<k>.{hdf5,mp4}` (train) and `out/test/...`; deterministic by seed.
    K keeps EgoDex's field of view (fx = 736.6 * W / 1920, principal point at the centre); zoom > 1 narrows
    it (hands fill more of the frame) and marker_scale enlarges the keypoint markers, so that both stay
    visible when the frames are downsampled far below EgoDex's size (miniature.py)."""
    if zoom <= 0 or marker_scale <= 0:
        raise ValueError(f"zoom ({zoom}) and marker_scale ({marker_scale}) must be positive; 1 is EgoDex's view")
    jobs = [(str(out), split, t, k, frames, tuple(size), seed, zoom, marker_scale)
            for t in range(min(tasks, len(SYNTH_TASKS)))
            for split, count in (("part1", episodes), ("test", test_episodes)) for k in range(count)]
    list(tqdm(_imap(_synth_episode, jobs, workers, 1), total=len(jobs), desc="synth"))
    return Path(out)


# ------------------------------------------------------------------------------------------------
# Benchmark: clips/s per worker decoding 13-frame clips at 288x512 from 1920x1080 H.264

def benchmark(clips=40, frames=150, gop=30, size=DEFAULT_SIZE, batch=64, step_time=6.2, seed=0):
    """Time ClipDataset on one 1920x1080 episode: HDF5 poses + an H.264 video of a slowly panning
    textured scene with sensor noise, at about EgoDex's average bitrate (2 TB / 829 h = 5.4 Mbit/s)."""
    work = Path(tempfile.mkdtemp(prefix="dexac-bench-"))
    try:
        rng = np.random.default_rng(seed)
        t0 = time.time()
        texture = np.asarray(Image.fromarray(rng.integers(0, 255, (270, 480, 3), np.uint8)).resize(
            (2200, 1240), Image.BICUBIC)).astype(np.int16)
        video = (np.clip(texture[4 + i // 2:1084 + i // 2, 3 * i % 280:1920 + 3 * i % 280]
                         + rng.integers(-6, 7, (1080, 1920, 1), np.int16), 0, 255).astype(np.uint8)
                 for i in range(frames))
        d = work / "part1" / "bench"
        d.mkdir(parents=True)
        write_video(d / "0.mp4", video, crf=23, gop=gop)
        write_egodex_hdf5(d / "0.hdf5", synth_track(rng, frames)[0], EGODEX_K, {})
        mbit = (d / "0.mp4").stat().st_size * 8 / 1e6 / (frames / 30)
        print(f"made a 1920x1080 H.264 video ({frames} frames, keyframe every {gop}, {mbit:.1f} Mbit/s) "
              f"in {time.time() - t0:.1f} s")
        ds = ClipDataset(load_index(work)[0], 13, size)
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


# ------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="DexAC-WM data: index, statistics, synthetic data, benchmark")
    p.add_argument("--benchmark", action="store_true", help="run the decode benchmark with default settings")
    sub = p.add_subparsers(dest="cmd")
    q = sub.add_parser("index", help="index (or refresh the index of) a dataset root")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--workers", type=int, default=8, help="processes probing episodes (0: in-process)")
    q.add_argument("--rebuild", action="store_true", help="ignore the cached index and probe everything")
    q.add_argument("--cache", default=None, help="index file (default: ROOT/.dexac_index.json)")
    q = sub.add_parser("stats", help="per-dimension action mean/std over the training split")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--out", default="stats.json", help="output JSON")
    q.add_argument("--splits", nargs="+", default=list(TRAIN_SPLITS), help="splits to include")
    q.add_argument("--workers", type=int, default=8, help="processes reading episodes (0: in-process)")
    q.add_argument("--max-episodes", type=int, default=None, help="random subset of this many episodes")
    q.add_argument("--seed", type=int, default=0, help="seed of the subset")
    q = sub.add_parser("synth", help="write a small synthetic dataset in the EgoDex format")
    q.add_argument("--out", required=True, help="output root")
    q.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    q.add_argument("--tasks", type=int, default=4, help=f"number of tasks (at most {len(SYNTH_TASKS)})")
    q.add_argument("--episodes", type=int, default=3, help="training episodes per task (split part1)")
    q.add_argument("--test-episodes", type=int, default=1, help="test episodes per task (split test)")
    q.add_argument("--frames", type=int, default=90, help="frames per episode (30 fps)")
    q.add_argument("--height", type=int, default=180, help="native frame height")
    q.add_argument("--width", type=int, default=320, help="native frame width")
    q.add_argument("--workers", type=int, default=2, help="processes rendering episodes (0: in-process)")
    q.add_argument("--zoom", type=float, default=1.0, help="focal length / EgoDex's (> 1: larger hands)")
    q.add_argument("--marker-scale", type=float, default=1.0, help="keypoint marker radius / the default's")
    q = sub.add_parser("cache", help="encode clips once into latent shards (resumable; run under torchrun "
                                     "to split the work across ranks)")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--out", required=True, help="cache directory (an interrupted run resumes there)")
    q.add_argument("--tokenizer", default="wan2.1", choices=["wan2.1", "pixel"], help="video tokenizer")
    q.add_argument("--vae-weights", default="nvidia/Cosmos-Predict2.5-2B",
                   help="Wan2.1 VAE weights: a local file or a Hub repo id (see tokenizer.py)")
    q.add_argument("--dino", default=None, help="also cache DINOv3 features of frame 0: a Hub repo id or file")
    q.add_argument("--eval", action="store_true", help="cache the evaluation clips instead of training clips")
    q.add_argument("--epochs", type=int, default=1, help="epochs of random clip starts to cache")
    q.add_argument("--seed", type=int, default=0, help="seed of the clip plan (as in training)")
    q.add_argument("--clip-len", type=int, default=13, help="frames per clip (4k + 1)")
    q.add_argument("--height", type=int, default=DEFAULT_SIZE[0], help="frame height")
    q.add_argument("--width", type=int, default=DEFAULT_SIZE[1], help="frame width")
    q.add_argument("--shard-size", type=int, default=256, help="clips per shard file")
    q.add_argument("--batch", type=int, default=8, help="clips per encoder batch")
    q.add_argument("--workers", type=int, default=4, help="data loading processes")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="encoder device")
    q.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="stored latent/feature dtype")
    q = sub.add_parser("benchmark", help="clips/s per worker from 1920x1080 H.264, and workers per GPU")
    q.add_argument("--clips", type=int, default=40, help="clips to time")
    q.add_argument("--frames", type=int, default=150, help="frames in the generated 1080p video")
    q.add_argument("--gop", type=int, default=30, help="keyframe interval of the generated video")
    q.add_argument("--batch", type=int, default=64, help="clips per GPU per step (paper: 64)")
    q.add_argument("--step-time", type=float, default=6.2,
                   help="seconds per training step; 6.2 is what the paper's 20 h/epoch on 8 GPUs implies "
                        "(829 h * 30 fps / 30 * 2 = 5.97M clips, 10.4 clips/s/GPU, batch 64 per GPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _run(p, args)
    except (DataError, FileNotFoundError, PermissionError) as e:  # missing data, stats or weights
        raise SystemExit(f"error: {e}") from None


def _run(p, args):
    if args.benchmark and args.cmd is None:
        benchmark()
    elif args.cmd == "index":
        episodes, skipped = load_index(args.data, None, args.workers, args.rebuild, args.cache)
        for reason, n in Counter(r.split(" (")[0] for r in skipped.values()).most_common():
            print(f"  skipped {n}: {reason}")
        print(f"{len(episodes)} episodes, {sum(e.frames for e in episodes)} frames, {len(skipped)} skipped")
    elif args.cmd == "stats":
        stats = compute_stats(args.data, tuple(args.splits), args.workers, args.max_episodes, args.seed)
        Path(args.out).write_text(json.dumps(stats, indent=1))
        std = np.array(stats["std"])
        fam = ", ".join(f"{k} {std[list(v)].mean():.2e}" for k, v in ACTION_FAMILIES.items())
        print(f"{args.out}: {stats['count']} actions from {stats['episodes']} episodes "
              f"({len(stats['skipped'])} skipped); mean std per family: {fam}")
    elif args.cmd == "synth":
        if args.zoom <= 0 or args.marker_scale <= 0:
            p.error("--zoom and --marker-scale must be positive (1: EgoDex's view and markers)")
        t0 = time.time()
        write_synthetic(args.out, args.tasks, args.episodes, args.test_episodes, args.frames,
                        (args.height, args.width), args.seed, args.workers, args.zoom, args.marker_scale)
        print(f"wrote a synthetic EgoDex-format dataset to {args.out} in {time.time() - t0:.1f} s")
    elif args.cmd == "cache":
        _cache_command(args)
    elif args.cmd == "benchmark":
        benchmark(args.clips, args.frames, args.gop, DEFAULT_SIZE, args.batch, args.step_time)
    else:
        p.print_help()


def _cache_command(args):
    """The encoders live in tokenizer.py and semantic.py; only this command imports them."""
    import tokenizer as tok
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else args.device
    vae = tok.build_tokenizer(args.tokenizer, **({"weights": args.vae_weights} if args.tokenizer == "wan2.1" else {}))
    vae = vae.to(device).eval()
    dino = None
    if args.dino:
        import semantic
        dino = semantic.load_dino(args.dino, device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    written = cache_clips(args.data, args.out, vae, args.tokenizer, args.clip_len, (args.height, args.width),
                          not args.eval, None, args.seed, args.epochs, args.shard_size, args.batch, args.workers,
                          device, dtype, dino, rank, world)
    print(f"rank {rank}: wrote {len(written)} shards to {args.out}")


if __name__ == "__main__":
    main()
