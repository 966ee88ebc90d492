#!/usr/bin/env bash
# A/B of the CPU step cost between an older commit and the working tree, alternated so that both see the same VM.
#
#   bash benchmarks/ab_cpu.sh OLD_COMMIT [ROUNDS=5] [REPEATS=6] [CONFIG=all]
#
# Each round runs `benchmarks/overhead.py --device cpu --toggle 10 --repeats REPEATS --configs CONFIG` once with the
# old commit's code (a temporary git worktree) and once with the working tree's, each tree's own benchmark script and
# package. The VM's speed drifts by several percent over minutes (docs/performance.md), more than most changes are
# worth: compare code only in pairs run like this, never figures taken at different times. Run nothing else meanwhile.
set -euo pipefail
old=${1:?usage: bash benchmarks/ab_cpu.sh OLD_COMMIT [ROUNDS] [REPEATS] [CONFIG]}
rounds=${2:-5}
repeats=${3:-6}
config=${4:-all}
new=$(git rev-parse --show-toplevel)
tree=$(mktemp -d)/old
git -C "$new" worktree add -q --detach "$tree" "$old"
trap 'git -C "$new" worktree remove --force "$tree"' EXIT
rows=$(mktemp)
for _ in $(seq "$rounds"); do
  for side in old new; do
    dir=$new
    [ "$side" = old ] && dir=$tree
    row=$(cd "$dir" && PYTHONPATH="$dir" python benchmarks/overhead.py --device cpu --toggle 10 --repeats "$repeats" \
          --configs "$config" 2>/dev/null | grep "^| $config |" | head -n 1)
    echo "$side $row" | tee -a "$rows"
  done
done
python - "$rows" <<'PY'
import statistics, sys
ratios = {"old": [], "new": []}
for line in open(sys.argv[1]):
    side, *_, ratio, _span, _ = line.split("|")
    ratios[side.split()[0]].append(float(ratio.strip().rstrip("x")))
pairs = list(zip(ratios["old"], ratios["new"]))
print(f"median ratio: old {statistics.median(ratios['old']):.3f}x, new {statistics.median(ratios['new']):.3f}x; "
      f"new cheaper in {sum(n < o for o, n in pairs)} of {len(pairs)} pairs")
PY
