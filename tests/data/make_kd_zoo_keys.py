"""Regenerate ``kd_zoo_keys.json.gz``: the state-dict keys and shapes of the KD benchmark's model
definitions at 100 classes, as their checkpoints (``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``,
``{"model": state_dict, ...}``) hold them.

Run it with a checkout of HobbitLong/RepDistiller (tested at b84f547c; megvii-research/mdistiller's
``mdistiller/models/cifar`` defines the same modules):

    python tests/data/make_kd_zoo_keys.py /path/to/RepDistiller

Keyed by our registered timm name; the reference constructor is recorded beside each entry.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# our name -> RepDistiller constructor call (models/__init__.py's model_dict, or mobilenetv2_T_w)
REFERENCE = {
    "resnet20_cifar": "resnet20(num_classes=100)",
    "resnet32_cifar": "resnet32(num_classes=100)",
    "resnet44_cifar": "resnet44(num_classes=100)",
    "resnet56_cifar": "resnet56(num_classes=100)",
    "resnet110_cifar": "resnet110(num_classes=100)",
    "resnet8x4_cifar": "resnet8x4(num_classes=100)",
    "resnet32x4_cifar": "resnet32x4(num_classes=100)",
    "wrn_16_2_cifar": "wrn_16_2(num_classes=100)",
    "wrn_40_2_cifar": "wrn_40_2(num_classes=100)",
    "vgg13_bn_cifar": "vgg13_bn(num_classes=100)",
    "mobilenetv2_x0_5_cifar": "mobile_half(num_classes=100)",
    "mobilenetv2_x1_0_cifar": "mobilenetv2.mobilenetv2_T_w(6, 1.0, 100)",
    "shufflenetv1_cifar": "ShuffleV1(num_classes=100)",
    "shufflenetv2_cifar": "ShuffleV2(num_classes=100)",
}


def main(repdistiller: str) -> None:
    sys.path.insert(0, repdistiller)
    import importlib

    out = {}
    for name, call in REFERENCE.items():
        func, args = call.rstrip(")").split("(")
        module, _, attr = f"models.{func}".rpartition(".")
        positional = [float(a) if "." in a else int(a) for a in args.split(", ") if "=" not in a]
        model = getattr(importlib.import_module(module), attr)(*positional, **({"num_classes": 100}
                                                                               if "num_classes" in args else {}))
        sd = model.state_dict()
        out[name] = {"reference": call, "keys": [[k, list(v.shape)] for k, v in sd.items()]}
    path = Path(__file__).with_name("kd_zoo_keys.json.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # same content -> same bytes
        f.write(json.dumps(out, sort_keys=True).encode())


if __name__ == "__main__":
    main(sys.argv[1])
