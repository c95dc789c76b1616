"""Built-in chat templates (Jinja, the same form as a tokenizer's `chat_template`).

`model.chat_template: NAME` picks one; None uses the tokenizer's own; a path ending in .jinja
is read from that file; any other string is a Jinja template. A template must render a
conversation prefix by prefix (the text of the first k turns is the start of the text of all
turns), which tokenize.py checks row by row.

Tools, tool calls and reasoning (the `tools` column, assistant `tool_calls`, assistant
`reasoning_content`):

    chatml  Qwen2.5 / Hermes style. Tools: a "# Tools" block with one JSON schema per line
            inside <tools></tools> in the system turn. A tool call, inside the assistant turn:
            <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> (one per call).
            Tool results: one user turn holding <tool_response>\n...\n</tool_response> per
            result. Reasoning: <think>\n...\n</think>\n\n before the answer.
    llama3  Llama 3.1 style. Tools: "Environment: ipython" and the JSON schemas in the system
            turn. A tool call: {"name": ..., "parameters": {...}} as the assistant turn's text
            (one per line). Tool results: an `ipython` turn. Reasoning: as chatml.
    alpaca, plain, and any template that ignores one of these: chat_template.py writes it
            into the text instead (tools: "You can call these tools:\n[...]" in the system
            turn; a tool call: {"name": ..., "arguments": {...}} lines after the answer;
            reasoning: <think>\n...\n</think>\n\n before the answer).

Rendering of conversations without tools or reasoning is unchanged from earlier versions.
"""
from __future__ import annotations

_CHATML_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_CHATML_CALL_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>")
_LLAMA3_TOOLS = (
    "Environment: ipython\n\nYou have access to the following functions. To call a function, please respond with "
    "JSON for a function call. Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}. Do not use variables.\n\n")
_THINK = "{%- if m.get('reasoning_content') %}{{- '<think>\\n' + m['reasoning_content'] | trim + '\\n</think>\\n\\n' }}{%- endif %}\n"

BUILTIN = {
    # ChatML (Qwen, many community models)
    "chatml": (
        "{%- if tools %}\n"
        "{{- '<|im_start|>system\\n' }}\n"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}\n"
        "{{- '" + _CHATML_TOOLS.replace("\n", "\\n") + "' }}\n"
        "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}\n"
        "{{- '" + _CHATML_CALL_FORMAT.replace("\n", "\\n") + "<|im_end|>\\n' }}\n"
        "{%- endif %}\n"
        "{%- for m in messages %}\n"
        "{%- if m['role'] == 'system' and tools %}\n"          # already written with the tools
        "{%- elif m['role'] == 'tool' %}\n"
        "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}\n"
        "{{- '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}\n"
        "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
        "{%- elif m['role'] == 'assistant' %}\n"
        "{{- '<|im_start|>assistant\\n' }}\n" + _THINK +
        "{{- m['content'] }}\n"
        "{%- for call in m.get('tool_calls') or [] %}\n"
        "{%- if m['content'] or not loop.first %}{{- '\\n' }}{%- endif %}\n"
        "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' + "
        "call['function']['arguments'] | tojson + '}\\n</tool_call>' }}\n"
        "{%- endfor %}\n"
        "{{- '<|im_end|>\\n' }}\n"
        "{%- else %}\n"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\n"
        "{%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Llama 3 / 3.1 instruct
    "llama3": (
        "{{- bos_token }}\n"
        "{%- if tools %}\n"
        "{%- set system = messages[0]['content'] | trim if messages[0]['role'] == 'system' else '' %}\n"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n" + _LLAMA3_TOOLS.replace("\n", "\\n") + "' }}\n"
        "{{- tools | map('tojson', indent=4) | join('\\n\\n') }}\n"
        "{{- ('\\n\\n' + system if system else '') + '<|eot_id|>' }}\n"
        "{%- endif %}\n"
        "{%- for m in messages %}\n"
        "{%- if m['role'] == 'system' and tools %}\n"          # already written with the tools
        "{%- elif m['role'] == 'assistant' %}\n"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n" + _THINK +
        "{{- m['content'] | trim }}\n"
        "{%- for call in m.get('tool_calls') or [] %}\n"
        "{%- if m['content'] | trim or not loop.first %}{{- '\\n' }}{%- endif %}\n"
        "{{- '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' + "
        "call['function']['arguments'] | tojson + '}' }}\n"
        "{%- endfor %}\n"
        "{{- '<|eot_id|>' }}\n"
        "{%- else %}\n"
        "{{- '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role']) + '<|end_header_id|>\\n\\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
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
