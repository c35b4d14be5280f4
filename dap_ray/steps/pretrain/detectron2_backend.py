"""``--backend detectron2``: the same pre-training through detectron2, when it is installed.

detectron2 is not on the package registry (its users build it from source), so this module
imports it only inside the functions that need it and says how to install it otherwise.
What can be checked without detectron2 is plain Python: a torchvision ResNet state dict
renamed to detectron2's layout (:mod:`dap_ray.models.detectron2_names`, the mapping of
detectron2's ``tools/convert-torchvision-to-d2.py``).

Training runs detectron2's ``DefaultTrainer`` inside Ray Train workers (Ray Train sets up
the process group; detectron2's local group is created from Ray's local ranks), with the
paper's settings: short side drawn from ``min_sizes``, flips, SGD with warm-up. The data
path is the torchvision backend's: the memory-mapped pseudo boxes, one positioned read per
image from any input format, and :class:`dap_ray.data.detection.AspectBatchSampler`'s
rank-disjoint, aspect-grouped stream (no per-image dicts, no detectron2 dataset catalog).
detectron2 keeps its own checkpoints (``model_XXXXXXX.pth`` every ``checkpoint_every``
iterations under RUN_DIR/detectron2) and resumes from the last one when the same command
runs again, the stream continuing at the checkpoint's batch as the torchvision backend's
does; the result is ``RUN_DIR/detector_final_d2.pth``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from dap_ray.data.pseudo_boxes import PseudoBoxDataset
from dap_ray.models.detectron2_names import torchvision_to_detectron2
from dap_ray.steps.ray_setup import computes_on_gpu

__all__ = ["INSTALL_HINT", "Detectron2Samples", "build_detectron2_model", "detectron2_architecture",
           "require_detectron2", "train_detectron2"]

INSTALL_HINT = (
    "--backend detectron2 needs detectron2, which is not on the package registry: build it from source "
    "in this environment with `pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(needs a C++ compiler, and nvcc for GPU ops; see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), "
    "or use --backend torchvision"
)
_CONFIGS = {"faster_rcnn_fpn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
            "retinanet_fpn": "COCO-Detection/retinanet_R_50_FPN_1x.yaml"}
_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def require_detectron2():
    """The ``detectron2`` module, or a ValueError saying how to install it."""
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{INSTALL_HINT} (import failed: {exc})") from None
    return detectron2


class Detectron2Samples(PseudoBoxDataset):
    """The pseudo boxes' training samples as detectron2's models take them, keyed as
    :class:`PseudoBoxDataset`'s: ``{"image": (3, h, w) uint8 RGB tensor, resized and flipped as
    the torchvision backend does, "instances": Instances(gt_boxes, gt_classes 0-based),
    "height", "width" (the original size), "image_id"}``."""

    def _load(self, index: int, short_side: int, flip: bool) -> dict | None:
        from detectron2.structures import Boxes, Instances

        sample = super()._load(index, short_side, flip)
        if sample is None:
            return None
        image = sample["image"]
        instances = Instances(tuple(image.shape[1:]), gt_boxes=Boxes(sample["boxes"]),
                              gt_classes=sample["labels"] - 1)
        width, height = (int(v) for v in self.pseudo.sizes[index])
        return {"image": image, "instances": instances, "height": height, "width": width,
                "image_id": sample["image_id"]}


def _zoo_config(name: str) -> Path:
    """A config file that detectron2 ships, found beside its package: ``detectron2.model_zoo``
    looks it up through ``pkg_resources``, which setuptools 81 and later no longer provide."""
    import detectron2

    path = Path(detectron2.__file__).parent / "model_zoo" / "configs" / name
    if not path.is_file():
        raise ValueError(f"detectron2 at {path.parents[3]} ships no {name}: build detectron2 from its source tree "
                         "(its configs are installed with the package)")
    return path


def detectron2_architecture(detector: str, backbone: str, num_classes: int, *, trainable_layers: int = 3,
                            device: str = "cpu"):
    """detectron2's config (a ``CfgNode``) for the detector that
    :func:`dap_ray.models.detectors.build_detector` builds in torchvision, so that weights
    convert both ways (:mod:`dap_ray.models.detectron2_names`) and compute the same; build it
    with :func:`build_detectron2_model`. ``num_classes`` excludes background."""
    require_detectron2()
    from detectron2.config import get_cfg

    _check_supported(detector, backbone)
    d2 = get_cfg()
    d2.merge_from_file(str(_zoo_config(_CONFIGS[detector])))
    d2.MODEL.RESNETS.DEPTH = _DEPTHS[backbone]
    if _DEPTHS[backbone] < 50:
        d2.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d2.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision's ResNet puts the stride in the 3x3
    d2.MODEL.BACKBONE.FREEZE_AT = max(0, 5 - trainable_layers)
    d2.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    d2.MODEL.RETINANET.NUM_CLASSES = num_classes
    # torchvision's box pooler (MultiScaleRoIAlign: aligned=False, sampling ratio 2), so that the
    # two backends train one architecture and their weights convert both ways.
    d2.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlign"
    d2.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
    d2.MODEL.DEVICE = device
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]  # torchvision's ImageNet mean and std, in 0-255
    d2.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    return d2


def _check_supported(detector: str, backbone: str) -> None:
    if detector not in _CONFIGS:
        raise ValueError(f"--backend detectron2 supports detectors {sorted(_CONFIGS)}, got {detector!r}")
    if backbone not in _DEPTHS:
        raise ValueError(f"--backend detectron2 supports backbones {sorted(_DEPTHS)}, got {backbone!r}")


def build_detectron2_model(d2_config):
    """``detectron2.modeling.build_model`` with torchvision's anchors.

    torchvision rounds its cell anchors to whole pixels (a 32-pixel anchor of aspect 0.5 is
    46 x 22, not 45.25 x 22.63); detectron2 does not. The anchors are buffers outside the
    checkpoint, so they are set here, for training and inference alike.
    """
    from detectron2.modeling import build_model

    model = build_model(d2_config)
    generator = getattr(model, "proposal_generator", None)
    generator = generator.anchor_generator if generator is not None else model.anchor_generator
    with torch.no_grad():
        for cell_anchors in generator.cell_anchors:
            cell_anchors.copy_(cell_anchors.round())
    return model


def _detectron2_config(cfg, num_classes: int, output: Path, weights_file: str | None):
    from dap_ray.models.training import step_iterations

    d2 = detectron2_architecture(cfg.detector, cfg.backbone, num_classes, trainable_layers=cfg.trainable_layers,
                                 device="cuda" if computes_on_gpu(cfg.use_gpu, cfg.device) else "cpu")
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = cfg.roi_batch_size_per_image
    d2.MODEL.WEIGHTS = weights_file or ""
    d2.INPUT.MIN_SIZE_TRAIN = tuple(cfg.min_sizes)
    d2.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    d2.INPUT.MAX_SIZE_TRAIN = cfg.max_size
    d2.INPUT.MIN_SIZE_TEST = cfg.min_sizes[-1]
    d2.DATASETS.TRAIN = ()  # the loader is built from the pseudo boxes directly (_train_loop)
    d2.DATASETS.TEST = ()
    d2.DATALOADER.NUM_WORKERS = cfg.loader_workers
    d2.DATALOADER.ASPECT_RATIO_GROUPING = True
    d2.SOLVER.IMS_PER_BATCH = cfg.global_batch()
    d2.SOLVER.BASE_LR = cfg.learning_rate()
    d2.SOLVER.MOMENTUM = cfg.momentum
    d2.SOLVER.WEIGHT_DECAY = cfg.weight_decay
    d2.SOLVER.BIAS_LR_FACTOR = cfg.bias_lr_factor
    d2.SOLVER.WEIGHT_DECAY_BIAS = cfg.bias_weight_decay
    d2.SOLVER.MAX_ITER = cfg.max_iters
    d2.SOLVER.STEPS = tuple(step_iterations(cfg.lr_steps, cfg.max_iters))
    d2.SOLVER.WARMUP_ITERS = cfg.warmup_iters
    d2.SOLVER.WARMUP_FACTOR = cfg.warmup_factor
    d2.SOLVER.CHECKPOINT_PERIOD = cfg.checkpoint_every
    d2.SOLVER.AMP.ENABLED = cfg.use_gpu
    d2.SEED = cfg.seed
    d2.OUTPUT_DIR = str(output / "detectron2")
    return d2


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: detectron2's DefaultTrainer on this worker's share."""
    import ray.train
    from detectron2.engine import DefaultTrainer
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from dap_ray.data.detection import AspectBatchSampler
    from dap_ray.data.locations import LocatedImages, load_locations
    from dap_ray.data.pseudo_boxes import open_box_cache
    from dap_ray.models.classifiers import unwrap_ddp
    from dap_ray.steps.pretrain.config import PretrainConfig

    cfg = PretrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world > 1:
        comm.create_local_process_group(context.get_local_world_size())
        if not cfg.use_gpu:
            # DefaultTrainer wraps the model for DDP with device_ids=[local rank], which only a
            # model on a GPU takes ("device_ids ... only work with single-device ... modules").
            from detectron2.engine import defaults

            wrap = defaults.create_ddp_model
            defaults.create_ddp_model = lambda model, **kwargs: wrap(model, **{"device_ids": None, **kwargs})
    pseudo = open_box_cache(loop_config["box_cache"], cfg.max_boxes_per_image)
    samples = Detectron2Samples(pseudo, LocatedImages(pseudo, load_locations(pseudo, cfg.input, cfg.format,
                                                                             cfg.image_column or "image")),
                                cfg.max_size)
    d2 = _detectron2_config(cfg, len(loop_config["classes"]), Path(loop_config["output"]), loop_config["weights_file"])

    def loader(start: int):
        sampler = AspectBatchSampler(pseudo.sizes, cfg.batch_size, cfg.min_sizes, rank=rank, world=world,
                                     seed=cfg.seed, start=start, flip=cfg.flip)
        return torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=list,
                                           num_workers=cfg.loader_workers,
                                           pin_memory=computes_on_gpu(cfg.use_gpu, cfg.device))

    class Trainer(DefaultTrainer):
        @classmethod
        def build_model(cls, config):
            return build_detectron2_model(config)

        @classmethod
        def build_train_loader(cls, config):
            return loader(0)  # not iterated: replaced below once the start iteration is known

        def build_hooks(self):
            return [_rng_hook(self.checkpointer, cfg.checkpoint_every), *super().build_hooks()]

    # The initial weights come from the run's seed, as on the torchvision path (detectron2
    # seeds only in its default_setup, which is not used here).
    seed_all_rng(cfg.seed + rank)
    trainer = Trainer(d2)
    # DefaultTrainer.resume_or_load, keeping the checkpoint's extra state (the ranks' RNG states).
    saved = trainer.checkpointer.resume_or_load(d2.MODEL.WEIGHTS, resume=True)
    if trainer.checkpointer.has_checkpoint():
        trainer.start_iter = trainer.iter + 1
    # The stream continues at the checkpoint's batch and, once the loader's iterator has drawn its
    # seed, the ranks' RNGs (proposal sampling) where they were: a resumed run sees what an
    # uninterrupted one would, as on the torchvision path.
    trainer._trainer.reset_data_loader(lambda: loader(trainer.start_iter))
    trainer._trainer._data_loader_iter  # noqa: B018 - made now, so that its seed draw precedes the restore
    if trainer.start_iter > 0 and rank < len(saved.get("rng") or ()):
        torch.set_rng_state(saved["rng"][rank])
    if trainer.start_iter > 0 and comm.is_main_process():
        print(f"resuming at iteration {trainer.start_iter}/{cfg.max_iters} from the last checkpoint", flush=True)
    trainer.train()
    if comm.is_main_process():
        torch.save(unwrap_ddp(trainer.model).state_dict(), Path(loop_config["output"]) / "detector_final_d2.pth")
    ray.train.report({"iterations": cfg.max_iters})


def _rng_hook(checkpointer, period: int):
    """A detectron2 hook, for every rank, that gathers the ranks' torch RNG states after each
    iteration that ends in a checkpoint, and makes ``checkpointer.save`` store them (``rng``, a
    list by rank). It must run before detectron2's ``PeriodicCheckpointer``, which only the
    main process has (so the gathering, which every rank joins, cannot happen inside it)."""
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    class GatherRngStates(HookBase):
        states: list | None = None

        def after_step(self):
            iteration = self.trainer.iter
            if (iteration + 1) % period == 0 or iteration >= self.trainer.max_iter - 1:
                state = torch.get_rng_state()
                self.states = comm.all_gather(state) if comm.get_world_size() > 1 else [state]

    hook = GatherRngStates()
    save = checkpointer.save
    checkpointer.save = lambda name, **extra: save(name, rng=hook.states, **extra)
    return hook


def train_detectron2(cfg, pseudo, classes: list[str], output: Path) -> dict:
    """Pre-train through detectron2 on Ray Train workers; write ``detector_final_d2.pth`` and meta.json."""
    require_detectron2()
    from dap_ray.config import config_to_dict, save_config
    from dap_ray.models.classifiers import load_classifier
    from dap_ray.steps.ray_setup import cpus_per_worker, fit_torch_trainer, init_ray, run_storage

    _check_supported(cfg.detector, cfg.backbone)
    weights_file = None
    if cfg.backbone_weights:
        trunk = load_classifier(cfg.backbone, cfg.backbone_weights)
        weights_file = str(output / "backbone_d2.pkl")
        with open(weights_file, "wb") as handle:
            pickle.dump({"model": torchvision_to_detectron2(trunk.state_dict()), "__author__": "torchvision",
                         "matching_heuristics": True}, handle)
    save_config(cfg, output / "config.yaml")
    init_ray()
    fit_torch_trainer(  # detectron2 keeps its own checkpoints under RUN_DIR/detectron2
        _train_loop,
        {"config": config_to_dict(cfg), "classes": classes, "output": str(output), "weights_file": weights_file,
         "box_cache": pseudo.folder},
        name="pretrain_detectron2", storage=run_storage(cfg.storage_path, output),
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, device=cfg.device,
        cpus=cpus_per_worker(cfg.cpus_per_worker, cfg.use_gpu, cfg.num_workers, cfg.loader_workers),
        max_failures=cfg.max_failures,
        state_file=None)
    history = _detectron2_history(output / "detectron2" / "metrics.json")
    meta = {"backend": "detectron2", "detector": cfg.detector, "backbone": cfg.backbone,
            "num_classes": len(classes) + 1, "classes": ["__background__"] + classes, "iterations": cfg.max_iters,
            "images": len(pseudo), "checkpoint": str(output / "detector_final_d2.pth"),
            "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
            "history": history, "config": config_to_dict(cfg)}
    if cfg.detector == "faster_rcnn_fpn":
        # The same weights in torchvision's names: Step 4 (--init dap:RUN) starts from either backend.
        from dap_ray.models.detectron2_names import detectron2_detector_to_torchvision

        state = torch.load(output / "detector_final_d2.pth", map_location="cpu", weights_only=True)
        torch.save(detectron2_detector_to_torchvision(state), output / "detector_final.pt")
        meta["torchvision_checkpoint"] = str(output / "detector_final.pt")
    (output / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _detectron2_history(path: Path) -> list[dict]:
    """detectron2's logged losses (its JSON writer, one line per period) as ``[{iteration, loss,
    <loss parts>, lr}]``, the keys of the torchvision backend's history."""
    history = []
    if not path.is_file():
        return history
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "total_loss" not in entry:
            continue
        history.append({"iteration": int(entry["iteration"]) + 1, "loss": entry["total_loss"], "lr": entry.get("lr"),
                        **{k: v for k, v in entry.items() if k.startswith("loss_")}})
    return history
