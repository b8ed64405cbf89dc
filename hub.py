"""
Where weights come from and how they are loaded, once for every model in this repository.

- `resolve(spec)`: a local file, a local folder holding a known file, a short name, an http(s) URL
  (downloaded once) or a Hugging Face Hub file ('org/repo' or 'org/repo/path/in/repo') -> a local path.
  Hub files go through huggingface_hub's cache, so HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as usual.
- `read_state_dict(path)`: the tensors of a .safetensors file, a sharded safetensors checkpoint (folder or
  index .json) or a torch.save'd .pt/.pth (loaded with weights_only=True: no code runs; the only other objects
  allowed are the KNOWN_SAFE types the official Cosmos files hold in `_extra_state` entries, which are dropped).
- `load_strict(module, sd)`: every key and shape checked, one error listing what is missing, unexpected and
  mis-shaped; `assign=True`, so a model built on the meta device takes the tensors without a second copy.
- `atomic_write(path, ...)`: readers see the old file or the new one, never half of one.
- `DTYPES`: the dtype names every command line accepts.
- `run_main(main)`: how every entry point ends: an error becomes one line (`error: ...`) and exit code 1
  (argparse's usage errors: 2); `--debug` or DEXAC_DEBUG=1 shows the traceback instead; child processes
  (data loader workers, which ignore SIGTERM while a trainer checkpoints) are killed, so no error path hangs.

Key maps stay beside their models (model.py, tokenizer.py, semantic.py): they are part of each model's story.
"""

import contextlib
import io
import json
import os
import pickle
import re
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import load_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".json")
# Python types a weights_only load may also rebuild: Transformer Engine's `_extra_state` entries, which upstream
# loads with weights_only=False, are io.BytesIO objects in the official Cosmos .pt files
KNOWN_SAFE = {"_io.BytesIO": io.BytesIO}


class WeightsError(FileNotFoundError):
    """Weights that are missing, or a file that is not the one expected: one message that says where to get it."""


def download_dir():
    """Where URLs are downloaded to, once: torch's hub checkpoint folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hub_file(repo, filename, *, what, where, revision, token):
    kwargs = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    try:
        return huggingface_hub.hf_hub_download(repo, filename, **kwargs)
    # a 401: gated without the licence, or no token
    except (huggingface_hub.errors.GatedRepoError, huggingface_hub.errors.RepositoryNotFoundError) as e:
        raise PermissionError(
            f"cannot access {repo} on the Hugging Face Hub ({type(e).__name__}). If it is gated, accept the licence "
            f"on https://huggingface.co/{repo} with your account, then log in (`hf auth login`) or set HF_TOKEN. "
            f"Or pass a local path. {where}") from e
    except huggingface_hub.errors.LocalEntryNotFoundError as e:
        raise WeightsError(
            f"{what}: {repo}/{filename} is not in the local Hub cache and cannot be downloaded (HF_HUB_OFFLINE=1 "
            f"or no network): fetch it once where the Hub is reachable (`hf download {repo} {filename}`), copy "
            f"the cache (HF_HUB_CACHE), or pass a local path. {where}") from e
    except (OSError, ValueError) as e:  # not found on the Hub, a bad repo id, HTTP errors
        raise WeightsError(f"{what}: could not get {filename} from the Hub repo {repo} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). {where}") from e


def resolve(spec, *, files=(), names=None, what="weights", where="", revision=None, token=None):
    """spec -> a local file path.

    files: known file names; the first is what a folder or a bare 'org/repo' stands for.
    names: short names {name: (repo, path in repo)} (e.g. model.HUB_FILES).
    what / where: what the file is, and where to get it, for the one error a missing file gives.
    """
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        for name in files:
            if os.path.isfile(os.path.join(spec, name)):
                return os.path.join(spec, name)
        raise WeightsError(f"{what}: none of {list(files)} in the folder {spec}. {where}")
    if os.path.isfile(spec):
        return spec
    if names and spec in names:
        return _hub_file(*names[spec], what=what, where=where, revision=revision, token=token)
    if spec.startswith(("http://", "https://")):
        path = download_dir() / Path(spec.split("?")[0]).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(spec, str(path))
            except OSError as e:
                raise WeightsError(f"{what} could not be downloaded from {spec} ({e}). {where}") from e
        return str(path)
    parts = spec.split("/")
    local_looking = spec.startswith((".", "/", "~")) or (len(parts) == 2 and spec.endswith(WEIGHT_SUFFIXES))
    hub_like = all(re.fullmatch(r"[\w.-]+", p) for p in parts[:2])
    if len(parts) >= 2 and hub_like and not local_looking and (len(parts) > 2 or files):
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]) or files[0], what=what, where=where,
                         revision=revision, token=token)
    shorts = f", one of {sorted(names)}" if names else ""
    folder = f", a folder holding {files[0]}" if files else ""
    raise WeightsError(f"{what}: {spec!r} is not a file{folder}{shorts}, nor a Hub file ('org/repo/path/in/repo'"
                       f"{' or org/repo' if files else ''}). {where}")


def read_state_dict(path):
    """Tensors of a `.safetensors` file, a sharded safetensors checkpoint (its folder or index .json) or a
    `.pt`/`.pth` (a {"model": ...} wrapper is unwrapped) -> {name: tensor}."""
    path = str(path)
    if os.path.isdir(path):
        shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            raise WeightsError(f"no .safetensors files in the folder {path}")
    elif path.endswith(".json"):
        with open(path) as f:
            shards = [os.path.join(os.path.dirname(path), s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    elif path.endswith(".safetensors"):
        shards = [path]
    else:
        sd = _torch_load(path)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise WeightsError(f"{path} is not a state dict (a {{name: tensor}} dict)")
        return {k: v for k, v in sd.items() if torch.is_tensor(v) or not k.endswith("_extra_state")}
    sd = {}
    for shard in shards:
        sd.update(load_file(shard))
    return sd


def _torch_load(path):
    """torch.load with weights_only=True, memory-mapped when the format allows; a file whose only other Python
    objects are KNOWN_SAFE types is loaded again allowing exactly those. Anything else is refused unread."""
    def load():
        try:  # memory-mapped: a 2B checkpoint is not read twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zipfile) format cannot be mapped, e.g. LPIPS' alex.pth
            return torch.load(path, map_location="cpu", weights_only=True)

    try:
        try:
            return load()
        except pickle.UnpicklingError:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            unknown = [g for g in found if g not in KNOWN_SAFE]
            if unknown or not found:
                raise
            with torch.serialization.safe_globals([KNOWN_SAFE[g] for g in found]):
                return load()
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:  # not torch.save'd, or holds code
        found = []
        with contextlib.suppress(Exception):
            found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in KNOWN_SAFE]
        what = f"holds Python objects of types {found} (loading them could run code)" if found else \
            f"is not a state dict saved by torch.save ({type(e).__name__})"
        raise WeightsError(f"{path} {what}: re-save it as a plain {{name: tensor}} state dict "
                           f"(torch.save(model.state_dict(), ...)) or as .safetensors") from e


def check_state_dict(expected, sd, *, source, target, hint="", allow_missing=()):
    """Compare a state dict with the {name: tensor} a model expects; one ValueError lists every missing,
    unexpected and mis-shaped tensor (the first 12 of each). allow_missing: key prefixes sd may lack."""
    missing = [k for k in expected if k not in sd and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        lines = [f"{source} does not match {target}{hint}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
            if items:
                more = " ..." if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + more)
        raise ValueError("\n".join(lines))


def load_strict(module, sd, *, source="checkpoint", hint="", allow_missing=()):
    """Load sd into module with every key and shape checked (see check_state_dict), with assign=True."""
    check_state_dict(module.state_dict(), sd, source=source, target=f"the model ({type(module).__name__})", hint=hint,
                     allow_missing=allow_missing)
    module.load_state_dict(sd, strict=False, assign=True)
    return module


def atomic_write(path, payload):
    """Write bytes or text so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    (tmp.write_bytes if isinstance(payload, bytes) else tmp.write_text)(payload)
    os.replace(tmp, path)


def atomic_save(path, save):
    """Run save(tmp_path) (e.g. safetensors' save_file), then move the result into place atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save(str(tmp))
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------
# entry points: one line per error, no hang


def run_main(main, argv=None):
    """Run an entry point's main(argv) and exit: its return value is the exit code (None: 0). Any exception is
    one line on stderr and exit code 1; `--debug` (removed from argv) or DEXAC_DEBUG=1 re-raises it, with its
    traceback. Child processes left behind (loader workers ignore SIGTERM) are killed first."""
    import multiprocessing
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("DEXAC_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        if debug:
            raise
        for child in multiprocessing.active_children():
            child.kill()
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        # our own errors and ValueError/OSError are written for the user; others (a TypeError, a torch
        # RuntimeError) are named, as they may be a bug to report
        if not (isinstance(e, (ValueError, OSError)) or type(e).__module__ != "builtins") or not what:
            what = f"{type(e).__name__}: {what}".rstrip(": ")
        print(f"error: {what} (rerun with --debug for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code or 0)
