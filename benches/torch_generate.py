"""transformers baseline for `rlhf bench generate`: batched `generate` with a KV cache and
sampling on the CPU with 2 threads, random weights, a fixed number of new tokens.

Prints one JSON line: {"new_tokens_per_s": ..., "seconds": ..., "peak_rss_mb": ...}.
"""
import argparse
import json
import resource
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config_dir)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (a.batch, a.prompt_len))
    mask = torch.ones_like(ids)
    kw = dict(
        attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, use_cache=True,
        pad_token_id=cfg.pad_token_id,
    )
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm-up
        best = float("inf")
        for _ in range(a.reps):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == a.prompt_len + a.new_tokens
    print(json.dumps({
        "new_tokens_per_s": a.batch * a.new_tokens / best,
        "seconds": best,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }))


if __name__ == "__main__":
    main()
