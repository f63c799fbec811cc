"""Sample from a trained checkpoint: `python sample.py ckpt=PATH prompts='["..."]'`. Logic: imagen/cli/sample.py."""

from imagen.cli.sample import main

if __name__ == "__main__":
    main()
