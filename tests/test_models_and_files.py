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
    with pytest.raises(UnsafeFileError, match="refusing"):
        load_model(base.with_suffix(".pt"))
    assert not marker.exists()


def test_weights_only_pt_state_dict_loads(tmp_path):
    base = _saved(tmp_path)
    torch.save(load_model(base.with_suffix(".json")).model.state_dict(), base.with_suffix(".pt"))
    assert load_model(base.with_suffix(".pt")).model_name == "small-cnn"


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
