"""Model files: safetensors weights plus a JSON manifest. One loader, used by every entry point.

Loading never unpickles: safetensors holds raw tensors only, and a legacy `.pt` state dict is read
with `torch.load(weights_only=True)`, which refuses any pickle that would build arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from defense.errors import UnsafeFileError, ConfigError
from defense.fileio import atomic_write_bytes, atomic_write_json
from defense.models import MODELS, build_model
from defense.spec import InputSpec

MANIFEST_FORMAT = "backdoor-purify-model/1"


@dataclass
class LoadedModel:
    model: nn.Module
    model_name: str
    spec: InputSpec
    manifest: dict[str, Any]
    weights_sha256: str


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except Exception:  # pragma: no cover - safetensors is a hard dependency
        pass
    return versions


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, manifest) paths for a base path, a .safetensors path or a .json path."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json", ".pt", ".pth") else path
    # appended, not `with_suffix`: a base name with a dot in it ("...-r0.1-t0") keeps all of it
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_model(model: nn.Module, path: str | Path, model_name: str, spec: InputSpec,
               produced_by: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None,
               experiment: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `<base>.safetensors` and `<base>.json` atomically; return the manifest path.
    `experiment`: the record of the attack that planted the model's backdoor (defense.experiment)."""
    from safetensors.torch import save as safetensors_bytes

    weights_path, manifest_path = _paths(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    payload = safetensors_bytes(state)
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(weights_path, payload)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": model_name,
        "input_spec": spec.to_dict(),
        "num_classes": spec.num_classes,
        "weights_file": weights_path.name,
        "weights_sha256": digest,
        "produced_by": dict(produced_by),
        "versions": library_versions(),
        **({"experiment": dict(experiment)} if experiment else {}),
        **({"extra": dict(extra)} if extra else {}),
    }
    atomic_write_json(manifest_path, manifest)
    return manifest_path


MAX_MANIFEST_BYTES = 1 << 20


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from a file that may be hostile: at most 1 MiB, valid, not too deep, an object;
    UnsafeFileError otherwise."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UnsafeFileError(f"{what} {path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise UnsafeFileError(f"{what} {path} is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise UnsafeFileError(f"{what} {path} is not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(data, dict):
        raise UnsafeFileError(f"{what} {path} is a JSON {type(data).__name__}, not an object")
    return data


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """The manifest as a dict with its fields type-checked; UnsafeFileError on anything else."""
    manifest = read_json_object(manifest_path, "manifest")
    for key, kind in (("model", str), ("input_spec", dict), ("weights_sha256", str), ("weights_file", str)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise UnsafeFileError(f"manifest {manifest_path}: '{key}' must be a {kind.__name__}, "
                                  f"got {type(manifest[key]).__name__}")
    if "model" not in manifest or "input_spec" not in manifest:
        raise UnsafeFileError(f"manifest {manifest_path} lacks 'model' or 'input_spec'")
    name = manifest.get("weights_file")
    if name is not None and (Path(name).name != name or name in (".", "..") or "\\" in name
                             or not name.endswith(".safetensors")):
        raise UnsafeFileError(f"manifest {manifest_path}: weights_file {name[:80]!r} must be a .safetensors file "
                              "name in the manifest's own folder")
    return manifest


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file (manifest, safetensors or weights-only `.pt` with a manifest beside it):
    the manifest checked before anything is built, the weights against its SHA-256, every tensor finite."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"model file {path} is a folder; name its manifest (.json) or weights file")
    weights_path, manifest_path = _paths(path)
    if not manifest_path.is_file():
        raise ConfigError(f"model file {path} has no manifest {manifest_path.name} beside it")
    manifest = read_manifest(manifest_path)
    model_name = manifest["model"]
    if model_name not in MODELS:
        raise UnsafeFileError(f"manifest {manifest_path} names unknown model {model_name[:80]!r}")
    try:
        spec = InputSpec.from_dict(manifest["input_spec"])
    except ConfigError as exc:
        raise UnsafeFileError(f"manifest {manifest_path}: {exc}") from None
    if "num_classes" in manifest and manifest["num_classes"] != spec.num_classes:
        raise UnsafeFileError(f"manifest {manifest_path}: num_classes differs from its input spec's")

    if path.suffix in (".pt", ".pth"):
        state, digest = _load_weights_only_pickle(path, manifest)
    else:
        state, digest = _load_safetensors(manifest_path.parent / manifest.get("weights_file", weights_path.name), manifest)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UnsafeFileError(f"weights in {path} hold non-finite values ({key[:80]})")

    model = build_model(model_name, spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsafeFileError(f"weights in {path} do not fit model {model_name!r}: {first}") from None
    model.to(map_location).eval()
    return LoadedModel(model, model_name, spec, manifest, digest)


def _load_safetensors(weights_path: Path, manifest: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load as safetensors_load

    if not weights_path.is_file():
        raise ConfigError(f"weights file {weights_path} is missing")
    payload = weights_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    expected = manifest.get("weights_sha256")
    if expected != digest:
        raise UnsafeFileError(f"{weights_path} does not match its manifest's SHA-256 (corrupted or replaced)")
    try:
        return safetensors_load(payload), digest
    except Exception as exc:
        raise UnsafeFileError(f"{weights_path} is not a valid safetensors file: {exc}") from None


def _load_weights_only_pickle(path: Path, manifest: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if manifest.get("weights_sha256") != digest:
        raise UnsafeFileError(f"{path} does not match its manifest's SHA-256 (corrupted or replaced)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(f"refusing {path}: not a plain weights-only state dict ({reason[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFileError(f"refusing {path}: it does not hold a flat state dict of tensors")
    return state, digest
