"""Data helpers for multimodal training: preprocessing, batching, the default task and stored features."""

from mmkern.data.audio import dtmf_tone, frame_count, log_spectrogram
from mmkern.data.collate import MultimodalCollate, to_device
from mmkern.data.digits import ANSWERS, DigitQuestions, question_tokenizer
from mmkern.data.feature_store import QuantizedFeatureStore
from mmkern.data.images import resize_and_normalize
from mmkern.data.text import WordTokenizer, pad_sequences

__all__ = [
    "ANSWERS",
    "DigitQuestions",
    "MultimodalCollate",
    "QuantizedFeatureStore",
    "WordTokenizer",
    "dtmf_tone",
    "frame_count",
    "log_spectrogram",
    "pad_sequences",
    "question_tokenizer",
    "resize_and_normalize",
    "to_device",
]
