"""Oracle calibration: mean per-token entropy (nats) of kdlab's synthetic oracle over a grid of
init_std x logit_scale (vocab 32, 2 x 64 Llama, prompts 8, responses 16)."""
import sys, torch
torch.set_num_threads(1)
from kdlab.models import make_synthetic_oracle, mean_token_entropy
V = int(sys.argv[1]) if len(sys.argv) > 1 else 32
for std in [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]:
    row = []
    for ls in [2.0, 3.0, 4.0, 6.0, 8.0]:
        o = make_synthetic_oracle(V, 64, 2, 4, seed=0, logit_scale=ls, init_std=std, max_position_embeddings=64)
        row.append(mean_token_entropy(o, num_prompts=128, prompt_len=8, response_len=16))
    print(f"init_std={std:5}: " + "  ".join(f"ls{ls:g}={h:.3f}" for ls, h in zip([2,3,4,6,8], row)), flush=True)
