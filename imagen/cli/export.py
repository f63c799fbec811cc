"""`python -m imagen.cli.export CKPT OUT_DIR`: write a stage checkpoint as safetensors weights + a YAML config.

The exported folder is what to share: loading it never unpickles anything. `sample.py ckpt=OUT_DIR` and
`model.init_from=OUT_DIR` read it like the checkpoint it came from.
"""

from __future__ import annotations

import argparse
import logging

from imagen.checkpoints import export_checkpoint

log = logging.getLogger("imagen")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a stage checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="the folder to write model.safetensors and config.yaml into")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full unpickling of CKPT (it can run code); only for checkpoints from a trusted source",
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out_dir, trust=args.trust_checkpoint)
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
