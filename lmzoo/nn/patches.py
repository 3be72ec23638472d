"""Images as token sequences: the patch embedding of vision transformers (ViT, CLIP's image tower).

An image (B, C, H, W) is cut into non-overlapping p×p patches; each is flattened and projected to
d_model by one linear map, which is exactly a convolution with kernel p and stride p. A learned
class token ([CLS]) goes in front, and a learned absolute position vector is added to each of the
1 + (H/p)·(W/p) tokens (Dosovitskiy et al. 2021, eq. 1).

The position table is learned for one grid (image_size / patch_size per side). For another image
size the patch part is resized as a 2D grid of vectors with bicubic interpolation (ViT section 3.2,
"fine-tuning at higher resolution"); the class token's position is kept. ``interpolate_positions``
follows transformers' ``interpolate_pos_encoding`` (align_corners=False, computed in float32 here).

diff from the text embedders (``LearnedPositions``): positions index a 2D grid, so a longer
"sequence" is a bigger grid, resized rather than refused.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def interpolate_positions(table: torch.Tensor, grid: int, new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + grid², D) learned table -> (1 + h·w, D) for a (h, w) patch grid; unchanged when (h, w) is the grid."""
    h, w = new_grid
    if (h, w) == (grid, grid):
        return table
    D = table.shape[-1]
    cls_pos, patch_pos = table[:1], table[1:]
    patch_pos = patch_pos.float().reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
    patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, D).to(table.dtype)  # (h·w, D), row-major like the patches
    return torch.cat([cls_pos, patch_pos], dim=0)


class PatchEmbedding(nn.Module):
    """pixels (B, C, H, W) -> [CLS] + patch tokens + positions, (B, 1 + (H/p)·(W/p), D)."""

    def __init__(self, d_model: int, image_size: int, patch_size: int, num_channels: int = 3, bias: bool = True):
        super().__init__()
        if image_size < patch_size:
            raise ValueError(f"image_size ({image_size}) is smaller than one patch ({patch_size})")
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.grid = image_size // patch_size  # patches per side of the trained grid
        self.proj = nn.Conv2d(num_channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.cls = nn.Parameter(torch.empty(d_model))
        self.positions = nn.Parameter(torch.empty(1 + self.grid * self.grid, d_model))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """The (1 + h·w, D) positions for an image of height × width pixels."""
        return interpolate_positions(self.positions, self.grid, (height // self.patch_size, width // self.patch_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixel_values.shape
        if C != self.num_channels:
            raise ValueError(f"pixel_values have {C} channels, the model expects {self.num_channels}")
        if H < self.patch_size or W < self.patch_size:
            raise ValueError(f"image of {H}x{W} pixels is smaller than one {self.patch_size}x{self.patch_size} patch")
        x = self.proj(pixel_values.to(self.proj.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.cls.to(x.dtype).expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_table(H, W)  # (B, 1 + N, D)
