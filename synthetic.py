"""
Synthetic egocentric data in the EgoDex format: the embedded default dataset, no download.

    python synthetic.py --out data/synthetic        # 4 tasks x (3 train + 1 test) episodes of 90 frames

A procedural scene that data.py reads exactly like EgoDex (`<split>/<task>/<k>.hdf5` + `<k>.mp4`): ARKit-like
world (y up, table top at y = 0.8 m), two hands of a wrist SE(3) plus 5 fingers of 3 flexing segments, and a
head camera 0.65 m above the table that sways. Wrist and head move a lot, fingers little and slowly, as in
real egocentric data. The 12 evaluation keypoints (wrists and fingertips) are drawn as coloured markers, and
`detect_keypoints` finds them again in any frame: the PCK detector of evaluate.py on this data.

What it deliberately departs from: the hands are cylinders and spheres, not meshes; every joint rotation
equals its wrist's; confidences are random in [0.6, 1]; one task (wipe_table) writes old-style files without
the LLM description attributes, as some EgoDex files are.
"""

import argparse
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

import conditioning as C
import data

# the colours of the 12 evaluation keypoints' markers, in data.KEYPOINT_NAMES order
KEYPOINT_COLORS = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 255, 128), (255, 0, 128), (0, 128, 255), (128, 255, 0)],
    np.uint8)


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
        for f, finger in enumerate(C.FINGERS):
            d = np.array([np.sin(_FAN[f]), np.cos(_FAN[f]), 0]) * mirror
            p = np.repeat((_KNUCKLE[f] * mirror)[None], n, 0)
            for k, name in enumerate(("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")):
                if k:
                    theta = flex[:, f:f + 1] * k  # cumulative curl towards the palm (-z)
                    p = p + _SEGMENTS[f, k - 1] * (np.cos(theta) * d - np.sin(theta) * np.array([0, 0, 1]))
                world = np.einsum("tij,tj->ti", W[:, :3, :3], p) + W[:, :3, 3]
                joints[f"{side}{finger}{name}"] = _pose(R, world)  # joint rotation = wrist's (synthetic)
    return joints, data._track_from_joints(joints)


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


def render_frame(joints, i, K, hw, obj_color, *, marker_scale=1.0):
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
    world2cam = C.se3_inverse(cam)

    def px(p):
        c = world2cam[:3, :3] @ p + world2cam[:3, 3]
        return (K @ c)[:2] / c[2], c[2]

    markers = []
    for side in C.HANDS:
        wrist, z = px(joints[f"{side}Hand"][i, :3, 3])
        markers.append(wrist)
        for finger in C.FINGERS:
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
    conf = {j: rng.uniform(0.6, 1.0, frames) for j in data.KEYPOINT_JOINTS}
    attrs = {"task": task, "description": desc, "llm_type": llm_type, "which_llm_description": which,
             "llm_description": llm1, "llm_description2": llm2}
    write_egodex_hdf5(d / f"{k}.hdf5", joints, K, attrs, conf)
    frames = (render_frame(joints, i, K, size, color, marker_scale=marker_scale) for i in range(frames))
    data.write_video(d / f"{k}.mp4", frames)


def write_synthetic(out, *, tasks=4, episodes=3, test_episodes=1, frames=90, size=(180, 320), seed=0,
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
    list(tqdm(data.parallel_map(_synth_episode, jobs, workers, 1), total=len(jobs), desc="synth"))
    return Path(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a small synthetic dataset in the EgoDex format.")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--tasks", type=int, default=4, help=f"number of tasks (at most {len(SYNTH_TASKS)})")
    p.add_argument("--episodes", type=int, default=3, help="training episodes per task (split part1)")
    p.add_argument("--test-episodes", type=int, default=1, help="test episodes per task (split test)")
    p.add_argument("--frames", type=int, default=90, help="frames per episode (30 fps)")
    p.add_argument("--height", type=int, default=180, help="native frame height")
    p.add_argument("--width", type=int, default=320, help="native frame width")
    p.add_argument("--workers", type=int, default=2, help="processes rendering episodes (0: in-process)")
    p.add_argument("--zoom", type=float, default=1.0, help="focal length / EgoDex's (> 1: larger hands)")
    p.add_argument("--marker-scale", type=float, default=1.0, help="keypoint marker radius / the default's")
    args = p.parse_args(argv)
    if args.zoom <= 0 or args.marker_scale <= 0:
        p.error("--zoom and --marker-scale must be positive (1: EgoDex's view and markers)")
    t0 = time.time()
    write_synthetic(args.out, tasks=args.tasks, episodes=args.episodes, test_episodes=args.test_episodes,
                    frames=args.frames, size=(args.height, args.width), seed=args.seed, workers=args.workers,
                    zoom=args.zoom, marker_scale=args.marker_scale)
    print(f"wrote a synthetic EgoDex-format dataset to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
