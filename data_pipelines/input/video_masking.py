"""BEiT-style video block masks on a coarse grid (reference §3.1), emitted at patch-token resolution.

Blocks are rectangles: a target area drawn uniformly in [min_block, cells still to mask] and a
log-uniform aspect ratio in [min_aspect, max_aspect]; each block gets up to `attempts` tries to land on
at least one new cell without exceeding the remaining count. Blocks are added until `num_masked`
cells are masked. The mask is spatial only, so it is the same for every frame ("tube" masking).

With `fill="exact"` (ours), exactly `num_masked` cells every time: the BEiT loop stops when a block
fails all its attempts (it happens when few cells remain, e.g. 1–3 cells that no rectangle of area
>= min_block can add). We then top up one cell at a time, picking at random among the unmasked cells
that touch the mask (4-neighbours; any unmasked cell if none touch), so the result stays blocky and the
count is exact; when fewer than min_block cells remain, the area is min_block.
`fill="official"` is the official MaskingGenerator: fewer than min_block cells remaining draws the area in
[remaining, min_block] (Python's uniform(a, b) with a > b), and the loop just stops when a block fails, so
a mask may hold fewer than `num_masked` cells (7x7, 10 cells: 3.8% of masks, 9.96 cells on average).

Randomness comes only from a `numpy.random.Generator`; `block_mask(seed_sequence, cfg)` is a pure
function of the seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MASK_FILLS = ("exact", "official")


@dataclasses.dataclass(frozen=True)
class BlockMaskConfig:
    """grid: cells per side; num_masked: cells to mask; min_block/max_block: block area bounds in
    cells (max None = no bound beyond the remaining count); aspect bounds; attempts per block;
    patch_stride: pixels per patch token (Swin3D: 4), so tokens per side = image_size / patch_stride;
    fill: one of MASK_FILLS (module docstring)."""

    grid: int = 7
    num_masked: int = 10
    min_block: int = 4
    max_block: int | None = None
    min_aspect: float = 0.3
    max_aspect: float = 1 / 0.3
    attempts: int = 10
    patch_stride: int = 4
    fill: str = "exact"

    def __post_init__(self):
        if self.grid < 1:
            raise ValueError(f"BlockMaskConfig.grid must be >= 1, got {self.grid}")
        if not 0 <= self.num_masked <= self.grid * self.grid:
            raise ValueError(
                f"BlockMaskConfig.num_masked must be in [0, grid*grid={self.grid ** 2}], got {self.num_masked}"
            )
        if self.min_block < 1:
            raise ValueError(f"BlockMaskConfig.min_block must be >= 1, got {self.min_block}")
        if self.fill not in MASK_FILLS:
            raise ValueError(f"BlockMaskConfig.fill={self.fill!r}; valid: {', '.join(map(repr, MASK_FILLS))}")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {self.min_aspect}, {self.max_aspect}")


def token_grid_size(image_size: int, cfg: BlockMaskConfig) -> int:
    """Patch tokens per side (Hp = image_size / patch_stride); checks each cell covers whole tokens."""
    if image_size % cfg.patch_stride:
        raise ValueError(f"image_size {image_size} is not divisible by patch_stride {cfg.patch_stride}")
    tokens = image_size // cfg.patch_stride
    if tokens % cfg.grid:
        raise ValueError(
            f"mask grid {cfg.grid} does not divide the {tokens}x{tokens} patch tokens of a {image_size}px image "
            f"(patch_stride {cfg.patch_stride}); pick image_size a multiple of {cfg.grid * cfg.patch_stride} "
            f"or a grid that divides {tokens}"
        )
    return tokens


def _try_block(mask: np.ndarray, remaining: int, rng: np.random.Generator, cfg: BlockMaskConfig) -> int:
    """One BEiT block: up to `attempts` rectangles; returns the number of newly masked cells."""
    grid = cfg.grid
    max_area = remaining if cfg.max_block is None else min(remaining, cfg.max_block)
    log_lo, log_hi = math.log(cfg.min_aspect), math.log(cfg.max_aspect)
    for _ in range(cfg.attempts):
        if cfg.fill == "official":  # uniform(min_block, max_area), also when max_area < min_block
            target_area = cfg.min_block + (max_area - cfg.min_block) * rng.random()
        else:
            target_area = rng.uniform(cfg.min_block, max(max_area, cfg.min_block))
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if not (1 <= h < grid and 1 <= w < grid):  # BEiT: strictly smaller than the grid
            continue
        top = int(rng.integers(0, grid - h + 1))
        left = int(rng.integers(0, grid - w + 1))
        window = mask[top : top + h, left : left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_area:
            window[...] = True
            return new
    return 0


def _top_up(mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
    """Adds `missing` cells, each chosen among unmasked 4-neighbours of the mask (else any unmasked)."""
    for _ in range(missing):
        padded = np.pad(mask, 1)
        touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        choices = np.flatnonzero(touching & ~mask)
        if choices.size == 0:
            choices = np.flatnonzero(~mask)
        mask.flat[int(rng.choice(choices))] = True


def block_mask_grid(rng: np.random.Generator, cfg: BlockMaskConfig = BlockMaskConfig()) -> np.ndarray:
    """bool (grid, grid) with exactly cfg.num_masked True cells (fill "official": at most that many)."""
    mask = np.zeros((cfg.grid, cfg.grid), bool)
    count = 0
    while count < cfg.num_masked:
        added = _try_block(mask, cfg.num_masked - count, rng, cfg)
        if added == 0:
            break
        count += added
    if count < cfg.num_masked and cfg.fill == "exact":
        _top_up(mask, cfg.num_masked - count, rng)
    return mask


def upsample_to_tokens(grid_mask: np.ndarray, tokens: int) -> np.ndarray:
    """Repeats each grid cell into a (tokens/grid)^2 block: (..., grid, grid) -> (..., tokens, tokens)."""
    grid = grid_mask.shape[-1]
    if tokens % grid:
        raise ValueError(f"{tokens} tokens per side is not divisible by mask grid {grid}")
    cell = tokens // grid
    return np.repeat(np.repeat(grid_mask, cell, axis=-2), cell, axis=-1)


def block_mask(seed: int | tuple[int, ...], image_size: int, cfg: BlockMaskConfig = BlockMaskConfig()) -> np.ndarray:
    """float32 (Hp, Wp) mask at patch-token resolution, 1 = masked; a pure function of `seed`."""
    tokens = token_grid_size(image_size, cfg)
    rng = np.random.default_rng(seed)
    return upsample_to_tokens(block_mask_grid(rng, cfg), tokens).astype(np.float32)
