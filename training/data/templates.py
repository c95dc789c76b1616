"""Built-in chat templates (Jinja, the same form as a tokenizer's `chat_template`).

`model.chat_template: NAME` picks one; None uses the tokenizer's own; any other string is a
Jinja template. A template must render a conversation prefix by prefix (the text of the first
k turns is the start of the text of all turns), which tokenize.py checks row by row.
"""
from __future__ import annotations

BUILTIN = {
    # ChatML (Qwen, many community models)
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 instruct
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Stanford Alpaca prompt; suits base models whose tokenizer has no template (e.g. stories260K)
    "alpaca": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token }}"
        "{% else %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # Minimal: user text, newline, assistant text + eos. For tiny base models.
    "plain": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token + '\n' }}{% else %}{{ m['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
}
# Tokens a template needs that a tokenizer may lack: added as special tokens (embeddings resized).
SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
