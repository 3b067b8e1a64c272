import json, sys, torch, copy
from pathlib import Path
torch.set_num_threads(1)
from riverllm.loading import load_model
from riverllm.api import RiverLM
spec, out = sys.argv[1], sys.argv[2]
model, tok = load_model(spec, progress=False)
text = Path("/work/wt14/src/riverllm/engine/core.py").read_text()[:3000] + "\n" + Path("/work/wt14/README.md").read_text()[:2000]
ids = tok(text)["input_ids"][:400]
fp32 = RiverLM(model, tok, name=spec)
ref = fp32.teacher_forced(ids, 16, method="dense")[0]
speeds = {}
def speed(lm, method):
    lm.generate("Write a Python function that reverses a string.", method=method, max_new_tokens=4)
    return [round(lm.generate("Write a Python function that reverses a string.", method=method, max_new_tokens=32, ignore_eos=True).tokens_per_s, 2) for _ in range(3)]
for method in ("dense", "river:0.9"):
    speeds[f"float32 {method}"] = speed(fp32, method)
bf = RiverLM(copy.deepcopy(model).to(torch.bfloat16), tok, name=spec)
res = {}
for method in ("dense", "w4", "river:0.9"):
    for label, lm in (("float32", fp32), ("bfloat16", bf)):
        lg = lm.teacher_forced(ids, 16, method=method)[0].float()
        p = torch.log_softmax(ref, -1); q = torch.log_softmax(lg, -1)
        res[f"{label} {method}"] = {"agree": float((ref.argmax(-1) == lg.argmax(-1)).float().mean()), "kl": float((p.exp() * (p - q)).sum(-1).mean())}
        print(label, method, res[f"{label} {method}"], flush=True)
for method in ("dense", "river:0.9"):
    speeds[f"bfloat16 {method}"] = speed(bf, method)
print(speeds)
json.dump({"vs_float32_dense": res, "tok_s_1_thread": speeds, "positions": len(ids) - 16}, open(out, "w"), indent=1)
