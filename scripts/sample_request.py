"""Ask a running ragrec service for one user's recommendations, with and without retrieval, and
print them with the retrieved neighbours (the main job's last step; stdlib only).

    python scripts/sample_request.py --url http://127.0.0.1:8000 --user 196 [--titles data/ml-100k/ml-100k.item]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        sys.exit(f"error: POST {url} answered {e.code}: {e.read().decode(errors='replace')}")


def read_titles(path: Path) -> dict[str, str]:
    """item id -> "Title (year)" from a RecBole ml-100k.item file; {} when it is absent."""
    if not path.is_file():
        return {}
    titles = {}
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 3:
            titles[parts[0]] = f"{parts[1]} ({parts[2]})" if parts[2] else parts[1]
    return titles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--user", default="196")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--titles", type=Path, default=Path("data/ml-100k/ml-100k.item"))
    args = ap.parse_args()
    titles = read_titles(args.titles)

    def name(item: str) -> str:
        return f"{item:>5}  {titles[item]}" if item in titles else f"{item:>5}"

    body = {"user_id": args.user, "k": args.k, "explain": True}
    with_r = post(f"{args.url}/v1/recommend", body)
    without = post(f"{args.url}/v1/recommend", {**body, "use_retrieval": False})
    print(f"\nPOST {args.url}/v1/recommend {json.dumps(body)}")
    print(f"model {with_r['model_version']}, index {with_r['index_version']}, retrieval used: "
          f"{with_r['retrieval_used']}")
    seq = with_r["explanation"]["sequence"]
    print(f"\nuser {args.user}: {len(seq)} items read, the last five:")
    for item in seq[-5:]:
        print("   ", name(item))
    print("\nrecommended with retrieval            (score)   | without retrieval")
    for a, b in zip(with_r["items"], without["items"], strict=False):
        print(f"    {name(a['item_id'])[:44]:<44} {a['score']:8.4f} | {name(b['item_id'])[:44]}")
    print("\nnearest neighbours (users' histories and the item that came next; what each added to the list):")
    for nb in with_r["explanation"]["neighbours"][:5]:
        adds = ", ".join(f"{item} +{c:.4f}" for item, c in nb.get("contributions", {}).items()) or "-"
        print(f"    user {nb['user_id']:>4}  sim {nb['similarity']:.3f}  weight {nb['weight']:.3f}  "
              f"next: {name(nb['target_item']).strip()[:40]}  adds: {adds}")
    fusion = with_r["explanation"]["fusion"]
    if fusion:
        print(f"\nretrieval ({fusion['kind']}): share of the output {fusion['alpha_mean']:.3f} "
              f"(min {fusion['alpha_min']:.3f}, max {fusion['alpha_max']:.3f})")


if __name__ == "__main__":
    main()
