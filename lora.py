"""
Low-rank adapters (LoRA, Hu et al. 2021) on the backbone's attention projections and MLP linears: the paper's
future work, lightweight adaptation, trained together with the new DexAC / semantic modules in full
(train.py --trainable lora+new).

An adapted Linear computes   y = W x + b + (alpha / r) * B A dropout(x),   A (r, in), B (out, r), r << in.
W and b stay frozen and keep their parameter names (`blocks.0.self_attn.q.weight` is still that key, so base
checkpoints load strictly); only A and B train. B starts at zero, so an injected model is exactly the base model
at step 0 (the repo's zero-init rule for new paths); A starts as PEFT's (kaiming-uniform, a = sqrt(5)) so that
B's first gradient is not zero. The scale alpha / r keeps the update's size roughly independent of the rank:
change r without retuning the learning rate.

Adapter files follow PEFT's convention, so `peft.PeftModel.from_pretrained(backbone, folder)` loads them:
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (PEFT's
names with the adapter name removed), and `adapter_config.json` (peft_type "LORA", r, lora_alpha,
target_modules as the exact module names). Where we depart from PEFT: no adapter names or multiple adapters, the
adapters keep the base weight's dtype (PEFT upcasts bf16 adapters to fp32 by default), and `merge` returns plain
nn.Linear modules, so a merged model's state dict is the base model's, key for key.

Order in training (torchtitan's): load the base, `inject`, `mark_trainable`, then activation checkpointing,
compile and fully_shard. A model built on the meta device: `inject`, `to_empty`, load or init the base (an
init that touches every nn.Linear reaches the adapters too), then `reset_adapters`.

A LoRA run's export (train.py --trainable lora+new) holds the adapters and the new modules only, every key with
PEFT's prefix (the new modules as PEFT's `modules_to_save`), its adapter config and its base in the metadata;
train.py also writes them as a PEFT folder beside it (RUN/model_peft/). `load_exported` rebuilds the model on its
base (merged or not); `python lora.py merge` writes a full export:

    python lora.py merge --checkpoint runs/000-*/model.safetensors --out merged.safetensors
"""

import argparse
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import hub
import irasim
import model as M

# module-name patterns (full match) of the layers each target group adapts, for both backbones: Cosmos
# (model.py) and IRASim (irasim.py). Anchored at `blocks.N.`, so action_cond.* and semantic.* (trained in full),
# the AdaLN modulations, the embedders and the final layers are never adapted.
TARGETS = {
    "attn": r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.attn\.(qkv|proj)",
    "mlp": r"blocks\.\d+\.(mlp\.)?fc[12]",
}
LORA_KEYS = ("lora_A", "lora_B")  # the adapter submodules of a LoRALinear
PREFIX = "base_model.model."  # PEFT's prefix on adapter file keys
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """base Linear + scaling * lora_B(lora_A(dropout(x))). Built from an existing nn.Linear whose weight and
    bias Parameters it reuses (no copy; meta tensors stay meta); the adapters take the weight's device and dtype."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)  # not nn.Linear's __init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None too, as nn.Linear(bias=False) registers it
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted layer starts as the base layer, exactly

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def is_lora(name):
    """Is this parameter (or state dict key) an adapter's? e.g. blocks.0.fc1.lora_A.weight."""
    return any(f".{k}." in f".{name}" for k in LORA_KEYS)


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def target_names(model, targets="attn,mlp"):
    """The sorted names of the nn.Linear modules the target groups ("attn,mlp" or a list of group names) adapt."""
    groups = [g.strip() for g in targets.split(",")] if isinstance(targets, str) else list(targets)
    unknown = [g for g in groups if g not in TARGETS]
    if unknown or not groups:
        raise ValueError(f"unknown LoRA target group(s) {unknown or groups}: choose from {sorted(TARGETS)}, "
                         f"comma-separated (e.g. 'attn,mlp')")
    pattern = re.compile("|".join(f"(?:{TARGETS[g]})" for g in groups))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n))
    if not names:
        raise ValueError(f"no layer of this {type(model).__name__} matches the LoRA targets {groups} (choices "
                         f"{sorted(TARGETS)}: block attention projections and MLP linears)")
    return names


def inject(model, rank=16, alpha=16, targets="attn,mlp", dropout=0.0, names=None):
    """Replace each target Linear with a LoRALinear over the same parameters, in place -> the adapted names.
    names: the exact module names instead of target groups (an adapter config's target_modules)."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA alpha must be > 0 and dropout in [0, 1), got alpha {alpha}, dropout {dropout}")
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters: merge() them first, or inject into a fresh model")
    if names is not None:
        modules = dict(model.named_modules())
        wrong = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
        if wrong or not names:
            raise ValueError(f"LoRA target modules {wrong or names} are not Linear layers of this "
                             f"{type(model).__name__}: the adapter was made for another model")
    names = sorted(names) if names is not None else target_names(model, targets)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def reset_adapters(model):
    """A initialized as PEFT's, B zero, in every adapter (after to_empty on a meta-built model) -> their count."""
    modules = lora_modules(model)
    for _, m in modules:
        m.reset_adapter()
    return len(modules)


def mark_trainable(model, extra_prefixes=("action_cond.", "semantic.")):
    """requires_grad on the adapters and on the parameters under extra_prefixes only -> the trainable names."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora(name) or name.startswith(tuple(extra_prefixes)))
        if p.requires_grad:
            trainable.append(name)
    return trainable


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight (W += scaling * B A, in fp32) and put back a plain nn.Linear with
    the same weight and bias Parameters -> the merged names, sorted. The state dict keys are then the base model's."""
    merged = []
    for name, m in lora_modules(model):
        w = m.weight
        w.copy_((w.float() + m.scaling * (m.lora_B.weight.float() @ m.lora_A.weight.float())).to(w.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
        merged.append(name)
    return sorted(merged)


# -----------------------------------------------------------------------------
# PEFT's file convention


def adapter_state_dict(model):
    """{base_model.model.<module>.lora_A.weight: tensor, ...lora_B.weight: tensor}: PEFT's keys."""
    return {PREFIX + k: v for k, v in model.state_dict().items() if is_lora(k)}


def load_adapter_state_dict(model, sd, source="adapter state dict"):
    """Load adapter_state_dict's inverse into an injected model; every key and shape checked, one error."""
    expected = adapter_state_dict(model)
    if not expected:
        raise ValueError(f"this {type(model).__name__} has no LoRA adapters to load the {source} into: inject() "
                         "with the adapter's rank and targets first")
    hub.check_state_dict(expected, sd, source=source, target="the model's LoRA adapters",
                         hint=" (inject with the rank and targets of its adapter_config.json)")
    model.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items()}, strict=False)


def adapter_config(rank, alpha, target_names, dropout=0.0, base=None, modules_to_save=None):
    """The adapter_config.json PEFT writes for these adapters (LoraConfig.from_pretrained reads it).
    modules_to_save: modules trained in full beside the adapters (ours: action_cond, semantic)."""
    return dict(peft_type="LORA", task_type=None, base_model_name_or_path=base, revision=None, inference_mode=True,
                r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(target_names), bias="none",
                fan_in_fan_out=False, init_lora_weights=True, use_rslora=False, use_dora=False,
                modules_to_save=modules_to_save or None)


def save_adapters(folder, model, config):
    """Write the model's adapters as PEFT's adapter_model.safetensors and config as adapter_config.json."""
    modules = dict(lora_modules(model))
    if sorted(modules) != sorted(config["target_modules"]) or any(m.rank != config["r"] for m in modules.values()):
        raise ValueError(f"the adapter config (r {config['r']}, {len(config['target_modules'])} target modules) does "
                         f"not describe this model's {len(modules)} adapters: build it with adapter_config(rank, "
                         "alpha, inject's names)")
    write_folder(folder, adapter_state_dict(model), config)


def write_folder(folder, sd, config):
    """A PEFT adapter folder: sd (PEFT keys) as adapter_model.safetensors, config as adapter_config.json."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    hub.atomic_save(os.path.join(folder, WEIGHTS_FILE), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    hub.atomic_write(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2) + "\n")


def read_adapters(folder):
    """A folder save_adapters (or PEFT's save_pretrained) wrote -> (state dict, config)."""
    if not os.path.isdir(folder):
        raise hub.WeightsError(f"no LoRA adapter folder at {folder}")
    paths = [os.path.join(folder, f) for f in (WEIGHTS_FILE, CONFIG_FILE)]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise hub.WeightsError(f"{folder} is not a LoRA adapter folder: it lacks {' and '.join(missing)} "
                               "(save_adapters or PEFT's save_pretrained writes both)")
    try:
        with open(paths[1]) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{paths[1]} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not {"r", "lora_alpha",
                                                                               "target_modules"} <= set(config):
        raise ValueError(f"{paths[1]} is not a LoRA adapter config (it needs peft_type 'LORA', r, lora_alpha and "
                         "target_modules)")
    return load_file(paths[0]), config


# -----------------------------------------------------------------------------
# a LoRA run's export: rebuilt on its base, merged or not; the merge tool


def load_exported(path, device="cpu", dtype=None, base=None, merged=False):
    """A LoRA run's export (train.py --trainable lora+new) -> (model in eval mode, info), as model.load_exported:
    the base it names (or `base`: a load_dit spec, or a released IRASim checkpoint) with the adapters injected
    and loaded, and the new modules' weights; merged=True folds the adapters into the base weights (merge)."""
    sd, info = hub.read_export(path)
    config, base = info.get("lora"), base or info.get("base")
    if not config:
        raise ValueError(f"{path} is not a LoRA export (no adapter config in its metadata)")
    if not base:
        raise ValueError(f"{path} names no base model: give it (sample.py --init)")
    if info.get("backbone") == "irasim":
        model = irasim.load_irasim(base, hub.config_from_json(irasim.IRASimConfig, info["model_config"]), device=device)
    else:
        model = M.load_dit(base, hub.config_from_json(M.DiTConfig, info["model_config"]), device=device)
    inject(model, rank=config["r"], alpha=config["lora_alpha"], names=config["target_modules"])
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    new = tuple(f"{m}." for m in config.get("modules_to_save") or ())
    frozen = tuple(k for k in model.state_dict() if not is_lora(k) and not k.startswith(new))
    hub.load_strict(model, sd, source=str(path), allow_missing=frozen)
    if merged:
        merge(model)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), info


def merged_export(path, out, base=None):
    """Write a LoRA run's export merged into its base as a full export (sample.py and evaluate.py read it like any
    other; no base needed) -> out. The weights keep the LoRA export's dtype."""
    model, info = load_exported(path, base=base, merged=True)
    dtype = hub.DTYPES[info["train_config"]["export_dtype"]]  # the dtype train.py exported the run in
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {k: v for k, v in info.items() if k not in ("lora", "sha256")} | {"base": "", "merged_from": str(path),
                                                                           "sha256": hub.tensors_sha256(sd)}
    hub.atomic_save(out, lambda p: save_file(sd, p, metadata={k: json.dumps(v) for k, v in meta.items()}))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="LoRA exports (train.py --trainable lora+new): merge one into its base "
                                            "as a full export.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold the adapters into the base weights and write a full export")
    m.add_argument("--checkpoint", required=True, help="the LoRA run's export (RUN/model.safetensors)")
    m.add_argument("--out", required=True, help="the merged export to write (.safetensors)")
    m.add_argument("--base", default=None, help="the base model, if not the one the export names")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors") or os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise ValueError(f"--out {args.out}: give a new .safetensors path (the LoRA export stays as it is)")
    print(f"merged: {merged_export(args.checkpoint, args.out, args.base)}")
    return 0


if __name__ == "__main__":
    hub.run_main(main)
