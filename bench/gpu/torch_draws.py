#!/usr/bin/env python3
"""Golden vectors for decodebench's `draws = "torch"`: the sequence lengths and block tables that
vLLM's benchmark_trtllm_decode_attention.py draws, produced by PyTorch itself on a CUDA GPU.

The script seeds torch (`torch.manual_seed(0)`, default device cuda), then draws in this order: the
query (`randn`, [batch, qo_heads, head_size], bf16), the lengths (`randint(1, max_seq_len)`, int32,
the last set to max_seq_len), the cache (`randn`, [pages, 2, kv_heads, block, head_size], bf16) and
the block tables (`randint(0, pages)`, int32, [batch, ceil(max_seq_len / block)]). This replays that
order for each case and writes, per case, the lengths and the SHA-256 of the block tables (int32
little-endian, row-major), with the GPU's SM count (PyTorch's CUDA generator spreads a draw over
min(SMs x 8, ceil(n / 256)) blocks of 256 threads, so the draws depend on it).

Usage (on a GPU machine with PyTorch): python3 bench/gpu/torch_draws.py OUT.json
"""
import hashlib
import json
import sys

import torch

POOL_TOKENS = 256000


def draw(batch, max_seq_len, block, heads=(64, 8), head_size=128, seed=0):
    torch.manual_seed(seed)
    qo, kv = heads
    torch.randn(batch, qo, head_size, dtype=torch.bfloat16)
    lens = torch.randint(1, max_seq_len, (batch,), dtype=torch.int32)
    lens[-1] = max_seq_len
    pages = POOL_TOKENS // block
    cache = torch.randn((pages, 2, kv, block, head_size), dtype=torch.bfloat16)
    del cache
    width = (max_seq_len + block - 1) // block
    tables = torch.randint(0, pages, (batch, width), dtype=torch.int32)
    t = tables.cpu().contiguous().numpy().astype("<i4")
    return {
        "batch_size": batch, "max_seq_len": max_seq_len, "block_size": block,
        "num_qo_heads": qo, "num_kv_heads": kv, "head_size": head_size, "seed": seed,
        "seq_lens": lens.cpu().tolist(),
        "block_tables_sha256": hashlib.sha256(t.tobytes()).hexdigest(),
        "block_tables_head": t.reshape(-1)[:8].tolist(),
        "block_tables_tail": t.reshape(-1)[-8:].tolist(),
    }


def main(out):
    torch.set_default_device("cuda")
    props = torch.cuda.get_device_properties(0)
    cases = []
    for s in [1 << k for k in range(10, 18)]:
        for b in (1, 4, 8, 16, 32, 64, 128, 256):
            for blk in (8, 16, 32, 64) if b in (4, 64, 256) else (16,):
                cases.append(draw(b, s, blk))
    # Other shapes and seeds: the draws' offsets follow the tensors' sizes.
    cases.append(draw(200, 5000, 32, heads=(16, 2), head_size=64))
    cases.append(draw(3, 777, 16, seed=12345))
    cases.append(draw(1000, 2048, 16, heads=(32, 8)))
    cases.append(draw(37, 100000, 64, heads=(8, 1), head_size=256, seed=2**40 + 7))
    doc = {
        "source": "bench/gpu/torch_draws.py",
        "device": props.name, "sm_count": props.multi_processor_count,
        "max_threads_per_sm": props.max_threads_per_multi_processor,
        "torch": torch.__version__, "pool_tokens": POOL_TOKENS, "cases": cases,
    }
    # One case a line (kernels/tests/fixtures/torch_draws.json is this file as written).
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"})[:-1]
    lines = [json.dumps(c, separators=(",", ":")) for c in cases]
    with open(out, "w") as f:
        f.write(head + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"{len(cases)} cases, {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
