"""``mmkern.swap``: puts mmkern's kernels into a model that already exists, sharing its parameters."""

from dataclasses import dataclass, field

from torch import nn

from mmkern.nn import CrossModalAttention


@dataclass
class SwapReport:
    """What ``swap`` replaced (``swapped``: module names) and what it left alone, with why (``skipped``:
    ``(name, reason)``)."""

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mmkern.swap: {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {name}" for name in self.swapped]
        lines += [f"  left     {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _why_not_attention(mha: nn.MultiheadAttention) -> str | None:
    if mha.bias_k is not None:
        return "add_bias_kv=True (learned extra key and value) is not implemented by CrossModalAttention"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not implemented by CrossModalAttention"
    return None


def swap(model: nn.Module, *, attention: bool = True) -> SwapReport:
    """Replaces, in place, every ``nn.MultiheadAttention`` of ``model`` (self- or cross-attention, any
    ``kdim``/``vdim``, either ``batch_first``, inside ``nn.Transformer*`` layers too) by
    ``mmkern.nn.CrossModalAttention.from_torch`` of it: the same Parameter objects and ``out_proj``,
    the same ``state_dict`` keys and the attributes layers read (``batch_first``,
    ``_qkv_same_embed_dim``, the projection weights and biases), so outputs, training and checkpoints
    are unchanged. A module shared by several parents is swapped once and stays shared.

    Calls with a key padding mask (or lengths), and causal self-attention (``is_causal``, as
    ``nn.TransformerDecoderLayer`` passes with ``tgt_is_causal``) without one, run mmkern's kernel;
    other ``attn_mask``s and ``need_weights=True`` take CrossModalAttention's exact path, which gives
    ``nn.MultiheadAttention``'s answer. Two differences remain, both reported in the docstring rather
    than guessed around:
    ``need_weights`` defaults to False (pass True where the weights are read), and a sample whose keys
    are all masked gets zeros instead of NaN. ``nn.TransformerEncoderLayer`` in eval mode without
    gradients keeps PyTorch's native fast path, which reads the shared parameters directly.

    Returns a ``SwapReport``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = SwapReport()
    if not attention:
        return report
    replacements = {}
    for parent_name, parent in list(model.named_modules()):
        # _modules, not named_children(): the latter lists a module shared by two slots once.
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = _why_not_attention(child)
            if reason is not None:
                report.skipped.append((name, reason))
                continue
            if id(child) not in replacements:
                replacements[id(child)] = CrossModalAttention.from_torch(child)
            setattr(parent, child_name, replacements[id(child)])
            report.swapped.append(name)
    return report
