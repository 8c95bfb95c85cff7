"""LoRA (peft) on the generator adapters, full fine-tuning, and gradient checkpointing.

Known answers: the disabled adapter is the base model bit for bit; a saved LoRA reloaded by us or by
diffusers' ``pipeline.load_lora_weights`` gives the same outputs (pipeline call included); checkpointed
gradients equal plain ones.
"""

from __future__ import annotations

import pytest
import torch
from generators_helpers import BUILDERS, PROMPTS, no_network, rel_err, single_thread, text_kwargs  # noqa: F401

from diffalign.generators import adapter_for_pipeline
from diffalign.generators.lora import is_lora_parameter
from samplers import rollout

NAMES = ["sd3", "flux", "sd15"]


def _setup(name, guidance=1.0):
    gen = adapter_for_pipeline(BUILDERS[name]())
    cond = gen.encode_prompts(PROMPTS, guidance_scale=guidance, **text_kwargs(name))
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = gen.make_schedule(4, 32, 32).timesteps[1].expand(2)
    return gen, cond, x, t


def _perturb_lora(gen, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if is_lora_parameter(n):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", NAMES)
def test_lora_attach_and_disabled_reference(name):
    gen, cond, x, t = _setup(name)
    with torch.no_grad():
        base = gen.predict(x, t, cond)
    n_all = sum(1 for _ in gen.denoiser.parameters())
    assert len(gen.trainable_parameters()) == n_all  # full fine-tuning until a LoRA is attached

    gen.add_lora(rank=4, alpha=8)
    trainable = gen.trainable_parameters()
    names = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_parameter(n, "default") for n in names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    expected = {"to_q", "to_k", "to_v", "0"} | (
        {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} if name != "sd15" else set()
    )
    assert targets == expected
    with torch.no_grad():
        assert torch.equal(gen.predict(x, t, cond), base)  # gaussian init keeps B = 0
        _perturb_lora(gen)
        adapted = gen.predict(x, t, cond)
        with gen.disable_adapter():
            reference = gen.predict(x, t, cond)
        again = gen.predict(x, t, cond)
    assert rel_err(adapted, base) > 1e-3
    assert torch.equal(reference, base)
    assert torch.equal(again, adapted)
    assert [p.requires_grad for p in gen.denoiser.parameters()] == [
        p in set(trainable) for p in gen.denoiser.parameters()
    ]


def test_default_targets_are_flow_grpos_joint_attention_only():
    # SD3.5-Medium's blocks have a second, image-only attention (attn2) with the same projection names; Flow-GRPO
    # adapts `attn.to_q`, ... only, so the default targets leave attn2 frozen
    gen = adapter_for_pipeline(BUILDERS["sd35m"]())
    assert any(".attn2.to_q" in n for n, _ in gen.denoiser.named_modules())
    gen.add_lora(rank=2)
    names = [n for n, p in gen.denoiser.named_parameters() if p.requires_grad]
    assert names and not any(".attn2." in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    assert {f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                       "add_k_proj", "add_v_proj", "to_add_out")} <= adapted
    # a LoRA trained with the earlier bare-name default (attn2 adapted too) fails with the setting that loads it
    old = adapter_for_pipeline(BUILDERS["sd35m"]())
    bare = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    old.add_lora(rank=2, target_modules=bare)
    with pytest.raises(ValueError, match=r"attn2.*model.lora.target_modules: \[to_q"):
        gen.load_lora_state_dict(old.lora_state_dict())
    again = adapter_for_pipeline(BUILDERS["sd35m"]())
    again.add_lora(rank=2, target_modules=bare)
    again.load_lora_state_dict(old.lora_state_dict())


def test_lora_init_default_is_peft_kaiming():
    gen, cond, x, t = _setup("sd3")
    with torch.no_grad():
        base = gen.predict(x, t, cond)
    gen.add_lora(rank=2, init="default")  # peft's init_lora_weights=True: A random, B = 0
    a = [p for n, p in gen.denoiser.named_parameters() if "lora_A" in n]
    b = [p for n, p in gen.denoiser.named_parameters() if "lora_B" in n]
    assert a and all(bool(p.abs().sum() > 0) for p in a) and all(bool((p == 0).all()) for p in b)
    with torch.no_grad():
        assert torch.equal(gen.predict(x, t, cond), base)


def test_lora_errors_and_state_dict_round_trip():
    gen, cond, x, t = _setup("sd3")
    with pytest.raises(ValueError, match="frozen copy"):
        with gen.disable_adapter():
            pass
    gen.add_lora(rank=2)
    with pytest.raises(ValueError, match="already has"):
        gen.add_lora(rank=2)
    _perturb_lora(gen)
    state = {k: v.clone() for k, v in gen.lora_state_dict().items()}
    with torch.no_grad():
        adapted = gen.predict(x, t, cond)
        for p in gen.trainable_parameters():
            p.zero_()
        gen.load_lora_state_dict(state)
        assert torch.equal(gen.predict(x, t, cond), adapted)
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        gen.lora_state_dict("other")


@pytest.mark.parametrize("name", NAMES + ["sdxl"])
def test_lora_save_reload_and_diffusers_load(name, tmp_path):
    guidance = 3.5 if name == "flux" else 4.0
    gen, cond, x, t = _setup(name, guidance)
    gen.add_lora(rank=4, alpha=2)
    _perturb_lora(gen)
    gen.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()

    # Our reload into a fresh pipeline.
    fresh = adapter_for_pipeline(BUILDERS[name]())
    fresh.load_lora(str(tmp_path))
    assert fresh.trainable_parameters() and all(
        is_lora_parameter(n, "default") for n, p in fresh.denoiser.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        assert torch.allclose(
            fresh.predict(x, t, cond, guidance), gen.predict(x, t, cond, guidance), atol=1e-6
        )

    # diffusers' own loader on the matching pipeline; compare full pipeline calls with our ODE rollout.
    pipe = BUILDERS[name]()
    pipe.load_lora_weights(str(tmp_path))
    expected = pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=guidance,
        output_type="latent",
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(5),
        **text_kwargs(name),
    ).images
    x_T = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(5))
    step = "flow_euler" if gen.kind == "flow" else "ddim"
    ours = rollout(
        gen.model_fn(cond, guidance), gen.make_schedule(3, 32, 32), x_T, step=step, noise_level=0.0
    )
    assert rel_err(ours.final, expected) < 1e-5
    with torch.no_grad(), gen.disable_adapter():
        base = rollout(
            gen.model_fn(cond, guidance), gen.make_schedule(3, 32, 32), x_T, step=step, noise_level=0.0
        )
    assert rel_err(base.final, expected) > 1e-4  # the LoRA mattered


def test_load_lora_frozen_keeps_other_flags(tmp_path):
    gen = _setup("sd15")[0]
    gen.add_lora(rank=2)
    gen.save_lora(str(tmp_path))
    fresh = adapter_for_pipeline(BUILDERS["sd15"]())
    fresh.load_lora(str(tmp_path), adapter_name="ref", trainable=False)
    assert len(fresh.trainable_parameters()) == sum(
        1 for n, _ in fresh.denoiser.named_parameters() if not is_lora_parameter(n)
    )
    with pytest.raises(ValueError, match="does not exist"):
        fresh.load_lora(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["sd3", "sd15"])
def test_a_second_frozen_lora_adds_to_the_trained_one(name, tmp_path):
    """diffusers makes a newly loaded adapter the only active one: a frozen second LoRA loaded beside the trained
    one switched the trained one off (its weights no longer reached the prediction or the gradient). Now both
    are active, the prediction moves by the sum of their deltas (LoRA deltas add), and only the first trains."""
    gen, cond, x, t = _setup(name)
    gen.add_lora(rank=2)
    _perturb_lora(gen, seed=1)
    gen.save_lora(str(tmp_path))
    with torch.no_grad():
        with gen.disable_adapter():
            base = gen.predict(x, t, cond)
        one = gen.predict(x, t, cond)
    gen.load_lora(str(tmp_path), adapter_name="ref", trainable=False)
    assert set(gen.denoiser.active_adapters()) == {"default", "ref"}
    doubled, *_ = _setup(name)  # the same LoRA twice = one LoRA with B doubled (s B A twice in every layer)
    doubled.add_lora(rank=2)
    doubled.load_lora_state_dict({k: 2 * v if "lora_B" in k else v for k, v in gen.lora_state_dict().items()})
    with torch.no_grad():
        both = gen.predict(x, t, cond)
        assert rel_err(both, doubled.predict(x, t, cond)) < 1e-5
    assert rel_err(both, one) > 1e-3 and rel_err(one, base) > 1e-3
    trained = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert trained and all(is_lora_parameter(n, "default") for n in trained)
    gen.predict(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in gen.trainable_parameters())


def test_lora_dropout_is_off_outside_training_mode():
    """peft builds the LoRA modules in train mode while diffusers' denoiser is in eval mode: with dropout every
    rollout and rescoring was random (the GRPO ratio was not 1 at equal weights). The LoRA follows the
    denoiser's mode."""
    gen, cond, x, t = _setup("sd15")
    assert not gen.denoiser.training
    gen.add_lora(rank=4, dropout=0.5)
    _perturb_lora(gen)
    assert not any(m.training for m in gen.denoiser.modules())
    with torch.no_grad():
        assert torch.equal(gen.predict(x, t, cond), gen.predict(x, t, cond))


def test_full_finetuning_updates_denoiser_only():
    gen, cond, x, t = _setup("sd3")
    params = gen.trainable_parameters()
    assert len(params) == sum(1 for _ in gen.denoiser.parameters())
    assert not any(p.requires_grad for p in gen.pipeline.text_encoder.parameters())
    assert not any(p.requires_grad for p in gen.pipeline.vae.parameters())
    with torch.no_grad():
        before = gen.predict(x, t, cond)
    opt = torch.optim.SGD(params, lr=1e-2)
    gen.predict(x, t, cond).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert rel_err(gen.predict(x, t, cond), before) > 1e-4


def _grads(gen, cond, x, t, guidance):
    gen.denoiser.zero_grad(set_to_none=True)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    (gen.predict(x, t, cond, guidance) - target).square().mean().backward()
    return [p.grad.clone() for p in gen.trainable_parameters()]


@pytest.mark.parametrize("name,lora", [("sd3", True), ("flux", True), ("sd15", True), ("sd3", False)])
def test_gradient_checkpointing_same_gradients(name, lora):
    guidance = 2.0 if name != "flux" else 3.5
    gen, cond, x, t = _setup(name, guidance)
    if lora:
        gen.add_lora(rank=4)
        _perturb_lora(gen)
    plain = _grads(gen, cond, x, t, guidance)

    # A checkpointed block runs again during backward: count block entries to prove checkpointing is on
    # (a pre-hook: non-reentrant checkpointing stops recomputing early, so post-hooks may not fire).
    block = gen.denoiser.transformer_blocks[0] if gen.kind == "flow" else gen.denoiser.up_blocks[0].resnets[0]
    calls = []
    handle = block.register_forward_pre_hook(lambda *a: calls.append(1))
    gen.enable_gradient_checkpointing()
    ckpt = _grads(gen, cond, x, t, guidance)
    handle.remove()
    assert len(calls) == 2
    assert len(plain) == len(ckpt) and plain
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
