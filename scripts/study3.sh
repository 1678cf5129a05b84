#!/usr/bin/env bash
# Study 3 (docs/results.md): each row tuned on the validation split (16 trials, TPE seed 0, median pruner),
# then its best setting x 5 seeds on the test split at 100 and 250 images per class, through `maxdrop grid`.
# Resumable: rerun the same command after a kill (tunes continue their studies, grids skip finished runs).
# Two jobs side by side, one thread each. Environment knobs (for a dry run):
#   DATA   the CIFAR-10 source (default ../shared/data/cifar10-jpeg.tar.gz)
#   OUT    where everything lands (default results/study3; tracked in git like results/study2, no checkpoints)
#   TRIALS trials per row (default 16)      SEEDS seeds of the final grids (default "0 1 2 3 4")
#   ROWS   rows to tune (default: every row)   EXTRA extra `maxdrop fit` arguments
#   SIZES  final grid sizes (default "n100 n250")
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${OUT:-results/study3}
TRIALS=${TRIALS:-16}
SEEDS=${SEEDS:-0 1 2 3 4}
SIZES=${SIZES:-n100 n250}
ROWS=${ROWS:-dropout maxdropout_tensor maxdropout_sample topk_dropout top_drop_block maxdropout_v2 dropblock2d cutout adl dgdm}
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"

# 1. Tune every row at 100 images per class, two trials at once (one thread each).
for row in $ROWS; do
  maxdrop tune "configs/tune/study3/$row.yaml" --trials "$TRIALS" --root "$OUT/tune" --jobs 2 \
    --sampler-seed 0 --pruner median:4:10 \
    -- --config configs/study2/size/n100.yaml --data.data_dir "$DATA" --num_threads 1 "${EXTRA_ARGS[@]}"
done

# 2. The best settings (and no dropout, the reference) as configs of their own: the grid names runs by file stem.
mkdir -p "$OUT/best"
for row in $ROWS; do
  if [ ! -f "$OUT/tune/$row/best.yaml" ]; then echo "study3: $row has no best.yaml (no trial completed)" >&2; exit 1; fi
  cp "$OUT/tune/$row/best.yaml" "$OUT/best/.$row.yaml.tmp" && mv "$OUT/best/.$row.yaml.tmp" "$OUT/best/$row.yaml"
done
# no_dropout, resolved (its base/ includes are relative to configs/study2/), written atomically.
maxdrop fit --config configs/study2/no_dropout.yaml --print_config >"$OUT/best/.no_dropout.yaml.tmp"
mv "$OUT/best/.no_dropout.yaml.tmp" "$OUT/best/no_dropout.yaml"

# 3. Best settings x seeds on the test split, at each size, two runs at once.
for size in $SIZES; do
  # No dropout is Study 2's no_dropout row unchanged (same config, sizes and seeds): its finished runs are
  # reused (the grid skips a run with finished.json) instead of trained again.
  for seed in $SEEDS; do
    src="results/study2/$size/no_dropout/seed_$seed" dst="$OUT/$size/no_dropout/seed_$seed"
    if [ -f "$src/finished.json" ] && [ ! -e "$dst" ]; then
      mkdir -p "$(dirname "$dst")" && cp -a "$src" "$dst.tmp" && mv "$dst.tmp" "$dst"
    fi
  done
  # shellcheck disable=SC2086
  maxdrop grid "$OUT"/best/*.yaml --seeds $SEEDS --root "$OUT/$size" --jobs 2 --active-in-eval \
    -- --config "configs/study2/size/$size.yaml" --data.data_dir "$DATA" --num_threads 1 "${EXTRA_ARGS[@]}"
done
echo "study3: done; report with: maxdrop report $OUT/n100 --baseline no_dropout --test paired --versus '*=dropout'"
