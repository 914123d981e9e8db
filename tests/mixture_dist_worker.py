"""Run by test_mixture_loop.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Trains with online DoReMi (a proxy and reference beside the main model) in the plain loop and writes
each rank's weight history and a fingerprint of its proxy parameters to <out>/rank<r>.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from hf_helpers import finish_distributed, small_dataset  # noqa: E402

from dataflex.domains import encode_domains  # noqa: E402
from dataflex.proxies.doremi import DoReMiOnline  # noqa: E402
from dataflex.proxies.loop import train_mixture  # noqa: E402
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2  # noqa: E402


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    ds = small_dataset(per_domain=16, max_len=40)
    ids, names = encode_domains(ds["domain"])
    make = lambda seed: tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=seed)  # noqa: E731
    policy = DoReMiOnline(make(1), make(2), lr=3e-3, use_average=False)
    result = train_mixture(
        make(0),
        ds,
        ids,
        names,
        policy,
        collate=collate_causal,
        steps=8,
        batch_size=4,
        lr=3e-3,
        seed=0,
        update_every=2,
        accelerator=accelerator,
        progress=False,
    )
    proxy_params = [round(float(p.double().sum()), 12) for p in policy.proxy.parameters()]
    Path(out, f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"world": accelerator.num_processes, "history": result.history, "proxy_params": proxy_params})
    )
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()
