"""``FlamingoLM``: a perceiver resampler over visual tokens and a causal decoder with tanh-gated
cross-attention layers (Alayrac et al., 2022), small enough to train on a CPU."""

import torch
from torch import nn

from mmkern.models.blocks import FeedForward
from mmkern.models.encoders import ConvImageEncoder, PatchImageEncoder
from mmkern.nn import CrossModalAttention
from mmkern.nn.backend import set_backend


class PerceiverResampler(nn.Module):
    """``num_latents`` learned queries cross-attending to the visual tokens and to themselves (keys are
    ``[latents; visual]``, so each sample's valid keys are the first ``num_latents + visual_lens``:
    right padding of the visual tokens stays lengths for the kernel). Returns ``(B, num_latents, dim)``."""

    def __init__(self, dim: int, num_latents: int = 16, depth: int = 2, heads: int = 4, visual_dim: int | None = None):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.visual_projection = nn.Linear(visual_dim, dim) if visual_dim not in (None, dim) else nn.Identity()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "latent_norm": nn.LayerNorm(dim),
                    "visual_norm": nn.LayerNorm(dim),
                    "attention": CrossModalAttention(dim, heads, batch_first=True),
                    "feed_forward_norm": nn.LayerNorm(dim),
                    "feed_forward": FeedForward(dim, 2 * dim),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, visual: torch.Tensor, visual_lens: torch.Tensor | None = None) -> torch.Tensor:
        visual = self.visual_projection(visual)
        batch, num_latents = visual.shape[0], self.latents.shape[0]
        latents = self.latents.expand(batch, -1, -1)
        kv_lens = None if visual_lens is None else visual_lens + num_latents
        for layer in self.layers:
            queries = layer["latent_norm"](latents)
            keys = torch.cat([queries, layer["visual_norm"](visual)], dim=1)
            attended, _ = layer["attention"](queries, keys, keys, kv_lens=kv_lens)
            latents = latents + attended
            latents = latents + layer["feed_forward"](layer["feed_forward_norm"](latents))
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """Text tokens attend to the resampled visual latents; attention and feed-forward outputs are
    scaled by ``tanh`` of learned gates. Flamingo starts them at zero, so that the block leaves a
    pretrained language model as it was; trained from scratch, gates at zero also zero the gradients
    of everything behind them, and the model never learns to look (``gate_init`` > 0 then)."""

    def __init__(self, dim: int, heads: int, gate_init: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossModalAttention(dim, heads, batch_first=True)
        self.attention_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, 2 * dim)
        self.feed_forward_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        attended, _ = self.attention(
            self.norm(x),
            latents,
            latents,
            q_lens=lengths,
            kv_lens=None if lengths is None else torch.full_like(lengths, latents.shape[1]),
        )
        x = x + torch.tanh(self.attention_gate) * attended
        return x + torch.tanh(self.feed_forward_gate) * self.feed_forward(self.feed_forward_norm(x))


class CausalBlock(nn.Module):
    """A pre-norm decoder block. Causal self-attention over right-padded text needs no padding mask: a
    valid token's causal window holds valid tokens only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossModalAttention(dim, heads, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attention(h, h, h, is_causal=True)[0]
        return x + self.feed_forward(self.feed_forward_norm(x))


class FlamingoLM(nn.Module):
    """A visual language model: image (or video frame) tokens from ``image_encoder`` (``"cnn"`` or
    ``"vit"``) are resampled to ``num_latents`` latents, which a causal decoder reads through
    tanh-gated cross-attention before each of its ``depth`` blocks.

    ``forward(images, text_ids, text_lens=None)`` returns next-token logits ``(B, L, vocab_size)``.
    ``images`` is ``(B, C, H, W)``, or ``(B, T, C, H, W)`` frames whose tokens are concatenated (with a
    learned embedding per frame; ``frame_lens`` (B,) gives each sample's valid frames).
    ``generate(...)`` decodes greedily. ``gate_init`` starts the tanh gates (0, Flamingo's choice for
    a pretrained language model; above 0 to train from scratch). ``backend`` as in the other models.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        image_encoder: str = "cnn",
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        num_latents: int = 16,
        resampler_depth: int = 2,
        image_size: int = 16,
        patch_size: int = 4,
        in_channels: int = 1,
        max_frames: int = 8,
        max_text_length: int = 64,
        gate_init: float = 0.0,
        backend: str = "mmkern",
    ):
        super().__init__()
        if image_encoder not in ("cnn", "vit"):
            raise ValueError(f"image_encoder must be 'cnn' or 'vit', got {image_encoder!r}")
        self.image_encoder = (
            ConvImageEncoder(dim, in_channels)
            if image_encoder == "cnn"
            else PatchImageEncoder(dim, image_size, patch_size, in_channels, depth=1, heads=heads)
        )
        self.frame_embedding = nn.Parameter(torch.zeros(max_frames, 1, dim))
        self.resampler = PerceiverResampler(dim, num_latents, resampler_depth, heads)
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(1, max_text_length, dim) * 0.02)
        self.cross_blocks = nn.ModuleList(GatedCrossAttentionBlock(dim, heads, gate_init) for _ in range(depth))
        self.blocks = nn.ModuleList(CausalBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        set_backend(self, backend)

    def visual_latents(self, images: torch.Tensor, frame_lens: torch.Tensor | None = None) -> torch.Tensor:
        frames = images.unsqueeze(1) if images.dim() == 4 else images
        if frames.dim() != 5:
            raise ValueError(f"images must be (B, C, H, W) or (B, T, C, H, W), got shape {tuple(images.shape)}")
        batch, count = frames.shape[:2]
        if count > self.frame_embedding.shape[0]:
            raise ValueError(f"{count} frames is more than max_frames ({self.frame_embedding.shape[0]})")
        tokens = self.image_encoder(frames.flatten(0, 1))[0].unflatten(0, (batch, count))
        tokens = tokens + self.frame_embedding[:count]
        per_frame = tokens.shape[2]
        visual_lens = None if frame_lens is None else frame_lens * per_frame
        return self.resampler(tokens.flatten(1, 2), visual_lens)

    def decode(self, latents: torch.Tensor, text_ids: torch.Tensor, text_lens: torch.Tensor | None = None):
        if text_ids.shape[1] > self.positions.shape[1]:
            raise ValueError(
                f"text of {text_ids.shape[1]} tokens is longer than max_text_length ({self.positions.shape[1]})"
            )
        x = self.embedding(text_ids) + self.positions[:, : text_ids.shape[1]]
        for cross, block in zip(self.cross_blocks, self.blocks):
            x = block(cross(x, latents, text_lens))
        return self.lm_head(self.norm(x))

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_lens: torch.Tensor | None = None,
        frame_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.decode(self.visual_latents(images, frame_lens), text_ids, text_lens)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_lens: torch.Tensor,
        max_new_tokens: int = 8,
        end_id: int | None = None,
        frame_lens: torch.Tensor | None = None,
    ) -> list:
        """Greedy decoding after each sample's ``prompt_lens[b]`` prompt tokens (right-padded
        ``prompt_ids``); stops a sample at ``end_id`` (not returned) or after ``max_new_tokens``. Returns
        one list of new token ids per sample. The visual latents are computed once."""
        latents = self.visual_latents(images, frame_lens)
        sequences = [prompt_ids[b, : int(prompt_lens[b])].tolist() for b in range(prompt_ids.shape[0])]
        new_tokens = [[] for _ in sequences]
        active = list(range(len(sequences)))
        for _ in range(max_new_tokens):
            if not active:
                break
            width = max(len(sequences[b]) for b in active)
            ids = torch.zeros(len(active), width, dtype=torch.long, device=prompt_ids.device)
            for row, b in enumerate(active):
                ids[row, : len(sequences[b])] = torch.tensor(sequences[b], device=prompt_ids.device)
            lens = torch.tensor([len(sequences[b]) for b in active], device=prompt_ids.device)
            logits = self.decode(latents[active], ids, lens)
            chosen = logits[torch.arange(len(active), device=logits.device), lens - 1].argmax(-1).tolist()
            still = []
            for b, token in zip(active, chosen):
                if token == end_id:
                    continue
                sequences[b].append(token)
                new_tokens[b].append(token)
                still.append(b)
            active = still
        return new_tokens
