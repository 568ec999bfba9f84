"""Token ids and label masks: hand-computed on a word-level tokenizer and on SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.data import IGNORE_INDEX, Example, Message, encode, get_task, prompt_ids, prompt_text, task_names, use_chat
from lorakit.data.chat import render
from lorakit.errors import DataError
from tests.data.conftest import token_id, toy_tokenizer

X = IGNORE_INDEX
PAIR = Example(prompt="Reverse planet", completion="tenalp")
CONVERSATION = Example(messages=(
    Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"),
    Message("user", "bye"), Message("assistant", "ciao"),
))


def ids(*tokens: str) -> list[int]:
    return [token_id(token) for token in tokens]


def test_chat_pair_supervises_completion_and_end_of_turn(toy):
    encoded = encode(PAIR, toy, chat=True, max_length=None)
    assert encoded.input_ids == ids("<|im_start|>", "user", "Reverse", "planet", "<|im_end|>",
                                    "<|im_start|>", "assistant", "tenalp", "<|im_end|>")
    assert encoded.labels == [X] * 7 + ids("tenalp", "<|im_end|>")
    assert encoded.supervised == 2


def test_conversation_supervises_every_assistant_turn_only(toy):
    encoded = encode(CONVERSATION, toy, chat=None, max_length=None)
    turns = [("system", "be", "brief"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")]
    assert encoded.input_ids == [i for t in turns for i in ids("<|im_start|>", *t, "<|im_end|>")]
    expected = [X] * 11 + ids("hello", "<|im_end|>") + [X] * 6 + ids("ciao", "<|im_end|>")
    assert encoded.labels == expected


def test_raw_mode_adds_bos_unsupervised_and_eos_supervised():
    tokenizer = toy_tokenizer(chat_template=None, bos=True)
    encoded = encode(Example(prompt="Reverse planet :", completion="tenalp"), tokenizer, chat=None, max_length=None)
    assert encoded.input_ids == ids("<s>", "Reverse", "planet", ":", "tenalp", "<|im_end|>")
    assert encoded.labels == [X] * 4 + ids("tenalp", "<|im_end|>")
    assert prompt_ids(tokenizer, "Reverse planet :", chat=False) == ids("<s>", "Reverse", "planet", ":")


@pytest.mark.parametrize("max_length, supervised", [(9, 2), (8, 1), (7, 0), (1, 0)])
def test_truncation_keeps_the_first_tokens(toy, max_length, supervised):
    full = encode(PAIR, toy, chat=True, max_length=None)
    cut = encode(PAIR, toy, chat=True, max_length=max_length)
    assert cut.input_ids == full.input_ids[:max_length] and cut.labels == full.labels[:max_length]
    assert cut.supervised == supervised


def test_prompt_text_and_ids_match_the_start_of_training(toy):
    assert prompt_text(toy, PAIR, chat=True) == "<|im_start|>user\nReverse planet<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(toy, "Reverse planet", chat=False) == "Reverse planet"
    for example in (PAIR, CONVERSATION):
        prefix = prompt_ids(toy, example, chat=True)
        assert encode(example, toy, chat=True, max_length=None).input_ids[: len(prefix)] == prefix
    assert prompt_ids(toy, CONVERSATION, chat=True)[-3:] == ids("<|im_end|>", "<|im_start|>", "assistant")


def test_a_template_that_changes_the_content_has_the_whole_turn_supervised():
    upper = toy_tokenizer(chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ))
    encoded = encode(PAIR, upper, chat=True, max_length=None)
    assert encoded.labels == [X] * 7 + ids("<unk>", "<|im_end|>")


def test_a_template_without_an_end_token_supervises_the_content_only():
    plain = toy_tokenizer(chat_template=(
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    ))
    encoded = encode(PAIR, plain, chat=True, max_length=None)
    assert encoded.input_ids == ids("user", ":", "Reverse", "planet", "assistant", ":", "tenalp")
    assert encoded.labels == [X] * 6 + ids("tenalp")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    counting = toy_tokenizer(chat_template="{{ messages | length }}" + toy_tokenizer().chat_template)
    with pytest.raises(DataError, match="renders the conversation up to turn 1 differently"):
        encode(PAIR, counting, chat=True, max_length=None)


def test_template_errors_and_missing_templates_are_data_errors(toy):
    failing = toy_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="cannot render this conversation: roles must alternate"):
        encode(PAIR, failing, chat=True, max_length=None)
    bare = toy_tokenizer(chat_template=None)
    assert use_chat(bare, None) is False and use_chat(toy, None) is True and use_chat(toy, False) is False
    with pytest.raises(DataError, match="no chat template"):
        encode(PAIR, bare, chat=True, max_length=None)
    with pytest.raises(DataError, match="needs chat mode"):
        encode(CONVERSATION, toy, chat=False, max_length=None)
    with pytest.raises(DataError, match="max_length must be a positive"):
        encode(PAIR, toy, chat=True, max_length=0)


# --- the real SmolLM2 tokenizer -------------------------------------------------------------


def supervised_tokens(tokenizer, example: Example, chat: bool) -> list[str]:
    encoded = encode(example, tokenizer, chat=chat, max_length=None)
    return tokenizer.convert_ids_to_tokens([label for label in encoded.labels if label != X])


def test_smollm2_chat_masks_by_hand(smol):
    reverse = Example(prompt="Reverse the letters of the word: planet", completion="tenalp")
    assert supervised_tokens(smol, reverse, chat=True) == ["ten", "al", "p", "<|im_end|>"]
    chat = Example(messages=tuple(Message(m.role, m.content) for m in CONVERSATION.messages))
    assert supervised_tokens(smol, chat, chat=True) == ["hello", "<|im_end|>", "c", "iao", "<|im_end|>"]
    encoded = encode(chat, smol, chat=True, max_length=None)
    assert encoded.labels[-1] == X  # the newline after the last <|im_end|> is not supervised
    full_text = render(smol, chat.messages, generation_prompt=False)
    assert encoded.input_ids == smol(full_text, add_special_tokens=False)["input_ids"]


def test_smollm2_raw_boundary_clean_and_merged(smol):
    clean = Example(prompt="Add: 12 + 5 =", completion=" 17")
    encoded = encode(clean, smol, chat=False, max_length=None)
    assert encoded.input_ids == smol("Add: 12 + 5 = 17")["input_ids"] + [smol.eos_token_id]
    assert smol.convert_ids_to_tokens(encoded.input_ids[-4:]) == ["Ġ", "1", "7", "<|im_end|>"]
    # "planet" + "s" is one token in the full text: the completion is tokenised on its own instead,
    # so that training sees exactly the prompt ids generation will see.
    merged = Example(prompt="word: planet", completion="s")
    encoded = encode(merged, smol, chat=False, max_length=None)
    assert encoded.input_ids != smol("word: planets")["input_ids"] + [smol.eos_token_id]
    assert encoded.input_ids == smol("word: planet")["input_ids"] + smol("s")["input_ids"] + [smol.eos_token_id]
    assert supervised_tokens(smol, merged, chat=False) == ["s", "<|im_end|>"]


@pytest.mark.parametrize("name", task_names())
def test_smollm2_task_examples_tokenise_like_their_full_text(smol, name):
    for example in get_task(name).examples("train", 40):
        encoded = encode(example, smol, chat=True, max_length=None)
        full_text = render(smol, (Message("user", example.prompt), Message("assistant", example.completion)),
                           generation_prompt=False)
        assert encoded.input_ids == smol(full_text, add_special_tokens=False)["input_ids"]
        assert smol.decode([t for t in encoded.labels if t != X]) == example.completion + "<|im_end|>"


#: SmolLM2's byte-level vocabulary lacks 21 of the 256 byte tokens: six control characters
#: (U+0004, U+0006, U+0013, U+0014, U+0016, U+001D vanish when tokenised) and the lead bytes of
#: unassigned planes 4-11 (0xF1, 0xF2), so control and unassigned characters are left out.
printable = st.characters(exclude_categories=("Cc", "Cs", "Cn"), include_characters="\n\t")


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(printable, max_size=30), completion=st.text(printable, min_size=1, max_size=30),
       chat=st.booleans())
def test_smollm2_supervised_tokens_decode_to_the_completion(smol, prompt, completion, chat):
    example = Example(prompt=prompt, completion=completion)
    encoded = encode(example, smol, chat=chat, max_length=None)
    prefix = prompt_ids(smol, example, chat=chat)
    assert encoded.input_ids[: len(prefix)] == prefix
    assert all(label in (X, token) for label, token in zip(encoded.labels, encoded.input_ids, strict=True))
    assert smol.decode([t for t in encoded.labels if t != X]) == completion + "<|im_end|>"
