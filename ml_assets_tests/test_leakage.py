"""Leakage hints of `ml-assets init` by predictive power on a holdout: a planted perfect separator and a
target that is an exact function of three columns are flagged, with why, in the file init writes; a
strong but honest feature (correlation 0.92) is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ml_assets.core import leakage
from ml_assets.core.scaffold import leakage_hints, scaffold


def _market(n: int = 3000, seed: int = 1) -> pl.DataFrame:
    """Did the price go up today? The same day's return separates it perfectly; yesterday's does not."""
    rng = np.random.default_rng(seed)
    ret = rng.normal(scale=0.01, size=n)
    return pl.DataFrame(
        {
            "return_today": ret,
            "return_yesterday": np.roll(ret, 1),
            "volume": rng.lognormal(10, 1, size=n),
            "sector": rng.choice(["tech", "energy", "retail"], size=n),
            "up": np.where(ret > 0, "yes", "no"),
        }
    )


def _loans(n: int = 6000, seed: int = 2) -> pl.DataFrame:
    """A loan's rate is an exact function of its installment, amount and term (the annuity formula)."""
    rng = np.random.default_rng(seed)
    amount = rng.uniform(1_000, 40_000, size=n).round(0)
    term = rng.choice([36, 60], size=n)
    rate = rng.uniform(0.05, 0.25, size=n)
    monthly = rate / 12
    installment = amount * monthly / (1 - (1 + monthly) ** -term)
    return pl.DataFrame(
        {
            "amount": amount,
            "term": term,
            "installment": installment.round(2),
            "income": rng.lognormal(11, 0.5, size=n),
            "grade": rng.choice(list("ABCDE"), size=n),
            "rate": rate,
        }
    )


def _strong(n: int = 4000, seed: int = 3) -> pl.DataFrame:
    """A price and its strongest honest predictor (correlation ~0.92), plus a weak one."""
    rng = np.random.default_rng(seed)
    size = rng.normal(size=n)
    price = size + rng.normal(scale=0.42, size=n)
    return pl.DataFrame({"size": size, "rooms": rng.integers(1, 6, size=n), "price": price})


def test_a_perfect_separator_is_flagged_by_its_holdout_roc_auc():
    frame = _market()
    hints = leakage_hints(frame, "up", "binary", ["return_today", "return_yesterday", "volume", "sector"])
    assert set(hints) == {"return_today"}, hints
    assert "alone it predicts 'up' with holdout ROC-AUC" in hints["return_today"]


def test_a_target_that_is_an_exact_function_of_three_columns_names_all_three():
    frame = _loans()
    columns = ["amount", "term", "installment", "income", "grade"]
    hints = leakage_hints(frame, "rate", "regression", columns)
    assert set(hints) == {"amount", "term", "installment"}, hints
    assert "with 'amount', 'term' it predicts 'rate' with holdout R^2" in hints["installment"]
    assert "function of them" in hints["amount"]
    # No column alone gives the rate away: the hint comes from the columns together.
    data = frame.to_pandas()
    assert all(abs(np.corrcoef(data[c], data["rate"])[0, 1]) < 0.9 for c in ("amount", "term", "installment"))


def test_a_strong_but_honest_feature_is_not_flagged():
    frame = _strong()
    corr = np.corrcoef(frame.get_column("size"), frame.get_column("price"))[0, 1]
    assert 0.9 < corr < 0.95  # what the old correlation rule (>= 0.9) flagged
    assert leakage_hints(frame, "price", "regression", ["size", "rooms"]) == {}


def test_init_writes_why_a_column_is_flagged_and_keeps_it_a_feature(tmp_path: Path):
    path = tmp_path / "market.csv"
    _market().write_csv(path)
    text = scaffold(str(path), "up", tmp_path / "market.yaml")
    features = [line for line in text.splitlines() if line.startswith("  - {name: ")]
    flagged = {line.split("name: ")[1].split(",")[0]: line for line in features if "LEAKAGE?" in line}
    assert set(flagged) == {"return_today"}, text
    assert f">= {leakage.ALONE_AUC}" in flagged["return_today"]
    assert len(features) == 4  # flagged, and kept a feature


def test_hints_read_a_bounded_sample_of_a_large_frame(monkeypatch):
    """Init on a file of millions judges a seeded sample: the same hints from SAMPLE_ROWS rows."""
    monkeypatch.setattr(leakage, "SAMPLE_ROWS", 1000)
    frame = pl.concat([_market(seed=s) for s in range(4)])
    seen = []
    real = leakage._fit_score

    def counting(task, model, split):
        seen.append(len(split[0]) + len(split[1]))
        return real(task, model, split)

    monkeypatch.setattr(leakage, "_fit_score", counting)
    hints = leakage_hints(frame, "up", "binary", ["return_today", "volume"])
    assert set(hints) == {"return_today"}
    assert seen and max(seen) == 1000
