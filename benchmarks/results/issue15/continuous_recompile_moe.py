"""The diagnosis behind benchmarks/NOTES.md's "one-time recompile inside the timed call" (call E of
2026-12-04, one H200): one loaded generate-mode judge (128 tokens forced, batch 32, compiled after
32 items), then 64-item calls with continuous batching on and off, alternating; run under
TORCH_LOGS=recompiles, its filtered output in continuous_recompile_moe.log.

    TORCH_LOGS=recompiles python benchmarks/results/issue15/continuous_recompile_moe.py CHECKPOINT
"""
import sys, time, torch, json
sys.path.insert(0, ".")
from benchmarks.bench_gpu import make_images
from benchmarks import runs
from src.models.reward.implementations.local import QwenVLRewardModel
ck = sys.argv[1]
imgs = make_images(None, 64, 1024, 768)
j = QwenVLRewardModel(model_name=ck, device="cuda:0", mode="generate", max_new_tokens=128, min_new_tokens=128,
                      batch_size=32, compile_after_items=32)
for _ in range(2): j.batch_score(imgs[:32])
print("compiled", len(j.engine._compiled), flush=True)
for rep in range(2):
    for cont in (True, False, True):
        j.engine._continuous = cont
        runs.new_images(j)
        torch.cuda.synchronize(); t = time.perf_counter()
        j.batch_score(imgs[:64]); torch.cuda.synchronize()
        print(json.dumps({"continuous": cont, "items_per_s": round(64 / (time.perf_counter() - t), 2),
                          "timings": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in getattr(j.engine, "_continuous_timings", {}).items()}})[:600], flush=True)
j.close()
