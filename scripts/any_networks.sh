#!/usr/bin/env bash
# The configs/any/ networks (torchvision ResNet-18, timm ResNet-10-T, timm ViT) on real CIFAR-10, each with
# its maxdrop layers and without them (the same config with `slots={}`), in the small-data regime of the
# studies: 100 training images per class, 2,000 held-out validation images, 30 epochs at batch 128, test
# on the 10,000 test images; the configs' own optimizer and schedule. docs/results.md ("Any network").
# Resumable: rerun after a kill (the grid skips finished runs and resumes interrupted ones).
#   DATA   the CIFAR-10 source (default ../shared/data/cifar10-jpeg.tar.gz)
#   OUT    where runs land (default results/any; tracked in git, no checkpoints)
#   SEEDS  seeds (default "0 1")   JOBS  runs at once (default 1)   EPOCHS  (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${OUT:-results/any}
SEEDS=${SEEDS:-0 1}
JOBS=${JOBS:-1}
EPOCHS=${EPOCHS:-30}

# Each config and its no-layers twin as full configs of their own (the grid names runs by file stem),
# resolved by `--print_config`, without sparsity histograms (the runs' event files are kept in git, so
# they stay small; the dropped fraction per slot is still logged), written atomically.
mkdir -p "$OUT/configs"
for cfg in configs/any/*.yaml; do
  stem=$(basename "$cfg" .yaml)
  for variant in "" "_no_layers"; do
    dst="$OUT/configs/$stem$variant.yaml"
    [ -f "$dst" ] && continue
    extra=()
    [ -n "$variant" ] && extra=(--model.init_args.backbone.init_args.slots={})
    maxdrop fit --config "$cfg" "${extra[@]}" --print_config | python -c '
import sys, yaml
config = yaml.safe_load(sys.stdin)
for callback in config["trainer"]["callbacks"]:
    if callback["class_path"].endswith("SparsityMonitor"):
        callback["init_args"]["histograms"] = False
yaml.safe_dump(config, sys.stdout, sort_keys=False)' >"$dst.tmp"
    mv "$dst.tmp" "$dst"
  done
done

# shellcheck disable=SC2086
maxdrop grid "$OUT"/configs/*.yaml --seeds $SEEDS --root "$OUT/n100" --jobs "$JOBS" \
  -- --data.data_dir "$DATA" --data.init_args.train_per_class 100 --data.init_args.val_size 2000 \
  --data.init_args.batch_size 128 --trainer.max_epochs "$EPOCHS" --trainer.check_val_every_n_epoch 10 \
  --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false --trainer.log_every_n_steps 8 \
  --num_threads 1
echo "any networks: done; report with:"
echo "  maxdrop report $OUT/n100 --test paired --allow-differences --out docs/results/any \\"
for cfg in configs/any/*.yaml; do stem=$(basename "$cfg" .yaml); echo "    --versus $stem=${stem}_no_layers \\"; done
