"""A word-level tokenizer whose batches carry lengths, not masks: mmkern's attention takes
``kv_lens`` straight from them."""

import re
from collections.abc import Iterable, Sequence

import torch

PAD, UNKNOWN, BEGIN, END = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNKNOWN, BEGIN, END)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list:
    """Lower-cased words, numbers and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps words to ids (``<pad>`` is 0, then ``<unk>``, ``<bos>``, ``<eos>``, then the vocabulary
    in order of first appearance, so the same texts always give the same ids)."""

    def __init__(self, vocabulary: Sequence[str]):
        self.tokens = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(vocabulary) if w not in SPECIAL_TOKENS]
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.pad_id, self.unknown_id, self.begin_id, self.end_id = (self.ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        return cls([w for text in texts for w in words(text)])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, begin: bool = False, end: bool = False) -> list:
        ids = [self.ids.get(w, self.unknown_id) for w in words(text)]
        return [self.begin_id] * begin + ids + [self.end_id] * end

    def __call__(
        self, texts: Sequence[str], *, max_length: int | None = None, begin: bool = False, end: bool = False
    ) -> tuple:
        """``(ids (B, L) int64 right-padded with <pad>, lengths (B,) int64)``; texts longer than
        ``max_length`` are cut to it. ``L`` is the longest length (at least 1, so a batch of empty
        texts still has a shape every layer accepts)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        encoded = [self.encode(t, begin=begin, end=end)[:max_length] for t in texts]
        return pad_sequences([torch.tensor(e, dtype=torch.long) for e in encoded], self.pad_id)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        special = set(range(len(SPECIAL_TOKENS))) if skip_special else set()
        return " ".join(self.tokens[i] for i in ids if i not in special)


def pad_sequences(sequences: Sequence[torch.Tensor], padding_value: float = 0) -> tuple:
    """``(padded (B, L, *rest), lengths (B,))`` from tensors of shape ``(L_i, *rest)``, right-padded."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    longest = max(int(lengths.max()) if len(sequences) else 0, 1)
    rest = sequences[0].shape[1:] if len(sequences) else ()
    dtype = sequences[0].dtype if len(sequences) else torch.long
    padded = torch.full((len(sequences), longest, *rest), padding_value, dtype=dtype)
    for i, s in enumerate(sequences):
        padded[i, : len(s)] = s
    return padded, lengths
