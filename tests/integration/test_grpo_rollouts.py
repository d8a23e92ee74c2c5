"""TRL's GRPOTrainer with ``use_transformers_continuous_batching=True`` on the shipped FP8 model, LoRA over the FP8
weights: the rollouts go through ``generate_batch`` and the paged latent cache (``PagedLatentBatch``), every step logs
a finite loss and reward, the adapters move and the FP8 storage does not."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import ROOT, load

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("peft")
import datasets
import trl
from peft import LoraConfig

import modeling_deepseekv3 as ds
from modeling_deepseekv3.generation.continuous_batching import ContinuousBatchingSupport
from modeling_deepseekv3.generation.paged_latents import PagedLatentBatch

SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
STEPS = 2
GENERATIONS = 4
COMPLETION = 8
PROMPTS = [
    "To be, or not to be:",
    "Now is the winter of our",
    "Friends, Romans, countrymen,",
    "All the world's a stage,",
    "O Romeo, Romeo! wherefore",
    "Shall I compare thee to",
    "The quality of mercy is",
    "Once more unto the breach,",
]


def vowel_fraction(completions, **kwargs) -> list[float]:
    """The toy reward: the fraction of a completion's characters that are vowels (continuous, so a group of sampled
    completions almost never ties and the advantages are non-zero)."""
    return [sum(c in "aeiouAEIOU" for c in text) / max(len(text), 1) for text in completions]


@pytest.mark.slow  # TRL: two GRPO steps, each a continuous-batching rollout plus a LoRA update
def test_grpo_rollouts_through_continuous_batching_train_lora_on_fp8(tmp_path, monkeypatch):
    attends = []
    attend = PagedLatentBatch.attend

    def counting_attend(self, module, *args):
        attends.append(sum(g.requests for g in self.groups))
        return attend(self, module, *args)

    rollouts = []
    generate_batch = ContinuousBatchingSupport.generate_batch

    def spying_generate_batch(self, inputs, *args, **kwargs):
        out = generate_batch(self, inputs, *args, **kwargs)
        rollouts.append((len(inputs), [len(o.generated_tokens) for o in out.values()]))
        return out

    caches = []
    init = ContinuousBatchingSupport.init_continuous_batching

    def spying_init(self, *args, **kwargs):
        manager = init(self, *args, **kwargs)
        caches.append(manager.continuous_batching_config.num_blocks * manager.continuous_batching_config.page_size)
        return manager

    monkeypatch.setattr(ContinuousBatchingSupport, "init_continuous_batching", spying_init)
    monkeypatch.setattr(PagedLatentBatch, "attend", counting_attend)
    monkeypatch.setattr(ContinuousBatchingSupport, "generate_batch", spying_generate_batch)

    model = load(SHIPPED)
    assert model.fp8_modules()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=COMPLETION,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        use_transformers_continuous_batching=True,  # TRL's cache setting (max_memory_percent 0.5) bounds ours
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=vowel_fraction,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=ds.load_tokenizer(SHIPPED),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    peft_model = trainer.model
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    frozen = {n: t.detach().clone() for n, t in [*peft_model.named_parameters(), *peft_model.named_buffers()]}
    frozen = {n: t for n, t in frozen.items() if "lora_" not in n}
    fp8_weights = {n for n, t in frozen.items() if t.dtype == torch.float8_e4m3fn}
    assert lora and any(".mlp.experts." in n for n in lora) and fp8_weights

    trainer.train()

    # (1) every rollout went through generate_batch and the paged latent cache, several requests per forward
    assert len(rollouts) == STEPS, rollouts
    for n, lengths in rollouts:
        assert n == GENERATIONS and len(lengths) == n, rollouts  # every request came back
        assert all(1 <= k <= COMPLETION for k in lengths), rollouts
    # the cache holds what the rollout needs (prompts + completions), not half the host's RAM
    assert caches and all(c <= GENERATIONS * 256 for c in caches), caches
    assert attends, "no forward ran on the paged latent cache"
    assert max(attends) > 1, "no step attended several requests at once"
    # (2) a finite loss and reward logged for each step
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1)), trainer.state.log_history
    for e in logs:
        assert math.isfinite(e["loss"]) and 0.0 <= e["reward"] <= 1.0, e
        assert math.isfinite(e["rewards/vowel_fraction/mean"]), e
    # (3) the adapters moved; the FP8 codes, scales and everything else outside LoRA did not
    after = dict(peft_model.named_parameters())
    moved = {n for n, p in lora.items() if not torch.equal(after[n].detach(), p)}
    assert any("lora_B" in n for n in moved) and any(".self_attn." in n for n in moved), sorted(moved)[:5]
    state = {**dict(peft_model.named_parameters()), **dict(peft_model.named_buffers())}
    for n, t in frozen.items():
        assert t.dtype == state[n].dtype and torch.equal(state[n].detach(), t), n
