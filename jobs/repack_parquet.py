"""Rewrite Parquet image files in small data pages, so that pre-training reads one image per read.

pyarrow's default writer puts up to 1,024 rows of a column in one data page, and a page is
the smallest unit a reader can decode: pre-training from such files decodes a whole page
(often a whole row group of images) for every image it reads, and `jobs/pretrain.py` says
so when it indexes them. This job copies them with the same rows, order, row groups and
file names in pages of about --page-bytes, so the
image ids a mining run wrote (`FILE::ROW`) stay valid: pre-train with `--input OUTPUT`.

    python jobs/repack_parquet.py --input images_parquet/ --output images_small_pages/ [--image-column image]
        [--page-bytes 1048576] [--workers 4]

A rerun keeps the files already written and finishes the rest; `repack.yaml` (the
resolved options and totals) is written in OUTPUT.
"""

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.data.parquet_pages import UnsupportedParquet, rewrite_folder_with_small_pages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a Parquet file, or a folder searched for *.parquet")
    parser.add_argument("--output", required=True, help="folder for the rewritten files (same relative paths)")
    parser.add_argument("--image-column", default="image", help="the column of encoded images (default: image)")
    parser.add_argument("--page-bytes", type=int, default=1 << 20, help="target data page size (default: 1 MiB)")
    parser.add_argument("--workers", type=int, default=1, help="files rewritten at once (default: 1)")
    args = parser.parse_args()
    if args.page_bytes < 1 or args.workers < 1:
        parser.exit(2, "error: --page-bytes and --workers must be at least 1\n")
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            totals = rewrite_folder_with_small_pages(args.input, args.output, args.image_column, args.page_bytes,
                                                     map_fn=pool.map if args.workers > 1 else map)
    except (ValueError, KeyError, UnsupportedParquet, OSError) as exc:
        parser.exit(2, f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}\n")
    import yaml

    (Path(args.output) / "repack.yaml").write_text(yaml.safe_dump(
        {"input": str(Path(args.input).resolve()), "output": str(Path(args.output).resolve()),
         "image_column": args.image_column, "page_bytes": args.page_bytes, "totals": totals}))
    print(f"rewrote {totals['files'] - totals['kept']} file(s) ({totals['kept']} already done) into {args.output}: "
          f"{totals['rows']} rows; {args.image_column!r} data pages {totals['pages_before']} -> "
          f"{totals['pages_after']}")


if __name__ == "__main__":
    main()
