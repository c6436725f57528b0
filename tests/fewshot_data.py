"""Small few-shot datasets written the way the original's loaders read them.

Each class is a shape in a colour (12 distinct pairs), drawn at a jittered place and size
on a noisy background, so classes differ and images within a class differ too.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PICKLE_NAMES = {  # miniImageNet_load's files, spelled out independently of dmf_export.data
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20), (200, 40, 200),
           (20, 200, 210)]
SHAPES = ["ellipse", "rectangle", "triangle", "cross"]


def draw(class_index: int, image_index: int, size: int = 84) -> Image.Image:
    rng = np.random.default_rng(1000 * class_index + image_index)
    background = rng.integers(60, 120, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    pen = ImageDraw.Draw(image)
    colour = COLOURS[class_index % len(COLOURS)]
    shape = SHAPES[(class_index // len(COLOURS) + class_index) % len(SHAPES)]
    extent = size * rng.uniform(0.3, 0.6)
    x0, y0 = rng.uniform(0, size - extent, size=2)
    box = [x0, y0, x0 + extent, y0 + extent]
    if shape == "ellipse":
        pen.ellipse(box, fill=colour)
    elif shape == "rectangle":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(x0, y0 + extent), (x0 + extent / 2, y0), (x0 + extent, y0 + extent)], fill=colour)
    else:
        third = extent / 3
        pen.rectangle([x0 + third, y0, x0 + 2 * third, y0 + extent], fill=colour)
        pen.rectangle([x0, y0 + third, x0 + extent, y0 + 2 * third], fill=colour)
    return image


def write_folders(root, split="test", classes=12, images=25, size=84, suffix=".jpg") -> Path:
    """ROOT/SPLIT/<class>/<image>: class folder names not in numeric order, files named so
    that sorted order is not creation order."""
    root = Path(root)
    for c in range(classes):
        folder = root / split / f"n{(c * 7) % classes:02d}_class"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images):
            draw(c, i, size).save(folder / f"img_{(i * 11) % images:03d}{suffix}")
    return root


def write_pickle(root, split="test", classes=12, images=25, size=84, first_label=64) -> Path:
    """miniImageNet_load's dict: uint8 data [N, H, W, 3] and N labels, interleaved (so a
    class's indices are not contiguous), plus catname2label as the real files have it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    order = [(c, i) for i in range(images) for c in range(classes)]
    data = np.stack([np.asarray(draw(c, i, size)) for c, i in order])
    labels = [first_label + (c * 5) % classes for c, _ in order]
    content = {"data": data, "labels": labels,
               "catname2label": {f"n{label:08d}": label for label in set(labels)}}
    with open(root / PICKLE_NAMES[split], "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    return root
