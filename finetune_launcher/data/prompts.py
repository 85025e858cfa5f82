"""Instruction templates, shared by training (data.py) and generation (tools/generate.py)."""

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n"
CONTEXT_TEMPLATE = "### Context:\n{context}\n\n"
RESPONSE_HEADER = "### Response:\n"


def render_instruction_prompt(instruction: str, context: str = "") -> str:
    """The prompt part of an instruction example; the response follows it directly."""
    prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction.strip())
    if context and context.strip():
        prompt += CONTEXT_TEMPLATE.format(context=context.strip())
    return prompt + RESPONSE_HEADER


# A minimal chat template for the embedded tiny tokenizer (real models bring their own).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
