"""Train a student with Fast Knowledge Distillation from an fkdstore label store: FKD's ``train_FKD.py`` options.

The training script lives in the library as :mod:`fkdstore.train` (importable and tested); this file is a thin
example that runs it. Everything ``python -m fkdstore.train --help`` lists works here too::

    python examples/train_fkd.py -a fkdstore.testing:tiny_cnn --softlabel_path labels.zarr --num_crops 4 \\
        -b 256 --epochs 12 --cos --lr 0.1 -j 2 --save_checkpoint_path ckpt/ images/
    python examples/train_fkd.py ... --resume ckpt/checkpoint.pth.tar          # continue a run
    torchrun --nproc_per_node=8 examples/train_fkd.py -a resnet50 --softlabel_path labels.zarr \\
        --num_crops 4 -b 1024 --cos --mixup_cutmix /data/imagenet             # 8 GPUs, DDP

See :mod:`fkdstore.train` for what it does: multi-crop batches, the serrated schedule, Mixup/CutMix with a
switch, DDP, AMP and channels_last on GPUs, checkpoints and exact resume.
"""

import sys

from fkdstore.train import cli

if __name__ == "__main__":
    sys.exit(cli())
