"""The Mixture-of-Experts CUDA kernels once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it
under each tool): the router (softmax and sigmoid, E = 8, 128, 1000, k up to 8, bf16 and fp32 logits),
the permutation (more pairs than one chunk, skewed, one expert, empty experts), the forward FFN's
two grouped GEMMs (swiglu and gelu, T not a multiple of the 64-row block), and a training step per
activation (the forward with grads, which also writes the pre-activation, then the backward: dZ with
the activation's backward in its epilogue ("moe down backward"), dX by the grouped GEMM with k-major
expert weights, and the per-expert weight gradients ("moe weight grad"), with one expert that gets no
token, whose weight gradients must come out zero). The kernels use shared memory, shared atomics,
warp shuffles and barriers. (The same workload passes under the emulator.)
# sanitize: racecheck synccheck
"""
import torch

from _sanitize_util import finish

from llmkernels import moe

ROUTES = ((1, 8, 2), (300, 8, 2), (97, 128, 8), (40, 1000, 3))   # (T, E, k)
FFNS = ((1, 8, 2, "swiglu"), (70, 4, 1, "gelu"), (130, 16, 8, "swiglu"))   # (T, E, k, activation)
TRAIN_STEPS = ((130, 16, 8, "swiglu"), (70, 5, 1, "gelu"))   # (T, E, k, activation); expert E - 1 gets no token


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    results = []
    for tokens, experts, top_k in ROUTES:
        for dtype, scoring in ((torch.float32, "softmax"), (torch.bfloat16, "sigmoid")):
            weights, ids, stats = moe.route(randn(tokens, experts).to(dtype=dtype, device=device), top_k, scoring=scoring)
            results += [weights, stats.router_logsumexp]
            perm = moe.permute(ids, experts, moe.BLOCK)
            results.append(perm.row_token.float())
    skewed = torch.zeros(300, 2, dtype=torch.int32)
    skewed[:, 1] = 3
    results.append(moe.permute(skewed.to(device), 8, moe.BLOCK).slot_row.float())

    def ffn_inputs(tokens, experts, top_k, activation, logit_bias=0.0):
        hidden, ffn = 40, 24
        up_rows = 2 * ffn if activation == "swiglu" else ffn
        x = randn(tokens, hidden).to(dtype=torch.bfloat16, device=device)
        w_gate_up = (randn(experts, up_rows, hidden) * hidden ** -0.5).to(dtype=torch.bfloat16, device=device)
        w_down = (randn(experts, hidden, ffn) * ffn ** -0.5).to(dtype=torch.bfloat16, device=device)
        weights, ids, _ = moe.route((randn(tokens, experts) + logit_bias).to(device), top_k)
        return x, w_gate_up, w_down, weights, ids

    with torch.no_grad():
        for tokens, experts, top_k, activation in FFNS:
            results.append(moe.moe_ffn(*ffn_inputs(tokens, experts, top_k, activation), activation=activation))
    for tokens, experts, top_k, activation in TRAIN_STEPS:
        bias = torch.zeros(experts)
        bias[-1] = -1e4                                  # never among the top k: an expert with no rows
        x, w_gate_up, w_down, weights, ids = ffn_inputs(tokens, experts, top_k, activation, bias)
        leaves = [t.requires_grad_() for t in (x, w_gate_up, w_down, weights)]
        out = moe.moe_ffn(x, w_gate_up, w_down, weights, ids, activation=activation)
        dout = randn(tokens, x.shape[1]).to(dtype=torch.bfloat16, device=device)
        grads = torch.autograd.grad(out, leaves, dout)
        if grads[1][-1].abs().max().item() != 0 or grads[2][-1].abs().max().item() != 0:
            raise SystemExit("sanitize: the weight gradients of an expert with no token are not zero")
        results += [out.detach(), *grads]
    finish(results)


if __name__ == "__main__":
    main()
