"""PPO's training forward+backward on the embedded model: peft's LoRA layers vs the lean addmm path,
and (``--compile``) ``torch.compile`` of each decoder layer, measured in one process against the same
baseline.

    python benchmarks/train_forward.py                 # peft vs lean LoRA, alternating, 3 rounds
    python benchmarks/train_forward.py --compile       # + regional torch.compile, static and dynamic shapes

Workload: SmolLM2-135M-Instruct in NF4, bf16 compute (auto), LoRA r=8 on all linear layers with
random B, lean RMSNorm/SwiGLU installed, 8 rows x (70 prompt + 32 response) tokens; one step =
``forwards.forward_response`` (PPO's logprob forward) + backward of the summed logprobs. Prints
``RESULT name=<path> seconds=<min of repeats>`` and each path's ratio to peft's, plus the largest
logprob difference from peft's path (both bf16: rounding, not error).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of peft / lean")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per round (the minimum is kept)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of each decoder layer")
    a = ap.parse_args()

    from peft import get_peft_model

    from pipeline.config import LoraConfigSection, PipelineConfig
    from pipeline.models import forwards, lean_ops, loading

    cfg = PipelineConfig()
    model, _, _ = loading.load_base(cfg.model)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0)))
    lean_ops.install(pm, lora=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=gen)
    lora_layers = [m for m in pm.modules() if lean_ops.is_peft_lora_linear(m)]

    def batch(prompt: int, response: int):
        q = torch.randint(100, 40000, (8, prompt), generator=gen)
        r = torch.randint(100, 40000, (8, response), generator=gen)
        return q, torch.ones_like(q), r, torch.ones_like(r)

    shapes = batch(70, 32)

    def step(b=shapes) -> torch.Tensor:
        pm.zero_grad(set_to_none=True)
        out = forwards.forward_response(pm, *b, temperature=0.7)
        out.logprobs.sum().backward()
        return out.logprobs.detach()

    def timed(b=shapes) -> float:
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            step(b)
            best = min(best, time.perf_counter() - t)
        return best

    def use(lean: bool) -> None:
        for m in lora_layers:
            if lean:
                m.forward = lean_ops.lora_forward(m)
            elif "forward" in vars(m):
                del m.forward

    use(False)
    reference = step()
    times: dict[str, list[float]] = {"peft": [], "lean": []}
    for _ in range(a.rounds):
        for name in ("peft", "lean"):
            use(name == "lean")
            step()  # warm
            times[name].append(timed())
    diff = (step() - reference).abs().max().item()
    results = {name: min(v) for name, v in times.items()}
    print(f"# lean vs peft: max |logprob difference| {diff:.3f} nats (bf16 rounding)", flush=True)

    if a.compile:
        for dynamic in (False, True):
            torch._dynamo.reset()
            for layer in pm.base_model.model.model.layers:
                layer.compile(dynamic=dynamic)
            name = f"lean+compile-{'dynamic' if dynamic else 'static'}"
            t = time.perf_counter()
            got = step()
            print(f"# {name}: first step (compiles) {time.perf_counter() - t:.1f}s, max |logprob difference| "
                  f"from peft {(got - reference).abs().max().item():.3f} nats", flush=True)
            results[name] = timed()
            other = batch(55, 24)
            t = time.perf_counter()
            step(other)
            print(f"# {name}: first step at a new shape (8 x 55+24) {time.perf_counter() - t:.1f}s", flush=True)
            for layer in pm.base_model.model.model.layers:
                layer._compiled_call_impl = None  # back to eager for the next setting

    for name, seconds in results.items():
        print(f"RESULT name={name} seconds={seconds:.3f} vs_peft={seconds / results['peft']:.3f}", flush=True)


if __name__ == "__main__":
    main()
