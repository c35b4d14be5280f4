"""A contact sheet of mined images with their CAM heat maps and pseudo boxes (the paper's
Figure 6), for people who would rather look than read.

    python jobs/visualize.py --boxes dap_output/boxes --output grid.png [--num 16] [--input PATH] [--no-cam]

Reads the mining run's config.yaml (beside boxes/) for the input, the classifier and scales;
--input overrides where the images are. The top-scored box is white, the others yellow.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402

from dap_ray.data.export import (  # noqa: E402
    contact_sheet,
    read_boxes,
    read_run_config,
    sample_images,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", required=True, help="the boxes/ folder a mining run wrote")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--input", help="where the images are (default: the mining run's input)")
    parser.add_argument("--num", type=int, default=16, help="images to show (default 16)")
    parser.add_argument("--no-cam", action="store_true", help="draw boxes only (no classifier needed)")
    args = parser.parse_args()
    try:
        config = read_run_config(args.boxes)
        if args.input:
            config["input"] = args.input
        rows = read_boxes(args.boxes)
        step = max(1, len(rows) // args.num)
        rows = rows[::step][: args.num]
        images = sample_images(config, {r["image_id"] for r in rows})
        rows = [r for r in rows if r["image_id"] in images]
        if not rows:
            raise ValueError(f"none of the mined images were found under {config['input']}")
        pictures = [images[r["image_id"]] for r in rows]
        cams = None
        if not args.no_cam:
            from dap_ray.localisation.cam import CamExtractor
            from dap_ray.models.classifiers import load_classifier

            model = load_classifier(config["classifier"], config.get("weights"), num_classes=config.get("num_classes"))
            cams = CamExtractor(model, scales=config["scales"], flip=config["flip"])(pictures, [r["label"] for r in rows])
        sheet = contact_sheet(rows, pictures, cams, cam_scale=max(config["scales"]))
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.output, sheet[:, :, ::-1])
    print(f"wrote {len(rows)} images to {args.output}")


if __name__ == "__main__":
    main()
