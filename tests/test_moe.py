"""Mixture-of-Experts kernels (CPU, the CUDA kernels emulated, CUDA) against llmkernels.reference.moe:
the router (the same experts in the same order exactly, ties included; weights and logsumexp under
the parity rule; counts exactly), the permutation (exactly), the experts' FFN forward and its four
gradients (parity rule), the ops' argument checks, opcheck and torch.compile, the launch sequence with
no host synchronization, CUDA-graph capture (GPU)."""
import contextlib

import pytest
import torch

import llmkernels
from llmkernels import moe
from llmkernels.reference import moe as reference

from helpers import assert_parity, generator, randn


def check_route(logits, top_k, device, *, renormalize=True, scoring="softmax", name=""):
    weights, ids, stats = moe.route(logits.to(device), top_k, renormalize=renormalize, scoring=scoring)
    expected_weights, expected_ids, expected = reference.route(logits, top_k, renormalize=renormalize, scoring=scoring)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), expected_ids), name
    assert torch.equal(stats.tokens_per_expert.cpu(), expected.tokens_per_expert), name
    # float32 against the float64 computation of the same selection; torch's own float32 error as the baseline
    oracle_weights, _, oracle = reference.route(logits.double(), top_k, renormalize=renormalize, scoring=scoring)
    assert_parity(weights.cpu(), expected_weights, oracle_weights, f"{name} weights")
    assert_parity(stats.router_logsumexp.cpu(), expected.router_logsumexp, oracle.router_logsumexp, f"{name} lse")


@pytest.mark.parametrize("experts, top_k", [(8, 2), (8, 1), (128, 8), (256, 8), (1000, 3), (5, 5), (1, 1)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_the_reference(device, experts, top_k, scoring):
    for tokens in (1, 37):
        logits = randn((tokens, experts), seed=experts + tokens)
        check_route(logits, top_k, device, scoring=scoring, name=f"T={tokens} E={experts} k={top_k}")
        check_route(logits, top_k, device, scoring=scoring, renormalize=False, name="not renormalized")


def test_route_ties_skewed_and_16bit_logits(device):
    """Equal logits (lower index first), a Zipf-like skew that sends most tokens to a few experts,
    experts nobody picks, bf16 and fp16 logits."""
    tied = torch.randint(0, 3, (64, 40), generator=generator(3)).float()
    for top_k in (1, 5, 17, 40):
        check_route(tied, top_k, device, name=f"ties k={top_k}")
    skew = torch.log(1.0 / torch.arange(1, 65).float())[None, :] * 4 + randn((50, 64), seed=4) * 0.1
    check_route(skew, 8, device, name="zipf")
    for dtype in (torch.bfloat16, torch.float16):
        check_route(randn((20, 16), seed=5).to(dtype), 4, device, name=str(dtype))


def test_route_nan_logits_sort_last(device):
    """NaN logits rank after every number and among themselves by index (a total order: the CUDA
    kernel's warp arg-max converges), so a row with fewer numbers than k still picks k distinct experts."""
    nan = float("nan")
    logits = torch.tensor([[nan] * 8, [nan, nan, 1.0, 2.0] + [nan] * 4])
    _, ids, stats = moe.route(logits.to(device), 4)
    assert ids.cpu().tolist() == [[0, 1, 2, 3], [3, 2, 0, 1]]
    assert stats.tokens_per_expert.cpu().tolist() == [2, 2, 2, 2, 0, 0, 0, 0]


def test_route_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 8\]"):
        moe.route(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="scoring must be one of"):
        moe.route(torch.randn(4, 8), 2, scoring="relu")
    with pytest.raises(TypeError, match="router_logits must be float32, bfloat16 or float16"):
        moe.route(torch.randn(4, 8).double(), 2)
    with pytest.raises(ValueError, match="1 to 1024 experts"):
        moe.route(torch.randn(4, 1025), 2)


@pytest.mark.emu
def test_emulated_route_launches_without_reports():
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=2):
        weights, ids, stats = moe.route(randn((19, 40), seed=6), 6)
    kernels = {r["kernel"]: r["launches"] for r in llmkernels.emulator.report()}
    assert kernels == {"route zero counts": 1, "route": 1}, kernels
    assert int(stats.tokens_per_expert.sum()) == 19 * 6


def test_opcheck_route():
    torch.library.opcheck(torch.ops.llmkernels.moe_route.default, (randn((5, 8), seed=7), 2, True, 0))


# -- the block-sparse permutation ------------------------------------------------------------------

def check_permute(expert_ids, experts, block, device, name=""):
    got = moe.permute(expert_ids.to(device), experts, block)
    expected = reference.permutation(expert_ids, experts, block, worst_case=True)
    for field in ("expert_offsets", "row_token", "row_slot", "block_expert", "slot_row"):
        assert torch.equal(getattr(got, field).cpu(), getattr(expected, field)), f"{name}: {field}"


@pytest.mark.parametrize("block", [1, 16, 64])
def test_permute_matches_the_reference(device, block):
    """Uniform, Zipf-skewed, all to one expert, experts with no tokens, T = 1, T not a multiple of the
    block, k = 1, 2, 8, and more pairs than one CUDA chunk (256) so chunk prefixes and warps both count."""
    g = generator(block)
    cases = {
        "uniform": torch.randint(0, 8, (300, 2), generator=g),
        "one expert": torch.full((37, 2), 5),
        "t=1 k=8": torch.randperm(64, generator=g)[:8][None, :],
        "k=1 empty experts": torch.randint(0, 3, (70, 1), generator=g) * 7,
        "zipf k=8": torch.multinomial(1.0 / torch.arange(1, 129).float(), 8 * 97, replacement=True,
                                      generator=g).reshape(97, 8),
    }
    for name, ids in cases.items():
        experts = 128 if name.startswith(("zipf", "t=1")) else 22 if name.startswith("k=1") else 8
        check_permute(ids.to(torch.int32), experts, block, device, f"{name} block {block}")


def test_permute_refuses_expert_ids_out_of_range():
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 8\) \(the number of experts\); got 8 at \(1, 0\)"):
        moe.permute(torch.tensor([[0, 1], [8, 2]], dtype=torch.int32), 8, 4)
    with pytest.raises(ValueError, match=r"got -1"):
        moe.permute(torch.tensor([[0, -1]], dtype=torch.int32), 8, 4)
    with pytest.raises(TypeError, match="expert_ids must be a 2-D int32 or int64 tensor"):
        moe.permute(torch.zeros(4, 2), 8, 4)


@pytest.mark.emu
def test_emulated_permute_launches_four_kernels_without_reports():
    ids = torch.randint(0, 16, (300, 2), generator=generator(9), dtype=torch.int32)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=4):
        moe.permute(ids, 16, 32)
    kernels = {r["kernel"]: r["launches"] for r in llmkernels.emulator.report()}
    assert kernels == {"permute count": 1, "permute offsets": 1, "permute place": 1, "permute pad": 1}, kernels


def test_opcheck_permute():
    ids = torch.randint(0, 8, (5, 2), generator=generator(8), dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkernels.moe_permute.default, (ids, 8, 4))


# -- the experts' FFN (forward) ------------------------------------------------------------------------

def moe_case(tokens, hidden, ffn, experts, top_k, dtype, device, seed, activation="swiglu", ids=None):
    g = generator(seed)
    x = randn((tokens, hidden), dtype=dtype, seed=seed)
    up_rows = 2 * ffn if activation == "swiglu" else ffn
    w_gate_up = (torch.randn(experts, up_rows, hidden, generator=g) * hidden ** -0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, ffn, generator=g) * ffn ** -0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    return [t.to(device) for t in (x, w_gate_up, w_down, weights, ids.to(torch.int32))]


def check_moe_ffn(x, w_gate_up, w_down, weights, ids, activation, name):
    out = moe.moe_ffn(x, w_gate_up, w_down, weights, ids, activation=activation)
    args = [t.cpu() for t in (x, w_gate_up, w_down, weights, ids)]
    oracle = reference.moe_ffn(*args, activation=activation, compute_dtype=torch.float64, out_dtype=torch.float64)
    same = reference.moe_ffn(*args, activation=activation, upcast=False)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_parity(out.cpu(), same, oracle, name)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens, experts, top_k", [(1, 8, 2), (37, 8, 2), (70, 4, 1), (9, 16, 8)])
def test_moe_ffn_matches_the_reference(device, activation, tokens, experts, top_k):
    """Odd hidden/ffn sizes (multiples of 8), T not a multiple of the block, top_k 1, 2, 8."""
    case = moe_case(tokens, 40, 24, experts, top_k, torch.bfloat16, device, seed=tokens + experts, activation=activation)
    check_moe_ffn(*case, activation, f"T={tokens} E={experts} k={top_k} {activation}")


def test_moe_ffn_skewed_routings(device):
    """All tokens to one expert (more rows than a block), experts with no tokens, fp16."""
    one = torch.stack([torch.tensor([3, 0])] * 70)
    check_moe_ffn(*moe_case(70, 48, 16, 6, 2, torch.float16, device, seed=5, ids=one), "swiglu", "one expert")
    sparse = torch.randint(0, 2, (30, 2), generator=generator(6)) * 5    # experts 0 and 5 of 8 only
    sparse[:, 1] = 5 - sparse[:, 0]
    check_moe_ffn(*moe_case(30, 48, 16, 8, 2, torch.bfloat16, device, seed=6, ids=sparse), "swiglu", "empty experts")


def test_moe_ffn_refuses_bad_inputs():
    x, w1, w2, weights, ids = moe_case(4, 16, 8, 4, 2, torch.bfloat16, "cpu", seed=1)
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 4\)"):
        moe.moe_ffn(x, w1, w2, weights, ids + 3)
    with pytest.raises(ValueError, match=r"w_gate_up must be \(4, 16, 16\)"):
        moe.moe_ffn(x, w1[:3], w2, weights, ids)
    with pytest.raises(TypeError, match="must have x's dtype"):
        moe.moe_ffn(x, w1.float(), w2, weights, ids)


@pytest.mark.emu
def test_emulated_moe_ffn_launches_without_device_to_host_copies_or_bank_conflicts():
    """The forward's launch sequence under the emulator: the permutation's four kernels and two grouped
    GEMMs, no host synchronization needed (everything sized by the worst case), no bank conflicts."""
    case = moe_case(37, 40, 24, 8, 2, torch.bfloat16, "cpu", seed=3)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=1):
        moe.moe_ffn(*case)
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert reports["moe grouped gemm"]["launches"] == 2
    assert reports["moe grouped gemm"]["bank_conflicts_by_site"] == {}


def test_moe_ffn_with_no_tokens(device):
    x, w1, w2, weights, ids = moe_case(0, 16, 8, 4, 2, torch.bfloat16, device, seed=9,
                                       ids=torch.zeros(0, 2, dtype=torch.int32))
    leaves = [t.requires_grad_() for t in (x, w1, w2, weights)]
    out = moe.moe_ffn(*leaves, ids)
    assert out.shape == (0, 16)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("device_name", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_moe_ffn_past_65536_tokens(device_name):
    """No 16-bit limit anywhere: 70000 tokens (140000 rows), forward and backward against the reference."""
    ids = torch.randint(0, 4, (70000, 2), generator=generator(10))
    ids[:, 1] = (ids[:, 0] + 1) % 4
    case = moe_case(70000, 16, 8, 4, 2, torch.bfloat16, device_name, seed=10, ids=ids)
    check_moe_ffn(*case, "swiglu", "70000 tokens")
    check_moe_ffn_grads(*case, "swiglu", "70000 tokens")


@pytest.mark.cuda
def test_cuda_graph_capture_replays_forward_and_backward():
    """A training step's MoE part (route, forward, backward) has no host synchronization, so it
    captures in a CUDA graph; a replay on new logits and a new dout gives the eager gradients."""
    x, w_gate_up, w_down, _, _ = moe_case(37, 40, 24, 8, 2, torch.bfloat16, "cuda", seed=14)
    logits = randn((37, 8), seed=15).cuda()
    dout = randn((37, 40), dtype=torch.bfloat16, seed=16).cuda()
    leaves = [t.requires_grad_() for t in (x, w_gate_up, w_down, logits)]

    def step():
        weights, ids, _ = moe.route(leaves[3], 2)
        out = moe.moe_ffn(*leaves[:3], weights, ids)
        return torch.autograd.grad(out, leaves, dout)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()   # warm-up outside the capture, on a side stream (autograd's requirement)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        logits.copy_(randn((37, 8), seed=17).cuda())
        dout.copy_(randn((37, 40), dtype=torch.bfloat16, seed=18).cuda())
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, step()):
        assert torch.equal(got, expected)


@pytest.mark.cuda
def test_cuda_graph_capture_replays_routing_and_forward():
    """Routing, permutation and the FFN forward launch with no host synchronization, so they capture
    in a CUDA graph; a replay on new logits gives the eager result."""
    x, w_gate_up, w_down, _, _ = moe_case(37, 40, 24, 8, 2, torch.bfloat16, "cuda", seed=11)
    logits = randn((37, 8), seed=12).cuda()

    def step():
        weights, ids, _ = moe.route(logits, 2)
        return moe.moe_ffn(x, w_gate_up, w_down, weights, ids)

    with torch.no_grad():
        step()   # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        logits.copy_(randn((37, 8), seed=13).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, step())


def test_opcheck_grouped_gemm_and_compile_of_the_forward():
    x, w_gate_up, w_down, weights, ids = moe_case(9, 16, 8, 4, 2, torch.bfloat16, "cpu", seed=21)
    perm = moe.permute(ids, 4, moe.BLOCK)
    rows = perm.row_token.shape[0]
    for save_pre in (False, True):
        torch.library.opcheck(torch.ops.llmkernels.moe_grouped_gemm.default,
                              (x, perm.row_token, w_gate_up, perm.block_expert, moe.BLOCK, None, 3, False, save_pre,
                               rows, torch.bfloat16))
    with torch.no_grad():
        compiled = torch.compile(lambda *a: moe.moe_ffn(*a), fullgraph=True)
        assert torch.equal(compiled(x, w_gate_up, w_down, weights, ids), moe.moe_ffn(x, w_gate_up, w_down, weights, ids))


# -- the experts' FFN (backward) -----------------------------------------------------------------------

def check_moe_ffn_grads(x, w_gate_up, w_down, weights, ids, activation, name):
    """Gradients of x, both weights and the routing weights for a random dout, against the reference's
    autograd: in float64 from the same values (the oracle) and in x's dtype (torch's own error)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    out = moe.moe_ffn(*leaves, ids, activation=activation)
    dout = randn(out.shape, dtype=out.dtype, seed=out.shape[0] + 100).to(out.device)
    grads = torch.autograd.grad(out, leaves, dout)
    cpu = [t.detach().cpu() for t in (x, w_gate_up, w_down, weights)]
    ids, dout = ids.cpu(), dout.cpu()
    oracle_leaves = [t.double().requires_grad_() for t in cpu]
    oracle = torch.autograd.grad(reference.moe_ffn(*oracle_leaves, ids, activation=activation), oracle_leaves,
                                 dout.double())
    same_leaves = [t.clone().requires_grad_() for t in cpu]
    same = torch.autograd.grad(reference.moe_ffn(*same_leaves, ids, activation=activation, upcast=False),
                               same_leaves, dout)
    for label, got, leaf, expected, exact in zip(("dx", "dw_gate_up", "dw_down", "dweights"), grads, leaves, same,
                                                 oracle):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, f"{name} {label}"
        assert_parity(got.cpu(), expected, exact, f"{name} {label}")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens, experts, top_k", [(1, 8, 2), (37, 8, 2), (70, 4, 1), (9, 16, 8)])
def test_moe_ffn_gradients_match_the_reference(device, activation, tokens, experts, top_k):
    case = moe_case(tokens, 40, 24, experts, top_k, torch.bfloat16, device, seed=tokens + experts, activation=activation)
    check_moe_ffn_grads(*case, activation, f"T={tokens} E={experts} k={top_k} {activation}")


def test_moe_ffn_gradients_on_skewed_routings(device):
    """Zipf-skewed routing (a few experts take most pairs), all tokens to one expert (its rows span two
    blocks: the weight gradient's k range crosses a block), experts with no tokens (zero weight
    gradients), fp16."""
    zipf = torch.multinomial(1.0 / torch.arange(1, 17).float(), 97 * 8, replacement=True, generator=generator(7))
    zipf = zipf.reshape(97, 8)
    check_moe_ffn_grads(*moe_case(97, 40, 24, 16, 8, torch.bfloat16, device, seed=7, ids=zipf), "swiglu", "zipf")
    one = torch.stack([torch.tensor([3, 0])] * 70)
    check_moe_ffn_grads(*moe_case(70, 48, 16, 6, 2, torch.float16, device, seed=5, ids=one), "swiglu", "one expert")
    sparse = torch.randint(0, 2, (30, 2), generator=generator(6)) * 5
    sparse[:, 1] = 5 - sparse[:, 0]
    case = moe_case(30, 48, 16, 8, 2, torch.bfloat16, device, seed=6, ids=sparse)
    check_moe_ffn_grads(*case, "swiglu", "empty experts")
    leaves = [t.detach().clone().requires_grad_() for t in case[:4]]
    moe.moe_ffn(*leaves, case[4]).float().square().sum().backward()
    unused = [e for e in range(8) if e not in (0, 5)]
    assert not leaves[1].grad[unused].any() and not leaves[2].grad[unused].any()
    assert leaves[1].grad[[0, 5]].abs().sum(dim=(1, 2)).min() > 0


def test_moe_ffn_partial_gradients_and_float32_on_the_cpu():
    """Only some inputs requiring grad (the others get none), and the CPU kernel's float32."""
    x, w1, w2, weights, ids = moe_case(21, 32, 16, 4, 2, torch.float32, "cpu", seed=8)
    w1.requires_grad_()
    out = moe.moe_ffn(x, w1, w2, weights, ids)
    (grad,) = torch.autograd.grad(out.sum(), [w1])
    w1_ref = w1.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.moe_ffn(x.double(), w1_ref, w2.double(), weights.double(), ids).sum(),
                                      [w1_ref])
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_weight_grad_refuses_bad_inputs():
    a = torch.zeros(64, 16, dtype=torch.bfloat16)
    out = lambda e: torch.empty(e, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expert_offsets must be non-decreasing"):
        C_weight_grad(a, None, a[:, :8], None, torch.tensor([0, 32, 16], dtype=torch.int32), out(2))
    with pytest.raises(ValueError, match=r"expert_offsets must run from 0 to at most 64"):
        C_weight_grad(a, None, a[:, :8], None, torch.tensor([0, 65], dtype=torch.int32), out(1))
    with pytest.raises(ValueError, match=r"b_rows must be -1 or a row of b in \[0, 64\); got 64"):
        C_weight_grad(a, None, a[:, :8], torch.full((64,), 64, dtype=torch.int32),
                      torch.tensor([0, 64], dtype=torch.int32), out(1))
    with pytest.raises(ValueError, match=r"the rows of a \(64\) and b \(32\)"):
        C_weight_grad(a, None, a[:32, :8], None, torch.tensor([0, 64], dtype=torch.int32), out(1))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_outputs_are_written_everywhere(device, activation):
    """The grouped GEMM (with and without the saved pre-activation) and the backward's dZ kernel write
    every row of their outputs (zeros past the last expert and on padding rows), so the Python layer
    allocates them without a memset: outputs filled with NaN first come back finite, with zeros on
    every padding row."""
    from llmkernels._ext import C
    from llmkernels._ops import capsule, stream_handle
    x, w1, w2, weights, ids = moe_case(37, 40, 24, 8, 2, torch.bfloat16, device, seed=30, activation=activation)
    perm = moe.permute(ids, 8, moe.BLOCK)
    rows, stream, code = perm.row_token.shape[0], stream_handle(x.device), moe._ACTIVATION_CODES[activation]
    pre_columns = w1.shape[1]
    padding = (perm.row_token < 0).cpu()
    assert (perm.block_expert < 0).any(), "the case must have blocks past the last expert"
    nan = lambda *shape, dtype=torch.bfloat16: torch.full(shape, float("nan"), dtype=dtype, device=x.device)
    for code_, columns, dtype, save_pre in ((code, 24, torch.bfloat16, True), (0, pre_columns, torch.float32, False)):
        out, pre = nan(rows, columns, dtype=dtype), nan(rows, pre_columns)
        C.moe_grouped_gemm(capsule(x), capsule(perm.row_token), capsule(w1), capsule(perm.block_expert), moe.BLOCK,
                           None, code_, False, save_pre, rows, None, capsule(out), capsule(pre), stream)
        for written in (out, pre) if save_pre else (out,):
            assert torch.isfinite(written).all() and not written.cpu()[padding].any(), code_
    pre, row_weight = randn((rows, pre_columns), dtype=torch.bfloat16, seed=31).to(x.device), torch.rand(rows).to(x.device)
    pre[padding.to(x.device)] = 0
    row_weight[padding.to(x.device)] = 0
    outputs = nan(rows, pre_columns), nan(rows, 24), nan(rows, moe._DOWN_WARPS, dtype=torch.float32)
    C.moe_down_backward(capsule(x), capsule(perm.row_token), capsule(w2), capsule(perm.block_expert), capsule(pre),
                        capsule(row_weight), code, *map(capsule, outputs), stream)
    for out in outputs:
        assert torch.isfinite(out).all() and not out.cpu()[padding].any()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_gemm_saves_the_pre_activation(device, activation):
    """The forward's first GEMM with save_pre: h as without it, and the pre-activation x[token] ·
    W_gate_up[e]ᵀ rounded once (float64 products as the oracle; within one rounding of them), swiglu's
    (g, u) pairs interleaved on every backend."""
    x, w1, _, _, ids = moe_case(37, 40, 24, 8, 2, torch.bfloat16, device, seed=32, activation=activation)
    perm = moe.permute(ids, 8, moe.BLOCK)
    rows, code = perm.row_token.shape[0], moe._ACTIVATION_CODES[activation]
    h, pre = moe._grouped_gemm_op(x, perm.row_token, w1, perm.block_expert, moe.BLOCK, None, code, False, True, rows,
                                  x.dtype)
    assert torch.equal(h, moe._grouped_gemm(x, perm.row_token, w1, perm.block_expert, moe.BLOCK, None, code, False,
                                            rows, x.dtype))
    token, block_expert = perm.row_token.cpu().long(), perm.block_expert.cpu().long()
    expert = block_expert.repeat_interleave(moe.BLOCK)[:rows].clamp(min=0)
    expected = torch.einsum("rk,rnk->rn", x.cpu().double()[token.clamp(min=0)], w1.cpu().double()[expert])
    expected[token < 0] = 0
    if activation == "swiglu":
        expected = torch.stack(expected.chunk(2, dim=1), dim=2).reshape(rows, -1)
    torch.testing.assert_close(pre.cpu().double(), expected, rtol=2 ** -8, atol=1e-6)


def test_forward_and_backward_on_different_backends():
    """One layout everywhere: a forward on the CPU kernels and its backward emulated, or the other way
    round, give the gradients of an all-CPU step (up to the kernels' summation order)."""
    case = moe_case(37, 40, 24, 8, 2, torch.bfloat16, "cpu", seed=33)
    dout = randn((37, 40), dtype=torch.bfloat16, seed=34)

    def grads(forward_emulated, backward_emulated):
        backend = lambda emulated: llmkernels.emulator.emulate() if emulated else contextlib.nullcontext()
        leaves = [t.detach().clone().requires_grad_() for t in case[:4]]
        with backend(forward_emulated):
            out = moe.moe_ffn(*leaves, case[4])
        with backend(backward_emulated):
            return torch.autograd.grad(out, leaves, dout)

    expected = grads(False, False)
    for mixed in (grads(True, False), grads(False, True)):
        for got, want in zip(mixed, expected):
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -9 * float(want.abs().max()))


def test_moe_ffn_saves_nothing_without_a_gradient_to_come():
    """Under no_grad, parameters that require grad (evaluation of a trained layer) take the inference
    forward: the first grouped GEMM without the saved pre-activation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SavePre(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "moe_grouped_gemm":
                SavePre.seen.append(args[8])
            return func(*args, **(kwargs or {}))

    x, w1, w2, weights, ids = moe_case(9, 16, 8, 4, 2, torch.bfloat16, "cpu", seed=35)
    w1.requires_grad_()
    with torch.no_grad(), SavePre():
        moe.moe_ffn(x, w1, w2, weights, ids)
    with SavePre():
        moe.moe_ffn(x, w1, w2, weights, ids)
    assert SavePre.seen == [False, False, True, False], SavePre.seen


def test_backward_ops_refuse_bad_inputs():
    x, w1, w2, weights, ids = moe_case(9, 16, 8, 4, 2, torch.bfloat16, "cpu", seed=36)
    perm = moe.permute(ids, 4, moe.BLOCK)
    rows = perm.row_token.shape[0]
    pre, row_weight = torch.zeros(rows, 16, dtype=torch.bfloat16), torch.zeros(rows)
    with pytest.raises(ValueError, match="swiglu takes stacked .* not k-major"):
        moe._grouped_gemm(x, perm.row_token, w1.transpose(1, 2).contiguous(), perm.block_expert, moe.BLOCK, None, 3,
                          True, rows, x.dtype)
    with pytest.raises(ValueError, match=r"pre \(the saved pre-activation\) goes with swiglu or gelu"):
        moe._grouped_gemm_op(x, perm.row_token, w1, perm.block_expert, moe.BLOCK, None, 0, False, True, rows, x.dtype)
    with pytest.raises(ValueError, match=r"pre \(the saved pre-activation\)"):
        moe._grouped_gemm_op(x, perm.row_token, w1, perm.block_expert, moe.BLOCK, None, 3, False, True, rows,
                             torch.float32)
    bad_blocks = perm.block_expert.clone()
    bad_blocks[0] = 4
    with pytest.raises(ValueError, match=r"block_expert must be in \[-1, 4\); got 4"):
        moe._down_backward(x, perm.row_token, w2, bad_blocks, pre, row_weight, 3)
    bad_rows = perm.row_token.clone()
    bad_rows[0] = 9
    with pytest.raises(ValueError, match=r"row_token must be -1 or a row of dout in \[0, 9\); got 9"):
        moe._down_backward(x, bad_rows, w2, perm.block_expert, pre, row_weight, 3)
    with pytest.raises(ValueError, match=r"pre must have shape"):
        moe._down_backward(x, perm.row_token, w2, perm.block_expert, pre[:, :8], row_weight, 3)
    with llmkernels.emulator.emulate():   # the CUDA kernel's k tiles: whole 64-row blocks
        with pytest.raises(ValueError, match="expert_offsets must be non-decreasing multiples of 64; got 100"):
            C_weight_grad(torch.zeros(128, 16, dtype=torch.bfloat16), None, torch.zeros(128, 8, dtype=torch.bfloat16),
                          None, torch.tensor([0, 64, 100], dtype=torch.int32),
                          torch.empty(2, 16, 8, dtype=torch.bfloat16))


def C_weight_grad(a, a_rows, b, b_rows, offsets, out):
    from llmkernels._ext import C
    from llmkernels._ops import capsule
    C.moe_weight_grad(capsule(a), a_rows if a_rows is None else capsule(a_rows), capsule(b),
                      b_rows if b_rows is None else capsule(b_rows), capsule(offsets), None, capsule(out), 0)


HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "masked_select", "unique",
                 "_unique2", "repeat_interleave", "bincount"}


@pytest.mark.emu
def test_emulated_forward_and_backward_launch_without_host_synchronization():
    """The training step's launch sequence under the emulator: the permutation's four kernels, the two
    forward grouped GEMMs, the backward's dZ GEMM with the activation's backward in its epilogue, the
    dX grouped GEMM and two weight gradients; no torch op that reads device data on the host (what a
    CUDA launch would wait for); no bank conflicts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w1, w2, weights, ids = moe_case(37, 40, 24, 8, 2, torch.bfloat16, "cpu", seed=3)
    leaves = [t.requires_grad_() for t in (x, w1, w2, weights)]
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=1), Ops():
        out = moe.moe_ffn(*leaves, ids)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {k: r["launches"] for k, r in reports.items()} == {
        "permute count": 1, "permute offsets": 1, "permute place": 1, "permute pad": 1, "moe grouped gemm": 3,
        "moe down backward": 1, "moe weight grad": 2}, reports.keys()
    for kernel in ("moe grouped gemm", "moe down backward", "moe weight grad"):
        assert reports[kernel]["bank_conflicts_by_site"] == {}, kernel
    assert {"moe_grouped_gemm", "moe_down_backward", "moe_weight_grad"} <= Ops.seen, Ops.seen
    assert not Ops.seen & HOST_SYNC_OPS, Ops.seen & HOST_SYNC_OPS


def test_opcheck_backward_ops_and_compile_of_a_training_step():
    x, w_gate_up, w_down, weights, ids = moe_case(9, 16, 8, 4, 2, torch.bfloat16, "cpu", seed=22)
    perm = moe.permute(ids, 4, moe.BLOCK)
    rows = perm.row_token.shape[0]
    dout = randn((9, 16), dtype=torch.bfloat16, seed=23)
    torch.library.opcheck(torch.ops.llmkernels.moe_grouped_gemm.default,
                          (dout, perm.row_token, w_down, perm.block_expert, moe.BLOCK, None, 0, True, False, rows,
                           torch.float32))
    perm_h = randn((rows, 16), dtype=torch.bfloat16, seed=25)
    torch.library.opcheck(torch.ops.llmkernels.moe_down_backward.default,
                          (dout, perm.row_token, w_down, perm.block_expert, perm_h,
                           torch.rand(rows, generator=generator(26)), 3))
    torch.library.opcheck(torch.ops.llmkernels.moe_weight_grad.default,
                          (dout, perm.row_token, randn((rows, 8), dtype=torch.bfloat16, seed=24), None,
                           perm.expert_offsets, torch.bfloat16))

    def step(x, w_gate_up, w_down, weights, ids, ffn=moe.moe_ffn, **options):
        leaves = [a.detach().requires_grad_() for a in (x, w_gate_up, w_down, weights)]
        return torch.autograd.grad(ffn(*leaves, ids, **options).sum(), leaves)

    # the forward compiled with no graph break (fullgraph), its backward traced by AOTAutograd; the
    # elementwise parts fuse (their intermediate roundings may differ): the parity rule
    leaves = [a.detach().requires_grad_() for a in (x, w_gate_up, w_down, weights)]
    loss = torch.compile(lambda *a: moe.moe_ffn(*a).sum(), fullgraph=True)(*leaves, ids)
    compiled = torch.autograd.grad(loss, leaves)
    oracle = step(*(t.double() for t in (x, w_gate_up, w_down, weights)), ids, ffn=reference.moe_ffn)
    same = step(x, w_gate_up, w_down, weights, ids, ffn=reference.moe_ffn, upcast=False)
    for label, got, expected, exact in zip(("dx", "dw_gate_up", "dw_down", "dweights"), compiled, same, oracle):
        assert_parity(got, expected, exact, f"compiled {label}")
