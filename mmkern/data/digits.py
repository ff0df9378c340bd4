"""The default training task, built offline from scikit-learn's handwritten digits: questions
about a digit's picture (and, for three modalities, about a second digit heard as a telephone
tone) whose answers need every modality."""

import torch
from torch.utils.data import Dataset

from mmkern.data.audio import dtmf_tone, log_spectrogram
from mmkern.data.images import resize_and_normalize
from mmkern.data.text import WordTokenizer

ANSWERS = ("no", "yes") + tuple(str(n) for n in range(19))
SAMPLE_RATE = 8000
_IMAGE_QUESTIONS = ("is this digit even ?", "is it larger than {n} ?", "what is it plus {n} ?")
_TONE_QUESTIONS = (
    "what is the picture plus the tone ?",
    "is the picture larger than the tone ?",
    "is the picture smaller than the tone ?",
    "is the sum of the picture and the tone even ?",
)


def _answer_about_image(template: int, digit: int, n: int) -> str:
    return (("no", "yes")[digit % 2 == 0], ("no", "yes")[digit > n], str(digit + n))[template]


def _answer_about_both(template: int, digit: int, tone: int) -> str:
    return (
        str(digit + tone),
        ("no", "yes")[digit > tone],
        ("no", "yes")[digit < tone],
        ("no", "yes")[(digit + tone) % 2 == 0],
    )[template]


def question_tokenizer() -> WordTokenizer:
    """The tokenizer of every question the task asks and every answer (each answer is one token, so a
    language model answers in one step)."""
    texts = [t.format(n=n) for t in _IMAGE_QUESTIONS for n in range(10)] + list(_TONE_QUESTIONS) + list(ANSWERS)
    return WordTokenizer.from_texts(texts)


def _load_digits() -> tuple:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - a clear message for a missing optional dependency
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


class DigitQuestions(Dataset):
    """Question answering over scikit-learn's 1797 8x8 digits, split by picture (``split`` "train"
    takes 80% of each digit's pictures, "test" the rest), ``questions_per_image`` questions each.

    Two modalities: "is this digit even?", "is it larger than N?", "what is it plus N?". With
    ``tones=True`` each sample also holds a second digit as a DTMF tone of random length (its log
    spectrogram, 25 ms frames every 10 ms) and the questions compare or add the two digits, so no
    modality alone answers them. Samples are dicts for ``MultimodalCollate``; answers index
    ``ANSWERS``. Everything is drawn from ``seed``: the same arguments give the same samples.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        tones: bool = False,
        questions_per_image: int = 8,
        image_size: int = 16,
        noise: float = 0.1,
        seed: int = 0,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if questions_per_image < 1:
            raise ValueError(f"questions_per_image must be at least 1, got {questions_per_image}")
        images, targets = _load_digits()
        generator = torch.Generator().manual_seed(seed)
        # The split depends on the seed alone, not on the split asked for, so train and test never overlap.
        order = torch.randperm(len(targets), generator=generator)
        chosen = []
        for digit in range(10):
            of_digit = order[targets[order] == digit]
            cut = int(0.8 * len(of_digit))
            chosen.append(of_digit[:cut] if split == "train" else of_digit[cut:])
        picked = torch.cat(chosen).sort().values
        # Questions differ between the splits: another stream for each.
        generator.manual_seed(seed * 2 + (split == "test") + 1)
        self.images = resize_and_normalize(images[picked], image_size, value_range=16.0)
        self.digits = targets[picked]
        count = len(picked) * questions_per_image
        self.image_index = torch.arange(len(picked)).repeat_interleave(questions_per_image)
        self.templates = torch.randint(
            len(_TONE_QUESTIONS if tones else _IMAGE_QUESTIONS), (count,), generator=generator
        )
        self.numbers = torch.randint(10, (count,), generator=generator)
        self.tones = tones
        self.spectrograms = [self._spectrogram(int(n), generator, noise) for n in self.numbers] if tones else None

    @staticmethod
    def _spectrogram(digit: int, generator: torch.Generator, noise: float) -> torch.Tensor:
        duration = 0.05 + 0.07 * float(torch.rand((), generator=generator))
        return log_spectrogram(dtmf_tone(str(digit), SAMPLE_RATE, duration, generator, noise), SAMPLE_RATE)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, index: int) -> dict:
        image = int(self.image_index[index])
        digit, template, n = int(self.digits[image]), int(self.templates[index]), int(self.numbers[index])
        if self.tones:
            question, answer = _TONE_QUESTIONS[template], _answer_about_both(template, digit, n)
            sample = {"audio": self.spectrograms[index]}
        else:
            question, answer = _IMAGE_QUESTIONS[template].format(n=n), _answer_about_image(template, digit, n)
            sample = {}
        return {"image": self.images[image], "text": question, "label": ANSWERS.index(answer), **sample}
