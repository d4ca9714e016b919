"""Peak host memory of load_model under TP=8 (8 CPU devices) against the checkpoint's size.

Usage: python benchmarks/sharded_load_memory.py [--hidden 1024 --layers 8]. Writes a random
float32 checkpoint to a temporary directory, then loads it in fresh processes (one per case) and
reports each process's peak anonymous RSS (RssAnon, sampled every 2 ms; the safetensors files
are memory-mapped, and their page-cache pages are not counted) above its value just before
load_model. On CPU the 8 devices live in host memory, so the loaded shards themselves take one
checkpoint's worth: the ideal is ~1.0x; anything above is transient host copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, threading, time
import jax
jax.config.update("jax_num_cpu_devices", 8)
import nld_jax
from nld_jax.sharding import make_mesh
def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon")) / 1024
path, layout = sys.argv[1], sys.argv[2]
mesh = None if layout == "single" else make_mesh(*(int(n) for n in layout.split("x")))
jax.numpy.zeros(1).block_until_ready()
before, peak, done = anon_mb(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
model = nld_jax.load_model(path, dtype="float32", lora=False, mesh=mesh)
jax.block_until_ready(jax.tree.leaves(nld_jax.model.nnx.state(model)))
done.set()
sampler.join()
print(json.dumps({"before_mb": before, "peak_mb": max(peak[0], anon_mb())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    import jax.numpy as jnp
    from flax import nnx

    from nld_jax.config import NLDConfig
    from nld_jax.loading import save_model
    from nld_jax.model import NLDModel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "tests/fixtures/golden/gqa4_theta1e6/config.json")) as f:
        raw = json.load(f)
    raw.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
               num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
               head_dim=args.hidden // 16, vocab_size=32768)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        save_model(NLDModel(NLDConfig.from_dict(raw), dtype=jnp.float32, rngs=nnx.Rngs(0)), path,
                   dtype="float32")
        size_mb = os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20
        print(f"checkpoint {size_mb:.0f} MB (float32, D={args.hidden}, L={args.layers})")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
        for layout in ("single", "1x8", "2x4"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, layout], env=env,
                                 capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            extra = figures["peak_mb"] - figures["before_mb"]
            print(f"{layout:>6}: peak RssAnon {figures['peak_mb']:.0f} MB, {extra:.0f} MB above "
                  f"the pre-load value = {extra / size_mb:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
