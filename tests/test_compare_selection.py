"""Automatic choices on the validation split: the split itself, `lr: auto`, early stopping."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest
import torch
from train_helpers import classification_data, tiny_bert_folder, trainable_weights

from deltatune.data import Datasets
from deltatune.errors import ConfigError, DataError
from deltatune.split import split_validation
from deltatune.train import config_from_dict, run
from deltatune.train.lr_search import search_lr


def _examples(labels: list[int], offset: int = 0) -> list[dict]:
    return [{"input_ids": [1, offset + i, 2], "labels": label} for i, label in enumerate(labels)]


# ---- the split --------------------------------------------------------------------------------------------
def test_split_is_stratified_and_repeatable():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    train, val, info = split_validation(_examples(labels), 0.2, seed=3)
    assert Counter(e["labels"] for e in val) == {0: 12, 1: 6, 2: 2}  # every label keeps its share
    assert len(train) + len(val) == 100 and info.rows == 20 and info.stratified
    assert not {tuple(e["input_ids"]) for e in train} & {tuple(e["input_ids"]) for e in val}
    again = split_validation(_examples(labels), 0.2, seed=3)[1]
    assert again == val and split_validation(_examples(labels), 0.2, seed=4)[1] != val


def test_split_keeps_every_class_and_one_of_each_for_training():
    labels = [0] * 18 + [1] * 2 + [2]  # a rare class gives one to validation, keeps one; a single one trains
    train, val, _ = split_validation(_examples(labels), 0.1, seed=0)
    assert Counter(e["labels"] for e in val) == {0: 2, 1: 1}
    assert Counter(e["labels"] for e in train) == {0: 16, 1: 1, 2: 1}


def test_split_never_holds_eval_examples():
    examples = _examples([0, 1] * 20)
    evals = examples[:10]  # the user's eval file repeats ten training rows
    for seed in range(1, 6):
        train, val, info = split_validation(examples, 0.5, seed, exclude=evals)
        assert not {tuple(e["input_ids"]) for e in val} & {tuple(e["input_ids"]) for e in evals}
        assert 0 < info.dropped_duplicates <= 10 and len(train) + len(val) == 40
        assert {tuple(e["input_ids"]) for e in evals} <= {tuple(e["input_ids"]) for e in train}


def test_split_causal_lm_is_random_and_errors_are_clear():
    examples = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(10)]
    train, val, info = split_validation(examples, 0.3, 0)
    assert len(val) == 3 and not info.stratified
    with pytest.raises(DataError, match="between 0 and 1"):
        split_validation(examples, 1.0, 0)
    with pytest.raises(DataError, match="no validation examples"):
        split_validation(_examples([0, 1]), 0.2, 0, exclude=_examples([0, 1]))


def test_config_validates_the_new_options():
    with pytest.raises(ConfigError, match="val_fraction is 0"):
        config_from_dict({"lr": "auto", "val_fraction": 0})
    with pytest.raises(ConfigError, match="'auto'"):
        config_from_dict({"lr": "fast"})
    assert config_from_dict({"lr": "auto"}).lr == "auto"
    assert config_from_dict({"lr": "3e-4"}).lr == 3e-4


# ---- lr: auto ---------------------------------------------------------------------------------------------
def test_lr_auto_walks_the_grid_to_the_known_best(tmp_path):
    """A synthetic task whose validation loss is lowest at exactly one rate, 9x the default: the search
    starts at default/3..3x, extends towards the best and stops once it is inside the grid."""
    best = 1e-4 * 9
    calls = []

    def fake_train(model, data, cfg, **kw):
        calls.append(cfg.lr)
        return {"eval_loss": (math.log(cfg.lr) - math.log(best)) ** 2 + 0.1, "train_loss": 1.0}

    model = torch.nn.Linear(2, 2)
    data = Datasets(_examples([0, 1] * 8), [], {"a": 0, "b": 1}, "classification")
    cfg = config_from_dict({"lr": "auto", "lr_search_steps": 4, "lr_search_trials": 6})
    before = [p.detach().clone() for p in model.parameters()]
    result = search_lr(
        model, data, data.train[:4], cfg, out=str(tmp_path), train_fn=fake_train, default_lr=1e-4
    )
    assert result["lr"] == pytest.approx(best)
    # the grid stops once the best is inside; then the two best (9e-4, and 3e-4 tied with 2.7e-3, the lower
    # listed first) train again 3x as long
    assert calls == pytest.approx([1e-4 / 3, 1e-4, 3e-4, 9e-4, 2.7e-3, 9e-4, 3e-4])
    assert result["budget_steps"] == 5 * 4 + 2 * 12 and not result["at_grid_edge"]
    assert [t["lr"] for t in result["trials"]] == sorted(calls[:5])
    assert [(t["lr"], t["steps"]) for t in result["finalists"]] == [
        (pytest.approx(3e-4), 12),
        (pytest.approx(9e-4), 12),
    ]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_auto_finalists_undo_the_short_trials_bias(tmp_path):
    """A task where 20-step trials favour a rate that is too high for a longer run (as measured on the
    development task): the finalists, trained 3x as long, choose the lower rate; with `lr_search_finalists: 0`
    the short trials decide."""

    horizons = []

    def fake_train(model, data, cfg, **kw):
        horizons.append(kw["schedule_steps"])
        best = 9e-4 if cfg.max_steps == 4 else 3e-4  # short: the fast learner wins; long: the stable one
        # 2.7e-3 is second best in the short trials, but a finalist is the rate just below the best
        return {"eval_loss": abs(math.log(cfg.lr) - math.log(best)) + (0.5 if cfg.lr < best else 0.1)}

    model = torch.nn.Linear(2, 2)
    data = Datasets(_examples([0, 1] * 8), [], {"a": 0, "b": 1}, "classification")
    for finalists, chosen in ((2, 3e-4), (0, 9e-4)):
        horizons.clear()
        cfg = config_from_dict(
            {"lr": "auto", "lr_search_steps": 4, "lr_search_finalists": finalists, "max_steps": 100}
        )
        result = search_lr(
            model, data, data.train[:4], cfg, out=str(tmp_path), train_fn=fake_train, default_lr=1e-4
        )
        assert result["lr"] == pytest.approx(chosen)
        assert min(result["trials"], key=lambda t: t["val_loss"])["lr"] == pytest.approx(9e-4)
        assert [t["lr"] for t in result["finalists"]] == pytest.approx([3e-4, 9e-4][:finalists])
        assert set(horizons) == {100}  # every trial is the start of the real 100-step run, schedule included
    with pytest.raises(Exception, match="lr_search_finalists: must not be negative"):
        config_from_dict({"lr": "auto", "lr_search_finalists": -1})


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def emails(tmp_path_factory):
    return classification_data(tmp_path_factory.mktemp("data") / "emails.jsonl", n=40)


def _config(out, bert, emails, **overrides):
    values = {
        "model": bert,
        "data": emails,
        "batch_size": 4,
        "save_every": 0,
        "eval_at_start": False,
        "progress": False,
        "max_length": 32,
        "output_dir": str(out),
        "method_args": {"r": 2, "lora_alpha": 4},
        "schedule": "constant",
    }
    return config_from_dict(values | overrides)


def test_lr_auto_then_trains_exactly_as_with_the_chosen_rate(tmp_path, bert, emails, caplog):
    """The search puts the weights and the random state back: the real run equals a run given that rate."""
    with caplog.at_level("INFO"):
        auto = run(
            _config(
                tmp_path / "auto",
                bert,
                emails,
                lr="auto",
                lr_search_steps=3,
                max_steps=4,
                early_stopping=True,
            )
        )
    # each trial's score is reported once, as the validation loss it is (the loop's own line called it eval_loss)
    lines = [r.getMessage() for r in caplog.records]
    last_trial = max(i for i, line in enumerate(lines) if line.startswith("lr search: lr "))
    assert not [line for line in lines[:last_trial] if "eval_loss=" in line]
    assert logging.getLogger("deltatune.train.loop").level == logging.NOTSET  # put back
    search = auto["lr_search"]
    assert auto["lr_chosen_by"] == "auto" and auto["lr"] == search["lr"]
    assert search["lr"] == min(search["finalists"], key=lambda t: t["val_loss"])["lr"]
    assert len(search["finalists"]) == 2 and search["budget_steps"] == 3 * len(search["trials"]) + 2 * 9
    assert json.loads((tmp_path / "auto" / "lr_search.json").read_text())["lr"] == search["lr"]
    run(_config(tmp_path / "fixed", bert, emails, lr=search["lr"], max_steps=4, early_stopping=True))
    a, b = trainable_weights(tmp_path / "auto"), trainable_weights(tmp_path / "fixed")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- early stopping ---------------------------------------------------------------------------------------
def test_early_stopping_restores_the_best_weights(tmp_path, bert, emails):
    stopped = run(_config(tmp_path / "es", bert, emails, lr=0.3, epochs=8, early_stopping=True, patience=2))
    curve = stopped["val_curve"]
    best = min(curve, key=lambda c: c["val_loss"])
    assert stopped["best_step"] == best["step"] and stopped["val_loss"] == best["val_loss"]
    assert stopped["stopped_early"] and stopped["steps"] > stopped["best_step"]
    assert stopped["evaluated_on"] == "validation split" and stopped["eval_loss"] == best["val_loss"]
    # the same run stopped by hand at the best step has the same weights (constant schedule, same split)
    again = run(_config(tmp_path / "fixed", bert, emails, lr=0.3, max_steps=stopped["best_step"]))
    a, b = trainable_weights(tmp_path / "es"), trainable_weights(tmp_path / "fixed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)


def test_no_eval_data_evaluates_on_the_validation_split(tmp_path, bert, emails):
    summary = run(_config(tmp_path / "r", bert, emails, lr=1e-2, max_steps=2, val_fraction=0.25))
    assert summary["evaluated_on"] == "validation split"
    assert summary["validation"]["rows"] == 10 and summary["validation"]["stratified"]
    assert summary["eval_accuracy"] == summary["val_accuracy"]
    none = run(_config(tmp_path / "n", bert, emails, lr=1e-2, max_steps=2, val_fraction=0))
    assert none["evaluated_on"] is None and "eval_accuracy" not in none and "eval_loss" not in none
