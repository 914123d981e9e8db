import numpy as np
import pytest
from conftest import through_checkpoint

from dataflex.selection import budget, select_by_loss, select_random, select_reducible, select_top


def test_loss_focus_picks_the_expected_examples():
    losses = np.array([0.5, 3.0, 1.0, np.nan, 2.0, 0.1, 1.5, 2.5])
    assert select_by_loss(losses, 0.25, "hard").tolist() == [1, 7]  # 3.0 and 2.5
    assert select_by_loss(losses, 0.25, "easy").tolist() == [0, 5]  # 0.1 and 0.5
    # 7 scored losses sorted: 0.1 0.5 1.0 1.5 2.0 2.5 3.0 -> the middle two are 1.0 and 1.5
    assert select_by_loss(losses, 0.25, "medium").tolist() == [2, 6]
    assert 3 not in select_by_loss(losses, 0.75, "hard")  # unscored examples come last
    with pytest.raises(ValueError, match="mode='hardest'"):
        select_by_loss(losses, 0.5, "hardest")


def test_rho_loss_prefers_learnable_over_noisy_or_learnt():
    # example 0: high loss but also high irreducible loss (noise); 1: learnable; 2: already learnt
    loss = np.array([4.0, 3.0, 0.5, 2.0])
    irreducible = np.array([3.9, 1.0, 0.4, 1.5])
    assert select_reducible(loss, irreducible, 0.25).tolist() == [1]
    assert select_by_loss(loss, 0.25, "hard").tolist() == [0]  # plain loss focus would take the noise
    with pytest.raises(ValueError, match="differ in shape"):
        select_reducible(loss, irreducible[:2], 0.5)


def test_top_random_and_budget():
    scores = np.array([0.1, 0.9, 0.9, -1.0])
    assert select_top(scores, 0.5).tolist() == [1, 2]
    a, b = select_random(100, 0.05, seed=1), select_random(100, 0.05, seed=1)
    assert a.tolist() == b.tolist() and len(a) == 5 and len(set(a.tolist())) == 5
    assert select_random(100, 0.05, seed=2).tolist() != a.tolist()
    assert budget(10, 0.01) == 1
    with pytest.raises(ValueError, match="fraction must lie in"):
        budget(10, 0.0)


def test_per_label_selection_keeps_every_label():
    """A score that favours one label takes the whole budget from it, unless the rule runs per label."""
    from dataflex.selectors import SelectionContext, Selector

    class Fixed(Selector):
        def score(self, ids, ctx):
            return np.where(np.arange(40)[ids] < 20, 10.0, 0.0) + np.arange(40)[ids] * 1e-3

    labels = np.repeat([0, 1], 20)
    ctx = SelectionContext(model=None, dataset=list(range(40)), collate=None, step=1, seed=0, labels=labels)
    pooled = Fixed(0.25).select(ctx)
    assert set(labels[pooled]) == {0} and len(pooled) == 10
    split = Fixed(0.25, per_label=True).select(ctx)
    assert np.bincount(labels[split]).tolist() == [5, 5]
    assert split[labels[split] == 1].tolist() == [35, 36, 37, 38, 39]  # the top scores within label 1
    with pytest.raises(ValueError, match="per_label=True needs the pool's labels"):
        Fixed(0.25, per_label=True).select(
            SelectionContext(model=None, dataset=list(range(40)), collate=None, step=1, seed=0)
        )


def test_random_selection_per_label_draws_the_same_share_of_every_label():
    """Before, RandomSelection ignored per_label: 10 % of a pool with a 90/10 label split was one random draw,
    which could miss the small label entirely."""
    from dataflex.selectors import RandomSelection, SelectionContext

    labels = np.repeat([0, 1], [90, 10])
    for step in range(20):
        ctx = SelectionContext(model=None, dataset=range(100), collate=None, step=step, seed=3, labels=labels)
        split = RandomSelection(0.1, per_label=True).select(ctx)
        assert np.bincount(labels[split]).tolist() == [9, 1] and len(set(split.tolist())) == 10
        assert split.tolist() == RandomSelection(0.1, per_label=True).select(ctx).tolist()  # seeded by seed, step
    pooled = [
        RandomSelection(0.1).select(SelectionContext(None, range(100), None, step, 3, labels=labels))
        for step in range(20)
    ]
    assert any((labels[p] == 1).sum() != 1 for p in pooled)  # without per_label the share of a label varies
    with pytest.raises(ValueError, match="per_label=True needs the pool's labels"):
        RandomSelection(0.1, per_label=True).select(SelectionContext(None, range(100), None, 0, 3))


def test_loss_history_mean_separates_memorised_noise_and_resumes(monkeypatch):
    """history='mean' ranks by the loss averaged over re-selections; its sums survive a state round trip."""
    import dataflex.selectors as selectors
    from dataflex.selectors import LossFocus, SelectionContext

    rounds = [[1.0, 2.0, 2.5, 2.5], [0.5, 2.0, 1.0, 2.5], [0.2, 0.8, 0.9, 2.5], [0.1, 0.7, 0.4, 2.4]]
    now = {"round": 0}
    monkeypatch.setattr(selectors, "current_losses", lambda ids, ctx: np.asarray(rounds[now["round"]])[ids])
    ctx = SelectionContext(model=None, dataset=list(range(4)), collate=None, step=1, seed=0)
    last, mean = LossFocus(0.5, "easy"), LossFocus(0.5, "easy", history="mean")
    # example 1's answer is wrong: high loss until the model memorises it in round 3; example 2 is hard but right
    for r in range(3):
        now["round"] = r
        picks_last, picks_mean = last.select(ctx).tolist(), mean.select(ctx).tolist()
    assert picks_last == [0, 1]  # the latest snapshot keeps the memorised wrong answer
    assert picks_mean == [0, 2]  # averaged: 1.60 for the wrong answer vs 1.47 for the hard right one
    np.testing.assert_allclose(mean.last_scores[1], [1.7 / 3, 4.8 / 3, 4.4 / 3, 2.5])
    resumed = LossFocus(0.5, "easy", history="mean")
    resumed.load_state_dict(through_checkpoint(mean.state_dict()))
    now["round"] = 3
    assert resumed.select(ctx).tolist() == mean.select(ctx).tolist()
    np.testing.assert_array_equal(resumed.last_scores[1], mean.last_scores[1])
    assert LossFocus(0.5).state_dict() == {}
    with pytest.raises(ValueError, match="history='ema'"):
        LossFocus(0.5, history="ema")
