"""``SearchConfig``: what a search is told, validated before any work; the CLI's layering."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autohybrid.config import SearchConfig
from autohybrid.exceptions import ConfigError
from autohybrid.search.select import ladder_of


def test_ladder_of_a_config_follows_the_winners_length_or_the_budget() -> None:
    cfg = SearchConfig(finetune_budget=800)
    assert ladder_of(cfg, 6, 44000).full == 600
    assert ladder_of(SearchConfig(finetune_steps=90), 6, 44000).full == 90
    epochs = ladder_of(SearchConfig(finetune_epochs=2), 6, 1280)  # 10 steps of 128 an epoch
    assert epochs.full == 20
    assert ladder_of(SearchConfig(), 6, 44000).cost <= 800  # the default budget


def test_finetune_budget_and_the_winners_length_are_not_given_together() -> None:
    with pytest.raises(ConfigError, match="not both"):
        SearchConfig(finetune_budget=100, finetune_steps=10).validate()
    with pytest.raises(ConfigError, match="eta"):
        SearchConfig(eta=1).validate()
    with pytest.raises(ConfigError, match="candidates"):
        SearchConfig(candidates=-1).validate()


def test_a_users_finetune_length_replaces_the_demos_ladder_budget(monkeypatch) -> None:
    """The demo sets a ladder budget; a user's --finetune-steps on the demo is not a
    conflict with it but replaces it (layering: defaults < demo < --config < flags)."""
    import autohybrid.demo as demo
    from autohybrid.cli.search import FLAGS, resolve

    monkeypatch.setattr(demo, "demo_settings", lambda progress=True: {
        **demo.DEMO_SETTINGS, "checkpoint": "demo.pth"})
    args = SimpleNamespace(**{k: None for k in FLAGS}, config=None, model_arg=[],
                           no_screen=False, resume=False)
    assert resolve(args).finetune_budget == demo.DEMO_SETTINGS["finetune_budget"]
    args.finetune_steps = 50
    cfg = resolve(args)
    assert cfg.finetune_steps == 50 and cfg.finetune_budget is None
    args.finetune_budget = 100  # both from the user: refused
    with pytest.raises(ConfigError, match="not both"):
        resolve(args)
