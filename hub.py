"""
Where weights come from and how they are loaded, once for every model in this repository.

- `resolve(spec)`: a local file, a local folder holding a known file, a short name, an http(s) URL
  (downloaded once) or a Hugging Face Hub file ('org/repo' or 'org/repo/path/in/repo') -> a local path.
  Hub files go through huggingface_hub's cache, so HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as usual.
- `Network` / `fetch(network)`: a file with a fixed URL (the metric networks), fetched like torchvision does it:
  one cache folder (`download_dir()`), a sha256 (or a prefix of one) and a size checked whenever known, a copy
  that another tool already installed used in place, a download that lands under its name only once complete and
  verified, and offline (HF_HUB_OFFLINE=1) no network at all: `missing_message` names every absent file at once.
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
import functools
import hashlib
import http.client
import importlib.util
import io
import json
import os
import pickle
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import load_file
from tqdm import tqdm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".json")
# Python types a weights_only load may also rebuild: Transformer Engine's `_extra_state` entries, which upstream
# loads with weights_only=False, are io.BytesIO objects in the official Cosmos .pt files
KNOWN_SAFE = {"_io.BytesIO": io.BytesIO}


class WeightsError(FileNotFoundError):
    """Weights that are missing, or a file that is not the one expected: one message that says where to get it."""


def download_dir():
    """Where URLs are downloaded to, once: $DEXAC_WEIGHTS_DIR if set, else torch's hub checkpoint folder
    ($TORCH_HOME/hub/checkpoints), which torchvision shares: AlexNet is downloaded once for both."""
    return Path(os.environ.get("DEXAC_WEIGHTS_DIR") or Path(torch.hub.get_dir()) / "checkpoints")


# -----------------------------------------------------------------------------
# networks with a fixed URL: verified, cached once, never half a file


@dataclass(frozen=True)
class Network:
    """A file fetched from a fixed URL. sha256: the full hex digest or a prefix of it (torchvision names its files
    `name-<first 8 hex digits>.pth`); size in bytes; found_in: other tools' copies of the same file, as paths or
    callables that return one (or None), e.g. package_file("lpips", "weights/v0.1/alex.pth")."""
    file: str
    url: str
    sha256: str = None
    size: int = None
    what: str = ""
    found_in: tuple = ()


def package_file(package, path):
    """A found_in entry: `path` inside an installed package, found without importing it (None if not installed)."""
    def find():
        spec = importlib.util.find_spec(package)
        return Path(spec.origin).parent / path if spec and spec.origin else None
    return find


def is_offline(offline=None):
    """offline, or when None, huggingface_hub's switch HF_HUB_OFFLINE=1 (one switch for every download)."""
    if offline is None:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return offline


@functools.lru_cache(maxsize=64)
def _sha256(path, size, mtime_ns):  # (size, mtime) in the key: a file is hashed once per process, until it changes
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(path, network):
    """None if the file at path has network's size and sha256 (as far as they are known), else what it has."""
    st = os.stat(path)
    if network.size is not None and st.st_size != network.size:
        return f"{st.st_size:,} bytes instead of {network.size:,}"
    if network.sha256:
        digest = _sha256(str(path), st.st_size, st.st_mtime_ns)
        if not digest.startswith(network.sha256.lower()):
            return f"sha256 {digest} instead of {network.sha256}"
    return None


def locate(network):
    """The verified local copy of network, or None: the cache folder first, then torch's hub folder and the other
    tools' copies (used in place: no second copy of a file another package keeps up to date). A copy that does not
    match is never used, whoever put it there."""
    places = (download_dir() / network.file, Path(torch.hub.get_dir()) / "checkpoints" / network.file,
              *network.found_in)
    for place in places:
        path = place() if callable(place) else place
        if path and os.path.isfile(path) and mismatch(path, network) is None:
            return str(path)
    return None


def missing_message(networks):
    """One message for all the networks without a verified local copy: each file, its URL and where it goes."""
    lines = [f"{len(networks)} network file(s) missing, and downloads are off (HF_HUB_OFFLINE=1 or offline=True):"]
    for n in networks:
        dest = download_dir() / n.file
        bad = f" (the file there now has {mismatch(dest, n)}: replace it)" if dest.is_file() else ""
        lines.append(f"  {n.file}{f' ({n.what})' if n.what else ''}: download {n.url} to {dest}{bad}")
    lines.append("Run once with network access, or copy the files there (or set DEXAC_WEIGHTS_DIR to their folder).")
    return "\n".join(lines)


def fetch(network, *, offline=None, progress=True):
    """network -> the path of a verified local copy, downloaded into download_dir() if there is none."""
    path = locate(network)
    if path is None and is_offline(offline):
        raise WeightsError(missing_message([network]))
    return path or _download(network, progress)


def fetch_all(networks, *, offline=None, progress=True):
    """fetch() for each network; offline, one WeightsError names every missing file before anything is loaded."""
    absent = [n for n in networks if locate(n) is None]
    if absent and is_offline(offline):
        raise WeightsError(missing_message(absent))
    return [fetch(n, offline=offline, progress=progress) for n in networks]


def _download(network, progress=True):
    """Download into a temporary name beside the destination, check length, size and sha256, then rename: the
    destination is the verified file or nothing (an interrupted or wrong download is deleted, never kept)."""
    dest = download_dir() / network.file
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    wrong = f"{network.file}{f' ({network.what})' if network.what else ''}: the download from {network.url}"
    try:
        with urllib.request.urlopen(network.url, timeout=60) as r, open(tmp, "wb") as f:
            length = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=length, unit="B", unit_scale=True, desc=network.file, disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    bar.update(f.write(block))
        got = tmp.stat().st_size
        bad = f"the connection closed after {got:,} of {length:,} bytes" if length and got != length else \
            mismatch(tmp, network)
        if bad:
            raise WeightsError(f"{wrong} is not the expected file ({bad}); it was deleted. Retry, or download it "
                               f"yourself and put it at {dest}.")
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except (OSError, http.client.HTTPException) as e:  # no network, HTTP errors, a dropped connection
        raise WeightsError(f"{wrong} failed ({type(e).__name__}: {e}); nothing was kept. Download it yourself and "
                           f"put it at {dest}, or rerun where {network.url.split('/')[2]} is reachable.") from e
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        print(f"downloaded {network.file} ({got:,} bytes{', sha256 verified' if network.sha256 else ''}) "
              f"to {dest}", file=sys.stderr)
    return str(dest)


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
        try:
            return fetch(Network(Path(spec.split("?")[0]).name, spec))
        except WeightsError as e:  # the message names the file and its URL; `what` would repeat them
            raise WeightsError(f"{e} {where}".rstrip()) from e
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


def tensors_sha256(sd):
    """SHA-256 of a state dict's names, dtypes, shapes and bytes, in name order: an export's checksum."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_from_json(cls, d):
    """A config dataclass from its JSON form (an export's metadata): JSON lists back to the tuples they were."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def export_metadata(path):
    """A .safetensors file's metadata {key: parsed JSON value} ({} when it has none), without reading its tensors;
    one error for a missing file, or one that is truncated, damaged or of another format."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model {path} not found: `python train.py` writes it as "
                                f"RUN/model.safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # safetensors' own error type: a truncated file, another format, a bad header
        raise ValueError(f"damaged export {path}: not a readable safetensors file (truncated, damaged or another "
                         f"format: {str(e).splitlines()[0] if str(e) else type(e).__name__}); export it again with "
                         f"train.py (python train.py --resume RUN)") from None


def read_export(path):
    """A model exported by train.py (one safetensors file, its metadata JSON values) -> (state dict, metadata
    {key: parsed value}), with one clear error for a missing, damaged or foreign file, or weights whose bytes
    changed since their checksum was written. The metadata's "backbone" says which network it is (Cosmos
    when absent: exports older than the IRASim backbone)."""
    info = export_metadata(path)
    try:
        sd = load_file(str(path))
    except Exception as e:  # a truncated file, a damaged header, not a safetensors file at all
        raise ValueError(f"damaged export {path} (not a readable safetensors file: {type(e).__name__}): export "
                         f"it again from its run (python train.py --resume RUN)") from None
    if "model_config" not in info:
        raise ValueError(f"{path} has no model config in its metadata: export it with train.py")
    if "sha256" in info and tensors_sha256(sd) != info["sha256"]:  # exports older than the checksum have none
        raise ValueError(f"damaged export {path}: its weights do not match the checksum written with them; "
                         f"export it again from its run (python train.py --resume RUN)")
    return sd, info


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
    one error line on stderr (a multi-line message's other lines indented below it) and exit code 1; `--debug` (removed from argv) or DEXAC_DEBUG=1 re-raises it, with its
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
        what, *more = str(e).strip().splitlines() or [""]
        # our own errors and ValueError/OSError are written for the user; others (a TypeError, a torch
        # RuntimeError) are named, as they may be a bug to report
        if not (isinstance(e, (ValueError, OSError)) or type(e).__module__ != "builtins") or not what:
            what = f"{type(e).__name__}: {what}".rstrip(": ")
        # one error line; a message's further lines (e.g. every missing file, hub.missing_message) follow it
        print("\n  ".join([f"error: {what} (rerun with --debug for the traceback)", *more]), file=sys.stderr)
        code = 1
    sys.exit(code or 0)
