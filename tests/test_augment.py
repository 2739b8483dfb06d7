"""Device-side batch augmentation: geometry checked against exact pixel moves, intensity against a hand
computation, parameters seeded by (seed, rank, micro-batch) and wired into the trainer."""

import math
from dataclasses import replace

import torch

from conftest import tiny_overrides
from vkd_dist.config import DataConfig
from vkd_dist.configure import load_config
from vkd_dist.data.augment import BatchAugment, apply
from vkd_dist.data.pipeline import Batch

B, S = 3, 64


def _images(seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (B, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _params(**kw) -> dict:
    p = {"angle": torch.zeros(B), "scale": torch.ones(B), "shift": torch.zeros(B, 2),
         "flip": torch.zeros(B, dtype=torch.bool), "contrast": torch.ones(B), "brightness": torch.zeros(B)}
    p.update({k: v if isinstance(v, torch.Tensor) else torch.full_like(p[k], v) for k, v in kw.items()})
    return p


def test_identity_parameters_return_the_image():
    x = _images()
    out = apply(x, **_params())
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, x.float(), atol=1e-3)


def test_quarter_turn_is_rot90_counter_clockwise():
    x = _images(1)
    out = apply(x, **_params(angle=math.pi / 2))
    assert torch.allclose(out, torch.rot90(x, 1, dims=(2, 3)).float(), atol=1e-2)
    assert not torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)).float(), atol=1)


def test_shift_moves_pixels_right_and_down_with_black_fill():
    x = _images(2)
    right = apply(x, **_params(shift=torch.tensor([[4 / S, 0.0]] * B)))
    assert torch.allclose(right[..., 4:], x[..., :-4].float(), atol=1e-3)
    assert right[..., :4].abs().max() < 1e-3
    down = apply(x, **_params(shift=torch.tensor([[0.0, 5 / S]] * B)))
    assert torch.allclose(down[..., 5:, :], x[..., :-5, :].float(), atol=1e-3)
    assert down[..., :5, :].abs().max() < 1e-3


def test_flip_and_scale_about_the_centre():
    x = _images(3)
    assert torch.allclose(apply(x, **_params(flip=torch.ones(B, dtype=torch.bool))), x.flip(3).float(), atol=1e-3)
    flat = torch.full((B, 1, S, S), 100, dtype=torch.uint8)
    c, b = torch.ones(B), torch.zeros(B)
    shrunk = apply(flat, **{**_params(scale=0.5), "contrast": c, "brightness": b})
    # contrast 1 and brightness 0 leave the geometry alone: half-size image in the middle, black around it
    assert torch.allclose(shrunk[..., S // 4 + 1:3 * S // 4 - 1, S // 4 + 1:3 * S // 4 - 1], torch.tensor(100.0))
    assert shrunk[..., :S // 4 - 1, :].abs().max() < 1e-3 and shrunk[..., :, 3 * S // 4 + 1:].abs().max() < 1e-3


def test_contrast_and_brightness_by_hand():
    x = _images(4)
    contrast, brightness = torch.tensor([0.9, 1.1, 1.0]), torch.tensor([0.05, -0.1, 0.0])
    out = apply(x, **_params(contrast=contrast, brightness=brightness))
    xf = x.float()
    for i in range(B):
        mean = xf[i].mean()
        expected = ((xf[i] - mean) * contrast[i] + mean + brightness[i] * 255).clamp(0, 255)
        assert torch.allclose(out[i], expected, atol=1e-3)
    assert out.min() >= 0 and out.max() <= 255 and (out == 255).any()  # clamped, not wrapped


def test_parameters_are_in_range_and_seeded_by_seed_rank_and_index():
    cfg = DataConfig(max_rotate_deg=5, max_translate=0.03, scale_range=0.05, brightness=0.1, contrast=0.2)
    aug = BatchAugment(cfg, seed=7, rank=0)
    p = aug.params(4096, index=3)
    assert p["angle"].abs().max() <= math.radians(5) and p["angle"].abs().max() > math.radians(4.9)
    assert p["shift"].abs().max() <= 0.03 and ((p["scale"] - 1).abs().max() <= 0.05)
    assert (p["contrast"] - 1).abs().max() <= 0.2 and p["brightness"].abs().max() <= 0.1
    assert not p["flip"].any()  # hflip is off by default
    assert 0.3 < BatchAugment(replace(cfg, hflip=True)).params(4096, 0)["flip"].float().mean() < 0.7
    same = aug.params(4096, index=3)
    assert all(torch.equal(p[k], same[k]) for k in p)
    for other in (aug.params(4096, index=4), BatchAugment(cfg, seed=7, rank=1).params(4096, 3),
                  BatchAugment(cfg, seed=8, rank=0).params(4096, 3)):
        assert not torch.equal(p["angle"], other["angle"])


def _batch() -> Batch:
    return Batch(image=_images(5), input_ids=torch.ones(B, 8, dtype=torch.long),
                 attention_mask=torch.ones(B, 8, dtype=torch.long), targets=torch.zeros(B, 14),
                 target_mask=torch.ones(B, 14, dtype=torch.bool), keys=["a", "b", "c"])


def test_batch_augment_replaces_only_the_image():
    batch = _batch()
    out = BatchAugment(DataConfig(), seed=0)(batch, 0)
    assert out.keys == batch.keys and out.input_ids is batch.input_ids and out.image.dtype == torch.float32
    assert not torch.allclose(out.image, batch.image.float(), atol=1)  # something moved
    assert BatchAugment(DataConfig(augment=False))(batch, 0) is batch  # disabled: uint8 untouched


def test_trainer_augments_every_micro_batch_with_its_own_index(tiny_data, tmp_path, monkeypatch):
    from vkd_dist import train as train_mod

    seen = []
    original = BatchAugment.__call__

    def spy(self, batch, index):
        seen.append((index, self.rank, self.seed))
        return original(self, batch, index)

    monkeypatch.setattr(BatchAugment, "__call__", spy)
    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path / "run", objective="image_only",
                                               **{"train.max_steps": 3, "optim.grad_accum": 2, "train.seed": 11}))
    train_mod.train(cfg)
    assert seen == [(i, 0, 11) for i in range(6)]
