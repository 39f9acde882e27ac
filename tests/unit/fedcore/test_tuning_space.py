"""The private search's inputs: a bad space, distribution or setting is refused before anything loads."""

from __future__ import annotations

import pytest

import dp
import fedcore
from fedcore.errors import ConfigError
from fedcore.experiments.config import parse_config

SPACE = {"space": {"train.lr": {"loguniform": [0.01, 1.0]}}}


def _config(**privacy):
    raw = {"privacy": {"level": "sample", "unit": "record", "target_epsilon": 8.0, **privacy}, "workload": {"case": "movielens"}}
    return parse_config(raw)


def test_the_space_parses_into_flaml_domains_and_a_distribution():
    space = fedcore.parse_search_space({
        "trials": {"distribution": "truncated_negative_binomial", "eta": 0.5, "mean": 4},
        "score": {"metric": "ndcg@10", "noise_multiplier": 3},
        "space": {"train.lr": {"loguniform": [0.01, 1.0]}, "train.batch_size": {"choice": [256, 512]}},
    })  # fmt: skip
    assert space.distribution.eta == 0.5 and space.distribution.mean == pytest.approx(4)
    assert space.metric == "ndcg@10" and space.score_noise_multiplier == 3.0
    domains = space.flaml_space()
    assert domains["train.lr"].lower == 0.01 and list(domains["train.batch_size"].categories) == [256, 512]
    assert fedcore.parse_search_space(SPACE).distribution == dp.TrialDistribution.geometric(mean=3.0)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"space": {"privacy.noise_multiplier": {"uniform": [1, 2]}}}, "cannot be searched"),
        ({"space": {"train.lr": {"normal": [0, 1]}}}, "domain in"),
        ({"space": {"train.lr": {"uniform": [1]}}}, r"takes \[low, high\]"),
        ({"space": {}}, "search space is empty"),
        ({**SPACE, "trials": {"distribution": "uniform"}}, "trials.distribution must be one of"),
        ({**SPACE, "trials": {"distribution": "geometric", "eta": 2}}, "trials.eta applies to"),
        ({**SPACE, "trials": {"mean": 0.5}}, r"\[trials\]: mean .* must be >= 1"),
        ({**SPACE, "score": {"noise_multiplier": 0}}, "score.noise_multiplier must be a number > 0"),
        ({**SPACE, "score": {"metrc": "hr@10"}}, r"unknown key\(s\) \['metrc'\] in \[score\]"),
        ({**SPACE, "budget": {}}, "unknown table"),
    ],
)
def test_bad_spaces_are_refused_naming_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        fedcore.parse_search_space(raw)


@pytest.mark.parametrize(
    "config,match",
    [
        (parse_config({}), "needs privacy.level 'sample' or 'client'"),
        (parse_config({"privacy": {"level": "client", "target_epsilon": 8.0, "noise": "skellam"}, "aggregation": {"mode": "masked"}}),
         "central noise only"),
        (parse_config({"privacy": {"level": "client", "target_epsilon": 8.0, "adaptive_clip": True, "count_noise_multiplier": 5.0}}),
         "fixed clipping"),
        (parse_config({"privacy": {"level": "sample", "target_epsilon": 8.0}, "train": {"early_stopping_metric": "hr@10"}}),
         "without noise"),
        (parse_config({"privacy": {"level": "sample", "target_epsilon": 8.0}, "strategy": {"name": "selection"}}),
         "reveals individual models"),
    ],
)  # fmt: skip
def test_settings_a_search_cannot_account_for_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        fedcore.tune(config, fedcore.parse_search_space(SPACE))


def test_a_score_that_is_no_per_example_metric_is_refused_at_sample_level():
    space = fedcore.parse_search_space({**SPACE, "score": {"metric": "auc"}})
    with pytest.raises(ConfigError, match="score.metric must be one of"):
        fedcore.tune(_config(), space)
