"""LoRA fine-tuning (SFT) of a DeepSeek-V3-architecture model with transformers' Trainer and PEFT.

Every kind of target gets an adapter -- attention projections, the dense MLP, shared and routed experts --
on top of the FP8 base, which stays frozen and FP8; the LoraConfig is plain PEFT, as in any LoRA script. The script builds a small chat dataset (questions
about the model, with fixed answers), trains, and prints the loss and a generation before and after.
The routing-bias callback counts expert load (and would update the aux-loss-free biases with gamma > 0).

    python examples/finetune_lora.py [--model DIR] [--steps 60] [--output lora-adapter]
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import modeling_deepseekv3 as ds
from modeling_deepseekv3.training import RoutingBiasCallback

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=Path("checkpoints/tiny-deepseek-v3"))
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--output", type=Path, default=Path("checkpoints/lora-adapter"))
args = parser.parse_args()
if not (args.model / "tokenizer.json").exists():
    ds.make_tiny_checkpoint(args.model, num_shards=3)

tokenizer = ds.load_tokenizer(args.model)
model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
pairs = [
    ("What are the weights stored in?", "Eight-bit floats with block scales."),
    ("How many experts does a token use?", "A few experts chosen by the router."),
    ("What does the cache keep?", "A small latent vector per token."),
    ("What is two plus two?", "Two plus two is four."),
]


def encode(question, answer=None):
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    ids = tokenizer(prompt + answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}  # learn the answers only


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], tokenizer.pad_token_id) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
    }


def answer(question):
    inputs = encode(question)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


dataset = [encode(q, a) for q, a in pairs] * 8
print("before:", repr(answer(pairs[3][0])))
targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))  # plain PEFT, FP8 base
model.print_trainable_parameters()
training = TrainingArguments(
    output_dir=str(args.output),
    max_steps=args.steps,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    lr_scheduler_type="constant",
    logging_steps=10,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
)
trainer = Trainer(
    model=model, args=training, train_dataset=dataset, data_collator=collate, callbacks=[RoutingBiasCallback(gamma=0.0)]
)
result = trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} (final train_loss {result.training_loss:.3f})")
model.eval()
print("after: ", repr(answer(pairs[3][0])))
model.save_pretrained(args.output)
print(f"adapter saved to {args.output} (reload: peft.PeftModel.from_pretrained(base_model, path))")
