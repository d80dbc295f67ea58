"""PyTorch / transformers baseline for `rlhf bench train`: the same training step (forward,
backward, grad clipping, AdamW on the causal-LM loss) on random weights, on the CPU with 2 threads
or with --device cuda on GPU 0 (f32 weights, bf16 autocast: the engine's precision there).

Prints one JSON line: {"tokens_per_s": ..., "seconds": ..., "peak_rss_mb": ..., "idle_rss_mb": ...}.
Run by the Rust side, which passes the config.json of the model to build.
"""
import argparse
import json
import resource
import time


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    idle = rss_mb()
    cfg = AutoConfig.from_pretrained(a.config_dir)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(a.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(2, cfg.vocab_size, (a.batch, a.seq), device=a.device)
    on_gpu = a.device == "cuda"

    def step():
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "tokens_per_s": a.batch * a.seq * a.steps / dt,
        "seconds": dt,
        "peak_rss_mb": rss_mb(),
        "idle_rss_mb": idle,
    }))


if __name__ == "__main__":
    main()
