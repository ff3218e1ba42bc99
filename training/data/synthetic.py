"""A seeded generator of interaction logs with planted sequential structure and a power-law catalogue.

The model of a user: it belongs to one latent *trail* (taste) and walks a trail-specific successor graph.
Each item has `n_successors` preferred successors per trail, drawn from the Zipf popularity law (so the
catalogue stays heavy-tailed); the walk follows one of them with probability `follow_prob` (the first
more often than the second, and so on) and otherwise jumps to a popularity draw. A model that reads the
last item learns the successor graph; one that reads the whole history can also infer the trail.

Generation is vectorised over users: the only Python loop is over time steps (at most `max_length`),
each step advancing every user still active: 1M users × 50 events take ~15 s on two CPU cores.
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import pandas as pd

from training.atomic import atomic_output
from training.data.readers import DataError, Interactions

logger = logging.getLogger(__name__)

T0 = 1_600_000_000  # first possible timestamp (seconds, September 2020); any fixed value would do


def zipf_probabilities(n: int, a: float) -> np.ndarray:
    """(n,) probabilities ∝ rank^-a for ranks 1..n."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -a
    return p / p.sum()


def generate_interactions(
    n_users: int,
    n_items: int,
    *,
    mean_length: float = 30,
    min_length: int = 5,
    max_length: int | None = None,
    zipf_a: float = 1.1,
    n_trails: int = 4,
    n_successors: int = 3,
    successor_decay: float = 0.5,
    follow_prob: float = 0.8,
    tie_prob: float = 0.05,
    mean_gap_s: float = 3600.0,
    time_span_s: float = 365 * 86400.0,
    order: str = "time",
    seed: int = 0,
) -> Interactions:
    """Generate a log of `n_users` users over `n_items` items; the same arguments give the same log.

    Lengths are min_length + geometric, mean `mean_length`, capped at `max_length` (default 10 × mean).
    Successor j (0-based) is chosen with weight successor_decay**j. A fraction `tie_prob` of a user's
    consecutive events share a timestamp (as in real logs), always in generation order in the output.
    order='time' sorts rows by timestamp (stable) like a real log; 'user' leaves them grouped by user.
    User ids are 'u<k>', item ids 'i<k>' (k unrelated to popularity).
    """
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need n_users >= 1 and n_items >= 2, got {n_users}, {n_items}")
    if not min_length >= 1 or not mean_length >= min_length:
        raise ValueError(f"need 1 <= min_length <= mean_length, got {min_length}, {mean_length}")
    max_length = int(10 * mean_length) if max_length is None else max_length
    if max_length < min_length:
        raise ValueError(f"max_length {max_length} < min_length {min_length}")
    if not (
        0 <= follow_prob <= 1 and 0 <= tie_prob < 1 and zipf_a > 0 and n_trails >= 1 and n_successors >= 1
    ):
        raise ValueError(
            f"bad generator setting: follow_prob={follow_prob}, tie_prob={tie_prob}, zipf_a={zipf_a}, "
            f"n_trails={n_trails}, n_successors={n_successors}"
        )
    if order not in ("time", "user"):
        raise ValueError(f"order must be 'time' or 'user', got {order!r}")
    rng = np.random.default_rng(seed)

    # Items are generated as popularity ranks (0 = most popular) and named at the end.
    pop_cdf = np.cumsum(zipf_probabilities(n_items, zipf_a))

    def draw_popular(size: int) -> np.ndarray:
        ranks = np.searchsorted(pop_cdf, rng.random(size), side="right")
        return np.minimum(ranks, n_items - 1).astype(np.int32)  # min: guards float round-off at the top

    successors = draw_popular(n_trails * n_items * n_successors).reshape(n_trails, n_items, n_successors)
    self_loop = successors == np.arange(n_items, dtype=np.int32)[None, :, None]
    successors[self_loop] = (successors[self_loop] + 1) % n_items  # a walk should move on
    succ_cdf = np.cumsum(successor_decay ** np.arange(n_successors, dtype=np.float64))
    succ_cdf /= succ_cdf[-1]

    # Users are processed longest first, so the users still active at step t are a prefix.
    extra = rng.geometric(1.0 / (mean_length - min_length + 1), size=n_users) - 1
    lengths = np.minimum(min_length + extra, max_length).astype(np.int64)
    by_length = np.argsort(-lengths, kind="stable")
    lengths_sorted = lengths[by_length]
    trails = rng.integers(n_trails, size=n_users)[by_length]
    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths_sorted, out=starts[1:])
    total = int(starts[-1])

    ranks = np.empty(total, dtype=np.int32)  # (total,) user-major, step-minor
    current = draw_popular(n_users)
    ranks[starts[:-1]] = current
    for step in range(1, int(lengths_sorted[0])):
        n_active = int(np.searchsorted(-lengths_sorted, -step, side="left"))  # users with length > step
        current = current[:n_active]
        choice = np.searchsorted(succ_cdf, rng.random(n_active), side="right")
        nxt = successors[trails[:n_active], current, np.minimum(choice, n_successors - 1)]
        jump = rng.random(n_active) >= follow_prob
        nxt[jump] = draw_popular(int(jump.sum()))
        ranks[starts[:n_active] + step] = nxt
        current = nxt

    # Timestamps: a start time per user plus integer gaps (some 0, i.e. ties), via a segmented cumsum.
    gaps = 1 + np.floor(rng.exponential(mean_gap_s, size=total)).astype(np.int64)
    gaps[rng.random(total) < tie_prob] = 0
    first = starts[:-1]
    gaps[first] = T0 + rng.integers(0, int(time_span_s), size=n_users)
    cum = np.cumsum(gaps)
    times = cum - np.repeat(cum[first] - gaps[first], lengths_sorted)

    user_tokens = np.array([f"u{k}" for k in range(n_users)], dtype=object)
    item_tokens = np.array([f"i{k}" for k in rng.permutation(n_items)], dtype=object)  # rank -> name
    row_users = np.repeat(by_length, lengths_sorted)
    if order == "time":
        # Stable: within a user, equal timestamps stay in generation order.
        perm = np.argsort(times, kind="stable")
        row_users, ranks, times = row_users[perm], ranks[perm], times[perm]
    logger.info("generated %d interactions for %d users over %d items", total, n_users, n_items)
    return Interactions(user_tokens[row_users], item_tokens[ranks], times.astype(np.float64))


def generate_trails(
    n_trails: int,
    *,
    users_per_trail: int = 4,
    trail_length: int = 10,
    n_popular: int = 50,
    noise_length: int = 5,
    zipf_a: float = 1.1,
    seed: int = 0,
) -> Interactions:
    """Many rare item trails, each shared by a few users: a positive control for retrieval.

    Trail j is a fixed sequence of ``trail_length`` items of its own (items no other trail
    uses). Each of its ``users_per_trail`` users first takes ``noise_length`` popular items
    (a Zipf draw from ``n_popular``) and then walks the trail from the start, stopping after
    a uniform number of steps between half of it and all of it (so one user's held-out
    steps are other users' training steps). A model must
    memorise every trail's successions from a handful of users to predict them; a memory
    bank of other users' prefixes holds them verbatim. Ids: users 'u<k>', items 'p<k>'
    (popular) and 't<j>_<i>' (trail j, step i); one second between events.
    """
    if n_trails < 1 or users_per_trail < 1 or trail_length < 2 or n_popular < 1 or noise_length < 0:
        raise ValueError(f"bad trail setting: n_trails={n_trails}, users_per_trail={users_per_trail}, "
                         f"trail_length={trail_length}, n_popular={n_popular}, noise_length={noise_length}")
    rng = np.random.default_rng(seed)
    pop = np.cumsum(zipf_probabilities(n_popular, zipf_a))
    users, items = [], []
    for j in range(n_trails):
        trail = [f"t{j}_{i}" for i in range(trail_length)]
        for _ in range(users_per_trail):
            k = len(users) and int(users[-1][1:]) + 1 if users else 0
            noise = np.minimum(np.searchsorted(pop, rng.random(noise_length)), n_popular - 1)
            walk = int(rng.integers(trail_length // 2, trail_length + 1))
            seq = [f"p{x}" for x in dict.fromkeys(noise.tolist())] + trail[:max(walk, 2)]
            users += [f"u{k}"] * len(seq)
            items += seq
    times = np.zeros(len(users), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, np.array(users[1:]) != np.array(users[:-1])])
    steps = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    times[:] = T0 + steps
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object), times)


def write_inter(inter: Interactions, path: str | os.PathLike[str]) -> None:
    """Write `inter` as a RecBole atomic .inter file (tab-separated, typed header), atomically."""
    times = inter.timestamps
    integral = len(times) == 0 or (np.all(times == np.floor(times)) and np.abs(times).max() < 2**53)
    frame = pd.DataFrame(
        {
            "user_id:token": inter.users,
            "item_id:token": inter.items,
            "timestamp:float": times.astype(np.int64) if integral else times,
        }
    )
    try:
        with atomic_output(path) as tmp:
            # No quoting: RecBole reads fields verbatim, so a tab or newline inside an id cannot be written.
            frame.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")
    except csv.Error as exc:
        raise DataError(
            f"{path}: cannot write ids containing a tab or newline in .inter format ({exc})"
        ) from exc
