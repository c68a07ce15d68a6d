"""Model set-up on the tiny AuraFlow: quantised bases stay frozen, checkpointing keeps gradients,
every optimizer and schedule the settings allow really builds and steps."""
from __future__ import annotations

import pytest
import torch

from job import model, train
from job.config import OPTIMIZERS, build_settings
from job.pipeline import DEMO_LYCORIS


def settings(**kw):
    base = {"dataset_id": "x", "push_to_hub": "false", "mixed_precision": "no", "resolution": "64",
            "validation_resolution": "64"}
    return build_settings([{**base, **{k: str(v) for k, v in kw.items()}}])


def adapter_grads(tiny_model, **kw) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    s = settings(**kw)
    tr = model.load_transformer(tiny_model, s, torch.device("cpu"))
    torch.manual_seed(0)
    net = model.create_adapter(tr, DEMO_LYCORIS, model.train_dtype(s))
    with torch.no_grad():  # LoKr starts as a zero delta; perturb it so gradients reach every factor
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g)
    out = tr(x.to(model.train_dtype(s)), emb.to(model.train_dtype(s)), torch.tensor([0.3, 0.8]), return_dict=False)[0]
    out.float().square().mean().backward()
    return tr, {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto"])
def test_quantised_base_is_frozen_and_adapter_learns(tiny_model, precision):
    from optimum.quanto import QLinear

    tr, grads = adapter_grads(tiny_model, base_model_precision=precision, gradient_checkpointing="false")
    assert sum(isinstance(m, QLinear) for m in tr.modules()) >= 10  # the blocks' Linears really are quantised
    base = [p for n, p in tr.named_parameters() if "lycoris" not in n]
    assert base and not any(p.requires_grad for p in base)  # quanto's freeze() re-enables grad; we undo it
    assert all(p.grad is None for p in base)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    _, plain = adapter_grads(tiny_model, gradient_checkpointing="false")
    _, ckpt = adapter_grads(tiny_model, gradient_checkpointing="true")
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-7)


def test_bf16_mixed_precision_trains_bf16_adapter(tiny_model):
    _, grads = adapter_grads(tiny_model, mixed_precision="bf16", gradient_checkpointing="false")
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if not o.endswith("-paged")])
def test_every_optimizer_steps(name):
    dtype = torch.bfloat16 if name == "adamw_bf16" else torch.float32
    mp = "bf16" if name == "adamw_bf16" else "no"
    p = torch.nn.Parameter(torch.randn(128, 64).to(dtype))  # > 4096 elements: bnb keeps 8-bit state for it
    before = p.detach().clone()
    opt = train.make_optimizer([p], settings(optimizer=name, mixed_precision=mp).training)
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_paged_optimizers_and_nf4_need_cuda():
    s = settings(optimizer="bnb-lion8bit-paged", base_model_precision="nf4-bnb")
    problems = model.device_problems(s, torch.device("cpu"))
    assert any("OPTIMIZER=bnb-lion8bit-paged" in p for p in problems)
    assert any("BASE_MODEL_PRECISION=nf4-bnb" in p for p in problems)
    assert model.device_problems(s, torch.device("cuda")) == []


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "polynomial"])
def test_every_schedule_warms_up_and_runs(name):
    p = torch.nn.Parameter(torch.zeros(1))
    t = settings(lr_scheduler=name, lr_warmup_steps=4, learning_rate=1.0, optimizer="adamw").training
    opt = train.make_optimizer([p], t)
    sched = train.make_scheduler(opt, t, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1.0)  # "constant" with warm-up warms up too (seed config)
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.5


def test_bf16_forward_keeps_an_adapter_delta_below_half_an_ulp_of_the_weight(tiny_model):
    """bf16 base weights of ±1 (ulp 2^-7) and a LoKr delta of 2^-10 everywhere. Input x = (1, 1, 0, …) against
    weight columns (1, -1, 0, …): the base output is exactly 0, and the adapter must add ΔW·x = 2·2^-10. The rebuild
    path's ((W + ΔW) - W)·x loses the delta where |W| = 1 (half an ulp is 2^-8) and gives exactly 0."""
    s = settings(mixed_precision="bf16", gradient_checkpointing="false")
    tr = model.load_transformer(tiny_model, s, torch.device("cpu"))
    net = model.create_adapter(tr, DEMO_LYCORIS, model.train_dtype(s))
    delta = 2.0 ** -10
    assert net.loras
    for lora in net.loras:
        layer = lora.org_module[0]
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight[:, 0], layer.weight[:, 1] = 1.0, -1.0
            if layer.bias is not None:
                layer.bias.zero_()
            lora.lokr_w1.fill_(1.0)  # kron(w1, w2) · scale = delta everywhere
            lora.lokr_w2.fill_(delta / float(lora.scale))
        x = torch.zeros(1, 2, layer.in_features, dtype=torch.bfloat16)
        x[..., :2] = 1.0
        assert lora.org_forward(x).abs().max() == 0
        torch.testing.assert_close(layer(x).float(), torch.full((1, 2, layer.out_features), 2 * delta), rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, {"quantize_via": "cpu"}, {"enable_group_offload": "true"},
                                   {"enable_model_cpu_offload": "true"}])
def test_the_base_is_quantised_one_block_at_a_time_to_the_same_weights(tiny_model, monkeypatch, extra):
    """Never the whole bf16 model on the device at once (on a GPU the freed bf16 blocks would stay reserved as
    fragments), and the same int8 weights as quantising the whole model in one call."""
    from diffusers import AuraFlowTransformer2DModel

    from job import offload

    sizes = []
    real = model.quantize_quanto
    monkeypatch.setattr(model, "quantize_quanto",
                        lambda m, p: (sizes.append(sum(t.numel() for t in m.parameters())), real(m, p))[1])
    s = settings(base_model_precision="int8-quanto", **extra)
    tr = model.load_transformer(tiny_model, s, torch.device("cpu"))
    block = max(sum(t.numel() for t in b.parameters()) for b in offload.blocks(tr))
    assert sizes and max(sizes) <= block, (sizes, block)

    whole = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    real(whole, "int8-quanto")
    if extra:  # offloading exposes the payload as plain parameters: compare the same form
        offload.expose_quantized_payload(whole)
    want, got = whole.state_dict(), tr.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(torch.as_tensor(got[k].dequantize() if hasattr(got[k], "dequantize") else got[k]),
                           torch.as_tensor(want[k].dequantize() if hasattr(want[k], "dequantize") else want[k])), k


def test_the_encoders_are_freed_once_the_caches_are_written(tiny_model, tmp_path, monkeypatch):
    """The VAE and the text encoder hold GPU memory the transformer needs: gone (collected) when caching returns."""
    import weakref

    from job import builtin, data

    alive = {}
    load_vae, load_text = model.load_vae, model.load_text_encoder

    def keep(name, loader):
        def load(*a):
            m = loader(*a)
            alive[name] = weakref.ref(m.text_encoder if name == "text" else m)
            return m
        return load

    monkeypatch.setattr(model, "load_vae", keep("vae", load_vae))
    monkeypatch.setattr(model, "load_text_encoder", keep("text", load_text))
    folder = builtin.single_image_dataset_dir(tmp_path, caption="a red circle", size=32)
    g = data.Framing(32, "pixel", True, "center", "square", 16, 512)
    samples = data.discover(data.Folder(folder, "textfile", ""), g)
    data.encode_images(tiny_model, samples, [tmp_path / "vae"] * len(samples), 1, torch.device("cpu"))
    data.encode_captions(tiny_model, ["a red circle", ""], tmp_path / "text", torch.device("cpu"))
    assert set(alive) == {"vae", "text"} and all(ref() is None for ref in alive.values())


def test_cpu_refuses_quantised_bf16_weights_offloaded_to_disk():
    """torch's CPU int8 kernel segfaults on them (seen with bench/host_ram.py's smoke model): exit 2, not a crash."""
    s = settings(base_model_precision="int8-quanto", mixed_precision="bf16", enable_group_offload="true",
                 group_offload_to_disk_path="/tmp/offload")
    problems = model.device_problems(s, torch.device("cpu"))
    assert len(problems) == 1 and "GROUP_OFFLOAD_TO_DISK_PATH" in problems[0] and "MIXED_PRECISION" in problems[0]
    assert model.device_problems(s, torch.device("cuda")) == []
    assert model.device_problems(settings(base_model_precision="int8-quanto", mixed_precision="no",
                                          enable_group_offload="true", group_offload_to_disk_path="/tmp/o"),
                                 torch.device("cpu")) == []
