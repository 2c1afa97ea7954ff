"""Conversation -> token ids, labels and token kinds, with `<image>` expanded into visual units.

Steps (all through the generic tokenizer API, no hard-coded token ids):
1. turns -> chat messages: human->user, gpt->assistant, an optional system prompt; the `<image>`
   placeholder moved to the start of its turn as "<image>\\n..." (inserted into the first user turn when a
   sample has media but no placeholder), as Cambrian does. The number of placeholders must equal the
   number of media (one image, or one video) or the sample is skipped ("placeholder_mismatch").
2. The chat template renders the text; each assistant turn's character span is found by rendering the
   conversation up to that turn with the generation prompt (the span starts where that rendering ends)
   and covers the turn's content plus the end-of-turn special token that follows it.
3. The text is split at the placeholders and each piece tokenized with character offsets; between pieces
   every visual unit becomes grid_h*grid_w VISUAL positions followed by num_context CONTEXT positions
   (ids = pad id, labels -100). A token is supervised iff its first character lies in an assistant span.
4. Look spans (`look_bins`, GazeVLM): an assistant turn with a box (record field `boxes`) starts with
   `<look>` + four location tokens + the box's text + `</look>` (one span per box, in order), supervised
   like the rest of the turn.
5. Sequences over `max_length` lose text after their last unit; if the units themselves do not fit the
   sample is skipped ("over_length"), and one with no supervised token left is skipped ("all_masked").
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from gazelit.attention.layout import CONTEXT, TEXT, VISUAL
from gazelit.attention.look import LOOK_CLOSE, LOOK_OPEN, box_to_bins, loc_token

from gazelit.datamodules.records import IMAGE_PLACEHOLDER, LookBox
from gazelit.datamodules.skips import ALL_MASKED, EMPTY_CONVERSATION, OVER_LENGTH, PLACEHOLDER_MISMATCH, SkipSample

IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    token_kind: list[int]
    unit_starts: list[int]  # first visual position of each unit, in order

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatEncoder:
    """Encodes conversations for one tokenizer, visual grid and context size. Picklable (goes to workers)."""

    def __init__(
        self,
        tokenizer: Any,
        visual_grid: tuple[int, int],
        num_context: int = 0,
        max_length: int = 2048,
        system_prompt: str | None = "You are a helpful assistant.",
        placeholder: str = IMAGE_PLACEHOLDER,
        look_bins: int | None = None,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("label masking needs a fast tokenizer (character offsets); load it with use_fast=True")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (its id fills visual and context positions)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template")
        if system_prompt and placeholder in system_prompt:
            raise ValueError(f"the system prompt must not contain the placeholder {placeholder!r}")
        if visual_grid[0] < 1 or visual_grid[1] < 1 or num_context < 0:
            raise ValueError(f"bad visual_grid {visual_grid} / num_context {num_context}")
        self.tokenizer = tokenizer
        self.visual_grid = (int(visual_grid[0]), int(visual_grid[1]))
        self.num_context = int(num_context)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.placeholder = placeholder
        self.look_bins = look_bins
        if look_bins and tokenizer.convert_tokens_to_ids(LOOK_OPEN) in (None, tokenizer.unk_token_id):
            raise ValueError("look spans need the model's tokenizer (with the look tokens): build it with model.look")
        self.special_tokens = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
            | set(tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )

    @property
    def unit_length(self) -> int:
        """Positions one visual unit occupies: its visual tokens plus its context tokens."""
        return self.visual_grid[0] * self.visual_grid[1] + self.num_context

    # ---------------------------------------------------------------------------------------- messages
    def messages(self, turns: list[tuple[str, str]], num_media: int) -> list[dict[str, str]]:
        """Chat messages with the placeholder normalised; SkipSample if empty or the count is wrong."""
        if not any(text.strip() for _, text in turns):
            raise SkipSample(EMPTY_CONVERSATION, f"{len(turns)} turns, all empty")
        ph = self.placeholder
        found = sum(text.count(ph) for _, text in turns)
        outside_user = sum(text.count(ph) for role, text in turns if role != "user")
        if outside_user or found > num_media or (found == 0 and num_media > 1):
            raise SkipSample(PLACEHOLDER_MISMATCH, f"{found} placeholders ({outside_user} outside user turns) "
                                                   f"for {num_media} media")
        messages = []
        inserted = found > 0
        for role, text in turns:
            if role == "user" and ph in text:
                text = ph + "\n" + text.replace(ph, "").strip()
            elif role == "user" and not inserted and num_media == 1:
                text, inserted = ph + "\n" + text.strip(), True
            messages.append({"role": role, "content": text})
        if num_media and not inserted:
            raise SkipSample(PLACEHOLDER_MISMATCH, "the sample has media but no user turn to put it in")
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    # ---------------------------------------------------------------------------------------- tokens
    def look_span(self, look: LookBox) -> str:
        """The text of a look span: <look>, the box's four location tokens, its text, </look>."""
        locs = "".join(loc_token(c) for c in box_to_bins(look.box, self.look_bins))
        return f"{LOOK_OPEN}{locs}{look.text}{LOOK_CLOSE}"

    def encode(
        self, turns: list[tuple[str, str]], units_per_media: list[int], boxes: list[list[LookBox]] | None = None
    ) -> TokenizedConversation:
        """Tokens for a conversation whose media expand to `units_per_media[i]` units (1 per image, the
        number of sampled frames for a video). `boxes` (the looks of each assistant turn) become look spans
        at the start of their turns when the encoder has `look_bins`. Raises SkipSample for a sample that cannot be
        trained on."""
        if boxes is not None and self.look_bins:
            answers = iter(boxes)
            with_looks = []
            for role, text in turns:
                looks = next(answers) if role == "assistant" else []
                with_looks.append((role, "".join(self.look_span(look) for look in looks) + text))
            turns = with_looks
        messages = self.messages(turns, len(units_per_media))
        text = self._render(messages)
        spans = self._assistant_spans(messages, text)
        span_starts = [a for a, _ in spans]

        def supervised(char: int) -> bool:
            i = bisect.bisect_right(span_starts, char) - 1
            return i >= 0 and char < spans[i][1]

        ids, labels, kinds, unit_starts = self._tokenize(text, units_per_media, supervised)
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample(ALL_MASKED, "no assistant token to supervise")
        if len(ids) > self.max_length:
            units_end = unit_starts[-1] + self.unit_length if unit_starts else 0
            if units_end > self.max_length:
                raise SkipSample(OVER_LENGTH, f"{len(unit_starts)} units end at {units_end} > max_length "
                                              f"{self.max_length}")
            ids, labels, kinds = ids[: self.max_length], labels[: self.max_length], kinds[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise SkipSample(ALL_MASKED, f"no supervised token left after truncation to {self.max_length}")
        return TokenizedConversation(ids, labels, kinds, unit_starts)

    def encode_prompt(self, turns: list[tuple[str, str]], units_per_media: list[int]) -> TokenizedConversation:
        """Tokens of a conversation ending with the assistant generation prompt (inference; no labels).

        Identical to `encode` of the same conversation up to its first assistant token."""
        messages = self.messages(turns, len(units_per_media))
        text = self._render(messages, add_generation_prompt=True)
        ids, labels, kinds, unit_starts = self._tokenize(text, units_per_media, lambda char: False)
        return TokenizedConversation(ids, labels, kinds, unit_starts)

    def _tokenize(self, text: str, units_per_media: list[int], supervised) -> tuple[list, list, list, list]:
        """Tokenize the text between placeholders; each unit becomes grid VISUAL + M CONTEXT positions."""
        ids: list[int] = []
        labels: list[int] = []
        kinds: list[int] = []
        unit_starts: list[int] = []
        grid_tokens = self.visual_grid[0] * self.visual_grid[1]
        pad = self.tokenizer.pad_token_id
        pieces = text.split(self.placeholder)
        offset = 0
        for index, piece in enumerate(pieces):
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                for token, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
                    ids.append(token)
                    kinds.append(TEXT)
                    labels.append(token if supervised(offset + start) else IGNORE_INDEX)
            offset += len(piece) + len(self.placeholder)
            if index < len(pieces) - 1:
                for _ in range(units_per_media[index]):
                    unit_starts.append(len(ids))
                    ids.extend([pad] * self.unit_length)
                    kinds.extend([VISUAL] * grid_tokens + [CONTEXT] * self.num_context)
                    labels.extend([IGNORE_INDEX] * self.unit_length)
        return ids, labels, kinds, unit_starts

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the supervised part of every assistant turn in `text`."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:index], add_generation_prompt=True)
            if not text.startswith(prefix):
                raise ValueError(
                    "the chat template renders a conversation prefix differently from the full conversation; "
                    "assistant turns cannot be located for label masking"
                )
            start = len(prefix)
            content = message["content"].strip()
            found = text.find(content, start) if content else start
            if found < 0:
                raise ValueError(f"assistant turn {index} content not found in the rendered conversation")
            end = found + len(content)
            end_of_turn = next((t for t in self.special_tokens if text.startswith(t, end)), "")
            spans.append((start, end + len(end_of_turn)))
        return spans
