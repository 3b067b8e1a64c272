import time, sys
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import riverllm
from riverllm import model_cache, loading
t1 = time.perf_counter(); print("import torch+riverllm", round(t1 - t0, 2))
import transformers
t1b = time.perf_counter(); print("import transformers", round(t1b - t1, 2))
spec = sys.argv[1]
d, g = loading.resolve_model(spec, progress=False)
key = model_cache.backbone_key(d / g, torch.bfloat16, spec, loading.PACKAGED_MODELS[spec].sha256)
t2 = time.perf_counter(); e = model_cache.entry_problem(key.entry_dir, key); t3 = time.perf_counter(); print("verify", round(t3 - t2, 2), e)
config = loading._load_config(key.entry_dir, None); t3b = time.perf_counter(); print("config", round(t3b - t3, 2))
m = loading._load_weights(key.entry_dir, None, config, torch.bfloat16, False); t3c = time.perf_counter(); print("weights", round(t3c - t3b, 2))
tok = loading._load_tokenizer(key.entry_dir, None, False); t4 = time.perf_counter(); print("tokenizer", round(t4 - t3c, 2))
lm = riverllm.RiverLM(m, tok, name=spec, river_cache_dir=loading.cache_dir() / "rivers")
t5 = time.perf_counter()
import cProfile, pstats
pr = cProfile.Profile(); pr.enable(); lm.river(); pr.disable()
t6 = time.perf_counter(); print("river from cache", round(t6 - t5, 2))
pstats.Stats(pr).sort_stats("cumulative").print_stats(12)
r = lm.generate("Write hello world in C", max_new_tokens=1); t7 = time.perf_counter(); print("first token", round(t7 - t6, 2))
