#!/usr/bin/env python3
"""The same benchmark as `lorasft bench`, in PyTorch + transformers + PEFT (eager, no compile).

Same shapes, batch and sequence, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj,v_proj, labels =
input_ids, AdamW + clip_grad_norm_(1.0), f32 unless --dtype says otherwise. Each (shape, threads)
runs in a fresh process so peak RSS is per shape; rows are JSON lines in lorasft's BenchRow
format, for `lorasft bench --compare FILE`. Never run in CI: it needs torch, transformers, peft.

  python scripts/bench_pytorch.py --shapes tiny,smollm2 --threads 1,2 --out /tmp/pytorch.jsonl
  python scripts/bench_pytorch.py --shapes tinyllama --device cuda --dtype bf16 --steps 30
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied, rope_theta, batch, seq)
    "tiny": (256, 688, 4, 8, 2, 32000, False, 10000.0, 4, 128),
    "smollm2": (576, 1536, 30, 9, 3, 49152, True, 100000.0, 1, 256),
    "tinyllama": (2048, 5632, 22, 32, 4, 32000, False, 10000.0, 4, 512),
}
NAMES = {"tiny": "tiny", "smollm2": "smollm2-135m", "tinyllama": "tinyllama-1.1b"}


def run_one(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    h, inter, layers, heads, kv, vocab, tied, theta, b, s = SHAPES[a.shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      tie_word_embeddings=tied, rope_theta=theta, rms_norm_eps=1e-5,
                      max_position_embeddings=max(2048, s))
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    model = LlamaForCausalLM(cfg).to(dev)
    if dtype != torch.float32:
        model = model.to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], bias="none",
                                             task_type="CAUSAL_LM"))
    if dtype != torch.float32:  # f32 master weights for the adapters, as lorasft keeps them
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if a.dtype == "f16" else None
    ids = torch.randint(0, vocab, (b, s), device=dev)
    mask = torch.ones_like(ids)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        model.train()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    model.eval()
    fwd = []
    with torch.no_grad():
        for _ in range(a.steps):
            sync()
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).logits
            sync()
            fwd.append(time.perf_counter() - t)
        out = model(input_ids=ids[:1, :16], use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(a.gen_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        gen = time.perf_counter() - t
    med = statistics.median(times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {
        "impl_name": f"pytorch {torch.__version__} + peft" + ("" if a.dtype == "fp32" else f" {a.dtype}"),
        "shape": NAMES[a.shape], "batch": b, "seq": s, "threads": a.threads,
        "step_ms": med * 1e3, "step_range_ms": [min(times) * 1e3, max(times) * 1e3],
        "tokens_per_s": b * s / med, "forward_ms": statistics.median(fwd) * 1e3,
        "gen_tokens_per_s": a.gen_tokens / gen, "peak_rss_mib": peak,
    }
    print(json.dumps(row))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,smollm2")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "f16"])
    p.add_argument("--out", help="append the rows here as JSON lines")
    p.add_argument("--shape", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.shape:
        a.threads = int(a.threads)
        return run_one(a)
    rows = []
    for shape in a.shapes.split(","):
        for threads in a.threads.split(","):
            print(f"pytorch bench: {shape} with {threads} thread(s)...", file=sys.stderr)
            cmd = [sys.executable, __file__, "--shape", shape, "--threads", threads,
                   "--steps", str(a.steps), "--gen-tokens", str(a.gen_tokens), "--seed", str(a.seed),
                   "--device", a.device, "--dtype", a.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(out.strip().splitlines()[-1])
    for r in rows:
        print(r)
    if a.out:
        with open(a.out, "a") as f:
            f.write("".join(r + "\n" for r in rows))


if __name__ == "__main__":
    main()
