"""
Synthetic egocentric data in the EgoDex format: the embedded default dataset, no download.

    python synthetic.py --out data/synthetic        # 4 tasks x (3 train + 1 test) episodes of 90 frames
    python synthetic.py --out /tmp/quirks --quirks  # 19 small episodes, each with one real-data quirk
    python synthetic.py --out data/fingers --zoom 2 --marker-scale 2 --finger-width 1.5 --finger-tasks 2

A procedural scene that data.py reads exactly like EgoDex (`<split>/<task>/<k>.hdf5` + `<k>.mp4`): ARKit-like
world (y up, table top at y = 0.8 m), two hands of a wrist SE(3) plus 5 fingers of 3 flexing segments, and a
head camera 0.65 m above the table that sways. Wrist and head move a lot, fingers little and slowly, as in
real egocentric data; the optional finger tasks (FINGER_TASKS) invert this: fingers curl widely around still
wrists and head, so that predicting them needs the finger actions. The 12 evaluation keypoints (wrists and
fingertips) are drawn as coloured markers, and `detect_keypoints` finds them again in any frame: the PCK
detector of evaluate.py on this data. Every episode
file written here carries the root attribute SYNTHETIC_ATTR (`is_synthetic` reads it), so that evaluate.py refuses
the marker detector on real video, where it would find nothing or stray look-alike pixels.

What it deliberately departs from: the hands are cylinders and spheres, not meshes; every joint rotation
equals its wrist's; confidences are random in [0.6, 1]; one task (wipe_table) writes old-style files without
the LLM description attributes, as some EgoDex files are. Two measures of a written root say whether it holds
the paper's regime at a given resolution: `action_magnitudes` (how far each action family moves) and
`detector_recall` (the share of keypoints the marker detector finds in the decoded, resized frames).

The quirks root (`write_quirks`, `--quirks`) mixes EgoDex episodes (`part1`, `extra`, `test`) and flat
EgoVerse Zarr episodes (`write_egoverse_zarr`), each carrying exactly one quirk of the real datasets
(DESIGN.md section 11): an empty camera/intrinsic, no or low confidences over frozen hands, videos one or
three frames short or unevenly timed, hands missing as all-zero (Mecka) or 1e9 (Aria) rows, the legacy raw
Aria keypoint layout, dropped frames leaving a time gap, a placeholder prompt, schema v3.1 calibration, no
intrinsics, no head pose. Its manifest names each episode's quirk, where it sits and its motion's seed.
"""

import argparse
import io
import shutil
import time
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import conditioning as C
import data
import hub

# the colours of the 12 evaluation keypoints' markers, in data.KEYPOINT_NAMES order
KEYPOINT_COLORS = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 255, 128), (255, 0, 128), (0, 128, 255), (128, 255, 0)],
    np.uint8)
# the root attribute (HDF5 file, Zarr group) that marks an episode as ours: frames with the markers above
SYNTHETIC_ATTR, SYNTHETIC_MARK = "dexac_wm_synthetic", "synthetic.py: keypoints drawn as colour markers"


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
# finger-dominant tasks (write_synthetic's finger_tasks): wrists and head nearly still (FINGER_STILL of their
# usual motion), fingers curling and uncurling widely and fast, each finger with its own phase and frequency,
# so that the next frames depend on the finger actions; fields as SYNTH_TASKS, then curl (mean angle, Hz)
FINGER_STILL = 0.03
FINGER_TASKS = (
    ("curl_fingers", "", "", "Curl and uncurl the fingers of both hands.", "", "curl fingers", (80, 80, 120),
     (FINGER_STILL, FINGER_STILL, 5.0), (0.6, 0.8)),
    ("tap_fingers", "", "", "Tap the fingers one after another.", "", "tap fingers", (120, 90, 60),
     (FINGER_STILL, FINGER_STILL, 3.5), (0.45, 1.3)),
)
_KNUCKLE = np.array([[-0.030, 0.030, 0], [-0.032, 0.085, 0], [-0.011, 0.092, 0], [0.011, 0.088, 0],
                     [0.031, 0.078, 0]])  # right hand, wrist frame (x lateral, y along fingers, z back)
_FAN = np.array([-0.95, -0.32, -0.08, 0.16, 0.42])  # finger directions in the palm plane (rad)
_SEGMENTS = np.array([[0.035, 0.030, 0.025]] + [[0.042, 0.026, 0.021]] * 4)
_CHAIN = ("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")  # each finger's joints, palm to tip


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


def synth_track(rng, n, fps=30, motion=(1.0, 1.0, 1.0), head=1.0, curl=(0.3, 0.25)):
    """-> ({EgoDex joint: (n, 4, 4)}, track): large wrist/head motion, small slow finger flexion;
    motion scales the left wrist, right wrist and finger amplitudes (the task's style), head the head's sway;
    curl = (mean joint angle in rad, Hz) of the finger flexion, whose amplitude is 0.1 rad * motion[2]."""
    t = np.arange(n) / fps

    def wave(amp, hz):  # (n, len(amp)) sinusoids with a random phase and +-20% frequency per column
        return amp * np.sin(2 * np.pi * hz * rng.uniform(0.8, 1.2, len(amp)) * t[:, None]
                            + rng.uniform(0, 2 * np.pi, len(amp)))

    eye = np.array([0, 1.45, 0.05]) + wave(np.array([0.05, 0.015, 0.03]) * head, 0.3)
    target = np.array([0, 0.8, -0.42]) + wave(np.array([0.12, 0.0, 0.06]) * head, 0.25)
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
        flex = curl[0] + wave(np.full(5, 0.1 * motion[2]), curl[1])  # (n, 5) per-finger joint angle
        mirror = np.array([sign, 1, 1])
        for f, finger in enumerate(C.FINGERS):
            d = np.array([np.sin(_FAN[f]), np.cos(_FAN[f]), 0]) * mirror
            p = np.repeat((_KNUCKLE[f] * mirror)[None], n, 0)
            for k, name in enumerate(_CHAIN):
                if k:
                    theta = flex[:, f:f + 1] * k  # cumulative curl towards the palm (-z)
                    p = p + _SEGMENTS[f, k - 1] * (np.cos(theta) * d - np.sin(theta) * np.array([0, 0, 1]))
                world = np.einsum("tij,tj->ti", W[:, :3, :3], p) + W[:, :3, 3]
                joints[f"{side}{finger}{name}"] = _pose(R, world)  # joint rotation = wrist's (synthetic)
    return joints, data._track_from_joints(joints)


def _segment(img, a, b, r, color):
    """Draw a thick segment a -> b (pixels, (u, v)) with radius r."""
    u0, v0 = np.floor(np.minimum(a, b) - r).astype(int)
    u1, v1 = np.ceil(np.maximum(a, b) + r + 1).astype(int)
    u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1, img.shape[1]), min(v1, img.shape[0])  # np.clip is slow
    if u1 <= u0 or v1 <= v0:
        return
    v, u = np.arange(v0, v1)[:, None] - a[1], np.arange(u0, u1)[None] - a[0]  # relative to a
    ab = b - a
    s = np.minimum(np.maximum((u * ab[0] + v * ab[1]) / max(ab @ ab, 1e-9), 0), 1)
    mask = (u - s * ab[0]) ** 2 + (v - s * ab[1]) ** 2 <= r * r
    img[v0:v1, u0:u1][mask] = color


def render_frame(joints, i, K, hw, obj_color, *, marker_scale=1.0, finger_width=1.0):
    """The frame seen by camera pose joints['camera'][i]: checkered table, an object, two hands (finger radius
    8 mm * finger_width); wrist and fingertip markers in KEYPOINT_COLORS (radius 3 * marker_scale px at 320
    wide), drawn last so they are never occluded."""
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
    world2cam = C.se3_inverse(cam)

    def px(p):
        c = world2cam[:3, :3] @ p + world2cam[:3, 3]
        return (K @ c)[:2] / c[2], c[2]

    markers = []
    for side in C.HANDS:
        wrist, z = px(joints[f"{side}Hand"][i, :3, 3])
        markers.append(wrist)
        for finger in C.FINGERS:
            chain = [px(joints[f"{side}{finger}{n}"][i, :3, 3])[0] for n in _CHAIN]
            _segment(img, wrist, chain[0], 0.022 * K[0, 0] / z, (205, 160, 135))  # palm
            for a, b in zip(chain[:-1], chain[1:]):
                _segment(img, a, b, 0.008 * finger_width * K[0, 0] / z, (220, 175, 150))
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


def is_synthetic(path):
    """Whether the episode at path (an EgoDex .hdf5 file or an EgoVerse .zarr folder) was written here: its root
    attribute SYNTHETIC_ATTR. Real data, and files written before the mark existed, read False."""
    if Path(path).suffix == ".zarr":  # zarr is there: data.py has read this episode already
        import zarr
        return zarr.open_group(str(path), mode="r").attrs.get(SYNTHETIC_ATTR) == SYNTHETIC_MARK
    with h5py.File(path, "r") as f:
        return f.attrs.get(SYNTHETIC_ATTR) == SYNTHETIC_MARK


def write_egodex_hdf5(path, joints, K, attrs, confidence=None):
    """One EgoDex HDF5 file; K may be (0, 3), as camera/intrinsic is in EgoDex's part1 files;
    confidence None writes no `confidences` group (it is optional); attrs of value None are left out, and
    {SYNTHETIC_ATTR: None} leaves out the mark of our data (a file that looks like real EgoDex)."""
    with h5py.File(path, "w") as f:
        for name, T in joints.items():
            f[f"transforms/{name}"] = T.astype(np.float32)
        for name, c in (confidence or {}).items():
            f[f"confidences/{name}"] = c.astype(np.float32)
        f["camera/intrinsic"] = np.asarray(K, np.float32)
        for k, v in {SYNTHETIC_ATTR: SYNTHETIC_MARK, **attrs}.items():
            if v is not None:
                f.attrs[k] = v


def _egodex_K(size, zoom=1.0):
    """EgoDex's constant K (fx = 736.6 at 1920 wide, principal point at the centre) for frames of `size`."""
    H, W = size
    f = 736.6339 * zoom * W / 1920
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])


def _synth_episode(job):
    out, split, t, k, frames, size, seed, zoom, marker_scale, finger_width = job
    task, llm_type, which, llm1, llm2, desc, color, motion, *curl = (SYNTH_TASKS + FINGER_TASKS)[t]
    rng = np.random.default_rng([seed, t, k, split == "test"])  # a finger task's t: after SYNTH_TASKS
    K = _egodex_K(size, zoom)
    still = dict(head=FINGER_STILL, curl=curl[0]) if curl else {}
    joints, _ = synth_track(rng, frames, motion=motion, **still)
    d = Path(out) / split / task
    d.mkdir(parents=True, exist_ok=True)
    conf = {j: rng.uniform(0.6, 1.0, frames) for j in data.KEYPOINT_JOINTS}
    attrs = {"task": task, "description": desc, "llm_type": llm_type, "which_llm_description": which,
             "llm_description": llm1, "llm_description2": llm2}
    write_egodex_hdf5(d / f"{k}.hdf5", joints, K, attrs, conf)
    frames = (render_frame(joints, i, K, size, color, marker_scale=marker_scale, finger_width=finger_width)
              for i in range(frames))
    data.write_video(d / f"{k}.mp4", frames)


def _dataset_entry(p):
    """Whether p can be part of a dataset root: a split folder, an EgoVerse episode, the statistics, the index."""
    splits = data.TRAIN_SPLITS + data.EVAL_SPLITS + ("extra",)
    return ((p.is_dir() and (p.name in splits or p.suffix == ".zarr"))
            or (p.is_file() and p.name.split(".tmp")[0] in ("stats.json", ".dexac_index.json")))


def prepare_out(out, overwrite=False):
    """Refuse to write into a non-empty out (old episodes would mix with the new ones, its statistics and index
    go stale) unless overwrite: then delete out first, which must hold nothing but a dataset."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a folder")
    old = sorted(out.iterdir()) if out.is_dir() else []
    if old and not overwrite:
        raise ValueError(f"--out {out} is not empty: choose a new folder, or pass --overwrite to replace the "
                         f"dataset there (its episodes, stats.json and index)")
    stranger = next((p for p in old if not _dataset_entry(p)), None)
    if stranger is not None:  # --overwrite deletes the whole folder: never one that holds anything else
        raise ValueError(f"--out {out} holds {stranger.name}, which is not part of a dataset: --overwrite deletes "
                         f"the whole folder, so choose a new one")
    if old:
        shutil.rmtree(out)


def write_synthetic(out, *, tasks=4, episodes=3, test_episodes=1, frames=90, size=(180, 320), seed=0,
                    workers=2, zoom=1.0, marker_scale=1.0, finger_tasks=0, finger_width=1.0, overwrite=False):
    """Write `out/part1/<task>/<k>.{hdf5,mp4}` (train) and `out/test/...`; deterministic by seed.
    K keeps EgoDex's field of view (fx = 736.6 * W / 1920, principal point at the centre); zoom > 1 narrows
    it (hands fill more of the frame) and marker_scale enlarges the keypoint markers, so that both stay
    visible when the frames are downsampled far below EgoDex's size (miniature.py). finger_tasks adds that
    many FINGER_TASKS (fingers curling widely, wrists and head nearly still), with as many episodes as the
    others; finger_width thickens every finger so that its curl stays visible in small frames. The defaults
    write the same files as before these two existed. A non-empty out is refused unless overwrite, which
    deletes the old dataset first (prepare_out)."""
    if zoom <= 0 or marker_scale <= 0 or finger_width <= 0:
        raise ValueError(f"zoom ({zoom}), marker_scale ({marker_scale}) and finger_width ({finger_width}) "
                         f"must be positive; 1 is EgoDex's view and the default hand")
    if not 0 <= finger_tasks <= len(FINGER_TASKS):
        raise ValueError(f"finger_tasks ({finger_tasks}) must be in [0, {len(FINGER_TASKS)}]")
    if not 1 <= tasks <= len(SYNTH_TASKS) or episodes < 0 or test_episodes < 0 or episodes + test_episodes < 1:
        raise ValueError(f"tasks ({tasks}) must be in [1, {len(SYNTH_TASKS)}], episodes ({episodes}) and "
                         f"test_episodes ({test_episodes}) >= 0, and at least one episode in all")
    if frames < 2 or min(size) < 16 or size[0] % 2 or size[1] % 2:
        raise ValueError(f"frames ({frames}) must be >= 2 (an action needs two), size {tuple(size)} even and "
                         f">= 16 (H.264 yuv420p)")
    prepare_out(out, overwrite)
    ids = list(range(tasks)) + list(range(len(SYNTH_TASKS), len(SYNTH_TASKS) + finger_tasks))
    jobs = [(str(out), split, t, k, frames, tuple(size), seed, zoom, marker_scale, finger_width) for t in ids
            for split, count in (("part1", episodes), ("test", test_episodes)) for k in range(count)]
    list(tqdm(data.parallel_map(_synth_episode, jobs, workers, 1), total=len(jobs), desc="synth"))
    return Path(out)


# ------------------------------------------------------------------------------------------------
# Measures of a written root: how large each action family moves, and what the marker detector finds

def _episodes(root, splits, tasks, max_episodes=None):
    """The indexed runs of root's splits, only those of the named tasks (EgoDex ids <split>/<task>/<k>)."""
    episodes = data.load_index(root, splits)[0]
    episodes = [e for e in episodes if tasks is None or e.id.split("/")[1] in tasks]
    if not episodes:
        raise ValueError(f"no episodes of splits {splits} and tasks {tasks} in {root}")
    return episodes[:max_episodes]


def action_magnitudes(root, splits=None, tasks=None):
    """-> {family of C.ACTION_FAMILIES: (dims,) median over every transition of |raw action - still action|},
    in the units of the raw action: metres per frame (translations, fingertip deltas in the wrist frame) and
    6D entries. splits None: all; tasks (names) keeps only their episodes. How far each family is from
    standing still: on the default tasks the wrists and head move about ten times as far as the fingertips."""
    actions = np.concatenate([C.compute_actions(data.read_track(e).track)
                              for e in _episodes(root, splits, tasks)])  # (N, 57)
    dev = np.median(np.abs(actions - C.still_actions(1)), 0)
    return {family: dev[list(idx)] for family, idx in C.ACTION_FAMILIES.items()}


def detector_recall(root, size, split="test", max_episodes=None, radius=1.5, tasks=None):
    """-> {"all", "wrists", "fingertips": fraction of ground-truth keypoints detect_keypoints finds within
    radius pixels, "keypoints": how many were counted} on the H.264-decoded frames of the split's episodes
    (the first max_episodes; tasks: only theirs) resized to size (H, W). The ground truth is data.load_clip's,
    as evaluate.py's PCK reads it: the keypoints projected with the episode's intrinsics scaled to size,
    counted where inside the frame and confident."""
    hits, counted = np.zeros(len(KEYPOINT_COLORS)), np.zeros(len(KEYPOINT_COLORS))  # per keypoint
    for e in _episodes(root, (split,), tasks, max_episodes):
        s = data.load_clip(e, 0, e.frames, size)
        found = np.stack([detect_keypoints(f) for f in s["video"].permute(1, 2, 3, 0).numpy()])  # (T, 12, 2)
        valid = s["keypoint_valid"].numpy()
        near = np.linalg.norm(found - s["keypoints"].numpy(), axis=-1) <= radius  # NaN: not found
        hits += (near & valid).sum(0)
        counted += valid.sum(0)
    wrist = np.array([n.endswith("wrist") for n in data.KEYPOINT_NAMES])
    frac = lambda m: float(hits[m].sum() / max(counted[m].sum(), 1))  # noqa: E731
    return {"all": frac(slice(None)), "wrists": frac(wrist), "fingertips": frac(~wrist),
            "keypoints": int(counted.sum())}


# ------------------------------------------------------------------------------------------------
# EgoVerse episodes (Zarr v3), and a root of every real-data quirk (DESIGN.md section 11)

# 21 keypoints per hand as joint suffixes; "Palm" is the palm centre, the mean of wrist and middle knuckle
_MANO_21 = ("Hand",) + tuple(f + j for f in C.FINGERS for j in _CHAIN)
_ARIA_21 = (tuple(f + "Tip" for f in C.FINGERS) + ("Hand", "ThumbIntermediateBase", "ThumbIntermediateTip")
            + tuple(f + j for f in C.FINGERS[1:] for j in _CHAIN[:3]) + ("Palm",))


def _scaled_K(K640, size):
    """A 640-wide camera's K (fx = fy, principal point at the centre) for frames of `size`."""
    H, W = size
    f = K640[0, 0] * W / 640
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])


def _quat_wxyz(R):
    """(..., 3, 3) rotations -> (..., 4) unit quaternions w, x, y, z with w >= 0. Shepperd's method: the
    matrix M = 4 q q^T is linear in R; its row k is 4 q_k q, and the row with the largest diagonal 4 q_k^2
    (>= 1) is normalized, so nothing is divided by a small number, even near 180 degrees."""
    R = np.asarray(R, np.float64)
    xx, xy, xz, yx, yy, yz, zx, zy, zz = np.moveaxis(R.reshape(R.shape[:-2] + (9,)), -1, 0)
    M = np.array([[1 + xx + yy + zz, zy - yz, xz - zx, yx - xy],
                  [zy - yz, 1 + xx - yy - zz, xy + yx, xz + zx],
                  [xz - zx, xy + yx, 1 - xx + yy - zz, yz + zy],
                  [yx - xy, xz + zx, yz + zy, 1 - xx - yy + zz]])  # (4, 4, ...)
    M = np.moveaxis(M, (0, 1), (-2, -1))  # (..., 4, 4)
    k = np.diagonal(M, axis1=-2, axis2=-1).argmax(-1)
    q = np.take_along_axis(M, k[..., None, None], -2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def _pose7(T):
    """(T, 4, 4) -> (T, 7) position xyz + quaternion wxyz, EgoVerse's pose rows."""
    return np.concatenate([T[:, :3, 3], _quat_wxyz(T[:, :3, :3])], 1)


def _keypoints21(joints, side, order):
    """-> (n, 63) world keypoints of one hand in `order` (_MANO_21 or _ARIA_21), xyz flattened."""
    def point(name):
        if name == "Palm":
            return (point("Hand") + point("MiddleFingerKnuckle")) / 2
        return joints[f"{side}{name}"][:, :3, 3]
    return np.stack([point(name) for name in order], 1).reshape(-1, 63)


def _jpeg(img, quality=95):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _import_zarr():
    """zarr, imported only when EgoVerse episodes are written: it is an optional dependency."""
    try:
        import zarr
    except ImportError:
        raise ImportError("writing EgoVerse episodes needs the optional zarr package: "
                          "pip install 'zarr>=3'") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"writing EgoVerse episodes needs Zarr v3, found zarr {zarr.__version__}: "
                          "pip install 'zarr>=3'")
    return zarr


def write_egoverse_zarr(path, joints, K, size, *, attrs, layout="mano", aria_keypoints=False, keep=None,
                        pad=3, color=(90, 90, 90), marker_scale=1.0, head_pose=True, intrinsics="attrs"):
    """One EgoVerse episode, a Zarr v3 group `<name>.zarr`, from synth_track's joints -> what was written.
    layout "mano" stores MANO-21 keypoints (current converters), "aria" the raw Aria layout (legacy Aria
    episodes: tips 0-4, wrist 5, palm centre 20); aria_keypoints adds `obs_aria_keypoints` in that layout.
    keep: the original frame indices kept (an older Aria converter dropped frames, leaving time gaps).
    Every array holds `pad` rows past total_frames (zeros; the JPEGs repeat the last frame), as real
    writers pad to a chunk boundary. intrinsics: "attrs" (`intrinsics.front_1`), "calibration" (schema
    v3.1's `calibration.cameras.front_1`) or None; attrs extend or override the root attributes, None
    leaves a key out ({SYNTHETIC_ATTR: None}: no mark of our data, an episode that looks real)."""
    zarr = _import_zarr()
    if layout not in ("mano", "aria"):
        raise ValueError(f"layout must be 'mano' or 'aria', not {layout!r}")
    if layout == "aria" and aria_keypoints:
        raise ValueError("legacy Aria episodes (layout 'aria') have no obs_aria_keypoints: "
                         "pass aria_keypoints=False")
    if intrinsics not in ("attrs", "calibration", None):
        raise ValueError(f"intrinsics must be 'attrs', 'calibration' or None, not {intrinsics!r}")
    n = len(joints["camera"])
    keep = np.arange(n) if keep is None else np.asarray(keep, np.int64)
    if keep.ndim != 1 or len(keep) == 0 or (np.diff(keep) <= 0).any() or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep must be increasing frame indices in [0, {n}), got {keep}")
    T, (H, W) = len(keep), size
    root = {"fps": 30, "total_frames": T, "task_name": "", "task_description": "",
            "embodiment": "human_bimanual", SYNTHETIC_ATTR: SYNTHETIC_MARK}
    K34 = np.concatenate([np.asarray(K, np.float64)[:3, :3], np.zeros((3, 1))], 1).tolist()
    if intrinsics == "attrs":
        root["intrinsics"] = {"front_1": K34}
    elif intrinsics == "calibration":
        root["calibration"] = {"reference_frame": "world", "cameras": {"front_1": {
            "K": K34, "resolution": [W, H], "model": "pinhole", "rectified": True}}}
    root = {k: v for k, v in {**root, **attrs}.items() if v is not None}
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update(root)

    def put(key, a, dtype="float64"):
        a = np.concatenate([a[keep], np.zeros((pad,) + a.shape[1:], a.dtype)])  # (T + pad, ...)
        g.create_array(key, shape=a.shape, dtype=dtype)[:] = a

    arrays = {}
    if head_pose:
        arrays["obs_head_pose"] = _pose7(joints["camera"])
    for s in C.HANDS:
        arrays[f"{s}.obs_wrist_pose"] = _pose7(joints[f"{s}Hand"])
        arrays[f"{s}.obs_keypoints"] = _keypoints21(joints, s, _MANO_21 if layout == "mano" else _ARIA_21)
        if aria_keypoints:
            arrays[f"{s}.obs_aria_keypoints"] = _keypoints21(joints, s, _ARIA_21)
    for key, a in arrays.items():
        put(key, a)
    capture_ns = np.round(np.arange(n) * 1e9 / root.get("fps", 30)).astype(np.int64)  # jumps across a gap
    put("obs_rgb_timestamps_ns", capture_ns, "int64")
    jpegs = [_jpeg(render_frame(joints, i, K, size, color, marker_scale=marker_scale)) for i in keep]
    images = g.create_array("images.front_1", shape=(T + pad,), dtype=zarr.dtype.VariableLengthBytes())
    images[:] = np.array(jpegs + jpegs[-1:] * pad, dtype=object)
    return {"path": str(path), "frames": T, "kept": keep, "pad": pad, "size": [H, W], "layout": layout,
            "arrays": sorted(arrays) + ["obs_rgb_timestamps_ns", "images.front_1"], "attrs": root}


def _write_video_pts(path, frames, pts, *, fps=30, crf=12, gop=30):
    """data.write_video with explicit presentation timestamps (in frame periods): an unevenly timed MP4."""
    with av.open(str(path), "w") as c:
        s = data.h264_stream(c, *frames[0].shape[:2], fps=fps, crf=crf, gop=gop)
        s.time_base = Fraction(1, fps)
        for img, t in zip(frames, pts):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _mark_missing(path, side, a, b, value):
    """Overwrite one hand's pose and keypoint rows [a, b) of a written episode as converters mark a lost
    hand: Mecka with all-zero rows (zero quaternion included), Aria with 1e9."""
    g = _import_zarr().open_group(str(path), mode="r+")
    for key in ("obs_wrist_pose", "obs_keypoints", "obs_aria_keypoints"):
        if f"{side}.{key}" in g:
            g[f"{side}.{key}"][a:b] = value


def write_quirks(out, *, frames=48, size=(72, 128), seed=0, overwrite=False):
    """A small mixed root in which each episode carries ONE real-data quirk of DESIGN.md section 11
    -> manifest {episode: {"kind", "path", "quirk", "seed" (synth_track(np.random.default_rng(seed), frames)
    gives its motion), "frames", "size", "K" (the K its frames were rendered with), the quirk's parameters}}.
    EgoDex in `out/{part1,extra,test}/quirky_task/<k>.{hdf5,mp4}`, EgoVerse flat in `out/<name>.zarr`.
    Poses are frozen or hands missing on frames `rows` = [a, b) (ev_gap drops them), with a 13-frame clip
    on each side; the frames always show the true motion."""
    if frames < 39:
        raise ValueError(f"write_quirks needs frames >= 39 (a 13-frame clip on each side of a gap), "
                         f"got {frames}")
    if min(size) < 16 or size[0] % 6 or size[1] % 2:
        raise ValueError(f"write_quirks needs a height that is a multiple of 6 (its 4:3 frames are 4/3 * height "
                         f"wide, even for H.264) and an even width >= 16, got {tuple(size)}")
    prepare_out(out, overwrite)
    out, H = Path(out), size[0]
    a, b = frames // 3, frames // 3 + 6
    wide, aspect43 = (H, size[1]), (H, H * 4 // 3)
    cameras = {"mecka": (wide, _scaled_K(data.VENDOR_K["mecka"][0], wide)),
               "aria": (aspect43, _scaled_K(data.VENDOR_K["aria"][0], aspect43))}
    manifest, color = {}, (90, 90, 90)

    egodex = (  # episode, split, k, quirk
        ("clean", "part1", 0, "none"), ("empty_k", "part1", 1, "empty_intrinsic"),
        ("no_confidences", "part1", 2, "no_confidences"), ("low_confidence", "part1", 3, "tracking_loss"),
        ("video_one_short", "part1", 4, "video_one_short"),
        ("video_three_short", "part1", 5, "video_three_short"),
        ("variable_rate", "part1", 6, "variable_frame_rate"), ("extra_clean", "extra", 0, "extra_split"),
        ("test_clean", "test", 0, "none"))
    K = _egodex_K(wide)
    attrs = {"task": "quirky_task", "description": "quirky task", "llm_type": "", "which_llm_description": "",
             "llm_description": "Pick up the cube and place it next to the bowl.", "llm_description2": ""}
    for e, (name, split, k, quirk) in enumerate(tqdm(egodex, desc="quirks egodex")):
        rng = np.random.default_rng([seed, e])
        joints, _ = synth_track(rng, frames)
        conf = {j: rng.uniform(0.6, 1.0, frames) for j in data.KEYPOINT_JOINTS}
        video = [render_frame(joints, i, K, wide, color) for i in range(frames)]
        d = out / split / "quirky_task"
        d.mkdir(parents=True, exist_ok=True)
        entry = {"kind": "egodex", "path": str(d / f"{k}.hdf5"), "quirk": quirk, "video": str(d / f"{k}.mp4"),
                 "seed": [seed, e], "frames": frames, "size": list(wide), "K": K.tolist()}
        poses, file_K, pts = joints, K, None
        if name == "empty_k":
            file_K = np.zeros((0, 3))
            entry["intrinsic_shape"] = [0, 3]
        elif name == "no_confidences":
            conf = None
        elif name == "low_confidence":  # tracking loss: hand poses frozen at frame a-1, then a jump at b
            poses = {j: T.copy() for j, T in joints.items()}
            for j, T in poses.items():
                if j.startswith(("left", "right")):
                    T[a:b] = T[a - 1]
            for j in data.KEYPOINT_JOINTS:
                conf[j][a:b] = 0.02
            entry.update(rows=[a, b], confidence=0.02)
        elif name.startswith("video_"):
            video = video[:-1] if name == "video_one_short" else video[:-3]
            entry["video_frames"] = len(video)
        elif name == "variable_rate":  # a dropped frame period after frame 10: later frames come one late
            pts = np.arange(frames) + (np.arange(frames) > 10)
            entry.update(skip_after=10, pts=pts.tolist())
        write_egodex_hdf5(d / f"{k}.hdf5", poses, file_K, attrs, conf)
        if pts is None:
            data.write_video(d / f"{k}.mp4", video)
        else:
            _write_video_pts(d / f"{k}.mp4", video, pts)
        manifest[name] = entry

    aria = {"embodiment": "aria_bimanual"}
    # episode, quirk, camera (16:9 Mecka-like or 4:3 Aria), writer keywords, root attrs over ev_clean's
    egoverse = (
        ("ev_clean", "none", "mecka", {}, {}),
        ("ev_mecka_zero", "zero_rows", "mecka", {}, {"embodiment": "mecka_bimanual"}),
        ("ev_missing_1e9", "sentinel_1e9", "aria", {}, aria),
        ("ev_legacy_aria", "legacy_aria_layout", "aria", {"layout": "aria"}, aria),
        ("ev_legacy_aria_mano_twin", "aria_keypoints", "aria", {"aria_keypoints": True}, aria),
        ("ev_gap", "dropped_frames", "aria", {"keep": np.r_[0:a, b:frames]}, aria),
        ("ev_placeholder_prompt", "placeholder_prompt", "aria", {},
         {**aria, "task_name": "fold_clothes", "task_description": "Aria recorded dataset."}),
        ("ev_calibration", "calibration_intrinsics", "aria", {"intrinsics": "calibration"}, aria),
        ("ev_no_intrinsics_aria", "no_intrinsics", "aria", {"intrinsics": None}, aria),
        ("ev_no_head_pose", "no_head_pose", "mecka", {"head_pose": False}, {}))
    missing = {"ev_mecka_zero": ("left", 0.0), "ev_missing_1e9": ("right", 1e9)}  # hand, row value
    seeds = {}
    for e, (name, quirk, camera, kw, extra) in enumerate(tqdm(egoverse, desc="quirks egoverse"), len(egodex)):
        # the twin is the legacy episode's motion as a current converter writes it
        seeds[name] = seeds["ev_legacy_aria"] if name == "ev_legacy_aria_mano_twin" else [seed, e]
        joints, _ = synth_track(np.random.default_rng(seeds[name]), frames)
        hw, ev_K = cameras[camera]
        ev_attrs = {"task_name": "open_jar", "task_description": "Open the jar.",
                    "embodiment": "human_bimanual", **extra}
        info = write_egoverse_zarr(out / f"{name}.zarr", joints, ev_K, hw, attrs=ev_attrs, color=color, **kw)
        entry = {"kind": "egoverse", "path": info["path"], "quirk": quirk, "seed": seeds[name],
                 "frames": frames, "stored_frames": info["frames"], "pad": info["pad"], "size": list(hw),
                 "K": ev_K.tolist()}
        if name in missing:
            side, value = missing[name]
            _mark_missing(out / f"{name}.zarr", side, a, b, value)
            entry.update(hand=side, rows=[a, b], value=value)
        elif name == "ev_gap":
            entry.update(dropped=[a, b], gap_at=a)
        elif name == "ev_legacy_aria_mano_twin":
            entry["twin_of"] = "ev_legacy_aria"
        elif name == "ev_placeholder_prompt":
            entry.update(task_name="fold_clothes", task_description="Aria recorded dataset.")
        manifest[name] = entry
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a small synthetic dataset in the EgoDex format, or with "
                                            "--quirks a root of every real-data quirk (DESIGN.md 11).")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset already in --out (deleted first, with its stats.json and index: "
                        "nothing stale survives); without it a non-empty --out is refused")
    p.add_argument("--tasks", type=data.int_at_least(1), default=4,
                   help=f"number of tasks (at most {len(SYNTH_TASKS)})")
    p.add_argument("--episodes", type=data.int_at_least(1), default=3,
                   help="training episodes per task (split part1)")
    p.add_argument("--test-episodes", type=data.int_at_least(0), default=1,
                   help="test episodes per task (split test)")
    p.add_argument("--frames", type=data.int_at_least(2), default=None,
                   help="frames per episode (30 fps; 90, with --quirks 48)")
    p.add_argument("--height", type=data.int_multiple(2), default=None,
                   help="native frame height, even, >= 16 (180, with --quirks 72 and a multiple of 6)")
    p.add_argument("--width", type=data.int_multiple(2), default=None,
                   help="native frame width, even, >= 16 (320, with --quirks 128; its 4:3 Aria-like ones: 4/3 * "
                        "height)")
    p.add_argument("--workers", type=data.int_at_least(0), default=2,
                   help="processes rendering episodes (0: in-process)")
    p.add_argument("--zoom", type=float, default=1.0, help="focal length / EgoDex's (> 1: larger hands)")
    p.add_argument("--marker-scale", type=float, default=1.0, help="keypoint marker radius / the default's")
    p.add_argument("--finger-tasks", type=data.int_at_least(0, len(FINGER_TASKS)), default=0,
                   help=f"finger-dominant tasks to add (at most {len(FINGER_TASKS)}): fingers curl widely, "
                        f"wrists and head nearly still")
    p.add_argument("--finger-width", type=float, default=1.0, help="finger radius / the default's (8 mm)")
    p.add_argument("--quirks", action="store_true",
                   help="instead write one small mixed root (EgoDex part1/extra/test + flat EgoVerse "
                        "*.zarr, needs zarr>=3) where each episode carries one real-data quirk of DESIGN.md "
                        "section 11: empty K, low or no confidences, short or unevenly timed videos, zero or "
                        "1e9 missing hands, legacy Aria keypoints, time gaps, placeholder prompt, "
                        "calibration or no intrinsics, no head pose; prints its manifest (--tasks, "
                        "--episodes, --workers, --zoom, --marker-scale and the --finger-* flags do not "
                        "apply)")
    args = p.parse_args(argv)
    if not all(0 < v < float("inf") for v in (args.zoom, args.marker_scale, args.finger_width)):
        p.error("--zoom, --marker-scale and --finger-width must be positive and finite (1: EgoDex's view, "
                "the default markers and fingers)")
    if args.tasks > len(SYNTH_TASKS):
        p.error(f"--tasks {args.tasks}: there are {len(SYNTH_TASKS)} synthetic tasks")
    size = (args.height or (72 if args.quirks else 180), args.width or (128 if args.quirks else 320))
    if min(size) < 16:
        p.error(f"--height and --width must be at least 16, got {size[0]}x{size[1]}")
    if args.quirks and size[0] % 6:
        p.error(f"--quirks needs a --height that is a multiple of 6 (its 4:3 frames, 4/3 * height wide, must be "
                f"even), got {size[0]}")
    if args.quirks and args.frames is not None and args.frames < 39:
        p.error("--quirks needs --frames >= 39 (a 13-frame clip on each side of every gap)")
    t0 = time.time()
    if args.quirks:
        manifest = write_quirks(args.out, frames=args.frames or 48, size=size, seed=args.seed,
                                overwrite=args.overwrite)
        kinds = [e["kind"] for e in manifest.values()]
        print(f"wrote {len(manifest)} quirky episodes ({kinds.count('egodex')} EgoDex, "
              f"{kinds.count('egoverse')} EgoVerse) to {args.out} in {time.time() - t0:.1f} s")
        print(f"{'episode':<26} {'kind':<9} quirk")
        for name, e in manifest.items():
            print(f"{name:<26} {e['kind']:<9} {e['quirk']}")
        return
    write_synthetic(args.out, tasks=args.tasks, episodes=args.episodes, test_episodes=args.test_episodes,
                    frames=args.frames or 90, size=size, seed=args.seed,
                    workers=args.workers, zoom=args.zoom, marker_scale=args.marker_scale,
                    finger_tasks=args.finger_tasks, finger_width=args.finger_width, overwrite=args.overwrite)
    print(f"wrote a synthetic EgoDex-format dataset to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    hub.run_main(main)
