"""The shared pair-wise layers against torch's own nn.MultiheadAttention (the reference path of
the official code), with padding and attention masks, values and gradients."""
import pytest
import torch

from locore_plugin.nn import SelfAttention, allowed_keys, l2_normalize


@pytest.mark.parametrize("with_blocked", [False, True])
def test_self_attention_equals_multihead_attention(with_blocked):
    torch.manual_seed(0)
    batch, length, dim, heads = 3, 9, 16, 4
    reference = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    ours = SelfAttention(dim, heads)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, length, dim, requires_grad=True)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 6:] = True
    padding[2, 2:] = True
    blocked = None
    if with_blocked:  # AMES-like: token 0 sees all, the rest only their own half
        side = (torch.arange(length) > 0).long() + (torch.arange(length) > 4).long()
        blocked = (side[:, None] * side[None, :]) == 2
    want = reference(x, x, x, key_padding_mask=padding, attn_mask=blocked, need_weights=False)[0]
    allowed = allowed_keys(padding) if blocked is None else allowed_keys(padding) & ~blocked
    got = ours(x, allowed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (want.square().sum()).backward()
    grad_reference = x.grad.clone()
    x.grad = None
    (got.square().sum()).backward()
    torch.testing.assert_close(x.grad, grad_reference, atol=1e-4, rtol=1e-4)


def test_initialisation_draws_as_multihead_attention():
    torch.manual_seed(3)
    reference = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    torch.manual_seed(3)
    ours = SelfAttention(8, 2)
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_l2_normalize_keeps_zero_padding_zero_in_half_precision():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    torch.testing.assert_close(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float16))
    with pytest.raises(ValueError, match="not divisible"):
        SelfAttention(10, 3)


def test_block_attention_equals_the_full_masked_attention():
    """AMES's blocks (MTC sees all; each image its own tokens, or the other image's) against
    nn.MultiheadAttention with the official L x L masks and key padding."""
    from locore_plugin.adapters.ames import attention_blocks

    torch.manual_seed(1)
    q, t, dim, heads = 5, 3, 8, 2
    length = 1 + q + t
    reference = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    ours = SelfAttention(dim, heads)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, length, dim)
    padding = torch.zeros(2, length, dtype=torch.bool)
    padding[0, 4:6] = True  # two padded query tokens
    padding[1, 8] = True  # a padded database token
    side = (torch.arange(length) > 0).long() + (torch.arange(length) > q).long()
    across = (side[:, None] * side[None, :]) == 2
    within = (side[:, None] == side[None, :]) & (side[:, None] > 0)
    blocks_within, blocks_across = attention_blocks(q, t, x.device)
    for blocked, blocks in ((across, blocks_within), (within, blocks_across)):  # masks say what is NOT allowed
        want = reference(x, x, x, key_padding_mask=padding, attn_mask=blocked, need_weights=False)[0]
        torch.testing.assert_close(ours(x, padding=padding, blocks=blocks), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["padding", "full-mask", "blocks"])
def test_reference_implementation_equals_the_fused_one_values_and_gradients(pattern):
    """``implementation="reference"`` runs nn.MultiheadAttention's forward; the fused path must
    give the same outputs and input gradients (training uses the fused path)."""
    from locore_plugin.adapters.ames import attention_blocks
    from locore_plugin.nn import set_attention_implementation

    torch.manual_seed(2)
    q, t, dim, heads = 6, 4, 16, 4
    length = 1 + q + t
    fused = SelfAttention(dim, heads)
    reference = set_attention_implementation(SelfAttention(dim, heads), "reference")
    reference.load_state_dict(fused.state_dict())
    padding = torch.zeros(3, length, dtype=torch.bool)
    padding[0, 3:5] = True
    padding[2, 9:] = True
    x = torch.randn(3, length, dim, requires_grad=True)
    if pattern == "blocks":
        within, _ = attention_blocks(q, t, x.device)
        run = {impl: (lambda m=m: m(x, padding=padding, blocks=within)) for impl, m in (("sdpa", fused), ("reference", reference))}
    else:
        allowed = allowed_keys(padding)
        if pattern == "full-mask":
            allowed = allowed & (torch.rand(3, 1, length, length) > 0.3) | torch.eye(length, dtype=torch.bool)
        run = {impl: (lambda m=m: m(x, allowed)) for impl, m in (("sdpa", fused), ("reference", reference))}
    grads = {}
    for impl, forward in run.items():
        out = forward()
        out.square().sum().backward()
        grads[impl] = (out.detach(), x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads["sdpa"][0], grads["reference"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["sdpa"][1], grads["reference"][1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        set_attention_implementation(fused, "flash")


def test_layer_stack_checkpointing_gives_the_same_gradients():
    """LayerStack (the AMES decoder / RRT encoder container) with gradient checkpointing on:
    the same output and gradients as without, only in training mode."""
    from locore_plugin.nn import LayerStack, activation

    class Counted(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            Counted.calls += 1
            return torch.relu(super().forward(x))

    torch.manual_seed(0)
    stack = LayerStack([Counted(4, 4), Counted(4, 4)], torch.nn.LayerNorm(4))
    x = torch.randn(3, 4, requires_grad=True)
    plain = stack(x)
    grads = torch.autograd.grad(plain.square().sum(), [x, *stack.parameters()])
    stack.gradient_checkpointing_enable()
    Counted.calls = 0
    again = stack(x)
    grads_again = torch.autograd.grad(again.square().sum(), [x, *stack.parameters()])
    assert Counted.calls == 4  # each layer ran again in backward
    torch.testing.assert_close(again, plain)
    torch.testing.assert_close(grads_again, grads)
    assert list(stack.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                                        "norm.weight", "norm.bias"]
    assert "norm.weight" not in LayerStack([torch.nn.Linear(4, 4)]).state_dict()
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu'\], got 'tanh'"):
        activation("tanh")
