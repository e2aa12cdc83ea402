import json
import pickle
import subprocess
import sys

import pytest
import torch

from defense.errors import ConfigError, UnsafeFileError
from defense.modelio import load_model, save_model
from defense.models import MODELS, build_model
from defense.spec import InputSpec

CIFAR = InputSpec(3, 32, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "resnet34", "wrn-16-1"])
def test_models_build_from_spec_and_classify(name):
    model = build_model(name, CIFAR).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_is_the_cifar_variant():
    model = build_model("resnet18", CIFAR)
    stem = model.features[0][0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_save_load_roundtrip_is_exact(tmp_path):
    spec = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
    model = build_model("small-cnn", spec).eval()
    manifest = save_model(model, tmp_path / "m", "small-cnn", spec, {"tool": "test"})
    data = json.loads(manifest.read_text())
    assert data["model"] == "small-cnn" and len(data["weights_sha256"]) == 64 and "torch" in data["versions"]
    loaded = load_model(tmp_path / "m.safetensors")
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(loaded.model(x), model(x)) and loaded.spec == spec
    assert not list(tmp_path.glob("*.tmp"))


def test_a_base_name_with_a_dot_keeps_all_of_it(tmp_path):
    """`...-r0.1-t0-s0` used to be written as `...-r0.json` (Path.with_suffix): two scenarios that
    differ after the dot overwrote each other's file, and a cache never found its own."""
    spec = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
    model = build_model("small-cnn", spec).eval()
    manifest = save_model(model, tmp_path / "badnets3-r0.1-t0-s0", "small-cnn", spec, {"tool": "test"})
    assert manifest.name == "badnets3-r0.1-t0-s0.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badnets3-r0.1-t0-s0.json", "badnets3-r0.1-t0-s0.safetensors"]
    assert load_model(tmp_path / "badnets3-r0.1-t0-s0.json").spec == spec


def _saved(tmp_path):
    spec = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
    save_model(build_model("small-cnn", spec), tmp_path / "m", "small-cnn", spec, {"tool": "test"})
    return tmp_path / "m"


def test_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path):
    base = _saved(tmp_path)
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(base.with_suffix(".pt"), "wb") as handle:
        pickle.dump({"weights": Exploit()}, handle)
    with pytest.raises(UnsafeFileError, match="SHA-256"):   # its hash is not the manifest's
        load_model(base.with_suffix(".pt"))
    import hashlib   # an attacker who wrote the manifest too: weights_only refuses the pickle

    _edited(base, lambda m: m.update(weights_sha256=hashlib.sha256(base.with_suffix(".pt").read_bytes()).hexdigest()))
    with pytest.raises(UnsafeFileError, match="refusing"):
        load_model(base.with_suffix(".pt"))
    assert not marker.exists()


def test_weights_only_pt_state_dict_loads_only_with_its_hash_in_the_manifest(tmp_path):
    import hashlib

    base = _saved(tmp_path)
    torch.save(load_model(base.with_suffix(".json")).model.state_dict(), base.with_suffix(".pt"))
    with pytest.raises(UnsafeFileError, match="SHA-256"):
        load_model(base.with_suffix(".pt"))
    manifest = json.loads(base.with_suffix(".json").read_text())
    manifest["weights_sha256"] = hashlib.sha256(base.with_suffix(".pt").read_bytes()).hexdigest()
    base.with_suffix(".json").write_text(json.dumps(manifest))
    assert load_model(base.with_suffix(".pt")).model_name == "small-cnn"


def _edited(base, edit):
    manifest = json.loads(base.with_suffix(".json").read_text())
    edit(manifest)
    base.with_suffix(".json").write_text(json.dumps(manifest))


HOSTILE_MANIFESTS = {
    "weights outside the folder": lambda m: m.update(weights_file="../outside/x.safetensors"),
    "absolute weights path": lambda m: m.update(weights_file="/etc/passwd.safetensors"),
    "weights file not safetensors": lambda m: m.update(weights_file="m.pt"),
    "weights file a list": lambda m: m.update(weights_file=["m.safetensors"]),
    "model a list": lambda m: m.update(model=["small-cnn"]),
    "input spec a string": lambda m: m.update(input_spec="1x16x16"),
    "channels a string": lambda m: m["input_spec"].update(channels="1"),
    "mean a string": lambda m: m["input_spec"].update(mean="abc"),
    "mean NaN": lambda m: m["input_spec"].update(mean=[float("nan")]),
    "num_classes 10**12": lambda m: (m["input_spec"].update(num_classes=10**12), m.update(num_classes=10**12)),
    "num_classes a float": lambda m: m["input_spec"].update(num_classes=10.0),
    "height huge": lambda m: m["input_spec"].update(height=10**9),
    "num_classes disagree": lambda m: m.update(num_classes=11),
    "sha a number": lambda m: m.update(weights_sha256=5),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifests_are_refused_before_anything_is_built(tmp_path, name, monkeypatch):
    import defense.modelio as modelio

    base = _saved(tmp_path)
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    _edited(base, HOSTILE_MANIFESTS[name])
    monkeypatch.setattr(modelio, "build_model", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(UnsafeFileError):
        load_model(base.with_suffix(".json"))


def test_deeply_nested_and_non_object_manifests_are_refused(tmp_path):
    base = _saved(tmp_path)
    for text in ("[" * 100_000 + "]" * 100_000, '["model"]', '"small-cnn"', "{not json"):
        base.with_suffix(".json").write_text(text)
        with pytest.raises(UnsafeFileError):
            load_model(base.with_suffix(".json"))


def test_folders_as_model_paths_are_one_line_errors(tmp_path):
    for path in (tmp_path, "/", "."):
        with pytest.raises(ConfigError, match="folder"):
            load_model(path)


def test_non_finite_weights_are_refused_on_load(tmp_path):
    spec = InputSpec(1, 16, 16, 10, (0.3,), (0.4,))
    model = build_model("small-cnn", spec)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_model(model, tmp_path / "nan", "small-cnn", spec, {"tool": "test"})
    with pytest.raises(UnsafeFileError, match="non-finite"):
        load_model(tmp_path / "nan.json")


def test_tampered_truncated_and_unknown_files_are_refused(tmp_path):
    base = _saved(tmp_path)
    weights = base.with_suffix(".safetensors")
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(UnsafeFileError, match="SHA-256"):
        load_model(weights)
    weights.write_bytes(original)
    manifest = json.loads(base.with_suffix(".json").read_text())
    manifest["model"] = "mystery-net"
    base.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFileError, match="unknown model"):
        load_model(weights)
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "absent.json")


def test_importing_defense_pulls_in_neither_flower_nor_ray():
    code = ("import sys, defense, defense.dhbe, defense.data, defense.models, defense.modelio, defense.metrics, "
            "defense.triggers, defense.evaluate; bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_registry_has_wide_resnets():
    assert {"wrn-16-1", "wrn-40-2"} <= set(MODELS.names())
