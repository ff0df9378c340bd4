"""``CrossModalAttention``: the drop-in for ``nn.MultiheadAttention`` on mmkern's fused kernel."""

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.nn.backend import UsesBackend
from mmkern.ops.masks import hiding_bias


class CrossModalAttention(UsesBackend, nn.Module):
    """Multi-head attention of one modality's tokens over another's, as ``nn.MultiheadAttention``
    computes it, with the attention itself in ``mmkern.ops.cross_modal_attention``.

    Parameters carry ``nn.MultiheadAttention``'s names and shapes (``in_proj_weight`` when query, key
    and value share one width, else ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``; then
    ``in_proj_bias`` and ``out_proj``), so state dicts move between the two. ``num_kv_heads`` below
    ``num_heads`` gives grouped-query attention: the key and value projections then have
    ``num_kv_heads * head_dim`` outputs.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None)`` returns
    ``(out, None)``. Batches whose lengths are known pass them instead of a mask: ``kv_lens`` (B,)
    valid keys per sample, and ``q_lens`` (B,) valid queries (later query rows come out as
    ``out_proj``'s bias); batched inputs only. Every mask is read in the kernel, nothing on the host,
    eager or compiled: a boolean ``key_padding_mask`` (True = ignore) as its key mask (a sample's
    leading and trailing padding cost no work), an additive one and an ``attn_mask`` (boolean, True =
    masked, or additive; ``(Lq, Lk)`` or ``(B * H, Lq, Lk)``) as its bias. ``is_causal=True`` over
    square self-attention runs the kernel's causal attention (as ``nn.MultiheadAttention``, it then
    trusts the hint over ``attn_mask``). ``need_weights=True`` takes an exact eager path and gives
    ``nn.MultiheadAttention``'s answer, weights included. A query whose keys are all masked gets zeros
    (``nn.MultiheadAttention`` gives NaN).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        num_kv_heads: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self._set_shape(embed_dim, num_heads, kdim, vdim, num_kv_heads, dropout, batch_first)
        factory = {"device": device, "dtype": dtype}
        kv_out = self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_out, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_out, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_out, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def _set_shape(self, embed_dim, num_heads, kdim, vdim, num_kv_heads, dropout, batch_first):
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim and num_kv_heads == num_heads
        self.dropout, self.batch_first = float(dropout), batch_first
        self.bias_k = self.bias_v = None  # read by code written for nn.MultiheadAttention
        self.add_zero_attn = False

    # nn.TransformerEncoderLayer's inference fast path calls it to build its mask; it reads only
    # attributes this module shares with nn.MultiheadAttention.
    merge_masks = nn.MultiheadAttention.merge_masks

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation.
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "CrossModalAttention":
        """A CrossModalAttention that shares ``mha``'s parameters (the same Parameter objects and the
        same ``out_proj`` module): equal outputs, and training either trains both."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha has add_bias_kv or add_zero_attn, which CrossModalAttention does not implement")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_shape(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, mha.num_heads, mha.dropout, mha.batch_first)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            module.register_parameter(name, getattr(mha, name))
        module.out_proj = mha.out_proj
        return module

    def _projections(self, query, key, value):
        """(B, L, H, head_dim) projections; one GEMM (and strided views of it) for self-attention
        with packed weights."""
        kv_out = self.num_kv_heads * self.head_dim
        splits = (self.embed_dim, kv_out, kv_out)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(splits)
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).split(splits, dim=-1)
        else:
            weights = (
                self.in_proj_weight.split(splits)
                if self._qkv_same_embed_dim
                else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            )
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_lens: torch.Tensor | None = None,
        q_lens: torch.Tensor | None = None,
    ):
        if kv_lens is not None or q_lens is not None:
            return self._forward_with_lengths(
                query, key, value, kv_lens, q_lens, key_padding_mask, need_weights, attn_mask, is_causal
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = (x.unsqueeze(1 if not self.batch_first else 0) for x in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        self._check(query, key, value, key_padding_mask)
        q, k, v = self._projections(query, key, value)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _exact_attention(
                q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, average_attn_weights
            )
        elif is_causal and q.shape[1] == k.shape[1]:
            # nn.MultiheadAttention trusts the hint over attn_mask here (it calls SDPA's is_causal); over
            # square self-attention its top-left causal mask is the kernel's bottom-right one.
            out = self._ops.cross_modal_attention(
                q, k, v, **_padding(key_padding_mask), dropout_p=dropout_p, causal=True
            )
        else:
            # Everything else is read in the kernel, nothing on the host: a boolean padding mask as its key
            # mask, an additive one and any attn_mask as its bias.
            padding = _padding(key_padding_mask)
            bias = _attn_mask_bias(attn_mask, q)
            if "bias" in padding:
                bias = padding.pop("bias") if bias is None else bias + padding.pop("bias")
            out = self._ops.cross_modal_attention(q, k, v, **padding, bias=bias, dropout_p=dropout_p)
        out = self.out_proj(out.flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1 if not self.batch_first else 0)
            weights = None if weights is None else weights.squeeze(0)
        return out, (weights if need_weights else None)

    def _forward_with_lengths(
        self, query, key, value, kv_lens, q_lens, key_padding_mask, need_weights, attn_mask, is_causal
    ):
        if key_padding_mask is not None or attn_mask is not None or need_weights or is_causal:
            raise ValueError(
                "kv_lens and q_lens replace key_padding_mask; they do not combine with attn_mask, "
                "need_weights or is_causal"
            )
        if query.dim() != 3:
            raise ValueError(f"kv_lens and q_lens need batched inputs, got query of shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        self._check(query, key, value, None)
        q, k, v = self._projections(query, key, value)
        out = self._ops.cross_modal_attention(
            q, k, v, kv_lens=kv_lens, q_lens=q_lens, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.out_proj(out.flatten(-2))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _check(self, query, key, value, key_padding_mask):
        for name, x, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.dim() != 3 or x.shape[-1] != width:
                raise ValueError(f"{name} must be (batch, length, {width}) (or unbatched), got shape {tuple(x.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"key and value must share batch and length, and the batch of query; got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(key.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, key length) {tuple(key.shape[:2])}, got "
                f"{tuple(key_padding_mask.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}"
        )


def _padding(key_padding_mask) -> dict:
    """The kernel's keywords for a key_padding_mask (True or a float added: the key is ignored or
    weighed): a boolean one is its key mask, (B, Lk); an additive one a bias, (B, 1, 1, Lk)."""
    if key_padding_mask is None:
        return {}
    if key_padding_mask.is_floating_point():
        return {"bias": key_padding_mask[:, None, None, :]}
    return {"key_mask": ~key_padding_mask.bool()}


def _attn_mask_bias(attn_mask, q):
    """nn.MultiheadAttention's attn_mask ((Lq, Lk) or (B * H, Lq, Lk), True = masked, or additive) as
    the kernel's bias, broadcastable to (B, H, Lq, Lk)."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(q.shape[0], q.shape[2], *attn_mask.shape[1:])
    return hiding_bias(attn_mask, q.dtype) if attn_mask.dtype == torch.bool else attn_mask


def _exact_attention(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, average_weights):
    """nn.MultiheadAttention's math, for the cases it alone defines: weights asked for, an
    attn_mask (boolean, True = masked, or additive; (Lq, Lk) or (B * H, Lq, Lk)), a causal mask,
    an additive (float) key_padding_mask."""
    batch, q_len, heads, head_dim = q.shape
    k_len, group = k.shape[1], heads // k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
    scores = qh @ kh.transpose(-1, -2) * head_dim**-0.5
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = attn_mask.reshape(batch, heads, q_len, k_len) if attn_mask.dim() == 3 else attn_mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        scores = scores + padding if padding.is_floating_point() else scores.masked_fill(padding, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)  # nn.MultiheadAttention returns the dropped weights too
    out = weights @ vh
    if average_weights is None:
        return out.transpose(1, 2), None
    return out.transpose(1, 2), weights.mean(1) if average_weights else weights
