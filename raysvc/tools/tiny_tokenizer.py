"""Byte-level BPE tokenizer of the built-in tiny models, and the chat template they share.

Special tokens (ids 0..3, in this order):

* ``<|bos|>`` — begins every document; the tokenizer adds it to encoded text, as Llama's does;
* ``<|endoftext|>`` — ends every document; the eos (and pad) token;
* ``<|im_start|>`` / ``<|im_end|>`` — open / close a chat turn (ChatML-like); ``<|im_end|>``
  is a second stop token in ``generation_config.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from raysvc.tools.corpus import Document

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# ChatML-like, written with the tokenizer's own special tokens. Starts with bos (the chat
# template, not the tokenizer, adds it: apply_chat_template encodes without special tokens).
# With `tools`, a system block lists their signatures and asks for Hermes-style
# <tool_call>{"name", "arguments"}</tool_call> answers (the format Qwen2.5/3 use, which
# raysvc's hermes parser reads); an assistant's replayed calls and the tools' answers
# render the same way. Without tools, the text is what it always was.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ 'You may call functions. Their signatures:\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\nTo call one, answer with <tool_call>{\"name\": NAME, \"arguments\": "
    "{...}}</tool_call>.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.tool_calls is defined "
    "and message.tool_calls %}"
    "{{ '<|im_start|>assistant\n' + message['content'] }}"
    "{% for call in message.tool_calls %}"
    "{{ '<tool_call>\n' }}{{ {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson }}{{ '\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>\n' + message['content'] + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def document_text(doc: Document, tokenizer: PreTrainedTokenizerFast) -> str:
    """A document as the model sees it, bos to eos (chat documents through the template)."""
    if doc.question is None:
        return f"{BOS}{doc.text}{EOS}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": doc.question}], tokenize=False, add_generation_prompt=True
    )
    return f"{prompt}{doc.text}{IM_END}\n{EOS}"


def encode_documents(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """All documents as one token stream (for packing into fixed-length training rows)."""
    texts = [document_text(d, tokenizer) for d in docs]
    stream: list[int] = []
    # The backend tokenizer directly: no "longer than model_max_length" warning per document.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
    return stream
