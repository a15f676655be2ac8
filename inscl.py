"""InsCL replay (Wang et al., NAACL 2024, "InsCL: A Data-efficient Continual Learning Paradigm for Fine-tuning
Large Language Models with Instructions"): replay that looks at the instructions.

The buffer stage t trains with is built at the START of stage t, from the earlier tasks 1..t-1 measured against
task t (the task about to be learned), in four steps:

    1. features   each task is described by `inscl_embed_rows` of its training rows (a seeded draw from its own
                  generator): the frozen base model's hidden states after layer `inscl_layer` (0 = the token
                  embeddings, as the paper's embedding-layer instruction embeddings), mean-pooled over the
                  prompt (chat template included; the response is never read). Computed by
                  models.router.prompt_features with every adapter off, once per task (the base is frozen).
    2. distance   W_i = W2(task t, task i) between the two feature sets as uniform empirical distributions:
                  sqrt(<P, C>) with C the squared Euclidean costs and P the entropic optimal plan (Sinkhorn in
                  the log domain, float64, epsilon = `inscl_sinkhorn_eps` x mean(C), reached by epsilon scaling).
    3. allocation `replay_buffer_size` rows in total: one per earlier task, the rest split in proportion to W_i
                  (the more dissimilar, the more replay) by largest remainder, so the counts sum exactly to the
                  budget; a task never gets more rows than it has. `inscl_dynamic false`: equal weights (even).
    4. sampling   within task i, n_i rows without replacement with probability proportional to InsInfo
                  (Efraimidis-Spirakis keys u^(1/w), seeded; rows of InsInfo 0 only after every positive one).
                  `inscl_infosample false`: a uniform seeded draw (the same rows Replay draws).

InsInfo. The paper asks GPT-4 for the intention tags of each instruction and scores it by their number and rarity,
InsInfo(x) = sum over x's tags of log(N / f_tag). No such service runs here, so **the tags are the content words of
the row's instruction and input** (lowercased words of 3+ letters, English stop words removed, each word counted
once per row), and N and f_tag are counted over the task's own training rows. A word every row of the task shares
(boilerplate such as "solve the math problem step by step") scores log 1 = 0; a row with more, and rarer, content
words scores higher.

Use (train_seq_baselines.py wires it; `Replay.loss_fn` is inherited unchanged):

    replay = InsCLReplay(cfg, tok, pad, model)                      # model: the LoRA model being trained
    info = replay.start_of_task(task, list(cfg.tasks[:stage - 1]))   # at the top of every stage, resumed or not
    logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "inscl", **info})

`end_of_task(seen)` (Replay's hook, called after a stage and on resume) builds the buffer of the NEXT task in
cfg.tasks, so the existing calls stay valid; `start_of_task` then finds that buffer already built and only
reseeds the replay-batch generator. Every draw comes from seeds in the config, so a resumed run rebuilds the
same buffer.
"""
from __future__ import annotations

import math
import re

import torch

from models.router import dataset_prompts, prompt_features
from utils_replay import Replay
from utils_train import load_task_dataset

# Function words that carry no intention (a compact English list; the IDF also zeroes words every row shares).
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing done down during each either else etc even ever every few for from further get
gets given had has have having he her here hers herself him himself his how however i if in into is it its itself
just let may me might more most must my myself neither no nor not now of off on once one only or other others our
ours ourselves out over own per please same shall she should so some such than that the their theirs them
themselves then there these they this those though through thus to too under until up upon us use used using very
was we were what whatever when where whether which while who whom whose why will with within without would yet you
your yours yourself yourselves
""".split())
_WORD = re.compile(r"[a-z]+")
SINKHORN_TOL = 1e-6  # L1 error of the plan's marginals at which Sinkhorn stops (they sum to 1)


# ----------------------------------------------------------------------------- optimal transport
def sinkhorn(C: torch.Tensor, eps_rel: float = 1e-3, tol: float = SINKHORN_TOL, max_iter: int = 20000
             ) -> tuple[float, torch.Tensor, dict]:
    """Entropic OT between uniform weights on the rows and on the columns of the cost matrix C (n, m).

    Log-domain Sinkhorn in float64 with potentials f (n,), g (m,) and plan P_ij = exp((f_i + g_j - C_ij) / eps);
    epsilon falls from max(C) by factors of 10 to eps_rel x mean(C), each stage warm-started from the last (the
    intermediate stages only to a loose 1e-3). Stops when the L1 error of P's column sums is below `tol` (its row
    sums are exact after each update) or after `max_iter` iterations at the final epsilon.
    Returns (<P, C>, P, {"iters", "marginal_err", "eps"})."""
    if C.dim() != 2 or C.shape[0] == 0 or C.shape[1] == 0:
        raise ValueError(f"sinkhorn: the cost matrix must be (n, m) with n, m >= 1, got {tuple(C.shape)}")
    if not eps_rel > 0:
        raise ValueError(f"sinkhorn: eps_rel must be positive, got {eps_rel}")
    C = C.detach().to(torch.float64).cpu()
    if not torch.isfinite(C).all() or bool((C < 0).any()):
        raise ValueError("sinkhorn: costs must be finite and >= 0")
    n, m = C.shape
    scale = float(C.mean())
    if scale == 0.0:  # every point coincides: any coupling is optimal, the cost is zero
        return 0.0, torch.full((n, m), 1.0 / (n * m), dtype=torch.float64), {"iters": 0, "marginal_err": 0.0,
                                                                             "eps": 0.0}
    target = eps_rel * scale
    log_a, log_b = -math.log(n), -math.log(m)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64)
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    eps = max(float(C.max()), target)
    iters, err = 0, math.inf
    while True:
        final = eps <= target
        for it in range(max_iter if final else 1000):
            g = eps * (log_b - torch.logsumexp((f[:, None] - C) / eps, dim=0))  # columns exact
            f = eps * (log_a - torch.logsumexp((g[None, :] - C) / eps, dim=1))  # rows exact
            iters += 1
            if it % 10 == 9:
                err = float(((f[:, None] + g[None, :] - C) / eps).exp().sum(0).sub(b).abs().sum())
                if err < (tol if final else 1e-3):
                    break
        if final:
            break
        eps = max(eps / 10, target)
    P = ((f[:, None] + g[None, :] - C) / eps).exp()  # (n, m)
    err = float(P.sum(0).sub(b).abs().sum())
    return float((P * C).sum()), P, {"iters": iters, "marginal_err": err, "eps": eps}


def wasserstein(x: torch.Tensor, y: torch.Tensor, p: int = 2, eps_rel: float = 1e-3) -> tuple[float, dict]:
    """W_p between the uniform empirical distributions on the rows of x (n, H) and y (m, H), p in {1, 2}: the
    p-th root of the entropic-OT cost with Euclidean costs to the power p (see `sinkhorn`)."""
    if p not in (1, 2):
        raise ValueError(f"wasserstein: p must be 1 or 2, got {p!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"wasserstein: x and y must be (n, H) and (m, H), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    C = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** p  # exact, never negative
    cost, _, info = sinkhorn(C, eps_rel)
    return cost ** (1.0 / p), info


# ----------------------------------------------------------------------------- replay allocation
def allocate(budget: int, weights, capacity=None) -> list[int]:
    """Integer counts summing to min(budget, sum(capacity)): one per entry, the rest in proportion to `weights`
    by largest remainder (ties to the earlier entry), none above its capacity (the excess is re-split among the
    others the same way). All-zero weights split evenly."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"allocate: the budget must be an integer, got {budget!r}")
    w = [float(v) for v in weights]
    K = len(w)
    if K == 0:
        raise ValueError("allocate: no entries to split the budget over")
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ValueError(f"allocate: weights must be finite and >= 0, got {w}")
    cap = [math.inf] * K if capacity is None else [c for c in capacity]
    if len(cap) != K or any(c < 1 for c in cap):
        raise ValueError(f"allocate: every entry needs a capacity >= 1 (a task with rows), got {capacity}")
    total = int(min(budget, sum(cap)))
    if total < K:
        raise ValueError(f"allocate: the budget must be at least the {K} entries (each gets at least one row), "
                         f"got {budget} (capacity {sum(cap)})")
    counts = [0] * K
    free, left = list(range(K)), total
    while True:
        ws = [w[i] for i in free]
        if sum(ws) == 0:
            ws = [1.0] * len(free)
        rest = left - len(free)  # each free entry has 1; `rest` more by proportion
        quota = [rest * v / sum(ws) for v in ws]
        share = [1 + math.floor(q) for q in quota]
        by_remainder = sorted(range(len(free)), key=lambda j: (-(quota[j] - math.floor(quota[j])), j))
        for j in by_remainder[:left - sum(share)]:
            share[j] += 1
        over = [j for j, i in enumerate(free) if share[j] > cap[i]]
        if not over:
            for j, i in enumerate(free):
                counts[i] = share[j]
            return counts
        for j in over:  # fix these at their capacity; the others share what is left
            counts[free[j]] = int(cap[free[j]])
            left -= int(cap[free[j]])
        free = [i for j, i in enumerate(free) if j not in over]


# ----------------------------------------------------------------------------- InsInfo
def row_text(row: dict) -> str:
    """What a row asks: its instruction and its input (the prompt's text without the chat template)."""
    return f"{row['instruction']}\n{row.get('input', '')}"


def instruction_tags(text: str) -> frozenset[str]:
    """The stand-in for GPT-4's intention tags: the distinct content words of `text` (lowercase runs of 3+
    letters that are not stop words)."""
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOP_WORDS)


def insinfo(tag_sets: list[frozenset[str]]) -> torch.Tensor:
    """(N,) float64: InsInfo(x) = sum over x's tags of log(N / f_tag), f_tag = how many of the N rows carry it."""
    N = len(tag_sets)
    freq: dict[str, int] = {}
    for tags in tag_sets:
        for t in tags:
            freq[t] = freq.get(t, 0) + 1
    return torch.tensor([sum(math.log(N / freq[t]) for t in tags) for tags in tag_sets], dtype=torch.float64)


def weighted_order(weights: torch.Tensor, generator: torch.Generator) -> list[int]:
    """All indices in the order of a weighted draw without replacement (Efraimidis-Spirakis: key log(u) / w,
    largest first, so each next pick is proportional to the weights left); zero weights come last, in uniform
    random order. Taking the first n is a weighted sample of n; a smaller n gives a prefix of it."""
    w = weights.detach().double().cpu()
    if w.dim() != 1 or not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("weighted_order: weights must be a 1-D tensor of finite values >= 0")
    u = torch.rand(len(w), generator=generator, dtype=torch.float64).clamp_min(1e-300)  # (N,)
    pos = w > 0
    key = torch.where(pos, u.log() / w.clamp_min(1e-300), u).tolist()  # zero weights: ordered by u alone
    pos = pos.tolist()
    return sorted(range(len(key)), key=lambda i: (not pos[i], -key[i]))


# ----------------------------------------------------------------------------- the replay buffer
class InsCLReplay(Replay):
    """Replay whose buffer for task t is split over tasks 1..t-1 by instruction distance and drawn by InsInfo
    (module docstring). `model` is the model being trained: features are taken with its adapters off."""

    def __init__(self, cfg, tokenizer, pad_id: int, model):
        super().__init__(cfg, tokenizer, pad_id)
        n_layers = len(model.get_decoder().layers)
        if isinstance(cfg.inscl_layer, bool) or not 0 <= cfg.inscl_layer <= n_layers:
            raise ValueError(f"inscl_layer must be an integer in [0, {n_layers}] (0 = token embeddings; this model "
                             f"has {n_layers} decoder layers), got {cfg.inscl_layer!r}")
        self.model = model
        self.features: dict[str, torch.Tensor] = {}  # task -> (n, H) float32 base-model prompt features
        self.scores: dict[str, torch.Tensor] = {}  # task -> (N,) float64 InsInfo of every training row
        self.n_tags: dict[str, torch.Tensor] = {}  # task -> (N,) tags per row
        self.built: tuple | None = None  # (task, earlier tasks) the current buffer was built for
        self.info: dict = {}

    def _index(self, task: str) -> int:
        if task not in self.cfg.tasks:
            raise ValueError(f"inscl: task {task!r} is not in tasks {list(self.cfg.tasks)}")
        return list(self.cfg.tasks).index(task)

    def task_features(self, task: str, ds) -> torch.Tensor:
        """(n, H) features of `inscl_embed_rows` seeded training rows of `task` (computed once per task)."""
        if task not in self.features:
            g = torch.Generator().manual_seed(self.cfg.seed + 200 + self._index(task))
            rows = torch.randperm(len(ds), generator=g)[:self.cfg.inscl_embed_rows].tolist()
            prompts = dataset_prompts(ds)
            self.features[task] = prompt_features(self.model, [prompts[i] for i in rows], self.cfg.inscl_layer,
                                                  self.cfg.eval_batch_size)
        return self.features[task]

    def task_insinfo(self, task: str, ds) -> torch.Tensor:
        """(N,) InsInfo of every training row of `task` (computed once per task)."""
        if task not in self.scores:
            tags = [instruction_tags(row_text(r)) for r in ds.rows]
            self.scores[task] = insinfo(tags)
            self.n_tags[task] = torch.tensor([len(t) for t in tags], dtype=torch.float64)
        return self.scores[task]

    def start_of_task(self, task: str, earlier) -> dict:
        """Build the buffer that training on `task` replays, from the `earlier` tasks, and return what was chosen
        (per earlier task: W2 distance, rows allocated, InsInfo statistics) as a dict for the train log."""
        earlier = list(earlier)
        for t in [task, *earlier]:
            self._index(t)  # raises for a task outside cfg.tasks
        if task in earlier or len(set(earlier)) != len(earlier):
            raise ValueError(f"inscl: earlier tasks {earlier} must be distinct and exclude the current task {task!r}")
        self.gen.manual_seed(self.cfg.seed + 7 + len(earlier))  # as Replay: replay batches depend on the seed only
        if self.built == (task, tuple(earlier)):
            return self.info
        cfg = self.cfg
        info = {"inscl_task": task, "earlier": earlier, "dynamic": cfg.inscl_dynamic,
                "infosample": cfg.inscl_infosample, "layer": cfg.inscl_layer}
        self.items, self.per_task = [], {}
        if earlier:
            cur = self.task_features(task, load_task_dataset(cfg, self.tok, task, cfg.train_split))
            pools = {t: load_task_dataset(cfg, self.tok, t, cfg.train_split) for t in earlier}
            dist, ot = {}, {}
            for t in earlier:
                dist[t], ot[t] = wasserstein(cur, self.task_features(t, pools[t]), p=2,
                                             eps_rel=cfg.inscl_sinkhorn_eps)
                if ot[t]["marginal_err"] > SINKHORN_TOL:
                    print(f"[inscl] warning: Sinkhorn for {task} vs {t} stopped with marginal error "
                          f"{ot[t]['marginal_err']:.2e} after {ot[t]['iters']} iterations")
            weights = [dist[t] for t in earlier] if cfg.inscl_dynamic else [1.0] * len(earlier)
            counts = allocate(cfg.replay_buffer_size, weights, [len(pools[t]) for t in earlier])
            stats = {}
            for t, n in zip(earlier, counts):
                scores = self.task_insinfo(t, pools[t])
                g = torch.Generator().manual_seed(cfg.seed + 100 + self._index(t))  # Replay's seed for this task
                order = (weighted_order(scores, g) if cfg.inscl_infosample
                         else torch.randperm(len(pools[t]), generator=g).tolist())
                pick = order[:n]
                self.items += [pools[t][i] for i in pick]
                self.per_task[t] = n
                stats[t] = {"rows": len(pools[t]), "tags_mean": round(float(self.n_tags[t].mean()), 3),
                            "insinfo_mean": round(float(scores.mean()), 4),
                            "insinfo_max": round(float(scores.max()), 4),
                            "insinfo_zero_share": round(float((scores == 0).double().mean()), 4),
                            "picked_insinfo_mean": round(float(scores[pick].mean()), 4)}
            info |= {"distance": {t: round(dist[t], 6) for t in earlier}, "allocation": dict(self.per_task),
                     "insinfo": stats, "sinkhorn_iters": {t: ot[t]["iters"] for t in earlier},
                     "sinkhorn_marginal_err": {t: ot[t]["marginal_err"] for t in earlier}}
            print(f"[inscl] {task}: W2 to earlier tasks {info['distance']}; buffer {self.per_task}")
        self.built, self.info = (task, tuple(earlier)), info
        return info

    def end_of_task(self, seen_tasks: list[str]) -> None:
        """Replay's hook after a stage (and on resume) with tasks 1..t: build the buffer of task t+1, the next task
        of cfg.tasks (nothing after the last one)."""
        seen = list(seen_tasks)
        if seen != list(self.cfg.tasks[:len(seen)]):
            raise ValueError(f"inscl: end_of_task expects the first tasks of {list(self.cfg.tasks)}, got {seen}")
        if len(seen) < len(self.cfg.tasks):
            self.start_of_task(self.cfg.tasks[len(seen)], seen)
