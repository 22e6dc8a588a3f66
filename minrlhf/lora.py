"""LoRA (Hu et al. 2021), written out: a frozen layer W plus a trainable low-rank update,
W x + (alpha / r) B A x. A (r, in) starts random and B (out, r) at zero, so training starts exactly at the
base model. `add_lora` freezes every other weight (train.py then lets a reward model's or critic's score
head, and PPO's value head, train whole): no gradients and no Adam state for the base weights, and the base
model itself, with the adapters switched off, is the frozen reference of the KL penalty and of DPO.
Shapes: r rank, in / out the layer's input and output features."""
import contextlib
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer: y = x W + b, W stored (in, out)


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or Conv1D) with a low-rank update beside it; `enabled=False` is the base."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        n_in, n_out = features(base)
        self.base, self.scaling, self.enabled = base, alpha / rank, True
        # A drawn as nn.Linear's weights, as loralib and PEFT (Hu et al. draw it from a Gaussian): any A, as B
        # is 0. In float32, then in the layer's dtype: under --bf16, the float32 run's A rounded
        lora_A = nn.init.kaiming_uniform_(torch.empty(rank, n_in, dtype=torch.float32), a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A.to(base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=base.weight.dtype))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T).to(y.dtype) * self.scaling


def features(layer):
    """(in, out) of an nn.Linear or Conv1D, from its attributes: under ZeRO-3 its weight is a partition."""
    return (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else (layer.nx, layer.nf)


def add_lora(model, rank, alpha, targets="all-linear"):
    """Freeze every weight of `model`, then wrap the target layers in LoRALinear (only their A and B train).
    targets: "all-linear", every nn.Linear / Conv1D in the transformer body (`model.base_model`), i.e. the
    attention and MLP projections of any family and not the LM or score head; or comma-separated names
    ("q_proj,v_proj"), matched against the last part of each layer's module name. -> how many it wrapped."""
    model.requires_grad_(False)
    names = targets.split(",")
    chosen = [(name, module) for name, module in model.base_model.named_modules()
              if isinstance(module, (nn.Linear, Conv1D))
              and (targets == "all-linear" or name.split(".")[-1] in names)]
    widths = {name: min(features(module)) for name, module in chosen}  # each layer's full rank
    narrowest = min(widths, key=widths.get, default=None)
    if narrowest and rank > widths[narrowest]:  # checked before any A (rank, in) is allocated
        raise ValueError(f"rank {rank} is above {narrowest}'s full rank, min(in, out) = {widths[narrowest]}")
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.base_model.get_submodule(parent), child, LoRALinear(module, rank, alpha))
    return len(chosen)


@contextlib.contextmanager
def adapters_disabled(model):
    """Within: `model` computes as its base model, adapters off; after: each as it was."""
    layers = {m: m.enabled for m in model.modules() if isinstance(m, LoRALinear)}
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in layers.items():
            layer.enabled = enabled


class WithoutAdapters:
    """The frozen reference as a callable model: `model` with its adapters switched off for each call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with adapters_disabled(self.model):
            return self.model(**inputs)


def merged_state_dict(model, state):
    """`state` (model.state_dict(), or ZeRO-3's gathered copy) with every adapter merged into its layer,
    W + (alpha / r) B A, under the names the model has without LoRALinear: what plain transformers loads. The
    sums in float32, and with any, the whole state: under --bf16 W is bf16, beside which most of a small
    update B A would round away in a bf16 sum (the saved model would not be the one trained)."""
    state, merged = dict(state), False
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            A, B, W = (state.pop(f"{name}.{key}") for key in ("lora_A", "lora_B", "base.weight"))
            delta = layer.scaling * (B.float() @ A.float())  # (out, in)
            state[f"{name}.weight"] = W.float() + (delta if isinstance(layer.base, nn.Linear) else delta.T)
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
            merged = True
    return {k: v.float() if merged and v.is_floating_point() else v for k, v in state.items()}
