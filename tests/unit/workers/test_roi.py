"""The region-of-interest box and the cascade through ``infer``, with runners of known output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infergate.errors import ModelFailed
from infergate.manifest import ModelPackage, Preprocess, RegionOfInterest
from tests.unit.workers._fakes import PointwiseRunner, segmentation_package, volume_of
from workers.inference import infer
from workers.roi import box_with_margin, find_region

ROI = {"file": "roi.onnx", "sha256": "0" * 64, "shape": [8, 8, 8], "channel": 1, "threshold": 0.5, "margin": 0.1}


class CascadeRunner(PointwiseRunner):
    """Main network pointwise; ROI network: channel 1 is 1 where the (coarse) input exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.roi_batches: list[tuple[int, ...]] = []

    def run_file(self, package: ModelPackage, file: RegionOfInterest, batch: np.ndarray) -> np.ndarray:
        self.roi_batches.append(batch.shape)
        inside = (batch > 0.5).astype(np.float32)
        return np.concatenate([1.0 - inside, inside], axis=1)


def _cascade_package(tmp_path: Path, **preprocess: Any) -> ModelPackage:
    return segmentation_package(tmp_path, roi=ROI, interpolation="nearest", **preprocess)


def _deepbet_box(mask: np.ndarray, shape: tuple[int, ...], margin: float) -> tuple[slice, ...]:
    torch = pytest.importorskip("torch")
    bet = pytest.importorskip("deepbet.bet")
    get_box = bet.BrainExtraction.get_bbox_with_margin
    box = get_box(bet.BrainExtraction, torch.from_numpy(mask.astype(np.float32)), shape, margin)
    return tuple(slice(b.start, b.stop) for b in box)  # deepbet's slices carry an explicit step of 1


@pytest.mark.parametrize("seed", range(6))
def test_box_matches_deepbets_get_bbox_with_margin(seed: int) -> None:
    rng = np.random.default_rng(seed)
    small = (int(rng.integers(8, 40)), int(rng.integers(8, 40)), int(rng.integers(8, 40)))
    mask = np.zeros(small, dtype=bool)
    low = [int(rng.integers(0, n // 2)) for n in small]
    high = [int(rng.integers(n // 2 + 1, n + 1)) for n in small]
    mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = rng.random() > 0.0
    mask |= rng.random(small) > 0.995  # stray voxels below the 2 % slab threshold
    shape = (int(rng.integers(50, 260)), int(rng.integers(50, 260)), int(rng.integers(50, 260)))
    margin = float(rng.choice([0.0, 0.1, 0.25]))
    assert box_with_margin(mask, shape, margin) == _deepbet_box(mask, shape, margin)


def test_box_needs_foreground_and_can_keep_axes_whole() -> None:
    with pytest.raises(ModelFailed, match="too little foreground"):
        box_with_margin(np.zeros((4, 4, 4), dtype=bool), (8, 8, 8), 0.1)
    mask = np.zeros((3, 10, 10), dtype=bool)
    mask[1, 2:6, 4:8] = True
    box = box_with_margin(mask, (3, 20, 20), 0.0, axes=(1, 2))
    assert box == (slice(0, 3), slice(4, 12), slice(8, 16))


def test_find_region_normalises_the_coarse_input_and_keeps_its_percentiles() -> None:
    array = np.zeros((16, 32, 32), dtype=np.float32)
    array[4:12, 8:24, 8:20] = 100.0
    settings = Preprocess.model_validate(
        {"roi": ROI, "intensity": "percentile", "percentiles": [0.0, 100.0], "target_shape": [8, 8, 8]}
    )
    seen: list[np.ndarray] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return np.concatenate([1.0 - batch, batch], axis=1)

    region = find_region(array, settings, 3, predict)
    assert seen[0].shape == (1, 1, 8, 8, 8) and seen[0].min() == 0.0 and seen[0].max() == 1.0
    assert region.bounds == (0.0, 100.0)
    # box on the 8^3 grid: slabs 2..5, 2..5, 2..4, scaled x2, x4, x4, grown 20 %, rounded half to even
    assert region.crop == (slice(3, 13), slice(6, 25), slice(7, 21))
    with pytest.raises(ValueError, match="3 values but the model is 2-D"):
        find_region(array, settings, 2, predict)


def test_cascade_crops_runs_the_main_model_and_pastes_back(tmp_path: Path) -> None:
    array = np.zeros((16, 32, 32), dtype=np.float32)
    array[4:12, 8:24, 8:20] = 0.9
    runner = CascadeRunner()
    output = infer(volume_of(array), _cascade_package(tmp_path, target_shape=[8, 16, 16]), runner)
    assert runner.roi_batches == [(1, 1, 8, 8, 8)]
    assert runner.batches == [(1, 1, 8, 16, 16)]
    assert output.label_map is not None
    crop = (slice(3, 13), slice(6, 25), slice(7, 21))
    # pointwise model: label 1 where x < 0.5 inside the crop (the margin), 0 on the block; 0 outside
    expected = np.zeros_like(array, dtype=np.uint8)
    expected[crop] = np.where(array[crop] < 0.5, 1, 0)
    np.testing.assert_array_equal(output.label_map, expected)


def test_cascade_needs_a_runner_that_can_run_the_roi_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFailed, match="region-of-interest"):
        infer(volume_of(np.zeros((8, 8, 8))), _cascade_package(tmp_path), PointwiseRunner())


def test_cascade_with_a_2d_model_boxes_rows_and_columns_only(tmp_path: Path) -> None:
    array = np.zeros((3, 32, 32), dtype=np.float32)
    array[1, 8:24, 4:12] = 0.9
    runner = CascadeRunner()
    roi = dict(ROI, shape=[8, 8])
    package = segmentation_package(tmp_path, roi=roi, dimensionality=2, target_shape=[16, 16], batch_size=2)
    output = infer(volume_of(array), package, runner)
    assert runner.roi_batches == [(2, 1, 8, 8), (1, 1, 8, 8)]
    assert output.label_map is not None
    crop = (slice(0, 3), slice(6, 25), slice(3, 13))
    expected = np.zeros_like(array, dtype=np.uint8)
    expected[crop] = np.where(array[crop] < 0.5, 1, 0)
    np.testing.assert_array_equal(output.label_map, expected)
