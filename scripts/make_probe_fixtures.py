#!/usr/bin/env python3
"""Reference fits of scikit-learn's LogisticRegression for the probe of `es2-wgpu eval`.

For each case below, draws seeded synthetic "embeddings" of harmful (label 1) and harmless
(label 0) prompts, fits `LogisticRegression()` with scikit-learn's defaults (L2, C=1.0, lbfgs,
fit_intercept, max_iter=100, no feature scaling) on the train split, and writes, under
tests/fixtures/probe/:

- probe.safetensors (f32): `<case>.<split>.<class>` = rows [n, C] for split in {train, test} and
  class in {harmful, harmless};
- probe.json: per case the shapes, the default fit's held-out and train accuracy, coefficients,
  intercept, iterations and whether lbfgs converged within max_iter, and the same for a fit of
  the same objective run to convergence (max_iter=10000, tol=1e-10): the exact optimum that the
  Rust probe, which iterates to convergence, should reproduce.

Both fits read the stored f32 values widened to float64, as the Rust side does. The cases are
chosen so that accuracy is not trivially 100%: overlapping classes, an embedding-like case with
a large common offset and a few high-variance "outlier" channels (unscaled, where lbfgs's
iteration limit bites), and a case with fewer rows than channels where the penalty decides.
Run by hand, not in CI (CI only reads what this wrote):

    python3 -m venv .venv && .venv/bin/pip install numpy scikit-learn safetensors
    .venv/bin/python scripts/make_probe_fixtures.py
"""

import json
import warnings
from pathlib import Path

import numpy as np
import sklearn
from safetensors.numpy import save_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "probe"
COLS = 64


def unit(rng, cols):
    v = rng.standard_normal(cols)
    return v / np.linalg.norm(v)


def overlap(rng):
    """Two unit-variance Gaussians whose means are 1.5 apart: about 77% separable."""
    shift = 0.75 * unit(rng, COLS)
    draw = lambda n, sign: rng.standard_normal((n, COLS)) + sign * shift
    return draw, (150, 150, 100, 100)


def embedding_like(rng):
    """A large shared offset, a few channels with 20x the spread, and a class shift that mixes
    both kinds of channel: what pooled hidden states of a language model look like."""
    offset = 30.0 * unit(rng, COLS)
    scale = np.ones(COLS)
    scale[rng.choice(COLS, 4, replace=False)] = 20.0
    shift = 0.5 * unit(rng, COLS) * scale
    draw = lambda n, sign: offset + rng.standard_normal((n, COLS)) * scale + sign * shift
    return draw, (220, 180, 100, 100)


def few_rows(rng):
    """Fewer training rows than channels, classes nearly separable: the L2 penalty decides w."""
    shift = 1.5 * unit(rng, COLS)
    draw = lambda n, sign: 0.8 * rng.standard_normal((n, COLS)) + sign * shift
    return draw, (25, 35, 100, 100)


CASES = {"overlap": overlap, "embedding-like": embedding_like, "few-rows": few_rows}


def fit(x, y, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(**options).fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def summary(model, converged, x_train, y_train, x_test, y_test):
    return {
        "test_accuracy": float(model.score(x_test, y_test)),
        "train_accuracy": float(model.score(x_train, y_train)),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
        "n_iter": int(model.n_iter_[0]),
        "converged": converged,
    }


def make_case(seed, name, build):
    rng = np.random.default_rng(seed)
    draw, (n_h, n_s, t_h, t_s) = build(rng)
    rows = {
        "train.harmful": draw(n_h, 1.0),
        "train.harmless": draw(n_s, -1.0),
        "test.harmful": draw(t_h, 1.0),
        "test.harmless": draw(t_s, -1.0),
    }
    # Both sides fit the f32 values that are stored.
    rows = {k: v.astype(np.float32) for k, v in rows.items()}
    wide = {k: v.astype(np.float64) for k, v in rows.items()}
    split = lambda s: (
        np.vstack([wide[f"{s}.harmful"], wide[f"{s}.harmless"]]),
        np.concatenate([np.ones(len(wide[f"{s}.harmful"])), np.zeros(len(wide[f"{s}.harmless"]))]),
    )
    (x_train, y_train), (x_test, y_test) = split("train"), split("test")
    default, default_ok = fit(x_train, y_train)
    tight, tight_ok = fit(x_train, y_train, max_iter=10000, tol=1e-10)
    assert tight_ok, f"{name}: the tight fit did not converge"
    entry = {
        "cols": COLS,
        "rows": {k: len(v) for k, v in rows.items()},
        "default": summary(default, default_ok, x_train, y_train, x_test, y_test),
        "converged": summary(tight, tight_ok, x_train, y_train, x_test, y_test),
    }
    tensors = {f"{name}.{k}": v for k, v in rows.items()}
    return entry, tensors


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases, tensors = {}, {}
    for seed, (name, build) in enumerate(CASES.items()):
        entry, arrays = make_case(seed, name, build)
        cases[name] = entry
        tensors.update(arrays)
        d, c = entry["default"], entry["converged"]
        print(
            f"{name}: held-out accuracy {d['test_accuracy']:.3f} (default, {d['n_iter']} iter, "
            f"converged={d['converged']}) / {c['test_accuracy']:.3f} (to convergence)"
        )
    save_file(tensors, str(OUT / "probe.safetensors"))
    meta = {"sklearn": sklearn.__version__, "numpy": np.__version__, "cases": cases}
    (OUT / "probe.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
