"""``QuantizedFeatureStore``: cached encoder features kept as per-token int8 with their scales."""

import os
import re

import torch

from mmkern import ops
from mmkern.ops.quantize_per_token import QUANTIZED_DTYPES, raise_on_nonfinite_rows

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class QuantizedFeatureStore:
    """A directory of features quantized per token (``mmkern.ops.quantize_per_token``), one
    ``torch.save`` file per key holding ``xq``, ``scale`` and the dtype the features came in. A
    ``(L, d)`` bf16 feature map takes ``L * (d + 4)`` bytes instead of ``2 * L * d``: about half,
    a quarter of float32. Files load memory-mapped, so a dataset reads only what it indexes.

        store = QuantizedFeatureStore("cache/clip_vit")
        store.put("img_000123", vision_encoder(image)[0])   # (L, d) float
        xq, scale = store.get("img_000123")                 # for quantized_concat_linear / QuantizedFusion
        x = store.get("img_000123", dequantize=True)        # back in the stored dtype
    """

    def __init__(self, root: str | os.PathLike, dtype: torch.dtype = torch.int8):
        if dtype not in QUANTIZED_DTYPES:
            raise TypeError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
        self.root, self.dtype = os.fspath(root), dtype
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(
                f"key must be letters, digits, '.', '_' or '-' (a file name), starting with a letter or "
                f"digit, got {key!r}"
            )
        return os.path.join(self.root, key + ".pt")

    def put(self, key: str, features: torch.Tensor) -> None:
        """Quantizes ``features (*lead, d)`` (float16, bfloat16 or float32) per token and stores them;
        an existing key is replaced. Raises ValueError for NaN or inf features."""
        path = self._path(key)
        xq, scale = ops.quantize_per_token(features.detach(), self.dtype)
        record = {"xq": xq.cpu(), "scale": scale.cpu(), "dtype": str(features.dtype).removeprefix("torch.")}
        # On the host by now, so checked on every device: NaN on disk would outlive the run.
        raise_on_nonfinite_rows(record["scale"], "features")
        temporary = path + ".partial"
        torch.save(record, temporary)
        os.replace(temporary, path)  # readers never see a half-written file

    def get(self, key: str, *, dequantize: bool = False, device=None):
        """``(xq, scale)``, or with ``dequantize`` the features in the dtype they were stored from."""
        path = self._path(key)
        if not os.path.exists(path):
            raise KeyError(key)
        record = torch.load(path, mmap=True, weights_only=True)
        xq, scale = record["xq"].to(device), record["scale"].to(device)
        if dequantize:
            return ops.dequantize_per_token(xq, scale, getattr(torch, record["dtype"]))
        return xq, scale

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def keys(self) -> list:
        return sorted(name[:-3] for name in os.listdir(self.root) if name.endswith(".pt"))

    def __len__(self) -> int:
        return len(self.keys())
