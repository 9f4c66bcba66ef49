"""The tiny model's tokenizer: a byte-level BPE trained locally on a fixed EventQA corpus.

No model hub is reachable, so the CPU default builds its own tokenizer. It mirrors Qwen2.5-VL's
where it matters to the model code:

  * Qwen's special tokens, same names and order (`<|endoftext|>` first, then `<|im_start|>`,
    `<|im_end|>`, ..., `<|vision_start|>`, `<|vision_end|>`, `<|vision_pad|>`, `<|image_pad|>`,
    `<|video_pad|>`), at ids 0..13 here (151643.. in Qwen).
  * Qwen2-VL's chat template (system prompt, `<|im_start|>role\\n...<|im_end|>\\n`, one
    `<|vision_start|><|video_pad|><|vision_end|>` per video; the input builder expands the pad).
  * `<think>`, `</think>`, `<answer>`, `</answer>` are single, NON-special added tokens: they stay in
    decoded text (the format reward reads them) but cost one token each.

The BPE is trained on a deterministic corpus: every EventQA caption, the questions/options of
many planned (not rendered) EventQA videos, the Video-R1 prompt, reasoning-style completions,
digits and letters. Same corpus, same vocabulary: `build_tokenizer()` is reproducible, and
`save_pretrained` / `load_tokenizer` give every later stage the same files.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages import sample_data as eq

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""Qwen2.5-VL's special tokens in Qwen's id order; here they take ids 0..13."""

FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
"""Reasoning-format tags: one token each, not special (they survive skip_special_tokens)."""

DEFAULT_VOCAB_SIZE = 1024
"""256 byte symbols + 14 special + 4 format tokens + ~750 merges: every corpus word is 1-2 tokens."""

SYSTEM_PROMPT = "You are a helpful assistant."

# Video-R1's GRPO prompt (QUESTION_TEMPLATE + TYPE_TEMPLATE), verbatim.
QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}

# Qwen2-VL's chat template, reduced to text and video/image parts (no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


COMPACT_INSTRUCTION = "Think, then answer with the option letter."
"""The `compact` prompt style's whole instruction (ModelConfig.prompt_style): the tiny CPU model's
prompt cost is dominated by Video-R1's ~150-token instruction, which carries nothing it can use."""


def question_text(problem: str, options: list[str] | None = None, problem_type: str = "multiple choice",
                  style: str = "video-r1") -> str:
    """The user turn's text as Video-R1 builds it: problem, options, the think/answer instruction.
    style="compact": problem, options, then COMPACT_INSTRUCTION (same answer format expected)."""
    question = problem
    if problem_type == "multiple choice":
        question = problem + "Options:\n" + "".join(op + "\n" for op in options or [])
    if style == "compact":
        return question + COMPACT_INSTRUCTION
    return QUESTION_TEMPLATE.format(Question=question) + TYPE_TEMPLATE[problem_type]


def chat_messages(problem: str, options: list[str] | None = None, problem_type: str = "multiple choice",
                  video: bool = True, style: str = "video-r1") -> list[dict]:
    """One user turn: the video placeholder first, then the question (Video-R1's order)."""
    content = ([{"type": "video"}] if video else []) + [
        {"type": "text", "text": question_text(problem, options, problem_type, style)}
    ]
    return [{"role": "user", "content": content}]


def training_corpus() -> list[str]:
    """The fixed corpus the BPE learns from (deterministic: no randomness outside fixed seeds)."""
    names = list(eq.PALETTE)
    captions = [eq.caption(c, s, d, b) for c, s, d, b in
                itertools.product(names, eq.SHAPES, eq.DIRECTIONS, names) if c != b]
    lines: list[str] = list(captions)
    # Questions and options of planned videos (planning is pure; nothing is rendered).
    for seed, i in itertools.product(range(3), range(40)):
        events, rng = eq.plan_video(seed, i, 128, 128, 10)
        for q in eq.make_questions(events, rng):
            letter = q["solution"][len("<answer>"):-len("</answer>")]
            lines.append(question_text(q["problem"], q["options"]))
            lines.append(f"<think>{events[q['answer_event']].caption}</think><answer>{letter}</answer>")
            lines.append(f"<think>let me think. the answer is {letter}</think> <answer>{letter}</answer>")
    for problem_type in TYPE_TEMPLATE:
        lines.append(question_text("What is shown?", ["A. x", "B. y"], problem_type))
    lines.append(SYSTEM_PROMPT)
    lines += [" ".join("0123456789"), " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
              " ".join("abcdefghijklmnopqrstuvwxyz"), "0 1 2 3 4 5 6 7 8 9 10 42 3.14 100",
              "user assistant system event scene frame video first second third then before after"]
    return lines


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `training_corpus()` and wrap it as a transformers tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..13, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",  # Qwen's chat models stop at the end of the assistant turn
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",  # batched generation appends to the right
        model_max_length=32768,
    )
    tokenizer.add_tokens(FORMAT_TOKENS)  # after training: fixed ids right after the BPE vocab
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The saved tokenizer (tiny model) or a checkpoint's own one, from local files only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer
