"""TRL baseline for `rlhf bench grpo`: `GRPOTrainer` iterations on the HF model directory
--model-dir (the engine's random weights, config and tokenizer), on the CPU (2 threads, fp32) or
with --device cuda on GPU 0 (f32 weights, bf16 autocast: the engine's precision there, f32 master
weights and bf16 matrix products).

One iteration = rollout (generate), reward, reference pass (when beta > 0), one optimizer step:
TRL does all of it inside one trainer step, with steps_per_generation = 1.
Prints one JSON line: per-iteration seconds, generation seconds (model.generate wrapped),
peak RSS growth above the idle process (after imports, before the model exists).
"""
import argparse
import json
import resource
import time


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()

    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    idle = rss_mb()
    # The engine wrote its own random weights there: both sides start from the same model (and
    # TRL loads its reference model from the same directory when beta > 0).
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    prompts = ["abcdefgh="[: 3 + i % 5] + "=" for i in range(a.prompts * (a.iterations + 2))]
    data = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **_):
        return [float(c.count("a")) for c in completions]

    gen_time = [0.0]
    inner = model.generate

    def timed_generate(*args, **kw):
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        gen_time[0] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=a.prompts * a.generations,
            num_generations=a.generations, max_completion_length=a.max_new_tokens,
            beta=a.beta, bf16=a.device == "cuda", use_cpu=a.device == "cpu", report_to=[],
            logging_steps=1000,
            save_strategy="no", max_steps=a.iterations + 1, learning_rate=1e-5,
            dataloader_num_workers=0, disable_tqdm=True,
            # Every completion runs to the token budget, as on the engine's side.
            generation_kwargs={"min_new_tokens": a.max_new_tokens},
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
    # The first iteration warms up (allocations, lazy init); it is not counted.
    times = step_times[1:]
    print(json.dumps({
        "iteration_s": sum(times) / len(times),
        "best_iteration_s": min(times),
        "generate_s_total": gen_time[0],
        "iterations": len(step_times),
        "peak_rss_growth_mb": rss_mb() - idle,
    }))


if __name__ == "__main__":
    main()
