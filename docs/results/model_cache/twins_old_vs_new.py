"""Twin accuracy, old (whole-matrix HQQ) vs new (block-wise HQQ) river, on a real model."""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from riverllm.api import RiverLM
from riverllm.river import QuantConfig, build_river
from riverllm.loading import load_model, cache_dir
from riverllm.river.build import weights_fingerprint
model_name, old_dir, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter(); model, tok = load_model(model_name, progress=False); load_s = time.perf_counter() - t
lm = RiverLM(model, tok, name=model_name)
layers = lm.engine.layers
print("fingerprint", weights_fingerprint(layers), "load", load_s, flush=True)
t = time.perf_counter(); new = build_river(layers, QuantConfig(4, 64), progress=True, cache_dir=cache_dir() / "rivers"); build_s = time.perf_counter() - t
print("new river build", build_s, flush=True)
old = build_river(layers, QuantConfig(4, 64), cache_dir=old_dir)
text = Path("/work/wt14/src/riverllm/engine/core.py").read_text()[:3000] + "\n" + Path("/work/wt14/README.md").read_text()[:2000]
ids = tok(text)["input_ids"][:400]
def logits_with(river):
    lm._rivers[QuantConfig(4, 64, "auto")] = river
    return lm.teacher_forced(ids, 16, method="w4")[0]
dense = lm.teacher_forced(ids, 16, method="dense")[0]
result = {"model": model_name, "positions": len(ids) - 16, "new_build_s": build_s, "threads": 1}
for label, river in [("old", old), ("new", new)]:
    lg = logits_with(river)
    p = torch.log_softmax(dense, -1); q = torch.log_softmax(lg, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    agree = float((dense.argmax(-1) == lg.argmax(-1)).float().mean())
    # per-layer output error: each twin on the backbone's own input to that layer (prefill of the text)
    errs = []
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        pos = torch.arange(len(ids))[None]
        emb = model.model.rotary_emb(hs[0], pos)
        for j, (layer, twin) in enumerate(zip(layers, river)):
            x = hs[j]
            ref = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
            ref = ref[0] if isinstance(ref, tuple) else ref
            got = twin(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
            got = got[0] if isinstance(got, tuple) else got
            errs.append(float((got - ref - 0).sub(0).norm() / (ref - x).norm()))
    result[label] = {"agree": agree, "kl": kl, "layer_update_rel_err": errs}
    print(label, "agree", agree, "kl", kl, "mean layer err", sum(errs) / len(errs), flush=True)
Path(out).write_text(json.dumps(result, indent=1))
