"""The batched augmentations against per-image references."""

from __future__ import annotations

import torch

from maxdrop.data import AugmentConfig, apply_batch, sample_params
from maxdrop.data.augment import cutout_mask
from tests.helpers.data import (
    write_official_dir,
)
from tests.helpers.datamodule import dm_for

# --------------------------------------------------------------------------- augmentation


def test_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    cfg = AugmentConfig(normalize=False)
    p = sample_params(cfg, 16, g)
    out = apply_batch(x, p, cfg, torch.zeros(3), torch.ones(3))
    for i in range(16):
        oy, ox = p["crop"][i].tolist()
        ref = torch.nn.functional.pad(x[i], (4, 4, 4, 4))[:, oy : oy + 32, ox : ox + 32]
        if p["flip"][i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref.float() / 255)
    assert p["flip"].any() and not p["flip"].all()


def test_cutout_zeroes_the_clipped_square():
    centres = torch.tensor([[[16, 16]], [[0, 0]], [[31, 20]]])
    m = cutout_mask(centres, 16, (32, 32))
    assert m[0, 8:24, 8:24].all() and m[0].sum() == 256  # [c - 8, c + 8) x [c - 8, c + 8)
    assert m[1, 0:8, 0:8].all() and m[1].sum() == 64  # clipped at the corner
    assert m[2, 23:32, 12:28].all() and m[2].sum() == 9 * 16
    cfg = AugmentConfig(crop_padding=0, hflip=False, cutout_holes=1, cutout_length=16)
    x = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    out = apply_batch(x, {"cutout": centres}, cfg, torch.full((3,), 0.5), torch.full((3,), 0.25))
    assert torch.equal(out == 0, m[:, None].expand_as(out))  # zero (= the mean) exactly in the square


def test_random_erasing_rate_and_area():
    cfg = AugmentConfig(crop_padding=0, hflip=False, erasing_p=0.3)
    box = sample_params(cfg, 20000, torch.Generator().manual_seed(1))["erase"]
    erased = box[:, 2] > 0
    assert abs(erased.float().mean().item() - 0.3) < 0.015
    area = (box[erased, 2] * box[erased, 3]).float() / 1024
    assert area.min() >= 0.015 and area.max() <= 0.36 and abs(area.mean().item() - 0.175) < 0.03
    assert (box[erased, 0] + box[erased, 2] <= 32).all() and (box[erased, 1] + box[erased, 3] <= 32).all()
    x = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    out = apply_batch(
        x, {"erase": box[:8]}, AugmentConfig(erasing_p=0.3, erasing_value=-7.0), torch.zeros(3), torch.ones(3)
    )
    assert torch.equal((out == -7.0).sum((1, 2, 3)), 3 * box[:8, 2] * box[:8, 3])


def test_normalized_eval_batches_have_zero_mean_unit_std(tmp_path):
    folder = write_official_dir(tmp_path, n_train=200, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=1000)
    dm.setup()
    (batch,) = list(dm._loader("train", train=False))
    x, y = dm.transform_batch(batch)
    assert x.dtype == torch.float32 and x.shape == (200, 3, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
