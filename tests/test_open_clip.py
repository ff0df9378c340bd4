"""mmkern.swap in open_clip's CoCa (from a config, random weights; nothing downloaded): every
nn.MultiheadAttention replaced, the CoCa loss's gradients those of the untouched model.

These pin the cause of the NaN gradients once seen after swapping a CoCa: open_clip leaves
``text_decoder.text_projection`` uninitialised (see the README's limits), so both the swapped model and
its untouched copy computed with whatever memory the allocator handed out.
"""

import copy

import pytest
import torch
from torch import nn

import mmkern
import mmkern.nn.cross_modal_attention as module_file
from tests.numerics import assert_close_to_reference

open_clip = pytest.importorskip("open_clip")
from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.loss import CoCaLoss  # noqa: E402

PAD = 0  # CoCa's pad_id
CONFIG = dict(
    embed_dim=48,
    vision_cfg=dict(
        layers=2,
        width=64,
        head_width=16,
        patch_size=8,
        image_size=32,
        attentional_pool=True,
        attn_pooler_queries=8,
        attn_pooler_heads=4,
        output_tokens=True,
    ),
    text_cfg=dict(context_length=12, vocab_size=64, width=48, heads=4, layers=2, embed_cls=True, output_tokens=True),
    multimodal_cfg=dict(context_length=12, vocab_size=64, width=48, heads=4, layers=2),
)
# Every attention runs the kernel: the vision tower (2 layers), the attentional pooler, the decoder's
# cross-attention (2), and, with their masks as the kernel's bias, the text tower's per-head additive
# mask (causal, padding, CLS; 2 layers) and the decoder's causal self-attention (2).
PATHS = {"kernel": 9, "exact": 0}
# Each gradient sums over the batch's tokens (3 x 17 image, 3 x 13 text), and over layers: float32
# roundoff of sums that long, which eager may happen to get closer to exact than that.
TOKENS = 64


def test_open_clip_leaves_the_coca_decoders_text_projection_uninitialised(poisoned_memory):
    """MultimodalTransformer allocates text_projection with torch.empty and CoCa never calls its
    init_parameters: a CoCa built from a config holds stale memory there (here, NaN on every build).
    Every other parameter is initialised."""
    model = CoCa(**CONFIG)
    assert [name for name, p in model.named_parameters() if p.isnan().any()] == ["text_decoder.text_projection"]


def initialised_coca(seed: int) -> CoCa:
    torch.manual_seed(seed)
    model = CoCa(**CONFIG)
    # What MultimodalTransformer.init_parameters would do, were it called.
    nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    return model


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    text = torch.randint(1, 64, (3, 12), generator=generator)
    text[1, 7:] = PAD  # a padded caption: the text tower masks its padding
    return images, text


def loss_and_gradients(model, images, text, mode):
    getattr(model, mode)()
    model.zero_grad()
    loss = sum(
        CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=PAD)(
            **model(images, text), output_dict=True
        ).values()
    )
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", range(4))  # run repeatedly: the failure this pins was intermittent
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swapped_coca_gives_open_clips_gradients(seed, mode, poisoned_memory, monkeypatch):
    model = initialised_coca(seed)
    exact = copy.deepcopy(model).double()
    untouched = copy.deepcopy(model)
    report = mmkern.swap(model)
    assert len(report.swapped) == sum(PATHS.values()) and not report.skipped
    images, text = batch(seed)
    exact_loss, exact_grads = loss_and_gradients(exact, images.double(), text, mode)
    eager_loss, eager_grads = loss_and_gradients(untouched, images, text, mode)
    calls = []
    kernel, exact_path = mmkern.ops.cross_modal_attention, module_file._exact_attention
    monkeypatch.setattr(mmkern.ops, "cross_modal_attention", lambda *a, **k: calls.append("kernel") or kernel(*a, **k))
    monkeypatch.setattr(module_file, "_exact_attention", lambda *a: calls.append("exact") or exact_path(*a))
    loss, grads = loss_and_gradients(model, images, text, mode)
    assert {path: calls.count(path) for path in PATHS} == PATHS
    assert_close_to_reference(loss, exact_loss, eager_loss, "loss", terms=TOKENS)
    assert grads.keys() == exact_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert_close_to_reference(grad, exact_grads[name], eager_grads[name], name, terms=TOKENS)
