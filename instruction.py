"""The Alpaca prompt: what an instruction-tuned model reads before it answers."""


def format_prompt(entry):
    """The Alpaca prompt for {"instruction", "input" (may be empty or absent)}. Training
    (finetune_instruct.py), answering, judging and sample.py --instruction all use this."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"
