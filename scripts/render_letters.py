"""Make the letters and symbols that ship with vit-mqa (src/vit_mqa/assets/printed-letters.npz)
again from the DejaVu and Liberation fonts installed on this machine: the "none of these"
pictures that digit models train on (vit_mqa.data.outliers).

    python scripts/render_letters.py            # writes the asset
    python scripts/render_letters.py --check    # compares a fresh render with it

Debian: apt install fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-liberation2.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from vit_mqa.checkpoint import atomic_write
from vit_mqa.data.outliers import letters_asset_path, render_letters
from vit_mqa.data.printed import TRAINING_FAMILIES, font_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args(argv)
    fonts = font_files(TRAINING_FAMILIES)
    if not fonts:
        print(f"render_letters: error: no {' or '.join(TRAINING_FAMILIES)} fonts installed",
              file=sys.stderr)
        return 1
    rendered = render_letters(fonts)
    count = len(set(rendered["fonts"].tolist()))
    path = letters_asset_path()
    if args.check:
        with np.load(path, allow_pickle=False) as shipped:
            same = all(np.array_equal(rendered[k], shipped[k]) for k in rendered)
        print(f"{count} fonts: {'identical to' if same else 'DIFFERENT from'} {path}")
        return 0 if same else 1
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **rendered)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    print(f"wrote {path}: {len(rendered['chars'])} pictures from {count} fonts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
