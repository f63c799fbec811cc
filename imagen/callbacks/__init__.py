"""Lightning callbacks used by the configs in conf/callbacks/."""

from imagen.callbacks.image_logger import ImageLogger

__all__ = ["ImageLogger"]
