"""Does retrieval earn its place? The protocol, against the model we would otherwise serve.

    python bench/retrieval_gain.py --base-runs runs/base/accurate-seed1 runs/base/accurate-seed2 \
        runs/base/accurate-seed3 --out runs/gain [--config configs/ml100k-ra.yaml] [--sweep]

- "without" = each untouched base checkpoint; "with" = the retrieval design of ``--config``
  built on that base (frozen). Without ``--base-runs`` the bases are trained first
  (``configs/ml100k-accurate.yaml``, ``--seeds``), into ``OUT/base-seed<S>``.
- Every choice (the vote's λ, k, m, ...; the head's epoch; with ``--sweep`` the design
  itself) is made on validation, with a bank of training examples only. The test bank is
  training + validation examples. Test is scored once per finalist, and every configuration
  that ever saw test is listed in ``candidates_on_test``.
- Seen items are masked on both sides (what the service serves); the unmasked figures
  (RecBole's protocol) are reported beside them.
- Statistics: a paired bootstrap over users of each user's NDCG@10 delta, averaged over seeds.

``--sweep`` also measures the ceiling of a neighbour vote, every design of the retrieval
issue (vote under both own-user rules, the learned head with each fusion, the KL variants,
the vote as a score channel, multi-depth adapters, a retriever trained for the task) and
breaks the chosen design's gain down by history length and target popularity.
Writes ``OUT/retrieval_gain.json`` (and ``OUT/retrieval_gain.md``, a readable summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoints import RunError  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.evaluate import ndcg_at  # noqa: E402
from training.ra import stage as st  # noqa: E402
from training.ra.bank import BankRuleError, visible_next  # noqa: E402
from training.ra.config import RetrievalSection, load_retrieval_config  # noqa: E402
from training.ra.fit import evaluate, fit_design, flat, flat_unmasked  # noqa: E402
from training.ra.runner import fit_trained_keys  # noqa: E402
from training.ra.vote import vote_distribution  # noqa: E402

log = logging.getLogger("retrieval_gain")


# ------------------------------------------------------------------ bases


def train_bases(out: Path, seeds: list[int], sparse: int | None) -> list[Path]:
    extra = [] if sparse is None else ["--set", f"data.max_seq_len={sparse}"]
    runs = []
    for seed in seeds:
        run = out / f"base-seed{seed}"
        if not (run / "metrics.json").exists():
            cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(ROOT / "configs/ml100k-accurate.yaml"),
                   "--out", str(run), "--set", f"train.seed={seed}", *extra]
            if (run / "last.pt").exists():
                cmd.append("--resume")
            subprocess.run(cmd, check=True)
        runs.append(run)
    return runs


def check_bases(runs: list[Path]) -> None:
    """All bases must be finished runs on one vocabulary and shape (pooling pairs users)."""
    from training.config import load_config
    from training.data.sequences import Vocabulary

    first = None
    for run in runs:
        for name in ("config.yaml", "model.pt", "items.json", "metrics.json"):
            if not (run / name).is_file():
                raise RunError(f"{run} is not a finished base run: {name} is missing")
        cfg = load_config(run / "config.yaml")
        if cfg.ra.enabled:
            raise RunError(f"{run} is a retrieval-stage run; --base-runs takes DuoRec runs")
        sig = (Vocabulary.load(run / "items.json"), cfg.data.path, cfg.model.dim, cfg.data.max_seq_len)
        if first is None:
            first = (run, sig)
        elif sig != first[1]:
            raise RunError(f"{run} differs from {first[0]} in vocabulary, data or shape; "
                           "the bases of one comparison must share them")


# ------------------------------------------------------------------ evaluation of one design


# ------------------------------------------------------------------ the sweep's extra measurements


def ceiling(preps: list[st.Prepared]) -> list[dict]:
    """How often the target is in a neighbour vote's top 10 but not the model's (seen items
    masked on both), and the reverse, on validation; pooled over seeds."""
    rows = []
    for rule in ("keep", "exclude"):
        rp = [st.with_rule(p, rule) if p.own_user != rule else p for p in preps]
        for k in (20, 100, 500):
            for m in (1, 3, 5):
                only_vote, only_model, both, own = [], [], [], []
                for p in rp:
                    q = p.valid
                    model_top = torch.topk(p.base_logits(q).masked_fill(q.seen, -torch.inf), 10).indices + 1
                    items = visible_next(p.banks["valid"], q.I[:, :k], q.users, q.positions, m)
                    pv = vote_distribution(q.D[:, :k], items, p.data.n_items, tau=0.1, decay=1.0, seen=q.seen)
                    vote_top = torch.topk(pv, 10).indices + 1
                    has = pv.sum(dim=1) > 0
                    tgt = torch.from_numpy(q.targets)[:, None]
                    in_v = ((vote_top == tgt).any(dim=1) & has).numpy()
                    in_m = (model_top == tgt).any(dim=1).numpy()
                    only_vote.append(in_v & ~in_m)
                    only_model.append(in_m & ~in_v)
                    both.append(in_v & in_m)
                    own.append((p.banks["valid"].users[np.maximum(q.I[:, :k], 0)] == q.users[:, None]).mean())
                rows.append({"own_user": rule, "k": k, "m": m,
                             "vote_top10_not_model": float(np.mean(np.concatenate(only_vote))),
                             "model_top10_not_vote": float(np.mean(np.concatenate(only_model))),
                             "both_top10": float(np.mean(np.concatenate(both))),
                             "own_user_share_of_neighbours": float(np.mean(own))})
    return rows


def breakdown(preps: list[st.Prepared], ranks: dict, which: str) -> dict:
    """NDCG@10 with / without by history-length quartile and by target popularity (head = the
    most popular items holding 50% of training interactions; tail = the rest)."""
    p0 = preps[0]
    q = st.queries_for(p0, which)
    lengths = q.positions
    edges = np.quantile(lengths, [0.25, 0.5, 0.75])
    quart = np.searchsorted(edges, lengths, side="right")
    from training.data.sequences import item_popularity

    pop = item_popularity(p0.data, p0.split)
    order = np.argsort(-pop[1:]) + 1
    cum = np.cumsum(pop[order]) / pop.sum()
    head_items = set(order[: int(np.searchsorted(cum, 0.5)) + 1].tolist())
    is_head = np.array([t in head_items for t in q.targets])
    w = np.mean([ndcg_at(r, 10) for r in ranks["with"]], axis=0)
    wo = np.mean([ndcg_at(r, 10) for r in ranks["without"]], axis=0)
    out: dict = {"history_quartile": [], "popularity": []}
    for i in range(4):
        sel = quart == i
        out["history_quartile"].append({"quartile": i + 1, "users": int(sel.sum()),
                                        "history_len_range": [int(lengths[sel].min()), int(lengths[sel].max())],
                                        "with": float(w[sel].mean()), "without": float(wo[sel].mean())})
    for name, sel in (("head", is_head), ("tail", ~is_head)):
        out["popularity"].append({"targets": name, "users": int(sel.sum()), "with": float(w[sel].mean()),
                                  "without": float(wo[sel].mean())})
    return out


def sweep_candidates(sec: RetrievalSection) -> list[tuple[str, RetrievalSection, dict]]:
    """(name, section, extra) for every design the issue asks to measure."""
    def with_(**kw) -> RetrievalSection:
        s = copy.deepcopy(sec)
        for path, val in kw.items():
            node = s
            parts = path.split("__")
            for part in parts[:-1]:
                node = getattr(node, part)
            setattr(node, parts[-1], val)
        return s

    cands = [
        ("vote/own-keep", with_(design="vote", own_user="keep"), {}),
        ("vote/own-exclude", with_(design="vote", own_user="exclude"), {}),
    ]
    for fusion in ("fixed", "adaptive", "gated", "attention"):
        cands.append((f"head/{fusion}", with_(design="head", head__fusion=fusion), {}))
    cands += [
        ("head/fixed+vote-channel", with_(design="head", head__vote_channel=True, vote__k=min(sec.k_train, 50)), {}),
        ("head/fixed+copy", with_(design="head", head__copy_items=True), {}),
        ("head/fixed/k50", with_(design="head", head__k=min(sec.k_train, 50)), {}),
        ("control/head-shuffled-neighbours", with_(design="head"), {"shuffle_neighbours": True}),
        ("head/fixed+kl-forward", with_(design="head", head__kl_weight=0.1, head__kl_direction="forward"), {}),
        ("head/fixed+kl-reverse", with_(design="head", head__kl_weight=0.1, head__kl_direction="reverse"), {}),
        ("head/fixed+kl-js", with_(design="head", head__kl_weight=0.1, head__kl_direction="js"), {}),
        ("head/fixed/own-exclude", with_(design="head", own_user="exclude"), {}),
        ("head/multi-layer", with_(design="head", head__multi_layer=True), {}),
        ("vote/trained-keys", with_(design="vote", trained_keys=True), {}),
        ("head/fixed/trained-keys", with_(design="head", trained_keys=True), {}),
    ]
    return cands


def shuffled(prep: st.Prepared, seed: int) -> st.Prepared:
    """A control: every query gets another query's neighbour list (same split, same rule), so
    the head sees real bank entries that have nothing to do with its input. If the head's gain
    survives this, it was not retrieval."""
    rng = np.random.default_rng(seed)
    new = copy.copy(prep)
    new.train, new.valid, new.test = (copy.copy(q) for q in (prep.train, prep.valid, prep.test))
    for q in (new.train, new.valid, new.test):
        perm = rng.permutation(len(q))
        q.D, q.I = q.D[perm], q.I[perm]
    return new


def train_keys_for(preps: list[st.Prepared], seed: int) -> tuple[list[st.Prepared], list[dict]]:
    """A key projection per seed (encoder frozen), its recall gate, and re-searched copies."""
    out, info = [], []
    for i, p in enumerate(preps):
        new, _, figures = fit_trained_keys(p, seed + i)
        out.append(new)
        info.append(figures)
    return out, info


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-runs", type=Path, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=Path("runs/retrieval-gain"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs/ml100k-ra.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sweep", action="store_true", help="measure every design, the ceiling and the breakdown")
    ap.add_argument("--sparse", type=int, default=None, metavar="N",
                    help="sparse protocol: bases trained (when trained here) with inputs cut to N items")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/retrieval_gain.md from its JSON")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="with --sweep: only the candidates with these names (e.g. vote/own-exclude head/adaptive)")
    args = ap.parse_args()
    if args.render:
        render(args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        cfg = load_retrieval_config(args.config, args.overrides)
        sec = cfg.retrieval
        runs = args.base_runs or train_bases(args.out, args.seeds, args.sparse)
        check_bases(runs)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    k_eval = max(sec.k_search, 500 if args.sweep else 0)
    try:
        preps = [st.prepare(r, k_train=sec.k_train, k_eval=k_eval, own_user=sec.own_user, m_max=sec.m_max,
                            input_len=sec.input_len) for r in runs]
    except BankRuleError as e:  # k larger than a bank, a bank holding a query's target
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    from training.config import load_config

    report: dict = {"config": str(args.config), "overrides": args.overrides, "base_runs": [str(r) for r in runs],
                    "seeds": [load_config(r / "config.yaml").train.seed for r in runs],
                    "prepare_seconds": [p.seconds for p in preps], "candidates_on_test": []}

    def run_design(name: str, s: RetrievalSection, ps: list[st.Prepared], extra: dict | None = None) -> dict:
        t = time.perf_counter()
        state, info = fit_design(ps, s)
        valid = evaluate(ps, s, state, "valid")
        rec = {"name": name, "design": s.design, "own_user": s.own_user, "settings": s.model_dump(),
               **(extra or {}), "fit": {k: v for k, v in info.items() if k != "vote_trail"},
               "valid": flat(valid), "valid_unmasked": flat_unmasked(valid),
               "seconds": time.perf_counter() - t, "_state": state, "_preps": ps}
        log.info("%s: valid masked NDCG@10 %.4f vs %.4f (x%.3f)", name, rec["valid"]["with"]["NDCG@10"],
                 rec["valid"]["without"]["NDCG@10"], rec["valid"]["ratio_ndcg10"])
        return rec

    def test_of(rec: dict) -> dict:
        res = evaluate(rec["_preps"], _section(rec), rec["_state"], "test")
        entry = {"name": rec["name"], "valid": rec["valid"], "test": flat(res), "test_unmasked": flat_unmasked(res)}
        report["candidates_on_test"].append(entry)
        return res

    def _section(rec: dict) -> RetrievalSection:
        return RetrievalSection.model_validate(rec["settings"])

    results = []
    if args.sweep:
        report["ceiling"] = ceiling(preps)
        trained = None
        cands = sweep_candidates(sec)
        if args.only:
            unknown = set(args.only) - {c[0] for c in cands}
            if unknown:
                print(f"error: --only: no candidates named {sorted(unknown)}", file=sys.stderr)
                sys.exit(2)
            cands = [c for c in cands if c[0] in args.only]
        for name, s, extra in cands:
            ps = preps
            if s.own_user != sec.own_user:
                ps = [st.with_rule(p, s.own_user) for p in preps]
            if extra.get("shuffle_neighbours"):
                ps = [shuffled(p, sec.seed) for p in ps]
            if s.trained_keys:
                if trained is None:
                    trained, report["trained_keys"] = train_keys_for(preps, sec.seed)
                ps = trained
            results.append(run_design(name, s, ps, extra))
        # finalists: the best of each family on validation; the chosen = the best of all. A
        # learned head must also beat its control (the same head reading shuffled neighbours)
        # on validation: if reading unrelated neighbours does as well, its gain is not retrieval.
        control = next((r for r in results if r["name"] == "control/head-shuffled-neighbours"), None)
        floor = control["valid"]["with"]["NDCG@10"] if control is not None else -1.0
        families: dict[str, dict] = {}
        for r in results:
            if r["name"].startswith("control/"):
                continue  # controls are measured, never chosen
            if r["design"] == "head" and r["valid"]["with"]["NDCG@10"] <= floor:
                r["ineligible"] = "no better than its shuffled-neighbour control on validation"
                continue
            gate = report.get("trained_keys")
            if r["settings"]["trained_keys"] and gate and not all(
                    g["recall20_trained_keys"] > g["recall20_base_keys"] + 0.01 for g in gate):
                r["ineligible"] = "trained keys failed their gate (validation neighbour recall@20 not clearly up)"
                continue
            fam = r["name"].split("/")[0] + ("/multi" if "multi" in r["name"] else "") + \
                ("/channel" if "channel" in r["name"] else "")
            if fam not in families or r["valid"]["with"]["NDCG@10"] > families[fam]["valid"]["with"]["NDCG@10"]:
                families[fam] = r
        finalists = sorted(families.values(), key=lambda r: -r["valid"]["with"]["NDCG@10"])
    else:
        finalists = [run_design("shipped", sec, preps)]
        results = finalists
    chosen = finalists[0]
    tests = {r["name"]: test_of(r) for r in finalists}
    res = tests[chosen["name"]]
    report["chosen"] = {"name": chosen["name"], "settings": chosen["settings"], "fit": chosen["fit"]}
    report["valid"] = chosen["valid"]
    report["valid_unmasked"] = chosen["valid_unmasked"]
    report["test"] = flat(res)
    report["test_unmasked"] = flat_unmasked(res)
    report["test_full"] = {"masked": res["masked"], "unmasked": res["unmasked"]}
    report["breakdown_test"] = breakdown(chosen["_preps"], res["_ranks"], "test")
    report["candidates_valid"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    report["seconds"] = time.perf_counter() - start
    (args.out / "retrieval_gain.json").write_text(json.dumps(report, indent=2, default=float))
    (args.out / "retrieval_gain.md").write_text(markdown(report))
    t = report["test"]
    print(f"chosen {chosen['name']}: test NDCG@10 (seen masked) {t['with']['NDCG@10']:.4f} with vs "
          f"{t['without']['NDCG@10']:.4f} without = x{t['ratio_ndcg10']:.3f}, delta CI95 "
          f"[{t['delta_ndcg10_ci95'][0]:+.4f}, {t['delta_ndcg10_ci95'][1]:+.4f}]; HR@10 {t['with']['HR@10']:.4f} vs "
          f"{t['without']['HR@10']:.4f}; unmasked x{report['test_unmasked']['ratio_ndcg10']:.3f}; "
          f"{report['seconds']:.0f}s -> {args.out / 'retrieval_gain.json'}")


def markdown(r: dict) -> str:
    """A readable summary of a report: candidates (validation for all, test for finalists),
    the chosen design's figures both ways, the vote's ceiling and the breakdown."""
    lines = [f"# retrieval gain ({Path(r['config']).name}, base seeds {r['seeds']})", "",
             "Seen items masked on both sides unless said; 'without' = the untouched base.", "",
             "| candidate | valid with / without | x | test with / without | x | test delta CI95 |",
             "|---|---|---|---|---|---|"]
    on_test = {c["name"]: c for c in r["candidates_on_test"]}
    for c in r["candidates_valid"]:
        v = c["valid"]
        name = c["name"] + (f" (not eligible: {c['ineligible']})" if c.get("ineligible") else "")
        row = f"| {name} | {v['with']['NDCG@10']:.4f} / {v['without']['NDCG@10']:.4f} | {v['ratio_ndcg10']:.3f} |"
        if c["name"] in on_test:
            t = on_test[c["name"]]["test"]
            lo, hi = t["delta_ndcg10_ci95"]
            row += (f" {t['with']['NDCG@10']:.4f} / {t['without']['NDCG@10']:.4f} | {t['ratio_ndcg10']:.3f} |"
                    f" [{lo:+.4f}, {hi:+.4f}] |")
        else:
            row += " – | – | – |"
        lines.append(row)
    t, u = r["test"], r["test_unmasked"]
    lines += ["", f"**chosen on validation: {r['chosen']['name']}** — test NDCG@10 {t['with']['NDCG@10']:.4f} vs "
              f"{t['without']['NDCG@10']:.4f} (x{t['ratio_ndcg10']:.3f}, CI95 [{t['delta_ndcg10_ci95'][0]:+.4f}, "
              f"{t['delta_ndcg10_ci95'][1]:+.4f}]), HR@10 {t['with']['HR@10']:.4f} vs {t['without']['HR@10']:.4f}; "
              f"unmasked NDCG@10 {u['with']['NDCG@10']:.4f} vs {u['without']['NDCG@10']:.4f} (x{u['ratio_ndcg10']:.3f})"]
    if r.get("ceiling"):
        lines += ["", "## Ceiling of a neighbour vote (validation, seen items masked on both sides)", "",
                  "| own user | k | m | target in vote top 10, not model's | in model's, not vote's | in both | own-user share of neighbours |",
                  "|---|---|---|---|---|---|---|"]
        for c in r["ceiling"]:
            lines.append(f"| {c['own_user']} | {c['k']} | {c['m']} | {c['vote_top10_not_model']:.3f} | "
                         f"{c['model_top10_not_vote']:.3f} | {c['both_top10']:.3f} | {c['own_user_share_of_neighbours']:.3f} |")
    if r.get("trained_keys"):
        lines += ["", "## Trained keys (validation neighbour recall@20)", ""]
        for i, k in enumerate(r["trained_keys"]):
            lines.append(f"- base seed {r['seeds'][i]}: {k['recall20_base_keys']:.3f} -> {k['recall20_trained_keys']:.3f}")
    b = r.get("breakdown_test")
    if b:
        lines += ["", f"## Where it helps (test, {r['chosen']['name']}, NDCG@10 with / without)", ""]
        for q in b["history_quartile"]:
            lines.append(f"- history quartile {q['quartile']} ({q['history_len_range'][0]}-{q['history_len_range'][1]} "
                         f"items, {q['users']} users): {q['with']:.4f} / {q['without']:.4f}")
        for p in b["popularity"]:
            lines.append(f"- {p['targets']} targets ({p['users']} users): {p['with']:.4f} / {p['without']:.4f}")
    lines.append(f"\n{r['seconds']:.0f} s in all")
    return "\n".join(lines) + "\n"


def render(out: Path) -> None:
    report = json.loads((out / "retrieval_gain.json").read_text())
    (out / "retrieval_gain.md").write_text(markdown(report))
    print((out / "retrieval_gain.md").read_text())


if __name__ == "__main__":
    main()
