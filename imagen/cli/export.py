"""`python -m imagen.cli.export CKPT OUT_DIR`: write a stage checkpoint as safetensors weights + a YAML config.

The exported folder is what to share: loading it never unpickles anything. `sample.py ckpt=OUT_DIR` and
`model.init_from=OUT_DIR` read it like the checkpoint it came from. An OUT_DIR that already holds an export is
refused unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import logging

from imagen.checkpoints import export_checkpoint

log = logging.getLogger("imagen")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", metavar="CKPT", help="a stage checkpoint (.ckpt)")
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="the folder to write model.safetensors and config.yaml into"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full unpickling of CKPT (it can run code); only for checkpoints from a trusted source",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an export already in OUT_DIR (without it, such an OUT_DIR is refused)",
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out_dir, trust=args.trust_checkpoint, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
