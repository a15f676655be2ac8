"""Aggregation of per-row scores and continual-learning metrics (AP, BWT, FWT, forgetting) of a stage x task matrix."""
import math

import numpy as np


def summarize(values):
    """Mean of the non-None values (None marks "not applicable"), or None if there are none."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def aggregate(scores):
    """List of per-row score dicts -> {key: mean over rows where the key is not None}."""
    keys = sorted({k for s in scores for k in s})
    return {k: summarize([s.get(k) for s in scores]) for k in keys}


def _as_matrix(R, name="R"):
    """R -> float array (2-D); a None/NaN cell raises ValueError naming it."""
    rows = [list(r) for r in R]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{name} must be a non-empty rectangular matrix")
    for t, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
                raise ValueError(f"{name}[{t}][{i}] is missing ({v}); evaluate every stage on every task")
    return np.asarray(rows, dtype=float)


def required_cells(T):
    """The (stage, task) cells AP, BWT and FWT read in a (T+1) x T matrix: the base row, the last row, each
    task right after its stage (R[i+1][i]) and right before it (R[i][i]). eval_grid "needed" scores only these."""
    cells = {(0, i) for i in range(T)} | {(T, i) for i in range(T)} | {(i + 1, i) for i in range(T)}
    return cells | {(i, i) for i in range(1, T)}


def cl_metrics(R, higher_is_better=True, sparse=False):
    """AP, BWT, FWT and forgetting of a (T+1) x T matrix, R[t][i] = score on task i after stage t.

    0-indexed: row 0 is the base model, task i is learned at stage i+1, so R[i+1][i] is task i
    right after learning it. With 1-indexed tasks j (EVALUATION.md) this is exactly
      AP  = mean_i R[T][i]
      BWT = mean_{i < T-1}  R[T][i] - R[i+1][i]         (1-indexed: R[T][j] - R[j][j], j < T)
      FWT = mean_{i >= 1}   R[i][i] - R[0][i]           (1-indexed: R[j-1][j] - R[0][j], j >= 2)
      forgetting_i = max_{l in 0 .. T-1} R[l][i] - R[T][i], for i < T-1: the best score at any stage
      before the last, the base model included (EVALUATION.md; Chaudhry et al. 2018), minus the final
      score. With an instruct base, a task the base already did better than any later stage counts.
    Sign convention: for losses (higher_is_better=False) BWT, FWT and forgetting are computed on -R,
    so positive BWT/FWT always mean improvement and positive forgetting always means getting worse.
    AP stays in the matrix's own units (mean final loss for losses). T = 1: BWT/FWT/forgetting None.
    sparse=True accepts None outside `required_cells` (an eval_grid "needed" run): forgetting's maximum then
    runs over the stages that were evaluated.
    """
    if sparse:
        rows = [list(r) for r in R]
        T = len(rows[0]) if rows else 0
        if len(rows) != T + 1 or any(len(r) != T for r in rows):
            raise ValueError(f"R must be (T+1) x T (base model + one row per stage), got {len(rows)} rows")
        for t, i in sorted(required_cells(T)):
            if rows[t][i] is None or (isinstance(rows[t][i], float) and math.isnan(rows[t][i])):
                raise ValueError(f"R[{t}][{i}] is missing; AP, BWT and FWT need it")
        R = np.asarray([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=float)
    else:
        R = _as_matrix(R)
    T = R.shape[1]
    if R.shape[0] != T + 1:
        raise ValueError(f"R must have T+1 = {T + 1} rows (base model + one per stage), got {R.shape[0]}")
    out = {"ap": float(R[T].mean()), "higher_is_better": higher_is_better}
    if T == 1:
        return {**out, "bwt": None, "fwt": None, "forgetting": None, "forgetting_per_task": []}
    S = R if higher_is_better else -R
    bwt = np.mean([S[T, i] - S[i + 1, i] for i in range(T - 1)])
    fwt = np.mean([S[i, i] - S[0, i] for i in range(1, T)])
    per_task = [float(np.nanmax(S[:T, i]) - S[T, i]) for i in range(T - 1)]
    return {**out, "bwt": float(bwt), "fwt": float(fwt),
            "forgetting": float(np.mean(per_task)), "forgetting_per_task": per_task}


def drift_delta(R_side, t):
    """TRACE drift of side abilities: (1/M) sum_i (R_side[t][i] - R_side[0][i]); R_side is stages x M."""
    R_side = _as_matrix(R_side, "R_side")
    if not 0 <= t < R_side.shape[0]:
        raise ValueError(f"stage t must be in 0..{R_side.shape[0] - 1}, got {t}")
    return float(np.mean(R_side[t] - R_side[0]))
