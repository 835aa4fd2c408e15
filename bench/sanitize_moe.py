"""The Mixture-of-Experts CUDA kernels once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it
under each tool): the router (softmax and sigmoid, E = 8, 128, 1000, k up to 8, bf16 and fp32 logits),
the permutation (more pairs than one chunk, skewed, one expert, empty experts), and the forward FFN's
two grouped GEMMs (swiglu and gelu, T not a multiple of the 64-row block). The kernels use shared
memory, shared atomics, warp shuffles and barriers. (The same workload passes under the emulator.)
# sanitize: racecheck synccheck
"""
import torch

from _sanitize_util import finish

from llmkernels import moe

ROUTES = ((1, 8, 2), (300, 8, 2), (97, 128, 8), (40, 1000, 3))   # (T, E, k)
FFNS = ((1, 8, 2, "swiglu"), (70, 4, 1, "gelu"), (130, 16, 8, "swiglu"))   # (T, E, k, activation)


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
    with torch.no_grad():
        for tokens, experts, top_k, activation in FFNS:
            hidden, ffn = 40, 24
            up_rows = 2 * ffn if activation == "swiglu" else ffn
            x = randn(tokens, hidden).to(dtype=torch.bfloat16, device=device)
            w_gate_up = (randn(experts, up_rows, hidden) * hidden ** -0.5).to(dtype=torch.bfloat16, device=device)
            w_down = (randn(experts, hidden, ffn) * ffn ** -0.5).to(dtype=torch.bfloat16, device=device)
            weights, ids, _ = moe.route(randn(tokens, experts).to(device), top_k)
            results.append(moe.moe_ffn(x, w_gate_up, w_down, weights, ids, activation=activation))
    finish(results)


if __name__ == "__main__":
    main()
