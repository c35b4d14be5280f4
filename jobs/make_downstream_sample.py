"""Generate the built-in downstream detection set for Step 4 (fine-tuning): shapes the Step 1
sample never draws, one to four per image, written both as COCO (coco/train.json,
coco/test.json, images/) and as Pascal VOC (VOCdevkit/VOC2007 with trainval and test).

    python jobs/make_downstream_sample.py --output downstream_data [--num-train 300] [--num-classes 5]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import add_config_arguments, resolve_config  # noqa: E402
from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write coco/, images/ and VOCdevkit/ into")
    add_config_arguments(parser, DownstreamSampleConfig)
    args = parser.parse_args()
    try:
        config = resolve_config(DownstreamSampleConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    out = make_downstream_sample(args.output, config)
    print(f"wrote {config.num_train} training and {config.num_test} test images of {config.num_classes} classes: "
          f"COCO {out / 'coco'} (images {out / 'images'}), VOC {out / 'VOCdevkit' / 'VOC2007'}")


if __name__ == "__main__":
    main()
