"""
Data for DexAC-WM: EgoDex / EgoVerse readers, episode index, clip sampling, action statistics and the
latent cache. The synthetic EgoDex-format dataset is synthetic.py.

Follows the paper's section 5.1 (clip protocol) and the public
EgoDex layout (`<split>/<task>/<k>.hdf5` + `<k>.mp4`, ARKit camera-to-world poses, OpenCV camera
frame). The 57-D action computed from the poses is defined in conditioning.py (`compute_actions`).
What this file decides where the paper is silent (DESIGN.md sections 6 and 11, real data as it is):
- validity is per frame, not per episode: a frame is usable when every pose it needs is known and tracked
  (EgoDex: finite, wrist and fingertip confidences >= MIN_CONFIDENCE; EgoVerse: no 1e9/NaN, no all-zero row,
  no degenerate quaternion). The index keeps each episode's usable runs (split also at EgoVerse time gaps);
  clips, statistics and evaluation only ever see frames and transitions inside one run. An episode is
  skipped (reason logged and counted) only when no run is left or the file itself is broken; any error while
  reading an episode becomes its EpisodeError (`reading`), and a clip that fails at load time is replaced by
  a clip of the next episode and counted in the sample's `skipped` field, so a run never dies on one file.
- an EgoDex video one frame shorter than its poses keeps the frames both have; a larger difference, or a
  video whose frames are not evenly timed (pts * fps would pair them with the wrong poses), skips it.
- a missing or non-(3, 3) `camera/intrinsic` (part1 files hold an empty (0, 3) one) falls back to the
  EgoDex constant, as the official loader does (it is the same in every file). EgoVerse intrinsics come from
  the calibration block, then `intrinsics`, then the vendor's camera; never from EgoDex.
- frames are center-cropped to the target aspect when that loses at most MAX_CROP_LOSS of the view (EgoDex,
  16:9), else letterboxed: a 4:3 EgoVerse frame keeps its whole view (the hands are often at its bottom and
  sides) and every source shares one training size, so batches mix datasets. Then resized with an
  antialiasing filter; intrinsics follow, pixel centres at integers (u' = (u + .5) s - .5).
- splits: EgoDex's folders (training: part1..part5; `extra` only when named); EgoVerse episodes outside
  train/ and test/ folders are split by hashing their names (`egoverse_split`, EGOVERSE_TEST_FRACTION).
- EgoVerse assumptions (not verifiable without the data): keypoints are in the same world frame as the
  wrist poses, and the head pose is camera-to-world in the OpenCV camera frame (the schema says so; the
  index warns when fewer than 90% of wrist points lie in front of the camera).

Use: `make_loader(root, batch_size)` -> (DataLoader, ClipSampler); the sample dict is described
in ClipDataset. Commands: `python data.py {index,stats,cache} -h`; `index` prints what
it found, quirk by quirk.
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import tempfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import av
import h5py
import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import conditioning as C
import hub
import semantic
import tokenizer as tok

log = logging.getLogger("dexac.data")

# ------------------------------------------------------------------------------------------------
# Constants and errors (the 57-D action itself is defined in conditioning.py, paper section 4.3)

# 12 evaluation keypoints (DexWM/PCK): wrist + 5 fingertips per hand
KEYPOINT_NAMES = tuple(f"{s}_{k}" for s in C.HANDS for k in ("wrist",) + tuple(map(str.lower, C.FINGERS)))
DEFAULT_SIZE = (288, 512)  # (H, W) training resolution
EGODEX_K = np.array([[736.6339, 0, 960], [0, 736.6339, 540], [0, 0, 1]])
# EgoVerse vendors' cameras when an episode carries no intrinsics: (K, the (H, W) it is for)
VENDOR_K = {"aria": (np.array([[266.5, 0, 320], [0, 266.5, 240], [0, 0, 1]]), (480, 640)),
            "mecka": (np.array([[250.8, 0, 320], [0, 250.8, 180], [0, 0, 1]]), (360, 640))}
# EgoDex's training parts and EgoVerse's hashed `train`; EgoDex's `extra` (about 97 h, collected after the
# splits were frozen) only when asked for
TRAIN_SPLITS = ("part1", "part2", "part3", "part4", "part5", "train")
EVAL_SPLITS = ("test",)
EGOVERSE_TEST_FRACTION = 0.05  # of a flat EgoVerse folder's episodes, chosen by hashing their names
# EgoDex tracking loss keeps poses finite (frozen or extrapolated) and shows as a low confidence (0: occluded
# or undetected): a frame counts only if its wrists and fingertips are all at least this confident
MIN_CONFIDENCE = 0.1
MAX_CROP_LOSS = 0.1  # crop to the target aspect up to this fraction of the view, else letterbox (4:3 EgoVerse)
PLACEHOLDER_PROMPTS = ("", "aria recorded dataset.", "aria recorded dataset")


class DataError(Exception):
    """A problem the user must fix (wrong root, missing file, bad stats file)."""


class EpisodeError(DataError):
    """One episode is unusable; long jobs skip it with this reason, direct access raises it."""

    def __init__(self, episode, reason):
        self.episode, self.reason = str(episode), reason
        super().__init__(f"episode {episode}: {reason}. Remove or repair the file, then rebuild the "
                         f"index with `python data.py index --data ROOT --rebuild`.")


@contextlib.contextmanager
def reading(episode):
    """Whatever goes wrong while reading one episode becomes that episode's EpisodeError: a quirk the readers
    do not know skips the episode with a reason, and never kills a loader worker (and the run with it)."""
    try:
        yield
    except EpisodeError:
        raise
    except Exception as e:
        raise EpisodeError(episode, f"unexpected {type(e).__name__} while reading it ({e})") from e


class Reading(NamedTuple):
    """What a reader returns for pose rows [start, stop) of one episode."""
    track: dict        # the C.compute_actions input; poses of invalid frames are identities, never NaN
    K: np.ndarray      # (3, 3) intrinsics
    K_hw: tuple        # the (H, W) K is for; None: the frames' own size
    prompt: str
    confidence: np.ndarray  # (T, 12) per keypoint, in KEYPOINT_NAMES order
    valid: np.ndarray  # (T,) bool: every pose this frame needs is known and tracked
    cut: np.ndarray    # (T,) bool: a time gap lies between frame i - 1 and frame i
    frames: int        # pose rows of the whole episode
    quirks: Counter    # what the reader met and handled (see QUIRKS)


QUIRKS = {  # name: what it means (the index counts them; `python data.py index` prints the table)
    "empty K": "EgoDex camera/intrinsic empty or not a finite (3, 3): the EgoDex constant is used",
    "no confidences": "EgoDex file without a confidences group: every frame is trusted",
    "low-confidence frames": f"frames with a wrist or fingertip confidence below {MIN_CONFIDENCE}: not used",
    "non-finite frames": "frames with a NaN/inf pose: not used",
    "video one frame short": "EgoDex video one frame shorter than the poses: the last pose row is not used",
    "missing (1e9) frames": "EgoVerse frames with a missing (1e9 or NaN) value: not used",
    "zero-row frames": "EgoVerse frames with an all-zero pose or keypoint row (Mecka's missing hand): not used",
    "legacy Aria layout": "EgoVerse episodes with raw Aria keypoints in obs_keypoints: fingertips remapped",
    "time gaps": "EgoVerse gaps > 1.5 frame periods (frames dropped by old converters): episodes split there",
    "placeholder prompt": "EgoVerse task_description empty or a placeholder: task_name is the prompt",
    "calibration K": "EgoVerse intrinsics from calibration.cameras.front_1 (schema v3.1)",
    "vendor K": "EgoVerse episodes without intrinsics: the vendor's constant camera",
    "4:3 frames": f"frames narrower than the training aspect: letterboxed (cropping would lose more than "
                  f"{MAX_CROP_LOSS:.0%} of the view)",
}


def usable_runs(valid, cut, min_len=2):
    """-> [(start, stop)] the maximal runs of valid frames with no time gap inside, at least min_len long."""
    runs, start = [], None
    for i, ok in enumerate(valid):
        if start is not None and (not ok or cut[i]):
            if i - start >= min_len:
                runs.append((start, i))
            start = None
        if ok and start is None:
            start = i
    if start is not None and len(valid) - start >= min_len:
        runs.append((start, len(valid)))
    return runs


# ------------------------------------------------------------------------------------------------
# Keypoints: the 12 evaluation points in pixels

def project_keypoints(track, K):
    """-> pixels (T, 12, 2) in KEYPOINT_NAMES order, and (T, 12) True where in front of the camera.
    The camera pose is camera-to-world, its frame OpenCV (x right, y down, z forward)."""
    pts = np.concatenate([np.concatenate([track[f"{s}_wrist"][:, None, :3, 3], track[f"{s}_tips"]], 1)
                          for s in C.HANDS], 1)  # (T, 12, 3) world
    cam = C.to_frame(track["camera"], pts)
    z = cam[..., 2:]
    uv = (cam @ np.asarray(K, np.float64).T)[..., :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)
    return uv, z[..., 0] > 1e-6


def wrists_in_front(track, valid):
    """-> (valid wrist points in front of the camera, valid wrist points): on real data the first should be
    above 90% of the second, else the camera convention is wrong (load_index warns)."""
    pts = np.stack([track[f"{s}_wrist"][valid, :3, 3] for s in C.HANDS], 1)  # (T, 2, 3) world
    z = C.to_frame(track["camera"][valid], pts)[..., 2]
    return int((z > 0).sum()), int(z.size)


# ------------------------------------------------------------------------------------------------
# EgoDex reading: prompt rule, poses, intrinsics, confidences; all checks raise EpisodeError

POSE_JOINTS = ("camera", "leftHand", "rightHand") + tuple(f"{s}{f}Tip" for s in C.HANDS for f in C.FINGERS)
KEYPOINT_JOINTS = tuple(j for s in C.HANDS for j in (f"{s}Hand",) + tuple(f"{s}{f}Tip" for f in C.FINGERS))


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
    """{EgoDex joint name: (T, 4, 4)} -> the track dict C.compute_actions takes."""
    track = {"camera": j["camera"]}
    for s in C.HANDS:
        track[f"{s}_wrist"] = j[f"{s}Hand"]
        track[f"{s}_tips"] = np.stack([j[f"{s}{f}Tip"][:, :3, 3] for f in C.FINGERS], 1)
    return track


def read_egodex(path, start=0, stop=None, episode=None):
    """-> Reading of pose rows [start, stop). A frame is invalid where a pose it needs is NaN/inf or a wrist or
    fingertip confidence is below MIN_CONFIDENCE; its poses become identities so nothing downstream is NaN."""
    episode = episode or path
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EpisodeError(episode, f"corrupt or unreadable HDF5 ({e})") from None
    quirks = Counter()
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
            finite = np.logical_and.reduce([np.isfinite(v).all((1, 2)) for v in joints.values()])
            # part1 files hold an empty (0, 3) placeholder: like the official loader, use the constant K (the
            # same for every EgoDex file) unless the file's own is a finite (3, 3)
            K = f["camera/intrinsic"][()] if "camera/intrinsic" in f else None
            if np.shape(K) == (3, 3) and np.isfinite(K).all():
                K = np.asarray(K, np.float64)
            else:
                K, quirks["empty K"] = EGODEX_K, 1
            conf = np.ones((stop - start, len(KEYPOINT_JOINTS)), np.float32)
            present = [k for k in KEYPOINT_JOINTS if f"confidences/{k}" in f]
            for k in present:
                conf[:, KEYPOINT_JOINTS.index(k)] = np.nan_to_num(f[f"confidences/{k}"][start:stop], nan=0.0)
            if len(present) < len(KEYPOINT_JOINTS):
                quirks["no confidences"] = 1
            prompt = egodex_prompt(f.attrs, task=Path(path).parent.name)
    except (OSError, KeyError, ValueError) as e:  # h5py raises these on truncated data
        raise EpisodeError(episode, f"corrupt HDF5 ({type(e).__name__}: {e})") from None
    tracked = (conf >= MIN_CONFIDENCE).all(1)
    quirks["non-finite frames"] = int((~finite).sum())
    quirks["low-confidence frames"] = int((finite & ~tracked).sum())
    valid = finite & tracked
    for v in joints.values():
        v[~finite] = np.eye(4)
    return Reading(_track_from_joints(joints), K, None, prompt, conf, valid, np.zeros(len(valid), bool), n,
                   +quirks)


def video_frame_count(path, episode=None):
    """-> the frames of an MP4, from its header. A frame is paired with a pose row by pts * fps, which holds
    only at a constant rate: a stream whose mean rate differs from its nominal one (frames dropped, or
    variable timing) is refused rather than silently shifted."""
    if not Path(path).is_file():
        raise EpisodeError(episode or path, f"missing video {path}")
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            duration = float(s.duration * s.time_base) if s.duration else None
            n = s.frames or int(round(duration * float(s.average_rate)))
            nominal = s.base_rate or s.guessed_rate
            if nominal and s.average_rate and abs(float(s.average_rate) / float(nominal) - 1) > 1e-3:
                raise EpisodeError(episode or path, f"variable frame rate video (mean {float(s.average_rate):.3f}"
                                                    f" fps, nominal {float(nominal):.3f}): its frames cannot "
                                                    f"be paired with pose rows by index")
            return n
    except (av.FFmpegError, OSError, IndexError, TypeError) as e:
        raise EpisodeError(episode or path, f"unreadable video ({e})") from None


# ------------------------------------------------------------------------------------------------
# Video: seek + decode only the needed frames, antialiased resize, intrinsics that follow

def fit_geometry(src_hw, size):
    """How a src_hw frame becomes `size`: -> scaled (h, w), and the offset (y0, x0) of the output window in
    the scaled frame. Cover and center-crop while that loses at most MAX_CROP_LOSS of the view (EgoDex's 16:9
    loses nothing); else fit and pad (letterbox, negative offsets): a 4:3 EgoVerse frame cropped to 16:9 would
    lose a quarter of the view, often where the hands are."""
    (h, w), (H, W) = src_hw, size
    cover = max(H / h, W / w)
    if 1 - H * W / (h * w * cover * cover) <= MAX_CROP_LOSS:
        sh, sw = max(H, round(h * cover)), max(W, round(w * cover))
    else:
        fit = min(H / h, W / w)
        sh, sw = min(H, round(h * fit)), min(W, round(w * fit))
    return (sh, sw), ((sh - H) // 2, (sw - W) // 2)


def content_box(src_hw, size):
    """-> (x0, y0, x1, y1): the pixels of a `size` frame that show the source (all of it unless letterboxed)."""
    (sh, sw), (y0, x0) = fit_geometry(src_hw, size)
    return max(0, -x0), max(0, -y0), min(size[1], sw - x0), min(size[0], sh - y0)


def scale_intrinsics(K, src_hw, size):
    """K for frames resized from src_hw to size by fit_geometry (pixel centres at integers)."""
    (sh, sw), (y0, x0) = fit_geometry(src_hw, size)
    sx, sy = sw / src_hw[1], sh / src_hw[0]
    K = np.array(K, np.float64)
    return np.array([[K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] + 0.5) * sx - 0.5 - x0],
                     [0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5 - y0], [0, 0, 1]])


def _window(rgb, size, y0, x0):
    """The size window at (y0, x0) of a scaled frame: a crop, or black bars where the offsets are negative."""
    if y0 >= 0 and x0 >= 0:
        return rgb[y0:y0 + size[0], x0:x0 + size[1]]
    out = np.zeros(tuple(size) + rgb.shape[2:], rgb.dtype)
    h, w = min(size[0], rgb.shape[0] - max(y0, 0)), min(size[1], rgb.shape[1] - max(x0, 0))
    out[max(-y0, 0):max(-y0, 0) + h, max(-x0, 0):max(-x0, 0) + w] = rgb[max(y0, 0):max(y0, 0) + h,
                                                                         max(x0, 0):max(x0, 0) + w]
    return out


def resize_frame(frame, size):
    """av.VideoFrame -> uint8 (H, W, 3) RGB; swscale's area filter antialiases when shrinking."""
    (sh, sw), (y0, x0) = fit_geometry((frame.height, frame.width), size)
    interp = "AREA" if sh <= frame.height else "BICUBIC"
    return _window(frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation=interp), size, y0, x0)


def resize_image(img, size):
    """uint8 (h, w, 3) -> (H, W, 3), same geometry as resize_frame (PIL's filters antialias)."""
    (sh, sw), (y0, x0) = fit_geometry(img.shape[:2], size)
    return _window(np.asarray(Image.fromarray(img).resize((sw, sh), Image.BICUBIC, reducing_gap=None)), size,
                   y0, x0)


def decode_frames(path, start, count, *, size=None, threads=1, episode=None):
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
# EgoVerse (Zarr v3): the same Reading and sample dict

MANO_TIPS = (4, 8, 12, 16, 20)  # thumb, index, middle, ring, little: same order as C.FINGERS (MediaPipe too)
ARIA_TIPS, ARIA_WRIST = (0, 1, 2, 3, 4), 5  # the raw Aria hand-tracking layout of legacy conversions


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


def _zarr_array(g, key, episode, required=True):
    for k in (key, key.replace(".", "/")):
        try:
            return g[k]
        except KeyError:
            continue
    if required:
        raise EpisodeError(episode, f"missing EgoVerse array {key}")
    return None


def quat_pose(a):
    """(T, 7) xyz + quaternion wxyz -> (T, 4, 4); callers drop rows with a degenerate quaternion first."""
    w, x, y, z = (a[:, 3:] / np.linalg.norm(a[:, 3:], axis=-1, keepdims=True)).T
    T = np.zeros((len(a), 4, 4))
    R = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
         2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
         2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    T[:, :3, :3] = np.stack(R, -1).reshape(-1, 3, 3)
    T[:, :3, 3], T[:, 3, 3] = a[:, :3], 1
    return T


def _image_hw(g, episode):
    """(H, W) of the first front image, from its JPEG header."""
    return Image.open(io.BytesIO(bytes(_zarr_array(g, "images.front_1", episode)[:1][0]))).size[::-1]


def egoverse_intrinsics(g, episode, quirks):
    """-> (K (3, 3), the (H, W) it is for or None for the frames' own): schema v3.1's
    calibration.cameras.front_1 (with its resolution), then `intrinsics.front_1` (or an older bare matrix), then
    the vendor's constant camera by embodiment or, failing that, by the frames' aspect; never EgoDex's K."""
    cam = ((g.attrs.get("calibration") or {}).get("cameras") or {}).get("front_1") or {}
    if cam.get("K") is not None:
        quirks["calibration K"] = 1
        res = cam.get("resolution")  # [width, height]
        return np.asarray(cam["K"], np.float64)[:3, :3], (tuple(res[::-1]) if res else None)
    K = g.attrs.get("intrinsics")
    K = K.get("front_1") if isinstance(K, dict) else K
    if K is not None and np.shape(K) in ((3, 3), (3, 4)) and np.isfinite(np.asarray(K, np.float64)).all():
        return np.asarray(K, np.float64)[:3, :3], None
    vendor = _text(g.attrs.get("embodiment")).lower().split("_")[0]
    if vendor not in VENDOR_K:
        h, w = _image_hw(g, episode)
        vendor = "aria" if abs(w / h - 4 / 3) < 0.02 else "mecka" if abs(w / h - 16 / 9) < 0.02 else None
    if vendor is None:
        raise EpisodeError(episode, "no intrinsics (calibration.cameras.front_1.K or intrinsics.front_1) and "
                                    "no known vendor camera for its embodiment or frame size")
    quirks["vendor K"] = 1
    return VENDOR_K[vendor]


def egoverse_prompt(attrs):
    """task_description, unless it is empty or a converter's placeholder: then the task name."""
    text = _text(attrs.get("task_description"))
    if text.lower() in PLACEHOLDER_PROMPTS:
        return _text(attrs.get("task_name")).replace("_", " "), True
    return text, False


def read_egoverse(path, start=0, stop=None, episode=None):
    """-> Reading of frames [start, stop), as read_egodex. A frame is invalid where any pose or keypoint row it
    needs is missing: 1e9 (Aria's marker) or NaN, all zero (Mecka's missing hand), or a degenerate quaternion.
    A gap in obs_rgb_timestamps_ns above 1.5 frame periods cuts the episode there."""
    episode = episode or path
    g = _zarr_group(path, episode)
    if _zarr_array(g, "obs_head_pose", episode, required=False) is None:
        raise EpisodeError(episode, "no obs_head_pose (a Scale episode?): the head action and the keypoint "
                                    "projection need the camera pose")
    n = int(g.attrs.get("total_frames") or _zarr_array(g, "obs_head_pose", episode).shape[0])
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise EpisodeError(episode, f"frames [{start}, {stop}) outside the {n} frames")
    missing, zero = np.zeros(stop - start, bool), np.zeros(stop - start, bool)

    def rows(key, width):
        a = np.asarray(_zarr_array(g, key, episode)[start:stop], np.float64)
        if a.shape != (stop - start, width):
            raise EpisodeError(episode, f"{key} holds rows of shape {a.shape[1:]} or too few of them for "
                                        f"frames [{start}, {stop})")
        gone = ~np.isfinite(a).all(1) | (np.abs(a) >= 1e8).any(1)
        empty = (a == 0).all(1) | ((np.linalg.norm(a[:, 3:], axis=1) < 1e-6) if width == 7 else False)
        missing[:] |= gone
        zero[:] |= empty & ~gone
        a[gone | empty] = [0, 0, 0, 1, 0, 0, 0] if width == 7 else 0  # an identity pose: never NaN
        return a

    track = {"camera": quat_pose(rows("obs_head_pose", 7))}
    legacy = False
    for s in C.HANDS:
        wrist = quat_pose(rows(f"{s}.obs_wrist_pose", 7))
        kp = rows(f"{s}.obs_keypoints", 63).reshape(-1, 21, 3)
        # legacy Aria conversions store the raw Aria layout (wrist at 5) and no obs_aria_keypoints; MANO and
        # MediaPipe put the wrist at 0: the keypoint nearest the wrist pose tells them apart
        valid = ~(missing | zero)
        if _zarr_array(g, f"{s}.obs_aria_keypoints", episode, required=False) is None and valid.any():
            d = np.linalg.norm(kp[valid][:, [0, ARIA_WRIST]] - wrist[valid, None, :3, 3], axis=-1)
            legacy |= bool(np.median(d[:, 1]) < np.median(d[:, 0]))
        track[f"{s}_wrist"], track[f"{s}_tips"] = wrist, kp
    for s in C.HANDS:
        track[f"{s}_tips"] = track[f"{s}_tips"][:, ARIA_TIPS if legacy else MANO_TIPS]
    valid = ~(missing | zero)
    quirks = Counter({"missing (1e9) frames": int(missing.sum()), "legacy Aria layout": int(legacy),
                      "zero-row frames": int((zero & ~missing).sum())})
    cut = np.zeros(stop - start, bool)
    stamps = _zarr_array(g, "obs_rgb_timestamps_ns", episode, required=False)
    if stamps is not None and stop - start > 1:
        dt = np.diff(np.asarray(stamps[start:stop], np.float64))
        cut[1:] = (dt <= 0) | (dt > 1.5e9 / float(g.attrs.get("fps") or 30))
    quirks["time gaps"] = int(cut.sum())
    K, K_hw = egoverse_intrinsics(g, episode, quirks)
    prompt, placeholder = egoverse_prompt(g.attrs)
    quirks["placeholder prompt"] = int(placeholder)
    conf = np.ones((stop - start, len(KEYPOINT_NAMES)), np.float32)
    return Reading(track, K, K_hw, prompt, conf, valid, cut, n, +quirks)


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
# Frames out: MP4 files, and the contact sheets of train.py's previews, sample.py and evaluate.py's figure

# x264's AVX-512 kernels encoded the same frames to different bytes from one process to the next (PyAV 18.1,
# 64x112 frames, a 2-core Xeon with AVX-512; 64x128 and 288x512 frames did not), so a regenerated synthetic
# dataset did not match its first copy. Where the CPU has AVX-512, x264 is told the sets up to AVX2 instead (every
# AVX-512 CPU has them): the same bytes every time, at the same speed (288x512: 278-299 frames/s either way).
# Elsewhere x264 detects its own: naming a set the CPU lacks would crash it.
X264_SETS_BELOW_AVX512 = "MMX2,SSE2,SSE2Fast,SSSE3,SSE4.2,AVX,FMA3,BMI2,AVX2,LZCNT,Cache64"


def h264_stream(container, height, width, *, fps=30, crf=12, gop=30, preset="veryfast"):
    """An H.264 (yuv420p) stream of `container` whose bytes depend on its frames only."""
    s = container.add_stream("libx264", rate=fps)
    s.height, s.width, s.pix_fmt = height, width, "yuv420p"
    s.options = {"crf": str(crf), "preset": preset, "g": str(gop)}
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        s.options = {**s.options, "x264-params": f"asm={X264_SETS_BELOW_AVX512}"}
    return s


def write_video(path, frames, *, fps=30, crf=12, gop=30, preset="veryfast"):
    """Iterable of uint8 (H, W, 3) frames -> H.264 MP4 (yuv420p) with PyAV, the same bytes for the same frames."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w") as c:
        s = h264_stream(c, *first.shape[:2], fps=fps, crf=crf, gop=gop, preset=preset)
        for img in itertools.chain([first], frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        c.mux(s.encode())


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
    """One usable run of an episode's frames: clips, statistics and evaluation see only these. An episode
    whose valid frames are broken by invalid ones or time gaps is several Episodes of the same id."""
    id: str      # "part1/<task>/<k>" (EgoDex) or "<split>/<hash>" (EgoVerse; see egoverse_split)
    path: str    # the .hdf5 file or the .zarr directory
    frames: int  # frames in this run
    kind: str    # "egodex" or "egoverse"
    start: int = 0  # the run's first frame in the episode

    @property
    def split(self):
        return self.id.split("/")[0]


def egoverse_split(name, test_fraction=EGOVERSE_TEST_FRACTION):
    """EgoVerse episodes sit side by side: an episode is `test` when the first 8 bytes of the SHA-256 of its
    name, as a fraction of 2**64, fall below test_fraction, else `train`. Deterministic, and stable when
    episodes are added (each depends on its own name only)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2 ** 64 else "train"


def read_track(ep, start=0, stop=None):
    """-> Reading of frames [start, stop) of the run ep (relative to ep.start; stop None: the run's end)."""
    reader = read_egodex if ep.kind == "egodex" else read_egoverse
    stop = ep.frames if stop is None else stop
    with reading(ep.id):
        return reader(ep.path, ep.start + start, ep.start + stop, episode=ep.id)


class Probe(NamedTuple):
    frames: int   # pose rows
    runs: list    # [(start, stop)] usable runs
    quirks: Counter
    front: tuple  # (valid wrist points in front of the camera, valid wrist points)


def probe_episode(kind, path, episode):
    """Read one episode fully -> Probe; raises EpisodeError when nothing usable remains, with the reason.
    An EgoDex video may hold one frame fewer than the poses (frame i pairs with pose row i): the episode keeps
    the frames both have. A larger difference means a broken file or another pairing: skipped."""
    with reading(episode):
        r = (read_egoverse if kind == "egoverse" else read_egodex)(path, episode=episode)
        n, quirks, valid = r.frames, Counter(r.quirks), r.valid
        if kind == "egoverse":
            if _zarr_array(_zarr_group(path, episode), "images.front_1", episode).shape[0] < n:
                raise EpisodeError(episode, "fewer images than poses")
            h, w = _image_hw(_zarr_group(path, episode), episode)
            quirks["4:3 frames"] = int(w / h < 16 / 9 * (1 - MAX_CROP_LOSS))
        else:
            v = video_frame_count(Path(path).with_suffix(".mp4"), episode)
            if v < n - 1:
                raise EpisodeError(episode, f"video has {v} frames but poses have {n}")
            if v < n:
                quirks["video one frame short"] = 1
                valid = valid & (np.arange(n) < v)
        runs = usable_runs(valid, r.cut)
        if not runs:
            raise EpisodeError(episode, f"no two consecutive usable frames (of {n}: "
                                        + ", ".join(f"{k} {c}" for k, c in quirks.items()) + ")")
        return Probe(n, runs, quirks, wrists_in_front(r.track, valid))


def run_at(path, frame):
    """One episode file outside any index (an EgoDex .hdf5 with its .mp4, or an EgoVerse .zarr) -> (the usable
    run holding `frame` and its next frame, `frame` relative to the run)."""
    path = Path(path)
    kind = "egoverse" if path.suffix == ".zarr" else "egodex"
    eid = f"{path.parent.name}/{path.stem}"
    runs = probe_episode(kind, str(path), eid).runs
    for a, b in runs:
        if a <= frame < b - 1:
            return Episode(eid, str(path), b - a, kind, a), frame - a
    raise EpisodeError(eid, f"frame {frame} and the next are not both usable; usable frames: "
                            + ", ".join(f"[{a}, {b})" for a, b in runs))


def _probe(args):
    kind, path, name = args
    try:
        return name, probe_episode(kind, path, name), None
    except EpisodeError as e:
        return name, None, e.reason


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
    """-> [(kind, path, name)]; the name is the episode id for EgoDex, the group-relative one for EgoVerse."""
    pattern = "*.zarr" if kind == "egoverse" else "*.hdf5"
    files = sorted((root / group).glob(pattern), key=lambda p: (len(p.stem), p.stem))
    return [(kind, str(p), p.stem if kind == "egoverse" else f"{group}/{p.stem}") for p in files]


def _episode_id(group, kind, name, test_fraction):
    """EgoDex: `<split>/<task>/<k>`. EgoVerse: a folder named train or test is that split; episodes anywhere
    else (the root, or a vendor folder) are split by egoverse_split."""
    if kind == "egodex":
        return name
    if group in ("train", "test"):
        return f"{group}/{name}"
    return "/".join([egoverse_split(name, test_fraction)] + ([group] if group != "." else []) + [name])


def _signature(root, group):
    """What tells a group changed: the directory mtime; the root itself (EgoVerse episodes lying
    directly in it) also holds the index file, so there the list of names is compared instead."""
    if group != ".":
        return (root / group).stat().st_mtime_ns
    return hashlib.sha1("\n".join(sorted(p.name for p in root.glob("*.zarr"))).encode()).hexdigest()


ROOT_LAYOUT = ("expected an EgoDex root (<root>/<split>/<task>/<k>.hdf5 + <k>.mp4) or an EgoVerse root "
               "(<root>/[<folder>/]<hash>.zarr); make a synthetic one with `python synthetic.py --out DIR`")
INDEX_VERSION = 2  # bumped when what the index stores, or how a frame is judged usable, changes


def build_index(root, workers=0, rebuild=False, cache=None):
    """Probe a dataset root once; later calls re-probe only directories that changed. -> the index dict:
    {"groups": {group: {"mtime", "kind", "episodes": [[name, frames, runs]], "skipped": [[name, reason]],
    "quirks": {quirk: count}, "front": [in front, wrist points]}}, ...}, also written to `cache`."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: {ROOT_LAYOUT}")
    cache = Path(cache) if cache else root / ".dexac_index.json"
    if cache == root / ".dexac_index.json" and not os.access(root, os.W_OK):
        cache = Path.home() / ".cache" / "dexac" / f"index-{hashlib.sha1(bytes(root)).hexdigest()[:12]}.json"
    header = {"version": INDEX_VERSION, "min_confidence": MIN_CONFIDENCE, "root": str(root)}
    old = {}
    if cache.is_file() and not rebuild:
        saved = json.loads(cache.read_text())
        if all(saved.get(k) == v for k, v in header.items()):
            old = saved.get("groups", {})
    index, todo = {}, []
    for group, kind in _groups(root).items():
        mtime = _signature(root, group)
        if old.get(group, {}).get("mtime") == mtime:
            index[group] = old[group]
        else:
            index[group] = {"mtime": mtime, "kind": kind, "episodes": [], "skipped": [], "quirks": {},
                            "front": [0, 0]}
            todo += [(group, m) for m in _members(root, group, kind)]
    if todo:
        results = parallel_map(_probe, [m for _, m in todo], workers)
        for (group, _), (name, probe, reason) in zip(todo, tqdm(results, total=len(todo), desc="indexing")):
            entry = index[group]
            if reason is None:
                entry["episodes"].append([name, probe.frames, [list(r) for r in probe.runs]])
                entry["quirks"] = dict(Counter(entry["quirks"]) + probe.quirks)
                entry["front"] = [a + b for a, b in zip(entry["front"], probe.front)]
            else:
                log.warning("skipping %s: %s", name, reason)
                entry["skipped"].append([name, reason])
        cache.parent.mkdir(parents=True, exist_ok=True)
        hub.atomic_write(cache, json.dumps(header | {"groups": index}).encode())
    return header | {"groups": index}


def load_index(root, splits=None, workers=0, rebuild=False, cache=None, test_fraction=EGOVERSE_TEST_FRACTION):
    """Index a dataset root (build_index) -> (episodes: list[Episode], the usable runs of the episodes in
    `splits`; skipped: {episode id: reason}). Warns loudly when the camera convention looks wrong."""
    index = build_index(root, workers, rebuild, cache)
    root = Path(index["root"])
    episodes, skipped, front = [], {}, np.zeros(2, np.int64)
    for group, entry in sorted(index["groups"].items()):
        suffix = ".zarr" if entry["kind"] == "egoverse" else ".hdf5"
        for name, _, runs in entry["episodes"]:
            eid = _episode_id(group, entry["kind"], name, test_fraction)
            path = str(root / group / (name.split("/")[-1] + suffix))
            episodes += [Episode(eid, path, b - a, entry["kind"], a) for a, b in runs]
        skipped.update({_episode_id(group, entry["kind"], name, test_fraction): reason
                        for name, reason in entry["skipped"]})
        front += entry["front"]
    if front[1] and front[0] < 0.9 * front[1]:
        log.warning("WARNING: only %.0f%% of the wrist points of %s lie in front of the camera (real data: "
                    "more than 90%%): the camera poses are probably not camera-to-world in OpenCV axes (x right, "
                    "y down, z forward), and actions, keypoints and PCK will be wrong", 100 * front[0] / front[1],
                    root)
    available = sorted({e.split for e in episodes})
    if splits is not None:
        episodes = [e for e in episodes if e.split in splits]
        skipped = {k: v for k, v in skipped.items() if k.split("/")[0] in splits}
    if not episodes:
        raise DataError(f"no usable episodes under {root} for splits {splits} (splits with usable "
                        f"episodes: {available}; {len(skipped)} skipped): {ROOT_LAYOUT}")
    log.info("index: %d usable runs of %d episodes (%d frames), %d skipped", len(episodes),
             len({e.id for e in episodes}), sum(e.frames for e in episodes), len(skipped))
    return episodes, skipped


def parallel_map(fn, items, workers, chunksize=4):
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
    with reading(ep.id):
        return _load_clip(ep, start, length, size, threads)


def _load_clip(ep, start, length, size, threads):
    r = read_track(ep, start, start + length)
    if not r.valid.all() or r.cut[1:].any():
        raise EpisodeError(ep.id, f"frames [{ep.start + start}, {ep.start + start + length}) are not all "
                                  f"usable: the file changed since it was indexed")
    first = ep.start + start
    if ep.kind == "egodex":
        video, src_hw = decode_frames(Path(ep.path).with_suffix(".mp4"), first, length, size=size,
                                      threads=threads, episode=ep.id)
    else:
        video, src_hw = decode_jpegs(ep.path, first, length, size, ep.id)
    K = scale_intrinsics(r.K, r.K_hw, src_hw) if r.K_hw and tuple(r.K_hw) != src_hw else r.K
    box = content_box(src_hw, size) if size else (0, 0, src_hw[1], src_hw[0])
    K = scale_intrinsics(K, src_hw, size) if size else K
    uv, front = project_keypoints(r.track, K)
    inside = front & (uv[..., 0] >= box[0] - 0.5) & (uv[..., 1] >= box[1] - 0.5) & \
        (uv[..., 0] < box[2] - 0.5) & (uv[..., 1] < box[3] - 0.5)
    return {"video": torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(),  # (3, T, H, W) uint8
            "actions": torch.from_numpy(C.compute_actions(r.track)),           # (T-1, 57) float32
            "prompt": r.prompt,
            "intrinsics": torch.tensor(K, dtype=torch.float32),                # (3, 3) at (H, W)
            "keypoints": torch.tensor(uv, dtype=torch.float32),                # (T, 12, 2) pixels
            "keypoint_valid": torch.from_numpy(inside & (r.confidence >= MIN_CONFIDENCE)),  # (T, 12) bool
            "keypoint_confidence": torch.from_numpy(r.confidence),            # (T, 12)
            "episode": ep.id, "start": first, "skipped": 0}


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


def make_loader(data, batch_size, *, train=True, splits=None, clip_len=13, size=DEFAULT_SIZE,
                num_workers=4, seed=0, rank=0, world_size=1, test_fraction=EGOVERSE_TEST_FRACTION, **loader_kw):
    """-> (DataLoader, ClipSampler) over a dataset root, or over a latent cache directory (`python data.py
    cache`; then clip_len and size come from the cache). Call sampler.set_epoch(e) each epoch; save
    sampler.state_dict(consumed) with checkpoints and load it before iterating on resume.
    Under torchrun, index once beforehand (`python data.py index`) so ranks only read the cache."""
    if (Path(data) / CACHE_MANIFEST).is_file():  # a latent cache: every clip is a one-clip episode
        dataset = CachedClipDataset(data)
        frames = [dataset.manifest["clip_len"]] * len(dataset)
        clip_len = dataset.manifest["clip_len"]
    else:
        episodes, _ = load_index(data, splits or (TRAIN_SPLITS if train else EVAL_SPLITS),
                                 test_fraction=test_fraction)
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


def cache_clips(data, out, tokenizer, *, tokenizer_name, clip_len=13, size=DEFAULT_SIZE, train=True, splits=None,
                seed=0, epochs=1, shard_size=256, batch=8, workers=2, device="cpu", dtype=torch.bfloat16,
                dino=None, rank=0, world_size=1, test_fraction=EGOVERSE_TEST_FRACTION):
    """Encode the clips of `epochs` epochs of the clip plan into shards under `out`.

    tokenizer: an object with encode(video (B, 3, T, H, W) in [-1, 1]); dino: None or a callable frames
    (B, 3, H, W) in [-1, 1] -> features (B, P, D). Rank r writes shards r, r + world_size, ...; shards that
    exist are kept, so an interrupted job resumes where it stopped. -> list of shards this rank wrote."""
    splits = tuple(splits or (TRAIN_SPLITS if train else EVAL_SPLITS))
    episodes, _ = load_index(data, splits, test_fraction=test_fraction)
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
                "clips": len(plan), "shard_size": shard_size, "dino": dino is not None,
                "layout": C.action_layout(), "splits": list(splits), "test_fraction": test_fraction}
    if (out / CACHE_MANIFEST).is_file():
        old = json.loads((out / CACHE_MANIFEST).read_text())
        if old != manifest:
            changed = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise DataError(f"{out} holds a cache made with other settings ({', '.join(changed)}): "
                            f"choose another --out or delete it")
    elif rank == 0:
        hub.atomic_write(out / CACHE_MANIFEST, json.dumps(manifest, indent=1).encode())
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
        # atomic: a killed job never leaves half a shard
        hub.atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"clips": json.dumps(meta)}))
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
        if self.manifest["layout"] != C.action_layout():
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
    """-> (id, action_moments of the run, None) or (id, None, reason); every transition of a run is valid."""
    try:
        with reading(ep.id):
            r = read_track(ep)
            if not r.valid.all() or r.cut[1:].any():
                raise EpisodeError(ep.id, "frames indexed as usable are not: the file changed since indexing")
            return ep.id, action_moments(C.compute_actions(r.track)), None
    except EpisodeError as e:
        return ep.id, None, e.reason


def compute_stats(data, splits=TRAIN_SPLITS, workers=0, max_episodes=None, seed=0,
                  test_fraction=EGOVERSE_TEST_FRACTION):
    """Per-dimension action statistics over every valid transition (consecutive usable frames, no time gap)
    of the splits' episodes, or of a random subset of max_episodes of them."""
    episodes, skipped = load_index(data, splits, workers, test_fraction=test_fraction)
    if max_episodes:
        ids = sorted({e.id for e in episodes})
        if max_episodes < len(ids):
            ids = set(np.random.default_rng(seed).choice(ids, max_episodes, replace=False).tolist())
            episodes = [e for e in episodes if e.id in ids]
    total, used = None, set()
    for eid, m, reason in tqdm(parallel_map(_episode_moments, episodes, workers), total=len(episodes), desc="stats"):
        if m is None:
            log.warning("skipping %s: %s", eid, reason)
            skipped[eid] = reason
        else:
            total = merge_moments(total, m)
            used.add(eid)
    if total is None:
        raise DataError(f"no readable episodes for statistics in {data}")
    n, mean, m2, mn, mx = total
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()):  # never write statistics that poison training
        raise DataError(f"the action statistics of {data} are not finite: an episode holds NaN/inf actions the "
                        f"readers did not catch; rebuild the index and report the episode")
    for d in np.flatnonzero(mx == mn):  # std 0 legitimately; load_stats normalizes it with std 1
        log.warning("action dimension %d (%s) is constant in the data: %g", d, C.action_layout()["names"][d], mn[d])
    return {"layout": C.action_layout(), "count": int(n), "episodes": len(used),
            "mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist(), "min": mn.tolist(),
            "max": mx.tolist(), "data": str(data), "splits": list(splits), "test_fraction": test_fraction,
            "skipped": skipped}


def load_stats(path):
    """stats.json -> (mean, std) float32 (57,); refuses a malformed file, a std of 0 on a dimension that varies
    and a file made for another action layout (conditioning.load_stats_file: a constant dimension gets std 1)."""
    if not Path(path).is_file():
        raise DataError(f"stats file {path} not found: make it with "
                        f"`python data.py stats --data ROOT --out {path}`")
    try:
        mean, std, layout = C.load_stats_file(str(path))
    except ValueError as e:
        raise DataError(str(e)) from None
    if layout != C.action_layout():
        raise DataError(f"{path} was computed for another action layout; recompute it with "
                        f"`python data.py stats --data ROOT --out {path}`")
    return mean.numpy(), std.numpy()


def index_table(index, splits=None, clip_len=13, test_fraction=EGOVERSE_TEST_FRACTION):
    """The index as a table: per split its episodes, frames, usable frames and training clips per epoch; then
    the count of every quirk met (QUIRKS) and of every reason an episode was skipped."""
    per, quirks, skipped = {}, Counter(), Counter()
    for group, entry in sorted(index["groups"].items()):
        kind = entry["kind"]
        for name, frames, runs in entry["episodes"]:
            split = _episode_id(group, kind, name, test_fraction).split("/")[0]
            if splits is None or split in splits:
                row = per.setdefault((kind, split), {"episodes": 0, "frames": 0, "usable": 0, "runs": []})
                row["episodes"] += 1
                row["frames"] += frames
                row["usable"] += sum(b - a for a, b in runs)
                row["runs"] += [b - a for a, b in runs]
        quirks.update(entry["quirks"])
        skipped.update(reason.split(" (")[0] for _, reason in entry["skipped"])
    lines = [f"{'dataset':10}{'split':8}{'episodes':>10}{'frames':>12}{'usable':>12}{'clips/epoch':>13}"
             f"   ({clip_len}-frame clips, 2 per 30-frame window)"]
    for (kind, split), row in sorted(per.items()):
        clips = len(ClipSampler(row["runs"], clip_len).plan()) if row["runs"] else 0
        lines.append(f"{kind:10}{split:8}{row['episodes']:>10}{row['frames']:>12}{row['usable']:>12}{clips:>13}")
    lines.append("quirks met (all splits):")
    lines += [f"  {quirks[q]:>8}  {q}: {QUIRKS[q]}" for q in QUIRKS if quirks[q]] or ["         none"]
    lines.append(f"skipped episodes: {sum(skipped.values())}")
    lines += [f"  {n:>8}  {reason}" for reason, n in skipped.most_common()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line

def split_names(text):
    """'part1,part2' (or None) -> ('part1', 'part2') (or None): the --splits value of every command."""
    return tuple(x for x in text.split(",") if x) if text else None


def int_at_least(lo, hi=None):
    """An argparse type: an integer in [lo, hi], so a bad count or size is a usage error before any work."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            most = f" and at most {hi}" if hi is not None else ""
            raise argparse.ArgumentTypeError(f"{value} must be at least {lo}{most}")
        return value
    return parse


def number_above(lo, inclusive=False):
    """An argparse type: a finite number > lo (>= lo when inclusive): a rate, a time, a guidance scale."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and (value >= lo if inclusive else value > lo)):
            raise argparse.ArgumentTypeError(f"{value} must be finite and {'>=' if inclusive else '>'} {lo:g}")
        return value
    return parse


def device_name(text):
    """An argparse type: a torch device that exists here (cpu, cuda, cuda:N)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices")
    return text


def int_multiple(k):
    """An argparse type: a positive multiple of k (a frame size the tokenizer and the patches divide)."""
    def parse(text):
        value = int_at_least(k)(text)
        if value % k:
            raise argparse.ArgumentTypeError(f"{value} must be a multiple of {k}")
        return value
    return parse


def clip_length(text):
    """An argparse type: frames per clip, 4k + 1 >= 5 (the video tokenizer's 4x temporal compression)."""
    value = int_at_least(5)(text)
    if (value - 1) % 4:
        raise argparse.ArgumentTypeError(f"{value} is not 4k + 1 (5, 9, 13, ...)")
    return value


def fraction(text):
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def check_writable(path, flag, folder=False):
    """Refuse an output location before the work that fills it: a file where a folder goes or the reverse, a
    missing parent folder, a folder we cannot create files in (a real try: root ignores permission bits)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path} is a file, not a folder: choose a folder")
    if not folder and path.is_dir():
        raise DataError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'stats.json'}")
    where = path if folder else path.parent
    while folder and not where.exists() and where != where.parent:  # a new cache folder: its nearest ancestor
        where = where.parent
    if not where.is_dir():
        raise DataError(f"{flag} {path}: {where} is not an existing folder; create it first")
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write in {where} ({e.strerror}); choose another place") from None


def _add_split_flags(q, default, default_help):
    q.add_argument("--splits", default=default, help="comma-separated splits (EgoDex: part1..part5, test, extra; "
                   f"EgoVerse: train, test); default: {default_help}")
    q.add_argument("--test-fraction", type=fraction, default=EGOVERSE_TEST_FRACTION,
                   help="EgoVerse episodes outside train/ or test/ folders: the fraction hashed into `test` "
                        "(by the SHA-256 of each name: deterministic, stable when episodes are added)")


def main(argv=None):
    p = argparse.ArgumentParser(description="DexAC-WM data: index a dataset, its action statistics, a latent "
                                            "cache", epilog="synthetic data: python synthetic.py --out DIR (--quirks: "
                                                            "every real-data quirk); decoding speed: python bench.py "
                                                            "decode")
    sub = p.add_subparsers(dest="cmd")
    q = sub.add_parser("index", help="index (or refresh the index of) a dataset root; prints what it found: "
                                     "episodes, frames, clips and every quirk met, per split")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--workers", type=int_at_least(0), default=8, help="processes probing episodes (0: in-process)")
    q.add_argument("--rebuild", action="store_true", help="ignore the cached index and probe everything")
    q.add_argument("--cache", default=None, help="index file (default: ROOT/.dexac_index.json)")
    q.add_argument("--clip-len", type=clip_length, default=13, help="frames per clip (4k + 1), for the counts")
    _add_split_flags(q, None, "all")
    q = sub.add_parser("stats", help="per-dimension action mean/std over the training split")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--out", default="stats.json", help="output JSON")
    _add_split_flags(q, ",".join(TRAIN_SPLITS), ",".join(TRAIN_SPLITS))
    q.add_argument("--workers", type=int_at_least(0), default=8, help="processes reading episodes (0: in-process)")
    q.add_argument("--max-episodes", type=int_at_least(1), default=None,
                   help="random subset of this many episodes")
    q.add_argument("--seed", type=int, default=0, help="seed of the subset")
    q = sub.add_parser("cache", help="encode clips once into latent shards (resumable; run under torchrun "
                                     "to split the work across ranks)")
    q.add_argument("--data", required=True, help="EgoDex or EgoVerse root")
    q.add_argument("--out", required=True, help="cache directory (an interrupted run resumes there)")
    _add_split_flags(q, None, f"{','.join(TRAIN_SPLITS)}, with --eval {','.join(EVAL_SPLITS)}")
    q.add_argument("--tokenizer", default="wan2.1", choices=["wan2.1", "sdxl", "pixel"],
                   help="video tokenizer: wan2.1 (the Cosmos backbone's), sdxl (IRASim's, per frame: the posterior "
                        "mean is cached), pixel")
    q.add_argument("--vae-weights", default=None,
                   help="the VAE's weights: a local file or a Hub repo id (see tokenizer.py; default: "
                        "nvidia/Cosmos-Predict2.5-2B's Wan2.1 VAE, or sdxl's)")
    q.add_argument("--dino", default=None, help="also cache DINOv3 features of frame 0: a Hub repo id or file")
    q.add_argument("--eval", action="store_true", help="cache the evaluation clips instead of training clips")
    q.add_argument("--epochs", type=int_at_least(1), default=1, help="epochs of random clip starts to cache")
    q.add_argument("--seed", type=int, default=0, help="seed of the clip plan (as in training)")
    q.add_argument("--clip-len", type=int_at_least(2), default=13,
                   help="frames per clip: 4k + 1 for wan2.1 and pixel (13: the paper's), any for sdxl (IRASim: 16)")
    q.add_argument("--height", type=int_multiple(16), default=DEFAULT_SIZE[0],
                   help="frame height, a multiple of 16")
    q.add_argument("--width", type=int_multiple(16), default=DEFAULT_SIZE[1], help="frame width, a multiple of 16")
    q.add_argument("--shard-size", type=int_at_least(1), default=256, help="clips per shard file")
    q.add_argument("--batch", type=int_at_least(1), default=8, help="clips per encoder batch")
    q.add_argument("--workers", type=int_at_least(0), default=4, help="data loading processes (0: in-process)")
    q.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="encoder device")
    q.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="stored latent/feature dtype")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _run(p, args)


def _run(p, args):
    if args.cmd == "index":
        index = build_index(args.data, args.workers, args.rebuild, args.cache)
        load_index(args.data, split_names(args.splits), cache=args.cache, test_fraction=args.test_fraction)
        print(index_table(index, split_names(args.splits), args.clip_len, args.test_fraction))
    elif args.cmd == "stats":
        check_writable(args.out, "--out")  # before the statistics, which take hours on the real data
        stats = compute_stats(args.data, split_names(args.splits), args.workers, args.max_episodes, args.seed,
                              args.test_fraction)
        hub.atomic_write(args.out, json.dumps(stats, indent=1))
        std = np.array(stats["std"])
        fam = ", ".join(f"{k} {std[list(v)].mean():.2e}" for k, v in C.ACTION_FAMILIES.items())
        print(f"{args.out}: {stats['count']} actions from {stats['episodes']} episodes "
              f"({len(stats['skipped'])} skipped); mean std per family: {fam}")
    elif args.cmd == "cache":
        if args.tokenizer != "sdxl" and (args.clip_len < 5 or (args.clip_len - 1) % 4):
            p.error(f"argument --clip-len: {args.clip_len} is not 4k + 1 (5, 9, 13, ...), as the {args.tokenizer} "
                    f"tokenizer's 4x temporal compression needs (any length >= 2 for sdxl)")
        _cache_command(args)
    else:
        p.print_help()


def _cache_command(args):
    check_writable(args.out, "--out", folder=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else args.device
    weights = args.vae_weights or {"wan2.1": "nvidia/Cosmos-Predict2.5-2B", "sdxl": "sdxl"}.get(args.tokenizer)
    vae = tok.build_tokenizer(args.tokenizer, **({"weights": weights} if args.tokenizer != "pixel" else {}))
    vae = vae.to(device).eval()
    dino = None
    if args.dino:
        dino = semantic.load_dino(args.dino, device=device)
    written = cache_clips(args.data, args.out, vae, tokenizer_name=args.tokenizer, clip_len=args.clip_len,
                          size=(args.height, args.width), train=not args.eval, splits=split_names(args.splits),
                          test_fraction=args.test_fraction, seed=args.seed, epochs=args.epochs,
                          shard_size=args.shard_size, batch=args.batch, workers=args.workers, device=device,
                          dtype=hub.DTYPES[args.dtype], dino=dino, rank=rank, world_size=world)
    print(f"rank {rank}: wrote {len(written)} shards to {args.out}")


if __name__ == "__main__":
    hub.run_main(main)
