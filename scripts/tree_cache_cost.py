"""Run: python scripts/tree_cache_cost.py (under flock /tmp/bench.lock when the figures are reported).

Cost of keeping a tree's accepted path in the cache: gather (index_select per layer) against re-feed (crop to
the root and run the path again through the target). Qwen2.5-Coder 1.5B, bf16, CPU, a 300-token context."""
import statistics, time, torch
import lab
from lab.models import load_model
from lab.kv import RaggedCache
from lab.tree import DraftTree, accepted_slots, tree_verify_forward

target = load_model("qwen2.5-coder-1.5b", dtype="bf16")
torch.manual_seed(0)
ctx = torch.randint(100, 20000, (300,))
tree = DraftTree(torch.randint(100, 20000, (8,)), torch.tensor([-1, -1, 0, 0, 2, 2, 4, 6]))
path = [0, 2, 4, 6]  # depth 4, not a prefix of node order
gather, refeed, verify = [], [], []
with torch.inference_mode():
    for _ in range(7):
        cache = RaggedCache(target.model, 1)
        cache.forward([ctx[:-1]], last_only=True)
        t0 = time.perf_counter(); tree_verify_forward(cache, ctx[-1:], tree); t1 = time.perf_counter()
        cache.keep_slots(accepted_slots(299, path)); t2 = time.perf_counter()
        verify.append(t1 - t0); gather.append(t2 - t1)
        cache2 = RaggedCache(target.model, 1)
        cache2.forward([ctx[:-1]], last_only=True)
        tree_verify_forward(cache2, ctx[-1:], tree)
        t3 = time.perf_counter(); cache2.keep([300]); cache2.forward([tree.tokens[path]], last_only=True); t4 = time.perf_counter()
        refeed.append(t4 - t3)
ms = lambda xs: statistics.median(xs[1:]) * 1e3
print(f"tree verify pass (9 tokens): {ms(verify):.1f} ms; keep the path by gather: {ms(gather):.2f} ms; "
      f"by re-feeding it (crop + a 4-token pass): {ms(refeed):.1f} ms")
