#!/usr/bin/env python3
"""Export scikit-learn's handwritten digits into data/digits.bin.

The data set (1797 images of 8x8 pixels with values 0..16, labels 0..9) ships inside
scikit-learn (sklearn.datasets.load_digits); see data/README.md for its source and licence.

Output format, little-endian:
    8 bytes   magic b"DIGITS01"
    uint32    n  (number of examples, 1797)
    uint32    d  (pixels per example, 64)
    n*d uint8 pixel values 0..16, row-major (example after example, each 8x8 row-major)
    n   uint8 labels 0..9

Usage: python3 data/export_digits.py [output path, default: digits.bin next to this script]
The output is deterministic: running it again produces the same bytes.
"""

import os
import struct
import sys

import numpy as np
from sklearn.datasets import load_digits

MAGIC = b"DIGITS01"


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "digits.bin")

    digits = load_digits()
    images = np.asarray(digits.data)      # float64 [n, 64], integral values 0..16
    labels = np.asarray(digits.target)    # int [n], 0..9
    n, d = images.shape

    # The values are small integers stored as floats; check before narrowing to uint8.
    if not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 16):
        raise SystemExit("unexpected pixel values in load_digits()")
    if labels.min() < 0 or labels.max() > 9 or labels.shape != (n,):
        raise SystemExit("unexpected labels in load_digits()")

    pixels = images.astype(np.uint8)
    tmp_path = out_path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<II", n, d))
        f.write(np.ascontiguousarray(pixels).tobytes(order="C"))
        f.write(labels.astype(np.uint8).tobytes())
    os.replace(tmp_path, out_path)

    size = os.path.getsize(out_path)
    print(f"wrote {out_path}: n={n} d={d}, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
