"""Tests of run configs: the demo config parses, every error names the file and the key."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from xaiadv.evaluation.attack_study import AttackStudy
from xaiadv.evaluation.config import (
    DEMO_CONFIG,
    AttackSpec,
    ConfigError,
    DetectorSpec,
    ModelSpec,
    RunConfig,
    load_config,
    parse_config,
)
from xaiadv.evaluation.detector_study import DetectorStudy, detector_registry
from xaiadv.evaluation.heatmap_study import HeatmapStudy
from xaiadv.evaluation.signature_study import SignatureStudy

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
    assert {detector.name for detector in config.detectors} == set(detector_registry())
    assert config.source == str(DEMO_CONFIG) and config.name == "demo"
    attack_study, detector_study, *explanations = config.studies
    assert isinstance(attack_study, AttackStudy) and isinstance(detector_study, DetectorStudy)
    assert "LRP-grad" in attack_study.equal_asr and "LRP-mean" not in attack_study.equal_asr
    assert explanations == [HeatmapStudy(), SignatureStudy()]  # seed 001's two, with their defaults


def test_the_readmes_toml_example_parses() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_config(tomllib.loads(example), source="README.md")
    assert config.name == "mine" and config.detectors[0].name == "xaiadv:IDefenderDetector"
    assert config.studies == (AttackStudy(equal_asr=("LRP-grad",)), DetectorStudy())


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
    assert config.studies == (AttackStudy(equal_asr=()), DetectorStudy())
    assert [study.name for study in config.studies] == ["xaiadv:AttackStudy", "xaiadv:DetectorStudy"]
    assert config.model.checkpoint is None and config.model.epochs == 2
    assert config.name is None


def test_the_defaults_are_the_dataclasses_own() -> None:
    """parse_config maps only the keys given: what is left out is the dataclass field's default."""
    config = parse_config(MINIMAL)
    defaults = RunConfig("digits", 10, "runs/x", (AttackSpec("xaiadv:LRPGrad", params={"eps": 0.1}),))
    assert config == dataclasses.replace(defaults, folder=config.folder)
    assert config.model == ModelSpec() and config.fit_samples == 10_000
    detector = parse_config({**MINIMAL, "detectors": [{"name": "xaiadv:KNNDetector"}]}).detectors[0]
    assert detector == DetectorSpec("xaiadv:KNNDetector") and detector.label == "xaiadv:KNNDetector"


def test_overrides_replace_top_level_keys(tmp_path: Path) -> None:
    config = load_config(DEMO_CONFIG, overrides={"output": str(tmp_path / "elsewhere"), "device": "cpu"})
    assert config.output == str(tmp_path / "elsewhere")


def test_studies_are_named_in_their_own_entries_with_their_parameters() -> None:
    config = parse_config(_with("studies", [{"name": "xaiadv:AttackStudy", "equal_asr": ["xaiadv:LRPGrad"]}]))
    assert config.studies == (AttackStudy(equal_asr=("xaiadv:LRPGrad",)),)
    assert config.to_dict()["studies"] == [{"name": "xaiadv:AttackStudy", "equal_asr": ("xaiadv:LRPGrad",)}]
    assert parse_config(_with("studies", [])).studies == ()


def test_the_old_studies_table_says_the_new_form() -> None:
    with pytest.raises(ConfigError, match=r"cfg.toml: studies: the \[studies\] table is gone") as error:
        parse_config(_with("studies", {"detectors": False, "equal_asr": []}), source="cfg.toml")
    assert '[[studies]] name = "xaiadv:AttackStudy" equal_asr = [...]' in str(error.value)


def test_a_run_name_is_kept() -> None:
    config = parse_config(_with("name", "nightly"))
    assert config.name == "nightly" and config.to_dict()["name"] == "nightly"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RunConfig("digits", 0, "out", (AttackSpec("xaiadv:LRPGrad"),)),
            r"^<dict>: data.samples must be an int > 0; got 0$",
        ),
        (
            lambda: RunConfig(
                "digits", 5, "out", (AttackSpec("xaiadv:LRPGrad"),), device="tpu", source="s.toml"
            ),
            r"^s.toml: device must be one of 'cpu', 'cuda'; got 'tpu'$",
        ),
        (lambda: RunConfig("digits", 5, "out", ()), r"^<dict>: attacks: a run needs at least one$"),
        (
            lambda: RunConfig(
                "digits",
                5,
                "out",
                (AttackSpec("xaiadv:LRPGrad"),),
                studies=(AttackStudy(equal_asr=("PGD",)),),
            ),
            r"^<dict>: studies\[0\].equal_asr: \['PGD'\] are not attack labels of this run; "
            r"valid: xaiadv:LRPGrad$",
        ),
        (
            lambda: RunConfig(
                "digits", 5, "out", (AttackSpec("xaiadv:LRPGrad"),), studies=(DetectorStudy(),) * 2
            ),
            r"^<dict>: studies: each study once; repeated: \['xaiadv:DetectorStudy'\]$",
        ),
        (lambda: AttackSpec("xaiadv:LRPGrad", samples=0), r"^samples must be an int > 0; got 0$"),
        (lambda: AttackSpec("xaiadv:LRPGrad", label=""), r"^label: expected a non-empty string, got ''$"),
        (
            lambda: DetectorSpec("xaiadv:KNNDetector", train_samples=True),
            r"^train_samples must be an int > 0",
        ),
        (lambda: ModelSpec(max_train=0), r"^max_train must be an int > 0; got 0$"),
        (lambda: AttackStudy(equal_asr="LRP"), r"^equal_asr: expected a list of attack labels, got 'LRP'$"),
    ],
    ids=[
        "samples",
        "device",
        "no-attacks",
        "equal-asr",
        "study-twice",
        "attack",
        "label",
        "detector",
        "model",
        "study",
    ],
)
def test_the_dataclasses_validate_themselves_when_built_in_python(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with("colour", "red"), r"cfg.toml: unknown key\(s\) colour"),
        (_with("data.dataset", "imagenet"), r"cfg.toml: data.dataset must be one of \'digits\'"),
        (_with("data.samples", 0), r"cfg.toml: data.samples must be an int > 0; got 0"),
        (_with("data.samples", True), r"data.samples must be an int > 0; got True"),
        (_with("data.extra", 1), r"unknown key\(s\) data.extra"),
        (_with("seed", -1), r"cfg.toml: seed must be an int >= 0; got -1"),
        (_with("device", "tpu"), r"cfg.toml: device must be one of \'cpu\', \'cuda\'; got \'tpu\'"),
        (
            _with("attacks.0.name", "art:NoSuchAttack"),
            r"attacks\[0\].name: unknown attack 'art:NoSuchAttack'; valid",
        ),
        (_with("attacks.0.samples", -3), r"cfg.toml: attacks\[0\].samples must be an int > 0; got -3"),
        (_with("attacks.0.params", 3), r"cfg.toml: attacks\[0\].params: expected a table, got 3"),
        (_with("attacks", []), r"attacks: expected an array of tables"),
        (
            _with("detectors", [{"name": "xaiadv:Nope"}]),
            r"cfg.toml: detectors\[0\].name: unknown detector 'xaiadv:Nope'; valid names: "
            r".*xaiadv:SpatialEntropyDetector",
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
        (_with("model.checkpoint", "w.safetensors"), r"cfg.toml: model.checkpoint and factory go together"),
        (
            _with("model", {"checkpoint": "w.safetensors", "factory": "nocolon"}),
            r"model.factory: expected 'package.module:callable'",
        ),
        (
            _with("studies", [{"name": "xaiadv:AttackStudy", "equal_asr": "LRP"}]),
            r"cfg.toml: studies\[0\].equal_asr: expected a list of attack labels, got 'LRP'",
        ),
        (
            _with("studies", [{"name": "xaiadv:AttackStudy", "equal_asr": ["nope"]}]),
            r"cfg.toml: studies\[0\].equal_asr: \['nope'\] are not attack labels of this run; valid: "
            r"xaiadv:LRPGrad",
        ),
        (
            _with("studies", [{"name": "xaiadv:DetectorStudy"}, {"name": "xaiadv:AttackStudi"}]),
            r"cfg.toml: studies\[1\].name: unknown study 'xaiadv:AttackStudi'; valid names: .*; "
            r"did you mean 'xaiadv:AttackStudy'\?",
        ),
        (
            _with("studies", [{"name": "xaiadv:AttackStudy", "equal_asrs": []}]),
            r"cfg.toml: unknown key\(s\) studies\[0\].equal_asrs; valid: studies\[0\].equal_asr, "
            r"studies\[0\].name",
        ),
        (_with("studies", [{"equal_asr": []}]), r"cfg.toml: missing key studies\[0\].name"),
        (_with("studies", ["xaiadv:AttackStudy"]), r"cfg.toml: studies\[0\]: expected a table"),
        (
            _with("studies", [{"name": "xaiadv:DetectorStudy"}, {"name": "xaiadv:DetectorStudy"}]),
            r"cfg.toml: studies: each study once; repeated: \['xaiadv:DetectorStudy'\]",
        ),
        (
            _with("detectors", [{"name": "xaiadv:IDefender"}]),
            r"cfg.toml: detectors\[0\].name: unknown detector 'xaiadv:IDefender'; valid names: .*; "
            r"did you mean 'xaiadv:IDefenderDetector'\?",
        ),
        (_with("name", ""), r"cfg.toml: name: expected a non-empty string, got ''"),
        (_with("attacks.0.label", 3), r"cfg.toml: attacks\[0\].label: expected a non-empty string, got 3"),
        (_with("attacks.0.extra", 3), r"cfg.toml: unknown key\(s\) attacks\[0\].extra"),
        (_with("model.width", 0), r"cfg.toml: model.width must be an int > 0; got 0"),
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


# --------------------------------------------------------------------------------------------------
# every attack and detector is built by its library when the config loads

VALID = [
    {"name": "xaiadv:LRPGrad", "label": "LRP-grad", "params": {"eps": 0.1}},
    {"name": "torchattacks:PGD", "label": "PGD", "params": {"eps": 0.3, "steps": 2}},
]


def _third_attack(entry: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with two valid attacks and ``entry`` as attacks[2]."""
    return {**MINIMAL, "attacks": [*VALID, entry]}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "xaiadv:LRPGrad", "label": "BIM", "params": {"eps": 0.01, "max_iters": 20}},
            r"cfg.toml: attacks\[2\] \(label \"BIM\"\): params.max_iters: unknown parameter of "
            r"xaiadv:LRPGrad; did you mean 'max_iter'\?",
        ),
        (
            {"name": "art:BasicIterativeMethod", "label": "BIM", "params": {"eps": 0.3, "max_iters": 20}},
            r"cfg.toml: attacks\[2\] \(label \"BIM\"\): params.max_iters: unknown parameter of "
            r"art:BasicIterativeMethod; did you mean 'max_iter'\?",
        ),
        (
            {"name": "torchattacks:PGD", "label": "PGD 2", "params": {"stepz": 20}},
            r"cfg.toml: attacks\[2\] \(label \"PGD 2\"\): params.stepz: unknown parameter of "
            r"torchattacks:PGD; did you mean 'steps'\?",
        ),
        (
            {"name": "foolbox:LinfPGD", "label": "fb", "params": {"epsilons": 0.3, "stepz": 3}},
            r"attacks\[2\] \(label \"fb\"\): params.stepz: unknown parameter of foolbox:LinfPGD; "
            r"did you mean 'steps'\?",
        ),
        (
            {"name": "xaiadv:LRPGrad", "label": "LRP 2", "params": {"eps": "0.01"}},
            r"cfg.toml: attacks\[2\] \(label \"LRP 2\"\): params.eps: xaiadv:LRPGrad refused it "
            r"\(ValueError: eps must be a finite number > 0 or None; got '0.01'\)",
        ),
        (
            {"name": "art:BasicIterativeMethod", "label": "BIM", "params": {"eps": "0.3"}},
            r"attacks\[2\] \(label \"BIM\"\): params.eps: art:BasicIterativeMethod refused it "
            r"\(TypeError: The perturbation size `eps`",
        ),
        (
            {"name": "torchattacks:PGD", "label": "PGD 2", "params": {"eps": "0.01"}},
            r"attacks\[2\] \(label \"PGD 2\"\): params.eps: expected a number \(torchattacks:PGD's "
            r"default is 0.0313\d*\), got '0.01'",
        ),
        (
            {"name": "foolbox:LinfPGD", "label": "fb", "params": {"epsilons": 0.3, "steps": "3"}},
            r"attacks\[2\] \(label \"fb\"\): params.steps: expected a number .*, got '3'",
        ),
        (
            {"name": "torchattacks:PGD", "label": "PGD 2", "params": {"random_start": 0}},
            r"params.random_start: expected true or false .*, got 0",
        ),
        (
            {"name": "foolbox:LinfPGD", "label": "fb", "params": {"steps": 3}},
            r"attacks\[2\] \(label \"fb\"\): params: foolbox:LinfPGD refused them \(ValueError: "
            r"foolbox:LinfPGD is a fixed-epsilon attack: pass epsilons=<budget>\)",
        ),
        (
            {"name": "xaiadv:LRPGrad", "label": "LRP 2", "params": {"n_batch": -4}},
            r"attacks\[2\] \(label \"LRP 2\"\): params.n_batch: xaiadv:LRPGrad refused it",
        ),
    ],
    ids=[
        "ours-name",
        "art-name",
        "torchattacks-name",
        "foolbox-name",
        "ours-type",
        "art-type",
        "torchattacks-type",
        "foolbox-type",
        "torchattacks-bool",
        "foolbox-missing",
        "ours-value",
    ],
)
def test_misconfigured_attack_params_are_config_errors(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_third_attack(entry), source="cfg.toml")


def test_an_unknown_name_far_from_any_lists_the_valid_ones() -> None:
    entry = {"name": "torchattacks:PGD", "label": "PGD 2", "params": {"colour": 1}}
    with pytest.raises(
        ConfigError, match=r"params.colour: unknown parameter of torchattacks:PGD; valid: "
    ) as e:
        parse_config(_third_attack(entry), source="cfg.toml")
    assert "did you mean" not in str(e.value)
    assert "alpha" in str(e.value) and "model" not in str(e.value).split("valid: ")[1]


def test_valid_library_params_pass_including_arts_string_norm() -> None:
    entries = [
        {"name": "art:ProjectedGradientDescent", "label": "a", "params": {"norm": "inf", "eps": 0.3}},
        {"name": "torchattacks:CW", "label": "b", "params": {"c": 0.5, "steps": 3}},
        {"name": "foolbox:LinfPGD", "label": "c", "params": {"epsilons": 0.3, "steps": 3}},
    ]
    config = parse_config({**MINIMAL, "attacks": entries}, source="cfg.toml")
    assert [attack.label for attack in config.attacks] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        (
            {"name": "xaiadv:KNNDetector", "label": "kNN", "params": {"kk": 5}},
            r"cfg.toml: detectors\[1\] \(label \"kNN\"\): params.kk: unknown parameter of "
            r"xaiadv:KNNDetector; did you mean 'k'\?",
        ),
        (
            {"name": "xaiadv:IDefenderDetector", "label": "ID", "params": {"keep": 1.5}},
            r"detectors\[1\] \(label \"ID\"\): params.keep: xaiadv:IDefenderDetector refused it "
            r"\(ValueError: ",
        ),
        (
            {"name": "xaiadv:SpatialEntropyDetector", "label": "SE", "params": {"layer": "features.9"}},
            r"detectors\[1\] \(label \"SE\"\): params.layer: xaiadv:SpatialEntropyDetector refused it "
            r"\(ValueError: layer\(s\) \['features.9'\] not in the model",
        ),
        (
            {
                "name": "art:BinaryActivationDetector",
                "label": "BAD",
                "train_attack": "art:FastGradientMethod",
                "params": {"epoch": 2},
            },
            r"detectors\[1\] \(label \"BAD\"\): params.epoch: unknown parameter of "
            r"art:BinaryActivationDetector; did you mean 'epochs'\?",
        ),
        (
            {
                "name": "art:BinaryInputDetector",
                "label": "BID",
                "train_attack": "art:FastGradientMethod",
                "params": {"epochs": 0},
            },
            r"detectors\[1\] \(label \"BID\"\): params.epochs: expected an integer > 0, got 0",
        ),
        (
            {
                "name": "art:BinaryActivationDetector",
                "label": "BAD",
                "train_attack": "art:FastGradientMethod",
                "params": {"layer": "nope"},
            },
            r"detectors\[1\] \(label \"BAD\"\): params.layer: art:BinaryActivationDetector refused it",
        ),
        (
            {
                "name": "art:BinaryInputDetector",
                "label": "BID",
                "train_attack": "art:FastGradientMethod",
                "train_params": {"epz": 0.1},
            },
            r"detectors\[1\] \(label \"BID\"\): train_params.epz: unknown parameter of "
            r"art:FastGradientMethod; did you mean 'eps'\?",
        ),
    ],
    ids=["ours-name", "ours-value", "ours-layer", "peer-name", "peer-epochs", "peer-layer", "peer-train"],
)
def test_misconfigured_detector_params_are_config_errors(detector: dict[str, Any], message: str) -> None:
    raw = {**MINIMAL, "detectors": [{"name": "xaiadv:KNNDetector", "label": "first"}, detector]}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="cfg.toml")


def test_a_valid_detector_layer_of_the_reference_cnn_passes() -> None:
    raw = {**MINIMAL, "detectors": [{"name": "xaiadv:SpatialEntropyDetector", "params": {"layer": "0"}}]}
    assert parse_config(raw).detectors[0].params == {"layer": "0"}


def test_loading_a_config_leaves_the_global_rng_alone() -> None:
    import torch

    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    load_config(DEMO_CONFIG)
    assert torch.equal(torch.rand(2), expected)
