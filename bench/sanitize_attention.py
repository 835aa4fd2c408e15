"""The attention kernels once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it under each
tool): the forward, the backward with atomic dq and with the deterministic dq pass, for every padded
head dim (32, 64, 128, 256: head dims 32, 40, 128 and 256), in bf16 and fp16, on small odd shapes
with partial query and key tiles, seqlen_q != seqlen_k both ways, GQA, every mask kind with softcap
and ALiBi, a strided qkv view, and varlen batches with empty and single-token sequences. The kernels
use shared memory, cp.async, barriers and (atomic dq) float atomics. (The same workload's kernels
pass under the emulator in tests/test_attention.py, with no report and no bank conflict.)
# sanitize: racecheck synccheck
"""
import torch

from _sanitize_util import finish

from llmkernels import attention, attention_varlen

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, options)
CASES = [
    (2, 70, 75, 4, 2, 32, dict(causal=True)),
    (1, 33, 130, 2, 1, 40, dict(window=(9, 3), softcap=10.0)),
    (2, 130, 17, 4, 4, 128, dict(causal=True, window=(20, -1))),
    (1, 65, 66, 2, 1, 256, dict(alibi=True)),
]


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape, dtype: torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
    results = []

    def run(q, k, v, call):
        for deterministic in (False, True):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = call(*leaves, deterministic=deterministic)
            results.extend([out, *torch.autograd.grad(out, leaves, torch.randn_like(out))])

    for dtype in (torch.bfloat16, torch.float16):
        for batch, sq, sk, hq, hk, d, options in CASES:
            options = dict(options)
            if options.pop("alibi", False):
                options["alibi_slopes"] = torch.rand(hq, generator=generator).to(device)
            q, k, v = randn(batch, sq, hq, d, dtype=dtype), randn(batch, sk, hk, d, dtype=dtype), \
                randn(batch, sk, hk, d, dtype=dtype)
            run(q, k, v, lambda *x, **kw: attention(*x, **options, **kw))
        qkv = randn(2, 41, 3, 4, 64, dtype=dtype)   # strided views of a packed qkv
        run(*qkv.unbind(2), lambda *x, **kw: attention(*x, causal=True, **kw))
        lengths_q, lengths_k = [0, 1, 17, 70, 1], [3, 1, 0, 85, 9]
        cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q, k, v = (randn(sum(lengths_q), 4, 64, dtype=dtype), randn(sum(lengths_k), 2, 64, dtype=dtype),
                   randn(sum(lengths_k), 2, 64, dtype=dtype))
        run(q, k, v, lambda *x, **kw: attention_varlen(*x, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                                       **kw))
    finish(results)


if __name__ == "__main__":
    main()
