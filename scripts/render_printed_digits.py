"""Make the printed digits that ship with vit-mqa (src/vit_mqa/assets/printed-digits.npz)
again from the DejaVu and Liberation fonts installed on this machine.

    python scripts/render_printed_digits.py            # writes the asset, prints its SHA-256
    python scripts/render_printed_digits.py --check    # compares a fresh render with it

Debian: apt install fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-liberation2.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from vit_mqa.checkpoint import atomic_write
from vit_mqa.data.printed import TRAINING_FAMILIES, asset_path, font_files, render_printed_digits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args(argv)
    fonts = font_files(TRAINING_FAMILIES)
    if not fonts:
        print(f"render_printed_digits: error: no {' or '.join(TRAINING_FAMILIES)} fonts "
              "installed", file=sys.stderr)
        return 1
    rendered = render_printed_digits(fonts)
    count = len(set(rendered["fonts"].tolist()))
    if args.check:
        with np.load(asset_path(), allow_pickle=False) as shipped:
            same = all(np.array_equal(rendered[k], shipped[k]) for k in rendered)
        print(f"{count} fonts: {'identical to' if same else 'DIFFERENT from'} {asset_path()}")
        return 0 if same else 1
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **rendered)
    atomic_write(asset_path(), lambda tmp: tmp.write_bytes(buffer.getvalue()))
    print(f"wrote {asset_path()}: {len(rendered['labels'])} digits from {count} fonts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
