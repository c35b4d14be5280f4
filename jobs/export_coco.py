"""Write mined pseudo boxes as a COCO detection dataset (for Ray Train, detectron2 and the
torchvision reference scripts; pycocotools.coco.COCO loads it).

    python jobs/export_coco.py --boxes dap_output/boxes --output boxes.json [--class-map classes.txt]

category_id is the label + 1 (0 stays background); file_name is the image id (for folder
inputs, the path relative to the input root); each annotation keeps its score.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.data.export import boxes_to_coco, read_run_config  # noqa: E402
from dap_ray.data.images import read_class_map  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", required=True, help="the boxes/ folder a mining run wrote")
    parser.add_argument("--output", required=True, help="COCO JSON file to write")
    parser.add_argument("--class-map", help="class names for the categories (default: the mining run's, if any)")
    args = parser.parse_args()
    try:
        class_map = args.class_map
        if class_map is None and (Path(args.boxes).parent / "config.yaml").is_file():
            class_map = read_run_config(args.boxes).get("class_map")
        classes = read_class_map(class_map) if class_map else None
        coco = boxes_to_coco(args.boxes, args.output, classes)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(coco['categories'])} categories to {args.output}")


if __name__ == "__main__":
    main()
