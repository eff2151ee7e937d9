"""Open-vocabulary segmentation head (mask decoder) on a frozen tiny UMG-CLIP.

    python -m umg_jax.train --config configs/tiny.py --workdir /tmp/umg_tiny       # backbone
    python -m umg_jax.train --config configs/seg_tiny.py --workdir /tmp/umg_seg \
        --config.init.checkpoint=/tmp/umg_tiny
    python -m umg_jax.evaluate --workdir /tmp/umg_seg       # mIoU / PQ, seen vs held-out

Only the decoder trains (the backbone is frozen and gets no backward pass). ``seg.holdout``
categories are removed from the training targets and vocabulary, so the evaluation on them is
zero-shot. Add ``--config.peft.enabled=True`` to also train LoRA factors in the backbone.
"""

from umg_jax.configs import tiny


def get_config(arg=None):
    config = tiny.get_config(arg)
    config.name = "seg_tiny"  # run name shown in logs
    config.total_steps = 400  # decoder steps
    config.seg.enabled = True  # train the mask decoder on the frozen backbone
    config.seg.holdout = ("star", "water")  # one thing + one stuff class never seen in training
    config.data.min_mask_frac = 0.0  # keep every segment: panoptic targets must be complete
    config.data.max_masks = 8  # segments per image (<= seg.num_queries)
    config.optim.lr = 1e-3  # a fresh head tolerates a larger step
    config.optim.warmup_steps = 20  # short warmup
    # Panoptic thresholds until the run's own are chosen on the validation split at the end of
    # training (seg.calibrate -> seg_calibration.json, which also chooses seg.pixel_weight):
    # Mask2Former's published test defaults. Never chosen on the evaluation split reported.
    config.seg.object_threshold = 0.8  # panoptic: min class probability of a kept query
    config.seg.overlap_threshold = 0.8  # panoptic: min fraction of its own mask a query keeps
    config.eval.every_steps = 200  # mIoU / PQ on the held-out split during training
    config.eval.num_examples = 128  # held-out examples per evaluation
    return config
