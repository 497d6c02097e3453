"""Mixture surrogates on RegMix's real results: how well a fit on 1M-parameter proxies orders real 1B models.

    python benchmarks/regmix_surrogates.py [--folds 5] [--seed 0]

Reads tests/fixtures/regmix (RegMix's data, MIT, Sea AI Lab): 512 mixtures with the Pile-CC validation loss
of 1M-parameter proxies trained on them (and the first 128 of them as a smaller swarm), 256 other mixtures
trained at 60M parameters, and 64 other mixtures trained at 1B parameters for 25B tokens. For each
surrogate family, RegMix's own recipe (LightGBM, learning rate 1e-2, 1,000 rounds, seed 42) and rbridge's
``auto`` (the family with the best k-fold cross-validated Spearman on the 1M data only), it prints the CV
Spearman on the 1M data, then the Spearman correlation of its predictions with the real 1B and 60M losses,
and the real rank of the mixture it predicts best at 1B (1 = the real best of 64). The 60M and 1B losses
are read only to print these columns: no choice depends on them. Fit times are wall seconds on the machine
printed first.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIX = ROOT / "tests" / "fixtures" / "regmix"
LOSS = "metric/the_pile_pile_cc_val_loss"


def _mixtures(name: str) -> dict[str, dict[str, float]]:
    from rbridge.mixtures.weights import normalise

    with open(FIX / name, newline="") as f:
        return {r.pop("index"): normalise({k.removeprefix("train_"): float(v) for k, v in r.items()})
                for r in csv.DictReader(f)}


def _losses(name: str) -> dict[str, float]:
    with open(FIX / name, newline="") as f:
        return {r["index"]: float(r[LOSS]) for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import print_machine

    from rbridge.mixtures.surrogates import Surrogate, choose, cross_validate, lightgbm_available
    from rbridge.mixtures.weights import as_matrix, source_order

    print_machine(1)
    if not lightgbm_available():
        sys.exit("needs lightgbm: pip install 'rbridge[mixtures]'")
    train, loss_1m = _mixtures("train_mixture_1m.csv"), _losses("train_pile_loss_1m.csv")
    m1b, l1b = _mixtures("test_mixture_1B.csv"), _losses("test_pile_loss_1B.csv")
    m60, l60 = _mixtures("test_mixture_1m.csv"), _losses("test_pile_loss_60m.csv")
    sources = source_order(list(train.values()) + list(m1b.values()) + list(m60.values()))
    x1b, y1b = as_matrix([m1b[k] for k in sorted(l1b)], sources), np.array([l1b[k] for k in sorted(l1b)])
    x60, y60 = as_matrix([m60[k] for k in sorted(l60)], sources), np.array([l60[k] for k in sorted(l60)])
    print(f"\nPile-CC loss; 1B: {len(y1b)} models (25B tokens), 60M: {len(y60)} models; "
          f"{args.folds}-fold CV (seed {args.seed}) on the 1M proxies only")
    print(f"{'proxies':>7}  {'surrogate':<24} {'CV rho 1M':>9} {'rho 1B':>7} {'best@1B':>7} {'rho 60M':>7} {'fit s':>6}")
    for n in (512, 128):
        keys = sorted(train, key=int)[:n]
        keys = sorted(keys, key=lambda k: f"m{k}")  # the row order rbridge's store gives (by candidate name)
        x, y = as_matrix([train[k] for k in keys], sources), np.array([loss_1m[k] for k in keys])
        chosen, _ = choose(x, y, "auto", k=args.folds, seed=args.seed)
        rows = [("linear", {}), ("log_linear", {}), ("lightgbm", {}), ("lightgbm", {"regmix_recipe": True})]
        for fam, params in rows + [(None, None)]:
            label = ("RegMix recipe (LightGBM)" if params else fam) if fam else f"auto -> {chosen.family}"
            t0 = time.perf_counter()
            model = Surrogate(fam, dict(params)).fit(x, y) if fam else chosen
            fit_s = time.perf_counter() - t0
            cv = cross_validate(fam or chosen.family, x, y, k=args.folds, seed=args.seed, params=params or {})
            p1b, p60 = model.predict(x1b), model.predict(x60)
            best = int((y1b < y1b[int(np.argmin(p1b))]).sum()) + 1
            print(f"{n:>7}  {label:<24} {cv.spearman:>9.3f} {spearmanr(p1b, y1b).statistic:>7.3f} {best:>7} "
                  f"{spearmanr(p60, y60).statistic:>7.3f} {fit_s if fam else float('nan'):>6.2f}")


if __name__ == "__main__":
    main()
