"""Lightning callbacks used by the configs in conf/callbacks/."""

from imagen.callbacks.ema import EMAWeights
from imagen.callbacks.image_logger import ImageLogger

__all__ = ["EMAWeights", "ImageLogger"]
