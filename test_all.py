"""
The DexAC-WM test suite: CPU only, a few minutes.

    python -m pytest -q test_all.py

Correctness is shown against independent implementations on the same random weights (diffusers for the DiT,
scipy/analytic answers for numerics), and every loader is exercised on small random-weight files written in
the exact official layouts, including a local Hugging Face cache read with HF_HUB_OFFLINE=1.
"""

import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import model as M

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# model.py: the DiT against diffusers' CosmosTransformer3DModel

SMALL = M.DiTConfig(in_channels=16, out_channels=16, dim=64, n_blocks=2, n_heads=2, adaln_lora_dim=16,
                    text_dim=48, context_dim=32, max_size=(16, 32, 32))


def randomize(module, seed=0, std=0.2):
    """Random values in every parameter (the zero-initialized ones included) so nothing compares as trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return module


def to_format(sd, fmt, n_blocks):
    return M.state_dict_as(sd, ["official", "diffusers"][fmt], n_blocks)


def diffusers_cosmos(c):
    """diffusers' model for config c, with two documented adjustments: q/k RMSNorm eps set to the official 1e-6
    (diffusers uses 1e-5), and its torchvision padding-mask resize replaced by torch's nearest interpolation
    (torchvision does not import beside the CPU torch build used here; the masks we pass are already at the
    latent size, so the resize is the identity either way)."""
    diffusers = pytest.importorskip("diffusers")
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


@pytest.fixture(scope="module")
def small_pair():
    ours = randomize(M.DiT(SMALL)).eval()
    ref = diffusers_cosmos(SMALL)
    ref.load_state_dict(to_format(ours.state_dict(), 1, SMALL.n_blocks), strict=True)
    return ours, ref


@pytest.mark.parametrize("B,T,H,W,cond,pad", [
    (1, 1, 4, 4, False, False),
    (2, 3, 6, 10, True, True),  # non-square, batch > 1, several frames, condition + padding masks
    (3, 4, 8, 6, True, True),
])
def test_dit_matches_diffusers(small_pair, B, T, H, W, cond, pad):
    ours, ref = small_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, SMALL.in_channels, T, H, W, generator=g)
    text = torch.randn(B, 7, SMALL.text_dim, generator=g)
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
    assert out.shape == (B, SMALL.out_channels, T, H, W)
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_padding_mask_is_resized_nearest_from_pixels():
    model = randomize(M.DiT(SMALL)).eval()
    x, text, sigma = torch.randn(1, 16, 1, 4, 6), torch.randn(1, 3, SMALL.text_dim), torch.rand(1)
    small = (torch.rand(1, 1, 4, 6) > 0.5).float()
    big = small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # the same mask at pixel resolution
    with torch.no_grad():
        assert torch.equal(model(x, sigma, text, padding_mask=small), model(x, sigma, text, padding_mask=big))
        assert not torch.equal(model(x, sigma, text, padding_mask=small), model(x, sigma, text))


# -----------------------------------------------------------------------------
# model.py: official weights

def official_pt(model, path):
    """Write model in the official .pt layout: net.-prefixed keys plus the buffers a loader must ignore."""
    sd = {f"net.{k}": v for k, v in to_format(model.state_dict(), 0, model.config.n_blocks).items()}
    sd["net.pos_embedder.seq"] = torch.arange(10.0)
    sd["net.accum_video_sample_counter"] = torch.tensor(3)
    sd["net.blocks.0.self_attn.q_proj._extra_state"] = torch.tensor(0)
    torch.save(sd, path)


def test_load_official_pt_diffusers_safetensors_and_hub_cache(tmp_path):
    from safetensors.torch import save_file
    src = randomize(M.DiT(SMALL), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    x, text, sigma = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 5, 48, generator=g), torch.rand(2)
    with torch.no_grad():
        expected = src(x, sigma, text)
    official_pt(src, tmp_path / "dit.pt")
    save_file(to_format(src.state_dict(), 1, SMALL.n_blocks), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    for path in [tmp_path / "dit.pt", tmp_path / "diffusion_pytorch_model.safetensors", tmp_path]:
        loaded = M.load_dit(str(path), SMALL).eval()
        assert next(loaded.parameters()).device.type == "cpu"
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, text), expected), path

    # a local Hub cache, read in a fresh process with HF_HUB_OFFLINE=1 through huggingface_hub itself
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nvidia--Cosmos-Predict2.5-2B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    target = repo / "snapshots" / rev / M.HUB_FILES["base/post-trained"]
    target.parent.mkdir(parents=True)
    official_pt(src, target)
    torch.save({"x": x, "sigma": sigma, "text": text, "expected": expected}, tmp_path / "io.pt")
    script = (f"import torch, model as M\nio = torch.load({str(tmp_path / 'io.pt')!r})\n"
              f"m = M.load_dit('base/post-trained', M.{SMALL!r}).eval()\n"
              "with torch.no_grad():\n    assert torch.equal(m(io['x'], io['sigma'], io['text']), io['expected'])\n"
              "print('hub ok')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "hub ok" in r.stdout, r.stderr[-2000:]
    # the same process, asked for a file that is not in the cache, fails with the download hint
    script = "import model as M\nM.load_dit('base/pre-trained')\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FileNotFoundError" in r.stderr and "hf download" in r.stderr, r.stderr[-2000:]


def test_loader_reports_every_mismatch(tmp_path):
    src = M.DiT(SMALL)
    sd = to_format(src.state_dict(), 0, SMALL.n_blocks)
    del sd["blocks.1.mlp.layer2.weight"]
    sd["blocks.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    sd["mystery.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        M.load_dit(str(tmp_path / "bad.pt"), SMALL)
    msg = str(e.value)
    assert "missing (1): blocks.1.fc2.weight" in msg and "unexpected (1): mystery.weight" in msg
    assert "blocks.0.self_attn.q.weight: checkpoint (3, 3) vs model (64, 64)" in msg


def official_2b_keys():
    """The official Predict2.5-2B key set and the shapes DESIGN.md section 1 lists, written out independently."""
    D = 2048
    keys = {"x_embedder.proj.1.weight": (D, 72), "t_embedder.1.linear_1.weight": (D, D),
                     "t_embedder.1.linear_2.weight": (3 * D, D), "t_embedding_norm.weight": (D,),
                     "crossattn_proj.0.weight": (1024, 100352), "crossattn_proj.0.bias": (1024,),
                     "final_layer.adaln_modulation.1.weight": (256, D),
                     "final_layer.adaln_modulation.2.weight": (2 * D, 256), "final_layer.linear.weight": (64, D)}
    for i in range(28):
        b = f"blocks.{i}."
        for p in "qkv":
            keys[b + f"self_attn.{p}_proj.weight"] = (D, D)
            keys[b + f"cross_attn.{p}_proj.weight"] = (D, D if p == "q" else 1024)
        for a in ("self_attn", "cross_attn"):
            keys[b + f"{a}.output_proj.weight"] = (D, D)
            keys[b + f"{a}.q_norm.weight"] = keys[b + f"{a}.k_norm.weight"] = (128,)
            keys[b + f"adaln_modulation_{a}.1.weight"] = (256, D)
            keys[b + f"adaln_modulation_{a}.2.weight"] = (3 * D, 256)
        keys[b + "adaln_modulation_mlp.1.weight"], keys[b + "adaln_modulation_mlp.2.weight"] = (256, D), (3 * D, 256)
        keys[b + "mlp.layer1.weight"], keys[b + "mlp.layer2.weight"] = (4 * D, D), (D, 4 * D)
    return keys


def test_cosmos2b_on_meta_has_official_keys_and_parameter_count():
    with torch.device("meta"):
        model = M.DiT(M.config_from_preset("cosmos2b"))
    assert sum(p.numel() for p in model.parameters()) == 2_059_174_912
    ours = {k: tuple(v.shape) for k, v in to_format(model.state_dict(), 0, 28).items()}
    assert ours == official_2b_keys()
    # and the same tensors under diffusers' names, against diffusers' own 2B model built on the meta device
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.CosmosTransformer3DModel(
            in_channels=17, num_attention_heads=16, attention_head_dim=128, num_layers=28, mlp_ratio=4,
            text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
            rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
            use_crossattn_projection=True, crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_format(model.state_dict(), 1, 28).items()} == theirs


def test_bad_inputs_give_one_clear_error(tmp_path):
    model = M.DiT(SMALL)
    text, sigma = torch.randn(1, 3, 48), torch.rand(1)
    with pytest.raises(ValueError, match=r"expected latents \(B, 16, T, H, W\)"):
        model(torch.randn(1, 15, 1, 4, 4), sigma, text)
    with pytest.raises(ValueError, match="must be divisible by the patch size"):
        model(torch.randn(1, 16, 1, 5, 4), sigma, text)
    with pytest.raises(ValueError, match="exceeds the model's max_size"):
        model(torch.randn(1, 16, 1, 4, 40), sigma, text)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        M.config_from_preset("huge")
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a Hub file"):
        M.load_dit(str(tmp_path / "nope.pt"), SMALL)
    with pytest.raises(ValueError, match="unknown solver"):
        M.sample(lambda x, s: x, torch.randn(1, 1, 1, 1, 1), M.shifted_sigmas(2), solver="heun")


# -----------------------------------------------------------------------------
# model.py: rectified flow on a Gaussian mixture with an exact velocity field

MIX_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
MIX_STD, MIX_W = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


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


def test_samplers_recover_mixture_and_multistep_beats_euler():
    noise = torch.randn(4000, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = M.sample(mixture_velocity, noise, M.shifted_sigmas(4000), solver="euler")
    errors = {}
    for solver in M.SOLVERS:
        for n in (5, 10, 20, 40):
            x = M.sample(mixture_velocity, noise, M.shifted_sigmas(n), solver=solver)
            errors[solver, n] = (x - reference).flatten(1).norm(dim=1).mean().item()
    for solver in M.SOLVERS:
        errs = [errors[solver, n] for n in (5, 10, 20, 40)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (solver, errs)
    for n in (20, 40):  # at 5-10 steps the schedule's last jump (to sigma 0) dominates both solvers
        assert errors["dpm++2m", n] < 0.6 * errors["euler", n], errors
    # the samples follow the mixture: component frequencies and per-component means
    x = M.sample(mixture_velocity, noise, M.shifted_sigmas(35), solver="dpm++2m").flatten(1)
    nearest = torch.cdist(x, MIX_MEANS).argmin(1)
    for k in range(3):
        assert abs((nearest == k).double().mean() - MIX_W[k]) < 0.03
        assert (x[nearest == k].mean(0) - MIX_MEANS[k]).norm() < 0.1


def test_karras_schedule_and_conditional_frames_are_held():
    s = M.karras_sigmas(10)
    assert math.isclose(s[0].item(), 200 / 201, rel_tol=1e-6) and math.isclose(s[-2].item(), 0.01 / 1.01, rel_tol=1e-5)
    assert s[-1] == 0 and torch.all(s[1:] < s[:-1])
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


def test_classifier_free_guidance():
    vc, vu = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(M.guided(vc, vu, 0.0), vc)
    assert torch.allclose(M.guided(vc, vu, 7.0), vc + 7 * (vc - vu))


def test_flow_loss_conditional_frames_and_sigma_distribution():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 2, 3, 1, 1, generator=g)
    mask = torch.zeros(4096, 3)
    mask[:, 0] = 1
    seen = {}

    def model_fn(x_in, sigma):
        seen["x_in"], seen["sigma"] = x_in, sigma
        return torch.zeros_like(x_in)

    loss, sigma = M.flow_loss(model_fn, x0, mask, cond_sigma=0.1, generator=g)
    assert torch.equal(seen["x_in"][:, :, 0], x0[:, :, 0])  # conditional frame enters clean
    assert torch.all(seen["sigma"][:, 0] == 0.1) and torch.equal(seen["sigma"][:, 1], sigma)
    # with a zero prediction the loss is E|eps - x0|^2 = 2 on the 2 of 3 frames that count
    assert abs(loss.mean().item() - 2 * 2 / 3) < 0.05
    # logit-normal u shifted by 5: the median of sigma is 5 * 0.5 / (1 + 4 * 0.5) = 5/6
    assert abs(sigma.median().item() - 5 / 6) < 0.02

    # whatever the net predicts on conditional frames does not reach the loss
    garbage = lambda x_in, sigma: torch.where(mask.bool()[:, None, :, None, None], 1e3, 0.0).expand_as(x_in)
    zero = lambda x_in, sigma: torch.zeros_like(x_in)
    losses = [M.flow_loss(f, x0, mask, generator=torch.Generator().manual_seed(5))[0] for f in (zero, garbage)]
    assert torch.equal(*losses)
    no_mask = M.flow_loss(garbage, x0, None, generator=torch.Generator().manual_seed(5))[0]
    assert no_mask.mean() > 1e5  # ...while without the mask it would
