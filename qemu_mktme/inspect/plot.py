"""PNG pictures of a dump (Pillow): the KeyID map, per-page entropy, and what changed between dumps.

Every picture is one or more panels side by side over the same grid: one cell per 4 KiB page,
``columns`` cells per row, each VM's pages starting on a new row under a label line. By default
the grid is 512 pixels wide and picks the largest cells that keep it at most 1024 pixels tall:
(columns, cell) = (64, 8), (128, 4), (256, 2) or (512, 1), the first whose rows fit. Dumps too
large even for that put several pages in a cell and keep what matters: the first page's KeyID,
the lowest entropy, the most changed blocks (so one plaintext page among a thousand still shows).
A legend or colour bar sits under each panel.

Image size, in pixels, with ``n`` panels and regions of ``rows_i`` cell rows::

    width  = MARGIN + n * (columns * cell + MARGIN)
    height = MARGIN + TITLE_H + LABEL_H + sum(REGION_H + rows_i * cell) + REGION_GAP * (regions - 1)
             + MARGIN + legend height (LEGEND_ROW_H per legend line, 2 for a colour bar) + MARGIN
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ..arch.addresses import PAGE_SIZE
from .diff import BLOCKS_PER_PAGE, DumpDiff
from ..files.dumpfile import Region
from .entropy import EntropyMap
from .layout import UNTAGGED, KeyIdMap
from ..files.atomic import atomic_output

MARGIN = 8
TITLE_H = 20
LABEL_H = 16
REGION_H = 14
REGION_GAP = 6
LEGEND_ROW_H = 14
GRID_CHOICES = ((64, 8), (128, 4), (256, 2), (512, 1))
"""(columns, cell size in pixels), largest cells first: all 512 pixels wide."""
MAX_HEIGHT = 1024

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PAD = (232, 232, 232)          # cells past the end of a VM's RAM
UNTAGGED_RGB = (110, 110, 110)
PALETTE = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207), (214, 39, 40),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (127, 127, 127), (0, 0, 128), (0, 128, 128)]
ENTROPY_ANCHORS = [(0.0, (255, 255, 204)), (3.0, (254, 178, 76)), (6.0, (240, 59, 32)), (7.5, (128, 0, 38)),
                   (7.9, (45, 10, 70)), (8.0, (20, 0, 40))]
"""Bright is low entropy (plaintext stands out), near black is ciphertext."""
DIFF_ANCHORS = [(0.0, (253, 141, 60)), (1.0, (165, 0, 38))]
"""Any change is a strong orange, a wholly rewritten page dark red."""
UNCHANGED_RGB = (245, 245, 245)

RGB = tuple[int, int, int]
U8 = npt.NDArray[np.uint8]


def keyid_colour(keyid: int) -> RGB:
    return UNTAGGED_RGB if keyid == UNTAGGED else PALETTE[keyid % len(PALETTE)]


def _ramp(anchors: Sequence[tuple[float, RGB]], steps: int = 256) -> tuple[np.ndarray, U8]:
    xs = np.linspace(anchors[0][0], anchors[-1][0], steps)
    pts = [a[0] for a in anchors]
    lut = np.stack([np.interp(xs, pts, [a[1][c] for a in anchors]) for c in range(3)], axis=1)
    return xs, np.round(lut).astype(np.uint8)


_ENTROPY_X, _ENTROPY_LUT = _ramp(ENTROPY_ANCHORS)
_DIFF_X, _DIFF_LUT = _ramp(DIFF_ANCHORS)


def entropy_rgb(bits: np.ndarray) -> U8:
    """Colours of entropy values (bits/byte, NaN: padding)."""
    i = np.clip(np.round(np.nan_to_num(bits) / 8 * 255), 0, 255).astype(np.intp)
    out = _ENTROPY_LUT[i]
    out[np.isnan(bits)] = PAD
    return out


def diff_rgb(fraction: np.ndarray) -> U8:
    """Colours of the fraction of changed blocks per cell (NaN: padding, 0: unchanged)."""
    i = np.clip(np.round(np.nan_to_num(fraction) * 255), 0, 255).astype(np.intp)
    out = _DIFF_LUT[i]
    out[np.nan_to_num(fraction) == 0] = UNCHANGED_RGB
    out[np.isnan(fraction)] = PAD
    return out


# ------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Grid:
    """Where each page goes in a panel; see the module docstring."""

    npages: tuple[int, ...]
    columns: int
    cell: int
    pages_per_cell: int
    rows: tuple[int, ...]
    tops: tuple[int, ...]            # y of each region's first cell row, from the panel's top

    @classmethod
    def build(cls, npages: Sequence[int], *, columns: int | None = None, cell: int | None = None,
              max_height: int = MAX_HEIGHT) -> Grid:
        """The grid for regions of ``npages`` pages; ``columns``/``cell`` default to the first
        of ``GRID_CHOICES`` whose rows fit in ``max_height`` pixels (the last one otherwise)."""
        if (columns is not None and columns < 16) or (cell is not None and cell < 1) or max_height < 1:
            raise ValueError("columns must be >= 16, cell and max_height >= 1")
        choices = [(columns or c, cell or z) for c, z in GRID_CHOICES
                   if columns in (None, c) and cell in (None, z)] or [(columns or 256, cell or 2)]

        def rows_of(cols: int, per: int) -> tuple[int, ...]:
            return tuple(-(-n // (cols * per)) for n in npages)

        for cols, size in choices:
            if sum(rows_of(cols, 1)) * size <= max_height:
                break
        max_rows = max(1, max_height // size)
        per_cell = max(1, -(-sum(rows_of(cols, 1)) // max_rows))
        while sum(rows_of(cols, per_cell)) > max_rows and per_cell < max(npages, default=1):
            per_cell += 1
        rows = rows_of(cols, per_cell)
        tops, y = [], 0
        for i, r in enumerate(rows):
            y += (REGION_GAP if i else 0) + REGION_H
            tops.append(y)
            y += r * size
        return cls(tuple(npages), cols, size, per_cell, rows, tuple(tops))

    @property
    def width(self) -> int:
        return self.columns * self.cell

    @property
    def height(self) -> int:
        return (self.tops[-1] + self.rows[-1] * self.cell) if self.rows else 0

    def xy(self, region: int, page: int) -> tuple[int, int]:
        """Top-left pixel of the cell of ``page`` of region ``region``, from the panel's origin."""
        c = page // self.pages_per_cell
        return (c % self.columns) * self.cell, self.tops[region] + (c // self.columns) * self.cell

    def cells(self, values: np.ndarray, region: int, reduce: str, pad: float) -> np.ndarray:
        """``values`` (one per page) as a (rows, columns) array of cells, ``pad`` past the end."""
        k = self.pages_per_cell
        n = self.rows[region] * self.columns * k
        full = np.full(n, pad, dtype=np.float64)
        full[:values.size] = values
        grouped = full.reshape(-1, k)
        if reduce == "first" or k == 1:
            out = grouped[:, 0]
        elif reduce == "min":
            out = np.fmin.reduce(grouped, axis=1)
        else:
            out = np.fmax.reduce(grouped, axis=1)
        return out.reshape(self.rows[region], self.columns)


@dataclass
class Panel:
    title: str
    values: list[np.ndarray]                  # one per region, one value per page
    colour: Callable[[np.ndarray], U8]        # cell values -> RGB
    reduce: str                               # how several pages share a cell: first, min, max
    legend: list[tuple[RGB, str]] | None = None
    bar: tuple[U8, str, str] | None = None    # colour-bar LUT, low label, high label


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def legend_height(panel: Panel) -> int:
    if panel.bar is not None:
        return 2 * LEGEND_ROW_H
    return len(panel.legend or []) * LEGEND_ROW_H


def figure_size(grid: Grid, panels: Sequence[Panel]) -> tuple[int, int]:
    legend = max((legend_height(p) for p in panels), default=0)
    return (MARGIN + len(panels) * (grid.width + MARGIN),
            MARGIN + TITLE_H + LABEL_H + grid.height + MARGIN + legend + MARGIN)


def render(path: str | os.PathLike[str], title: str, region_labels: Sequence[str], grid: Grid,
           panels: Sequence[Panel], *, force: bool = False) -> tuple[int, int]:
    """Draw ``panels`` over ``grid`` and write the PNG (atomically; ``SnapshotError`` if it
    exists and not ``force``). Returns the image size."""
    size = figure_size(grid, panels)
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(10)
    draw.text((MARGIN, MARGIN + 3), _fit(draw, title, size[0] - 2 * MARGIN, font), fill=TEXT, font=font)
    top = MARGIN + TITLE_H + LABEL_H
    for p, panel in enumerate(panels):
        left = MARGIN + p * (grid.width + MARGIN)
        draw.text((left, MARGIN + TITLE_H + 2), _fit(draw, panel.title, grid.width, font), fill=TEXT, font=font)
        for r, values in enumerate(panel.values):
            pad = -2.0 if panel.reduce == "first" else np.nan
            cells = grid.cells(values, r, panel.reduce, pad)
            rgb = panel.colour(cells)
            if grid.cell > 1:
                rgb = rgb.repeat(grid.cell, axis=0).repeat(grid.cell, axis=1)
            img.paste(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), (left, top + grid.tops[r]))
            draw.text((left, top + grid.tops[r] - REGION_H + 1), _fit(draw, region_labels[r], grid.width, small),
                      fill=TEXT, font=small)
        y = top + grid.height + MARGIN
        if panel.bar is not None:
            lut, lo, hi = panel.bar
            bar = np.repeat(lut[np.linspace(0, lut.shape[0] - 1, grid.width).astype(np.intp)][None], LEGEND_ROW_H - 4, 0)
            img.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (left, y))
            draw.text((left, y + LEGEND_ROW_H), lo, fill=TEXT, font=small)
            draw.text((left + grid.width - draw.textlength(hi, font=small), y + LEGEND_ROW_H), hi, fill=TEXT, font=small)
        for i, (colour, label) in enumerate(panel.legend or []):
            yy = y + i * LEGEND_ROW_H
            draw.rectangle((left, yy + 2, left + 9, yy + 11), fill=colour)
            draw.text((left + 14, yy), _fit(draw, label, grid.width - 14, small), fill=TEXT, font=small)
    with atomic_output(path, force=force) as f:
        img.save(f, format="PNG")
    return size


# ------------------------------------------------------------------------------ the pictures


def _region_label(r: Region, npages: int, grid: Grid) -> str:
    per = f", {grid.pages_per_cell} pages/cell" if grid.pages_per_cell > 1 else ""
    return f"{r.vm}: KeyID {r.keyid} ({r.key_type}), HPA: {r.hpa:#x}, {npages * PAGE_SIZE >> 20} MiB{per}"


def keyid_panel(kmap: KeyIdMap) -> Panel:
    users: dict[int, list[str]] = {}
    for r, pages in zip(kmap.regions, kmap.pages):
        for k in np.unique(pages).tolist():
            users.setdefault(k, []).append(r.vm)
    legend = [(keyid_colour(k), ("not mapped by the EPT" if k == UNTAGGED else f"KeyID {k}") + f": {', '.join(v)}")
              for k, v in sorted(users.items())]
    keyids = sorted(users)
    lut = np.array([keyid_colour(k) for k in keyids] + [PAD], np.uint8)

    def colour(cells: np.ndarray) -> U8:
        idx = np.searchsorted(keyids, cells)
        idx[~np.isin(cells, keyids)] = len(keyids)
        return lut[idx]

    return Panel("KeyID of each page (as the EPT tags it)", [p.astype(np.float64) for p in kmap.pages], colour,
                 "first", legend=legend)


def entropy_panel(emap: EntropyMap) -> Panel:
    return Panel(f"entropy, bits/byte (lowest per cell; < {emap.threshold:g} looks like plaintext)",
                 list(emap.entropy), entropy_rgb, "min", bar=(_ENTROPY_LUT, "0 (constant)", "8 (random)"))


def diff_panel(diff: DumpDiff) -> Panel:
    return Panel("changed 16-byte blocks per page (most per cell)",
                 [d.page_blocks / BLOCKS_PER_PAGE for d in diff.regions], diff_rgb, "max",
                 bar=(_DIFF_LUT, "1 block", "256 blocks (whole page)"))


def map_png(path: str | os.PathLike[str], kmap: KeyIdMap, emap: EntropyMap | None = None, *, force: bool = False,
            columns: int | None = None, cell: int | None = None) -> tuple[int, int]:
    """The KeyID map, and the entropy panel next to it when ``emap`` is given."""
    grid = Grid.build([p.size for p in kmap.pages], columns=columns, cell=cell)
    panels = [keyid_panel(kmap)] + ([entropy_panel(emap)] if emap is not None else [])
    labels = [_region_label(r, p.size, grid) for r, p in zip(kmap.regions, kmap.pages)]
    return render(path, f"{kmap.dump.path}: {kmap.npages} pages, {len(kmap.regions)} VM(s)", labels, grid, panels,
                  force=force)


def entropy_png(path: str | os.PathLike[str], emap: EntropyMap, *, force: bool = False, columns: int | None = None,
                cell: int | None = None) -> tuple[int, int]:
    grid = Grid.build([e.size for e in emap.entropy], columns=columns, cell=cell)
    labels = [_region_label(r, e.size, grid) for r, e in zip(emap.regions, emap.entropy)]
    low = sum(int(np.count_nonzero(e < emap.threshold)) for e in emap.entropy)
    return render(path, f"{emap.dump.path}: per-page entropy, {low} low-entropy page(s)", labels, grid,
                  [entropy_panel(emap)], force=force)


def diff_png(path: str | os.PathLike[str], diff: DumpDiff, *, force: bool = False, columns: int | None = None,
             cell: int | None = None) -> tuple[int, int]:
    grid = Grid.build([d.page_blocks.size for d in diff.regions], columns=columns, cell=cell)
    labels = [_region_label(d.region, d.page_blocks.size, grid) for d in diff.regions]
    changed = sum(d.changed_blocks for d in diff.regions)
    return render(path, f"{diff.a.path} -> {diff.b.path}: {changed} changed blocks", labels, grid,
                  [diff_panel(diff)], force=force)


__all__ = ["Grid", "Panel", "diff_png", "entropy_png", "figure_size", "keyid_colour", "map_png", "render"]
