"""Train a stage: `python train.py [experiment=NAME] [key=value ...]`. All logic lives in imagen/cli/train.py."""

from imagen.cli.train import main

if __name__ == "__main__":
    main()
