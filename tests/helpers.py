"""Small helpers shared by test modules (importable: pytest puts tests/ on sys.path)."""
import torch


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def randomize_lora_b(model: torch.nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Give every LoRA B matrix random values: peft starts B at zero, which makes any adapter a no-op
    and any comparison between adapter paths trivially equal. Draws from ``generator`` when given,
    else from the global RNG."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                if generator is None:
                    p.normal_(0, std)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


class Payload:
    """Unpickling this creates the file ``marker``: it stands for any code a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
