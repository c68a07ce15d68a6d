"""FLOPs of one AuraFlow LoKr training step, counted from the model's shapes (matmuls only, 2 per multiply-add).

Why not torch's FlopCounterMode alone: it sees only aten matmul/attention ops, so quanto's int8 matmul (a custom
op) and LyCORIS's fused LoKr kernels on CUDA are missing from its count, and it cannot tell the work a step needs
from the work a particular implementation repeats. The count here is checked against FlopCounterMode on a bf16
model on the CPU (tests/test_bench.py), where every op is visible.

Conventions (one optimizer step of batch B, frozen base, the adapter trained):
- model FLOPs (for MFU): what the step needs without any recompute: the forward (base Linears, attention's QK^T
  and AV over the joint sequence of image tokens, text tokens and AuraFlow's register tokens, the adapter in its
  bypass form), then the backward: input gradients of every base Linear whose input needs a gradient (2x its
  forward matmul; none for the frozen weights themselves, and none before the first adapted layer), attention's
  backward (4 matmuls: dP, dV, dQ, dK), the adapter's input and weight gradients.
- hardware FLOPs (for HFU): model FLOPs plus what this implementation runs again or extra: each checkpointed
  block's forward once more in the backward, the QK^T that flash/memory-efficient attention recomputes in its
  backward (what FlopCounterMode counts for those kernels; not for the math backend), and in LyCORIS's rebuild
  mode (bypass_mode off) the delta-weight matmul with its input and weight gradients.
Elementwise work (norms, activations, modulation, the loss) is left out of both, as in the usual MFU convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepFlops:
    forward: float = 0.0  # model forward
    backward: float = 0.0  # model backward
    recompute: float = 0.0  # checkpointed blocks' forward again (as executed)
    extra: float = 0.0  # executed beyond the model count: rebuild-mode delta matmuls, flash's QK^T recompute
    outside: float = 0.0  # the part of `forward` outside the blocks (never recomputed)
    parts: dict = field(default_factory=dict)  # model FLOPs by kind: base_linear, attention, adapter
    block_forward: list = field(default_factory=list)  # each block's forward as executed

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.model + self.recompute + self.extra

    def add(self, kind: str, fwd: float, bwd: float, extra_fwd: float = 0.0, extra_bwd: float = 0.0,
            in_block: bool = True) -> None:
        self.forward += fwd
        self.backward += bwd
        self.extra += extra_fwd + extra_bwd
        self.parts[kind] = self.parts.get(kind, 0.0) + fwd + bwd
        if in_block:
            self.block_forward[-1] += fwd + extra_fwd
        else:
            self.outside += fwd


def _mm(rows: float, k: int, n: int) -> float:
    return 2.0 * rows * k * n


def _adapter(lora, rows: float, input_live: bool) -> tuple[float, float, float, float]:
    """(model fwd, model bwd, extra fwd, extra bwd) of one LyCORIS module on a Linear over `rows` tokens."""
    out_f, in_f = lora.shape[:2]
    if hasattr(lora, "lokr_w1") or hasattr(lora, "lokr_w1_a"):
        # kron_bypass: h (rows, c, d) -> w2 (b x d, or w2a @ w2b) -> w1 (a x c) mixes the c groups
        if getattr(lora, "use_w1", False):
            a, c = lora.lokr_w1.shape
            w1 = 0.0
        else:
            a, r1 = lora.lokr_w1_a.shape
            c = lora.lokr_w1_b.shape[1]
            w1 = _mm(a, r1, c)  # c = w1a @ w1b, once per call
        if getattr(lora, "use_w2", False):
            b, d = lora.lokr_w2.shape[:2]
            first = [(_mm(rows * c, d, b), input_live)]
        else:
            b, r2 = lora.lokr_w2_a.shape[:2]
            d = lora.lokr_w2_b.shape[1]
            first = [(_mm(rows * c, d, r2), input_live), (_mm(rows * c, r2, b), True)]
        chain = [*first, (_mm(rows * b, c, a), True)]
        fwd = w1 + sum(f for f, _ in chain)
        # each matmul: its weight gradient always (trainable), its input gradient when the input needs one
        bwd = 2 * w1 + sum(f * (1 + live) for f, live in chain)
    elif hasattr(lora, "lora_down"):
        r = lora.lora_down.weight.shape[0]
        chain = [(_mm(rows, in_f, r), input_live), (_mm(rows, r, out_f), True)]
        fwd = sum(f for f, _ in chain)
        bwd = sum(f * (1 + live) for f, live in chain)
    else:
        raise NotImplementedError(f"FLOP count for LyCORIS module {type(lora).__name__}")
    if getattr(lora, "bypass_mode", True):
        return fwd, bwd, 0.0, 0.0
    # rebuild mode: F.linear(x, W + dW - W) on top of the base matmul; kron itself is elementwise
    delta = _mm(rows, in_f, out_f)
    return fwd, bwd, delta - fwd, delta * (1 + input_live) - bwd


def step_flops(transformer: torch.nn.Module, network, *, batch: int, height: int, width: int, text_tokens: int,
               checkpointing: bool, attention_recompute: bool) -> StepFlops:
    """`height`, `width`: the latent's (what the transformer gets); `text_tokens`: the text encoder's sequence
    (the model adds its register tokens); `attention_recompute`: flash/efficient attention (CUDA), not the math
    backend. `network`: the LyCORIS network (or None)."""
    cfg = transformer.config
    p = cfg.patch_size
    img = batch * (height // p) * (width // p)
    txt = batch * (text_tokens + transformer.register_tokens.shape[1])
    joint = img + txt
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    adapters = {id(lora.org_module[0]): lora for lora in (network.loras if network is not None else [])}
    seen: set[str] = set()
    f = StepFlops()

    def linear(name: str, rows: float, input_live: bool, in_block: bool = True) -> bool:
        """Count one Linear; returns whether its output needs a gradient (input did, or it is adapted)."""
        lin = transformer.get_submodule(name)
        seen.add(name)
        fwd = _mm(rows, lin.in_features, lin.out_features)
        f.add("base_linear", fwd, fwd if input_live else 0.0, in_block=in_block)
        lora = adapters.get(id(lin))
        if lora is not None:
            f.add("adapter", *_adapter(lora, rows, input_live), in_block=in_block)
        return input_live or lora is not None

    def attention(live: bool) -> None:
        fwd = 2 * _mm(batch * heads * (joint // batch), head_dim, joint // batch)  # QK^T and AV, per sample
        f.add("attention", fwd, 2 * fwd if live else 0.0, extra_bwd=fwd / 2 if live and attention_recompute else 0.0,
              in_block=True)

    def feed_forward(prefix: str, rows: float, live: bool) -> bool:
        mid = linear(f"{prefix}.linear_1", rows, live) | linear(f"{prefix}.linear_2", rows, live)
        return linear(f"{prefix}.out_projection", rows, mid)

    # outside the blocks (never checkpointed): the timestep MLP, patch embedding, caption projection
    temb = linear("time_step_proj.linear_1", batch, False, False)
    temb = linear("time_step_proj.linear_2", batch, temb, False)
    img_live = linear("pos_embed.proj", img, False, False)
    txt_live = linear("context_embedder", batch * text_tokens, False, False)
    for i in range(len(transformer.joint_transformer_blocks)):
        b = f"joint_transformer_blocks.{i}"
        f.block_forward.append(0.0)
        mod = linear(f"{b}.norm1.linear", batch, temb)  # the modulation: shift, scale, gate from temb
        cmod = linear(f"{b}.norm1_context.linear", batch, temb)
        q = [linear(f"{b}.attn.to_{x}", img, img_live or mod) for x in "qkv"]
        kv = [linear(f"{b}.attn.add_{x}_proj", txt, txt_live or cmod) for x in "qkv"]
        attn = any(q + kv)
        attention(attn)
        img_live = linear(f"{b}.attn.to_out.0", img, attn) or img_live or mod
        txt_live = linear(f"{b}.attn.to_add_out", txt, attn) or txt_live or cmod
        img_live = feed_forward(f"{b}.ff", img, img_live) or img_live
        txt_live = feed_forward(f"{b}.ff_context", txt, txt_live) or txt_live
    live = img_live or txt_live
    for i in range(len(transformer.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        f.block_forward.append(0.0)
        mod = linear(f"{b}.norm1.linear", batch, temb)
        qkv = [linear(f"{b}.attn.to_{x}", joint, live or mod) for x in "qkv"]
        attention(any(qkv))
        live = linear(f"{b}.attn.to_out.0", joint, any(qkv)) or live or mod
        live = feed_forward(f"{b}.ff", joint, live) or live
    mod = linear("norm_out.linear", batch, temb, False)
    linear("proj_out", img, live or mod, False)
    missed = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n not in seen)
    if missed:  # a diffusers change to the architecture: the count must be updated, not silently short
        raise NotImplementedError(f"Linears not in the FLOP count: {missed[:5]}")
    if checkpointing:
        f.recompute = sum(f.block_forward)
    return f


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by the name torch.cuda.get_device_name() reports. Checked in
# order: the first substring that matches wins (NVL/PCIe before the bare name).
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0), ("RTX A6000", 155.0), ("B200", 2250.0),
]
H100_SMS = {132: 989.0, 114: 756.0}  # a bare "H100" name: SXM has 132 SMs, PCIe 114 (NVL says so in its name)


def peak_tflops(name: str, sm_count: int | None = None) -> float | None:
    """The card's dense bf16 peak, or None when the name is not one we know (then no MFU is reported)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    if "H100" in name and sm_count in H100_SMS:
        return H100_SMS[sm_count]
    return None
