#!/usr/bin/env python3
"""The table of scripts/gpu-run.sh: lorasft's runs and PyTorch + PEFT's on the same shape.

usage: gpu_table.py OUT SHAPE   (OUT as gpu-run.sh leaves it)

ms/step is the median step-to-step time of metrics.jsonl after two warm-up steps, leaving out
steps that follow an evaluation; tokens/s counts every position of the padded batch (4 x 512).
FLOPs per token for LoRA training: 4 N (forward 2N, backward 2N: the frozen base gets no weight
gradient, so not 6N) with N the parameters that enter a product (all but the embedding), plus
attention 12 L s h (forward 4, backward 8). MFU divides by the GPU's dense peak: H200 989 TFLOP/s
in bf16/f16, 67 TFLOP/s in fp32 (no TF32).
"""
import json
import statistics
import sys
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, heads, kv_heads, vocab, batch, seq
    "tinyllama": (2048, 5632, 22, 32, 4, 32000, 4, 512),
    "tiny": (256, 688, 4, 8, 2, 32000, 4, 512),
}
PEAK = {"fp32": 66.9e12, "bf16": 989.4e12, "f16": 989.4e12}


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def step_ms(lines):
    deltas, prev, after_eval = [], None, False
    for m in lines:
        if m["kind"] == "eval":
            after_eval = True
            continue
        if prev is not None and m["step"] > 2 and not after_eval:
            deltas.append((m["elapsed_s"] - prev) * 1e3)
        prev, after_eval = m["elapsed_s"], False
    return statistics.median(deltas) if deltas else float("nan")


def peak_mem(out, name):
    gpu, cpu = out / f"mem-{name}.txt", out / f"rss-{name}.txt"
    if gpu.exists():
        vals = [float(v) for v in gpu.read_text().split() if v.strip().replace(".", "").isdigit()]
        return max(vals) if vals else float("nan"), "GPU MiB (nvidia-smi, whole GPU)"
    if cpu.exists():
        return float(cpu.read_text().split()[-1]) / 1024, "RSS MiB"
    return float("nan"), "?"


def losses(lines):
    return [m["loss"] for m in lines if m["kind"] == "train"]


def main():
    out, shape = Path(sys.argv[1]), sys.argv[2]
    h, inter, layers, heads, kv, vocab, b, s = SHAPES[shape]
    d = h // heads
    per_layer = h * h * 2 + 2 * h * kv * d + 3 * h * inter
    n = layers * per_layer + vocab * h  # lm_head; the embedding is a lookup
    flops_tok = 4 * n + 12 * layers * s * h
    gpu = (out / "gpu.txt").read_text().strip()
    on_gpu = not gpu.startswith("cpu")
    print(f"{shape} shape, batch {b} x {s}, day2 LoRA (q_proj,v_proj r 8); {gpu}; "
          f"{(out / 'date.txt').read_text().strip()}\n")
    print("| impl | precision | ms/step | tokens/s | peak memory | MFU | tokens/s vs PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    torch = {}
    pt = out / "pytorch.jsonl"
    if pt.exists():
        for l in pt.read_text().splitlines():
            if l.strip():
                r = json.loads(l)
                prec = r["impl_name"].split()[-1] if r["impl_name"].split()[-1] in PEAK else "fp32"
                torch[prec] = r
    unit = "MiB"
    for prec in ["fp32", "bf16", "f16"]:
        run = out / "runs" / prec
        if not (run / "metrics.jsonl").exists():
            print(f"| lorasft | {prec} | run missing | | | | |")
            continue
        ms = step_ms(metrics(run))
        tps = b * s / (ms / 1e3)
        mem, unit = peak_mem(out, prec)
        mfu = f"{tps * flops_tok / PEAK[prec]:.1%}" if on_gpu else "n/a (CPU)"
        ratio = f"{tps / torch[prec]['tokens_per_s']:.2f}×" if prec in torch else ""
        print(f"| lorasft | {prec} | {ms:.0f} | {tps:.0f} | {mem:.0f} | {mfu} | {ratio} |")
        if prec in torch:
            r = torch[prec]
            mfu = f"{r['tokens_per_s'] * flops_tok / PEAK[prec]:.1%}" if on_gpu else "n/a (CPU)"
            print(f"| {r['impl_name']} | {prec} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_rss_mib']:.0f} | {mfu} | 1.00× |")
    print(f"\npeak memory: {unit}; PyTorch's is torch.cuda.max_memory_allocated on a GPU, RSS on a CPU."
          f" FLOPs/token {flops_tok / 1e9:.2f} G (see gpu_table.py).")
    base = losses(metrics(out / "runs" / "fp32"))
    again = out / "runs" / "fp32-again"
    if again.exists():
        a = losses(metrics(again))
        same = a == base
        print(f"\nfp32 loss curve identical between two runs: {'yes' if same else 'NO'} "
              f"({len(base)} steps)")
    for prec in ["bf16", "f16"]:
        run = out / "runs" / prec
        if run.exists():
            other = losses(metrics(run))
            worst = max(abs(x - y) for x, y in zip(base, other))
            print(f"{prec} against fp32: largest |loss difference| over {len(other)} steps {worst:.4f}")


if __name__ == "__main__":
    main()
