"""The LoRA layer (llmkernels.lora.LoRALinear) and add_lora_: PEFT's state-dict keys and their
conversion, PEFT's init, merge/unmerge, forward and gradients under the parity rule (CPU, the CUDA
kernels emulated, CUDA), add_lora_'s targeting and freezing, and a few Adam steps that fit a
low-rank change of a frozen MLP."""
import math

import pytest
import torch
from torch import nn

from llmkernels import lora, quant
from llmkernels.reference import lora as reference

from helpers import assert_parity, generator, randn


class Attention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.self_attn = Attention(width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + self.self_attn(self.norm(x))


class Tiny(nn.Module):
    """Two blocks with q_proj/k_proj/v_proj Linears, a LayerNorm in each, and a head."""

    def __init__(self, width=16, head=8):
        super().__init__()
        self.layers = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, head)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


TARGETS = [f"layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "v_proj")]


def tiny_with_lora(seed, r=4):
    """Tiny with q_proj and v_proj wrapped and every adapter weight random (not B = 0)."""
    torch.manual_seed(seed)
    model = lora.add_lora_(Tiny(), ["q_proj", "v_proj"], r, 2.0 * r)
    with torch.no_grad():
        for name in TARGETS:
            model.get_submodule(name).lora_B.weight.normal_()
    return model


def layer_case(in_features, out_features, r, dtype, device, seed):
    """A LoRALinear on a random base (weight ~ 1/sqrt(in), bias), B random so the adapter counts."""
    g = generator(seed)
    base = nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=g) * in_features ** -0.5)
        base.bias.copy_(torch.randn(out_features, generator=g))
    layer = lora.LoRALinear(base, r, 2.0 * r)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(out_features, r, generator=g) * r ** -0.5)
    return layer.to(device)


def reference_out(layer, x, dtype, upcast):
    """The reference LoRA linear on the layer's tensors (cast to dtype, on the CPU), x (..., in)."""
    cast = [t.detach().cpu().to(dtype).requires_grad_(t.requires_grad) for t in
            (x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias)]
    weight = layer.base_layer.weight.detach().cpu().to(dtype)
    out = reference.lora_linear(cast[0].reshape(-1, layer.in_features), weight, cast[1], cast[2], layer.scale,
                                bias=cast[3], upcast=upcast)
    return out.reshape(*x.shape[:-1], layer.out_features), cast


# -- keys, init, PEFT's names --------------------------------------------------------------------

def test_keys_shapes_and_peft_init():
    base = nn.Linear(48, 24)
    layer = lora.LoRALinear(base, 16, 8.0)
    assert list(layer.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"]
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert a.shape == (16, 48) and b.shape == (24, 16)
    # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), so std 1/sqrt(3 in); B zero
    bound = 48 ** -0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert torch.equal(b, torch.zeros_like(b))
    assert layer.scale == 0.5 and lora.LoRALinear(nn.Linear(48, 24), 16, 8.0, rslora=True).scale == 2.0


def test_peft_state_dict_round_trip():
    model = tiny_with_lora(seed=1)
    peft = lora.peft_state_dict(model)
    # PEFT's in-memory keys (LoraLayer: base_layer, lora_A / lora_B as ModuleDicts keyed by the adapter)
    expected = {"head.weight", "head.bias"}
    for i in (0, 1):
        expected |= {f"layers.{i}.norm.weight", f"layers.{i}.norm.bias",
                     f"layers.{i}.self_attn.k_proj.weight", f"layers.{i}.self_attn.k_proj.bias"}
    for name in TARGETS:
        expected |= {f"{name}.base_layer.weight", f"{name}.base_layer.bias",
                     f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"}
    assert set(peft) == expected
    own = model.state_dict()
    assert peft["layers.1.self_attn.v_proj.lora_B.default.weight"].data_ptr() == \
        own["layers.1.self_attn.v_proj.lora_B.weight"].data_ptr()
    assert set(lora.peft_state_dict(model, "chat")) == {k.replace(".default.", ".chat.") for k in expected}

    other = tiny_with_lora(seed=2)
    result = lora.load_peft_state_dict(other, {"base_model.model." + k: v for k, v in peft.items()})
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key

    # a saved adapter: only the LoRA weights, no adapter name, PeftModel's prefix; strict=False
    saved = {f"base_model.model.{name}.lora_{m}.weight": torch.randn_like(own[f"{name}.lora_{m}.weight"])
             for name in TARGETS for m in "AB"}
    result = lora.load_peft_state_dict(other, saved, strict=False)
    assert not result.unexpected_keys and len(result.missing_keys) == len(expected) - len(saved)
    for key, value in saved.items():
        assert torch.equal(other.state_dict()[key[len("base_model.model."):]], value), key

    # another adapter's keys are not this adapter's
    with pytest.raises(RuntimeError, match=r"Unexpected key.*lora_A\.chat\.weight"):
        lora.load_peft_state_dict(other, lora.peft_state_dict(model, "chat"))


# -- merge ---------------------------------------------------------------------------------------

def unit_in_the_last_place(t: torch.Tensor) -> torch.Tensor:
    """One ulp of each element of t (normal numbers) in t's dtype, as float64."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[t.dtype]
    _, exponent = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_then_unmerge_restores_the_base_weight(dtype):
    """merge rounds w + d once (error e, |e| <= ulp(merged) / 2), so unmerge can give back w only
    within 2|e| <= 1 ulp of the merged element (reference.merge's docstring). Measured over 20 seeds
    at this shape: at most 0.5 ulp (bf16), 1.0 ulp (fp16, float32); 77-81% of elements exact."""
    for seed in range(3):
        layer = layer_case(72, 40, 8, dtype, "cpu", seed)
        weight = layer.base_layer.weight
        original, address = weight.detach().clone(), weight.data_ptr()
        layer.merge()
        merged = weight.detach().clone()
        assert layer.merged and torch.equal(merged, reference.merge(original, layer.lora_A.weight.detach(),
                                                                   layer.lora_B.weight.detach(), layer.scale))
        assert (merged != original).float().mean() > 0.9   # the adapter is not negligible
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
        assert not layer.merged and layer.base_layer.weight.data_ptr() == address   # in place
        error = (weight.detach().double() - original.double()).abs() / unit_in_the_last_place(merged)
        assert error.max() <= 1.0, f"seed {seed}: {error.max().item()} ulp"
        assert (error == 0).float().mean() > 0.5
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()


def test_merged_forward_matches_the_unmerged_forward(device):
    """bf16: both forwards under the parity rule against the float64 reference (merged, the error
    was at most 1.07x the PEFT composition's over 20 seeds)."""
    layer = layer_case(72, 40, 8, torch.bfloat16, device, seed=11)
    x = randn((3, 11, 72), dtype=torch.bfloat16, seed=12).to(device)
    oracle, _ = reference_out(layer, x, torch.float64, True)
    same, _ = reference_out(layer, x, torch.bfloat16, False)
    base_only = torch.nn.functional.linear(x.cpu().double(), layer.base_layer.weight.cpu().double(),
                                           layer.base_layer.bias.cpu().double())
    assert (oracle - base_only).abs().max() > 1   # the adapter's term is far above the tolerance
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert merged.shape == unmerged.shape == (3, 11, 40) and merged.dtype == torch.bfloat16
    assert_parity(unmerged.cpu(), same, oracle, "unmerged")
    assert_parity(merged.cpu(), same, oracle, "merged")


# -- forward and gradients -----------------------------------------------------------------------

def test_forward_and_gradients_match_the_reference(device):
    """x (2, 19, 72) bf16, r = 8, the base bias made trainable: output and the gradients of x, A, B
    and the bias under the parity rule; the base weight gets none."""
    layer = layer_case(72, 40, 8, torch.bfloat16, device, seed=21)
    layer.base_layer.bias.requires_grad_()
    x = randn((2, 19, 72), dtype=torch.bfloat16, seed=22).to(device).requires_grad_()
    out = layer(x)
    dy = randn(out.shape, dtype=torch.bfloat16, seed=23).to(device)
    out.backward(dy)
    oracle, oracle_leaves = reference_out(layer, x, torch.float64, True)
    same, same_leaves = reference_out(layer, x, torch.bfloat16, False)
    assert out.shape == (2, 19, 40) and out.dtype == torch.bfloat16
    assert_parity(out.detach().cpu(), same.detach(), oracle.detach(), "out")
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, dy.cpu().double())
    same_grads = torch.autograd.grad(same, same_leaves, dy.cpu())
    got = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.base_layer.bias.grad)
    for label, grad, want_same, want in zip(("dx", "dA", "dB", "d bias"), got, same_grads, oracle_grads):
        assert grad is not None and grad.dtype == torch.bfloat16, label
        assert_parity(grad.cpu(), want_same, want, label)
    assert layer.base_layer.weight.grad is None


# -- add_lora_ -----------------------------------------------------------------------------------

def test_add_lora_wraps_the_targets_and_freezes_the_rest():
    torch.manual_seed(0)
    model = Tiny()
    q_proj = model.layers[0].self_attn.q_proj
    x = torch.randn(5, 16)
    before = model(x).detach()
    assert lora.add_lora_(model, ["q_proj", "v_proj"], 4, 8.0) is model
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear))
    assert wrapped == sorted(TARGETS)
    assert model.layers[0].self_attn.q_proj.base_layer is q_proj
    assert type(model.layers[0].self_attn.k_proj) is nn.Linear and type(model.head) is nn.Linear
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{name}.lora_{m}.weight" for name in TARGETS for m in "AB")
    torch.testing.assert_close(model(x), before)   # B = 0: the model is unchanged

    model = lora.add_lora_(Tiny(), ["self_attn.k_proj", "head"], 2, 2.0)   # PEFT's suffix match
    assert sorted(name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)) == \
        ["head", "layers.0.self_attn.k_proj", "layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match=r"target_modules \['head'\] matched no torch.nn.Linear"):
        lora.add_lora_(model, ["head"], 2, 2.0)   # already wrapped
    with pytest.raises(ValueError, match="matched no torch.nn.Linear"):
        lora.add_lora_(model, ["lora_A", "base_layer"], 2, 2.0)   # a LoRALinear's own Linears


def test_add_lora_leaves_the_model_unchanged_when_a_target_is_refused():
    model = Tiny(head=12)   # head's out_features 12: not a multiple of 8
    with pytest.raises(ValueError, match="base must have in_features and out_features multiples of 8"):
        lora.add_lora_(model, ["q_proj", "head"], 4, 8.0)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


# -- training ------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


def test_adam_steps_fit_a_low_rank_change():
    """A frozen random MLP learns, through rank-4 adapters on both layers, a teacher that differs from
    it by a rank-4 change of each weight: 40 Adam steps (lr 3e-2) cut the loss at least 5x (the
    smallest cut over 40 seeds was 14x; median 50x). The base weights do not move."""
    torch.manual_seed(0)
    student, teacher = MLP(), MLP()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for layer in (teacher.up_proj, teacher.down_proj):
            n, k = layer.weight.shape
            layer.weight += 0.5 * torch.randn(n, 4) @ torch.randn(4, k) / math.sqrt(4 * k)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = teacher(x)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    model = lora.add_lora_(student, ["up_proj", "down_proj"], 4, 8.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = None
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = torch.nn.functional.mse_loss(model(x), y).item()
    assert last * 5 < first, f"loss {first:.3e} -> {last:.3e}"
    for key, value in base.items():
        name, _, kind = key.rpartition(".")
        assert torch.equal(model.get_submodule(name).base_layer.state_dict()[kind], value), key


# -- bad arguments -------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    base = nn.Linear(16, 8)
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear or an llmkernels.quant.Int4Linear; got Conv1d"):
        lora.LoRALinear(nn.Conv1d(16, 8, 1), 4, 8.0)
    with pytest.raises(ValueError, match="base must have in_features and out_features multiples of 8; got "
                                         "in_features=12, out_features=8"):
        lora.LoRALinear(nn.Linear(12, 8), 4, 8.0)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 257\); got 0"):
        lora.LoRALinear(base, 0, 8.0)
    with pytest.raises(TypeError, match="r must be an int; got float"):
        lora.LoRALinear(base, 4.0, 8.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        lora.LoRALinear(base, 4, float("inf"))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got 1.0"):
        lora.LoRALinear(base, 4, 8.0, dropout=1.0)
    with pytest.raises(TypeError, match="rslora must be a bool; got str"):
        lora.LoRALinear(base, 4, 8.0, rslora="yes")
    assert base.weight.requires_grad   # refused before freezing anything
    layer = lora.LoRALinear(base, 4, 8.0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=16\); got \(3, 8\)"):
        layer(torch.randn(3, 8))
    with pytest.raises(TypeError, match="x must have the layer's dtype torch.float32; got torch.float64"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="target_modules must be a list of non-empty module names"):
        lora.add_lora_(Tiny(), "q_proj", 4, 8.0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lora.add_lora_({"q_proj": base}, ["q_proj"], 4, 8.0)
    with pytest.raises(ValueError, match=r"target_modules \['o_proj'\] matched no torch.nn.Linear"):
        lora.add_lora_(Tiny(), ["o_proj"], 4, 8.0)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty name without dots"):
        lora.peft_state_dict(layer, "a.b")


def test_lora_linear_layer_dropout_in_training_mode_only():
    """dropout > 0 drops LoRA's input in training mode (a seed drawn from torch's CPU generator: the
    same after the same manual_seed) and not in eval mode, where the layer is lora_linear without it."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 16), 8, 16.0, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)
    layer.eval()
    plain = lora.lora_linear(x, layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scale,
                             bias=layer.base_layer.bias)
    assert torch.equal(layer(x), plain) and not torch.equal(first, plain)


def test_lora_linear_layer_on_an_int4_base(device):
    """QLoRA: LoRALinear over an Int4Linear equals lora_linear with its Int4Weight (the same kernels),
    trains its adapter (gradients flow to lora_A and lora_B only), refuses merge, and add_lora_ wraps
    Int4Linears too."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    base = quant.Int4Linear.from_linear(linear, group_size=32).to(device)
    layer = lora.LoRALinear(base, 8, 16.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.lora_A.weight.device.type == device.type
    x = torch.randn(5, 64, dtype=torch.bfloat16).to(device)
    out = layer(x)
    expected = lora.lora_linear(x, base.quantized_weight(), layer.lora_A.weight, layer.lora_B.weight, layer.scale,
                                bias=base.bias)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    with pytest.raises(TypeError, match="cannot absorb the adapter exactly"):
        layer.merge()
    model = torch.nn.Sequential(quant.Int4Linear.from_linear(linear, group_size=32))
    lora.add_lora_(model, ["0"], 8, 16.0)
    assert isinstance(model[0], lora.LoRALinear) and isinstance(model[0].base_layer, quant.Int4Linear)
