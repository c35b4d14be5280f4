"""Generate the built-in sample dataset: an ImageNet-style folder tree of JPEGs of shapes
on cluttered backgrounds, its class map, and its true boxes (COCO, for evaluation only).

    python jobs/make_sample.py --output sample_data [--num-images 600] [--num-classes 6]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import add_config_arguments, resolve_config  # noqa: E402
from dap_ray.data.sample import SampleConfig, make_sample_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write images/, classes.txt, gt_boxes.json into")
    add_config_arguments(parser, SampleConfig)
    args = parser.parse_args()
    try:
        config = resolve_config(SampleConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    out = make_sample_dataset(args.output, config)
    print(f"wrote {config.num_images} images of {config.num_classes} classes to {out / 'images'}; "
          f"class map {out / 'classes.txt'}; true boxes {out / 'gt_boxes.json'}")


if __name__ == "__main__":
    main()
