"""llmkernels.reference.moe (the MoE oracle) against independent computations.

- route: a Python loop per token (scores with math.exp, a sort on (-score, expert index)), tied
  logits built by hand, renormalize on and off, sigmoid scoring, counts by a Python loop, the
  logsumexp as max + log(sum(exp(l - max))) in Python floats; without ties, torch.topk's answer.
- moe_ffn: a dense float64 formula: every expert on every token (T, E, H) by einsum, silu and gelu
  written out (v / (1 + e^-v), 0.5 v (1 + erf(v / sqrt 2))), combined with a dense (T, E) weight
  matrix scattered from (weights, expert_ids); patterns: routed, one expert for all, idle experts,
  repeated experts in a token, T = 1 and 0, top_k 1, 2, 8; gradients by gradcheck and against the
  dense formula's; 16-bit inputs by the parity rule (helpers.assert_parity).
- load_balancing_loss, z_loss: small cases computed by hand.
- permutation: the layout's invariants checked by Python loops.
Float64 comparisons use torch.testing.assert_close's float64 defaults.
"""
from __future__ import annotations

import math

import pytest
import torch

from llmkernels.reference import gemm as gemm_reference
from llmkernels.reference import moe

from helpers import one_thread, assert_parity, generator, randn, randn_list  # noqa: F401 (one_thread: an autouse fixture)

LN3 = math.log(3.0)


# -- independent oracles -------------------------------------------------------------------------

def python_scores(row, scoring):
    """One token's scores in Python floats (float64)."""
    if scoring == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in row]
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def route_loop(logits, top_k, renormalize=True, scoring="softmax"):
    """(weights, expert_ids) as Python lists, token by token: the k best (-logit, index) pairs."""
    weights, ids = [], []
    for row in logits.double().tolist():
        scores = python_scores(row, scoring)
        chosen = sorted(range(len(row)), key=lambda e: (-float(row[e]), e))[:top_k]   # by logit, then index
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append(w)
        ids.append(chosen)
    return weights, ids


def silu(v):
    return v / (1 + torch.exp(-v))


def gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def dense_oracle(x, w_gate_up, w_down, weights, expert_ids, activation="swiglu"):
    """Every expert on every token, combined by a dense (T, E) weight matrix; float64."""
    x, w1, w2, weights = (t.double() for t in (x, w_gate_up, w_down, weights))
    tokens, experts, ffn = x.shape[0], w2.shape[0], w2.shape[2]
    h = torch.einsum("th,efh->tef", x, w1)
    a = silu(h[..., :ffn]) * h[..., ffn:] if activation == "swiglu" else gelu(h)
    y = torch.einsum("tef,ehf->teh", a, w2)                                       # (T, E, H)
    dense = torch.zeros(tokens, experts, dtype=torch.float64)
    rows = torch.arange(tokens)[:, None].expand_as(expert_ids)
    dense = dense.index_put((rows.reshape(-1), expert_ids.reshape(-1).long()), weights.reshape(-1),
                            accumulate=True)
    return torch.einsum("te,teh->th", dense, y)


def make_ffn(tokens, experts, hidden, ffn, activation="swiglu", dtype=torch.float64, seed=0):
    rows = 2 * ffn if activation == "swiglu" else ffn
    x, w1, w2 = randn_list([(tokens, hidden), (experts, rows, hidden), (experts, hidden, ffn)], seed=seed)
    return x.to(dtype), (w1 / math.sqrt(hidden)).to(dtype), (w2 / math.sqrt(ffn)).to(dtype)


def routing(pattern, tokens, experts, top_k, seed=0):
    """(weights float64 (T, k), expert_ids int32 (T, k)) for a named pattern."""
    g = generator(seed)
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64) + 0.1
    if pattern == "routed":          # distinct experts per token, from random logits
        ids = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    elif pattern == "one_expert":    # every slot of every token: expert experts - 2
        ids = torch.full((tokens, top_k), experts - 2)
    elif pattern == "idle_experts":  # only experts 1 and 4 are ever used
        ids = torch.tensor([1, 4])[torch.randint(0, 2, (tokens, top_k), generator=g)]
    elif pattern == "repeats":       # any expert in any slot, repeats within a token allowed
        ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    else:
        raise AssertionError(pattern)
    return weights, ids.to(torch.int32)


# -- route ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", moe.SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k", [(37, 8, 2), (5, 64, 6), (1, 3, 3), (16, 16, 1)])
def test_route_against_a_loop(tokens, experts, top_k, renormalize, scoring):
    logits = randn((tokens, experts), dtype=torch.float64, seed=tokens + experts, scale=2.0)
    weights, ids, stats = moe.route(logits, top_k, renormalize=renormalize, scoring=scoring)
    expected_weights, expected_ids = route_loop(logits, top_k, renormalize, scoring)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float64
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(weights, torch.tensor(expected_weights, dtype=torch.float64))
    if renormalize:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(tokens, dtype=torch.float64))
    # The stats: counts by a loop, logsumexp in Python floats.
    counts = [0] * experts
    for row in expected_ids:
        for e in row:
            counts[e] += 1
    assert stats.tokens_per_expert.dtype == torch.int32 and stats.tokens_per_expert.tolist() == counts
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in logits.tolist()]
    torch.testing.assert_close(stats.router_logsumexp, torch.tensor(lse, dtype=torch.float64))
    # Without ties (random logits), the same choice and order as torch.topk.
    assert torch.equal(ids.long(), torch.topk(logits, top_k, dim=1).indices)


def test_route_ties_go_to_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [2.0, -1.0, 2.0, 5.0, -1.0, 2.0],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 9.0]])
    _, ids, _ = moe.route(logits, 4)
    assert ids.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [3, 0, 2, 5], [5, 0, 1, 2]]
    weights, ids, stats = moe.route(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2], [0, 1], [3, 0], [5, 0]]
    torch.testing.assert_close(weights[1], torch.full((2,), 1 / 6))
    assert weights[0, 0] == weights[0, 1]
    assert stats.tokens_per_expert.tolist() == [3, 2, 1, 1, 0, 1]
    # Ranked on the logits: sigmoid(20) == sigmoid(30) == 1 in float32, yet 30 comes first, in float64 too.
    saturated = torch.tensor([[20.0, 30.0, -1.0]])
    assert moe.route(saturated, 2, scoring="sigmoid")[1].tolist() == [[1, 0]]
    assert moe.route(saturated.double(), 2, scoring="sigmoid")[1].tolist() == [[1, 0]]
    # Large tied rows (where torch.topk's own order is not by index): the loop's answer.
    g = generator(3)
    tied = torch.randint(0, 3, (64, 40), generator=g).float()
    for top_k in (1, 5, 17, 40):
        assert moe.route(tied, top_k)[1].tolist() == route_loop(tied, top_k)[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_route_scores_in_float32(dtype):
    logits = randn((19, 8), dtype=dtype, seed=4)
    weights, ids, stats = moe.route(logits, 2)
    assert weights.dtype == torch.float32 and stats.router_logsumexp.dtype == torch.float32
    expected_weights, expected_ids = route_loop(logits.float(), 2)      # from the same (rounded) values
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(weights, torch.tensor(expected_weights, dtype=torch.float32))


def test_route_is_differentiable():
    logits = randn((4, 5), dtype=torch.float64, seed=8).requires_grad_()
    for scoring in moe.SCORINGS:
        for renormalize in (True, False):
            assert torch.autograd.gradcheck(
                lambda l: moe.route(l, 3, renormalize=renormalize, scoring=scoring)[0], (logits,))
    assert torch.autograd.gradcheck(lambda l: moe.route(l, 2)[2].router_logsumexp, (logits,))


def test_route_empty_batch():
    weights, ids, stats = moe.route(torch.zeros(0, 4), 2)
    assert weights.shape == ids.shape == (0, 2) and stats.tokens_per_expert.tolist() == [0, 0, 0, 0]


# -- auxiliary losses ----------------------------------------------------------------------------

def ids(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_load_balancing_loss_by_hand():
    loss = moe.load_balancing_loss
    # Uniform probabilities: 1 whatever the routing.
    assert loss(torch.zeros(5, 4), ids([[0], [0], [0], [1], [3]])).item() == pytest.approx(1.0)
    assert loss(torch.zeros(3, 4), ids([[0, 1], [0, 1], [2, 0]])).item() == pytest.approx(1.0)
    # Perfectly even top-1 routing (f_e = 1/E): sum_e P_e = 1 whatever the probabilities.
    logits = randn((12, 6), dtype=torch.float64, seed=1)
    assert loss(logits, ids([[t % 6] for t in range(12)])).item() == pytest.approx(1.0, abs=1e-12)
    # E = 2: probabilities [3/4, 1/4] and [1/2, 1/2], so P = [5/8, 3/8].
    two = torch.tensor([[LN3, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert loss(two, ids([[0], [0]])).item() == pytest.approx(2 * 5 / 8)         # all to expert 0: E * P_0
    assert loss(two, ids([[1], [1]])).item() == pytest.approx(2 * 3 / 8)
    assert loss(two, ids([[0], [1]])).item() == pytest.approx(1.0)
    assert loss(two, ids([[0, 1], [0, 0]])).item() == pytest.approx(2 * (3 / 4 * 5 / 8 + 1 / 4 * 3 / 8))
    # E = 4, every pair on expert 2 with probability 2/5 each: 4 * 2/5.
    four = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0]] * 3)
    assert loss(four, ids([[2, 2]] * 3)).item() == pytest.approx(1.6)
    # Sigmoid scoring: sigmoid(±ln 3) = 3/4, 1/4 (already summing to 1).
    sig = torch.tensor([[LN3, -LN3]], dtype=torch.float64)
    assert loss(sig, ids([[0]]), scoring="sigmoid").item() == pytest.approx(1.5)
    assert loss(torch.full((2, 5), 0.7), ids([[1], [1]]), scoring="sigmoid").item() == pytest.approx(1.0)


def test_load_balancing_loss_gradient_by_hand():
    # One token, E = 2, all to expert 0: loss = 2 p_0, d/dl = 2 p_0 (1 - p_0) * (1, -1) = ±3/8.
    logits = torch.tensor([[LN3, 0.0]], dtype=torch.float64, requires_grad=True)
    moe.load_balancing_loss(logits, ids([[0]])).backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.375, -0.375]], dtype=torch.float64))
    # float32 logits give a float32 loss; 16-bit ones too.
    for dtype in (torch.bfloat16, torch.float32):
        assert moe.load_balancing_loss(torch.zeros(2, 3, dtype=dtype), ids([[0], [1]])).dtype == torch.float32


def test_z_loss_by_hand():
    assert moe.z_loss(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(14 / 3)
    _, _, stats = moe.route(torch.zeros(5, 8), 2)                 # logsumexp of 8 zeros: ln 8
    assert moe.z_loss(stats.router_logsumexp).item() == pytest.approx(math.log(8.0) ** 2)
    lse = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    moe.z_loss(lse).backward()                                    # d/dlse_i = 2 lse_i / T
    torch.testing.assert_close(lse.grad, torch.tensor([1.0, -2.0], dtype=torch.float64))
    logits = torch.tensor([[LN3, 0.0]], dtype=torch.float64, requires_grad=True)   # lse = ln 4
    moe.z_loss(moe.route(logits, 1)[2].router_logsumexp).backward()
    # d(lse^2)/dl = 2 lse softmax(l) = 2 ln 4 (3/4, 1/4)
    torch.testing.assert_close(logits.grad, 2 * math.log(4.0) * torch.tensor([[0.75, 0.25]], dtype=torch.float64))


# -- moe_ffn -------------------------------------------------------------------------------------

FFN_CASES = [  # tokens, experts, top_k, hidden, ffn, pattern
    (37, 8, 2, 40, 24, "routed"),
    (64, 8, 8, 16, 8, "routed"),       # every expert in every token
    (29, 6, 1, 40, 24, "routed"),
    (13, 8, 2, 24, 40, "one_expert"),
    (21, 8, 1, 8, 16, "one_expert"),
    (30, 8, 3, 40, 24, "idle_experts"),
    (17, 5, 4, 16, 24, "repeats"),
    (1, 8, 2, 40, 24, "routed"),
    (1, 4, 1, 8, 8, "one_expert"),
    (0, 4, 2, 8, 8, "routed"),
]


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
@pytest.mark.parametrize("tokens,experts,top_k,hidden,ffn,pattern", FFN_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-H{c[3]}-F{c[4]}-{c[5]}" for c in FFN_CASES])
def test_moe_ffn_against_dense(tokens, experts, top_k, hidden, ffn, pattern, activation):
    x, w1, w2 = make_ffn(tokens, experts, hidden, ffn, activation, seed=tokens * 7 + top_k)
    weights, expert_ids = routing(pattern, tokens, experts, top_k, seed=tokens)
    inputs = [t.requires_grad_() for t in (x, w1, w2, weights)]
    out = moe.moe_ffn(x, w1, w2, weights, expert_ids, activation=activation)
    expected = dense_oracle(x, w1, w2, weights, expert_ids, activation)
    assert out.dtype == torch.float64 and out.shape == (tokens, hidden)
    torch.testing.assert_close(out, expected)
    if tokens == 0:
        return
    g = randn(out.shape, dtype=torch.float64, seed=99)
    actual_grads = torch.autograd.grad((out * g).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * g).sum(), inputs)
    torch.testing.assert_close(actual_grads, expected_grads)
    if pattern == "idle_experts":          # experts nobody chose get zero weight gradients
        idle = [e for e in range(experts) if e not in (1, 4)]
        assert actual_grads[1][idle].abs().max() == 0 and actual_grads[2][idle].abs().max() == 0


def test_moe_ffn_from_route():
    """The usual pipeline: route's float32 weights and int32 ids into a float64 FFN."""
    x, w1, w2 = make_ffn(23, 8, 40, 24, seed=5)
    logits = randn((23, 8), seed=6)
    weights, expert_ids, _ = moe.route(logits, 2)
    torch.testing.assert_close(moe.moe_ffn(x, w1, w2, weights, expert_ids),
                               dense_oracle(x, w1, w2, weights, expert_ids))
    # int64 ids (torch.topk's) give the same answer.
    assert torch.equal(moe.moe_ffn(x, w1, w2, weights, expert_ids.long()),
                       moe.moe_ffn(x, w1, w2, weights, expert_ids))


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_moe_ffn_gradcheck(activation):
    x, w1, w2 = make_ffn(4, 3, 8, 4, activation, seed=11)
    weights, expert_ids = routing("repeats", 4, 3, 2, seed=12)
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2, weights))
    assert torch.autograd.gradcheck(
        lambda *a: moe.moe_ffn(*a[:4], expert_ids, activation=activation), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_moe_ffn_low_precision(dtype, activation):
    x, w1, w2 = make_ffn(61, 8, 64, 48, activation, dtype=dtype, seed=21)
    weights, expert_ids, _ = moe.route(randn((61, 8), seed=22), 2)
    expected = dense_oracle(x, w1, w2, weights, expert_ids, activation)         # from the 16-bit values
    # compute_dtype=float64 with a float64 output: the oracle itself.
    oracle = moe.moe_ffn(x, w1, w2, weights, expert_ids, activation=activation,
                         compute_dtype=torch.float64, out_dtype=torch.float64)
    torch.testing.assert_close(oracle, expected)
    upcast = moe.moe_ffn(x, w1, w2, weights, expert_ids, activation=activation)
    same_precision = moe.moe_ffn(x, w1, w2, weights, expert_ids, activation=activation, upcast=False)
    assert upcast.dtype == same_precision.dtype == dtype
    # The float32 computation is within the parity bound of the one in x's dtype, and strictly
    # better than it: rounding only once shows.
    assert_parity(upcast, same_precision, expected, "moe_ffn")
    error = (upcast.double() - expected).abs().max()
    baseline = (same_precision.double() - expected).abs().max()
    assert error < baseline
    # float32 output of the float32 computation: float32's error, far below the 16-bit rounding.
    out32 = moe.moe_ffn(x, w1, w2, weights, expert_ids, activation=activation, out_dtype=torch.float32)
    torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-5)


def test_moe_ffn_float32_paths_agree():
    """upcast only matters below float32: for float32 x both paths are the same computation."""
    x, w1, w2 = make_ffn(31, 8, 40, 24, dtype=torch.float32, seed=31)
    weights, expert_ids, _ = moe.route(randn((31, 8), seed=32), 2)
    assert torch.equal(moe.moe_ffn(x, w1, w2, weights, expert_ids),
                       moe.moe_ffn(x, w1, w2, weights, expert_ids, upcast=False))


def test_interleave_gate_up_matches_the_gemm_core():
    """The GEMM core's swiglu (adjacent (gate, up) columns) on the interleaved weight gives the
    activation of the stacked one."""
    x, w1, _ = make_ffn(9, 3, 16, 8, seed=41)
    interleaved = moe.interleave_gate_up(w1)
    assert interleaved[1, 0].tolist() == w1[1, 0].tolist() and interleaved[1, 1].tolist() == w1[1, 8].tolist()
    assert interleaved[2, 15].tolist() == w1[2, 15].tolist() and interleaved[2, 14].tolist() == w1[2, 7].tolist()
    for e in range(3):
        h = x @ w1[e].T
        torch.testing.assert_close(gemm_reference.gemm(x, interleaved[e], activation="swiglu"),
                                   silu(h[:, :8]) * h[:, 8:])


# -- permutation ---------------------------------------------------------------------------------

def check_layout(layout, expert_ids, experts, block, worst_case=False):
    tokens, top_k = expert_ids.shape
    for name in ("row_token", "row_slot", "expert_offsets", "block_expert", "slot_row"):
        assert getattr(layout, name).dtype == torch.int32, name
    offsets, row_token, row_slot = (t.tolist() for t in (layout.expert_offsets, layout.row_token, layout.row_slot))
    ids_list = expert_ids.tolist()
    pairs_of = [[(t, s) for t in range(tokens) for s in range(top_k) if ids_list[t][s] == e] for e in range(experts)]
    bound = tokens * top_k + experts * (block - 1)
    assert len(offsets) == experts + 1 and offsets[0] == 0
    assert len(row_token) == len(row_slot) == (bound if worst_case else offsets[-1])
    assert moe.max_padded_rows(tokens, top_k, experts, block) == bound and offsets[-1] <= bound
    for e in range(experts):
        count = len(pairs_of[e])
        assert offsets[e + 1] - offsets[e] == -(-count // block) * block          # count rounded up to block
        rows = range(offsets[e], offsets[e + 1])
        # Real rows: exactly expert e's pairs, ascending token then slot; then padding rows of -1.
        assert [(row_token[r], row_slot[r]) for r in rows[:count]] == pairs_of[e]
        assert all(row_token[r] == -1 and row_slot[r] == -1 for r in rows[count:])
    assert all(t == -1 and s == -1 for t, s in zip(row_token[offsets[-1]:], row_slot[offsets[-1]:]))
    real = sorted((t, s) for t, s in zip(row_token, row_slot) if t >= 0)
    assert real == [(t, s) for t in range(tokens) for s in range(top_k)]          # each pair exactly once
    for t in range(tokens):
        for s in range(top_k):
            r = layout.slot_row[t, s].item()
            assert (row_token[r], row_slot[r]) == (t, s)
    block_expert = layout.block_expert.tolist()
    assert len(block_expert) == -(-len(row_token) // block)
    for b, e in enumerate(block_expert):
        owner = [x for x in range(experts) if offsets[x] <= b * block < offsets[x + 1]]
        assert [e] == (owner or [-1])
        if e >= 0:
            assert b * block + block <= offsets[e + 1]                                # never straddles


PERMUTATION_CASES = [  # tokens, experts, top_k, block, pattern
    (37, 8, 2, 16, "routed"),
    (37, 8, 2, 1, "routed"),
    (64, 8, 8, 4, "routed"),
    (13, 8, 2, 8, "one_expert"),
    (30, 8, 3, 5, "idle_experts"),
    (17, 5, 4, 3, "repeats"),
    (1, 8, 2, 64, "routed"),
    (0, 4, 2, 16, "routed"),
]


@pytest.mark.parametrize("worst_case", [False, True])
@pytest.mark.parametrize("tokens,experts,top_k,block,pattern", PERMUTATION_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-b{c[3]}-{c[4]}" for c in PERMUTATION_CASES])
def test_permutation_layout(tokens, experts, top_k, block, pattern, worst_case):
    _, expert_ids = routing(pattern, tokens, experts, top_k, seed=tokens + block)
    layout = moe.permutation(expert_ids, experts, block, worst_case=worst_case)
    check_layout(layout, expert_ids, experts, block, worst_case)


def test_permutation_by_hand_and_the_bound_is_reached():
    expert_ids = ids([[2, 0], [0, 2], [3, 0]])
    layout = moe.permutation(expert_ids, 4, 2)
    assert layout.expert_offsets.tolist() == [0, 4, 4, 6, 8]
    assert layout.row_token.tolist() == [0, 1, 2, -1, 0, 1, 2, -1]
    assert layout.row_slot.tolist() == [1, 0, 1, -1, 0, 1, 0, -1]
    assert layout.block_expert.tolist() == [0, 0, 2, 3]
    assert layout.slot_row.tolist() == [[4, 0], [1, 5], [6, 2]]
    # One pair per expert: every expert pads block - 1 rows, so T * k + E * (block - 1) is needed.
    diagonal = ids([[0], [1], [2], [3]])
    layout = moe.permutation(diagonal, 4, 8)
    assert layout.expert_offsets[-1].item() == moe.max_padded_rows(4, 1, 4, 8) == 32


# -- errors --------------------------------------------------------------------------------------

def test_route_errors():
    logits = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="router_logits must have 2 dimensions"):
        moe.route(logits[0], 1)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 4\].*got 0"):
        moe.route(logits, 0)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 4\].*got 5"):
        moe.route(logits, 5)
    with pytest.raises(ValueError, match="top_k"):
        moe.route(logits, 2.0)
    with pytest.raises(ValueError, match="scoring must be one of 'softmax', 'sigmoid'; got 'relu'"):
        moe.route(logits, 1, scoring="relu")
    with pytest.raises(TypeError, match="router_logits must be a float16.*got torch.int64"):
        moe.route(logits.long(), 1)
    with pytest.raises(ValueError, match="finite scores"):
        moe.route(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="finite scores"):
        moe.route(torch.full((1, 3), float("-inf")), 1)


def test_loss_errors():
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 4\)"):
        moe.load_balancing_loss(torch.zeros(2, 4), ids([[0], [4]]))
    with pytest.raises(ValueError, match="expert_ids must have 2 rows"):
        moe.load_balancing_loss(torch.zeros(2, 4), ids([[0], [1], [2]]))
    with pytest.raises(TypeError, match="expert_ids must be an int32 or int64"):
        moe.load_balancing_loss(torch.zeros(2, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="at least one token"):
        moe.load_balancing_loss(torch.zeros(0, 4), ids([[0]])[:0])
    with pytest.raises(ValueError, match="router_logsumexp must have 1 dimensions"):
        moe.z_loss(torch.zeros(2, 2))


def test_moe_ffn_errors():
    x, w1, w2 = make_ffn(5, 4, 16, 8, seed=51)
    weights, expert_ids = routing("routed", 5, 4, 2, seed=52)
    ffn = moe.moe_ffn
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 4\).*got values from 0 to 4"):
        ffn(x, w1, w2, weights, torch.where(expert_ids == 3, 4, expert_ids))
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 4\).*got values from -1"):
        ffn(x, w1, w2, weights, expert_ids - 1)
    with pytest.raises(ValueError, match="w_gate_up and w_down must have one number of experts; got 3"):
        ffn(x, w1[:3], w2, weights, expert_ids)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \(4, 8, 16\).*for gelu"):
        ffn(x, w1, w2, weights, expert_ids, activation="gelu")                # gelu's is (E, F, H)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \(4, 16, 16\).*for swiglu"):
        ffn(x, w1[:, :8], w2, weights, expert_ids)
    with pytest.raises(ValueError, match=r"w_down must have shape \(num_experts, hidden=16, ffn\)"):
        ffn(x, w1, w2.transpose(1, 2), weights, expert_ids)
    with pytest.raises(ValueError, match="weights and expert_ids must have one shape"):
        ffn(x, w1, w2, weights[:, :1], expert_ids)
    with pytest.raises(ValueError, match="expert_ids must have 5 rows"):
        ffn(x, w1, w2, weights[:4], expert_ids[:4])
    with pytest.raises(ValueError, match="activation must be one of 'swiglu', 'gelu'; got 'relu'"):
        ffn(x, w1, w2, weights, expert_ids, activation="relu")
    with pytest.raises(TypeError, match="x must be a float16.*got torch.int64"):
        ffn(x.long(), w1, w2, weights, expert_ids)
    with pytest.raises(TypeError, match="w_gate_up and w_down must have x's dtype"):
        ffn(x, w1.float(), w2, weights, expert_ids)
    with pytest.raises(TypeError, match="expert_ids must be an int32 or int64 tensor; got torch.float32"):
        ffn(x, w1, w2, weights, expert_ids.float())
    with pytest.raises(TypeError, match="weights must be a float16.*got torch.int32"):
        ffn(x, w1, w2, expert_ids, expert_ids)
    with pytest.raises(ValueError, match="compute_dtype must be None with upcast=False"):
        ffn(x, w1, w2, weights, expert_ids, upcast=False, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="compute_dtype must be torch.float32 or torch.float64"):
        ffn(x, w1, w2, weights, expert_ids, compute_dtype=torch.float16)


def test_permutation_errors():
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 2\)"):
        moe.permutation(ids([[0], [2]]), 2, 4)
    with pytest.raises(ValueError, match="block must be a positive integer; got 0"):
        moe.permutation(ids([[0]]), 2, 0)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        moe.permutation(ids([[0]]), 0, 4)
    with pytest.raises(ValueError, match="w_gate_up must have an even number of rows"):
        moe.interleave_gate_up(torch.zeros(2, 3, 4))
