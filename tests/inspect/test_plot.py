"""The picture geometry: grid choice, downsampling that keeps notable pages, pixel colours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qemu_mktme.inspect.plot import (DIFF_ANCHORS, ENTROPY_ANCHORS, LABEL_H, LEGEND_ROW_H, MARGIN, PAD, REGION_GAP, REGION_H,
                                     TITLE_H, UNCHANGED_RGB, Grid, Panel, diff_rgb, entropy_rgb, figure_size, render)


@pytest.mark.parametrize("npages,columns,cell,per_cell,rows", [
    ([4096], 64, 8, 1, (64,)),                       # 16 MiB: big cells
    ([32768], 128, 4, 1, (256,)),                    # 128 MiB
    ([131072], 256, 2, 1, (512,)),                   # 512 MiB
    ([262144], 512, 1, 1, (512,)),                   # 1 GiB
    ([4 << 18], 512, 1, 2, (1024,)),                 # 4 GiB: two pages per cell
    ([1 << 20, 1 << 20, 5], 512, 1, 5, (410, 410, 1)),  # 4 per cell would need 1025 rows
])
def test_grid_choice(npages, columns, cell, per_cell, rows):
    g = Grid.build(npages)
    assert (g.columns, g.cell, g.pages_per_cell, g.rows) == (columns, cell, per_cell, rows)
    assert g.width == 512 and g.height <= 1024 + len(npages) * (REGION_H + REGION_GAP)


def test_downsampled_cells_keep_the_notable_page(tmp_path):
    grid = Grid.build([4 << 18])                      # 2 pages per cell
    ent = np.full(4 << 18, 7.95, np.float32)
    ent[1_000_001] = 0.0                              # one plaintext page among a million
    changed = np.zeros(4 << 18)
    changed[12345] = 1.0
    panels = [Panel("entropy", [ent], entropy_rgb, "min"), Panel("diff", [changed], diff_rgb, "max")]
    path = tmp_path / "p.png"
    size = render(path, "title", ["vm"], grid, panels)
    assert size == figure_size(grid, panels) == (MARGIN + 2 * (512 + MARGIN),
                                                  MARGIN + TITLE_H + LABEL_H + REGION_H + 1024 + MARGIN + 0 + MARGIN)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    top = MARGIN + TITLE_H + LABEL_H
    x, y = grid.xy(0, 1_000_001)
    assert (x, y) == ((1_000_001 // 2) % 512, REGION_H + (1_000_001 // 2) // 512)
    assert rgb.getpixel((MARGIN + x, top + y)) == ENTROPY_ANCHORS[0][1]
    x2, y2 = grid.xy(0, 12345)
    second = MARGIN + 512 + MARGIN
    assert rgb.getpixel((second + x2, top + y2)) == DIFF_ANCHORS[-1][1]
    assert rgb.getpixel((second + x2 + 1, top + y2)) == UNCHANGED_RGB


def test_padding_and_legend_rows(tmp_path):
    grid = Grid.build([100])                          # 2 rows of 64 cells, the second one part padding
    def grey(cells):
        return np.stack([np.where(cells == 3, 10, PAD[0])] * 3, axis=-1).astype(np.uint8)
    panel = Panel("keyids", [np.full(100, 3.0)], grey, "first", legend=[((1, 2, 3), "a"), ((4, 5, 6), "b"), ((7, 8, 9), "c")])
    path = tmp_path / "k.png"
    w, h = render(path, "t", ["vm"], grid, [panel])
    assert h == MARGIN + TITLE_H + LABEL_H + REGION_H + 2 * 8 + MARGIN + 3 * LEGEND_ROW_H + MARGIN
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    top = MARGIN + TITLE_H + LABEL_H + REGION_H
    assert rgb.getpixel((MARGIN + 35 * 8 + 3, top + 8 + 3)) == (10, 10, 10)     # page 99
    assert rgb.getpixel((MARGIN + 36 * 8 + 3, top + 8 + 3)) == (PAD[0],) * 3    # past the end
