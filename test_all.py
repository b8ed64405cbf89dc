"""
The DexAC-WM test suite: CPU only, several minutes on 2 cores.

    python -m pytest -q test_all.py                  # everything (the command CI runs)
    python -m pytest -q test_all.py -m "not slow"    # without subprocesses, torchrun, the Hub cache, training runs
    python -m pytest -q test_all.py -k TestModel     # one concept

Correctness is shown against independent implementations on the same random weights (diffusers for the DiT and
the Wan VAE, transformers for DINOv3 and the text encoder, lpips, scikit-image and scipy for the metrics, analytic
answers for numerics), and every loader is exercised on small random-weight files written in the exact official
layouts, including a local Hugging Face cache read with HF_HUB_OFFLINE=1. Errors a user can cause are each shown
to give one clear message.

Shared builders and fixtures come first (random weights, the reference DiT, DIT_SMALL, Hub-cache helpers, the
DINOv3 and Wan VAE pairs, metric weights, synthetic data, training runs); helpers that serve one class only sit
just above it. Then one class per concept, in the README's reading order:

    TestStructure     imports flow one way through the modules' levels; README's paper-to-code table names real code
    TestHub           where weights come from: local files, the Hub cache offline, gated repos, URLs, missing files
    TestConditioning  DexAC and the MLP baselines: identity at init, every input used, official layout, norm
    TestModel         the DiT against diffusers, official-weight loading, rectified flow: loss, samplers (UniPC against
                      diffusers), schedules, guidance
    TestTokenizer     the Wan2.1 VAE against diffusers, its layouts, chunking and tiling; the pixel tokenizer
    TestSemantic      DINOv3 against transformers, Reason1 text embeddings and their cache, projector, DiT branch
    TestData          the 57-D action, EgoDex/EgoVerse readers, corrupt episodes, clips, sampler, stats, latent cache
    TestRealData      every quirk of the real datasets, one file each; the EgoVerse split; a run on a quirky root
    TestSynthetic     the synthetic dataset's writer and renderer, and the colour-marker detector
    TestIRASim        the IRASim backbone: released layout, adaLN-Zero identity, spatial/temporal alternation,
                      Frame-Ada, the Gaussian diffusion (learned range, VLB, samplers) by hand, IRASim + DexAC
    TestTrain         train.py runs: outputs, exact resume (also 2 torchrun ranks -> 1), SIGTERM, --init, bad flags;
                      the paper preset, text dropout, the official optimizer and schedules
    TestSample        rollouts from an export: seeds and batching, the sample command, DexAC-only exports, DINOv3,
                      the chunk carry (re-encoded uint8 last frame), the negative prompt
    TestEvaluate      PSNR, SSIM, LPIPS, Frechet distances, FID, FVD, latent L2, PCK, the report, the protocol
    TestMiniature     the conditioning-mode experiment end to end at a toy budget (base, fine-tuning, the gap along
                      it), identity at step 0 from a trained base, and its figure labels
    TestAnalysis      the analysis figures from a tiny checkpoint, each figure's numbers against a direct computation
    TestBench         the benchmark command lines run on tiny shapes

Tests marked `slow` launch subprocesses or torchrun, read a local Hub cache with HF_HUB_OFFLINE=1, run training
or the miniature experiment, or run diffusers' whole pipeline.
"""

import ast
import contextlib
import copy
import hashlib
import http.server
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tokenize
import types
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import huggingface_hub
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import analysis
import bench
import conditioning
import data
import evaluate as E
import hub
import irasim
import lora
import miniature
import model as M
import sample as S
import semantic
import synthetic
import tokenizer as tk
import train
from semantic import (DINO_PRESETS, DINO_REPO, DinoV3, SemanticProjector, TextEmbedder, TextEncoder,
                      aggregate_hidden_states, conditioning_features, load_dino)

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the internet: hub.fetch reads this at each call, and the
# download tests lift it and serve their files from 127.0.0.1

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


# =====================================================================================================================
# Shared builders and fixtures (helpers that serve one class only sit just above that class)

# --- random weights and the reference DiT

DIT_SMALL = M.DiTConfig(in_channels=16, out_channels=16, dim=64, n_blocks=2, n_heads=2, adaln_lora_dim=16,
                        text_dim=48, context_dim=32, max_size=(16, 32, 32))
# ^ the tiny DiT every model-level test builds: 2 blocks of width 64, 16 latent channels


def randomize(module, seed=0, std=0.2):
    """Random values in every parameter (the zero-initialized ones included) so nothing compares as trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return module


def diffusers_cosmos(c):
    """diffusers' model for config c, with two documented adjustments: q/k RMSNorm eps set to the official 1e-6
    (diffusers uses 1e-5), and its torchvision padding-mask resize replaced by torch's nearest interpolation
    (torchvision does not import beside the CPU torch build used here; the masks we pass are already at the
    latent size, so the resize is the identity either way)."""
    diffusers = importlib.import_module("diffusers")
    import diffusers.models.transformers.transformer_cosmos as tc
    if not hasattr(tc, "transforms"):
        resize = lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize),
                                              InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    ref = diffusers.CosmosTransformer3DModel(
        in_channels=c.in_channels + 1, out_channels=c.out_channels, num_attention_heads=c.n_heads,
        attention_head_dim=c.dim // c.n_heads, num_layers=c.n_blocks, mlp_ratio=c.mlp_ratio,
        text_embed_dim=c.context_dim, adaln_lora_dim=c.adaln_lora_dim, max_size=c.max_size,
        patch_size=(c.patch_temporal, c.patch_spatial, c.patch_spatial), rope_scale=c.rope_ratios,
        concat_padding_mask=True, extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=c.text_dim, encoder_hidden_states_channels=c.context_dim)
    for m in ref.modules():
        if hasattr(m, "norm_q") and m.norm_q is not None:
            m.norm_q.eps = m.norm_k.eps = 1e-6
    return ref.eval()


def official_pt(model, path):
    """Write model in the official .pt layout: net.-prefixed keys plus the buffers a loader must ignore."""
    official = M.state_dict_as(model.state_dict(), "official", model.config.n_blocks)
    sd = {f"net.{k}": v for k, v in official.items()}
    sd["net.pos_embedder.seq"] = torch.arange(10.0)
    sd["net.accum_video_sample_counter"] = torch.tensor(3)
    sd["net.blocks.0.self_attn.q_proj._extra_state"] = torch.tensor(0)
    torch.save(sd, path)


def weights_sha256(state_dict):
    """One sha256 over a state dict's names and tensor bytes: equal means bit for bit (also run in subprocesses)."""
    import hashlib
    h = hashlib.sha256()
    for k, t in sorted(state_dict.items()):
        h.update(k.encode() + t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Unsafe:
    """A Python object a state dict should not hold: loading it would run this module's code."""


# --- the Hugging Face Hub cache

HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache, repo_id):
    """The snapshot folder of repo_id in a Hub cache laid out as huggingface_hub writes it (refs/main, snapshots/)."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def run_offline(script, tmp_path):
    """Run a Python script in a fresh process that sees the Hub cache tmp_path/hub only (HF_HUB_OFFLINE=1)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": HERE}
    return subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """This process reads the Hub cache tmp_path/hub only, with HF_HUB_OFFLINE=1 -> the cache folder."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


# --- DINOv3 and the Wan VAE with random weights, beside the transformers and diffusers references

DINO_TINY = DINO_PRESETS["tiny"]


@pytest.fixture(scope="module")
def hf_dino(tmp_path_factory):
    """Tiny transformers DINOv3 with every parameter random (LayerScale, norms, tokens too), saved
    with save_pretrained: the genuine Hub layout."""
    transformers = importlib.import_module("transformers")
    cfg = transformers.DINOv3ViTConfig(hidden_size=DINO_TINY.dim, num_hidden_layers=DINO_TINY.depth,
                                       num_attention_heads=DINO_TINY.n_heads, intermediate_size=DINO_TINY.mlp_dim,
                                       num_register_tokens=DINO_TINY.n_registers)
    # defaults that must match DINOv3 ViT-L/16: no key bias, RoPE base 100, exact GELU, plain MLP, eps 1e-5
    assert (cfg.key_bias, cfg.rope_theta, cfg.hidden_act, cfg.use_gated_mlp, cfg.layer_norm_eps) == \
        (False, 100.0, "gelu", False, 1e-5)
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * torch.rand(()))
    folder = tmp_path_factory.mktemp("hub_layout")
    model.save_pretrained(folder)
    return model, folder


def frames_and_pixels(B=2, H=48, W=80):
    """Frames in [-1, 1] for semantic.py and the same frames normalized independently for transformers."""
    frames = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return frames, ((frames + 1) / 2 - mean) / std


def rand_video(B, T, H, W, seed=0):
    """A random video in [-1, 1], (B, 3, T, H, W)."""
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vae_pair():
    """A tiny diffusers AutoencoderKLWan with random weights (gains too) and our WanVAE holding the same
    ones through the documented key map. Ours gets random latent statistics; the tests apply them to
    diffusers' unnormalized mean by hand."""
    diffusers = importlib.import_module("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     temperal_downsample=[False, True, True]).eval()
    for name, p in ref.named_parameters():
        if name.endswith("gamma"):
            p.data.add_(0.2 * torch.randn_like(p))
    mean, std = torch.randn(4), torch.rand(4) + 0.5
    cfg = replace(tk.WAN_PRESETS["tiny"], latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    ours = tk.WanVAE(cfg).eval()
    ref_sd = ref.state_dict()
    assert len(ref_sd) == len(ours.state_dict())
    ours.load_state_dict({k: ref_sd[tk.diffusers_key(k)] for k in ours.state_dict()})
    return ref, ours, mean.view(1, 4, 1, 1, 1), std.view(1, 4, 1, 1, 1)


# --- metric weights in their official layouts

def lpips_files(tmp_path, seed=0):
    """Random weights in the two official layouts: torchvision's AlexNet (classifier included) and lpips'
    v0.1 heads (non-negative, like the trained ones) -> (alexnet path, heads path, {our key: tensor})."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
              10: (256, 256, 3, 3)}
    alex = {}
    for i, s in shapes.items():
        alex[f"features.{i}.weight"] = torch.randn(s, generator=g) * math.sqrt(2 / math.prod(s[1:]))
        alex[f"features.{i}.bias"] = torch.randn(s[0], generator=g) * 0.1
    for i, s in {1: (4096, 9216), 4: (4096, 4096), 6: (1000, 4096)}.items():
        alex[f"classifier.{i}.weight"], alex[f"classifier.{i}.bias"] = torch.zeros(s), torch.zeros(s[0])
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate(E.ALEX_CHANNELS)}
    torch.save(alex, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    ours = {k: v for k, v in alex.items() if k.startswith("features.")}
    ours.update({f"heads.{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(5)})
    return tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth", ours


class PlainI3D(nn.Module):
    """A scripted VideoGPT-style InceptionI3d: called as net(x), logits averaged over time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((3, 4)).mean(2)


# --- synthetic EgoDex data

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """A small synthetic EgoDex root: 2 tasks x 2 training episodes + 1 test episode, 40 frames each."""
    root = tmp_path_factory.mktemp("synth")
    synthetic.write_synthetic(root, tasks=2, episodes=2, test_episodes=1, frames=40, workers=0)
    return root


def one_episode(tmp, frames=40, seed=0, name="part1/task_a"):
    """Write one synthetic EgoDex episode by hand -> (hdf5 path, joints written, K)."""
    d = Path(tmp) / name
    d.mkdir(parents=True, exist_ok=True)
    joints, _ = synthetic.synth_track(np.random.default_rng(seed), frames)
    K = np.array([[122.8, 0, 160], [0, 122.8, 90], [0, 0, 1]])
    synthetic.write_egodex_hdf5(d / "0.hdf5", joints, K, {"llm_description": "Do the thing."})
    data.write_video(d / "0.mp4", (synthetic.render_frame(joints, i, K, (180, 320), (90, 90, 90))
                                   for i in range(frames)))
    return d / "0.hdf5", joints, K


# --- training runs (train.py) and their exports

TRAIN_ARGS = ["--dim", "64", "--blocks", "2", "--height", "32", "--width", "64", "--frames", "5", "--workers", "0",
              "--pixel-compression", "8", "--log-every", "1", "--warmup", "2", "--lr", "1e-3", "--preview-steps", "2"]


@pytest.fixture(scope="module")
def train_synth(tmp_path_factory):
    """The synthetic root training runs read: 2 tasks x 2 + 1 episodes of 40 frames at 64x112, with stats.json."""
    root = tmp_path_factory.mktemp("train_synth") / "data"
    synthetic.write_synthetic(root, tasks=2, episodes=2, test_episodes=1, frames=40, size=(64, 112), workers=0)
    (root / "stats.json").write_text(json.dumps(data.compute_stats(root)))
    return root


def run_train(args, nproc=1, wait=True):
    """One process: in this one (train.main; no interpreter start-up). Two ranks or no wait: a subprocess."""
    argv = [*TRAIN_ARGS, *map(str, args)]
    if nproc == 1 and wait:
        return train.main(argv)
    shared = nproc > 1 or "PYTEST_XDIST_WORKER" in os.environ  # cores shared with other processes: 1 thread each
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1" if shared else "2"}
    # --standalone: a free port for the rendezvous, so that two test processes can each run torchrun
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + [os.path.join(HERE, "train.py"), *argv]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_losses(run_dir):
    """Every micro-step loss a run logged to metrics.jsonl, in order."""
    lines = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return [v for line in lines for v in line["losses"]]


def only_run(out):
    """The one run directory under out."""
    (d,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def exported(train_synth, tmp_path_factory):
    """A 2-step tiny DexAC model trained on 5-frame clips (4 actions per chunk) and exported by train.py."""
    out = tmp_path_factory.mktemp("sample_runs")
    run_train(["--data", train_synth, "--out", out, "--steps", 2, "--batch-size", 2, "--micro-batch", 2])
    return only_run(out) / "model.safetensors"


# =====================================================================================================================
# The repository's structure

MODULE_LEVELS = {"hub": 0, "conditioning": 1, "semantic": 1, "tokenizer": 1, "data": 2, "synthetic": 3, "model": 4,
                 "irasim": 4, "lora": 5, "train": 6, "sample": 6, "evaluate": 7, "miniature": 8, "analysis": 8,
                 "bench": 8}
# ^ a module may import only modules of a lower level, so the README can be read top to bottom


def project_modules():
    """The top-level project modules: every *.py in the repository root but this file -> {name: path}."""
    return {p.stem: p for p in sorted(Path(HERE).glob("*.py")) if p.name not in ("test_all.py", "conftest.py")}


def comments_and_docstrings(path):
    """Every comment and docstring of a Python file, as one list of strings."""
    source = Path(path).read_text()
    texts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            texts.append(ast.get_docstring(node) or "")
    return texts


def readme_section(title):
    """The lines of README.md under the heading `## title`, up to the next `## ` heading."""
    lines = (Path(HERE) / "README.md").read_text().splitlines()
    start = lines.index(f"## {title}") + 1 if f"## {title}" in lines else len(lines)
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def defines(path, name):
    """Whether the file at path defines name at top level (function, class, assignment) or, as Class.method,
    a method of a top-level class."""
    tree = ast.parse(Path(path).read_text())
    owner, _, method = name.rpartition(".")
    for node in tree.body:
        if owner and isinstance(node, ast.ClassDef) and node.name == owner:
            return any(isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == method
                       for f in node.body)
        if not owner and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        if not owner and isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if name in names:
                return True
    return False


class TestStructure:
    """The order the README reads in is the order of the imports, and its paper-to-code table points at real code."""

    def test_imports_flow_one_way(self):
        """Every import of a project module (inside functions too) goes to a lower level of MODULE_LEVELS."""
        modules = project_modules()
        unplaced = sorted(set(modules) - set(MODULE_LEVELS))
        assert not unplaced, f"modules without a level in MODULE_LEVELS (place them): {unplaced}"
        bad = []
        for name, path in modules.items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module.split(".")[0]]
                else:
                    continue
                for target in targets:
                    if target in modules and MODULE_LEVELS[target] >= MODULE_LEVELS[name]:
                        bad.append(f"{path.name}:{node.lineno} imports {target} (level {MODULE_LEVELS[name]} "
                                   f"imports level {MODULE_LEVELS[target]})")
        assert not bad, "imports must go to a lower level:\n" + "\n".join(bad)

    @pytest.mark.parametrize("body, code", [("pass", 0), ("pytest.skip('no reference package')", 1),
                                            ("pytest.importorskip('no_such_reference_package')", 1)])
    def test_a_skipped_test_fails_the_suite(self, tmp_path, body, code):
        """The suite's pytest settings (conftest.py, pyproject's addopts) on a one-test file: a skip exits 1 and
        prints its reason; a pass exits 0."""
        shutil.copy(Path(HERE) / "conftest.py", tmp_path)
        shutil.copy(Path(HERE) / "pyproject.toml", tmp_path)
        (tmp_path / "test_one.py").write_text(f"import pytest\n\n\ndef test_one():\n    {body}\n")
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == code, p.stdout + p.stderr
        if code:
            assert "SKIPPED" in p.stdout and "no" in p.stdout.split("SKIPPED")[1].splitlines()[0], p.stdout
            assert "1 skipped: the run fails" in p.stdout, p.stdout

    def test_paper_to_code_table_names_real_functions(self):
        """README's `## Paper to code` table names at least 11 `file.py:name` references that exist, and every
        equation 1..11 is labelled (`# eq. N`, `eqs. 7-9`) in a comment or docstring of the code."""
        modules = project_modules()
        refs = []
        for line in readme_section("Paper to code"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.lstrip().startswith("|") and len(cells) > 1:
                refs += [r for r in re.findall(r"`([^`]*)`", cells[-1]) if ".py:" in r]
        assert len(refs) >= 11, f"README's '## Paper to code' table holds {len(refs)} code references, expected >= 11"
        broken = []
        for ref in refs:
            m = re.fullmatch(r"(\w+)\.py:(\w+(?:\.\w+)?)", ref)
            if not m or m[1] not in modules or not defines(modules[m[1]], m[2]):
                broken.append(ref)
        assert not broken, f"references to no top-level function, class, assignment or method: {broken}"
        labelled = set()
        for path in modules.values():
            for text in comments_and_docstrings(path):
                for first, last in re.findall(r"eqs?\.\s*(\d+)(?:\s*[-–]\s*(\d+))?", text, re.IGNORECASE):
                    labelled.update(range(int(first), int(last or first) + 1))
        missing = sorted(set(range(1, 12)) - labelled)
        assert not missing, f"equations with no '# eq. N' label in the code: {missing}"


# =====================================================================================================================
# hub: where weight files come from (local files, the Hub cache, gated repos, URLs); what is inside the files and
# how each model maps their keys is tested with that model

def missing_dit(tmp_path):
    """load_dit on a path that does not exist."""
    M.load_dit(str(tmp_path / "nope.pt"), DIT_SMALL)


def missing_lpips_default(tmp_path):
    """load_lpips with nothing in the default weights folder."""
    E.load_lpips()


def missing_inception_default(tmp_path):
    """load_torchscript('inception') with nothing in the default weights folder."""
    E.load_torchscript("inception")


MISSING_FILES = {  # case -> (call on tmp_path, exception, message)
    "dit_file": (missing_dit, FileNotFoundError, "nor a Hub file"),
    "wan_file": (lambda tmp_path: tk.build_tokenizer("wan2.1", config="tiny",
                                                     weights=str(tmp_path / "Wan2.1_VAE.pth")),
                 FileNotFoundError, "nvidia/Cosmos-Predict2.5-2B"),
    "wan_folder_without_it": (lambda tmp_path: tk.build_tokenizer("wan2.1", config="tiny", weights=str(tmp_path)),
                              FileNotFoundError, "nvidia/Cosmos-Predict2.5-2B"),
    "dino_file": (lambda tmp_path: load_dino(str(tmp_path / "missing.pth"), preset="tiny"),
                  FileNotFoundError, "not a file"),
    "exported_model": (lambda tmp_path: M.load_exported(tmp_path / "none.safetensors"),
                       FileNotFoundError, "not found"),
    "lpips_default": (missing_lpips_default, E.WeightsError, "alexnet-owt-7be5be79.pth"),
    "inception_default": (missing_inception_default, E.WeightsError, "inception-2015-12-05.pt"),
    "keypoint_model": (lambda tmp_path: E.KeypointModel(str(tmp_path / "nothing.pt")),
                       E.WeightsError, "keypoints.pt"),
}


# --- networks with a fixed URL (hub.Network, hub.fetch)

FETCH_PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes
FETCH_SHA = hashlib.sha256(FETCH_PAYLOAD).hexdigest()


@pytest.fixture
def web():
    """A local HTTP server: /good the payload, /corrupt other bytes of the same size, /short a Content-Length the
    body never reaches (the connection closes early). .requests lists every path asked for."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            srv.requests.append(self.path)
            name = self.path.split("/")[1]
            body = {"good": FETCH_PAYLOAD, "corrupt": FETCH_PAYLOAD[::-1], "short": FETCH_PAYLOAD[:1000]}.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(FETCH_PAYLOAD)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
    srv.requests = []
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def weights_cache(tmp_path, monkeypatch):
    """Empty cache and torch hub folders; downloads allowed unless a test says otherwise."""
    monkeypatch.setenv("DEXAC_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def fetch_net(web, path="good/net.pt", sha256=FETCH_SHA, size=len(FETCH_PAYLOAD), **kw):
    return hub.Network(path.split("/")[-1], f"{web.url}/{path}", sha256=sha256, size=size, **kw)


FETCH_CORRUPT = (rf"net.pt: the download from http://127.0.0.1:\d+/corrupt/net.pt is not the expected file "
                 rf"\(sha256 \w+ instead of {FETCH_SHA}\); it was deleted")
FETCH_SHORT = r"connection closed after 1,000 of 10,240 bytes"


class TestHub:
    """Every loader resolves its weights the same way: a local file or folder, the Hub cache (also offline),
    a URL downloaded once; what is missing or refused gives one message that says where to get it."""

    def test_official_pt_with_transformer_engine_extra_state_loads(self, tmp_path):
        """The official .pt files may hold Transformer Engine `_extra_state` entries that are io.BytesIO objects
        (upstream loads them with weights_only=False): they load, those entries dropped; any other Python
        object is refused unread, with one message."""
        src = randomize(M.DiT(DIT_SMALL), seed=3).eval()
        official_pt(src, tmp_path / "plain.pt")
        sd = torch.load(tmp_path / "plain.pt")
        sd["net.blocks.0.self_attn.k_proj._extra_state"] = io.BytesIO(b"fp8 scaling metadata")
        torch.save(sd, tmp_path / "te.pt")
        with pytest.raises(Exception, match="Weights only load failed"):  # what a plain weights_only load says
            torch.load(tmp_path / "te.pt", weights_only=True)
        model = M.load_dit(str(tmp_path / "te.pt"), DIT_SMALL)
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        sd["net.blocks.1.mlp._extra_state"] = Unsafe()
        torch.save(sd, tmp_path / "unsafe.pt")
        with pytest.raises(hub.WeightsError, match=r"holds Python objects of types \['[\w.]*Unsafe'\] \(loading them "
                                                   r"could run code\): re-save it"):
            M.load_dit(str(tmp_path / "unsafe.pt"), DIT_SMALL)

    @pytest.mark.slow
    def test_dit_hub_cache_offline_in_a_fresh_process(self, tmp_path):
        """A short name resolves through huggingface_hub in a local cache read with HF_HUB_OFFLINE=1."""
        src = randomize(M.DiT(DIT_SMALL), seed=3).eval()
        g = torch.Generator().manual_seed(0)
        x, text, sigma = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 5, 48, generator=g), torch.rand(2)
        with torch.no_grad():
            expected = src(x, sigma, text)
        target = hub_snapshot(tmp_path / "hub", "nvidia/Cosmos-Predict2.5-2B") / M.HUB_FILES["base/post-trained"]
        target.parent.mkdir(parents=True, exist_ok=True)
        official_pt(src, target)
        torch.save({"x": x, "sigma": sigma, "text": text, "expected": expected}, tmp_path / "io.pt")
        script = (f"import torch, model as M\ntorch.set_num_threads({torch.get_num_threads()})  # bit-equal sums\n"
                  f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
                  f"m = M.load_dit('base/post-trained', M.{DIT_SMALL!r}).eval()\n"
                  "with torch.no_grad():\n"
                  "    assert torch.equal(m(io['x'], io['sigma'], io['text']), io['expected'])\n"
                  "print('hub ok')\n")
        r = run_offline(script, tmp_path)
        assert r.returncode == 0 and "hub ok" in r.stdout, r.stderr[-2000:]

    @pytest.mark.slow
    def test_a_multi_line_error_keeps_its_lines_under_one_error_line(self, tmp_path, monkeypatch):
        """`evaluate.py fetch-weights` offline: one `error:` line, then every missing file with its URL (the
        message hub.missing_message builds), nothing cut after its first line."""
        monkeypatch.setenv("DEXAC_WEIGHTS_DIR", str(tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, err, _ = run_cli("evaluate.py", ["fetch-weights", "--metrics", "fid,fvd"])
        assert code == 1 and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
        assert "2 network file(s) missing" in err and "Traceback" not in err
        for kind in ("inception", "i3d"):
            assert E.NETWORKS[kind].url in err and str(tmp_path / E.NETWORKS[kind].file) in err, err

    def test_dit_file_missing_from_the_hub_cache_gives_the_download_hint(self, tmp_path):
        hub_snapshot(tmp_path / "hub", "nvidia/Cosmos-Predict2.5-2B")
        r = run_offline("import model as M\nM.load_dit('base/pre-trained')\n", tmp_path)
        assert r.returncode != 0 and "WeightsError" in r.stderr and "hf download" in r.stderr, r.stderr[-2000:]

    @pytest.mark.slow
    def test_dino_hub_cache_offline(self, hf_dino, offline_hub):
        """The real hf_hub_download path, resolving refs/main in a local cache with HF_HUB_OFFLINE=1."""
        _, folder = hf_dino
        (hub_snapshot(offline_hub, DINO_REPO) / "model.safetensors").write_bytes(
            (folder / "model.safetensors").read_bytes())
        frames, _ = frames_and_pixels()
        from_cache = load_dino(DINO_REPO, preset="tiny")
        from_folder = load_dino(str(folder), preset="tiny")
        torch.testing.assert_close(from_cache(frames), from_folder(frames), atol=0, rtol=0)

    @pytest.mark.slow
    def test_dino_repo_missing_from_the_hub_cache_is_one_clear_error(self, offline_hub):
        with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
            load_dino("facebook/not-cached", preset="tiny")

    @pytest.mark.slow
    def test_vae_hub_cache_offline(self, vae_pair, tmp_path):
        """A Hub cache read through hf_hub_download with HF_HUB_OFFLINE=1 in a fresh process: the cached repo
        loads with the same weights, and a repo not in the cache names the file, the repo and where to get it
        (one process for both: its start-up is the cost)."""
        torch.save(vae_pair[1].state_dict(), hub_snapshot(tmp_path / "hub", "someorg/tiny-vae") / "tokenizer.pth")
        script = (
            "import torch, tokenizer as tk\n"
            + inspect.getsource(weights_sha256) +
            "vae = tk.build_tokenizer('wan2.1', config='tiny', weights='someorg/tiny-vae')\n"
            "print('SHA', weights_sha256(vae.state_dict()))\n"
            "try:\n    tk.build_tokenizer('wan2.1', config='tiny', weights='someorg/not-cached')\n"
            "except FileNotFoundError as e:\n    print('MISSING', e)\n"
        )
        out = run_offline(script, tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"SHA {weights_sha256(vae_pair[1].state_dict())}" in out.stdout  # the same bytes
        assert "someorg/not-cached/tokenizer.pth is not in the local Hub cache" in out.stdout
        assert tk.HUB_REPO in out.stdout

    @pytest.mark.parametrize("error_code", ["GatedRepo", "RepoNotFound"])
    def test_gated_repo_message(self, monkeypatch, error_code):
        """A 401 from the Hub, turned into an exception by huggingface_hub's own status mapping
        (GatedRepoError when logged in without the licence, RepositoryNotFoundError without a token)."""
        from huggingface_hub.utils import hf_raise_for_status
        try:
            import httpx2 as httpx  # the HTTP client of huggingface_hub >= 2
        except ImportError:
            import httpx

        def refuse(repo_id, filename, **kwargs):
            url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
            hf_raise_for_status(httpx.Response(401, headers={"X-Error-Code": error_code},
                                               request=httpx.Request("GET", url)))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
        with pytest.raises(PermissionError, match="(?s)accept the licence.*hf auth login.*HF_TOKEN"):
            load_dino(DINO_REPO, preset="tiny")

    def test_hub_specs_go_through_huggingface_hub(self, tmp_path, monkeypatch):
        hub = importlib.import_module("huggingface_hub")
        calls = []

        def fake_download(repo, filename):
            calls.append((repo, filename))
            if repo == "org/missing":
                raise hub.errors.LocalEntryNotFoundError("offline")
            return str(tmp_path / filename)

        monkeypatch.setattr(hub, "hf_hub_download", fake_download)
        assert E.resolve_weights("inception", "org/metrics").endswith("inception-2015-12-05.pt")
        assert E.resolve_weights("i3d_stylegan", "org/metrics/fvd/i3d.pt").endswith("fvd/i3d.pt")
        with pytest.raises(E.WeightsError, match="i3d_torchscript.pt.*org/missing"):
            E.resolve_weights("i3d_stylegan", "org/missing")
        assert calls == [("org/metrics", "inception-2015-12-05.pt"), ("org/metrics", "fvd/i3d.pt"),
                         ("org/missing", "i3d_torchscript.pt")]

    # hub.fetch: a local HTTP server on 127.0.0.1 stands in for the internet

    def test_download_is_verified_cached_and_not_repeated(self, web, weights_cache):
        n = fetch_net(web, sha256=FETCH_SHA[:8])  # a prefix, torchvision's convention
        path = hub.fetch(n, progress=False)
        assert path == str(weights_cache / "net.pt") and Path(path).read_bytes() == FETCH_PAYLOAD
        assert hub.fetch(n, progress=False) == path and hub.fetch_all([n], progress=False) == [path]
        assert web.requests == ["/good/net.pt"]  # the second and third fetch found it
        assert os.listdir(weights_cache) == ["net.pt"]

    # (bytes of the right length that match no known hash or size cannot be told apart: no such case)
    @pytest.mark.parametrize("case,message,known", [("corrupt", FETCH_CORRUPT, "sha256_and_size"),
                                                    ("short", FETCH_SHORT, "sha256_and_size"),
                                                    ("short", FETCH_SHORT, "nothing")])
    def test_wrong_or_truncated_download_is_one_error_and_leaves_nothing(self, web, weights_cache, case, message,
                                                                         known):
        n = fetch_net(web, f"{case}/net.pt", *(() if known == "sha256_and_size" else (None, None)))
        with pytest.raises(hub.WeightsError, match=message) as e:
            hub.fetch(n, progress=False)
        assert str(e.value).count("\n") == 0 and str(weights_cache / "net.pt") in str(e.value)
        assert os.listdir(weights_cache) == []  # no partial file, no final file

    def test_wrong_size_download_is_rejected(self, web, weights_cache):
        with pytest.raises(hub.WeightsError, match="10,240 bytes instead of 10,241"):
            hub.fetch(fetch_net(web, size=len(FETCH_PAYLOAD) + 1, sha256=None), progress=False)
        assert os.listdir(weights_cache) == []

    def test_unreachable_url_is_one_error(self, web, weights_cache):
        with pytest.raises(hub.WeightsError,
                           match=r"net.pt: the download from .*/missing/net.pt failed \(HTTPError"):
            hub.fetch(fetch_net(web, "missing/net.pt"), progress=False)
        assert os.listdir(weights_cache) == []

    @pytest.mark.parametrize("switch", ["env", "flag"])
    def test_offline_lists_every_missing_file_and_never_connects(self, web, weights_cache, monkeypatch, switch):
        if switch == "env":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        nets = [fetch_net(web, "good/a.pt", what="network A"), fetch_net(web, "good/b.pt")]
        with pytest.raises(hub.WeightsError) as e:
            hub.fetch_all(nets, offline=True if switch == "flag" else None, progress=False)
        msg = str(e.value)
        for n in nets:
            assert f"{n.file}" in msg and n.url in msg and str(weights_cache / n.file) in msg
        assert "network A" in msg and "2 network file(s) missing" in msg
        with pytest.raises(hub.WeightsError, match="a.pt"):
            hub.fetch(nets[0], offline=True if switch == "flag" else None)
        assert web.requests == []

    def test_offline_resolve_of_a_url_never_connects(self, web, weights_cache, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(hub.WeightsError, match="net.pt"):
            hub.resolve(f"{web.url}/good/net.pt")
        assert web.requests == []

    def test_resolve_url_downloads_once_and_keeps_no_partial(self, web, weights_cache):
        path = hub.resolve(f"{web.url}/good/net.pt?dl=1")
        assert path == str(weights_cache / "net.pt") and hub.resolve(f"{web.url}/good/net.pt") == path
        with pytest.raises(hub.WeightsError, match="connection closed after 1,000 of 10,240 bytes.*Get it from X"):
            hub.resolve(f"{web.url}/short/other.pt", where="Get it from X")
        assert os.listdir(weights_cache) == ["net.pt"] and web.requests == ["/good/net.pt?dl=1", "/short/other.pt"]

    def test_lpips_heads_are_found_inside_the_lpips_package(self, web, weights_cache):
        heads = hub.Network("alex.pth", f"{web.url}/good/alex.pth", size=6_009,
                            sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                            found_in=(hub.package_file("not_a_package_here", "alex.pth"),
                                      hub.package_file("lpips", "weights/v0.1/alex.pth")))
        path = hub.fetch(heads, offline=False, progress=False)
        assert path.endswith(os.path.join("lpips", "weights", "v0.1", "alex.pth")) and "site-packages" in path
        assert web.requests == [] and not weights_cache.exists()  # used in place: nothing downloaded, nothing copied

    def test_a_copy_elsewhere_that_does_not_match_is_ignored(self, web, weights_cache, tmp_path):
        other = tmp_path / "other_tool" / "net.pt"
        other.parent.mkdir()
        other.write_bytes(FETCH_PAYLOAD[::-1])
        assert hub.fetch(fetch_net(web, found_in=(other,)), progress=False) == str(weights_cache / "net.pt")
        assert web.requests == ["/good/net.pt"]

    def test_a_cached_file_with_the_wrong_hash_is_never_used(self, web, weights_cache):
        """Same size, other bytes: online it is replaced by a verified download; offline the error says what is
        there instead, and the file is left for the user to inspect."""
        weights_cache.mkdir()
        (weights_cache / "net.pt").write_bytes(FETCH_PAYLOAD[::-1])
        with pytest.raises(hub.WeightsError,
                           match=rf"net.pt.*the file there now has sha256 \w+ instead of {FETCH_SHA}"):
            hub.fetch(fetch_net(web), offline=True)
        assert web.requests == [] and (weights_cache / "net.pt").read_bytes() == FETCH_PAYLOAD[::-1]
        assert Path(hub.fetch(fetch_net(web), progress=False)).read_bytes() == FETCH_PAYLOAD
        assert web.requests == ["/good/net.pt"]

    def test_torch_hub_folder_is_searched_when_the_cache_is_elsewhere(self, web, weights_cache, tmp_path):
        torch_copy = tmp_path / "torch_home" / "hub" / "checkpoints" / "net.pt"
        torch_copy.parent.mkdir(parents=True)
        torch_copy.write_bytes(FETCH_PAYLOAD)
        assert hub.fetch(fetch_net(web), offline=True) == str(torch_copy) and web.requests == []

    def test_a_file_changed_after_its_check_is_checked_again(self, web, weights_cache):
        """The sha256 is remembered per (path, size, mtime): a file rewritten in place is hashed again."""
        path = Path(hub.fetch(fetch_net(web), progress=False))
        assert hub.fetch(fetch_net(web), offline=True) == str(path)  # verified, and its hash remembered
        path.write_bytes(FETCH_PAYLOAD[::-1])
        os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-clock file system
        with pytest.raises(hub.WeightsError, match="the file there now has sha256"):
            hub.fetch(fetch_net(web), offline=True)

    @pytest.mark.parametrize("case", list(MISSING_FILES))
    def test_missing_weights_give_one_clear_error(self, case, tmp_path, monkeypatch):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty default weights folder
        call, error, message = MISSING_FILES[case]
        with pytest.raises(error, match=message):
            call(tmp_path)

    @pytest.mark.parametrize("kind,url,where", [  # (the LPIPS heads by default come from the lpips package)
        (kind, url, where) for kind, url in (("alexnet", "download.pytorch.org"), ("lpips", "PerceptualSimilarity"),
                                             ("inception", "nvlabs-fi-cdn"), ("i3d", "songweige/TATS"),
                                             ("i3d_stylegan", "i3d_torchscript.pt"))
        for where in ("default_folder", "missing_file", "folder_without_it") if (kind, where) != ("lpips",
                                                                                               "default_folder")])
    def test_missing_metric_weights_say_where_to_get_them(self, kind, url, where, tmp_path, monkeypatch):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        name = E.NETWORKS[kind].file
        spec = {"default_folder": None, "missing_file": tmp_path / "nowhere" / name, "folder_without_it": tmp_path}
        with pytest.raises(E.WeightsError) as e:
            E.resolve_weights(kind, spec[where])
        msg = str(e.value)
        assert name in msg and url in msg and str(tmp_path / "torch_home") in msg

    def test_default_weights_folder_is_torch_home(self, tmp_path, monkeypatch):
        """Weights found in $TORCH_HOME/hub/checkpoints load without being named (the registry's hashes waived
        for these random stand-ins: with them, the stand-ins are refused, see test_registry_refuses...)."""
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        for kind in ("alexnet", "lpips"):
            monkeypatch.setitem(E.NETWORKS, kind, replace(E.NETWORKS[kind], sha256=None, size=None, found_in=()))
        alex, heads, _ = lpips_files(tmp_path)
        E.weights_dir().mkdir(parents=True)
        alex.rename(E.weights_dir() / alex.name)
        heads.rename(E.weights_dir() / heads.name)
        assert isinstance(E.load_lpips(), E.LPIPS)


# =====================================================================================================================
# conditioning.py: DexAC, its ablations and the MLP baselines, wired into the DiT

ACTION_MODES = list(conditioning.MODES)
N_ACT, T_ACT = 57, 12
ACTION_GRID = (2, 4, 4, 6)  # (B, T, H, W) of the latents: 12 actions = 4 per latent frame after the conditional one


def action_config(mode, **kw):
    """DIT_SMALL with action conditioning `mode` (SAT width 32)."""
    return replace(DIT_SMALL, action_mode=mode, sat_dim=32, **kw)


def random_action_stats(seed=0):
    """Per-dimension statistics of very different scales, like the 57-D action (mm fingers, unit 6D entries)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_ACT, generator=g), 10.0 ** (-4 * torch.rand(N_ACT, generator=g))  # std from 1e-4 to 1


def action_batch(seed=0, mask_frames=(0,)):
    """Random DiT inputs with actions drawn from random_action_stats -> (x, sigma, text, frame mask, actions)."""
    B, T, H, W = ACTION_GRID
    g = torch.Generator().manual_seed(seed)
    mean, std = random_action_stats()
    actions = mean + std * torch.randn(B, T_ACT, N_ACT, generator=g)
    mask = torch.zeros(B, T)
    mask[:, list(mask_frames)] = 1
    return (torch.randn(B, 16, T, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 3, DIT_SMALL.text_dim, generator=g), mask, actions)


def load_with_actions(tmp_path, mode, base=None, **kw):
    """A random-weight backbone in the official layout, loaded through the meta-device path with `mode` added."""
    base = base or randomize(M.DiT(DIT_SMALL), seed=1).eval()
    official_pt(base, tmp_path / "base.pt")
    model = M.load_dit(str(tmp_path / "base.pt"), action_config(mode, **kw)).eval()
    if model.action_cond.norm.mode == "zscore":
        model.action_cond.set_stats(*random_action_stats())
    return base, model


def train_steps(model, steps, lr=1e-2):
    """`steps` Adam steps on the new parameters only (random data); the names whose gradient was ever non-zero."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.action_cond.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    learned = set()
    for step in range(steps):
        x, _, text, mask, actions = action_batch(seed=10 + step)
        fn = lambda x_in, s: model(x_in, s, text, frame_mask=mask, actions=actions)
        loss, _ = M.flow_loss(fn, x, mask, cond_sigma=1e-4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.mean().backward()
        learned |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    return learned, set(params)


def official_action_file(base, path, seed=5, action_dim=7):
    """base in the official robot/action-cond layout, with random action embedders (4 actions per latent frame)."""
    official_pt(base, path)
    sd, g, D = torch.load(path), torch.Generator().manual_seed(seed), DIT_SMALL.dim
    for name, out in [("B_D", D), ("B_3D", 3 * D)]:
        for key, shape in [("fc1.weight", (4 * D, 4 * action_dim)), ("fc1.bias", (4 * D,)),
                           ("fc2.weight", (out, 4 * D)), ("fc2.bias", (out,))]:
            sd[f"net.action_embedder_{name}.{key}"] = torch.randn(shape, generator=g) * 0.2
    torch.save(sd, path)
    return sd


class OfficialActionTimeEmbed(nn.Module):
    """diffusers' CosmosEmbedding with Cosmos' action injection: emb_3D added to the AdaLN-LoRA term, emb_D to
    the raw sinusoid before t_embedding_norm. timestep (B*T,) as diffusers flattens it."""

    def __init__(self, time_embed, emb_d, emb_3d):
        super().__init__()
        self.base, self.emb_d, self.emb_3d = time_embed, emb_d, emb_3d

    def forward(self, hidden_states, timestep):
        proj = self.base.time_proj(timestep).type_as(hidden_states)  # (B*T, D)
        temb = self.base.t_embedder(proj) + self.emb_3d.flatten(0, 1)
        return temb, self.base.norm(proj + self.emb_d.flatten(0, 1))


def dexac_with_stats():
    """An untrained DexAC DiT holding random_action_stats."""
    model = M.DiT(action_config("dexac"))
    model.action_cond.set_stats(*random_action_stats())
    return model


def dexac_forward(actions):
    """A forward pass of dexac_with_stats on action_batch, its actions changed by actions(a) or left out (None)."""
    x, sigma, text, mask, a = action_batch()
    given = {} if actions is None else {"actions": actions(a)}
    dexac_with_stats()(x, sigma, text, frame_mask=mask, **given)


def forward_without_statistics(tmp_path):
    """A forward pass of a DexAC DiT before any statistics were set."""
    x, sigma, text, mask, actions = action_batch()
    M.DiT(action_config("dexac"))(x, sigma, text, frame_mask=mask, actions=actions)


def twelve_actions_on_three_latent_frames(tmp_path):
    """A chunk of 12 actions given with 3 latent frames (it needs 4)."""
    x, sigma, text, _, actions = action_batch()
    M.DiT(action_config("mlp", action_norm="none"))(x[:, :, :3], sigma, text, actions=actions)


def actions_for_a_plain_model(tmp_path):
    """Actions given to a DiT without action conditioning."""
    x, sigma, text, _, actions = action_batch()
    M.DiT(DIT_SMALL)(x, sigma, text, actions=actions)


def action_weights_into_a_plain_model(tmp_path):
    """An official action-conditioned checkpoint loaded into a config without action conditioning."""
    official_action_file(randomize(M.DiT(DIT_SMALL)), tmp_path / "action.pt")
    M.load_dit(str(tmp_path / "action.pt"), DIT_SMALL)


def half_an_action_module(tmp_path):
    """A DexAC checkpoint that lacks one weight of the local projection."""
    sd = M.DiT(action_config("dexac")).state_dict()
    del sd["action_cond.local.proj.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    M.load_dit(str(tmp_path / "partial.pt"), action_config("dexac"))


def stats_near_bf16_rounding():
    """random_action_stats with a 6D rotation entry near 1 (bf16 would round its mean to 1.0), and a layout."""
    mean, std = random_action_stats()
    mean[:6], std[:6] = 0.99991, 1e-4
    return mean, std, {"dim": N_ACT, "names": [f"a{i}" for i in range(N_ACT)]}


def dexac_saved_and_loaded(tmp_path):
    """A DexAC DiT holding stats_near_bf16_rounding, saved and loaded back -> (source, loaded, mean, std, layout)."""
    mean, std, layout = stats_near_bf16_rounding()
    src = randomize(M.DiT(action_config("dexac")), seed=2).eval()
    src.action_cond.set_stats(mean, std, layout)
    torch.save(src.state_dict(), tmp_path / "ckpt.pt")
    loaded = M.load_dit(str(tmp_path / "ckpt.pt"), action_config("dexac")).eval()
    return src, loaded, mean, std, layout


ACTION_BAD_INPUTS = {  # case -> (call on tmp_path, exception, message)
    "no_statistics": (forward_without_statistics, ValueError,
                      r"holds no statistics: compute them with `python data.py stats"),
    "56_dimensions": (lambda tmp_path: dexac_forward(lambda a: a[..., :56]),
                      ValueError, r"actions have 56 dimensions per step, this model was built for 57"),
    "8_steps": (lambda tmp_path: dexac_forward(lambda a: a[:, :8]),
                ValueError, r"actions have 8 steps, this model takes chunks of 12"),
    "no_actions": (lambda tmp_path: dexac_forward(None), ValueError, r"pass actions"),
    "12_actions_on_3_latent_frames": (twelve_actions_on_three_latent_frames, ValueError,
                                      r"12 actions need 4 latent frames, got 3"),
    "unknown_mode": (lambda tmp_path: M.DiT(action_config("dexak")),
                     ValueError, r"unknown action mode 'dexak'; choose one of none, mlp, mlp-flat, dexac"),
    "unknown_normalization": (lambda tmp_path: M.DiT(action_config("dexac", action_norm="minmax")),
                              ValueError, r"unknown action normalization 'minmax'"),
    "statistics_of_7_dimensions": (lambda tmp_path: dexac_with_stats().action_cond.set_stats(torch.zeros(7),
                                                                                             torch.ones(7)),
                                   ValueError, r"action statistics have 7 means"),
    "missing_stats_file": (lambda tmp_path: conditioning.load_stats_file(str(tmp_path / "stats.json")),
                           FileNotFoundError, r"make it with `python data.py stats"),
    "actions_for_a_plain_model": (actions_for_a_plain_model, ValueError,
                                  r"actions were given to a model without action conditioning"),
    "action_weights_into_a_plain_model": (action_weights_into_a_plain_model, ValueError,
                                          r"holds action-conditioning weights: set the config's action_mode"),
    "half_an_action_module": (half_an_action_module, ValueError,
                              r"holds only part of action_cond.local.proj: missing weight"),
}


# the wiring of the action conditioning: WHICH actions each latent frame receives, and WHICH input feeds q, k and v
# (identity at init, "every parameter learns" and "no dimension ignored" hold for any wiring that keeps gradients
# flowing; these do not)

PER_FRAME = 4  # actions per latent frame after the first (DiTConfig.actions_per_frame)
# the wiring tests' (B, T, H, W): 12 actions -> 3 predicted latent frames after the conditional one
WB, WT, WH, WW = 2, 1 + T_ACT // PER_FRAME, 2, 3
# frame 0 conditional in both samples; sample 1 also has frame 2 conditional (it must then receive nothing)
MASK = torch.tensor([[1.0, 0, 0, 0], [1, 0, 1, 0]])


# how each mode groups the actions, written here rather than read from the module under test: "frame" gives steps
# 4(f-1)..4f-1 to latent frame f >= 1 (and nothing to frame 0), "chunk" conditions every frame on the whole chunk
GROUPING = {"mlp": "frame", "mlp-flat": "chunk", "dexac": "chunk", "dexac-no-local": "chunk",
            "dexac-no-global": "chunk", "dexac-time": "frame", "dexac-channel": "chunk"}

# what each mode conditions, also written here: "x" the tokens (local refinement), "emb_d" / "emb_3d" the AdaLN terms
SIGNALS = {"mlp": {"emb_d", "emb_3d"}, "mlp-flat": {"emb_d"}, "dexac": {"x", "emb_d", "emb_3d"},
           "dexac-no-local": {"emb_d", "emb_3d"}, "dexac-no-global": {"x"}, "dexac-time": {"x", "emb_d", "emb_3d"},
           "dexac-channel": {"x", "emb_d", "emb_3d"}}


def frames_of_step(mode, s):
    """The latent frames that action step s belongs to, as the mode defines it (before the frame mask)."""
    return {1 + s // PER_FRAME} if GROUPING[mode] == "frame" else set(range(WT))


def wiring_inputs(seed=0):
    """Raw actions (WB, T_a, N) drawn from random_action_stats, and tokens (WB, WT, WH, WW, D) as after patch
    embedding."""
    g = torch.Generator().manual_seed(seed)
    mean, std = random_action_stats()
    actions = mean + std * torch.randn(WB, T_ACT, N_ACT, generator=g)
    return actions, torch.randn(WB, WT, WH, WW, DIT_SMALL.dim, generator=g)


def nudge(actions, b, s, seed=1):
    """actions with step s of sample b changed by about one standard deviation in every dimension."""
    out = actions.clone()
    _, std = random_action_stats()
    out[b, s] += std * (0.5 + torch.rand(N_ACT, generator=torch.Generator().manual_seed(seed)))
    return out


def conditioning_module(mode, seed=0):
    module = randomize(conditioning.build_action_cond(mode, DIT_SMALL.dim, DIT_SMALL.n_heads, width=32), seed=seed)
    module.set_stats(*random_action_stats())
    return module.eval()


def received(module, actions, x):
    """What each latent frame receives: {name: (WB, WT, ...)} for the signals the mode gives (SIGNALS): the refined
    tokens "x", the AdaLN terms "emb_d", "emb_3d". A mode must leave the tokens untouched and return None for the
    AdaLN terms it does not give."""
    with torch.no_grad():
        out = dict(zip(("x", "emb_d", "emb_3d"), module(actions, x, MASK)))
    if "x" not in SIGNALS[module.mode]:
        assert torch.equal(out["x"], x), f"{module.mode} changed the tokens"
    assert {k for k, v in out.items() if k != "x" and v is not None} == SIGNALS[module.mode] - {"x"}
    return {k: v for k, v in out.items() if k in SIGNALS[module.mode]}


def same_up_to_rounding(u, v):
    """Equal up to float32 rounding relative to the tensor's scale (the same values computed at other batch
    positions may round differently)."""
    return (u - v).abs().max() <= 1e-5 * u.abs().max()


def assert_only_frames_change(before, after, b, frames, what):
    """Sample b's latent frames `frames` differ (by more than rounding) between before and after; every other
    (sample, frame) of every received tensor is bit-identical."""
    for name in before:
        for bb in range(WB):
            for f in range(WT):
                u, v = before[name][bb, f], after[name][bb, f]
                if bb == b and f in frames:
                    scale = u.abs().max()
                    assert (u - v).abs().max() > 1e-5 * scale, f"{what}: {name} of sample {bb} frame {f} unchanged"
                else:
                    assert torch.equal(u, v), f"{what}: {name} of sample {bb} frame {f} changed"


# the hand-computed attention cases

WQ = [[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [1, 0, -1, 0]]
WK = [[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2], [1, 1, 0, 0]]
WV = [[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 3, 0, 0], [2, 0, 0, 1]]
WO = [[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 2]]
BQ, BK, BV, BO = [0.5, 0, 0, -0.5], [0, 0.5, -0.5, 0], [1.0, 0, 0, 0], [0, 0, 0.25, 0]


def set_attention_by_hand(attn):
    """conditioning.CrossAttention of width 4: the hand-chosen (non-symmetric, distinct) q, k, v, o weights."""
    with torch.no_grad():
        for name, w, b in (("q", WQ, BQ), ("k", WK, BK), ("v", WV, BV), ("o", WO, BO)):
            getattr(attn, name).weight.copy_(torch.tensor(w))
            getattr(attn, name).bias.copy_(torch.tensor(b))
    return attn


def weights64(attn):
    return {n: (getattr(attn, n).weight.double(), getattr(attn, n).bias.double()) for n in "qkvo"}


def heads_attention(q, k, v, n_heads, *, split="channels", scale=None):
    """softmax(q k^WT / sqrt(d_head)) v per head, written out; q (WB, L, D), k and v (WB, M, D) float64.
    split "channels": head h owns channels h*d_head..(h+1)*d_head-1 (the right one); "interleaved": the wrong one."""
    Bq, L, D = q.shape
    hd = D // n_heads
    scale = 1 / math.sqrt(hd) if scale is None else scale
    if split == "channels":
        idx = [list(range(h * hd, (h + 1) * hd)) for h in range(n_heads)]
    else:
        idx = [list(range(h, D, n_heads)) for h in range(n_heads)]
    out = torch.zeros(Bq, L, D, dtype=torch.float64)
    for h in range(n_heads):
        qh, kh, vh = q[..., idx[h]], k[..., idx[h]], v[..., idx[h]]
        logits = torch.einsum("bld,bmd->blm", qh, kh) * scale
        p = torch.exp(logits - logits.max(-1, keepdim=True).values)
        out[..., idx[h]] = torch.einsum("blm,bmd->bld", p / p.sum(-1, keepdim=True), vh)
    return out


def hand_attention(q_in, k_in, v_in, w, n_heads, **kw):
    """conditioning.CrossAttention written out: o(attention(q(q_in), k(k_in), v(v_in))) with the float64 weights w."""
    lin = lambda t, n: t @ w[n][0].T + w[n][1]
    y = heads_attention(lin(q_in, "q"), lin(k_in, "k"), lin(v_in, "v"), n_heads, **kw)
    return lin(y, "o")


def swap(module, a, b):
    """A copy of module with the weights (and biases) of submodules a and b exchanged."""
    m = copy.deepcopy(module)
    ma, mb = m.get_submodule(a), m.get_submodule(b)
    with torch.no_grad():
        for name in ("weight", "bias"):
            pa, pb = getattr(ma, name), getattr(mb, name)
            if pa is not None:
                tmp = pa.detach().clone()
                pa.copy_(pb)
                pb.copy_(tmp)
    return m


def module_out(module, *args):
    with torch.no_grad():
        return module(*args)


def assert_far(u, v, what, margin=0.1):
    gap = (u.double() - v.double()).abs().max()
    if os.environ.get("WIRING_SHOW_GAPS"):
        print(f"{what}: {gap:.3f}")
    assert gap > margin, f"{what}: only {gap:.3g} from the right wiring, the case cannot tell them apart"


def check_cross_attention(n_heads):
    attn = set_attention_by_hand(conditioning.CrossAttention(4, n_heads))
    x = torch.tensor([[[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0], [2.0, 2.0, 0.0, -2.0]]])  # 3 queries
    ctx = torch.tensor([[[0.5, 0.0, 1.0, -1.0], [1.5, -2.0, 0.0, 1.0], [-1.0, 1.0, 2.0, 0.0]]])  # 3 context tokens
    w = weights64(attn)
    expected = hand_attention(x.double(), ctx.double(), ctx.double(), w, n_heads)
    out = module_out(attn, x, ctx)
    assert torch.allclose(out.double(), expected, atol=1e-5), (out, expected)
    assert_far(expected, module_out(swap(attn, "q", "k"), x, ctx), "q/k weights swapped")
    assert_far(expected, module_out(swap(attn, "k", "v"), x, ctx), "k/v weights swapped")
    xd, cd = x.double(), ctx.double()
    assert_far(out, hand_attention(xd, xd, xd, w, n_heads), "k and v from the queries (self-attention)")
    assert_far(out, hand_attention(xd, xd, cd, w, n_heads), "k from the queries")
    assert_far(out, hand_attention(xd, cd, xd, w, n_heads), "v from the queries")
    assert_far(out, hand_attention(cd, xd, xd, w, n_heads), "queries and context exchanged")
    if n_heads > 1:
        assert_far(out, hand_attention(xd, cd, cd, w, n_heads, split="interleaved"), "heads split interleaved")
        assert_far(out, hand_attention(xd, cd, cd, w, n_heads, scale=0.5), "scale 1/sqrt(full width)")

class TestConditioning:
    """DexAC and the MLP baselines: identity at initialization, every parameter and input used, the official
    action-conditioned layout and formula, normalization with statistics that travel with the weights."""

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_identity_at_initialization(self, tmp_path, mode):
        base, model = load_with_actions(tmp_path, mode)
        x, sigma, text, mask, actions = action_batch()
        with torch.no_grad():
            expected = base(x, sigma, text, frame_mask=mask)
            assert torch.equal(model(x, sigma, text, frame_mask=mask, actions=actions), expected)

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_new_modules_are_initialized_after_loading(self, tmp_path, mode):
        """The identity above holds because the new modules were initialized after to_empty, not because they
        are all zero or garbage: finite, and zero exactly where a fresh module is."""
        _, model = load_with_actions(tmp_path, mode)
        fresh = conditioning.build_action_cond(mode, DIT_SMALL.dim, DIT_SMALL.n_heads, width=32)
        loaded = dict(model.action_cond.named_parameters())
        for name, p in fresh.named_parameters():
            assert torch.isfinite(loaded[name]).all(), name
            assert (loaded[name] == 0).all() == (p == 0).all(), name

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_every_new_parameter_learns_within_two_steps(self, tmp_path, mode):
        _, model = load_with_actions(tmp_path, mode)
        learned, params = train_steps(model, 2)
        assert learned == params, f"no gradient in two steps: {sorted(params - learned)}"

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_no_action_dimension_or_step_ignored(self, tmp_path, mode):
        _, model = load_with_actions(tmp_path, mode)
        train_steps(model, 3)
        x, sigma, text, mask, actions = action_batch(seed=99)
        actions.requires_grad_(True)
        out = model(x, sigma, text, frame_mask=mask, actions=actions)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        sensitivity = actions.grad.abs().sum(0)  # (T_a, N_ACT)
        assert (sensitivity.sum(0) > 0).all(), f"ignored dimensions: {torch.nonzero(sensitivity.sum(0) == 0).flatten()}"
        assert (sensitivity > 0).all(), f"ignored (step, dimension) entries: {torch.nonzero(sensitivity == 0).tolist()}"

    def test_mlp_loads_official_action_cond_layout_and_matches_official_formula(self, tmp_path):
        """One official action-conditioned checkpoint, loaded with action_mode mlp: the output equals diffusers'
        DiT with Cosmos' action injection written out by hand, the actions change it far beyond that error, and
        the weights export back to the official names."""
        B, T, H, W = ACTION_GRID
        base = randomize(M.DiT(DIT_SMALL), seed=4).eval()
        sd = official_action_file(base, tmp_path / "action_cond.pt")
        config = replace(DIT_SMALL, action_mode="mlp", action_dim=7, action_norm="scale")  # the default factors
        model = M.load_dit(str(tmp_path / "action_cond.pt"), config).eval()
        g = torch.Generator().manual_seed(6)
        x, text = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 5, DIT_SMALL.text_dim, generator=g)
        actions = torch.randn(B, T_ACT, 7, generator=g) * 0.05
        mask = torch.zeros(B, T)
        mask[:, 0] = 1
        sigma = torch.rand(B, 1).expand(B, T).clone()
        sigma[:, 0] = 1e-4

        # the official formula: xyz/rpy deltas x20 and the absolute gripper x1, 4 actions per latent frame,
        # GELU-tanh MLPs, zero for frame 0
        a = (actions * torch.tensor([20.0, 20, 20, 20, 20, 20, 1])).reshape(B, T - 1, 4 * 7)
        mlp = lambda p: F.linear(F.gelu(F.linear(a, sd[p + "fc1.weight"], sd[p + "fc1.bias"]), approximate="tanh"),
                                 sd[p + "fc2.weight"], sd[p + "fc2.bias"])
        zero_first = lambda e: torch.cat([torch.zeros_like(e[:, :1]), e], dim=1)
        emb_d, emb_3d = zero_first(mlp("net.action_embedder_B_D.")), zero_first(mlp("net.action_embedder_B_3D."))
        ref = diffusers_cosmos(DIT_SMALL)
        ref.load_state_dict(M.state_dict_as(base.state_dict(), "diffusers", DIT_SMALL.n_blocks), strict=True)
        ref.time_embed = OfficialActionTimeEmbed(ref.time_embed, emb_d, emb_3d)
        with torch.no_grad():
            out = model(x, sigma, text, frame_mask=mask, actions=actions)
            expected = ref(x, sigma.view(B, 1, T, 1, 1), text,
                           condition_mask=mask[:, None, :, None, None].expand(B, 1, T, H, W),
                           padding_mask=torch.zeros(1, 1, H, W), return_dict=False)[0]
            without = base(x, sigma, text, frame_mask=mask)
        rel = (out - expected).abs().max() / expected.abs().max()
        assert rel < 2e-6, f"relative error {rel:.2e}"
        assert (out - without).abs().max() > 100 * (out - expected).abs().max()  # the actions matter here
        # and our weights export back to the official names
        exported = M.state_dict_as(model.state_dict(), "official", DIT_SMALL.n_blocks)
        assert torch.equal(exported["action_embedder_B_3D.fc2.weight"], sd["net.action_embedder_B_3D.fc2.weight"])

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_conditional_frames_receive_no_action_signal(self, mode):
        """Conditional frames (not only the first, and per sample) get no action signal, while every predicted
        frame does; modes without local injection leave the tokens alone."""
        B, T, _, _ = ACTION_GRID
        module = randomize(conditioning.build_action_cond(mode, DIT_SMALL.dim, DIT_SMALL.n_heads, width=32))
        module.set_stats(*random_action_stats())
        _, _, _, _, actions = action_batch()
        x = torch.randn(B, T, 2, 3, DIT_SMALL.dim)
        mask = torch.tensor([[1.0, 0, 1, 0], [1, 1, 0, 0]])  # other conditional frames than the first, per sample
        with torch.no_grad():
            x_out, emb_d, emb_3d = module(actions, x, mask)
        cond = mask.bool()
        assert torch.equal(x_out[cond], x[cond])
        for e in (emb_d, emb_3d):
            if e is not None:
                assert e.shape[:2] == (B, T) and torch.all(e[cond] == 0)
                assert torch.all(e[~cond].abs().amax(-1) > 0)  # ...while every predicted frame gets a signal
        if mode in ("mlp", "mlp-flat", "dexac-no-local"):
            assert torch.equal(x_out, x)
        else:
            assert torch.all((x_out - x)[~cond].abs().flatten(1).amax(1) > 0)

    def test_zscore_normalization(self):
        mean, std = random_action_stats()
        _, _, _, _, a = action_batch()
        norm = conditioning.ActionNorm(N_ACT)
        norm.set_stats(mean, std)
        assert torch.allclose(norm(a), (a - mean) / (std + 1e-6))

    @pytest.mark.parametrize("mode,factor", [("scale", 200), ("none", 1)])
    def test_scale_and_no_normalization(self, mode, factor):
        _, _, _, _, a = action_batch()
        assert torch.equal(conditioning.ActionNorm(N_ACT, mode)(a), a * factor)

    def test_scale_takes_one_factor_per_dimension(self):
        """action_norm "scale" with a vector: each dimension by its own factor; the released robot model's 7-D
        actions default to x20 on the six xyz/rpy deltas and x1 on the absolute gripper state."""
        _, _, _, _, a = action_batch()
        factors = torch.linspace(0.5, 3, N_ACT)
        assert torch.equal(conditioning.ActionNorm(N_ACT, "scale", factors.tolist())(a), a * factors)
        with pytest.raises(ValueError, match=f"action_scale has 3 factors for {N_ACT} action dimensions"):
            conditioning.ActionNorm(N_ACT, "scale", [1, 2, 3])
        robot = conditioning.build_action_cond("mlp", 64, 4, n_dims=7, steps=4, norm="scale")
        gripper = torch.zeros(1, 4, 7)
        gripper[..., 6] = 1.0  # the gripper state alone
        assert torch.equal(robot.norm(gripper), gripper)
        assert torch.equal(robot.norm(gripper.roll(1, -1)), gripper.roll(1, -1) * 20)  # an xyz delta: x20
        assert conditioning.build_action_cond("dexac", 64, 4, norm="scale", width=32).norm.scale == 200.0

    def test_zscore_inside_a_module_equals_normalized_actions(self):
        """zscore on raw actions == no normalization on normalized actions, same weights."""
        B, T, _, _ = ACTION_GRID
        mean, std = random_action_stats()
        _, _, _, _, a = action_batch()
        x, mask = torch.randn(B, T, 2, 3, DIT_SMALL.dim), torch.zeros(B, T)
        z = randomize(conditioning.build_action_cond("dexac", DIT_SMALL.dim, DIT_SMALL.n_heads, width=32))
        z.set_stats(mean, std)
        plain = conditioning.build_action_cond("dexac", DIT_SMALL.dim, DIT_SMALL.n_heads, norm="none", width=32)
        plain.load_state_dict(z.state_dict())
        with torch.no_grad():
            for u, v in zip(z(a, x, mask), plain((a - mean) / (std + 1e-6), x, mask)):
                assert torch.allclose(u, v, atol=1e-5)

    def test_statistics_travel_with_the_state_dict(self, tmp_path):
        src, loaded, mean, std, _ = dexac_saved_and_loaded(tmp_path)
        assert all(torch.equal(u, v) for u, v in zip(loaded.action_cond.norm.stats(), (mean, std)))
        x, sigma, text, mask, actions = action_batch()
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, text, frame_mask=mask, actions=actions),
                               src(x, sigma, text, frame_mask=mask, actions=actions))

    def test_layout_travels_with_the_state_dict_and_another_is_refused(self, tmp_path):
        _, loaded, _, _, layout = dexac_saved_and_loaded(tmp_path)
        loaded.action_cond.norm.check_layout(layout)
        with pytest.raises(ValueError, match="another action layout"):
            loaded.action_cond.norm.check_layout({"dim": N_ACT, "names": ["other"]})

    def test_statistics_stay_exact_in_bf16(self, tmp_path):
        """Casting the model to bf16 leaves the statistics exact."""
        _, loaded, mean, _, _ = dexac_saved_and_loaded(tmp_path)
        loaded.to(torch.bfloat16)
        assert torch.equal(loaded.action_cond.norm.stats()[0], mean)

    def test_stats_json_sets_the_statistics_of_a_pretrained_backbone(self, tmp_path):
        """A stats.json (as `python data.py stats` writes it) given to load_dit sets them on a pretrained backbone."""
        mean, std, layout = stats_near_bf16_rounding()
        (tmp_path / "stats.json").write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist(),
                                                         "layout": layout}))
        official_pt(randomize(M.DiT(DIT_SMALL)), tmp_path / "base.pt")
        model = M.load_dit(str(tmp_path / "base.pt"), action_config("dexac"),
                           action_stats=str(tmp_path / "stats.json"))
        assert torch.equal(model.action_cond.norm.stats()[0], mean) and int(model.action_cond.norm.has_stats) == 1
        assert int(model.action_cond.norm.layout_id) == conditioning.layout_fingerprint(layout)

    @pytest.mark.parametrize("case", list(ACTION_BAD_INPUTS))
    def test_bad_input_is_one_clear_error(self, case, tmp_path):
        call, error, message = ACTION_BAD_INPUTS[case]
        with pytest.raises(error, match=message):
            call(tmp_path)

    def test_cosmos2b_action_parameter_counts(self):
        with torch.device("meta"):
            base = M.DiT(M.config_from_preset("cosmos2b"))
            flat = M.DiT(M.config_from_preset("cosmos2b", action_mode="mlp-flat"))
        count = lambda m: sum(p.numel() for p in m.parameters())
        assert count(base) == 2_059_174_912
        assert count(flat) - count(base) == 684 * 8192 + 8192 + 8192 * 2048 + 2048  # the paper's 22.39M

    def test_cosmos2b_mlp_action_keys_are_the_official_ones(self):
        with torch.device("meta"):
            chunk = M.DiT(M.config_from_preset("cosmos2b", action_mode="mlp", action_dim=7))
        official = {k: tuple(v.shape) for k, v in M.state_dict_as(chunk.state_dict(), "official", 28).items()}
        assert {k: v for k, v in official.items() if "action" in k} == {
            "action_embedder_B_D.fc1.weight": (8192, 28), "action_embedder_B_D.fc1.bias": (8192,),
            "action_embedder_B_D.fc2.weight": (2048, 8192), "action_embedder_B_D.fc2.bias": (2048,),
            "action_embedder_B_3D.fc1.weight": (8192, 28), "action_embedder_B_3D.fc1.bias": (8192,),
            "action_embedder_B_3D.fc2.weight": (6144, 8192), "action_embedder_B_3D.fc2.bias": (6144,)}

    def test_cost_table(self):
        rows = bench.costs()
        assert rows["SAT"] == (2 * 256 + 13, 2 * 12 * 57 * 256)  # Linear(1 -> C) per entry, fusion over 12 steps
        assert rows["global attention"][0] == 4 * (256 * 256 + 256) + 256 + 256 * 8192 + 8192  # the paper's 2.37M
        assert rows["MLP action embed (mlp-flat)"][1] == 684 * 8192 + 8192 * 2048  # multiply-accumulates
        parts = ["SAT", "  + per-dimension embedding (ours)", "local attention", "global attention"]
        assert rows["full DexAC"][0] == sum(rows[k][0] for k in parts)

    # wiring: locality, at the conditioning module's outputs

    def test_per_channel_fusion_tells_equal_sum_trajectories_apart(self):
        """DESIGN.md section 4: the faithful SAT is rank one in time. Two 12-step trajectories whose fused
        weighted sums agree (they differ by +1 at steps 0 and 1, whose fusion weights are +1 and -1) condition
        the faithful `dexac` identically, bit for bit (x, emb_d, emb_3d: dyadic tokenizer weights and integer
        actions make every sum exact); `dexac-channel`'s fusion weights (T_a, C) tell them apart, as `mlp` does."""
        g = torch.Generator().manual_seed(0)
        dyadic = lambda *shape: torch.randint(-8, 9, shape, generator=g).float() / 4
        a = torch.randint(-3, 4, (1, T_ACT, N_ACT), generator=g).float()
        b = a.clone()
        b[:, :2] += 1  # the same weighted sum under the faithful weights below, another trajectory
        x = torch.randn(1, 4, 2, 3, 64, generator=g)
        mask = torch.tensor([[1.0, 0, 0, 0]])
        outputs = {}
        for mode in ("dexac", "dexac-channel", "mlp"):
            cond = randomize(conditioning.build_action_cond(mode, 64, 2, norm="none", width=32), seed=1)
            if mode != "mlp":
                tok = cond.tokenizer
                with torch.no_grad():
                    for p in (tok.entry.weight, tok.entry.bias, tok.fuse.weight, tok.fuse.bias):
                        p.copy_(dyadic(*p.shape))
                    if mode == "dexac":
                        tok.fuse.weight[0, :2] = torch.tensor([1.0, -1.0])
            with torch.no_grad():
                outputs[mode] = [cond(acts, x, mask) for acts in (a, b)]
        for mode, (out_a, out_b) in outputs.items():
            same = [(u is None and v is None) or torch.equal(u, v) for u, v in zip(out_a, out_b)]
            if mode == "dexac":
                assert all(same), same
            else:
                assert not any(same[i] for i in range(3) if out_a[i] is not None and i in (
                    (0, 1, 2) if mode == "dexac-channel" else (1, 2))), (mode, same)
                assert (out_a[1] - out_b[1]).abs().max() > 1e-3  # not a rounding difference

    def test_every_mode_has_a_known_grouping(self):
        """Every mode in conditioning.MODES is classified in GROUPING and SIGNALS (a new mode must say how it groups
        actions and what it conditions), and the module agrees: the frame-by-frame modes are exactly those built
        `framewise`, with 4 actions per frame."""
        assert set(GROUPING) == set(conditioning.MODES) == set(SIGNALS)
        for mode, kind in GROUPING.items():
            module = conditioning.build_action_cond(mode, 8, 2, width=8)
            assert module.framewise == (kind == "frame"), mode
            assert not module.framewise or module.per_frame == PER_FRAME, mode

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_each_action_step_reaches_exactly_its_latent_frames(self, mode):
        """Changing one action step s of one sample changes what that sample's latent frames of step s receive
        (mlp, dexac-time: frame 1 + s // 4 only; the other modes: every predicted frame) in tokens and AdaLN
        terms, and leaves conditional frames, every other frame and the other sample bit-identical."""
        module = conditioning_module(mode)
        actions, x = wiring_inputs()
        before = received(module, actions, x)
        for b in range(WB):
            for s in range(T_ACT):
                frames = frames_of_step(mode, s) - set(torch.nonzero(MASK[b]).flatten().tolist())
                after = received(module, nudge(actions, b, s, seed=s), x)
                assert_only_frames_change(before, after, b, frames, f"{mode}: step {s} of sample {b}")

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_each_latent_frame_refines_only_its_own_tokens(self, mode):
        """Changing the tokens of one latent frame changes that frame's refined tokens only (modes with local
        refinement; none changes in the others), and never the AdaLN terms: no mode mixes tokens across frames or
        samples."""
        module = conditioning_module(mode)
        actions, x = wiring_inputs()
        before = received(module, actions, x)
        before_x = before.get("x")
        for b in range(WB):
            for f in range(WT):
                x2 = x.clone()
                x2[b, f] += torch.randn(x2[b, f].shape, generator=torch.Generator().manual_seed(f))
                after = received(module, actions, x2)
                if "x" in after:  # the refinement's update, not the tokens themselves
                    before["x"], after["x"] = before_x - x, after["x"] - x2
                refined = "x" in SIGNALS[mode] and not MASK[b, f]
                for k in before:  # the AdaLN terms never depend on the tokens
                    at = {f} if refined and k == "x" else set()
                    assert_only_frames_change({k: before[k]}, {k: after[k]}, b, at, f"{mode}: x of {b},{f}")

    @pytest.mark.parametrize("mode", [m for m in ACTION_MODES if GROUPING.get(m) == "chunk"])
    def test_whole_chunk_modes_give_every_predicted_frame_the_same_signal(self, mode):
        """Modes that condition on the whole chunk: every predicted frame of a sample gets the same AdaLN terms,
        and tokens that are equal in two frames get the same refinement (they query the same action tokens)."""
        module = conditioning_module(mode)
        actions, x = wiring_inputs()
        x[:, 3] = x[:, 1]
        out = received(module, actions, x)
        for name, e in out.items():
            assert torch.equal(e[0, 1], e[0, 3]), name
            if name != "x":
                assert torch.equal(e[0, 1], e[0, 2]), name

    @pytest.mark.parametrize("mode", [m for m in ACTION_MODES if GROUPING.get(m) == "frame"])
    def test_framewise_modes_follow_the_action_windows(self, mode):
        """Frame-by-frame modes: two predicted frames with equal tokens receive the same conditioning exactly when
        their action windows (steps 4(f-1)..4f-1) are equal; swapping two windows swaps what the frames receive."""
        module = conditioning_module(mode)
        actions, x = wiring_inputs()
        x[:, 3] = x[:, 1]
        out = received(module, actions, x)
        assert all((e[0, 1] - e[0, 3]).abs().max() > 1e-3 * e[0, 1].abs().max() for e in out.values())
        same = actions.clone()
        same[:, 8:12] = same[:, 0:4]  # frame 3's window := frame 1's
        out = received(module, same, x)
        assert all(same_up_to_rounding(e[:, 1], e[:, 3]) for e in out.values())
        swapped = actions.clone()
        swapped[:, 0:4], swapped[:, 8:12] = actions[:, 8:12], actions[:, 0:4]
        x_sw = x.clone()
        x_sw[:, 2] = torch.randn(x_sw[:, 2].shape, generator=torch.Generator().manual_seed(5))
        a, b = received(module, actions, x_sw), received(module, swapped, x_sw)
        for name in a:
            assert same_up_to_rounding(a[name][:, 1], b[name][:, 3]), name
            assert same_up_to_rounding(a[name][:, 3], b[name][:, 1]), name
            assert same_up_to_rounding(a[name][:, 2], b[name][:, 2]), name

    # wiring: locality, through the whole DiT

    @staticmethod
    def dit_and_inputs(mode):
        model = randomize(M.DiT(action_config(mode)), seed=2).eval()
        model.action_cond.set_stats(*random_action_stats())
        g = torch.Generator().manual_seed(3)
        lat = torch.randn(WB, DIT_SMALL.in_channels, WT, 2 * WH, 2 * WW, generator=g)
        sigma = torch.rand(WB, generator=g)
        text = torch.randn(WB, 3, DIT_SMALL.text_dim, generator=g)
        actions, _ = wiring_inputs()
        return model, lat, sigma, text, actions

    @pytest.mark.parametrize("mode", ACTION_MODES)
    def test_dit_blocks_receive_each_step_at_its_latent_frames(self, mode):
        """Inside the full DiT forward, what every block and the final layer receive per latent frame (tokens,
        AdaLN input emb, AdaLN-LoRA term) changes, when one action step changes, at that step's latent frames only
        (the conditional ones excluded); everything else is bit-identical."""
        model, lat, sigma, text, actions = self.dit_and_inputs(mode)
        seen = {}

        def grab(name):
            def hook(_, args):
                x, emb, lora = args[:3]
                seen[name] = {"emb": emb.detach().clone(), "lora": lora.detach().clone()}
                if name == "blocks.0":  # later blocks' tokens carry the self-attention's mixing across frames
                    seen[name]["x"] = x.detach().clone()
            return hook

        hooks = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules()
                 if n in ("final",) or (n.startswith("blocks.") and n.count(".") == 1)]
        try:
            def run(a):
                with torch.no_grad():
                    model(lat, sigma, text, frame_mask=MASK, actions=a)
                return {f"{n}.{k}": v for n, d in seen.items() for k, v in d.items()}
            conditioned = {k: name in SIGNALS[mode] for k, name in (("x", "x"), ("emb", "emb_d"), ("lora", "emb_3d"))}
            before = run(actions)
            assert len(before) == 2 * (DIT_SMALL.n_blocks + 1) + 1
            for b in range(WB):
                for s in (0, 5, 11):
                    frames = frames_of_step(mode, s) - set(torch.nonzero(MASK[b]).flatten().tolist())
                    after = run(nudge(actions, b, s, seed=s))
                    for k in before:  # a mode leaves alone what it does not condition (tokens, emb, lora)
                        at = frames if conditioned[k.rsplit(".", 1)[1]] else set()
                        assert_only_frames_change({k: before[k]}, {k: after[k]}, b, at, f"{mode}: step {s}")
        finally:
            for h in hooks:
                h.remove()

    @pytest.mark.parametrize("mode", [m for m in ACTION_MODES if GROUPING.get(m) == "frame"])
    def test_dit_output_changes_only_at_the_actions_frame_without_temporal_mixing(self, mode):
        """With the self-attention's output projection zeroed (the DiT's only path between latent frames), one
        changed action step changes the DiT's output at its latent frame only, in its sample only; with the
        self-attention on, the change spreads to the other frames (so the zeroing is what makes frames local)."""
        model, lat, sigma, text, actions = self.dit_and_inputs(mode)
        run = lambda a: model(lat, sigma, text, frame_mask=MASK, actions=a).detach()
        with torch.no_grad():
            mixed_before, mixed_after = run(actions), run(nudge(actions, 0, 5))
            for blk in model.blocks:
                blk.self_attn.o.weight.zero_()
        assert (mixed_before - mixed_after)[0, :, 1].abs().max() > 0  # frame 1 hears of frame 2's actions
        before = run(actions)
        for b in range(WB):
            for s in range(T_ACT):
                after = run(nudge(actions, b, s, seed=s))
                frames = frames_of_step(mode, s) - set(torch.nonzero(MASK[b]).flatten().tolist())
                # (WB, C, WT, WH, WW) -> frames along dim 1, as assert_only_frames_change expects
                assert_only_frames_change({"out": before.transpose(1, 2)}, {"out": after.transpose(1, 2)}, b,
                                          frames, f"{mode}: step {s} of sample {b}")

    # wiring: hand-computed attention

    def test_cross_attention_one_head_by_hand(self):
        """conditioning.CrossAttention, 1 head, hand-set weights: equals softmax(q k^WT / sqrt(d)) v o, written out
        in float64; the module with q/k or k/v weights swapped, and the formula with k/v fed from the queries, are
        each far (> 0.1) from it."""
        check_cross_attention(n_heads=1)

    def test_cross_attention_two_heads_by_hand(self):
        """conditioning.CrossAttention, 2 heads of width 2, hand-set weights: equals the per-head formula in
        float64 (head h on channels 2h..2h+1, scale 1/sqrt(2)); swapped q/k or k/v weights, k/v fed from the
        queries, heads split the other way, and the scale of the full width are each far (> 0.1) from it."""
        check_cross_attention(n_heads=2)

    def test_local_refinement_by_hand(self):
        """LocalRefinement (eq. 7): update = CrossAttn(q = LayerNorm(x) (no affine, eps 1e-6), kv = proj(tokens)),
        hand-computed in float64; the module with k/v swapped, and the formula without the LayerNorm on the
        queries or with the queries and the tokens' roles swapped, are far from it."""
        D, Cw = 4, 3
        m = conditioning.LocalRefinement(Cw, D, 2)
        set_attention_by_hand(m.attn)
        with torch.no_grad():
            m.proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0]]))
            m.proj.bias.copy_(torch.tensor([0.0, 0.5, 0, -0.5]))
        x = torch.tensor([[[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0], [2.0, 2.0, 0.0, -2.0]]])
        tokens = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 1.5]]])
        P = lambda t: t.double() @ m.proj.weight.double().T + m.proj.bias.double()
        ln = lambda t: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
        w = weights64(m.attn)
        expected = hand_attention(ln(x.double()), P(tokens), P(tokens), w, 2)
        with torch.no_grad():
            out = m(x, tokens)
        assert torch.allclose(out.double(), expected, atol=1e-5), (out, expected)
        assert_far(expected, module_out(swap(m, "attn.k", "attn.v"), x, tokens), "k/v weights swapped")
        assert_far(out, hand_attention(x.double(), P(tokens), P(tokens), w, 2), "no LayerNorm on q")
        # the roles of the (normalized) latent tokens and the projected action tokens exchanged
        assert_far(out, hand_attention(P(tokens), ln(x.double()), ln(x.double()), w, 2), "q from the actions")

    def test_global_modulation_by_hand(self):
        """GlobalModulation (eq. 8-9): g = CrossAttn(q = the learned query, kv = tokens), (to_d(g), to_3d(g)),
        hand-computed in float64 with 2 heads; the module with k/v or q/k swapped is far from it."""
        Cw, D = 4, 2
        m = conditioning.GlobalModulation(Cw, D, n_heads=2)
        set_attention_by_hand(m.attn)
        with torch.no_grad():
            m.query.copy_(torch.tensor([[[1.0, -1.0, 2.0, 0.5]]]))
            m.to_d.weight.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 1, -1, 0]]))
            m.to_d.bias.copy_(torch.tensor([0.1, -0.1]))
            m.to_3d.weight.copy_(torch.arange(24.0).view(6, 4) / 10 - 1)
            m.to_3d.bias.copy_(torch.linspace(-1, 1, 6))
        tokens = torch.tensor([[[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0], [2.0, 2.0, 0.0, -2.0]],
                               [[0.5, 0.0, 1.0, -1.0], [1.5, -2.0, 0.0, 1.0], [-1.0, 1.0, 2.0, 0.0]]])
        w = weights64(m.attn)
        g = hand_attention(m.query.double().expand(2, 1, Cw), tokens.double(), tokens.double(), w, 2)[:, 0]
        lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()
        with torch.no_grad():
            d, d3 = m(tokens)
        assert torch.allclose(d.double(), lin(m.to_d, g), atol=1e-5)
        assert torch.allclose(d3.double(), lin(m.to_3d, g), atol=1e-5)
        for a, b in (("attn.k", "attn.v"), ("attn.q", "attn.k")):
            with torch.no_grad():
                d_sw, d3_sw = swap(m, a, b)(tokens)
            assert_far(torch.cat([d, d3], -1), torch.cat([d_sw, d3_sw], -1), f"{a}/{b} swapped")

    def test_dit_attention_with_qk_rmsnorm_by_hand(self):
        """model.Attention (the DiT's, which the action context reaches), 2 heads: per-head RMSNorm (learned weight,
        eps 1e-6) on q and k, no biases, equals the formula in float64; swapped q/k or k/v weights, and the norm
        applied to v instead of k, are far from it."""
        m = M.Attention(4, 3, 2)
        with torch.no_grad():
            m.q.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [1, 0, -1, 0]]))
            m.k.weight.copy_(torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 2], [1, 1, 0]]))
            m.v.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 3, 0], [2, 0, 1]]))
            m.o.weight.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 2]]))
            m.q_norm.weight.copy_(torch.tensor([2.0, 0.5]))
            m.k_norm.weight.copy_(torch.tensor([1.5, -1.0]))
        x = torch.tensor([[[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0]]])
        ctx = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 1.5]]])
        wq, wk, wv, wo = (getattr(m, n).weight.double() for n in "qkvo")
        nq, nk = m.q_norm.weight.double(), m.k_norm.weight.double()

        def rms(t, weight):  # per head of width 2
            t = t.view(*t.shape[:-1], 2, 2)
            return (t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * weight).flatten(-2)

        def formula(k_norm_on_v=False):
            q, k, v = rms(x.double() @ wq.T, nq), ctx.double() @ wk.T, ctx.double() @ wv.T
            k, v = (k, rms(v, nk)) if k_norm_on_v else (rms(k, nk), v)
            return heads_attention(q, k, v, 2) @ wo.T

        with torch.no_grad():
            out = m(x, ctx)
            assert torch.allclose(out.double(), formula(), atol=1e-5), (out, formula())
            # (q and k take inputs of different widths here: the q/k swap is checked on a self-attention below)
            assert_far(out, swap(m, "k", "v")(x, ctx), "k/v weights swapped")
            assert_far(out, formula(k_norm_on_v=True), "RMSNorm on v instead of k")
            self_m = M.Attention(4, 4, 2)
            self_m.load_state_dict({**{k: v for k, v in m.state_dict().items() if not k.startswith(("k.", "v."))},
                                    "k.weight": m.q.weight.detach().flip(0), "v.weight": m.o.weight.detach()})
            assert_far(self_m(x), swap(self_m, "q", "k")(x), "q/k weights swapped (self-attention)")


# =====================================================================================================================
# model.py: the DiT against diffusers' CosmosTransformer3DModel, rectified flow and its samplers, official weights

@pytest.fixture(scope="module")
def dit_and_diffusers():
    """A DIT_SMALL with random weights and diffusers' model holding the same weights under its own names."""
    ours = randomize(M.DiT(DIT_SMALL)).eval()
    ref = diffusers_cosmos(DIT_SMALL)
    ref.load_state_dict(M.state_dict_as(ours.state_dict(), "diffusers", DIT_SMALL.n_blocks), strict=True)
    return ours, ref


def official_keys(D=2048, blocks=28, head_dim=128, latent=16, context=1024, text=100352, lora=256):
    """The official Predict2.x DiT key set and shapes (DESIGN.md section 1), written out independently of the
    project's key table: width D, latent channels in and out, patch (1, 2, 2), the condition and padding masks
    concatenated to the input."""
    keys = {"x_embedder.proj.1.weight": (D, (latent + 2) * 4), "t_embedder.1.linear_1.weight": (D, D),
            "t_embedder.1.linear_2.weight": (3 * D, D), "t_embedding_norm.weight": (D,),
            "crossattn_proj.0.weight": (context, text), "crossattn_proj.0.bias": (context,),
            "final_layer.adaln_modulation.1.weight": (lora, D),
            "final_layer.adaln_modulation.2.weight": (2 * D, lora), "final_layer.linear.weight": (latent * 4, D)}
    for i in range(blocks):
        b = f"blocks.{i}."
        for p in "qkv":
            keys[b + f"self_attn.{p}_proj.weight"] = (D, D)
            keys[b + f"cross_attn.{p}_proj.weight"] = (D, D if p == "q" else context)
        for a in ("self_attn", "cross_attn"):
            keys[b + f"{a}.output_proj.weight"] = (D, D)
            keys[b + f"{a}.q_norm.weight"] = keys[b + f"{a}.k_norm.weight"] = (head_dim,)
            keys[b + f"adaln_modulation_{a}.1.weight"] = (lora, D)
            keys[b + f"adaln_modulation_{a}.2.weight"] = (3 * D, lora)
        keys[b + "adaln_modulation_mlp.1.weight"], keys[b + "adaln_modulation_mlp.2.weight"] = (lora, D), (3 * D, lora)
        keys[b + "mlp.layer1.weight"], keys[b + "mlp.layer2.weight"] = (4 * D, D), (D, 4 * D)
    return keys


SMALL_OFFICIAL = dict(D=64, blocks=2, head_dim=32, latent=16, context=32, text=48, lora=16)  # DIT_SMALL's sizes


def random_official_file(path, seed=0, std=0.2):
    """A random-weight DIT_SMALL checkpoint in the official .pt layout, built from official_keys alone (not from
    the project's key table): "net."-prefixed names plus the buffers and counters a loader must ignore."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"net.{k}": torch.randn(shape, generator=g) * std + (1.0 if len(shape) == 1 else 0.0)
          for k, shape in official_keys(**SMALL_OFFICIAL).items()}
    sd["net.pos_embedder.seq"] = torch.arange(10.0)
    sd["net.accum_video_sample_counter"] = torch.tensor(3)
    sd["net.blocks.0.self_attn.q_proj._extra_state"] = torch.tensor(0)
    torch.save(sd, path)
    return sd


def dit_inputs(B=2, T=3, H=6, W=10, seed=1):
    """Inputs for DIT_SMALL and diffusers' model: latents, per-frame sigma, text, frame 0 conditional, a padding mask.
    -> (ours' kwargs, diffusers' kwargs)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, DIT_SMALL.in_channels, T, H, W, generator=g)
    text = torch.randn(B, 7, DIT_SMALL.text_dim, generator=g)
    sigma = torch.rand(B, T, generator=g)
    frame_mask = torch.zeros(B, T)
    frame_mask[:, 0] = 1
    padding = (torch.rand(1, 1, H, W, generator=g) > 0.5).float()
    ours = dict(x=x, sigma=sigma, text=text, frame_mask=frame_mask, padding_mask=padding.expand(B, -1, -1, -1))
    theirs = dict(hidden_states=x, timestep=sigma.view(B, 1, T, 1, 1), encoder_hidden_states=text,
                  condition_mask=frame_mask[:, None, :, None, None].expand(B, 1, T, H, W), padding_mask=padding,
                  return_dict=False)
    return ours, theirs


MIX_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
MIX_STD, MIX_W = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
# ^ a mixture of three isotropic 2-D Gaussians: means, standard deviations, weights


def mixture_velocity(x, sigma):
    """E[eps - x0 | x_sigma] for x0 ~ mixture of isotropic Gaussians; x (B, 2, 1, 1, 1), sigma (B, 1)."""
    z, s = x.flatten(1).double(), sigma[:, :1].double()  # (B, 2), (B, 1)
    var = (1 - s) ** 2 * MIX_STD**2 + s**2  # (B, K): Var[x_sigma | k] per coordinate
    diff = z[:, None, :] - (1 - s)[:, :, None] * MIX_MEANS  # (B, K, 2)
    logp = torch.log(MIX_W) - diff.square().sum(-1) / (2 * var) - torch.log(var)
    post = torch.softmax(logp, dim=1)  # p(k | x)
    e_x0 = MIX_MEANS + ((1 - s) * MIX_STD**2 / var)[..., None] * diff
    e_eps = (s / var)[..., None] * diff
    return (post[..., None] * (e_eps - e_x0)).sum(1).view_as(x).to(x.dtype)


MIXTURE_STEPS = (5, 10, 20, 35, 70, 140, 280, 560, 1120, 2240)


@pytest.fixture(scope="module")
def mixture_errors():
    """{(solver, steps): mean distance of its samples to the exact ODE solution} on the official shifted schedule,
    for 400 noise draws. The exact solution is SciPy's DOP853 (order 8, adaptive) integrating dx/ds = v(x, s) from
    the schedule's first sigma to 0 at tolerance 1e-12, an integrator that shares nothing with ours."""
    from scipy.integrate import solve_ivp
    n = 400
    noise = torch.randn(n, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s0 = M.shifted_sigmas(1)[0].item()  # 0.9998 at any step count

    def f(s, y):
        x = torch.from_numpy(y).view(n, 2, 1, 1, 1)
        return mixture_velocity(x, torch.full((n, 1), s, dtype=torch.float64)).flatten().numpy()

    sol = solve_ivp(f, (s0, 0.0), (noise * s0).flatten().numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    exact = torch.from_numpy(sol.y[:, -1]).view_as(noise)
    errors = {}
    for solver in M.SOLVERS:
        for steps in MIXTURE_STEPS:
            x = M.sample(mixture_velocity, noise, M.shifted_sigmas(steps), solver=solver)
            errors[solver, steps] = (x - exact).flatten(1).norm(dim=1).mean().item()
    return errors


def zero_prediction_flow_loss():
    """flow_loss of a model that predicts zero, on 4096 3-frame clips whose frame 0 is conditional ->
    (x0, what the model saw, loss, sigma)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 2, 3, 1, 1, generator=g)
    mask = torch.zeros(4096, 3)
    mask[:, 0] = 1
    seen = {}

    def model_fn(x_in, sigma):
        seen["x_in"], seen["sigma"] = x_in, sigma
        return torch.zeros_like(x_in)

    loss, sigma = M.flow_loss(model_fn, x0, mask, cond_sigma=0.1, generator=g)
    return x0, seen, loss, sigma


DIT_BAD_INPUTS = {  # case -> (call, exception, message)
    "channels": (lambda: M.DiT(DIT_SMALL)(torch.randn(1, 15, 1, 4, 4), torch.rand(1), torch.randn(1, 3, 48)),
                 ValueError, r"expected latents \(B, 16, T, H, W\)"),
    "patch_size": (lambda: M.DiT(DIT_SMALL)(torch.randn(1, 16, 1, 5, 4), torch.rand(1), torch.randn(1, 3, 48)),
                   ValueError, "must be divisible by the patch size"),
    "max_size": (lambda: M.DiT(DIT_SMALL)(torch.randn(1, 16, 1, 4, 40), torch.rand(1), torch.randn(1, 3, 48)),
                 ValueError, "exceeds the model's max_size"),
    "unknown_preset": (lambda: M.config_from_preset("huge"), ValueError, "unknown preset 'huge'"),
    "unknown_solver": (lambda: M.sample(lambda x, s: x, torch.randn(1, 1, 1, 1, 1), M.shifted_sigmas(2),
                                        solver="heun"),
                       ValueError, "unknown solver"),
}


GAUSS_MU = torch.tensor([0.7, -1.2], dtype=torch.float64)  # per channel: x0 ~ N(mu_c, std_c^2) elementwise


GAUSS_STD = torch.tensor([0.4, 0.9], dtype=torch.float64)


MIX1_MEANS = torch.tensor([-1.5, 0.5, 2.0], dtype=torch.float64)  # a 1-D mixture, elementwise: nonlinear v


MIX1_STD = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)


MIX1_W = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def gaussian_velocity(x, sigma):
    """E[eps - x0 | x_sigma] for x0 ~ N(mu_c, std_c^2) per element; x (B, 2, T, H, W), sigma (B, T)."""
    s = sigma.double()[:, None, :, None, None]
    mu, std = GAUSS_MU.view(1, 2, 1, 1, 1), GAUSS_STD.view(1, 2, 1, 1, 1)
    var = (1 - s) ** 2 * std**2 + s**2  # Var[x_sigma]
    return ((s - (1 - s) * std**2) / var * (x.double() - (1 - s) * mu) - mu).to(x.dtype)


def gaussian_exact(x, s):
    """The exact flow-ODE map of gaussian_velocity from x at sigma s to 0: it keeps the standardized value."""
    mu, std = GAUSS_MU.view(1, 2, 1, 1, 1), GAUSS_STD.view(1, 2, 1, 1, 1)
    return mu + std * (x - (1 - s) * mu) / torch.sqrt((1 - s) ** 2 * std**2 + s**2)


def mixture1_velocity(x, sigma):
    """E[eps - x0 | x_sigma] for x0 ~ a 1-D Gaussian mixture per element; x (B, C, T, H, W), sigma (B, T)."""
    z, s = x.double()[..., None], sigma.double()[:, None, :, None, None, None]  # (..., 1): K on the last axis
    var = (1 - s) ** 2 * MIX1_STD**2 + s**2
    diff = z - (1 - s) * MIX1_MEANS
    post = torch.softmax(torch.log(MIX1_W) - diff**2 / (2 * var) - 0.5 * torch.log(var), dim=-1)
    e_x0 = MIX1_MEANS + (1 - s) * MIX1_STD**2 / var * diff
    e_eps = s / var * diff
    return (post * (e_eps - e_x0)).sum(-1).to(x.dtype)


def coupled_velocity(x, sigma):
    """mixture1_velocity plus a term that mixes frames and their sigmas, so held frames and cond_sigma matter."""
    mix = torch.tanh((x - sigma[:, None, :, None, None].to(x.dtype)).mean(dim=2, keepdim=True))
    return mixture1_velocity(x, sigma) + 0.3 * mix


def diffusers_unipc(velocity_fn, noise, sigmas, *, x_cond=None, frame_mask=None, cond_sigma=None):
    """diffusers' UniPCMultistepScheduler (order 2, bh2, flow prediction, lower_order_final) on the flow sigmas
    `sigmas` (n + 1,): conditional frames enter the velocity as x_cond (at cond_sigma) and are set at the end."""
    diffusers = importlib.import_module("diffusers")
    sigmas = sigmas.double()
    shifted = torch.allclose(sigmas, M.shifted_sigmas(len(sigmas) - 1).double(), atol=0, rtol=0)
    # diffusers shifts the sigmas it is given by flow_shift, then appends the final 0 (final_sigmas_type "zero").
    # Its own schedule (set_timesteps(n)) is linspace(1, 1/1000, n + 1)[:-1], shifted, the first moved to
    # 1 - 1e-6: not the official linspace(0.999, 0, n + 1)[:-1]. So we hand it the official unshifted sigmas
    # with flow_shift 5 (the shifted schedule), or our sigmas with flow_shift 1 (anything else, e.g. Karras).
    scheduler = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0 if shifted else 1.0,
        solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    n = len(sigmas) - 1
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0, n + 1)[:-1] if shifted else sigmas[:-1].numpy())
    assert len(scheduler.sigmas) == n + 1 and scheduler.sigmas[-1] == 0
    assert torch.allclose(scheduler.sigmas.double(), sigmas, atol=1e-6, rtol=0)  # the same sigmas (float32)
    scheduler.set_begin_index(0)
    B, _, T = noise.shape[:3]
    mask = torch.zeros(B, T, dtype=noise.dtype) if frame_mask is None else frame_mask.to(noise.dtype)
    m = mask[:, None, :, None, None]
    x = noise * sigmas[0].item()
    for i, t in enumerate(scheduler.timesteps):
        sig = torch.full((B, T), scheduler.sigmas[i].item(), dtype=noise.dtype)
        x_in = x
        if x_cond is not None:
            x_in = m * x_cond + (1 - m) * x
            if cond_sigma is not None:
                sig = torch.where(mask.bool(), torch.full_like(sig, cond_sigma), sig)
        x = scheduler.step(velocity_fn(x_in, sig), t, x).prev_sample
    return x if x_cond is None else m * x_cond + (1 - m) * x


FP32_ACTION_PARTS = {"none": (), "mlp": ("embed_d.", "embed_3d."), "mlp-flat": ("embed_d.",),
                     "dexac": ("tokenizer.", "glob."), "dexac-no-local": ("tokenizer.", "glob."),
                     "dexac-no-global": ("tokenizer.",), "dexac-time": ("tokenizer.", "glob.")}


def on_fp32_path(name, mode):
    """The spec, written out independently of model.fp32_modules: the timestep MLP and its norm, every block's
    three AdaLN modulations, the whole final layer, and the action conditioning's AdaLN heads."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    return (name.startswith(("t_linear_1.", "t_linear_2.", "t_norm.", "final."))
            or (name.startswith("blocks.") and name.split(".")[2] in ("mod_self_attn", "mod_cross_attn", "mod_mlp"))
            or name.startswith(tuple(f"action_cond.{p}" for p in FP32_ACTION_PARTS[mode])))


def assert_split(model, mode, low=torch.bfloat16):
    """fp32 on the fp32 path, `low` everywhere else, and both parts non-empty."""
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    fp32 = [n for n in dtypes if on_fp32_path(n, mode)]
    assert fp32 and len(fp32) < len(dtypes)
    wrong = {n: d for n, d in dtypes.items() if d != (torch.float32 if n in fp32 else low)}
    assert not wrong, wrong


def adaln_probe(model, *args, **kwargs):
    """One forward -> {output, emb, AdaLN-LoRA term, block 0's self-attention shift/scale/gate before the cast}."""
    seen = {}
    block = model.blocks[0]
    hooks = [block.register_forward_pre_hook(lambda _, a: seen.update(emb=a[1], lora=a[2])),
             block.mod_self_attn.register_forward_hook(lambda _, a, out: seen.update(mod=out))]
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {"output": out.double(), "emb": seen["emb"].double(), "lora": seen["lora"].double(),
            "shift/scale/gate": seen["mod"].double() + seen["lora"].double()}


@pytest.fixture
def one_rank():
    """A one-process gloo group, as train.py makes for a plain CPU run."""
    assert not dist.is_initialized(), "a test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class TestModel:
    """The DiT equals diffusers' Cosmos DiT on the same weights; official checkpoints load in every layout;
    rectified flow's loss and samplers give known answers on a Gaussian mixture with an exact velocity."""

    @pytest.mark.parametrize("B,T,H,W,cond,pad", [
        (1, 1, 4, 4, False, False),
        (2, 3, 6, 10, True, True),  # non-square, batch > 1, several frames, condition + padding masks
        (3, 4, 8, 6, True, True),
    ])
    def test_dit_matches_diffusers(self, dit_and_diffusers, B, T, H, W, cond, pad):
        ours, ref = dit_and_diffusers
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, DIT_SMALL.in_channels, T, H, W, generator=g)
        text = torch.randn(B, 7, DIT_SMALL.text_dim, generator=g)
        sigma = torch.rand(B, T, generator=g)  # a noise level per latent frame, as for conditional frames
        frame_mask = torch.zeros(B, T)
        if cond:
            frame_mask[:, 0] = 1
        padding = (torch.rand(1, 1, H, W, generator=g) > 0.5).float() if pad else torch.zeros(1, 1, H, W)
        with torch.no_grad():
            out = ours(x, sigma, text, frame_mask=frame_mask, padding_mask=padding.expand(B, -1, -1, -1))
            expected = ref(x, sigma.view(B, 1, T, 1, 1), text,
                           condition_mask=frame_mask[:, None, :, None, None].expand(B, 1, T, H, W),
                           padding_mask=padding, return_dict=False)[0]
        assert out.shape == (B, DIT_SMALL.out_channels, T, H, W)
        rel = (out - expected).abs().max() / expected.abs().max()
        assert rel < 2e-6, f"relative error {rel:.2e}"

    def test_official_pt_loads_as_diffusers_own_converter_reads_it(self, tmp_path):
        """One random file in the official layout (built from the independent key list, not our key table), read
        two ways: by our loader, and by diffusers' own Cosmos 2.x checkpoint converter into diffusers' model. The
        two models agree, so every official name reaches the tensor its namesake in diffusers uses: two
        same-shaped names swapped in our table (q and k of one attention, say) would break the agreement."""
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers as convert
        sd = random_official_file(tmp_path / "dit.pt", seed=7)
        ours = M.load_dit(str(tmp_path / "dit.pt"), DIT_SMALL).eval()
        ref = diffusers_cosmos(DIT_SMALL)
        ref.load_state_dict(convert(dict(sd)), strict=True)
        kw, ref_kw = dit_inputs()
        with torch.no_grad():
            out, expected = ours(**kw), ref(**ref_kw)[0]
        rel = (out - expected).abs().max() / expected.abs().max()
        assert rel < 2e-6, f"relative error {rel:.2e}"

    def test_dit_matches_diffusers_where_the_qk_norm_eps_shows(self, tmp_path):
        """Attention q and k scaled down until their mean square is near 1e-6, where the RMSNorm eps decides the
        result: our DiT agrees with diffusers' model set to the official eps 1e-6, and not with diffusers' own
        default 1e-5 (so the comparison does see the eps)."""
        sd = random_official_file(tmp_path / "dit.pt", seed=8)
        for k in sd:
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                sd[k] = sd[k] * 1e-3
        torch.save(sd, tmp_path / "dit.pt")
        ours = M.load_dit(str(tmp_path / "dit.pt"), DIT_SMALL).eval()
        ref = diffusers_cosmos(DIT_SMALL)
        ref.load_state_dict(M.state_dict_as(ours.state_dict(), "diffusers", DIT_SMALL.n_blocks), strict=True)
        kw, ref_kw = dit_inputs()
        with torch.no_grad():
            out, expected = ours(**kw), ref(**ref_kw)[0]
            for m in ref.modules():
                if getattr(m, "norm_q", None) is not None:
                    m.norm_q.eps = m.norm_k.eps = 1e-5
            diffusers_default = ref(**ref_kw)[0]
        scale = expected.abs().max()
        assert (out - expected).abs().max() / scale < 2e-6
        assert (out - diffusers_default).abs().max() / scale > 1e-3

    @pytest.mark.parametrize("mode", ["dexac", "none"])
    def test_cross_kv_computed_once_gives_the_plain_forward(self, mode):
        """DiT.cross_kv(text, image features) passed as kv gives the same output as text and image features
        passed at every call (bit for bit on the CPU; a rollout chunk computes it once for all its steps), with
        DexAC and the semantic branch on, classifier-free guidance's doubled batch included."""
        config = replace(DIT_SMALL, action_mode=mode, semantic_dim=DINO_TINY.dim)
        model = randomize(M.DiT(config), seed=3, std=0.05).eval()
        if mode != "none":
            model.action_cond.set_stats(*random_action_stats())
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(4, 16, 3, 4, 6, generator=g), torch.randn(4, 5, DIT_SMALL.text_dim, generator=g)
        feats, mask = torch.randn(4, 6, DINO_TINY.dim, generator=g), torch.tensor([[1.0, 0, 0]]).expand(4, 3)
        actions = torch.randn(4, T_ACT, N_ACT, generator=g) if mode != "none" else None
        kv = model.cross_kv(text, feats)
        with torch.no_grad():
            for sigma in (torch.full((4,), 0.9), torch.full((4,), 0.2)):  # two "steps", one kv
                plain = model(x, sigma, text, mask, actions=actions, image_features=feats)
                assert torch.equal(model(x, sigma, frame_mask=mask, actions=actions, kv=kv), plain)
        with pytest.raises(ValueError, match="text .* or its precomputed kv"):
            model(x, sigma, text, mask, actions=actions, kv=kv)

    def test_dit_forward_compiles_as_one_graph(self):
        """torch.compile(fullgraph=True) traces the whole forward (DexAC and the semantic branch on, after the
        first call that reads the action statistics' flag) without a graph break, and equals eager."""
        config = replace(DIT_SMALL, action_mode="dexac", semantic_dim=8)
        model = randomize(M.DiT(config), seed=4, std=0.05).eval()
        model.action_cond.set_stats(*random_action_stats())
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 3, DIT_SMALL.text_dim, generator=g)
        args = dict(frame_mask=torch.tensor([[1.0, 0]]).expand(2, 2), actions=torch.randn(2, T_ACT, N_ACT,
                                                                                          generator=g),
                    image_features=torch.randn(2, 5, 8, generator=g))
        sigma = torch.rand(2, generator=g)
        with torch.no_grad():
            eager = model(x, sigma, text, **args)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            assert torch.allclose(compiled(x, sigma, text, **args), eager, atol=1e-6)

    def test_every_action_mode_gives_every_parameter_a_gradient(self):
        """Each conditioning mode, random weights (no zero-initialized head hides anything), the semantic branch
        on: one loss backward reaches every parameter. A parameter that never gets a gradient is dead weight,
        and the optimizer never makes its state, so DCP cannot resume the run (it expects one per parameter)."""
        B, T, H, W = ACTION_GRID
        mean, std = random_action_stats()
        for mode in ("none", *conditioning.MODES):
            config = M.config_from_preset("tiny", action_mode=mode, semantic_dim=DINO_TINY.dim)
            model = randomize(M.DiT(config), seed=6, std=0.05)
            if model.action_cond is not None:
                model.action_cond.set_stats(mean, std)
            g = torch.Generator().manual_seed(1)
            x, text = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 5, config.text_dim, generator=g)
            out = model(x, torch.rand(B, generator=g), text, frame_mask=torch.tensor([[1.0, 0, 0, 0]]).expand(B, T),
                        image_features=torch.randn(B, 6, DINO_TINY.dim, generator=g),
                        actions=None if mode == "none" else mean + std * torch.randn(B, T_ACT, N_ACT, generator=g))
            out.square().mean().backward()
            dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
            assert dead == [], (mode, dead)

    def test_compiled_blocks_equal_the_eager_blocks(self):
        """model.compile_blocks at the tiny preset, DexAC and the semantic branch on: every block's body is
        compiled by inductor with fullgraph=True (a graph break or a host synchronization would raise); the
        output equals eager's to 1e-5 relative, and every parameter's gradient is as close to the float64
        gradient as eager float32's is (within 4x + 1e-5: inductor fuses and reorders fp32 sums, and a few
        small gradients come from cancelling terms); parameter names stay the eager ones."""
        config = M.config_from_preset("tiny", action_mode="dexac", semantic_dim=DINO_TINY.dim)
        model = randomize(M.DiT(config), seed=5, std=0.05)
        model.action_cond.set_stats(*random_action_stats())
        eager, exact = copy.deepcopy(model), copy.deepcopy(model).double()
        g = torch.Generator().manual_seed(0)
        B, T, H, W = ACTION_GRID
        mean, std = random_action_stats()
        x, text = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 5, config.text_dim, generator=g)
        args = dict(frame_mask=torch.tensor([[1.0, 0, 0, 0]]).expand(B, T), image_features=torch.randn(
            B, 6, DINO_TINY.dim, generator=g), actions=mean + std * torch.randn(B, T_ACT, N_ACT, generator=g))
        sigma = torch.rand(B, generator=g)
        torch._dynamo.reset()
        M.compile_blocks(model)
        assert all("body" in vars(b) for b in model.blocks)  # each block's own compiled body
        outputs = []
        for net in (exact, eager, model):
            cast = (lambda t: t.double() if t.is_floating_point() else t) if net is exact else (lambda t: t)
            out = net(cast(x), cast(sigma), cast(text), **{k: cast(v) for k, v in args.items()})
            out.square().mean().backward()
            outputs.append(out.detach().double())
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        assert rel(outputs[2], outputs[1]) < 1e-5 and rel(outputs[1], outputs[0]) < 1e-5
        assert list(model.state_dict()) == list(eager.state_dict())  # the same names: checkpoints, exports
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
        for (name, p64), p, q in zip(exact.named_parameters(), eager.parameters(), model.parameters()):
            assert p64.grad.norm() > 0, name
            assert rel(q.grad, p64.grad) <= 4 * rel(p.grad, p64.grad) + 1e-5, name

    @pytest.mark.parametrize("ac,every", [("full", 1), ("mlp", 1), ("full", 2), ("mlp", 3)])
    def test_activation_checkpointing_recomputes_the_same_gradients(self, one_rank, ac, every):
        """train.parallelize's --ac modes: the chosen blocks (every k-th from the first) are wrapped whole or
        have their MLP checkpointed; each checkpointed part runs its forward again in the backward (fc1 counted)
        and nothing else does; the loss equals the run without checkpointing exactly, every gradient to float32
        rounding (recomputing reorders the sums of gradients that several blocks feed, e.g. the timestep MLP's)."""
        model = randomize(M.DiT(action_config("dexac", n_blocks=3)), std=0.05)
        model.action_cond.set_stats(*random_action_stats())
        plain = copy.deepcopy(model)
        train.parallelize(model, torch.device("cpu"), ac, every)
        chosen = list(range(0, 3, every))
        assert [i for i, b in enumerate(model.blocks) if hasattr(b, "_checkpoint_wrapped_module")] == \
            (chosen if ac == "full" else [])
        assert [i for i, b in enumerate(model.blocks) if b.checkpoint_mlp] == (chosen if ac == "mlp" else [])
        calls = []
        for i, block in enumerate(model.blocks):
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            for part, is_mlp in ((inner.self_attn.q, False), (inner.fc1, True)):
                part.register_forward_hook(lambda m, a, out, key=(i, is_mlp): calls.append(key))
        x, sigma, text, mask, actions = action_batch()
        losses = []
        for net in (plain, model):
            loss = net(x, sigma, text, mask, actions=actions).square().mean()
            calls.clear()
            loss.backward()
            losses.append(loss.detach())
        again = sorted(set(calls))
        assert again == [(i, part) for i in chosen for part in ((False, True) if ac == "full" else (True,))]
        assert torch.equal(losses[0], losses[1])
        for (name, p), q in zip(plain.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-9, msg=name)

    def test_padding_mask_is_resized_nearest_from_pixels(self):
        """A mask at pixel resolution acts as the same mask at latent resolution (and the mask does act)."""
        model = randomize(M.DiT(DIT_SMALL)).eval()
        x, text, sigma = torch.randn(1, 16, 1, 4, 6), torch.randn(1, 3, DIT_SMALL.text_dim), torch.rand(1)
        small = (torch.rand(1, 1, 4, 6) > 0.5).float()
        big = small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # the same mask at pixel resolution
        with torch.no_grad():
            assert torch.equal(model(x, sigma, text, padding_mask=small), model(x, sigma, text, padding_mask=big))
            assert not torch.equal(model(x, sigma, text, padding_mask=small), model(x, sigma, text))

    @pytest.mark.parametrize("layout", ["official_pt", "diffusers_safetensors", "folder"])
    def test_load_official_pt_diffusers_safetensors_and_folder(self, tmp_path, layout):
        src = randomize(M.DiT(DIT_SMALL), seed=3).eval()
        g = torch.Generator().manual_seed(0)
        x, text, sigma = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 5, 48, generator=g), torch.rand(2)
        with torch.no_grad():
            expected = src(x, sigma, text)
        official_pt(src, tmp_path / "dit.pt")
        save_file(M.state_dict_as(src.state_dict(), "diffusers", DIT_SMALL.n_blocks),
                  str(tmp_path / "diffusion_pytorch_model.safetensors"))
        path = {"official_pt": tmp_path / "dit.pt", "folder": tmp_path,
                "diffusers_safetensors": tmp_path / "diffusion_pytorch_model.safetensors"}[layout]
        loaded = M.load_dit(str(path), DIT_SMALL).eval()
        assert next(loaded.parameters()).device.type == "cpu"
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, text), expected), path

    def test_loader_reports_every_mismatch(self, tmp_path):
        src = M.DiT(DIT_SMALL)
        sd = M.state_dict_as(src.state_dict(), "official", DIT_SMALL.n_blocks)
        del sd["blocks.1.mlp.layer2.weight"]
        sd["blocks.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        sd["mystery.weight"] = torch.zeros(1)
        torch.save(sd, tmp_path / "bad.pt")
        with pytest.raises(ValueError) as e:
            M.load_dit(str(tmp_path / "bad.pt"), DIT_SMALL)
        msg = str(e.value)
        assert "missing (1): blocks.1.fc2.weight" in msg and "unexpected (1): mystery.weight" in msg
        assert "blocks.0.self_attn.q.weight: checkpoint (3, 3) vs model (64, 64)" in msg

    def test_cosmos2b_parameter_count(self):
        with torch.device("meta"):
            model = M.DiT(M.config_from_preset("cosmos2b"))
        assert sum(p.numel() for p in model.parameters()) == 2_059_174_912

    def test_cosmos2b_has_the_official_keys_and_shapes(self):
        with torch.device("meta"):
            model = M.DiT(M.config_from_preset("cosmos2b"))
        ours = {k: tuple(v.shape) for k, v in M.state_dict_as(model.state_dict(), "official", 28).items()}
        assert ours == official_keys()

    def test_cosmos2b_under_diffusers_names_matches_diffusers_2b(self):
        """The same tensors under diffusers' names, against diffusers' own 2B model built on the meta device."""
        diffusers = importlib.import_module("diffusers")
        with torch.device("meta"):
            model = M.DiT(M.config_from_preset("cosmos2b"))
            ref = diffusers.CosmosTransformer3DModel(
                in_channels=17, num_attention_heads=16, attention_head_dim=128, num_layers=28, mlp_ratio=4,
                text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
                rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
                use_crossattn_projection=True, crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in M.state_dict_as(model.state_dict(), "diffusers", 28).items()} == theirs

    @pytest.mark.parametrize("case", list(DIT_BAD_INPUTS))
    def test_bad_input_is_one_clear_error(self, case):
        call, error, message = DIT_BAD_INPUTS[case]
        with pytest.raises(error, match=message):
            call()

    @pytest.mark.parametrize("solver", M.SOLVERS)
    def test_samplers_converge_with_more_steps(self, mixture_errors, solver):
        errs = [mixture_errors[solver, n] for n in MIXTURE_STEPS]
        assert all(a > b for a, b in zip(errs, errs[1:])), (solver, errs)

    # (solver, n): error(n) / error(2n), the observed order's base. Euler is first order (ratio 2). The second-order
    # solvers reach ratio 4 only slowly: the shifted schedule's last steps stay about log 2 apart in log-SNR at
    # any n, so their share of the error fades late (measured dpm++2m 1.80, 1.60, 2.57, 3.05, 3.28, 3.41 from
    # 35 to 2240 steps; unipc 3.41, 3.77, 3.90 from 280). A halved second-order term, or a first-order last step,
    # holds the ratio near 2.
    @pytest.mark.parametrize("solver, n, low, high", [("euler", 140, 1.9, 2.1), ("euler", 1120, 1.95, 2.05),
                                                      ("dpm++2m", 1120, 3.2, 4.2), ("unipc", 560, 3.5, 4.2)])
    def test_sampler_convergence_order(self, mixture_errors, solver, n, low, high):
        ratio = mixture_errors[solver, n] / mixture_errors[solver, 2 * n]
        assert low < ratio < high, (solver, n, ratio)

    def test_multistep_is_4x_closer_than_euler_at_35_steps(self, mixture_errors):
        """The README's claim at the official step count: measured 0.071 (Euler), 0.0161 (dpm++2m), 0.0307 (unipc,
        whose first-order last step costs it the most at 35 steps)."""
        assert mixture_errors["euler", 35] > 4 * mixture_errors["dpm++2m", 35], mixture_errors
        assert mixture_errors["euler", 35] > 2 * mixture_errors["unipc", 35], mixture_errors

    def test_samples_follow_the_mixture(self):
        """Component frequencies and per-component means of DPM-Solver++(2M) samples."""
        noise = torch.randn(4000, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = M.sample(mixture_velocity, noise, M.shifted_sigmas(35), solver="dpm++2m").flatten(1)
        nearest = torch.cdist(x, MIX_MEANS).argmin(1)
        for k in range(3):
            assert abs((nearest == k).double().mean() - MIX_W[k]) < 0.03
            assert (x[nearest == k].mean(0) - MIX_MEANS[k]).norm() < 0.1

    def test_sampler_holds_conditional_frames(self):
        """Conditional frames come out as given and enter the model at cond_sigma, the others at the schedule's."""
        s = M.karras_sigmas(10)
        x_cond = torch.randn(2, 3, 3, 2, 2)
        mask = torch.tensor([[1.0, 0, 0], [1, 1, 0]])
        seen = []

        def v_fn(x, sigma):
            seen.append(sigma.clone())
            return torch.ones_like(x)

        out = M.sample(v_fn, torch.randn(2, 3, 3, 2, 2), s, x_cond=x_cond, frame_mask=mask, cond_sigma=1e-4)
        keep = mask.bool()[:, None, :, None, None].expand_as(out)
        assert torch.equal(out[keep], x_cond[keep]) and not torch.equal(out[~keep], x_cond[~keep])
        assert torch.all(seen[0][mask.bool()] == 1e-4) and torch.all(seen[0][~mask.bool()] == s[0])

    def test_classifier_free_guidance(self):
        vc, vu = torch.randn(3, 4), torch.randn(3, 4)
        assert torch.equal(M.guided(vc, vu, 0.0), vc)
        assert torch.allclose(M.guided(vc, vu, 7.0), vc + 7 * (vc - vu))

    def test_flow_loss_feeds_conditional_frames_clean(self):
        x0, seen, _, sigma = zero_prediction_flow_loss()
        assert torch.equal(seen["x_in"][:, :, 0], x0[:, :, 0])  # conditional frame enters clean
        assert torch.all(seen["sigma"][:, 0] == 0.1) and torch.equal(seen["sigma"][:, 1], sigma)

    def test_flow_loss_of_a_zero_prediction(self):
        """With a zero prediction the loss is E|eps - x0|^2 = 2 on the 2 of 3 frames that count."""
        _, _, loss, _ = zero_prediction_flow_loss()
        assert abs(loss.mean().item() - 2 * 2 / 3) < 0.05

    def test_flow_loss_sigma_distribution(self):
        """Logit-normal u shifted by 5: the median of sigma is 5 * 0.5 / (1 + 4 * 0.5) = 5/6."""
        _, _, _, sigma = zero_prediction_flow_loss()
        assert abs(sigma.median().item() - 5 / 6) < 0.02

    def test_flow_loss_ignores_predictions_on_conditional_frames(self):
        """Whatever the net predicts on conditional frames does not reach the loss, while without the mask it would."""
        x0 = torch.randn(4096, 2, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        mask = torch.zeros(4096, 3)
        mask[:, 0] = 1
        garbage = lambda x_in, sigma: torch.where(mask.bool()[:, None, :, None, None], 1e3, 0.0).expand_as(x_in)
        zero = lambda x_in, sigma: torch.zeros_like(x_in)
        losses = [M.flow_loss(f, x0, mask, generator=torch.Generator().manual_seed(5))[0] for f in (zero, garbage)]
        assert torch.equal(*losses)
        no_mask = M.flow_loss(garbage, x0, None, generator=torch.Generator().manual_seed(5))[0]
        assert no_mask.mean() > 1e5  # ...while without the mask it would

    @pytest.mark.parametrize("schedule, steps", [("shifted", 35), ("shifted", 5), ("shifted", 2), ("karras", 35)])
    def test_unipc_equals_diffusers(self, schedule, steps):
        """Same sigmas, same noise, same (nonlinear) velocity field: the same samples to 1e-5."""
        sigmas = M.shifted_sigmas(steps, 5.0) if schedule == "shifted" else M.karras_sigmas(steps)
        noise = torch.randn(16, 2, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ours = M.sample(mixture1_velocity, noise, sigmas, solver="unipc")
        theirs = diffusers_unipc(mixture1_velocity, noise, sigmas)
        assert (ours - theirs).abs().max() < 1e-5
        assert (ours - M.sample(mixture1_velocity, noise, sigmas, solver="dpm++2m")).abs().max() > 1e-3

    def test_unipc_holds_conditional_frames_as_diffusers(self):
        """Held frames come out as x_cond exactly; the rest equals diffusers fed the held frames at cond_sigma."""
        sigmas = M.shifted_sigmas(35, 5.0)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(3, 2, 4, 2, 2, generator=g, dtype=torch.float64)
        x_cond = torch.randn(3, 2, 4, 2, 2, generator=g, dtype=torch.float64)
        mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
        ours = M.sample(coupled_velocity, noise, sigmas, solver="unipc", x_cond=x_cond, frame_mask=mask,
                        cond_sigma=0.05)
        keep = mask.bool()[:, None, :, None, None].expand_as(ours)
        assert torch.equal(ours[keep], x_cond[keep])
        theirs = diffusers_unipc(coupled_velocity, noise, sigmas, x_cond=x_cond, frame_mask=mask, cond_sigma=0.05)
        assert (ours - theirs).abs().max() < 1e-5
        no_cond_sigma = diffusers_unipc(coupled_velocity, noise, sigmas, x_cond=x_cond, frame_mask=mask)
        assert (ours - no_cond_sigma)[~keep].abs().max() > 1e-3  # the comparison does see cond_sigma

    @pytest.mark.parametrize("solver", ["euler", "dpm++2m", "unipc"])
    def test_trajectory_holds_conditional_frames(self, solver):
        sigmas = M.karras_sigmas(6)
        x_cond, mask = torch.randn(2, 2, 3, 1, 1, dtype=torch.float64), torch.tensor([[1.0, 0, 0], [0, 0, 0]])
        noise = torch.randn(2, 2, 3, 1, 1, dtype=torch.float64)
        x, traj = M.sample(gaussian_velocity, noise, sigmas, solver=solver, x_cond=x_cond, frame_mask=mask,
                           return_trajectory=True)
        assert len(traj) == len(sigmas) and torch.equal(traj[-1], x)
        assert all(torch.equal(t[:1, :, :1], x_cond[:1, :, :1]) for t in traj)

    def test_unipc_converges_to_the_exact_ode_solution(self):
        """Gaussian data: the flow ODE's solution is known in closed form. Mean distance to it on the official
        schedule, 35 / 70 steps: Euler 0.079 / 0.040, dpm++2m 0.020 / 0.012, unipc 0.016 / 0.0024."""
        noise = torch.randn(4000, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        sigmas = M.shifted_sigmas(35, 5.0)
        exact = gaussian_exact(noise * sigmas[0].item(), sigmas[0].item())
        err = {}
        for solver in M.SOLVERS:
            for n in (35, 70):
                x = M.sample(gaussian_velocity, noise, M.shifted_sigmas(n, 5.0), solver=solver)
                err[solver, n] = (x - exact).flatten(1).norm(dim=1).mean().item()
        assert err["unipc", 35] < 0.5 * err["euler", 35], err
        assert err["unipc", 70] < 0.5 * err["unipc", 35], err  # halving the step more than halves the error

    @pytest.mark.parametrize("n", [1, 10, 35])
    def test_karras_schedule_has_the_official_points(self, n):
        s = M.karras_sigmas(n)
        assert s.shape == (n + 2,) and s[-1] == 0 and torch.all(s[1:] < s[:-1])
        assert math.isclose(s[0].item(), 200 / 201, rel_tol=1e-6)
        assert math.isclose(s[n].item(), 0.01 / 1.01, rel_tol=1e-6)
        ramp = np.arange(n + 1) / n  # the official formula, independently in numpy float64
        edm = (200.0 ** (1 / 7) + ramp * (0.01 ** (1 / 7) - 200.0 ** (1 / 7))) ** 7
        expected = np.append(edm / (1 + edm), 0.0)
        np.testing.assert_allclose(s.double().numpy(), expected, rtol=1e-6, atol=0)

    def test_karras_schedule_makes_n_plus_1_network_calls(self):
        calls = []
        M.sample(lambda x, s: calls.append(1) or torch.zeros_like(x), torch.randn(1, 1, 1, 1, 1),
                 M.karras_sigmas(35), solver="unipc")
        assert len(calls) == 36

    @pytest.mark.parametrize("mode", list(FP32_ACTION_PARTS))
    def test_cast_to_bf16_keeps_the_fp32_path_unrounded(self, mode):
        """model.to(bf16) (and .bfloat16(), .half()) leave the fp32 path in fp32, bit for bit; everything else
        is cast. .double() takes all of it to fp64 (the fp32 path is a floor, not a fixed dtype)."""
        model = randomize(M.DiT(action_config(mode)))
        ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.to(torch.bfloat16)
        assert_split(model, mode)
        for n, p in model.named_parameters():
            if on_fp32_path(n, mode):
                assert torch.equal(p, ref[n]), n
        assert_split(randomize(M.DiT(action_config(mode))).half(), mode, low=torch.float16)
        assert {p.dtype for p in model.double().parameters()} == {torch.float64}

    def test_meta_construction_and_to_empty_keep_the_fp32_path(self):
        """train.py's path: built on the meta device, to_empty, then a bf16 cast."""
        with torch.device("meta"):
            model = M.DiT(action_config("dexac"))
        model.to_empty(device="cpu").to(torch.bfloat16)
        assert_split(model, "dexac")

    def test_load_dit_with_bf16_keeps_the_fp32_path(self, tmp_path):
        """An official-layout bf16 file loaded as bf16 (and in its own dtype): the fp32 path is upcast exactly."""
        src = randomize(M.DiT(DIT_SMALL)).to(torch.bfloat16)  # the fp32 path stays fp32 here: round it as a file
        for p in src.parameters():
            p.data = p.data.bfloat16()
        official_pt(src, tmp_path / "base.pt")
        for dtype in (torch.bfloat16, None):  # None: the file's bf16 for the backbone (new modules stay fp32)
            model = M.load_dit(str(tmp_path / "base.pt"), action_config("dexac"), dtype=dtype)
            if dtype is None:  # the backbone in the file's bf16, the new action modules in fp32
                assert {n: p.dtype for n, p in model.named_parameters() if not n.startswith("action_cond.")} == {
                    n: torch.float32 if on_fp32_path(n, "dexac") else torch.bfloat16 for n, p in src.named_parameters()}
                assert {p.dtype for p in model.action_cond.parameters()} == {torch.float32}
            else:
                assert_split(model, "dexac")
            for n, p in src.named_parameters():
                assert torch.equal(model.get_parameter(n).float(), p.float()), n

    def test_load_exported_with_bf16_keeps_the_fp32_path(self, tmp_path):
        """A train.py-style export (bf16 tensors, the config in the metadata) loaded as bf16 or in its own
        dtype: the fp32 path is fp32 with the file's values, the rest bf16."""
        cfg = action_config("mlp")
        model = randomize(M.DiT(cfg))
        model.action_cond.set_stats(*random_action_stats())
        sd = {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"model_config": json.dumps(asdict(cfg))})
        for dtype in (torch.bfloat16, None):
            net, _ = M.load_exported(tmp_path / "model.safetensors", dtype=dtype)
            assert_split(net, "mlp")
            assert set(net.state_dict()) == set(sd)  # key names unchanged
            for n, p in net.named_parameters():
                assert torch.equal(p.float(), sd[n].float()), n

    def test_fp32_path_is_closer_to_fp64_than_all_bf16(self):
        """Against the same weights in fp64: the AdaLN inputs (emb, the AdaLN-LoRA term, shift/scale/gate) of the
        fp32 path are at fp32 rounding, the all-bf16 network's at bf16 rounding (~3e-3); the output is closer too."""
        model = randomize(M.DiT(action_config("dexac")), std=0.2).eval()
        model.action_cond.set_stats(*random_action_stats())
        x, sigma, text, mask, actions = action_batch()
        exact = adaln_probe(copy.deepcopy(model).double(), x.double(), sigma, text.double(), mask, actions=actions)
        fp32_path = copy.deepcopy(model).to(torch.bfloat16)
        all_bf16 = copy.deepcopy(model)
        for p in all_bf16.parameters():  # what the model computed before: the conditioning path in bf16 too
            p.data = p.data.bfloat16()
        err = {}
        for name, m in (("fp32 path", fp32_path), ("all bf16", all_bf16)):
            got = adaln_probe(m, x.bfloat16(), sigma, text.bfloat16(), mask, actions=actions)
            err[name] = {k: ((got[k] - exact[k]).norm() / exact[k].norm()).item() for k in got}
        for k in ("emb", "lora", "shift/scale/gate"):
            assert err["fp32 path"][k] < 1e-5 < 1e-3 < err["all bf16"][k], (k, err)
        assert err["fp32 path"]["output"] < err["all bf16"]["output"], err

    def test_fp32_path_computes_in_fp32_under_autocast(self):
        """Inside a bf16 autocast region the fp32 path still computes in fp32; the blocks' linears do not."""
        model = randomize(M.DiT(action_config("dexac"))).eval()
        model.action_cond.set_stats(*random_action_stats())
        seen = {}
        watch = {"mod": model.blocks[0].mod_mlp.up, "t_linear_2": model.t_linear_2,
                 "final": model.final.linear, "glob": model.action_cond.glob.to_3d, "q": model.blocks[0].self_attn.q}
        for name, m in watch.items():
            m.register_forward_hook(lambda _, a, out, name=name: seen.setdefault(name, out.dtype) and None)
        x, sigma, text, mask, actions = action_batch()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, sigma, text, mask, actions=actions)
        assert seen == {"mod": torch.float32, "t_linear_2": torch.float32, "final": torch.float32,
                        "glob": torch.float32, "q": torch.bfloat16}

    @pytest.mark.parametrize("ac", ["none", "full", "mlp"])
    def test_fsdp_bf16_keeps_the_fp32_path_in_fp32(self, one_rank, ac):
        """train.parallelize with the bf16 parameter policy on 1 gloo rank: the fp32 path's linears see fp32
        weights and inputs, a block's attention projection bf16; its gradients arrive in fp32; and the forward
        is the same computation as the unsharded model.to(bf16)."""
        model = randomize(M.DiT(action_config("dexac")))
        model.action_cond.set_stats(*random_action_stats())
        plain = copy.deepcopy(model).to(torch.bfloat16)
        assert train.parallelize(model, torch.device("cpu"), ac, bf16=True) == torch.bfloat16
        block = getattr(model.blocks[0], "_checkpoint_wrapped_module", model.blocks[0])
        seen = {}
        watch = {"mod": block.mod_self_attn.down, "t_linear_1": model.t_linear_1, "final": model.final.linear,
                 "glob": model.action_cond.glob.to_d, "q": block.self_attn.q, "local": model.action_cond.local.proj}
        for name, m in watch.items():
            m.register_forward_hook(lambda mod, a, out, name=name: seen.setdefault(
                name, (mod.weight.dtype, a[0].dtype, out.dtype)) and None)
        x, sigma, text, mask, actions = action_batch()
        args = (x.bfloat16(), sigma, text.bfloat16(), mask)
        out = model(*args, actions=actions)
        f32, b16 = (torch.float32,) * 3, (torch.bfloat16,) * 3
        assert seen == {"mod": f32, "t_linear_1": f32, "final": f32, "glob": f32, "q": b16, "local": b16}
        with torch.no_grad():
            assert torch.equal(out, plain(*args, actions=actions))
        out.float().square().mean().backward()
        for n, p in model.named_parameters():
            assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad.full_tensor()).all(), n
        assert model.blocks[0].get_parameter(
            "_checkpoint_wrapped_module.mod_mlp.up.weight" if ac == "full" else "mod_mlp.up.weight"
        ).grad.full_tensor().abs().max() > 0


# =====================================================================================================================
# tokenizer.py: the Wan2.1 VAE against diffusers, weight layouts, chunking and tiling, the pixel tokenizer

@pytest.fixture(scope="module")
def vae_weight_files(vae_pair, tmp_path_factory):
    """diffusers' own save_pretrained output, and a flat torch.save dict in the original layout."""
    ref, ours = vae_pair[0], vae_pair[1]
    root = tmp_path_factory.mktemp("weights")
    ref.save_pretrained(root / "diffusers" / "vae", safe_serialization=True)
    torch.save(ours.state_dict(), root / "Wan2.1_VAE.pth")
    return root


@contextlib.contextmanager
def tiled(vae, size, overlap=0):
    """Within the block the VAE encodes and decodes in tiles of `size` pixels that overlap by `overlap`."""
    vae.tile_size, vae.tile_overlap = size, overlap
    try:
        yield vae
    finally:
        vae.tile_size = 0


@pytest.fixture(scope="module")
def untiled_64x128(vae_pair):
    """A 5-frame 64x128 video, its latents and their decoding by the tiny Wan VAE without tiling -> (x, z, x_dec)."""
    ours = vae_pair[1]
    x = rand_video(1, 5, 64, 128)
    return x, ours.encode(x), ours.decode(ours.encode(x))


TOKENIZER_BAD_INPUTS = {  # case -> (call on a tokenizer, exception, message)
    "2_channels": (lambda tok: tok.encode(rand_video(1, 5, 16, 16)[:, :2]), ValueError, r"\(B, 3, T, H, W\)"),
    "no_batch_dim": (lambda tok: tok.encode(rand_video(1, 5, 16, 16)[0]), ValueError, r"\(B, 3, T, H, W\)"),
    "size_not_multiple_of_8": (lambda tok: tok.encode(rand_video(1, 5, 16, 12)), ValueError, "multiples of 8"),
    "uint8": (lambda tok: tok.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8)), TypeError, "127.5"),
    "0_255_floats": (lambda tok: tok.encode(rand_video(1, 5, 16, 16) * 255), ValueError, r"\[-1, 1\]"),
    "latent_channels": (lambda tok: tok.decode(torch.zeros(1, tok.latent_channels + 1, 2, 2, 2)),
                        ValueError, "expected latents"),
}

BUILD_TOKENIZER_ERRORS = {  # case -> (call, exception, message)
    "unknown_tokenizer": (lambda: tk.build_tokenizer("wan2.2"), ValueError, "unknown tokenizer"),
    "unknown_wan_preset": (lambda: tk.build_tokenizer("wan2.1", config="huge"), ValueError,
                           "unknown Wan VAE preset"),
    "pixel_std_0": (lambda: tk.PixelTokenizer(2, std=0.0), ValueError, "std must be positive"),
}


SDXL_TINY = tk.SDXL_PRESETS["tiny"]  # 4 resolutions (8x), widths 16-32, 1 resnet per resolution, 8 groups


def sdxl_randomize(module, seed=0):
    """Every parameter random: weights ~ N(0, 1 / fan_in), norm gains 1 + N(0, 0.3), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.3 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return module


def sdxl_diffusers(cfg=SDXL_TINY):
    """diffusers' AutoencoderKL for cfg (SDXL's architecture: the same block types, act, 1x1 quant convs)."""
    diffusers = importlib.import_module("diffusers")
    n = len(cfg.channels)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.channels, layers_per_block=cfg.layers,
        act_fn="silu", latent_channels=cfg.latent_channels, norm_num_groups=cfg.groups,
        scaling_factor=cfg.scaling_factor)


@pytest.fixture(scope="module")
def sdxl_pair():
    """A tiny diffusers AutoencoderKL with every parameter random (GroupNorm affine too) and our SDXLVAE holding
    the same tensors under the same names (chunks of 4 frames, so a 2 x 3-frame video spans 2 chunks)."""
    ref = sdxl_randomize(sdxl_diffusers()).eval()
    ours = tk.SDXLVAE(SDXL_TINY, chunk_frames=4).eval()
    hub.load_strict(ours, ref.state_dict())
    return ref, ours


def sdxl_frames(video):  # (B, 3, T, H, W) -> (B*T, 3, H, W), the image batch diffusers sees
    return video.transpose(1, 2).flatten(0, 1)


def sdxl_video(frames, B):  # (B*T, C, H, W) -> (B, C, T, H, W)
    return frames.unflatten(0, (B, -1)).transpose(1, 2)


class TestTokenizer:
    """The Wan2.1 VAE equals diffusers' on the same weights and loads both official layouts; its chunked and
    tiled paths agree with whole-clip passes; the pixel tokenizer is exactly invertible."""

    @pytest.mark.parametrize("T", [1, 5, 9, 13, 17])
    def test_wan_vae_matches_diffusers(self, vae_pair, T):
        ref, ours, mean, std = vae_pair
        x = rand_video(2, T, 32, 48, seed=T)  # batch 2, non-square
        with torch.no_grad():
            z_ref = (ref.encode(x).latent_dist.mean - mean) * (1 / std)
            z = ours.encode(x)
            x_ref = ref.decode(z / (1 / std) + mean).sample
        x_ours = ours.decode(z)
        assert z.shape == (2, 4, tk.latent_frames(T), 4, 6) and x_ours.shape == x.shape
        assert (x_ours.abs() < 1).float().mean() > 0.5  # most pixels unclamped, so the comparison means something
        assert (z - z_ref).abs().max() <= 1e-5, (z - z_ref).abs().max()  # 0.0 on our CPU
        assert (x_ours - x_ref).abs().max() <= 1e-5, (x_ours - x_ref).abs().max()

    def test_full_size_key_map_and_shapes_match_diffusers(self):
        # the real 127M-parameter config, built on the meta device (no memory): every tensor maps 1:1
        diffusers = importlib.import_module("diffusers")
        with torch.device("meta"):
            ref, ours = diffusers.AutoencoderKLWan(), tk.WanVAE("full")
        ref_sd = ref.state_dict()
        mapped = {tk.diffusers_key(k): v.shape for k, v in ours.state_dict().items()}
        assert mapped.keys() == ref_sd.keys() and all(mapped[k] == v.shape for k, v in ref_sd.items())
        assert sum(v.numel() for v in ref_sd.values()) == sum(p.numel() for p in ours.parameters()) > 126e6

    def test_key_map_agrees_with_diffusers_own_converter(self, vae_pair):
        # diffusers ships its own original-Wan -> diffusers converter (for from_single_file): fed our state dict,
        # it must produce exactly the names our key map gives, holding the same tensors
        convert = importlib.import_module("diffusers.loaders.single_file_utils").convert_wan_vae_to_diffusers
        ours = vae_pair[1].state_dict()
        converted = convert(dict(ours))
        assert converted.keys() == {tk.diffusers_key(k) for k in ours}
        assert all(converted[tk.diffusers_key(k)] is v for k, v in ours.items())

    def test_native_names_are_the_original_layout(self, vae_pair):
        # every key of ours follows a pattern of the original Wan2.1_VAE.pth (DESIGN section 3), and vice versa
        res = r"\.residual\.([03]\.gamma|[26]\.(weight|bias))"  # [norm, SiLU, conv, norm, SiLU, dropout, conv]
        patterns = [r"conv1", r"conv2", r"(en|de)coder\.conv1", r"(en|de)coder\.head\.(0\.gamma|2)",
                    r"(en|de)coder\.middle\.[02]" + res, r"(en|de)coder\.middle\.1\.(norm\.gamma|to_qkv|proj)",
                    r"encoder\.downsamples\.(0|1|3|4|6|7|9|10)" + res, r"encoder\.downsamples\.(3|6)\.shortcut",
                    r"encoder\.downsamples\.(2|5|8)\.resample\.1", r"encoder\.downsamples\.(5|8)\.time_conv",
                    r"decoder\.upsamples\.(0|1|2|4|5|6|8|9|10|12|13|14)" + res,
                    r"decoder\.upsamples\.4\.shortcut",
                    r"decoder\.upsamples\.(3|7|11)\.resample\.1", r"decoder\.upsamples\.(3|7)\.time_conv"]
        keys, suffix = list(vae_pair[1].state_dict()), r"(\.(weight|bias|gamma))?"
        unmatched = [k for k in keys if not any(re.fullmatch(p + suffix, k) for p in patterns)]
        unused = [p for p in patterns if not any(re.fullmatch(p + suffix, k) for k in keys)]
        assert not unmatched and not unused, (unmatched, unused)

    def test_encoder_sees_frame_0_then_4_frames_per_chunk(self, vae_pair):
        """The cached chunk path keeps memory bounded: it never feeds the whole clip."""
        ours = vae_pair[1]
        seen = []
        hook = ours.encoder.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
        ours.encode(rand_video(1, 33, 16, 24))
        hook.remove()
        assert seen == [1] + [4] * 8  # frame 0 alone, then 4 new frames per chunk: never the whole clip

    def test_chunked_path_equals_whole_clip(self, vae_pair):
        """The cached chunk path against one whole-clip pass with the same causal semantics."""
        ours = vae_pair[1]
        x = rand_video(1, 33, 16, 24)
        z = ours.encode(x)
        torch.testing.assert_close(ours.encode(x, chunked=False), z, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(z, chunked=False), ours.decode(z), rtol=0, atol=1e-4)

    def test_dtype_follows_the_weights_and_out_device(self, vae_pair):
        """fp32 input with bf16 weights gives bf16 latents and frames, close to the fp32 latents."""
        ours = vae_pair[1]
        x = rand_video(1, 9, 16, 16)
        z32 = ours.encode(x, out_device="cpu")
        bf16 = tk.WanVAE(ours.config).to(torch.bfloat16).eval()
        bf16.load_state_dict(ours.state_dict())
        z16 = bf16.encode(x)  # fp32 input, bf16 weights: the weights decide the dtype
        assert z16.dtype == torch.bfloat16 and bf16.decode(z16).dtype == torch.bfloat16
        assert (z16.float() - z32).abs().mean() < 0.05 * z32.abs().mean()

    def test_both_layouts_load_and_agree(self, vae_pair, vae_weight_files):
        ours = vae_pair[1]
        # a diffusers directory (vae/diffusion_pytorch_model.safetensors inside), and a .pth file
        from_diffusers = tk.build_tokenizer("wan2.1", config=ours.config, weights=str(vae_weight_files / "diffusers"))
        from_original = tk.build_tokenizer("wan2.1", config=ours.config,
                                           weights=str(vae_weight_files / "Wan2.1_VAE.pth"))
        x = rand_video(1, 5, 16, 24)
        z = from_diffusers.encode(x)
        assert torch.equal(z, from_original.encode(x)) and torch.equal(z, ours.encode(x))
        assert torch.equal(from_diffusers.decode(z), from_original.decode(z))

    def test_key_mismatch_lists_missing_unexpected_and_misshaped(self, vae_pair, tmp_path):
        sd = dict(vae_pair[1].state_dict())
        del sd["encoder.head.2.bias"]
        sd["encoder.extra.weight"] = torch.zeros(1)
        sd["conv2.weight"] = torch.zeros(4, 4, 1, 1, 2)
        torch.save(sd, tmp_path / "bad.pth")
        with pytest.raises(ValueError) as e:
            tk.build_tokenizer("wan2.1", config="tiny", weights=str(tmp_path / "bad.pth"))
        msg = str(e.value)
        assert "missing (1): encoder.head.2.bias" in msg and "unexpected (1): encoder.extra.weight" in msg
        assert "wrong shape (1): conv2.weight: checkpoint (4, 4, 1, 1, 2) vs model (4, 4, 1, 1, 1)" in msg

    def test_weights_of_a_smaller_model_are_bad_shapes(self, vae_weight_files):
        with pytest.raises(ValueError, match="wrong shape .*encoder.conv1.weight"):  # a tiny file, a wider model
            tk.build_tokenizer("wan2.1", config=replace(tk.WAN_PRESETS["tiny"], base_dim=16),
                               weights=str(vae_weight_files / "Wan2.1_VAE.pth"))

    @pytest.mark.parametrize("s", [1, 2, 8])
    def test_pixel_tokenizer_round_trips_exactly(self, s):
        pix = tk.build_tokenizer("pixel", spatial_compression=s)
        for T in [1, 5, 9, 13, 17]:
            x = rand_video(2, T, 16, 24, seed=T)
            z = pix.encode(x)
            assert pix.latent_channels == 12 * s * s
            assert z.shape == (2, pix.latent_channels, 1 + (T - 1) // 4, 16 // s, 24 // s)
            assert torch.equal(pix.decode(z), x)

    def test_pixel_tokenizer_normalizes_to_unit_variance_and_back(self):
        x = rand_video(2, 9, 16, 24, seed=3) * 0.2 - 0.05  # low-contrast frames, like the synthetic data
        plain, norm = tk.PixelTokenizer(2), tk.PixelTokenizer(2, mean=-0.05, std=0.2)
        z = norm.encode(x)
        assert torch.allclose(z, (plain.encode(x) + 0.05) / 0.2)
        assert torch.allclose(norm.decode(z), x, atol=1e-6)

    def test_pixel_latent_frames_hold_the_right_frames(self):
        pix = tk.PixelTokenizer(spatial_compression=2)
        T = 13
        x = (torch.arange(T).float() / 100).view(1, 1, T, 1, 1).expand(1, 3, T, 4, 4)  # frame t has value t / 100
        z = pix.encode(x)
        assert torch.all(z[:, :, 0] == 0)  # latent frame 0: frame 0 in all 4 slots
        for k in range(1, z.shape[2]):  # latent frame k: frames 4k - 3 .. 4k, slot by slot
            slots = z[0, :, k].reshape(3, 4, 2, 2, 2, 2)
            for slot in range(4):
                assert torch.all(slots[:, slot] == (4 * k - 3 + slot) / 100)

    def test_frame_counts_agree(self, vae_pair):
        ours, pix = vae_pair[1], tk.PixelTokenizer(spatial_compression=8)
        for T in range(1, 18, 4):
            x = rand_video(1, T, 8, 8)
            assert ours.encode(x).shape[2] == pix.encode(x).shape[2] == tk.latent_frames(T) == 1 + (T - 1) // 4
            assert ours.decode(ours.encode(x)).shape[2] == T

    @pytest.mark.parametrize("kind", ["wan", "pixel"])
    @pytest.mark.parametrize("T", [2, 3, 4, 6, 12, 14])
    def test_lengths_other_than_4k_plus_1_raise(self, vae_pair, kind, T):
        tok = {"wan": vae_pair[1], "pixel": tk.PixelTokenizer(spatial_compression=8)}[kind]
        with pytest.raises(ValueError, match="4k \\+ 1"):
            tok.encode(rand_video(1, T, 8, 8))

    def test_pad_repeats_the_last_frame(self, vae_pair):
        """pad: the last frame repeats up to 4k + 1 frames (6 -> 9); the caller trims decode's output."""
        ours, pix = vae_pair[1], tk.PixelTokenizer(spatial_compression=8)
        x = rand_video(1, 6, 8, 8)
        assert ours.encode(x, pad=True).shape[2] == tk.latent_frames(6, pad=True) == 3
        assert torch.equal(pix.decode(pix.encode(x, pad=True))[:, :, :6], x)

    def test_tiling_bookkeeping_is_exact_on_the_pixel_tokenizer(self):
        # space-to-depth is local, so tiles blended with any weights must reproduce the untiled result
        pix = tk.PixelTokenizer(spatial_compression=4)
        x = rand_video(1, 5, 40, 56)
        z = pix.encode(x)
        torch.testing.assert_close(tk.tiled_apply(pix.encode, x, 16, 8, 1 / 4), z, rtol=0, atol=1e-6)
        torch.testing.assert_close(tk.tiled_apply(pix.decode, z, 4, 2, 4), x, rtol=0, atol=1e-6)

    def test_one_tile_is_no_tiling(self, vae_pair, untiled_64x128):
        ours = vae_pair[1]
        x, z, xd = untiled_64x128
        with tiled(ours, 128, 16):  # one tile covers the frame: tiling is a no-op
            assert torch.equal(ours.encode(x), z) and torch.equal(ours.decode(z), xd)

    def test_more_tile_overlap_brings_tiles_closer(self, vae_pair, untiled_64x128):
        """Two or three 64-pixel tiles across: convolutions and attention see less context at tile borders, so
        tiled results are only close; more overlap (context plus feathering) must bring them closer."""
        ours = vae_pair[1]
        x, z, xd = untiled_64x128
        errors = []
        for overlap in (0, 16, 32):
            with tiled(ours, 64, overlap):
                zt, xt = ours.encode(x), ours.decode(z)
            assert zt.shape == z.shape and xt.shape == xd.shape
            errors.append(((zt - z).abs().mean().item(), (xt - xd).abs().mean().item()))
        (e0, d0), (e16, d16), (e32, d32) = errors
        assert e0 > e16 > e32 and d0 > d16 > d32 and e32 < 0.7 * e0 and d32 < 0.7 * d0, errors

    def test_tile_size_must_be_a_multiple_of_8(self, vae_pair):
        with tiled(vae_pair[1], 44) as vae, pytest.raises(ValueError, match="multiples of 8"):
            vae.encode(rand_video(1, 5, 64, 128))

    @pytest.mark.parametrize("kind", ["wan", "pixel"])
    @pytest.mark.parametrize("case", list(TOKENIZER_BAD_INPUTS))
    def test_bad_input_is_one_clear_error(self, vae_pair, kind, case):
        call, error, message = TOKENIZER_BAD_INPUTS[case]
        with pytest.raises(error, match=message):
            call({"wan": vae_pair[1], "pixel": tk.PixelTokenizer()}[kind])

    @pytest.mark.parametrize("case", list(BUILD_TOKENIZER_ERRORS))
    def test_bad_settings_are_one_clear_error(self, case):
        call, error, message = BUILD_TOKENIZER_ERRORS[case]
        with pytest.raises(error, match=message):
            call()

    def test_sdxl_vae_matches_diffusers_autoencoder_kl(self, sdxl_pair):
        """encode (scaled posterior mean) and decode equal diffusers' on the same random weights: a non-square
        48x80 video of 2 clips x 3 frames, run in chunks of 4 frames that span both clips. Scaling as IRASim and
        diffusers' pipelines apply it: z = mean * 0.13025 and decode(z / 0.13025)."""
        ref, ours = sdxl_pair
        x = rand_video(2, 3, 48, 80, seed=5)
        with torch.no_grad():
            z_ref = sdxl_video(ref.encode(sdxl_frames(x)).latent_dist.mean * ref.config.scaling_factor, 2)
            # contiguous: diffusers' own decode of the channels-last view differs from itself by 7.5e-6
            z_in = (sdxl_frames(z_ref) / ref.config.scaling_factor).contiguous()
            x_ref = sdxl_video(ref.decode(z_in).sample, 2).clamp(-1, 1)
        z = ours.encode(x)
        x_ours = ours.decode(z)
        assert ours.scaling_factor == ref.config.scaling_factor == 0.13025
        assert z.shape == (2, 4, 3, 6, 10) and x_ours.shape == x.shape and z.is_contiguous()
        assert z.std() > 0.01 and (x_ours.abs() < 1).float().mean() > 0.5  # nothing trivially 0 or clamped
        assert (z - z_ref).abs().max() <= 1e-6, (z - z_ref).abs().max()  # 0.0 on our CPU
        assert (x_ours - x_ref).abs().max() <= 1e-5, (x_ours - x_ref).abs().max()  # 0.0 on our CPU

    def test_sdxl_vae_sample_matches_diffusers_with_the_same_generator(self, sdxl_pair):
        """sample=True draws mean + std * noise; all frames in one chunk draw what latent_dist.sample does."""
        ref, ours = sdxl_pair
        one_chunk = tk.SDXLVAE(SDXL_TINY, chunk_frames=6).eval()
        one_chunk.load_state_dict(ours.state_dict())
        x = rand_video(2, 3, 40, 64, seed=6)  # non-square, the other way round
        with torch.no_grad():
            dist = ref.encode(sdxl_frames(x)).latent_dist
            z_ref = sdxl_video(dist.sample(torch.Generator().manual_seed(7)) * 0.13025, 2)
        z = one_chunk.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        assert (z - z_ref).abs().max() <= 1e-6, (z - z_ref).abs().max()  # 0.0 on our CPU
        assert (z - one_chunk.encode(x)).abs().max() > 1e-3  # the draw differs from the mean

    def test_sdxl_vae_chunking_does_not_change_the_result(self, sdxl_pair):
        ours = sdxl_pair[1]
        x = rand_video(2, 5, 16, 24, seed=8)  # any T: no 4k + 1 rule per frame
        whole = tk.SDXLVAE(SDXL_TINY, chunk_frames=100).eval()
        whole.load_state_dict(ours.state_dict())
        seen = []
        hook = ours.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        z = ours.encode(x)
        hook.remove()
        assert seen == [4, 4, 2]  # 10 frames, 4 at a time: never the whole video
        assert (z - whole.encode(x)).abs().max() <= 1e-6
        assert (ours.decode(z) - whole.decode(z)).abs().max() <= 1e-5
        assert (ours.latent_channels, ours.spatial_compression, ours.temporal_compression) == (4, 8, 1)

    def test_sdxl_full_size_names_and_shapes_match_diffusers(self):
        """The real config (on the meta device, no memory) has diffusers' SDXL VAE names and shapes, 83.65M."""
        diffusers = importlib.import_module("diffusers")
        with torch.device("meta"):
            ref = diffusers.AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
            ours = tk.SDXLVAE("sdxl")
        ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
        assert ours_sd.keys() == ref_sd.keys() and all(ours_sd[k].shape == v.shape for k, v in ref_sd.items())
        assert sum(p.numel() for p in ours.parameters()) == 83_653_863
        assert (ours.latent_channels, ours.spatial_compression, ours.scaling_factor) == (4, 8, 0.13025)

    def test_sdxl_vae_loads_the_hub_layout(self, sdxl_pair, tmp_path, offline_hub):
        """diffusers' own save_pretrained folder (vae/diffusion_pytorch_model.safetensors + config.json) and a
        save_file of its state dict load through the file, its folder and the repo folder above it; the short name
        'sdxl' reads the same file from a local Hub cache with HF_HUB_OFFLINE=1: all give the same outputs."""
        ref, ours = sdxl_pair
        ref.save_pretrained(tmp_path / "repo" / "vae")
        save_file(ref.state_dict(), tmp_path / "plain.safetensors")
        (hub_snapshot(offline_hub, tk.SDXL_REPO) / tk.SDXL_FILE).parent.mkdir(parents=True)
        shutil.copy(tmp_path / "repo" / tk.SDXL_FILE, hub_snapshot(offline_hub, tk.SDXL_REPO) / tk.SDXL_FILE)
        x = rand_video(1, 2, 32, 48, seed=9)
        z = ours.encode(x)
        for spec in (tmp_path / "repo" / tk.SDXL_FILE, tmp_path / "repo" / "vae", tmp_path / "repo",
                     tmp_path / "plain.safetensors", "sdxl", tk.SDXL_REPO):
            vae = tk.load_sdxl_vae(str(spec), config=SDXL_TINY)
            assert torch.equal(vae.encode(x), z), spec
            assert torch.equal(vae.decode(z), ours.decode(z)), spec

    def test_sdxl_vae_reads_the_old_attention_names(self, sdxl_pair, tmp_path):
        """A file saved with diffusers' pre-0.14 attention names (query, key, value, proj_attn) loads to the same
        model; nothing else is renamed (an unknown key still fails)."""
        ref, ours = sdxl_pair
        rename = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        old = {}
        for k, v in ref.state_dict().items():
            for new_name, old_name in rename.items():
                k = k.replace("attentions.0." + new_name, "attentions.0." + old_name)
            old[k] = v.contiguous()
        assert sum("proj_attn" in k for k in old) == 4  # weight and bias, encoder and decoder
        save_file(old, str(tmp_path / "old.safetensors"))
        loaded = tk.SDXLVAE(SDXL_TINY, chunk_frames=4).load_weights(str(tmp_path / "old.safetensors")).eval()
        x = rand_video(1, 2, 16, 24, seed=1)
        assert torch.equal(loaded.encode(x), ours.encode(x))
        assert tk.sdxl_key("decoder.mid_block.attentions.0.key.weight") == "decoder.mid_block.attentions.0.to_k.weight"
        assert tk.sdxl_key("decoder.up_blocks.0.key.weight") == "decoder.up_blocks.0.key.weight"

    def test_sdxl_vae_wrong_file_is_one_clear_error(self, sdxl_pair, tmp_path, offline_hub):
        """A file with a missing, an extra and a mis-shaped tensor: one ValueError naming all three and the
        expected layout; a Wan VAE file likewise; 'sdxl' absent from the Hub cache: where to get it."""
        sd = dict(sdxl_pair[1].state_dict())
        del sd["decoder.conv_out.bias"]
        sd["encoder.extra.weight"] = torch.zeros(1)
        sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
        save_file(sd, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError) as e:
            tk.load_sdxl_vae(str(tmp_path / "bad.safetensors"), config="tiny")
        msg = str(e.value)
        assert "missing (1): decoder.conv_out.bias" in msg and "unexpected (1): encoder.extra.weight" in msg
        assert "wrong shape (1): quant_conv.weight: checkpoint (8, 8, 3, 3) vs model (8, 8, 1, 1)" in msg
        assert "diffusers' AutoencoderKL layout" in msg and tk.SDXL_FILE in msg
        torch.save(tk.WanVAE("tiny").state_dict(), tmp_path / "wan.pth")
        with pytest.raises(ValueError, match=r"does not match .*\n  missing \(\d+\): encoder.conv_in.weight"):
            tk.load_sdxl_vae(str(tmp_path / "wan.pth"), config="tiny")
        with pytest.raises(hub.WeightsError, match="not in the local Hub cache") as e:
            tk.load_sdxl_vae("sdxl", config="tiny")
        assert f"hf download {tk.SDXL_REPO} {tk.SDXL_FILE}" in str(e.value)

    def test_sdxl_vae_user_errors(self):
        with pytest.raises(ValueError, match="unknown SDXL VAE preset 'xl'"):
            tk.SDXLVAE("xl")
        with pytest.raises(ValueError, match="groups=32 must divide"):
            tk.SDXLVAE(tk.SDXLVAEConfig(channels=(16, 32)))
        vae = tk.SDXLVAE(SDXL_TINY)
        with pytest.raises(ValueError, match="multiples of 8"):
            vae.encode(rand_video(1, 2, 20, 24))
        with pytest.raises(ValueError, match=r"expected latents \(B, 4"):
            vae.decode(torch.zeros(1, 16, 2, 3, 3))
        # IRASim's tokenizer (train.py refuses it with the Cosmos backbone, whose DiT takes 4x temporal compression)
        sdxl = tk.build_tokenizer("sdxl", config=SDXL_TINY)
        assert isinstance(sdxl, tk.SDXLVAE) and sdxl.temporal_compression == 1


# =====================================================================================================================
# semantic.py: DINOv3 against transformers, weight layouts, Reason1 text embeddings, the projector

def original_layout(model):
    """The original dinov3 checkpoint layout, written by hand from the transformers modules: fused qkv
    with a large key bias (DINOv3 masks it), bias_mask, storage_tokens, (1, D) mask token, periods."""
    e, D = model.embeddings, DINO_TINY.dim
    sd = {"cls_token": e.cls_token, "storage_tokens": e.register_tokens,
          "mask_token": e.mask_token.reshape(1, D), "patch_embed.proj.weight": e.patch_embeddings.weight,
          "patch_embed.proj.bias": e.patch_embeddings.bias, "norm.weight": model.norm.weight,
          "norm.bias": model.norm.bias,
          "rope_embed.periods": 100.0 ** (2 * torch.arange(4) / 8)}
    for i, layer in enumerate(model.model.layer):
        a, b = layer.attention, f"blocks.{i}."
        sd[b + "attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[b + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, 5 * torch.randn(D), a.v_proj.bias])
        sd[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        for name, lin in (("norm1", layer.norm1), ("attn.proj", a.o_proj), ("norm2", layer.norm2),
                          ("mlp.fc1", layer.mlp.up_proj), ("mlp.fc2", layer.mlp.down_proj)):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = lin.weight, lin.bias
    return {k: v.detach().clone() for k, v in sd.items()}


LM_WORDS = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "You", "are", "a",
            "helpful", "assistant", "who", "will", "provide", "prompts", "to", "an", "image", "generator", ".",
            "fold", "the", "towel", "pick", "up", "cup"]
LM_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}"
           "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ^ the tiny language model's vocabulary, and Qwen2.5-VL's chat template reduced to text parts


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 3-layer Qwen2 language model and a word-level tokenizer with the chat template of LM_CHAT."""
    transformers = importlib.import_module("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                     pad_token="<|endoftext|>",
                                                     extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = LM_CHAT
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(LM_WORDS), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    return transformers.Qwen2ForCausalLM(cfg).eval(), tokenizer


def reference_embedding(model, tokenizer, prompt, max_tokens):
    """Reason1's text embedding written out independently: the chat text, padded tokens, every layer's hidden
    states normalized over the width and concatenated -> (max_tokens, n_layers * width) float64."""
    text = f"<|im_start|>system\n{semantic.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    ids = ids + [tokenizer.pad_token_id] * (max_tokens - len(ids))
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = [h[0].double().numpy() for h in hs[1:]]
    return np.concatenate([(h - h.mean(-1, keepdims=True)) / (h.std(-1, ddof=1, keepdims=True) + 1e-8)
                           for h in layers], -1)


class CountingEncoder(TextEncoder):
    """A TextEncoder that records the prompts it is asked to encode in self.calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return super().__call__(prompts)


def filled_text_cache(tiny_lm, cache_dir):
    """A TextEmbedder over a CountingEncoder that has embedded 'fold the towel' and '' -> (embedder, their
    embeddings, the encoder's calls)."""
    model, tokenizer = tiny_lm
    enc = CountingEncoder(model, tokenizer, "tiny-qwen2", max_tokens=16)
    embedder = TextEmbedder(cache_dir=str(cache_dir), encoder=enc, text_dim=96, max_tokens=16)
    return embedder, embedder(["fold the towel", ""]), enc.calls


def broken_dino_file(hf_dino, tmp_path):
    """The Hub-layout DINOv3 file with one key missing, one mis-shaped and one unexpected."""
    _, folder = hf_dino
    sd = semantic.load_file(str(folder / "model.safetensors"))
    sd.pop("layer.1.norm2.bias")
    sd["layer.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    sd["layer.7.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    return tmp_path / "broken.safetensors"


SEMANTIC_BAD_INPUTS = {  # case -> (call on tmp_path, exception, message)
    "size_not_multiple_of_16": (lambda tmp_path: DinoV3(DINO_TINY)(torch.zeros(1, 3, 40, 64)),
                                ValueError, "multiples of 16"),
    "4_channels": (lambda tmp_path: DinoV3(DINO_TINY)(torch.zeros(1, 4, 32, 32)), ValueError, r"\(B, 3, H, W\)"),
    "uint8_frames": (lambda tmp_path: DinoV3(DINO_TINY)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
                     ValueError, "float frames"),
    "unknown_dino_preset": (lambda tmp_path: load_dino(str(tmp_path), preset="vitb"),
                            ValueError, "unknown DINOv3 preset"),
    "projector_width": (lambda tmp_path: SemanticProjector(32, 16, injection_weight=0.2)(torch.randn(2, 6, 31)),
                        ValueError, r"\(B, P, 32\)"),
    "aggregate_without_embedding_output": (lambda tmp_path: aggregate_hidden_states((torch.zeros(1, 2, 3),)),
                                           ValueError, "embedding output"),
}


def dit_with_semantic_branch(tmp_path):
    """A random backbone in the official layout and the same backbone loaded with the semantic branch on ->
    (backbone, with_branch)."""
    backbone = randomize(M.DiT(DIT_SMALL), seed=4).eval()
    official_pt(backbone, tmp_path / "dit.pt")
    with_branch = M.load_dit(str(tmp_path / "dit.pt"), replace(DIT_SMALL, semantic_dim=DINO_TINY.dim)).eval()
    return backbone, with_branch


def semantic_inputs():
    """DiT inputs, and DINOv3 features of some frames and of the same frames mirrored ->
    (x, sigma, text, features, other features)."""
    g = torch.Generator().manual_seed(0)
    x, text, sigma = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 5, 48, generator=g), torch.rand(2)
    dino = DinoV3(DINO_TINY)
    frames = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    return x, sigma, text, conditioning_features(dino, frames), conditioning_features(dino, frames.flip(-1))


class TestSemantic:
    """DINOv3 equals transformers' on the same weights and loads both layouts; Reason1 text embeddings equal a
    reference aggregation and are cached per prompt; the projector and the DiT's semantic branch."""

    def test_dino_matches_transformers(self, hf_dino):
        """Same random weights, non-square 48x80 input (3x5 patches), batch 2 -> same patch features."""
        model, folder = hf_dino
        ours = load_dino(str(folder), preset="tiny")
        frames, pixels = frames_and_pixels()
        with torch.no_grad():
            ref = model(pixel_values=pixels).last_hidden_state[:, 1 + DINO_TINY.n_registers:]
        got = ours(frames)
        assert got.shape == (2, 15, DINO_TINY.dim)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)

    def test_original_pth_and_hub_layouts_agree(self, hf_dino, tmp_path):
        model, folder = hf_dino
        torch.save(original_layout(model), tmp_path / "dinov3_tiny.pth")
        from_pth = load_dino(str(tmp_path / "dinov3_tiny.pth"), preset="tiny")
        from_hub = load_dino(str(folder / "model.safetensors"), preset="tiny")
        frames, _ = frames_and_pixels()
        torch.testing.assert_close(from_pth(frames), from_hub(frames), atol=0, rtol=0)

    @pytest.mark.parametrize("case", list(SEMANTIC_BAD_INPUTS))
    def test_bad_input_is_one_clear_error(self, case, tmp_path):
        call, error, message = SEMANTIC_BAD_INPUTS[case]
        with pytest.raises(error, match=message):
            call(tmp_path)

    def test_dino_key_mismatch_lists_missing_unexpected_and_misshaped(self, hf_dino, tmp_path):
        with pytest.raises(ValueError, match=r"(?s)missing \(1\): blocks.1.norm2.bias.*"
                                             r"unexpected \(1\): layer.7.extra.weight.*wrong shape \(1\): "
                                             r"blocks.0.mlp.fc1.weight"):
            load_dino(str(broken_dino_file(hf_dino, tmp_path)), preset="tiny")

    def test_dino_weights_of_another_size_do_not_fit_the_preset(self, hf_dino):
        _, folder = hf_dino
        with pytest.raises(ValueError, match="of preset 'vitl16'"):
            load_dino(str(folder), preset="vitl16")

    def test_dino_is_frozen(self):
        """No DINOv3 parameter trains, and its features carry no graph even from an input that requires grad."""
        torch.manual_seed(0)
        dino = DinoV3(DINO_TINY)
        assert not any(p.requires_grad for p in dino.parameters())
        video = (torch.rand(3, 3, 5, 32, 48) * 2 - 1).requires_grad_(True)  # (B, C, T, H, W)
        assert conditioning_features(dino, video, chunk=2, dtype=torch.bfloat16).grad_fn is None

    def test_conditioning_features_are_those_of_the_first_frame(self):
        torch.manual_seed(0)
        dino = DinoV3(DINO_TINY)
        video = torch.rand(3, 3, 5, 32, 48) * 2 - 1  # (B, C, T, H, W)
        feats = conditioning_features(dino, video, chunk=2, dtype=torch.bfloat16)
        assert feats.shape == (3, 6, DINO_TINY.dim) and feats.dtype == torch.bfloat16
        torch.testing.assert_close(feats, dino(video[:, :, 0]).to(torch.bfloat16), atol=0, rtol=0)
        assert not torch.equal(dino(video[:, :, 0]), dino(video[:, :, 1]))

    def test_dino_bf16_runs_close_to_fp32(self):
        torch.manual_seed(0)
        dino, frames = DinoV3(DINO_TINY), torch.rand(2, 3, 32, 64) * 2 - 1
        half = DinoV3(DINO_TINY).to(torch.bfloat16)
        half.load_state_dict(dino.state_dict())
        got = half(frames)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), dino(frames), atol=0.1, rtol=0.05)

    def test_projector_is_a_weighted_trainable_linear_map(self):
        torch.manual_seed(0)
        feats = torch.randn(2, 6, 32)
        proj = SemanticProjector(32, 16, injection_weight=0.2)
        out = proj(feats)
        assert out.shape == (2, 6, 16) and all(p.requires_grad for p in proj.parameters())
        torch.testing.assert_close(out, 0.2 * (feats @ proj.proj.weight.T + proj.proj.bias))
        proj.injection_weight = 0.6
        torch.testing.assert_close(proj(feats), 3 * out)

    def test_zero_initialized_projector_outputs_zero(self):
        feats = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
        assert SemanticProjector(32, 16, zero_init=True)(feats).abs().max() == 0

    def test_reason1_aggregation_matches_reference(self, tiny_lm):
        model, tokenizer = tiny_lm
        enc = TextEncoder(model, tokenizer, "tiny-qwen2", max_tokens=512)
        prompts = ["fold the towel .", "pick up the cup"]
        got = enc(prompts)
        assert got.shape == (2, 512, 3 * 32) and got.dtype == torch.float32
        for i, p in enumerate(prompts):
            np.testing.assert_allclose(got[i].numpy(), reference_embedding(model, tokenizer, p, 512), atol=1e-5)

    def test_truncation_keeps_the_start(self, tiny_lm):
        model, tokenizer = tiny_lm
        short = TextEncoder(model, tokenizer, "tiny-qwen2", max_tokens=8)(["fold the towel ."])
        np.testing.assert_allclose(short[0].numpy(), reference_embedding(model, tokenizer, "fold the towel .", 8),
                                   atol=1e-5)

    def test_text_cache_hits_come_from_disk(self, tiny_lm, tmp_path):
        embedder, first, calls = filled_text_cache(tiny_lm, tmp_path)
        assert first.shape == (2, 16, 96) and first.dtype == torch.bfloat16 and len(calls) == 2
        assert torch.equal(embedder("fold the towel")[0], first[0]) and torch.equal(embedder.null(2)[1], first[1])
        assert len(calls) == 2  # both hits came from disk

    def test_cached_embeddings_load_without_an_encoder(self, tiny_lm, tmp_path):
        _, first, _ = filled_text_cache(tiny_lm, tmp_path)
        no_encoder = TextEmbedder(cache_dir=str(tmp_path), encoder_id="tiny-qwen2", text_dim=96, max_tokens=16)
        assert torch.equal(no_encoder(["fold the towel"]), first[:1])

    def test_uncached_prompt_without_an_encoder_is_one_clear_error(self, tiny_lm, tmp_path):
        filled_text_cache(tiny_lm, tmp_path)
        no_encoder = TextEmbedder(cache_dir=str(tmp_path), encoder_id="tiny-qwen2", text_dim=96, max_tokens=16)
        with pytest.raises(FileNotFoundError, match="no cached text embedding"):
            no_encoder(["pick up the cup"])

    def test_the_encoder_id_is_part_of_the_cache_key(self, tiny_lm, tmp_path):
        filled_text_cache(tiny_lm, tmp_path)
        other = TextEmbedder(cache_dir=str(tmp_path), encoder_id="another-encoder", text_dim=96, max_tokens=16)
        with pytest.raises(FileNotFoundError):
            other(["fold the towel"])

    def test_cached_embedding_of_another_width_is_one_clear_error(self, tiny_lm, tmp_path):
        filled_text_cache(tiny_lm, tmp_path)
        wrong_dim = TextEmbedder(cache_dir=str(tmp_path), encoder_id="tiny-qwen2", text_dim=64, max_tokens=16)
        with pytest.raises(ValueError, match=r"expected \(16, 64\)"):
            wrong_dim("fold the towel")

    def test_mode_none_gives_zero_embeddings(self):
        none = TextEmbedder(mode="none", text_dim=64, max_tokens=8, dtype=torch.float32)
        assert none(["a", "b", "c"]).shape == (3, 8, 64) and none.null(2).abs().max() == 0

    def test_missing_transformers_says_what_to_install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
        with pytest.raises(ImportError, match="pip install transformers"):
            TextEncoder.from_pretrained("some/model")

    def test_from_pretrained_reason1_architecture(self, tiny_lm, tmp_path):
        """A saved tiny Qwen2.5-VL (Reason1's architecture) loads through TextEncoder.from_pretrained (the
        vision-language fallback) and gives the aggregation of its language model's hidden states."""
        transformers = importlib.import_module("transformers")
        _, tokenizer = tiny_lm
        text = dict(vocab_size=len(LM_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=1,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
        torch.manual_seed(0)
        vl = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
        vl.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        enc = TextEncoder.from_pretrained(str(tmp_path), max_tokens=16)
        assert enc.encoder_id == str(tmp_path)
        ids = torch.tensor([semantic.prompt_token_ids(tokenizer, "fold the towel", 16)])
        with torch.no_grad():
            hs = vl.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(enc(["fold the towel"]), aggregate_hidden_states(hs), atol=1e-5, rtol=1e-5)

    def test_loading_a_backbone_initializes_the_semantic_branch(self, tmp_path):
        """The branch is switched on by the config; loading a backbone checkpoint initializes it on the way."""
        _, with_branch = dit_with_semantic_branch(tmp_path)
        assert with_branch.semantic.injection_weight == 0.2 and not with_branch.semantic.proj.weight.is_meta
        assert M.DiT(replace(DIT_SMALL, semantic_dim=8, semantic_weight=0.6)).semantic.injection_weight == 0.6

    def test_semantic_branch_without_features_is_the_plain_dit(self, tmp_path):
        backbone, with_branch = dit_with_semantic_branch(tmp_path)
        x, sigma, text, _, _ = semantic_inputs()
        with torch.no_grad():
            assert torch.equal(with_branch(x, sigma, text), backbone(x, sigma, text))

    def test_semantic_branch_with_features_depends_on_the_frame(self, tmp_path):
        backbone, with_branch = dit_with_semantic_branch(tmp_path)
        x, sigma, text, feats, other = semantic_inputs()
        with torch.no_grad():
            plain = backbone(x, sigma, text)
            on = with_branch(x, sigma, text, image_features=feats)
            assert not torch.allclose(on, plain, atol=1e-4)
            assert not torch.allclose(on, with_branch(x, sigma, text, image_features=other), atol=1e-4)


# =====================================================================================================================
# data.py: the 57-D action, readers, corruption handling, clips and sharding, statistics, the latent cache

def d_rot(axis, a):
    """synthetic._rot in float64: rotation matrices by angles a about one axis."""
    return synthetic._rot(axis, np.asarray(a, np.float64))


def d_pose(R, t):
    """synthetic._pose in float64: 4x4 poses from rotations and translations."""
    return synthetic._pose(np.asarray(R, np.float64), np.asarray(t, np.float64))


def random_rotations(rng, n):
    """n random rotation matrices (from random quaternions), (n, 3, 3)."""
    q = rng.normal(size=(n, 4))
    return data.quat_pose(np.concatenate([np.zeros((n, 3)), q], 1))[:, :3, :3]


def static_track(rng, n):
    """A track that does not move at all."""
    W = d_pose(random_rotations(rng, 1), rng.normal(size=(1, 3)))
    track = {"camera": np.repeat(d_pose(random_rotations(rng, 1), rng.normal(size=(1, 3))), n, 0)}
    for s in conditioning.HANDS:
        track[f"{s}_wrist"] = np.repeat(W, n, 0)
        track[f"{s}_tips"] = np.repeat(rng.normal(size=(1, 5, 3)), n, 0)
    return track


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    """A 45-frame MP4 with a keyframe every 12 frames whose brightness encodes the frame index (5 per frame)."""
    path = tmp_path_factory.mktemp("video") / "v.mp4"
    data.write_video(path, [np.full((64, 96, 3), 5 * i, np.uint8) for i in range(45)], gop=12)
    return path


def _corrupt(root, case):
    """Copy a clean episode to root/part1/<case>/0.* and break it in one way."""
    d = root / "part1" / case
    h5, mp4 = d / "0.hdf5", d / "0.mp4"
    if case == "missing_joint":
        with h5py.File(h5, "a") as f:
            del f["transforms/leftIndexFingerTip"]
    elif case == "truncated_dataset":
        with h5py.File(h5, "a") as f:
            short = f["transforms/rightHand"][:-5]
            del f["transforms/rightHand"]
            f["transforms/rightHand"] = short
    elif case == "truncated_hdf5":
        h5.write_bytes(h5.read_bytes()[:1500])
    elif case == "short_video":
        frames, _ = data.decode_frames(mp4, 0, 20)
        data.write_video(mp4, frames)
    elif case == "unreadable_video":
        mp4.write_bytes(b"\x00not a video" * 100)
    elif case == "missing_video":
        mp4.unlink()


CORRUPTIONS = {"missing_joint": "missing pose dataset transforms/leftIndexFingerTip",
               "truncated_dataset": "frame-count mismatch", "truncated_hdf5": "corrupt",
               "short_video": "video has 20 frames but poses have 40",
               "unreadable_video": "unreadable video", "missing_video": "missing video"}
# ^ each way _corrupt breaks an episode -> the reason the index gives for skipping it

CORRUPT_LOAD_ERRORS = {"missing_joint": "missing pose dataset", "truncated_dataset": "frame-count mismatch",
                       "truncated_hdf5": "corrupt", "short_video": "video ended after 20 frames",
                       "unreadable_video": "unreadable video", "missing_video": "missing video"}
# ^ ... and the error that loading a clip of it raises


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    """A root holding one clean episode and a copy of it broken in each way of CORRUPTIONS."""
    root = tmp_path_factory.mktemp("corrupt")
    h5, _, _ = one_episode(root, frames=40, name="part1/clean")
    for case in CORRUPTIONS:
        shutil.copytree(h5.parent, root / "part1" / case)
        _corrupt(root, case)
    return root


PROMPT_RULE = [  # (episode metadata, task folder, the prompt)
    ({"llm_type": "reversible", "llm_description": "open it", "llm_description2": "close it",
      "which_llm_description": "1"}, None, "open it"),
    ({"llm_type": "reversible", "llm_description": "open it", "llm_description2": "close it",
      "which_llm_description": "2"}, None, "close it"),
    ({"llm_type": "reversible", "llm_description": "open it", "llm_description2": "close it",
      "which_llm_description": np.int64(1)}, None, "open it"),
    ({"llm_type": b"basic", "llm_description": b"pour", "llm_description2": "x"}, None, "pour"),
    ({"llm_description": "stack cups", "description": "old"}, None, "stack cups"),
    ({"description": "old style"}, None, "old style"),
    ({"task": "fold_shirt"}, None, "fold shirt"),
    ({}, "wipe_table", "wipe table"),
]


@pytest.fixture(scope="module")
def synth_stats(synth_root, tmp_path_factory):
    """The statistics of synth_root's part1 written by `python data.py stats` -> the stats.json path."""
    path = tmp_path_factory.mktemp("stats") / "s.json"
    data.main(["stats", "--data", str(synth_root), "--out", str(path), "--splits", "part1", "--workers", "0"])
    return path


def sampler_state():
    """A ClipSampler (seed 5, rank 1 of 2) that has given 11 clips -> (frames, its full order, those 11, its state)."""
    frames = np.random.default_rng(1).integers(30, 300, 40)
    full = list(data.ClipSampler(frames, seed=5, rank=1, world_size=2))
    s = data.ClipSampler(frames, seed=5, rank=1, world_size=2)
    it = iter(s)
    seen = [next(it) for _ in range(11)]
    return frames, full, seen, s.state_dict(consumed=len(seen))


def quat_wxyz(R):
    """(T, 3, 3) -> (T, 4) unit quaternions wxyz (magnitudes from the diagonal, signs from w > 0)."""
    d = np.stack([R[:, 0, 0], R[:, 1, 1], R[:, 2, 2]], 1)
    mag = np.sqrt(np.maximum(0, 1 + d @ np.array([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]]))) / 2
    sign = np.sign(np.stack([np.ones(len(R)), R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0],
                             R[:, 1, 0] - R[:, 0, 1]], 1))
    return mag * sign


@pytest.fixture(scope="module")
def egoverse_root(tmp_path_factory):
    """One synthetic episode written as an EgoVerse Zarr episode (3 frames of zero padding past total_frames)
    -> (root, episode id, track)."""
    zarr = importlib.import_module("zarr")
    from PIL import Image
    root = tmp_path_factory.mktemp("egoverse") / "eps"
    n, pad = 16, 3
    joints, track = synthetic.synth_track(np.random.default_rng(9), n)
    K = np.array([[122.8, 0, 160], [0, 122.8, 90], [0, 0, 1]])
    g = zarr.open_group(str(root / "abc123.zarr"), mode="w")
    g.attrs.update({"fps": 30, "task_description": "Open the jar.", "total_frames": n,
                    "intrinsics": {"front_1": np.concatenate([K, np.zeros((3, 1))], 1).tolist()}})

    def put(key, a):
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:])])  # zero padding past total_frames
        g.create_array(key, shape=a.shape, dtype="float64")[:] = a

    def xyz_wxyz(T):
        return np.concatenate([T[:, :3, 3], quat_wxyz(T[:, :3, :3])], 1)

    put("obs_head_pose", xyz_wxyz(track["camera"]))
    for s in conditioning.HANDS:
        put(f"{s}.obs_wrist_pose", xyz_wxyz(track[f"{s}_wrist"]))
        kp = np.zeros((n, 21, 3))
        kp[:, [4, 8, 12, 16, 20]] = track[f"{s}_tips"]  # MANO fingertips, thumb..little
        put(f"{s}.obs_keypoints", kp.reshape(n, 63))
    jpegs = []
    for i in range(n + pad):
        buf = io.BytesIO()
        frame = synthetic.render_frame(joints, min(i, n - 1), K, (180, 320), (90, 90, 90))
        Image.fromarray(frame).save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    img = g.create_array("images.front_1", shape=(n + pad,), dtype=zarr.dtype.VariableLengthBytes())
    img[:] = np.array(jpegs, dtype=object)
    return root, n, track


def egoverse_clip(egoverse_root):
    """The EgoVerse episode's clip of 13 frames from frame 2 at 144x256."""
    episodes, _ = data.load_index(egoverse_root[0])
    return data.load_clip(episodes[0], 2, 13, (144, 256))


@pytest.fixture(scope="module")
def cache_source(tmp_path_factory):
    """A synthetic root of 2 episodes of 40 frames at 48x80 to cache latents from."""
    return synthetic.write_synthetic(tmp_path_factory.mktemp("cache_source") / "syn", tasks=1, episodes=2,
                                test_episodes=0, frames=40, size=(48, 80), workers=0)


CACHE_SETTINGS = dict(clip_len=5, size=(32, 64), shard_size=3, batch=2, workers=0, dtype=torch.float32)


def cache_on_two_ranks(root, out):
    """Pixel-tokenizer latents of root's clips cached into out by ranks 0 and 1 of 2 -> the shards each wrote."""
    return [data.cache_clips(root, out, tk.build_tokenizer("pixel"), tokenizer_name="pixel", rank=r,
                             world_size=2, **CACHE_SETTINGS) for r in (0, 1)]


@pytest.fixture(scope="module")
def d24_root(tmp_path_factory):
    """A tiny synthetic root with its statistics, and a non-empty folder."""
    base = tmp_path_factory.mktemp("d24")
    synthetic.write_synthetic(base / "syn", tasks=1, episodes=1, test_episodes=0, frames=8, workers=0)
    (base / "syn" / "stats.json").write_text(json.dumps(data.compute_stats(base / "syn", ("part1",))))
    (base / "afile").write_text("x")
    return base


DATA_BAD_INPUTS = [
    ("data_index_workers_negative", ["data.py", "index", "--data", "{root}/syn", "--workers", "-1"], 2),
    ("data_index_clip_len_0", ["data.py", "index", "--data", "{root}/syn", "--clip-len", "0"], 2),
    ("data_index_clip_len_not_4k1", ["data.py", "index", "--data", "{root}/syn", "--clip-len", "12"], 2),
    ("data_index_test_fraction_1", ["data.py", "index", "--data", "{root}/syn", "--test-fraction", "1"], 2),
    ("data_index_test_fraction_negative", ["data.py", "index", "--data", "{root}/syn", "--test-fraction", "-0.1"],
     2),
    ("data_index_test_fraction_nan", ["data.py", "index", "--data", "{root}/syn", "--test-fraction", "nan"], 2),
    ("data_index_missing_root", ["data.py", "index", "--data", "{root}/nope", "--workers", "0"], 1),
    ("data_stats_max_episodes_0", ["data.py", "stats", "--data", "{root}/syn", "--max-episodes", "0"], 2),
    ("data_stats_workers_text", ["data.py", "stats", "--data", "{root}/syn", "--workers", "two"], 2),
    ("data_stats_out_is_folder", ["data.py", "stats", "--data", "{root}/syn", "--out", "{root}", "--workers", "0"],
     1),
    ("data_stats_out_parent_missing", ["data.py", "stats", "--data", "{root}/syn", "--out", "{root}/no/s.json",
                                       "--workers", "0"], 1),
    ("data_stats_out_parent_is_file", ["data.py", "stats", "--data", "{root}/syn", "--out", "{root}/afile/s.json",
                                       "--workers", "0"], 1),
    ("data_stats_out_unwritable", ["data.py", "stats", "--data", "{root}/syn", "--out", "/proc/s.json",
                                   "--workers", "0"], 1),
    ("data_cache_height_0", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--height", "0"], 2),
    ("data_cache_width_negative", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--width",
                                   "-32"], 2),
    ("data_cache_height_not_16k", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--height",
                                   "40"], 2),
    ("data_cache_clip_len_not_4k1_for_wan", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c",
                                             "--clip-len", "12"], 2),
    ("data_cache_clip_len_1", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--clip-len", "1"],
     2),
    ("data_cache_shard_size_0", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--shard-size",
                                 "0"], 2),
    ("data_cache_batch_0", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--batch", "0"], 2),
    ("data_cache_epochs_0", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--epochs", "0"], 2),
    ("data_cache_workers_negative", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--workers",
                                     "-2"], 2),
    ("data_cache_unknown_device", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/c", "--device",
                                   "tpu"], 2),
    ("data_cache_out_is_file", ["data.py", "cache", "--data", "{root}/syn", "--out", "{root}/afile",
                                "--tokenizer", "pixel", "--device", "cpu"], 1),
    ("synth_non_empty_out", ["synthetic.py", "--out", "{root}/syn", "--tasks", "1", "--frames", "8"], 1),
    ("synth_out_is_file", ["synthetic.py", "--out", "{root}/afile", "--tasks", "1", "--frames", "8"], 1),
    ("synth_overwrite_foreign_folder", ["synthetic.py", "--out", "{root}", "--overwrite", "--tasks", "1"], 1),
    ("synth_tasks_0", ["synthetic.py", "--out", "{root}/n", "--tasks", "0"], 2),
    ("synth_tasks_too_many", ["synthetic.py", "--out", "{root}/n", "--tasks", "99"], 2),
    ("synth_episodes_0", ["synthetic.py", "--out", "{root}/n", "--episodes", "0"], 2),
    ("synth_test_episodes_negative", ["synthetic.py", "--out", "{root}/n", "--test-episodes", "-1"], 2),
    ("synth_frames_1", ["synthetic.py", "--out", "{root}/n", "--frames", "1"], 2),
    ("synth_height_0", ["synthetic.py", "--out", "{root}/n", "--height", "0"], 2),
    ("synth_width_odd", ["synthetic.py", "--out", "{root}/n", "--width", "33"], 2),
    ("synth_width_tiny", ["synthetic.py", "--out", "{root}/n", "--width", "8"], 2),
    ("synth_workers_negative", ["synthetic.py", "--out", "{root}/n", "--workers", "-1"], 2),
    ("synth_zoom_0", ["synthetic.py", "--out", "{root}/n", "--zoom", "0"], 2),
    ("synth_marker_scale_inf", ["synthetic.py", "--out", "{root}/n", "--marker-scale", "inf"], 2),
    ("synth_quirks_height_not_6k", ["synthetic.py", "--out", "{root}/n", "--quirks", "--height", "70"], 2),
    ("synth_quirks_frames_short", ["synthetic.py", "--out", "{root}/n", "--quirks", "--frames", "20"], 2),
    ("bench_dit_batch_0", ["bench.py", "dit", "--batch", "0"], 2),
    ("bench_dit_height_negative", ["bench.py", "dit", "--height", "-8"], 2),
    ("bench_dit_height_odd", ["bench.py", "dit", "--height", "7"], 2),
    ("bench_dit_iters_0", ["bench.py", "dit", "--iters", "0"], 2),
    ("bench_dit_unknown_device", ["bench.py", "dit", "--device", "gpu"], 2),
    ("bench_vae_frames_not_4k1", ["bench.py", "vae", "--frames", "12"], 2),
    ("bench_vae_height_0", ["bench.py", "vae", "--height", "0"], 2),
    ("bench_vae_batch_negative", ["bench.py", "vae", "--batch", "-1"], 2),
    ("bench_dino_width_not_16k", ["bench.py", "dino", "--width", "500"], 2),
    ("bench_dino_iters_0", ["bench.py", "dino", "--iters", "0"], 2),
    ("bench_decode_clips_0", ["bench.py", "decode", "--clips", "0"], 2),
    ("bench_decode_frames_13", ["bench.py", "decode", "--frames", "13"], 2),
    ("bench_decode_frames_too_many", ["bench.py", "decode", "--frames", "1000"], 2),
    ("bench_decode_step_time_0", ["bench.py", "decode", "--step-time", "0"], 2),
    ("bench_decode_gop_0", ["bench.py", "decode", "--gop", "0"], 2),
    ("bench_sample_steps_0", ["bench.py", "sample", "--steps", "0"], 2),
    ("bench_sample_height_0", ["bench.py", "sample", "--height", "0"], 2),
    ("bench_sample_guidance_negative", ["bench.py", "sample", "--guidance", "-1"], 2),
    ("bench_sample_guidance_nan", ["bench.py", "sample", "--guidance", "nan"], 2),
    ("bench_costs_dim_0", ["bench.py", "costs", "--dim", "0"], 2),
    ("bench_costs_heads_not_dividing", ["bench.py", "costs", "--dim", "100", "--heads", "16"], 2),
    ("bench_costs_height_not_16k", ["bench.py", "costs", "--height", "100"], 2),
    ("bench_costs_steps_negative", ["bench.py", "costs", "--steps", "-12"], 2),
]


def stats_variant(tmp_path, d24_root, **change):
    """The synthetic statistics file with some keys changed, written to tmp_path -> (its path, the dict)."""
    stats = json.loads((d24_root / "syn" / "stats.json").read_text())
    stats.update(change)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(stats))
    return path, stats


def one_error_line(argv):
    """-> (exit code, stderr) of an entry point on argv: usage errors (exit 2, argparse's) in this process,
    the others in a subprocess (`python SCRIPT ...`, the way users meet them, through hub.run_main)."""
    modules = {"data.py": data, "synthetic.py": synthetic, "bench.py": bench}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            modules[argv[0]].main(argv[1:])
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception:  # a runtime error: see it as users do, in a subprocess
            code = None
    if code is not None:
        return code, err.getvalue()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEXAC_DEBUG", None)
    r = subprocess.run([sys.executable, *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


@pytest.fixture(scope="module")
def d24_results(d24_root):
    """Every bad input of DATA_BAD_INPUTS: {name: (exit code, stderr)}."""
    return {name: one_error_line([a.format(root=d24_root) for a in argv]) for name, argv, _ in DATA_BAD_INPUTS}


class TestData:
    """The 57-D action from poses, the EgoDex and EgoVerse readers, corrupt episodes, clips, sharding and exact
    resume, action statistics, and the latent cache."""

    def test_action_names_and_blocks(self):
        names = conditioning.ACTION_NAMES
        assert conditioning.ACTION_DIM == 57 and len(names) == 57 == len(set(names))
        assert [n for n, _ in conditioning.ACTION_LAYOUT] == ["left_wrist", "left_fingers", "right_wrist",
                                                      "right_fingers", "head"]
        assert [s for _, s in conditioning.ACTION_LAYOUT] == [9, 15, 9, 15, 9]

    def test_action_families_partition_the_dimensions(self):
        fams = conditioning.ACTION_FAMILIES
        assert sorted(fams["wrist"] + fams["finger"] + fams["head"]) == list(range(57))
        assert (len(fams["wrist"]), len(fams["finger"]), len(fams["head"])) == (18, 30, 9)
        for name, sl in conditioning.ACTION_SLICES.items():
            family = {"wrist": "wrist", "fingers": "finger", "head": "head"}[name.split("_")[-1]]
            assert set(range(sl.start, sl.stop)) <= set(fams[family])

    def test_action_layout_is_json(self):
        assert json.loads(json.dumps(conditioning.action_layout())) == conditioning.action_layout()

    def test_keypoints_have_names_and_distinct_colors(self):
        assert len(data.KEYPOINT_NAMES) == len(synthetic.KEYPOINT_COLORS) == 12
        assert len({tuple(c) for c in synthetic.KEYPOINT_COLORS}) == 12

    def test_rot6d_convention(self):
        Rz90 = d_rot(2, np.pi / 2)
        np.testing.assert_allclose(conditioning.rot6d_from_matrix(Rz90), [0, 1, 0, -1, 0, 0], atol=1e-12)
        np.testing.assert_allclose(conditioning.rot6d_from_matrix(np.eye(3)), conditioning.IDENTITY_6D)

    def test_rot6d_round_trips_in_numpy_and_torch(self):
        R = random_rotations(np.random.default_rng(0), 50)
        np.testing.assert_allclose(conditioning.matrix_from_rot6d(conditioning.rot6d_from_matrix(R)), R, atol=1e-12)
        rot6d = conditioning.rot6d_from_matrix
        assert torch.allclose(rot6d(torch.tensor(R)), torch.tensor(rot6d(R)))

    def test_noisy_rot6d_gives_a_proper_rotation(self):
        """Gram-Schmidt always gives a proper rotation."""
        R = random_rotations(np.random.default_rng(0), 50)
        noisy = conditioning.rot6d_from_matrix(torch.tensor(R)) + 0.01 * torch.randn(50, 6, dtype=torch.float64)
        Rn = conditioning.matrix_from_rot6d(noisy)
        assert torch.allclose(Rn.transpose(-1, -2) @ Rn, torch.eye(3, dtype=torch.float64).expand_as(Rn), atol=1e-12)
        assert torch.allclose(torch.linalg.det(Rn), torch.ones(50, dtype=torch.float64))

    def test_action_identity_motion(self):
        a = conditioning.compute_actions(static_track(np.random.default_rng(1), 6))
        assert a.shape == (5, 57) and a.dtype == np.float32
        expected = np.zeros(57, np.float32)
        for name in ("left_wrist", "right_wrist", "head"):
            block = conditioning.ACTION_SLICES[name]
            expected[block.start + 3:block.stop] = conditioning.IDENTITY_6D
        np.testing.assert_allclose(a, np.broadcast_to(expected, a.shape), atol=1e-6)

    def test_action_known_rotation_and_translation(self):
        """A wrist that rotates 90 deg about z, then moves +y in the WORLD: the action is expressed in
        the frame of P_t (inv(P_t) @ P_t+1), so the move shows up as +x of the wrist."""
        track = static_track(np.random.default_rng(2), 3)
        P0 = d_pose(np.eye(3), [1, 0, 0])
        P1 = d_pose(d_rot(2, np.pi / 2), [1, 0, 0])
        P2 = d_pose(d_rot(2, np.pi / 2), [1, 1, 0])
        track["right_wrist"] = np.stack([P0, P1, P2])
        tip = np.stack([(P @ np.array([0.1, 0.2, 0.0, 1]))[:3] for P in (P0, P1, P2)])  # rigid with the wrist
        track["right_tips"] = tip[:, None].repeat(5, 1)
        a = conditioning.compute_actions(track)[:, conditioning.ACTION_SLICES["right_wrist"]]
        np.testing.assert_allclose(a[0], [0, 0, 0, 0, 1, 0, -1, 0, 0], atol=1e-6)
        np.testing.assert_allclose(a[1], [1, 0, 0, 1, 0, 0, 0, 1, 0], atol=1e-6)

    def test_fingertips_moving_with_the_wrist_give_zero_finger_action(self):
        rng = np.random.default_rng(3)
        n = 20
        track = static_track(rng, n)
        for s in conditioning.HANDS:
            W = d_pose(random_rotations(rng, n), rng.normal(size=(n, 3)))
            local = rng.normal(size=(5, 3)) * 0.1
            track[f"{s}_wrist"] = W
            track[f"{s}_tips"] = np.einsum("tij,kj->tki", W[:, :3, :3], local) + W[:, None, :3, 3]
        a = conditioning.compute_actions(track)
        assert np.abs(a[:, list(conditioning.FINGER_IDX)]).max() < 1e-6
        assert np.abs(a[:, list(conditioning.WRIST_IDX)]).max() > 0.1  # the wrists did move

    def test_one_fingertip_moves_one_dimension(self):
        """Move one fingertip in its wrist frame: only its dimension changes."""
        track = static_track(np.random.default_rng(4), 2)
        W = track["right_wrist"][0]
        track["right_tips"] = track["right_tips"].copy()
        track["right_tips"][1, 1] += W[:3, :3] @ np.array([0.001, 0, 0])  # index finger +1 mm along wrist x
        base = conditioning.compute_actions(static_track(np.random.default_rng(4), 2))[0]
        changed = np.nonzero(np.abs(conditioning.compute_actions(track)[0] - base) > 1e-7)[0]
        assert [conditioning.ACTION_NAMES[i] for i in changed] == ["right_indexfinger.dx"]

    def test_camera_moves_only_head_dimensions(self):
        base = conditioning.compute_actions(static_track(np.random.default_rng(4), 2))[0]
        track = static_track(np.random.default_rng(4), 2)
        track["camera"] = track["camera"].copy()
        track["camera"][1, :3, 3] += 0.05
        changed = np.nonzero(np.abs(conditioning.compute_actions(track)[0] - base) > 1e-7)[0]
        assert set(changed) <= set(conditioning.HEAD_IDX) and len(changed) > 0

    @pytest.mark.parametrize("meta,task,prompt", PROMPT_RULE)
    def test_prompt_rule(self, meta, task, prompt):
        assert (data.egodex_prompt(meta, task=task) if task else data.egodex_prompt(meta)) == prompt

    def test_prompt_rule_read_from_synthetic_files(self, synth_root):
        episodes, _ = data.load_index(synth_root)
        prompts = {e.id.split("/")[1]: data.read_track(e).prompt for e in episodes}
        assert prompts["pick_place_cube"] == synthetic.SYNTH_TASKS[0][3]
        assert prompts["open_jar"] == "Open the jar by twisting its lid."  # reversible, which '1'

    def test_resize_antialiases(self):
        board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
        small = data.resize_frame(data.av.VideoFrame.from_ndarray(board, format="rgb24"), (16, 16))
        assert np.abs(small.astype(int) - 128).max() <= 8  # aliasing would leave black/white pixels
        assert np.abs(data.resize_image(board, (16, 16)).astype(int) - 128).max() <= 8

    @pytest.mark.parametrize("src,size", [((180, 320), (288, 512)), ((480, 640), (288, 512)),
                                          ((1080, 1920), (90, 160))])
    def test_intrinsics_follow_the_pixels(self, src, size):
        img = np.zeros(src + (3,), np.uint8)
        y, x = src[0] // 3, src[1] // 3
        img[y:y + 8, x:x + 8] = 255  # block centred on (x + 3.5, y + 3.5)
        K = np.array([[100.0, 0, x + 3.5], [0, 100.0, y + 3.5], [0, 0, 1]])  # principal point on it
        frame = data.av.VideoFrame.from_ndarray(img, format="rgb24")
        out = data.resize_frame(frame, size)[..., 0].astype(float)
        assert out.shape == size
        vv, uu = np.mgrid[:size[0], :size[1]]
        K2 = data.scale_intrinsics(K, src, size)
        assert abs((out * uu).sum() / out.sum() - K2[0, 2]) < 0.3
        assert abs((out * vv).sum() / out.sum() - K2[1, 2]) < 0.3

    @pytest.mark.parametrize("start", [0, 7, 13, 30])
    def test_seek_decodes_exactly_the_requested_frames(self, gop_video, start):
        clip, src = data.decode_frames(gop_video, start, 9)
        assert clip.shape == (9, 64, 96, 3) and src == (64, 96)
        np.testing.assert_allclose(clip.mean((1, 2, 3)), 5 * np.arange(start, start + 9), atol=2)

    def test_decoding_past_the_end_is_one_clear_error(self, gop_video):
        with pytest.raises(data.EpisodeError, match="video ended"):
            data.decode_frames(gop_video, 40, 9)

    def test_index_skips_each_corruption_with_its_reason(self, corrupt_root, caplog):
        with caplog.at_level(logging.WARNING, logger="dexac.data"):
            episodes, skipped = data.load_index(corrupt_root, rebuild=True)
        assert [e.id for e in episodes] == ["part1/clean/0"]
        for case, reason in CORRUPTIONS.items():
            assert reason in skipped[f"part1/{case}/0"], (case, skipped[f"part1/{case}/0"])
            assert f"part1/{case}/0" in caplog.text

    @pytest.mark.parametrize("case", list(CORRUPTIONS))
    def test_direct_access_to_a_corrupt_episode_raises_a_clear_error(self, corrupt_root, case):
        ep = data.Episode(f"part1/{case}/0", str(corrupt_root / "part1" / case / "0.hdf5"), 40, "egodex")
        start = 15 if case == "short_video" else 0  # the clip must reach past the 20 frames there are
        with pytest.raises(data.EpisodeError, match=f"episode part1/{case}/0: {CORRUPT_LOAD_ERRORS[case]}.*rebuild"):
            data.load_clip(ep, start, 13)

    def test_stats_skip_bad_episodes(self, corrupt_root):
        stats = data.compute_stats(corrupt_root, ("part1",))
        assert stats["count"] == 39 and stats["episodes"] == 1 and len(stats["skipped"]) == len(CORRUPTIONS)

    def test_stats_skip_an_episode_that_broke_after_indexing(self, corrupt_root):
        """A stale index: the stats pass itself skips the episode, with the reason."""
        stale = data.Episode("part1/stale/0", str(corrupt_root / "part1" / "missing_joint" / "0.hdf5"), 40, "egodex")
        eid, moments, reason = data._episode_moments(stale)
        assert moments is None and "missing pose dataset" in reason

    def test_failure_at_load_time_is_replaced_and_counted(self, tmp_path, caplog):
        root = tmp_path / "root"
        for k in range(2):
            one_episode(root, frames=20, seed=k, name=f"part1/task{k}")
        episodes, _ = data.load_index(root)
        (root / "part1" / "task0" / "0.mp4").unlink()  # vanishes after indexing
        ds = data.ClipDataset(episodes, 13, (72, 128))
        with caplog.at_level(logging.WARNING, logger="dexac.data"):
            s = ds[(0, 3)]
        assert s["episode"] == "part1/task1/0" and s["skipped"] == 1 and "part1/task0/0" in caplog.text
        assert ds[(0, 3)]["skipped"] == 0  # known bad now, skipped silently

    @pytest.mark.parametrize("stored", [np.zeros((0, 3)), np.full((3, 3), np.nan)], ids=["empty_0x3", "nan"])
    def test_intrinsics_that_are_not_a_finite_3x3_give_the_egodex_constant(self, tmp_path, stored):
        """EgoDex part1 files hold camera/intrinsic of shape (0, 3): the constant K, as the official loader."""
        h5, _, _ = one_episode(tmp_path, frames=14)
        with h5py.File(h5, "a") as f:
            del f["camera/intrinsic"]
            f["camera/intrinsic"] = stored
        ep = data.load_index(tmp_path)[0][0]
        np.testing.assert_array_equal(data.read_track(ep).K, data.EGODEX_K)
        clip = data.load_clip(ep, 0, 13, (72, 128))
        want = data.scale_intrinsics(data.EGODEX_K, (180, 320), (72, 128))
        np.testing.assert_allclose(clip["intrinsics"].numpy(), want, rtol=1e-6)

    def test_video_one_frame_shorter_than_the_poses_keeps_its_episode(self, tmp_path):
        """Frame i pairs with pose row i; the episode keeps the 39 frames both have (2 short: skipped)."""
        for name, video_frames in (("part1/one_short", 39), ("part1/two_short", 38)):
            h5, _, _ = one_episode(tmp_path, frames=40, name=name)
            frames, _ = data.decode_frames(h5.with_suffix(".mp4"), 0, video_frames)
            data.write_video(h5.with_suffix(".mp4"), frames)
        episodes, skipped = data.load_index(tmp_path)
        assert [(e.id, e.frames) for e in episodes] == [("part1/one_short/0", 39)]
        assert "video has 38 frames but poses have 40" in skipped["part1/two_short/0"]
        last = data.load_clip(episodes[0], 39 - 13, 13, (72, 128))
        assert last["video"].shape[1] == 13 and last["actions"].shape == (12, 57)

    def test_any_error_while_reading_is_that_episodes_error(self, tmp_path, monkeypatch, caplog):
        """A failure the readers do not foresee (here an IndexError in decoding) skips the episode with its
        reason: one error type, never a dead loader worker."""
        for k in range(2):
            one_episode(tmp_path, frames=20, seed=k, name=f"part1/task{k}")
        episodes, _ = data.load_index(tmp_path)
        decode = data.decode_frames

        def fails_on_task0(path, *args, **kwargs):
            if "task0" in str(path):
                raise IndexError("index 0 is out of bounds for axis 0 with size 0")
            return decode(path, *args, **kwargs)

        monkeypatch.setattr(data, "decode_frames", fails_on_task0)
        with pytest.raises(data.EpisodeError, match="part1/task0/0: unexpected IndexError while reading it"):
            data.load_clip(episodes[0], 0, 13, (72, 128))
        with caplog.at_level(logging.WARNING, logger="dexac.data"):
            s = data.ClipDataset(episodes, 13, (72, 128))[(0, 3)]
        assert s["episode"] == "part1/task1/0" and s["skipped"] == 1 and "IndexError" in caplog.text

    def test_egodex_extra_is_left_out_of_training_unless_named(self, tmp_path):
        """`extra` was collected after EgoDex's splits were frozen: the training parts are part1-part5."""
        for name in ("part1/task_a", "extra/task_a"):
            one_episode(tmp_path, frames=20, name=name)
        _, sampler = data.make_loader(tmp_path, 1, clip_len=13, size=(72, 128), num_workers=0)
        assert len(sampler.frames) == 1 and "extra" not in data.TRAIN_SPLITS
        _, sampler = data.make_loader(tmp_path, 1, clip_len=13, size=(72, 128), num_workers=0,
                                      splits=(*data.TRAIN_SPLITS, "extra"))
        assert len(sampler.frames) == 2
        assert train.parse_args(["--splits", "part1,extra"])[0].splits == "part1,extra"

    def test_missing_root_is_one_clear_error(self, tmp_path):
        with pytest.raises(data.DataError, match="does not exist.*expected an EgoDex root"):
            data.load_index(tmp_path / "nope")

    def test_empty_root_is_one_clear_error(self, tmp_path):
        with pytest.raises(data.DataError, match="no usable episodes.*python synthetic.py --out"):
            data.load_index(tmp_path)

    def test_missing_stats_file_is_one_clear_error(self, tmp_path):
        with pytest.raises(data.DataError, match="data.py stats"):
            data.load_stats(tmp_path / "stats.json")

    def test_index_cache_skips_probing_an_unchanged_root(self, synth_root, monkeypatch):
        first = data.load_index(synth_root)
        monkeypatch.setattr(data, "_probe", lambda args: pytest.fail("re-probed an unchanged episode"))
        assert data.load_index(synth_root) == first

    def test_index_cache_probes_only_a_changed_folder(self, synth_root, monkeypatch):
        first = data.load_index(synth_root)
        d = synth_root / "part1" / "open_jar"
        shutil.copy(d / "0.hdf5", d / "9.hdf5")
        shutil.copy(d / "0.mp4", d / "9.mp4")
        probed = []
        real = data._probe
        monkeypatch.setattr(data, "_probe", lambda args: probed.append(args[2]) or real(args))
        try:
            episodes, _ = data.load_index(synth_root)
        finally:
            for suffix in ("hdf5", "mp4"):
                (d / f"9.{suffix}").unlink()
            monkeypatch.undo()
            data.load_index(synth_root)
        assert sorted(probed) == ["part1/open_jar/0", "part1/open_jar/1", "part1/open_jar/9"]  # only that dir
        assert len(episodes) == len(first[0]) + 1

    def test_train_clips_follow_the_window_protocol(self):
        frames = [90, 45, 12, 30, 29]
        plan = data.ClipSampler(frames, clip_len=13, train=True, seed=3).plan()
        # windows: 90 -> 3, 45 -> [0,30) and a 15-frame tail, 12 -> none, 30 -> 1, 29 -> 1 (tail only)
        assert len(plan) == 2 * (3 + 2 + 0 + 1 + 1)
        for ep, start in plan:
            w = start // 30
            assert start + 13 <= min(30 * (w + 1), frames[ep])  # inside one window and the episode
        keys = {(ep, start // 30) for ep, start in plan}
        assert len(keys) == 7 and len({tuple(c) for c in plan}) == len(plan)  # 2 distinct starts each

    def test_train_clips_change_with_the_epoch_and_repeat_with_it(self):
        s = data.ClipSampler([90, 45, 12, 30, 29], clip_len=13, train=True, seed=3)
        plan = s.plan()
        assert not np.array_equal(plan, (s.set_epoch(1), s.plan())[1])  # new random starts per epoch
        s.set_epoch(0)
        np.testing.assert_array_equal(plan, s.plan())  # deterministic

    @pytest.mark.parametrize("clip_len", [25, 65])
    def test_eval_clips_are_deterministic(self, clip_len):
        frames = [200, 64, 65, 130]
        plan = data.ClipSampler(frames, clip_len, train=False).plan()
        expect = [(e, k * clip_len) for e, n in enumerate(frames) for k in range(n // clip_len)]
        assert [tuple(p) for p in plan] == expect

    @pytest.mark.parametrize("clip_len", [25, 65])
    def test_eval_clip_shards_cover_the_plan(self, clip_len):
        frames = [200, 64, 65, 130]
        expect = [(e, k * clip_len) for e, n in enumerate(frames) for k in range(n // clip_len)]
        shards = [list(data.ClipSampler(frames, clip_len, train=False, rank=r, world_size=3)) for r in range(3)]
        assert sorted(sum(shards, [])) == sorted(expect)

    def test_shards_are_deterministic(self):
        frames = np.random.default_rng(0).integers(10, 400, 50)
        shards = [list(data.ClipSampler(frames, seed=7, rank=r, world_size=3)) for r in range(3)]
        again = [list(data.ClipSampler(frames, seed=7, rank=r, world_size=3)) for r in range(3)]
        assert shards == again

    def test_shards_are_equal_disjoint_and_drop_less_than_one_per_rank(self):
        frames = np.random.default_rng(0).integers(10, 400, 50)
        shards = [list(data.ClipSampler(frames, seed=7, rank=r, world_size=3)) for r in range(3)]
        assert len({len(s) for s in shards}) == 1
        flat = sum(shards, [])
        assert len(set(flat)) == len(flat)  # disjoint
        plan = [tuple(p) for p in data.ClipSampler(frames, seed=7).plan()]
        assert set(flat) <= set(plan) and len(plan) - len(flat) < 3

    def test_shards_change_with_the_epoch(self):
        frames = np.random.default_rng(0).integers(10, 400, 50)
        other = data.ClipSampler(frames, seed=7, rank=0, world_size=3)
        other.set_epoch(1)
        assert list(other) != list(data.ClipSampler(frames, seed=7, rank=0, world_size=3))

    def test_resume_continues_with_the_same_samples(self):
        frames, full, seen, state = sampler_state()
        resumed = data.ClipSampler(frames, seed=5, rank=1, world_size=2)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        resumed.set_epoch(state["epoch"])  # a training loop calls this; it must not reset the position
        assert seen + list(resumed) == full

    def test_elastic_resume_continues_the_global_plan(self):
        """2 ranks consumed 11 each; 4 ranks continue exactly with the rest of the global plan."""
        frames, _, _, state = sampler_state()
        plan = [tuple(map(int, p)) for p in data.ClipSampler(frames, seed=5).plan()]
        rest = []
        for r in range(4):
            x = data.ClipSampler(frames, seed=5, rank=r, world_size=4)
            x.load_state_dict(state)
            rest += list(x)
        assert sorted(rest) == sorted(plan[22:len(plan) - len(plan) % 4])

    def test_resume_with_another_seed_is_refused(self):
        frames, _, _, state = sampler_state()
        with pytest.raises(data.DataError, match="seed"):
            data.ClipSampler(frames, seed=6).load_state_dict(state)

    def test_dataloader_with_workers_resumes_to_identical_batches(self, synth_root):
        """Two workers: the batches hold what they should, and a loader resumed after two steps gives the same
        batches as the uninterrupted one (one loader run, checked both ways)."""
        def loader():
            ld, sp = data.make_loader(synth_root, batch_size=2, size=(72, 128), num_workers=2, seed=1)
            return ld, sp

        ld, sp = loader()
        sp.set_epoch(1)
        batches = list(ld)
        assert len(batches) == len(sp) // 2 >= 3
        b = batches[0]
        assert b["video"].shape == (2, 3, 13, 72, 128) and b["actions"].shape == (2, 12, 57)
        assert len(b["prompt"]) == 2 and isinstance(b["prompt"][0], str) and b["skipped"].sum() == 0
        state = sp.state_dict(consumed=2 * 2)  # two steps of batch 2 were trained on
        ld2, sp2 = loader()
        sp2.load_state_dict(state)
        sp2.set_epoch(1)
        for x, y in zip(batches[2:], ld2):
            assert x["episode"] == y["episode"] and torch.equal(x["start"], y["start"])
            assert torch.equal(x["video"], y["video"]) and torch.equal(x["actions"], y["actions"])

    def test_stats_match_a_direct_computation(self, synth_root, synth_stats):
        stats = json.loads(synth_stats.read_text())
        assert stats["layout"] == conditioning.action_layout()
        episodes, _ = data.load_index(synth_root, ("part1",))
        a = np.concatenate([conditioning.compute_actions(data.read_track(e).track).astype(np.float64) for e in episodes])
        assert stats["count"] == len(a) == sum(e.frames - 1 for e in episodes)
        np.testing.assert_allclose(stats["mean"], a.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats["std"], a.std(0), rtol=1e-7, atol=1e-12)
        mean, std = data.load_stats(synth_stats)
        assert mean.shape == std.shape == (57,) and mean.dtype == np.float32

    def test_stats_of_another_layout_are_refused(self, synth_stats, tmp_path):
        stats = json.loads(synth_stats.read_text())
        stats["layout"]["blocks"][0][0] = "something_else"
        (tmp_path / "bad.json").write_text(json.dumps(stats))
        with pytest.raises(data.DataError, match="another action layout"):
            data.load_stats(tmp_path / "bad.json")

    def test_streaming_merge_is_numerically_stable(self):
        rng = np.random.default_rng(0)
        x = 1e6 + 1e-3 * rng.normal(size=(5000, 57))  # huge mean, tiny spread: sum-of-squares fails here
        total = None
        for chunk in np.array_split(x, 37):
            total = data.merge_moments(total, data.action_moments(chunk))
        n, mean, m2, mn, mx = total
        np.testing.assert_allclose(np.sqrt(m2 / n), x.std(0), rtol=1e-6)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
        assert n == 5000 and (mn == x.min(0)).all() and (mx == x.max(0)).all()

    @pytest.mark.filterwarnings("ignore::FutureWarning")  # zarr: variable-length bytes have no v3 spec yet
    def test_egoverse_episode_is_indexed(self, egoverse_root):
        root, n, _ = egoverse_root
        episodes, _ = data.load_index(root)
        assert [(e.id, e.frames, e.kind) for e in episodes] == [(f"{data.egoverse_split('abc123')}/abc123", n, "egoverse")]

    @pytest.mark.filterwarnings("ignore::FutureWarning")
    def test_egoverse_reader_gives_the_same_actions(self, egoverse_root):
        s = egoverse_clip(egoverse_root)
        want = conditioning.compute_actions(egoverse_root[2])[2:14]
        np.testing.assert_allclose(s["actions"].numpy(), want, atol=1e-5)
        assert s["prompt"] == "Open the jar." and s["video"].shape == (3, 13, 144, 256)

    @pytest.mark.filterwarnings("ignore::FutureWarning")
    def test_egoverse_clip_has_the_keys_of_an_egodex_clip(self, egoverse_root, tmp_path):
        h5, _, _ = one_episode(tmp_path / "x", frames=13)
        egodex = data.load_clip(data.Episode("part1/task_a/0", str(h5), 13, "egodex"), 0, 13)
        assert set(egoverse_clip(egoverse_root)) == set(egodex)

    @pytest.mark.filterwarnings("ignore::FutureWarning")
    def test_egoverse_markers_are_detected_at_the_keypoints(self, egoverse_root):
        s = egoverse_clip(egoverse_root)
        found = synthetic.detect_keypoints(s["video"][:, 0].permute(1, 2, 0).numpy())
        err = np.linalg.norm(found - s["keypoints"][0].numpy(), axis=-1)
        assert err.max() < 2.5

    @pytest.mark.filterwarnings("ignore::FutureWarning")
    def test_egoverse_missing_value_is_one_clear_error(self, egoverse_root, tmp_path):
        zarr = importlib.import_module("zarr")
        root = tmp_path / "eps"
        shutil.copytree(egoverse_root[0], root)
        episodes, _ = data.load_index(root)
        zarr.open_group(str(root / "abc123.zarr"), mode="r+")["left.obs_keypoints"][5, 0] = 1e9  # a missing value
        with pytest.raises(data.EpisodeError, match=r"frames \[0, 13\) are not all usable: the file changed"):
            data.load_clip(episodes[0], 0, 13)  # the index said usable: refused, never read as data

    @pytest.mark.parametrize("key", ["left.obs_wrist_pose", "right.obs_keypoints"])
    def test_egoverse_all_zero_rows_are_missing_and_the_statistics_stay_finite(self, egoverse_root, tmp_path, key):
        """Mecka writes a missing hand as an all-zero row: that frame is invalid (a zero quaternion would
        normalize to NaN), the episode splits around it, and the statistics are finite and equal those of the
        valid transitions alone."""
        zarr = importlib.import_module("zarr")
        root, n, track = tmp_path / "eps", egoverse_root[1], egoverse_root[2]
        shutil.copytree(egoverse_root[0] / "abc123.zarr", root / "mecka0.zarr")
        zarr.open_group(str(root / "mecka0.zarr"), mode="r+")[key][6] = 0.0
        episodes, skipped = data.load_index(root)
        assert [(e.start, e.frames) for e in episodes] == [(0, 6), (7, n - 7)] and not skipped
        stats = data.compute_stats(root, (data.egoverse_split("mecka0"),))
        want = np.concatenate([conditioning.compute_actions({k: v[a:b] for k, v in track.items()})
                               for a, b in ((0, 6), (7, n))]).astype(np.float64)
        assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all() and stats["count"] == n - 3
        np.testing.assert_allclose(stats["mean"], want.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats["std"], want.std(0), rtol=1e-4, atol=1e-7)

    def test_latent_cache_shards_across_ranks_and_equals_raw_clips(self, cache_source, tmp_path):
        mine = cache_on_two_ranks(cache_source, tmp_path / "cache")
        shards = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
        assert sorted(mine[0] + mine[1]) == shards and not set(mine[0]) & set(mine[1]) and len(shards) == 3
        cached = data.CachedClipDataset(tmp_path / "cache")
        episodes = {e.id: e for e in data.load_index(cache_source)[0]}
        assert len(cached) == 8  # 2 episodes x (a 30-frame window + a 10-frame tail window) x 2 starts
        pix = tk.build_tokenizer("pixel")
        for i in range(len(cached)):
            s = cached[i]
            raw = data.load_clip(episodes[s["episode"]], s["start"], 5, (32, 64))
            assert torch.equal(s["latents"], pix.encode(raw["video"][None].float() / 127.5 - 1)[0])
            assert torch.equal(s["actions"], raw["actions"]) and s["prompt"] == raw["prompt"]

    def test_latent_cache_rewrites_only_a_lost_shard(self, cache_source, tmp_path):
        """A lost shard makes the cache incomplete (refused), and caching again rewrites that shard alone."""
        out = tmp_path / "cache"
        cache_on_two_ranks(cache_source, out)
        shards = sorted(out.glob("shard-*.safetensors"))
        stamps = {p: p.stat().st_mtime_ns for p in shards}
        shards[1].unlink()
        with pytest.raises(data.DataError, match="incomplete"):
            data.CachedClipDataset(out)
        assert cache_on_two_ranks(cache_source, out) == [[], [shards[1]]]
        assert all(p.stat().st_mtime_ns == stamps[p] for p in (shards[0], shards[2]))

    def test_latent_cache_of_other_settings_is_refused(self, cache_source, tmp_path):
        cache_on_two_ranks(cache_source, tmp_path / "cache")
        with pytest.raises(data.DataError, match="other settings"):
            data.cache_clips(cache_source, tmp_path / "cache", tk.build_tokenizer("pixel"), tokenizer_name="pixel",
                             **dict(CACHE_SETTINGS, clip_len=9))

    def test_an_epoch_over_a_cache_is_one_clip_plan(self, cache_source, tmp_path, capsys):
        """`data.py cache --epochs k` holds k epochs' clip plans, new starts each; train.py's --epochs counts
        clip plans, so one epoch is as many steps over a cache of 1 or 2 epochs, and asking for more epochs
        than a cache holds says its clips come back."""
        counts = {}
        for k in (1, 2):
            out = tmp_path / f"epochs{k}"
            data.cache_clips(cache_source, out, tk.build_tokenizer("pixel"), tokenizer_name="pixel", epochs=k,
                             **CACHE_SETTINGS)
            _, sampler = data.make_loader(out, batch_size=1, num_workers=0)
            cfg = train.TrainConfig(data=str(out), micro_batch=1, batch_size=1, frames=5, height=32, width=64)
            counts[k] = (len(sampler), train.epoch_steps(replace(cfg, epochs=1)))
        assert counts[2][0] == 2 * counts[1][0] and counts[2][1] == counts[1][1] == counts[1][0] > 0
        capsys.readouterr()
        assert train.epoch_steps(replace(cfg, epochs=3)) == 3 * counts[1][0]
        assert "its clips come back 1.5 times" in capsys.readouterr().out

    def test_latent_cache_feeds_the_loader(self, cache_source, tmp_path):
        cache_on_two_ranks(cache_source, tmp_path / "cache")
        loader, sampler = data.make_loader(tmp_path / "cache", batch_size=4, num_workers=0)
        b = next(iter(loader))
        assert b["latents"].shape == (4, tk.build_tokenizer("pixel").latent_channels, 2, 4, 8)
        assert b["actions"].shape == (4, 4, 57) and len(sampler) == 8

    @pytest.mark.parametrize("name,argv,code", DATA_BAD_INPUTS, ids=[c[0] for c in DATA_BAD_INPUTS])
    def test_bad_input_is_one_error_line(self, d24_results, name, argv, code):
        rc, err = d24_results[name]
        lines = [x for x in err.splitlines() if x.startswith("error:") or ": error: " in x]
        assert rc == code, err
        assert len(lines) == 1 and "Traceback" not in err, err

    def test_stats_out_is_checked_before_the_work(self, d24_root, monkeypatch):
        called = []
        monkeypatch.setattr(data, "compute_stats", lambda *a, **k: called.append(1))
        for out in (d24_root, d24_root / "no" / "s.json", d24_root / "afile" / "s.json"):
            with pytest.raises(data.DataError, match="--out"):
                data.main(["stats", "--data", str(d24_root / "syn"), "--out", str(out), "--workers", "0"])
        assert not called

    def test_cache_out_is_checked_before_the_tokenizer_loads(self, d24_root, monkeypatch):
        monkeypatch.setattr(data.tok, "build_tokenizer", lambda *a, **k: pytest.fail("built the tokenizer"))
        with pytest.raises(data.DataError, match="is a file"):
            data.main(["cache", "--data", str(d24_root / "syn"), "--out", str(d24_root / "afile"), "--device", "cpu"])

    def test_stats_out_replaces_the_old_file(self, d24_root, tmp_path):
        out = tmp_path / "s.json"
        out.write_text("old")
        data.main(["stats", "--data", str(d24_root / "syn"), "--out", str(out), "--splits", "part1", "--workers", "0"])
        assert json.loads(out.read_text())["count"] == 7 and not list(tmp_path.glob("*.tmp*"))

    def test_synth_refuses_a_non_empty_folder(self, tmp_path):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "part1").mkdir()
        with pytest.raises(ValueError, match="not empty.*--overwrite"):
            synthetic.write_synthetic(tmp_path / "d", tasks=1, episodes=1, test_episodes=0, frames=8, workers=0)
        synthetic.write_synthetic(tmp_path / "e", tasks=1, episodes=1, test_episodes=0, frames=8, workers=0)
        (tmp_path / "f").mkdir()  # an empty folder is fine
        synthetic.write_synthetic(tmp_path / "f", tasks=1, episodes=1, test_episodes=0, frames=8, workers=0)

    def test_synth_overwrite_leaves_nothing_stale(self, tmp_path):
        d = tmp_path / "d"
        synthetic.main(["--out", str(d), "--tasks", "2", "--episodes", "2", "--test-episodes", "1", "--frames", "8",
                        "--workers", "0"])
        data.main(["stats", "--data", str(d), "--out", str(d / "stats.json"), "--workers", "0"])
        data.load_index(d)
        assert (d / ".dexac_index.json").is_file()
        synthetic.main(["--out", str(d), "--overwrite", "--tasks", "1", "--episodes", "1", "--test-episodes", "0",
                        "--frames", "8", "--workers", "0"])
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        assert files == ["part1/pick_place_cube/0.hdf5", "part1/pick_place_cube/0.mp4"]

    def test_synth_overwrite_refuses_a_folder_holding_other_things(self, tmp_path):
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="notes.txt"):
            synthetic.write_synthetic(tmp_path, tasks=1, episodes=1, frames=8, workers=0, overwrite=True)
        assert (tmp_path / "notes.txt").read_text() == "mine"

    def test_synth_library_checks(self, tmp_path):
        for kw in ({"tasks": 0}, {"tasks": 99}, {"episodes": -1}, {"episodes": 0, "test_episodes": 0},
                   {"frames": 1}, {"size": (0, 32)}, {"size": (31, 32)}):
            with pytest.raises(ValueError):
                synthetic.write_synthetic(tmp_path / "x", **{"workers": 0, "frames": 8, **kw})
        assert not (tmp_path / "x").exists()

    def test_synthetic_statistics_have_no_zero_std(self, d24_root):
        stats = json.loads((d24_root / "syn" / "stats.json").read_text())
        assert min(stats["std"]) > 0
        mean, std = data.load_stats(d24_root / "syn" / "stats.json")
        np.testing.assert_allclose(std, stats["std"], rtol=1e-6)

    def test_zero_std_on_a_varying_dimension_is_refused(self, tmp_path, d24_root):
        stats = json.loads((d24_root / "syn" / "stats.json").read_text())
        path, _ = stats_variant(tmp_path, d24_root, std=[0.0] + stats["std"][1:])
        with pytest.raises(data.DataError, match="std 0 on 1 dimension.*first: 0.*data.py stats"):
            data.load_stats(path)
        with pytest.raises(ValueError, match="std 0 on 1 dimension"):
            conditioning.load_stats_file(str(path))
        norm = conditioning.ActionNorm(57)
        with pytest.raises(ValueError, match="std > 0"):
            norm.set_stats(torch.zeros(57), torch.tensor([0.0] + [1.0] * 56))

    def test_zero_std_on_a_constant_dimension_becomes_1(self, tmp_path, d24_root):
        stats = json.loads((d24_root / "syn" / "stats.json").read_text())
        mn, mx = list(stats["min"]), list(stats["max"])
        mn[5] = mx[5] = stats["mean"][5]
        path, _ = stats_variant(tmp_path, d24_root, std=stats["std"][:5] + [0.0] + stats["std"][6:], min=mn, max=mx)
        mean, std = data.load_stats(path)
        assert std[5] == 1 and np.isfinite(std).all()
        m, s, layout = conditioning.load_stats_file(str(path))
        assert s[5] == 1
        norm = conditioning.ActionNorm(57)
        norm.set_stats(m, s, layout)
        a = m.expand(1, 12, 57).clone()
        a[..., 5] += 0.1  # off the constant: moved by 0.1, not blown up by 1 / eps
        assert torch.allclose(norm(a)[..., 5], torch.full((1, 12), 0.1), atol=1e-5)

    @pytest.mark.parametrize("change,message", [
        ({"std": [-1.0] * 57}, "negative std"),
        ({"std": [float("nan")] * 57}, "non-finite"),
        ({"mean": [1e400] * 57}, "non-finite"),
        ({"std": [1.0] * 56}, "57 means and 56 stds"),
        ({"mean": "zero"}, "not an action statistics file"),
        ({"std": None}, "57 means and 1 stds"),
        ({"mean": [[1.0, 2.0], [3.0]]}, "not an action statistics file"),
    ], ids=["negative", "nan", "inf", "short", "string", "null", "ragged"])
    def test_malformed_statistics_are_one_clear_error(self, tmp_path, d24_root, change, message):
        path, _ = stats_variant(tmp_path, d24_root, **change)
        with pytest.raises(data.DataError, match=message):
            data.load_stats(path)
        with pytest.raises(ValueError, match=message):
            conditioning.load_stats_file(str(path))

    @pytest.mark.parametrize("text", ["not json", "[1, 2]", "{}", "\xff\xfe"], ids=["text", "list", "empty", "bytes"])
    def test_not_a_statistics_file(self, tmp_path, text):
        path = tmp_path / "s.json"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match="not an action statistics file"):
            conditioning.load_stats_file(str(path))
        with pytest.raises(data.DataError, match="not an action statistics file"):
            data.load_stats(path)

    def test_missing_min_max_with_zero_std_is_refused(self, tmp_path, d24_root):
        stats = json.loads((d24_root / "syn" / "stats.json").read_text())
        del stats["min"], stats["max"]
        stats["std"][3] = 0.0
        path = tmp_path / "s.json"
        path.write_text(json.dumps(stats))
        with pytest.raises(ValueError, match="whose min and max it does not record"):
            conditioning.load_stats_file(str(path))


# =====================================================================================================================
# real datasets as they are: a root where each episode carries one quirk of DESIGN.md section 11

@pytest.fixture(scope="module")
def quirks(tmp_path_factory):
    """synthetic.write_quirks's root (48-frame episodes, holes at frames [16, 22)), indexed once
    -> (root, manifest, {episode name: its usable runs}, skipped {name: reason})."""
    root = tmp_path_factory.mktemp("quirks") / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: variable-length bytes have no stable v3 spec yet
        manifest = synthetic.write_quirks(root, frames=48, size=(72, 128))
    episodes, skipped = data.load_index(root)
    runs = {}
    for e in episodes:
        runs.setdefault(e.id, []).append(e)
    return root, manifest, runs, skipped


def quirk_id(quirks, name):
    """The episode id of one episode of the quirks root, by its manifest name."""
    root, manifest = quirks[:2]
    path = Path(manifest[name]["path"])
    if manifest[name]["kind"] == "egodex":
        return str(path.relative_to(root).with_suffix(""))
    return f"{data.egoverse_split(path.stem)}/{path.stem}"


def quirk_runs(quirks, name):
    """The usable runs (Episodes) of one episode of the quirks root, by its manifest name."""
    return quirks[2].get(quirk_id(quirks, name), [])


def valid_actions(track, spans):
    """The 57-D actions of the transitions inside the frame spans [(a, b)], float64, concatenated."""
    return np.concatenate([conditioning.compute_actions({k: v[a:b] for k, v in track.items()})
                           for a, b in spans]).astype(np.float64)


class TestRealData:
    """Every quirk the real EgoDex and EgoVerse files carry (DESIGN.md section 11), each on a file that has exactly
    that quirk: read correctly (the specific right behaviour), never a crash, never NaN, never a silent change
    of meaning; the EgoVerse split; the index's quirk table; a short training run on the mixed quirky root."""

    def test_empty_intrinsic_uses_the_egodex_constant(self, quirks):
        ep = quirk_runs(quirks, "empty_k")[0]
        r = data.read_track(ep)
        np.testing.assert_array_equal(r.K, data.EGODEX_K)
        assert r.quirks["empty K"] == 1 and r.valid.all()

    def test_tracking_loss_frames_are_invalid_and_the_statistics_ignore_them(self, quirks, tmp_path):
        """Low confidence over frozen hand poses: those frames split the episode, and the statistics equal
        those of the valid transitions alone (the frozen stretch and the jump back would inflate the std)."""
        root, manifest, _, _ = quirks
        a, b = manifest["low_confidence"]["rows"]
        runs = quirk_runs(quirks, "low_confidence")
        assert [(e.start, e.start + e.frames) for e in runs] == [(0, a), (b, 48)]
        one = tmp_path / "one"
        shutil.copytree(Path(manifest["low_confidence"]["path"]).parent, one / "part1" / "quirky_task",
                        ignore=lambda d, names: [n for n in names if not n.startswith("3.")])
        stats = data.compute_stats(one, ("part1",))
        with h5py.File(manifest["low_confidence"]["path"]) as f:
            track = data._track_from_joints({k: f[f"transforms/{k}"][:].astype(np.float64) for k in data.POSE_JOINTS})
        want = valid_actions(track, [(0, a), (b, 48)])
        assert stats["count"] == len(want) == (a - 1) + (48 - b - 1)
        np.testing.assert_allclose(stats["mean"], want.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["std"], want.std(0), rtol=1e-5, atol=1e-9)
        everything = valid_actions(track, [(0, 48)])
        fingers = list(conditioning.FINGER_IDX)
        assert everything[:, fingers].std(0).mean() > 1.2 * want[:, fingers].std(0).mean()  # what it would be

    def test_no_confidences_group_trusts_every_frame(self, quirks):
        runs = quirk_runs(quirks, "no_confidences")
        assert [(e.start, e.frames) for e in runs] == [(0, 48)]
        assert data.read_track(runs[0]).quirks["no confidences"] == 1

    def test_video_one_frame_short_keeps_the_frames_both_have(self, quirks):
        (ep,) = quirk_runs(quirks, "video_one_short")
        assert (ep.start, ep.frames) == (0, 47)
        clip = data.load_clip(ep, 47 - 13, 13, (72, 128))
        assert clip["video"].shape[1] == 13 and clip["actions"].shape == (12, 57) and clip["start"] == 34

    @pytest.mark.parametrize("name,reason", [("video_three_short", "video has 45 frames but poses have 48"),
                                             ("variable_rate", "variable frame rate video"),
                                             ("ev_no_head_pose", "no obs_head_pose")])
    def test_unusable_episodes_are_skipped_with_their_reason(self, quirks, name, reason):
        assert not quirk_runs(quirks, name) and reason in quirks[3][quirk_id(quirks, name)]

    def test_variable_rate_video_would_shift_every_later_frame(self, quirks):
        """Why that video is refused: decoding by pts * fps finds its frame 11 missing."""
        mp4 = quirks[1]["variable_rate"]["video"]
        with pytest.raises(data.EpisodeError, match="frame 11 missing"):
            data.decode_frames(mp4, 5, 13)

    @pytest.mark.parametrize("name,hand", [("ev_mecka_zero", "left"), ("ev_missing_1e9", "right")])
    def test_missing_hand_rows_are_invalid_frames_and_statistics_stay_finite(self, quirks, name, hand, tmp_path):
        """Mecka's all-zero rows (a zero quaternion) and Aria's 1e9: those frames are invalid, the rest is kept,
        and the statistics are finite and equal those of the valid transitions alone."""
        root, manifest, _, _ = quirks
        a, b = manifest[name]["rows"]
        runs = quirk_runs(quirks, name)
        assert [(e.start, e.start + e.frames) for e in runs] == [(0, a), (b, 48)]
        one = tmp_path / "one"
        shutil.copytree(manifest[name]["path"], one / f"{name}.zarr")
        stats = data.compute_stats(one, ("train", "test"))
        _, track = synthetic.synth_track(np.random.default_rng(manifest[name]["seed"]), 48)
        want = valid_actions(track, [(0, a), (b, 48)])
        assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()
        assert stats["count"] == len(want)
        np.testing.assert_allclose(stats["mean"], want.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats["std"], want.std(0), rtol=1e-4, atol=1e-7)
        key = "zero-row frames" if name == "ev_mecka_zero" else "missing (1e9) frames"
        assert data.read_egoverse(manifest[name]["path"]).quirks[key] == b - a

    def test_legacy_aria_layout_gives_the_fingertips_of_the_mano_layout(self, quirks):
        _, manifest, _, _ = quirks
        legacy = data.read_egoverse(manifest["ev_legacy_aria"]["path"])
        twin = data.read_egoverse(manifest["ev_legacy_aria_mano_twin"]["path"])
        assert legacy.quirks["legacy Aria layout"] == 1 and twin.quirks["legacy Aria layout"] == 0
        for s in conditioning.HANDS:
            np.testing.assert_allclose(legacy.track[f"{s}_tips"], twin.track[f"{s}_tips"], atol=1e-12)
            _, track = synthetic.synth_track(np.random.default_rng(manifest["ev_legacy_aria"]["seed"]), 48)
            np.testing.assert_allclose(legacy.track[f"{s}_tips"], track[f"{s}_tips"], atol=1e-9)
        raw = np.asarray(data._zarr_array(data._zarr_group(manifest["ev_legacy_aria"]["path"], "x"),
                                          "left.obs_keypoints", "x")[:48]).reshape(48, 21, 3)
        assert np.abs(raw[:, list(data.MANO_TIPS)] - legacy.track["left_tips"]).max() > 0.01  # unmapped: wrong

    def test_time_gap_splits_the_episode(self, quirks):
        _, manifest, _, _ = quirks
        gap = manifest["ev_gap"]["gap_at"]
        runs = quirk_runs(quirks, "ev_gap")
        stored = manifest["ev_gap"]["stored_frames"]
        assert [(e.start, e.start + e.frames) for e in runs] == [(0, gap), (gap, stored)]
        r = data.read_egoverse(manifest["ev_gap"]["path"])
        assert r.quirks["time gaps"] == 1 and r.cut.nonzero()[0].tolist() == [gap]
        with pytest.raises(data.EpisodeError, match="not all usable"):  # a clip across the gap is refused
            data.load_clip(runs[0]._replace(frames=stored), gap - 5, 13)

    def test_placeholder_prompt_falls_back_to_the_task_name(self, quirks):
        (ep, *_) = quirk_runs(quirks, "ev_placeholder_prompt")
        r = data.read_track(ep)
        assert r.prompt == "fold clothes" and r.quirks["placeholder prompt"] == 1
        assert data.read_track(quirk_runs(quirks, "ev_clean")[0]).prompt == "Open the jar."

    @pytest.mark.parametrize("name,source,tol", [("ev_calibration", "calibration K", 1e-4),
                                                 ("ev_no_intrinsics_aria", "vendor K", 0.5), ("ev_clean", None, 1e-4)])
    def test_egoverse_intrinsics_project_where_the_frames_were_drawn(self, quirks, name, source, tol):
        """The calibration block, `intrinsics`, or Aria's 640x480 constant scaled to the 72x96 frames: the
        keypoints project where the writer drew them (its own K; the vendor constant's principal point differs
        by under half a pixel, pixel centres at integers vs W / 2). Letterboxed, they move with the frame."""
        _, manifest, _, _ = quirks
        (ep, *_) = quirk_runs(quirks, name)
        r = data.read_track(ep)
        assert (r.quirks[source] == 1) if source else not {"calibration K", "vendor K"} & set(r.quirks)
        native = data.load_clip(ep, 0, 13, size=None)
        want, _ = data.project_keypoints(r.track, manifest[name]["K"])
        np.testing.assert_allclose(native["keypoints"].numpy(), want[:13], atol=tol)
        assert native["keypoint_valid"].float().mean() > 0.8
        H, W = manifest[name]["size"]
        boxed = data.load_clip(ep, 0, 13, (144, 256))
        s = min(144 / H, 256 / W)
        pad = (np.array([256, 144]) - np.array([W, H]) * s) / 2
        np.testing.assert_allclose(boxed["keypoints"].numpy(), (native["keypoints"].numpy() + 0.5) * s - 0.5 + pad,
                                   atol=1e-3)

    def test_four_by_three_frames_are_letterboxed_not_cropped(self, quirks):
        (ep, *_) = quirk_runs(quirks, "ev_calibration")
        s = data.load_clip(ep, 0, 13, (144, 256))
        v = s["video"].numpy()  # (3, T, 144, 256): a 72x96 source fits as 144x192, 32 black columns each side
        assert v[..., :32].max() == 0 and v[..., -32:].max() == 0 and v[..., 32:224].min(-1).max() > 0
        assert data.content_box((72, 96), (144, 256)) == (32, 0, 224, 144)
        assert data.content_box((180, 320), (144, 256)) == (0, 0, 256, 144)  # 16:9: cropped (nothing lost)
        uv = s["keypoints"].numpy()
        outside = (uv[..., 0] < 31.5) | (uv[..., 0] >= 223.5)
        assert not (s["keypoint_valid"].numpy() & outside).any()  # a point in the bars is not counted

    def test_extra_is_left_out_of_training_unless_named(self, quirks):
        root = quirks[0]
        train_ids = {e.id for e in data.load_index(root, data.TRAIN_SPLITS)[0]}
        assert not any(i.startswith("extra/") for i in train_ids) and any(i.startswith("part1/") for i in train_ids)
        assert any(e.id.startswith("extra/") for e in data.load_index(root, data.TRAIN_SPLITS + ("extra",))[0])

    def test_egoverse_split_is_deterministic_disjoint_and_stable(self, quirks, tmp_path):
        names = [f"2025-{i:06d}" for i in range(4000)]
        split = [data.egoverse_split(n, 0.1) for n in names]
        assert split == [data.egoverse_split(n, 0.1) for n in names]
        assert 0.08 < split.count("test") / len(names) < 0.12
        assert all(s == "test" for n, s in zip(names, split) if data.egoverse_split(n, 0.05) == "test")  # nested
        src = Path(quirks[1]["ev_clean"]["path"])
        root = tmp_path / "flat"
        for n in names[:12]:
            shutil.copytree(src, root / f"{n}.zarr")
        before = {e.id for e in data.load_index(root, test_fraction=0.3)[0]}
        for n in names[12:20]:  # new episodes arrive
            shutil.copytree(src, root / f"{n}.zarr")
        after = {e.id for e in data.load_index(root, test_fraction=0.3)[0]}
        assert before <= after and len(after) == 20
        train, test = ({i.split("/")[1] for i in after if i.startswith(s)} for s in ("train/", "test/"))
        assert train and test and not train & test and train | test == set(names[:20])
        assert {e.split for e in data.load_index(root, ("test",), test_fraction=0.3)[0]} == {"test"}

    def test_camera_convention_guard_warns_when_wrists_are_behind_the_camera(self, tmp_path, caplog):
        h5, joints, K = one_episode(tmp_path / "ok", frames=16)
        with caplog.at_level(logging.WARNING, logger="dexac.data"):
            data.load_index(tmp_path / "ok")
        assert "in front of the camera" not in caplog.text
        h5, joints, K = one_episode(tmp_path / "flipped", frames=16)
        with h5py.File(h5, "a") as f:  # an OpenGL camera (z backward): rotate the camera frame about x
            f["transforms/camera"][...] = f["transforms/camera"][:] @ np.diag([1, -1, -1, 1]).astype(np.float32)
        with caplog.at_level(logging.WARNING, logger="dexac.data"):
            data.load_index(tmp_path / "flipped")
        assert "0% of the wrist points" in caplog.text and "OpenCV axes" in caplog.text

    def test_index_command_prints_every_quirk(self, quirks, capsys):
        root, manifest, _, _ = quirks
        data.main(["index", "--data", str(root), "--workers", "0"])
        out = capsys.readouterr().out
        counts = {"empty K": 1, "no confidences": 1, "low-confidence frames": 6, "video one frame short": 1,
                  "missing (1e9) frames": 6, "zero-row frames": 6, "legacy Aria layout": 1, "time gaps": 1,
                  "placeholder prompt": 1, "calibration K": 1, "vendor K": 1, "4:3 frames": 7}
        for quirk, n in counts.items():
            assert re.search(rf"^ +{n}  {re.escape(quirk)}: ", out, re.M), (quirk, out)
        assert re.search(r"^skipped episodes: 3$", out, re.M)
        assert re.search(r"^egodex +part1 +5 +240 +233 ", out, re.M)  # 2 skipped; 6 + 1 frames not usable
        for reason in ("variable frame rate video", "video has 45 frames but poses have 48", "no obs_head_pose"):
            assert reason in out

    @pytest.mark.slow
    def test_training_on_the_mixed_quirky_root_has_finite_loss(self, quirks, tmp_path):
        root = tmp_path / "q"
        shutil.copytree(quirks[0], root)
        run_train(["--data", root, "--steps", "4", "--batch-size", "2", "--micro-batch", "2", "--ckpt-every", "100",
                   "--out", tmp_path / "runs", "--splits", "part1,train,test"])
        losses = run_losses(only_run(tmp_path / "runs"))
        assert len(losses) == 4 and np.isfinite(losses).all()
        stats = json.loads((root / "stats.json").read_text())
        assert np.isfinite(stats["std"]).all() and stats["count"] > 0


# the synthetic dataset: its EgoDex writer, its renderer and the colour-marker detector

class TestSynthetic:
    """The synthetic writer round-trips through the readers, draws markers where the keypoints project (also
    zoomed for small frames), moves at the scales of real data, and writes the same bytes every time."""

    def test_egodex_writer_round_trips_through_the_reader(self, tmp_path):
        h5, joints, K = one_episode(tmp_path, frames=16)
        r = data.read_egodex(h5)
        track, K_read = r.track, r.K
        assert r.frames == 16 and r.prompt == "Do the thing." and r.valid.all()
        assert r.quirks == {"no confidences": 1}  # one_episode writes none
        np.testing.assert_array_equal(K_read, K.astype(np.float32))
        with h5py.File(h5) as f:
            for name in data.POSE_JOINTS:
                np.testing.assert_array_equal(f[f"transforms/{name}"][:], joints[name].astype(np.float32))
        ref = data._track_from_joints({k: v.astype(np.float32).astype(np.float64) for k, v in joints.items()})
        np.testing.assert_array_equal(conditioning.compute_actions(track), conditioning.compute_actions(ref))

    @pytest.mark.parametrize("size,tol", [(None, 1.0), ((288, 512), 2.5)])
    def test_markers_sit_at_the_projected_keypoints(self, tmp_path, size, tol):
        """The colour marker sits at the projected keypoint, at the source size and resized."""
        h5, _, _ = one_episode(tmp_path, frames=16)
        ep = data.Episode("part1/task_a/0", str(h5), 16, "egodex")
        s = data.load_clip(ep, 2, 13, size)
        H, W = size or (180, 320)
        assert s["video"].shape == (3, 13, H, W) and s["video"].dtype == torch.uint8
        assert s["actions"].shape == (12, 57) and s["keypoints"].shape == (13, 12, 2)
        assert s["keypoint_valid"].all()
        video = s["video"].permute(1, 2, 3, 0).numpy()
        for t in (0, 6, 12):
            err = np.linalg.norm(synthetic.detect_keypoints(video[t]) - s["keypoints"][t].numpy(), axis=-1)
            assert err.max() < tol, err

    def test_zoomed_synthetic_keeps_markers_detectable_when_small(self, tmp_path):
        """miniature.py's dataset: at 48x80 EgoDex's view loses every marker; zoom 2 with markers twice as large
        keeps nearly all of them, at the projected keypoints of the (zoomed) intrinsics."""
        found = {}
        for zoom, scale in ((1.0, 1.0), (2.0, 2.0)):
            root = synthetic.write_synthetic(tmp_path / f"z{zoom}", tasks=1, episodes=0, test_episodes=1, frames=13,
                                        workers=0, zoom=zoom, marker_scale=scale)
            ep = data.load_index(root, ("test",))[0][0]
            s = data.load_clip(ep, 0, 13, (48, 80))
            video = s["video"].permute(1, 2, 3, 0).numpy()
            kp = np.stack([synthetic.detect_keypoints(f) for f in video])
            ok = np.isfinite(kp).all(-1)
            found[zoom] = ok.mean()
            if zoom == 2.0:
                in_view = ((s["keypoints"] >= 2) & (s["keypoints"] <= torch.tensor([78, 46]))).all(-1).numpy()
                assert ok[in_view].mean() > 0.9 and np.linalg.norm(kp - s["keypoints"].numpy(), axis=-1)[ok].max() < 1.5
        assert found[1.0] < 0.1 < 0.85 < found[2.0], found

    def test_synthetic_finger_actions_are_orders_of_magnitude_smaller(self, synth_root):
        """Large wrist/head motion, finger motion orders of magnitude smaller in the action."""
        stats = data.compute_stats(synth_root, ("part1",))
        mean, std = np.abs(np.array(stats["mean"])), np.array(stats["std"])
        wrist_t = [i for i in conditioning.WRIST_IDX if conditioning.ACTION_NAMES[i].endswith(("tx", "ty", "tz"))]
        assert std[wrist_t].mean() > 8 * std[list(conditioning.FINGER_IDX)].mean()
        assert mean[list(conditioning.WRIST_IDX)].max() > 1000 * std[list(conditioning.FINGER_IDX)].mean()

    def test_synthetic_fingertips_move_several_pixels(self, synth_root):
        """...yet many pixels in the image: fingertips move in the wrist frame by several pixels."""
        ep = data.load_index(synth_root, ("part1",))[0][0]
        r = data.read_track(ep)
        track, K = r.track, r.K
        local = conditioning.to_frame(track["right_wrist"], track["right_tips"])  # (T, 5, 3)
        depth = conditioning.to_frame(track["camera"], track["right_tips"])[..., 2].mean()
        excursion_px = (local.max(0) - local.min(0)).max(-1).mean() * K[0, 0] / depth * 512 / 320
        assert excursion_px > 4  # at 288x512

    @pytest.mark.parametrize("size", [(180, 320), (64, 112)])
    def test_synthetic_is_deterministic(self, tmp_path, size):
        """Four copies, the same bytes: at 64x112, x264's AVX-512 kernels wrote four different MP4s in twelve
        processes (data.X264_SETS_BELOW_AVX512); this failed two runs out of three on such a CPU before."""
        h, w = map(str, size)
        for d in "abcd":
            synthetic.main(["--out", str(tmp_path / d), "--tasks", "1", "--episodes", "1", "--height", h,
                            "--width", w, "--test-episodes", "0", "--frames", "8", "--workers", "0"])
        for name in ("0.hdf5", "0.mp4"):
            first, *rest = ((tmp_path / d / "part1" / "pick_place_cube" / name).read_bytes() for d in "abcd")
            assert all(r == first for r in rest), name

    @pytest.fixture(scope="class")
    @classmethod
    def finger_root(cls, tmp_path_factory):
        """Two default tasks and both finger-dominant tasks at the miniature experiment's settings."""
        return synthetic.write_synthetic(tmp_path_factory.mktemp("fingers") / "syn", tasks=2, episodes=0,
                                         test_episodes=1, frames=26, workers=0, zoom=2.0, marker_scale=2.0,
                                         finger_width=1.5, finger_tasks=len(synthetic.FINGER_TASKS))

    def test_finger_tasks_leave_the_default_tasks_files_unchanged(self, tmp_path):
        """Finger tasks are added after the others with seeds of their own: every default task's file is the
        same bytes with or without them."""
        kw = dict(tasks=1, episodes=1, test_episodes=0, frames=6, size=(64, 112), workers=0)
        a = synthetic.write_synthetic(tmp_path / "a", **kw)
        b = synthetic.write_synthetic(tmp_path / "b", finger_tasks=2, **kw)
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert len(files) == 2 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
        assert sorted(p.name for p in (b / "part1").iterdir()) == sorted(
            ["pick_place_cube"] + [t[0] for t in synthetic.FINGER_TASKS])

    def test_still_action_is_the_action_of_a_motionless_track(self):
        joints, _ = synthetic.synth_track(np.random.default_rng(0), 1)
        frozen = data._track_from_joints({k: np.repeat(v, 3, 0) for k, v in joints.items()})
        a = conditioning.compute_actions(frozen)  # (2, 57)
        np.testing.assert_allclose(a, np.broadcast_to(conditioning.still_actions(1)[0], a.shape), atol=1e-6)
        moving = conditioning.compute_actions(synthetic.synth_track(np.random.default_rng(0), 3)[1])
        assert np.abs(moving - conditioning.still_actions(1)[0]).max() > 1e-3

    def test_action_magnitudes_keep_fingers_small_except_on_finger_tasks(self, finger_root):
        """Default tasks: wrist translation and head motion about ten times the fingertip deltas (metres per
        frame); finger tasks: the wrists and head nearly still, the fingertips moving far more than both."""
        default = synthetic.action_magnitudes(finger_root, ("test",), [t[0] for t in synthetic.SYNTH_TASKS])
        fingers = synthetic.action_magnitudes(finger_root, ("test",), [t[0] for t in synthetic.FINGER_TASKS])
        assert {k: v.shape for k, v in default.items()} == {"wrist": (18,), "finger": (30,), "head": (9,)}
        wrist_t = lambda m: np.median(m["wrist"][[0, 1, 2, 9, 10, 11]])  # noqa: E731
        assert wrist_t(default) > 5 * np.median(default["finger"]) > 0
        assert np.median(default["head"][:3]) > 2 * np.median(default["finger"])
        assert np.median(fingers["finger"]) > 10 * max(wrist_t(fingers), np.median(fingers["head"][:3]))
        assert np.median(fingers["finger"]) > 5 * np.median(default["finger"])
        with pytest.raises(ValueError, match="no episodes"):
            synthetic.action_magnitudes(finger_root, ("test",), ["no_such_task"])

    def test_detector_recall_at_48x80_holds_for_the_chosen_settings_only(self, finger_root, tmp_path):
        """The miniature settings (zoom 2, markers x2, fingers x1.5): the detector finds nearly every wrist and
        fingertip at 48x80, finger tasks included; EgoDex's view finds almost none at that size."""
        for tasks in (synthetic.SYNTH_TASKS, synthetic.FINGER_TASKS):
            r = synthetic.detector_recall(finger_root, (48, 80), tasks=[t[0] for t in tasks])
            assert r["all"] > 0.9 and r["fingertips"] > 0.9 and r["wrists"] > 0.9 and r["keypoints"] > 400, r
        plain = synthetic.write_synthetic(tmp_path / "plain", tasks=1, episodes=0, test_episodes=1, frames=13,
                                          workers=0)
        r = synthetic.detector_recall(plain, (48, 80))
        assert r["all"] < 0.1 and r["keypoints"] > 100, r
        assert synthetic.detector_recall(plain, (180, 320))["all"] > 0.9  # the same frames at their own size

    def test_finger_task_curls_are_visible_in_48x80_frames(self, finger_root):
        """On a finger task the markers the detector finds in the decoded 48x80 frames show the fingertips
        sweeping several pixels around still wrists: a model must read the finger actions to predict them."""
        names = [t[0] for t in synthetic.FINGER_TASKS]
        for e in synthetic._episodes(finger_root, ("test",), names):
            s = data.load_clip(e, 0, 13, (48, 80))
            kp = np.stack([synthetic.detect_keypoints(f) for f in s["video"].permute(1, 2, 3, 0).numpy()])
            wrists, tips = kp[:, [0, 6]], kp[:, [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]]  # (13, 2, 2), (13, 10, 2)
            assert np.isfinite(kp).all()
            assert np.linalg.norm(wrists.max(0) - wrists.min(0), axis=-1).max() < 1.5
            assert np.median(np.linalg.norm(tips.max(0) - tips.min(0), axis=-1)) > 3

    def test_finger_width_thickens_the_fingers(self):
        joints, _ = synthetic.synth_track(np.random.default_rng(1), 1)
        K = synthetic._egodex_K((180, 320), 2.0)
        skin = lambda img: int((img == (220, 175, 150)).all(-1).sum())  # noqa: E731
        one = synthetic.render_frame(joints, 0, K, (180, 320), (90, 90, 90))
        np.testing.assert_array_equal(one, synthetic.render_frame(joints, 0, K, (180, 320), (90, 90, 90),
                                                                  finger_width=1.0))
        wide = synthetic.render_frame(joints, 0, K, (180, 320), (90, 90, 90), finger_width=2.0)
        assert skin(wide) > 1.5 * skin(one)

    @pytest.mark.parametrize("kw,message", [({"finger_tasks": 3}, "finger_tasks"),
                                            ({"finger_tasks": -1}, "finger_tasks"),
                                            ({"finger_width": 0.0}, "finger_width")])
    def test_bad_finger_options_are_refused(self, tmp_path, kw, message):
        with pytest.raises(ValueError, match=message):
            synthetic.write_synthetic(tmp_path / "x", workers=0, frames=4, **kw)
        assert not (tmp_path / "x").exists()
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "y"), "--finger-tasks", "3"])


# =====================================================================================================================
# irasim.py: the second backbone (IRASim), its Gaussian diffusion and the released checkpoint layout

def ira_randomize(module, seed=0, std=0.2):
    """Every parameter random (a trained-looking network: no zero gate hides a path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def ira_released_layout(depth, D, p, c_in, c_out, n_act, L, T):
    """The released IRASim state-dict keys and shapes, written from the official module names (models/irasim.py:
    timm PatchEmbed, TimestepEmbedder, TransformerBlock, FinalLayer, Frame-Ada's Mlp and nn.Embedding)."""
    shapes = {"x_embedder.proj.weight": (D, c_in, p, p), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "embed_state.fc1.weight": (4 * D, n_act), "embed_state.fc1.bias": (4 * D,),
              "embed_state.fc2.weight": (D, 4 * D), "embed_state.fc2.bias": (D,),
              "mask_emb_fn.weight": (1, D), "pos_embed": (1, L, D), "temp_embed": (1, T, D),
              "final_layer.linear.weight": (p * p * c_out, D), "final_layer.linear.bias": (p * p * c_out,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
                       f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
                       f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
                       f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
                       f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
                       f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,)})
    return shapes


def ira_numpy_schedule():
    betas = np.linspace(1e-4, 0.02, 1000)
    return betas, np.cumprod(1 - betas)


def ira_gaussian_eps(diffusion, mu, s):
    """The exact epsilon of data N(mu, s^2): E[eps | x_t] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))

    table = torch.as_tensor(abar, dtype=torch.float64)

    def eps(x, t_orig):
        ab = table[t_orig].view(-1, *[1] * (x.ndim - 1))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)
    return eps


class TestIRASim:
    """IRASim (irasim.py): the released key layout loads strictly; adaLN-Zero identity; spatial blocks are per
    frame, temporal blocks per patch position; Frame-Ada reaches exactly the frames it should; the mask diffusion
    equals a float64 hand computation, and its samplers recover a known Gaussian; DexAC plugs in as the identity.

        python -m pytest -q test_all.py -k TestIRASim
    """

    CFG = dict(dim=32, n_blocks=4, n_heads=4, input_size=(4, 6), num_frames=4)

    def tiny(self, **kw):
        return irasim.IRASim(irasim.config_from_preset("tiny", **{**self.CFG, **kw}))

    def test_released_layout_loads_strictly(self, tmp_path):
        """A random file in the released training-checkpoint layout ({"model", "ema", "opt", "args"}) loads with
        the EMA weights; a missing or an extra key is one clear error naming it."""
        import argparse
        cfg = irasim.config_from_preset("tiny", **self.CFG, learn_sigma=True)
        shapes = ira_released_layout(4, 32, 2, 4, 8, 7, 2 * 3, 4)
        g = torch.Generator().manual_seed(0)
        ema = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        raw = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        path = tmp_path / "0300000.pt"
        torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                    "args": argparse.Namespace(model="IRASim-XL/2", extras=3)}, path)
        model = irasim.load_irasim(path, cfg)
        sd = model.state_dict()
        assert set(sd) == set(shapes)
        assert all(torch.equal(sd[k], ema[k]) for k in shapes)
        assert torch.equal(irasim.load_irasim(path, cfg, prefer="model").state_dict()["pos_embed"], raw["pos_embed"])
        for name, bad in (("missing", {k: v for k, v in ema.items() if k != "blocks.3.attn.qkv.bias"}),
                          ("unexpected", {**ema, "y_embedder.embedding_table.weight": torch.zeros(2, 32)})):
            torch.save({"ema": bad}, tmp_path / "bad.pt")
            with pytest.raises(ValueError, match=rf"{name} \(1\): (blocks.3.attn.qkv.bias|y_embedder)"):
                irasim.load_irasim(tmp_path / "bad.pt", cfg)
        with pytest.raises(ValueError, match="wrong shape"):  # a learn_sigma=False model refuses 8 output channels
            irasim.load_irasim(path, replace(cfg, learn_sigma=False))

    def test_sincos_embeddings_by_hand(self):
        """pos_embed: first half sin|cos of the column index, second half of the row (MAE's meshgrid(w, h));
        temp_embed: sin|cos of the frame index; omega_i = 10000^(-i / (d/2)) with d the half width."""
        model = self.tiny()
        D, (gh, gw) = 32, model.grid
        pos, temp = model.pos_embed[0].double().numpy(), model.temp_embed[0].double().numpy()

        def emb(d, x):
            return [math.sin(x / 10000 ** (i / (d / 2))) for i in range(d // 2)] + \
                   [math.cos(x / 10000 ** (i / (d / 2))) for i in range(d // 2)]
        for r in range(gh):
            for c in range(gw):
                np.testing.assert_allclose(pos[r * gw + c], emb(D // 2, c) + emb(D // 2, r), atol=1e-6)
        for f in range(4):
            np.testing.assert_allclose(temp[f], emb(D, f), atol=1e-6)
        t = torch.tensor([0.0, 7.0, 999.0])
        half = [10000 ** (-i / 128) for i in range(128)]
        want = [[math.cos(v * w) for w in half] + [math.sin(v * w) for w in half] for v in t.tolist()]
        np.testing.assert_allclose(irasim.timestep_sinusoid(t).numpy(), want, atol=2e-4)

    def test_identity_at_init(self):
        """A fresh model outputs exactly 0; with only the final layer random, it equals that final layer on the
        embedded tokens (patch + pos + temp embedding), unpatchified by hand: every block is the identity."""
        model = self.tiny(learn_sigma=True)
        g = torch.Generator().manual_seed(1)
        x, a = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 3, 7, generator=g)
        t = torch.tensor([5, 900])
        with torch.no_grad():
            assert torch.equal(model(x, t, a), torch.zeros(2, 8, 4, 4, 6))
            ira_randomize(model.final_layer, seed=2)
            ira_randomize(model.t_embedder, seed=3)
            out = model(x, t, a)
            tokens = torch.stack([model.x_embedder(x[:, :, f]) for f in range(4)], 1) + model.pos_embed[:, None]
            tokens = tokens + model.temp_embed[0, :4, None]  # (B, T, L, D)
            temb = model.t_embedder(t)
            y = model.final_layer(tokens.reshape(8, 6, 32), temb.repeat_interleave(4, 0)).view(2, 4, 2, 3, 2, 2, 8)
        want = np.zeros((2, 8, 4, 4, 6))
        for b, f, r, c, i, j in np.ndindex(2, 4, 2, 3, 2, 2):  # token (r, c), in-patch (i, j), channel last
            want[b, :, f, 2 * r + i, 2 * c + j] = y[b, f, r, c, i, j].numpy()
        assert out.abs().max() > 0.1
        np.testing.assert_allclose(out.numpy(), want, atol=1e-5)

    def test_spatial_blocks_per_frame_temporal_blocks_per_position(self):
        """Random weights: a spatial block commutes with permuting frames and never mixes them, but mixes the
        tokens of a frame; a temporal block commutes with permuting patch positions and mixes frames."""
        model = ira_randomize(self.tiny(), seed=4)
        sb, tb = model.blocks[0], model.blocks[1]
        g = torch.Generator().manual_seed(5)
        x, c_s, c_t = torch.randn(2, 4, 6, 32, generator=g), torch.randn(2, 4, 32, generator=g), torch.randn(2, 32)
        perm, tperm = torch.tensor([2, 0, 3, 1]), torch.tensor([5, 3, 0, 1, 4, 2])
        x2 = x.clone()
        x2[:, 3] += torch.randn(2, 6, 32, generator=g)  # another frame changes (not by a constant: LayerNorm)
        x3 = x.clone()
        x3[:, 0, 5] += torch.randn(2, 32, generator=g)  # another token of frame 0 changes
        with torch.no_grad():
            s, t = model.spatial(sb, x, c_s), model.temporal(tb, x, c_t)
            torch.testing.assert_close(model.spatial(sb, x[:, perm], c_s[:, perm]), s[:, perm], atol=2e-5, rtol=0)
            assert torch.equal(model.spatial(sb, x2, c_s)[:, 0], s[:, 0])
            assert (model.spatial(sb, x3, c_s)[:, 0, :5] - s[:, 0, :5]).abs().max() > 1e-3  # tokens 0-4 see token 5
            torch.testing.assert_close(model.temporal(tb, x[:, :, tperm], c_t), t[:, :, tperm], atol=2e-5, rtol=0)
            assert (model.temporal(tb, x2, c_t)[:, 0] - t[:, 0]).abs().max() > 1e-3
            assert torch.equal(model.temporal(tb, x3, c_t)[:, :, 0], t[:, :, 0])
            # and a temporal block's output is the block applied to each position's frame sequence
            torch.testing.assert_close(t[:, :, 2], tb(x[:, :, 2], c_t), atol=2e-5, rtol=0)

    def test_frame_ada_reaches_its_frame(self):
        """Random weights: the action of step k changes the spatial AdaLN input at frame k + 1 only; frame 0's is
        timestep + mask embedding whatever the actions; temporal blocks and (legacy) final layer see the timestep
        only; on the spatial path (one spatial block) only frame k + 1 changes; dropped samples see the mask
        embedding everywhere, about 10% of them in training."""
        model = ira_randomize(self.tiny(), seed=6).eval()
        g = torch.Generator().manual_seed(7)
        x, a = torch.randn(2, 4, 6, 32, generator=g), torch.randn(2, 3, 7, generator=g)
        t = torch.tensor([3, 400])
        a2 = a.clone()
        a2[:, 1] += 1.0  # action of step 1 -> frame 2
        with torch.no_grad():
            temb, mask = model.t_embedder(t), model.mask_emb_fn.weight[0]
            _, c_s, c_t, c_f = model.adaln_inputs(t, a, x)
            _, c_s2, _, _ = model.adaln_inputs(t, a2, x)
            changed = (c_s2 - c_s).abs().amax(dim=(0, 2))
            assert changed[2] > 1e-3 and torch.equal(changed[[0, 1, 3]], torch.zeros(3))
            torch.testing.assert_close(c_s[:, 0], temb + mask, atol=1e-6, rtol=0)
            torch.testing.assert_close(c_s[:, 1:], temb[:, None] + model.embed_state(a), atol=1e-6, rtol=0)
            assert torch.equal(c_t, temb) and torch.equal(c_f, temb[:, None].expand(2, 4, 32))
            diff = (model.spatial(model.blocks[0], x, c_s2) - model.spatial(model.blocks[0], x, c_s)).abs()
            assert diff[:, 2].max() > 1e-3 and diff[:, [0, 1, 3]].max() == 0
            drop = torch.tensor([True, False])
            _, c_d, _, _ = model.adaln_inputs(t, a, x, drop=drop)
            torch.testing.assert_close(c_d[0], (temb[0] + mask).expand(4, 32), atol=1e-6, rtol=0)
            assert torch.equal(c_d[1], c_s[1])
            final = irasim.IRASim(replace(model.config, final_frame_ada=True))
            final.load_state_dict(model.state_dict())
            final.eval()
            assert torch.equal(final.adaln_inputs(t, a, x)[3], c_s)
            model.train()
            torch.manual_seed(8)
            n = 4000
            _, c_many, _, _ = model.adaln_inputs(torch.zeros(n, dtype=torch.long), torch.randn(n, 3, 7),
                                                 torch.zeros(n, 4, 6, 32))
            dropped = (c_many[:, 1] == c_many[:, 0]).all(-1).float().mean().item()
            assert 0.085 < dropped < 0.115, dropped  # 10% +- 3 standard deviations (0.0047)
        with pytest.raises(ValueError, match=r"one action per frame after the first: \(B, 3, 7\)"):
            model(torch.randn(1, 4, 4, 4, 6), torch.tensor([1]), torch.randn(1, 4, 7))

    def test_schedule_and_posterior_by_hand(self):
        """q_sample, the posterior mean/variance/clipped log variance and the fixed-large variance equal a float64
        computation from the linear betas, in the 1000-step process and a 50-step respacing."""
        betas, abar = ira_numpy_schedule()
        g = torch.Generator().manual_seed(9)
        x0, xt, eps = (torch.randn(4, 2, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
        for n in (None, 50):
            d = irasim.GaussianDiffusion(use_steps=n)
            keep = np.arange(1000) if n is None else np.round(np.arange(50) * 999 / 49).astype(int)
            assert d.timestep_map == keep.tolist()
            ab = abar[keep]
            b = 1 - ab / np.append(1, ab[:-1])
            t = torch.tensor([0, 1, 17, len(keep) - 1])
            ab_t, ab_p, b_t = ab[t], np.append(1, ab)[t], b[t]
            bc = lambda v: torch.as_tensor(v).view(-1, 1, 1, 1)
            torch.testing.assert_close(d.q_sample(x0, t, eps), bc(np.sqrt(ab_t)) * x0 + bc(np.sqrt(1 - ab_t)) * eps)
            mean, var, logvar = d.q_posterior(x0, xt, t)
            var_want = b_t * (1 - ab_p) / (1 - ab_t)
            mean_want = bc(np.sqrt(ab_p) * b_t / (1 - ab_t)) * x0 + bc(np.sqrt(1 - b_t) * (1 - ab_p) / (1 - ab_t)) * xt
            torch.testing.assert_close(mean, mean_want)
            torch.testing.assert_close(var.flatten(), torch.as_tensor(var_want))
            var1 = b[1] * (1 - ab[0]) / (1 - ab[1])
            torch.testing.assert_close(logvar.flatten(), torch.as_tensor(np.log(np.where(t == 0, var1, var_want))))
            p = d.p_mean_variance(eps, xt, t)  # C channels: the official "fixed large" variance
            torch.testing.assert_close(p["log_var"][:, 0, 0, 0], torch.as_tensor(np.log(np.where(t == 0, var1, b_t))))

    def test_learned_range_and_vlb_by_hand(self):
        """Known model output (eps, v): the learned-range log variance, the model mean, the KL in bits at t > 0 and
        the discretized decoder NLL at t = 0 equal float64 formulas; the loss is MSE + VLB over the predicted frames
        only, the mean enters the VLB stop-gradient, and the model sees the clean conditioning frame."""
        betas, abar = ira_numpy_schedule()
        d = irasim.GaussianDiffusion()
        g = torch.Generator().manual_seed(10)
        B, T = 3, 3
        x0 = torch.rand(B, 2, T, 4, generator=g, dtype=torch.float64) * 2 - 1
        x0[0, 0, 1, 0], x0[0, 1, 2, 3] = -1.0, 1.0  # the open end bins
        noise = torch.randn(B, 2, T - 1, 4, generator=g, dtype=torch.float64)
        out = torch.randn(B, 4, T, 4, generator=g, dtype=torch.float64)
        out[:, 2:] = out[:, 2:].tanh()
        out.requires_grad_(True)
        t = torch.tensor([0, 1, 600])
        seen = []
        terms = d.training_losses(lambda x, tt: seen.append(x) or out, x0, t, mask_frames=1, noise=noise)
        assert torch.equal(seen[0][:, :, :1], x0[:, :, :1])
        from scipy.stats import norm
        for i, ti in enumerate(t.tolist()):
            ab, ab_p, b = abar[ti], (abar[ti - 1] if ti else 1.0), betas[ti]
            x0i, ni = x0[i, :, 1:].numpy(), noise[i].numpy()
            eps, v = out[i, :2, 1:].detach().numpy(), out[i, 2:, 1:].detach().numpy()
            xt = np.sqrt(ab) * x0i + np.sqrt(1 - ab) * ni
            np.testing.assert_allclose(seen[0][i, :, 1:].numpy(), xt, atol=1e-12)
            post_var = lambda s: betas[s] * (1 - (abar[s - 1] if s else 1)) / (1 - abar[s])
            min_log = np.log(post_var(ti) if ti else post_var(1))
            logvar = (v + 1) / 2 * np.log(b) + (1 - v) / 2 * min_log
            x0_hat = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
            c0, ct = np.sqrt(ab_p) * b / (1 - ab), np.sqrt(1 - b) * (1 - ab_p) / (1 - ab)
            mean_p, mean_q = c0 * x0_hat + ct * xt, c0 * x0i + ct * xt
            if ti > 0:
                kl = 0.5 * (logvar - min_log + (np.exp(min_log) + (mean_q - mean_p) ** 2) / np.exp(logvar) - 1)
                vb = kl.mean() / np.log(2)
            else:
                sd = np.exp(0.5 * logvar)
                cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
                hi, lo = cdf((x0i - mean_p + 1 / 255) / sd), cdf((x0i - mean_p - 1 / 255) / sd)
                p = np.where(x0i < -0.999, hi, np.where(x0i > 0.999, 1 - lo, hi - lo))
                vb = -np.log(p).mean() / np.log(2)
                exact_hi, exact_lo = norm.cdf((x0i - mean_p + 1 / 255) / sd), norm.cdf((x0i - mean_p - 1 / 255) / sd)
                exact = np.where(x0i < -0.999, exact_hi, np.where(x0i > 0.999, 1 - exact_lo, exact_hi - exact_lo))
                assert abs(-np.log(exact).mean() / np.log(2) - vb) < 0.03 * abs(vb)  # the tanh CDF: 2.0% here
            mse = ((ni - eps) ** 2).mean()
            np.testing.assert_allclose(terms["vb"][i].item(), vb, rtol=1e-10)
            np.testing.assert_allclose(terms["mse"][i].item(), mse, rtol=1e-10)
            np.testing.assert_allclose(terms["loss"][i].item(), mse + vb, rtol=1e-10)
        grad_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
        assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:, 1:].abs().min() > 0  # mean stop-gradient
        grad, = torch.autograd.grad(terms["loss"].sum(), out)
        assert grad[:, :, 0].abs().max() == 0  # the conditioning frame is not scored

    @pytest.mark.parametrize("method,steps,v,tol", [("ddpm", 250, None, 0.025), ("ddpm", 250, -1.0, 0.025),
                                                    ("ddpm", 250, 0.0, 0.025), ("ddpm", 50, None, 0.035),
                                                    ("ddim", 50, None, 0.035)])
    def test_samplers_recover_a_gaussian(self, method, steps, v, tol):
        """Data N(0.7, 0.4^2) with its exact epsilon: 20000 samples have mean and std within tol (the sample mean's
        own standard error is 0.003). v None: the fixed-large variance (C output channels); v: 2C channels, the
        learned-range path at v (-1: the posterior variance). Measured |error| (std): 0.0007 (fixed large), 0.017 (v -1)
        and 0.008 (v 0) at 250, 0.018 (DDPM) and 0.025 (DDIM) at 50 (the coarse respaced steps near t = 0)."""
        mu, s = 0.7, 0.4
        d = irasim.GaussianDiffusion(use_steps=steps)
        eps = ira_gaussian_eps(d, mu, s)
        fn = eps if v is None else (lambda x, t: torch.cat([eps(x, t), torch.full_like(x, v)], 1))
        noise = torch.randn(20000, 1, 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        x = d.sample(fn, noise, method=method, generator=torch.Generator().manual_seed(12))
        assert abs(x.mean().item() - mu) < tol and abs(x.std().item() - s) < tol, (x.mean().item(), x.std().item())
        if v is None and steps == 50:  # and the test can fail: a wrong epsilon gives the wrong distribution
            x = d.sample(ira_gaussian_eps(d, mu, 2 * s), noise, method=method, generator=torch.Generator().manual_seed(12))
            assert abs(x.std().item() - s) > 0.2

    def test_sampling_takes_two_steps_at_least(self):
        """A respaced process samples on 2 to 1000 steps: one step would be step 0 alone (nearly clean, posterior
        variance 0), so it is refused with the reason; two steps are the schedule's ends and sample."""
        with pytest.raises(ValueError, match="2 to 1000 of its diffusion steps, not 1"):
            irasim.GaussianDiffusion(use_steps=1)
        d = irasim.GaussianDiffusion(use_steps=2)
        assert d.timestep_map == [0, 999]
        x = d.sample(lambda x, t: torch.zeros_like(x), torch.randn(4, 1, 1), method="ddpm",
                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()

    def test_sampler_keeps_the_conditioning_frame(self):
        """Mask diffusion sampling: the model sees the clean first frame at every step and it comes back unchanged;
        the other frames follow the data (each frame N(mu, s^2) with the exact epsilon)."""
        d = irasim.GaussianDiffusion(use_steps=250)
        eps = ira_gaussian_eps(d, 0.7, 0.4)
        cond = torch.randn(2000, 1, 1, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 5
        seen = []
        fn = lambda x, t: seen.append(torch.equal(x[:, :, :1], cond)) or eps(x, t)
        noise = torch.randn(2000, 1, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
        x = d.sample(fn, noise, x_cond=cond, method="ddim")
        assert len(seen) == 250 and all(seen) and torch.equal(x[:, :, :1], cond)
        assert abs(x[:, :, 1:].mean().item() - 0.7) < 0.03 and abs(x[:, :, 1:].std().item() - 0.4) < 0.03

    def test_every_parameter_trains_and_dexac_starts_as_identity(self):
        """Random weights, one loss (MSE + VLB, learn_sigma) backward: every Frame-Ada parameter gets a non-zero
        gradient. With build_action_cond("dexac") the model with a pretrained backbone's weights gives exactly the
        backbone's output at init, and then every parameter trains: IRASim's DexAC has no emb_3d head (no
        counterpart in IRASim's blocks), so no dead weight and no optimizer state that never appears (a run
        with one could not resume: DCP expects a state for every trainable parameter)."""
        g = torch.Generator().manual_seed(15)
        x, a = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 3, 7, generator=g)
        t = torch.tensor([0, 700])
        d = irasim.GaussianDiffusion()
        for mode in ("frame-ada", "dexac"):
            model = ira_randomize(self.tiny(learn_sigma=True, action_mode=mode), seed=16)
            if mode == "dexac":
                model.action_cond.set_stats(torch.zeros(7), torch.ones(7))
                assert model.action_cond.glob.to_3d is None
            fn = lambda xt, tt: model(xt, tt, a, drop_actions=torch.zeros(2, dtype=torch.bool)) \
                if mode == "frame-ada" else model(xt, tt, a)
            d.training_losses(fn, x, t).get("loss").sum().backward()
            dead = sorted(n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0)
            assert dead == [], (mode, dead)
        backbone = ira_randomize(self.tiny(learn_sigma=True, action_mode="none"), seed=17)
        dexac = self.tiny(learn_sigma=True, action_mode="dexac")
        dexac.action_cond.set_stats(torch.zeros(7), torch.ones(7))
        hub.load_strict(dexac, backbone.state_dict(), allow_missing=("action_cond.",))
        assert isinstance(dexac.action_cond, conditioning.DexAC)
        with torch.no_grad():
            assert torch.equal(dexac(x, t, a), backbone(x, t))
            with torch.no_grad():
                dexac.action_cond.glob.to_d.weight.normal_()
            assert (dexac(x, t, a) - backbone(x, t)).abs().max() > 1e-3  # the test can fail
        with pytest.raises(ValueError, match="without action conditioning"):
            backbone(x, t, a)


IRASIM_ARGS = ["--backbone", "irasim", "--model", "tiny", "--dim", "32", "--ckpt-every", "2", "--preview-every", "0"]


class TestIRASimPath:
    """The IRASim backbone through the one training, sampling and evaluation path (--backbone irasim): the
    paper's IRASim and IRASim + DexAC rows. Cheap sizes: 2 blocks of width 32, 5 frames at 32x64 (4x8 latents).

        python -m pytest -q test_all.py -k TestIRASimPath
    """

    def test_frame_ada_run_resumes_exactly_then_samples_and_evaluates(self, train_synth, tmp_path):
        """--action-mode frame-ada (the released IRASim): 2 + 2 steps with a stop between give the uninterrupted
        4 steps' weights exactly (the diffusion step, the noise and Frame-Ada's dropout all replay); the export
        names its backbone and rolls out two chunks through sample.py; evaluate.py scores it."""
        args = [*IRASIM_ARGS, "--action-mode", "frame-ada", "--data", train_synth, "--steps", 4, "--batch-size", 2,
                "--micro-batch", 2]
        whole = run_train([*args, "--out", tmp_path / "whole"])
        part = run_train([*args, "--out", tmp_path / "part", "--exit-after", 2])
        assert not (part / "model.safetensors").exists()
        run_train([*args, "--out", tmp_path / "part", "--resume", part])
        assert whole.name.startswith("000-irasim-tiny-frame-ada")
        a, b = (load_file(str(r / "model.safetensors")) for r in (whole, part))
        assert a.keys() == b.keys() and "embed_state.fc1.weight" in a
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
        meta = S.read_export_meta(str(whole / "model.safetensors"))
        assert meta["backbone"] == "irasim" and meta["tokenizer"]["temporal"] == 1
        with pytest.raises(ValueError, match="export of the irasim backbone"):
            M.load_exported(str(whole / "model.safetensors"))
        ep = sorted((train_synth / "test").rglob("*.hdf5"))[0]
        out = tmp_path / "samples"
        assert S.main(["--checkpoint", str(whole / "model.safetensors"), "--episode", str(ep), "--num-actions",
                            "8", "--steps", "3", "--out", str(out)]) == 0  # 8 actions: two chunks of 4
        assert sorted(p.name for p in out.iterdir()) == [f"{ep.parent.name}_{ep.stem}{s}" for s in
                                                         (".mp4", ".png", "_vs_gt.mp4")]
        for bad, message in ((["--sampler", "unipc"], "choose one of \\('ddim', 'ddpm'\\)"),
                             (["--height", "64"], "training size"), (["--steps", "1"], "2 to 1000 of its")):
            with pytest.raises(SystemExit, match=message):
                S.main(["--checkpoint", str(whole / "model.safetensors"), "--episode", str(ep), *bad])
        # the export (bf16) as the pretrained IRASim of a LoRA run: fp32 master weights, adapters on IRASim's layers
        lora_run = run_train([*IRASIM_ARGS, "--data", train_synth, "--steps", 1, "--batch-size", 2, "--micro-batch", 2,
                              "--init", whole / "model.safetensors", "--trainable", "lora+new", "--lora-rank", 2,
                              "--out", tmp_path / "lora"])
        adapted = S.read_export_meta(str(lora_run / "model.safetensors"))["lora"]["target_modules"]
        assert "blocks.0.attn.qkv" in adapted and "blocks.1.mlp.fc2" in adapted and len(adapted) == 8
        evaluate_argv = ["--checkpoint", str(whole / "model.safetensors"), "--data", str(train_synth), "--horizon",
                         "9", "--clips", "1", "--metrics", "psnr", "--out", str(tmp_path / "eval")]
        with pytest.raises(ValueError, match="--steps 1 cannot sample the IRASim model"):  # before any work
            E.main([*evaluate_argv, "--steps", "1"])
        assert not (tmp_path / "eval").exists()
        E.main([*evaluate_argv, "--steps", "2"])  # 2 steps: both ends of the 1000
        report = json.loads((tmp_path / "eval" / "report.json").read_text())
        assert math.isfinite(report["rows"][whole.name]["psnr"]), report["rows"]
        assert json.loads((tmp_path / "eval" / whole.name / "settings.json").read_text())["sampler"] == "ddim"

    def test_dexac_on_irasim_learns_every_new_parameter_and_reads_every_action(self, train_synth, tmp_path,
                                                                               one_rank):
        """IRASim + DexAC through train.py's step (FSDP, the diffusion loss, AdamW): the new modules start as
        the identity (zero output); from IRASim's own adaLN-Zero init (output layer, then modulations, then the
        new modules get gradients) every one of their parameters moves within 6 steps (no weight decay, so only
        a gradient moves one), but the emb_3d head IRASim's blocks have no input for (documented in
        irasim.IRASim) and the key bias of the global attention pooling, whose gradient is zero in exact
        arithmetic (one query: the bias shifts every logit alike); then no action dimension of any predicted
        frame is ignored."""
        cfg, _ = train.parse_args([*TRAIN_ARGS, *IRASIM_ARGS, "--data", str(train_synth), "--batch-size", "2",
                                   "--micro-batch", "2", "--lr", "1e-2", "--warmup", "0", "--weight-decay", "0",
                                   "--out", str(tmp_path)])
        t = train.build(cfg, torch.device("cpu"))
        assert isinstance(t.model.action_cond, conditioning.DexAC) and t.diffusion is not None
        before = {n: train.local(p).detach().clone() for n, p in t.model.named_parameters()
                  if n.startswith("action_cond.")}
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(t.latent, generator=g)
        # actions of the data's own spread: N(0, 1) on a dimension whose std is 4e-5 (a rotation entry near 1)
        # normalizes to ~1e4, where the tokens saturate and the gradient underflows to exactly 0 on some CPUs
        mean, std = (s.detach().clone() for s in t.model.action_cond.norm.stats())
        actions = mean + std * torch.randn(2, cfg.frames - 1, conditioning.ACTION_DIM, generator=g)
        inputs = (x0, t.context[0]([""] * 2), actions, None)
        with torch.no_grad():  # identity at init: the actions change nothing
            steps = torch.tensor([10, 900])
            assert torch.equal(t.model(x0, steps, actions), t.model(x0, steps, actions.flip(0)))
        for step in range(6):
            assert train.train_step(t, step, lambda: inputs).ok
        moved = {n for n, p in t.model.named_parameters() if n in before
                 and not torch.equal(train.local(p).detach(), before[n])}
        assert len(before) > 20 and set(before) - moved <= {"action_cond.glob.attn.k.bias"}, sorted(set(before) - moved)
        a = actions.clone().requires_grad_(True)
        out = t.model(x0, torch.tensor([300, 700]), a)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        sensitivity = a.grad.abs().sum(0)  # (frames - 1, 57)
        assert (sensitivity > 0).all(), f"ignored (frame, dimension): {torch.nonzero(sensitivity == 0).tolist()}"

    def test_every_action_mode_trains_a_step_on_irasim(self, train_synth, tmp_path, one_rank):
        """Frame-Ada and every conditioning.MODES entry through train.py's step on IRASim (FSDP2 with the fp32
        groups of each mode): finite, with gradients. (The mlp mode's unused AdaLN-LoRA head, in an FSDP group
        of its own, failed the backward on a freed parameter.)"""
        cfg, _ = train.parse_args([*TRAIN_ARGS, *IRASIM_ARGS, "--data", str(train_synth), "--batch-size", "2",
                                   "--micro-batch", "2", "--out", str(tmp_path)])
        g = torch.Generator().manual_seed(2)
        for mode in ("frame-ada", *conditioning.MODES):
            t = train.build(replace(cfg, action_mode=mode), torch.device("cpu"))
            inputs = (torch.randn(t.latent, generator=g), t.context[0]([""] * 2),
                      torch.randn(2, cfg.frames - 1, conditioning.ACTION_DIM, generator=g), None)
            r = train.train_step(t, 0, lambda: inputs)
            assert r.ok and r.norm > 0, (mode, r)

    def test_bf16_mixed_precision_step_is_finite(self, train_synth, tmp_path, one_rank, monkeypatch):
        """FSDP's bf16 compute with fp32 master weights (what a GPU run gets), forced on the CPU: the timestep
        sinusoid, Frame-Ada and DexAC's fp32 parts meet bf16 weights without a dtype error, and the step is
        finite."""
        cfg, _ = train.parse_args([*TRAIN_ARGS, *IRASIM_ARGS, "--data", str(train_synth), "--batch-size", "2",
                                   "--micro-batch", "2", "--out", str(tmp_path)])
        parallelize = train.parallelize
        monkeypatch.setattr(train, "parallelize", lambda *a, **k: parallelize(*a, **{**k, "bf16": True}))
        for mode, learn_sigma in (("frame-ada", False), ("dexac", True)):  # with the learned variance's VLB too
            c = replace(cfg, action_mode=mode, learn_sigma=learn_sigma)
            t = train.build(c, torch.device("cpu"))
            assert t.dtype == torch.bfloat16 and t.model.out_channels == (2 if learn_sigma else 1) * t.latent[1]
            g = torch.Generator().manual_seed(1)
            inputs = (torch.randn(t.latent, generator=g), t.context[0]([""] * 2),
                      torch.randn(2, c.frames - 1, conditioning.ACTION_DIM, generator=g), None)
            r = train.train_step(t, 0, lambda: inputs)
            assert r.ok and math.isfinite(r.loss) and r.norm > 0, (mode, r.loss, r.norm)

    def test_compiled_irasim_blocks_are_one_graph_each_and_equal_eager(self):
        """train.py --compile on IRASim: model.compile_blocks compiles each block's body with fullgraph (a graph
        break is an error), the DexAC module beside them; the output is the eager one."""
        c = irasim.config_from_preset("tiny", dim=32, n_blocks=2, input_size=(4, 6), num_frames=4, action_mode="dexac",
                                      action_dim=7)
        model = randomize(irasim.IRASim(c), seed=5, std=0.05)
        model.action_cond.set_stats(torch.zeros(7), torch.ones(7))
        g = torch.Generator().manual_seed(0)
        x, t, a = torch.randn(2, 4, 4, 4, 6, generator=g), torch.tensor([3, 500]), torch.randn(2, 3, 7, generator=g)
        with torch.no_grad():
            want = model(x, t, a)
            M.compile_blocks(model, backend="eager")
            assert torch.equal(model(x, t, a), want)
        assert all(hasattr(b.body, "_torchdynamo_orig_callable") for b in model.blocks)

    def test_an_sdxl_latent_cache_of_any_clip_length_trains_irasim(self, train_synth, tmp_path):
        """data.cache_clips with IRASim's per-frame VAE (the tiny SDXL preset here): 6-frame clips, which no 4x
        temporal VAE takes, become 6 latent frames, and train.py --backbone irasim --tokenizer sdxl trains on the
        cache (its manifest matches the flags)."""
        cache = tmp_path / "cache"
        data.cache_clips(train_synth, cache, tk.SDXLVAE(SDXL_TINY), tokenizer_name="sdxl", clip_len=6, size=(32, 64),
                         shard_size=4, batch=2, workers=0, dtype=torch.float32)
        shard = load_file(str(sorted(cache.glob("*.safetensors"))[0]))
        assert shard["latents"].shape[1:] == (4, 6, 4, 8)
        run = run_train([*IRASIM_ARGS, "--data", cache, "--stats", train_synth / "stats.json", "--no-synthetic",
                         "--tokenizer", "sdxl", "--frames", 6, "--steps", 1, "--batch-size", 2, "--micro-batch", 2,
                         "--out", tmp_path / "runs"])
        assert S.read_export_meta(str(run / "model.safetensors"))["model_config"]["num_frames"] == 6

    @pytest.mark.parametrize("flags,message", [
        (["--action-mode", "frame-ada"], "belongs to IRASim"),
        (["--tokenizer", "sdxl"], "belongs to IRASim"),
        (["--learn-sigma"], "--learn-sigma belongs to IRASim"),
        (["--backbone", "irasim", "--model", "cosmos2b"], "the IRASim sizes are"),
        (["--backbone", "irasim", "--model", "tiny", "--semantic"], "no cross-attention"),
        (["--backbone", "irasim", "--model", "tiny", "--tokenizer", "wan2.1"], "per-frame latents"),
        (["--backbone", "irasim", "--model", "tiny", "--ac", "mlp"], "--ac full or none"),
        (["--backbone", "irasim", "--model", "tiny", "--init", "base/pre-trained"], "starts from a checkpoint file"),
        (["--backbone", "irasim", "--model", "tiny", "--preview-steps", "1"], "samples on 2 to 1000"),
        (["--model", "XL"], "is an IRASim size"),
    ])
    def test_backbone_mismatches_are_one_error(self, train_synth, tmp_path, flags, message):
        assert message in main_error(["--data", train_synth, *flags], tmp_path)


class TestLoRA:
    """lora.py: adapters start as the identity and keep the base's parameter names; a saved adapter loads, changes
    the output and merges into the same function; peft reads our files; only adapters and new modules train."""

    def dit(self, seed=0, **kw):
        """A random tiny DexAC DiT (2 blocks) and a function of it -> its output on fixed inputs."""
        cfg = M.config_from_preset("tiny", action_mode="dexac", action_steps=8, actions_per_frame=4, n_blocks=2, **kw)
        model = randomize(M.DiT(cfg), seed, std=0.05).eval()
        model.action_cond.set_stats(torch.zeros(cfg.action_dim), torch.ones(cfg.action_dim))
        g = torch.Generator().manual_seed(100)
        B, T, H, W = 2, 3, 4, 4  # 8 actions: 4 per latent frame after the conditional one
        x, text = torch.randn(B, 16, T, H, W, generator=g), torch.randn(B, 5, cfg.text_dim, generator=g)
        sigma, actions = torch.rand(B, generator=g), torch.randn(B, 8, cfg.action_dim, generator=g)
        frame_mask = torch.tensor([[1.0, 0, 0]]).expand(B, T)
        return model, lambda net: net(x, sigma, text, frame_mask, actions=actions)

    def ira(self, seed=0):
        """A random tiny DexAC IRASim and a function of it -> its output on fixed inputs."""
        cfg = irasim.config_from_preset("tiny", dim=32, n_blocks=4, n_heads=4, input_size=(4, 6), num_frames=4,
                                        action_mode="dexac")
        model = randomize(irasim.IRASim(cfg), seed, std=0.05).eval()
        model.action_cond.set_stats(torch.zeros(7), torch.ones(7))
        g = torch.Generator().manual_seed(100)
        x, t, a = torch.randn(2, 4, 4, 4, 6, generator=g), torch.tensor([3, 700]), torch.randn(2, 3, 7, generator=g)
        return model, lambda net: net(x, t, a)

    @staticmethod
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    @staticmethod
    def train_adapters(model, seed=1, std=0.1):
        """Non-zero B (and new A) in every adapter, as after training."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in lora.lora_modules(model):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)

    def test_target_groups_hit_block_linears_only(self):
        """attn: Cosmos' q, k, v, o of both attentions, IRASim's qkv and proj; mlp: fc1, fc2 of each block. Never
        a linear named like the blocks' outside them (DexAC's action_cond.local.attn.q, Frame-Ada's
        embed_state.fc1), the semantic projector, AdaLN modulations, embedders or final layers."""
        dit, _ = self.dit(semantic_dim=32)
        ira, _ = self.ira()
        frame_ada = irasim.IRASim(irasim.config_from_preset("tiny", n_blocks=2))
        attns = ("cross_attn", "self_attn")
        cosmos = {"attn": [f"blocks.{i}.{a}.{p}" for i in range(2) for a in attns for p in "koqv"],
                  "mlp": [f"blocks.{i}.fc{j}" for i in range(2) for j in (1, 2)]}
        ira_want = lambda n: {"attn": [f"blocks.{i}.attn.{p}" for i in range(n) for p in ("proj", "qkv")],
                              "mlp": [f"blocks.{i}.mlp.fc{j}" for i in range(n) for j in (1, 2)]}
        for model, want in ((dit, cosmos), (ira, ira_want(4)), (frame_ada, ira_want(2))):
            assert lora.target_names(model, "attn") == want["attn"]
            assert lora.target_names(model, "mlp") == want["mlp"]
            assert lora.target_names(model) == sorted(want["attn"] + want["mlp"])
            assert lora.target_names(model, ["mlp", "attn"]) == lora.target_names(model, "attn, mlp")
        assert "action_cond.local.attn.q" in dict(dit.named_modules()) and dit.semantic is not None
        assert "embed_state.fc1" in dict(frame_ada.named_modules())

    def test_injection_is_the_identity_at_step_0(self):
        """Both backbones: the injected model's output equals the base's exactly (B = 0), the base parameters are
        the same Parameter objects under the same keys, A is non-zero (B's first gradient must not vanish), and the
        adapters' dtype follows the base weight's."""
        for build in (self.dit, self.ira):
            model, run = build()
            with torch.no_grad():
                before = run(model)
            params = dict(model.named_parameters())
            names = lora.inject(model, rank=4, alpha=8)
            sd = model.state_dict()
            assert all(p is params[n] for n, p in model.named_parameters() if not lora.is_lora(n))
            assert sorted(k for k in sd if lora.is_lora(k)) == sorted(f"{n}.{ab}.weight" for n in names
                                                                     for ab in lora.LORA_KEYS)
            for n in names:
                m = model.get_submodule(n)
                assert isinstance(m, lora.LoRALinear) and m.scaling == 2.0
                assert m.lora_A.weight.shape == (4, m.in_features) and m.lora_B.weight.shape == (m.out_features, 4)
                assert m.lora_A.weight.abs().min() > 0 and not m.lora_B.weight.any()
            with torch.no_grad():
                assert torch.equal(run(model), before)
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
            assert bf16.get_submodule(names[0]).lora_A.weight.dtype == torch.bfloat16
        base = nn.Linear(8, 6)  # dropout acts on the adapter's input only: in training, the base path is intact
        x, adapted = torch.randn(5, 8), lora.LoRALinear(base, rank=2, alpha=2, dropout=0.5).train()
        assert adapted.weight is base.weight and adapted.bias is base.bias
        assert torch.equal(adapted(x), base(x))

    def test_injected_keys_are_the_base_keys_plus_the_adapters(self):
        """A base checkpoint loads strictly into the injected model's base keys: the keys outside the adapters
        are the un-injected model's, in order."""
        model, _ = self.dit()
        base_keys = list(model.state_dict())
        lora.inject(model, rank=2)
        assert [k for k in model.state_dict() if not lora.is_lora(k)] == base_keys

    def test_a_loaded_adapter_changes_the_output_and_merges_exactly(self, tmp_path):
        """The failure users report (adapters that load and change nothing): an adapter saved from one model and
        loaded into a fresh injected one gives that model's output, far from the base's; merge() gives the same
        function to 1e-5 with plain nn.Linear modules and exactly the base model's state dict keys."""
        for build in (self.dit, self.ira):
            trained, run = build()
            base = copy.deepcopy(trained)
            names = lora.inject(trained, rank=4, alpha=8)
            self.train_adapters(trained)
            lora.save_adapters(tmp_path / "a", trained, lora.adapter_config(4, 8, names, base="tiny"))

            model = copy.deepcopy(base)
            lora.inject(model, rank=4, alpha=8)
            sd, config = lora.read_adapters(tmp_path / "a")
            assert config["r"] == 4 and config["target_modules"] == names
            lora.load_adapter_state_dict(model, sd)
            with torch.no_grad():
                want, out, ref = run(trained), run(model), run(base)
                assert torch.equal(out, want)
                assert self.rel(out, ref) > 0.05, self.rel(out, ref)
                assert lora.merge(model) == names
                assert not lora.lora_modules(model) and type(model.get_submodule(names[0])) is nn.Linear
                assert list(model.state_dict()) == list(base.state_dict())
                assert self.rel(run(model), out) < 1e-5

    def test_peft_loads_our_folder_and_gives_our_output(self, tmp_path):
        """The user's path: peft.PeftModel.from_pretrained(backbone, folder) on save_adapters' folder gives our
        output (1e-5); peft's get_peft_model_state_dict has exactly our keys and values; and the reverse: a folder
        peft's save_pretrained writes is read back by read_adapters and loads into our injected model."""
        import peft
        for build in (self.dit, self.ira):
            model, run = build()
            base = copy.deepcopy(model)
            names = lora.inject(model, rank=4, alpha=16)
            self.train_adapters(model, seed=2)
            lora.save_adapters(tmp_path / "ours", model, lora.adapter_config(4, 16, names))
            config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
            assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 16, names)
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
            with torch.no_grad():
                ours, ref = run(model), run(base)
                assert self.rel(run(theirs), ours) < 1e-5 and self.rel(ours, ref) > 0.05
            peft_sd = peft.get_peft_model_state_dict(theirs)
            sd = lora.adapter_state_dict(model)
            assert sorted(peft_sd) == sorted(sd) and all(torch.equal(peft_sd[k], sd[k]) for k in sd)

            theirs.save_pretrained(str(tmp_path / "peft"))
            back = copy.deepcopy(base)
            lora.inject(back, rank=4, alpha=16)
            lora.load_adapter_state_dict(back, lora.read_adapters(tmp_path / "peft")[0])
            with torch.no_grad():
                assert torch.equal(run(back), ours)

    def test_only_adapters_and_new_modules_receive_gradients(self):
        """After mark_trainable and a backward pass: no gradient (None) on any backbone parameter; a gradient on
        every adapter A and B (A's is zero at init, since B = 0, but it exists) and every DexAC parameter."""
        model, run = self.dit()
        lora.inject(model, rank=4)
        trainable = lora.mark_trainable(model)
        run(model).square().mean().backward()
        params = dict(model.named_parameters())
        adapters = [n for n in params if lora.is_lora(n)]
        new = [n for n in params if n.startswith("action_cond.")]
        assert adapters and new and sorted(trainable) == sorted(adapters + new)
        assert all(params[n].grad is not None for n in adapters + new), [n for n in adapters + new
                                                                          if params[n].grad is None]
        frozen = [n for n in params if n not in trainable]
        assert frozen and all(params[n].grad is None and not params[n].requires_grad for n in frozen)
        assert all(params[n].grad.abs().max() > 0 for n in adapters if ".lora_B." in n)
        assert all(not params[n].grad.any() for n in adapters if ".lora_A." in n)  # B = 0: dL/dA = 0, not None

    def test_compiled_and_checkpointed_blocks_equal_eager(self):
        """An injected DiT with trained adapters, its blocks wrapped for activation checkpointing and their bodies
        compiled with fullgraph=True (train.parallelize's order): the same output and gradients as eager, and the
        same state dict keys."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        eager, run = self.dit()
        lora.inject(eager, rank=4)
        self.train_adapters(eager)
        lora.mark_trainable(eager)
        fast = copy.deepcopy(eager)
        for i, block in enumerate(fast.blocks):
            fast.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        torch._dynamo.reset()
        M.compile_blocks(fast, backend="eager")  # dynamo capture, fullgraph: a graph break raises
        outs = []
        for net in (eager, fast):
            out = run(net)
            out.square().mean().backward()
            outs.append(out.detach())
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
        assert self.rel(outs[1], outs[0]) < 1e-5
        assert list(fast.state_dict()) == list(eager.state_dict())
        for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None and p.grad.any():
                assert self.rel(q.grad, p.grad) < 1e-4, name

    def test_meta_build_then_to_empty_and_load(self):
        """Built and injected on the meta device (no memory), materialized with to_empty, the base weights loaded
        and the adapters reset: the output equals the base model's exactly."""
        base, run = self.dit()
        with torch.device("meta"):
            model = M.DiT(base.config)
        names = lora.inject(model, rank=4)
        assert model.get_submodule(names[0]).lora_B.weight.is_meta
        model.to_empty(device="cpu")
        model.load_state_dict(base.state_dict(), strict=False, assign=True)
        assert lora.reset_adapters(model) == len(names)
        with torch.no_grad():
            assert torch.equal(run(model.eval()), run(base))

    def test_fully_shard_after_injection(self):
        """FSDP2 fully_shard per block then the root, on one gloo rank, frozen base and trainable adapters in the
        same groups: the same output as unsharded, gradients on the adapters only."""
        from torch.distributed.fsdp import fully_shard
        model, run = self.dit()
        lora.inject(model, rank=4)
        self.train_adapters(model)
        lora.mark_trainable(model, extra_prefixes=())
        with torch.no_grad():
            want = run(model)
        assert not dist.is_initialized(), "a test left a process group behind"
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            out = run(model)
            assert self.rel(out.detach(), want) < 1e-6
            out.square().mean().backward()
            for name, p in model.named_parameters():
                assert (p.grad is not None) == lora.is_lora(name), name
        finally:
            dist.destroy_process_group()

    def test_bad_input_is_one_clear_error(self, tmp_path):
        """Unknown group, no match, rank 0, double injection, loading into an un-injected model, a state dict with
        a wrong key or shape, a config that does not describe the model, a missing or invalid folder."""
        model, _ = self.dit()
        with pytest.raises(ValueError, match=r"target group\(s\) \['ffn'\]: choose from \['attn', 'mlp'\]"):
            lora.inject(model, targets="attn,ffn")
        with pytest.raises(ValueError, match="no layer of this Sequential matches the LoRA targets"):
            lora.inject(nn.Sequential(nn.Linear(4, 4)))
        with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
            lora.inject(model, rank=0)
        with pytest.raises(ValueError, match="has no LoRA adapters to load"):
            lora.load_adapter_state_dict(model, {})
        names = lora.inject(model, rank=4)
        with pytest.raises(ValueError, match="already has LoRA adapters"):
            lora.inject(model, rank=4)
        sd = lora.adapter_state_dict(model)
        key = "base_model.model.blocks.0.self_attn.q.lora_A.weight"
        renamed = {k.replace("blocks.0.", "blocks.9.") if k == key else k: v for k, v in sd.items()}
        with pytest.raises(ValueError, match=rf"missing \(1\): {key}\n  unexpected \(1\): .*blocks\.9\."):
            lora.load_adapter_state_dict(model, renamed)
        with pytest.raises(ValueError, match=rf"wrong shape \(1\): {key}: checkpoint \(8, 256\) vs model \(4, 256\)"):
            lora.load_adapter_state_dict(model, {**sd, key: torch.zeros(8, 256)})
        with pytest.raises(ValueError, match="does not describe this model's 20 adapters"):
            lora.save_adapters(tmp_path / "x", model, lora.adapter_config(8, 8, names))
        with pytest.raises(FileNotFoundError, match="no LoRA adapter folder at .*nowhere"):
            lora.read_adapters(tmp_path / "nowhere")
        lora.save_adapters(tmp_path / "a", model, lora.adapter_config(4, 4, names))
        (tmp_path / "a" / "adapter_model.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder: it lacks adapter_model"):
            lora.read_adapters(tmp_path / "a")
        lora.save_adapters(tmp_path / "a", model, lora.adapter_config(4, 4, names))
        (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
        with pytest.raises(ValueError, match="is not a LoRA adapter config"):
            lora.read_adapters(tmp_path / "a")


LORA_ARGS = ["--trainable", "lora+new", "--lora-rank", "4", "--lora-alpha", "8", "--batch-size", "2",
             "--micro-batch", "2", "--lr", "1e-2", "--export-dtype", "fp32", "--preview-every", "0"]


def lora_base(path):
    """A random backbone (every weight non-zero) in our export layout for TRAIN_ARGS' shapes -> the DiT; written
    to path (a .safetensors whose metadata names its latent channels, as train.py's exports do)."""
    cfg, _ = train.parse_args([*TRAIN_ARGS, "--action-mode", "none"])
    c = train.model_config(cfg, tk.build_tokenizer("pixel", spatial_compression=8).latent_channels)
    base = randomize(M.DiT(c), seed=3, std=0.05)
    save_file(base.state_dict(), str(path), metadata={"model_config": json.dumps(asdict(c))})
    return base.eval()


def lora_inputs(net, seed=0):
    """Inputs for a TRAIN_ARGS-shaped DiT: (x, sigma, text, frame mask, actions)."""
    c, g = net.config, torch.Generator().manual_seed(seed)
    x = torch.randn(2, c.in_channels, 2, 4, 8, generator=g)
    mask = torch.zeros(2, 2)
    mask[:, 0] = 1
    return (x, torch.rand(2, 2, generator=g), torch.randn(2, 3, c.text_dim, generator=g), mask,
            torch.randn(2, c.action_steps, c.action_dim, generator=g))


class TestLoRATraining:
    """--trainable lora+new through train.py, sample.py, evaluate.py and peft: the model is the base at step 0, only
    adapters and new modules get gradients, a resumed run follows the uninterrupted one exactly, and the export (the
    adapters and new modules in PEFT's keys, naming its base) loads unmerged, merged, merged into a full export, and
    into peft, with one output.

        python -m pytest -q test_all.py -k TestLoRATraining
    """

    def test_step_0_is_the_base_and_only_adapters_and_new_modules_get_gradients(self, train_synth, tmp_path,
                                                                              one_rank):
        """Under FSDP2 with the MLP sublayers recomputed in the backward (--ac mlp: the adapted fc1/fc2 inside
        the checkpoint)."""
        base = lora_base(tmp_path / "base.safetensors")
        cfg, _ = train.parse_args([*TRAIN_ARGS, *LORA_ARGS, "--data", str(train_synth), "--init",
                                   str(tmp_path / "base.safetensors"), "--ac", "mlp", "--out", str(tmp_path)])
        t = train.build(cfg, torch.device("cpu"))
        x, sigma, text, mask, actions = lora_inputs(base)
        with torch.no_grad():
            assert torch.equal(t.model(x, sigma, text, mask, actions=actions), base(x, sigma, text, mask))
        names = [n for n, _ in t.model.named_parameters()]
        adapters = [n for n in names if lora.is_lora(n)]
        assert len(adapters) == 2 * 2 * 10  # 2 blocks x (8 attention projections + 2 MLP linears) x (A, B)
        train.micro_step(t, (x, text, actions, None), 0, 0)
        got = {n for n, p in t.model.named_parameters() if p.grad is not None}
        assert got == {n for n in names if lora.is_lora(n) or n.startswith("action_cond.")}, \
            sorted(got ^ {n for n in names if lora.is_lora(n) or n.startswith("action_cond.")})[:5]

    def test_resumed_run_follows_and_its_export_loads_merged_unmerged_and_in_peft(self, train_synth, tmp_path):
        from peft import PeftModel
        base = lora_base(tmp_path / "base.safetensors")
        args = [*LORA_ARGS, "--data", train_synth, "--init", tmp_path / "base.safetensors", "--ac", "full", "--steps",
                4, "--ckpt-every", 2]
        whole = run_train([*args, "--out", tmp_path / "whole"])
        part = run_train([*args, "--out", tmp_path / "part", "--exit-after", 2])
        run_train([*args, "--out", tmp_path / "part", "--resume", part])
        path = whole / "model.safetensors"
        a, b = load_file(str(path)), load_file(str(part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(k.startswith(lora.PREFIX) for k in a) and f"{lora.PREFIX}blocks.0.fc1.weight" not in a
        assert max(a[k].abs().max() for k in a if ".lora_B." in k) > 0  # the adapters learned
        meta = S.read_export_meta(str(path))
        assert meta["base"] == str(tmp_path / "base.safetensors") and meta["lora"]["r"] == 4
        assert meta["lora"]["modules_to_save"] == ["action_cond"] and len(meta["lora"]["target_modules"]) == 20
        x, sigma, text, mask, actions = lora_inputs(base, seed=1)
        out = lambda net: net(x, sigma, text, mask, actions=actions)
        unmerged, _ = lora.load_exported(str(path))
        merged, _ = lora.load_exported(str(path), merged=True)
        assert lora.main(["merge", "--checkpoint", str(path), "--out", str(tmp_path / "merged.safetensors")]) == 0
        full, info = M.load_exported(str(tmp_path / "merged.safetensors"))
        assert not lora.lora_modules(full) and "lora" not in info and not info["base"]
        with torch.no_grad():
            want, base_out = out(unmerged), base(x, sigma, text, mask)
            assert (want - base_out).abs().max() > 1e-3 * base_out.abs().max()  # the adapter changes the output
            for other in (merged, full):
                assert (out(other) - want).abs().max() <= 1e-5 * want.abs().max()
        # peft: the PEFT folder beside the export, on a copy of the backbone with (untrained) DexAC modules
        copy = M.DiT(unmerged.config)
        hub.load_strict(copy, {k: v.clone() for k, v in base.state_dict().items()}, allow_missing=("action_cond.",))
        copy.action_cond.init_weights()
        peft_model = PeftModel.from_pretrained(copy, str(whole / "model_peft")).eval()
        with torch.no_grad():
            assert (out(peft_model) - want).abs().max() <= 1e-5 * want.abs().max()
        assert "adapts a pretrained backbone: give it with --init" in main_error(
            ["--data", train_synth, "--trainable", "lora+new"], tmp_path / "e")
        assert "--lora-rank 0 must be >= 1" in main_error(["--data", train_synth, *args[:-4], "--lora-rank", 0],
                                                          tmp_path / "e")
        for bad, message in ((["--checkpoint", str(path), "--out", str(path)], "give a new .safetensors"),
                             (["--checkpoint", str(tmp_path / "merged.safetensors"), "--out",
                               str(tmp_path / "m2.safetensors")], "not a LoRA export")):
            with pytest.raises(ValueError, match=message):
                lora.main(["merge", *bad])


# =====================================================================================================================
# train.py: one process and torchrun, exact resume, SIGTERM, export, bad input

def main_error(argv, out):
    """The message train.main raises for TRAIN_ARGS plus argv (one step, output under out); `python train.py`
    makes it one line (hub.run_main)."""
    with pytest.raises(Exception) as e:
        train.main([*TRAIN_ARGS, "--steps", "1", "--out", str(out), *map(str, argv)])
    return str(e.value)


def other_layout_stats(train_synth, tmp_path):
    """train_synth's stats.json with another action dimension -> its path."""
    other = json.loads((train_synth / "stats.json").read_text())
    other["layout"]["dim"] = 56
    (tmp_path / "other.json").write_text(json.dumps(other))
    return tmp_path / "other.json"


TRAIN_BAD_ARGS = {  # case -> (flags given train_synth and tmp_path, the message)
    "missing_data": (lambda root, tmp: ["--data", tmp / "missing", "--no-synthetic"],
                     "first encode one into a latent cache there"),
    "ac_every_0": (lambda root, tmp: ["--data", root, "--ac", "mlp", "--ac-every", 0], "--ac-every 0 must be >= 1"),
    "missing_stats": (lambda root, tmp: ["--data", root, "--stats", tmp / "none.json", "--no-synthetic"],
                      "stats file"),
    "stats_of_another_layout": (lambda root, tmp: ["--data", root, "--stats", other_layout_stats(root, tmp)],
                                "another action layout"),
    "height_not_multiple_of_16": (lambda root, tmp: ["--data", root, "--height", 40], "multiples of 16"),
    "batch_not_multiple_of_micro_batch": (lambda root, tmp: ["--data", root, "--batch-size", 3, "--micro-batch", 2],
                                          "multiple of --micro-batch"),
    "resume_without_a_checkpoint": (lambda root, tmp: ["--data", root, "--resume", tmp], "no complete checkpoint"),
}


T24_SMALL = ["--batch-size", 2, "--micro-batch", 2]


@pytest.fixture(scope="module")
def t24_damaged(small_synth, tmp_path_factory):
    """small_synth's copy, indexed intact, then every training video overwritten in place (the index keeps them)."""
    d = tmp_path_factory.mktemp("t24d") / "data"
    shutil.copytree(small_synth, d)
    data.load_index(d)
    data.load_index(d, data.EVAL_SPLITS)
    for f in d.glob("part1/*/*.mp4"):
        with open(f, "r+b") as fh:
            fh.write(bytes(4096))
    return d


def ckpt_meta(ckpt):
    """A checkpoint's meta.json."""
    return json.loads((ckpt / "meta.json").read_text())


TRAIN_BAD_INPUTS = {  # case -> flags given (the root, its damaged copy, a tmp folder)
    "steps_0": lambda r, d, t: ["--data", r, "--steps", 0],
    "batch_negative": lambda r, d, t: ["--data", r, "--batch-size", -4],
    "ema_1": lambda r, d, t: ["--data", r, "--ema", 1.0],
    "lr_nan": lambda r, d, t: ["--data", r, "--lr", "nan"],
    "unknown_device": lambda r, d, t: ["--data", r, "--device", "tpu"],
    "out_is_a_file": lambda r, d, t: ["--data", r, "--out", Path(r) / "stats.json"],
    "resume_nothing": lambda r, d, t: ["--data", r, "--resume", t],
    # the hang cases: the error comes after the loader workers started
    "pixel_compression_3_workers": lambda r, d, t: ["--data", r, "--pixel-compression", 3, "--workers", 2],
    "damaged_after_indexing_workers": lambda r, d, t: ["--data", d, "--workers", 2],
}


class TestTrain:
    """train.py end to end on the CPU: what a run writes, exact resume (also from 2 torchrun ranks onto 1),
    SIGTERM checkpoints, non-finite steps, --init with --trainable new, and one clear error per bad flag."""

    @pytest.mark.slow
    def test_run_writes_everything_and_the_export_loads_samples_and_carries_the_statistics(self, train_synth,
                                                                                           tmp_path):
        """One 3-step run checked several ways: the run directory's files, the kept checkpoint, the metrics
        lines; the export loads in the asked dtype, holds stats.json's statistics bit for bit with their layout,
        holds trained EMA weights, and samples."""
        run_train(["--data", train_synth, "--out", tmp_path / "runs", "--steps", 3, "--batch-size", 2,
                   "--micro-batch", 2, "--ckpt-every", 2, "--keep", 1])
        d = only_run(tmp_path / "runs")
        assert d.name.startswith("000-tiny-dexac")
        for f in ("config.json", "metrics.jsonl", "loss.png", "preview.png", "model.safetensors"):
            assert (d / f).is_file(), f
        assert [c.name for c in (d / "checkpoints").iterdir()] == ["step_0000003"]  # keep 1: step 2 was removed
        line = json.loads(open(d / "metrics.jsonl").readline())
        for key in ("loss", "loss_per_sigma_bin", "grad_norm", "lr", "step_time", "tokens_per_s"):
            assert key in line
        assert len(run_losses(d)) == 3 and all(np.isfinite(run_losses(d)))

        net, info = M.load_exported(d / "model.safetensors", "cpu", torch.float32)
        assert info["step"] == 3 and info["action_layout"] == conditioning.action_layout()
        assert net.patch_embed.weight.dtype == torch.float32  # exported in bf16, loaded as asked
        # the statistics of stats.json are in the weights, bit for bit and with their layout
        stats = json.loads((train_synth / "stats.json").read_text())
        mean, std = net.action_cond.norm.stats()
        assert torch.equal(mean, torch.tensor(stats["mean"], dtype=torch.float32))
        assert torch.equal(std, torch.tensor(stats["std"], dtype=torch.float32))
        assert int(net.action_cond.norm.has_stats) == 1 and std.min() > 0 and mean.abs().max() > 0
        net.action_cond.norm.check_layout(conditioning.action_layout())
        # the EMA weights were trained (the output layer starts at zero) and the model samples
        assert net.final.linear.weight.abs().max() > 0
        c = net.config
        x = torch.randn(1, c.in_channels, 2, 4, 8)
        mask = torch.tensor([[1.0, 0.0]])
        text = torch.zeros(1, 16, c.text_dim)
        actions = torch.randn(1, 4, 57) * std + mean
        fn = lambda z, s: net(z, s, text, mask, actions=actions)
        out = M.sample(fn, torch.randn_like(x), M.shifted_sigmas(3), x_cond=x, frame_mask=mask)
        assert out.shape == x.shape and torch.isfinite(out).all() and torch.equal(out[:, :, 0], x[:, :, 0])

    @pytest.mark.slow
    def test_kill_and_resume_equals_an_uninterrupted_run(self, train_synth, tmp_path):
        """4 steps in one go, and 2 steps, an exit and a resume: the same losses and the same exported weights.
        The resumed checkpoint was moved to another folder and linked back (bench.py path does so when a file
        system holds only one 2B checkpoint): the resume reads it through the link and leaves it there."""
        args = ["--data", train_synth, "--steps", 4, "--batch-size", 2, "--micro-batch", 1, "--ckpt-every", 100]
        run_train([*args, "--out", tmp_path / "a"])
        b = run_train([*args, "--out", tmp_path / "b", "--exit-after", 2])
        assert not (b / "model.safetensors").exists() and (b / "checkpoints" / "step_0000002").is_dir()
        moved = bench.move_checkpoint(b / "checkpoints" / "step_0000002", tmp_path / "ram")
        run_train([*args, "--resume", b])
        assert (b / "checkpoints" / "step_0000002").is_symlink() and (moved / "meta.json").is_file()
        assert (b / "checkpoints" / "step_0000004").is_dir()
        a = only_run(tmp_path / "a")
        assert len(run_losses(a)) == 4 and run_losses(a) == run_losses(b)  # exact: model, optimizer, EMA, data, noise
        ta = M.load_exported(a / "model.safetensors")[0].state_dict()
        tb = M.load_exported(b / "model.safetensors")[0].state_dict()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)

    @pytest.mark.slow
    def test_two_ranks_match_one_and_resume_on_one_rank(self, train_synth, tmp_path):
        """torchrun with 2 gloo ranks x 1 clip == 1 process x 2 accumulated clips (same global batch of 2), and
        the 2-rank checkpoint resumes on 1 rank (DCP resharding) on the same trajectory."""
        args = ["--data", train_synth, "--steps", 3, "--batch-size", 2, "--micro-batch", 1, "--ckpt-every", 100]
        run_train([*args, "--out", tmp_path / "one"])
        run_train([*args, "--out", tmp_path / "two", "--exit-after", 2], nproc=2)
        two = only_run(tmp_path / "two")
        assert json.loads((two / "checkpoints" / "step_0000002" / "meta.json").read_text())["world_size"] == 2
        run_train([*args, "--resume", two])
        l1, l2 = run_losses(only_run(tmp_path / "one")), run_losses(two)
        assert len(l1) == len(l2) == 3
        np.testing.assert_allclose(l2, l1, rtol=1e-5)
        assert len(set(l1)) == 3  # the steps differ, so agreement is not trivial

    @pytest.mark.slow
    def test_sigterm_mid_run_leaves_a_resumable_checkpoint(self, train_synth, tmp_path):
        """SIGTERM to the whole process group, as clusters do: the loader worker ignores it, the trainer finishes
        its step, checkpoints and exits 0; the run then resumes to the end."""
        args = ["--data", train_synth, "--out", tmp_path / "runs", "--batch-size", 2, "--micro-batch", 2,
                "--ckpt-every", 1000]
        p = run_train([*args, "--steps", 1000, "--workers", 1], wait=False)
        deadline = time.time() + 120
        while not list((tmp_path / "runs").glob("*/loss.png")) and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        assert "signal SIGTERM" in out
        d = only_run(tmp_path / "runs")
        (ckpt,) = (d / "checkpoints").iterdir()
        step = json.loads((ckpt / "meta.json").read_text())["step"]
        assert 1 <= step < 1000
        run_train([*args, "--steps", step + 1, "--resume", d])
        assert len(run_losses(d)) == step + 1 and (d / "model.safetensors").is_file()

    def test_unknown_preset_is_an_argparse_error(self, capsys):
        with pytest.raises(SystemExit):
            train.main(["--preset", "nope"])
        assert "invalid choice: 'nope'" in capsys.readouterr().err

    @pytest.mark.parametrize("case", list(TRAIN_BAD_ARGS))
    def test_bad_flag_is_one_clear_error(self, train_synth, tmp_path, case):
        flags, message = TRAIN_BAD_ARGS[case]
        assert message in main_error(flags(train_synth, tmp_path), tmp_path / "err")

    def test_resuming_with_another_configuration_is_refused(self, train_synth, tmp_path):
        run_train(["--data", train_synth, "--out", tmp_path / "runs", "--steps", 1, "--batch-size", 1,
                   "--micro-batch", 1])
        msg = main_error(["--data", train_synth, "--resume", only_run(tmp_path / "runs"), "--action-mode", "mlp",
                          "--batch-size", 1, "--micro-batch", 1], tmp_path / "err")
        assert "another configuration" in msg and "action_mode" in msg

    def test_lr_schedule(self):
        cfg = train.TrainConfig(lr=1.0, warmup=10, steps=110, schedule="cosine", min_lr_ratio=0.1)
        assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
        assert train.lr_at(60, cfg) == pytest.approx(0.55) and train.lr_at(110, cfg) == pytest.approx(0.1)
        assert train.lr_at(500, train.TrainConfig(lr=2.0, warmup=1, schedule="constant")) == 2.0

    def test_every_flag_has_help(self):
        assert all(f.metadata.get("help") for f in train.fields(train.TrainConfig))  # help beside each default

    def test_non_finite_steps_are_skipped_then_stop_the_run(self, train_synth, tmp_path):
        """An absurd lr makes the weights huge after one update: the following losses are not finite, their
        updates are skipped, and the fifth one in a row stops the run with a message (no checkpoint written)."""
        msg = main_error(["--data", train_synth, "--lr", "1e30", "--warmup", 1, "--batch-size", 1, "--micro-batch", 1,
                          "--steps", 20, "--ckpt-every", 1000], tmp_path / "runs")
        assert "non-finite steps in a row" in msg
        d = only_run(tmp_path / "runs")
        assert not list((d / "checkpoints").iterdir())
        assert len(run_losses(d)) >= 5 and not np.isfinite(run_losses(d)[-5:]).any()

    @pytest.mark.slow
    def test_init_loads_the_backbone_and_trainable_new_keeps_it_frozen(self, train_synth, tmp_path):
        """--init: an official-layout checkpoint is loaded on the meta device; --trainable new trains only DexAC
        (zero-initialized outputs become non-zero) and exports the backbone bit for bit."""
        cfg = train.TrainConfig(dim=64, blocks=2, frames=5, tokenizer="wan2.1")
        backbone = M.DiT(train.model_config(cfg, 16))
        for p in backbone.parameters():
            torch.nn.init.normal_(p, std=0.02)
        official = M.state_dict_as(backbone.state_dict(), "official", 2)
        torch.save({f"net.{k}": v for k, v in official.items()}, tmp_path / "backbone.pt")
        d = run_train(["--data", train_synth, "--out", tmp_path / "runs", "--steps", 2, "--batch-size", 1,
                       "--micro-batch", 1, "--tokenizer", "wan2.1", "--init", tmp_path / "backbone.pt",
                       "--trainable", "new", "--export-dtype", "fp32"])
        net, info = M.load_exported(d / "model.safetensors")
        got, want = net.state_dict(), backbone.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("action_cond."))
        zero_at_init = (net.action_cond.glob.to_3d.weight, net.action_cond.local.attn.o.weight)
        assert all(w.abs().max() > 0 for w in zero_at_init)

    def test_training_stream_summarizes_skipped_episodes_each_epoch(self, train_synth, tmp_path, capsys):
        root = tmp_path / "data"
        shutil.copytree(train_synth, root)
        data.load_index(root)  # indexed while intact, then one video is overwritten in place (the index keeps it)
        with open(next(root.glob("part1/*/*.mp4")), "r+b") as f:
            f.write(bytes(4096))
        cfg = replace(train.PRESETS["cpu"], data=str(root), micro_batch=4, frames=5, height=32, width=64, workers=0)
        stream = train.Stream(cfg, rank=0, world=1)
        clips_per_epoch = len(stream.sampler)
        for _ in range(clips_per_epoch // 4 + 1):  # one epoch and the first batch of the next
            stream.next()
        assert f"epoch 0 done: {clips_per_epoch} clips on this rank, 1 unreadable episode(s) skipped" in \
            capsys.readouterr().out
        assert stream.sampler.epoch == 1

    def test_paper_preset_is_the_paper_protocol(self):
        """Every value the paper states (DESIGN.md sections 6-7), and the official recipe's choices."""
        P = train.PRESETS["paper"]
        # 13-frame clips: 1 conditioning + 12 predicted frames, 12 actions, 4 latent frames at 4x compression
        assert P.frames == 13 and tk.TEMPORAL == 4 and tk.latent_frames(P.frames) == 4
        assert train.model_config(P, 16).action_steps == 12
        assert tk.build_tokenizer("pixel").encode(torch.zeros(1, 3, P.frames, 16, 16)).shape[2] == 4
        assert (P.height, P.width) == (288, 512)
        # global batch 64 = 8 GPUs x micro-batch 8, no accumulation
        assert (P.batch_size, P.micro_batch) == (64, 8) and train.check_config(P, 8) == 1
        assert P.epochs == 2 and P.weight_decay == 0.1
        assert isinstance(train.build_optimizer(torch.nn.Linear(2, 2), P), torch.optim.AdamW)
        assert P.model == "cosmos2b" and P.action_mode == "dexac"
        # EgoDex as a latent cache with DINOv3 features: the command the missing-data message names makes it
        assert P.data == "data/egodex-cache" and P.ac == "full" and "--out data/egodex-cache" in train.PAPER_CACHE
        # the official robot/action-cond recipe
        assert P.init == "base/pre-trained" and P.betas == (0.9, 0.999) and P.decay_all
        assert (P.schedule, P.warmup, P.min_lr_ratio, P.decay_steps) == ("linear", 100, 0.4, 400_000)
        assert P.grad_clip == 0.1 and P.text_dropout == 0.2
        # fp32 master weights: not the official pure-bf16 32e-5
        assert P.lr == 2 ** -14.5 < 32e-5
        # sampling as the official action model: UniPC, 35 steps, shift 5 (previews, evaluation, sample.py)
        assert (P.preview_steps, P.shift) == (35, 5.0)
        assert (E.EvalConfig().sampler or S.DEFAULT_SAMPLER["cosmos"], E.EvalConfig().steps) == ("unipc", 35)
        assert (S.parse_args(["--checkpoint", "m"]).sampler or S.DEFAULT_SAMPLER["cosmos"]) == "unipc"

    def test_linear_schedule_by_hand(self):
        cfg = train.TrainConfig(lr=2.0, warmup=10, steps=110, schedule="linear", min_lr_ratio=0.4)
        assert train.lr_at(0, cfg) == pytest.approx(0.2) and train.lr_at(9, cfg) == pytest.approx(2.0)
        assert train.lr_at(10, cfg) == pytest.approx(2.0)
        assert train.lr_at(35, cfg) == pytest.approx(2.0 * (1 - 0.6 * 25 / 100))  # 1.7
        assert train.lr_at(60, cfg) == pytest.approx(1.4)
        assert train.lr_at(110, cfg) == pytest.approx(0.8) and train.lr_at(500, cfg) == pytest.approx(0.8)
        # decay_steps: the horizon is its own, not the run's length
        far = replace(cfg, decay_steps=1010)
        assert train.lr_at(110, far) == pytest.approx(2.0 * (1 - 0.6 * 0.1))  # 1.88
        assert train.lr_at(510, far) == pytest.approx(1.4) and train.lr_at(2000, far) == pytest.approx(0.8)
        # cosine honours decay_steps too; without it, nothing changed
        cos = train.TrainConfig(lr=1.0, warmup=10, steps=110, schedule="cosine", min_lr_ratio=0.1)
        assert train.lr_at(60, cos) == pytest.approx(0.55)
        assert train.lr_at(510, replace(cos, steps=5000, decay_steps=1010)) == pytest.approx(0.55)

    def test_paper_schedule_is_the_official_lambda_linear_scheduler(self):
        """The official LambdaLinearScheduler after its warm-up: f_min + (f_max - f_min) (L - n) / (L - W)."""
        P = train.PRESETS["paper"]
        W, L, f_min = 100, 400_000, 0.4
        for n in (100, 1000, 16_000, 100_000, 200_050, 400_000):
            assert train.lr_at(n, P) / P.lr == pytest.approx(f_min + (1 - f_min) * (L - n) / (L - W))
        assert train.lr_at(16_000, P) / P.lr == pytest.approx(0.976, abs=1e-3)  # the official 16k: barely decays
        assert train.lr_at(99, P) == pytest.approx(P.lr)

    def test_optimizer_groups_betas_and_decay_all(self):
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
        net[2].requires_grad_(False)  # frozen parameters stay out of the optimizer
        matrices, rest = [net[0].weight], [net[0].bias, net[1].weight, net[1].bias]

        def groups(cfg):
            opt = train.build_optimizer(net, cfg)
            return [(g["params"], g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups]

        off = groups(train.TrainConfig())  # the cpu default: matrices only, betas (0.9, 0.99)
        assert [g[0] for g in off] == [matrices, rest]
        assert [g[1:] for g in off] == [(0.1, (0.9, 0.99), 1e-8), (0.0, (0.9, 0.99), 1e-8)]
        on = groups(train.TrainConfig(decay_all=True, betas=(0.9, 0.999), weight_decay=0.05))
        assert [g[0] for g in on] == [matrices, rest]
        assert [g[1:] for g in on] == [(0.05, (0.9, 0.999), 1e-8), (0.05, (0.9, 0.999), 1e-8)]

    def test_betas_flag(self):
        cfg, _ = train.parse_args(["--betas", "0.8", "0.95", "--decay-all", "--schedule", "linear"])
        assert cfg.betas == (0.8, 0.95) and cfg.decay_all and cfg.schedule == "linear"
        assert train.parse_args(["--preset", "paper"])[0] == train.PRESETS["paper"]

    def test_drop_text_rate_zeros_and_untouched(self):
        g = torch.Generator().manual_seed(0)
        text = torch.randn(20_000, 3, 5, generator=g) + 3.0  # no exact zeros
        out = train.drop_text(text, 0.2, torch.Generator().manual_seed(1))
        dropped = (out == 0).all(dim=(1, 2))
        assert abs(dropped.float().mean().item() - 0.2) < 0.012  # 4 standard deviations of a binomial mean
        assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
        assert not torch.signbit(out[dropped]).any()  # +0.0, as zeros are
        assert torch.equal(out[~dropped], text[~dropped])  # kept samples bit for bit
        assert ((out == 0).all(dim=(1, 2)) | (out != 0).all(dim=(1, 2))).all()  # whole samples, never parts
        # the same generator seed draws the same coins; another seed others
        assert torch.equal(train.drop_text(text, 0.2, torch.Generator().manual_seed(1)), out)
        assert not torch.equal(train.drop_text(text, 0.2, torch.Generator().manual_seed(2)), out)
        # the limits, and another dtype
        assert torch.equal(train.drop_text(text, 0.0, torch.Generator().manual_seed(1)), text)
        assert not train.drop_text(text, 1.0, torch.Generator().manual_seed(1)).any()
        bf = train.drop_text(text[:64].bfloat16(), 0.5, torch.Generator().manual_seed(1))
        assert bf.dtype == torch.bfloat16

    def test_micro_step_drops_with_its_own_coins_and_keeps_the_noise(self):
        """micro_step feeds the model drop_text's output for the coins of (seed, step, micro); the noise (hence
        the loss of a text-blind model) is the same at any --text-dropout."""
        seen = []

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(()))

            def forward(self, x, sigma, text, mask, actions=None, image_features=None):
                seen.append(text)
                return x * self.w

        B, T = 64, 2
        x0, text = torch.randn(B, 4, T, 2, 2), torch.randn(B, 3, 5) + 3.0
        mask = torch.zeros(B, T)
        mask[:, 0] = 1

        def loss(rate, seed=3, step=7, micro=2):
            cfg = train.TrainConfig(seed=seed, text_dropout=rate)
            t = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, frame_mask=mask, accum=1,
                                      model=Net(), diffusion=None)
            return train.micro_step(t, (x0, text, None, None), step, micro).loss

        l0, l2 = loss(0.0), loss(0.2)
        assert torch.equal(l0, l2)  # the same noise
        assert torch.equal(seen[0], text)
        coins = torch.Generator().manual_seed(train.noise_seed(3, 7, 2, stream=1))
        assert torch.equal(seen[1], train.drop_text(text, 0.2, coins))
        assert 0 < (seen[1] == 0).all(dim=(1, 2)).sum() < B
        loss(0.2, step=8)  # another step, other coins
        assert not torch.equal(seen[2], seen[1])

    def test_text_dropout_and_epochs_are_checked(self):
        for bad in (dict(text_dropout=1.5), dict(text_dropout=-0.1), dict(epochs=-1)):
            with pytest.raises(train.ConfigError, match="--text-dropout"):
                train.check_config(replace(train.TrainConfig(), **bad), 1)

    def test_epochs_set_the_steps(self, train_synth):
        """4 training episodes of 40 frames, 5-frame clips: 30-frame windows [0, 30) and [30, 40), 2 clips each,
        so 16 clips per epoch; 2 epochs at batch 4 are 8 steps, 0.3 epochs at batch 2 are ceil(2.4) = 3."""
        cfg = train.TrainConfig(data=str(train_synth), frames=5, height=32, width=64)
        _, sampler = data.make_loader(str(train_synth), 1, clip_len=5, size=(32, 64), num_workers=0)
        assert len(list(sampler)) == 16
        assert train.epoch_steps(replace(cfg, epochs=2, batch_size=4)) == 8
        assert train.epoch_steps(replace(cfg, epochs=0.3, batch_size=2)) == 3

    @pytest.mark.slow
    def test_a_run_trains_its_epochs(self, train_synth, tmp_path):
        train.main([*TRAIN_ARGS, "--data", str(train_synth), "--out", str(tmp_path / "runs"), "--epochs", "0.3",
                    "--steps", "1000", "--batch-size", "2", "--micro-batch", "2", "--text-dropout", "0.5"])
        run = only_run(tmp_path / "runs")
        losses = run_losses(run)
        assert len(losses) == 3
        assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3

    @pytest.mark.slow
    def test_resume_takes_the_flags_betas_not_the_checkpoints(self, train_synth, tmp_path):
        """The optimizer state a resume loads carries the checkpoint's betas and weight decay: the flags must win.
        Adam's first update does not depend on the betas, its second does: a resume after step 1 with other betas
        changes the third loss, with the same betas it does not (exact resume)."""
        args = [*TRAIN_ARGS, "--data", str(train_synth), "--steps", "3", "--batch-size", "2", "--micro-batch", "2",
                "--ckpt-every", "100"]
        train.main([*args, "--out", str(tmp_path / "a")])
        train.main([*args, "--out", str(tmp_path / "b"), "--exit-after", "1"])
        b = only_run(tmp_path / "b")
        train.main([*args, "--resume", str(b), "--betas", "0.5", "0.6", "--weight-decay", "0.5"])
        la, lb = run_losses(only_run(tmp_path / "a")), run_losses(b)
        assert len(la) == len(lb) == 3 and la[:2] == lb[:2] and la[2] != lb[2]

    @pytest.mark.slow
    def test_bad_inputs_are_one_line_and_exit_promptly(self, small_synth, t24_damaged, tmp_path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
        procs = {}
        for case, flags in TRAIN_BAD_INPUTS.items():
            argv = [*TRAIN_ARGS, *T24_SMALL, "--steps", 2, "--out", tmp_path / case,
                    *flags(small_synth, t24_damaged, tmp_path)]
            # argparse keeps the last of a repeated flag: the case's own win over TRAIN_ARGS'
            procs[case] = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=HERE, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           start_new_session=True)
        failures = []
        deadline = time.time() + 120
        for case, p in procs.items():
            try:
                out, err = p.communicate(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                failures.append(f"{case}: hung")
                continue
            lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("synth", "indexing", "stats",
                                                                                      "train:", "skipping"))]
            errors = [x for x in lines if x.startswith("error:")]
            if p.returncode == 0 or len(errors) != 1 or "Traceback" in err + out:
                failures.append(f"{case}: rc {p.returncode}, stderr {err[-600:]!r}")
        assert not failures, "\n".join(failures)

    def test_runs_from_before_ac_modes_resume_with_their_setting(self, tmp_path):
        """--ac was a switch: a run saved with ac true/false resumes with 'full'/'none'."""
        for old, new in ((True, "full"), (False, "none")):
            ckpt = tmp_path / str(old) / "checkpoints" / "step_0000010"
            ckpt.mkdir(parents=True)
            (ckpt / "meta.json").write_text(json.dumps({"step": 10, "train_config": {"ac": old, "steps": 20}}))
            assert train.resumed_config(tmp_path / str(old)) == train.TrainConfig(ac=new, steps=20)

    @pytest.mark.parametrize("ac", ["full", "mlp"])
    def test_compiled_blocks_under_fsdp_and_checkpointing_are_one_graph_each(self, one_rank, ac):
        """train.parallelize(compile=...) in torchtitan's order (checkpointing, compile, fully_shard) on one gloo
        rank: every block's body traces as one graph (fullgraph: the fp32 path's FSDP hooks stay outside it,
        or tracing would stop at them), and the loss and gradients equal the eager, unsharded model's
        (aot_eager: dynamo and AOT autograd without inductor's codegen, which the tiny-preset test checks)."""
        model = randomize(M.DiT(action_config("dexac", n_blocks=3)), std=0.05)
        model.action_cond.set_stats(*random_action_stats())
        plain = copy.deepcopy(model)
        torch._dynamo.reset()
        train.parallelize(model, torch.device("cpu"), ac, 2, compile="aot_eager")
        x, sigma, text, mask, actions = action_batch()
        losses = [net(x, sigma, text, mask, actions=actions).square().mean() for net in (plain, model)]
        for loss in losses:
            loss.backward()
        assert abs(losses[1].item() - losses[0].item()) <= 1e-6 * losses[0].item()
        for (name, p), q in zip(plain.named_parameters(), model.parameters()):
            assert torch.allclose(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7), name
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly

    def test_resume_restores_the_runs_configuration(self, small_synth, tmp_path, capsys):
        run_train(["--data", small_synth, "--out", tmp_path, *T24_SMALL, "--steps", 3, "--lr", 3e-4, "--ckpt-every", 1,
                   "--keep", 5, "--exit-after", 2])
        run = only_run(tmp_path)
        capsys.readouterr()
        newest = run / "checkpoints" / "step_0000002" / "meta.json"  # as a version before --backbone wrote it
        meta = json.loads(newest.read_text())
        for k in ("backbone", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout"):
            del meta["train_config"][k]
        newest.write_text(json.dumps(meta))
        train.main(["--resume", str(run)])  # no other flag: the run's steps, lr and cadence, not the preset's
        cfg = json.loads((run / "config.json").read_text())["train"]
        assert (cfg["steps"], cfg["lr"], cfg["ckpt_every"], cfg["keep"]) == (3, 3e-4, 1, 5)
        assert ckpt_meta(run / "checkpoints" / "step_0000003")["step"] == 3 and len(run_losses(run)) == 3
        train.main(["--resume", str(run), "--lr", "1e-4", "--steps", "4"])
        assert "resume: --lr 0.0001 overrides the run's 0.0003" in capsys.readouterr().out

    def test_branch_from_an_older_checkpoint_keeps_it_and_latest_is_the_new_branch(self, small_synth, tmp_path):
        run_train(["--data", small_synth, "--out", tmp_path, *T24_SMALL, "--steps", 4, "--ckpt-every", 1, "--keep", 3])
        run = only_run(tmp_path)
        ckpts = run / "checkpoints"
        assert sorted(c.name for c in ckpts.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]
        train.main(["--resume", str(ckpts / "step_0000002"), "--lr", "5e-4", "--exit-after", "1"])
        names = sorted(c.name for c in ckpts.iterdir())
        assert "step_0000002" in names and "step_0000003" in names and "step_0000003_1" in names
        assert ckpt_meta(ckpts / "step_0000003_1")["parent"] == "step_0000002"
        train.main(["--resume", str(run), "--exit-after", "1"])  # continues the new branch, not step 4's
        newest = train.find_checkpoints(run)[0]
        assert ckpt_meta(newest)["step"] == 4 and ckpt_meta(newest)["parent"] == "step_0000003_1"
        assert ckpt_meta(newest)["train_config"]["lr"] == 5e-4
        assert (ckpts / "step_0000002").is_dir()  # pruning never touches the chosen one

    def test_damaged_newest_checkpoint_falls_back(self, small_synth, tmp_path, capsys):
        run_train(["--data", small_synth, "--out", tmp_path, *T24_SMALL, "--steps", 3, "--ckpt-every", 1,
                   "--exit-after", 2])
        run = only_run(tmp_path)
        (shard,) = (run / "checkpoints" / "step_0000002").glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[:100])
        capsys.readouterr()
        train.main(["--resume", str(run)])
        out = capsys.readouterr().out
        assert "is damaged" in out and "falling back to" in out and "step_0000001" in out
        assert "CheckpointException ranks" not in out  # the reason the shard failed, not DCP's wrapper
        assert "resumed from" in out and "at step 1" in out
        assert (run / "model.safetensors").is_file()

    def test_checkpoint_of_another_model_is_one_error_not_damage(self, small_synth, tmp_path, monkeypatch, capsys):
        """A model with a tensor the checkpoints lack (code changed between attempts, or a parameter that never
        had a gradient, so no optimizer state was saved): one error naming the tensor, no fallback through the
        older checkpoints, which would all fail the same way (it used to call every one of them damaged)."""
        run_train(["--data", small_synth, "--out", tmp_path, *T24_SMALL, "--steps", 3, "--ckpt-every", 1,
                   "--exit-after", 2])
        run = only_run(tmp_path)
        build = train.build_model

        def grown(*args, **kwargs):  # the model code gained a parameter since the checkpoints were written
            model = build(*args, **kwargs)
            model.register_parameter("added", torch.nn.Parameter(torch.zeros(3)))
            return model
        monkeypatch.setattr(train, "build_model", grown)
        capsys.readouterr()
        with pytest.raises(train.ConfigError, match=r"step_0000002 holds no .*added.*which this model has"):
            train.main(["--resume", str(run)])
        assert "falling back" not in capsys.readouterr().out

    def test_export_is_atomic_and_checksummed(self, small_synth, tmp_path, monkeypatch):
        import safetensors.torch
        run = run_train(["--data", small_synth, "--out", tmp_path, *T24_SMALL, "--steps", 1])
        path = run / "model.safetensors"
        before = path.read_bytes()
        M.load_exported(path)
        real = safetensors.torch.save_file

        def dies(tensors, filename, metadata=None):  # a kill in the middle of the write
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", dies)
        with pytest.raises(KeyboardInterrupt):
            train.main(["--resume", str(run), "--steps", "2"])
        monkeypatch.undo()
        assert path.read_bytes() == before
        M.load_exported(path)
        flipped = bytearray(before)
        flipped[-5] ^= 0xFF  # in the weights, past the header
        (tmp_path / "bad.safetensors").write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="damaged export"):
            M.load_exported(tmp_path / "bad.safetensors")
        (tmp_path / "cut.safetensors").write_bytes(before[:500])
        with pytest.raises(ValueError, match="damaged export"):
            M.load_exported(tmp_path / "cut.safetensors")

    def test_run_lock_and_numbering(self, small_synth, tmp_path, capsys):
        out = tmp_path / "runs"
        run_train(["--data", small_synth, "--out", out, *T24_SMALL, "--steps", 1])
        (out / "005-old").mkdir()
        run_train(["--data", small_synth, "--out", out, *T24_SMALL, "--steps", 1])
        assert (out / "006-tiny-dexac-32x64").is_dir()  # one past the highest, never a used number
        import shutil
        shutil.rmtree(out / "005-old")
        run = run_train(["--data", small_synth, "--out", out, *T24_SMALL, "--steps", 1])
        assert run.name.startswith("007-") and not (run / "lock").exists()
        (run / "lock").write_text(str(os.getppid()))  # a live process holds it
        with pytest.raises(train.ConfigError, match="being written by process"):
            train.main([*TRAIN_ARGS, "--resume", str(run), "--steps", "2"])
        (run / "lock").write_text("999999999")  # a dead one
        capsys.readouterr()
        train.main([*TRAIN_ARGS, "--resume", str(run), "--steps", "2"])
        assert "taking over the lock" in capsys.readouterr().out and not (run / "lock").exists()


# =====================================================================================================================
# sample.py: autoregressive rollouts from a model exported by train.py

def rollout(wm, frames, actions, seeds):
    """wm's 2-step rollout of frames under actions, one seed per sample, with empty prompts."""
    return wm.rollout(frames, actions, [""] * len(seeds), seeds, steps=2, progress=False)


@pytest.fixture(scope="module")
def seed0_rollout(exported, train_synth):
    """The exported model rolled out from a real first frame with 30 slightly noisy still actions, seed 0 ->
    (world model, frame, actions for 2 samples, the rollout of the first)."""
    wm = S.WorldModel(str(exported))
    episode = data.load_index(train_synth)[0][0]
    frame = data.load_clip(episode, 0, 1, wm.size)["video"][:, 0].permute(1, 2, 0).numpy()  # (H, W, 3)
    g = np.random.default_rng(0)
    acts = conditioning.still_actions(30)[None] + 1e-3 * g.standard_normal((2, 30, conditioning.ACTION_DIM)).astype(np.float32)
    return wm, frame, acts, rollout(wm, frame[None], acts[:1], [0])


@pytest.fixture
def sample_inputs(train_synth, tmp_path):
    """A grayscale 50x70 first frame, 9 still actions and an episode file -> (image, actions, episode) paths."""
    from PIL import Image
    frame = data.load_clip(data.load_index(train_synth)[0][0], 0, 1, (50, 70))["video"][:, 0]
    Image.fromarray(frame.permute(1, 2, 0).numpy()).convert("L").save(tmp_path / "gray.png")
    np.save(tmp_path / "acts.npy", conditioning.still_actions(9))
    return tmp_path / "gray.png", tmp_path / "acts.npy", sorted(Path(train_synth).glob("part1/*/*.hdf5"))[0]


SAMPLE_BAD_ACTIONS = {  # case -> (the actions file's array, the error sample.py gives for it)
    "wrong_width": (np.zeros((5, 56)), r"must be \(K, 57\)"),
    "one_dim": (np.zeros(57), r"must be \(K, 57\)"),
    "nan": (np.full((5, 57), np.nan), "NaN/inf"),
    "empty": (np.zeros((0, 57)), "no actions"),
}


def bare_checkpoint(tmp):
    """A safetensors file holding one tensor and no metadata -> its path."""
    save_file({"x": torch.zeros(1)}, str(tmp / "bare.safetensors"))
    return str(tmp / "bare.safetensors")


SAMPLE_BAD_ARGS = {  # case -> (argv given the usual flags, the image and actions flags and a folder; the error)
    "unknown_sampler": (lambda base, image_args, tmp: base + image_args + ["--sampler", "heun"],
                        "unknown sampler 'heun'"),
    "checkpoint_without_statistics": (lambda base, image_args, tmp: ["--checkpoint", bare_checkpoint(tmp)] + image_args,
                                      "carries no action statistics"),
    "missing_checkpoint": (lambda base, image_args, tmp: ["--checkpoint", str(tmp / "none.safetensors")] + image_args,
                           "not found"),
}


def dexac_only_export(tmp_path, stats):
    """A DexAC model on a random official-layout backbone, exported by train.export with --trainable new (the
    DexAC modules only, with fake EMA weights) -> (export path, model, EMA weights, the keys in the file)."""
    mcfg = replace(DIT_SMALL, action_mode="dexac", action_steps=4)
    base = randomize(M.DiT(replace(DIT_SMALL)), seed=5)
    official_pt(base, tmp_path / "base.pt")
    model = M.load_dit(str(tmp_path / "base.pt"), mcfg, action_stats=str(stats))
    train.set_trainable(model, "new")
    ema = {n: p.detach() + 0.5 for n, p in model.named_parameters() if p.requires_grad}
    cfg = replace(train.TrainConfig(), trainable="new", init=str(tmp_path / "base.pt"), tokenizer="wan2.1",
                  height=32, width=64, frames=5)
    path = train.export(tmp_path / "model.safetensors", model=model, ema=ema, cfg=cfg, mcfg=mcfg, stats_path=stats,
                        step=7, rank=0, dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return path, model, ema, keys


CARRY_HW = (32, 48)  # the frame size of the carry tests


def tiny_world_model(*, tokenizer="pixel", text=None):
    """A random DexAC DiT of 4 actions per chunk on the pixel tokenizer (compression 2) or a tiny random Wan
    VAE, text mode none unless text=(cache folder, tokens) -> WorldModel."""
    channels = 12 * 2 * 2 if tokenizer == "pixel" else tk.WAN_PRESETS["tiny"].z_dim
    mcfg = replace(DIT_SMALL, in_channels=channels, out_channels=channels, action_mode="dexac", action_steps=4)
    dit = randomize(M.DiT(mcfg), seed=2, std=0.05)
    dit.action_cond.set_stats(torch.zeros(conditioning.ACTION_DIM), torch.ones(conditioning.ACTION_DIM))
    cache, tokens = text or ("", 4)
    info = {"tokenizer": {"name": "pixel", "pixel_compression": 2},
            "text": {"mode": "reason1" if text else "none", "tokens": tokens},
            "train_config": {"height": CARRY_HW[0], "width": CARRY_HW[1], "text_cache": str(cache), "shift": 1.0}}
    wm = S.WorldModel.from_model(dit, info)
    if tokenizer == "wan2.1":
        wm.tokenizer = tk.WanVAE("tiny").eval()
    return wm


def inputs(B=1, K=8, seed=0):
    """Random first frames (B, H, W, 3) uint8 and K slightly noisy still actions (B, K, 57)."""
    g = np.random.default_rng(seed)
    frame = (g.random((B, *CARRY_HW, 3)) * 255).astype(np.uint8)
    acts = conditioning.still_actions(K)[None] + 0.3 * g.standard_normal((B, K, conditioning.ACTION_DIM)).astype(np.float32)
    return frame, acts


def spy_sample(monkeypatch):
    """Record (x_cond, returned x) of every chunk's M.sample call in sample.py -> the list it fills."""
    calls, sample = [], M.sample
    monkeypatch.setattr(S.M, "sample", lambda *a, **k: calls.append((k["x_cond"], sample(*a, **k))) or calls[-1][1])
    return calls


def as_written(wm, x):
    """A chunk's latents -> its frames as the video file holds them, back in [-1, 1] (B, 3, T, H, W)."""
    return S.to_uint8(wm.tokenizer.decode(x)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """A small synthetic root (1 task x 2 + 1 episodes of 20 frames at 64x112) with stats.json."""
    root = tmp_path_factory.mktemp("small_synth") / "data"
    synthetic.write_synthetic(root, tasks=1, episodes=2, test_episodes=1, frames=20, size=(64, 112), workers=0)
    (root / "stats.json").write_text(json.dumps(data.compute_stats(root)))
    return root


@pytest.fixture(scope="module")
def small_export(small_synth, tmp_path_factory):
    """A 2-step tiny DexAC model on 5-frame clips (4 actions per chunk), exported by train.py."""
    out = tmp_path_factory.mktemp("runs17")
    run_train(["--data", small_synth, "--out", out, "--steps", 2, "--batch-size", 2, "--micro-batch", 2])
    return only_run(out) / "model.safetensors"


def semantic_embedder(folder):
    """The TextEmbedder a tiny_world_model(text=(folder, 4)) builds, for its cache paths."""
    return semantic.TextEmbedder("reason1", cache_dir=str(folder), text_dim=DIT_SMALL.text_dim, max_tokens=4)


CLI_TIMEOUT = 120  # seconds: an entry point that takes longer on a bad input hangs


def run_cli(script, argv):
    """script argv as a subprocess -> (returncode, stderr, seconds)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, script, *map(str, argv)], cwd=HERE, capture_output=True, text=True,
                       timeout=CLI_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1", "DEXAC_DEBUG": "0",
                                                 "CUDA_VISIBLE_DEVICES": ""})  # the same answers on a GPU machine
    return p.returncode, p.stderr, time.time() - t0


def assert_one_error(script, argv):
    code, err, seconds = run_cli(script, argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, f"{script} {argv} exited 0:\n{err}"
    assert len(errors) == 1, f"{script} {argv}: want one error line, got:\n{err}"
    assert "Traceback" not in err, err
    assert seconds < CLI_TIMEOUT
    return code, errors[0]


@pytest.fixture(scope="module")
def bad_input_files(exported, tmp_path_factory):
    """A first frame, still actions, an export and damaged copies of it -> {name: path}."""
    d = tmp_path_factory.mktemp("bad_inputs")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(d / "frame.png")
    np.save(d / "acts.npy", conditioning.still_actions(4))
    big = conditioning.still_actions(4).astype(np.float64)
    big[1, 0] = 1e39  # finite in float64, inf in float32
    np.save(d / "huge.npy", big)
    nan = conditioning.still_actions(4)
    nan[2, 5] = np.nan
    np.save(d / "nan.npy", nan)
    (d / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(100))
    raw = Path(exported).read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[:len(raw) // 2])
    save_file({"x": torch.zeros(1)}, str(d / "bare.safetensors"))
    (d / "afile").write_text("not a folder")
    return {"ckpt": str(exported), "image": d / "frame.png", "acts": d / "acts.npy", "huge": d / "huge.npy",
            "nan": d / "nan.npy", "garbage": d / "garbage.safetensors", "truncated": d / "truncated.safetensors",
            "bare": d / "bare.safetensors", "afile": d / "afile", "dir": d}


def sample_argv(f, *extra, ckpt=None, actions="acts"):
    return ["--checkpoint", ckpt or f["ckpt"], "--image", f["image"], "--actions", f[actions], "--steps", "1",
            "--device", "cpu", "--out", f["dir"] / "out", *extra]


SAMPLE_CASES = {  # case -> (argv from the bad_input_files, the error line's words); a subprocess each
    "garbage_checkpoint": (lambda f: sample_argv(f, ckpt=f["garbage"]), "not a readable safetensors"),
    "truncated_checkpoint": (lambda f: sample_argv(f, ckpt=f["truncated"]), "not a readable safetensors"),
    "export_without_metadata": (lambda f: sample_argv(f, ckpt=f["bare"]), "carries no action statistics"),
    "steps_0": (lambda f: sample_argv(f, "--steps", "0"), "--steps"),
    "guidance_without_text": (lambda f: sample_argv(f, "--guidance", "3"), "text mode none"),
    "unknown_device": (lambda f: sample_argv(f, "--device", "tpu9"), "device"),
    "out_is_a_file": (lambda f: sample_argv(f)[:-1] + [f["afile"]], "existing file"),
    "actions_overflow_float32": (lambda f: sample_argv(f, actions="huge"), "overflows float32"),
    "actions_nan": (lambda f: sample_argv(f, actions="nan"), "NaN/inf"),
    "no_first_frame": (lambda f: ["--checkpoint", f["ckpt"], "--actions", f["acts"]], "exactly one of"),
}


def evaluate_argv(f, *extra, ckpt=None):
    return ["--checkpoint", ckpt or f["ckpt"], "--data", f["dir"] / "no-data", "--horizon", "9", "--steps", "1",
            "--device", "cpu", "--out", f["dir"] / "evals", *extra]


EVALUATE_CASES = {
    "steps_0": (lambda f: evaluate_argv(f, "--steps", "0"), "--steps"),
    "horizon_not_4k_plus_1": (lambda f: evaluate_argv(f, "--horizon", "6"), "--horizon"),
    "guidance_without_text": (lambda f: evaluate_argv(f, "--guidance", "2"), "text mode none"),
    "garbage_checkpoint": (lambda f: evaluate_argv(f, ckpt=f["garbage"]), "not a readable safetensors"),
    "out_is_a_file": (lambda f: evaluate_argv(f)[:-1] + [f["afile"]], "existing file"),
    "names_not_one_per_checkpoint": (lambda f: evaluate_argv(f, "--names", "a", "b"), "--names: 2 name(s) for 1"),
    "name_is_a_path": (lambda f: evaluate_argv(f, "--names", "a/b"), "a row name is a folder name"),
    "compare_negative_cond_frames": (lambda f: ["compare", "--pred", f["acts"], "--gt", f["acts"],
                                                "--cond-frames", "-1"], "--cond-frames"),
}


def miniature_argv(f, *extra):
    return ["--out", f["dir"] / "mini", "--data", f["dir"] / "mini-data", "--seeds", "0", "--modes", "mlp",
            "--steps", "1", "--horizon", "9", *extra]


MINIATURE_CASES = {
    "steps_0": (lambda f: miniature_argv(f, "--steps", "0"), "--steps"),
    "unknown_metric": (lambda f: miniature_argv(f, "--metrics", "psnr,fun"), "--metrics"),
    "bad_train_flag_value": (lambda f: miniature_argv(f, "--lr", "fast"), "train.py flag"),
    "irasim_one_sample_step": (lambda f: miniature_argv(f, "--modes", "irasim", "--sample-steps", "1"),
                               "--sample-steps: an IRASim model samples on 2 to 1000"),
    "out_is_a_file": (lambda f: miniature_argv(f)[2:] + ["--out", f["afile"]], "existing file"),
    "device_unknown": (lambda f: miniature_argv(f, "--device", "tpu"), "unknown device"),
    "reference_not_run": (lambda f: miniature_argv(f, "--reference", "mlp-flat"), "--reference"),
    "curve_of_a_variant_not_run": (lambda f: miniature_argv(f, "--curves", "mlp-flat"),
                                   "--curves: mlp-flat not among --modes"),
}


class TestSample:
    """Rollouts from an exported model: length, seeds and batching; the sample command's outputs and input
    checks; DexAC-only exports on their base; DINOv3 features per chunk."""

    def test_quick_psnr_equals_the_metric(self):
        """sample.py prints a per-frame PSNR beside its videos; it is evaluate.py's PSNR, cap included."""
        rng = np.random.default_rng(0)
        gt = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
        video = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
        video[0] = gt[0]  # an identical frame: the 100 dB cap
        want = E.psnr_frames(E.as_unit(torch.from_numpy(video)).permute(0, 3, 1, 2),
                             E.as_unit(torch.from_numpy(gt)).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(S.psnr_per_frame(video, gt), want, rtol=1e-6)
        assert want[0] == E.PSNR_CAP

    def test_rollout_length_and_first_frame(self, seed0_rollout):
        wm, frame, _, one = seed0_rollout
        assert one.shape == (1, 31, *wm.size, 3) and one.dtype == np.uint8  # 30 actions -> 31 frames
        assert np.array_equal(one[0, 0], frame)  # the first frame is the given one (exact pixel tokenizer)

    def test_rollout_seeds(self, seed0_rollout):
        wm, frame, acts, one = seed0_rollout
        assert np.array_equal(rollout(wm, frame[None], acts[:1], [0]), one)  # the same seed twice: identical
        assert not np.array_equal(rollout(wm, frame[None], acts[:1], [1]), one)  # another seed: another sample

    def test_batched_rollout_equals_one_by_one(self, seed0_rollout):
        wm, frame, acts, one = seed0_rollout
        both = rollout(wm, np.stack([frame, frame]), acts, [0, 1])
        alone = np.concatenate([one, rollout(wm, frame[None], acts[1:], [1])])
        assert np.abs(both.astype(int) - alone.astype(int)).max() <= 1  # a batch = one by one (up to rounding)

    def test_sample_command_writes_video_and_preview(self, exported, sample_inputs, tmp_path, capsys):
        image, actions, _ = sample_inputs
        S.main(["--checkpoint", str(exported), "--steps", "2", "--out", str(tmp_path / "out"),
                "--image", str(image), "--actions", str(actions)])
        printed = capsys.readouterr().out
        assert "is L, not RGB" in printed and "resizing" in printed  # notices, not errors
        assert sum(1 for _ in __import__("av").open(str(tmp_path / "out" / "acts.mp4")).decode(video=0)) == 10
        assert (tmp_path / "out" / "acts.png").is_file()

    def test_sample_command_compares_with_the_ground_truth(self, exported, sample_inputs, tmp_path, capsys):
        """An episode as input: ground truth side by side, and PSNR per frame."""
        _, _, episode = sample_inputs
        S.main(["--checkpoint", str(exported), "--steps", "2", "--out", str(tmp_path / "out"),
                "--episode", str(episode), "--num-actions", "8"])
        assert "PSNR per frame" in capsys.readouterr().out
        assert list((tmp_path / "out").glob("*_vs_gt.mp4"))

    @pytest.mark.parametrize("case", list(SAMPLE_BAD_ACTIONS))
    def test_bad_actions_are_caught_before_a_model_is_loaded(self, exported, sample_inputs, tmp_path, monkeypatch,
                                                              case):
        monkeypatch.setattr(M, "load_exported", lambda *a, **k: pytest.fail("loaded a model for a bad input"))
        image, _, _ = sample_inputs
        actions, message = SAMPLE_BAD_ACTIONS[case]
        np.save(tmp_path / f"{case}.npy", actions)
        with pytest.raises(SystemExit, match=message):
            S.main(["--checkpoint", str(exported), "--steps", "2", "--out", str(tmp_path / "out"),
                    "--image", str(image), "--actions", str(tmp_path / f"{case}.npy")])

    @pytest.mark.parametrize("case", list(SAMPLE_BAD_ARGS))
    def test_bad_flags_are_caught_before_a_model_is_loaded(self, exported, sample_inputs, tmp_path, monkeypatch,
                                                            case):
        monkeypatch.setattr(M, "load_exported", lambda *a, **k: pytest.fail("loaded a model for a bad input"))
        image, actions, _ = sample_inputs
        base = ["--checkpoint", str(exported), "--steps", "2", "--out", str(tmp_path / "out")]
        argv, message = SAMPLE_BAD_ARGS[case]
        with pytest.raises(SystemExit, match=message):
            S.main(argv(base, ["--image", str(image), "--actions", str(actions)], tmp_path))

    def test_unreadable_image_is_caught_before_a_model_is_loaded(self, exported, sample_inputs, tmp_path,
                                                                 monkeypatch):
        monkeypatch.setattr(M, "load_exported", lambda *a, **k: pytest.fail("loaded a model for a bad input"))
        _, actions, episode = sample_inputs
        with pytest.raises(SystemExit, match="cannot read the image"):
            S.main(["--checkpoint", str(exported), "--steps", "2", "--out", str(tmp_path / "out"),
                    "--image", str(episode), "--actions", str(actions)])

    def test_dexac_only_export_holds_only_the_new_modules(self, tmp_path, train_synth):
        """--trainable new on a pretrained backbone exports the new modules only, and names the base."""
        path, _, _, keys = dexac_only_export(tmp_path, train_synth / "stats.json")
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert keys and all(k.startswith("action_cond.") for k in keys)  # no backbone tensor in the file
        assert json.loads(meta["base"]) == str(tmp_path / "base.pt")

    def test_dexac_only_export_loads_on_its_base(self, tmp_path, train_synth):
        path, model, ema, _ = dexac_only_export(tmp_path, train_synth / "stats.json")
        loaded, info = M.load_exported(str(path))
        expected = {**model.state_dict(), **ema}
        assert set(loaded.state_dict()) == set(expected)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())

    def test_init_puts_the_dexac_modules_on_another_backbone(self, tmp_path, train_synth):
        """--init: another backbone under the same DexAC modules, and it rolls out."""
        path, model, ema, keys = dexac_only_export(tmp_path, train_synth / "stats.json")
        expected = {**model.state_dict(), **ema}
        other = randomize(M.DiT(replace(DIT_SMALL)), seed=6)
        official_pt(other, tmp_path / "other.pt")
        wm = S.WorldModel(str(path), base=str(tmp_path / "other.pt"))
        assert torch.equal(wm.dit.blocks[0].fc1.weight, other.blocks[0].fc1.weight)
        assert torch.equal(wm.dit.action_cond.state_dict()[keys[0][len("action_cond."):]], expected[keys[0]])
        frame = np.zeros((1, 32, 64, 3), np.uint8)
        video = wm.rollout(frame, conditioning.still_actions(4)[None], [""], [0], steps=1, progress=False)
        assert video.shape == (1, 5, 32, 64, 3)

    def test_dexac_only_export_without_its_base_is_one_clear_error(self, tmp_path, train_synth):
        path, _, _, _ = dexac_only_export(tmp_path, train_synth / "stats.json")
        (tmp_path / "base.pt").unlink()
        with pytest.raises(FileNotFoundError, match="base.pt"):
            M.load_exported(str(path))

    def test_rollout_feeds_dino_features_of_each_chunk_start(self, hf_dino):
        """A model with the semantic branch: DINOv3 sees the given frame for chunk 0, then each chunk's first
        (generated) frame."""
        _, folder = hf_dino
        mcfg = replace(DIT_SMALL, in_channels=12 * 4, out_channels=12 * 4, action_mode="dexac", action_steps=4,
                       semantic_dim=DINO_TINY.dim)
        dit = randomize(M.DiT(mcfg), seed=2, std=0.05)
        dit.action_cond.set_stats(torch.zeros(conditioning.ACTION_DIM), torch.ones(conditioning.ACTION_DIM))
        info = {"tokenizer": {"name": "pixel", "pixel_compression": 2}, "text": {"mode": "none", "tokens": 4},
                "train_config": {"height": 32, "width": 48, "text_cache": "", "shift": 1.0}}
        wm = S.WorldModel.from_model(dit, info, dino=str(folder))
        seen, calls = [], []
        cross_kv, forward = wm.dit.cross_kv, wm.dit.forward
        wm.dit.cross_kv = lambda text, feats: seen.append(feats) or cross_kv(text, feats)
        wm.dit.forward = lambda *a, **k: calls.append(k["kv"] is not None) or forward(*a, **k)
        frame = (np.random.default_rng(0).random((2, 32, 48, 3)) * 255).astype(np.uint8)
        still = np.broadcast_to(conditioning.still_actions(8), (2, 8, conditioning.ACTION_DIM))
        video = wm.rollout(frame, still, ["", ""], [0, 1], steps=2, progress=False)
        assert video.shape == (2, 9, 32, 48, 3) and len(seen) == 2 and calls == [True] * 4  # per chunk, not step
        expected = semantic.conditioning_features(wm.dino, torch.from_numpy(frame).permute(0, 3, 1, 2) / 127.5 - 1)
        assert seen[0].shape == (2, 6, DINO_TINY.dim) and torch.allclose(seen[0], expected, atol=1e-5)
        assert not torch.allclose(seen[1], seen[0])
        generated = torch.from_numpy(video[:, 4]).permute(0, 3, 1, 2).float() / 127.5 - 1  # chunk 1's first frame
        again = semantic.conditioning_features(wm.dino, generated)  # the frame as written: rounded to uint8
        assert ((seen[1] - again).norm() / again.norm()).item() < 0.02

    @pytest.mark.parametrize("tokenizer", ["pixel", "wan2.1"])
    def test_second_chunk_starts_on_the_reencoded_uint8_last_frame(self, monkeypatch, tokenizer):
        """carry reencode (the default): chunk 2's held latent is the encoding, alone, of chunk 1's last frame
        decoded and quantized to uint8 as the file holds it; not the carried latent, not the unquantized
        frame's encoding. The video is the chunks' decodes (chunk 2 without its first frame)."""
        wm = tiny_world_model(tokenizer=tokenizer)
        calls = spy_sample(monkeypatch)
        frame, acts = inputs()
        video = wm.rollout(frame, acts, [""], [0], steps=2, progress=False)
        (cond1, x1), (cond2, x2) = calls
        want = wm.tokenizer.encode(as_written(wm, x1)[:, :, -1:])
        assert torch.equal(cond2[:, :, :1], want)
        assert not torch.allclose(cond2[:, :, :1], x1[:, :, -1:], atol=1e-3)  # not the carried latent
        unquantized = wm.tokenizer.encode(wm.tokenizer.decode(x1)[:, :, -1:])
        assert not torch.equal(cond2[:, :, :1], unquantized)  # the uint8 step is taken
        chunk1, chunk2 = S.to_uint8(wm.tokenizer.decode(x1)), S.to_uint8(wm.tokenizer.decode(x2))
        assert video.shape == (1, 9, *CARRY_HW, 3)
        assert np.array_equal(video, torch.cat([chunk1, chunk2[:, 1:]], 1).numpy())
        if tokenizer == "pixel":  # exact round trip: chunk 2's first frame is chunk 1's last, as written
            assert torch.equal(chunk2[:, 0], chunk1[:, -1])
            assert np.array_equal(video[0, 0], frame[0])

    def test_latent_carry_holds_the_last_latent_frame(self, monkeypatch):
        wm = tiny_world_model()
        calls = spy_sample(monkeypatch)
        frame, acts = inputs()
        video, z = wm.rollout(frame, acts, [""], [0], steps=2, progress=False, carry="latent", return_latents=True)
        (cond1, x1), (cond2, x2) = calls
        assert torch.equal(cond2[:, :, :1], x1[:, :, -1:])
        assert np.array_equal(video, S.to_uint8(wm.tokenizer.decode(z)).numpy())  # one decode from the start
        reencoded = wm.rollout(frame, acts, [""], [0], steps=2, progress=False)
        assert np.array_equal(reencoded[:, :5], video[:, :5])  # chunk 1 alike
        assert not np.array_equal(reencoded[:, 5:], video[:, 5:])  # the two modes tell apart from chunk 2 on

    def test_reencode_decodes_each_chunk_alone(self, monkeypatch):
        """The cost stays linear: every decode is one chunk's 1 + 1 latent frames, every encode one frame."""
        wm = tiny_world_model(tokenizer="wan2.1")
        shapes = {"encode": [], "decode": []}
        for name in shapes:
            fn = getattr(wm.tokenizer, name)
            monkeypatch.setattr(wm.tokenizer, name, lambda x, fn=fn, name=name: shapes[name].append(x.shape[2])
                                or fn(x))
        frame, acts = inputs(K=12)
        wm.rollout(frame, acts, [""], [0], steps=1, progress=False)
        assert shapes == {"encode": [1, 1, 1], "decode": [2, 2, 2]}  # 3 chunks; no re-encode after the last

    def test_unknown_carry_is_one_clear_error(self):
        wm = tiny_world_model()
        frame, acts = inputs()
        with pytest.raises(ValueError, match="unknown carry 'pixels'"):
            wm.rollout(frame, acts, [""], [0], steps=1, progress=False, carry="pixels")

    def test_sample_flags(self):
        args = S.parse_args(["--checkpoint", "m.safetensors"])
        assert args.carry == "reencode" and args.negative_prompt is None
        args = S.parse_args(["--checkpoint", "m", "--carry", "latent", "--negative-prompt", "blurry"])
        assert args.carry == "latent" and args.negative_prompt == "blurry"
        with pytest.raises(SystemExit):
            S.parse_args(["--checkpoint", "m", "--carry", "pixels"])

    @pytest.mark.parametrize("negative", [None, "static, blurry"])
    def test_unconditional_branch_sees_the_negative_prompt(self, tmp_path, negative):
        """With guidance the DiT sees [prompts; negative prompt's embedding] (the null one without a negative
        prompt); without guidance the prompts only."""
        embedder = semantic_embedder(tmp_path)
        emb = {p: torch.randn(4, DIT_SMALL.text_dim, generator=torch.Generator().manual_seed(i))
               for i, p in enumerate(["", "open the jar", "static, blurry"])}
        for p, e in emb.items():
            save_file({"embedding": e}, embedder.cache_path(p))
        wm = tiny_world_model(text=(tmp_path, 4))
        seen, cross_kv = [], wm.dit.cross_kv
        wm.dit.cross_kv = lambda text, feats: seen.append(text) or cross_kv(text, feats)  # once per chunk
        frame, acts = inputs(B=2, K=4)
        wm.rollout(frame, acts, ["open the jar"] * 2, [0, 1], steps=2, guidance=3.0, negative_prompt=negative,
                   progress=False)
        uncond = emb["" if negative is None else negative]
        assert len(seen) == 1 and all(t.shape == (4, 4, DIT_SMALL.text_dim) for t in seen)
        for t in seen:
            assert torch.equal(t[:2], emb["open the jar"].expand(2, -1, -1))
            assert torch.equal(t[2:], uncond.expand(2, -1, -1))
        seen.clear()
        wm.rollout(frame, acts, ["open the jar"] * 2, [0, 1], steps=1, negative_prompt=negative, progress=False)
        assert seen[0].shape == (2, 4, DIT_SMALL.text_dim)  # guidance 0: no unconditional branch

    def test_cached_kv_and_batched_guidance_give_the_plain_rollout(self, tmp_path):
        """The rollout's velocity (cross-attention keys/values once per chunk, both guidance branches in one
        batch) against the plain one written here: text and DINOv3 features through the DiT at every step, the
        conditional and unconditional branches as two forwards, v_c + g (v_c - v_u). Same seed, two chunks
        carried as latents, DexAC and DINOv3 on: latents within 1e-5 of their largest value (float32 batching
        reorders sums; guidance multiplies the difference), frames within 1 level."""
        embedder = semantic_embedder(tmp_path)
        for i, p in enumerate(["", "open the jar"]):
            save_file({"embedding": torch.randn(4, DIT_SMALL.text_dim, generator=torch.Generator().manual_seed(i))},
                      embedder.cache_path(p))
        mcfg = replace(DIT_SMALL, in_channels=48, out_channels=48, action_mode="dexac", action_steps=4,
                       semantic_dim=DINO_TINY.dim)
        dit = randomize(M.DiT(mcfg), seed=2, std=0.05)
        dit.action_cond.set_stats(torch.zeros(conditioning.ACTION_DIM), torch.ones(conditioning.ACTION_DIM))
        info = {"tokenizer": {"name": "pixel", "pixel_compression": 2}, "text": {"mode": "reason1", "tokens": 4},
                "train_config": {"height": CARRY_HW[0], "width": CARRY_HW[1], "text_cache": str(tmp_path),
                                 "shift": 1.0}}
        wm = S.WorldModel.from_model(dit, info, dino=randomize(semantic.DinoV3(DINO_TINY), std=0.05))
        frame, acts = inputs(B=2, K=8)

        def plain(text, actions, frame_mask, *, guidance, feats=None, bar=None):
            def v(x, sigma):
                run = lambda t: wm.dit(x, sigma, t, frame_mask, actions=actions, image_features=feats)
                if not guidance:
                    return run(text)
                v_c, v_u = run(text[:len(x)]), run(text[len(x):])
                return v_c + guidance * (v_c - v_u)
            return v

        for guidance in (0.0, 3.0):
            roll = lambda: wm.rollout(frame, acts, ["open the jar"] * 2, [0, 1], steps=3, guidance=guidance,
                                      carry="latent", progress=False, return_latents=True)
            fast = roll()
            wm.velocity_fn = plain
            slow = roll()
            del wm.velocity_fn
            assert (fast[1] - slow[1]).abs().max() < 1e-5 * fast[1].abs().max()
            assert np.abs(fast[0].astype(int) - slow[0].astype(int)).max() <= 1

    def test_negative_prompt_changes_a_guided_rollout(self, tmp_path):
        embedder = semantic_embedder(tmp_path)
        for i, p in enumerate(["", "open the jar", "static"]):
            save_file({"embedding": torch.randn(4, DIT_SMALL.text_dim, generator=torch.Generator().manual_seed(i))},
                      embedder.cache_path(p))
        wm = tiny_world_model(text=(tmp_path, 4))
        frame, acts = inputs(K=4)
        run = lambda **k: wm.rollout(frame, acts, ["open the jar"], [0], steps=2, progress=False, **k)
        assert not np.array_equal(run(guidance=3.0), run(guidance=3.0, negative_prompt="static"))
        assert np.array_equal(run(), run(negative_prompt="static"))  # no guidance: no effect

    def test_evaluate_records_the_carry(self, small_synth, small_export, tmp_path, monkeypatch):
        """Default reencode, in the rollouts, each row's settings.json, report.json and table.md; kept clips of
        another carry are not mixed in."""
        carries = []
        rollout = S.WorldModel.rollout
        monkeypatch.setattr(S.WorldModel, "rollout", lambda self, *a, **k: carries.append(k["carry"]) or
                            rollout(self, *a, **k))
        argv = ["--checkpoint", str(small_export), "--data", str(small_synth), "--horizon", "9", "--steps", "1",
                "--metrics", "psnr,latent_l2", "--clips", "2", "--batch", "2", "--figure-clips", "0"]
        for carry, out in ((None, tmp_path / "a"), ("latent", tmp_path / "b")):
            assert E.main([*argv, "--out", str(out), *(["--carry", carry] if carry else [])]) == 0
            want = carry or "reencode"
            assert carries == [want]
            carries.clear()
            row = E.row_name(small_export, False)
            assert json.loads((out / row / "settings.json").read_text())["carry"] == want
            assert json.loads((out / "report.json").read_text())["config"]["carry"] == want
            assert f"carry {want}: {S.CARRIES[want]}" in (out / "table.md").read_text().splitlines()[0]
        with pytest.raises(ValueError, match="other settings"):
            E.main([*argv, "--out", str(tmp_path / "a"), "--carry", "latent"])

    def test_runs_of_one_folder_name_are_told_apart_by_names(self, small_synth, small_export, tmp_path):
        """Variants of one action mode train into same-named run folders (miniature.py's dexac, dexac-x200...):
        as rows they collide unless --names names them; named, each row holds its own model's clips."""
        runs = []
        for variant in ("dexac", "dexac-x200"):
            (tmp_path / variant / "000-tiny-dexac").mkdir(parents=True)
            runs.append(tmp_path / variant / "000-tiny-dexac" / "model.safetensors")
            shutil.copy(small_export, runs[-1])
        argv = ["--checkpoint", *map(str, runs), "--data", str(small_synth), "--horizon", "5", "--steps", "1",
                "--metrics", "psnr", "--clips", "2", "--batch", "2", "--figure-clips", "0", "--device", "cpu",
                "--out", str(tmp_path / "evals")]
        with pytest.raises(ValueError, match="two checkpoints give the row name '000-tiny-dexac'"):
            E.main(argv)
        with pytest.raises(ValueError, match="give each row its own name"):
            E.main([*argv, "--names", "x", "x"])
        assert E.main([*argv, "--names", "dexac", "dexac-x200", "--shuffle-actions"]) == 0
        report = json.loads((tmp_path / "evals" / "report.json").read_text())
        assert list(report["rows"]) == ["dexac (shuffled actions)", "dexac-x200 (shuffled actions)"]
        for variant, run in zip(("dexac", "dexac-x200"), runs):
            d = tmp_path / "evals" / f"{variant} (shuffled actions)"
            assert json.loads((d / "settings.json").read_text())["checkpoint"] == str(run)
            assert len(list((d / "clips").glob("*.json"))) == 2

    def test_evaluate_flags_carry_and_solvers_of_the_model(self, monkeypatch):
        """--carry defaults to reencode; --sampler offers model.SOLVERS, a solver added there included."""
        configs = []
        monkeypatch.setattr(E, "protocol", configs.append)
        monkeypatch.setattr(M, "SOLVERS", (*M.SOLVERS, "newsolver"))
        assert E.main(["--checkpoint", "m", "--sampler", "newsolver"]) == 0
        assert configs[0].sampler == "newsolver" and configs[0].carry == "reencode"
        assert configs[0].negative_prompt is None
        E.main(["--checkpoint", "m", "--carry", "latent", "--negative-prompt", "static"])
        assert configs[1].carry == "latent" and configs[1].negative_prompt == "static"
        with pytest.raises(SystemExit):
            E.main(["--checkpoint", "m", "--carry", "pixels"])

    # issue 24: one error line per bad input, before any work; images of every mode; non-finite rollouts

    @pytest.mark.parametrize("case", list(SAMPLE_CASES))
    def test_sample_bad_input_is_one_error_line(self, bad_input_files, case):
        argv, words = SAMPLE_CASES[case]
        _, line = assert_one_error("sample.py", argv(bad_input_files))
        assert words in line, line
        assert not (bad_input_files["dir"] / "out").exists()  # refused before the output is made

    @pytest.mark.parametrize("case", list(EVALUATE_CASES))
    def test_evaluate_bad_input_is_one_error_line(self, bad_input_files, case):
        argv, words = EVALUATE_CASES[case]
        _, line = assert_one_error("evaluate.py", argv(bad_input_files))
        assert words in line, line

    @pytest.mark.parametrize("case", list(MINIATURE_CASES))
    def test_miniature_bad_input_is_one_error_line(self, bad_input_files, case):
        argv, words = MINIATURE_CASES[case]
        _, line = assert_one_error("miniature.py", argv(bad_input_files))
        assert words in line, line
        assert not (bad_input_files["dir"] / "mini-data").exists()  # refused before the dataset is written

    def test_usage_errors_exit_2_runtime_errors_exit_1(self, bad_input_files):
        assert assert_one_error("sample.py", sample_argv(bad_input_files, "--steps", "0"))[0] == 2
        assert assert_one_error("sample.py", sample_argv(bad_input_files, ckpt=bad_input_files["garbage"]))[0] == 1

    def test_miniature_refuses_a_cached_model_of_other_settings(self, bad_input_files, tmp_path):
        """A run folder without recorded settings, or with other ones, is refused before anything trains."""
        run = tmp_path / "mini" / "seed0" / "mlp" / "000-tiny"
        run.mkdir(parents=True)
        (run / "model.safetensors").write_bytes(b"")
        argv = ["--out", tmp_path / "mini", "--data", tmp_path / "data", "--seeds", "0", "--modes", "mlp",
                "--steps", "5", "--horizon", "9"]
        _, line = assert_one_error("miniature.py", argv)
        assert "not recorded" in line
        ns = type("Args", (), {"out": str(tmp_path / "mini"), "data": str(tmp_path / "data"), "steps": 7,
                                "train_args": []})()
        (run.parent / "settings.json").write_text(json.dumps({"train_argv": miniature.train_argv("mlp", 0, ns)}))
        _, line = assert_one_error("miniature.py", argv)  # --steps 5 now, 7 recorded
        assert "other settings" in line and "--steps" in line
        assert not (tmp_path / "data").exists()
        miniature.check_cached("mlp", 0, ns)  # the same settings: reused

    # --- images of every mode -> uint8 RGB

    def test_16bit_png(self, tmp_path):
        x = (np.arange(24 * 40).reshape(24, 40) * 68).astype(np.uint16)  # 0 .. 65212
        Image.fromarray(x).save(tmp_path / "a.png")
        rgb = S.load_image(tmp_path / "a.png", (24, 40))
        assert rgb.dtype == np.uint8 and rgb.shape == (24, 40, 3)
        np.testing.assert_array_equal(rgb[..., 0], np.round(x / 257).astype(np.uint8))
        assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.max() > 250

    def test_float_tiff(self, tmp_path):
        x = np.linspace(0, 1, 24 * 40, dtype=np.float32).reshape(24, 40)
        Image.fromarray(x, mode="F").save(tmp_path / "a.tif")
        rgb = S.load_image(tmp_path / "a.tif", (24, 40))
        np.testing.assert_array_equal(rgb[..., 1], np.round(x.astype(np.float64) * 255).astype(np.uint8))
        assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255

    def test_float_image_out_of_range_is_refused(self, tmp_path):
        Image.fromarray(np.full((8, 8), 1e4, np.float32), mode="F").save(tmp_path / "a.tif")
        with pytest.raises(ValueError, match="save it as 8-bit RGB"):
            S.load_image(tmp_path / "a.tif", (8, 8))

    def test_rgba_png_composited_on_black(self, tmp_path):
        x = np.zeros((16, 32, 4), np.uint8)
        x[..., :3] = (200, 100, 50)
        x[:, :8, 3] = 255  # opaque
        x[:, 8:16, 3] = 128  # half
        Image.fromarray(x, "RGBA").save(tmp_path / "a.png")  # the rest: transparent
        rgb = S.load_image(tmp_path / "a.png", (16, 32))
        assert tuple(rgb[0, 0]) == (200, 100, 50)
        assert np.abs(rgb[0, 10].astype(int) - (100, 50, 25)).max() <= 1
        assert tuple(rgb[0, 20]) == (0, 0, 0)

    def test_palette_png(self, tmp_path):
        img = Image.fromarray(np.full((16, 32, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
        img.save(tmp_path / "a.png")
        assert tuple(S.load_image(tmp_path / "a.png", (16, 32))[3, 3]) == (10, 200, 30)

    def test_exif_rotated_jpeg(self, tmp_path):
        x = np.zeros((24, 40, 3), np.uint8)  # stored landscape: the left half red
        x[:, :20] = (255, 0, 0)
        img = Image.fromarray(x)
        exif = img.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
        img.save(tmp_path / "a.jpg", exif=exif, quality=95)
        rgb = S.load_image(tmp_path / "a.jpg", (40, 24))  # viewed: portrait, no resize
        assert rgb.shape == (40, 24, 3)
        assert rgb[5, 12, 0] > 200 and rgb[5, 12, 1] < 50  # the stored left half is the viewed top
        assert rgb[35, 12, 0] < 50

    # --- non-finite rollouts, actions beyond the statistics

    def test_nonfinite_rollout_names_chunk_and_step(self):
        wm = tiny_world_model()
        with torch.no_grad():
            for p in wm.dit.parameters():
                p.fill_(float("nan"))
        frame = np.zeros((2, 32, 48, 3), np.uint8)
        with pytest.raises(S.NonFiniteRollout, match=r"chunk 1 of 2 at sampler step 1") as e:
            wm.rollout(frame, np.broadcast_to(conditioning.still_actions(8), (2, 8, 57)), ["", ""], [0, 1], steps=3,
                       progress=False)
        assert e.value.samples == (0, 1)

    def test_evaluate_names_the_clip_of_a_nonfinite_rollout(self, exported, train_synth, tmp_path, monkeypatch):
        real = M.load_exported

        def poisoned(*a, **k):
            dit, info = real(*a, **k)
            with torch.no_grad():
                for p in dit.parameters():
                    p.fill_(float("nan"))
            return dit, info
        monkeypatch.setattr(M, "load_exported", poisoned)
        with pytest.raises(S.NonFiniteRollout, match=r"clip 0 \(.*non-finite.*chunk 1"):
            E.main(["--checkpoint", str(exported), "--data", str(train_synth), "--horizon", "5", "--steps", "1",
                    "--metrics", "psnr", "--clips", "1", "--out", str(tmp_path / "ev"), "--device", "cpu"])
        assert not list((tmp_path / "ev").rglob("0000*.json"))  # no row scored

    def test_nan_predictions_are_not_scored(self):
        pred = torch.full((1, 3, 2, 8, 8), float("nan"))
        with pytest.raises(ValueError, match="NaN/inf"):
            E.as_unit(pred, "pred")

    def test_actions_overflowing_float32_are_refused(self):
        a = conditioning.still_actions(3).astype(np.float64)
        a[0, 0] = -1e39
        with pytest.raises(ValueError, match="overflows float32"):
            S.check_actions(a)

    def test_far_actions_warn(self, capsys):
        wm = tiny_world_model()  # statistics: mean 0, std 1
        frame = np.zeros((1, 32, 48, 3), np.uint8)
        acts = conditioning.still_actions(4)[None].copy()
        wm.rollout(frame, acts, [""], [0], steps=1, progress=False)
        assert "warning" not in capsys.readouterr().err
        acts[0, 1, 3] = 500.0
        wm.rollout(frame, acts, [""], [0], steps=1, progress=False)
        err = capsys.readouterr().err
        assert "warning:" in err and "stds from the training statistics" in err and conditioning.ACTION_NAMES[3] in err


# =====================================================================================================================
# evaluate.py: metrics against references (lpips, scikit-image, scipy), known answers, weights, PCK, the protocol

def eval_videos(seed=0, B=2, T=4, H=24, W=32, noise=0.1):
    """A random ground truth in [0, 1] and a noisy prediction, (B, 3, T, H, W) float64."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(B, 3, T, H, W, generator=g, dtype=torch.float64)
    return (gt + noise * torch.randn(gt.shape, generator=g, dtype=torch.float64)).clamp(0, 1), gt


def eval_frames(v):
    """(B, 3, T, H, W) videos -> (B*T, 3, H, W) frames."""
    return v.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W)


def ssim_by_hand(x, y):
    """SSIM of two (H, W) images, every valid 11x11 window weighted explicitly (no separable filters)."""
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    win = lambda a: np.lib.stride_tricks.sliding_window_view(a, (11, 11))  # (H-10, W-10, 11, 11)
    mean = lambda a: (win(a) * w).sum((-2, -1))
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()


ALEX_CONVS = ((0, 4, 2, True), (3, 1, 2, True), (6, 1, 1, False), (8, 1, 1, False), (10, 1, 1, False))
# ^ AlexNet's convolutions in LPIPS: torchvision feature index, stride, padding, max-pool after the ReLU


def lpips_by_hand(w, x, y):
    """LPIPS v0.1 from the weight dict with functional ops (runs where the lpips package is missing).
    ALEX_CONVS: torchvision feature index, stride, padding, max-pool after the ReLU."""
    shift, scale = torch.tensor([-.030, -.088, -.188]), torch.tensor([.458, .448, .450])

    def relus(h):
        h, out = (h - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1), []
        for i, stride, pad, pool in ALEX_CONVS:
            h = torch.relu(F.conv2d(h, w[f"features.{i}.weight"], w[f"features.{i}.bias"], stride, pad))
            out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
            h = F.max_pool2d(h, 3, 2) if pool else h
        return out

    return sum(((a - b) ** 2 * w[f"heads.{i}.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
               for i, (a, b) in enumerate(zip(relus(x), relus(y))))


@pytest.fixture
def lpips_net(tmp_path):
    """LPIPS loaded from random weights in the official layouts -> (net, the weights under our keys)."""
    alex, heads, expected = lpips_files(tmp_path)
    return E.load_lpips(alex, heads), expected


def random_cov(rng, d, rank=None):
    """A random d x d covariance matrix, of the given rank (full by default)."""
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


class StandInInception(nn.Module):
    """The call signature of inception-2015-12-05.pt; features: the per-channel means of what it is fed
    (so the input scale is visible) and a fixed random projection of a pooled image."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 13)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.shape[2] == 299 and img.shape[3] == 299 and return_features
        pooled = F.adaptive_avg_pool2d(img / 255, 4).flatten(1)
        return torch.cat([img.mean((2, 3)), self.proj(pooled)], 1)


class StandInI3D(nn.Module):
    """StyleGAN-V's i3d_torchscript.pt call signature; features: per-channel min, max and mean over time and
    space, and a random projection of a pooled clip."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 16, 7)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert x.shape[3] == 224 and x.shape[4] == 224 and not rescale and not resize and return_features
        pooled = F.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1)
        return torch.cat([x.amin((2, 3, 4)), x.amax((2, 3, 4)), x.mean((2, 3, 4)), self.proj(pooled)], 1)


@pytest.fixture(scope="module")
def metric_nets(tmp_path_factory):
    """Stand-ins for the Inception and I3D TorchScript files, and a plain I3D, saved -> (inception, i3d, folder)."""
    folder = tmp_path_factory.mktemp("metric_nets")
    torch.manual_seed(0)
    torch.jit.script(StandInInception()).save(str(folder / "inception-2015-12-05.pt"))
    torch.jit.script(StandInI3D()).save(str(folder / "i3d_torchscript.pt"))
    torch.jit.script(PlainI3D()).save(str(folder / "i3d_plain.pt"))
    return E.load_torchscript("inception", folder), E.load_torchscript("i3d_stylegan", folder), folder


def fid_fvd_report(metric_nets, same):
    """FID and FVD of 6 noisy clips against their ground truth, or of the ground truth against itself."""
    inception, i3d, _ = metric_nets
    pred, gt = eval_videos(3, B=6, T=4, H=36, W=64, noise=0.3)
    ev = E.Evaluator(("fid", "fvd_stylegan"), inception=inception, i3d_stylegan=i3d)
    ev.add(gt if same else pred, gt)
    return ev.report()


def torchscript_as_state_dict(tmp_path):
    """A TorchScript file given where a state dict is expected."""
    _, heads, _ = lpips_files(tmp_path)
    torch.jit.script(PlainI3D()).save(str(tmp_path / "script.pt"))
    E.load_lpips(alexnet=tmp_path / "script.pt", heads=heads)


def state_dict_as_torchscript(tmp_path):
    """A state dict given where a TorchScript file is expected."""
    _, heads, _ = lpips_files(tmp_path)
    E.load_torchscript("inception", heads)


WRONG_WEIGHTS = {  # case -> (call on tmp_path, exception, message)
    "state_dict_for_torchscript": (state_dict_as_torchscript, E.WeightsError, "not a TorchScript file"),
    "torchscript_for_state_dict": (torchscript_as_state_dict, E.WeightsError, "not a state dict"),
    "no_lpips_network": (lambda tmp_path: E.Evaluator(("psnr", "lpips")), ValueError, "lpips needs its network"),
}


@pytest.fixture(scope="module")
def eval_synth_clip(tmp_path_factory):
    """A 13-frame clip of a synthetic test episode at the source size, 180x320."""
    root = synthetic.write_synthetic(tmp_path_factory.mktemp("synth"), tasks=1, episodes=0, test_episodes=1,
                                frames=14, workers=0)
    h5 = next((root / "test").glob("*/0.hdf5"))
    return data.load_clip(data.Episode("test/x/0", str(h5), 14, "egodex"), 0, 13, size=None)


def compare_folders(tmp_path, clip):
    """pred/ and gt/ folders holding the clip as .npy (0-255 and 0-1) and as lossless .mp4 -> (pred, gt)."""
    gt = clip["video"].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir()
    np.save(tmp_path / "gt" / "a.npy", gt)
    np.save(tmp_path / "pred" / "a.npy", gt.astype(np.float32) / 255)
    data.write_video(tmp_path / "gt" / "b.mp4", gt, crf=0)
    data.write_video(tmp_path / "pred" / "b.mp4", gt, crf=0)
    return tmp_path / "pred", tmp_path / "gt"


@pytest.fixture(scope="module")
def protocol_run(exported, train_synth, tmp_path_factory):
    """The evaluation protocol run on two rows holding the same exported weights ->
    (argv, {row: checkpoint}, output folder, clip plan, report rows)."""
    tmp = tmp_path_factory.mktemp("protocol")
    rows = {}
    for name in ("dexac-a", "dexac-b"):  # the same weights twice: two rows that must agree exactly
        (tmp / name).mkdir()
        shutil.copy(exported, tmp / name / "model.safetensors")
        rows[name] = str(tmp / name / "model.safetensors")
    out = tmp / "eval"
    argv = ["--checkpoint", *rows.values(), "--data", str(train_synth), "--horizon", "9", "--steps", "2",
            "--metrics", "psnr,ssim,latent_l2,pck", "--batch", "2", "--out", str(out), "--figure-clips", "2"]
    episodes, plan = E.eval_plan(train_synth, 9)
    assert E.main(argv) == 0
    return argv, rows, out, plan, json.loads((out / "report.json").read_text())["rows"]


def count_rollouts(monkeypatch):
    """Record the batch size of every WorldModel.rollout call from now on -> the list it fills."""
    calls = []
    rollout = S.WorldModel.rollout
    monkeypatch.setattr(S.WorldModel, "rollout", lambda self, frames, *x, **k: calls.append(len(frames)) or
                        rollout(self, frames, *x, **k))
    return calls


def same_scores(row, a):
    """Whether a report row has the scores of row a (rel 1e-5: a batch of 1 rounds differently)."""
    return all(row[k] == pytest.approx(a[k], rel=1e-5) for k in ("clips", "psnr", "ssim", "latent_l2"))


PROTOCOL_BAD_INPUTS = {  # case -> (argv given protocol_run's argv, rows and a folder; exception; message)
    "missing_checkpoint": (lambda argv, rows, tmp: ["--checkpoint", str(tmp / "none.safetensors"),
                                                    "--data", argv[argv.index("--data") + 1]],
                           FileNotFoundError, "not found"),
    "unknown_metric": (lambda argv, rows, tmp: [*argv, "--metrics", "psnr,dreamsm"], ValueError, "unknown metrics"),
    "missing_inception": (lambda argv, rows, tmp: [*argv, "--metrics", "fid", "--inception", str(tmp / "none.pt")],
                          E.WeightsError, "inception-2015-12-05.pt"),
    "kept_clips_of_other_settings": (lambda argv, rows, tmp: [*argv, "--steps", "3"], ValueError, "other settings"),
    "same_checkpoint_twice": (lambda argv, rows, tmp: ["--checkpoint", rows["dexac-a"], rows["dexac-a"],
                                                       "--data", argv[argv.index("--data") + 1]],
                              ValueError, "give the row name"),
}


# the layers through which the DexAC action path reaches the backbone (zero-initialized in training)
ACTION_OUTPUTS = ("action_cond.local.attn.o.", "action_cond.glob.to_d.", "action_cond.glob.to_3d.")


def rewrite_export(src, dst, action_outputs):
    """A copy of the export src at dst whose action-path output layers are zero (action_outputs "zero": the
    model provably ignores its actions) or large random (action_outputs "random": they matter)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(src))
    g = torch.Generator().manual_seed(0)
    hit = 0
    for k, v in sd.items():
        if k.startswith(ACTION_OUTPUTS):
            hit += 1
            sd[k] = (torch.zeros_like(v) if action_outputs == "zero" else
                     (torch.randn(v.shape, generator=g) * 0.3).to(v.dtype))
    assert hit == 2 * len(ACTION_OUTPUTS), hit  # weight and bias of each: the layout this relies on
    meta = {**meta, "sha256": json.dumps(hub.tensors_sha256(sd))}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst), metadata=meta)
    return str(dst)


def record_rollouts(monkeypatch, ignore_actions=False):
    """Wrap sample.WorldModel.rollout (what evaluate.py calls) -> {clip index: what the model was given}
    (clip index = seed, as the protocol seeds clip i with --seed 0 + i). ignore_actions: the model is handed
    still actions whatever it is given (an action-blind model), after the given ones are recorded."""
    seen = {}
    rollout = S.WorldModel.rollout

    def spy(self, frame, actions, prompts, seeds, *args, **kwargs):
        for b, s in enumerate(seeds):
            assert int(s) not in seen, f"clip {s} rolled out twice"
            seen[int(s)] = {"frame": np.array(frame[b]), "actions": np.array(actions[b], np.float64),
                            "prompt": prompts[b]}
        if ignore_actions:
            actions = np.broadcast_to(conditioning.still_actions(actions.shape[1]), actions.shape).copy()
        return rollout(self, frame, actions, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(S.WorldModel, "rollout", spy)
    return seen


def run_protocol(checkpoint, data_root, out, *, shuffle, clips=None, ignore_actions=False):
    """evaluate.py's protocol on one checkpoint -> (what each clip's rollout was given, the report row,
    the per-clip score files)."""
    with pytest.MonkeyPatch.context() as mp:
        seen = record_rollouts(mp, ignore_actions)
        argv = ["--checkpoint", checkpoint, "--data", str(data_root), "--horizon", "9", "--steps", "2",
                "--metrics", "psnr,ssim,latent_l2,pck", "--batch", "3", "--out", str(out), "--figure-clips", "0"]
        argv += ["--clips", str(clips)] * (clips is not None) + ["--shuffle-actions"] * shuffle
        assert E.main(argv) == 0
    (row,) = json.loads((Path(out) / "report.json").read_text())["rows"].values()
    (d,) = [p for p in Path(out).iterdir() if p.is_dir()]
    per_clip = {int(f.stem): json.loads(f.read_text()) for f in sorted((d / "clips").glob("*.json"))}
    return seen, row, per_clip


@pytest.fixture(scope="module")
def control_runs(exported, train_synth, tmp_path_factory):
    """True and shuffled rows of an action-sensitive model ("acts") and of an action-blind one ("blind": its
    action path zeroed in the checkpoint), over all 8 test clips -> {(model, shuffled): run_protocol's}."""
    tmp = tmp_path_factory.mktemp("control")
    ckpt = {m: rewrite_export(exported, tmp / m / "model.safetensors", how)
            for m, how in (("acts", "random"), ("blind", "zero"))}
    return {(m, sh): run_protocol(ckpt[m], train_synth, tmp / f"eval-{m}-{sh}", shuffle=sh)
            for m in ckpt for sh in (False, True)}


def true_actions(train_synth, n_clips=None):
    """Each planned clip's true actions, read with data.load_clip (independently of the protocol)."""
    episodes, plan = E.eval_plan(train_synth, 9, n_clips)
    return [data.load_clip(episodes[e], int(s), 9, (32, 64))["actions"].double().numpy() for e, s in plan]


SRC_HW = (180, 320)  # synthetic.write_synthetic's default frame size


@pytest.fixture(scope="module")
def pck_episode(tmp_path_factory):
    """A 14-frame synthetic test episode at 180x320 -> (data.Episode, hdf5 path)."""
    root = synthetic.write_synthetic(tmp_path_factory.mktemp("synth_pck"), tasks=1, episodes=0, test_episodes=1,
                                     frames=14, workers=0)
    h5 = next((root / "test").glob("*/0.hdf5"))
    return data.Episode("test/x/0", str(h5), 14, "egodex"), h5


def independent_keypoints(h5, start, length, size=None):
    """The 12 keypoints (wrists, then fingertips, left hand first) of frames [start, start + length) projected
    here from the HDF5 file's own transforms and intrinsics with a plain pinhole camera (camera-to-world pose,
    OpenCV axes, as synthetic.render_frame draws them), for frames resized from 180x320 to size (same aspect:
    a pure scale with pixel centres at integers) -> (T, 12, 2) pixels (u, v), (T, 12) depth."""
    with h5py.File(h5, "r") as f:
        K = np.asarray(f["camera/intrinsic"], np.float64)
        cam = np.asarray(f["transforms/camera"][start:start + length], np.float64)
        names = [f"{s}{j}" for s in ("left", "right") for j in ("Hand", "ThumbTip", "IndexFingerTip",
                                                                "MiddleFingerTip", "RingFingerTip", "LittleFingerTip")]
        pts = np.stack([np.asarray(f[f"transforms/{n}"][start:start + length], np.float64)[:, :3, 3]
                        for n in names], 1)  # (T, 12, 3) world
    uv, z = np.zeros(pts.shape[:2] + (2,)), np.zeros(pts.shape[:2])
    for t in range(len(cam)):
        w2c = np.linalg.inv(cam[t])
        c = pts[t] @ w2c[:3, :3].T + w2c[:3, 3]
        uv[t] = (c @ K.T)[:, :2] / c[:, 2:]
        z[t] = c[:, 2]
    if size is not None:
        s = size[1] / SRC_HW[1]
        assert size[0] / SRC_HW[0] == s
        uv = (uv + 0.5) * s - 0.5
    return uv, z


# --- PCK on real-format data: stub detectors with known offsets, MediaPipe through a fake module

THRESHOLDS = E.PCK_THRESHOLDS  # 2.5, 5, 10, 20


PRED_OFFSETS = np.array([0, 2, 2.4, 3, 4.9, 7, 9.9, 12, 19.9, 21, 40, np.nan])  # px along u, per keypoint


GT_OFFSETS = np.array([1, 1, 3, 3, 3, 6, 6, 6, 11, 11, np.nan, 30])


def unmark(root):
    """Strip synthetic.py's mark from every episode under root: files that look like real EgoDex."""
    for h5 in Path(root).rglob("*.hdf5"):
        with h5py.File(h5, "a") as f:
            del f.attrs[synthetic.SYNTHETIC_ATTR]
    return root


@pytest.fixture(scope="module")
def real_format(tmp_path_factory):
    """One 14-frame test episode at 180x320 without synthetic.py's mark -> (data.Episode, its 13-frame clip). Seen
    closer (zoom 3), some keypoints leave the frame: the annotation marks them not valid."""
    root = unmark(synthetic.write_synthetic(tmp_path_factory.mktemp("real"), tasks=1, episodes=0, test_episodes=1,
                                            frames=14, workers=0, zoom=3.0))
    h5 = next((root / "test").glob("*/0.hdf5"))
    ep = data.Episode("test/x/0", str(h5), 14, "egodex")
    return ep, data.load_clip(ep, 0, 13, size=None)


def expected_pck(offsets, valid):
    """Percent of the valid (frame, keypoint) pairs whose offset is within each threshold, written out."""
    out = []
    for k in THRESHOLDS:
        hits = total = 0
        for t in range(valid.shape[0]):
            for j in range(valid.shape[1]):
                if valid[t, j]:
                    total += 1
                    hits += bool(offsets[j] <= k)  # NaN: a miss
        out.append(100.0 * hits / total)
    return out


class OffsetDetector:
    """A stub that 'finds' the annotation shifted by per-keypoint offsets along u: GT_OFFSETS on the ground-truth
    frames it was shown, PRED_OFFSETS on any other frames. It never looks at `reference`."""

    def __init__(self, gt_frames, annotation):
        self.gt_frames, self.annotation = gt_frames, annotation

    def __call__(self, frames):
        offsets = GT_OFFSETS if np.array_equal(frames, self.gt_frames) else PRED_OFFSETS
        out = self.annotation.copy()
        out[..., 0] += offsets
        return out


def fake_mediapipe(hands_per_frame):
    """A stand-in for mediapipe's legacy API: Hands(...).process(rgb) answers, frame after frame, with the given
    [(label, (21, 2) normalized x, y)] as multi_hand_landmarks[i].landmark[j].x/.y and
    multi_handedness[i].classification[0].label."""
    answers = iter(hands_per_frame)
    ns = types.SimpleNamespace

    class Hands:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def process(self, rgb):
            assert rgb.dtype == np.uint8 and rgb.ndim == 3
            hands = next(answers)
            if not hands:  # mediapipe answers None, not an empty list
                return ns(multi_hand_landmarks=None, multi_handedness=None)
            return ns(multi_hand_landmarks=[ns(landmark=[ns(x=x, y=y, z=0.0) for x, y in lm]) for _, lm in hands],
                      multi_handedness=[ns(classification=[ns(label=label, score=0.9, index=0)])
                                        for label, _ in hands])

    return ns(solutions=ns(hands=ns(Hands=Hands)))


@pytest.fixture
def mediapipe_models(tmp_path, monkeypatch):
    """The stand-in mediapipe's two model files, registered (their sha256 and size) as the real ones are."""
    for i, kind in enumerate(("hand_landmark", "palm_detection")):
        payload = bytes([i]) * 100
        (tmp_path / E.NETWORKS[kind].file).write_bytes(payload)
        monkeypatch.setitem(E.NETWORKS, kind, replace(E.NETWORKS[kind], sha256=hashlib.sha256(payload).hexdigest(),
                                                      size=100, found_in=(tmp_path / E.NETWORKS[kind].file,)))
    return tmp_path


def hand_at(u0, v0, H, W):
    """21 landmarks (normalized) of a hand whose landmark j sits at pixel (u0 + j, v0 + 2j)."""
    j = np.arange(21)
    return np.stack([(u0 + j + 0.5) / W, (v0 + 2 * j + 0.5) / H], 1)


DETECTOR_MODULE = '''
import numpy as np

OFFSETS = np.array({offsets})

def shifted(frames, reference=None):
    """The annotation it is given, shifted along u; nothing found without one."""
    if reference is None:
        return np.full((len(frames), 12, 2), np.nan)
    out = np.array(reference, dtype=np.float64)
    out[..., 0] += OFFSETS
    return out

class Blind:
    def __call__(self, frames):
        return np.full((len(frames), 12, 2), np.nan)
'''


@pytest.fixture
def detector_module(tmp_path, monkeypatch):
    name = f"my_detector_{os.getpid()}"
    path = tmp_path / f"{name}.py"
    path.write_text(DETECTOR_MODULE.format(offsets=[0 if np.isnan(o) else o for o in PRED_OFFSETS.tolist()]))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, path


@pytest.fixture(scope="module")
def exported_real(exported, train_synth, tmp_path_factory):
    """The 2-step tiny model, the synthetic root it was trained on, and a copy of that root without synthetic.py's
    mark -> (checkpoint, synthetic root, real-format root)."""
    real = tmp_path_factory.mktemp("proto") / "real"
    shutil.copytree(train_synth, real, ignore=shutil.ignore_patterns(".dexac_index*"))
    return exported, train_synth, unmark(real)


def protocol_argv(checkpoint, root, out, *extra):
    return ["--checkpoint", str(checkpoint), "--data", str(root), "--horizon", "9", "--steps", "1", "--clips", "2",
            "--batch", "2", "--out", str(out), "--figure-clips", "0", *extra]


# --- the cookbook's FVD network against cd-fvd (what the cookbook calls), on random weights

def randomize_i3d(net, seed=0):
    """Every parameter and BatchNorm buffer random and non-trivial, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm3d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def ref_i3d():
    """cd-fvd's copy of pytorch-i3d (the cookbook's FVD network), random weights and BatchNorm statistics."""
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d
    return randomize_i3d(InceptionI3d(400, in_channels=3))


@pytest.fixture(scope="module")
def i3d_file(ref_i3d, tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(ref_i3d.state_dict(), path)  # the published layout: a plain pytorch-i3d state dict
    return path


@pytest.fixture(scope="module")
def our_i3d(i3d_file):
    return E.load_i3d(str(i3d_file))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def cookbook_steps(videos):
    """The cookbook's load_videos_for_fvd steps (compute_fvd_single_view.py, commit 1d59425) on decoded frames:
    (B, T, H, W, C) uint8, as decord returns them -> one cd-fvd batch {"video": (B, C, T, 224, 224) in [0, 1]}."""
    clips = []
    for v in videos:
        v = F.interpolate(v.permute(0, 3, 1, 2).float(), (224, 224), mode="bilinear", align_corners=False)
        clips.append(v.permute(1, 0, 2, 3) / 255.0)
    return {"video": torch.stack(clips)}


def cd_fvd(i3d_file, monkeypatch):
    """cd-fvd's FVD evaluator (what the cookbook calls) on the random-weight file; it must not download."""
    monkeypatch.setattr("requests.get", lambda *a, **k: pytest.fail("cd-fvd tried to download"))
    return importlib.import_module("cdfvd.fvd").cdfvd("i3d", n_real="full", n_fake="full", ckpt_path=str(i3d_file),
                                                      device="cpu", compute_feats=True)


def videos_and_ours(size, T=10):
    g = torch.Generator().manual_seed(size[0] * T)
    videos = torch.randint(0, 256, (2, T, *size, 3), dtype=torch.uint8, generator=g)  # (B, T, H, W, C)
    return videos, videos.permute(0, 4, 1, 2, 3)  # and evaluate.py's (B, C, T, H, W)


# --- export / compare --manifest: the protocol's clips for other models, and their videos scored

EXPORT_HORIZON, EXPORT_SIZE = 5, (64, 112)  # markers are found at 64x112 (not at the model's 32x64), so PCK is defined





@pytest.fixture(scope="module")
def manifest_protocol(exported, train_synth, tmp_path_factory):
    """The protocol on every test clip at 64x112, each rollout kept (--figure-clips above the clip count) ->
    (out, its report row, per-clip scores {index: dict}, the rollouts {index: (T, H, W, 3) uint8})."""
    out = tmp_path_factory.mktemp("protocol")
    assert E.main(["--checkpoint", str(exported), "--data", str(train_synth), "--horizon", str(EXPORT_HORIZON),
                   "--steps", "1", "--metrics", "psnr,ssim,pck", "--height", str(EXPORT_SIZE[0]),
                   "--width", str(EXPORT_SIZE[1]),
                   "--figure-clips", "1000", "--batch", "8", "--out", str(out), "--device", "cpu"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["rows"].values()
    d = only_run(out) / "clips"
    per_clip = {int(f.stem): json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}
    rollouts = {int(f.stem): np.load(f) for f in sorted(d.glob("*.npy"))}
    return out, row, per_clip, rollouts


@pytest.fixture(scope="module")
def export_dir(train_synth, tmp_path_factory):
    """`evaluate.py export` of the same clips (stats: DATA/stats.json, the file the model was trained with)."""
    out = tmp_path_factory.mktemp("export") / "clips"
    assert E.main(["export", "--data", str(train_synth), "--out", str(out), "--horizon", str(EXPORT_HORIZON),
                   "--height", str(EXPORT_SIZE[0]), "--width", str(EXPORT_SIZE[1])]) == 0
    return out


def pred_folder(path, videos):
    """{clip name: (T, H, W, 3) frames} -> a folder of <name>.npy."""
    path.mkdir(parents=True)
    for name, v in videos.items():
        np.save(path / f"{name}.npy", v)
    return path


def gt_videos(export_dir):
    m = E.read_manifest(export_dir)
    return {c["name"]: np.load(export_dir / c["files"]["video"]) for c in m["clips"]}


def same_report(a, b, tol=1e-12):
    """Equal reports/clip scores: floats to tol (the protocol scores clips in batches, compare one at a time: a
    float64 mean over a batch's frames may differ in its last bit), everything else exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_report(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_report(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=tol, abs=tol)
    return type(a) is type(b) and a == b


def compare_manifest_cli(export_dir, pred, out, *extra, metrics="psnr,ssim,pck"):
    assert E.main(["compare", "--manifest", str(export_dir), "--pred", *map(str, np.atleast_1d(pred)),
                   "--metrics", metrics, "--out", str(out), *extra]) == 0
    return json.loads((Path(out) / "report.json").read_text())


class TestEvaluate:
    """Every metric against an independent reference or a known answer (PSNR, SSIM, LPIPS, Frechet distances,
    FID, FVD, latent L2, PCK), the report, the compare command, and the sharded, resumable rollout protocol."""

    def test_psnr_and_ssim_match_a_hand_computation(self):
        pred, gt = eval_videos()
        p, g = eval_frames(pred).numpy(), eval_frames(gt).numpy()
        want_psnr = [10 * math.log10(1 / ((a - b) ** 2).mean()) for a, b in zip(p, g)]
        want_ssim = [np.mean([ssim_by_hand(a[c], b[c]) for c in range(3)]) for a, b in zip(p, g)]
        np.testing.assert_allclose(E.psnr_frames(eval_frames(pred), eval_frames(gt)).numpy(), want_psnr, rtol=1e-12)
        np.testing.assert_allclose(E.ssim_frames(eval_frames(pred), eval_frames(gt)).numpy(), want_ssim, rtol=0,
                                   atol=1e-12)

    def test_psnr_and_ssim_match_scikit_image(self):
        metrics = importlib.import_module("skimage.metrics")
        pred, gt = eval_videos(1, H=40, W=56)
        worst = [0.0, 0.0]
        for x, y in zip(eval_frames(pred), eval_frames(gt)):
            a, b = x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy()  # (H, W, 3)
            ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1,
                                                use_sample_covariance=False, channel_axis=2)
            worst[0] = max(worst[0], abs(E.ssim_frames(x[None], y[None]).item() - ref))
            ref = metrics.peak_signal_noise_ratio(b, a, data_range=1)
            worst[1] = max(worst[1], abs(E.psnr_frames(x[None], y[None]).item() - ref))
        print(f"SSIM, PSNR vs scikit-image: max abs differences {worst[0]:.3g}, {worst[1]:.3g}")
        assert max(worst) < 1e-10

    def test_identical_videos_give_the_psnr_cap_and_ssim_1(self):
        _, gt = eval_videos()
        ev = E.Evaluator(("psnr", "ssim"), n_cond=1)
        clip = ev.add((gt * 255).round().to(torch.uint8), (gt * 255).round().to(torch.uint8))[0]
        assert clip["psnr"] == E.PSNR_CAP and abs(clip["ssim"] - 1) < 1e-12

    def test_the_conditioning_frame_is_not_scored(self):
        _, gt = eval_videos()
        pred = gt.clone()
        pred[:, :, 0] = 0
        assert E.Evaluator(("psnr", "ssim"), n_cond=1).add(pred, gt)[0]["psnr"] == E.PSNR_CAP

    @pytest.mark.parametrize("case", ["minus_1_to_1", "0_to_255_floats"])
    def test_videos_outside_0_1_are_refused(self, case):
        _, gt = eval_videos()
        pred = {"minus_1_to_1": gt * 2 - 1, "0_to_255_floats": gt * 255}[case]
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            E.Evaluator(("psnr", "ssim"), n_cond=1).add(pred, gt)

    def test_ssim_needs_11x11_frames(self):
        with pytest.raises(ValueError, match="at least 11x11"):
            E.ssim_frames(torch.rand(1, 3, 8, 32), torch.rand(1, 3, 8, 32))

    def test_lpips_loads_the_official_layouts(self, lpips_net, tmp_path):
        net, expected = lpips_net
        sd = net.state_dict()
        assert sd.keys() == expected.keys() and all(torch.equal(sd[k], v) for k, v in expected.items())
        assert not any(p.requires_grad for p in net.parameters())
        assert E.load_lpips(tmp_path, tmp_path).state_dict().keys() == sd.keys()  # a folder holding both files

    def test_lpips_is_a_distance_and_equals_a_hand_computation(self, lpips_net):
        """Positive, symmetric, zero on identical images, and LPIPS v0.1 written with functional ops."""
        net, expected = lpips_net
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
        with torch.no_grad():
            d = net(x, y)
            assert d.shape == (3,) and (d > 0).all() and torch.allclose(d, net(y, x), atol=1e-6)
            assert net(x, x).abs().max() < 1e-6
            torch.testing.assert_close(d, lpips_by_hand(expected, x, y), rtol=1e-5, atol=1e-6)

    def test_lpips_in_the_evaluator(self, lpips_net):
        pred, gt = eval_videos(2, T=3, H=64, W=64)
        ev = E.Evaluator(("lpips",), lpips=lpips_net[0])
        assert all(c["lpips"] < 1e-6 for c in ev.add(gt, gt)) and all(c["lpips"] > 1e-3 for c in ev.add(pred, gt))

    def test_lpips_equals_the_lpips_package(self, tmp_path):
        lpips = importlib.import_module("lpips")
        ref = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.1))
            for lin in ref.lins:  # non-negative, like the trained heads
                lin.model[1].weight.copy_(torch.rand(lin.model[1].weight.shape, generator=g))
        feats = {**ref.net.slice1._modules, **ref.net.slice2._modules, **ref.net.slice3._modules,
                 **ref.net.slice4._modules, **ref.net.slice5._modules}  # named by torchvision's feature indices
        alex = {f"features.{i}.{n}": getattr(m, n).detach().clone() for i, m in feats.items()
                if isinstance(m, nn.Conv2d) for n in ("weight", "bias")}
        torch.save(alex, tmp_path / "alexnet-owt-7be5be79.pth")
        torch.save({k: v for k, v in ref.state_dict().items() if k.startswith("lin")}, tmp_path / "alex.pth")
        net = E.load_lpips(tmp_path, tmp_path)
        x, y = torch.rand(4, 3, 64, 96, generator=g) * 2 - 1, torch.rand(4, 3, 64, 96, generator=g) * 2 - 1
        with torch.no_grad():
            want, got = ref(x, y).flatten(), net(x, y)
        print(f"LPIPS vs the lpips package: max abs difference {(got - want).abs().max().item():.3g}, "
              f"values {want.tolist()}")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    def test_lpips_heads_that_do_not_fit_are_one_clear_error(self, tmp_path):
        alex, _, _ = lpips_files(tmp_path)
        torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "bad.pth")
        with pytest.raises(E.WeightsError, match=r"wrong shape \(1\): heads.0.weight") as e:
            E.load_lpips(alex, heads=tmp_path / "bad.pth")
        assert "heads.4.weight" in str(e.value)

    @pytest.mark.parametrize("case", list(WRONG_WEIGHTS))
    def test_wrong_weights_are_one_clear_error(self, case, tmp_path):
        call, error, message = WRONG_WEIGHTS[case]
        with pytest.raises(error, match=message):
            call(tmp_path)

    def test_frechet_distance_equals_scipy(self):
        linalg = importlib.import_module("scipy.linalg")
        rng = np.random.default_rng(0)
        for d, rank in ((16, None), (32, 8)):  # the second: singular, like FVD with fewer clips than dimensions
            mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
            s1, s2 = random_cov(rng, d), random_cov(rng, d, rank)
            covmean = linalg.sqrtm(s1 @ s2).real
            want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
            assert abs(E.frechet_distance(mu1, s1, mu2, s2) - want) < 1e-8 * max(1, want), (d, rank)

    def test_frechet_distance_of_2x2_covariances(self):
        """Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)) for M = S1 S2 with positive eigenvalues."""
        rng = np.random.default_rng(1)
        s1, s2 = random_cov(rng, 2), random_cov(rng, 2)
        tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        mu = np.array([0.3, -1.2])
        want = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert abs(E.frechet_distance(np.zeros(2), s1, mu, s2) - want) < 1e-12

    def test_frechet_distance_of_diagonal_covariances(self):
        """sum (sqrt(a) - sqrt(b))^2 plus the squared distance of the means."""
        rng = np.random.default_rng(1)
        a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
        want = 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
        got = E.frechet_distance(np.zeros(8), np.diag(a), np.full(8, math.sqrt(0.5)), np.diag(b))
        assert abs(got - want) < 1e-12

    def test_frechet_distance_of_shifted_samples(self):
        """The same samples moved by d -> |d|^2 exactly, and 0 unmoved."""
        rng = np.random.default_rng(1)
        feats, d = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)), rng.normal(size=12)
        assert abs(E.frechet_from_features(feats, feats + d) - d @ d) < 1e-9
        assert E.frechet_from_features(feats, feats) < 1e-9

    def test_frechet_distance_needs_2_samples(self):
        feats = np.random.default_rng(1).normal(size=(500, 12))
        with pytest.raises(ValueError, match="at least 2"):
            E.frechet_from_features(feats[:1], feats)

    def test_inception_gets_0_to_255(self, metric_nets):
        """The Inception file wants 0..255: a frame of 0.5 reaches it as 127.5."""
        f = E.inception_features(torch.full((2, 3, 36, 64), 0.5), metric_nets[0])
        assert f.dtype == np.float64 and f.shape == (2, 16) and np.allclose(f[:, :3], 127.5)

    def test_i3d_gets_minus_1_to_1_at_224(self, metric_nets):
        """A black clip reaches I3D as -1 everywhere, a white one as +1, with either I3D file's interface."""
        _, i3d, folder = metric_nets
        v = torch.cat([torch.zeros(1, 3, 5, 36, 64), torch.ones(1, 3, 5, 36, 64)])
        f = E.i3d_features(v, i3d)
        assert f.shape == (2, 16) and np.allclose(f[0, :9], -1) and np.allclose(f[1, :9], 1)
        np.testing.assert_allclose(E.i3d_features(v, E.load_torchscript("i3d_stylegan", folder / "i3d_plain.pt")),
                                   [[-1] * 3, [1] * 3], atol=1e-6)

    def test_identical_sets_give_zero_fid_and_fvd(self, metric_nets):
        rep = fid_fvd_report(metric_nets, same=True)
        assert rep["fid"] < 1e-8 and rep["fvd_stylegan"] < 1e-8

    def test_different_sets_give_positive_fid_and_fvd(self, metric_nets):
        rep = fid_fvd_report(metric_nets, same=False)
        assert rep["fid"] > 1e-2 and rep["fvd_stylegan"] > 1e-3

    def test_latent_l2_counts_predicted_latent_frames_only(self):
        gt = torch.randn(2, 4, 4, 3, 5)
        pred = gt + 1
        pred[:, :, 0] = 100  # the conditioning latent frame
        np.testing.assert_allclose(E.latent_l2(pred, gt).numpy(), [1, 1])
        ev = E.Evaluator(("latent_l2",))
        _, v = eval_videos(B=2)
        assert [c["latent_l2"] for c in ev.add(v, v, pred_latents=pred, gt_latents=gt)] == pytest.approx([1, 1])

    @pytest.mark.parametrize("size", [None, (288, 512)], ids=["source_180x320", "resized_288x512"])
    def test_annotation_is_the_projection_of_the_episode_poses(self, pck_episode, size):
        ep, h5 = pck_episode
        clip = data.load_clip(ep, 1, 13, size)
        uv, z = independent_keypoints(h5, 1, 13, size)
        assert (z > 0).all()
        np.testing.assert_allclose(clip["keypoints"].numpy(), uv, rtol=0, atol=2e-3)

    @pytest.mark.parametrize("size,near", [(None, 1.0), ((288, 512), 1.5)], ids=["source_180x320",
                                                                                   "resized_288x512"])
    def test_detector_finds_the_annotated_keypoints(self, pck_episode, size, near):
        """On the decoded (H.264) frames the marker centroids lie within `near` px of the annotation for at
        least 95% of the visible keypoints and within 2.5 px for all (PCK@2.5 = 100%). Measured: at 180x320 the
        median distance is 0.31 px, the largest 0.76; at 288x512 0.82 and 1.55 (a mean offset of -0.76 px in u
        only, from the upscale of the decoded frames)."""
        ep, h5 = pck_episode
        clip = data.load_clip(ep, 1, 13, size)
        frames = clip["video"].permute(1, 2, 3, 0).numpy()
        valid = clip["keypoint_valid"].numpy()
        annot = clip["keypoints"].numpy()
        pred = E.MarkerDetector()(frames)
        hits, count = E.pck(pred, annot, valid, thresholds=(near, 2.5))
        assert count >= 0.9 * 13 * 12
        assert hits[0] >= 0.95 * count and hits[1] == count, (hits, count)
        # and so through evaluate.py's report: PCK@2.5 = 100% against the annotation
        per = E.aggregate([{"pck_hits": E.pck(pred, annot, valid)[0].tolist(), "pck_count": count}])
        assert per["pck@2.5"] == 100.0

    @pytest.mark.parametrize("k", [2, 3, 6])
    def test_frames_shifted_by_k_pixels_miss_below_k(self, pck_episode, k):
        """Frames shifted right by k px: every keypoint away from the border is found between k - 1 and k + 1 px
        from its annotation, so PCK is 0 below k - 1 and 100% from k + 1 on."""
        ep, _ = pck_episode
        clip = data.load_clip(ep, 1, 13, None)
        frames = np.roll(clip["video"].permute(1, 2, 3, 0).numpy(), k, axis=2)
        annot = clip["keypoints"].numpy()
        inner = clip["keypoint_valid"].numpy() & (annot[..., 0] > 12) & (annot[..., 0] < SRC_HW[1] - k - 12)
        pred = E.MarkerDetector()(frames)
        hits, count = E.pck(pred, annot, inner, thresholds=(k - 1, k + 1))
        assert count > 100 and hits.tolist() == [0, count], (hits, count)
        d = np.linalg.norm(pred - annot, axis=-1)[inner]
        assert np.abs(d - k).max() < 1.0

    @pytest.mark.parametrize("k", E.PCK_THRESHOLDS)
    def test_pck_thresholds_on_shifted_frames(self, eval_synth_clip, k):
        """Shift the prediction right by s = floor(k) + 1 px: a hit below s, a miss from s on (keypoints away
        from the borders only)."""
        gt = eval_synth_clip["video"][None]
        W = gt.shape[-1]
        s = int(k) + 1
        pred = torch.roll(gt, s, dims=-1)
        kp = np.stack([synthetic.detect_keypoints(f) for f in gt[0].permute(1, 2, 3, 0).numpy()])  # (13, 12, 2)
        inner = torch.from_numpy((kp[..., 0] > 12) & (kp[..., 0] < W - s - 12))[None]
        clip = E.Evaluator(("pck",), n_cond=0).add(pred, gt, keypoint_valid=inner)[0]
        assert clip["pck_count"] == inner.sum() > 100
        for i, t in enumerate(E.PCK_THRESHOLDS):
            assert clip["pck_hits"][i] == (0 if t < s else clip["pck_count"]), (k, t, clip)

    def test_pck_counts_missing_predictions_and_skips_invisible_gt(self):
        gt = np.array([[[10.0, 10.0], [20.0, 20.0], [np.nan, np.nan], [5.0, 5.0]]])
        pred = np.array([[[13.0, 14.0], [np.nan, np.nan], [0.0, 0.0], [5.0, 5.0]]])
        hits, count = E.pck(pred, gt, thresholds=(2.5, 5.0))  # distances 5, missing, (no GT), 0
        assert count == 3 and hits.tolist() == [1, 2]

    def test_pck_valid_mask_drops_keypoints(self):
        gt = np.array([[[10.0, 10.0], [20.0, 20.0], [np.nan, np.nan], [5.0, 5.0]]])
        pred = np.array([[[13.0, 14.0], [np.nan, np.nan], [0.0, 0.0], [5.0, 5.0]]])
        hits, count = E.pck(pred, gt, valid=np.array([[True, True, True, False]]), thresholds=(5.0,))
        assert count == 2 and hits.tolist() == [1]

    def test_keypoint_model_interface(self, tmp_path):
        """A TorchScript keypoint model gives (x, y, confidence) per keypoint; zero confidence means not found."""
        class Fixed(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                kp = torch.zeros(x.shape[0], 12, 3)
                kp[:, :, 0], kp[:, :, 1] = x.shape[3] / 2, x.shape[2] / 2
                kp[:, 1:, 2] = 1.0  # the first keypoint with zero confidence
                return kp

        torch.jit.script(Fixed()).save(str(tmp_path / "keypoints.pt"))
        det = E.KeypointModel(str(tmp_path / "keypoints.pt"))
        kp = det(np.zeros((2, 40, 60, 3), np.uint8))
        assert kp.shape == (2, 12, 2) and np.isnan(kp[:, 0]).all() and (kp[:, 1:] == [30, 20]).all()

    def test_action_families_follow_the_normalized_actions(self):
        mean, std = np.zeros(57), np.ones(57)
        std[list(conditioning.FINGER_IDX)] = 1e-3  # finger motion is millimetres
        a = np.zeros((12, 57))
        a[:, list(conditioning.WRIST_IDX)] = 0.01
        assert E.action_family(a, mean, np.ones(57)) == "wrist"
        a[:, list(conditioning.FINGER_IDX)] = 0.002  # tiny in metres, large for fingers
        assert E.action_family(a, mean, std) == "finger" and E.action_family(a, mean, np.ones(57)) == "wrist"
        a[:, list(conditioning.HEAD_IDX)] = 5.0  # z = 5 > the fingers' 2
        assert E.action_family(a, mean, std) == "head"

    def test_report_pools_pck_and_splits_families(self):
        clips = [{"psnr": 20.0, "pck_hits": [1, 2, 3, 4], "pck_count": 4, "family": "wrist"},
                 {"psnr": 30.0, "pck_hits": [0, 0, 6, 12], "pck_count": 12, "family": "head"}]
        rep = E.aggregate(clips, {"fid": 3.5}, resolution=[180, 320])
        assert rep["clips"] == 2 and rep["psnr"] == 25.0 and rep["fid"] == 3.5 and "fvd" not in rep
        assert rep["pck@2.5"] == 100 * 1 / 16 and rep["pck@20"] == 100.0 and rep["pck_resolution"] == [180, 320]
        fam = rep["families"]
        assert fam["wrist"]["clips"] == 1 and fam["wrist"]["pck@10"] == 75.0 and fam["head"]["pck@5"] == 0.0
        assert fam["finger"] == {"clips": 0, **{f"pck@{k:g}": None for k in E.PCK_THRESHOLDS}}
        json.dumps(rep)  # the report is JSON as it is

    def test_evaluator_assigns_each_clip_its_action_family(self):
        ev = E.Evaluator(("psnr",), stats=(np.zeros(57), np.ones(57)))
        _, v = eval_videos(B=2)
        actions = torch.zeros(2, 3, 57)
        actions[0, :, list(conditioning.HEAD_IDX)] = 1
        actions[1, :, list(conditioning.FINGER_IDX)] = 1
        assert [c["family"] for c in ev.add(v, v, actions=actions)] == ["head", "finger"]

    def test_command_line_compare(self, tmp_path, eval_synth_clip):
        pred, gt = compare_folders(tmp_path, eval_synth_clip)
        out = tmp_path / "report.json"
        assert E.main(["compare", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim,pck",
                       "--detector", "markers", "--out", str(out)]) == 0
        rep = json.loads(out.read_text())
        assert rep["clips"] == 2 and rep["psnr"] > 40 and rep["ssim"] > 0.99 and rep["pck@2.5"] > 99
        assert rep["pck_resolution"] == [180, 320]
        assert rep["pck_against"] == "the detector on the ground-truth frames" and "pck_gt@2.5" not in rep

    def test_compare_without_lpips_weights_is_one_clear_error(self, tmp_path, eval_synth_clip):
        pred, gt = compare_folders(tmp_path, eval_synth_clip)
        with pytest.raises(E.WeightsError, match="alexnet-owt"):
            E.main(["compare", "--pred", str(pred), "--gt", str(gt), "--metrics", "lpips",
                    "--alexnet", str(tmp_path / "none.pth")])

    def test_compare_folders_with_other_names_is_one_clear_error(self, tmp_path, eval_synth_clip):
        pred, gt = compare_folders(tmp_path, eval_synth_clip)
        (pred / "a.npy").rename(pred / "c.npy")
        with pytest.raises(ValueError, match="same names"):
            E.main(["compare", "--pred", str(pred), "--gt", str(gt)])

    def test_protocol_plans_clips_of_the_test_episodes(self, protocol_run):
        _, _, _, plan, _ = protocol_run
        assert len(plan) == 2 * (40 // 9)  # 2 test episodes of 40 frames: starts 0, 9, 18, 27

    def test_protocol_rows_of_the_same_weights_agree_and_average_their_clips(self, protocol_run):
        _, _, out, plan, report = protocol_run
        a, b = report["dexac-a"], report["dexac-b"]
        assert a["clips"] == len(plan) and a == b  # same weights and seeds: identical rows
        clips = [json.loads(f.read_text()) for f in sorted((out / "dexac-a" / "clips").glob("*.json"))]
        assert a["psnr"] == pytest.approx(np.mean([c["psnr"] for c in clips]))

    def test_protocol_reports_pck_families_table_and_figure(self, protocol_run):
        """PCK is wired in (at 32x64 the markers are too small to detect, so it is undefined: None)."""
        _, _, out, _, report = protocol_run
        a = report["dexac-a"]
        assert a["latent_l2"] > 0 and "pck@20" in a and set(a["families"]) == set(E.FAMILIES)
        table = (out / "table.md").read_text()
        assert "| Model | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ | FVD ↓ | PCK@10 ↑ | PCK@20 ↑ |" in table
        assert table.count("| dexac-") == 4  # a row per model in both tables
        assert (out / "figure.png").is_file()

    def test_protocol_resume_rolls_out_only_the_missing_clip(self, protocol_run, monkeypatch):
        """Only the missing clip is rolled out again, and it scores as before."""
        argv, _, out, _, report = protocol_run
        (out / "dexac-a" / "clips" / "00003.json").unlink()
        calls = count_rollouts(monkeypatch)
        E.main(argv)
        assert calls == [1]
        assert same_scores(json.loads((out / "report.json").read_text())["rows"]["dexac-a"], report["dexac-a"])

    def test_protocol_ranks_share_the_clips_and_give_the_one_rank_report(self, protocol_run, tmp_path,
                                                                        monkeypatch):
        """Rank r of 2 rolls out clips r, r + 2, ...; together they give the one-rank report."""
        argv, rows, _, plan, report = protocol_run
        for name in ("init_process_group", "barrier", "destroy_process_group"):
            monkeypatch.setattr(torch.distributed, name, lambda *x, **k: None)
        sharded = tmp_path / "sharded"
        calls = count_rollouts(monkeypatch)
        for rank in (1, 0):  # rank 0 last: it collects after the (no-op) barrier
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            calls.clear()
            E.main([*argv[:-4], "--out", str(sharded), "--figure-clips", "2", "--checkpoint", rows["dexac-a"]])
            assert calls == [2] * (len(plan) // 4)  # its half of the clips, in batches of 2
            done = sorted(int(f.stem) for f in (sharded / "dexac-a" / "clips").glob("*.json"))
            assert set(done) >= set(range(rank, len(plan), 2))
        assert same_scores(json.loads((sharded / "report.json").read_text())["rows"]["dexac-a"], report["dexac-a"])

    def test_true_row_gives_each_clip_its_own_actions(self, control_runs, train_synth):
        seen, _, _ = control_runs["acts", False]
        truth = true_actions(train_synth)
        assert sorted(seen) == list(range(len(truth))) == list(range(8))
        for i, a in enumerate(truth):
            np.testing.assert_allclose(seen[i]["actions"], a, rtol=0, atol=1e-6)

    def test_shuffled_row_gives_every_clip_another_clips_actions_with_the_same_first_frame(self, control_runs,
                                                                                          train_synth):
        true, _, _ = control_runs["acts", False]
        shuf, _, _ = control_runs["acts", True]
        truth = true_actions(train_synth)
        assert sorted(shuf) == sorted(true)
        # precondition: the clips' true actions are all different, so "other clip's actions" is observable
        assert all(not np.allclose(truth[i], truth[j]) for i in range(8) for j in range(i))
        source = {}
        for i in true:
            np.testing.assert_array_equal(shuf[i]["frame"], true[i]["frame"])  # same first frame and prompt
            assert shuf[i]["prompt"] == true[i]["prompt"]
            assert np.abs(shuf[i]["actions"] - truth[i]).max() > 1e-3, f"clip {i} got its own actions"
            (source[i],) = [j for j in range(8) if np.allclose(shuf[i]["actions"], truth[j], rtol=0, atol=1e-6)]
        assert sorted(source.values()) == list(range(8))  # a permutation of the true actions, no fixed point
        assert all(source[i] != i for i in source)

    @pytest.mark.parametrize("n", [2, 3])
    def test_few_clips_still_get_other_clips_actions(self, exported, train_synth, tmp_path, n):
        seen, _, _ = run_protocol(str(exported), train_synth, tmp_path / "eval", shuffle=True, clips=n)
        truth = true_actions(train_synth, n)
        assert sorted(seen) == list(range(n))
        for i in range(n):
            assert np.abs(seen[i]["actions"] - truth[i]).max() > 1e-3, f"clip {i} of {n} got its own actions"

    def test_one_clip_has_no_other_clip_to_take_actions_from(self, exported, train_synth, tmp_path):
        """With one clip the shuffle can only be the identity: a control equal to the true row is refused."""
        with pytest.raises(ValueError, match="at least 2 clips"):
            run_protocol(str(exported), train_synth, tmp_path / "eval", shuffle=True, clips=1)

    def test_action_blind_model_scores_the_same_on_both_rows(self, control_runs):
        """The blind checkpoint's action path is exactly zero: every clip's scores are bit-identical."""
        true_seen, true_row, true_clips = control_runs["blind", False]
        shuf_seen, shuf_row, shuf_clips = control_runs["blind", True]
        assert all(np.abs(true_seen[i]["actions"] - shuf_seen[i]["actions"]).max() > 1e-3 for i in true_seen)
        assert len(true_clips) == 8 and true_clips == shuf_clips
        assert {k: v for k, v in true_row.items() if k != "skipped"} == \
               {k: v for k, v in shuf_row.items() if k != "skipped"}

    def test_action_blind_rollout_scores_the_same_on_both_rows(self, exported, train_synth, tmp_path):
        """The same with a rollout that drops whatever actions it is given (the model itself unchanged)."""
        runs = [run_protocol(str(exported), train_synth, tmp_path / f"eval{sh}", shuffle=sh, clips=3,
                             ignore_actions=True) for sh in (False, True)]
        assert runs[0][2] == runs[1][2] and runs[0][1]["psnr"] == runs[1][1]["psnr"]
        assert any(np.abs(runs[0][0][i]["actions"] - runs[1][0][i]["actions"]).max() > 1e-3 for i in range(3))

    def test_action_sensitive_model_scores_differently_on_the_shuffled_row(self, control_runs):
        _, true_row, true_clips = control_runs["acts", False]
        _, shuf_row, shuf_clips = control_runs["acts", True]
        differ = [i for i in true_clips if abs(true_clips[i]["latent_l2"] - shuf_clips[i]["latent_l2"]) > 1e-6
                  * abs(true_clips[i]["latent_l2"])]
        assert len(differ) == 8, (true_clips, shuf_clips)  # every clip's rollout changed with its actions
        assert true_row["psnr"] != shuf_row["psnr"] and true_row["latent_l2"] != shuf_row["latent_l2"]

    @pytest.mark.parametrize("case", list(PROTOCOL_BAD_INPUTS))
    def test_protocol_bad_input_is_one_clear_error(self, protocol_run, tmp_path, case):
        argv, rows, _, _, _ = protocol_run
        make_argv, error, message = PROTOCOL_BAD_INPUTS[case]
        with pytest.raises(error, match=message):
            E.main(make_argv(argv, rows, tmp_path))

    # PCK as the paper means it: the detector on generated frames against the annotation

    def test_pck_on_real_format_clips_is_the_detector_against_the_annotation(self, real_format):
        ep, clip = real_format
        assert not synthetic.is_synthetic(ep.path)
        n_cond = 1
        annot = clip["keypoints"].numpy().astype(np.float64)[n_cond:]
        valid = clip["keypoint_valid"].numpy()[n_cond:]
        assert 50 < valid.sum() < valid.size  # some keypoints are not counted: the mask matters
        gt = clip["video"][None]  # (1, 3, T, H, W) uint8
        pred = torch.zeros_like(gt)
        det = OffsetDetector(gt[0, :, n_cond:].permute(1, 2, 3, 0).numpy(), annot)
        ev = E.Evaluator(("pck",), n_cond=n_cond, detector=det)
        (c,) = ev.add(pred, gt, keypoints=clip["keypoints"][None], keypoint_valid=clip["keypoint_valid"][None])
        assert c["pck_count"] == valid.sum()
        rep = ev.report()
        want, want_gt = expected_pck(PRED_OFFSETS, valid), expected_pck(GT_OFFSETS, valid)
        assert [rep[f"pck@{k:g}"] for k in THRESHOLDS] == pytest.approx(want)
        assert [rep[f"pck_gt@{k:g}"] for k in THRESHOLDS] == pytest.approx(want_gt)
        assert want != want_gt and len(set(want)) == 4  # every threshold tells a different story
        assert rep["pck_against"] == "annotations"

    def test_invalid_keypoints_are_not_counted_even_when_detected(self, real_format):
        _, clip = real_format
        gt = clip["video"][None]
        annot = clip["keypoints"].numpy().astype(np.float64)[1:]
        det = OffsetDetector(gt[0, :, 1:].permute(1, 2, 3, 0).numpy(), annot)
        valid = torch.zeros_like(clip["keypoint_valid"])
        valid[:, 0] = True  # only the left wrist (offset 0 on pred, 1 on the ground truth) counts
        (c,) = E.Evaluator(("pck",), n_cond=1, detector=det).add(
            torch.zeros_like(gt), gt, keypoints=clip["keypoints"][None], keypoint_valid=valid[None])
        assert c["pck_count"] == 12 and c["pck_hits"] == [12] * 4 and c["pck_gt_hits"] == [12] * 4

    def test_synthetic_writers_mark_their_episodes(self, real_format, tmp_path):
        root = synthetic.write_synthetic(tmp_path / "s", tasks=1, episodes=1, test_episodes=0, frames=4,
                                         size=(32, 48), workers=0)
        assert all(synthetic.is_synthetic(h5) for h5 in root.rglob("*.hdf5"))
        assert not synthetic.is_synthetic(real_format[0].path)
        joints, _ = synthetic.synth_track(np.random.default_rng(0), 4)
        K = synthetic._egodex_K((32, 48))
        synthetic.write_egoverse_zarr(tmp_path / "a.zarr", joints, K, (32, 48), attrs={})
        synthetic.write_egoverse_zarr(tmp_path / "b.zarr", joints, K, (32, 48),
                                      attrs={synthetic.SYNTHETIC_ATTR: None})
        assert synthetic.is_synthetic(tmp_path / "a.zarr") and not synthetic.is_synthetic(tmp_path / "b.zarr")

    def test_marker_detector_is_refused_on_real_data_and_accepted_on_synthetic(self, real_format, tmp_path):
        ep, _ = real_format
        for spec in (None, "markers"):
            with pytest.raises(ValueError, match=r"real video needs a hand detector: --detector mediapipe") as err:
                E.pck_detector(spec, [ep])
            assert "test/x/0" in str(err.value) and "--detector module:function" in str(err.value)
        root = synthetic.write_synthetic(tmp_path / "s", tasks=1, episodes=0, test_episodes=1, frames=4,
                                         size=(32, 48), workers=0)
        marked = data.Episode("test/y/0", str(next(root.rglob("*.hdf5"))), 4, "egodex")
        assert E.pck_detector(None, [marked]) == E.pck_detector("markers", [marked]) == "markers"
        with pytest.raises(ValueError, match="--detector"):  # one real episode among synthetic ones is enough
            E.pck_detector("markers", [marked, ep])
        assert E.pck_detector("mediapipe", [ep]) == "mediapipe"

    def test_compare_needs_a_named_detector_for_pck(self, tmp_path):
        for d in ("pred", "gt"):
            (tmp_path / d).mkdir()
            np.save(tmp_path / d / "a.npy", np.zeros((3, 32, 48, 3), np.uint8))
        with pytest.raises(ValueError, match="PCK needs a detector, --detector"):
            E.main(["compare", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--metrics", "pck"])

    def test_mediapipe_hands_are_matched_by_position_not_by_label(self, monkeypatch, mediapipe_models):
        H, W = 60, 100
        left, right = hand_at(10, 5, H, W), hand_at(70, 8, H, W)
        frames = [[("Left", right), ("Right", left)],  # right hand first, labels as the legacy docs (mirrored)
                  [("Left", left), ("Right", right)],  # labels swapped against that convention
                  [("Right", left)],                   # one hand only, near the annotated left wrist
                  []]                                  # no hand
        monkeypatch.setitem(sys.modules, "mediapipe", fake_mediapipe(frames))
        det = E.MediaPipeHands()
        assert det.hands.kwargs["static_image_mode"] and det.hands.kwargs["max_num_hands"] == 2
        ref = np.full((4, 12, 2), np.nan)
        ref[:, 0], ref[:, 6] = (12, 9), (71, 6)  # annotated wrists near (10, 5) and (70, 8)
        ref[2, 6] = np.nan  # frame 2: the right wrist not annotated
        kp = E.detect(det, np.zeros((4, H, W, 3), np.uint8), ref)
        want_left = np.array([(10 + j, 5 + 2 * j) for j in E.MediaPipeHands.LANDMARKS], np.float64)
        want_right = want_left + (60, 3)
        for t in (0, 1, 2):
            np.testing.assert_allclose(kp[t, :6], want_left, atol=1e-9)
        for t in (0, 1):
            np.testing.assert_allclose(kp[t, 6:], want_right, atol=1e-9)
        assert np.isnan(kp[2, 6:]).all() and np.isnan(kp[3]).all()

    def test_mediapipe_without_a_reference_reads_the_legacy_label_as_mirrored(self, monkeypatch, mediapipe_models):
        H, W = 60, 100
        left, right = hand_at(10, 5, H, W), hand_at(70, 8, H, W)
        monkeypatch.setitem(sys.modules, "mediapipe", fake_mediapipe([[("Left", right), ("Right", left)]]))
        kp = E.MediaPipeHands()(np.zeros((1, H, W, 3), np.uint8))
        assert kp[0, 0].tolist() == [10, 5] and kp[0, 6].tolist() == [70, 8]

    def test_match_hands_prefers_known_wrists(self):
        wrists = np.array([[70.0, 8.0], [10.0, 5.0]])
        assert tuple(E.match_hands(wrists, np.array([[12.0, 9.0], [71.0, 6.0]]))) == (1, 0)
        assert tuple(E.match_hands(wrists, np.array([[np.nan, np.nan], [11.0, 4.0]]))) == (0, 1)
        assert tuple(E.match_hands(wrists[:1], np.array([[np.nan, np.nan], [11.0, 4.0]]))) == (None, 0)
        assert E.match_hands(wrists, np.full((2, 2), np.nan)) is None

    def test_mediapipe_missing_is_one_clear_error(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe raises ImportError
        with pytest.raises(ImportError, match=r"pip install 'dexac-wm\[hands\]'"):
            E.load_detector("mediapipe")

    def test_mediapipe_with_other_hand_models_is_one_clear_error(self, monkeypatch, mediapipe_models):
        """The hand models inside the mediapipe wheel are checked like every network file (sha256, size)."""
        monkeypatch.setitem(sys.modules, "mediapipe", fake_mediapipe([]))
        (mediapipe_models / "palm_detection_full.tflite").write_bytes(bytes(100))
        with pytest.raises(E.WeightsError, match=r"palm_detection_full.tflite .* is missing from mediapipe .*0.10.21"):
            E.MediaPipeHands()

    def test_load_detector_specs(self, detector_module):
        name, path = detector_module
        assert E.load_detector(f"{name}:shifted").__name__ == "shifted"
        assert type(E.load_detector(f"{path}:Blind")).__name__ == "Blind"  # a class is instantiated
        assert isinstance(E.load_detector("markers"), E.MarkerDetector)
        for spec, message in ((f"{name}:nothing", "has no attribute"), (f"{path.parent}/none.py:f", "no file"),
                              ("no_such_module_xyz:f", "No module named")):
            with pytest.raises(ValueError, match=message):
                E.load_detector(spec)
        with pytest.raises(ValueError, match="PCK needs a detector"):
            E.load_detector(None)

    def test_a_detector_of_the_wrong_shape_is_one_clear_error(self):
        with pytest.raises(ValueError, match=r"not \(N, 12, 2\)"):
            E.detect(lambda frames: np.zeros((len(frames), 21, 2)), np.zeros((2, 8, 8, 3), np.uint8))

    def test_pck_of_nothing_found_is_none_and_no_keypoints(self, real_format):
        _, clip = real_format
        gt = clip["video"][None]
        kw = dict(keypoints=clip["keypoints"][None], keypoint_valid=clip["keypoint_valid"][None])
        blind = E.Evaluator(("pck",), n_cond=1, detector=lambda f: np.full((len(f), 12, 2), np.nan))
        (c,) = blind.add(gt, gt, **kw)
        assert c["pck_count"] > 0 and c["pck_found"] == 0 and c["pck_hits"] == [0] * 4
        rep = blind.report()
        assert all(rep[f"{p}@{k:g}"] is None for p in ("pck", "pck_gt") for k in THRESHOLDS)
        assert '"pck@10": null' in json.dumps(rep)
        unannotated = E.Evaluator(("pck",), n_cond=1, detector=E.MarkerDetector())
        unannotated.add(gt, gt, keypoints=kw["keypoints"],
                        keypoint_valid=torch.zeros_like(kw["keypoint_valid"]))
        assert unannotated.report()["pck@20"] is None
        rep["families"] = {f: {"clips": int(f == "wrist"), **{f"pck@{k:g}": None for k in THRESHOLDS},
                               **{f"pck_gt@{k:g}": None for k in THRESHOLDS}} for f in E.FAMILIES}
        table = E.markdown_tables({"model": rep}, 9)
        model_rows = [line for line in table.splitlines() if line.startswith("| model |")]
        assert model_rows[0].endswith("| no keypoints | no keypoints |") and "0.00" not in table
        want = "| model | – | no keypoints | no keypoints | no keypoints (n=1) | – (n=0) | – (n=0) |"
        assert model_rows[1] == want
        ceiling = [line for line in table.splitlines() if line.startswith(f"| {E.CEILING_ROW} |")]
        assert len(ceiling) == 2 and all("no keypoints" in line for line in ceiling)

    def test_tables_show_the_ceiling_row_and_zero_is_zero(self):
        rep = {"clips": 2, "psnr": 20.0, "pck@2.5": 0.0, "pck@5": 10.0, "pck@10": 50.0, "pck@20": 75.0,
               "pck_gt@2.5": 40.0, "pck_gt@5": 60.0, "pck_gt@10": 90.0, "pck_gt@20": 100.0,
               "pck_resolution": [180, 320], "pck_against": "annotations"}
        table = E.markdown_tables({"a": rep, "b": {**rep, "pck@10": 25.0}}, 9)
        lines = table.splitlines()
        assert "against the annotations" in lines[0]
        assert lines[4].endswith("| 50.00 | 75.00 |") and "25.00 (-50.00%)" in lines[5]
        assert lines[6] == f"| {E.CEILING_ROW} | – | – | – | – | – | 90.00 | 100.00 |"
        assert [line for line in lines if line.startswith("| a |")][1].startswith("| a | – | 0.00 | 10.00 |")

    def test_module_function_detector_through_the_command_line(self, exported_real, detector_module, tmp_path):
        checkpoint, _, real = exported_real
        name, _ = detector_module
        out = tmp_path / "eval"
        assert E.main(protocol_argv(checkpoint, real, out, "--metrics", "psnr,pck", "--detector",
                                    f"{name}:shifted")) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["config"]["detector"] == f"{name}:shifted"
        (row,) = report["rows"].values()
        clips = [json.loads(f.read_text()) for f in sorted(out.glob("*/clips/*.json"))]
        assert len(clips) == 2 and all("pck_gt_hits" in c for c in clips)
        # the same stub on both sides: prediction and ceiling agree, and follow its offsets (0 for 'not found') over
        # the keypoints annotated as valid in the clips evaluated, at the checkpoint's 32x64
        episodes, plan = E.eval_plan(real, 9, 2)
        valid = np.concatenate([data.load_clip(episodes[e], int(s), 9, (32, 64))["keypoint_valid"].numpy()[1:]
                                for e, s in plan])
        frac = expected_pck(np.nan_to_num(PRED_OFFSETS), valid)
        assert [row[f"pck@{k:g}"] for k in THRESHOLDS] == pytest.approx(frac)
        assert [row[f"pck_gt@{k:g}"] for k in THRESHOLDS] == pytest.approx(frac)
        assert f"| {E.CEILING_ROW} |" in (out / "table.md").read_text()

    def test_protocol_refuses_markers_on_real_data_and_picks_them_on_synthetic(self, exported_real, tmp_path):
        checkpoint, synth, real = exported_real
        for extra in ((), ("--detector", "markers")):
            with pytest.raises(ValueError, match="real video needs a hand detector: --detector mediapipe"):
                E.main(protocol_argv(checkpoint, real, tmp_path / "x", "--metrics", "psnr,pck", *extra))
        assert not list((tmp_path / "x").rglob("*.json"))  # refused before any rollout
        E.main(protocol_argv(checkpoint, real, tmp_path / "auto", "--metrics", "auto"))  # 'auto' leaves pck out
        (row,) = json.loads((tmp_path / "auto" / "report.json").read_text())["rows"].values()
        assert "psnr" in row and "pck@10" not in row
        E.main(protocol_argv(checkpoint, synth, tmp_path / "synth", "--metrics", "psnr,pck"))
        report = json.loads((tmp_path / "synth" / "report.json").read_text())
        assert report["config"]["detector"] == "markers" and "pck_gt@10" in next(iter(report["rows"].values()))

    # the cookbook's FVD: our I3D and frame protocol against cd-fvd
    def test_fvd_equals_cd_fvd_on_the_same_features(self):
        """The cookbook's Frechet step: cd-fvd's FeatureStats (covariance divided by N) and scipy sqrtm, against
        ours on the same 400-d features; the N - 1 covariance of FID/StyleGAN-V FVD differs measurably here."""
        from cdfvd.fvd import cdfvd
        from cdfvd.utils.metric_utils import FeatureStats
        g = np.random.default_rng(0)
        a, b = g.normal(size=(24, 400)), g.normal(size=(24, 400)) * 1.3 + 0.2
        stats = []
        for f in (a, b):
            st = FeatureStats(capture_mean_cov=True)
            st.append(f)
            stats.append(st)
        want = cdfvd.compute_fvd_from_stats(types.SimpleNamespace(), stats[0], stats[1])
        assert E.frechet_of("fvd", a, b) == pytest.approx(want, rel=1e-6)  # (cd-fvd: E[xx^T] - mu mu^T)
        assert abs(E.frechet_of("fid", a, b) - want) > 1e-3 * want

    def test_cookbook_fvd_scores_every_frame_with_the_cookbook_input(self, our_i3d):
        """Evaluator's fvd sees each whole clip, the conditioning frame included, through cookbook_i3d_input; the
        predicted frames alone go to the other metrics."""
        seen = []
        net = lambda x: seen.append(x) or torch.zeros(len(x), 400)
        net.parameters = our_i3d.parameters  # for the device
        pred, gt = eval_videos(4, B=2, T=9, H=24, W=40, noise=0.2)
        E.Evaluator(("psnr", "fvd"), i3d=net).add(pred, gt)
        assert [tuple(x.shape) for x in seen] == [(2, 3, 9, 224, 224)] * 2
        assert all(torch.equal(x, E.cookbook_i3d_input(E.as_unit(v))) for x, v in zip(seen, (pred, gt)))

    def test_registry_refuses_stand_ins_and_finds_the_lpips_heads_in_their_package(self, tmp_path, monkeypatch):
        """Random files under the registry's names are never taken for the real ones (sha256); the LPIPS heads come
        from the installed lpips package; offline, the one message names what is missing and what is wrong."""
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        alex, heads, _ = lpips_files(tmp_path)
        E.weights_dir().mkdir(parents=True)
        alex.rename(E.weights_dir() / alex.name)
        heads.rename(E.weights_dir() / heads.name)
        lpips_pkg = Path(importlib.import_module("lpips").__file__).parent / "weights" / "v0.1" / "alex.pth"
        assert E.resolve_weights("lpips") == str(lpips_pkg)  # the random alex.pth in the cache is passed over
        with pytest.raises(E.WeightsError) as e:
            E.load_networks(("psnr", "lpips", "fid", "fvd"), {})
        msg = str(e.value)
        assert "3 network file(s) missing" in msg and "the file there now has" in msg  # the random AlexNet
        for kind in ("alexnet", "inception", "i3d"):
            assert E.NETWORKS[kind].url in msg and str(E.weights_dir() / E.NETWORKS[kind].file) in msg

    def test_metrics_paper_is_an_error_offline_and_auto_names_what_it_left_out(self, exported, train_synth,
                                                                              tmp_path):
        """--metrics paper without the networks: one error listing them; auto: the rest runs, and report.json and
        the first line of table.md name what was left out."""
        argv = ["--checkpoint", str(exported), "--data", str(train_synth), "--horizon", "5", "--steps", "1",
                "--clips", "2", "--batch", "2", "--figure-clips", "0"]
        with pytest.raises(E.WeightsError, match=r"3 network file\(s\) missing"):
            E.main([*argv, "--metrics", "paper", "--out", str(tmp_path / "paper")])
        assert E.main([*argv, "--metrics", "auto", "--out", str(tmp_path / "auto")]) == 0
        report = json.loads((tmp_path / "auto" / "report.json").read_text())
        assert set(report["left_out"]) == {"lpips", "fid", "fvd"} and set(report["metrics"]) == {
            "psnr", "ssim", "latent_l2", "pck"}
        first = (tmp_path / "auto" / "table.md").read_text().splitlines()[0]
        assert first.startswith("Left out") and all(f"{m}:" in first for m in ("lpips", "fid", "fvd"))
        assert "i3d_pretrained_400.pt" in report["left_out"]["fvd"]

    def test_fetch_weights_downloads_verifies_and_is_offline_one_message(self, web, weights_cache, monkeypatch,
                                                                        capsys):
        """`evaluate.py fetch-weights` against a server on 127.0.0.1: each file of the asked metrics downloaded
        once and verified; offline, one message names both."""
        for kind, name in (("inception", "inception.pt"), ("i3d", "i3d.pt")):
            monkeypatch.setitem(E.NETWORKS, kind, replace(E.NETWORKS[kind], file=name, url=f"{web.url}/good/{name}",
                                                          sha256=FETCH_SHA, size=len(FETCH_PAYLOAD), found_in=()))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(E.WeightsError, match=r"2 network file\(s\) missing(.|\n)*inception.pt(.|\n)*i3d.pt"):
            E.main(["fetch-weights", "--metrics", "fid,fvd"])
        assert web.requests == []
        monkeypatch.delenv("HF_HUB_OFFLINE")
        for _ in range(2):
            assert E.main(["fetch-weights", "--metrics", "fid,fvd"]) == 0
        assert sorted(web.requests) == ["/good/i3d.pt", "/good/inception.pt"]  # once each
        assert sorted(os.listdir(weights_cache)) == ["i3d.pt", "inception.pt"] and "in place" in capsys.readouterr().out

    def test_dreamsim_through_its_package(self, tmp_path, monkeypatch):
        """A stand-in `dreamsim` package: its model gets each frame pair through the package's own preprocessing,
        with our cache folder; offline without its files, one error before the package is called; without the
        package, the pip command."""
        monkeypatch.setenv("DEXAC_WEIGHTS_DIR", str(tmp_path / "cache"))
        calls = []

        def dreamsim(pretrained, device, cache_dir, dreamsim_type):
            calls.append((cache_dir, dreamsim_type))
            prep = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None]
            return (lambda a, b: (a - b).abs().mean((1, 2, 3))), prep

        monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
        with pytest.raises(E.WeightsError, match="dreamsim: dino_vitb16_pretrain.pth.*dreamsim_ensemble_checkpoint"):
            E.DreamSim(offline=True)
        assert calls == []
        pred, gt = eval_videos(5, B=2, T=4, H=16, W=24, noise=0.2)
        clip = E.Evaluator(("dreamsim",), dreamsim=E.DreamSim(offline=False)).add(pred, gt)[0]
        assert calls == [(str(tmp_path / "cache" / "dreamsim"), "ensemble")]
        p, g = (v[0, :, 1:].float() / 255 if v.dtype == torch.uint8 else v[0, :, 1:] for v in (pred, gt))
        want = ((p * 255).round() - (g * 255).round()).abs().mean() / 255  # uint8 frames, as the package sees them
        assert clip["dreamsim"] == pytest.approx(want.item(), rel=1e-5)
        monkeypatch.setitem(sys.modules, "dreamsim", None)
        with pytest.raises(ImportError, match="pip install dreamsim"):
            E.DreamSim()


    @pytest.mark.parametrize("T", [9, 17])  # 9: the shortest clip, odd paddings; 17: two temporal positions averaged
    def test_network_matches_pytorch_i3d(self, our_i3d, ref_i3d, T):
        x = torch.rand(1, 3, T, 224, 224, generator=torch.Generator().manual_seed(T)) * 2 - 1  # batch 1: CPU time
        with torch.no_grad():
            want, got = ref_i3d(x), our_i3d(x)
        assert got.shape == want.shape == (1, 400)
        assert want.std() > 0.1  # non-trivial features
        err = rel_err(got, want)
        print(f"T={T}: max |our_i3d - ref_i3d| / max |ref_i3d| = {err:.2e}")
        assert err < 1e-5

    def test_short_clip_refused(self, our_i3d, ref_i3d):
        x = torch.zeros(1, 3, 8, 224, 224)
        with pytest.raises(RuntimeError):  # pytorch-i3d fails inside its (2, 7, 7) average pool
            ref_i3d(x)
        with pytest.raises(ValueError, match="T >= 9"):
            our_i3d(x)

    @pytest.mark.parametrize("size", [(48, 80), (300, 260)])  # (224x224 would not see the resize)
    def test_input_matches_cookbook(self, i3d_file, monkeypatch, size):
        """Our network input is bit-identical to the one cd-fvd builds in the cookbook's path (its compute_real_stats,
        which quantizes with .byte(), then its preprocess_i3d), for uint8 and for [0, 1] float videos."""
        from cdfvd.third_party.i3d.utils import preprocess_i3d
        evaluator, seen = cd_fvd(i3d_file, monkeypatch), []
        evaluator.feature_fn = lambda stats, model, videos, **kw: seen.append(preprocess_i3d(videos)) or stats
        videos, ours_in = videos_and_ours(size)
        evaluator.compute_real_stats([cookbook_steps(videos)])
        want = seen[0]
        assert torch.equal(E.cookbook_i3d_input(ours_in), want)
        assert torch.equal(E.cookbook_i3d_input(ours_in.float() / 255), want)

    def test_full_path_matches_cookbook(self, our_i3d, i3d_file, monkeypatch):
        videos, ours_in = videos_and_ours((48, 80))
        evaluator = cd_fvd(i3d_file, monkeypatch)
        evaluator.compute_real_stats([cookbook_steps(videos)])
        want = torch.from_numpy(evaluator.real_stats.get_all())
        with torch.no_grad():
            got = our_i3d(E.cookbook_i3d_input(ours_in))
        err = rel_err(got, want)
        print(f"48x80 -> 224: max |our_i3d - cookbook| / max |cookbook| = {err:.2e}")
        assert got.shape == want.shape == (2, 400) and err < 1e-5

    def test_published_layout_loads_strictly(self, our_i3d, ref_i3d):
        want = {k: tuple(v.shape) for k, v in ref_i3d.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in our_i3d.state_dict().items()} == want
        for k, v in ref_i3d.state_dict().items():
            assert torch.equal(our_i3d.state_dict()[k], v), k

    def test_file_without_bn_counters_loads(self, ref_i3d, tmp_path):
        path = tmp_path / "old.pt"
        torch.save({k: v for k, v in ref_i3d.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
        E.load_i3d(str(path))

    def test_wrong_file_one_clear_error(self, ref_i3d, tmp_path):
        sd = dict(ref_i3d.state_dict())
        sd["Mixed_4b.b1b.conv.weight"] = sd.pop("Mixed_4b.b1b.conv3d.weight")
        del sd["logits.conv3d.bias"]
        path = tmp_path / "renamed.pt"
        torch.save(sd, path)
        with pytest.raises(ValueError) as e:
            E.load_i3d(str(path))
        msg = str(e.value)
        assert "missing (2): Mixed_4b.b1b.conv3d.weight, logits.conv3d.bias" in msg
        assert "unexpected (1): Mixed_4b.b1b.conv.weight" in msg and "i3d_pretrained_400.pt" in msg
        torch.save(torch.nn.Conv3d(3, 64, 7), tmp_path / "module.pt")  # a pickled module, not a state dict
        with pytest.raises(hub.WeightsError):
            E.load_i3d(str(tmp_path / "module.pt"))

    # export, then compare --manifest: other models' videos scored on our clips

    def test_export_holds_the_protocols_clips(self, export_dir, train_synth, manifest_protocol):
        """Same clips, order, episode, start, family as the protocol scored; each file as data.load_clip gives it."""
        _, _, per_clip, _ = manifest_protocol
        m = E.read_manifest(export_dir)
        assert [(c["index"], c["episode"], c["start"]) for c in m["clips"]] == \
               [(i, c["episode"], c["start"]) for i, c in sorted(per_clip.items())]
        assert [c["family"] for c in m["clips"]] == [c["family"] for _, c in sorted(per_clip.items())]
        assert len({c["family"] for c in m["clips"]}) > 1  # a wrong family could show
        episodes, plan = E.eval_plan(train_synth, EXPORT_HORIZON)
        for c, (e, s) in zip(m["clips"], plan):
            clip = data.load_clip(episodes[e], int(s), EXPORT_HORIZON, EXPORT_SIZE)
            video = clip["video"].permute(1, 2, 3, 0).numpy()
            d = export_dir / c["name"]
            first = np.asarray(Image.open(d / "first.png"))
            assert np.array_equal(first, video[0])
            got = {k: np.load(d / f) for k, f in (("video", "video.npy"), ("actions", "actions.npy"),
                                                 ("keypoints", "keypoints.npy"), ("valid", "keypoint_valid.npy"))}
            assert got["video"].dtype == np.uint8 and np.array_equal(got["video"], video)
            assert got["actions"].dtype == np.float32 and got["actions"].shape == (EXPORT_HORIZON - 1, 57)
            assert np.array_equal(got["actions"], clip["actions"].numpy())
            assert np.array_equal(got["keypoints"], clip["keypoints"].numpy())
            assert np.array_equal(got["valid"], clip["keypoint_valid"].numpy())
            assert (d / "prompt.txt").read_text() == clip["prompt"] == c["prompt"]

    def test_manifest_round_trip(self, export_dir, train_synth):
        m = E.read_manifest(export_dir)
        assert m == {**json.loads((export_dir / "manifest.json").read_text()), "dir": str(export_dir)}
        assert (m["version"], m["horizon"], m["frames"], m["size"], m["splits"], m["cond_frames"]) == \
               (E.EXPORT_VERSION, EXPORT_HORIZON, EXPORT_HORIZON, list(EXPORT_SIZE), ["test"], 1)
        assert m["data"] == str(train_synth.resolve()) and m["synthetic"] is True and m["episodes"] == 2
        mean, std = data.load_stats(train_synth / "stats.json")
        assert m["action_stats"]["mean"] == mean.tolist() and m["action_stats"]["std"] == std.tolist()
        assert all(set(c["files"]) == set(E.EXPORT_FILES) and all((export_dir / f).is_file()
                                                                  for f in c["files"].values()) for c in m["clips"])

    def test_export_again_reuses_every_clip_and_resumes_a_missing_one(self, export_dir, train_synth, monkeypatch,
                                                                      tmp_path):
        export_dir = Path(shutil.copytree(export_dir, tmp_path / "clips"))
        before = (export_dir / "manifest.json").read_text()
        calls = []
        real = data.load_clip
        monkeypatch.setattr(data, "load_clip", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
        argv = ["export", "--data", str(train_synth), "--out", str(export_dir), "--horizon", str(EXPORT_HORIZON),
                "--height", str(EXPORT_SIZE[0]), "--width", str(EXPORT_SIZE[1])]
        assert E.main(argv) == 0 and calls == []
        (export_dir / "00003" / "clip.json").unlink()
        (export_dir / "00003" / "video.npy").write_bytes(b"half a file")
        assert E.main(argv) == 0 and len(calls) == 1
        assert (export_dir / "manifest.json").read_text().replace(str(tmp_path / "clips"), "") == before
        np.load(export_dir / "00003" / "video.npy")
        with pytest.raises(ValueError, match="other settings"):
            E.main([*argv[:-4], "--height", "32", "--width", "64"])

    def test_corrupt_episode_is_recorded_as_skipped_and_reported(self, train_synth, tmp_path, exported):
        root = tmp_path / "data"
        shutil.copytree(train_synth, root)
        bad = sorted((root / "test").rglob("*.mp4"))[0]
        episodes, plan = E.eval_plan(root, EXPORT_HORIZON)
        n_bad = sum(Path(episodes[e].path).with_suffix(".mp4") == bad for e, _ in plan)
        bad.write_bytes(bad.read_bytes()[:2000])  # truncated after indexing
        m = E.export_clips(root, tmp_path / "clips", horizon=EXPORT_HORIZON, size=EXPORT_SIZE)
        skipped = [c for c in m["clips"] if "skipped" in c]
        assert len(skipped) == n_bad > 0 and len(m["clips"]) == len(plan)
        gts = {c["name"]: np.load(tmp_path / "clips" / c["files"]["video"]) for c in m["clips"] if "skipped" not in c}
        rep = compare_manifest_cli(tmp_path / "clips", pred_folder(tmp_path / "gt", gts), tmp_path / "ev",
                                   metrics="psnr")
        (row,) = rep["rows"].values()
        assert row["clips"] == len(plan) - n_bad and len(row["skipped"]) == n_bad

    def test_unfinished_export_and_missing_stats_are_clear_errors(self, tmp_path, train_synth):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "settings.json").write_text("{}")
        with pytest.raises(ValueError, match="did not finish"):
            E.read_manifest(tmp_path / "x")
        with pytest.raises(ValueError, match="--stats"):
            E.export_clips(train_synth, tmp_path / "y", horizon=EXPORT_HORIZON, size=EXPORT_SIZE,
                           stats=tmp_path / "none.json")

    def test_our_rollouts_score_as_in_the_protocol(self, manifest_protocol, export_dir, tmp_path):
        """The key check: the protocol's own rollouts, scored through export + compare --manifest, give its
        per-clip scores and its report exactly."""
        out, row, per_clip, rollouts = manifest_protocol
        assert sorted(rollouts) == sorted(per_clip)  # every rollout was kept
        pred = pred_folder(tmp_path / "ours", {f"{i:05d}": v for i, v in rollouts.items()})
        rep = compare_manifest_cli(export_dir, pred, tmp_path / "ev")
        assert same_report(rep["rows"]["ours"], row)
        assert row["pck@20"] is not None and row["pck_gt@20"] > 0  # PCK is defined: some markers are found
        mine = {int(f.stem): json.loads(f.read_text()) for f in sorted((tmp_path / "ev" / "ours" / "clips")
                                                                       .glob("*.json"))}
        assert same_report(mine, {i: {k: v for k, v in c.items() if k != "seed"} for i, c in per_clip.items()})
        table = (tmp_path / "ev" / "table.md").read_text()
        ref = (out / "table.md").read_text().replace(only_run(out).name, "ours")
        rows = lambda t: [line for line in t.splitlines() if line.startswith("|")]
        assert rows(table) == rows(ref)  # the same cells; the header lines differ (no carry, latent L2 left out)
        assert "latent_l2: " + E.NO_LATENTS in table and rep["left_out"] == {"latent_l2": E.NO_LATENTS}
        assert "carry" not in table and "compare --manifest" in table

    def test_ground_truth_as_prediction_scores_the_ceiling(self, export_dir, tmp_path):
        rep = compare_manifest_cli(export_dir, pred_folder(tmp_path / "gt", gt_videos(export_dir)), tmp_path / "ev")
        r = rep["rows"]["gt"]
        assert r["psnr"] == E.PSNR_CAP and r["ssim"] == pytest.approx(1)
        assert all(r[f"pck@{k:g}"] == r[f"pck_gt@{k:g}"] for k in E.PCK_THRESHOLDS)
        assert r["pck_against"] == "annotations" and set(r["families"]) == set(E.FAMILIES)

    def test_rows_of_several_folders(self, export_dir, tmp_path):
        gts = gt_videos(export_dir)
        a = pred_folder(tmp_path / "a", gts)
        b = pred_folder(tmp_path / "b", {n: np.roll(v, 1, axis=2) for n, v in gts.items()})
        rep = compare_manifest_cli(export_dir, [a, b], tmp_path / "ev", metrics="psnr")
        assert list(rep["rows"]) == ["a", "b"] and rep["rows"]["a"]["psnr"] > rep["rows"]["b"]["psnr"]
        assert "| b | " in (tmp_path / "ev" / "table.md").read_text()

    def test_frame_count_mismatch_is_one_error_and_trim_fixes_longer_videos(self, export_dir, tmp_path):
        gts = gt_videos(export_dir)
        longer = pred_folder(tmp_path / "longer", {n: np.concatenate([v, v[-1:]]) for n, v in gts.items()})
        with pytest.raises(ValueError, match=rf"clip 00000: .* has {EXPORT_HORIZON + 1} frames, expected "
                                             rf"{EXPORT_HORIZON}: "
                                             rf"pass --trim"):
            compare_manifest_cli(export_dir, longer, tmp_path / "ev")
        exact = compare_manifest_cli(export_dir, pred_folder(tmp_path / "exact", gts), tmp_path / "ev0")
        exact = exact["rows"]["exact"]
        assert compare_manifest_cli(export_dir, longer, tmp_path / "ev1", "--trim")["rows"]["longer"] == exact
        shorter = pred_folder(tmp_path / "shorter", {n: v[1:] for n, v in gts.items()})
        with pytest.raises(ValueError, match=r"expected 5 \(the given first frame, 00000/first.png"):
            compare_manifest_cli(export_dir, shorter, tmp_path / "ev2", "--trim")

    def test_size_mismatch_is_one_error_and_resize_fixes_it(self, export_dir, tmp_path):
        gts = gt_videos(export_dir)
        big = pred_folder(tmp_path / "big", {n: v.repeat(2, 1).repeat(2, 2) for n, v in gts.items()})
        with pytest.raises(ValueError, match=r"clip 00000: .* is 128x224, expected the manifest's 64x112: pass "
                                             r"--resize \(stretched to 64x112, bicubic"):
            compare_manifest_cli(export_dir, big, tmp_path / "ev")
        r = compare_manifest_cli(export_dir, big, tmp_path / "ev1", "--resize")
        assert r["config"]["resize"] == E.RESIZE_FILTER and 30 < r["rows"]["big"]["psnr"] < E.PSNR_CAP
        flat = torch.full((1, 3, 2, 9, 13), 0.25)
        assert torch.allclose(E.resize_video(flat, (4, 6)), torch.full((1, 3, 2, 4, 6), 0.25))

    def test_missing_videos_are_one_error_naming_them(self, export_dir, tmp_path):
        gts = gt_videos(export_dir)
        pred = pred_folder(tmp_path / "p", {n: v for n, v in gts.items() if n not in ("00002", "00005")})
        with pytest.raises(ValueError, match=r"lacks the predicted videos of 2 of the manifest's \d+ clips: "
                                             r"00002, 00005"):
            compare_manifest_cli(export_dir, pred, tmp_path / "ev")
        assert not (tmp_path / "ev").exists()  # refused before any work

    def test_only_valid_keypoints_count(self, export_dir, tmp_path):
        clips = Path(shutil.copytree(export_dir, tmp_path / "clips"))
        valid = np.load(clips / "00000" / "keypoint_valid.npy")
        assert valid[1:].sum() > 12
        valid[:, :6] = False  # the left hand not annotated
        np.save(clips / "00000" / "keypoint_valid.npy", valid)
        compare_manifest_cli(clips, pred_folder(tmp_path / "gt", gt_videos(clips)), tmp_path / "ev", metrics="pck")
        score = json.loads((tmp_path / "ev" / "gt" / "clips" / "00000.json").read_text())
        assert score["pck_count"] == valid[1:].sum()  # the given frame is not scored

    def test_stale_features_in_out_are_not_reported(self, export_dir, tmp_path):
        """A rerun into the same --out without fid must not report an FID from the last run's feature files."""
        d = tmp_path / "ev" / "gt" / "clips"
        d.mkdir(parents=True)
        n = len(E.read_manifest(export_dir)["clips"])
        for i in range(n):
            np.savez(d / f"{i:05d}.npz", fid_pred=np.random.rand(3, 4), fid_gt=np.random.rand(3, 4))
        rep = compare_manifest_cli(export_dir, pred_folder(tmp_path / "gt", gt_videos(export_dir)), tmp_path / "ev",
                      metrics="psnr")
        assert "fid" not in rep["rows"]["gt"]

    def test_mp4_predictions_are_read(self, export_dir, tmp_path):
        (tmp_path / "mp4").mkdir()
        for n, v in gt_videos(export_dir).items():
            data.write_video(tmp_path / "mp4" / f"{n}.mp4", v, crf=0)
        r = compare_manifest_cli(export_dir, tmp_path / "mp4", tmp_path / "ev", metrics="psnr")["rows"]["mp4"]
        assert r["psnr"] > 35  # yuv420p, lossy in colour only

    def test_command_line_errors(self, export_dir, tmp_path):
        pred = pred_folder(tmp_path / "p", gt_videos(export_dir))
        with pytest.raises(ValueError, match="latent_l2 needs the model's latents"):
            compare_manifest_cli(export_dir, pred, tmp_path / "ev", metrics="psnr,latent_l2")
        with pytest.raises(ValueError, match="--gt and --manifest"):
            E.main(["compare", "--manifest", str(export_dir), "--pred", str(pred), "--gt", str(pred)])
        with pytest.raises(ValueError, match="--out"):
            E.main(["compare", "--manifest", str(export_dir), "--pred", str(pred)])
        with pytest.raises(ValueError, match="need it"):
            E.main(["compare", "--pred", str(pred), "--gt", str(pred), "--trim"])
        with pytest.raises(ValueError, match="no manifest.json"):
            E.main(["compare", "--manifest", str(tmp_path), "--pred", str(pred), "--out", str(tmp_path / "o")])
        m = json.loads((export_dir / "manifest.json").read_text())
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "manifest.json").write_text(json.dumps({**m, "synthetic": False}))
        with pytest.raises(ValueError, match="hand detector"):
            E.compare_manifest(tmp_path / "m", [pred], tmp_path / "o", metrics="pck")

    def test_plain_compare_still_works(self, export_dir, tmp_path):
        gts = gt_videos(export_dir)
        a, b = pred_folder(tmp_path / "a", gts), pred_folder(tmp_path / "b", gts)
        assert E.main(["compare", "--pred", str(a), "--gt", str(b), "--out", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["psnr"] == E.PSNR_CAP


# =====================================================================================================================
# miniature.py: the conditioning-mode experiment, end to end at a toy budget

class TestMiniature:
    """The conditioning-mode experiment: seeds, modes, shuffled-action controls, the table, plot and resume."""

    def test_figure_labels_drop_the_parts_every_row_shares(self):
        rows = ["000-tiny-dexac-no-local-48x80", "000-tiny-dexac-no-global-48x80 (shuffled actions)",
                "000-tiny-mlp-48x80"]
        assert E.short_labels(rows) == ["dexac-no-local", "dexac-no-global (s", "mlp"]
        assert E.short_labels(["001-tiny-dexac-64x112"]) == ["001-tiny-dexac-64x"]  # one row: only cut

    def test_each_variant_fine_tunes_the_base_of_its_backbone(self):
        """The IRASim rows start from an IRASim base, the others from the Cosmos one, whose flags are those of
        earlier miniature.py versions (so that its cached base stays valid); every variant's flags parse."""
        import miniature
        args = types.SimpleNamespace(out="o", data="d", base_steps=5, steps=3, finetune_lr=1e-4, eval_every=0,
                                     train_args=[])
        for mode in miniature.VARIANTS:
            argv = miniature.train_argv(mode, 0, args)
            base = "base-irasim" if mode.startswith("irasim") else "base"
            assert argv[argv.index("--init") + 1] == str(Path("o") / base / "model.safetensors"), mode
            assert train.parse_args(argv)[0].backbone == miniature.backbone_of(mode)
        assert miniature.base_argv(args)[:4] == ["--data", "d", "--action-mode", "none"]
        assert miniature.base_argv(args, "irasim")[:2] == ["--backbone", "irasim"]

    def test_fine_tuning_from_a_trained_base_changes_nothing_at_step_0(self, train_synth, tmp_path):
        """The paper's regime (miniature.py): a base trained without actions, then every variant built on it as
        train.py builds it (--init, the variant's flags; all of miniature.VARIANTS, the normalization ablations
        included, on an IRASim base for the IRASim ones). At step 0 each gives the base's output bit for bit,
        whatever the actions, though the base's zero-initialized layers (adaLN-Zero, the output layer) have moved
        in training; all but IRASim as released, whose Frame-Ada embedding has no zero initialization."""
        import miniature
        run_train(["--data", train_synth, "--out", tmp_path / "runs", "--action-mode", "none", "--steps", 3,
                   "--batch-size", 2, "--micro-batch", 2, "--export-dtype", "fp32", "--ema", 0])
        base_file = only_run(tmp_path / "runs") / "model.safetensors"
        base, _ = M.load_exported(base_file)
        assert base.action_cond is None and base.final.linear.weight.abs().max() > 0
        assert min(b.mod_mlp.up.weight.abs().max() for b in base.blocks) > 0
        g = torch.Generator().manual_seed(0)
        c = base.config
        x, sigma = torch.randn(2, c.in_channels, 2, 4, 8, generator=g), torch.rand(2, generator=g)
        text, mask = torch.zeros(2, 16, c.text_dim), torch.tensor([[1.0, 0]]).expand(2, 2)
        with torch.no_grad():
            want = base(x, sigma, text, mask)
        stats = [torch.as_tensor(v, dtype=torch.float32) for v in data.load_stats(train_synth / "stats.json")]
        # the IRASim variants' base, trained the same way
        ira_file = run_train([*IRASIM_ARGS, "--data", train_synth, "--out", tmp_path / "ira", "--action-mode", "none",
                              "--steps", 3, "--batch-size", 2, "--micro-batch", 2, "--export-dtype", "fp32", "--ema",
                              0]) / "model.safetensors"
        ira_base, _ = irasim.load_exported(str(ira_file))
        assert ira_base.final_layer.linear.weight.abs().max() > 0
        xi, ti = torch.randn(2, ira_base.config.in_channels, 5, 4, 8, generator=g), torch.tensor([40, 800])
        with torch.no_grad():
            ira_want = ira_base(xi, ti)
        for name, flags in miniature.VARIANTS.items():
            ira = miniature.backbone_of(name) == "irasim"
            extra = IRASIM_ARGS if ira else []
            cfg, _ = train.parse_args(["--data", str(train_synth), *TRAIN_ARGS, *extra, *flags, "--init",
                                       str(ira_file if ira else base_file)])
            channels = ira_base.config.in_channels if ira else c.in_channels
            model = train.build_model(cfg, train.model_config(cfg, channels), torch.device("cpu")).eval()
            if cfg.trainable == "lora+new":  # as train.build does
                lora.inject(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
            if model.action_cond is not None:
                model.action_cond.set_stats(*stats)
            actions = stats[0] + stats[1] * 3 * torch.randn(2, 4, conditioning.ACTION_DIM, generator=g)
            with torch.no_grad():
                if not ira:
                    assert torch.equal(model(x, sigma, text, mask, actions=actions), want), name
                elif cfg.action_mode != "frame-ada":
                    assert torch.equal(model(xi, ti, actions), ira_want), name
                else:  # IRASim as released: Frame-Ada's embedding has no zero init, so it moves the base at once
                    assert not torch.equal(model(xi, ti, actions), ira_want), name

    @pytest.mark.slow
    def test_sigterm_stops_the_runs_at_a_checkpoint_and_counts_their_time(self, train_synth, tmp_path):
        """SIGTERM to miniature.py alone (not its process group): the running train.py gets it too, finishes its
        step, checkpoints and exits; the attempt's wall clock is added to train_seconds.txt (it used to be lost,
        so a resumed run reported only its last attempt's minutes); miniature.py exits 130 saying how to go on."""
        root = tmp_path / "data"
        shutil.copytree(train_synth, root)
        cmd = [sys.executable, os.path.join(HERE, "miniature.py"), "--out", str(tmp_path / "mini"), "--data",
               str(root), "--modes", "mlp", "--base-steps", "1000", "--steps", "3", *TRAIN_ARGS, "--batch-size", "2",
               "--micro-batch", "2"]
        env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        base = tmp_path / "mini" / "base"
        deadline = time.time() + 120
        while not list(base.glob("*/loss.png")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "the same command resumes" in err, (out[-2000:], err[-2000:])
        log = (base / "train.log").read_text()
        assert "signal SIGTERM" in log and "continue with" in log
        (ckpt,) = only_run(base).joinpath("checkpoints").iterdir()
        assert 1 <= json.loads((ckpt / "meta.json").read_text())["step"] < 1000
        assert float((base / "train_seconds.txt").read_text()) > 0
        assert not (tmp_path / "mini" / "seed0").exists()  # nothing started after the signal

    @pytest.mark.slow
    def test_miniature_experiment_trains_evaluates_and_summarizes(self, train_synth, tmp_path, monkeypatch):
        """One toy experiment (a 2-step base, then 2 seeds x 2 variants fine-tuned 3 steps each, exported at step
        2 too) checked several ways: each row's mean over seeds and its gap to the shuffled control equal those of
        the per-clip files, with standard errors over seeds x clips; the gap along fine-tuning is the paired gap
        of the step-2 exports' clips; every run starts from the one base; the Markdown tables and the figures
        are written; a second run trains nothing again."""
        import miniature
        from PIL import Image
        root = tmp_path / "data"
        shutil.copytree(train_synth, root)
        argv = ["--out", str(tmp_path / "mini"), "--data", str(root), "--seeds", "0", "1", "--modes", "mlp", "dexac",
                "--base-steps", "2", "--steps", "3", "--eval-every", "2", "--horizon", "9", "--clips", "2",
                "--sample-steps", "1", "--metrics", "psnr,latent_l2", "--device", "cpu",
                *TRAIN_ARGS, "--batch-size", "2", "--micro-batch", "2"]  # TRAIN_ARGS' 32x64 overrides miniature.SIZE
        devices, protocol = [], E.protocol
        monkeypatch.setattr(E, "protocol", lambda cfg: devices.append(cfg.device) or protocol(cfg))
        table = miniature.main(argv)
        assert devices and set(devices) == {"cpu"}  # --device reaches the evaluation as well as every run
        out = tmp_path / "mini"
        results = json.loads((out / "results.json").read_text())
        assert set(results["per_seed"]) == {"0", "1"}
        for mode in ("mlp", "dexac"):  # the mean over seeds of each row, and the gap to its shuffled control
            mine = [results["per_seed"][s][mode]["true"] for s in ("0", "1")]
            ctrl = [results["per_seed"][s][mode]["shuffled"] for s in ("0", "1")]
            per_clip = {}
            for s, m, c in zip((0, 1), mine, ctrl):  # each mode's rows are that model's clips
                for kind, report, row in (("true", m, mode), ("shuffled", c, f"{mode} (shuffled actions)")):
                    clips = sorted((out / f"seed{s}" / "eval-h9-n2-k1" / row / "clips").glob("*.json"))
                    l2 = [json.loads(f.read_text())["latent_l2"] for f in clips]
                    per_clip.setdefault(kind, []).extend(l2)
                    assert report["latent_l2"] == pytest.approx(np.mean(l2)) and len(l2) == 2
            assert table[mode]["psnr"][0] == pytest.approx(np.mean([m["psnr"] for m in mine]))
            assert table[mode]["latent_l2 gap"][0] == pytest.approx(
                np.mean([m["latent_l2"] - c["latent_l2"] for m, c in zip(mine, ctrl)]))
            assert table[mode]["latent_l2 gap"][0] != 0  # trained 2 steps (after lr 0): the actions matter a bit
            diff = np.subtract(per_clip["true"], per_clip["shuffled"])  # standard errors over 2 seeds x 2 clips
            assert table[mode]["latent_l2 gap"][1] == pytest.approx(diff.std(ddof=1) / 2)
            assert table[mode]["latent_l2"][1] == pytest.approx(np.std(per_clip["true"], ddof=1) / 2)
            seed_gaps = [m["latent_l2"] - c["latent_l2"] for m, c in zip(mine, ctrl)]  # the spread of training
            assert table[mode]["latent_l2 gap over seeds"] == pytest.approx(
                (np.mean(seed_gaps), np.std(seed_gaps, ddof=1) / np.sqrt(2)))
            psnr = [m["psnr"] for m in mine]
            assert table[mode]["psnr over seeds"] == pytest.approx((np.mean(psnr), np.std(psnr, ddof=1) / np.sqrt(2)))
            assert all(float((out / f"seed{s}" / mode / "train_seconds.txt").read_text()) > 0 for s in (0, 1))
            pooled = []  # the gap at step 2, pooled over seeds, from the step-2 exports' clip files
            for s in (0, 1):
                rows = out / f"seed{s}" / "curves-h9-n2-k1" / mode
                t, c = ([json.loads(f.read_text())["latent_l2"] for f in sorted(
                    (rows / name / "clips").glob("*.json"))] for name in ("step_0000002",
                                                                          "step_0000002 (shuffled actions)"))
                assert len(t) == len(c) == 2
                pooled += list(np.subtract(t, c))
            assert results["curves"][mode]["2"]["latent_l2"] == pytest.approx(
                [np.mean(pooled), np.std(pooled, ddof=1) / 2])
            assert results["curves"][mode]["3"]["latent_l2"][0] == pytest.approx(np.mean(diff))
            base = json.loads((out / "base" / "settings.json").read_text())["train_argv"]
            assert base[base.index("--action-mode") + 1] == "none"
            for s in (0, 1):
                argv_s = json.loads((out / f"seed{s}" / mode / "settings.json").read_text())["train_argv"]
                assert argv_s[argv_s.index("--device") + 1] == "cpu"
                assert argv_s[argv_s.index("--init") + 1] == str(miniature.base_export(
                    type("A", (), {"out": str(out)})()))
        assert table["mlp"]["latent_l2"] != table["dexac"]["latent_l2"]
        def records(s, row):  # {clip index: clip record} of one evaluated row
            return {r["index"]: r for r in (json.loads(f.read_text()) for f in (
                out / f"seed{s}" / "eval-h9-n2-k1" / row / "clips").glob("*.json"))}
        files = lambda s, row: {i: r["latent_l2"] for i, r in records(s, row).items()}
        diff, gap_diff = [], []  # mlp minus dexac (the default reference), matched by seed and clip
        for s in (0, 1):
            (m, ms), (d, ds) = ((files(s, v), files(s, f"{v} (shuffled actions)")) for v in ("mlp", "dexac"))
            assert len(m) == 2 and m.keys() == d.keys() == ms.keys() == ds.keys()
            diff += [m[i] - d[i] for i in m]
            gap_diff += [(m[i] - ms[i]) - (d[i] - ds[i]) for i in m]
        versus = results["versus"]
        assert versus["reference"] == "dexac" and set(versus["table"]) == {"mlp"}
        assert versus["table"]["mlp"]["latent_l2"] == pytest.approx([np.mean(diff), np.std(diff, ddof=1) / 2])
        assert versus["table"]["mlp"]["latent_l2 gap"] == pytest.approx(
            [np.mean(gap_diff), np.std(gap_diff, ddof=1) / 2])
        assert versus["table"]["mlp"]["latent_l2 gap"][0] != 0
        by_family = {}  # mlp's psnr gap per action family, clips of both seeds, from the clip files
        for s in (0, 1):
            t, c = records(s, "mlp"), records(s, "mlp (shuffled actions)")
            for i in t:
                by_family.setdefault(t[i]["family"], []).append(t[i]["psnr"] - c[i]["psnr"])
        gaps = table["mlp"]["family gaps"]
        assert sum(g["clips"] for g in gaps.values()) == 4 and by_family
        for f, g in by_family.items():
            assert gaps[f]["clips"] == len(g) and gaps[f]["psnr"][0] == pytest.approx(np.mean(g))
        md = (out / "results.md").read_text()
        families = {mode: sum(g["clips"] > 0 for g in table[mode]["family gaps"].values()) for mode in table}
        assert families["mlp"] == len(by_family) and f"| mlp | {f} ({len(g)}) |" in md  # a row per family seen
        assert md.count("| dexac |") == 6 + families["dexac"] and md.count("| mlp |") == 7 + families["mlp"]
        assert "| variant - dexac |" in md and "Gap = true minus shuffled" in md and "along fine-tuning" in md
        assert "over the 2 seeds" in md
        assert Image.open(out / "results.png").size == (600, 284)  # a panel per metric
        assert Image.open(out / "curves.png").size == (800, 360)
        exports = {f: f.stat().st_mtime_ns for f in out.rglob("*.safetensors")}
        miniature.main(argv + ["--curves", "mlp"])  # everything done: nothing is trained again
        assert set(json.loads((out / "results.json").read_text())["curves"]) == {"mlp"}  # dexac's curve left out
        more = miniature.main(argv + ["--clips", "3", "--curves"])  # another evaluation setting: its own folder
        assert all(len(list((out / f"seed{s}" / "eval-h9-n3-k1" / m / "clips").glob("*.json"))) == 3
                   for s in (0, 1) for m in ("mlp", "dexac (shuffled actions)"))
        assert more["mlp"]["psnr"] != table["mlp"]["psnr"]  # 3 clips, not 2
        assert "along fine-tuning" not in (out / "results.md").read_text() and not (out / "curves.png").exists()
        # the base (its run's export, and the same file as base/model.safetensors), 4 runs' final and step-2 exports
        assert len(exports) == 2 + 4 * 2 and {f: f.stat().st_mtime_ns for f in out.rglob("*.safetensors")} == exports


# =====================================================================================================================
# analysis.py: the paper's analysis figures (2, 3, 7, 8-9) from a trained checkpoint


def still_by_hand():
    """(57,) the still action from the action names alone: 1 on the r00 and r11 entries of every 6D rotation."""
    return np.array([float(n.endswith((".r00", ".r11"))) for n in conditioning.ACTION_NAMES])


def fake_run(folder, mode, losses):
    """A train.py-like run directory: config.json with the action mode, metrics.jsonl with one loss per step."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"action_mode": mode}, "model": {}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": k + 1, "loss": v}) + "\n"
                                                  for k, v in enumerate(losses)))
    return folder


def as_mlp_flat_export(export, path):
    """The export's model rebuilt with action_mode mlp-flat (random embedder output, the export's statistics),
    written as train.py writes an export."""
    dit, info = M.load_exported(export)
    cfg = replace(dit.config, action_mode="mlp-flat")
    torch.manual_seed(0)
    m = M.DiT(cfg)
    m.action_cond.set_stats(np.array(info["action_stats"]["mean"], np.float32),
                            np.array(info["action_stats"]["std"], np.float32), conditioning.action_layout())
    nn.init.normal_(m.action_cond.embed_d.fc2.weight, std=0.1)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    meta = {**info, "model_config": json.loads(json.dumps(asdict(cfg))), "sha256": hub.tensors_sha256(sd)}
    save_file(sd, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


class TestAnalysis:
    """analysis.py on a tiny trained export: the command's outputs, and each figure's numbers against a direct
    computation (numpy medians, the conditioning module's emb_d and the DiT's AdaLN input, an eigh PCA)."""

    def test_analysis_command_writes_its_figures_from_a_tiny_trained_checkpoint(self, small_export, small_synth,
                                                                                tmp_path):
        out = tmp_path / "figures"
        analysis.main(["--checkpoint", str(small_export), "--data", str(small_synth), "--out", str(out),
                       "--runs", str(small_export.parent), "--clips", "6"])
        pngs = ["fig2_action_magnitudes.png", "fig3_loss_curves.png", "fig7_action_embedding.png",
                "fig8_sat_pca.png", "fig9_sat_tsne.png"]
        for name in pngs:
            with Image.open(out / name) as img:
                img.verify()  # a complete, undamaged PNG
            with Image.open(out / name) as img:
                assert img.format == "PNG" and min(img.size) >= 200, (name, img.format, img.size)
        numbers = json.loads((out / "numbers.json").read_text())
        mags = numbers["magnitudes"]
        assert len(mags["median"]) == conditioning.ACTION_DIM and mags["clips"] == 6
        values = mags["median"] + list(mags["family_median"].values()) + numbers["pca_explained"]["tokens"]
        assert np.isfinite(values).all() and max(mags["median"]) > 0
        assert set(mags["family_median"]) == set(conditioning.ACTION_FAMILIES)
        index = (out / "figures.md").read_text()
        assert all(name in index for name in pngs + ["numbers.json"]) and "skipped" not in index

    def test_analysis_reads_an_irasim_dexac_checkpoint(self, train_synth, tmp_path):
        """Figures 7-9 for IRASim + DexAC (one action per frame, emb_d per latent frame); --along reads a rectified
        flow's velocity, so an IRASim run is skipped with its reason in figures.md."""
        run = run_train([*IRASIM_ARGS, "--data", train_synth, "--steps", 2, "--batch-size", 2, "--micro-batch", 2,
                         "--lr", "1e-2", "--out", tmp_path / "runs"])
        out = tmp_path / "figures"
        analysis.main(["--checkpoint", str(run / "model.safetensors"), "--data", str(train_synth), "--out", str(out),
                       "--clips", "4", "--along"])
        for name in ("fig7_action_embedding.png", "fig8_sat_pca.png", "fig9_sat_tsne.png"):
            with Image.open(out / name) as img:
                assert img.format == "PNG" and min(img.size) >= 200, name
        numbers = json.loads((out / "numbers.json").read_text())
        assert numbers["mode"] == "dexac" and np.isfinite(numbers["pca_explained"]["tokens"]).all()
        assert "skipped `fig_action_use.png`: no --runs run is a Cosmos run" in (out / "figures.md").read_text()

    def test_magnitudes_equal_a_direct_numpy_computation(self, small_synth):
        clips = analysis.load_clips(small_synth, 5, n_clips=5)
        assert len(clips.actions) == 5 and all(e.startswith("part1/") for e in clips.episodes)  # training clips
        episodes, _ = data.load_index(small_synth, data.TRAIN_SPLITS)
        for a, eid, start in zip(clips.actions, clips.episodes, clips.starts):  # the same clips, read with video
            (ep,) = [e for e in episodes if e.id == eid and e.start <= start < e.start + e.frames]
            ref = data.load_clip(ep, start - ep.start, 5, (32, 64))["actions"].numpy()
            np.testing.assert_array_equal(a, ref)
        mag, numbers = analysis.magnitudes(clips.actions)
        direct = np.abs(clips.actions.astype(np.float64) - still_by_hand()).reshape(-1, 57)  # (5 clips x 4, 57)
        np.testing.assert_allclose(mag, direct, rtol=0, atol=1e-12)
        np.testing.assert_allclose(numbers["median"], np.median(direct, axis=0), rtol=1e-12)
        for family, idx in conditioning.ACTION_FAMILIES.items():
            np.testing.assert_allclose(numbers["family_median"][family], np.median(direct[:, list(idx)]), rtol=1e-12)
        assert numbers["family_median"]["wrist"] != numbers["family_median"]["finger"]

    def test_embedding_heatmap_is_the_emb_d_that_enters_the_adaln(self, small_export, small_synth):
        dit, info = M.load_exported(small_export, dtype=torch.float32)
        torch.manual_seed(0)
        nn.init.normal_(dit.action_cond.glob.to_d.weight, std=0.5)  # 2 steps leave the zero-init output ~zero
        clips = analysis.load_clips(small_synth, info["train_config"]["frames"], n_clips=6)
        e = analysis.embeddings(dit, info, clips, top_k=8)
        B, T_lat = len(clips.actions), 2  # 5 frames: 1 + 4 / 4 latent frames
        actions = torch.from_numpy(clips.actions)
        mask = torch.zeros(B, T_lat)
        mask[:, 0] = 1
        x = torch.randn(B, T_lat, 2, 3, dit.config.dim)  # other latents than analysis.probe's: emb_d ignores them
        _, emb_d, _ = dit.action_cond(actions, x, mask)
        np.testing.assert_allclose(e["emb_d"], emb_d.numpy(), rtol=1e-5, atol=1e-6)
        assert not e["emb_d"][:, 0].any() and np.abs(e["emb_d"][:, 1]).max() > 1e-3  # zero on the condition frame
        # the same term is what the DiT adds to the timestep sinusoid before its AdaLN norm
        seen = []
        hook = dit.t_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        c = dit.config
        sigma = torch.full((B,), 0.5)
        dit(torch.randn(B, c.in_channels, T_lat, 2 * c.patch_spatial, 2 * c.patch_spatial), sigma,
            torch.zeros(B, 3, c.text_dim), mask, actions=actions)
        hook.remove()
        added = seen[0] - M.timestep_sinusoid(sigma[:, None].expand(B, T_lat) * 1000 * c.timestep_scale, c.dim)
        np.testing.assert_allclose(e["emb_d"], added.numpy(), rtol=1e-4, atol=1e-5)
        per_clip = emb_d[:, 1:].mean(1).numpy()  # the predicted latent frames
        np.testing.assert_allclose(e["heat"], per_clip[e["order"]][:, e["channels"]], rtol=1e-5, atol=1e-6)
        var = per_clip.var(0)
        assert var[e["channels"]].min() >= np.delete(var, e["channels"]).max()  # the most variable channels
        fams = list(conditioning.ACTION_FAMILIES)
        ranks = [fams.index(e["families"][i]) for i in e["order"]]
        assert ranks == sorted(ranks)
        stats = info["action_stats"]
        z = np.abs((clips.actions - np.array(stats["mean"])) / np.array(stats["std"]))
        for i, f in enumerate(e["families"]):  # each clip's family: that of its largest z-scored action
            assert int(np.unravel_index(z[i].argmax(), z[i].shape)[1]) in conditioning.ACTION_FAMILIES[f]

    def test_sat_token_pca_matches_numpy_and_families_sit_on_their_dimensions(self, small_export, small_synth):
        dit, info = M.load_exported(small_export, dtype=torch.float32)
        clips = analysis.load_clips(small_synth, info["train_config"]["frames"], n_clips=6)
        tokens = analysis.sat_tokens(dit, info, clips.actions)
        ac = dit.action_cond
        with torch.no_grad():
            direct = ac.tokenizer(ac.norm(torch.from_numpy(clips.actions))).numpy()  # (B, 1, 57, C)
        np.testing.assert_allclose(tokens, direct, rtol=1e-6, atol=1e-6)
        points = analysis.token_points(tokens, clips.tasks)
        B, S_, N, _ = tokens.shape
        rng = np.random.default_rng(0)
        for k in rng.choice(len(points["tokens"]), 20, replace=False):
            b, d = k // (S_ * N), k % N
            np.testing.assert_array_equal(points["tokens"][k], tokens[b, 0, d])
            assert points["dims"][k] == d
        fams = np.array(points["token_families"])
        for family, idx in conditioning.ACTION_FAMILIES.items():  # e.g. the finger colour marks finger tokens only
            assert set(points["dims"][fams == family]) == set(idx)
        for name in ("tokens", "clips"):
            X = points[name].astype(np.float64)
            xy, explained = analysis.pca(X)
            Xc = X - X.mean(0)
            w, U = np.linalg.eigh(Xc @ Xc.T)  # independent: the Gram matrix's eigenvectors (P x P, P << 57 C)
            w, U = w[::-1], U[:, ::-1]
            ref = U[:, :2] * np.sqrt(w[:2])  # the coordinates on the top 2 principal axes
            signs = np.sign((xy * ref).sum(0))
            np.testing.assert_allclose(xy * signs, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
            np.testing.assert_allclose(explained, w[:2] / w.sum(), rtol=1e-6)

    def test_loss_curves_follow_metrics_and_are_labelled_by_mode(self, small_export, tmp_path):
        rng = np.random.default_rng(0)
        losses = {m: rng.uniform(0.5, 2.0, 40).tolist() for m in ("dexac", "mlp", "mlp2")}
        runs = [fake_run(tmp_path / "001-dexac", "dexac", losses["dexac"]),
                fake_run(tmp_path / "002-mlp", "mlp", losses["mlp"]),
                fake_run(tmp_path / "003-mlp", "mlp", losses["mlp2"]), small_export.parent]
        curves = analysis.loss_curves(runs)
        assert set(curves) == {"dexac (001-dexac)", "mlp (002-mlp)", "mlp (003-mlp)",
                               f"dexac ({small_export.parent.name})"}  # two runs of a mode: named by their run
        c = curves["mlp (002-mlp)"]
        assert c["step"] == list(range(1, 41)) and c["loss"] == losses["mlp"]
        k = 2  # 40 logged losses: a running mean over 5% of them
        assert c["smooth"] == pytest.approx([np.mean(losses["mlp"][max(0, i - k + 1):i + 1]) for i in range(40)])
        logged = [json.loads(line) for line in open(small_export.parent / "metrics.jsonl")]
        real = curves[f"dexac ({small_export.parent.name})"]
        assert real["step"] == [h["step"] for h in logged] and real["loss"] == [h["loss"] for h in logged]
        grid = [fake_run(tmp_path / variant / "000-tiny-dexac-48x80", "dexac", losses["dexac"])
                for variant in ("dexac", "dexac-x200")]  # a miniature grid: one run folder name per variant
        assert set(analysis.loss_curves(grid)) == {"dexac (dexac/000-tiny-dexac-48x80)",
                                                   "dexac (dexac-x200/000-tiny-dexac-48x80)"}
        assert analysis.short_names([*grid, grid[0]]) == [str(grid[0].resolve()), "dexac-x200/000-tiny-dexac-48x80",
                                                          str(grid[0].resolve())]  # given twice: kept whole
        analysis.plot_losses(curves, tmp_path / "loss.png")
        with Image.open(tmp_path / "loss.png") as img:
            assert img.format == "PNG"

    def test_a_checkpoint_without_sat_tokens_skips_figures_8_and_9(self, small_export, small_synth, tmp_path,
                                                                  capsys):
        export = as_mlp_flat_export(small_export, tmp_path / "mlp-flat.safetensors")
        out = tmp_path / "figures"
        analysis.main(["--checkpoint", str(export), "--data", str(small_synth), "--out", str(out), "--runs",
                       str(small_export.parent), "--clips", "4"])
        assert (out / "fig7_action_embedding.png").is_file() and (out / "fig2_action_magnitudes.png").is_file()
        assert not (out / "fig8_sat_pca.png").exists() and not (out / "fig9_sat_tsne.png").exists()
        assert "skipped fig8_sat_pca.png: action mode 'mlp-flat' has no SAT tokens" in capsys.readouterr().out
        assert "skipped `fig9_sat_tsne.png`" in (out / "figures.md").read_text()
        dit, info = M.load_exported(export)
        clips = analysis.load_clips(small_synth, 5, n_clips=4)
        e = analysis.embeddings(dit, info, clips)
        with torch.no_grad():  # mlp-flat's emb_d: its embedder on the flattened z-scored chunk, on every frame
            d = dit.action_cond.embed_d(dit.action_cond.norm(torch.from_numpy(clips.actions)).flatten(1))
        np.testing.assert_allclose(e["per_clip"], d.numpy(), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("case", ["checkpoint", "data", "runs", "matplotlib"])
    def test_bad_input_is_one_error_line(self, case, small_export, small_synth, tmp_path, capsys, monkeypatch):
        monkeypatch.delenv("DEXAC_DEBUG", raising=False)
        argv = {"--checkpoint": str(small_export), "--data": str(small_synth), "--out": str(tmp_path / "o")}
        expect = {"checkpoint": "not found", "data": "does not exist", "runs": "not a train.py run directory",
                  "matplotlib": 'pip install -e ".[analysis]"'}[case]
        if case == "checkpoint":
            argv["--checkpoint"] = str(tmp_path / "nope" / "model.safetensors")
        elif case == "data":
            argv["--data"] = str(tmp_path / "no_data")
        elif case == "runs":
            argv["--runs"] = str(tmp_path)
        else:
            monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
        with pytest.raises(SystemExit) as exit:
            hub.run_main(analysis.main, [x for kv in argv.items() for x in kv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
        assert not (tmp_path / "o" / "numbers.json").exists()

    def test_missing_scikit_learn_is_one_clear_error(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
        with pytest.raises(analysis.AnalysisError, match=r'need sklearn: pip install -e "\.\[analysis\]"'):
            analysis.tsne(np.random.default_rng(0).normal(size=(10, 4)))

# =====================================================================================================================
# benchmark command lines: they run, on tiny shapes (speed and memory are never asserted)

    def test_action_use_reads_zero_where_the_action_path_is_closed(self, small_synth, tmp_path):
        """analysis.diagnose along a run (exports every step): a fresh DexAC (zero-initialized output layers) has
        sensitivity exactly 0 to every family, and only its output layers get a gradient (exactly 0 upstream);
        after two steps (no EMA) the velocity depends on the actions; a family's sensitivity is the relative
        change of the velocity computed here directly; --along writes its figure."""
        run_train(["--data", small_synth, "--out", tmp_path / "runs", "--steps", 2, "--export-every", 1,
                   "--batch-size", 2, "--micro-batch", 2, "--ema", 0])
        run = only_run(tmp_path / "runs")
        use = analysis.diagnose([run], small_synth, clips=2)[run.name]
        assert [r["step"] for r in use] == [1, 2] and use[-1]["sensitivity"]["all"] > 0
        wm = S.WorldModel(run / "model.safetensors")
        cfg = wm.info["train_config"]
        probe = analysis.probe_batch(wm, small_synth, 2, (cfg["height"], cfg["width"]))
        x0, actions, text, mask, noise, sigma = probe
        m, s_ = mask[:, None, :, None, None], sigma[:, None, None, None, None]
        x = m * x0 + (1 - m) * (s_ * noise + (1 - s_) * x0)
        other = actions.clone()
        idx = list(conditioning.ACTION_FAMILIES["finger"])
        other[..., idx] = actions.roll(1, 0)[..., idx]
        with torch.no_grad():
            v, v_f = (wm.dit(x, sigma, text, mask, actions=a) for a in (actions, other))
        assert analysis.sensitivities(wm.dit, *probe)["finger"] == pytest.approx(
            ((v_f - v).norm() / v.norm()).item(), rel=1e-6)
        fresh = M.DiT(wm.dit.config)  # the DexAC modules as initialized: their output layers are zero
        fresh.load_state_dict({k: v for k, v in wm.dit.state_dict().items() if not k.startswith("action_cond.")},
                              strict=False)
        fresh.action_cond.set_stats(*wm.dit.action_cond.norm.stats())
        fresh.eval().requires_grad_(False)
        assert set(analysis.sensitivities(fresh, *probe).values()) == {0.0}
        grads = analysis.grad_norms(fresh, *probe)
        outputs = {"local.attn.o", "glob.to_d", "glob.to_3d"}
        assert outputs <= set(grads) and all(grads[k] > 0 for k in outputs)
        assert all(g == 0 for k, g in grads.items() if k not in outputs and not k.startswith("norm")), grads
        analysis.main(["--checkpoint", str(run / "model.safetensors"), "--data", str(small_synth), "--out",
                       str(tmp_path / "fig"), "--runs", str(run), "--along", "--clips", "4", "--probe-clips", "2"])
        assert (tmp_path / "fig" / "fig_action_use.png").stat().st_size > 1000
        assert json.loads((tmp_path / "fig" / "numbers.json").read_text())["action_use"][run.name][0]["step"] == 1


class TestBench:
    """The benchmark command lines run on tiny shapes and print what they measured."""

    def test_tokenizer_benchmark_runs(self, capsys):
        bench.main(["vae", "--config", "tiny", "--frames", "5", "9", "--height", "16", "--width", "24",
                    "--warmup", "0"])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("T=")]
        assert len(lines) == 2 and all("frames/s" in line and "MiB" in line for line in lines)

    def test_dit_benchmark_ours_and_diffusers_agree(self, capsys):
        r = bench.main(["dit", "--frames", "2", "--height", "8", "--width", "8", "--text-tokens", "4", "--iters",
                        "1", "--warmup", "0", "--compare-diffusers"])
        out = capsys.readouterr().out
        assert "ours: forward" in out and "diffusers: forward" in out and "ours / diffusers" in out
        assert r["ratio"] > 0 and r["max_abs"] > 1e-2  # random weights everywhere: outputs far from 0
        assert r["max_abs_diff"] < 1e-5 * r["max_abs"], r
        assert "max |ours - diffusers|" in out

    def test_train_benchmark_times_train_steps(self, capsys):
        dt = bench.main(["train", "--dim", "64", "--blocks", "1", "--height", "32", "--width", "48", "--batch-size",
                         "1", "--micro-batch", "1", "--bench-steps", "1", "--device", "cpu"])
        assert dt > 0 and "benchmark:" in capsys.readouterr().out and not torch.distributed.is_initialized()

    def test_adaptation_benchmark_counts_what_each_way_trains(self, tmp_path, capsys):
        """bench.py adapt: a row per way, its trainable parameters those train.build leaves trainable (LoRA: the
        adapters' r (in + out) per adapted layer on top of the new modules), one table and the JSON."""
        r = bench.main(["adapt", "--preset", "tiny", "--blocks", "1", "--device", "cpu", "--height", "32", "--width",
                        "48", "--steps", "1", "--ways", "new only", "LoRA r16", "--out", str(tmp_path / "adapt.json")])
        rows = {row["way"]: row for row in r["rows"]}
        assert list(rows) == ["new only", "LoRA r16"] and all(row["ms_per_step"] > 0 for row in rows.values())
        c = M.PRESETS["tiny"]
        d, ctx, hidden = c.dim, c.context_dim, int(c.dim * c.mlp_ratio)
        per_rank = (4 * (d + d)) + (2 * (d + d) + 2 * (ctx + d)) + (d + hidden) + (hidden + d)  # 1 block
        extra = rows["LoRA r16"]["trainable_m"] - rows["new only"]["trainable_m"]
        assert extra * 1e6 == pytest.approx(16 * per_rank)
        assert json.loads((tmp_path / "adapt.json").read_text())["rows"][0]["way"] == "new only"
        assert "| LoRA r16 |" in capsys.readouterr().out

    def test_path_benchmark_finds_room_for_two_checkpoints(self, tmp_path, monkeypatch):
        """bench.py path keeps the resumed and the last checkpoint: on --out's disk, else in RAM (/dev/shm), else
        one on each when they are two file systems, else it refuses before training."""
        disk, ram = tmp_path / "disk", tmp_path / "ram"
        disk.mkdir(), ram.mkdir()
        free, fs = {}, {disk: 1, ram: 2}
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, free[Path(p)]))
        monkeypatch.setattr(bench, "file_system", lambda p: fs[Path(p)])
        for gib_disk, gib_ram, where in [(30, 30, (disk, None)), (10, 30, (ram, None)), (12, 12, (disk, ram)),
                                         (12, 10, None), (10, 12, None)]:
            free.update({disk: gib_disk, ram: gib_ram})
            assert bench.checkpoint_room(disk, 10, ram) == where, (gib_disk, gib_ram)
        fs[ram] = 1  # one file system: its free space holds one checkpoint, not two
        free.update({disk: 12, ram: 12})
        assert bench.checkpoint_room(disk, 10, ram) is None
        assert bench.checkpoint_room(disk, 10, tmp_path / "no-shm") is None  # no RAM folder: the disk alone

    def test_sample_benchmark_runs(self):
        """bench.py sample times one chunk of a DexAC model on random weights."""
        r = bench.main(["sample", "--tokenizer", "pixel", "--height", "32", "--width", "48", "--steps", "2",
                    "--iters", "1", "--warmup", "0", "--batch", "2", "--guidance", "1.5"])
        assert r["ours (dexac)"]["shape"] == (2, 13, 32, 48, 3)

    def test_gpu_benchmark_runs_on_the_cpu_and_writes_its_json(self, tmp_path, capsys):
        """`bench.py gpu --device cpu --preset tiny`, its work cut to one of each (one batch, one step, one
        timed chunk, 16x32, guidance 0, eager): every part runs (training with and without checkpointing,
        a DexAC + DINOv3 rollout chunk, ours and diffusers' pipeline on the same weights, the DiT against
        diffusers', the VAE, DINOv3), nothing is skipped, and the JSON holds what the table printed. The rollout
        comparison is fair: the same inputs give the same DiT and VAE-encoder outputs in both stacks, and both
        make videos of the same shape (bench_sample refuses otherwise)."""
        out = tmp_path / "gpu.json"
        bench.main(["gpu", "--device", "cpu", "--preset", "tiny", "--batches", "1", "--steps", "1", "--train-steps",
                    "1", "--iters", "1", "--warmup", "0", "--height", "16", "--width", "32", "--compile", "off",
                    "--guidance", "0", "--out", str(out)])
        r = json.loads(out.read_text())
        assert r["skipped"] == [] and r["device"].startswith("CPU") and r["size"] == [16, 32]
        assert [(t["ac"], t["batch"], t["compile"]) for t in r["train"]] == [("none", 1, False), ("full", 1, False)]
        assert all(t["ms_per_step"] > 0 and t["tokens_per_s"] > 0 and t["mfu"] is None for t in r["train"])
        runs = {(s["run"], s["model"]): s["total"] for s in r["sample"]}
        assert set(runs) == {("ours guidance=0 compile=False", "ours (dexac)"), ("diffusers guidance=0", "diffusers"),
                             ("diffusers guidance=0", "ours (backbone)"), ("diffusers guidance=0", "ours / diffusers")}
        assert runs[("diffusers guidance=0", "ours / diffusers")] == pytest.approx(
            runs[("diffusers guidance=0", "ours (backbone)")] / runs[("diffusers guidance=0", "diffusers")])
        assert r["dit_vs_diffusers"]["max_abs_diff"] < 1e-5 * r["dit_vs_diffusers"]["max_abs"]
        # the rollout comparison's probe: the same inputs through our backbone and VAE encoder and diffusers'
        assert r["sample_vs_diffusers"]["dit"] < 1e-5 and r["sample_vs_diffusers"]["vae encode"] < 1e-4, r
        assert r["vae"]["decode_frames_per_s"] > 0 and r["dino"]["images_per_s"] > 0
        printed = capsys.readouterr().out
        assert f"wrote {out}" in printed and "ours / diffusers" in printed and not torch.distributed.is_initialized()

    @pytest.mark.parametrize("flags,message", [
        pytest.param(["--ac", "none,foo"], "'foo': choose from none, full, mlp", id="unknown_ac"),
        pytest.param(["--compile", "maybe"], "'maybe': choose from off, on", id="compile_maybe"),
        pytest.param(["--batches", "1,0"], "0 must be at least 1", id="batch_0"),
    ])
    def test_gpu_benchmark_bad_flags_are_one_usage_error(self, flags, message, capsys):
        """Each item of a comma-separated flag is checked: one usage error (exit 2) naming it, before any work."""
        with pytest.raises(SystemExit) as e:
            bench.main(["gpu", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err

    def test_eval_benchmark_times_each_metric_and_names_what_it_skipped(self, capsys, monkeypatch, tmp_path):
        """bench.py eval: a time per clip for every metric it could run (the cookbook I3D and LPIPS on random
        weights), and each skipped one named with its reason (no Inception file here, offline)."""
        monkeypatch.setenv("DEXAC_WEIGHTS_DIR", str(tmp_path))
        r = bench.main(["eval", "--metrics", "psnr,lpips,fvd,fid,pck", "--clips", "1", "--frames", "9", "--height",
                        "32", "--width", "48", "--warmup", "0", "--device", "cpu"])
        assert set(r["seconds_per_clip"]) == {"psnr", "lpips", "fvd", "pck"} and set(r["skipped"]) == {"fid"}
        assert all(t > 0 for t in r["seconds_per_clip"].values()) and "inception-2015-12-05.pt" in r["skipped"]["fid"]
        assert "fvd:" in capsys.readouterr().out

    @pytest.mark.parametrize("flags,message", [
        pytest.param(["--tokenizer", "pixel", "--compare-diffusers"], "--tokenizer wan2.1", id="pixel_vs_diffusers"),
        pytest.param(["--compare-diffusers", "--guidance", "0.5"], "guidance only above 1", id="guidance_below_1"),
    ])
    def test_sample_benchmark_bad_flags_are_one_clear_error(self, flags, message):
        with pytest.raises(SystemExit, match=message):
            bench.main(["sample", *flags])
