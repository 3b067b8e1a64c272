"""Dense decode at 1 and 2 threads, float32 vs bfloat16: tok/s and the ops that take the time."""
import sys, time, json, torch
from torch.profiler import profile, ProfilerActivity
from riverllm.loading import load_model
from riverllm.api import RiverLM
model_name = sys.argv[1]; out = sys.argv[2]
model, tok = load_model(model_name, progress=False)
results = {}
for dtype in (torch.float32, torch.bfloat16):
    lm = RiverLM(model.to(dtype), tok, name=model_name)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        lm.generate("Write a Python function that reverses a string.", method="dense", max_new_tokens=4)  # warm
        speeds = []
        for _ in range(2):
            r = lm.generate("Write a Python function that reverses a string.", method="dense", max_new_tokens=24, ignore_eos=True)
            speeds.append(r.tokens_per_s)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r = lm.generate("Write a Python function that reverses a string.", method="dense", max_new_tokens=16, ignore_eos=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
        key = f"{str(dtype).split('.')[-1]}-{threads}t"
        results[key] = {"tok_s": speeds, "profiled_tok_s": r.tokens_per_s}
        print(key, "tok/s", [round(s, 2) for s in speeds], flush=True)
        print(table, flush=True)
json.dump(results, open(out, "w"), indent=1)
