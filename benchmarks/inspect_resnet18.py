"""The whitening report of a torchvision resnet18 converted to group whitening, on a real batch.

    python benchmarks/inspect_resnet18.py [--json FILE] [--figure PNG] [--batch 64] [--size 32]

resnet18 (torchvision, 10 classes, weights of ``torch.manual_seed(0)``: no download), converted with
``sdecor.convert_whitening(model, num_channels=16)``, on the first ``--batch`` images of the training
split of the embedded shapes set (3x24x24, ``sdecor.cli.data``) resized to ``--size`` x ``--size``
(bilinear): the table and summary of ``sdecor inspect`` (:func:`sdecor.cli.inspect.inspect_model`),
and with ``--figure`` its figure. The README quotes ``--figure docs/inspect_resnet18.png``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sdecor
from sdecor.cli import data
from sdecor.cli.inspect import inspect_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side after resizing (default %(default)s)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--figure", default=None, metavar="PNG", help="write the figure")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.size < 8:
        parser.error("--batch must be >= 2 and --size >= 8")

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    sdecor.convert_whitening(model, num_channels=16)
    shapes = data.load_shapes()
    x = F.interpolate(shapes.train.x[:args.batch], size=(args.size, args.size), mode="bilinear",
                      align_corners=False)
    print(f"resnet18 (torchvision, seed-0 weights) converted with convert_whitening(num_channels=16); batch: "
          f"the first {len(x)} training images of shapes, resized to {args.size}x{args.size}")
    inspect_model(model, x, json_path=args.json, figure_path=args.figure,
                  title=f"resnet18, convert_whitening(d=16), {len(x)} shapes images at {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
