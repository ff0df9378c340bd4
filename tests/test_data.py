import math

import pytest
import torch

from mmkern.data import (
    ANSWERS,
    DigitQuestions,
    MultimodalCollate,
    WordTokenizer,
    dtmf_tone,
    frame_count,
    log_spectrogram,
    pad_sequences,
    question_tokenizer,
    resize_and_normalize,
)
from mmkern.data.audio import DTMF_COLUMNS, DTMF_ROWS


def test_tokenizer_pads_right_and_returns_lengths():
    tokenizer = WordTokenizer.from_texts(["is it even ?", "what is it plus 3 ?"])
    ids, lengths = tokenizer(["is it even ?", "", "what is it plus 3 ?", "unseen words"], begin=True)
    assert ids.dtype == lengths.dtype == torch.long
    assert lengths.tolist() == [5, 1, 7, 3]
    assert ids.shape == (4, 7)
    for row, length in zip(ids, lengths):
        assert (row[length:] == tokenizer.pad_id).all() and (row[:length] != tokenizer.pad_id).all()
    assert ids[3, 1] == ids[3, 2] == tokenizer.unknown_id
    assert tokenizer.decode(ids[2]) == "what is it plus 3 ?"
    assert tokenizer(["what is it plus 3 ?"], max_length=2)[1].tolist() == [2]
    assert tokenizer([])[0].shape == (0, 1)
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenizer("one text")


def test_pad_sequences_of_frames():
    padded, lengths = pad_sequences([torch.ones(3, 2), torch.ones(0, 2), torch.ones(1, 2)])
    assert padded.shape == (3, 3, 2) and lengths.tolist() == [3, 0, 1]
    assert padded.sum() == 8


def test_resize_and_normalize():
    images = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    out = resize_and_normalize(images, (4, 5), mean=(0.1, 0.2, 0.3), std=0.5)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    same = resize_and_normalize(images, (9, 7), mean=0.0, std=1.0)
    torch.testing.assert_close(same, images.float() / 255)
    gray = resize_and_normalize(torch.full((1, 8, 8), 16.0), 16, value_range=16.0)
    torch.testing.assert_close(gray, torch.ones(1, 1, 16, 16))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="images must be"):
        resize_and_normalize(torch.ones(8, 8), 4)
    with pytest.raises(ValueError, match="mean must be a number or have one value per channel"):
        resize_and_normalize(images, 4, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="size must be"):
        resize_and_normalize(images, 0)


def test_log_spectrogram_frames_and_peaks():
    rate = 8000
    tone = dtmf_tone("5", rate, duration=0.1, generator=torch.Generator().manual_seed(0))
    assert tone.shape == (800,)
    spectrogram = log_spectrogram(tone, rate)
    frame, hop = 200, 80
    assert spectrogram.shape == (frame_count(800, frame, hop), frame // 2 + 1) == (8, 101)
    # "5" is row 2 (770 Hz), column 2 (1336 Hz): the two loudest bins are those nearest them.
    loudest = spectrogram.mean(0).topk(2).indices.sort().values.tolist()
    bin_hz = rate / frame
    assert loudest == [round(DTMF_ROWS[1] / bin_hz), round(DTMF_COLUMNS[1] / bin_hz)]
    assert log_spectrogram(torch.zeros(3, 100), rate).shape == (3, 0, 101)
    assert frame_count(199, frame, hop) == 0 and frame_count(200, frame, hop) == 1
    with pytest.raises(ValueError, match="key must be one of"):
        dtmf_tone("a")
    assert math.isfinite(float(log_spectrogram(torch.zeros(400), rate).min()))


@pytest.mark.parametrize("tones", [False, True])
def test_digit_questions_split_and_answers(tones):
    train = DigitQuestions("train", tones=tones, questions_per_image=2)
    test = DigitQuestions("test", tones=tones, questions_per_image=2)
    assert len(train) + len(test) == 2 * 1797
    # Pictures never appear in both splits.
    train_pictures = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in train_pictures for x in test.images[:50])
    sample = train[3]
    assert sample["image"].shape == (1, 16, 16) and 0 <= sample["label"] < len(ANSWERS)
    assert ("audio" in sample) == tones
    for i in range(0, len(train), 97):
        s, digit = train[i], int(train.digits[train.image_index[i]])
        answer, n = ANSWERS[s["label"]], int(train.numbers[i])
        if s["text"].startswith("what"):
            assert answer == str(digit + n)
        elif "larger" in s["text"]:
            assert answer == ("yes" if digit > n else "no")
        elif "smaller" in s["text"]:
            assert answer == ("yes" if digit < n else "no")
        elif "sum" in s["text"]:
            assert answer == ("yes" if (digit + n) % 2 == 0 else "no")
        else:
            assert answer == ("yes" if digit % 2 == 0 else "no")
    again = DigitQuestions("train", tones=tones, questions_per_image=2)
    assert torch.equal(again.templates, train.templates) and again[5]["text"] == train[5]["text"]
    with pytest.raises(ValueError, match="split must be"):
        DigitQuestions("validation")


def test_collate_batches_every_modality():
    data = DigitQuestions("test", tones=True, questions_per_image=1)
    tokenizer = question_tokenizer()
    batch = MultimodalCollate(tokenizer)([data[i] for i in range(5)])
    assert batch["images"].shape == (5, 1, 16, 16)
    assert batch["text_ids"].shape[0] == 5 and batch["text_lens"].max() == batch["text_ids"].shape[1]
    assert batch["audio"].shape[:2] == (5, int(batch["audio_lens"].max()))
    assert batch["labels"].shape == (5,)
    assert all(tokenizer.unknown_id not in row for row in batch["text_ids"].tolist())
    with pytest.raises(ValueError, match="without a tokenizer"):
        MultimodalCollate()([data[0]])
    with pytest.raises(ValueError, match="same keys"):
        MultimodalCollate(tokenizer)([data[0], {"label": 1}])
