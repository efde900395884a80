"""Prompt formatting: task + answer -> token ids with one audio placeholder and a loss mask.

Simple template (tokenizers without a chat template, e.g. the demo tokenizer)::

    <s> {instruction}␠<|audio|>\\n | {answer} </s>
    └─────────── prompt ──────────┘ └─ loss_mask ─┘

    - ``<s>`` is left out when the tokenizer has no bos token;
    - f"{instruction} <|audio|>\\n" is tokenized as one string without special tokens (the
      placeholder is itself a special token: one id); the answer is tokenized on its own;
    - ``loss_mask`` is True exactly on the answer tokens and the final ``</s>``.

Chat template (``tokenizer.chat_template`` set, or ``use_chat_template=True``)::

    messages = [{"role": "user", "content": f"{instruction} <|audio|>"}]
    prompt   = apply_chat_template(messages, add_generation_prompt=True)
    full     = apply_chat_template(messages + [{"role": "assistant", "content": answer}])
    answer ids = tokens of full[len(prompt):]  (the template must keep the prompt as a prefix)

    The answer part is what the template puts after the generation prompt: the answer and the
    end-of-turn marker. Text after the last eos (often "\\n") is dropped; when the template emits
    no eos at all, eos is appended, so generation can always stop on ``eos_token_id``.

``answer=None`` returns the prompt alone (for generation). Every prompt holds exactly one
``<|audio|>`` token; the model replaces it by the clip's audio embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from salm_mtp.data.tokenizer import AUDIO_PLACEHOLDER, ensure_audio_placeholder

TASKS: tuple[str, ...] = ("asr", "ast")
"""Known tasks: ``asr`` (answer = transcript), ``ast`` (answer = translation)."""


@dataclass
class PromptConfig:
    """How prompts are worded and templated (``--data.prompt.*``)."""

    asr_instruction: str = "Transcribe the audio."
    """Instruction for ``asr`` cuts."""
    ast_instruction: str = "Translate the audio to {target_lang}."
    """Instruction for ``ast`` cuts; ``{target_lang}`` is replaced by ``target_lang``."""
    target_lang: str = "digits"
    """Target language named in the ``ast`` instruction (the demo "translates" to digits)."""
    use_chat_template: bool | None = None
    """True: use the tokenizer's chat template; False: the simple template; None: the chat
    template when the tokenizer has one."""

    def __post_init__(self) -> None:
        for key in ("asr_instruction", "ast_instruction"):
            text = getattr(self, key)
            if AUDIO_PLACEHOLDER in text:
                raise ValueError(
                    f"data.prompt.{key} must not contain {AUDIO_PLACEHOLDER!r} (the formatter adds "
                    f"exactly one), got {text!r}; set --data.prompt.{key}"
                )
        try:
            self.ast_instruction.format(target_lang=self.target_lang)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"data.prompt.ast_instruction may only use the field {{target_lang}}, got "
                f"{self.ast_instruction!r} ({err!r}); set --data.prompt.ast_instruction"
            ) from None

    def instruction(self, task: str) -> str:
        """The instruction text for ``task``."""
        if task == "asr":
            return self.asr_instruction
        if task == "ast":
            return self.ast_instruction.format(target_lang=self.target_lang)
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


@dataclass(frozen=True)
class EncodedPrompt:
    """One encoded example: prompt ids followed by answer ids."""

    input_ids: list[int]
    """Prompt + answer token ids, length T."""
    loss_mask: list[bool]
    """True on answer tokens (incl. the final eos / end-of-turn), length T."""
    prompt_len: int
    """Number of prompt tokens (the answer starts at this index)."""


class PromptFormatter:
    """Turns (task, answer) into token ids; see the module docstring for the templates.

    Adds ``<|audio|>`` to ``tokenizer`` if missing (in place, see ``ensure_audio_placeholder``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: PromptConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg if cfg is not None else PromptConfig()
        self.audio_token_id: int = ensure_audio_placeholder(self.tokenizer)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        use = self.cfg.use_chat_template
        if use and not has_template:
            raise ValueError(
                "data.prompt.use_chat_template is True but the tokenizer has no chat template; "
                "set --data.prompt.use_chat_template false (or null to decide automatically)"
            )
        self.use_chat_template: bool = has_template if use is None else use
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; answers must end with one")
        self._prompt_cache: dict[str, list[int]] = {}

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _messages(self, task: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.cfg.instruction(task)} {AUDIO_PLACEHOLDER}"}]

    def _prompt_text(self, task: str) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(task), tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, task: str) -> list[int]:
        """Token ids of the prompt for ``task`` (cached: it is the same for every example)."""
        if task not in self._prompt_cache:
            if self.use_chat_template:
                ids = self._encode_text(self._prompt_text(task))
            else:
                bos = self.tokenizer.bos_token_id
                ids = [bos] if bos is not None else []
                # one string: the placeholder is a special token, so it stays one id, and the
                # text around it gets the tokenizer's usual mid-text treatment
                ids += self._encode_text(f"{self.cfg.instruction(task)} {AUDIO_PLACEHOLDER}\n")
            count = ids.count(self.audio_token_id)
            if count != 1:
                raise ValueError(
                    f"the {task!r} prompt holds {count} {AUDIO_PLACEHOLDER!r} tokens, expected "
                    f"exactly 1: {self.tokenizer.convert_ids_to_tokens(ids)}"
                )
            self._prompt_cache[task] = ids
        return list(self._prompt_cache[task])

    def answer_ids(self, task: str, answer: str) -> list[int]:
        """Token ids of the answer part, ending with eos (or the template's end of turn)."""
        eos = self.tokenizer.eos_token_id
        if not self.use_chat_template:
            return self._encode_text(answer) + [eos]
        prompt = self._prompt_text(task)
        full = self.tokenizer.apply_chat_template(
            self._messages(task) + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not keep the generation prompt as a prefix of the full "
                f"conversation, so answer tokens cannot be located:\n  prompt: {prompt!r}\n"
                f"  full:   {full!r}\nset --data.prompt.use_chat_template false"
            )
        ids = self._encode_text(full[len(prompt) :])
        if eos in ids:
            ids = ids[: len(ids) - ids[::-1].index(eos)]  # drop what follows the last eos
        else:
            ids.append(eos)
        return ids

    def encode(self, task: str, answer: str | None = None) -> EncodedPrompt:
        """Encode one example; ``answer=None`` gives the prompt alone (for generation)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        prompt = self.prompt_ids(task)
        answer_ids = [] if answer is None else self.answer_ids(task, answer)
        return EncodedPrompt(
            input_ids=prompt + answer_ids,
            loss_mask=[False] * len(prompt) + [True] * len(answer_ids),
            prompt_len=len(prompt),
        )

    # ---- conversations (salm_mtp.data.conversation) ------------------------------------------
    def encode_messages(self, messages: list[dict[str, str]], loss_turns: str = "all") -> EncodedPrompt:
        """Encode a conversation: ``{"role": system|user|assistant, "content"}`` messages ending with the assistant.

        ``loss_mask`` is True on the assistant tokens (each answer and its eos / end of turn): on every assistant
        message (``loss_turns="all"``) or only the last one ("last"). ``prompt_len`` is where the last assistant
        message starts (the history before it is the generation prompt). User contents carry ``<|audio|>``
        placeholders, one id each. Simple template::

            <s> {system}\\n {user}\\n {assistant} </s> {user}\\n {assistant} </s> ...

        (``[user "instruction <|audio|>", assistant answer]`` gives exactly ``encode(task, answer)``). With a chat
        template each assistant part is what the template adds after the generation prompt of the history.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a conversation must end with an assistant message")
        if loss_turns not in ("all", "last"):
            raise ValueError(f"loss_turns must be 'all' or 'last', got {loss_turns!r}")
        last = len(messages) - 1
        pieces: list[tuple[list[int], bool]] = []  # (ids, is an assistant answer that carries the loss)
        last_answer = 0  # index in pieces of the last assistant answer
        if self.use_chat_template:
            done = ""
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                gen = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                full = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
                if not gen.startswith(done) or not full.startswith(gen):
                    raise ValueError("the chat template does not render the conversation's history as a prefix, so "
                                     "assistant tokens cannot be located; set --data.prompt.use_chat_template false")
                pieces.append((self._encode_text(gen[len(done):]), False))
                answer = self._encode_text(full[len(gen):])
                eos = self.tokenizer.eos_token_id
                tail: list[int] = []
                if eos in answer:
                    cut = len(answer) - answer[::-1].index(eos)
                    answer, tail = answer[:cut], answer[cut:]  # what follows the end of turn is not a target
                else:
                    answer = answer + [eos]
                last_answer = len(pieces)
                pieces.append((answer, loss_turns == "all" or i == last))
                if tail:
                    pieces.append((tail, False))
                done = full
        else:
            bos = self.tokenizer.bos_token_id
            pieces.append(([bos] if bos is not None else [], False))
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    last_answer = len(pieces)
                    pieces.append((self._encode_text(m["content"]) + [self.tokenizer.eos_token_id],
                                   loss_turns == "all" or i == last))
                else:  # system and user messages end with a newline, like the single-turn prompt
                    pieces.append((self._encode_text(f"{m['content']}\n"), False))
        ids: list[int] = []
        mask: list[bool] = []
        prompt_len = 0
        for n, (piece, loss) in enumerate(pieces):
            if n == last_answer:
                prompt_len = len(ids)
            ids += piece
            mask += [loss] * len(piece)
        return EncodedPrompt(input_ids=ids, loss_mask=mask, prompt_len=prompt_len)

    def instruction_messages(self, task: str, answer: str) -> list[dict[str, str]]:
        """The conversation a single-turn cut of ``task`` is (``encode_messages`` of it equals ``encode``)."""
        return self._messages(task) + [{"role": "assistant", "content": answer}]
