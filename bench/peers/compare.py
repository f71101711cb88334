"""Compare peer results: timings and greedy token agreement against a reference result (stdlib only).

    python bench/peers/compare.py REF.json OTHER.json [...]

Agreement: first tokens equal, whole sequences equal, and the mean fraction of positions equal up to
the first difference (a greedy sequence diverges for good after one different token).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import load_result  # noqa: E402


def agreement(ref: list[list[int]], out: list[list[int]]) -> dict[str, float]:
    n = len(ref)
    first = sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(ref, out)) / n
    whole = sum(a == b for a, b in zip(ref, out)) / n
    prefix = 0.0
    for a, b in zip(ref, out):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k / max(1, len(a))
    return dict(first_token=first, whole_sequence=whole, prefix_fraction=prefix / n)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ref = load_result(sys.argv[1])
    print(f"{'engine':<22} {'start_s':>8} {'warmup_s':>8} {'batch_s':>8} {'out tok/s':>9}  "
          f"{'first':>6} {'whole':>6} {'prefix':>6}")
    for path in sys.argv[1:]:
        r = load_result(path)
        ag = agreement(ref["outputs"], r["outputs"])
        print(f"{r['engine']:<22} {r['start_s']:8.2f} {r['warmup_s']:8.2f} {r['batch_s']:8.2f} "
              f"{r['output_tokens'] / r['batch_s']:9.0f}  {ag['first_token']:6.1%} {ag['whole_sequence']:6.1%} "
              f"{ag['prefix_fraction']:6.1%}")


if __name__ == "__main__":
    main()
