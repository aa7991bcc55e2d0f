"""A cheap predictor of a trial's quality, used to screen trials before the real evaluation.

Prediction = sum over layers of the layer's measured sensitivity at the nearest candidate of
the same method family (interpolated in log-space over the kept fraction), corrected by a
scikit-learn regression fitted on the trials measured so far.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import HuberRegressor

from autohybrid.inventory import Inventory
from autohybrid.methods import METHODS, family
from autohybrid.spec import LayerSpec

__all__ = ["Surrogate"]

EPS = 1e-6


class Surrogate:
    def __init__(self, table: pd.DataFrame, inv: Inventory, signal: str = "kl"):
        self.inv, self.signal = inv, signal
        self.curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        df = table.assign(
            family=[family(m) for m in table.method],
            kept=table.params / (table.params + table.params_saved),
        )
        for (layer, fam), rows in df.groupby(["layer", "family"]):
            rows = rows.groupby("kept", as_index=False)[signal].mean().sort_values("kept")
            self.curves[(layer, fam)] = (
                np.log(rows.kept.to_numpy(float)),
                np.log(np.clip(rows[signal].to_numpy(float), EPS, None)),
            )
        self.model: HuberRegressor | None = None

    def additive(self, layers: dict[str, LayerSpec]) -> float:
        """Sum of per-layer sensitivities (the first-order prediction)."""
        total = 0.0
        for name, spec in layers.items():
            if spec.method == "dense":  # unchanged: no sensitivity
                continue
            curve = self.curves.get((name, family(spec.method)))
            if curve is None:
                curve = next((c for (n, _), c in self.curves.items() if n == name), None)
            if curve is None:
                continue
            layer = self.inv[name]
            kept = METHODS[spec.method].params(layer, spec) / max(layer.params, 1)
            x, y = curve
            total += float(np.exp(np.interp(np.log(max(kept, EPS)), x, y)))
        return total

    def fit(self, predicted: list[float], cost: list[float], measured: list[float]) -> None:
        """Fit log(measured) ~ log(additive prediction) + cost on the finished trials."""
        if len(measured) < 6:
            self.model = None
            return
        X = np.column_stack([np.log(np.asarray(predicted) + EPS), cost])
        y = np.log(np.asarray(measured) + EPS)
        try:
            self.model = HuberRegressor(max_iter=500).fit(X, y)
        except ValueError:
            self.model = None

    def predict(self, layers: dict[str, LayerSpec], cost: float) -> tuple[float, float]:
        """(additive prediction, corrected prediction)."""
        add = self.additive(layers)
        if self.model is None:
            return add, add
        corrected = float(np.exp(self.model.predict([[np.log(add + EPS), cost]])[0]) - EPS)
        return add, max(corrected, 0.0)
