"""Small few-shot datasets written the way the original's loaders read them.

Each class is a shape in a colour (12 distinct pairs), drawn at a jittered place and size
on a noisy background, so classes differ and images within a class differ too.
"""
from __future__ import annotations

import os
import pickle
import random
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


# -- the original's dataset index, sampler, transform and figures, as its source writes them

def original_folder_index(split_dir):
    """tieredImageNet._process_dir: sorted classes, sorted files containing '.jpg'."""
    cat_container = sorted(os.listdir(split_dir))
    cats2label = {cat: label for label, cat in enumerate(cat_container)}
    dataset, labels = [], []
    for cat in cat_container:
        for img_path in sorted(os.listdir(os.path.join(split_dir, cat))):
            if '.jpg' not in img_path:
                continue
            dataset.append((os.path.join(split_dir, cat, img_path), cats2label[cat]))
            labels.append(cats2label[cat])
    labels2inds = {}
    for idx, label in enumerate(labels):
        labels2inds.setdefault(label, []).append(idx)
    return dataset, labels2inds, sorted(labels2inds.keys()), cat_container


def original_pickle_index(labels):
    """miniImageNet_load.buildLabelIndex and its sorted labelIds."""
    label2inds = {}
    for idx, label in enumerate(labels):
        if label not in label2inds:
            label2inds[label] = []
        label2inds[label].append(idx)
    return label2inds, sorted(label2inds.keys())


def original_episodes(labels2inds, labelIds, nKnovel, nExemplars, nTestNovel, epoch_size, seed=112):
    """FewShotDataset_test.__init__ + _sample_episode, with the module-level random."""
    random.seed(seed)
    episodes = []
    for _ in range(epoch_size):
        Knovel = random.sample(labelIds, nKnovel)
        nEvalExamplesPerClass = int(nTestNovel / len(Knovel))
        Tnovel, Exemplars = [], []
        for Knovel_idx in range(len(Knovel)):
            img_ids = random.sample(labels2inds[Knovel[Knovel_idx]], nEvalExamplesPerClass + nExemplars)
            Tnovel += [(img_id, Knovel_idx) for img_id in img_ids[:nEvalExamplesPerClass]]
            Exemplars += [(img_id, Knovel_idx) for img_id in img_ids[nEvalExamplesPerClass:]]
        random.shuffle(Exemplars)
        random.shuffle(Tnovel)
        episodes.append((Knovel, Tnovel, Exemplars))
    return episodes


def original_transform(image, cifar=False):
    """The test transform of the original's DataManager on a PIL image (a pickled array
    goes in through Image.fromarray): Resize((92, 92)) + CenterCrop(84) for image files
    unless CIFAR-FS, then ToTensor + Normalize; float64 [3, H, W]."""
    mean, std = ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)) if cifar else \
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return (pixels.transpose(2, 0, 1) - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def original_file_transform(path, cifar=False):
    image = Image.open(path).convert("RGB")
    if not cifar:
        image = image.resize((92, 92), Image.BILINEAR).crop((4, 4, 88, 88))
    return original_transform(image, cifar)


def original_figures(correct, queries):
    """test.py: an AverageMeter of float32 episode accuracies, and
    ci95 = 1.96 * np.std(accuracies) / np.sqrt(epoch_size) over float32 accuracies."""
    total, count, accuracies = 0.0, 0, []
    for right in correct:
        acc = float(np.float32(right) / np.float32(queries))
        total += acc * queries
        count += queries
        accuracies.append(np.float32(right) / np.float32(queries))
    stds = np.std(np.array(accuracies, dtype=np.float32), 0)
    return total / count, 1.96 * float(stds) / np.sqrt(len(correct))
