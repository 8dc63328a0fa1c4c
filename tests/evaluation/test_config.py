"""Tests of run configs: the demo config parses, every error names the file and the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from xaiadv.evaluation.config import DEMO_CONFIG, DETECTORS, ConfigError, load_config, parse_config

MINIMAL: dict[str, Any] = {
    "output": "runs/x",
    "data": {"dataset": "digits", "samples": 10},
    "attacks": [{"name": "xaiadv:LRPGrad", "params": {"eps": 0.1}}],
}


def _with(path: str, value: object) -> dict[str, Any]:
    """MINIMAL with one dotted key set (a list index as a number)."""
    raw = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    return raw


def test_the_demo_config_parses_with_its_documented_defaults() -> None:
    config = load_config(DEMO_CONFIG)
    assert config.dataset == "fashion_mnist" and config.fallback == "digits"
    assert config.samples == 500
    assert config.output == "runs/demo"
    labels = [attack.label for attack in config.attacks]
    for expected in (
        "LRP-flip",
        "LRP-mean",
        "LRP-grad",
        "LRP-grad+mean",
        "IFGSM (ART BIM)",
        "DeepFool (ART)",
    ):
        assert expected in labels
    names = {attack.name for attack in config.attacks}
    assert {"art:FastGradientMethod", "art:CarliniL2Method", "art:PixelAttack"} <= names
    assert {"foolbox:LinfPGD", "foolbox:SparseL1DescentAttack", "torchattacks:PGD"} <= names
    assert {detector.name for detector in config.detectors} == set(DETECTORS)
    assert config.source == str(DEMO_CONFIG)


def test_the_quick_config_parses() -> None:
    config = load_config(DEMO_CONFIG.with_name("quick.toml"))
    assert config.dataset == "digits" and config.output == "runs/quick"
    assert [attack.name.partition(":")[0] for attack in config.attacks] == [
        "xaiadv",
        "art",
        "foolbox",
        "torchattacks",
    ]


def test_defaults_and_labels() -> None:
    config = parse_config(MINIMAL)
    assert config.attacks[0].label == "xaiadv:LRPGrad"
    assert config.attacks[0].params == {"eps": 0.1}
    assert config.seed == 0 and config.device == "cpu" and config.batch_size == 128
    assert config.studies == ("xaiadv:AttackStudy", "xaiadv:DetectorStudy")
    assert config.model.checkpoint is None and config.model.epochs == 2


def test_overrides_replace_top_level_keys(tmp_path: Path) -> None:
    config = load_config(DEMO_CONFIG, overrides={"output": str(tmp_path / "elsewhere"), "device": "cpu"})
    assert config.output == str(tmp_path / "elsewhere")


def test_studies_can_be_switched_off() -> None:
    config = parse_config(_with("studies", {"detectors": False}))
    assert config.studies == ("xaiadv:AttackStudy",)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with("colour", "red"), r"cfg.toml: unknown key\(s\) colour"),
        (_with("data.dataset", "imagenet"), r"cfg.toml: data.dataset: expected one of"),
        (_with("data.samples", 0), r"cfg.toml: data.samples: expected an integer > 0, got 0"),
        (_with("data.samples", True), r"data.samples: expected an integer > 0, got True"),
        (_with("data.extra", 1), r"unknown key\(s\) data.extra"),
        (_with("seed", -1), r"cfg.toml: seed: expected an integer >= 0"),
        (_with("device", "tpu"), r"cfg.toml: device: expected one of cpu, cuda"),
        (
            _with("attacks.0.name", "art:NoSuchAttack"),
            r"attacks\[0\].name: unknown attack 'art:NoSuchAttack'; valid",
        ),
        (_with("attacks.0.samples", -3), r"attacks\[0\].samples: expected an integer > 0"),
        (_with("attacks.0.params", 3), r"attacks\[0\].params: expected a table"),
        (_with("attacks", []), r"attacks: expected an array of tables"),
        (
            _with("detectors", [{"name": "xaiadv:Nope"}]),
            r"detectors\[0\].name: expected one of xaiadv:Spatial",
        ),
        (
            _with("detectors", [{"name": "art:BinaryInputDetector"}]),
            r"detectors\[0\].train_attack: art:BinaryInputDetector is trained on adversarial examples",
        ),
        (
            _with("detectors", [{"name": "xaiadv:KNNDetector", "train_attack": "art:FastGradientMethod"}]),
            r"detectors\[0\].train_attack: only ART's trained detectors take one",
        ),
        (
            _with("attacks", [{"name": "xaiadv:LRPGrad"}, {"name": "xaiadv:LRPGrad"}]),
            r"attacks: labels must be unique; repeated: \['xaiadv:LRPGrad'\]",
        ),
        (_with("model.checkpoint", "w.safetensors"), r"model.checkpoint and model.factory go together"),
        (
            _with("model", {"checkpoint": "w.safetensors", "factory": "nocolon"}),
            r"model.factory: expected 'package.module:callable'",
        ),
        (_with("studies.attacks", "yes"), r"studies.attacks: expected true or false"),
        (_with("studies.equal_asr", "LRP"), r"studies.equal_asr: expected a list of attack labels"),
        (
            _with("studies.equal_asr", ["nope"]),
            r"studies.equal_asr: \['nope'\] are not attack labels of this run; valid: xaiadv:LRPGrad",
        ),
        ({k: v for k, v in MINIMAL.items() if k != "data"}, r"cfg.toml: missing table \[data\]"),
        ({k: v for k, v in MINIMAL.items() if k != "attacks"}, r"cfg.toml: missing \[\[attacks\]\]"),
        ({k: v for k, v in MINIMAL.items() if k != "output"}, r"cfg.toml: missing key output"),
    ],
)
def test_config_errors_name_the_file_and_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="cfg.toml")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: no such config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("output = \n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML"):
        load_config(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text(
        'output = "x"\n[data]\ndataset = "digits"\nsampels = 3\n[[attacks]]\nname = "xaiadv:LRPGrad"\n'
    )
    with pytest.raises(ConfigError, match=r"typo.toml: unknown key\(s\) data.sampels"):
        load_config(typo)
