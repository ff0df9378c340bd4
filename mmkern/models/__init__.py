"""Complete multimodal models built from mmkern's modules; each takes ``backend="mmkern"`` or ``"eager"``."""

from mmkern.models.flamingo import FlamingoLM, PerceiverResampler
from mmkern.models.fusion import FUSIONS
from mmkern.models.trimodal import TriModalClassifier
from mmkern.models.vision_text import IMAGE_ENCODERS, TEXT_ENCODERS, VisionTextClassifier

__all__ = [
    "FUSIONS",
    "FlamingoLM",
    "PerceiverResampler",
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "TriModalClassifier",
    "VisionTextClassifier",
]
