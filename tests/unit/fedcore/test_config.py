import argparse
import re

import pytest

from fedcore.errors import ConfigError
from fedcore.experiments.cli import build_parser, main
from fedcore.experiments.config import load_config, parse_config


def test_example_config_parses():
    config = load_config("examples/main.toml")
    assert config.privacy.level == "sample" and config.aggregation.mode == "masked"
    assert config.workload.num_silos == 5


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: 3\nworkload:\n  case: clothing\n")
    config = load_config(path, overrides={"rounds": 7, "privacy.level": "client", "privacy.noise_multiplier": 1.0})
    assert config.rounds == 7 and config.workload.case == "clothing" and config.privacy.level == "client"
    assert (config.workload.model, config.workload.partition) == ("frozen", "silos")  # the case's defaults
    assert (parse_config({}).workload.model, parse_config({}).workload.partition) == ("mf", "regions")


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"rounds": 0}, "rounds must be an integer > 0, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"executor": "spark"}, r"executor must be one of \['in-process', 'ray'\], got 'spark'"),
        ({"colour": "red"}, "unknown top-level key 'colour'"),
        ({"train": {"lrate": 0.1}}, r"unknown key\(s\) \['lrate'\] in \[train\]"),
        ({"workload": {"case": "netflix"}}, r"workload.case must be one of \['movielens', 'clothing'\], got 'netflix'"),
        ({"workload": {"model": "bert"}}, r"workload.model must be one of \['mf', 'mf_text', 'transformer'\], got 'bert'"),
        ({"workload": {"trainable_layers": 9}}, r"workload.trainable_layers must be an integer in \[0, 6\], got 9"),
        ({"workload": {"loss": "hinge"}}, r"workload.loss must be one of \['bce', 'softmax'\], got 'hinge'"),
        ({"workload": {"dim": 0}}, "workload.dim must be an integer > 0, got 0"),
        (
            {"workload": {"case": "clothing", "model": "frozen", "partition": "users"}},
            r"workload.partition must be one of \['silos'\], got 'users'",
        ),
        ({"sampling": {"kind": "poisson"}}, r"sampling.q must be in \(0, 1\] for poisson sampling, got None"),
        ({"sampling": {"kind": "fixed", "count": 0}}, "sampling.count must be an integer > 0, got 0"),
        (
            {"aggregation": {"mode": "tee"}},
            r"aggregation.mode must be one of \['plaintext', 'masked', 'ckks', 'bfv'\], got 'tee'",
        ),
        ({"aggregation": {"dropout_tolerance": 1.0}}, r"aggregation.dropout_tolerance must be in \[0, 1\), got 1.0"),
        ({"aggregation": {"signed_keys": "yes"}}, r"aggregation.signed_keys must be true or false, got 'yes'"),
        ({"reproducible": 1}, r"reproducible must be true or false, got 1"),
        (
            {"privacy": {"level": "sample", "noise_multiplier": 1.0, "adaptive_clip": True}},
            r"privacy.adaptive_clip applies to level 'client' with noise 'central', got level 'sample'",
        ),
        (
            {"privacy": {"level": "client", "noise_multiplier": 1.0, "adaptive_clip": True}},
            r"privacy.count_noise_multiplier must be a number > 0, got None",
        ),
        ({"aggregation": {"bits": 16}}, "aggregation.bits must be 32 or 64, got 16"),
        ({"aggregation": {"dropout_rate": 1.0}}, r"aggregation.dropout_rate must be in \[0, 1\), got 1.0"),
        (
            {"privacy": {"level": "sample"}},
            "privacy level 'sample' needs exactly one of privacy.noise_multiplier and privacy.target_epsilon",
        ),
        ({"privacy": {"delta": 2.0}}, r"privacy.delta must be a float in \(0, 1\), got 2.0"),
        ({"privacy": {"clip": -1}}, "privacy.clip must be a number > 0, got -1"),
        ({"privacy": {"noise": "laplace"}}, r"privacy.noise must be one of \['central', 'skellam', 'discrete_gaussian'\]"),
        ({"strategy": {"name": "fedprox"}}, "strategy.name must be one of"),
        ({"train": 3}, r"\[train\] must be a table of settings, got 3"),
        ({"privacy": {"lazy_noise": "yes"}}, "privacy.lazy_noise must be true or false, got 'yes'"),
        (
            {"privacy": {"level": "sample", "noise_multiplier": 1.0, "audit_canaries": -1}},
            r"privacy.audit_canaries must be 0 \(no audit\) or an int >= 100, got -1",
        ),
        (
            {"privacy": {"level": "client", "noise_multiplier": 1.0, "lazy_noise": True}},
            "privacy.lazy_noise applies to level 'sample' \\(DP-SGD\\), got level 'client'",
        ),
    ],
)
def test_bad_settings_are_refused_naming_key_and_value(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="is malformed"):
        load_config(bad)
    other = tmp_path / "exp.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="must end in .toml, .yaml or .yml, got 'exp.json'"):
        load_config(other)


def test_help_documents_every_section(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for section in (
        "[workload]",
        "[train]",
        "[sampling]",
        "[strategy]",
        "[aggregation]",
        "[privacy]",
        "[logging]",
        "--resume",
        "--set",
    ):
        assert section in text


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The help text of ``parser`` and of every subcommand under it, by command path."""
    texts = {parser.prog: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts.update(_helps(sub))
    return texts


def test_help_is_plain_text_without_sphinx_markup():
    helps = _helps(build_parser())
    assert "fedcore run" in helps
    for prog, text in helps.items():
        markup = re.findall(r"``|:[a-z]+:`", text)
        assert not markup, f"{prog} --help shows Sphinx markup {markup}"
    run = helps["fedcore run"]
    # the docstring's cross-reference and literals survive as plain words, the section named once
    assert "[train] local training of each client; the defaults are fedcore.TrainConfig's." in run
    assert "[sampling] kind = all | poisson (with q) | fixed (with count)." in run


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text("rounds = 0\n")
    assert main(["run", str(path)]) == 2
    assert "fedcore: error: rounds must be an integer > 0, got 0" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "oops"]) == 2
    assert "--set takes section.key=value, got 'oops'" in capsys.readouterr().err


def test_the_after_run_audit_runs_only_when_cheap_and_on_dp_sgd(caplog):
    """``audit_run``: no audit without DP-SGD, with ``audit_canaries = 0``, or above AUDIT_MAX_NOISE_DRAWS (said in the log)."""
    import logging
    from types import SimpleNamespace

    import dp
    from fedcore.experiments.config import AUDIT_MAX_NOISE_DRAWS, parse_config
    from fedcore.experiments.experiment import audit_run

    ledger = dp.Ledger()
    steps = AUDIT_MAX_NOISE_DRAWS // 100_000 + 1
    ledger.record(dp.SampleLevelEvent(client_id="a", round_index=1, noise_multiplier=1.0, max_grad_norm=1.0,
                                      sample_rate=1.0, steps=steps))  # fmt: skip
    privacy = {"level": "sample", "noise_multiplier": 1.0}
    for section, expect_log in (({"level": "none"}, False), ({**privacy, "audit_canaries": 0}, False), (privacy, True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedcore.experiments.experiment"):
            assert audit_run(SimpleNamespace(config=parse_config({"privacy": section}), ledger=ledger)) is None
        assert ("no privacy audit" in caplog.text) is expect_log
